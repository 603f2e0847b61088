//! A 3D U-Net in the style of nnU-Net's `PlainConvUNet`.
//!
//! Per encoder stage two blocks of convolution → instance norm (affine, eps 1e-5) → leaky ReLU
//! (slope 0.01); the first convolution of a stage carries the stage's stride (strided-conv
//! downsampling, no pooling layers). The decoder upsamples with a transposed convolution whose
//! kernel equals the stride, concatenates the skip connection and applies two blocks again; a
//! 1×1×1 convolution maps features to class logits. With deep supervision every decoder stage
//! has such a head and [`UNet::forward`] returns one output per decoder stage, highest
//! resolution first. Weights are initialised as nnU-Net's `InitWeights_He(1e-2)`: normal with
//! standard deviation `sqrt(2 / (1 + 0.01²)) / sqrt(fan_in)`, biases zero.

use patchflow_curriculum::PoolingPlan;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Init, Path};
use tch::{TchError, Tensor};

use crate::TrainerError;

/// Default number of features of the first stage (nnU-Net: 32).
pub const DEFAULT_BASE_FEATURES: i64 = 32;
/// Default cap on the features of a stage (nnU-Net 3D: 320).
pub const DEFAULT_MAX_FEATURES: i64 = 320;
/// Convolution blocks per stage, encoder and decoder (nnU-Net: 2).
pub const CONVS_PER_STAGE: usize = 2;
/// Slope of the leaky ReLU (nnU-Net: 0.01).
pub const LEAKY_SLOPE: f64 = 0.01;
/// Epsilon of the instance norm (nnU-Net: 1e-5).
pub const NORM_EPS: f64 = 1e-5;

/// The topology of a [`UNet`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Image channels.
    pub in_channels: i64,
    /// Output classes, background included.
    pub num_classes: i64,
    /// Features of each stage, encoder order (bottleneck last).
    pub features: Vec<i64>,
    /// Stride of each stage `[z, y, x]`; the first is `[1, 1, 1]`.
    pub strides: Vec<[i64; 3]>,
    /// Convolution kernel of each stage `[z, y, x]` (odd edges).
    pub kernel_sizes: Vec<[i64; 3]>,
    /// Whether every decoder stage has a segmentation head.
    pub deep_supervision: bool,
}

/// `min(base · 2^s, max)` for `s` in `0..stages`.
pub fn stage_features(stages: usize, base: i64, max: i64) -> Vec<i64> {
    (0..stages)
        .map(|s| {
            let f = base.saturating_mul(1i64 << s.min(62));
            f.min(max)
        })
        .collect()
}

impl UNetConfig {
    /// The network nnU-Net's planner builds for `plan` (from
    /// [`patchflow_curriculum::plan_pooling`]): its strides and kernels, features
    /// `min(base · 2^s, max)`.
    pub fn from_plan(
        plan: &PoolingPlan,
        in_channels: i64,
        num_classes: i64,
        base: i64,
        max: i64,
        deep_supervision: bool,
    ) -> UNetConfig {
        let to_i64 = |a: &[usize; 3]| a.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        let strides: Vec<[i64; 3]> = plan.strides.iter().map(to_i64).collect();
        UNetConfig {
            in_channels,
            num_classes,
            features: stage_features(strides.len(), base, max),
            kernel_sizes: plan.kernel_sizes.iter().map(to_i64).collect(),
            strides,
            deep_supervision,
        }
    }

    /// A network for explicitly given pooling counts: `max(pools) + 1` stages, axis `a` pooled
    /// (stride 2) in stages `1..=pools[a]`, every kernel 3×3×3.
    pub fn from_pools(
        pools: [u32; 3],
        in_channels: i64,
        num_classes: i64,
        base: i64,
        max: i64,
        deep_supervision: bool,
    ) -> UNetConfig {
        let stages = pools.iter().copied().max().unwrap_or(0) as usize + 1;
        let strides: Vec<[i64; 3]> = (0..stages)
            .map(|s| pools.map(|p| if s >= 1 && s <= p as usize { 2 } else { 1 }))
            .collect();
        UNetConfig {
            in_channels,
            num_classes,
            features: stage_features(stages, base, max),
            kernel_sizes: vec![[3; 3]; stages],
            strides,
            deep_supervision,
        }
    }

