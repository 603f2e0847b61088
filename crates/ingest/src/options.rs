//! What an ingest run is asked to do ([`IngestOptions`]) and what it reports ([`IngestReport`]):
//! shared by the raw-dataset pipeline, the nnU-Net preprocessed-folder ingest and `watch`.

use serde::{Deserialize, Serialize};

use crate::IngestError;
use crate::plan::{MaskForNorm, PlanSettings};

/// How to run ingest.
#[derive(Clone, Debug)]
pub struct IngestOptions {
    /// Cases processed at once.
    pub jobs: usize,
    /// Settings that shape the plan.
    pub settings: PlanSettings,
    /// Make a new plan even if the store has one.
    pub replan: bool,
    /// Draw progress bars on stderr.
    pub progress: bool,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
            settings: PlanSettings {
                keep_spacing: false,
                target_spacing: None,
                interp: "cubic".into(),
                chunk_shape: patchflow_store::DEFAULT_CHUNK_SHAPE,
                zstd_level: patchflow_store::DEFAULT_ZSTD_LEVEL,
                seed: 1234,
            },
            replan: false,
            progress: true,
        }
    }
}

/// zstd levels ingest compresses chunks with. The store accepts zstd's whole range; ingest
/// keeps to the levels that compress (zstd's negative levels trade most of the ratio for speed).
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 1..=22;

impl IngestOptions {
    /// Checks the values: at least one job, a zstd level within [`ZSTD_LEVELS`].
    /// [`crate::ingest`] and [`crate::watch`] check first; a command line can check while it
    /// parses.
    ///
    /// # Errors
    /// [`IngestError::Setting`] naming the field and its rule.
    pub fn check(&self) -> Result<(), IngestError> {
        if self.jobs == 0 {
            return Err(IngestError::Setting {
                field: "jobs",
                reason: "must be at least 1".into(),
            });
        }
        let level = self.settings.zstd_level;
        if !ZSTD_LEVELS.contains(&level) {
            return Err(IngestError::Setting {
                field: "zstd_level",
                reason: format!(
                    "{level} is outside {}..={}",
                    ZSTD_LEVELS.start(),
                    ZSTD_LEVELS.end()
                ),
            });
        }
        Ok(())
    }
}

/// What happened to one case.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaseOutcome {
    /// Case id.
    pub id: String,
    /// Bytes of the input files.
    pub input_bytes: u64,
    /// Bytes of the stored case file.
    pub stored_bytes: u64,
    /// Bytes of the preprocessed arrays, uncompressed.
    pub raw_bytes: u64,
}

/// The result of one ingest run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IngestReport {
    /// Dataset name.
    pub dataset: String,
    /// Cases written in this run.
    pub ingested: Vec<CaseOutcome>,
    /// Cases already in the store and unchanged.
    pub skipped: Vec<String>,
    /// Cases that failed, with the reason.
    pub failed: Vec<(String, String)>,
    /// Non-fatal findings (e.g. a label without foreground).
    pub warnings: Vec<String>,
    /// Whether a new plan was made.
    pub replanned: bool,
    /// The `use_mask_for_norm` decision of the plan made in this run (`None` when no plan was
    /// made or no case has a z-scored channel).
    pub mask_for_norm: Option<MaskForNorm>,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl IngestReport {
    /// Bytes of input read for the ingested cases.
    pub fn input_bytes(&self) -> u64 {
        self.ingested.iter().map(|c| c.input_bytes).sum()
    }

    /// One-paragraph human summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: {} ingested, {} unchanged, {} failed in {:.1} s",
            self.dataset,
            self.ingested.len(),
            self.skipped.len(),
            self.failed.len(),
            self.seconds
        );
        if !self.ingested.is_empty() && self.seconds > 0.0 {
            let mb = self.input_bytes() as f64 / 1e6;
            s.push_str(&format!(
                " ({:.1} MB of input, {:.1} MB/s)",
                mb,
                mb / self.seconds
            ));
        }
        if let Some(m) = &self.mask_for_norm {
            s.push_str(&format!("\nnew plan: {}", m.describe()));
        }
        for w in &self.warnings {
            s.push_str(&format!("\nwarning: {w}"));
        }
        for (id, e) in &self.failed {
            s.push_str(&format!("\nfailed: {id}: {e}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_held_to_their_rules() {
        IngestOptions::default().check().unwrap();
        let mut opts = IngestOptions {
            jobs: 0,
            ..Default::default()
        };
        let e = opts.check().unwrap_err().to_string();
        assert!(e.contains("jobs") && e.contains("at least 1"), "{e}");
        opts.jobs = 1;
        for level in [0, 23, -5] {
            opts.settings.zstd_level = level;
            let e = opts.check().unwrap_err().to_string();
            assert!(e.contains("zstd_level") && e.contains("1..=22"), "{e}");
        }
        for level in [1, 22] {
            opts.settings.zstd_level = level;
            opts.check().unwrap();
        }
    }
}
