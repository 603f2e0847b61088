//! One optimisation step of the training loop, and the evaluation of a validation batch
//! (loss and nnU-Net's pseudo-Dice counts) with the same loss.

use tch::{Device, Kind, TchError, Tensor};

use super::config::Setup;
use crate::TrainerError;
use crate::data::TensorBatch;
use crate::device::with_autocast;
use crate::error::TorchContext;
use crate::eval::batch_confusion;
use crate::loss::{Confusion, DiceCeLoss, deep_supervision_loss};
use crate::optim::Sgd;
use crate::unet::Model;

/// The loss of a run and what it takes to apply it: one optimisation step on a batch
/// ([`Stepper::step`], which returns the loss value; reading it synchronises), or the
/// evaluation of a validation batch ([`Stepper::evaluate`]).
pub(super) struct Stepper {
    loss: DiceCeLoss,
    scales: Vec<[usize; 3]>,
    deep_supervision: bool,
    device: Device,
    autocast: bool,
    classes: usize,
    ignore: u16,
}

impl Stepper {
    /// The step of a run set up as `setup`: nnU-Net's Dice + CE loss (ignoring the dataset's
    /// ignore label), with deep supervision when the network has it.
    pub fn new(setup: &Setup) -> Stepper {
        Stepper {
            loss: DiceCeLoss::new(Some(i64::from(setup.info.ignore_label))),
            scales: (0..setup.unet.num_outputs())
                .map(|i| setup.unet.output_scale(i))
                .collect(),
            deep_supervision: setup.unet.deep_supervision,
            device: setup.device,
            autocast: setup.autocast,
            classes: setup.info.num_classes.max(2),
            ignore: setup.info.ignore_label,
        }
    }

    /// The batch on the device: image as float32, label as int64.
    fn to_device(&self, batch: &TensorBatch) -> Result<(Tensor, Tensor), TrainerError> {
        let image = batch
            .image
            .f_to_device_(self.device, Kind::Float, true, false)
            .ctx("image batch to the device")?;
        let label = batch
            .label
            .f_to_device_(self.device, Kind::Int64, true, false)
            .ctx("label batch to the device")?;
        Ok((image, label))
    }

    /// The loss of `outs` (every decoder output with deep supervision, else the first).
    fn loss(&self, outs: &[Tensor], label: &Tensor) -> Result<Tensor, TchError> {
        if self.deep_supervision {
            deep_supervision_loss(&self.loss, outs, label, &self.scales)
        } else {
            let first = outs
                .first()
                .ok_or_else(|| TchError::Shape("the network produced no output".into()))?;
            self.loss.forward(first, label)
        }
    }

    /// nnU-Net's `validation_step` on a validation batch, without gradients: the loss as in
    /// training, and the voxel counts of the full-resolution output's argmax per foreground
    /// class.
    pub fn evaluate(
        &self,
        model: &Model,
        batch: &TensorBatch,
    ) -> Result<(f64, Confusion), TrainerError> {
        let (image, label) = self.to_device(batch)?;
        let context = format!("validation batch {}", batch.index);
        tch::no_grad(|| {
            with_autocast(self.autocast, || -> Result<(f64, Confusion), TchError> {
                let outs = model.net.forward(&image)?;
                let loss = self.loss(&outs, &label)?.f_double_value(&[])?;
                let first = outs
                    .first()
                    .ok_or_else(|| TchError::Shape("the network produced no output".into()))?;
                Ok((
                    loss,
                    batch_confusion(first, &label, self.classes, self.ignore)?,
                ))
            })
        })
        .ctx(&context)
    }

    pub fn step(
        &self,
        model: &Model,
        opt: &mut Sgd,
        batch: &TensorBatch,
        lr: f64,
    ) -> Result<f64, TrainerError> {
        let (image, label) = self.to_device(batch)?;
        opt.zero_grad().ctx("zeroing gradients")?;
        let loss = with_autocast(self.autocast, || -> Result<Tensor, TchError> {
            let outs = model.net.forward(&image)?;
            self.loss(&outs, &label)
        })
        .ctx(&format!("forward pass of batch {}", batch.index))?;
        loss.f_backward()
            .ctx(&format!("backward pass of batch {}", batch.index))?;
        opt.clip_gradients().ctx("clipping gradients")?;
        opt.step(lr).ctx("optimiser step")?;
        loss.f_double_value(&[]).ctx("reading the loss")
    }
}
