//! Soft Dice + cross-entropy, as nnU-Net's `DC_and_CE_loss` with `MemoryEfficientSoftDiceLoss`,
//! honouring an ignore label; deep-supervision weighting; and the hard Dice of predictions.

use tch::{Kind, Reduction, TchError, Tensor};

/// nnU-Net's smoothing term of the soft Dice.
pub const DICE_SMOOTH: f64 = 1e-5;

/// Soft Dice over the foreground classes plus cross-entropy over all classes, both computed
/// only where the target is not the ignore label.
///
/// Dice (nnU-Net's `MemoryEfficientSoftDiceLoss`, `do_bg = False`): softmax probabilities `x`
/// and one-hot targets `y` of classes `1..K`, masked; per class `(2·Σxy + s) / max(Σx + Σy + s,
/// 1e-8)`, sums over the spatial axes and, with `batch_dice`, over the batch too; the loss is
/// minus the mean over classes (and items). Cross-entropy is the mean over non-ignored voxels,
/// zero when every voxel is ignored.
#[derive(Clone, Debug, PartialEq)]
pub struct DiceCeLoss {
    /// Target value excluded from both terms (padding of crops that leave the volume).
    pub ignore_label: Option<i64>,
    /// Sum Dice statistics over the batch before the ratio (nnU-Net's `batch_dice`).
    pub batch_dice: bool,
    /// Smoothing term.
    pub smooth: f64,
    /// Weight of the cross-entropy term.
    pub weight_ce: f64,
    /// Weight of the Dice term.
    pub weight_dice: f64,
}

impl DiceCeLoss {
    /// nnU-Net's defaults with `ignore_label`, batch Dice on.
    pub fn new(ignore_label: Option<i64>) -> DiceCeLoss {
        DiceCeLoss {
            ignore_label,
            batch_dice: true,
            smooth: DICE_SMOOTH,
            weight_ce: 1.0,
            weight_dice: 1.0,
        }
    }

    /// The loss of `logits` `[B, K, Z, Y, X]` (any float kind; computed in float32) against
    /// `target` `[B, 1, Z, Y, X]` of class indices (any integer kind).
    ///
    /// # Errors
    /// libtorch's error (shape mismatch, a class index `>= K` that is not the ignore label).
    pub fn forward(&self, logits: &Tensor, target: &Tensor) -> Result<Tensor, TchError> {
        let logits = logits.f_to_kind(Kind::Float)?;
        let target = target.f_to_kind(Kind::Int64)?;
        let k = logits.size().get(1).copied().unwrap_or(0);
        let (mask, target_clean) = match self.ignore_label {
            Some(ignore) => {
                let mask = target.f_ne(ignore)?;
                let zeros = target.f_zeros_like()?;
                let clean = target.f_where_self(&mask, &zeros)?;
                (Some(mask), clean)
            }
            None => (None, target.shallow_clone()),
        };

        let mut total = Tensor::f_zeros([], (Kind::Float, logits.device()))?;
        if self.weight_dice != 0.0 && k > 1 {
            let probs = logits.f_softmax(1, Kind::Float)?;
            // A tensor source rather than a scalar: tch turns a failing op with a scalar
            // argument (an out-of-range class here) into a panic instead of an error.
            let onehot = tch::no_grad(|| -> Result<Tensor, TchError> {
                let ones = target_clean.f_ones_like()?.f_to_kind(Kind::Float)?;
                probs.f_zeros_like()?.f_scatter(1, &target_clean, &ones)
            })?;
            let mut x = probs.f_narrow(1, 1, k - 1)?;
            let mut y = onehot.f_narrow(1, 1, k - 1)?;
            if let Some(mask) = &mask {
                let m = mask.f_to_kind(Kind::Float)?;
                x = x.f_mul(&m)?;
                y = y.f_mul(&m)?;
            }
            let axes: &[i64] = if self.batch_dice {
                &[0, 2, 3, 4]
            } else {
                &[2, 3, 4]
            };
            let intersect = x.f_mul(&y)?.f_sum_dim_intlist(axes, false, Kind::Float)?;
            let sum_pred = x.f_sum_dim_intlist(axes, false, Kind::Float)?;
            let sum_gt = y.f_sum_dim_intlist(axes, false, Kind::Float)?;
            let num = intersect.f_mul_scalar(2.0)?.f_add_scalar(self.smooth)?;
            let den = sum_pred
                .f_add(&sum_gt)?
                .f_add_scalar(self.smooth)?
                .f_clamp_min(1e-8)?;
            let dc = num.f_div(&den)?.f_mean(Kind::Float)?;
            total = total.f_sub(&dc.f_mul_scalar(self.weight_dice)?)?;
        }
        if self.weight_ce != 0.0 {
            let t = target.f_squeeze_dim(1)?;
            let ignore_index = self.ignore_label.unwrap_or(-100);
            let ce_sum = logits.f_cross_entropy_loss(
                &t,
                None::<&Tensor>,
                Reduction::Sum,
                ignore_index,
                0.0,
            )?;
            let count = match &mask {
                Some(m) => m.f_sum(Kind::Float)?.f_clamp_min(1.0)?,
                None => Tensor::f_from_slice(&[t.numel() as f32])?
                    .f_to_device(logits.device())?
                    .f_reshape([])?,
            };
            total = total.f_add(&ce_sum.f_div(&count)?.f_mul_scalar(self.weight_ce)?)?;
        }
        Ok(total)
    }
}

