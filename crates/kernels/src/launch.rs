//! Launch shapes of the CUDA kernels in `kernels/*.cu`: the grid, block and work split that
//! each Rust wrapper uses. Kept free of any CUDA dependency so that the arithmetic (every row,
//! vocabulary tile and catalogue tile covered exactly once; grid limits respected) is unit
//! tested in the default CPU build; `cuda.rs` only turns these numbers into `LaunchConfig`s.
//!
//! The tile constants here must equal the `#define`s of the `.cu` files; `cuda.rs` passes
//! them to NVRTC as `-D` options so the two cannot drift.

use anyhow::{bail, Result};

/// Rows (title-token positions) per block of the fused item-likelihood kernels.
pub const FUSED_BM: u32 = 64;
/// Vocabulary entries per tile of the fused item-likelihood kernels.
pub const FUSED_BN: u32 = 64;
/// Depth step (hidden dimension) of the tensor-core kernel: two m16n8k16 steps.
pub const FUSED_TC_BK: u32 = 32;
/// Threads of the tensor-core kernel: 4 warps in a 2 x 2 grid, each 32 rows x 32 columns.
pub const FUSED_TC_THREADS: u32 = 128;
/// Depth step of the f32 (CUDA-core) kernel.
pub const FUSED_F32_BK: u32 = 16;
/// Threads of the f32 kernel: 16 x 16, each 4 rows x 4 columns.
pub const FUSED_F32_THREADS: u32 = 256;
/// Threads per row of the logits kernel (one block per row).
pub const LOGITS_THREADS: u32 = 256;
/// Threads per block of the element-wise kernels (combine, segment sum, norms).
pub const ELEMWISE_THREADS: u32 = 256;
/// Blocks per multiprocessor that the vocabulary/catalogue split aims for: enough resident
/// blocks to hide latency, few enough that each block streams a long run of tiles.
pub const BLOCKS_PER_SM: u32 = 4;

/// Queries per block of the nearest-neighbour kernel.
pub const NEAREST_BQ: u32 = 32;
/// Catalogue rows per tile of the nearest-neighbour kernel.
pub const NEAREST_BI: u32 = 64;
/// Depth step of the nearest-neighbour kernel.
pub const NEAREST_BK: u32 = 16;
/// Threads of the nearest-neighbour kernel (8 warps; each warp keeps 4 queries' top-k).
pub const NEAREST_THREADS: u32 = 256;
/// Largest k the GPU top-k keeps (two list entries per lane of a warp).
pub const NEAREST_KMAX: usize = 64;

/// CUDA's limit on gridDim.y and gridDim.z.
pub const GRID_YZ_MAX: u32 = 65_535;

/// A kernel launch in plain numbers: `cuda.rs` copies them into `cudarc::driver::LaunchConfig`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl Shape {
    pub fn blocks(&self) -> u64 {
        self.grid.0 as u64 * self.grid.1 as u64 * self.grid.2 as u64
    }
    pub fn threads_per_block(&self) -> u32 {
        self.block.0 * self.block.1 * self.block.2
    }
}

/// How a sweep over `tiles` tiles (vocabulary or catalogue) is split into contiguous slices,
/// one slice per block column, so that `row_blocks x slices` fills the chip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileSplit {
    /// Total tiles along the swept dimension.
    pub tiles: u32,
    /// Slices (block columns); slice s covers tiles [s * per_slice, min((s+1) * per_slice, tiles)).
    pub slices: u32,
    /// Tiles per slice (the last slice may have fewer, never zero).
    pub per_slice: u32,
}

impl TileSplit {
    /// Split `tiles` so that `row_blocks * slices` is about `target_blocks`, with no empty slice.
    pub fn new(tiles: u32, row_blocks: u32, target_blocks: u32) -> Self {
        let tiles = tiles.max(1);
        let want = target_blocks.div_ceil(row_blocks.max(1)).clamp(1, tiles);
        let per_slice = tiles.div_ceil(want);
        let slices = tiles.div_ceil(per_slice);
        TileSplit {
            tiles,
            slices,
            per_slice,
        }
    }

    /// Tile range of slice `s`.
    pub fn range(&self, s: u32) -> std::ops::Range<u32> {
        let a = s * self.per_slice;
        a.min(self.tiles)..(a + self.per_slice).min(self.tiles)
    }
}

/// Which fused item-likelihood kernel runs: tensor cores for 16-bit inputs, CUDA cores for f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedVariant {
    TensorCoreBf16,
    TensorCoreF16,
    F32,
}

