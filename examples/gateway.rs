//! An API gateway on keytally: axum on tokio, answering OpenAI-style chat
//! completions with a canned reply (no upstream), each one authenticated by
//! a keytally key and recorded as a usage event.
//!
//! ```sh
//! cargo run --release --example gateway -- --db gateway.db --listen 127.0.0.1:8080
//! ```
//!
//! What it shows:
//! - the store opens (and migrates) before the listener binds, and the
//!   address is printed only once bound;
//! - `Authorization: Bearer kt_…` is resolved on every request: 401 for a
//!   missing, malformed or unknown secret, 403 for a revoked or expired key
//!   or a model the key may not use, 404 for a model the gateway does not
//!   serve;
//! - `POST /v1/chat/completions` records one event per answered request
//!   through an [`EventSink`] with [`EventSink::try_submit`], which never
//!   waits: a full queue is a 503 (counted), never a blocked worker;
//! - `GET /v1/usage` returns the caller's own usage over the last 24 hours,
//!   read on tokio's blocking threads;
//! - SIGTERM or SIGINT: stop accepting, finish the requests in flight, flush
//!   the sink, close the store (checkpoint; `-wal` and `-shm` gone), exit 0.
//!
//! A resolve runs on the async worker: the store resolves in notified mode
//! ([`ResolveMode::Notified`]), so a secret seen before is answered from
//! memory, and a revoke made with the `keytally` command is refused within
//! milliseconds. `--strict` makes every resolve read the count of key
//! changes instead (a local read that never waits on SQLite's write lock).
//! Everything that can wait on the lock (the writes, the close) runs off
//! the workers.
//!
//! `--baseline` replaces authentication and recording by a constant, to
//! measure what keytally costs the gateway (docs/performance.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keytally::{
    ActiveKey, Error, EventSink, NewEvent, Rejection, ResolveMode, SinkOptions, Store,
    StoreOptions, Timestamp, UsageFilter,
};
use serde_json::{json, Value};

/// The models this gateway serves.
const MODELS: &[&str] = &["gpt-4o", "gpt-4o-mini", "claude-sonnet-4", "llama-3.1-70b"];

/// The canned reply.
const REPLY: &str = "Hello! This answer comes from keytally's example gateway.";

/// The longest a shutdown waits for queued events to be committed.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

const USAGE: &str =
    "usage: gateway --db PATH|URL --listen ADDR:PORT [--strict] [--baseline] [--queue N]";

struct Args {
    db: String,
    listen: SocketAddr,
    baseline: bool,
    strict: bool,
    queue: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut db = None;
    let mut listen = None;
    let mut baseline = false;
    let mut strict = false;
    let mut queue = SinkOptions::default().capacity;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--db" => db = Some(value("--db")?),
            "--listen" => {
                let text = value("--listen")?;
                listen = Some(
                    text.parse()
                        .map_err(|e| format!("--listen {text}: {e} (expected ADDR:PORT)"))?,
                );
            }
            "--queue" => {
                let text = value("--queue")?;
                queue = text
                    .parse()
                    .map_err(|e| format!("--queue {text}: {e} (expected a count)"))?;
            }
            "--baseline" => baseline = true,
            "--strict" => strict = true,
            other => return Err(format!("unexpected argument {other}")),
        }
    }
    Ok(Args {
        db: db.ok_or("--db is required")?,
        listen: listen.ok_or("--listen is required")?,
        baseline,
        strict,
        queue,
    })
}

