//! The CUDA C sources of `kernels/`, embedded with `include_str!` so the binary carries them to
//! the GPU machine, and the NVRTC options they are compiled with. Free of any CUDA dependency:
//! the default (CPU) build checks here that every kernel the wrappers launch exists and that
//! every tile constant the wrappers assume is set from [`crate::launch`].

use anyhow::{bail, Result};

pub const ITEM_LOGLIK_LOGITS_CU: &str = include_str!("../../../kernels/item_loglik_logits.cu");
pub const ITEM_LOGLIK_FUSED_CU: &str = include_str!("../../../kernels/item_loglik_fused.cu");
/// Version 2a of the tensor-core fused kernel (the default on sm_80..sm_89; `LLM4DSR_FUSED_VERSION=v2`).
pub const ITEM_LOGLIK_FUSED_V2_CU: &str = include_str!("../../../kernels/item_loglik_fused_v2.cu");
/// Version 3 of the tensor-core fused kernel: wgmma on sm_90a (the default on compute capability
/// 9.0; `LLM4DSR_FUSED_VERSION=v3`).
pub const ITEM_LOGLIK_FUSED_V3_CU: &str = include_str!("../../../kernels/item_loglik_fused_v3.cu");
/// The tensor-core grounding's candidate kernel on wgmma (sm_90a; the default there).
pub const NEAREST_TC_V3_CU: &str = include_str!("../../../kernels/nearest_tc_v3.cu");
/// The machinery the sm_90a kernels share (wgmma main loop, descriptors, copies): compiled in
/// front of each of them ([`sm90a_source`]), since NVRTC gets no include files.
pub const WGMMA_COMMON_CUH: &str = include_str!("../../../kernels/wgmma_common.cuh");
/// NVRTC architecture of the sm_90a sources: wgmma is an "architecture-specific" feature, so
/// their PTX is compute_90a, which the driver JITs for compute capability 9.0 only.
pub const FUSED3_ARCH: &str = "compute_90a";

/// The text NVRTC compiles for an sm_90a kernel file: `wgmma_common.cuh`, then the file.
pub fn sm90a_source(src: &str) -> String {
    format!("{WGMMA_COMMON_CUH}\n#line 1\n{src}")
}
pub const NEAREST_CU: &str = include_str!("../../../kernels/nearest.cu");
/// The tensor-core grounding search (the default GPU search: `LLM4DSR_NEAREST_VERSION=tc`).
pub const NEAREST_TC_CU: &str = include_str!("../../../kernels/nearest_tc.cu");
/// Typedefs and 16-bit float conversions the decoder kernels share ([`with_float16`]).
pub const FLOAT16_CUH: &str = include_str!("../../../kernels/float16.cuh");

/// The text NVRTC compiles for a decoder kernel file: `float16.cuh`, then the file.
pub fn with_float16(src: &str) -> String {
    format!("{FLOAT16_CUH}\n#line 1\n{src}")
}

/// The decoder attention's masked, scaled softmax (launched on candle's stream by
/// [`crate::attention::masked_softmax`] in a `candle-cuda` build).
pub const ATTENTION_SOFTMAX_CU: &str = include_str!("../../../kernels/attention_softmax.cu");
/// The decoder's gathers between token-major and heads-first layouts, and SwiGLU's middle
/// (launched on candle's stream by [`crate::decoder_ops`] in a `candle-cuda` build).
pub const DECODER_OPS_CU: &str = include_str!("../../../kernels/decoder_ops.cu");
/// Device-side random fills for the benchmarks (not used by the stages).
pub const BENCH_FILL_CU: &str = include_str!("../../../kernels/bench_fill.cu");

/// NVRTC `--gpu-architecture` for a compute capability (virtual arch: the driver JITs it).
pub fn nvrtc_arch(cc: (i32, i32)) -> Result<&'static str> {
    Ok(match cc {
        (9, 0) => "compute_90",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        (major, _) if major >= 9 => "compute_90",
        (8, _) => "compute_80",
        _ => bail!(
            "compute capability {}.{} < 8.0: the bf16 tensor-core kernels need sm_80+",
            cc.0,
            cc.1
        ),
    })
}

