//! Reading one box of a stored array: every run the store visits is converted straight into
//! the caller's buffer, padding included. Plain and augmented items both read through it.

use patchflow_store::{ArrayId, BoxRun, CaseReader, StoreError};

use crate::convert::RunConvert;

/// Visits the box at `origin` of `array` and converts every run into `out` with `conv`.
///
/// The outer error is the store's; the inner one says how the runs broke the `visit_box`
/// contract (a run outside the box, a source of the wrong length, voxels not covered).
pub(crate) fn visit_into<C: RunConvert>(
    reader: &CaseReader,
    array: ArrayId,
    origin: [i64; 3],
    patch: [usize; 3],
    out: &mut [u8],
    conv: &C,
) -> Result<Result<(), String>, StoreError> {
    let (isz, osz) = (conv.in_size(), conv.out_size());
    let total = out.len();
    let mut covered = 0usize;
    let mut failure: Option<String> = None;
    let mut visit = |run: BoxRun<'_>| {
        let range = run
            .dst
            .checked_add(run.len)
            .and_then(|end| Some(run.dst.checked_mul(osz)?..end.checked_mul(osz)?));
        let Some(dst) = range.and_then(|r| out.get_mut(r)) else {
            failure.get_or_insert_with(|| {
                format!(
                    "run of {} elements at {} lies outside the box",
                    run.len, run.dst
                )
            });
            return;
        };
        covered += dst.len();
        match run.src {
            None => conv.pad(dst),
            Some(src) if src.len() == run.len * isz => conv.convert(src, dst),
            Some(src) => {
                failure.get_or_insert_with(|| {
                    format!(
                        "run of {} elements brought {} bytes, expected {}",
                        run.len,
                        src.len(),
                        run.len * isz
                    )
                });
            }
        }
    };
    reader.visit_box(array, origin, patch, &mut visit)?;
    if let Some(reason) = failure {
        return Ok(Err(reason));
    }
    if covered != total {
        return Ok(Err(format!(
            "the store covered {covered} of {total} bytes of the box"
        )));
    }
    Ok(Ok(()))
}
