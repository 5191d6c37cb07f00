//! A real PostgreSQL server for tests (the `testing` and `postgres`
//! features): the one `KEYTALLY_TEST_POSTGRES`
//! names (a URL whose database the tests may create others beside), or else
//! a throwaway cluster started from the installed binaries
//! (`/usr/lib/postgresql/*/bin`) in a temporary folder: a Unix socket in that
//! folder only, trust authentication, stopped and removed when the test
//! process exits. As root, `initdb` and `pg_ctl` run as the `postgres` user,
//! since `initdb` refuses root. Each test gets a database of its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use diesel::{Connection, PgConnection, RunQueryDsl};

/// The server every test of this process shares.
pub struct Server {
    /// The URL with `{database}` where the database name goes.
    template: String,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

/// What the exit handler needs to stop the cluster this process started.
static STARTED: Mutex<Option<Cluster>> = Mutex::new(None);

/// The shared server, started on first use.
///
/// # Errors
///
/// Why no server could be had: no PostgreSQL binaries, or the cluster did
/// not start (its log is in the message).
pub fn server() -> Result<&'static Server, String> {
    SERVER
        .get_or_init(|| match std::env::var("KEYTALLY_TEST_POSTGRES") {
            Ok(url) if !url.is_empty() => Ok(Server {
                template: with_database_placeholder(&url),
            }),
            _ => start(),
        })
        .as_ref()
        .map_err(Clone::clone)
}

impl Server {
    /// Creates a new, empty database and returns its URL.
    ///
    /// # Errors
    ///
    /// If the server refuses the connection or the `CREATE DATABASE`.
    pub fn fresh_database(&self) -> Result<String, Box<dyn std::error::Error>> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "keytally_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = PgConnection::establish(&self.url("postgres"))?;
        diesel::sql_query(format!("CREATE DATABASE {name}")).execute(&mut admin)?;
        Ok(self.url(&name))
    }

    /// Drops a database made by [`Server::fresh_database`], closing any
    /// connection still open to it.
    ///
    /// # Errors
    ///
    /// If the server refuses.
    pub fn drop_database(&self, url: &str) -> Result<(), Box<dyn std::error::Error>> {
        let Some(name) = self.database_of(url) else {
            return Ok(());
        };
        let mut admin = PgConnection::establish(&self.url("postgres"))?;
        diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)?;
        Ok(())
    }

    /// The name of a database made by [`Server::fresh_database`] from its URL.
    fn database_of(&self, url: &str) -> Option<String> {
        let (prefix, suffix) = self.template.split_once("{database}")?;
        let name = url.strip_prefix(prefix)?.strip_suffix(suffix)?;
        name.starts_with("keytally_test_").then(|| name.to_owned())
    }

    /// A URL of `database` on this server.
    pub fn url(&self, database: &str) -> String {
        self.template.replace("{database}", database)
    }
}

/// `postgres://user@host/db?params` as a template with the database name
/// replaced by `{database}`.
fn with_database_placeholder(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |index| index + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |index| scheme_end + index);
    format!("{}/{{database}}{query}", &base[..host_end])
}

fn start() -> Result<Server, String> {
    // A folder of its own per process, under a short path: a Unix socket's
    // path is limited to about 100 bytes.
    let folder = std::env::temp_dir().join(format!("keytally-pg-{}", std::process::id()));
    let cluster = Cluster::create(folder, "-c fsync=off -c max_connections=200")?;
    *STARTED.lock().unwrap_or_else(PoisonError::into_inner) = Some(cluster.clone());
    // SAFETY: `stop_cluster` is an `extern "C" fn()` that does not unwind.
    unsafe { libc::atexit(stop_cluster) };
    cluster.start()?;
    Ok(cluster.server())
}

/// A PostgreSQL server of a test's own, for fault tests: it can be killed
/// and started again without disturbing the shared [`server`]. Stopped and
/// its folder removed when dropped. Unlike the shared server it keeps
/// PostgreSQL's durability settings (`fsync` and `synchronous_commit` on).
pub struct OwnServer {
    cluster: Cluster,
    server: Server,
}