impl FusedVariant {
    pub fn kernel_name(&self) -> &'static str {
        match self {
            FusedVariant::TensorCoreBf16 => "item_loglik_fused_bf16",
            FusedVariant::TensorCoreF16 => "item_loglik_fused_f16",
            FusedVariant::F32 => "item_loglik_fused_f32",
        }
    }
    /// The hidden dimension must be a multiple of this (16-byte loads of 16-bit values).
    pub fn d_multiple(&self) -> usize {
        match self {
            FusedVariant::TensorCoreBf16 | FusedVariant::TensorCoreF16 => 8,
            FusedVariant::F32 => 1,
        }
    }
}

/// Launch plan of the fused item-likelihood kernel plus its combine step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusedPlan {
    pub variant: FusedVariant,
    pub rows: u32,
    pub vocab: u32,
    pub row_blocks: u32,
    pub split: TileSplit,
    /// grid = (vocabulary slices, row blocks).
    pub fused: Shape,
    /// One thread per row: merges the slices' (max, sum-exp) partials.
    pub combine: Shape,
    /// Length of each partial buffer (max and sum-exp): slices x rows, slice-major.
    pub partial_len: usize,
}

/// Plan the fused kernel for `n` rows, vocabulary `v`, hidden size `d` on a chip with `sm_count`
/// multiprocessors.
pub fn fused_plan(
    variant: FusedVariant,
    n: usize,
    v: usize,
    d: usize,
    sm_count: u32,
) -> Result<FusedPlan> {
    if n == 0 || v == 0 || d == 0 {
        bail!("fused item_loglik: empty problem (n={n}, v={v}, d={d})");
    }
    if d % variant.d_multiple() != 0 {
        bail!(
            "fused item_loglik ({variant:?}): hidden size {d} is not a multiple of {}",
            variant.d_multiple()
        );
    }
    if n > i32::MAX as usize || v > i32::MAX as usize || d > i32::MAX as usize {
        bail!("fused item_loglik: dimensions exceed i32 (n={n}, v={v}, d={d})");
    }
    let rows = n as u32;
    let vocab = v as u32;
    let row_blocks = rows.div_ceil(FUSED_BM);
    if row_blocks > GRID_YZ_MAX {
        bail!("fused item_loglik: {n} rows need {row_blocks} row blocks > {GRID_YZ_MAX}; score in batches");
    }
    let split = TileSplit::new(
        vocab.div_ceil(FUSED_BN),
        row_blocks,
        sm_count.max(1) * BLOCKS_PER_SM,
    );
    let threads = match variant {
        FusedVariant::F32 => FUSED_F32_THREADS,
        _ => FUSED_TC_THREADS,
    };
    Ok(FusedPlan {
        variant,
        rows,
        vocab,
        row_blocks,
        split,
        fused: Shape {
            grid: (split.slices, row_blocks, 1),
            block: (threads, 1, 1),
            shared_bytes: 0, // static shared memory only (under 48 KB)
        },
        combine: elementwise(n),
        partial_len: split.slices as usize * n,
    })
}

/// One thread per element, `ELEMWISE_THREADS` per block.
pub fn elementwise(count: usize) -> Shape {
    Shape {
        grid: ((count as u32).div_ceil(ELEMWISE_THREADS).max(1), 1, 1),
        block: (ELEMWISE_THREADS, 1, 1),
        shared_bytes: 0,
    }
}

/// The logits kernel: one block per row of the [n, v] logits.
pub fn logits_shape(n: usize) -> Result<Shape> {
    if n == 0 || n > i32::MAX as usize {
        bail!("logits item_loglik: bad row count {n}");
    }
    Ok(Shape {
        grid: (n as u32, 1, 1),
        block: (LOGITS_THREADS, 1, 1),
        shared_bytes: 0,
    })
}

/// Launch plan of the nearest-neighbour kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NearestPlan {
    pub queries: u32,
    pub items: u32,
    pub k: u32,
    pub query_blocks: u32,
    pub split: TileSplit,
    /// grid = (catalogue slices, query blocks).
    pub topk: Shape,
    /// Length of the per-slice candidate buffers: slices x queries x k, slice-major.
    pub candidates_len: usize,
}

pub fn nearest_plan(b: usize, n: usize, d: usize, k: usize, sm_count: u32) -> Result<NearestPlan> {
    if b == 0 || n == 0 || d == 0 || k == 0 {
        bail!("nearest: empty problem (queries={b}, items={n}, d={d}, k={k})");
    }
    if k > NEAREST_KMAX {
        bail!("nearest: k={k} > {NEAREST_KMAX}, the GPU top-k limit");
    }
    if b > i32::MAX as usize || n > i32::MAX as usize || d > i32::MAX as usize {
        bail!("nearest: dimensions exceed i32");
    }
    let query_blocks = (b as u32).div_ceil(NEAREST_BQ);
    if query_blocks > GRID_YZ_MAX {
        bail!("nearest: {b} queries need {query_blocks} blocks > {GRID_YZ_MAX}; search in batches");
    }
    let split = TileSplit::new(
        (n as u32).div_ceil(NEAREST_BI),
        query_blocks,
        sm_count.max(1) * BLOCKS_PER_SM,
    );
    Ok(NearestPlan {
        queries: b as u32,
        items: n as u32,
        k: k as u32,
        query_blocks,
        split,
        topk: Shape {
            grid: (split.slices, query_blocks, 1),
            block: (NEAREST_THREADS, 1, 1),
            shared_bytes: 0,
        },
        candidates_len: split.slices as usize * b * k,
    })
}

