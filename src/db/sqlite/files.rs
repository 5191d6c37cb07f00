//! The database's files on disk: creating them with safe modes, refusing links,
//! tightening modes that are too wide, and reading the SQLite header before
//! SQLite itself ever opens a file.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

use crate::db::sqlite::logs::{be_u32, journaled_header, logged_header, LogReader, HEADER_LEN};
use crate::db::sqlite::pages::{identity_in, PageFile};
use crate::error::{Error, Result};

/// The mode of every database file: owner read and write, nobody else.
pub const FILE_MODE: u32 = 0o600;

/// The mode of a data folder that keytally creates.
pub const DIR_MODE: u32 = 0o700;

/// keytally's `application_id`, stored at offset 68 of the database header
/// (the bytes `ktly`).
pub const APPLICATION_ID: u32 = 0x6b74_6c79;

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// The suffixes SQLite appends to the database path for its sidecar files.
pub(crate) const SIDECAR_SUFFIXES: [&str; 2] = ["-wal", "-shm"];

/// The suffix of the rollback journal, which only a restore makes (it writes
/// into the database in rollback mode).
pub(crate) const JOURNAL_SUFFIX: &str = "-journal";

/// One of the database's files, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileInfo {
    /// The file's name (without its folder).
    pub name: String,
    /// The permission bits as an octal string, such as `"0600"`.
    pub mode: String,
    /// The file's size in bytes.
    pub bytes: u64,
}

/// A file whose mode was wider than [`FILE_MODE`] and was tightened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TightenedFile {
    /// The file.
    pub path: PathBuf,
    /// The permission bits found before tightening.
    pub found_mode: u32,
}

/// The path of a sidecar file: the database path with `suffix` appended.
pub(crate) fn sidecar(database: &Path, suffix: &str) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The database file followed by its `-wal` and `-shm` sidecars.
pub(crate) fn database_files(database: &Path) -> [PathBuf; 3] {
    [
        database.to_path_buf(),
        sidecar(database, SIDECAR_SUFFIXES[0]),
        sidecar(database, SIDECAR_SUFFIXES[1]),
    ]
}

/// Makes sure the database path can be opened safely: refuses a symbolic
/// link, creates a missing folder with mode 0700, and creates a missing
/// database file empty with mode 0600, before SQLite opens it.
///
/// The process umask is neither relied on nor changed: it is shared by every
/// thread of the process.
pub(crate) fn prepare_database_path(database: &Path) -> Result<()> {
    if let Some(folder) = database.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !folder.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(folder)
                .map_err(|e| Error::io(folder, e))?;
            fs::set_permissions(folder, fs::Permissions::from_mode(DIR_MODE))
                .map_err(|e| Error::io(folder, e))?;
        }
    }
    for path in database_files(database) {
        match fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.file_type().is_symlink() => {
                return Err(Error::Symlink { path });
            }
            Ok(metadata) if !metadata.is_file() => {
                return Err(Error::Io {
                    path,
                    source: io::Error::other("not a regular file"),
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    if let Some(folder) = database.parent().filter(|p| !p.as_os_str().is_empty()) {
        check_writable(folder)?;
    }
    if database.exists() {
        check_writable(database)?;
    }
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        // O_NOFOLLOW: a link planted between the check above and this
        // create is not followed.
        .custom_flags(libc::O_NOFOLLOW)
        .open(database)
    {
        Ok(file) => {
            // The umask may have removed bits from the requested mode; set it
            // exactly.
            file.set_permissions(fs::Permissions::from_mode(FILE_MODE))
                .map_err(|e| Error::io(database, e))?;
            Ok(())
        }
        // Another process (or an earlier run) created it first: it is
        // inspected like any existing file.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io(database, e)),
    }
}

/// Refuses a folder or file this process cannot write: SQLite would open
/// the database read-only, or fail later to create its `-wal` and `-shm`.
fn check_writable(path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "the path holds a NUL byte"),
        });
    };
    // SAFETY: access(2) reads the NUL-terminated path and nothing else.
    let status = unsafe { libc::access(c_path.as_ptr(), libc::W_OK) };
    if status == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    Err(Error::Permission {
        path: path.to_path_buf(),
        source,
    })
}