    /// Stride-2 poolings per axis.
    pub fn pools(&self) -> [u32; 3] {
        let mut p = [0u32; 3];
        for s in &self.strides {
            for a in 0..3 {
                if s[a] == 2 {
                    p[a] += 1;
                }
            }
        }
        p
    }

    /// Total downsampling factor per axis: a patch edge must be a multiple of it.
    pub fn divisor(&self) -> [usize; 3] {
        self.pools().map(|p| 1usize << p)
    }

    /// Number of outputs of [`UNet::forward`]: one per decoder stage with deep supervision,
    /// else one.
    pub fn num_outputs(&self) -> usize {
        if self.deep_supervision {
            self.strides.len().saturating_sub(1).max(1)
        } else {
            1
        }
    }

    /// Downsampling factor of output `i` (0 = full resolution) relative to the input, per axis.
    pub fn output_scale(&self, i: usize) -> [usize; 3] {
        let mut f = [1usize; 3];
        for s in self.strides.iter().skip(1).take(i) {
            for a in 0..3 {
                f[a] *= usize::try_from(s[a]).unwrap_or(1);
            }
        }
        f
    }

    /// Checks the topology: matching lengths, at least one stage, first stride 1, strides 1 or
    /// 2, odd kernels, positive features and channels.
    pub fn validate(&self) -> Result<(), TrainerError> {
        let n = self.features.len();
        if n == 0 {
            return Err(TrainerError::config("unet", "no stages"));
        }
        if self.strides.len() != n || self.kernel_sizes.len() != n {
            return Err(TrainerError::config(
                "unet",
                format!(
                    "{} feature counts, {} strides, {} kernel sizes: they must be equal",
                    n,
                    self.strides.len(),
                    self.kernel_sizes.len()
                ),
            ));
        }
        if self.strides[0] != [1, 1, 1] {
            return Err(TrainerError::config(
                "unet",
                format!("the first stage has stride {:?}, not 1", self.strides[0]),
            ));
        }
        for (s, st) in self.strides.iter().enumerate() {
            if st.iter().any(|&v| v != 1 && v != 2) {
                return Err(TrainerError::config(
                    "unet",
                    format!("stage {s} has stride {st:?}; only 1 and 2 are supported"),
                ));
            }
        }
        for (s, k) in self.kernel_sizes.iter().enumerate() {
            if k.iter().any(|&v| v < 1 || v % 2 == 0) {
                return Err(TrainerError::config(
                    "unet",
                    format!("stage {s} has kernel {k:?}; edges must be odd and positive"),
                ));
            }
        }
        if self.features.iter().any(|&f| f < 1) || self.in_channels < 1 || self.num_classes < 2 {
            return Err(TrainerError::config(
                "unet",
                format!(
                    "features {:?}, {} input channel(s), {} classes: need positive features, \
                     at least one channel and two classes",
                    self.features, self.in_channels, self.num_classes
                ),
            ));
        }
        Ok(())
    }
}

/// nnU-Net's `InitWeights_He(1e-2)` standard deviation for a fan-in.
fn he_std(fan_in: i64) -> f64 {
    let a = LEAKY_SLOPE;
    (2.0 / (1.0 + a * a)).sqrt() / (fan_in.max(1) as f64).sqrt()
}

/// Convolution → instance norm → leaky ReLU.
#[derive(Debug)]
struct ConvBlock {
    weight: Tensor,
    bias: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    stride: [i64; 3],
    padding: [i64; 3],
}

