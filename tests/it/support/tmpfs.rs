//! Small tmpfs mounts for the full-disk and read-only tests. Mounting needs
//! root (or CAP_SYS_ADMIN); where it is not allowed, the tests that need a
//! mount fail, saying why.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a folder; unmounted on drop.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (such as `2m`) on `path`. `Err` says why it
    /// could not.
    pub fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root, so no tmpfs can be mounted".to_owned());
        }
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    /// Remounts read-only.
    pub fn make_read_only(&self) -> Result<(), Box<dyn std::error::Error>> {
        let status = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.path)
            .status()?;
        if !status.success() {
            return Err("remount read-only failed".into());
        }
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}
