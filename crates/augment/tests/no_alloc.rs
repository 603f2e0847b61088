//! A warm `Scratch` makes `apply` allocation-free: counted with a wrapping global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use patchflow_augment::{
    AugmentParams, ContrastParams, ElasticParams, GammaParams, NoiseParams, Scratch, Source,
    Target, apply, source_box,
};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter has no effect
// on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc` is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn every_transform(elastic: bool) -> AugmentParams {
    AugmentParams {
        rotation: Some([0.3, -0.2, 0.4]),
        scale: Some([1.2; 3]),
        elastic: elastic.then_some(ElasticParams {
            seed: 5,
            spacing: [4.0, 5.0, 6.0],
            magnitude: [1.0, 2.0, 1.5],
        }),
        mirror: [true, false, true],
        noise: Some(NoiseParams {
            seed: 1,
            same_field: true,
            std: vec![Some(0.05), Some(0.05)],
        }),
        blur: Some(vec![Some([0.5, 0.8, 1.0]), Some([1.0; 3])]),
        brightness: Some(vec![Some(1.1), Some(0.9)]),
        contrast: Some(ContrastParams {
            preserve_range: true,
            factor: vec![Some(1.2), None],
        }),
        lowres: Some(vec![Some([0.6; 3]), Some([0.7; 3])]),
        inverted_gamma: Some(GammaParams {
            retain_stats: true,
            gamma: vec![Some(0.8), Some(1.2)],
        }),
        gamma: Some(GammaParams {
            retain_stats: true,
            gamma: vec![Some(1.3), Some(0.9)],
        }),
    }
}

#[test]
fn warm_scratch_does_not_allocate() {
    let patch = [20, 24, 28];
    let n_out: usize = patch.iter().product();
    let mut scratch = Scratch::default();
    for params in [every_transform(false), every_transform(true)] {
        let (_, size) = source_box(&params, patch);
        let n_src: usize = size.iter().product();
        let image: Vec<f32> = (0..2 * n_src).map(|i| (i % 97) as f32 * 0.1).collect();
        let label: Vec<u8> = (0..n_src).map(|i| (i % 3) as u8).collect();
        let mut out_img = vec![0f32; 2 * n_out];
        let mut out_lab = vec![0u8; n_out];
        let mut call = |scratch: &mut Scratch| {
            apply(
                &params,
                &Source {
                    image: &image,
                    label: &label,
                    shape: size,
                },
                &mut Target {
                    image: &mut out_img,
                    label: &mut out_lab,
                    shape: patch,
                },
                255,
                scratch,
            )
            .expect("apply");
        };
        let cold = ALLOCATIONS.load(Ordering::Relaxed);
        call(&mut scratch);
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        if params.elastic.is_none() {
            assert!(
                before > cold,
                "the first call grows the scratch (the counter works)"
            );
        }
        for _ in 0..3 {
            call(&mut scratch);
        }
        let after = ALLOCATIONS.load(Ordering::Relaxed);
        assert_eq!(after - before, 0, "allocations after warm-up");
    }
}
