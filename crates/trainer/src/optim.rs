//! SGD with Nesterov momentum and weight decay, gradient-norm clipping and the poly learning
//! rate, as nnU-Net trains.
//!
//! Written out instead of using libtorch's optimiser so that the momentum buffers can be saved
//! in checkpoints and restored bit for bit.

use tch::{Kind, TchError, Tensor};

/// nnU-Net's initial learning rate.
pub const INITIAL_LR: f64 = 1e-2;
/// nnU-Net's momentum.
pub const MOMENTUM: f64 = 0.99;
/// nnU-Net's weight decay.
pub const WEIGHT_DECAY: f64 = 3e-5;
/// Exponent of nnU-Net's poly learning-rate decay.
pub const POLY_EXPONENT: f64 = 0.9;
/// nnU-Net's gradient-norm clip.
pub const GRAD_CLIP: f64 = 12.0;

/// The learning rate of `epoch` (0-based) of `max_epochs`: `initial · (1 − epoch /
/// max_epochs)^exponent` (nnU-Net's `PolyLRScheduler`, stepped once per epoch).
pub fn poly_lr(initial: f64, epoch: usize, max_epochs: usize, exponent: f64) -> f64 {
    if max_epochs == 0 {
        return initial;
    }
    let frac = 1.0 - (epoch as f64 / max_epochs as f64);
    initial * frac.max(0.0).powf(exponent)
}

/// SGD hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Momentum.
    pub momentum: f64,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Largest global gradient 2-norm (`None`: no clipping).
    pub grad_clip: Option<f64>,
}

impl Default for SgdConfig {
    /// nnU-Net: momentum 0.99, Nesterov, weight decay 3e-5, clip 12.
    fn default() -> SgdConfig {
        SgdConfig {
            momentum: MOMENTUM,
            weight_decay: WEIGHT_DECAY,
            nesterov: true,
            grad_clip: Some(GRAD_CLIP),
        }
    }
}

/// SGD over a fixed, named list of parameters, as `torch.optim.SGD` (dampening 0) computes it:
/// `g ← grad + wd·p; buf ← m·buf + g; g ← g + m·buf (Nesterov) or buf; p ← p − lr·g`.
/// Buffers start at zero, which gives the same first step as PyTorch's clone of `g`.
pub struct Sgd {
    config: SgdConfig,
    params: Vec<(String, Tensor)>,
    buffers: Vec<Tensor>,
}

impl Sgd {
    /// An optimiser for `params` (name, tensor), buffers zeroed.
    pub fn new(params: Vec<(String, Tensor)>, config: SgdConfig) -> Result<Sgd, TchError> {
        let buffers = params
            .iter()
            .map(|(_, p)| p.f_zeros_like())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Sgd {
            config,
            params,
            buffers,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    /// Zeroes every gradient.
    pub fn zero_grad(&mut self) -> Result<(), TchError> {
        for (_, p) in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.f_detach_()?;
                let _ = g.f_zero_()?;
            }
        }
        Ok(())
    }

