//! `examples/gateway.rs` run as its own process and spoken to over HTTP:
//! every status code it answers, and a shutdown under load that loses no
//! answered request and leaves no `-wal` or `-shm` behind.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keytally::{AllowedModels, EventCursor, EventFilter, NewKey, Store};

use crate::support::binary::{keytally, path_arg};
use crate::support::crash_writer::example;
use crate::TestResult;

/// A running gateway; killed if the test ends without stopping it.
struct Gateway {
    child: Child,
    address: String,
}

impl Gateway {
    fn start(db: &Path) -> Result<Gateway, Box<dyn std::error::Error>> {
        Gateway::start_with(db, &[])
    }

    fn start_with(db: &Path, args: &[&str]) -> Result<Gateway, Box<dyn std::error::Error>> {
        let mut child = Command::new(example("gateway")?)
            .arg("--db")
            .arg(db)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let address = line
            .trim()
            .strip_prefix("listening on ")
            .ok_or_else(|| format!("the gateway printed {line:?} instead of its address"))?
            .to_owned();
        Ok(Gateway { child, address })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// SIGTERM, then the exit status and what it printed on stderr.
    fn stop(mut self) -> Result<(Option<i32>, String), Box<dyn std::error::Error>> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill(2) with a pid this test started and has not reaped.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                return Err("the gateway did not exit within 60 s of SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            std::io::Read::read_to_string(&mut pipe, &mut stderr)?;
        }
        Ok((status.code(), stderr))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request; the status and the body, whatever the status.
fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    secret: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, serde_json::Value), Box<dyn std::error::Error>> {
    let mut request = agent.request(method, url);
    if let Some(secret) = secret {
        request = request.set("Authorization", &format!("Bearer {secret}"));
    }
    let outcome = match body {
        Some(body) => request
            .set("Content-Type", "application/json")
            .send_string(body),
        None => request.call(),
    };
    let response = match outcome {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(error) => return Err(error.into()),
    };
    let status = response.status();
    let text = response.into_string()?;
    Ok((status, serde_json::from_str(&text)?))
}

const ASK: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}"#;

fn database(folder: &tempfile::TempDir) -> PathBuf {
    folder.path().join("gateway.db")
}

