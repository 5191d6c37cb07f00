//! A power-loss VFS, as SQLite's own crash tests use one: a shim over the
//! default unix VFS, registered as the default, that passes every call
//! through and remembers, per file, each write and truncation made since the
//! file was last synced. At a simulated power cut it stops all I/O (every
//! later call fails) and, once asked, rewrites the files on disk as a power
//! loss could have left them: each unsynced write kept, lost or torn, sector
//! by sector.
//!
//! Model:
//! - A sync makes every earlier write to that file durable. The real fsync
//!   is skipped: durability is what this shim decides, and skipping it keeps
//!   a thousand runs fast.
//! - Each 512-byte sector of an unsynced write independently ends up new or
//!   old (a torn write), or, with `garbage`, filled with random bytes. A
//!   write never damages bytes outside its own range, SQLite's
//!   "powersafe overwrite" assumption. A write past the end of the file
//!   extends it if any of its sectors lands; sectors that did not read as
//!   zeros.
//! - An unsynced truncation happens or does not.
//! - Syncs made outside SQLite count too: this program defines `fsync` and
//!   `fdatasync` itself, so the calls keytally makes with `File::sync_all`
//!   reach [`synced_outside`] before the real system call.
//! - A rename (this program also defines `rename`) is undone by the power
//!   cut unless the folder it happened in was synced after it, and a file it
//!   replaced comes back.
//! - Creating and deleting files are taken as durable at once.
//! - The `-shm` index is left as it was: SQLite rebuilds it from the log when
//!   the first connection opens the database.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use libsqlite3_sys as ffi;

/// The sector size of the model: the unit of a torn write.
const SECTOR: u64 = 512;

/// Commits the writer saw return; the writer increments it after each.
pub static ACKNOWLEDGED: AtomicU64 = AtomicU64::new(0);

/// Which operations count towards the cut.
#[derive(Debug, Clone)]
pub struct CutPlan {
    /// The cut happens instead of the `at`-th counted operation (1-based).
    pub at: u64,
    /// Only operations on files whose path contains this count...
    pub file_contains: String,
    /// ... and does not end with one of these.
    pub except_suffixes: Vec<String>,
    /// Also fill some lost sectors with random bytes.
    pub garbage: bool,
    /// Seed of the sector fates.
    pub seed: u64,
}

/// One unsynced change to a file.
enum Change {
    Write {
        offset: u64,
        old: Vec<u8>,
        new: Vec<u8>,
        size_before: u64,
    },
    Truncate {
        size: u64,
        size_before: u64,
        tail: Vec<u8>,
    },
}

#[derive(Default)]
struct State {
    plan: Option<CutPlan>,
    /// Counted operations so far.
    counted: u64,
    /// Operations of any kind so far, on any file.
    operations: u64,
    dead: bool,
    /// When the cut was armed, and when the power went.
    armed_at: Option<Instant>,
    cut_at: Option<Instant>,
    /// Unsynced changes per file path, oldest first.
    pending: HashMap<String, Vec<Change>>,
    /// Commits acknowledged before the last completed sync of a `-wal` began.
    synced_acknowledged: u64,
    /// Renames whose folder was not synced since, oldest first.
    renames: Vec<Rename>,
}

/// An unsynced rename.
struct Rename {
    from: String,
    to: String,
    /// A hard link to the file `to` named before the rename, if there was one.
    replaced: Option<String>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn state() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The unix VFS the shim passes to, set once by [`install`].
static ROOT: AtomicPtr<ffi::sqlite3_vfs> = AtomicPtr::new(ptr::null_mut());

fn root() -> *mut ffi::sqlite3_vfs {
    ROOT.load(Ordering::Acquire)
}

#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    /// The unix VFS's file, in memory of its own.
    real: *mut ffi::sqlite3_file,
    /// The path, or None for SQLite's unnamed temporary files.
    path: Option<String>,
}

