//! `patchflow ingest` and `patchflow inspect`: their arguments and the [`IngestOptions`] they
//! resolve to.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use patchflow_ingest::IngestOptions;

use super::{extent, spacing};

/// `patchflow ingest`.
#[derive(Args, Debug)]
pub struct IngestArgs {
    /// nnU-Net raw dataset folder (imagesTr/, labelsTr/, dataset.json), nnU-Net's preprocessed
    /// configuration folder (nnUNet_preprocessed/DatasetXXX_Name/nnUNetPlans_3d_fullres, stored
    /// as nnU-Net has it), or a TSV file with a header row naming the columns `image` and
    /// `label` (optional: `id`, `modality`).
    pub input: PathBuf,
    /// Store folder to write (created if absent), or `s3://bucket/prefix` in object storage.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Cases processed in parallel [default: number of cores].
    #[arg(long, short)]
    pub jobs: Option<usize>,
    /// Keep each case's spacing (no resampling).
    #[arg(long, conflicts_with = "spacing")]
    pub keep_spacing: bool,
    /// Target spacing z,y,x in mm [default: the dataset's median spacing].
    #[arg(long, value_parser = spacing)]
    pub spacing: Option<[f64; 3]>,
    /// Image interpolation when resampling.
    #[arg(long, default_value = "cubic", value_parser = ["cubic", "linear"])]
    pub interp: String,
    /// Chunk shape z,y,x of the store [default: the store's benchmarked default].
    #[arg(long, value_parser = extent)]
    pub chunk: Option<[usize; 3]>,
    /// zstd compression level of the chunks (1 to 22).
    #[arg(long)]
    pub zstd_level: Option<i32>,
    /// Seed for class-location and intensity sampling.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Make a new dataset plan (spacing, CT statistics) and re-ingest every case.
    #[arg(long)]
    pub replan: bool,
    /// Keep running: ingest new cases as they appear, until SIGINT/SIGTERM.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between looks at the input in --watch mode.
    #[arg(long, value_parser = seconds, default_value = "2")]
    pub poll_seconds: Duration,
}

impl TryFrom<&IngestArgs> for IngestOptions {
    type Error = anyhow::Error;

    /// The options of the arguments, checked by ingest's rules; progress bars are on.
    fn try_from(a: &IngestArgs) -> Result<IngestOptions> {
        let mut opts = IngestOptions {
            replan: a.replan,
            ..Default::default()
        };
        if let Some(j) = a.jobs {
            opts.jobs = j;
        }
        opts.settings.keep_spacing = a.keep_spacing;
        opts.settings.target_spacing = a.spacing;
        opts.settings.interp = a.interp.clone();
        if let Some(c) = a.chunk {
            opts.settings.chunk_shape = c;
        }
        if let Some(l) = a.zstd_level {
            opts.settings.zstd_level = l;
        }
        opts.settings.seed = a.seed;
        opts.check()?;
        Ok(opts)
    }
}

/// `patchflow inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Store folder, or `s3://bucket/prefix`.
    pub store: PathBuf,
    /// Only this case.
    #[arg(long)]
    pub case: Option<String>,
    /// Print one JSON document instead of a table (fields documented in the README).
    #[arg(long)]
    pub json: bool,
    /// Also decode every chunk and check its checksum; exit non-zero if any fails.
    #[arg(long)]
    pub verify: bool,
}

/// A positive, finite number of seconds.
fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?}: must be a positive number of seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        ingest: IngestArgs,
    }

    fn options(args: &[&str]) -> Result<IngestOptions> {
        let wrap = Wrap::try_parse_from(
            ["ingest", "in", "--out", "store"]
                .into_iter()
                .chain(args.iter().copied()),
        )?;
        IngestOptions::try_from(&wrap.ingest)
    }

    #[test]
    fn arguments_resolve_to_checked_options() {
        let o = options(&[
            "--jobs",
            "3",
            "--chunk",
            "16x32x32",
            "--zstd-level",
            "5",
            "--spacing",
            "2,0.5,0.5",
        ])
        .unwrap();
        assert_eq!(o.jobs, 3);
        assert_eq!(o.settings.chunk_shape, [16, 32, 32]);
        assert_eq!(o.settings.zstd_level, 5);
        assert_eq!(o.settings.target_spacing, Some([2.0, 0.5, 0.5]));
        // The rules are the library's.
        assert!(options(&["--jobs", "0"]).is_err());
        assert!(options(&["--zstd-level", "23"]).is_err());
        assert!(options(&["--poll-seconds", "0"]).is_err());
        assert!(options(&["--poll-seconds", "-1"]).is_err());
        assert!(options(&["--poll-seconds", "0.5"]).is_ok());
    }
}