/// Sets every existing database file (the database, `-wal`, `-shm`) whose
/// mode is wider than 0600 to 0600, logs a warning naming the file and the
/// mode found, and returns what it changed.
pub(crate) fn tighten_modes(database: &Path) -> Result<Vec<TightenedFile>> {
    let mut tightened = Vec::new();
    for path in database_files(database) {
        let metadata = match fs::symlink_metadata(&path) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(path, e)),
        };
        if metadata.file_type().is_symlink() {
            return Err(Error::Symlink { path });
        }
        let found_mode = metadata.permissions().mode() & 0o7777;
        if found_mode & !FILE_MODE != 0 {
            fs::set_permissions(&path, fs::Permissions::from_mode(FILE_MODE))
                .map_err(|e| Error::io(&path, e))?;
            tracing::warn!(
                file = %path.display(),
                found_mode = %format!("{found_mode:04o}"),
                "database file was readable or writable by others; its mode is now 0600"
            );
            tightened.push(TightenedFile { path, found_mode });
        }
    }
    Ok(tightened)
}

/// Name, mode and size of each database file that exists.
pub(crate) fn file_infos(database: &Path) -> Result<Vec<FileInfo>> {
    let mut infos = Vec::new();
    for path in database_files(database) {
        let metadata = match fs::symlink_metadata(&path) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(path, e)),
        };
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        infos.push(FileInfo {
            name,
            mode: format!("{:04o}", metadata.permissions().mode() & 0o7777),
            bytes: metadata.len(),
        });
    }
    Ok(infos)
}

/// What the header of an existing database file says, read before SQLite
/// opens the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderVerdict {
    /// The file is empty: a new database.
    Empty,
    /// The header carries keytally's application id.
    Ours,
    /// A valid header with no application id and no schema: either a database
    /// SQLite created but nothing was written to yet, or one whose first
    /// commits are still only in its write-ahead log. The definitive check
    /// happens once SQLite has opened it.
    Unmarked,
}

/// The databases this process has open through a store, by device and inode,
/// with how many stores have each open.
///
/// Closing any descriptor of a file drops every POSIX lock the process holds
/// on it, SQLite's included, and SQLite would not notice. So once a store of
/// this process has a database open, nothing here opens that file with plain
/// I/O again: another process could otherwise take over (and `restore` would
/// replace) a database this process is still writing.
static OPEN_HERE: Mutex<BTreeMap<(u64, u64), usize>> = Mutex::new(BTreeMap::new());

fn file_id(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn open_here() -> std::sync::MutexGuard<'static, BTreeMap<(u64, u64), usize>> {
    OPEN_HERE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether a store of this process has `database` open.
pub(crate) fn is_open_here(database: &Path) -> bool {
    file_id(database).is_some_and(|id| open_here().contains_key(&id))
}

/// A store's claim on its database file, for as long as any connection to it
/// may be open; dropping it releases the claim.
#[derive(Debug)]
pub(crate) struct OpenClaim {
    id: (u64, u64),
}

impl Drop for OpenClaim {
    fn drop(&mut self) {
        let mut open = open_here();
        if let Some(count) = open.get_mut(&self.id) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.id);
            }
        }
    }
}

/// Inspects an existing database file and its log with plain reads
/// ([`inspect_header`], [`inspect_wal`]), unless a store of this process has
/// it open already (then it was inspected when that store opened it), and
/// claims it for a store about to open it.
pub(crate) fn claim_for_store(database: &Path) -> Result<OpenClaim> {
    let mut open = open_here();
    let id = file_id(database).ok_or_else(|| {
        Error::io(
            database,
            io::Error::new(io::ErrorKind::NotFound, "the database file is gone"),
        )
    })?;
    if !open.contains_key(&id) {
        read_header(database)?;
        inspect_wal(database)?;
    }
    *open.entry(id).or_insert(0) += 1;
    Ok(OpenClaim { id })
}