/// Registers the shim as the default VFS. Call before any connection opens.
pub fn install() -> Result<(), String> {
    // SAFETY: called once from main before other threads use SQLite; the
    // registered struct is leaked, so it outlives every connection.
    unsafe {
        if ffi::sqlite3_initialize() != ffi::SQLITE_OK {
            return Err("sqlite3_initialize failed".into());
        }
        let root = ffi::sqlite3_vfs_find(ptr::null());
        if root.is_null() {
            return Err("no default VFS".into());
        }
        ROOT.store(root, Ordering::Release);
        let mut shim: ffi::sqlite3_vfs = *root;
        shim.szOsFile = std::mem::size_of::<ShimFile>() as c_int;
        shim.zName = c"power-cut".as_ptr();
        shim.pNext = ptr::null_mut();
        shim.xOpen = Some(shim_open);
        shim.xDelete = Some(shim_delete);
        let shim = Box::into_raw(Box::new(shim));
        if ffi::sqlite3_vfs_register(shim, 1) != ffi::SQLITE_OK {
            return Err("sqlite3_vfs_register failed".into());
        }
    }
    *state() = Some(State::default());
    Ok(())
}

/// Arms the cut: counting starts now.
pub fn arm(plan: CutPlan) {
    if let Some(state) = state().as_mut() {
        state.plan = Some(plan);
        state.counted = 0;
        state.armed_at = Some(Instant::now());
    }
}

/// Cuts the power now.
pub fn cut_now() {
    if let Some(state) = state().as_mut() {
        die(state);
    }
}

fn die(state: &mut State) {
    if !state.dead {
        state.dead = true;
        state.cut_at = Some(Instant::now());
    }
}

fn micros_since_armed(state: &State, at: Instant) -> u128 {
    state
        .armed_at
        .map_or(0, |armed| at.saturating_duration_since(armed).as_micros())
}

/// Microseconds since the cut was armed.
pub fn armed_micros() -> u128 {
    state()
        .as_ref()
        .map_or(0, |state| micros_since_armed(state, Instant::now()))
}

/// Microseconds from arming the cut to the cut.
pub fn cut_micros() -> u128 {
    state().as_ref().map_or(0, |state| {
        state.cut_at.map_or(0, |cut| micros_since_armed(state, cut))
    })
}

/// Whether the power was cut.
pub fn is_cut() -> bool {
    state().as_ref().is_some_and(|state| state.dead)
}

/// Counted operations so far (for choosing a cut point in a later run).
pub fn counted() -> u64 {
    state().as_ref().map_or(0, |state| state.counted)
}

/// Commits acknowledged before the last completed sync of a log began:
/// those a power loss cannot take.
pub fn synced_acknowledged() -> u64 {
    state()
        .as_ref()
        .map_or(0, |state| state.synced_acknowledged)
}

/// What a power cut did to the files.
#[derive(Debug, Default)]
pub struct Damage {
    /// Unsynced writes at the cut.
    pub writes: u64,
    /// Renames undone.
    pub renames_undone: u64,
    /// Sectors of those writes that landed.
    pub sectors_kept: u64,
    /// Sectors lost.
    pub sectors_lost: u64,
    /// Sectors filled with random bytes.
    pub sectors_garbage: u64,
}