impl ConvBlock {
    fn new(p: Path<'_>, cin: i64, cout: i64, kernel: [i64; 3], stride: [i64; 3]) -> ConvBlock {
        let fan_in = cin * kernel.iter().product::<i64>();
        let conv = p.sub("conv");
        let weight = conv.var(
            "weight",
            &[cout, cin, kernel[0], kernel[1], kernel[2]],
            Init::Randn {
                mean: 0.0,
                stdev: he_std(fan_in),
            },
        );
        let bias = conv.var("bias", &[cout], Init::Const(0.0));
        let norm = p.sub("norm");
        let norm_weight = norm.var("weight", &[cout], Init::Const(1.0));
        let norm_bias = norm.var("bias", &[cout], Init::Const(0.0));
        ConvBlock {
            weight,
            bias,
            norm_weight,
            norm_bias,
            stride,
            padding: kernel.map(|k| (k - 1) / 2),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let y = x.f_conv3d(
            &self.weight,
            Some(&self.bias),
            self.stride,
            self.padding,
            [1, 1, 1],
            1,
        )?;
        let mut y = y.f_instance_norm(
            Some(&self.norm_weight),
            Some(&self.norm_bias),
            None::<&Tensor>,
            None::<&Tensor>,
            true,
            0.1,
            NORM_EPS,
            true,
        )?;
        y.f_leaky_relu_()
    }
}

/// Transposed convolution with kernel = stride (upsampling).
#[derive(Debug)]
struct UpConv {
    weight: Tensor,
    bias: Tensor,
    stride: [i64; 3],
}

impl UpConv {
    fn new(p: Path<'_>, cin: i64, cout: i64, stride: [i64; 3]) -> UpConv {
        // PyTorch computes the fan-in of a transposed convolution's weight [cin, cout, k...]
        // from its second dimension, and nnU-Net's initialiser inherits that.
        let fan_in = cout * stride.iter().product::<i64>();
        let weight = p.var(
            "weight",
            &[cin, cout, stride[0], stride[1], stride[2]],
            Init::Randn {
                mean: 0.0,
                stdev: he_std(fan_in),
            },
        );
        let bias = p.var("bias", &[cout], Init::Const(0.0));
        UpConv {
            weight,
            bias,
            stride,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_conv_transpose3d(
            &self.weight,
            Some(&self.bias),
            self.stride,
            [0, 0, 0],
            [0, 0, 0],
            1,
            [1, 1, 1],
        )
    }
}

/// 1×1×1 convolution to class logits.
#[derive(Debug)]
struct Head {
    weight: Tensor,
    bias: Tensor,
}

impl Head {
    fn new(p: Path<'_>, cin: i64, classes: i64) -> Head {
        let weight = p.var(
            "weight",
            &[classes, cin, 1, 1, 1],
            Init::Randn {
                mean: 0.0,
                stdev: he_std(cin),
            },
        );
        let bias = p.var("bias", &[classes], Init::Const(0.0));
        Head { weight, bias }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_conv3d(
            &self.weight,
            Some(&self.bias),
            [1, 1, 1],
            [0, 0, 0],
            [1, 1, 1],
            1,
        )
    }
}

/// The network; its variables live in the [`nn::VarStore`] it was built in.
#[derive(Debug)]
pub struct UNet {
    config: UNetConfig,
    encoder: Vec<Vec<ConvBlock>>,
    upsample: Vec<UpConv>,
    decoder: Vec<Vec<ConvBlock>>,
    heads: Vec<Head>,
}

impl UNet {
    /// Builds the network's variables under `root` (initialised from libtorch's current random
    /// state: seed it with `tch::manual_seed` for reproducible weights).
    ///
    /// # Errors
    /// [`TrainerError::Config`] when the topology is invalid ([`UNetConfig::validate`]).
    pub fn new(root: &Path<'_>, config: &UNetConfig) -> Result<UNet, TrainerError> {
        config.validate()?;
        let n = config.features.len();
        let mut encoder = Vec::with_capacity(n);
        let mut cin = config.in_channels;
        for s in 0..n {
            let stage = root.sub("encoder").sub(s);
            let cout = config.features[s];
            let mut blocks = Vec::with_capacity(CONVS_PER_STAGE);
            for b in 0..CONVS_PER_STAGE {
                let stride = if b == 0 { config.strides[s] } else { [1, 1, 1] };
                blocks.push(ConvBlock::new(
                    stage.sub(b),
                    if b == 0 { cin } else { cout },
                    cout,
                    config.kernel_sizes[s],
                    stride,
                ));
            }
            encoder.push(blocks);
            cin = cout;
        }
        let mut upsample = Vec::with_capacity(n - 1);
        let mut decoder = Vec::with_capacity(n - 1);
        let mut heads = Vec::new();
        // Decoder stage d goes from encoder stage n-1-d up to encoder stage n-2-d.
        for d in 0..n - 1 {
            let below = n - 1 - d;
            let skip = below - 1;
            let cbelow = config.features[below];
            let cskip = config.features[skip];
            upsample.push(UpConv::new(
                root.sub("upsample").sub(d),
                cbelow,
                cskip,
                config.strides[below],
            ));
            let stage = root.sub("decoder").sub(d);
            let mut blocks = Vec::with_capacity(CONVS_PER_STAGE);
            for b in 0..CONVS_PER_STAGE {
                blocks.push(ConvBlock::new(
                    stage.sub(b),
                    if b == 0 { 2 * cskip } else { cskip },
                    cskip,
                    config.kernel_sizes[skip],
                    [1, 1, 1],
                ));
            }
            decoder.push(blocks);
            if config.deep_supervision || d == n - 2 {
                heads.push(Head::new(
                    root.sub("head").sub(d),
                    cskip,
                    config.num_classes,
                ));
            }
        }
        if n == 1 {
            heads.push(Head::new(
                root.sub("head").sub(0),
                config.features[0],
                config.num_classes,
            ));
        }
        Ok(UNet {
            config: config.clone(),
            encoder,
            upsample,
            decoder,
            heads,
        })
    }

