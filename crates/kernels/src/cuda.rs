//! The CUDA path (feature `cuda`): NVRTC compiles `kernels/*.cu` at run time for the device's
//! compute capability, cudarc loads them; the wrappers here own device buffers and turn the
//! plans of [`crate::launch`] into launches. No CUDA toolkit at build time, and no CUDA
//! library is linked: libcuda and libnvrtc are opened when [`kernels`] is first called, and
//! only after [`crate::backend`] has seen `libcuda.so.1`.
//!
//! Start-up cost (seen on an H200 with a probe of this design): NVRTC ~80 ms per module,
//! module load ~150 ms; paid once per process by [`kernels`] (the v2 / v3 fused modules and the
//! grounding modules when first used). The sm_90a modules (v3 scoring, the wgmma grounding
//! candidates) are compiled from `wgmma_common.cuh` + their file for `compute_90a`.

use std::sync::{Arc, Mutex, OnceLock};

pub use cudarc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use crate::backend::{backend, request, Backend, Request};
use crate::item_loglik::{check_args, ItemLogLik};
use crate::launch::{
    self, FusedPlan, FusedVariant, FusedVersion, NearestPlan, NearestTcPlan, Shape, TcCandidates,
};
use crate::nearest::{
    check_nearest_args, check_nearest_lengths, effective_k, excluded_rows, merge_candidates,
    BadQuery, Nearest,
};
use crate::nearest_tc::{tc_bound, NearestVersion, TcStats, TC_KMAX};
use crate::resident::ResidentKey;
use crate::sources::{
    nvrtc_arch, nvrtc_defines, sm90a_source, FUSED3_ARCH, ITEM_LOGLIK_FUSED_CU,
    ITEM_LOGLIK_FUSED_V2_CU, ITEM_LOGLIK_FUSED_V3_CU, ITEM_LOGLIK_LOGITS_CU, NEAREST_CU,
    NEAREST_TC_CU, NEAREST_TC_V3_CU,
};

/// Why v3 is unavailable when `LLM4DSR_FUSED_V3=off` (the GPU check sets it after a failed
/// v3 smoke test, so that a faulting v3 cannot take the other measurements down with it).
pub const V3_DISABLED: &str = "disabled by LLM4DSR_FUSED_V3=off";
/// Why v4 is unavailable when `LLM4DSR_FUSED_V4=off` (the GPU check sets it after a failed v4
/// smoke test).
pub const V4_DISABLED: &str = "disabled by LLM4DSR_FUSED_V4=off";
/// Why v5 is unavailable when `LLM4DSR_FUSED_V5=off` (the GPU check sets it after a failed v5
/// smoke test).
pub const V5_DISABLED: &str = "disabled by LLM4DSR_FUSED_V5=off";
/// Why v6 is unavailable when `LLM4DSR_FUSED_V6=off` (the GPU check sets it after a failed v6
/// smoke test).
pub const V6_DISABLED: &str = "disabled by LLM4DSR_FUSED_V6=off";
/// Why the staggered grounding candidate kernel is unavailable when `LLM4DSR_NEAREST_TC_V4=off`.
pub const TC_V4_DISABLED: &str = "disabled by LLM4DSR_NEAREST_TC_V4=off";
/// Why the warp-specialised grounding candidate kernel is unavailable when
/// `LLM4DSR_NEAREST_TC_V5=off`.
pub const TC_V5_DISABLED: &str = "disabled by LLM4DSR_NEAREST_TC_V5=off";
/// Why the clustered (multicast) grounding candidate kernel is unavailable when
/// `LLM4DSR_NEAREST_TC_V6=off`.
pub const TC_V6_DISABLED: &str = "disabled by LLM4DSR_NEAREST_TC_V6=off";

/// The process-wide kernels, started on first use when [`backend`] says CUDA. None (and one
/// log line) when the start fails: the callers then take the CPU path.
pub fn kernels() -> Option<&'static CudaKernels> {
    static KERNELS: OnceLock<Option<CudaKernels>> = OnceLock::new();
    KERNELS
        .get_or_init(|| {
            if backend() != Backend::Cuda {
                return None;
            }
            // cudarc's loader panics when a library (e.g. libnvrtc) is missing: contain it.
            let ordinal = crate::backend::device_ordinal();
            let started = std::panic::catch_unwind(|| CudaKernels::new(ordinal))
                .unwrap_or_else(|p| Err(anyhow!("CUDA start panicked: {}", panic_text(&p))));
            match started {
                Ok(k) => {
                    tracing::info!(
                        "kernels: CUDA device {ordinal} {} (sm_{}{}, {} SMs), NVRTC modules ready",
                        k.name,
                        k.cc.0,
                        k.cc.1,
                        k.sm_count
                    );
                    Some(k)
                }
                Err(e) => {
                    if request() == Request::Cuda {
                        tracing::error!("kernels: LLM4DSR_KERNELS=cuda but the GPU start failed: {e:#}; CPU path");
                    } else {
                        tracing::warn!("kernels: GPU start failed ({e:#}); CPU path");
                    }
                    None
                }
            }
        })
        .as_ref()
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic".into())
}

/// NVRTC-compile `src` (named `kernels/<file>` in errors) for `arch` and load `names` from it.
pub fn compile_and_load(
    ctx: &Arc<CudaContext>,
    arch: &'static str,
    file: &str,
    src: &str,
    names: &[&str],
) -> Result<Vec<CudaFunction>> {
    compile_and_load_with(ctx, arch, file, src, names, &[])
}

/// [`compile_and_load`] with extra NVRTC options (`-DNAME=V`) after the tile constants.
pub fn compile_and_load_with(
    ctx: &Arc<CudaContext>,
    arch: &'static str,
    file: &str,
    src: &str,
    names: &[&str],
    extra: &[&str],
) -> Result<Vec<CudaFunction>> {
    let t0 = std::time::Instant::now();
    let mut options = nvrtc_defines();
    options.extend(extra.iter().map(|x| x.to_string()));
    let ptx = compile_ptx_with_opts(
        src,
        CompileOptions {
            arch: Some(arch),
            options,
            name: Some(file.to_string()),
            ..Default::default()
        },
    )
    .map_err(|e| anyhow!("NVRTC compile of kernels/{file} for {arch} failed: {e}"))?;
    let module = ctx
        .load_module(ptx)
        .with_context(|| format!("loading the PTX of kernels/{file}"))?;
    tracing::debug!("kernels/{file}: NVRTC + load {:?}", t0.elapsed());
    names
        .iter()
        .map(|n| {
            module
                .load_function(n)
                .with_context(|| format!("function {n} in kernels/{file}"))
        })
        .collect()
}

/// Log `msg` at info level the first time this process sees it (which kernel version serves
/// is decided per call; the log says it once).
fn info_once(msg: String) {
    static SEEN: OnceLock<Mutex<std::collections::HashSet<String>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if let Ok(mut seen) = seen.lock() {
        if seen.insert(msg.clone()) {
            tracing::info!("{msg}");
        }
    }
}

/// PTX of one kernel file with extra `-D` options (no device needed): the NVRTC check of
/// opt-in and diagnostic builds (e.g. `-DWG5_HANG_CHECK`, `-DNT_DOT_STAGES=0`). The sm_90a
/// files (`item_loglik_fused_v3.cu`, `nearest_tc_v3.cu`) are compiled after
/// `wgmma_common.cuh` for [`FUSED3_ARCH`], the others (`nearest_tc.cu`) for `arch`.
pub fn compile_variant(file: &str, arch: &'static str, extra: &[&str]) -> Result<String> {
    let (src, arch) = match file {
        "item_loglik_fused_v3.cu" => (sm90a_source(ITEM_LOGLIK_FUSED_V3_CU), FUSED3_ARCH),
        "nearest_tc_v3.cu" => (sm90a_source(NEAREST_TC_V3_CU), FUSED3_ARCH),
        "nearest_tc.cu" => (NEAREST_TC_CU.to_string(), arch),
        other => bail!("{other}: no variant compile for this file"),
    };
    let mut options = nvrtc_defines();
    options.extend(extra.iter().map(|d| d.to_string()));
    let ptx = std::panic::catch_unwind(|| {
        compile_ptx_with_opts(
            &src,
            CompileOptions {
                arch: Some(arch),
                options,
                name: Some(file.to_string()),
                ..Default::default()
            },
        )
    })
    .map_err(|p| anyhow!("NVRTC panicked: {}", panic_text(&p)))?
    .map_err(|e| anyhow!("NVRTC compile of kernels/{file} {extra:?} failed: {e}"))?;
    Ok(ptx.to_src())
}

/// [`compile_variant`] of an sm_90a file (`item_loglik_fused_v3.cu` or `nearest_tc_v3.cu`).
pub fn compile_sm90a_variant(file: &str, extra: &[&str]) -> Result<String> {
    if !matches!(file, "item_loglik_fused_v3.cu" | "nearest_tc_v3.cu") {
        bail!("{file} is not an sm_90a kernel file");
    }
    compile_variant(file, FUSED3_ARCH, extra)
}

/// NVRTC-compile every kernel source for `arch` (no device needed): the compile check the
/// tests run wherever libnvrtc is loadable. Returns (file, PTX) pairs. The v3 source targets
/// sm_90a only and is compiled for [`FUSED3_ARCH`] whatever `arch` is.
pub fn compile_sources(arch: &'static str) -> Result<Vec<(&'static str, String)>> {
    let mut out = Vec::new();
    let plain = |src: &str| src.to_string();
    for (file, src, arch) in [
        ("item_loglik_fused.cu", plain(ITEM_LOGLIK_FUSED_CU), arch),
        (
            "item_loglik_fused_v2.cu",
            plain(ITEM_LOGLIK_FUSED_V2_CU),
            arch,
        ),
        (
            "item_loglik_fused_v3.cu",
            sm90a_source(ITEM_LOGLIK_FUSED_V3_CU),
            FUSED3_ARCH,
        ),
        ("item_loglik_logits.cu", plain(ITEM_LOGLIK_LOGITS_CU), arch),
        ("nearest.cu", plain(NEAREST_CU), arch),
        ("nearest_tc.cu", plain(NEAREST_TC_CU), arch),
        (
            "nearest_tc_v3.cu",
            sm90a_source(NEAREST_TC_V3_CU),
            FUSED3_ARCH,
        ),
        ("bench_fill.cu", plain(crate::sources::BENCH_FILL_CU), arch),
        (
            "attention_softmax.cu",
            crate::sources::with_float16(crate::sources::ATTENTION_SOFTMAX_CU),
            arch,
        ),
        (
            "decoder_ops.cu",
            crate::sources::with_float16(crate::sources::DECODER_OPS_CU),
            arch,
        ),
    ] {
        let ptx = std::panic::catch_unwind(|| {
            compile_ptx_with_opts(
                &src,
                CompileOptions {
                    arch: Some(arch),
                    options: nvrtc_defines(),
                    name: Some(file.to_string()),
                    ..Default::default()
                },
            )
        })
        .map_err(|p| anyhow!("NVRTC panicked: {}", panic_text(&p)))?
        .map_err(|e| anyhow!("NVRTC compile of kernels/{file} for {arch} failed: {e}"))?;
        out.push((file, ptx.to_src()));
    }
    Ok(out)
}

