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

/// Version 2a of the tensor-core fused kernel (`kernels/item_loglik_fused_v2.cu`): rows per block.
pub const FUSED2_BM: u32 = 128;
/// v2a: vocabulary entries per tile.
pub const FUSED2_BN: u32 = 128;
/// v2a: depth per pipeline stage (one 128-byte shared row of 16-bit values: the XOR swizzle
/// works on its 8 chunks of 16 B).
pub const FUSED2_BK: u32 = 64;
/// v2a: cp.async stages in the ring (2 in flight while the third is computed on).
pub const FUSED2_STAGES: u32 = 3;
/// v2a: threads per block, 8 warps as 4 (rows) x 2 (columns), each 32 x 64.
pub const FUSED2_THREADS: u32 = 256;
/// v2a dynamic shared memory per block: the stage ring ((BM + BN) x BK x 2 B per stage) and
/// the per-row (max, sum-exp) of the two column warps (2 x 2 x BM x 4 B). Must equal
/// `FUSED2_SMEM` in the `.cu`.
pub const FUSED2_SMEM: u32 =
    FUSED2_STAGES * (FUSED2_BM + FUSED2_BN) * FUSED2_BK * 2 + 2 * 2 * FUSED2_BM * 4;
/// v2a: a block's fixed cost in k-steps for the split ([`TileSplit::balanced`]): the ring's
/// prologue (two stages' load latency before the first mma) and the final merges and writes.
/// An estimate from the kernel's structure, not yet fitted on a GPU.
pub const FUSED2_BLOCK_OVERHEAD_STEPS: u32 = 4;
// v2a's shared memory within sm_90's 227 KB opt-in limit, and two blocks per SM (each with 1 KB
// reserved by the system) within its 228 KB: the .cu's __launch_bounds__(256, 2) caps registers
// at 128 for that residency.
const _: () = assert!(FUSED2_SMEM <= SMEM_OPTIN_MAX_SM90);
const _: () = assert!(2 * (FUSED2_SMEM + 1024) <= SMEM_PER_SM_SM90);
/// Version 3 of the tensor-core fused kernel (`kernels/item_loglik_fused_v3.cu`, wgmma on
/// sm_90a): rows per block (2 warpgroups x 64).
pub const FUSED3_BM: u32 = 128;
/// v3: vocabulary entries per tile (one m64n256k16 wgmma per warpgroup per 16 deep).
pub const FUSED3_BN: u32 = 256;
/// v3: depth per pipeline stage (128-byte rows: wgmma's 128-byte swizzle).
pub const FUSED3_BK: u32 = 64;
/// v3: stages in the ring (copies run STAGES - 2 steps ahead).
pub const FUSED3_STAGES: u32 = 4;
/// v3: threads per block (2 warpgroups).
pub const FUSED3_THREADS: u32 = 256;
/// v3 dynamic shared memory: the ring plus 1 KB to align it to 1024 B. Must equal
/// `FUSED3_SMEM` in the `.cu`.
pub const FUSED3_SMEM: u32 = FUSED3_STAGES * (FUSED3_BM + FUSED3_BN) * FUSED3_BK * 2 + 1024;
/// v3: a block's fixed cost in k-steps for the split (two stages of prologue, the merges).
pub const FUSED3_BLOCK_OVERHEAD_STEPS: u32 = 3;
const _: () = assert!(FUSED3_SMEM <= SMEM_OPTIN_MAX_SM90);
/// v4 (v3's tile with the two warpgroups staggered, `wg_main_loop_staggered`): dynamic shared
/// memory = a ring of 5 B slots (256 x 128 B), two rings of 4 A slots (64 x 128 B), 128 B of
/// mbarriers and 1 KB of alignment slack. Must equal `WG4_SMEM` in `wgmma_common.cuh`.
pub const FUSED4_SMEM: u32 =
    5 * FUSED3_BN * FUSED3_BK * 2 + 2 * 4 * 64 * FUSED3_BK * 2 + 128 + 1024;
const _: () = assert!(FUSED4_SMEM <= SMEM_OPTIN_MAX_SM90);
/// v5 (v3's tile, warp-specialised: a TMA producer warpgroup and two consumer warpgroups,
/// `wg5_produce` / `wg5_consume`): threads per block. Must equal `WG5_THREADS`.
pub const FUSED5_THREADS: u32 = 384;
/// v5 dynamic shared memory: a ring of 4 stages (A 128 x 128 B, B 256 x 128 B), 128 B of
/// mbarriers and 1 KB of alignment slack. Must equal `WG5_SMEM` in `wgmma_common.cuh`.
pub const FUSED5_SMEM: u32 = 4 * (FUSED3_BM + FUSED3_BN) * FUSED3_BK * 2 + 128 + 1024;
const _: () = assert!(FUSED5_SMEM <= SMEM_OPTIN_MAX_SM90);
/// v5: rows of the A (hidden) and B (head) boxes its tensor maps describe (64 deep each).
pub const FUSED5_BOX_ROWS: (u32, u32) = (FUSED3_BM, FUSED3_BN);
/// v6 (v5 on clusters of two blocks along the grid's x, the B tile multicast): blocks per
/// cluster. Must equal `WG6_CLUSTER` in `wgmma_common.cuh` (the kernels' `__cluster_dims__`).
pub const FUSED6_CLUSTER: u32 = 2;
/// v6: rows of the A and B boxes (each block of a pair copies half of the 256-row B tile).
pub const FUSED6_BOX_ROWS: (u32, u32) = (FUSED3_BM, FUSED3_BN / FUSED6_CLUSTER);
/// Shared memory a block may use without opting in (static or dynamic).
pub const SMEM_DEFAULT_MAX: u32 = 48 * 1024;
/// Largest dynamic shared memory per block after the opt-in on sm_90 (H100/H200: 227 KB).
pub const SMEM_OPTIN_MAX_SM90: u32 = 227 * 1024;
/// Shared memory per multiprocessor on sm_90 (228 KB, 1 KB of it reserved per resident block).
pub const SMEM_PER_SM_SM90: u32 = 228 * 1024;

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

/// Tensor-core grounding (`kernels/nearest_tc.cu`): queries per block (the A rows of v2a's tile).
pub const NTC_BM: u32 = 128;
/// Tensor-core grounding: catalogue rows per tile.
pub const NTC_BN: u32 = 128;
/// Tensor-core grounding: depth per pipeline stage (v2a's 128-byte swizzled rows).
pub const NTC_BK: u32 = 64;
/// Tensor-core grounding: cp.async stages in the ring.
pub const NTC_STAGES: u32 = 3;
/// Tensor-core grounding: threads of the candidate kernel (8 warps as 4 x 2, each 32 x 64).
pub const NTC_THREADS: u32 = 256;
/// Tensor-core grounding: candidate list length per query per block (one entry per lane).
pub const NTC_LIST: u32 = crate::nearest_tc::TC_LIST as u32;
/// Tensor-core grounding: warps (queries) per block of the re-rank kernel.
pub const NTC_RERANK_WARPS: u32 = 8;
/// Tensor-core grounding, the re-rank's dot products: cp.async stages of each lane's
/// catalogue row in flight ahead of the FMAs (`NT_DOT_STAGES`; 0 would be the plain loop).
pub const NTC_DOT_STAGES: u32 = 3;
/// Tensor-core grounding, the re-rank's dot products: float4 of a row per lane and stage.
pub const NTC_DOT_BATCH: u32 = 8;
/// Tensor-core grounding: dynamic shared memory of the re-rank kernels (both levels): per
/// warp and stage, 32 lanes' slots of NTC_DOT_BATCH float4 plus one of padding, and the
/// query's NTC_DOT_BATCH float4. Must equal `NTC_RERANK_SMEM` in the `.cu`.
pub const NTC_RERANK_SMEM: u32 =
    NTC_RERANK_WARPS * NTC_DOT_STAGES * (32 * (NTC_DOT_BATCH + 1) + NTC_DOT_BATCH) * 16;