/// Rewrites every file as the power cut leaves it. Call after the cut; I/O
/// stays stopped.
pub fn settle() -> Result<Damage, String> {
    let mut guard = state();
    let state = guard.as_mut().ok_or("not installed")?;
    die(state);
    let seed = state.plan.as_ref().map_or(1, |plan| plan.seed);
    let garbage = state.plan.as_ref().is_some_and(|plan| plan.garbage);
    let mut rng = Rng::new(seed);
    let mut damage = Damage::default();
    for rename in state.renames.drain(..).rev() {
        raw_rename(&rename.to, &rename.from)
            .map_err(|e| format!("undoing {} -> {}: {e}", rename.from, rename.to))?;
        if let Some(replaced) = rename.replaced {
            raw_rename(&replaced, &rename.to).map_err(|e| format!("{replaced}: {e}"))?;
        }
        damage.renames_undone += 1;
    }
    let mut paths: Vec<&String> = state.pending.keys().collect();
    paths.sort();
    for path in paths {
        let changes = &state.pending[path];
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{path}: {e}")),
        };
        let io = |e: std::io::Error| format!("{path}: {e}");
        // Back to the file as it was at its last sync ...
        for change in changes.iter().rev() {
            match change {
                Change::Write {
                    offset,
                    old,
                    size_before,
                    ..
                } => {
                    file.write_all_at(old, *offset).map_err(io)?;
                    file.set_len(*size_before).map_err(io)?;
                }
                Change::Truncate {
                    size,
                    size_before,
                    tail,
                } => {
                    file.set_len(*size_before).map_err(io)?;
                    file.write_all_at(tail, *size).map_err(io)?;
                }
            }
        }
        // ... then each unsynced change, in order, as far as it landed.
        for change in changes {
            match change {
                Change::Write { offset, new, .. } => {
                    damage.writes += 1;
                    let end = offset + new.len() as u64;
                    let mut landed_any = false;
                    let mut start = *offset;
                    while start < end {
                        let sector_end = ((start / SECTOR) + 1) * SECTOR;
                        let stop = sector_end.min(end);
                        let range = (start - offset) as usize..(stop - offset) as usize;
                        match rng.below(if garbage { 10 } else { 2 }) {
                            0 => damage.sectors_lost += 1,
                            9 => {
                                let noise: Vec<u8> = range.map(|_| rng.next_u64() as u8).collect();
                                file.write_all_at(&noise, start).map_err(io)?;
                                damage.sectors_garbage += 1;
                                landed_any = true;
                            }
                            n if n % 2 == 1 || !garbage => {
                                file.write_all_at(&new[range], start).map_err(io)?;
                                damage.sectors_kept += 1;
                                landed_any = true;
                            }
                            _ => damage.sectors_lost += 1,
                        }
                        start = stop;
                    }
                    if landed_any {
                        let length = file.metadata().map_err(io)?.len();
                        if length < end {
                            file.set_len(end).map_err(io)?;
                        }
                    }
                }
                Change::Truncate { size, .. } => {
                    if rng.below(2) == 0 {
                        file.set_len(*size).map_err(io)?;
                    }
                }
            }
        }
    }
    state.pending.clear();
    Ok(damage)
}

/// A sync made outside SQLite (see [`fsync`]): the file's writes are
/// durable, and so are the renames in it if it is a folder. False if the
/// power is cut.
fn synced_outside(path: &str) -> bool {
    let mut guard = state();
    let Some(state) = guard.as_mut() else {
        return true;
    };
    if count(state, Some(path)) {
        return false;
    }
    state.pending.remove(path);
    let folder = std::path::Path::new(path);
    state.renames.retain(|rename| {
        let durable = std::path::Path::new(&rename.to).parent() == Some(folder);
        if durable {
            if let Some(replaced) = &rename.replaced {
                let _ = std::fs::remove_file(replaced);
            }
        }
        !durable
    });
    true
}

/// Renames with the system call itself, not through [`rename`].
fn raw_rename(from: &str, to: &str) -> std::io::Result<()> {
    let from = std::ffi::CString::new(from).map_err(std::io::Error::other)?;
    let to = std::ffi::CString::new(to).map_err(std::io::Error::other)?;
    // SAFETY: two NUL-terminated paths.
    let rc = unsafe { libc::renameat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The path an open descriptor names.
fn descriptor_path(fd: c_int) -> Option<String> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|path| path.to_string_lossy().into_owned())
}

fn fail_with(errno: c_int) -> c_int {
    // SAFETY: errno is this thread's.
    unsafe { *libc::__errno_location() = errno };
    -1
}

/// A sync of `fd` by the system call `number`, seen by the model first.
fn observed_sync(fd: c_int, number: libc::c_long) -> c_int {
    if let Some(path) = descriptor_path(fd) {
        if !synced_outside(&path) {
            return fail_with(libc::EIO);
        }
    }
    // SAFETY: the caller's descriptor, passed on to the same system call.
    unsafe { libc::syscall(number, fd) as c_int }
}

/// `fsync(2)`, seen by the model first.
///
/// # Safety
/// As `fsync(2)`.
#[no_mangle]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    observed_sync(fd, libc::SYS_fsync)
}

/// `fdatasync(2)`, seen by the model first.
///
/// # Safety
/// As `fdatasync(2)`.
#[no_mangle]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    observed_sync(fd, libc::SYS_fdatasync)
}