impl OwnServer {
    /// Creates and starts a cluster in a new temporary folder.
    ///
    /// # Errors
    ///
    /// No PostgreSQL binaries, or the cluster did not start (its log is in
    /// the message).
    pub fn start() -> Result<OwnServer, String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let folder = std::env::temp_dir().join(format!(
            "keytally-pg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let cluster = Cluster::create(folder, "")?;
        let own = OwnServer {
            server: cluster.server(),
            cluster,
        };
        own.cluster.start()?;
        Ok(own)
    }

    /// Creates a new, empty database and returns its URL.
    ///
    /// # Errors
    ///
    /// As [`Server::fresh_database`].
    pub fn fresh_database(&self) -> Result<String, Box<dyn std::error::Error>> {
        self.server.fresh_database()
    }

    /// A URL of `database` on this server.
    pub fn url(&self, database: &str) -> String {
        self.server.url(database)
    }

    /// Kills the server with SIGKILL, the postmaster and every process it
    /// started at once, as a crash of its machine's processes would, and
    /// waits until they are gone.
    ///
    /// # Errors
    ///
    /// If the server's processes cannot be found or do not die.
    pub fn kill(&self) -> Result<(), String> {
        let pid_file = self.cluster.folder.join("data").join("postmaster.pid");
        let text = std::fs::read_to_string(&pid_file)
            .map_err(|e| format!("{}: {e}", pid_file.display()))?;
        let postmaster: i32 = text
            .lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .ok_or_else(|| format!("{} names no process", pid_file.display()))?;
        let mut pids = vec![postmaster];
        pids.extend(children_of(postmaster));
        for pid in &pids {
            // SAFETY: kill(2) on a process id; a gone process is ESRCH.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // SAFETY: signal 0 only checks whether the process exists.
        while pids.iter().any(|pid| unsafe { libc::kill(*pid, 0) } == 0) {
            if std::time::Instant::now() > deadline {
                return Err("the server's processes did not die".to_owned());
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }

    /// Starts the server again after [`OwnServer::kill`] (it recovers from
    /// its log first) and waits until it accepts connections.
    ///
    /// # Errors
    ///
    /// If it does not start.
    pub fn restart(&self) -> Result<(), String> {
        self.cluster.start()
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.cluster.stop_and_remove();
    }
}

/// The processes whose parent is `parent`.
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // The parent is the second field after the parenthesised name.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let after_name = stat.rsplit_once(')')?.1;
                    after_name.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// A cluster made with `initdb` in a folder of its own, on a Unix socket in
/// that folder, with trust authentication.
#[derive(Clone)]
struct Cluster {
    bin: PathBuf,
    folder: PathBuf,
    as_postgres: bool,
    /// Server settings beyond the socket's.
    settings: String,
}

impl Cluster {
    fn create(folder: PathBuf, settings: &str) -> Result<Cluster, String> {
        let bin = installed_binaries()?;
        // SAFETY: geteuid(2) has no preconditions.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        std::fs::create_dir_all(&folder).map_err(|e| format!("{}: {e}", folder.display()))?;
        if as_postgres {
            run(
                &bin,
                false,
                "chown",
                &["postgres:postgres", path_str(&folder)?],
            )?;
        }
        let data = folder.join("data");
        run(
            &bin,
            as_postgres,
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        Ok(Cluster {
            bin,
            folder,
            as_postgres,
            settings: settings.to_owned(),
        })
    }

    fn start(&self) -> Result<(), String> {
        let options = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' {}",
            path_str(&self.folder)?,
            self.settings
        );
        let data = self.folder.join("data");
        let log = self.folder.join("server.log");
        let started = run(
            &self.bin,
            self.as_postgres,
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-l",
                path_str(&log)?,
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
        started.map_err(|error| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            format!("{error}\n{log}")
        })
    }

    fn server(&self) -> Server {
        Server {
            template: format!(
                "postgres://postgres@/{{database}}?host={}",
                self.folder.display()
            ),
        }
    }

    fn stop_and_remove(&self) {
        let data = self.folder.join("data");
        if let Some(data) = data.to_str() {
            let _ = run(
                &self.bin,
                self.as_postgres,
                "pg_ctl",
                &["-D", data, "-m", "immediate", "-w", "stop"],
            );
        }
        let _ = std::fs::remove_dir_all(&self.folder);
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb`.
fn installed_binaries() -> Result<PathBuf, String> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .map_err(|e| format!("no PostgreSQL binaries in {}: {e}", root.display()))?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| format!("no initdb under {}", root.display()))
}

/// Runs `program` (from `bin`, or from the PATH for `chown`), as the
/// `postgres` user when `as_postgres`.
fn run(bin: &Path, as_postgres: bool, program: &str, args: &[&str]) -> Result<(), String> {
    let path = if program == "chown" {
        PathBuf::from(program)
    } else {
        bin.join(program)
    };
    let mut command = if as_postgres {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(&path);
        command
    } else {
        Command::new(&path)
    };
    let output = command
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn path_str(path: &Path) -> Result<&str, String> {
    path.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", path.display()))
}

/// Stops the cluster this process started and removes its folder: run when
/// the test process exits.
extern "C" fn stop_cluster() {
    let cluster = STARTED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(cluster) = cluster {
        cluster.stop_and_remove();
    }
}

/// A fresh database on the shared server (started on first use), as a URL.
pub(crate) fn fresh_database_url() -> crate::Result<String> {
    let unavailable = |reason: String| crate::Error::Open {
        path: "(test PostgreSQL server)".into(),
        source: reason.into(),
    };
    server()
        .map_err(unavailable)?
        .fresh_database()
        .map_err(|error| unavailable(error.to_string()))
}

/// Drops a database made by [`fresh_database_url`].
pub(crate) fn drop_database_url(url: &str) -> Result<(), String> {
    server()?
        .drop_database(url)
        .map_err(|error| error.to_string())
}
