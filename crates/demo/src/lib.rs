//! `patchflow demo`: the main job on generated data. A phantom dataset in nnU-Net's raw layout
//! is ingested and reported; then a daemon serves it on a free loopback port and
//! `patchflow-train` trains against it with PGPS, writing its report beside the store's.
//!
//! It owns only this wiring of the library crates. It must not link libtorch: the trainer runs
//! as a separate process, found next to the running binary or named by the caller.
//!
//! ```no_run
//! # fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = patchflow_demo::DemoConfig {
//!     out: "demo-out".into(),
//!     cases: 6,
//!     shape: [64, 96, 96],
//!     train_bin: None,
//!     epochs: 24,
//!     iters_per_epoch: 50,
//!     oversample: 1.0,
//!     final_patch: "32,64,64".parse()?,
//!     progress: true,
//! };
//! let stop = std::sync::atomic::AtomicBool::new(false);
//! let prepared = patchflow_demo::prepare(&config, &stop)?;
//! print!("{}", prepared.store_text);
//! if let Some(trainer) = config.trainer() {
//!     patchflow_demo::train(&config, &prepared, &trainer)?;
//! }
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use patchflow_grid::Patch;
use patchflow_ingest::IngestReport;

/// The trainer binary's file name, looked for next to the running binary.
pub const TRAINER_BIN: &str = "patchflow-train";

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A file of the report could not be written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing the phantom dataset failed.
    #[error("writing the phantom dataset to {path}: {source}")]
    Phantom {
        /// The raw dataset folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: patchflow_volume::VolumeError,
    },
    /// Ingesting or inspecting the store failed.
    #[error(transparent)]
    Ingest(#[from] patchflow_ingest::IngestError),
    /// Some phantom cases failed to ingest.
    #[error("{failed} phantom case(s) failed to ingest ({summary})")]
    IngestCases {
        /// How many failed.
        failed: usize,
        /// The ingest summary.
        summary: String,
    },
    /// The JSON report could not be encoded.
    #[error("encoding {path}: {source}")]
    Json {
        /// The report file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The daemon could not start or stop.
    #[error("the demo daemon: {0}")]
    Server(#[from] patchflow_server::ServerError),
    /// The trainer could not be started, or failed.
    #[error("{bin}: {reason}")]
    Trainer {
        /// The trainer binary.
        bin: PathBuf,
        /// What happened.
        reason: String,
    },
}

/// What the demo does, and where.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Folder for everything the demo writes (raw dataset, store, report).
    pub out: PathBuf,
    /// Phantom cases to generate.
    pub cases: usize,
    /// Phantom shape `[z, y, x]`.
    pub shape: [usize; 3],
    /// The trainer binary; `None`: [`TRAINER_BIN`] next to the running binary.
    pub train_bin: Option<PathBuf>,
    /// Training epochs.
    pub epochs: usize,
    /// Iterations per epoch.
    pub iters_per_epoch: usize,
    /// Share of crops centred on a foreground class.
    pub oversample: f64,
    /// Final patch of the run (PGPS grows towards it).
    pub final_patch: Patch,
    /// Draw progress bars while ingesting.
    pub progress: bool,
}

impl DemoConfig {
    /// The raw dataset folder.
    pub fn raw_dir(&self) -> PathBuf {
        self.out.join("raw").join("Dataset001_Phantom")
    }

    /// The store folder (the dataset is named after it).
    pub fn store_dir(&self) -> PathBuf {
        self.out.join("phantom")
    }

    /// The report folder.
    pub fn report_dir(&self) -> PathBuf {
        self.out.join("report")
    }

    /// The trainer binary to run: [`DemoConfig::train_bin`], else [`TRAINER_BIN`] next to the
    /// running binary when it is there.
    pub fn trainer(&self) -> Option<PathBuf> {
        self.train_bin.clone().or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let sibling = exe.parent()?.join(TRAINER_BIN);
            sibling.is_file().then_some(sibling)
        })
    }
}

/// The dataset ingested and the store reported.
#[derive(Debug)]
pub struct Prepared {
    /// The store folder.
    pub store: PathBuf,
    /// What ingest did.
    pub ingest: IngestReport,
    /// The store report as text (also in `report/store.txt`).
    pub store_text: String,
}