/// Tensor-core grounding: dynamic shared memory of the candidate kernel: the stage ring and
/// the lists (keys and rows, 4 B each). Must equal `NTC_SMEM` in the `.cu`.
pub const NTC_SMEM: u32 = NTC_STAGES * (NTC_BM + NTC_BN) * NTC_BK * 2 + 2 * NTC_BM * NTC_LIST * 4;
/// Tensor-core grounding: a block's fixed cost in k-steps for the split (prologue, list writes).
pub const NTC_BLOCK_OVERHEAD_STEPS: u32 = 4;
/// Tensor-core grounding: the time of one insertion into a query's 32-entry candidate list, in
/// k-steps of a 256-row tile (v3's 128 x 256 x 64 products), for the split
/// ([`ntc_block_cost`]). From the H200 runs of 2026-11-27 (docs/kernels.md, section 8d):
/// at 100k x 384 the selection added 1.15 ms to 0.197 for 2,862 insertions per warp and
/// block (about 0.2 step each, a step taking ~1 us); at 1M x 4096, 3.2-5.0 ms for 3,998
/// (0.4-0.6 step each, where the lockstep warpgroups also wait for the slowest warp). The
/// lower end, so that the split leans towards the main loop's balance when unsure.
pub const NTC_SELECT_STEPS_PER_INSERT: f64 = 0.25;
/// Tensor-core grounding: query rows whose lists one warp keeps (v3-v5: 16 of a block's 128;
/// v2a's pairs of column warps, 32 rows per pair, take about as long).
pub const NTC_ROWS_PER_WARP: u32 = 16;
// 128 KB: within sm_90's 227 KB and sm_80's 163 KB opt-in limits; one block per SM
// (`__launch_bounds__(256, 1)`).
const _: () = assert!(NTC_SMEM <= SMEM_OPTIN_MAX_SM90);
const _: () = assert!(NTC_SMEM <= 163 * 1024);
const _: () = assert!(NTC_RERANK_SMEM <= 163 * 1024);

/// Tensor-core grounding, candidate kernel v3 (`kernels/nearest_tc_v3.cu`, wgmma on sm_90a):
/// catalogue rows per tile (the queries per block stay [`NTC_BM`]).
pub const NTC3_BN: u32 = FUSED3_BN;
/// v3 candidate kernel: dynamic shared memory, v3's ring (with its 1 KB of alignment slack)
/// then the lists. Must equal `NTC3_SMEM` in the `.cu`.
pub const NTC3_SMEM: u32 = FUSED3_SMEM + 2 * NTC_BM * NTC_LIST * 4;
const _: () = assert!(NTC3_SMEM <= SMEM_OPTIN_MAX_SM90);
/// Candidate kernel v4 (v3 on the staggered main loop, compiled with `-DWG4_NB=4`): a B ring of
/// 4 slots, two A rings, mbarriers, slack, then the lists. Must equal `NTC4_SMEM` in the `.cu`.
pub const NTC4_SMEM: u32 = 4 * FUSED3_BN * FUSED3_BK * 2
    + 2 * 4 * 64 * FUSED3_BK * 2
    + 128
    + 1024
    + 2 * NTC_BM * NTC_LIST * 4;
const _: () = assert!(NTC4_SMEM <= SMEM_OPTIN_MAX_SM90);
/// Candidate kernel v5 (v3 warp-specialised: `wg5_produce` / `wg5_consume`): v5's ring, then
/// the lists. Must equal `NTC5_SMEM` in the `.cu`.
pub const NTC5_SMEM: u32 = FUSED5_SMEM + 2 * NTC_BM * NTC_LIST * 4;
const _: () = assert!(NTC5_SMEM <= SMEM_OPTIN_MAX_SM90);

/// Which candidate kernel the tensor-core grounding runs (the re-rank, certificate and
/// fallback are the same for both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcCandidates {
    /// `nearest_tc_candidates` (`nearest_tc.cu`): v2a's mma.sync loop, 128 x 128 tiles; sm_80+.
    V2,
    /// `nearest_tc_candidates_v3` (`nearest_tc_v3.cu`): wgmma, 128 x 256 tiles; sm_90 only.
    V3,
    /// `nearest_tc_candidates_v4`: v3 with the two warpgroups staggered (one's selection
    /// overlaps the other's products); opt-in, correct and no faster than v3 on an H200.
    V4,
    /// `nearest_tc_candidates_v5`: v3 warp-specialised (a TMA producer warpgroup, two consumer
    /// warpgroups selecting independently); the default where it loads (H100/H200): 1.2-1.3x
    /// v3's candidate kernel at 1M x 4096 on an H200 (docs/kernels.md, section 8e).
    V5,
    /// `nearest_tc_candidates_v6`: v5 on clusters of two query blocks of one catalogue slice,
    /// the catalogue tile multicast (half the L2 traffic of B); opt-in: correct, and within
    /// noise of v5 on an H200 (section 8e).
    V6,
}

impl TcCandidates {
    /// Catalogue rows per tile, threads, dynamic shared memory, fixed cost per block (k-steps).
    pub fn shape(&self) -> (u32, u32, u32, u32) {
        match self {
            TcCandidates::V2 => (NTC_BN, NTC_THREADS, NTC_SMEM, NTC_BLOCK_OVERHEAD_STEPS),
            TcCandidates::V3 => (
                NTC3_BN,
                FUSED3_THREADS,
                NTC3_SMEM,
                FUSED3_BLOCK_OVERHEAD_STEPS,
            ),
            TcCandidates::V4 => (
                NTC3_BN,
                FUSED3_THREADS,
                NTC4_SMEM,
                FUSED3_BLOCK_OVERHEAD_STEPS,
            ),
            TcCandidates::V5 | TcCandidates::V6 => (
                NTC3_BN,
                FUSED5_THREADS,
                NTC5_SMEM,
                FUSED3_BLOCK_OVERHEAD_STEPS,
            ),
        }
    }

