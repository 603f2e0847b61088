//! Training of 3D segmentation networks on libtorch, fed by patchflow, with the PGPS patch-size
//! curriculum.
//!
//! It owns everything that needs libtorch: the network, the loss, training, inference and
//! evaluation. It must not store or serve data (batches come through a [`BatchSource`]), and
//! nothing the daemon links may depend on it.
//!
//! patchflow's daemon and sampler exist to keep a GPU busy; this crate is the GPU side that
//! proves it and that users can run as is: an nnU-Net-style 3D U-Net ([`unet`]), nnU-Net's
//! Dice + cross-entropy loss with an ignore label ([`loss`]), its SGD/poly optimiser
//! ([`optim`]), a training loop that asks its [`BatchSource`] for the patch and batch size of
//! the current PGPS stage and measures how long it waits for data ([`train()`]),
//! sliding-window inference ([`infer`]), validation and NIfTI export on the original grid
//! ([`eval`]), checkpoints that resume bit for bit ([`checkpoint`]), and a JSON-lines log with
//! a PNG plot ([`metrics`], [`plot`]). The binary `patchflow-train` wraps it.
//!
//! One binary runs on the CPU and on CUDA: [`device::load_cuda`] loads libtorch's CUDA library
//! at start-up when the machine has one. The daemon never links this crate.

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod device;
mod error;
pub mod eval;
pub mod infer;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod remote;
pub mod train;
pub mod unet;

pub use data::{
    BatchSource, CaseSummary, HostBatch, InProcessSource, Prefetcher, SourceInfo, StreamSetup,
    Volume, VolumeLoader,
};
pub use device::{DeviceChoice, load_cuda, resolve_device};
pub use error::TrainerError;
pub use eval::{ValidationReport, validate, write_prediction};
pub use infer::{SlidingWindow, sliding_window_logits};
pub use loss::DiceCeLoss;
pub use plan::{StepPlan, StepSpec};
pub use remote::RemoteSource;
pub use train::{RunSummary, StageTiming, TrainConfig, compare_runs, time_stages, train};
pub use unet::{Model, UNet, UNetConfig};