/// Generates the phantom dataset (unless it is already there), ingests it and writes the store
/// report (`store.txt`, `store.json`, `ingest.json`) into the report folder.
///
/// # Errors
/// Writing the dataset or the report, ingesting, or any case failing to ingest.
pub fn prepare(cfg: &DemoConfig, stop: &AtomicBool) -> Result<Prepared, DemoError> {
    let raw = cfg.raw_dir();
    let store = cfg.store_dir();
    let report_dir = cfg.report_dir();
    if raw.join("dataset.json").is_file() {
        tracing::info!("using the phantom dataset already in {}", raw.display());
    } else {
        tracing::info!(
            "generating {} phantom cases in {}",
            cfg.cases,
            raw.display()
        );
        let spec = patchflow_volume::PhantomSpec {
            shape: cfg.shape,
            ..Default::default()
        };
        patchflow_volume::write_phantom_dataset(&raw, cfg.cases, &spec).map_err(|source| {
            DemoError::Phantom {
                path: raw.clone(),
                source,
            }
        })?;
    }
    let opts = patchflow_ingest::IngestOptions {
        progress: cfg.progress,
        ..Default::default()
    };
    let ingest = patchflow_ingest::ingest(&raw, &store, &opts, stop)?;
    if !ingest.failed.is_empty() {
        return Err(DemoError::IngestCases {
            failed: ingest.failed.len(),
            summary: ingest.summary(),
        });
    }
    let report = patchflow_ingest::inspect(&store, None)?;
    std::fs::create_dir_all(&report_dir).map_err(|source| DemoError::Io {
        what: "creating",
        path: report_dir.clone(),
        source,
    })?;
    let store_text = patchflow_ingest::render_text(&report);
    write(&report_dir.join("store.txt"), &store_text)?;
    write_json(&report_dir.join("store.json"), &report)?;
    write_json(&report_dir.join("ingest.json"), &ingest)?;
    Ok(Prepared {
        store,
        ingest,
        store_text,
    })
}

/// Serves the prepared store on a free loopback port and runs `trainer` against it with PGPS;
/// its report goes to `report/train`. Blocks until the trainer exits.
///
/// # Errors
/// The daemon failing to start or stop, the trainer failing to start or exiting with a failure.
pub fn train(cfg: &DemoConfig, prepared: &Prepared, trainer: &Path) -> Result<(), DemoError> {
    let trainer_err = |reason: String| DemoError::Trainer {
        bin: trainer.to_path_buf(),
        reason,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("patchflow-io")
        .build()
        .map_err(|source| DemoError::Io {
            what: "starting the async runtime for",
            path: prepared.store.clone(),
            source,
        })?;
    let server = runtime.block_on(patchflow_server::start(patchflow_server::ServerConfig {
        stores: vec![prepared.store.clone()],
        listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        workers: 1,
        cache_mb: 256,
        ..Default::default()
    }))?;
    let Some(endpoint) = server.endpoint() else {
        return Err(trainer_err("the demo daemon has no TCP endpoint".into()));
    };
    let dataset = prepared
        .store
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    let patch = cfg.final_patch.axes().map(|v| v.to_string()).join(",");
    let mut cmd = Command::new(trainer);
    cmd.args(["--server", &endpoint, "--dataset", &dataset])
        .arg("--store")
        .arg(&prepared.store)
        .args(["--curriculum", "pgps", "--tiny", "--val-cases", "1"])
        .args(["--epochs", &cfg.epochs.to_string()])
        .args(["--iters-per-epoch", &cfg.iters_per_epoch.to_string()])
        .args(["--oversample", &cfg.oversample.to_string()])
        .args(["--final-patch", &patch])
        .arg("--out")
        .arg(cfg.report_dir().join("train"));
    tracing::info!("training: {cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| trainer_err(format!("cannot start: {e}")));
    runtime.block_on(server.shutdown())?;
    let status = status?;
    if !status.success() {
        return Err(trainer_err(format!("exited with {status}")));
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<(), DemoError> {
    std::fs::write(path, text).map_err(|source| DemoError::Io {
        what: "writing",
        path: path.to_path_buf(),
        source,
    })
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), DemoError> {
    let text = serde_json::to_string_pretty(value).map_err(|source| DemoError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    write(path, &text)
}