/// `rename(2)`, remembered by the model until its folder is synced.
///
/// # Safety
/// As `rename(2)`: both are NUL-terminated paths.
#[no_mangle]
pub unsafe extern "C" fn rename(from: *const c_char, to: *const c_char) -> c_int {
    // SAFETY: the caller's paths, NUL-terminated.
    let (from_path, to_path) = unsafe {
        (
            CStr::from_ptr(from).to_string_lossy().into_owned(),
            CStr::from_ptr(to).to_string_lossy().into_owned(),
        )
    };
    let absolute = |path: &str| {
        std::path::absolute(path)
            .map(|path| path.to_string_lossy().into_owned())
            .unwrap_or_else(|_| path.to_owned())
    };
    let (from_path, to_path) = (absolute(&from_path), absolute(&to_path));
    let mut guard = state();
    let mut replaced = None;
    if let Some(state) = guard.as_mut() {
        if count(state, Some(&to_path)) {
            return fail_with(libc::EIO);
        }
        if std::path::Path::new(&to_path).exists() {
            let keep = format!("{to_path}.power-cut-replaced-{}", state.operations);
            if std::fs::hard_link(&to_path, &keep).is_ok() {
                replaced = Some(keep);
            }
        }
    }
    // SAFETY: the caller's paths, passed on.
    let rc = unsafe { libc::renameat(libc::AT_FDCWD, from, libc::AT_FDCWD, to) };
    if let Some(state) = guard.as_mut() {
        if rc == 0 {
            if let Some(changes) = state.pending.remove(&from_path) {
                state.pending.insert(to_path.clone(), changes);
            }
            state.renames.push(Rename {
                from: from_path,
                to: to_path,
                replaced,
            });
        } else if let Some(keep) = replaced {
            let _ = std::fs::remove_file(keep);
        }
    }
    rc
}

/// Counts an operation on `path`; true if the power is (now) cut.
fn count(state: &mut State, path: Option<&str>) -> bool {
    if state.dead {
        return true;
    }
    state.operations += 1;
    let at = match (&state.plan, path) {
        (Some(plan), Some(path))
            if path.contains(&plan.file_contains)
                && !plan
                    .except_suffixes
                    .iter()
                    .any(|suffix| path.ends_with(suffix)) =>
        {
            plan.at
        }
        _ => return false,
    };
    state.counted += 1;
    if state.counted >= at {
        die(state);
    }
    state.dead
}

/// # Safety
/// `file` is a `ShimFile` SQLite opened through [`shim_open`].
unsafe fn shim(file: *mut ffi::sqlite3_file) -> &'static mut ShimFile {
    // SAFETY: the caller's contract.
    unsafe { &mut *file.cast::<ShimFile>() }
}

/// # Safety
/// `real` is an open file of the unix VFS.
unsafe fn real_methods(real: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: an open file has its methods set.
    unsafe { &*(*real).pMethods }
}

unsafe extern "C" fn shim_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite passes a file of `szOsFile` bytes and a valid name or
    // null; ROOT was set by `install`.
    unsafe {
        let this = file.cast::<ShimFile>();
        (*this).base.pMethods = ptr::null();
        if state().as_ref().is_some_and(|state| state.dead) {
            return ffi::SQLITE_IOERR;
        }
        let root = root();
        let size = usize::try_from((*root).szOsFile).unwrap_or(0);
        let words = size.div_ceil(8).max(1);
        let real = Box::into_raw(vec![0u64; words].into_boxed_slice()).cast::<ffi::sqlite3_file>();
        let Some(open) = (*root).xOpen else {
            return ffi::SQLITE_ERROR;
        };
        let rc = open(root, name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            if !(*real).pMethods.is_null() {
                if let Some(close) = real_methods(real).xClose {
                    close(real);
                }
            }
            drop(Box::from_raw(ptr::slice_from_raw_parts_mut(
                real.cast::<u64>(),
                words,
            )));
            return rc;
        }
        let path = if name.is_null() {
            None
        } else {
            Some(CStr::from_ptr(name).to_string_lossy().into_owned())
        };
        ptr::write(ptr::addr_of_mut!((*this).real), real);
        ptr::write(ptr::addr_of_mut!((*this).path), path);
        (*this).base.pMethods = &METHODS;
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn shim_delete(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    // SAFETY: SQLite passes a valid name; ROOT was set by `install`.
    unsafe {
        let path = CStr::from_ptr(name).to_string_lossy().into_owned();
        if let Some(state) = state().as_mut() {
            if count(state, Some(&path)) {
                return ffi::SQLITE_IOERR_DELETE;
            }
            state.pending.remove(&path);
        }
        // Unlocked: the unix VFS may sync the folder, which reaches `fsync`.
        let root = root();
        match (*root).xDelete {
            Some(delete) => delete(root, name, sync_dir),
            None => ffi::SQLITE_ERROR,
        }
    }
}

unsafe extern "C" fn shim_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: `file` was opened by `shim_open`.
    unsafe {
        let this = shim(file);
        let real = this.real;
        let rc = match real_methods(real).xClose {
            Some(close) => close(real),
            None => ffi::SQLITE_OK,
        };
        let size = usize::try_from((*root()).szOsFile).unwrap_or(0);
        drop(Box::from_raw(ptr::slice_from_raw_parts_mut(
            real.cast::<u64>(),
            size.div_ceil(8).max(1),
        )));
        ptr::drop_in_place(ptr::addr_of_mut!(this.path));
        this.base.pMethods = ptr::null();
        rc
    }
}