/// A plan's shape as cudarc's launch configuration.
pub fn cfg(s: Shape) -> LaunchConfig {
    LaunchConfig {
        grid_dim: s.grid,
        block_dim: s.block,
        shared_mem_bytes: s.shared_bytes,
    }
}

/// The `-D` options of a v5 (warp-specialised) kernel: `base`, plus `-DWG5_HANG_CHECK` when
/// `LLM4DSR_WG5_HANG_CHECK=1` (its barrier waits give up after a bounded spin and print where
/// they were stuck: how the GPU check diagnoses a v5 that hung).
fn wg5_defines(base: &[&'static str]) -> Vec<&'static str> {
    let mut d = base.to_vec();
    if std::env::var("LLM4DSR_WG5_HANG_CHECK").is_ok_and(|x| x == "1") {
        tracing::warn!("kernels: v5 compiled with WG5_HANG_CHECK (diagnosis only)");
        d.push("-DWG5_HANG_CHECK");
    }
    d
}

/// Refuse an opt-in kernel whose setting (e.g. `LLM4DSR_FUSED_V5`) says `off`: the GPU check
/// sets it after the kernel's smoke test failed or hung.
fn bail_if_off(off: Option<(&str, &str)>) -> Result<()> {
    if let Some((var, why)) = off {
        if std::env::var(var).is_ok_and(|x| x == "off") {
            bail!("{why}");
        }
    }
    Ok(())
}

/// A driver tensor map (TMA descriptor, 128 opaque bytes), passed to a kernel by value
/// (`const __grid_constant__ WgTensorMap` in wgmma_common.cuh).
#[repr(transparent)]
#[derive(Clone, Copy)]
struct TensorMap(sys::CUtensorMap);

// SAFETY: a plain 128-byte C struct, copied into the kernel's parameter space as it is.
unsafe impl DeviceRepr for TensorMap {}

/// A matrix in device memory, row-major [rows, cols]; 16-bit floats travel as raw bits.
pub enum DeviceMatrix {
    Bf16(CudaSlice<u16>, usize, usize),
    F16(CudaSlice<u16>, usize, usize),
    F32(CudaSlice<f32>, usize, usize),
}

impl DeviceMatrix {
    pub fn dims(&self) -> (usize, usize) {
        match self {
            DeviceMatrix::Bf16(_, r, c)
            | DeviceMatrix::F16(_, r, c)
            | DeviceMatrix::F32(_, r, c) => (*r, *c),
        }
    }
    pub fn dtype(&self) -> DType {
        match self {
            DeviceMatrix::Bf16(..) => DType::BF16,
            DeviceMatrix::F16(..) => DType::F16,
            DeviceMatrix::F32(..) => DType::F32,
        }
    }
    pub fn bytes(&self) -> usize {
        let (r, c) = self.dims();
        r * c * self.dtype().size_in_bytes()
    }
}

/// How the item-likelihood is computed on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreMode {
    /// The fused kernel: online log-sum-exp, no [N, V] buffer.
    Fused,
    /// The same GEMM writing all [N, V] f32 logits, then the logits kernel over them (the
    /// materialising path, kept to time against and to test the logits kernel).
    Materialised,
}

/// Device buffers of one scoring call (reusable across calls of the same shape).
pub struct ScoreBuffers {
    pub plan: FusedPlan,
    pub part_m: CudaSlice<f32>,
    pub part_s: CudaSlice<f32>,
    pub tgt_logit: CudaSlice<f32>,
    pub per_token: CudaSlice<f32>,
    pub per_item: CudaSlice<f32>,
    /// [N, V] logits, only for [`ScoreMode::Materialised`].
    pub logits: Option<CudaSlice<f32>>,
    pub items: usize,
}

/// Compiled kernels on one device, with the stream they run on.
pub struct CudaKernels {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    pub cc: (i32, i32),
    pub arch: &'static str,
    pub sm_count: u32,
    fused_bf16: CudaFunction,
    fused_f16: CudaFunction,
    fused_f32: CudaFunction,
    /// v2a bf16 and f16 kernels, or why they are unavailable (then v1 serves).
    /// Compiled on first use, so processes that run v1 (the default) do not pay for it.
    fused_v2: OnceLock<std::result::Result<(CudaFunction, CudaFunction), String>>,
    /// v3 (wgmma, sm_90a) bf16 and f16 kernels, or why they are unavailable; on first use.
    fused_v3: OnceLock<std::result::Result<(CudaFunction, CudaFunction), String>>,
    /// v4 (opt-in) bf16 and f16 kernels, or why they are unavailable; on first use.
    fused_v4: OnceLock<std::result::Result<(CudaFunction, CudaFunction), String>>,
    /// v5 (opt-in, warp-specialised with TMA) bf16 and f16 kernels, or why they are
    /// unavailable; on first use.
    fused_v5: OnceLock<std::result::Result<(CudaFunction, CudaFunction), String>>,
    /// v6 (opt-in, v5 on clusters of two blocks with the head tile multicast) bf16 and f16
    /// kernels, or why they are unavailable; on first use.
    fused_v6: OnceLock<std::result::Result<(CudaFunction, CudaFunction), String>>,
    combine: CudaFunction,
    logits: CudaFunction,
    segment_sum: CudaFunction,
    nearest: CudaFunction,
    row_norms: CudaFunction,
    mark_excluded: CudaFunction,
    /// The tensor-core grounding kernels, or why they are unavailable (then the f32 kernel
    /// serves every search). Compiled on first use.
    nearest_tc: OnceLock<std::result::Result<NearestTcFns, String>>,
    /// The wgmma candidate kernel (`nearest_tc_v3.cu`, sm_90a), or why it is unavailable.
    nearest_tc_v3: OnceLock<std::result::Result<CudaFunction, String>>,
    /// The staggered candidate kernel (opt-in), or why it is unavailable.
    nearest_tc_v4: OnceLock<std::result::Result<CudaFunction, String>>,
    /// The warp-specialised candidate kernel (opt-in), or why it is unavailable.
    nearest_tc_v5: OnceLock<std::result::Result<CudaFunction, String>>,
    /// The clustered (multicast) candidate kernel (opt-in), or why it is unavailable.
    nearest_tc_v6: OnceLock<std::result::Result<CudaFunction, String>>,
    /// The last LM head `item_loglik` uploaded, kept on the device between calls.
    resident_head: Mutex<Option<(ResidentKey, Arc<DeviceMatrix>)>>,
}

/// The kernels of `kernels/nearest_tc.cu`.
#[derive(Clone)]
pub struct NearestTcFns {
    pub prep: CudaFunction,
    pub candidates: CudaFunction,
    pub rerank: CudaFunction,
    pub rerank_all: CudaFunction,
    pub gather: CudaFunction,
}

/// A catalogue prepared for the tensor-core search (device-resident, reusable across calls
/// with the same exclusions): f16 rows scaled per row, the per-row records
/// {|c|^2, e_c, 1/s, flag} (4 f32 each), the f32 norms with +inf at excluded rows (for the
/// re-rank and the f32 fallback), and max |c|^2 over all rows (the certificate's slack).
pub struct TcCatalog {
    pub c16: CudaSlice<u16>,
    pub info: CudaSlice<f32>,
    pub cnorm: CudaSlice<f32>,
    pub c2max: f32,
    pub n: usize,
    pub d: usize,
}

/// A catalogue uploaded once for many searches ([`crate::nearest::CatalogSearch`] on the GPU):
/// the f32 rows, their norms with +inf at the excluded rows (the f32 kernel's input), and the
/// tensor-core preparation when that path serves this catalogue. Grounding calls search the
/// same catalogue batch after batch; only the queries travel per call.
pub struct DeviceCatalog {
    pub rows: CudaSlice<f32>,
    pub cnorm: CudaSlice<f32>,
    pub tc: Option<TcCatalog>,
    pub n: usize,
    pub d: usize,
    /// Rows never returned (sorted, deduplicated, < n).
    pub exclude: Vec<u32>,
}

/// A launched tensor-core search (asynchronous until [`CudaKernels::nearest_tc_finish`]).
pub struct TcPending {
    pub plan: NearestTcPlan,
    pub qnorm: CudaSlice<f32>,
    /// The f16 queries (kept alive until the kernels reading them are done).
    pub q16: CudaSlice<u16>,
    pub qinfo: CudaSlice<f32>,
    pub cand_k: CudaSlice<f32>,
    pub cand_i: CudaSlice<u32>,
    pub out_d: CudaSlice<f32>,
    pub out_i: CudaSlice<u32>,
    pub margin: CudaSlice<f32>,
    pub status: CudaSlice<u32>,
}

/// Freed device memory the allocator's pool keeps for reuse
/// ([`CudaKernels::set_pool_release_threshold`]): 1 GiB, above every per-call buffer of the
/// scoring and grounding paths at the benchmark shapes (the largest, the materialising path's
/// N x V logits at Llama-3-8B b32, is 1.3 GB and only in diagnostics).
pub const POOL_KEEP_BYTES: u64 = 1 << 30;

impl CudaKernels {
    /// Open device `ordinal`, compile the modules with NVRTC (v1 fused, logits, nearest) and
    /// load every function; the v2 fused module is compiled on first use.
    pub fn new(ordinal: usize) -> Result<Self> {
        let ctx = CudaContext::new(ordinal).context("cuInit / context creation")?;
        let name = ctx.name().unwrap_or_else(|_| "?".into());
        let cc = ctx.compute_capability()?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as u32;
        let arch = nvrtc_arch(cc)?;
        let stream = ctx.default_stream();
        let load =
            |file: &str, src: &str, names: &[&str]| compile_and_load(&ctx, arch, file, src, names);
        let mut fused = load(
            "item_loglik_fused.cu",
            ITEM_LOGLIK_FUSED_CU,
            &[
                "item_loglik_fused_bf16",
                "item_loglik_fused_f16",
                "item_loglik_fused_f32",
                "item_loglik_combine",
            ],
        )?
        .into_iter();
        let mut logits = load(
            "item_loglik_logits.cu",
            ITEM_LOGLIK_LOGITS_CU,
            &["item_loglik_logits", "item_segment_sum"],
        )?
        .into_iter();
        let mut near = load(
            "nearest.cu",
            NEAREST_CU,
            &["nearest_topk", "row_sq_norms", "mark_excluded"],
        )?
        .into_iter();
        let next = |it: &mut std::vec::IntoIter<CudaFunction>| it.next().unwrap();
        let k = CudaKernels {
            fused_bf16: next(&mut fused),
            fused_f16: next(&mut fused),
            fused_f32: next(&mut fused),
            fused_v2: OnceLock::new(),
            fused_v3: OnceLock::new(),
            fused_v4: OnceLock::new(),
            fused_v5: OnceLock::new(),
            fused_v6: OnceLock::new(),
            combine: next(&mut fused),
            logits: next(&mut logits),
            segment_sum: next(&mut logits),
            nearest: next(&mut near),
            row_norms: next(&mut near),
            mark_excluded: next(&mut near),
            nearest_tc: OnceLock::new(),
            nearest_tc_v3: OnceLock::new(),
            nearest_tc_v4: OnceLock::new(),
            nearest_tc_v5: OnceLock::new(),
            nearest_tc_v6: OnceLock::new(),
            resident_head: Mutex::new(None),
            ctx,
            stream,
            name,
            cc,
            arch,
            sm_count,
        };
        // A speed setting: where the driver refuses it, the kernels run as before.
        if let Err(e) = k.set_pool_release_threshold(POOL_KEEP_BYTES) {
            tracing::warn!("kernels: the memory pool keeps no freed memory ({e:#})");
        }
        Ok(k)
    }

    /// How many bytes of freed device memory the stream-ordered allocator's pool may keep
    /// across synchronisations (`CU_MEMPOOL_ATTR_RELEASE_THRESHOLD` of the device's current
    /// pool, which cudarc's `alloc` draws from with `cuMemAllocAsync`). At the driver's
    /// default, 0, every stream, event or context synchronisation hands the pool's free memory
    /// back to the system, so a grounding or scoring call that follows one (the ground stage's
    /// batches are separated by the embedder's forward; the benchmark's rounds by event
    /// waits) maps its buffers afresh: host time in the critical path, with the GPU idle.
    /// [`Self::new`] sets [`POOL_KEEP_BYTES`]; the benchmark sets 0 for a comparison row.
    /// No-op where the device has no stream-ordered allocator (cudarc then uses cuMemAlloc).
    pub fn set_pool_release_threshold(&self, bytes: u64) -> Result<()> {
        if !self.ctx.has_async_alloc() {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut value = bytes;
        // SAFETY: `pool` receives the device's current pool handle (owned by the driver); the
        // attribute takes a pointer to a u64 (cuMemPoolSetAttribute's documented type for
        // CU_MEMPOOL_ATTR_RELEASE_THRESHOLD), which lives across the call.
        unsafe {
            sys::cuDeviceGetMemPool(&mut pool, self.ctx.cu_device())
                .result()
                .context("cuDeviceGetMemPool")?;
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut value as *mut u64 as *mut std::ffi::c_void,
            )
            .result()
            .context("setting the memory pool's release threshold")?;
        }
        Ok(())
    }

    /// Compile and load another module for this device (benchmarks' input generators).
    pub fn load_extra(&self, file: &str, src: &str, names: &[&str]) -> Result<Vec<CudaFunction>> {
        compile_and_load(&self.ctx, self.arch, file, src, names)
    }

    /// Compile `src` for `arch`, load `names` and opt each in to `smem` bytes of dynamic shared
    /// memory, after checking the device allows that much per block.
    fn load_with_smem(
        &self,
        arch: &'static str,
        file: &str,
        src: &str,
        names: &[&str],
        smem: u32,
        extra: &[&str],
    ) -> Result<Vec<CudaFunction>> {
        let optin = self.ctx.attribute(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )? as u32;
        if optin < smem {
            bail!("needs {smem} B of shared memory per block, the device allows {optin} B");
        }
        let f = compile_and_load_with(&self.ctx, arch, file, src, names, extra)?;
        for func in &f {
            // Dynamic shared memory above 48 KB needs this opt-in before any launch.
            func.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .with_context(|| format!("opting in to {smem} B of dynamic shared memory ({file})"))?;
        }
        Ok(f)
    }

    /// The sm_90a kernels run here: compute capability 9.0 and not `LLM4DSR_FUSED_V3=off`.
    fn sm90a_allowed(&self) -> Result<()> {
        if std::env::var("LLM4DSR_FUSED_V3").is_ok_and(|x| x == "off") {
            bail!("{V3_DISABLED}");
        }
        if self.cc != (9, 0) {
            bail!(
                "needs compute capability 9.0 (wgmma), the device has {}.{}",
                self.cc.0,
                self.cc.1
            );
        }
        Ok(())
    }

    /// Benchmark diagnostics: an sm_90a kernel file (compiled after `wgmma_common.cuh`) with
    /// extra `-D` options, e.g. a diagnostic switch that removes an epilogue, with `smem` bytes
    /// of dynamic shared memory opted in. Not used by the stages.
    pub fn load_sm90a_variant(
        &self,
        file: &str,
        src: &str,
        names: &[&str],
        defines: &[&str],
        smem: u32,
    ) -> Result<Vec<CudaFunction>> {
        self.sm90a_allowed()?;
        self.load_with_smem(FUSED3_ARCH, file, &sm90a_source(src), names, smem, defines)
    }

    /// The device copy of `t` as `dtype`, uploaded on the first call and reused while the
    /// same tensor comes back (one slot: the LM head of the model being scored with; see
    /// [`crate::resident`] for what "the same" means).
    pub fn upload_resident(&self, t: &Tensor, dtype: DType) -> Result<Arc<DeviceMatrix>> {
        let key = ResidentKey::of(t, dtype)?;
        let mut slot = self
            .resident_head
            .lock()
            .map_err(|_| anyhow!("resident LM head: lock poisoned"))?;
        if let Some((k, m)) = slot.as_ref() {
            if *k == key {
                return Ok(m.clone());
            }
        }
        // Free the old copy before allocating the new one (two Llama-3 heads are 2 GB).
        *slot = None;
        let m = Arc::new(self.upload(t, dtype)?);
        tracing::debug!(
            bytes = m.bytes(),
            "LM head uploaded to the device (kept resident)"
        );
        *slot = Some((key, m.clone()));
        Ok(m)
    }

    /// Copy a CPU tensor [rows, cols] to the device as `dtype` (BF16, F16 or F32).
    pub fn upload(&self, t: &Tensor, dtype: DType) -> Result<DeviceMatrix> {
        #[cfg(feature = "candle-cuda")]
        if let Some(m) = self.upload_from_candle(t, dtype)? {
            return Ok(m);
        }
        let (r, c) = t.dims2()?;
        let flat = t.to_dtype(dtype)?.flatten_all()?;
        Ok(match dtype {
            DType::BF16 => {
                let bits: Vec<u16> = flat
                    .to_vec1::<half::bf16>()?
                    .into_iter()
                    .map(|x| x.to_bits())
                    .collect();
                DeviceMatrix::Bf16(self.stream.clone_htod(&bits)?, r, c)
            }
            DType::F16 => {
                let bits: Vec<u16> = flat
                    .to_vec1::<half::f16>()?
                    .into_iter()
                    .map(|x| x.to_bits())
                    .collect();
                DeviceMatrix::F16(self.stream.clone_htod(&bits)?, r, c)
            }
            DType::F32 => DeviceMatrix::F32(self.stream.clone_htod(&flat.to_vec1::<f32>()?)?, r, c),
            other => bail!("upload: no device kernels for {other:?}"),
        })
    }

    /// [`Self::upload`] of a tensor on candle's CUDA device, without the host: candle's work
    /// is finished first (its device synchronised), then one device-to-device copy on this
    /// stream, waited for (so the candle buffer may go right after). Both sides open the GPU
    /// through cudarc's `CudaContext::new`, i.e. its primary context, so candle's pointers are
    /// valid here. None (host path) when `t` is not on CUDA or on another GPU than ours.
    /// Checked against the CPU path in every end-to-end GPU run (H200, docs/kernels.md 8d).
    #[cfg(feature = "candle-cuda")]
    fn upload_from_candle(&self, t: &Tensor, dtype: DType) -> Result<Option<DeviceMatrix>> {
        use candle_core::{DeviceLocation, Storage};
        let ours = self.stream.context().ordinal();
        match t.device().location() {
            DeviceLocation::Cuda { gpu_id } if gpu_id == ours => {}
            _ => return Ok(None),
        }
        let (r, c) = t.dims2()?;
        let t = t.to_dtype(dtype)?.contiguous()?;
        t.device().synchronize()?;
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Ok(None);
        };
        let (off, len) = (layout.start_offset(), r * c);
        // SAFETY (transmute): bf16/f16 and u16 have the same size; the view covers len values.
        let m = match dtype {
            DType::BF16 => {
                let src = cs.as_cuda_slice::<half::bf16>()?.slice(off..off + len);
                let src = unsafe { src.transmute::<u16>(len) }.context("bf16 view")?;
                DeviceMatrix::Bf16(self.copy_dtod(&src, len)?, r, c)
            }
            DType::F16 => {
                let src = cs.as_cuda_slice::<half::f16>()?.slice(off..off + len);
                let src = unsafe { src.transmute::<u16>(len) }.context("f16 view")?;
                DeviceMatrix::F16(self.copy_dtod(&src, len)?, r, c)
            }
            DType::F32 => {
                let src = cs.as_cuda_slice::<f32>()?.slice(off..off + len);
                DeviceMatrix::F32(self.copy_dtod(&src, len)?, r, c)
            }
            _ => return Ok(None),
        };
        self.stream
            .synchronize()
            .context("device-to-device copy from candle")?;
        Ok(Some(m))
    }

    /// A new buffer on this stream holding a copy of `src` (`len` values; asynchronous).
    #[cfg(feature = "candle-cuda")]
    fn copy_dtod<T>(
        &self,
        src: &cudarc::driver::CudaView<'_, T>,
        len: usize,
    ) -> Result<CudaSlice<T>>
    where
        T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
    {
        let mut dst = self.stream.alloc_zeros::<T>(len.max(1))?;
        self.stream.memcpy_dtod(src, &mut dst)?;
        Ok(dst)
    }

    /// A TMA descriptor of the 16-bit row-major matrix `m` [rows, d], read in boxes of 64
    /// values (128 bytes) x `box_rows` rows with the 128-byte swizzle (the shared layout of
    /// wgmma_common.cuh's tiles); elements past the matrix read as zeros. Needs d % 8 == 0
    /// (row pitch a multiple of 16 bytes), which the tensor-core plans already require.
    fn tensor_map_k_major(
        &self,
        m: &CudaSlice<u16>,
        rows: usize,
        d: usize,
        box_rows: u32,
        bf16: bool,
    ) -> Result<TensorMap> {
        if rows == 0 || d == 0 || !d.is_multiple_of(8) || m.len() < rows * d {
            bail!(
                "tensor map: {} values for [{rows}, {d}] (d must be a multiple of 8)",
                m.len()
            );
        }
        let (ptr, _sync) = m.device_ptr(&self.stream);
        let dims: [u64; 2] = [d as u64, rows as u64];
        let strides: [u64; 1] = [(d * 2) as u64];
        let boxes: [u32; 2] = [launch::FUSED3_BK, box_rows];
        let elem: [u32; 2] = [1, 1];
        let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
        // SAFETY: the pointers are to local arrays of the rank (2) the call declares; `ptr` is
        // a live allocation of at least rows x d 16-bit values (checked above) that the launch
        // using this map also takes as an argument, so it outlives the kernel.
        let rc = unsafe {
            sys::cuTensorMapEncodeTiled(
                map.as_mut_ptr(),
                if bf16 {
                    sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                } else {
                    sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                },
                2,
                ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                elem.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if rc != sys::CUresult::CUDA_SUCCESS {
            bail!("cuTensorMapEncodeTiled([{rows}, {d}], box 64 x {box_rows}): {rc:?}");
        }
        // SAFETY: initialised by the successful call above.
        Ok(TensorMap(unsafe { map.assume_init() }))
    }

    /// Which fused kernel serves an LM head of this dtype and hidden size.
    pub fn variant_for(dtype: DType, d: usize) -> FusedVariant {
        match dtype {
            DType::BF16 if d.is_multiple_of(8) => FusedVariant::TensorCoreBf16,
            DType::F16 if d.is_multiple_of(8) => FusedVariant::TensorCoreF16,
            _ => FusedVariant::F32,
        }
    }

    /// The loaded fused kernel of `version` for `variant` (for its attributes: registers,
    /// local memory, occupancy); None when v2 is unavailable or has no such variant.
    pub fn fused_function(
        &self,
        version: FusedVersion,
        variant: FusedVariant,
    ) -> Option<&CudaFunction> {
        match (version, variant) {
            (FusedVersion::V1, FusedVariant::TensorCoreBf16) => Some(&self.fused_bf16),
            (FusedVersion::V1, FusedVariant::TensorCoreF16) => Some(&self.fused_f16),
            (FusedVersion::V1, FusedVariant::F32) => Some(&self.fused_f32),
            (_, FusedVariant::F32) => None,
            (v, FusedVariant::TensorCoreBf16) => self.fused_tc(v)?.as_ref().ok().map(|f| &f.0),
            (v, FusedVariant::TensorCoreF16) => self.fused_tc(v)?.as_ref().ok().map(|f| &f.1),
        }
    }

    /// The (bf16, f16) kernels of a tensor-core version after v1, loaded on first call, or
    /// why they are unavailable; None for v1 (always loaded).
    fn fused_tc(
        &self,
        version: FusedVersion,
    ) -> Option<&std::result::Result<(CudaFunction, CudaFunction), String>> {
        match version {
            FusedVersion::V1 => None,
            FusedVersion::V2 => Some(self.fused_v2.get_or_init(|| self.load_fused_pair(version))),
            FusedVersion::V3 => Some(self.fused_v3.get_or_init(|| self.load_fused_pair(version))),
            FusedVersion::V4 => Some(self.fused_v4.get_or_init(|| self.load_fused_pair(version))),
            FusedVersion::V5 => Some(self.fused_v5.get_or_init(|| self.load_fused_pair(version))),
            FusedVersion::V6 => Some(self.fused_v6.get_or_init(|| self.load_fused_pair(version))),
        }
    }

    /// Why the fused kernels of `version` are unavailable on this device (None: loaded).
    pub fn fused_unavailable(&self, version: FusedVersion) -> Option<&str> {
        self.fused_tc(version)?.as_ref().err().map(|e| e.as_str())
    }

    /// Why the v2 fused kernels are unavailable on this device (None: they are loaded).
    pub fn fused_v2_unavailable(&self) -> Option<&str> {
        self.fused_unavailable(FusedVersion::V2)
    }

    /// Compile and load the (bf16, f16) kernels of `version` (v2 or v3), or say why they are
    /// unavailable; logged once. Both are optional: v2 needs 100 KB of opt-in shared memory
    /// per block (sm_80+), v3 compute capability 9.0 (wgmma is an sm_90a feature; Blackwell has
    /// its own instructions) and 194 KB; a device without one takes the next older version.
    fn load_fused_pair(
        &self,
        version: FusedVersion,
    ) -> std::result::Result<(CudaFunction, CudaFunction), String> {
        let loaded = (|| -> Result<(CudaFunction, CudaFunction)> {
            let f = match version {
                FusedVersion::V1 => bail!("v1 is loaded with the context"),
                FusedVersion::V2 => self.load_with_smem(
                    self.arch,
                    "item_loglik_fused_v2.cu",
                    ITEM_LOGLIK_FUSED_V2_CU,
                    &["item_loglik_fused_v2_bf16", "item_loglik_fused_v2_f16"],
                    launch::FUSED2_SMEM,
                    &[],
                )?,
                // The sm_90a versions (item_loglik_fused_v3.cu): entry points, shared
                // memory, -D options, and the setting that turns an opt-in one off.
                v => {
                    self.sm90a_allowed()?;
                    let names = [
                        v.kernel_name(FusedVariant::TensorCoreBf16)?,
                        v.kernel_name(FusedVariant::TensorCoreF16)?,
                    ];
                    let (smem, defines, off): (_, Vec<&str>, _) = match v {
                        FusedVersion::V4 => (
                            launch::FUSED4_SMEM,
                            vec![],
                            Some(("LLM4DSR_FUSED_V4", V4_DISABLED)),
                        ),
                        FusedVersion::V5 => (
                            launch::FUSED5_SMEM,
                            wg5_defines(&[]),
                            Some(("LLM4DSR_FUSED_V5", V5_DISABLED)),
                        ),
                        FusedVersion::V6 => (
                            launch::FUSED5_SMEM,
                            wg5_defines(&[]),
                            Some(("LLM4DSR_FUSED_V6", V6_DISABLED)),
                        ),
                        _ => (launch::FUSED3_SMEM, vec![], None),
                    };
                    bail_if_off(off)?;
                    self.load_with_smem(
                        FUSED3_ARCH,
                        "item_loglik_fused_v3.cu",
                        &sm90a_source(ITEM_LOGLIK_FUSED_V3_CU),
                        &names,
                        smem,
                        &defines,
                    )?
                }
            };
            Ok((f[0].clone(), f[1].clone()))
        })()
        .map_err(|e| format!("{e:#}"));
        if let Err(e) = &loaded {
            tracing::info!(
                "kernels: fused item_loglik {version:?} unavailable ({e}); an older version serves"
            );
        }
        loaded
    }

    /// The fused kernel a call for `variant` gets: `LLM4DSR_FUSED_VERSION` (default v5),
    /// resolved to v1 for f32 (v2 and later have no f32 kernel), and to the next older version
    /// while the asked one is unavailable on this device (v5 -> v3 -> v2 -> v1, logged at
    /// debug).
    pub fn fused_version(&self, variant: FusedVariant) -> Result<FusedVersion> {
        let asked = FusedVersion::from_env()?;
        let mut version = asked.resolve(variant);
        // v5 -> v3 -> v2 -> v1: the first one this device has.
        while let Some(why) = self.fused_unavailable(version) {
            let next = version.fallback();
            tracing::debug!("kernels: fused {version:?} unavailable ({why}); {next:?} serves");
            version = next;
        }
        info_once(format!(
            "kernels: fused item_loglik {version:?} serves {variant:?} heads"
        ));
        Ok(version)
    }

    /// Allocate the buffers for scoring `n` rows against vocabulary `v` in `items` items, for
    /// the fused kernel version the environment picks ([`Self::fused_version`]).
    pub fn score_buffers(
        &self,
        variant: FusedVariant,
        n: usize,
        v: usize,
        d: usize,
        items: usize,
        mode: ScoreMode,
    ) -> Result<ScoreBuffers> {
        let version = self.fused_version(variant)?;
        self.score_buffers_version(version, variant, n, v, d, items, mode)
    }

    /// [`Self::score_buffers`] for an explicit kernel version (benchmarks and tests compare
    /// versions in one process). Refused when that version has no kernel for `variant` or is
    /// unavailable on this device.
    #[allow(clippy::too_many_arguments)]
    pub fn score_buffers_version(
        &self,
        version: FusedVersion,
        variant: FusedVariant,
        n: usize,
        v: usize,
        d: usize,
        items: usize,
        mode: ScoreMode,
    ) -> Result<ScoreBuffers> {
        if let Some(why) = self.fused_unavailable(version) {
            bail!("fused item_loglik {version:?} is unavailable on this device: {why}");
        }
        let plan = launch::fused_plan_version(version, variant, n, v, d, self.sm_count)?;
        let s = &self.stream;
        Ok(ScoreBuffers {
            plan,
            part_m: s.alloc_zeros::<f32>(plan.partial_len)?,
            part_s: s.alloc_zeros::<f32>(plan.partial_len)?,
            tgt_logit: s.alloc_zeros::<f32>(n)?,
            per_token: s.alloc_zeros::<f32>(n)?,
            per_item: s.alloc_zeros::<f32>(items.max(1))?,
            logits: match mode {
                ScoreMode::Fused => None,
                ScoreMode::Materialised => Some(s.alloc_zeros::<f32>(n * v)?),
            },
            items,
        })
    }

    /// Launch the scoring of device-resident inputs into `buf` (asynchronous: synchronise the
    /// stream before reading). `targets` [N], `offsets` [items + 1] are device copies.
    pub fn score_device(
        &self,
        hidden: &DeviceMatrix,
        head: &DeviceMatrix,
        targets: &CudaSlice<u32>,
        offsets: &CudaSlice<u32>,
        buf: &mut ScoreBuffers,
    ) -> Result<()> {
        self.score_device_with(hidden, head, targets, offsets, buf, None)
    }

    /// [`Self::score_device`] with the fused kernel replaced by `func` (benchmark
    /// diagnostics: a variant of the plan's version with the same signature and launch shape,
    /// from [`Self::load_sm90a_variant`]).
    pub fn score_device_with(
        &self,
        hidden: &DeviceMatrix,
        head: &DeviceMatrix,
        targets: &CudaSlice<u32>,
        offsets: &CudaSlice<u32>,
        buf: &mut ScoreBuffers,
        func_override: Option<&CudaFunction>,
    ) -> Result<()> {
        let (n, d) = hidden.dims();
        let (v, d2) = head.dims();
        let plan = buf.plan;
        if d != d2 || plan.rows as usize != n || plan.vocab as usize != v {
            bail!(
                "score_device: buffers planned for {}x{} but got hidden {n}x{d}, head {v}x{d2}",
                plan.rows,
                plan.vocab
            );
        }
        let v2 = match self.fused_tc(plan.version) {
            Some(Ok(f)) => Some(f),
            Some(Err(why)) => bail!("score_device: fused {:?} unavailable: {why}", plan.version),
            None => None,
        };
        let (func, same) = match (plan.variant, hidden, head) {
            (FusedVariant::TensorCoreBf16, DeviceMatrix::Bf16(..), DeviceMatrix::Bf16(..)) => {
                (v2.map(|f| &f.0).unwrap_or(&self.fused_bf16), true)
            }
            (FusedVariant::TensorCoreF16, DeviceMatrix::F16(..), DeviceMatrix::F16(..)) => {
                (v2.map(|f| &f.1).unwrap_or(&self.fused_f16), true)
            }
            (FusedVariant::F32, DeviceMatrix::F32(..), DeviceMatrix::F32(..)) => {
                (&self.fused_f32, true)
            }
            _ => (&self.fused_f32, false),
        };
        let func = func_override.unwrap_or(func);
        if !same {
            bail!(
                "score_device: {:?} needs hidden and head of its dtype (got {:?}, {:?})",
                plan.variant,
                hidden.dtype(),
                head.dtype()
            );
        }
        let (ni, vi, di) = (n as i32, v as i32, d as i32);
        let per_slice = plan.split.per_slice as i32;
        let slices = plan.split.slices as i32;
        // Poison: a target logit nobody writes stays NaN and fails every comparison.
        self.stream
            .memcpy_htod(&vec![f32::NAN; n], &mut buf.tgt_logit)?;
        let null: u64 = 0;
        // v5, v6 read hidden and head through TMA: one tensor map each (after the pointers);
        // v6's head boxes are half tiles (each block of a pair copies one half, multicast).
        let maps = match (plan.version, hidden, head) {
            (
                version @ (FusedVersion::V5 | FusedVersion::V6),
                DeviceMatrix::Bf16(h, ..) | DeviceMatrix::F16(h, ..),
                DeviceMatrix::Bf16(w, ..) | DeviceMatrix::F16(w, ..),
            ) => {
                let bf16 = plan.variant == FusedVariant::TensorCoreBf16;
                let (box_a, box_b) = match version {
                    FusedVersion::V6 => launch::FUSED6_BOX_ROWS,
                    _ => launch::FUSED5_BOX_ROWS,
                };
                Some((
                    self.tensor_map_k_major(h, n, d, box_a, bf16)
                        .with_context(|| format!("{version:?}: the hidden states' tensor map"))?,
                    self.tensor_map_k_major(w, v, d, box_b, bf16)
                        .with_context(|| format!("{version:?}: the LM head's tensor map"))?,
                ))
            }
            (version @ (FusedVersion::V5 | FusedVersion::V6), ..) => {
                bail!("score_device: {version:?} takes 16-bit hidden and head")
            }
            _ => None,
        };
        {
            let mut b = self.stream.launch_builder(func);
            match hidden {
                DeviceMatrix::Bf16(h, ..) | DeviceMatrix::F16(h, ..) => b.arg(h),
                DeviceMatrix::F32(h, ..) => b.arg(h),
            };
            match head {
                DeviceMatrix::Bf16(w, ..) | DeviceMatrix::F16(w, ..) => b.arg(w),
                DeviceMatrix::F32(w, ..) => b.arg(w),
            };
            b.arg(targets).arg(&ni).arg(&vi).arg(&di).arg(&per_slice);
            b.arg(&mut buf.part_m)
                .arg(&mut buf.part_s)
                .arg(&mut buf.tgt_logit);
            match buf.logits.as_mut() {
                Some(l) => b.arg(l),
                None => b.arg(&null),
            };
            if let Some((map_a, map_b)) = maps.as_ref() {
                b.arg(map_a).arg(map_b);
            }
            // SAFETY: argument list matches the kernel signature in item_loglik_fused.cu (v2,
            // v3, v4: the same signature; v5, v6: the same followed by the two tensor maps, which
            // describe the hidden and head buffers passed above); the buffers were sized by
            // the same plan (partials slices x n, logits n x v); the dynamic shared memory
            // (the plan's shared_bytes) was opted in at load.
            unsafe { b.launch(cfg(plan.fused)) }
                .context("launching the fused item_loglik kernel")?;
        }
        match buf.logits.as_ref() {
            None => {
                let mut b = self.stream.launch_builder(&self.combine);
                b.arg(&buf.part_m)
                    .arg(&buf.part_s)
                    .arg(&buf.tgt_logit)
                    .arg(&ni)
                    .arg(&slices);
                b.arg(&mut buf.per_token);
                unsafe { b.launch(cfg(plan.combine)) }.context("launching item_loglik_combine")?;
            }
            Some(l) => {
                let mut b = self.stream.launch_builder(&self.logits);
                b.arg(l)
                    .arg(targets)
                    .arg(&ni)
                    .arg(&vi)
                    .arg(&mut buf.per_token);
                unsafe { b.launch(cfg(launch::logits_shape(n)?)) }
                    .context("launching item_loglik_logits")?;
            }
        }
        let items = buf.items as i32;
        if items > 0 {
            let mut b = self.stream.launch_builder(&self.segment_sum);
            b.arg(&buf.per_token)
                .arg(offsets)
                .arg(&items)
                .arg(&mut buf.per_item);
            unsafe { b.launch(cfg(launch::elementwise(buf.items))) }
                .context("launching item_segment_sum")?;
        }
        Ok(())
    }

    /// The whole call: upload, score with `mode`, download. The LM head's dtype picks the
    /// kernel (bf16/f16: tensor cores; f32 or other: CUDA cores); hidden is cast to it. The
    /// fused kernel's version comes from the environment ([`Self::fused_version`]).
    pub fn item_loglik_mode(
        &self,
        hidden: &Tensor,
        lm_head: &Tensor,
        targets: &[u32],
        offsets: &[u32],
        mode: ScoreMode,
    ) -> Result<ItemLogLik> {
        let (_, _, d) = check_args(hidden, lm_head, targets, offsets)?;
        let version = self.fused_version(Self::variant_for(lm_head.dtype(), d))?;
        self.item_loglik_version(hidden, lm_head, targets, offsets, mode, version)
    }

    /// [`Self::item_loglik_mode`] with an explicit fused kernel version (resolved to v1 for
    /// f32 heads, which v2 has no kernel for).
    pub fn item_loglik_version(
        &self,
        hidden: &Tensor,
        lm_head: &Tensor,
        targets: &[u32],
        offsets: &[u32],
        mode: ScoreMode,
        version: FusedVersion,
    ) -> Result<ItemLogLik> {
        let (n, v, d) = check_args(hidden, lm_head, targets, offsets)?;
        let variant = Self::variant_for(lm_head.dtype(), d);
        let version = version.resolve(variant);
        let dt = match variant {
            FusedVariant::TensorCoreBf16 => DType::BF16,
            FusedVariant::TensorCoreF16 => DType::F16,
            FusedVariant::F32 => DType::F32,
        };
        let h = self.upload(hidden, dt)?;
        let w = self.upload_resident(lm_head, dt)?;
        let t = self.stream.clone_htod(targets)?;
        let o = self.stream.clone_htod(offsets)?;
        let items = offsets.len() - 1;
        let mut buf = self.score_buffers_version(version, variant, n, v, d, items, mode)?;
        self.score_device(&h, &w, &t, &o, &mut buf)?;
        self.stream.synchronize().context("item_loglik kernels")?;
        let per_token = self.stream.clone_dtoh(&buf.per_token)?;
        let mut per_item = self.stream.clone_dtoh(&buf.per_item)?;
        per_item.truncate(items);
        Ok(ItemLogLik {
            per_token,
            per_item,
        })
    }

    /// [`crate::item_loglik`] on the GPU (fused kernel).
    pub fn item_loglik(
        &self,
        hidden: &Tensor,
        lm_head: &Tensor,
        targets: &[u32],
        offsets: &[u32],
    ) -> Result<ItemLogLik> {
        self.item_loglik_mode(hidden, lm_head, targets, offsets, ScoreMode::Fused)
    }

    /// |row|^2 for each row of a device matrix [rows, d].
    pub fn row_norms(&self, x: &CudaSlice<f32>, rows: usize, d: usize) -> Result<CudaSlice<f32>> {
        let mut out = self.stream.alloc_zeros::<f32>(rows.max(1))?;
        let (r, di) = (rows as i32, d as i32);
        let mut b = self.stream.launch_builder(&self.row_norms);
        b.arg(x).arg(&r).arg(&di).arg(&mut out);
        unsafe { b.launch(cfg(launch::row_norms_shape(rows))) }
            .context("launching row_sq_norms")?;
        Ok(out)
    }

    /// Set the norms of `exclude`d rows to +inf (they are then never returned).
    pub fn exclude_rows(
        &self,
        norms: &mut CudaSlice<f32>,
        n: usize,
        exclude: &[u32],
    ) -> Result<()> {
        if exclude.is_empty() {
            return Ok(());
        }
        let rows = self.stream.clone_htod(exclude)?;
        let (c, ni) = (exclude.len() as i32, n as i32);
        let mut b = self.stream.launch_builder(&self.mark_excluded);
        b.arg(norms).arg(&rows).arg(&c).arg(&ni);
        unsafe { b.launch(cfg(launch::elementwise(exclude.len()))) }
            .context("launching mark_excluded")?;
        Ok(())
    }

    /// Launch the top-k kernel on device-resident data; returns the per-slice candidates
    /// ([slices, b, k] distances and indices) and the plan. Asynchronous.
    #[allow(clippy::too_many_arguments)]
    pub fn nearest_device(
        &self,
        queries: &CudaSlice<f32>,
        qnorm: &CudaSlice<f32>,
        catalog: &CudaSlice<f32>,
        cnorm: &CudaSlice<f32>,
        b: usize,
        n: usize,
        d: usize,
        k: usize,
    ) -> Result<(CudaSlice<f32>, CudaSlice<u32>, NearestPlan)> {
        let plan = launch::nearest_plan(b, n, d, k, self.sm_count)?;
        let mut out_d = self.stream.alloc_zeros::<f32>(plan.candidates_len)?;
        let mut out_i = self.stream.alloc_zeros::<u32>(plan.candidates_len)?;
        let (bi, ni, di, ki) = (b as i32, n as i32, d as i32, k as i32);
        let per_slice = plan.split.per_slice as i32;
        let mut lb = self.stream.launch_builder(&self.nearest);
        lb.arg(queries).arg(catalog).arg(qnorm).arg(cnorm);
        lb.arg(&bi).arg(&ni).arg(&di).arg(&ki).arg(&per_slice);
        lb.arg(&mut out_d).arg(&mut out_i);
        // SAFETY: arguments match nearest_topk in nearest.cu; outputs sized by the plan.
        unsafe { lb.launch(cfg(plan.topk)) }.context("launching nearest_topk")?;
        Ok((out_d, out_i, plan))
    }

    /// [`crate::nearest_items`] on the GPU, with the kernel `LLM4DSR_NEAREST_VERSION` picks
    /// (tc by default; f32: [`Self::nearest_items_version`]).
    pub fn nearest_items(
        &self,
        queries: &[f32],
        catalog: &[f32],
        d: usize,
        k: usize,
        exclude: &[u32],
    ) -> Result<Nearest> {
        let version = NearestVersion::from_env()?;
        self.nearest_items_version(queries, catalog, d, k, exclude, version)
    }

    /// The f32 kernel: upload, norms, exclusions, top-k, host merge.
    pub fn nearest_items_f32(
        &self,
        queries: &[f32],
        catalog: &[f32],
        d: usize,
        k: usize,
        exclude: &[u32],
    ) -> Result<Nearest> {
        check_nearest_args(queries, catalog, d)?;
        let b = queries.len() / d;
        let n = catalog.len() / d;
        let k = effective_k(k, n, exclude);
        if k == 0 || b == 0 {
            return Ok(Nearest {
                k,
                index: vec![],
                dist2: vec![],
            });
        }
        let q = self.stream.clone_htod(queries)?;
        let c = self.stream.clone_htod(catalog)?;
        let qn = self.row_norms(&q, b, d)?;
        let mut cn = self.row_norms(&c, n, d)?;
        let norms = self.stream.clone_dtoh(&cn)?;
        if let Some(j) = norms.iter().position(|x| !x.is_finite()) {
            bail!("nearest_items: catalogue row {j} has a non-finite norm");
        }
        self.exclude_rows(&mut cn, n, exclude)?;
        let (od, oi, plan) = self.nearest_device(&q, &qn, &c, &cn, b, n, d, k)?;
        self.stream.synchronize().context("nearest kernels")?;
        let dist = self.stream.clone_dtoh(&od)?;
        let idx = self.stream.clone_dtoh(&oi)?;
        merge_candidates(&dist, &idx, plan.split.slices as usize, b, k)
    }

    /// The tensor-core grounding kernels, compiled and loaded on first call (None + the reason
    /// when the device lacks 128 KB of opt-in shared memory per block or the compile fails).
    pub fn nearest_tc_fns(&self) -> std::result::Result<&NearestTcFns, &str> {
        self.nearest_tc
            .get_or_init(|| {
                let loaded = (|| -> Result<NearestTcFns> {
                    let optin = self.ctx.attribute(
                        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                    )? as u32;
                    let need = launch::NTC_SMEM.max(launch::NTC_RERANK_SMEM);
                    if optin < need {
                        bail!("needs {need} B of shared memory per block, the device allows {optin} B");
                    }
                    let rerank = crate::nearest_tc::TcRerank::from_env()?;
                    let f = compile_and_load_with(
                        &self.ctx,
                        self.arch,
                        "nearest_tc.cu",
                        NEAREST_TC_CU,
                        &[
                            "nearest_tc_prep",
                            "nearest_tc_candidates",
                            "nearest_tc_rerank",
                            "nearest_tc_rerank_all",
                            "nearest_tc_gather",
                        ],
                        rerank.defines(),
                    )?;
                    if rerank != crate::nearest_tc::TcRerank::default() {
                        info_once(format!("kernels: the grounding re-rank reads rows {rerank:?}"));
                    }
                    f[1].set_attribute(
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        launch::NTC_SMEM as i32,
                    )
                    .context("opting in to dynamic shared memory for nearest_tc_candidates")?;
                    for func in &f[2..4] {
                        func.set_attribute(
                            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            launch::NTC_RERANK_SMEM as i32,
                        )
                        .context("opting in to dynamic shared memory for the re-rank kernels")?;
                    }
                    Ok(NearestTcFns {
                        prep: f[0].clone(),
                        candidates: f[1].clone(),
                        rerank: f[2].clone(),
                        rerank_all: f[3].clone(),
                        gather: f[4].clone(),
                    })
                })()
                .map_err(|e| format!("{e:#}"));
                if let Err(e) = &loaded {
                    tracing::warn!("kernels: tensor-core grounding unavailable ({e}); f32 serves");
                }
                loaded
            })
            .as_ref()
            .map_err(|e| e.as_str())
    }

    /// An sm_90a candidate kernel (v3, v4, v5 or v6 of `nearest_tc_v3.cu`), compiled and loaded
    /// on first call ([`Self::load_tc_candidates`]: compute capability 9.0, its opt-in shared
    /// memory, not turned off by its `..._V*=off` setting), or why it is unavailable. v2 lives
    /// in `nearest_tc.cu` ([`Self::nearest_tc_fns`]).
    fn nearest_tc_sm90a_fn(&self, cand: TcCandidates) -> std::result::Result<&CudaFunction, &str> {
        let cell = match cand {
            TcCandidates::V2 => return Err("v2 candidates live in nearest_tc.cu"),
            TcCandidates::V3 => &self.nearest_tc_v3,
            TcCandidates::V4 => &self.nearest_tc_v4,
            TcCandidates::V5 => &self.nearest_tc_v5,
            TcCandidates::V6 => &self.nearest_tc_v6,
        };
        cell.get_or_init(|| self.load_tc_candidates(cand))
            .as_ref()
            .map_err(|e| e.as_str())
    }

    /// Why the candidate kernel `cand` is unavailable (None: loaded); v2: why the tensor-core
    /// search is.
    pub fn nearest_tc_candidates_unavailable(&self, cand: TcCandidates) -> Option<&str> {
        match cand {
            TcCandidates::V2 => self.nearest_tc_unavailable(),
            _ => self.nearest_tc_sm90a_fn(cand).err(),
        }
    }

    /// Compile and load an sm_90a candidate kernel (v3, v4, v5 or v6) of `nearest_tc_v3.cu`, or say
    /// why it is unavailable (logged once; v2 serves).
    fn load_tc_candidates(&self, cand: TcCandidates) -> std::result::Result<CudaFunction, String> {
        let loaded = (|| -> Result<CudaFunction> {
            self.sm90a_allowed()?;
            // The v5 / v6 consumers keep 240 registers (the selection needs them).
            let regs = || wg5_defines(&["-DWG5_PRODUCER_REGS=24", "-DWG5_CONSUMER_REGS=240"]);
            let (name, extra, off): (_, Vec<&str>, _) = match cand {
                TcCandidates::V2 => bail!("v2 candidates live in nearest_tc.cu"),
                TcCandidates::V3 => ("nearest_tc_candidates_v3", vec![], None),
                TcCandidates::V4 => (
                    "nearest_tc_candidates_v4",
                    vec!["-DWG4_NB=4"],
                    Some(("LLM4DSR_NEAREST_TC_V4", TC_V4_DISABLED)),
                ),
                TcCandidates::V5 => (
                    "nearest_tc_candidates_v5",
                    regs(),
                    Some(("LLM4DSR_NEAREST_TC_V5", TC_V5_DISABLED)),
                ),
                TcCandidates::V6 => (
                    "nearest_tc_candidates_v6",
                    regs(),
                    Some(("LLM4DSR_NEAREST_TC_V6", TC_V6_DISABLED)),
                ),
            };
            // The plan's dynamic shared memory (launch.rs), opted in at load.
            let smem = cand.shape().2;
            bail_if_off(off)?;
            let mut extra = extra;
            extra.extend(crate::nearest_tc::TcSelect::from_env()?.defines());
            extra.extend(crate::nearest_tc::TcRecords::from_env()?.defines());
            let f = self.load_with_smem(
                FUSED3_ARCH,
                "nearest_tc_v3.cu",
                &sm90a_source(NEAREST_TC_V3_CU),
                &[name],
                smem,
                &extra,
            )?;
            Ok(f[0].clone())
        })()
        .map_err(|e| format!("{e:#}"));
        if let Err(e) = &loaded {
            tracing::info!(
                "kernels: grounding candidates {cand:?} unavailable ({e}); an older version serves"
            );
        }
        loaded
    }

    /// Why the wgmma candidate kernel is unavailable (None: loaded).
    pub fn nearest_tc_v3_unavailable(&self) -> Option<&str> {
        self.nearest_tc_candidates_unavailable(TcCandidates::V3)
    }

    /// The loaded wgmma candidate kernel (for its attributes), if any.
    pub fn nearest_tc_v3_function(&self) -> Option<&CudaFunction> {
        self.nearest_tc_sm90a_fn(TcCandidates::V3).ok()
    }

    /// The candidate kernel a tensor-core search runs: `LLM4DSR_NEAREST_TC_CANDIDATES=v2..v6`
    /// when set, else the first of v5, v3, v2 that loads (v5 and v3 on H100/H200; v5 is
    /// 1.2-1.3x v3 at 1M x 4096 on an H200, docs/kernels.md section 8e).
    pub fn tc_candidates(&self) -> Result<TcCandidates> {
        match std::env::var("LLM4DSR_NEAREST_TC_CANDIDATES").as_deref() {
            Ok("v2") => Ok(TcCandidates::V2),
            Ok("v3") => Ok(TcCandidates::V3),
            Ok("v4") => Ok(TcCandidates::V4),
            Ok("v5") => Ok(TcCandidates::V5),
            Ok("v6") => Ok(TcCandidates::V6),
            Ok(other) => {
                bail!("LLM4DSR_NEAREST_TC_CANDIDATES={other:?}: expected v2, v3, v4, v5 or v6")
            }
            Err(_) => {
                let cand = [TcCandidates::V5, TcCandidates::V3]
                    .into_iter()
                    .find(|&c| self.nearest_tc_sm90a_fn(c).is_ok())
                    .unwrap_or(TcCandidates::V2);
                info_once(format!(
                    "kernels: grounding candidates {cand:?} serve the tensor-core search"
                ));
                Ok(cand)
            }
        }
    }

    /// Why the tensor-core grounding is unavailable on this device (None: it is loaded).
    pub fn nearest_tc_unavailable(&self) -> Option<&str> {
        self.nearest_tc_fns().err()
    }

    /// Scale, round to f16 and describe `rows` rows of `x` (device f32 [rows, d]) for the
    /// tensor-core search: returns the f16 rows and the records (4 f32 per row).
    fn tc_prep(
        &self,
        x: &CudaSlice<f32>,
        norms: &CudaSlice<f32>,
        rows: usize,
        d: usize,
        coef: f32,
    ) -> Result<(CudaSlice<u16>, CudaSlice<f32>)> {
        let f = self.nearest_tc_fns().map_err(|e| anyhow!("{e}"))?;
        let mut x16 = self.stream.alloc_zeros::<u16>((rows * d).max(1))?;
        let mut info = self.stream.alloc_zeros::<f32>((rows * 4).max(4))?;
        let (r, di) = (rows as i32, d as i32);
        let mut b = self.stream.launch_builder(&f.prep);
        b.arg(x).arg(norms).arg(&r).arg(&di).arg(&coef);
        b.arg(&mut x16).arg(&mut info);
        // SAFETY: arguments match nearest_tc_prep; outputs sized rows x d and rows x 4.
        unsafe { b.launch(cfg(launch::nearest_tc_prep_shape(rows))) }
            .context("launching nearest_tc_prep")?;
        Ok((x16, info))
    }

    /// Prepare a device catalogue [n, d] for the tensor-core search with these exclusions
    /// (synchronous: checks the norms are finite and every row's scale is in range; refused
    /// otherwise, and the caller takes the f32 kernel).
    pub fn tc_catalog(
        &self,
        catalog: &CudaSlice<f32>,
        n: usize,
        d: usize,
        exclude: &[u32],
    ) -> Result<TcCatalog> {
        let mut cnorm = self.row_norms(catalog, n, d)?;
        let norms = self.stream.clone_dtoh(&cnorm)?;
        if let Some(j) = norms.iter().position(|x| !x.is_finite()) {
            bail!("nearest_items: catalogue row {j} has a non-finite norm");
        }
        let c2max = norms.iter().cloned().fold(0f32, f32::max);
        self.exclude_rows(&mut cnorm, n, exclude)?;
        let (c16, info) = self.tc_prep(catalog, &cnorm, n, d, tc_bound(d).coef_c)?;
        let rec = self.stream.clone_dtoh(&info)?;
        if let Some(j) = rec.chunks_exact(4).position(|r| r[3] != 0.0) {
            bail!("nearest tc: catalogue row {j} has values outside [2^-41, 2^40]: f32 path");
        }
        Ok(TcCatalog {
            c16,
            info,
            cnorm,
            c2max,
            n,
            d,
        })
    }

    /// Launch the tensor-core search of the device queries [b, d] in a prepared catalogue:
    /// query norms and prep, candidates, re-rank and certificate (asynchronous).
    pub fn nearest_tc_launch(
        &self,
        queries: &CudaSlice<f32>,
        b: usize,
        catalog: &CudaSlice<f32>,
        cat: &TcCatalog,
        k: usize,
    ) -> Result<TcPending> {
        self.nearest_tc_launch_with(queries, b, catalog, cat, k, self.tc_candidates()?)
    }

    /// [`Self::nearest_tc_launch`] with an explicit candidate kernel (tests and benchmarks
    /// compare the two in one process).
    pub fn nearest_tc_launch_with(
        &self,
        queries: &CudaSlice<f32>,
        b: usize,
        catalog: &CudaSlice<f32>,
        cat: &TcCatalog,
        k: usize,
        cand: TcCandidates,
    ) -> Result<TcPending> {
        let slices = crate::nearest_tc::tc_slices_from_env()?;
        self.nearest_tc_launch_sliced(queries, b, catalog, cat, k, cand, slices, None)
    }

    /// [`Self::nearest_tc_launch_with`] with the catalogue cut into `slices` slices (None: the
    /// plan's choice; the benchmark sweeps it), and with `cand_fn` as the candidate kernel
    /// when given (None: `cand`'s own; the benchmark passes builds of it with other options,
    /// e.g. where the epilogue reads the row records from, [`crate::nearest_tc::TcRecords`],
    /// which must have `cand`'s signature and launch shape).
    #[allow(clippy::too_many_arguments)]
    pub fn nearest_tc_launch_sliced(
        &self,
        queries: &CudaSlice<f32>,
        b: usize,
        catalog: &CudaSlice<f32>,
        cat: &TcCatalog,
        k: usize,
        cand: TcCandidates,
        slices: Option<u32>,
        cand_fn: Option<&CudaFunction>,
    ) -> Result<TcPending> {
        let cand_fn = match cand_fn {
            Some(f) => f,
            None => self.nearest_tc_candidate_fn(cand)?,
        };
        let plan = launch::nearest_tc_plan_sliced(cand, b, cat.n, cat.d, k, self.sm_count, slices)?;
        let qnorm = self.row_norms(queries, b, cat.d)?;
        self.nearest_tc_launch_planned(queries, qnorm, catalog, cat, plan, cand_fn)
    }

    /// Launch a planned search whose query norms (`qnorm`, [`Self::row_norms`] of `queries`)
    /// are computed: query prep, candidates (`cand_fn`, the plan's kernel or a build of it),
    /// re-rank and certificate (asynchronous).
    fn nearest_tc_launch_planned(
        &self,
        queries: &CudaSlice<f32>,
        qnorm: CudaSlice<f32>,
        catalog: &CudaSlice<f32>,
        cat: &TcCatalog,
        plan: launch::NearestTcPlan,
        cand_fn: &CudaFunction,
    ) -> Result<TcPending> {
        let f = self.nearest_tc_fns().map_err(|e| anyhow!("{e}"))?;
        let (b, k, d) = (plan.queries as usize, plan.k as usize, cat.d);
        let (q16, qinfo) = self.tc_prep(queries, &qnorm, b, d, tc_bound(d).coef_q)?;
        let s = &self.stream;
        let mut pending = TcPending {
            plan,
            qnorm,
            q16,
            qinfo,
            cand_k: s.alloc_zeros::<f32>(plan.candidates_len)?,
            cand_i: s.alloc_zeros::<u32>(plan.candidates_len)?,
            out_d: s.alloc_zeros::<f32>(b * k)?,
            out_i: s.alloc_zeros::<u32>(b * k)?,
            margin: s.alloc_zeros::<f32>(b)?,
            status: s.alloc_zeros::<u32>(b)?,
        };
        self.nearest_tc_candidates_with(&mut pending, cat, cand_fn)?;
        self.nearest_tc_rerank_with(&mut pending, queries, catalog, cat, &f.rerank)?;
        Ok(pending)
    }

    /// Launch the first-level re-rank and certificate of a search whose candidates are
    /// launched (`func`: `nearest_tc_rerank`, or for the benchmark's diagnostics a build of it
    /// with other `NT_DOT_*` settings, [`Self::load_nearest_tc_variant`]). Asynchronous.
    pub fn nearest_tc_rerank_with(
        &self,
        p: &mut TcPending,
        queries: &CudaSlice<f32>,
        catalog: &CudaSlice<f32>,
        cat: &TcCatalog,
        func: &CudaFunction,
    ) -> Result<()> {
        let plan = p.plan;
        let (bi, di, ki) = (plan.queries as i32, cat.d as i32, plan.k as i32);
        let slices = plan.split.slices as i32;
        let mut lb = self.stream.launch_builder(func);
        lb.arg(queries)
            .arg(catalog)
            .arg(&p.qnorm)
            .arg(&cat.cnorm)
            .arg(&p.qinfo);
        lb.arg(&p.cand_k).arg(&p.cand_i);
        lb.arg(&bi).arg(&di).arg(&ki).arg(&slices).arg(&cat.c2max);
        lb.arg(&mut p.out_d)
            .arg(&mut p.out_i)
            .arg(&mut p.margin)
            .arg(&mut p.status);
        // SAFETY: arguments match nearest_tc_rerank; outputs b x k and b (allocated with the
        // plan); the dynamic shared memory (the plan's) was opted in at load.
        unsafe { lb.launch(cfg(plan.rerank)) }.context("launching nearest_tc_rerank")?;
        Ok(())
    }

    /// Benchmark diagnostics: `nearest_tc.cu`'s kernels `names` built with extra `-D` options
    /// (e.g. `-DNT_DOT_STAGES=0`, the re-rank's plain loop), with the re-rank's dynamic shared
    /// memory opted in.
    pub fn load_nearest_tc_variant(
        &self,
        names: &[&str],
        defines: &[&str],
    ) -> Result<Vec<CudaFunction>> {
        self.load_with_smem(
            self.arch,
            "nearest_tc.cu",
            NEAREST_TC_CU,
            names,
            launch::NTC_RERANK_SMEM,
            defines,
        )
    }

    /// Launch the candidate kernel `func` of a search into its buffers (asynchronous): the
    /// plan's kernel from [`Self::nearest_tc_launch_sliced`], or for the benchmark's
    /// diagnostics a variant with the same signature and shape (e.g. from
    /// [`Self::load_sm90a_variant`]) run again on a pending search's inputs.
    pub fn nearest_tc_candidates_with(
        &self,
        p: &mut TcPending,
        cat: &TcCatalog,
        func: &CudaFunction,
    ) -> Result<()> {
        let plan = p.plan;
        let (bi, ni, di) = (plan.queries as i32, cat.n as i32, cat.d as i32);
        let per_slice = plan.split.per_slice as i32;
        let maps = self.tc_candidate_maps(plan.cand, &p.q16, plan.queries as usize, cat)?;
        let mut lb = self.stream.launch_builder(func);
        lb.arg(&p.q16).arg(&cat.c16).arg(&p.qinfo).arg(&cat.info);
        lb.arg(&bi).arg(&ni).arg(&di).arg(&per_slice);
        lb.arg(&mut p.cand_k).arg(&mut p.cand_i);
        if let Some((map_q, map_c)) = maps.as_ref() {
            lb.arg(map_q).arg(map_c);
        }
        // SAFETY: arguments match nearest_tc_candidates (v3, v4: the same signature; v5, v6:
        // the same followed by the tensor maps of q16 and c16, passed above); outputs sized by
        // the plan; the dynamic shared memory (the plan's) was opted in at load.
        unsafe { lb.launch(cfg(plan.candidates)) }.context("launching nearest_tc_candidates")?;
        Ok(())
    }

    /// The candidate kernel function of a plan (for [`Self::nearest_tc_candidates_with`]).
    pub fn nearest_tc_candidate_fn(&self, cand: TcCandidates) -> Result<&CudaFunction> {
        let f = match cand {
            TcCandidates::V2 => self.nearest_tc_fns().map(|f| &f.candidates),
            _ => self.nearest_tc_sm90a_fn(cand),
        };
        f.map_err(|e| anyhow!("nearest tc {cand:?} candidates unavailable: {e}"))
    }

    /// The tensor maps the v5 / v6 candidate kernels read their f16 rows through (queries
    /// [b, d] in boxes of 128 rows, the catalogue [n, d] in boxes of 256, v6: 128); None for
    /// the other kernels.
    fn tc_candidate_maps(
        &self,
        cand: TcCandidates,
        q16: &CudaSlice<u16>,
        b: usize,
        cat: &TcCatalog,
    ) -> Result<Option<(TensorMap, TensorMap)>> {
        let (box_q, box_c) = match cand {
            TcCandidates::V5 => launch::FUSED5_BOX_ROWS,
            // v6: each block of a pair copies half of the catalogue tile (multicast).
            TcCandidates::V6 => launch::FUSED6_BOX_ROWS,
            _ => return Ok(None),
        };
        Ok(Some((
            self.tensor_map_k_major(q16, b, cat.d, box_q, false)
                .with_context(|| format!("nearest tc {cand:?}: the queries' tensor map"))?,
            self.tensor_map_k_major(&cat.c16, cat.n, cat.d, box_c, false)
                .with_context(|| format!("nearest tc {cand:?}: the catalogue's tensor map"))?,
        )))
    }

    /// Wait for a launched tensor-core search; for the queries the first level did not
    /// certify, run the second (`nearest_tc_rerank_all`), and for those it does not certify
    /// either, the f32 kernel. Returns the top-k (equal to the f32 kernel's) and the counts.
    pub fn nearest_tc_finish(
        &self,
        mut p: TcPending,
        queries: &CudaSlice<f32>,
        catalog: &CudaSlice<f32>,
        cat: &TcCatalog,
    ) -> Result<(Nearest, TcStats)> {
        let f = self.nearest_tc_fns().map_err(|e| anyhow!("{e}"))?;
        let (b, k, d, n) = (p.plan.queries as usize, p.plan.k as usize, cat.d, cat.n);
        self.stream.synchronize().context("nearest tc kernels")?;
        let status = self.stream.clone_dtoh(&p.status)?;
        let margin = self.stream.clone_dtoh(&p.margin)?;
        let refused: Vec<u32> = (0..b as u32).filter(|&q| status[q as usize] == 0).collect();
        let mut stats = TcStats {
            queries: b,
            min_margin: margin.iter().cloned().fold(f32::INFINITY, f32::min),
            ..Default::default()
        };
        let mut failed = Vec::new();
        if !refused.is_empty() {
            let m = refused.len();
            let rows = self.stream.clone_htod(&refused)?;
            let (mi, bi, di, ki) = (m as i32, b as i32, d as i32, k as i32);
            let slices = p.plan.split.slices as i32;
            let mut lb = self.stream.launch_builder(&f.rerank_all);
            lb.arg(queries)
                .arg(catalog)
                .arg(&p.qnorm)
                .arg(&cat.cnorm)
                .arg(&p.qinfo);
            lb.arg(&p.cand_k).arg(&p.cand_i).arg(&rows);
            lb.arg(&mi)
                .arg(&bi)
                .arg(&di)
                .arg(&ki)
                .arg(&slices)
                .arg(&cat.c2max);
            lb.arg(&mut p.out_d)
                .arg(&mut p.out_i)
                .arg(&mut p.margin)
                .arg(&mut p.status);
            let shape = launch::nearest_tc_rerank_all_shape(m);
            // SAFETY: arguments match nearest_tc_rerank_all; rows < b; outputs b x k and b.
            unsafe { lb.launch(cfg(shape)) }.context("launching nearest_tc_rerank_all")?;
            self.stream
                .synchronize()
                .context("nearest tc second level")?;
            let status = self.stream.clone_dtoh(&p.status)?;
            failed = refused
                .iter()
                .copied()
                .filter(|&q| status[q as usize] == 0)
                .collect();
            stats.deep = m - failed.len();
        }
        stats.fallback = failed.len();
        stats.certified = b - failed.len();
        let mut dist2 = self.stream.clone_dtoh(&p.out_d)?;
        let mut index = self.stream.clone_dtoh(&p.out_i)?;
        if !failed.is_empty() {
            let m = failed.len();
            let rows = self.stream.clone_htod(&failed)?;
            let mut fq = self.stream.alloc_zeros::<f32>(m * d)?;
            let mut fqn = self.stream.alloc_zeros::<f32>(m)?;
            for (src, dst, width) in [(queries, &mut fq, d), (&p.qnorm, &mut fqn, 1)] {
                let (mi, wi) = (m as i32, width as i32);
                let mut lb = self.stream.launch_builder(&f.gather);
                lb.arg(src).arg(&rows).arg(&mi).arg(&wi).arg(dst);
                // SAFETY: arguments match nearest_tc_gather; dst sized m x width, rows < b.
                unsafe { lb.launch(cfg(launch::gather_shape(m * width))) }
                    .context("launching nearest_tc_gather")?;
            }
            let (od, oi, plan) = self.nearest_device(&fq, &fqn, catalog, &cat.cnorm, m, n, d, k)?;
            self.stream
                .synchronize()
                .context("nearest fallback kernels")?;
            let fb = merge_candidates(
                &self.stream.clone_dtoh(&od)?,
                &self.stream.clone_dtoh(&oi)?,
                plan.split.slices as usize,
                m,
                k,
            )?;
            for (j, &q) in failed.iter().enumerate() {
                let (a, z) = (q as usize * k, j * k);
                dist2[a..a + k].copy_from_slice(&fb.dist2[z..z + k]);
                index[a..a + k].copy_from_slice(&fb.index[z..z + k]);
            }
        }
        Ok((Nearest { k, index, dist2 }, stats))
    }

    /// [`crate::nearest_items`] on the tensor cores: upload, prepare, search, certificate,
    /// f32 fallback. Refused (Err) where the plan or the catalogue does not fit the path.
    pub fn nearest_items_tc(
        &self,
        queries: &[f32],
        catalog: &[f32],
        d: usize,
        k: usize,
        exclude: &[u32],
    ) -> Result<(Nearest, TcStats)> {
        self.nearest_items_tc_with(queries, catalog, d, k, exclude, self.tc_candidates()?)
    }

    /// [`Self::nearest_items_tc`] with an explicit candidate kernel.
    pub fn nearest_items_tc_with(
        &self,
        queries: &[f32],
        catalog: &[f32],
        d: usize,
        k: usize,
        exclude: &[u32],
        cand: TcCandidates,
    ) -> Result<(Nearest, TcStats)> {
        check_nearest_args(queries, catalog, d)?;
        let b = queries.len() / d;
        let n = catalog.len() / d;
        let k = effective_k(k, n, exclude);
        if k == 0 || b == 0 {
            let empty = Nearest {
                k,
                index: vec![],
                dist2: vec![],
            };
            return Ok((empty, TcStats::default()));
        }
        launch::nearest_tc_plan_with(cand, b, n, d, k, self.sm_count)?;
        let q = self.stream.clone_htod(queries)?;
        let c = self.stream.clone_htod(catalog)?;
        let cat = self.tc_catalog(&c, n, d, exclude)?;
        let p = self.nearest_tc_launch_with(&q, b, &c, &cat, k, cand)?;
        self.nearest_tc_finish(p, &q, &c, &cat)
    }

    /// [`crate::nearest_items`] with an explicit kernel version. Tc falls back to the f32
    /// kernel (logged) where it cannot serve: k > 16, d % 8 != 0, unavailable, a catalogue row
    /// out of its scale range.
    pub fn nearest_items_version(
        &self,
        queries: &[f32],
        catalog: &[f32],
        d: usize,
        k: usize,
        exclude: &[u32],
        version: NearestVersion,
    ) -> Result<Nearest> {
        if version == NearestVersion::Tc && k <= TC_KMAX && d.is_multiple_of(8) {
            match self.nearest_items_tc(queries, catalog, d, k, exclude) {
                Ok((r, st)) => {
                    tracing::debug!(
                        "nearest tc: {} queries, {} certified ({} at the second level), {} \
                         through the f32 kernel",
                        st.queries,
                        st.certified,
                        st.deep,
                        st.fallback
                    );
                    return Ok(r);
                }
                Err(e) => tracing::warn!("nearest tc refused ({e:#}); f32 kernel"),
            }
        }
        self.nearest_items_f32(queries, catalog, d, k, exclude)
    }

    /// Upload `catalog` [n, d] once for [`Self::nearest_in`]: norms (refused when one is not
    /// finite), exclusions, and the tensor-core preparation when `version` is tc and the
    /// catalogue fits it (otherwise the searches take the f32 kernel, logged once here).
    pub fn device_catalog(
        &self,
        catalog: &[f32],
        d: usize,
        exclude: &[u32],
        version: NearestVersion,
    ) -> Result<DeviceCatalog> {
        check_nearest_args(&[], catalog, d)?;
        let rows = self.stream.clone_htod(catalog)?;
        self.device_catalog_on(rows, catalog.len() / d, d, exclude, version)
    }

    /// [`Self::device_catalog`] for rows already on the device ([n, d] f32; e.g. embeddings
    /// a GPU forward produced, or the benchmark's device-side fill), taken over.
    pub fn device_catalog_on(
        &self,
        rows: CudaSlice<f32>,
        n: usize,
        d: usize,
        exclude: &[u32],
        version: NearestVersion,
    ) -> Result<DeviceCatalog> {
        if d == 0 || rows.len() < n * d {
            bail!(
                "device catalogue: {} values for {n} rows of width {d}",
                rows.len()
            );
        }
        let ex = excluded_rows(exclude, n);
        let mut cnorm = self.row_norms(&rows, n, d)?;
        let norms = self.stream.clone_dtoh(&cnorm)?;
        if let Some(j) = norms.iter().position(|x| !x.is_finite()) {
            bail!("nearest_items: catalogue row {j} has a non-finite norm");
        }
        self.exclude_rows(&mut cnorm, n, &ex)?;
        let tc = if version == NearestVersion::Tc && d.is_multiple_of(8) && n > 0 {
            match self.tc_catalog(&rows, n, d, &ex) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!("nearest tc refused for this catalogue ({e:#}); f32 kernel");
                    None
                }
            }
        } else {
            None
        };
        self.stream
            .synchronize()
            .context("preparing the device catalogue")?;
        Ok(DeviceCatalog {
            rows,
            cnorm,
            tc,
            n,
            d,
            exclude: ex,
        })
    }

    /// Top-k of `queries` [b, d] in an uploaded catalogue: the tensor-core search when the
    /// catalogue was prepared for it and k <= 16, else the f32 kernel. Equal to
    /// [`crate::nearest_items`] on the same rows (both paths return the f32 kernel's top-k).
    ///
    /// The queries are validated on the device, from the norms the search needs anyway (one
    /// download of b floats), not by a host pass over b x d values: a query with a
    /// non-finite value, or whose squared norm overflows f32, is refused with a [`BadQuery`]
    /// naming it.
    pub fn nearest_in(&self, cat: &DeviceCatalog, queries: &[f32], k: usize) -> Result<Nearest> {
        let (n, d) = (cat.n, cat.d);
        check_nearest_lengths(queries, &[], d)?;
        let b = queries.len() / d;
        let k = effective_k(k, n, &cat.exclude);
        if k == 0 || b == 0 {
            check_nearest_args(queries, &[], d)?;
            return Ok(Nearest {
                k,
                index: vec![],
                dist2: vec![],
            });
        }
        let q = self.stream.clone_htod(queries)?;
        let qn = self.row_norms(&q, b, d)?;
        let norms = self.stream.clone_dtoh(&qn)?;
        if let Some(i) = norms.iter().position(|x| !x.is_finite()) {
            let row = &queries[i * d..(i + 1) * d];
            return Err(match row.iter().position(|x| !x.is_finite()) {
                Some(j) => BadQuery(format!(
                    "nearest_items: query {i} has a non-finite value at dim {j}"
                )),
                None => BadQuery(format!(
                    "nearest_items: query {i}: its squared norm overflows f32 (largest |value| \
                     {:e})",
                    row.iter().fold(0f32, |m, x| m.max(x.abs()))
                )),
            }
            .into());
        }
        if let Some(tc) = cat.tc.as_ref().filter(|_| k <= TC_KMAX) {
            let cand = self.tc_candidates()?;
            let slices = crate::nearest_tc::tc_slices_from_env()?;
            match launch::nearest_tc_plan_sliced(cand, b, n, d, k, self.sm_count, slices) {
                Ok(plan) => {
                    // The query norms computed above (the check) serve the search too.
                    let func = self.nearest_tc_candidate_fn(cand)?;
                    let p = self.nearest_tc_launch_planned(&q, qn, &cat.rows, tc, plan, func)?;
                    let (r, st) = self.nearest_tc_finish(p, &q, &cat.rows, tc)?;
                    tracing::debug!(
                        "nearest tc (resident catalogue): {} queries, {} certified, {} through \
                         the f32 kernel",
                        st.queries,
                        st.certified,
                        st.fallback
                    );
                    return Ok(r);
                }
                Err(e) => tracing::debug!("nearest tc refused ({e:#}); f32 kernel"),
            }
        }
        let (od, oi, plan) = self.nearest_device(&q, &qn, &cat.rows, &cat.cnorm, b, n, d, k)?;
        self.stream.synchronize().context("nearest kernels")?;
        let dist = self.stream.clone_dtoh(&od)?;
        let idx = self.stream.clone_dtoh(&oi)?;
        merge_candidates(&dist, &idx, plan.split.slices as usize, b, k)
    }
}