    /// Blocks per cluster along the grid's x (v6: 2; the plan pads the query blocks to a
    /// multiple).
    pub fn cluster(&self) -> u32 {
        match self {
            TcCandidates::V6 => FUSED6_CLUSTER,
            _ => 1,
        }
    }
}

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

    /// Split `tiles` into slices of equal length (the last may be shorter) so that the busiest
    /// multiprocessor's work, [`Self::busiest_sm_cost`], is smallest; ties go to fewer slices
    /// (less partial output to combine). Used by v2, whose blocks are long (a whole slice of
    /// 128 x 128 tiles), so that the last wave of a grid of a few waves does not leave SMs
    /// idle. Cost unit: one k-step (a 64-deep stage of one tile); each block also pays
    /// `overhead_steps` (filling the ring before its first mma, the final merges and writes).
    /// E.g. SmolLM2 b64 on 132 SMs (40 row blocks, 384 tiles, 9 k-steps, overhead 4) ->
    /// 13 slices of 30 tiles: 1,096 steps on the busiest SM against an even spread of 1,047.
    pub fn balanced(
        tiles: u32,
        row_blocks: u32,
        sm_count: u32,
        steps_per_tile: u32,
        overhead_steps: u32,
    ) -> Self {
        Self::balanced_by(tiles, row_blocks, sm_count, |per_slice| {
            (per_slice as u64 * steps_per_tile.max(1) as u64 + overhead_steps as u64) as f64
        })
    }

    /// [`Self::balanced`] with any per-block cost: `block_cost(per_slice)` is the time of a
    /// block that sweeps `per_slice` tiles (one block per SM, so the busiest SM pays
    /// ceil(blocks / SMs) of them). The grounding candidate kernels add their top-32
    /// selection, whose cost grows with the number of slices (every slice's lists fill from
    /// empty): [`ntc_block_cost`].
    pub fn balanced_by(
        tiles: u32,
        row_blocks: u32,
        sm_count: u32,
        block_cost: impl Fn(u32) -> f64,
    ) -> Self {
        let tiles = tiles.max(1);
        let mut best: Option<(f64, TileSplit)> = None;
        for per_slice in 1..=tiles {
            let cand = TileSplit {
                tiles,
                slices: tiles.div_ceil(per_slice),
                per_slice,
            };
            let waves =
                (row_blocks.max(1) as u64 * cand.slices as u64).div_ceil(sm_count.max(1) as u64);
            let cost = waves as f64 * block_cost(per_slice);
            let better = match best {
                None => true,
                Some((c, b)) => cost < c || (cost == c && cand.slices < b.slices),
            };
            if better {
                best = Some((cost, cand));
            }
        }
        best.expect("tiles >= 1").1
    }

    /// The busiest multiprocessor's work in k-steps if blocks spread evenly over `sm_count`
    /// SMs: ceil(row_blocks x slices / sm_count) x (per_slice x steps_per_tile + overhead).
    pub fn busiest_sm_cost(
        &self,
        row_blocks: u32,
        sm_count: u32,
        steps_per_tile: u32,
        overhead_steps: u32,
    ) -> u64 {
        (row_blocks.max(1) as u64 * self.slices as u64).div_ceil(sm_count.max(1) as u64)
            * (self.per_slice as u64 * steps_per_tile.max(1) as u64 + overhead_steps as u64)
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

/// Which generation of the fused kernel runs (`LLM4DSR_FUSED_VERSION=v1..v6`, default v5).
/// v2 and later exist for the tensor-core variants only (f32 heads take v1); v3 and later need
/// compute capability 9.0, and a device without them takes v2 (sm_80+), then v1. On an H200,
/// v2 is 7.5-9.2x v1, v3 1.6-1.9x v2 and v5 1.12-1.20x v3, with the same results
/// (docs/kernels.md, sections 8b, 8c and 8e).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FusedVersion {
    /// 64 x 64 x 32 tiles, 4 warps, plain loads (`item_loglik_fused.cu`).
    V1,
    /// 128 x 128 tiles, 8 warps, 3-stage cp.async ring, ldmatrix (`item_loglik_fused_v2.cu`).
    V2,
    /// 128 x 256 tiles, 2 warpgroups, wgmma from 128-byte-swizzled shared tiles, 4-stage
    /// cp.async ring (`item_loglik_fused_v3.cu`); compute capability 9.0 only (elsewhere the
    /// default falls back to v2, then v1). 70-79% of the floor on an H200 (docs/kernels.md).
    V3,
    /// v3's tile and epilogue with the two warpgroups staggered so that one's epilogue runs
    /// while the other's products do (mbarrier-guarded B ring; compute capability 9.0 only).
    /// Opt-in (`LLM4DSR_FUSED_VERSION=v4`): bit-equal to v3 and 0.80-0.93x its speed on an
    /// H200 (docs/kernels.md, section 8d).
    V4,
    /// v3's tile and epilogue, warp-specialised: a producer warpgroup streams the tiles with
    /// TMA (tensor maps, 128-byte swizzle) into an mbarrier ring, and two consumer warpgroups
    /// multiply and run their epilogues independently, so one's epilogue overlaps the other's
    /// products (compute capability 9.0 only). The default: bit-equal to v3 and 1.12-1.20x
    /// its speed, 83-94% of the floor at the four benchmark shapes on an H200 (docs/kernels.md,
    /// section 8e); where its kernels do not load, v3 serves.
    #[default]
    V5,
    /// v5 on clusters of two blocks (the two row blocks of one vocabulary slice), the head
    /// tile multicast with TMA, so each block reads 32 KB per step from L2 instead of 48.
    /// Opt-in (`LLM4DSR_FUSED_VERSION=v6`): bit-equal to v3, as fast as v5 or slower
    /// (0.90-1.01x v5 on an H200, section 8e).
    V6,
}

/// A setting from the environment variable `name`: `parse` of its value, `unset` when it is not
/// set, an error naming the variable when it is not valid Unicode.
pub fn env_setting<T>(name: &str, parse: impl FnOnce(&str) -> Result<T>, unset: T) -> Result<T> {
    match std::env::var(name) {
        Ok(s) => parse(&s),
        Err(std::env::VarError::NotPresent) => Ok(unset),
        Err(e) => bail!("{name}: {e}"),
    }
}

/// The environment variable that picks the fused kernel's version.
pub const FUSED_VERSION_ENV: &str = "LLM4DSR_FUSED_VERSION";