unsafe extern "C" fn shim_read(
    file: *mut ffi::sqlite3_file,
    buffer: *mut c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: `file` was opened by `shim_open`; the rest is SQLite's call.
    unsafe {
        if is_cut() {
            return ffi::SQLITE_IOERR_READ;
        }
        let real = shim(file).real;
        match real_methods(real).xRead {
            Some(read) => read(real, buffer, amount, offset),
            None => ffi::SQLITE_IOERR_READ,
        }
    }
}

/// Reads what `real` holds at `offset..offset + amount` (zeros past its
/// end) and its size.
///
/// # Safety
/// `real` is an open file of the unix VFS.
unsafe fn read_old(real: *mut ffi::sqlite3_file, offset: i64, amount: usize) -> (Vec<u8>, u64) {
    // SAFETY: the caller's contract; the buffer is `amount` bytes.
    unsafe {
        let methods = real_methods(real);
        let mut size: ffi::sqlite3_int64 = 0;
        if let Some(file_size) = methods.xFileSize {
            file_size(real, &mut size);
        }
        let mut old = vec![0u8; amount];
        if let Some(read) = methods.xRead {
            // A short read fills the rest with zeros, which is what it holds.
            read(real, old.as_mut_ptr().cast(), amount as c_int, offset);
        }
        (old, u64::try_from(size).unwrap_or(0))
    }
}

unsafe extern "C" fn shim_write(
    file: *mut ffi::sqlite3_file,
    buffer: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: `file` was opened by `shim_open`; `buffer` holds `amount`
    // bytes.
    unsafe {
        let this = shim(file);
        let real = this.real;
        let mut guard = state();
        let Some(state) = guard.as_mut() else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        if count(state, this.path.as_deref()) {
            return ffi::SQLITE_IOERR_WRITE;
        }
        let length = usize::try_from(amount).unwrap_or(0);
        if let Some(path) = &this.path {
            let (old, size_before) = read_old(real, offset, length);
            let new = std::slice::from_raw_parts(buffer.cast::<u8>(), length).to_vec();
            state
                .pending
                .entry(path.clone())
                .or_default()
                .push(Change::Write {
                    offset: u64::try_from(offset).unwrap_or(0),
                    old,
                    new,
                    size_before,
                });
        }
        match real_methods(real).xWrite {
            Some(write) => write(real, buffer, amount, offset),
            None => ffi::SQLITE_IOERR_WRITE,
        }
    }
}

unsafe extern "C" fn shim_truncate(
    file: *mut ffi::sqlite3_file,
    size: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: `file` was opened by `shim_open`.
    unsafe {
        let this = shim(file);
        let real = this.real;
        let mut guard = state();
        let Some(state) = guard.as_mut() else {
            return ffi::SQLITE_IOERR_TRUNCATE;
        };
        if count(state, this.path.as_deref()) {
            return ffi::SQLITE_IOERR_TRUNCATE;
        }
        if let Some(path) = &this.path {
            let mut size_before: ffi::sqlite3_int64 = 0;
            if let Some(file_size) = real_methods(real).xFileSize {
                file_size(real, &mut size_before);
            }
            if size_before > size {
                let (tail, _) = read_old(real, size, (size_before - size) as usize);
                state
                    .pending
                    .entry(path.clone())
                    .or_default()
                    .push(Change::Truncate {
                        size: u64::try_from(size).unwrap_or(0),
                        size_before: u64::try_from(size_before).unwrap_or(0),
                        tail,
                    });
            }
        }
        match real_methods(real).xTruncate {
            Some(truncate) => truncate(real, size),
            None => ffi::SQLITE_IOERR_TRUNCATE,
        }
    }
}