/// nnU-Net's deep-supervision weights for `n` outputs: `1 / 2^i`, the lowest resolution set to
/// zero (when `n > 1`), normalised to sum 1.
pub fn deep_supervision_weights(n: usize) -> Vec<f64> {
    if n <= 1 {
        return vec![1.0; n];
    }
    let mut w: Vec<f64> = (0..n).map(|i| 1.0 / f64::powi(2.0, i as i32)).collect();
    if let Some(last) = w.last_mut() {
        *last = 0.0;
    }
    let s: f64 = w.iter().sum();
    w.iter().map(|v| v / s).collect()
}

/// Downsamples a label `[B, 1, Z, Y, X]` by integer factors with nearest-exact sampling (the
/// voxel at `i · f + f / 2`), as nnU-Net's deep-supervision targets.
pub fn downsample_labels(label: &Tensor, factor: [usize; 3]) -> Result<Tensor, TchError> {
    let mut out = label.shallow_clone();
    for (a, &f) in factor.iter().enumerate() {
        if f > 1 {
            let dim = 2 + a as i64;
            let size = out.size().get(dim as usize).copied().unwrap_or(0);
            let f = f as i64;
            out = out.f_slice(dim, f / 2, size, f)?;
        }
    }
    Ok(out)
}

/// The deep-supervision loss: `Σ weight_i · loss(output_i, target downsampled to output_i)`.
/// Outputs of zero weight are skipped. `scales[i]` is the downsampling of output `i`.
pub fn deep_supervision_loss(
    loss: &DiceCeLoss,
    outputs: &[Tensor],
    target: &Tensor,
    scales: &[[usize; 3]],
) -> Result<Tensor, TchError> {
    let weights = deep_supervision_weights(outputs.len());
    let mut total: Option<Tensor> = None;
    for (i, (out, w)) in outputs.iter().zip(&weights).enumerate() {
        if *w == 0.0 {
            continue;
        }
        let scale = scales.get(i).copied().unwrap_or([1, 1, 1]);
        let t = downsample_labels(target, scale)?;
        let l = loss.forward(out, &t)?.f_mul_scalar(*w)?;
        total = Some(match total {
            Some(acc) => acc.f_add(&l)?,
            None => l,
        });
    }
    total.ok_or_else(|| TchError::Shape("deep supervision got no outputs".into()))
}

/// Voxel counts of a hard segmentation against a reference, per class.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Confusion {
    /// Per class: true positives.
    pub tp: Vec<u64>,
    /// Per class: false positives.
    pub fp: Vec<u64>,
    /// Per class: false negatives.
    pub fn_: Vec<u64>,
}

impl Confusion {
    /// Empty counts for `classes` classes (background included).
    pub fn new(classes: usize) -> Confusion {
        Confusion {
            tp: vec![0; classes],
            fp: vec![0; classes],
            fn_: vec![0; classes],
        }
    }

    /// Adds `pred` against `truth` (same length), skipping voxels whose truth is `ignore`.
    /// Values `>= classes` count as a miss of the true class (and no false positive).
    pub fn add<P: Copy + Into<u16>, T: Copy + Into<u16>>(
        &mut self,
        pred: &[P],
        truth: &[T],
        ignore: Option<u16>,
    ) {
        let k = self.tp.len();
        for (&p, &t) in pred.iter().zip(truth) {
            let (p, t) = (p.into() as usize, t.into());
            if Some(t) == ignore {
                continue;
            }
            let t = t as usize;
            if p == t {
                if let Some(v) = self.tp.get_mut(t) {
                    *v += 1;
                }
            } else {
                if p < k {
                    self.fp[p] += 1;
                }
                if let Some(v) = self.fn_.get_mut(t) {
                    *v += 1;
                }
            }
        }
    }

    /// Adds another confusion (same class count).
    pub fn merge(&mut self, other: &Confusion) {
        for (a, b) in self.tp.iter_mut().zip(&other.tp) {
            *a += b;
        }
        for (a, b) in self.fp.iter_mut().zip(&other.fp) {
            *a += b;
        }
        for (a, b) in self.fn_.iter_mut().zip(&other.fn_) {
            *a += b;
        }
    }

