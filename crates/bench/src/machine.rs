//! A note of the machine a benchmark ran on: CPU, cores, memory and the disk under the data.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// The machine, as far as `/proc`, `/sys` and `statvfs` tell.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// CPU model name (`/proc/cpuinfo`).
    pub cpu_model: String,
    /// Logical cores this process may run on.
    pub cores: usize,
    /// Physical memory, bytes (`MemTotal`).
    pub memory_bytes: u64,
    /// Kernel release.
    pub kernel: String,
    /// The file system holding the benchmark data.
    pub disk: Disk,
}

/// The file system under a path.
#[derive(Clone, Debug, Serialize)]
pub struct Disk {
    /// The path asked about.
    pub path: PathBuf,
    /// Its mount point.
    pub mount_point: String,
    /// The device (or source) mounted there.
    pub device: String,
    /// File-system type.
    pub fs_type: String,
    /// Size, bytes.
    pub total_bytes: u64,
    /// Free space for this user, bytes.
    pub free_bytes: u64,
    /// Whether the block device says it rotates (`None`: unknown).
    pub rotational: Option<bool>,
}

impl Machine {
    /// Describes this machine and the file system holding `data`.
    pub fn describe(data: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_bytes = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_ascii_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        Machine {
            cpu_model,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes,
            kernel,
            disk: Disk::describe(data),
        }
    }

    /// One line for a report header.
    pub fn summary(&self) -> String {
        let d = &self.disk;
        format!(
            "{} cores ({}), {:.1} GiB RAM, Linux {}; data on {} ({}, {}) at {}: {:.0} GiB, {:.0} GiB free",
            self.cores,
            self.cpu_model,
            gib(self.memory_bytes),
            self.kernel,
            d.device,
            d.fs_type,
            match d.rotational {
                Some(true) => "rotating",
                Some(false) => "non-rotating",
                None => "unknown medium",
            },
            d.mount_point,
            gib(d.total_bytes),
            gib(d.free_bytes),
        )
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

impl Disk {
    /// The file system under `path` (the nearest existing ancestor when `path` does not exist).
    pub fn describe(path: &Path) -> Disk {
        let mut probe = path.to_path_buf();
        while !probe.exists() {
            if !probe.pop() {
                probe = PathBuf::from(".");
                break;
            }
        }
        let real = std::fs::canonicalize(&probe).unwrap_or(probe);
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let (mount_point, device, fs_type) = mounts
            .lines()
            .filter_map(|l| {
                let mut f = l.split_ascii_whitespace();
                let dev = f.next()?;
                let mnt = f.next()?.replace("\\040", " ");
                let fs = f.next()?;
                real.starts_with(&mnt)
                    .then(|| (mnt, dev.to_owned(), fs.to_owned()))
            })
            .max_by_key(|(m, _, _)| m.len())
            .unwrap_or_else(|| ("/".into(), "unknown".into(), "unknown".into()));
        let (total_bytes, free_bytes) = statvfs(&real).unwrap_or((0, 0));
        Disk {
            path: path.to_path_buf(),
            rotational: rotational(&device),
            mount_point,
            device,
            fs_type,
            total_bytes,
            free_bytes,
        }
    }
}

fn statvfs(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string and `out` a properly sized, writable struct.
    let mut out: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the call only writes into `out`.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut out) };
    if rc != 0 {
        return None;
    }
    let block = out.f_frsize as u64;
    Some((out.f_blocks as u64 * block, out.f_bavail as u64 * block))
}

/// `/sys/block/DEV/queue/rotational` for `/dev/DEV` or its whole-disk parent.
fn rotational(device: &str) -> Option<bool> {
    let name = device.strip_prefix("/dev/")?;
    let mut candidates = vec![name.to_owned()];
    let whole = name.trim_end_matches(|c: char| c.is_ascii_digit());
    candidates.push(whole.trim_end_matches('p').to_owned());
    candidates.push(whole.to_owned());
    candidates.iter().find_map(|n| {
        let text = std::fs::read_to_string(format!("/sys/block/{n}/queue/rotational")).ok()?;
        Some(text.trim() == "1")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let m = Machine::describe(&dir.path().join("not/yet/there"));
        assert!(m.cores >= 1);
        assert!(m.memory_bytes > 0);
        assert!(m.disk.total_bytes >= m.disk.free_bytes);
        assert!(m.disk.total_bytes > 0);
        assert!(m.summary().contains("cores"));
    }
}