unsafe extern "C" fn shim_sync(file: *mut ffi::sqlite3_file, _flags: c_int) -> c_int {
    // SAFETY: `file` was opened by `shim_open`.
    unsafe {
        let this = shim(file);
        let acknowledged = ACKNOWLEDGED.load(Ordering::SeqCst);
        let mut guard = state();
        let Some(state) = guard.as_mut() else {
            return ffi::SQLITE_IOERR_FSYNC;
        };
        if count(state, this.path.as_deref()) {
            return ffi::SQLITE_IOERR_FSYNC;
        }
        if let Some(path) = &this.path {
            state.pending.remove(path);
            if path.ends_with("-wal") {
                state.synced_acknowledged = state.synced_acknowledged.max(acknowledged);
            }
        }
        ffi::SQLITE_OK
    }
}

macro_rules! pass {
    ($name:ident, $field:ident, ($($arg:ident : $ty:ty),*), $fallback:expr) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            // SAFETY: `file` was opened by `shim_open`; the rest is SQLite's
            // call, passed on unchanged.
            unsafe {
                let real = shim(file).real;
                match real_methods(real).$field {
                    Some(f) => f(real $(, $arg)*),
                    None => $fallback,
                }
            }
        }
    };
}

pass!(shim_file_size, xFileSize, (size: *mut ffi::sqlite3_int64), ffi::SQLITE_IOERR_FSTAT);
pass!(shim_lock, xLock, (level: c_int), ffi::SQLITE_OK);
pass!(shim_unlock, xUnlock, (level: c_int), ffi::SQLITE_OK);
pass!(shim_check_reserved, xCheckReservedLock, (out: *mut c_int), ffi::SQLITE_OK);
pass!(shim_file_control, xFileControl, (op: c_int, arg: *mut c_void), ffi::SQLITE_NOTFOUND);
pass!(shim_sector_size, xSectorSize, (), SECTOR as c_int);
pass!(shim_device, xDeviceCharacteristics, (), 0);
pass!(shim_shm_lock, xShmLock, (offset: c_int, n: c_int, flags: c_int), ffi::SQLITE_IOERR_SHMLOCK);
pass!(shim_shm_unmap, xShmUnmap, (delete: c_int), ffi::SQLITE_OK);
pass!(shim_unfetch, xUnfetch, (offset: ffi::sqlite3_int64, page: *mut c_void), ffi::SQLITE_OK);

unsafe extern "C" fn shim_shm_map(
    file: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: as `pass!`.
    unsafe {
        let real = shim(file).real;
        match real_methods(real).xShmMap {
            Some(f) => f(real, region, size, extend, out),
            None => ffi::SQLITE_IOERR_SHMMAP,
        }
    }
}

unsafe extern "C" fn shim_shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: as `pass!`.
    unsafe {
        let real = shim(file).real;
        if let Some(f) = real_methods(real).xShmBarrier {
            f(real);
        }
    }
}

unsafe extern "C" fn shim_fetch(
    file: *mut ffi::sqlite3_file,
    offset: ffi::sqlite3_int64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: as `pass!`. Memory-mapped reads are declined (a null page),
    // so every read goes through `shim_read`.
    unsafe {
        let _ = (file, offset, amount);
        *out = ptr::null_mut();
        ffi::SQLITE_OK
    }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(shim_close),
    xRead: Some(shim_read),
    xWrite: Some(shim_write),
    xTruncate: Some(shim_truncate),
    xSync: Some(shim_sync),
    xFileSize: Some(shim_file_size),
    xLock: Some(shim_lock),
    xUnlock: Some(shim_unlock),
    xCheckReservedLock: Some(shim_check_reserved),
    xFileControl: Some(shim_file_control),
    xSectorSize: Some(shim_sector_size),
    xDeviceCharacteristics: Some(shim_device),
    xShmMap: Some(shim_shm_map),
    xShmLock: Some(shim_shm_lock),
    xShmBarrier: Some(shim_shm_barrier),
    xShmUnmap: Some(shim_shm_unmap),
    xFetch: Some(shim_fetch),
    xUnfetch: Some(shim_unfetch),
};

/// A small deterministic generator, so a run reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