/// Reads the first 100 bytes of `database` and refuses what is certainly not
/// a keytally database, without writing anything. A database a store of this
/// process has open is not read again (see [`OPEN_HERE`]): it is ours.
pub(crate) fn inspect_header(database: &Path) -> Result<HeaderVerdict> {
    if is_open_here(database) {
        return Ok(HeaderVerdict::Ours);
    }
    read_header(database)
}

fn read_header(database: &Path) -> Result<HeaderVerdict> {
    let mut file = File::open(database).map_err(|e| Error::io(database, e))?;
    let length = file.metadata().map_err(|e| Error::io(database, e))?.len();
    if length == 0 {
        return Ok(HeaderVerdict::Empty);
    }
    let mut header = Vec::with_capacity(HEADER_LEN);
    (&mut file)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut header)
        .map_err(|e| Error::io(database, e))?;
    match judge_file_header(database, &header, length) {
        // A checkpoint or a restore cut short by a crash or a power loss
        // can leave page 1 torn in the file while the rollback journal or
        // the log still holds it whole: SQLite plays the journal back, or
        // reads the log's copy, and so does this check.
        Err(error @ (Error::NotADatabase { .. } | Error::Corrupt { .. })) => {
            let whole = match journaled_header(&sidecar(database, JOURNAL_SUFFIX))? {
                Some(header) => Some(header),
                None => logged_header(&sidecar(database, SIDECAR_SUFFIXES[0]))?,
            };
            match whole {
                Some(header) if header[..SQLITE_MAGIC.len()] == SQLITE_MAGIC[..] => {
                    judge_application(database, &header)
                }
                _ => Err(error),
            }
        }
        verdict => verdict,
    }
}

/// Judges the first bytes of the database file (`header`, at most 100) of a
/// file `length` bytes long.
fn judge_file_header(database: &Path, header: &[u8], length: u64) -> Result<HeaderVerdict> {
    let magic_seen = header.len().min(SQLITE_MAGIC.len());
    if header[..magic_seen] != SQLITE_MAGIC[..magic_seen] {
        return Err(Error::NotADatabase {
            path: database.to_path_buf(),
        });
    }
    let corrupt = |detail: String| Error::Corrupt {
        path: database.to_path_buf(),
        detail,
    };
    if header.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "the file is {length} bytes long, shorter than an SQLite header"
        )));
    }
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536u64,
        size if size >= 512 && size.is_power_of_two() => u64::from(size),
        size => return Err(corrupt(format!("invalid page size {size} in the header"))),
    };
    if length % page_size != 0 {
        return Err(corrupt(format!(
            "the file is {length} bytes long, not a whole number of {page_size}-byte pages (truncated?)"
        )));
    }
    let change_counter = be_u32(header, 24);
    let page_count = u64::from(be_u32(header, 28));
    let valid_for = be_u32(header, 92);
    // The page count in the header is only meaningful when the header says it
    // is current (older writers leave it stale), and only while no other
    // connection can be writing: a checkpoint writes page 1 before it extends
    // the file, so a live database can look truncated for a moment. A live
    // WAL database has its -wal or -shm beside it; one being restored, or
    // whose restore was interrupted, its rollback -journal, which SQLite
    // plays back before reading anything.
    let live = SIDECAR_SUFFIXES
        .iter()
        .chain([&JOURNAL_SUFFIX])
        .any(|suffix| sidecar(database, suffix).exists());
    if !live && valid_for == change_counter && page_count * page_size > length {
        return Err(corrupt(format!(
            "the header promises {page_count} pages of {page_size} bytes but the file is {length} bytes long (truncated)"
        )));
    }
    judge_application(database, header)
}

/// Judges the application id and schema cookie of a whole, valid header.
fn judge_application(database: &Path, header: &[u8]) -> Result<HeaderVerdict> {
    let application_id = be_u32(header, 68);
    let schema_cookie = be_u32(header, 40);
    match application_id {
        APPLICATION_ID => Ok(HeaderVerdict::Ours),
        0 if schema_cookie == 0 => Ok(HeaderVerdict::Unmarked),
        0 => Err(Error::Foreign {
            path: database.to_path_buf(),
            detail: "it has tables but no keytally application id".to_owned(),
        }),
        other => Err(Error::Foreign {
            path: database.to_path_buf(),
            detail: format!("application id {other:#010x}, keytally's is {APPLICATION_ID:#010x}"),
        }),
    }
}