impl FusedVersion {
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "v1" | "1" => Ok(FusedVersion::V1),
            "v2" | "2" | "v2a" => Ok(FusedVersion::V2),
            "v3" | "3" => Ok(FusedVersion::V3),
            "v4" | "4" => Ok(FusedVersion::V4),
            "" | "v5" | "5" => Ok(FusedVersion::V5),
            "v6" | "6" => Ok(FusedVersion::V6),
            other => bail!("{FUSED_VERSION_ENV}={other:?}: expected v1, v2, v3, v4, v5 or v6"),
        }
    }

    /// The version asked for in the environment (v5 when unset; [`Self::fallback`] where a
    /// device lacks it).
    pub fn from_env() -> Result<Self> {
        env_setting(FUSED_VERSION_ENV, Self::parse, FusedVersion::default())
    }

    /// Does this version have a kernel for `variant`?
    pub fn supports(&self, variant: FusedVariant) -> bool {
        match self {
            FusedVersion::V1 => true,
            FusedVersion::V2
            | FusedVersion::V3
            | FusedVersion::V4
            | FusedVersion::V5
            | FusedVersion::V6 => variant != FusedVariant::F32,
        }
    }

    /// The version that serves when this one is unavailable on a device
    /// (v6 -> v5 -> v3 -> v2 -> v1; v4 -> v3).
    pub fn fallback(self) -> Self {
        match self {
            FusedVersion::V6 => FusedVersion::V5,
            FusedVersion::V4 | FusedVersion::V5 => FusedVersion::V3,
            FusedVersion::V3 => FusedVersion::V2,
            _ => FusedVersion::V1,
        }
    }

    /// The version that runs when `self` is asked for `variant`: v2 has no f32 kernel, so f32
    /// inputs take v1.
    pub fn resolve(self, variant: FusedVariant) -> Self {
        if self.supports(variant) {
            self
        } else {
            FusedVersion::V1
        }
    }

    /// The kernel's entry point in its `.cu` file.
    pub fn kernel_name(&self, variant: FusedVariant) -> Result<&'static str> {
        Ok(match (self, variant) {
            (FusedVersion::V1, v) => v.kernel_name(),
            (FusedVersion::V2, FusedVariant::TensorCoreBf16) => "item_loglik_fused_v2_bf16",
            (FusedVersion::V2, FusedVariant::TensorCoreF16) => "item_loglik_fused_v2_f16",
            (FusedVersion::V3, FusedVariant::TensorCoreBf16) => "item_loglik_fused_v3_bf16",
            (FusedVersion::V3, FusedVariant::TensorCoreF16) => "item_loglik_fused_v3_f16",
            (FusedVersion::V4, FusedVariant::TensorCoreBf16) => "item_loglik_fused_v4_bf16",
            (FusedVersion::V4, FusedVariant::TensorCoreF16) => "item_loglik_fused_v4_f16",
            (FusedVersion::V5, FusedVariant::TensorCoreBf16) => "item_loglik_fused_v5_bf16",
            (FusedVersion::V5, FusedVariant::TensorCoreF16) => "item_loglik_fused_v5_f16",
            (FusedVersion::V6, FusedVariant::TensorCoreBf16) => "item_loglik_fused_v6_bf16",
            (FusedVersion::V6, FusedVariant::TensorCoreF16) => "item_loglik_fused_v6_f16",
            (v, FusedVariant::F32) => {
                bail!("fused item_loglik {v:?} has no f32 kernel")
            }
        })
    }

    /// Rows per block and vocabulary entries per tile.
    pub fn tile(&self) -> (u32, u32) {
        match self {
            FusedVersion::V1 => (FUSED_BM, FUSED_BN),
            FusedVersion::V2 => (FUSED2_BM, FUSED2_BN),
            FusedVersion::V3 | FusedVersion::V4 | FusedVersion::V5 | FusedVersion::V6 => {
                (FUSED3_BM, FUSED3_BN)
            }
        }
    }

    /// Blocks per cluster along the grid's x (v6: 2, the row blocks padded to a multiple).
    pub fn cluster(&self) -> u32 {
        match self {
            FusedVersion::V6 => FUSED6_CLUSTER,
            _ => 1,
        }
    }
}

/// Launch plan of the fused item-likelihood kernel plus its combine step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusedPlan {
    pub version: FusedVersion,
    pub variant: FusedVariant,
    pub rows: u32,
    pub vocab: u32,
    pub row_blocks: u32,
    pub split: TileSplit,
    /// grid = (vocabulary slices, row blocks); v3: (row blocks, vocabulary slices).
    pub fused: Shape,
    /// One thread per row: merges the slices' (max, sum-exp) partials.
    pub combine: Shape,
    /// Length of each partial buffer (max and sum-exp): slices x rows, slice-major.
    pub partial_len: usize,
}

/// Plan the v1 fused kernel for `n` rows, vocabulary `v`, hidden size `d` on a chip with
/// `sm_count` multiprocessors.
pub fn fused_plan(
    variant: FusedVariant,
    n: usize,
    v: usize,
    d: usize,
    sm_count: u32,
) -> Result<FusedPlan> {
    fused_plan_version(FusedVersion::V1, variant, n, v, d, sm_count)
}