#[test]
fn every_answer_of_the_gateway_over_http() -> TestResult {
    let folder = tempfile::tempdir()?;
    let db = database(&folder);
    let store = Store::open(&db)?;
    let keys = store.keys();
    let active = keys.create(&NewKey::client("active"))?;
    let mut narrow = NewKey::client("narrow");
    narrow.allowed_models = AllowedModels::from_names(&["gpt-4o"])?;
    let narrow = keys.create(&narrow)?;
    let revoked = keys.create(&NewKey::client("revoked"))?;
    keys.revoke(revoked.key.id)?;
    let later = keys.create(&NewKey::client("revoked while the gateway runs"))?;
    let rotated = keys.create(&NewKey::client("rotated"))?;
    keys.rotate(rotated.key.id, Duration::ZERO)?;
    let stranger = {
        let other = tempfile::tempdir()?;
        let other_store = Store::open(other.path().join("other.db"))?;
        let secret = other_store
            .keys()
            .create(&NewKey::client("elsewhere"))?
            .secret;
        let _ = other_store.close()?;
        secret
    };
    let _ = store.close()?;

    let gateway = Gateway::start(&db)?;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let completions = gateway.url("/v1/chat/completions");
    let post =
        |secret: Option<&str>, body: &str| call(&agent, "POST", &completions, secret, Some(body));
    let code = |outcome: (u16, serde_json::Value)| outcome.1["error"]["code"].clone();

    let (status, answer) = post(Some(active.secret.expose()), ASK)?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    assert!(answer["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    let answered_id = answer["id"].clone();

    for (secret, body, expected, error) in [
        (None, ASK, 401, "missing_api_key"),
        (Some("kt_not-a-secret"), ASK, 401, "invalid_api_key"),
        (Some(stranger.expose()), ASK, 401, "invalid_api_key"),
        (Some(revoked.secret.expose()), ASK, 403, "key_not_active"),
        (Some(rotated.secret.expose()), ASK, 403, "key_not_active"),
        (Some(narrow.secret.expose()), ASK, 403, "model_not_allowed"),
        (
            Some(active.secret.expose()),
            r#"{"model":"no-such-model"}"#,
            404,
            "model_not_found",
        ),
        (
            Some(active.secret.expose()),
            "{not json",
            400,
            "invalid_json",
        ),
        (
            Some(active.secret.expose()),
            r#"{"messages":[]}"#,
            400,
            "missing_model",
        ),
    ] {
        let outcome = post(secret, body)?;
        assert_eq!(outcome.0, expected, "{body} with {error}: {}", outcome.1);
        assert_eq!(code(outcome), error);
    }
    // The narrow key may use its own model.
    assert_eq!(
        post(Some(narrow.secret.expose()), r#"{"model":"gpt-4o"}"#)?.0,
        200
    );

    // Usage is the caller's own: one request for the active key, once its
    // event is committed (the sink batches for up to 50 ms).
    let usage_url = gateway.url("/v1/usage");
    let deadline = Instant::now() + Duration::from_secs(10);
    let usage = loop {
        let (status, usage) = call(
            &agent,
            "GET",
            &usage_url,
            Some(active.secret.expose()),
            None,
        )?;
        assert_eq!(status, 200, "{usage}");
        if usage["totals"]["requests"] == 1 || Instant::now() > deadline {
            break usage;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(usage["key"], active.key.id.to_string());
    assert_eq!(usage["totals"]["requests"], 1, "{usage}");
    assert_eq!(
        call(
            &agent,
            "GET",
            &usage_url,
            Some(revoked.secret.expose()),
            None
        )?
        .0,
        403
    );
    assert_eq!(call(&agent, "GET", &usage_url, None, None)?.0, 401);

    // A revoke made with the command line while the gateway runs: the
    // gateway answers from memory (notified mode), and refuses the key
    // once its watcher has read the change.
    assert_eq!(post(Some(later.secret.expose()), ASK)?.0, 200);
    let revoke = keytally(&[
        "--db",
        path_arg(&db)?,
        "keys",
        "revoke",
        &later.key.id.to_string(),
    ])?;
    assert!(revoke.status.success(), "{revoke:?}");
    let revoked_at = Instant::now();
    loop {
        let (status, body) = post(Some(later.secret.expose()), ASK)?;
        if status == 403 {
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            revoked_at.elapsed() < Duration::from_secs(5),
            "the gateway still accepts a key revoked 5 s ago"
        );
    }

    let (exit, stderr) = gateway.stop()?;
    assert_eq!(exit, Some(0), "{stderr}");
    let store = Store::open(&db)?;
    let events = store.events().list(&EventFilter::default())?;
    let accepted_after = events
        .iter()
        .filter(|e| e.key_id == Some(later.key.id))
        .count();
    assert!(
        accepted_after >= 1,
        "the first request of the later-revoked key is missing"
    );
    assert_eq!(
        events.len() - accepted_after,
        2,
        "only answered requests are events"
    );
    assert!(events.iter().any(
        |e| e.request_id.as_deref() == answered_id.as_str() && e.key_id == Some(active.key.id)
    ));
    let _ = store.close()?;
    Ok(())
}

#[test]
fn sigterm_under_load_loses_no_answered_request_and_leaves_no_sidecar() -> TestResult {
    let folder = tempfile::tempdir()?;
    let db = database(&folder);
    let store = Store::open(&db)?;
    let secret = store.keys().create(&NewKey::client("load"))?.secret;
    let _ = store.close()?;
    let gateway = Gateway::start(&db)?;
    let url = gateway.url("/v1/chat/completions");
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (url, secret, stop) = (url.clone(), secret.expose().to_owned(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(30))
                    .build();
                let mut answered = Vec::new();
                let mut refused = 0u64;
                // Until the gateway stops answering: requests cut off by the
                // shutdown end the loop (they got no answer).
                while !stop.load(Ordering::Relaxed) {
                    match call(&agent, "POST", &url, Some(&secret), Some(ASK)) {
                        Ok((200, answer)) => {
                            answered.push(answer["id"].as_str().unwrap_or_default().to_owned())
                        }
                        Ok((503, _)) => refused += 1,
                        Ok((status, body)) => return Err(format!("{status}: {body}")),
                        Err(_) => break,
                    }
                }
                Ok((answered, refused))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    // SIGTERM while the clients are still sending.
    let (exit, stderr) = gateway.stop()?;
    stop.store(true, Ordering::Relaxed);
    let mut answered = HashSet::new();
    for client in clients {
        let (ids, _refused) = client.join().map_err(|_| "a client panicked")??;
        answered.extend(ids);
    }
    assert_eq!(exit, Some(0), "{stderr}");
    assert!(stderr.contains("store closed"), "{stderr}");
    assert!(
        answered.len() > 100,
        "only {} requests answered",
        answered.len()
    );
    for sidecar in ["-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{sidecar}", db.display()));
        assert!(!path.exists(), "{} is left behind", path.display());
    }
    let store = Store::open(&db)?;
    let mut recorded = HashSet::new();
    let mut filter = EventFilter {
        limit: Some(10_000),
        ..EventFilter::default()
    };
    loop {
        let page = store.events().list(&filter)?;
        let Some(last) = page.last() else { break };
        filter.before = Some(EventCursor {
            ts: last.ts,
            id: last.id,
        });
        recorded.extend(page.iter().filter_map(|e| e.request_id.clone()));
    }
    let unrecorded = answered.difference(&recorded).count();
    let unanswered = recorded.difference(&answered).count();
    assert_eq!(unrecorded, 0, "answered requests without an event");
    assert_eq!(unanswered, 0, "events without an answered request");
    let _ = store.close()?;
    Ok(())
}

#[test]
fn a_full_queue_is_a_503_and_is_counted() -> TestResult {
    let folder = tempfile::tempdir()?;
    let db = database(&folder);
    let store = Store::open(&db)?;
    let secret = store.keys().create(&NewKey::client("busy"))?.secret;
    let _ = store.close()?;
    let gateway = Gateway::start_with(&db, &["--queue", "2"])?;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let url = gateway.url("/v1/chat/completions");
    // One answer first, so the model and the key are known to the store.
    assert_eq!(
        call(&agent, "POST", &url, Some(secret.expose()), Some(ASK))?.0,
        200
    );
    std::thread::sleep(Duration::from_millis(200));
    // Another process holds SQLite's write lock (for less than the busy
    // timeout): the sink's writer waits with one batch, the queue of two
    // fills, and the next requests are refused at once instead of waiting.
    let mut blocker = crate::support::files::raw_connection(&db)?;
    diesel::connection::SimpleConnection::batch_execute(&mut blocker, "BEGIN IMMEDIATE")?;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let (status, body) = call(&agent, "POST", &url, Some(secret.expose()), Some(ASK))?;
        if status == 503 {
            assert_eq!(body["error"]["code"], "overloaded", "{body}");
        }
        statuses.push(status);
        std::thread::sleep(Duration::from_millis(60));
    }
    diesel::connection::SimpleConnection::batch_execute(&mut blocker, "COMMIT")?;
    drop(blocker);
    let answered = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(answered + refused, statuses.len(), "{statuses:?}");
    assert!(refused >= 4, "{statuses:?}");
    let (exit, stderr) = gateway.stop()?;
    assert_eq!(exit, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("{} events recorded", answered + 1))
            && stderr.contains(&format!("{refused} requests refused with 503")),
        "{stderr}"
    );
    let store = Store::open(&db)?;
    assert_eq!(
        store.events().list(&EventFilter::default())?.len(),
        answered + 1
    );
    let _ = store.close()?;
    Ok(())
}