/// Reads an existing `-wal` file (before SQLite replays it) and refuses one
/// that cannot belong to this database: a different page size, a copy of
/// page 1 whose application id differs from the database's, or a copy of the
/// page of `sequences` whose identity differs from the one in the database
/// file (see [`pages`](super::pages)). SQLite itself would replay such a log
/// into the database. Only what SQLite would replay counts: a header and
/// frames whose checksums hold, so a frame another process is writing at this
/// moment is never mistaken for a stranger's. What cannot be told apart: the
/// log of a copy of this very database made with `cp` (same identity), and a
/// log none of whose transactions recorded an event or changed a key.
fn inspect_wal(database: &Path) -> Result<()> {
    let Some(mut log) = LogReader::open(&sidecar(database, SIDECAR_SUFFIXES[0]))? else {
        return Ok(());
    };
    let wal = log.path.clone();
    let foreign = |detail: String| Error::Foreign {
        path: wal.clone(),
        detail,
    };
    let ours = DatabaseFacts::read(database)?;
    if let Some(page_size) = ours.page_size {
        if log.page_size != page_size {
            return Err(foreign(format!(
                "its pages are {} bytes, the database's {page_size}: it belongs to another database",
                log.page_size
            )));
        }
    }
    while let Some(frame) = log.next_frame()? {
        if frame.page_number == 1 {
            let application_id = be_u32(&log.page, 68);
            let acceptable = match ours.application_id {
                Some(expected) => application_id == expected,
                None => application_id == APPLICATION_ID || application_id == 0,
            };
            if log.page[..16] != SQLITE_MAGIC[..] || !acceptable {
                return Err(foreign(format!(
                    "it holds a page 1 with application id {application_id:#010x}: it belongs to another database"
                )));
            }
        }
        // Another database may keep `sequences` on another page (a backup
        // is written afresh), so every page is looked at.
        if let Some(identity) = ours.identity {
            if identity_in(&log.page, ours.usable).is_some_and(|theirs| theirs != identity) {
                return Err(foreign(
                    "it holds pages of another keytally database (their identity differs from this database's): it belongs to another database".to_owned(),
                ));
            }
        }
    }
    Ok(())
}

/// What the database file says about itself, as far as its log must agree.
#[derive(Default)]
struct DatabaseFacts {
    /// The page size, from a valid header.
    page_size: Option<u64>,
    /// The application id, if the header has one.
    application_id: Option<u32>,
    /// The bytes of each page SQLite uses.
    usable: usize,
    /// The identity, if the file's schema and `sequences` page hold one.
    identity: Option<i64>,
}

impl DatabaseFacts {
    /// Reads them from `database`; nothing for an empty file or one without
    /// SQLite's header. The identity is not read while a rollback journal is
    /// beside the database: SQLite plays it back into the file first.
    fn read(database: &Path) -> Result<DatabaseFacts> {
        let mut header = [0u8; HEADER_LEN];
        let mut file = match File::open(database) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DatabaseFacts::default()),
            Err(e) => return Err(Error::io(database, e)),
        };
        match file.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(DatabaseFacts::default())
            }
            Err(e) => return Err(Error::io(database, e)),
        }
        if header[..SQLITE_MAGIC.len()] != SQLITE_MAGIC[..] {
            // A header torn by a power loss says nothing; the log's page 1 does.
            return Ok(DatabaseFacts::default());
        }
        let page_size = match u16::from_be_bytes([header[16], header[17]]) {
            1 => 65_536,
            size => usize::from(size),
        };
        let reserved = usize::from(header[20]);
        let application_id = be_u32(&header, 68);
        let identity = if sidecar(database, JOURNAL_SUFFIX).exists() {
            None
        } else {
            PageFile {
                file: &mut file,
                page_size,
                reserved,
            }
            .identity()
        };
        Ok(DatabaseFacts {
            page_size: Some(page_size as u64),
            application_id: (application_id != 0).then_some(application_id),
            usable: page_size.saturating_sub(reserved),
            identity,
        })
    }
}
