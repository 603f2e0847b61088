//! `patchflow bench`: measures what a storage node can feed before anyone trusts it with GPUs.
//!
//! It owns the measurements and their reports. Nothing that serves or trains depends on it, and
//! it drives a daemon only as a child process, from the outside.
//!
//! Users run this on their own storage before they point a cluster of trainers at a daemon,
//! and compare it with the loaders they use today. It measures, on a generated CT-like dataset
//! of any size (or an existing store):
//!
//! * ingest throughput (MB/s of input and of voxels, per core);
//! * patches per second and MB/s by patch size (cubic edges and the PGPS stage sizes of a
//!   plan), in process and through a `patchflow serve` child process over loopback gRPC with
//!   1…N concurrent clients;
//! * warm runs (data in memory) and cold starts (store pages dropped from the page cache and
//!   an empty chunk cache); bytes read from storage per patch (read amplification); CPU
//!   seconds per patch on each side; the daemon's peak memory;
//!
//! and prints a table, writes a JSON report ([`SuiteReport`]) and a PNG plot, with a note of
//! the machine. [`run_peer`] measures one configuration on one core for side-by-side tables
//! with other loaders; [`run_ratio`] measures the same-host shared-memory path against the
//! sampler in process, alternately in one run; [`run_load`] puts many changing streams on one daemon for a set time;
//! [`run_object_store`] measures a store in S3-compatible object storage against a local copy,
//! through a latency-adding proxy, and several daemons sharing it.

mod daemon;
mod error;
mod generate;
mod load;
mod machine;
mod measure;
mod object;
mod peer;
mod plot;
mod procstat;
mod ratio;
mod suite;

pub use daemon::{Daemon, DaemonSpec};
pub use error::BenchError;
pub use generate::{DatasetSpec, folder_bytes, generate};
pub use load::{LoadConfig, LoadReport, render_load, run_load};
pub use machine::{Disk, Machine};
pub use measure::{CacheState, Measurement, Transport, percentile};
pub use object::{
    DaemonsMeasurement, LatencyProxy, ObjectBenchConfig, ObjectMeasurement, ObjectReport,
    copy_store, render_object, run_object_store,
};
pub use peer::{PeerConfig, PeerReport, run_peer};
pub use plot::write_plot;
pub use procstat::{ProcSample, sample as process_sample};
pub use ratio::{RatioConfig, RatioReport, RatioRow, RatioRun, Spread, render_ratio, run_ratio};
pub use suite::{
    IngestFigures, LoopbackRatio, StoreFigures, SuiteConfig, SuiteReport, render_table, run_suite,
};

/// Version of the JSON reports' layout; changes when a field changes meaning or goes away.
pub const REPORT_VERSION: u32 = 1;

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> Result<(), BenchError> {
    let text = serde_json::to_string_pretty(value).map_err(|source| BenchError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io("creating", dir, e))?;
    }
    std::fs::write(path, text + "\n").map_err(|e| BenchError::io("writing", path, e))
}
