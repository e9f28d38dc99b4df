//! Kernels launched on candle's own CUDA stream, as candle custom ops (feature `candle-cuda`):
//! each `kernels/*.cu` file is NVRTC-compiled once per process for the device's architecture
//! and loaded into candle's context, so the ops take and return candle tensors with no copy and
//! no synchronisation.

use candle_core::cuda_backend::cudarc::driver::CudaFunction;
use candle_core::CudaDevice;
use std::collections::HashMap;
use std::sync::Mutex;

/// Function `name` of kernel file `file` (source `src`, compiled after `kernels/float16.cuh`),
/// compiled on first use; launch it on
/// `dev.cuda_stream()` (candle's stream).
pub(crate) fn func(
    dev: &CudaDevice,
    file: &'static str,
    src: &'static str,
    name: &str,
) -> candle_core::Result<CudaFunction> {
    static PTX: Mutex<Option<HashMap<&'static str, Result<&'static str, String>>>> =
        Mutex::new(None);
    let ptx = {
        let mut cache = PTX.lock().unwrap();
        let cache = cache.get_or_insert_with(HashMap::new);
        cache
            .entry(file)
            .or_insert_with(|| compile(dev, file, src))
            .clone()
    };
    let ptx = ptx.map_err(candle_core::Error::Msg)?;
    Ok(dev
        .get_or_load_custom_func(name, file, ptx)?
        .into_cuda_function())
}

fn compile(dev: &CudaDevice, file: &str, src: &str) -> Result<&'static str, String> {
    let t0 = std::time::Instant::now();
    let cc = dev
        .cuda_stream()
        .context()
        .compute_capability()
        .map_err(|e| format!("compute capability of candle's device: {e}"))?;
    let arch = crate::sources::nvrtc_arch(cc).map_err(|e| e.to_string())?;
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(
        crate::sources::with_float16(src),
        cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            name: Some(file.to_string()),
            ..Default::default()
        },
    )
    .map_err(|e| format!("NVRTC compile of kernels/{file} for {arch}: {e}"))?;
    tracing::debug!("kernels/{file}: NVRTC {:?}", t0.elapsed());
    Ok(Box::leak(ptx.to_src().into_boxed_str()))
}

/// A grid-stride launch over `total` items, 256 threads a block.
pub(crate) fn grid_stride(total: u64) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (total.div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