/// Row norms: one warp per row, 8 rows per block.
pub fn row_norms_shape(rows: usize) -> Shape {
    Shape {
        grid: ((rows as u32).div_ceil(8).max(1), 1, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tile is covered exactly once, no slice is empty, and the block count is near target.
    #[test]
    fn tile_split_covers_every_tile_once() {
        for tiles in [1u32, 2, 3, 7, 64, 768, 2004, 2374, 15625] {
            for row_blocks in [1u32, 2, 20, 80, 132, 1000] {
                for target in [1u32, 132, 528] {
                    let s = TileSplit::new(tiles, row_blocks, target);
                    let mut seen = vec![0u32; tiles as usize];
                    for sl in 0..s.slices {
                        let r = s.range(sl);
                        assert!(!r.is_empty(), "empty slice {sl} of {s:?}");
                        for t in r {
                            seen[t as usize] += 1;
                        }
                    }
                    assert!(seen.iter().all(|&c| c == 1), "{s:?}");
                    assert!(s.slices <= tiles);
                    if row_blocks < target {
                        // Enough blocks to fill the target, unless there are too few tiles.
                        assert!(
                            s.slices * row_blocks >= target.min(tiles * row_blocks) / 2,
                            "{s:?} rb={row_blocks} target={target}"
                        );
                    } else {
                        assert_eq!(s.slices, 1);
                    }
                }
            }
        }
    }

    #[test]
    fn fused_plan_shapes() {
        // Llama-3-8B: 16 windows x 10 items x 8 title tokens on an H100/H200 (132 SMs).
        let p = fused_plan(FusedVariant::TensorCoreBf16, 1280, 128_256, 4096, 132).unwrap();
        assert_eq!(p.row_blocks, 20);
        assert_eq!(p.split.tiles, 2004);
        assert_eq!(p.fused.grid.1, 20);
        assert_eq!(p.fused.block, (128, 1, 1));
        assert!(p.fused.blocks() >= 132 * BLOCKS_PER_SM as u64);
        assert_eq!(p.partial_len, p.split.slices as usize * 1280);
        assert_eq!(p.combine.grid.0, 5);
        // Rows not a multiple of the tile still get a block.
        let p = fused_plan(FusedVariant::F32, 65, 100, 7, 132).unwrap();
        assert_eq!(p.row_blocks, 2);
        assert_eq!(p.split.tiles, 2);
        assert_eq!(p.fused.block, (256, 1, 1));
        // Tensor-core kernels need d % 8 == 0; zero sizes are refused.
        assert!(fused_plan(FusedVariant::TensorCoreBf16, 10, 10, 12, 132).is_err());
        assert!(fused_plan(FusedVariant::TensorCoreF16, 0, 10, 16, 132).is_err());
        assert!(fused_plan(FusedVariant::F32, 10, 10, 16, 132).is_ok());
    }

    #[test]
    fn nearest_plan_shapes() {
        // 1,024 queries over a 1M-item catalogue.
        let p = nearest_plan(1024, 1_000_000, 4096, 10, 132).unwrap();
        assert_eq!(p.query_blocks, 32);
        assert_eq!(p.split.tiles, 15_625);
        assert!(p.topk.blocks() >= 528);
        assert_eq!(p.candidates_len, p.split.slices as usize * 1024 * 10);
        assert!(nearest_plan(1, 10, 4, 65, 132).is_err());
        assert!(nearest_plan(1, 10, 4, 64, 132).is_ok());
        let p = nearest_plan(33, 65, 3, 5, 1).unwrap();
        assert_eq!(p.query_blocks, 2);
        assert_eq!(p.split.tiles, 2);
    }

    #[test]
    fn small_shapes() {
        assert_eq!(elementwise(1).grid.0, 1);
        assert_eq!(elementwise(256).grid.0, 1);
        assert_eq!(elementwise(257).grid.0, 2);
        assert_eq!(logits_shape(5).unwrap().grid.0, 5);
        assert!(logits_shape(0).is_err());
        assert_eq!(row_norms_shape(17).grid.0, 3);
    }
}
