//! The database's files on disk: creating them with safe modes, refusing links,
//! tightening modes that are too wide, and reading the SQLite header before
//! SQLite itself ever opens a file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

/// The mode of every database file: owner read and write, nobody else.
pub const FILE_MODE: u32 = 0o600;

/// The mode of a data folder that keytally creates.
pub const DIR_MODE: u32 = 0o700;

/// keytally's `application_id`, stored at offset 68 of the database header
/// (the bytes `ktly`).
pub const APPLICATION_ID: u32 = 0x6b74_6c79;

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";
const HEADER_LEN: usize = 100;

/// The suffixes SQLite appends to the database path for its sidecar files.
pub(crate) const SIDECAR_SUFFIXES: [&str; 2] = ["-wal", "-shm"];

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

/// Reads the first 100 bytes of `database` and refuses what is certainly not
/// a keytally database, without writing anything.
pub(crate) fn inspect_header(database: &Path) -> Result<HeaderVerdict> {
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
    let u32_at = |offset: usize| {
        u32::from_be_bytes([
            header[offset],
            header[offset + 1],
            header[offset + 2],
            header[offset + 3],
        ])
    };
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
    let change_counter = u32_at(24);
    let page_count = u64::from(u32_at(28));
    let valid_for = u32_at(92);
    // The page count in the header is only meaningful when the header says it
    // is current; older writers leave it stale.
    if valid_for == change_counter && page_count * page_size > length {
        return Err(corrupt(format!(
            "the header promises {page_count} pages of {page_size} bytes but the file is {length} bytes long (truncated)"
        )));
    }
    let application_id = u32_at(68);
    let schema_cookie = u32_at(40);
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