/// What every request shares.
struct Gateway {
    store: Arc<Store>,
    sink: EventSink,
    baseline: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("gateway: {message}\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("gateway: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    // Open and migrate before binding: a gateway that answers has a store.
    let options = StoreOptions::new(&args.db).resolve_mode(if args.strict {
        ResolveMode::Strict
    } else {
        ResolveMode::Notified
    });
    let store = tokio::task::spawn_blocking(move || Store::open_with(&options))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.report())?;
    let store = Arc::new(store);
    let sink = EventSink::new(
        Arc::clone(&store),
        SinkOptions {
            capacity: args.queue.max(1),
            ..SinkOptions::default()
        },
    )
    .map_err(|e| e.report())?;
    let gateway = Arc::new(Gateway {
        store,
        sink,
        baseline: args.baseline,
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/usage", get(usage))
        .with_state(Arc::clone(&gateway));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening on {bound}");
    axum::serve(listener, app)
        .with_graceful_shutdown(stop_signal())
        .await
        .map_err(|e| format!("server: {e}"))?;
    // Every request is answered and every connection closed: what was
    // queued is committed, then the store is closed.
    tokio::task::spawn_blocking(move || shut_down(gateway))
        .await
        .map_err(|e| e.to_string())?
}

/// Waits for SIGTERM or SIGINT.
async fn stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                eprintln!("gateway: cannot watch SIGTERM: {error}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("gateway: stopping: finishing the requests in flight");
}

/// Flushes the sink and closes the store, off the async workers.
fn shut_down(gateway: Arc<Gateway>) -> Result<(), String> {
    // The server's connection tasks let go of their clone of the router
    // (and of the gateway in it) just after the graceful shutdown returns.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut shared = gateway;
    let Gateway { store, sink, .. } = loop {
        match Arc::try_unwrap(shared) {
            Ok(gateway) => break gateway,
            Err(_) if Instant::now() > deadline => {
                return Err(
                    "a connection still holds the gateway 10 s after the server ended".into(),
                )
            }
            Err(still_shared) => {
                shared = still_shared;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    let flushed = sink.flush_within(FLUSH_TIMEOUT);
    let report = sink.close().map_err(|e| e.report())?;
    flushed.map_err(|e| e.report())?;
    eprintln!(
        "gateway: {} events recorded in {} batches, {} requests refused with 503 (queue full)",
        report.committed, report.batches, report.refused_full
    );
    let store = Arc::into_inner(store).ok_or("the store is still shared after the sink closed")?;
    let closed = store.close().map_err(|e| e.report())?;
    if !closed.sidecars_gone {
        eprintln!(
            "gateway: the database's -wal and -shm files stay: another process (a backup, \
             Litestream) has the database open; nothing is lost, see docs/operations.md"
        );
    }
    eprintln!("gateway: store closed");
    Ok(())
}

/// A refused request: an OpenAI-style error response.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

fn refuse(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = json!({
            "error": { "message": self.message, "type": "invalid_request_error", "code": self.code }
        });
        (self.status, Json(body)).into_response()
    }
}

/// The key of the request's `Authorization: Bearer` secret (none in
/// baseline mode), or the refusal.
fn authenticate(gateway: &Gateway, headers: &HeaderMap) -> Result<Option<ActiveKey>, Refusal> {
    if gateway.baseline {
        return Ok(None);
    }
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or_else(|| {
            refuse(
                StatusCode::UNAUTHORIZED,
                "missing_api_key",
                "send your key as Authorization: Bearer kt_...",
            )
        })?;
    match gateway.store.keys().resolve(secret.trim()) {
        Ok(Ok(key)) => Ok(Some(key)),
        Ok(Err(rejection @ (Rejection::Malformed | Rejection::Unknown))) => Err(refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            format!("the key is {rejection}"),
        )),
        Ok(Err(Rejection::OverBudget)) => Err(refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "budget_exceeded",
            "the key has spent its budget for this period",
        )),
        Ok(Err(rejection)) => Err(refuse(
            StatusCode::FORBIDDEN,
            "key_not_active",
            format!("the key is {rejection}"),
        )),
        Err(error) => Err(unavailable(&error)),
    }
}

fn unavailable(error: &Error) -> Refusal {
    eprintln!("gateway: store error: {}", error.report());
    refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the gateway cannot reach its key store; retry",
    )
}

/// Tokens as a gateway without a tokenizer estimates them: four bytes each.
fn estimate_tokens(bytes: usize) -> i64 {
    i64::try_from(bytes.div_ceil(4)).unwrap_or(i64::MAX)
}

async fn completions(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, Refusal> {
    let started = Instant::now();
    let key = authenticate(&gateway, &headers)?;
    let request: Value = serde_json::from_slice(&body).map_err(|error| {
        refuse(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not JSON: {error}"),
        )
    })?;
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            refuse(
                StatusCode::BAD_REQUEST,
                "missing_model",
                "the body needs a \"model\"",
            )
        })?;
    if !MODELS.contains(&model) {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("the model {model} is not served here"),
        ));
    }
    if key.as_ref().is_some_and(|key| !key.may_use(model)) {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "model_not_allowed",
            format!("this key may not use {model}"),
        ));
    }
    let request_id = format!("chatcmpl-{}", uuid::Uuid::now_v7().simple());
    let prompt_tokens = estimate_tokens(body.len());
    let completion_tokens = estimate_tokens(REPLY.len());
    if let Some(key) = &key {
        let mut event = NewEvent::new(Timestamp::now(), model);
        event.key_id = Some(key.id);
        event.request_id = Some(request_id.clone());
        event.prompt_tokens = prompt_tokens;
        event.completion_tokens = completion_tokens;
        event.status = 200;
        event.latency_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        // Queued without waiting; the answer goes out once it is queued, and
        // the shutdown commits the queue before it closes the store.
        gateway
            .sink
            .try_submit(&event)
            .map_err(|error| match error {
                Error::SinkFull { .. } => refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "the gateway is recording too slowly; retry",
                ),
                other => unavailable(&other),
            })?;
    }
    Ok(Json(json!({
        "id": request_id,
        "object": "chat.completion",
        "model": model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": REPLY },
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response())
}

async fn usage(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let Some(key) = authenticate(&gateway, &headers)? else {
        return Ok(Json(json!({ "requests": 0 })).into_response());
    };
    let now = Timestamp::now();
    let filter = UsageFilter {
        key: Some(key.id),
        ..UsageFilter::between(
            Timestamp::from_millis(now.as_millis() - 24 * 3_600_000).unwrap_or(now),
            Timestamp::from_millis(now.as_millis() + 1).unwrap_or(now),
        )
    };
    // A usage query reads rollups and raw events: off the async workers.
    let store = Arc::clone(&gateway.store);
    let totals = tokio::task::spawn_blocking(move || store.events().usage(&filter))
        .await
        .map_err(|_| {
            refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the usage query stopped",
            )
        })?
        .map_err(|error| unavailable(&error))?;
    Ok(Json(json!({
        "key": key.id.to_string(),
        "window_hours": 24,
        "totals": totals,
    }))
    .into_response())
}
