//! nnU-Net's choice of poolings and convolution kernels for a patch and a voxel spacing.

use patchflow_grid::{AXIS_NAMES, Patch};
use serde::{Deserialize, Serialize};

use crate::error::CurriculumError;

/// Smallest edge a feature map may have after the last pooling (nnU-Net v2's
/// `UNet_featuremap_min_edge_length`).
pub const MIN_FEATURE_MAP_EDGE: usize = 4;

/// `max_pools` value meaning "no cap beyond the feature-map limit", as nnU-Net's planner passes
/// 999999.
pub const NO_POOL_CAP: u32 = u32::MAX;

/// The network topology nnU-Net derives from a patch and a spacing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolingPlan {
    /// Stride-2 poolings per axis `[z, y, x]`.
    pub pools: [u32; 3],
    /// Stride of each encoder stage; the first stage has stride 1 on every axis, each later one
    /// 2 on the axes pooled there and 1 elsewhere (`pool_op_kernel_sizes`).
    pub strides: Vec<[usize; 3]>,
    /// Convolution kernel of each encoder stage, bottleneck included (`conv_kernel_sizes`); the
    /// same length as `strides`.
    pub kernel_sizes: Vec<[usize; 3]>,
    /// The patch rounded up per axis to a multiple of `2^pools`.
    pub patch: [usize; 3],
}

impl PoolingPlan {
    /// The smallest patch the planned network can process, `2^pools` per axis; the PGPS start.
    pub fn min_patch(&self) -> [usize; 3] {
        self.pools.map(|p| 1usize << p)
    }
}