/// The `-D` options that pin the `.cu` tile constants to [`crate::launch`]'s.
pub fn nvrtc_defines() -> Vec<String> {
    use crate::launch::*;
    vec![
        format!("-DFUSED_BM={FUSED_BM}"),
        format!("-DFUSED_BN={FUSED_BN}"),
        format!("-DFUSED_TC_BK={FUSED_TC_BK}"),
        format!("-DFUSED_TC_THREADS={FUSED_TC_THREADS}"),
        format!("-DFUSED_F32_BK={FUSED_F32_BK}"),
        format!("-DFUSED2_BM={FUSED2_BM}"),
        format!("-DFUSED2_BN={FUSED2_BN}"),
        format!("-DFUSED2_BK={FUSED2_BK}"),
        format!("-DFUSED2_STAGES={FUSED2_STAGES}"),
        format!("-DFUSED2_THREADS={FUSED2_THREADS}"),
        format!("-DFUSED3_BM={FUSED3_BM}"),
        format!("-DFUSED3_BN={FUSED3_BN}"),
        format!("-DFUSED3_BK={FUSED3_BK}"),
        format!("-DFUSED3_STAGES={FUSED3_STAGES}"),
        format!("-DFUSED3_THREADS={FUSED3_THREADS}"),
        format!("-DFUSED_F32_THREADS={FUSED_F32_THREADS}"),
        format!("-DLOGITS_THREADS={LOGITS_THREADS}"),
        format!("-DNEAREST_BQ={NEAREST_BQ}"),
        format!("-DNEAREST_BI={NEAREST_BI}"),
        format!("-DNEAREST_BK={NEAREST_BK}"),
        format!("-DNEAREST_THREADS={NEAREST_THREADS}"),
        format!("-DNTC_BM={NTC_BM}"),
        format!("-DNTC_BN={NTC_BN}"),
        format!("-DNTC_BK={NTC_BK}"),
        format!("-DNTC_STAGES={NTC_STAGES}"),
        format!("-DNTC_THREADS={NTC_THREADS}"),
        format!("-DNTC_LIST={NTC_LIST}"),
        format!("-DNTC_RERANK_WARPS={NTC_RERANK_WARPS}"),
        format!("-DNT_DOT_STAGES={NTC_DOT_STAGES}"),
        format!("-DNT_DOT_BATCH={NTC_DOT_BATCH}"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_embedded_and_define_every_kernel() {
        for (src, names) in [
            (
                ITEM_LOGLIK_FUSED_CU,
                &[
                    "item_loglik_fused_bf16",
                    "item_loglik_fused_f16",
                    "item_loglik_fused_f32",
                    "item_loglik_combine",
                ][..],
            ),
            (
                ITEM_LOGLIK_FUSED_V2_CU,
                &["item_loglik_fused_v2_bf16", "item_loglik_fused_v2_f16"][..],
            ),
            (
                ITEM_LOGLIK_FUSED_V3_CU,
                &[
                    "item_loglik_fused_v3_bf16",
                    "item_loglik_fused_v3_f16",
                    "item_loglik_fused_v6_bf16",
                    "item_loglik_fused_v6_f16",
                ][..],
            ),
            (
                NEAREST_TC_V3_CU,
                &["nearest_tc_candidates_v3", "nearest_tc_candidates_v6"][..],
            ),
            (
                ITEM_LOGLIK_LOGITS_CU,
                &["item_loglik_logits", "item_segment_sum"][..],
            ),
            (
                NEAREST_CU,
                &["nearest_topk", "row_sq_norms", "mark_excluded"][..],
            ),
            (
                NEAREST_TC_CU,
                &[
                    "nearest_tc_prep",
                    "nearest_tc_candidates",
                    "nearest_tc_rerank",
                    "nearest_tc_rerank_all",
                    "nearest_tc_gather",
                ][..],
            ),
            (BENCH_FILL_CU, &["fill_f32", "fill_bf16", "fill_ids"][..]),
        ] {
            for n in names {
                assert!(
                    src.contains("extern \"C\" __global__") && src.contains(&format!("{n}(")),
                    "kernel {n} missing"
                );
            }
            assert!(
                !src.contains("#include"),
                "NVRTC sources must not need toolkit headers"
            );
        }
        // Every -D the wrapper passes names a macro the sources guard with #ifndef.
        let all = [
            ITEM_LOGLIK_FUSED_CU,
            ITEM_LOGLIK_FUSED_V2_CU,
            ITEM_LOGLIK_FUSED_V3_CU,
            NEAREST_TC_V3_CU,
            ITEM_LOGLIK_LOGITS_CU,
            NEAREST_CU,
            NEAREST_TC_CU,
        ]
        .concat();
        for def in nvrtc_defines() {
            let name = def.trim_start_matches("-D").split('=').next().unwrap();
            assert!(
                all.contains(&format!("#ifndef {name}")),
                "{name} not configurable"
            );
        }
    }

    /// The v2 source's shared-memory formula is the one launch.rs plans with, and its launch
    /// bounds are those launch.rs's shared-memory test assumes.
    #[test]
    fn v2_source_matches_launch_constants() {
        let src = ITEM_LOGLIK_FUSED_V2_CU;
        assert!(src.contains("#define F2_STAGE_BYTES (F2_A_BYTES + F2_B_BYTES)"));
        assert!(src.contains("#define F2_A_BYTES (FUSED2_BM * FUSED2_BK * 2)"));
        assert!(src.contains("#define F2_B_BYTES (FUSED2_BN * FUSED2_BK * 2)"));
        assert!(src.contains("#define F2_RED_OFFSET (FUSED2_STAGES * F2_STAGE_BYTES)"));
        assert!(src.contains("#define FUSED2_SMEM (F2_RED_OFFSET + 2 * 2 * FUSED2_BM * 4)"));
        assert!(src.contains("__launch_bounds__(FUSED2_THREADS, FUSED2_MIN_BLOCKS)"));
        for ptx in [
            "cp.async.cg.shared.global",
            "ldmatrix.sync.aligned.m8n8.x4",
            "cp.async.wait_group",
        ] {
            assert!(src.contains(ptx), "{ptx}");
        }
    }

    /// The v3 source's shared-memory formula and tile shape are launch.rs's.
    #[test]
    fn v3_source_matches_launch_constants() {
        let src = ITEM_LOGLIK_FUSED_V3_CU;
        assert!(src.contains("#define F3_A_BYTES (FUSED3_BM * FUSED3_BK * 2)"));
        assert!(src.contains("#define F3_B_BYTES (FUSED3_BN * FUSED3_BK * 2)"));
        assert!(src.contains("#define F3_STAGE_BYTES (F3_A_BYTES + F3_B_BYTES)"));
        assert!(src.contains("#define FUSED3_SMEM (FUSED3_STAGES * F3_STAGE_BYTES + 1024)"));
        assert!(src.contains("__launch_bounds__(FUSED3_THREADS, 1)"));
        assert!(src.contains("static_assert(FUSED3_SMEM == WG_RING_BYTES"));
        assert!(WGMMA_COMMON_CUH.contains(&format!(
            "wgmma.mma_async.sync.aligned.m64n{}k16.f32.bf16.bf16",
            crate::launch::FUSED3_BN
        )));
        assert!(WGMMA_COMMON_CUH.contains("#define WG_BN 256"));
        assert!(WGMMA_COMMON_CUH.contains("#define WG_BM 128"));
        assert!(WGMMA_COMMON_CUH.contains("#define WG_STAGES 4"));
        // v4: its shared-memory formula is launch.rs's FUSED4_SMEM.
        assert!(src.contains("#define FUSED4_SMEM WG4_SMEM"));
        for def in [
            "#define WG4_NB 5",
            "#define WG4_NA 4",
            "#define WG4_A_SLOT (64 * WG_BK * 2)",
            "#define WG4_A_OFF (WG4_NB * WG_B_BYTES)",
            "#define WG4_BAR_OFF (WG4_A_OFF + 2 * WG4_NA * WG4_A_SLOT)",
            "#define WG4_SMEM (WG4_BAR_OFF + 128 + 1024)",
        ] {
            assert!(WGMMA_COMMON_CUH.contains(def), "{def}");
        }
        // v5: threads and shared memory are launch.rs's FUSED5_THREADS / FUSED5_SMEM
        // (4 stages of A + B, 128 B of mbarriers, 1 KB of slack); boxes 64 deep (BK).
        assert!(src.contains("#define FUSED5_SMEM WG5_SMEM"));
        assert!(src.contains("__launch_bounds__(WG5_THREADS, 1)"));
        for def in [
            format!("#define WG5_THREADS {}", crate::launch::FUSED5_THREADS),
            "#define WG5_STAGES 4".to_string(),
            "#define WG5_BAR_OFF (WG5_STAGES * WG_STAGE_BYTES)".to_string(),
            "#define WG5_SMEM (WG5_BAR_OFF + 128 + 1024)".to_string(),
            format!("#define WG_BK {}", crate::launch::FUSED3_BK),
        ] {
            assert!(WGMMA_COMMON_CUH.contains(&def), "{def}");
        }
        assert_eq!(
            crate::launch::FUSED5_BOX_ROWS,
            (crate::launch::FUSED3_BM, crate::launch::FUSED3_BN)
        );
        // v6: v5's block on clusters of launch.rs's FUSED6_CLUSTER, B boxes of half a tile.
        assert!(WGMMA_COMMON_CUH.contains(&format!(
            "#define WG6_CLUSTER {}",
            crate::launch::FUSED6_CLUSTER
        )));
        assert!(
            src.contains("__cluster_dims__(WG6_CLUSTER, 1, 1) __launch_bounds__(WG5_THREADS, 1)")
        );
        assert_eq!(
            crate::launch::FUSED6_BOX_ROWS,
            (
                crate::launch::FUSED3_BM,
                crate::launch::FUSED3_BN / crate::launch::FUSED6_CLUSTER
            )
        );
    }

    /// The v3 candidate kernel's shared-memory formula is launch.rs's.
    #[test]
    fn nearest_tc_v3_source_matches_launch_constants() {
        let src = NEAREST_TC_V3_CU;
        assert!(src.contains("#define NT3_LIST_OFFSET WG_RING_BYTES"));
        assert!(src.contains("#define NTC3_SMEM (NT3_LIST_OFFSET + 2 * WG_BM * NTC_LIST * 4)"));
        assert!(src.contains("#define NT4_LIST_OFFSET WG4_SMEM"));
        assert!(src.contains("#define NTC4_SMEM (NT4_LIST_OFFSET + 2 * WG_BM * NTC_LIST * 4)"));
        assert!(src.contains("#define NT5_LIST_OFFSET WG5_SMEM"));
        assert!(src.contains("#define NTC5_SMEM (NT5_LIST_OFFSET + 2 * WG_BM * NTC_LIST * 4)"));
        assert!(
            src.contains("__cluster_dims__(WG6_CLUSTER, 1, 1) __launch_bounds__(WG5_THREADS, 1)")
        );
        assert!(src.contains("__launch_bounds__(WG5_THREADS, 1)"));
        assert!(WGMMA_COMMON_CUH.contains("#ifndef WG4_NB"));
        assert!(src.contains("__launch_bounds__(WG_THREADS, 1)"));
        // The record layout is nearest_tc.cu's (the prep kernel writes it).
        let rec = |s: &str| {
            let a = s.find("struct __align__(16) NtInfo {").unwrap();
            s[a..a + s[a..].find("};").unwrap()].to_string()
        };
        assert_eq!(rec(src), rec(NEAREST_TC_CU));
    }

    /// The tensor-core grounding source's shared-memory formula is launch.rs's, and its list
    /// length the certificate's.
    #[test]
    fn nearest_tc_source_matches_launch_constants() {
        let src = NEAREST_TC_CU;
        assert!(src.contains("#define NT_STAGE_BYTES (NT_A_BYTES + NT_B_BYTES)"));
        assert!(src.contains("#define NT_A_BYTES (NTC_BM * NTC_BK * 2)"));
        assert!(src.contains("#define NT_B_BYTES (NTC_BN * NTC_BK * 2)"));
        assert!(src.contains("#define NT_LIST_OFFSET (NTC_STAGES * NT_STAGE_BYTES)"));
        assert!(src.contains("#define NTC_SMEM (NT_LIST_OFFSET + 2 * NTC_BM * NTC_LIST * 4)"));
        assert!(src.contains("__launch_bounds__(NTC_THREADS, 1)"));
        // The re-rank's staging buffers: launch::NTC_RERANK_SMEM's formula.
        assert!(src.contains("#define NT_DOT_SLOT (NT_DOT_BATCH + 1)"));
        assert!(src.contains("#define NT_DOT_STAGE_F4 (32 * NT_DOT_SLOT + NT_DOT_BATCH)"));
        assert!(src.contains("#define NT_DOT_WARP_BYTES (NT_DOT_STAGES * NT_DOT_STAGE_F4 * 16)"));
        assert!(src.contains("#define NTC_RERANK_SMEM (NTC_RERANK_WARPS * NT_DOT_WARP_BYTES)"));
        use crate::launch::{NTC_DOT_BATCH, NTC_DOT_STAGES, NTC_RERANK_SMEM, NTC_RERANK_WARPS};
        assert_eq!(
            NTC_RERANK_SMEM,
            NTC_RERANK_WARPS * NTC_DOT_STAGES * (32 * (NTC_DOT_BATCH + 1) + NTC_DOT_BATCH) * 16
        );
        assert_eq!(NTC_RERANK_SMEM, 113_664);
        // The slack constant is 2^-20, as nearest_tc::tc_slack.
        assert!(src.contains("9.5367431640625e-07"));
        assert_eq!(2f64.powi(-20), 9.5367431640625e-07);
        assert_eq!(crate::launch::NTC_LIST as usize, crate::nearest_tc::TC_LIST);
    }

    #[test]
    fn arch_table() {
        assert_eq!(nvrtc_arch((9, 0)).unwrap(), "compute_90");
        assert_eq!(nvrtc_arch((8, 6)).unwrap(), "compute_86");
        assert!(nvrtc_arch((7, 5)).is_err());
    }
}
