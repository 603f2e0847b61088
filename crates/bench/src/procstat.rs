//! Per-process counters from `/proc`: CPU time, bytes read from storage, resident memory.

use std::path::PathBuf;

use serde::Serialize;

use crate::BenchError;

/// Counters of one process at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ProcSample {
    /// User + system CPU time of all its threads so far, seconds.
    pub cpu_s: f64,
    /// Bytes this process caused to be read from storage so far (`read_bytes` of
    /// `/proc/PID/io`: page-cache misses, readahead included; cached reads count nothing).
    pub read_bytes: u64,
    /// Resident memory now, bytes.
    pub rss_bytes: u64,
    /// Highest resident memory so far, bytes (`VmHWM`). Counts mapped store pages, which the
    /// kernel can drop at any time.
    pub peak_rss_bytes: u64,
    /// Resident anonymous memory now, bytes (`RssAnon`: heap, caches, batches; not file pages).
    pub anon_rss_bytes: u64,
}

impl ProcSample {
    /// Counter differences `self - earlier` (CPU and reads; memory as of `self`).
    pub fn since(&self, earlier: &ProcSample) -> ProcSample {
        ProcSample {
            cpu_s: (self.cpu_s - earlier.cpu_s).max(0.0),
            read_bytes: self.read_bytes.saturating_sub(earlier.read_bytes),
            rss_bytes: self.rss_bytes,
            peak_rss_bytes: self.peak_rss_bytes,
            anon_rss_bytes: self.anon_rss_bytes,
        }
    }
}

fn proc_dir(pid: Option<u32>) -> PathBuf {
    match pid {
        Some(pid) => PathBuf::from(format!("/proc/{pid}")),
        None => PathBuf::from("/proc/self"),
    }
}

fn read(path: PathBuf) -> Result<String, BenchError> {
    std::fs::read_to_string(&path).map_err(|e| BenchError::io("reading", path, e))
}

/// Clock ticks per second of `/proc/PID/stat` times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// User + system CPU time of this process (all threads), seconds.
fn own_cpu_s() -> f64 {
    // SAFETY: `usage` is a properly sized, writable struct that getrusage only writes into.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// User + system ticks from the text of `/proc/PID/stat` (fields 14 and 15; the command name
/// in field 2 may hold spaces and parentheses, so fields are counted after its last `)`).
fn stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // `rest` starts at field 3 (state); utime is field 14.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The value in kB of `key:` in `/proc/PID/status`, in bytes.
fn status_kb(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..]
        .trim_start_matches(':')
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// `read_bytes` from the text of `/proc/PID/io`.
fn io_read_bytes(io: &str) -> Option<u64> {
    io.lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))?
        .trim()
        .parse()
        .ok()
}

/// Counters of process `pid` (`None`: this process).
pub fn sample(pid: Option<u32>) -> Result<ProcSample, BenchError> {
    let dir = proc_dir(pid);
    let bad = |file: &str| {
        BenchError::io(
            "parsing",
            dir.join(file),
            std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected format"),
        )
    };
    let cpu_s = match pid {
        // Microseconds for this process, rather than the stat file's clock ticks.
        None => own_cpu_s(),
        Some(_) => {
            let stat = read(dir.join("stat"))?;
            stat_ticks(&stat).ok_or_else(|| bad("stat"))? as f64 / clock_ticks()
        }
    };
    let status = read(dir.join("status"))?;
    let rss = status_kb(&status, "VmRSS").unwrap_or(0);
    let peak = status_kb(&status, "VmHWM").unwrap_or(rss);
    let anon = status_kb(&status, "RssAnon").unwrap_or(rss);
    // `io` may be unreadable without privileges over the process; reads then count as zero.
    let read_bytes = std::fs::read_to_string(dir.join("io"))
        .ok()
        .and_then(|t| io_read_bytes(&t))
        .unwrap_or(0);
    Ok(ProcSample {
        cpu_s,
        read_bytes,
        rss_bytes: rss,
        peak_rss_bytes: peak,
        anon_rss_bytes: anon,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_text() {
        let stat = "1234 (a b) c)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert_eq!(stat_ticks(stat), Some(300));
        assert_eq!(stat_ticks("garbage"), None);
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t 1024 kB\n";
        assert_eq!(status_kb(status, "VmHWM"), Some(2 << 20));
        assert_eq!(status_kb(status, "VmRSS"), Some(1 << 20));
        assert_eq!(status_kb(status, "VmSwap"), None);
        assert_eq!(io_read_bytes("rchar: 5\nread_bytes: 4096\n"), Some(4096));
    }

    #[test]
    fn own_counters_move() {
        let a = sample(None).unwrap();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = sample(None).unwrap();
        assert!(b.cpu_s >= a.cpu_s);
        assert!(b.rss_bytes > 0 && b.peak_rss_bytes >= b.rss_bytes);
        assert!(b.anon_rss_bytes > 0 && b.anon_rss_bytes <= b.rss_bytes);
        let d = b.since(&a);
        assert!(d.cpu_s >= 0.0);
    }
}