    /// The topology.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Logits for `x` `[B, C, Z, Y, X]` (each spatial edge a multiple of
    /// [`UNetConfig::divisor`]): with deep supervision one tensor per decoder stage, highest
    /// resolution first; otherwise one full-resolution tensor `[B, classes, Z, Y, X]`.
    ///
    /// # Errors
    /// libtorch's error (shape mismatch, out of memory, ...).
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>, TchError> {
        let mut skips: Vec<Tensor> = Vec::with_capacity(self.encoder.len());
        let mut h = x.shallow_clone();
        for stage in &self.encoder {
            for block in stage {
                h = block.forward(&h)?;
            }
            skips.push(h.shallow_clone());
        }
        let n = self.encoder.len();
        if n == 1 {
            return Ok(vec![self.heads[0].forward(&h)?]);
        }
        let mut outputs = Vec::with_capacity(self.heads.len());
        for d in 0..n - 1 {
            let up = self.upsample[d].forward(&h)?;
            let skip = &skips[n - 2 - d];
            h = Tensor::f_cat(&[&up, skip], 1)?;
            for block in &self.decoder[d] {
                h = block.forward(&h)?;
            }
            if self.config.deep_supervision {
                outputs.push(self.heads[d].forward(&h)?);
            } else if d == n - 2 {
                outputs.push(self.heads[0].forward(&h)?);
            }
        }
        outputs.reverse();
        Ok(outputs)
    }

    /// The full-resolution logits only (inference): the first output of [`UNet::forward`].
    ///
    /// # Errors
    /// libtorch's error.
    pub fn forward_full(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let mut outs = self.forward(x)?;
        if outs.is_empty() {
            return Err(TchError::Shape("the network produced no output".into()));
        }
        Ok(outs.swap_remove(0))
    }
}

/// A turn with libtorch's random state, which is global to the process: whatever in this crate
/// seeds it or draws from it holds the turn meanwhile, so that a model built on one thread gets
/// its seed's weights whatever other threads draw.
pub(crate) fn torch_rng_turn() -> std::sync::MutexGuard<'static, ()> {
    static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TORCH_RNG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `Tensor::randn` drawn in a turn with libtorch's random state (see [`torch_rng_turn`]).
#[cfg(test)]
pub(crate) fn randn_in_turn(shape: &[i64], options: (tch::Kind, tch::Device)) -> Tensor {
    let _turn = torch_rng_turn();
    Tensor::randn(shape, options)
}

/// A [`UNet`] with the [`nn::VarStore`] that owns its variables.
pub struct Model {
    /// The variables.
    pub vs: nn::VarStore,
    /// The network.
    pub net: UNet,
}

impl Model {
    /// Builds a model on `device`, its weights drawn from libtorch's random state seeded with
    /// `seed`.
    ///
    /// libtorch's random state is global to the process, so models built at the same time on
    /// several threads take turns: each seeds and draws all its weights before the next starts,
    /// and gets the weights its seed gives alone.
    pub fn new(config: &UNetConfig, device: tch::Device, seed: u64) -> Result<Model, TrainerError> {
        let _turn = torch_rng_turn();
        tch::manual_seed(i64::from_ne_bytes(seed.to_ne_bytes()));
        let vs = nn::VarStore::new(device);
        let net = UNet::new(&vs.root(), config)?;
        Ok(Model { vs, net })
    }

