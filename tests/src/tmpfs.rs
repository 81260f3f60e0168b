//! A small file system of a test's own, to run out of space on.
//!
//! A rewind must stop with a clear error when the target's file system fills up (`ENOSPC`), and
//! finish when run again once space is freed. A tmpfs mounted with `size=` is such a file
//! system: a write past its size fails with `ENOSPC` at once, as on a full disk, and removing a
//! file gives its space back. Unlike ext4 it keeps no blocks in reserve for root, so a rewind
//! run as root fills it like any other user would.
//!
//! Mounting needs root (`CAP_SYS_ADMIN`), which the test bed has; where it is refused,
//! [`Tmpfs::mount`] says why, and a test that needs one should fail with that reason rather
//! than pass without having run. Everything mounted is unmounted when the [`Tmpfs`] is dropped,
//! also when a test panics — lazily (`MNT_DETACH`), so that a server still running on it (a
//! test that failed half-way) does not keep the mount in place; the [`Cluster`] kills its
//! server by process id, which needs no path.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::cluster::Cluster;

/// A mounted tmpfs, and the directories bind-mounted from it.
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
    /// Mount points of binds from this file system, innermost last.
    binds: Vec<PathBuf>,
}

fn c_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("a path without NUL bytes")
}

fn mount(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let source_c = CString::new(source).expect("no NUL");
    let target_c = c_path(target);
    let fstype_c = fstype.map(|t| CString::new(t).expect("no NUL"));
    let data_c = data.map(|d| CString::new(d).expect("no NUL"));
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null.
    let rc = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |c| c.as_ptr().cast()),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "mount {source} on {} failed: {}",
            target.display(),
            std::io::Error::last_os_error()
        ))
    }
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes on `dir` (created if missing). Err says why it could not
    /// (not root, no tmpfs in this kernel or container).
    pub fn mount(dir: &Path, size: u64) -> Result<Tmpfs, String> {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        mount(
            "tmpfs",
            dir,
            Some("tmpfs"),
            0,
            Some(&format!("size={size},mode=0755")),
        )
        .map_err(|e| {
            format!(
                "{e} (a tmpfs needs root or CAP_SYS_ADMIN; the test runs as uid {})",
                // SAFETY: getuid has no preconditions.
                unsafe { libc::getuid() }
            )
        })?;
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
            binds: Vec::new(),
        })
    }

    /// A tmpfs of `size` bytes on `<base_dir>/disk` of a stopped `cluster`, holding its data
    /// directory: copied there (owners, modes and links kept) and bind-mounted back on the
    /// data directory's path, so that the cluster and failback use the same path as before,
    /// and files beside the data directory (see [`Tmpfs::fill_leaving`]) take space from it.
    pub fn with_data_dir_of(cluster: &mut Cluster, size: u64) -> Result<Tmpfs, String> {
        assert!(
            !cluster.is_running(),
            "cluster '{}' must be stopped to move its data directory",
            cluster.name()
        );
        let data = cluster.data_dir();
        let mut disk = Tmpfs::mount(&cluster.base_dir().join("disk"), size)?;
        let moved = disk.dir.join("data");
        let out = std::process::Command::new("cp")
            .arg("-a")
            .arg(&data)
            .arg(&moved)
            .output()
            .map_err(|e| format!("could not run cp: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cp -a {} {} failed (is {size} bytes enough?): {}",
                data.display(),
                moved.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        fs::remove_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        fs::create_dir(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        mount(&moved.to_string_lossy(), &data, None, libc::MS_BIND, None)?;
        disk.binds.push(data);
        Ok(disk)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Bytes still free on it.
    pub fn available(&self) -> u64 {
        let c = c_path(&self.dir);
        // SAFETY: statvfs fills the struct it is given; `c` is NUL-terminated and lives across
        // the call.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        assert_eq!(
            rc,
            0,
            "statvfs {}: {}",
            self.dir.display(),
            std::io::Error::last_os_error()
        );
        st.f_bavail * st.f_frsize
    }

    /// Writes a ballast file `name` at its root until only `free` bytes are left (or fewer, by
    /// less than a page). Returns its path; removing the file frees the space again.
    pub fn fill_leaving(&self, name: &str, free: u64) -> PathBuf {
        let path = self.dir.join(name);
        let mut f = fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let chunk = vec![0xa5u8; 1 << 20];
        loop {
            let avail = self.available();
            if avail <= free {
                break;
            }
            let n = (avail - free).min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for p in self.binds.iter().rev().chain(std::iter::once(&self.dir)) {
            let c = c_path(p);
            // SAFETY: `c` is a NUL-terminated path that lives across the call.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn fills_up_frees_and_is_unmounted_when_dropped_in_a_panic() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("disk");
        let disk = Tmpfs::mount(&dir, 4 << 20).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(
            fs::metadata(&dir).unwrap().dev(),
            fs::metadata(base.path()).unwrap().dev()
        );
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let ballast = disk.fill_leaving("ballast", 64 << 10);
            assert_eq!(disk.available(), 64 << 10);
            let err = fs::write(disk.path().join("big"), vec![0u8; 1 << 20]).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
            fs::remove_file(ballast).unwrap();
            fs::write(disk.path().join("big"), vec![0u8; 1 << 20]).unwrap();
            panic!("a test failing with its tmpfs mounted");
        }));
        assert!(unwound.is_err());
        assert_eq!(
            fs::metadata(&dir).unwrap().dev(),
            fs::metadata(base.path()).unwrap().dev(),
            "the tmpfs is still mounted"
        );
    }
}