    /// Scales gradients so that their global 2-norm is at most the clip (as
    /// `torch.nn.utils.clip_grad_norm_`: `coef = min(1, clip / (norm + 1e-6))`). Returns the
    /// norm before clipping, as a device scalar (reading it synchronises).
    pub fn clip_gradients(&mut self) -> Result<Option<Tensor>, TchError> {
        let Some(clip) = self.config.grad_clip else {
            return Ok(None);
        };
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return Ok(None);
        }
        let norms = grads
            .iter()
            .map(|g| g.f_norm())
            .collect::<Result<Vec<_>, _>>()?;
        let total = Tensor::f_stack(&norms, 0)?.f_norm()?;
        let coef = total
            .f_add_scalar(1e-6)?
            .f_reciprocal()?
            .f_mul_scalar(clip)?
            .f_clamp_max(1.0)?;
        tch::no_grad(|| -> Result<(), TchError> {
            for g in &grads {
                let mut g = g.shallow_clone();
                let _ = g.f_mul_(&coef)?;
            }
            Ok(())
        })?;
        Ok(Some(total))
    }

    /// One step with learning rate `lr`.
    pub fn step(&mut self, lr: f64) -> Result<(), TchError> {
        let c = self.config;
        tch::no_grad(|| -> Result<(), TchError> {
            for ((_, p), buf) in self.params.iter().zip(self.buffers.iter_mut()) {
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let mut d = if c.weight_decay != 0.0 {
                    grad.f_add(&p.f_mul_scalar(c.weight_decay)?)?
                } else {
                    grad.f_detach()?
                };
                if c.momentum != 0.0 {
                    let _ = buf.f_mul_scalar_(c.momentum)?;
                    let _ = buf.f_add_(&d)?;
                    d = if c.nesterov {
                        d.f_add(&buf.f_mul_scalar(c.momentum)?)?
                    } else {
                        buf.shallow_clone()
                    };
                }
                let mut p = p.shallow_clone();
                let _ = p.f_sub_(&d.f_mul_scalar(lr)?)?;
            }
            Ok(())
        })
    }

    /// The momentum buffers with their parameter names (for checkpoints).
    pub fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.buffers)
            .map(|((n, _), b)| (format!("momentum.{n}"), b.shallow_clone()))
            .collect()
    }

    /// Restores momentum buffers saved by [`Sgd::named_buffers`]; every parameter must have
    /// one of the same shape.
    pub fn load_buffers(&mut self, saved: &[(String, Tensor)]) -> Result<(), String> {
        for ((name, p), buf) in self.params.iter().zip(self.buffers.iter_mut()) {
            let key = format!("momentum.{name}");
            let src = saved
                .iter()
                .find(|(n, _)| *n == key)
                .map(|(_, t)| t)
                .ok_or_else(|| format!("no momentum buffer {key}"))?;
            if src.size() != p.size() {
                return Err(format!(
                    "momentum buffer {key} has shape {:?}, the parameter {:?}",
                    src.size(),
                    p.size()
                ));
            }
            tch::no_grad(|| buf.f_copy_(&src.f_to_kind(Kind::Float)?))
                .map_err(|e| format!("momentum buffer {key}: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn poly_decay() {
        assert_eq!(poly_lr(1e-2, 0, 100, 0.9), 1e-2);
        let mid = poly_lr(1e-2, 50, 100, 0.9);
        assert!((mid - 1e-2 * 0.5f64.powf(0.9)).abs() < 1e-15);
        assert_eq!(poly_lr(1e-2, 100, 100, 0.9), 0.0);
    }

    /// Two steps by hand against the update rule of torch.optim.SGD (Nesterov, wd).
    #[test]
    fn sgd_matches_the_reference_rule() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let cfg = SgdConfig {
            grad_clip: None,
            ..SgdConfig::default()
        };
        let mut opt = Sgd::new(vec![("w".into(), p.shallow_clone())], cfg).unwrap();
        let (m, wd, lr) = (0.99f64, 3e-5f64, 0.1f64);
        let mut pv = [1.0f64, -2.0];
        let mut buf = [0.0f64; 2];
        for _ in 0..2 {
            opt.zero_grad().unwrap();
            // loss = sum(p^2) / 2 → grad = p
            let loss = (&p * &p).sum(Kind::Float) * 0.5;
            loss.backward();
            opt.step(lr).unwrap();
            for i in 0..2 {
                let g = pv[i] + wd * pv[i];
                buf[i] = m * buf[i] + g;
                pv[i] -= lr * (g + m * buf[i]);
            }
        }
        let got = Vec::<f32>::try_from(&p.detach()).unwrap();
        for i in 0..2 {
            assert!(
                (f64::from(got[i]) - pv[i]).abs() < 1e-5,
                "{got:?} vs {pv:?}"
            );
        }
        let saved = opt.named_buffers();
        assert_eq!(saved[0].0, "momentum.w");
        let mut fresh = Sgd::new(vec![("w".into(), p.shallow_clone())], cfg).unwrap();
        fresh.load_buffers(&saved).unwrap();
        assert!(fresh.named_buffers()[0].1.equal(&saved[0].1));
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let p = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        let mut opt = Sgd::new(
            vec![("w".into(), p.shallow_clone())],
            SgdConfig {
                grad_clip: Some(1.0),
                ..SgdConfig::default()
            },
        )
        .unwrap();
        // grad = p = (3, 4), norm 5
        ((&p * &p).sum(Kind::Float) * 0.5).backward();
        let norm = opt.clip_gradients().unwrap().unwrap().double_value(&[]);
        assert!((norm - 5.0).abs() < 1e-5);
        let g = p.grad().norm().double_value(&[]);
        assert!((g - 1.0).abs() < 1e-5);
        let _ = Device::Cpu;
    }
}
