//! Which path the kernels take in this process: the CUDA kernels (feature `cuda`, a driver and
//! a GPU present at run time) or the CPU paths. Decided once per process and logged once.
//!
//! Detection opens `libcuda.so.1` with libloading before cudarc touches anything: cudarc's
//! fallback loader panics when the library is missing, and a GPU-less machine is normal here.
//! `LLM4DSR_KERNELS=cpu` forces the CPU path; `=cuda` makes a failed GPU start an error in
//! the log (still falling back, never aborting a stage); unset or `auto`: use a GPU if present.

use std::sync::OnceLock;

/// Where the kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Cuda,
}

/// The environment variable that overrides the choice (`cpu`, `cuda`, `auto`).
pub const KERNELS_ENV: &str = "LLM4DSR_KERNELS";

/// Is a CUDA driver loadable in this process? (Cached; no CUDA call is made.)
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        // SAFETY: loading libcuda runs its initialisers only; no symbol is called here.
        unsafe { libloading::Library::new("libcuda.so.1") }.is_ok()
    })
}

/// Is NVRTC loadable (the run-time CUDA C compiler; needs no GPU)? Probes the names cudarc
/// tries for CUDA 13. Used by the compile check of the `.cu` sources.
pub fn nvrtc_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        ["libnvrtc.so", "libnvrtc.so.13"]
            .iter()
            // SAFETY: as above; no symbol is called.
            .any(|n| unsafe { libloading::Library::new(n) }.is_ok())
    })
}

/// What `LLM4DSR_KERNELS` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Auto,
    Cpu,
    Cuda,
}

pub fn request() -> Request {
    match std::env::var(KERNELS_ENV).ok().as_deref().map(str::trim) {
        Some("cpu") => Request::Cpu,
        Some("cuda") | Some("gpu") => Request::Cuda,
        _ => Request::Auto,
    }
}

/// The backend the dispatching functions ([`crate::item_loglik`], [`crate::nearest_items`])
/// will try first. `Cuda` here means "try the GPU": if its start fails, `cuda::kernels()`
/// returns None and the CPU path runs.
pub fn backend() -> Backend {
    static CHOICE: OnceLock<Backend> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let (b, why) = decide(cfg!(feature = "cuda"), request(), driver_present());
        match b {
            Backend::Cuda => tracing::info!("kernels: {why}"),
            Backend::Cpu => tracing::info!("kernels: CPU path ({why})"),
        }
        b
    })
}

/// The GPU this process uses (for the kernels and, through [`device_ordinal`], the LLM
/// forward): set once by the command line from the rank's local rank
/// (`llm4dsr_comm::gpu_ordinal` over [`visible_devices`]) before the first GPU use; 0 when
/// never set.
static ORDINAL: OnceLock<usize> = OnceLock::new();

/// Choose this process's GPU. Only the first call counts (the kernels may already be
/// running on it); returns the ordinal in force.
pub fn set_device_ordinal(ordinal: usize) -> usize {
    *ORDINAL.get_or_init(|| ordinal)
}

/// The GPU ordinal in force ([`set_device_ordinal`], default 0).
pub fn device_ordinal() -> usize {
    ORDINAL.get().copied().unwrap_or(0)
}

/// GPUs this process can see: the driver's device count (after CUDA_VISIBLE_DEVICES), 0 when
/// built without `cuda`, without a driver, or when the count fails.
pub fn visible_devices() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        #[cfg(feature = "cuda")]
        if driver_present() {
            // cudarc's loader panics when a library is missing: contain it.
            let n = std::panic::catch_unwind(|| {
                cudarc::driver::CudaContext::device_count().unwrap_or(0)
            })
            .unwrap_or(0);
            return n.max(0) as usize;
        }
        0
    })
}

/// Start (`true`) or stop (`false`) the attached profiler's collection (cuProfilerStart/Stop;
/// `ncu --profile-from-start off` then records only the kernels in between). Does nothing
/// without `cuda` or a driver; a profiler that is not attached ignores it.
pub fn profiler(on: bool) {
    #[cfg(feature = "cuda")]
    if driver_present() {
        let r = if on {
            cudarc::driver::profiler_start()
        } else {
            cudarc::driver::profiler_stop()
        };
        if let Err(e) = r {
            tracing::warn!("profiler {}: {e}", if on { "start" } else { "stop" });
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = on;
}

/// The decision as a pure function (unit tested).
pub fn decide(compiled: bool, req: Request, driver: bool) -> (Backend, &'static str) {
    match (compiled, req, driver) {
        (_, Request::Cpu, _) => (Backend::Cpu, "LLM4DSR_KERNELS=cpu"),
        (false, _, _) => (
            Backend::Cpu,
            "built without feature `cuda`; rebuild with --features cuda for the GPU kernels",
        ),
        (true, _, false) => (
            Backend::Cpu,
            "no GPU: libcuda.so.1 could not be loaded (no NVIDIA driver on this machine)",
        ),
        (true, _, true) => (Backend::Cuda, "libcuda.so.1 found; using the CUDA kernels"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_table() {
        assert_eq!(decide(true, Request::Auto, true).0, Backend::Cuda);
        assert_eq!(decide(true, Request::Cuda, true).0, Backend::Cuda);
        assert_eq!(decide(true, Request::Cpu, true).0, Backend::Cpu);
        assert_eq!(decide(true, Request::Auto, false).0, Backend::Cpu);
        assert_eq!(decide(false, Request::Cuda, true).0, Backend::Cpu);
        assert!(decide(true, Request::Auto, false)
            .1
            .contains("libcuda.so.1"));
    }

    #[test]
    fn detection_agrees_with_the_filesystem() {
        // Whatever this machine is, the probe must not panic and must be stable.
        assert_eq!(driver_present(), driver_present());
        if !cfg!(feature = "cuda") {
            assert_eq!(backend(), Backend::Cpu);
        }
    }
}