    /// Dice of class `c`: `2·TP / (2·TP + FP + FN)`, `None` when the class is absent from both
    /// the prediction and the reference.
    pub fn dice(&self, c: usize) -> Option<f64> {
        let (tp, fp, fn_) = (
            *self.tp.get(c)? as f64,
            *self.fp.get(c)? as f64,
            *self.fn_.get(c)? as f64,
        );
        let den = 2.0 * tp + fp + fn_;
        (den > 0.0).then(|| 2.0 * tp / den)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn logits_for(target: &Tensor, k: i64, scale: f64) -> Tensor {
        // Logits that put `scale` on the target class.
        let t = target.to_kind(Kind::Int64).clamp(0, k - 1);
        let shape = target.size();
        let mut s = shape.clone();
        s[1] = k;
        Tensor::zeros(s.as_slice(), (Kind::Float, Device::Cpu)).scatter_value(1, &t, scale)
    }

    #[test]
    fn perfect_prediction_has_low_loss_and_ignore_is_honoured() {
        let target = Tensor::from_slice(&[0i64, 1, 2, 2, 1, 0, 255, 255]).reshape([1, 1, 2, 2, 2]);
        let loss = DiceCeLoss::new(Some(255));
        let good = logits_for(&target, 3, 30.0);
        let l = loss.forward(&good, &target).unwrap().double_value(&[]);
        // Dice ≈ 1 for both foreground classes, CE ≈ 0: loss ≈ -1.
        assert!((l + 1.0).abs() < 1e-4, "loss {l}");
        // Changing the logits where the target is ignored changes nothing.
        let other = good.copy();
        let _ = other.narrow(2, 1, 1).narrow(3, 1, 1).fill_(7.0);
        let l2 = loss.forward(&other, &target).unwrap().double_value(&[]);
        assert!((l - l2).abs() < 1e-7);
        // Without ignore handling the 255 targets are out of range: an error, not a panic.
        assert!(DiceCeLoss::new(None).forward(&good, &target).is_err());
    }

    #[test]
    fn all_ignored_gives_finite_loss() {
        let target = Tensor::full([1, 1, 2, 2, 2], 255i64, (Kind::Int64, Device::Cpu));
        let logits = crate::unet::randn_in_turn(&[1, 3, 2, 2, 2], (Kind::Float, Device::Cpu));
        let l = DiceCeLoss::new(Some(255))
            .forward(&logits, &target)
            .unwrap()
            .double_value(&[]);
        assert!(l.is_finite());
    }

    #[test]
    fn matches_hand_computed_values() {
        // One voxel of class 1 and one of class 0, two classes, logits zero: probabilities 0.5.
        let target = Tensor::from_slice(&[1i64, 0]).reshape([1, 1, 1, 1, 2]);
        let logits = Tensor::zeros([1, 2, 1, 1, 2], (Kind::Float, Device::Cpu));
        let loss = DiceCeLoss::new(None);
        let l = loss.forward(&logits, &target).unwrap().double_value(&[]);
        // Dice of class 1: intersect 0.5, pred 1.0, gt 1 → (1 + s) / (2 + s); CE = ln 2.
        let s = DICE_SMOOTH;
        let expected = -(1.0 + s) / (2.0 + s) + std::f64::consts::LN_2;
        assert!((l - expected).abs() < 1e-6, "{l} vs {expected}");
    }

    #[test]
    fn gradient_flows() {
        let target = Tensor::from_slice(&[1i64, 0, 2, 1]).reshape([1, 1, 1, 2, 2]);
        let logits =
            Tensor::zeros([1, 3, 1, 2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let l = DiceCeLoss::new(Some(255))
            .forward(&logits, &target)
            .unwrap();
        l.backward();
        let g = logits.grad();
        assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn ds_weights_follow_nnunet() {
        assert_eq!(deep_supervision_weights(1), vec![1.0]);
        let w = deep_supervision_weights(4);
        // 1, 0.5, 0.25, 0 → / 1.75
        assert!((w[0] - 1.0 / 1.75).abs() < 1e-12);
        assert!((w[2] - 0.25 / 1.75).abs() < 1e-12);
        assert_eq!(w[3], 0.0);
    }

    #[test]
    fn label_downsampling_is_nearest_exact() {
        let t = Tensor::arange(8, (Kind::Int64, Device::Cpu)).reshape([1, 1, 1, 1, 8]);
        let d = downsample_labels(&t, [1, 1, 2]).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(d.flatten(0, -1)).unwrap(),
            vec![1, 3, 5, 7]
        );
        let d = downsample_labels(&t, [1, 1, 4]).unwrap();
        assert_eq!(Vec::<i64>::try_from(d.flatten(0, -1)).unwrap(), vec![2, 6]);
    }

    #[test]
    fn confusion_dice() {
        let mut c = Confusion::new(3);
        c.add::<u8, u8>(&[0, 1, 1, 2, 2], &[0, 1, 2, 2, 255], Some(255));
        // class 1: tp 1, fp 1 → 2/3; class 2: tp 1, fn 1 → 2/3; class 0: tp 1 → 1.
        assert!((c.dice(1).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((c.dice(2).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(c.dice(0), Some(1.0));
        let empty = Confusion::new(2);
        assert_eq!(empty.dice(1), None);
    }
}