/// Plans poolings and kernels as nnU-Net v2's `get_pool_and_conv_props` does for 3D, with
/// `min_feature_map_size` = [`MIN_FEATURE_MAP_EDGE`].
///
/// Each round, in order:
/// 1. candidate axes are those whose current feature-map edge is at least `2 × 4 = 8`; none
///    left ends the planning;
/// 2. of those, keep the axes whose current spacing is less than twice the smallest current
///    spacing among the candidates, and that have fewer than `max_pools` poolings;
/// 3. a lone remaining axis is pooled only while its edge is at least `3 × 4 = 12`; none left
///    ends the planning;
/// 4. every axis whose current spacing is less than twice the smallest current spacing of all
///    axes switches its kernel from 1 to 3 (and keeps 3 from then on); that kernel is this
///    stage's;
/// 5. the kept axes are pooled: spacing doubles, edge becomes `ceil(edge / 2)`.
///
/// A bottleneck stage with a 3×3×3 kernel closes the list, and the patch is padded up to a
/// multiple of `2^pools` per axis (`pad_shape`).
///
/// Not reproduced: the planner's outer loop that shrinks the patch until the network fits the
/// GPU memory budget, and the per-stage feature counts; the patch given is taken as final.
///
/// # Errors
/// A zero or too large (> [`patchflow_grid::MAX_PATCH_AXIS`]) patch edge, or a spacing that is
/// not finite and positive.
pub fn plan_pooling(
    patch: impl Into<[usize; 3]>,
    spacing: [f64; 3],
    max_pools: u32,
) -> Result<PoolingPlan, CurriculumError> {
    let patch = Patch::new(patch.into())
        .map_err(|e| CurriculumError::grid("patch", e))?
        .axes();
    for axis in 0..3 {
        let s = spacing[axis];
        if !(s.is_finite() && s > 0.0) {
            return Err(CurriculumError::BadSpacing {
                axis: AXIS_NAMES[axis],
                value: s,
            });
        }
    }

    let mut current_spacing = spacing;
    let mut current_size = patch;
    let mut pools = [0u32; 3];
    let mut kernel = [1usize; 3];
    let mut strides = vec![[1usize; 3]];
    let mut kernel_sizes = Vec::new();

    loop {
        let mut valid = [false; 3];
        for axis in 0..3 {
            valid[axis] = current_size[axis] >= 2 * MIN_FEATURE_MAP_EDGE;
        }
        if !valid.iter().any(|&v| v) {
            break;
        }
        let min_valid_spacing = (0..3)
            .filter(|&a| valid[a])
            .map(|a| current_spacing[a])
            .fold(f64::INFINITY, f64::min);
        for axis in 0..3 {
            valid[axis] = valid[axis]
                && current_spacing[axis] / min_valid_spacing < 2.0
                && pools[axis] < max_pools;
        }
        let count = valid.iter().filter(|&&v| v).count();
        if count == 0 {
            break;
        }
        if count == 1 {
            let lone = (0..3).find(|&a| valid[a]).unwrap_or(0);
            if current_size[lone] < 3 * MIN_FEATURE_MAP_EDGE {
                break;
            }
        }

        let min_spacing = current_spacing
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        for axis in 0..3 {
            if kernel[axis] != 3 && current_spacing[axis] / min_spacing < 2.0 {
                kernel[axis] = 3;
            }
        }

        let mut stride = [1usize; 3];
        for axis in (0..3).filter(|&a| valid[a]) {
            stride[axis] = 2;
            pools[axis] += 1;
            current_spacing[axis] *= 2.0;
            current_size[axis] = current_size[axis].div_ceil(2);
        }
        strides.push(stride);
        kernel_sizes.push(kernel);
    }
    kernel_sizes.push([3; 3]);

    // Every edge is <= MAX_PATCH_AXIS = 4096, so it halves at most 12 times: the shifts and the padded
    // edges (< 2 × MAX_PATCH_AXIS) cannot overflow.
    let padded = std::array::from_fn(|axis| {
        let d = 1usize << pools[axis];
        patch[axis].div_ceil(d) * d
    });

    Ok(PoolingPlan {
        pools,
        strides,
        kernel_sizes,
        patch: padded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchflow_grid::{GridError, MAX_PATCH_AXIS};

    /// 128³ at 1 mm: every axis is pooled each round (equal spacing) while its edge is >= 8:
    /// 128→64→32→16→8→4, i.e. 5 poolings; edge 4 stops it. All kernels 3 (equal spacing).
    #[test]
    fn isotropic_128_gets_five_pools_per_axis() {
        let plan = plan_pooling([128, 128, 128], [1.0, 1.0, 1.0], NO_POOL_CAP).unwrap();
        assert_eq!(plan.pools, [5, 5, 5]);
        let mut strides = vec![[1, 1, 1]];
        strides.extend([[2, 2, 2]; 5]);
        assert_eq!(plan.strides, strides);
        assert_eq!(plan.kernel_sizes, vec![[3, 3, 3]; 6]);
        assert_eq!(plan.patch, [128, 128, 128]);
        assert_eq!(plan.min_patch(), [32, 32, 32]);
    }

    /// [40, 224, 192] at [3, 0.8, 0.8] mm, by hand:
    /// round 1: all edges >= 8; smallest spacing 0.8; z: 3/0.8 = 3.75 >= 2 → only y, x pool.
    ///   Kernel: z 3.75 >= 2 keeps 1, y and x become 3 → [1,3,3]. Now spacing [3, 1.6, 1.6],
    ///   edges [40, 112, 96].
    /// round 2: z: 3/1.6 = 1.875 < 2 → all pool; kernel z becomes 3 → [3,3,3].
    ///   Spacing [6, 3.2, 3.2], edges [20, 56, 48].
    /// round 3: 6/3.2 = 1.875 → all pool → edges [10, 28, 24], spacing [12, 6.4, 6.4].
    /// round 4: 10 >= 8 still → all pool → edges [5, 14, 12], spacing [24, 12.8, 12.8].
    /// round 5: z edge 5 < 8 drops out; y, x (14, 12 >= 8) pool → edges [5, 7, 6].
    /// round 6: no edge >= 8 → stop. Pools [3, 5, 5]; 40, 224, 192 are multiples of 8, 32, 32.
    #[test]
    fn anisotropic_prostate_like_plan() {
        let plan = plan_pooling([40, 224, 192], [3.0, 0.8, 0.8], NO_POOL_CAP).unwrap();
        assert_eq!(plan.pools, [3, 5, 5]);
        assert_eq!(
            plan.strides,
            vec![
                [1, 1, 1],
                [1, 2, 2],
                [2, 2, 2],
                [2, 2, 2],
                [2, 2, 2],
                [1, 2, 2]
            ]
        );
        assert_eq!(
            plan.kernel_sizes,
            vec![
                [1, 3, 3],
                [3, 3, 3],
                [3, 3, 3],
                [3, 3, 3],
                [3, 3, 3],
                [3, 3, 3]
            ]
        );
        assert_eq!(plan.patch, [40, 224, 192]);
    }

    /// 100³ at 1 mm: 100→50→25→13→7 (ceil halving), 4 poolings; 100 is padded up to the next
    /// multiple of 16, 112.
    #[test]
    fn patch_is_padded_to_a_multiple_of_the_pooling_factor() {
        let plan = plan_pooling([100, 100, 100], [1.0; 3], NO_POOL_CAP).unwrap();
        assert_eq!(plan.pools, [4, 4, 4]);
        assert_eq!(plan.patch, [112, 112, 112]);
    }

    /// [4, 4, 64]: only x has an edge >= 8, so it pools alone while its edge is >= 12:
    /// 64→32→16→8, then 8 < 12 stops it. Pools [0, 0, 3].
    #[test]
    fn a_lone_axis_needs_three_times_the_minimal_edge() {
        let plan = plan_pooling([4, 4, 64], [1.0; 3], NO_POOL_CAP).unwrap();
        assert_eq!(plan.pools, [0, 0, 3]);
        assert_eq!(plan.strides.len(), 4);
        assert_eq!(plan.patch, [4, 4, 64]);
    }

    #[test]
    fn max_pools_caps_every_axis() {
        let plan = plan_pooling([128, 128, 128], [1.0; 3], 3).unwrap();
        assert_eq!(plan.pools, [3, 3, 3]);
        assert_eq!(plan.strides.len(), 4);
        assert_eq!(plan.kernel_sizes.len(), 4);
    }

    /// Thick slices (5 mm against 0.5 mm in-plane) join the pooling only once the in-plane
    /// spacing has doubled to within a factor 2 of them, and keep kernel 1 until then.
    #[test]
    fn thick_slices_join_pooling_late() {
        // Round 1: 5/0.5 = 10 → y, x; spacing y,x 1.0, edges [20, 80, 80].
        // Round 2: 5/1 = 5 → y, x; 2.0; edges [20, 40, 40].
        // Round 3: 5/2 = 2.5 → y, x; 4.0; edges [20, 20, 20].
        // Round 4: 5/4 = 1.25 → all; z kernel becomes 3; edges [10, 10, 10].
        // Round 5: all >= 8 → all; edges [5, 5, 5]. Round 6: none >= 8.
        let plan = plan_pooling([20, 160, 160], [5.0, 0.5, 0.5], NO_POOL_CAP).unwrap();
        assert_eq!(plan.pools, [2, 5, 5]);
        assert_eq!(
            plan.kernel_sizes,
            vec![
                [1, 3, 3],
                [1, 3, 3],
                [1, 3, 3],
                [3, 3, 3],
                [3, 3, 3],
                [3, 3, 3]
            ]
        );
        assert_eq!(plan.patch, [20, 160, 160]);
    }

    #[test]
    fn bad_inputs_are_rejected_with_the_field_named() {
        let e = plan_pooling([0, 64, 64], [1.0; 3], NO_POOL_CAP).unwrap_err();
        assert_eq!(
            e,
            CurriculumError::Grid {
                field: "patch",
                source: GridError::ZeroAxis { axis: "z" }
            }
        );
        let e = plan_pooling([64, 64, 64], [1.0, 0.0, 1.0], NO_POOL_CAP).unwrap_err();
        assert!(matches!(e, CurriculumError::BadSpacing { axis: "y", .. }));
        assert!(e.to_string().contains("spacing[y]"));
        let e = plan_pooling([64, 64, 64], [1.0, 1.0, f64::NAN], NO_POOL_CAP).unwrap_err();
        assert!(matches!(e, CurriculumError::BadSpacing { axis: "x", .. }));
        let e = plan_pooling([64, 64, MAX_PATCH_AXIS + 1], [1.0; 3], NO_POOL_CAP).unwrap_err();
        assert!(matches!(
            e,
            CurriculumError::Grid {
                field: "patch",
                source: GridError::AxisTooLarge { axis: "x", .. }
            }
        ));
        assert!(e.to_string().contains("patch: patch x = 4097"), "{e}");
    }
}