/// Plan the fused kernel of `version` (refused when that version has no kernel for `variant`;
/// [`FusedVersion::resolve`] first).
pub fn fused_plan_version(
    version: FusedVersion,
    variant: FusedVariant,
    n: usize,
    v: usize,
    d: usize,
    sm_count: u32,
) -> Result<FusedPlan> {
    version.kernel_name(variant)?;
    if n == 0 || v == 0 || d == 0 {
        bail!("fused item_loglik: empty problem (n={n}, v={v}, d={d})");
    }
    if !d.is_multiple_of(variant.d_multiple()) {
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
    let (bm, bn) = version.tile();
    let row_blocks = rows.div_ceil(bm);
    if row_blocks > GRID_YZ_MAX {
        bail!("fused item_loglik: {n} rows need {row_blocks} row blocks > {GRID_YZ_MAX}; score in batches");
    }
    let tiles = vocab.div_ceil(bn);
    // v6: whole clusters of row blocks (a padding block's rows lie past n: it reads zeros
    // and writes nothing).
    let grid_rows = row_blocks.next_multiple_of(version.cluster());
    let (split, threads, shared_bytes) = match version {
        FusedVersion::V1 => (
            TileSplit::new(tiles, row_blocks, sm_count.max(1) * BLOCKS_PER_SM),
            match variant {
                FusedVariant::F32 => FUSED_F32_THREADS,
                _ => FUSED_TC_THREADS,
            },
            0, // static shared memory only (under 48 KB)
        ),
        // Dynamic shared memory over 48 KB: cuda.rs opts in with
        // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES when it loads the kernel.
        FusedVersion::V2 => (
            TileSplit::balanced(
                tiles,
                row_blocks,
                sm_count.max(1),
                (d as u32).div_ceil(FUSED2_BK),
                FUSED2_BLOCK_OVERHEAD_STEPS,
            ),
            FUSED2_THREADS,
            FUSED2_SMEM,
        ),
        FusedVersion::V3 | FusedVersion::V4 | FusedVersion::V5 | FusedVersion::V6 => (
            TileSplit::balanced(
                tiles,
                grid_rows,
                sm_count.max(1),
                (d as u32).div_ceil(FUSED3_BK),
                FUSED3_BLOCK_OVERHEAD_STEPS,
            ),
            match version {
                FusedVersion::V5 | FusedVersion::V6 => FUSED5_THREADS,
                _ => FUSED3_THREADS,
            },
            match version {
                FusedVersion::V4 => FUSED4_SMEM,
                FusedVersion::V5 | FusedVersion::V6 => FUSED5_SMEM,
                _ => FUSED3_SMEM,
            },
        ),
    };
    Ok(FusedPlan {
        version,
        variant,
        rows,
        vocab,
        row_blocks,
        split,
        fused: Shape {
            grid: match version {
                // Row blocks fastest: the blocks running together share one head slice.
                FusedVersion::V3 | FusedVersion::V4 | FusedVersion::V5 | FusedVersion::V6 => {
                    (grid_rows, split.slices, 1)
                }
                _ => (split.slices, row_blocks, 1),
            },
            block: (threads, 1, 1),
            shared_bytes,
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

/// Launch plan of the tensor-core grounding search: candidates, then re-rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NearestTcPlan {
    pub cand: TcCandidates,
    pub queries: u32,
    pub items: u32,
    pub d: u32,
    pub k: u32,
    pub query_blocks: u32,
    /// Catalogue tiles (128 rows) split into slices, one per block row of the grid.
    pub split: TileSplit,
    /// grid = (query blocks, catalogue slices): the query blocks of a slice are adjacent in
    /// launch order, so they run together and share each catalogue tile through L2.
    pub candidates: Shape,
    /// One warp per query.
    pub rerank: Shape,
    /// Length of the candidate buffers: slices x queries x NTC_LIST, slice-major.
    pub candidates_len: usize,
}

/// Plan the tensor-core search of `b` queries in `n` rows of depth `d` for the top `k`.
/// Refused (the caller takes the f32 kernel): k > TC_KMAX, d % 8 != 0 (16-byte chunks of f16),
/// a depth outside the bound model, sizes past i32 or the grid.
pub fn nearest_tc_plan(
    b: usize,
    n: usize,
    d: usize,
    k: usize,
    sm_count: u32,
) -> Result<NearestTcPlan> {
    nearest_tc_plan_with(TcCandidates::V2, b, n, d, k, sm_count)
}

/// Expected insertions into a sorted list of the 32 smallest keys over `r` keys in random
/// order: the t-th key enters when it is among the 32 smallest so far, with probability
/// min(1, 32 / t), so 32 + 32 (H(r) - H(32)) ~ 32 + 32 ln(r / 32) for r > 32 (the selection
/// costs of a slice: its lists fill from empty).
pub fn expected_list_insertions(r: u64) -> f64 {
    let l = NTC_LIST as f64;
    if r as f64 <= l {
        r as f64
    } else {
        l + l * (r as f64 / l).ln()
    }
}

/// A grounding candidate block's time in k-steps when it sweeps `per_slice` tiles of `bn`
/// catalogue rows, `steps_per_tile` deep: its products, its fixed cost, and its selection
/// (each warp inserts into 16 lists, one insertion at a time). More slices fill more lists
/// from empty: at 1,024 queries on 132 SMs this chooses one wave of 16 slices over two waves
/// of 33 (docs/kernels.md, section 3e).
pub fn ntc_block_cost(per_slice: u32, bn: u32, steps_per_tile: u32, overhead_steps: u32) -> f64 {
    let per_insert = NTC_SELECT_STEPS_PER_INSERT * FUSED3_BN as f64 / bn.max(1) as f64;
    let insertions = expected_list_insertions(per_slice as u64 * bn as u64);
    per_slice as f64 * steps_per_tile as f64
        + overhead_steps as f64
        + per_insert * NTC_ROWS_PER_WARP as f64 * insertions
}

/// [`nearest_tc_plan`] for the candidate kernel `cand`.
pub fn nearest_tc_plan_with(
    cand: TcCandidates,
    b: usize,
    n: usize,
    d: usize,
    k: usize,
    sm_count: u32,
) -> Result<NearestTcPlan> {
    nearest_tc_plan_sliced(cand, b, n, d, k, sm_count, None)
}

/// [`nearest_tc_plan_with`], with the catalogue cut into `slices` equal slices when given
/// (`LLM4DSR_NEAREST_TC_SLICES`, and the benchmark's sweep) instead of the split that
/// [`ntc_block_cost`] predicts fastest. Refused: zero slices.
pub fn nearest_tc_plan_sliced(
    cand: TcCandidates,
    b: usize,
    n: usize,
    d: usize,
    k: usize,
    sm_count: u32,
    slices: Option<u32>,
) -> Result<NearestTcPlan> {
    use crate::nearest_tc::{tc_depth_ok, TC_KMAX};
    let (bn, threads, smem, overhead) = cand.shape();
    if b == 0 || n == 0 || d == 0 || k == 0 {
        bail!("nearest tc: empty problem (queries={b}, items={n}, d={d}, k={k})");
    }
    if k > TC_KMAX {
        bail!("nearest tc: k={k} > {TC_KMAX}, the tensor-core path's limit");
    }
    if !d.is_multiple_of(8) || !tc_depth_ok(d) {
        bail!("nearest tc: depth {d} is not a multiple of 8 (or too large for the bound)");
    }
    if b > i32::MAX as usize || n > i32::MAX as usize - bn as usize {
        bail!("nearest tc: dimensions exceed i32");
    }
    let query_blocks = (b as u32).div_ceil(NTC_BM);
    // v6: whole clusters of query blocks (a padding block's queries lie past b: it reads
    // zeros and writes no list).
    let grid_queries = query_blocks.next_multiple_of(cand.cluster());
    let tiles = (n as u32).div_ceil(bn);
    let steps = (d as u32).div_ceil(NTC_BK);
    let split = match slices {
        Some(0) => bail!("nearest tc: 0 catalogue slices asked for"),
        Some(s) => {
            let per_slice = tiles.div_ceil(s.min(tiles));
            TileSplit {
                tiles,
                slices: tiles.div_ceil(per_slice),
                per_slice,
            }
        }
        None => TileSplit::balanced_by(tiles, grid_queries, sm_count.max(1), |per_slice| {
            ntc_block_cost(per_slice, bn, steps, overhead)
        }),
    };
    if split.slices > GRID_YZ_MAX {
        bail!("nearest tc: {} slices > {GRID_YZ_MAX}", split.slices);
    }
    Ok(NearestTcPlan {
        cand,
        queries: b as u32,
        items: n as u32,
        d: d as u32,
        k: k as u32,
        query_blocks,
        split,
        candidates: Shape {
            grid: (grid_queries, split.slices, 1),
            block: (threads, 1, 1),
            shared_bytes: smem,
        },
        rerank: Shape {
            grid: ((b as u32).div_ceil(NTC_RERANK_WARPS), 1, 1),
            block: (NTC_RERANK_WARPS * 32, 1, 1),
            shared_bytes: NTC_RERANK_SMEM,
        },
        candidates_len: split.slices as usize * b * NTC_LIST as usize,
    })
}

/// `nearest_tc_rerank_all`: one block per query the first level did not certify (its warps
/// take the slices in turn), with the re-rank's staging buffers.
pub fn nearest_tc_rerank_all_shape(m: usize) -> Shape {
    Shape {
        grid: (m as u32, 1, 1),
        block: (NTC_RERANK_WARPS * 32, 1, 1),
        shared_bytes: NTC_RERANK_SMEM,
    }
}

/// `nearest_tc_prep`: one warp per row, 8 rows per block (as the row norms).
pub fn nearest_tc_prep_shape(rows: usize) -> Shape {
    row_norms_shape(rows)
}

/// `nearest_tc_gather`: a grid-stride loop over count x d values.
pub fn gather_shape(values: usize) -> Shape {
    Shape {
        grid: (
            (values as u32).div_ceil(ELEMWISE_THREADS).clamp(1, 132 * 8),
            1,
            1,
        ),
        block: (ELEMWISE_THREADS, 1, 1),
        shared_bytes: 0,
    }
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

    /// Every tile of `s` covered exactly once, no empty slice.
    fn assert_covers(s: &TileSplit) {
        let mut seen = vec![0u32; s.tiles as usize];
        for sl in 0..s.slices {
            let r = s.range(sl);
            assert!(!r.is_empty(), "empty slice {sl} of {s:?}");
            for t in r {
                seen[t as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "{s:?}");
    }

    #[test]
    fn balanced_split_covers_and_beats_the_v1_split() {
        for tiles in [1u32, 2, 3, 7, 64, 384, 1002, 1187] {
            for row_blocks in [1u32, 2, 10, 20, 40, 133, 1000] {
                for sm in [1u32, 2, 108, 132] {
                    for (steps, over) in [(1u32, 0u32), (9, 4), (64, 4)] {
                        let b = TileSplit::balanced(tiles, row_blocks, sm, steps, over);
                        assert_covers(&b);
                        let cost = |s: &TileSplit| s.busiest_sm_cost(row_blocks, sm, steps, over);
                        // The v1 rule is one equal split among those `balanced` searches.
                        let v1 = TileSplit::new(tiles, row_blocks, sm * BLOCKS_PER_SM);
                        assert!(
                            cost(&b) <= cost(&v1),
                            "{b:?} worse than {v1:?} (rb={row_blocks}, sm={sm})"
                        );
                        // Never below an even spread of all the work over the SMs.
                        let even =
                            (row_blocks as u64 * tiles as u64 * steps as u64).div_ceil(sm as u64);
                        assert!(cost(&b) >= even);
                    }
                }
            }
        }
        // One SM, one row block: one slice (splitting only adds partials).
        assert_eq!(TileSplit::balanced(50, 1, 1, 9, 4).slices, 1);
        // The docs' example: SmolLM2 b64 on 132 SMs.
        let s = TileSplit::balanced(384, 40, 132, 9, 4);
        assert_eq!((s.slices, s.per_slice), (13, 30));
        assert_eq!(s.busiest_sm_cost(40, 132, 9, 4), 1096);
    }

    #[test]
    fn fused_v2_plan_shapes() {
        use FusedVersion::V2;
        // The four benchmark shapes (benches/kernels.rs) on an H100/H200 (132 SMs).
        for (n, v, d) in [
            (5120usize, 49_152usize, 576usize),
            (5120, 151_936, 896),
            (1280, 128_256, 4096),
            (2560, 128_256, 4096),
        ] {
            for variant in [FusedVariant::TensorCoreBf16, FusedVariant::TensorCoreF16] {
                let p = fused_plan_version(V2, variant, n, v, d, 132).unwrap();
                assert_eq!(p.version, V2);
                assert_eq!(p.fused.block, (FUSED2_THREADS, 1, 1));
                assert_eq!(p.fused.shared_bytes, FUSED2_SMEM);
                assert_eq!(p.row_blocks as usize, n.div_ceil(128));
                assert_eq!(p.split.tiles as usize, v.div_ceil(128));
                assert_eq!(p.fused.grid, (p.split.slices, p.row_blocks, 1));
                assert_eq!(p.partial_len, p.split.slices as usize * n);
                assert_covers(&p.split);
                // Rows x tiles covered once: every (row block, tile) pair is one block's work.
                let work: u64 = (0..p.split.slices)
                    .map(|s| p.split.range(s).len() as u64 * p.row_blocks as u64)
                    .sum();
                assert_eq!(work, p.row_blocks as u64 * p.split.tiles as u64);
                // The busiest SM within 5% of an even spread of the k-steps.
                let steps = d.div_ceil(64) as u32;
                let even = (p.row_blocks as f64 * p.split.tiles as f64 * steps as f64) / 132.0;
                let busiest =
                    p.split
                        .busiest_sm_cost(p.row_blocks, 132, steps, FUSED2_BLOCK_OVERHEAD_STEPS)
                        as f64;
                assert!(busiest <= 1.05 * even, "{n}x{v}: {busiest} vs {even:.1}");
            }
        }
        // Partial tiles: 130 rows -> 2 row blocks, 300 -> 3 tiles; d = 72 (not a multiple of
        // the 64-deep stage: the kernel zero-fills the last stage) is accepted.
        let p = fused_plan_version(V2, FusedVariant::TensorCoreBf16, 130, 300, 72, 4).unwrap();
        assert_eq!((p.row_blocks, p.split.tiles), (2, 3));
        assert_covers(&p.split);
        let p = fused_plan_version(V2, FusedVariant::TensorCoreBf16, 1, 1, 8, 132).unwrap();
        assert_eq!((p.row_blocks, p.split.tiles, p.split.slices), (1, 1, 1));
        // Refused: d % 8 != 0 (16-byte chunks), f32 (no v2 kernel), empty, too many rows.
        assert!(fused_plan_version(V2, FusedVariant::TensorCoreBf16, 10, 10, 12, 132).is_err());
        assert!(fused_plan_version(V2, FusedVariant::F32, 10, 10, 16, 132).is_err());
        assert!(fused_plan_version(V2, FusedVariant::TensorCoreF16, 0, 10, 16, 132).is_err());
        let rows = 128 * GRID_YZ_MAX as usize + 1;
        assert!(fused_plan_version(V2, FusedVariant::TensorCoreBf16, rows, 10, 16, 132).is_err());
        // v1 through the versioned entry point is the v1 plan.
        assert_eq!(
            fused_plan_version(
                FusedVersion::V1,
                FusedVariant::TensorCoreBf16,
                70,
                999,
                64,
                132
            )
            .unwrap(),
            fused_plan(FusedVariant::TensorCoreBf16, 70, 999, 64, 132).unwrap()
        );
    }

    #[test]
    fn fused_v3_plan_shapes() {
        use FusedVersion::V3;
        assert_eq!(FUSED3_SMEM, 4 * 384 * 128 + 1024);
        for (n, v, d) in [
            (5120usize, 49_152usize, 576usize),
            (5120, 151_936, 896),
            (1280, 128_256, 4096),
            (2560, 128_256, 4096),
        ] {
            let p = fused_plan_version(V3, FusedVariant::TensorCoreBf16, n, v, d, 132).unwrap();
            assert_eq!(p.fused.block, (FUSED3_THREADS, 1, 1));
            assert_eq!(p.fused.shared_bytes, FUSED3_SMEM);
            assert_eq!(p.row_blocks as usize, n.div_ceil(128));
            assert_eq!(p.split.tiles as usize, v.div_ceil(256));
            assert_eq!(p.fused.grid, (p.row_blocks, p.split.slices, 1));
            assert_covers(&p.split);
            let steps = d.div_ceil(64) as u32;
            let even = (p.row_blocks as f64 * p.split.tiles as f64 * steps as f64) / 132.0;
            let busiest =
                p.split
                    .busiest_sm_cost(p.row_blocks, 132, steps, FUSED3_BLOCK_OVERHEAD_STEPS)
                    as f64;
            eprintln!(
                "v3 {n}x{v}x{d}: {} slices x {} row blocks, busiest {busiest} vs even {even:.1}",
                p.split.slices, p.row_blocks
            );
            assert!(busiest <= 1.08 * even, "{n}x{v}: {busiest} vs {even:.1}");
        }
        // v4: v3's plan with its own shared memory.
        let p3 =
            fused_plan_version(V3, FusedVariant::TensorCoreBf16, 5120, 49_152, 576, 132).unwrap();
        let p4 = fused_plan_version(
            FusedVersion::V4,
            FusedVariant::TensorCoreBf16,
            5120,
            49_152,
            576,
            132,
        )
        .unwrap();
        assert_eq!((p4.fused.grid, p4.split), (p3.fused.grid, p3.split));
        assert_eq!(p4.fused.shared_bytes, FUSED4_SMEM);
        assert_eq!(FUSED4_SMEM, 5 * 32_768 + 8 * 8_192 + 128 + 1024);
        // v5: v3's plan, 3 warpgroups, its own shared memory.
        let p5 = fused_plan_version(
            FusedVersion::V5,
            FusedVariant::TensorCoreBf16,
            5120,
            49_152,
            576,
            132,
        )
        .unwrap();
        assert_eq!((p5.fused.grid, p5.split), (p3.fused.grid, p3.split));
        assert_eq!(p5.fused.block, (384, 1, 1));
        assert_eq!(p5.fused.shared_bytes, 4 * 49_152 + 128 + 1024);
        // v6: v5's block on pairs of row blocks: an even grid x (padded where the row blocks
        // are odd; the split balances the padded grid), half-tile B boxes.
        for (n, v, d) in [
            (5120usize, 49_152usize, 576usize),
            (1280, 128_256, 4096),
            (2560, 128_256, 4096),
            (130, 300, 72),
            (1, 10, 8),
            (3 * 128, 5000, 64),
        ] {
            let p6 =
                fused_plan_version(FusedVersion::V6, FusedVariant::TensorCoreBf16, n, v, d, 132)
                    .unwrap();
            assert_eq!(p6.fused.grid.0 % FUSED6_CLUSTER, 0, "{n}");
            assert_eq!(p6.fused.grid.0, p6.row_blocks.next_multiple_of(2));
            assert!(p6.fused.grid.0 - p6.row_blocks < FUSED6_CLUSTER);
            assert_eq!(p6.row_blocks as usize, n.div_ceil(128));
            assert_eq!(p6.fused.grid.1, p6.split.slices);
            assert_covers(&p6.split);
            assert_eq!(
                (p6.fused.block, p6.fused.shared_bytes),
                (p5.fused.block, p5.fused.shared_bytes)
            );
            if p6.row_blocks.is_multiple_of(2) {
                let p3 =
                    fused_plan_version(V3, FusedVariant::TensorCoreBf16, n, v, d, 132).unwrap();
                assert_eq!((p6.fused.grid, p6.split), (p3.fused.grid, p3.split));
            }
        }
        assert_eq!(FUSED6_BOX_ROWS, (128, 128));
        let p = fused_plan_version(V3, FusedVariant::TensorCoreF16, 130, 300, 72, 4).unwrap();
        assert_eq!((p.row_blocks, p.split.tiles), (2, 2));
        assert!(fused_plan_version(V3, FusedVariant::F32, 10, 10, 16, 132).is_err());
    }

    #[test]
    fn fused_v2_shared_memory_fits() {
        // 3 stages x (128 + 128) rows x 128 B, plus 2 KB of per-row reductions.
        assert_eq!(FUSED2_SMEM, 3 * 256 * 128 + 2048);
        assert_eq!(FUSED2_SMEM, 100_352);
        // Over the 48 KB default: the plan's dynamic size needs the opt-in attribute (cuda.rs
        // sets it at load); the limits themselves are compile-time assertions next to
        // FUSED2_SMEM (the 227 KB opt-in limit, two blocks per sm_90 SM).
        let p =
            fused_plan_version(FusedVersion::V2, FusedVariant::TensorCoreBf16, 1, 1, 8, 1).unwrap();
        assert!(p.fused.shared_bytes > SMEM_DEFAULT_MAX);
        assert!(p.fused.shared_bytes <= SMEM_OPTIN_MAX_SM90);
        assert!(2 * (p.fused.shared_bytes + 1024) <= SMEM_PER_SM_SM90);
        // The warp tiling and the chunk mapping of the .cu (static_asserts there).
        assert_eq!(
            (FUSED2_BM, FUSED2_BN, FUSED2_BK, FUSED2_THREADS),
            (128, 128, 64, 256)
        );
        assert_eq!(FUSED2_BM * (FUSED2_BK / 8), 4 * FUSED2_THREADS);
    }

    #[test]
    fn fused_version_parse_and_resolve() {
        use FusedVariant::*;
        assert_eq!(FusedVersion::parse("v1").unwrap(), FusedVersion::V1);
        assert_eq!(FusedVersion::parse(" V2 ").unwrap(), FusedVersion::V2);
        assert_eq!(FusedVersion::parse("").unwrap(), FusedVersion::V5);
        assert_eq!(FusedVersion::parse("v3").unwrap(), FusedVersion::V3);
        assert_eq!(FusedVersion::parse("v4").unwrap(), FusedVersion::V4);
        assert_eq!(FusedVersion::parse("5").unwrap(), FusedVersion::V5);
        assert_eq!(FusedVersion::parse("v6").unwrap(), FusedVersion::V6);
        assert!(FusedVersion::parse("v7").is_err());
        assert_eq!(FusedVersion::V6.fallback(), FusedVersion::V5);
        assert_eq!(FusedVersion::V6.resolve(F32), FusedVersion::V1);
        assert_eq!(FusedVersion::V4.fallback(), FusedVersion::V3);
        assert_eq!(FusedVersion::V5.fallback(), FusedVersion::V3);
        assert_eq!(FusedVersion::V5.resolve(F32), FusedVersion::V1);
        assert_eq!(FusedVersion::V4.resolve(F32), FusedVersion::V1);
        assert_eq!(FusedVersion::V3.resolve(F32), FusedVersion::V1);
        assert_eq!(FusedVersion::V3.fallback(), FusedVersion::V2);
        assert_eq!(FusedVersion::V2.fallback(), FusedVersion::V1);
        assert_eq!(
            FusedVersion::V3.kernel_name(TensorCoreBf16).unwrap(),
            "item_loglik_fused_v3_bf16"
        );
        assert!(FusedVersion::V3.kernel_name(F32).is_err());
        assert_eq!(FusedVersion::default(), FusedVersion::V5);
        assert_eq!(FusedVersion::V2.resolve(F32), FusedVersion::V1);
        assert_eq!(FusedVersion::V2.resolve(TensorCoreBf16), FusedVersion::V2);
        assert_eq!(
            FusedVersion::V2.kernel_name(TensorCoreF16).unwrap(),
            "item_loglik_fused_v2_f16"
        );
        assert_eq!(
            FusedVersion::V1.kernel_name(TensorCoreBf16).unwrap(),
            "item_loglik_fused_bf16"
        );
        assert!(FusedVersion::V2.kernel_name(F32).is_err());
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
    fn nearest_tc_plan_shapes() {
        // The benchmark shapes on an H100/H200 (132 SMs, one 128 KB block per SM).
        for (n, d) in [(1_000_000usize, 4096usize), (100_000, 384)] {
            let p = nearest_tc_plan(1024, n, d, 10, 132).unwrap();
            assert_eq!(p.query_blocks, 8);
            assert_eq!(p.split.tiles as usize, n.div_ceil(128));
            assert_covers(&p.split);
            assert_eq!(p.candidates.grid, (8, p.split.slices, 1));
            assert_eq!(p.candidates.block, (256, 1, 1));
            assert_eq!(p.candidates.shared_bytes, NTC_SMEM);
            assert_eq!(p.rerank.grid, (128, 1, 1));
            assert_eq!(p.rerank.shared_bytes, NTC_RERANK_SMEM);
            assert_eq!(nearest_tc_rerank_all_shape(3).shared_bytes, NTC_RERANK_SMEM);
            assert_eq!(p.candidates_len, p.split.slices as usize * 1024 * 32);
            // Every (query block, tile) pair is one block's work; the busiest SM within 5% of
            // an even spread.
            let steps = d.div_ceil(64) as u32;
            let even = 8.0 * p.split.tiles as f64 * steps as f64 / 132.0;
            let busiest = p
                .split
                .busiest_sm_cost(8, 132, steps, NTC_BLOCK_OVERHEAD_STEPS)
                as f64;
            assert!(busiest <= 1.05 * even, "{n}x{d}: {busiest} vs {even:.1}");
        }
        // Partial blocks and tiles.
        let p = nearest_tc_plan(129, 300, 72, 16, 4).unwrap();
        assert_eq!((p.query_blocks, p.split.tiles), (2, 3));
        assert_eq!(p.rerank.grid.0, 17);
        // Refused: k > 16, d % 8 != 0, empty.
        assert!(nearest_tc_plan(1, 10, 8, 17, 132).is_err());
        assert!(nearest_tc_plan(1, 10, 12, 1, 132).is_err());
        assert!(nearest_tc_plan(0, 10, 8, 1, 132).is_err());
        assert_eq!(NTC_SMEM, 131_072);
        // The v3 candidate kernel: 256-row tiles, the same lists and re-rank.
        assert_eq!(NTC3_SMEM, 197_632 + 32_768);
        for (n, d) in [(1_000_000usize, 4096usize), (100_000, 384)] {
            let p = nearest_tc_plan_with(TcCandidates::V3, 1024, n, d, 10, 132).unwrap();
            assert_eq!(p.cand, TcCandidates::V3);
            assert_eq!(p.split.tiles as usize, n.div_ceil(256));
            assert_covers(&p.split);
            assert_eq!(p.candidates.grid, (8, p.split.slices, 1));
            assert_eq!(p.candidates.shared_bytes, NTC3_SMEM);
            assert_eq!(p.candidates_len, p.split.slices as usize * 1024 * 32);
        }
        // v5: v3's plan, 3 warpgroups, its ring then the lists.
        assert_eq!(NTC5_SMEM, 4 * 49_152 + 128 + 1024 + 32_768);
        let p3 = nearest_tc_plan_with(TcCandidates::V3, 1024, 1_000_000, 4096, 10, 132).unwrap();
        let p5 = nearest_tc_plan_with(TcCandidates::V5, 1024, 1_000_000, 4096, 10, 132).unwrap();
        // v6: v5's plan on pairs of query blocks (8 is even: the same grid); 3 query blocks
        // are padded to 4 (the fourth's queries lie past b: no list is written).
        let p6 = nearest_tc_plan_with(TcCandidates::V6, 1024, 1_000_000, 4096, 10, 132).unwrap();
        assert_eq!((p6.split, p6.candidates), (p5.split, p5.candidates));
        let p6 = nearest_tc_plan_with(TcCandidates::V6, 300, 100_000, 384, 10, 132).unwrap();
        assert_eq!((p6.query_blocks, p6.candidates.grid.0), (3, 4));
        assert_eq!(p6.candidates_len, p6.split.slices as usize * 300 * 32);
        assert_eq!(p6.rerank.grid.0, 300usize.div_ceil(8) as u32);
        assert_eq!(
            (p5.split, p5.candidates.grid),
            (p3.split, p3.candidates.grid)
        );
        assert_eq!(
            (p5.candidates.block.0, p5.candidates.shared_bytes),
            (384, NTC5_SMEM)
        );
        assert_eq!(gather_shape(0).grid.0, 1);
        assert_eq!(gather_shape(1 << 30).grid.0, 132 * 8);
    }

    /// The split of the wgmma candidate kernels counts the selection: at the benchmark shapes
    /// one wave of 16 slices (128 blocks on 132 SMs), where the products alone would take two
    /// waves of 33 (every slice's lists fill from empty: 44-46% fewer insertions per SM at
    /// both shapes). An explicit slice count overrides it.
    #[test]
    fn nearest_tc_split_counts_the_selection() {
        for cand in [TcCandidates::V3, TcCandidates::V5] {
            for (n, d) in [(1_000_000usize, 4096usize), (100_000, 384)] {
                let p = nearest_tc_plan_with(cand, 1024, n, d, 10, 132).unwrap();
                assert_eq!(
                    (p.split.slices, p.candidates.grid),
                    (16, (8, 16, 1)),
                    "{n}x{d}"
                );
                assert_covers(&p.split);
                // The products alone: two waves of 33 slices (the split before 2026-11-27).
                let steps = d.div_ceil(64) as u32;
                let tiles = n.div_ceil(256) as u32;
                let bare = TileSplit::balanced(tiles, 8, 132, steps, FUSED3_BLOCK_OVERHEAD_STEPS);
                assert_eq!(bare.slices, 33, "{n}x{d}");
                let cost = |s: &TileSplit| {
                    (8 * s.slices as u64).div_ceil(132) as f64
                        * ntc_block_cost(s.per_slice, 256, steps, FUSED3_BLOCK_OVERHEAD_STEPS)
                };
                assert!(cost(&p.split) < cost(&bare));
                let sliced = |s| nearest_tc_plan_sliced(cand, 1024, n, d, 10, 132, Some(s));
                for s in [1u32, 7, 33, 66] {
                    let q = sliced(s).unwrap();
                    assert_eq!(q.split.slices, s, "{n}x{d}");
                    assert_covers(&q.split);
                    assert_eq!(q.candidates_len, s as usize * 1024 * 32);
                }
                // More slices than tiles: one tile each.
                assert_eq!(sliced(1 << 20).unwrap().split.slices, tiles);
                assert!(sliced(0).is_err());
            }
        }
        // A catalogue too small to fill the chip: one tile per slice, as before.
        let p = nearest_tc_plan_with(TcCandidates::V3, 1024, 2048, 384, 10, 132).unwrap();
        assert_eq!(p.split.slices, 8);
    }

    /// expected_list_insertions against a count: 64 lists of the 32 smallest of r
    /// pseudo-random keys, each key inserted when it beats the list's 32nd.
    #[test]
    fn list_insertions_match_a_count() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for r in [10u64, 32, 300, 3_072, 30_464] {
            let mut total = 0u64;
            for _ in 0..64 {
                let mut list: Vec<u64> = Vec::with_capacity(33);
                for _ in 0..r {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if list.len() < 32 || x < list[31] {
                        let at = list.partition_point(|&v| v < x);
                        list.insert(at, x);
                        list.truncate(32);
                        total += 1;
                    }
                }
            }
            let counted = total as f64 / 64.0;
            let model = expected_list_insertions(r);
            assert!(
                (counted - model).abs() <= 0.03 * model + 1.0,
                "r={r}: counted {counted:.1}, model {model:.1}"
            );
        }
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
