//! Augmentation throughput per core: patches per second of `draw` + `apply` with nnU-Net's
//! default augmentation at 64³, 128³ and 192³ (one `f32` channel, `u8` labels), and the cost of
//! each transform alone at 128³ (probability 1).
//!
//! Every iteration draws a new item (seed = iteration counter), so the figures average over the
//! preset's random choices as training sees them. The source region is read from a buffer filled
//! once (the read itself is the sampler's cost, measured by the sampler benchmark); only the
//! draw and the transform are timed, as the benchmark thread's on-CPU time
//! (`/proc/thread-self/schedstat`, wall time where that file is missing): on a shared machine
//! wall time mostly measures the neighbours.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// Time this thread has spent on a CPU, or `None` where the kernel does not say.
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// A clock for one timed stretch: on-CPU time where available, else wall time.
struct Clock {
    cpu: Option<Duration>,
    wall: Instant,
}

impl Clock {
    fn start() -> Clock {
        Clock {
            cpu: thread_cpu(),
            wall: Instant::now(),
        }
    }

    fn elapsed(&self) -> Duration {
        match (self.cpu, thread_cpu()) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => self.wall.elapsed(),
        }
    }
}

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use patchflow_augment::{
    AugmentSpec, BlurSpec, BrightnessSpec, ContrastSpec, ElasticSpec, GammaSpec, LowResSpec,
    MirrorSpec, NoiseSpec, RotationSpec, ScalingSpec, Scratch, Source, Target, apply, draw,
    source_box,
};

/// Smooth structures plus noise, roughly like a normalised CT patch, and a few label classes.
fn source(n: usize) -> (Vec<f32>, Vec<u8>) {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut image = Vec::with_capacity(n);
    let mut label = Vec::with_capacity(n);
    for i in 0..n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let smooth = ((i % 977) as f32 * 0.013).sin() + ((i / 977 % 613) as f32 * 0.021).cos();
        image.push(smooth + (state % 1000) as f32 * 1e-3 - 0.5);
        label.push(if smooth > 1.2 {
            2
        } else {
            u8::from(smooth > 0.6)
        });
    }
    (image, label)
}

/// Buffers of one benchmark, filled once.
struct Bench {
    spec: AugmentSpec,
    patch: [usize; 3],
    image: Vec<f32>,
    label: Vec<u8>,
    out_img: Vec<f32>,
    out_lab: Vec<u8>,
    scratch: Scratch,
    seed: u64,
}

impl Bench {
    fn new(spec: AugmentSpec, patch: [usize; 3]) -> Bench {
        let max = spec.max_source_shape(patch);
        let (image, label) = source(max.iter().product());
        let n_out: usize = patch.iter().product();
        Bench {
            spec,
            patch,
            image,
            label,
            out_img: vec![0f32; n_out],
            out_lab: vec![0u8; n_out],
            scratch: Scratch::default(),
            seed: 0,
        }
    }

    /// Times `iters` items, each drawn from the next seed.
    fn run(&mut self, iters: u64) -> Duration {
        let clock = Clock::start();
        for _ in 0..iters {
            self.seed += 1;
            let params = draw(&self.spec, self.seed, self.patch, 1);
            let (_, size) = source_box(&params, self.patch);
            let n_src: usize = size.iter().product();
            apply(
                &params,
                &Source {
                    image: &self.image[..n_src],
                    label: &self.label[..n_src],
                    shape: size,
                },
                &mut Target {
                    image: &mut self.out_img,
                    label: &mut self.out_lab,
                    shape: self.patch,
                },
                255,
                &mut self.scratch,
            )
            .expect("apply");
            black_box((&self.out_img, &self.out_lab));
        }
        clock.elapsed()
    }
}

fn preset(c: &mut Criterion) {
    let spec = AugmentSpec::nnunet_default();
    let mut group = c.benchmark_group("augment/nnunet_preset");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(1));
    for edge in [64usize, 128, 192] {
        let mut bench = Bench::new(spec.clone(), [edge; 3]);
        group.bench_with_input(BenchmarkId::from_parameter(edge), &edge, |b, _| {
            b.iter_custom(|iters| bench.run(iters));
        });
    }
    group.finish();
}

fn alone(c: &mut Criterion) {
    let off = AugmentSpec::default();
    let transforms: Vec<(&str, AugmentSpec)> = vec![
        ("copy", off.clone()),
        (
            "mirror",
            AugmentSpec {
                mirror: MirrorSpec {
                    p_per_axis: 1.0,
                    axes: [true; 3],
                },
                ..off.clone()
            },
        ),
        (
            "rotation",
            AugmentSpec {
                rotation: RotationSpec {
                    p: 1.0,
                    ..RotationSpec::default()
                },
                ..off.clone()
            },
        ),
        (
            "scaling",
            AugmentSpec {
                scaling: ScalingSpec {
                    p: 1.0,
                    ..ScalingSpec::default()
                },
                ..off.clone()
            },
        ),
        (
            "rotation+scaling",
            AugmentSpec {
                rotation: RotationSpec {
                    p: 1.0,
                    ..RotationSpec::default()
                },
                scaling: ScalingSpec {
                    p: 1.0,
                    ..ScalingSpec::default()
                },
                ..off.clone()
            },
        ),
        (
            "elastic",
            AugmentSpec {
                elastic: ElasticSpec {
                    p: 1.0,
                    ..ElasticSpec::default()
                },
                ..off.clone()
            },
        ),
        (
            "noise",
            AugmentSpec {
                noise: NoiseSpec {
                    p: 1.0,
                    ..NoiseSpec::default()
                },
                ..off.clone()
            },
        ),
        (
            "blur",
            AugmentSpec {
                blur: BlurSpec {
                    p: 1.0,
                    p_per_channel: 1.0,
                    ..BlurSpec::default()
                },
                ..off.clone()
            },
        ),
        (
            "brightness",
            AugmentSpec {
                brightness: BrightnessSpec {
                    p: 1.0,
                    ..BrightnessSpec::default()
                },
                ..off.clone()
            },
        ),
        (
            "contrast",
            AugmentSpec {
                contrast: ContrastSpec {
                    p: 1.0,
                    ..ContrastSpec::default()
                },
                ..off.clone()
            },
        ),
        (
            "lowres",
            AugmentSpec {
                lowres: LowResSpec {
                    p: 1.0,
                    p_per_channel: 1.0,
                    ..LowResSpec::default()
                },
                ..off.clone()
            },
        ),
        (
            "inverted_gamma",
            AugmentSpec {
                inverted_gamma: GammaSpec {
                    p: 1.0,
                    ..GammaSpec::default()
                },
                ..off.clone()
            },
        ),
        (
            "gamma",
            AugmentSpec {
                gamma: GammaSpec {
                    p: 1.0,
                    ..GammaSpec::default()
                },
                ..off.clone()
            },
        ),
    ];
    let mut group = c.benchmark_group("augment/alone_128");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Elements(1));
    for (name, spec) in transforms {
        let mut bench = Bench::new(spec, [128; 3]);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| bench.run(iters));
        });
    }
    group.finish();
}

criterion_group!(benches, preset, alone);
criterion_main!(benches);