    /// Variables sorted by name (a stable order for the optimiser and checkpoints).
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Number of scalar parameters.
    pub fn num_parameters(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(Tensor::numel)
            .map(|n| n as i64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchflow_curriculum::{NO_POOL_CAP, plan_pooling};
    use tch::{Device, Kind};

    fn tiny(ds: bool) -> UNetConfig {
        let plan = plan_pooling([16, 32, 32], [2.0, 1.0, 1.0], NO_POOL_CAP).unwrap();
        UNetConfig::from_plan(&plan, 1, 3, 4, 16, ds)
    }

    #[test]
    fn models_built_on_several_threads_get_their_seeds_weights() {
        let alone = |seed| {
            Model::new(&tiny(false), tch::Device::Cpu, seed)
                .unwrap()
                .named_parameters()
        };
        let (a, b) = (alone(7), alone(8));
        let together: Vec<_> = (0..8u64)
            .map(|i| std::thread::spawn(move || (i, alone(7 + i % 2))))
            .collect();
        for t in together {
            let (i, w) = t.join().unwrap();
            let expected = if i % 2 == 0 { &a } else { &b };
            for ((n, x), (_, y)) in w.iter().zip(expected) {
                assert!(x.equal(y), "thread {i}: {n} differs");
            }
        }
    }

    #[test]
    fn plan_gives_nnunet_topology() {
        let plan = plan_pooling([128, 128, 128], [1.0; 3], NO_POOL_CAP).unwrap();
        let c = UNetConfig::from_plan(&plan, 1, 2, 32, 320, true);
        assert_eq!(c.features, vec![32, 64, 128, 256, 320, 320]);
        assert_eq!(c.pools(), [5, 5, 5]);
        assert_eq!(c.divisor(), [32, 32, 32]);
        assert_eq!(c.num_outputs(), 5);
        assert_eq!(c.output_scale(0), [1, 1, 1]);
        assert_eq!(c.output_scale(2), [4, 4, 4]);
    }

    #[test]
    fn explicit_pools_topology() {
        let c = UNetConfig::from_pools([2, 3, 3], 1, 2, 8, 32, false);
        assert_eq!(c.strides.len(), 4);
        assert_eq!(c.strides[3], [1, 2, 2]);
        assert_eq!(c.pools(), [2, 3, 3]);
        assert_eq!(c.features, vec![8, 16, 32, 32]);
    }

    #[test]
    fn output_shapes_with_and_without_deep_supervision() {
        tch::set_num_threads(1);
        for ds in [false, true] {
            let cfg = tiny(ds);
            let model = Model::new(&cfg, Device::Cpu, 1).unwrap();
            let x = crate::unet::randn_in_turn(&[2, 1, 16, 32, 32], (Kind::Float, Device::Cpu));
            let outs = model.net.forward(&x).unwrap();
            assert_eq!(outs.len(), cfg.num_outputs());
            for (i, o) in outs.iter().enumerate() {
                let f = cfg.output_scale(i);
                assert_eq!(
                    o.size(),
                    vec![2, 3, 16 / f[0] as i64, 32 / f[1] as i64, 32 / f[2] as i64]
                );
            }
        }
    }

    #[test]
    fn same_seed_same_weights() {
        let cfg = tiny(false);
        let a = Model::new(&cfg, Device::Cpu, 5).unwrap();
        let b = Model::new(&cfg, Device::Cpu, 5).unwrap();
        let c = Model::new(&cfg, Device::Cpu, 6).unwrap();
        let pa = a.named_parameters();
        let pb = b.named_parameters();
        let pc = c.named_parameters();
        assert_eq!(pa.len(), pb.len());
        let mut differs = false;
        for ((na, ta), ((nb, tb), (_, tc))) in pa.iter().zip(pb.iter().zip(&pc)) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb));
            differs |= !ta.equal(tc);
        }
        assert!(differs);
    }

    #[test]
    fn bad_topology_is_refused() {
        let mut c = tiny(false);
        c.strides[0] = [2, 1, 1];
        assert!(c.validate().is_err());
        let mut c = tiny(false);
        c.kernel_sizes[1] = [2, 3, 3];
        assert!(c.validate().unwrap_err().to_string().contains("odd"));
        let mut c = tiny(false);
        c.num_classes = 1;
        assert!(c.validate().is_err());
    }
}
