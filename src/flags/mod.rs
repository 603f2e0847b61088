//! The command line as clap parses it, and the library configurations it resolves to.
//!
//! Each subcommand's arguments are a plain clap struct (the "low-level" arguments); a
//! `TryFrom` or a `*_config` function turns them, once, into the configuration the library
//! takes, and the library holds every value rule. Parsers here only turn text into values.

pub mod bench;
pub mod demo;
pub mod ingest;
pub mod serve;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Streaming patch sampling for 3D segmentation training with a patch-size curriculum.
#[derive(Parser, Debug)]
#[command(name = "patchflow", version, about, long_about = None)]
pub struct Cli {
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors, no progress bars.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Convert NIfTI image/label pairs into a chunked, compressed store.
    Ingest(ingest::IngestArgs),
    /// Show what a store holds: cases, shapes, spacing, classes, compression.
    Inspect(ingest::InspectArgs),
    /// Write a synthetic CT-like phantom dataset in nnU-Net's raw layout.
    Phantom(PhantomArgs),
    /// Print a PGPS (or baseline) patch-size schedule.
    Schedule(ScheduleArgs),
    /// Serve patches of one or more stores over gRPC (the sampling daemon).
    Serve(serve::ServeArgs),
    /// The main job on generated data: phantom dataset → ingest → report.
    Demo(demo::DemoArgs),
    /// Measure ingest, sampling and daemon throughput (also: `bench peer`, `bench load`).
    Bench(Box<bench::BenchArgs>),
}

/// `patchflow phantom`.
#[derive(Args, Debug)]
pub struct PhantomArgs {
    /// Output folder (nnU-Net raw layout).
    pub out: PathBuf,
    /// Number of cases.
    #[arg(long, default_value_t = 8)]
    pub cases: usize,
    /// Shape z,y,x in voxels (or ZxYxX, or one number).
    #[arg(long, value_parser = extent, default_value = "64,96,96")]
    pub shape: [usize; 3],
    /// Spacing z,y,x in mm.
    #[arg(long, value_parser = spacing, default_value = "2,1,1")]
    pub spacing: [f64; 3],
    /// Lesions (rare class) per case.
    #[arg(long, default_value_t = 4)]
    pub lesions: usize,
    /// Seed.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

impl From<&PhantomArgs> for patchflow_volume::PhantomSpec {
    fn from(a: &PhantomArgs) -> Self {
        patchflow_volume::PhantomSpec {
            shape: a.shape,
            spacing: a.spacing,
            seed: a.seed,
            lesions: a.lesions,
        }
    }
}

/// `patchflow schedule`.
#[derive(Args, Debug)]
pub struct ScheduleArgs {
    /// Final (planned) patch z,y,x (or ZxYxX), or one number for a cube.
    #[arg(long, required_unless_present = "store", value_parser = extent)]
    pub final_patch: Option<[usize; 3]>,
    /// Stride-2 poolings per axis z,y,x, or one number for all axes.
    #[arg(long, required_unless_present = "store", value_parser = pools)]
    pub pools: Option<[u32; 3]>,
    /// A store ingested from nnU-Net's preprocessed folder: its plan's patch size, poolings per
    /// axis and batch size (flags given as well override them).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Training epochs.
    #[arg(long, default_value_t = 1000)]
    pub epochs: usize,
    /// Planned batch size [default: the store's plan, else 2].
    #[arg(long)]
    pub batch: Option<usize>,
    /// pgps (the authors' PGPS; also pgps-efficiency), pgps-plus, pgps-performance, rpss or
    /// constant.
    #[arg(long, default_value = "pgps")]
    pub mode: patchflow_curriculum::Mode,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Three voxel counts (`z,y,x`, `ZxYxX` or one number), each at least 1: a volume's shape, a
/// chunk's, a patch the curriculum validates further.
pub fn extent(s: &str) -> Result<[usize; 3], String> {
    let v: [usize; 3] = patchflow_grid::parse_triplet(s).map_err(|e| e.to_string())?;
    if v.contains(&0) {
        return Err(format!("{s:?}: every value must be at least 1"));
    }
    Ok(v)
}

/// A voxel spacing in mm (`z,y,x` or one number), each value positive and finite.
pub fn spacing(s: &str) -> Result<[f64; 3], String> {
    let v: [f64; 3] = patchflow_grid::parse_triplet(s).map_err(|e| e.to_string())?;
    if v.iter().any(|x| !x.is_finite() || *x <= 0.0) {
        return Err(format!("{s:?}: every value must be a positive number"));
    }
    Ok(v)
}

/// Stride-2 pooling counts per axis, by the curriculum's rule.
pub fn pools(s: &str) -> Result<[u32; 3], String> {
    patchflow_curriculum::parse_pools(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn triplets_take_every_form_of_the_shared_parser() {
        for text in ["32,64,64", "32x64x64", "32×64×64", " 32 , 64 , 64 "] {
            assert_eq!(extent(text).unwrap(), [32, 64, 64], "{text}");
        }
        assert_eq!(extent("48").unwrap(), [48; 3]);
        assert!(extent("0,4,4").unwrap_err().contains("at least 1"));
        assert!(extent("4,4").is_err());
        assert_eq!(spacing("0.5x0.5x3").unwrap(), [0.5, 0.5, 3.0]);
        assert!(spacing("1,0,1").is_err());
        assert!(spacing("1,inf,1").is_err());
        assert_eq!(pools("5").unwrap(), [5; 3]);
        assert!(pools("5,5,99").is_err());
    }
}
