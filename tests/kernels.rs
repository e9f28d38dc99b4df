//! Kernels against their f64 references on random inputs.
//!
//! CPU part (runs everywhere, CI included): the f64 reference vs the naive materialising
//! tensor implementation vs the chunked/blocked CPU paths.
//! GPU part (feature `cuda`, and only when a GPU is present; otherwise a visible SKIP line):
//! every CUDA kernel vs the f64 reference, tolerances per dtype, NaN never passes.
//!
//!   cargo test --test kernels                       # CPU part
//!   cargo test --test kernels --features cuda       # + GPU part where a GPU is present

use candle_core::{DType, Device, Tensor};
use llm4dsr_data::rng::{KeyedRng, Purpose};
use llm4dsr_kernels::item_loglik::{item_loglik_cpu, item_loglik_materialised};
use llm4dsr_kernels::nearest::{nearest_items_cpu, nearest_items_naive, Nearest};
use llm4dsr_kernels::{reference, ItemLogLik};

/// A [rows, cols] tensor of N(0, scale^2) draws keyed by `key`, cast to `dtype`.
fn randn(key: u64, rows: usize, cols: usize, scale: f64, dtype: DType) -> Tensor {
    let mut rng = KeyedRng::new(20261127, Purpose::Other, key);
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| (rng.normal() * scale) as f32)
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A tensor's values as f64 / f32, flattened.
fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn rand_vec(key: u64, len: usize, scale: f64) -> Vec<f32> {
    let mut rng = KeyedRng::new(20261127, Purpose::Other, key);
    (0..len).map(|_| (rng.normal() * scale) as f32).collect()
}

/// Random targets and item segments (some items empty) for n tokens.
fn targets_offsets(key: u64, n: usize, v: usize) -> (Vec<u32>, Vec<u32>) {
    let mut rng = KeyedRng::new(20261127, Purpose::Other, key);
    let targets = (0..n).map(|_| rng.below(v as u64) as u32).collect();
    let mut offsets = vec![0u32];
    while (*offsets.last().unwrap() as usize) < n {
        let next = (*offsets.last().unwrap() as usize + rng.below(9) as usize).min(n);
        offsets.push(next as u32);
    }
    (targets, offsets)
}

/// ||a - b|| / ||b||; fails on any non-finite value (NaN never passes).
fn rel_err(what: &str, a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "{what}: length");
    assert!(
        a.iter().chain(b).all(|x| x.is_finite()),
        "{what}: non-finite value"
    );
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

fn check_loglik(what: &str, got: &ItemLogLik, want: &ItemLogLik, tol: f64) {
    let e = rel_err(
        &format!("{what} per_token"),
        &got.per_token,
        &want.per_token,
    );
    assert!(
        e <= tol,
        "{what}: per-token relative error {e:.3e} > {tol:.0e}"
    );
    let e = rel_err(&format!("{what} per_item"), &got.per_item, &want.per_item);
    assert!(
        e <= tol,
        "{what}: per-item relative error {e:.3e} > {tol:.0e}"
    );
}

/// Neighbour lists agree with the exact reference: same distances (within `tol` of the
/// query's scale) and each returned row truly within tolerance of the k-th distance (ties
/// may resolve differently when distances differ only by rounding).
fn check_nearest(
    what: &str,
    got: &Nearest,
    want: &Nearest,
    q: &[f32],
    cat: &[f32],
    d: usize,
    tol: f64,
) {
    assert_eq!(got.k, want.k, "{what}: k");
    assert_eq!(got.index.len(), want.index.len(), "{what}: length");
    let k = want.k;
    for (qi, qv) in q.chunks_exact(d).enumerate() {
        let scale = 1.0 + qv.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
        for p in 0..k {
            let (g, w) = (got.dist2[qi * k + p] as f64, want.dist2[qi * k + p] as f64);
            assert!(
                g.is_finite(),
                "{what}: query {qi} rank {p} distance not finite"
            );
            assert!(
                (g - w).abs() <= tol * scale,
                "{what}: query {qi} rank {p}: {g} vs {w}"
            );
            let j = got.index[qi * k + p] as usize;
            let true_d: f64 = qv
                .iter()
                .zip(&cat[j * d..(j + 1) * d])
                .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                .sum();
            assert!(
                (true_d - w).abs() <= tol * scale,
                "{what}: query {qi} rank {p}: row {j} is at {true_d}, reference {w}"
            );
        }
        let mut ids: Vec<u32> = got.index[qi * k..(qi + 1) * k].to_vec();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), k, "{what}: query {qi} has a repeated row");
    }
}

#[test]
fn cpu_item_loglik_matches_reference_and_naive() {
    for (case, (n, v, d, scale)) in [
        (1usize, 7usize, 3usize, 0.5f64),
        (70, 301, 32, 0.3),
        (130, 1000, 48, 0.2),
    ]
    .into_iter()
    .enumerate()
    {
        let key = 100 + case as u64 * 10;
        let h = randn(key, n, d, 1.0, DType::F32);
        let w = randn(key + 1, v, d, scale, DType::F32);
        let (t, o) = targets_offsets(key + 2, n, v);
        let want = reference::item_loglik(&h, &w, &t, &o).unwrap();
        let chunked = item_loglik_cpu(&h, &w, &t, &o).unwrap();
        let naive = item_loglik_materialised(&h, &w, &t, &o).unwrap();
        check_loglik(&format!("chunked n={n} v={v}"), &chunked, &want, 1e-5);
        check_loglik(&format!("naive n={n} v={v}"), &naive, &want, 1e-5);
        assert_eq!(want.per_item.len(), o.len() - 1);
    }
    // bf16 inputs: both paths see the same rounded values, so f32 accuracy still holds.
    let (n, v, d) = (65, 200, 16);
    let h = randn(7, n, d, 1.0, DType::BF16);
    let w = randn(8, v, d, 0.5, DType::BF16);
    let (t, o) = targets_offsets(9, n, v);
    let want = reference::item_loglik(&h, &w, &t, &o).unwrap();
    check_loglik(
        "chunked bf16",
        &item_loglik_cpu(&h, &w, &t, &o).unwrap(),
        &want,
        1e-5,
    );
}

#[test]
fn cpu_item_loglik_sums_to_one_over_vocabulary() {
    // A property, not a comparison: for one hidden row, exp(log p) summed over every possible
    // target is 1.
    let (v, d) = (50, 8);
    let h = randn(11, 1, d, 1.0, DType::F32).repeat((v, 1)).unwrap();
    let w = randn(12, v, d, 1.0, DType::F32);
    let t: Vec<u32> = (0..v as u32).collect();
    let r = item_loglik_cpu(&h, &w, &t, &[0, v as u32]).unwrap();
    let total: f64 = r.per_token.iter().map(|&x| (x as f64).exp()).sum();
    assert!((total - 1.0).abs() < 1e-5, "sum of probabilities {total}");
}

/// A decoder-like additive mask `[mb, n, s]`: query i of entry b sees the first `p_b` keys and
/// its own causal band; some padded rows see key 0 only; one row of entry 0 is fully masked.
fn attention_mask(mb: usize, n: usize, s: usize) -> Vec<f32> {
    let mut m = vec![f32::NEG_INFINITY; mb * n * s];
    for b in 0..mb {
        let p = (s - n) - b % (s - n + 1).max(1);
        let real = n - b % 3;
        for i in 0..n {
            let row = &mut m[(b * n + i) * s..(b * n + i + 1) * s];
            if i < real {
                row[..p].fill(0.0);
                row[p..p + i + 1].fill(0.0);
            } else {
                row[0] = 0.0;
            }
        }
    }
    if n > 1 {
        m[(n - 1) * s..n * s].fill(f32::NEG_INFINITY);
    }
    m
}

#[test]
fn cpu_masked_softmax_matches_reference_and_naive() {
    use llm4dsr_kernels::{masked_softmax, masked_softmax_reference};
    for (b, heads, n, s, mb, dtype, tol) in [
        (3, 4, 5, 9, 3, DType::F32, 1e-6),
        (3, 4, 5, 9, 1, DType::F32, 1e-6),
        (2, 6, 16, 40, 2, DType::BF16, 1e-2),
        (1, 2, 7, 7, 1, DType::F64, 1e-6),
        (2, 3, 4, 300, 2, DType::F16, 2e-3),
    ] {
        let scale = 0.125;
        let att = randn(b as u64, b * heads * n, s, 3.0, dtype);
        let att = att.reshape((b, heads, n, s)).unwrap();
        let mask = attention_mask(mb, n, s);
        let mask_t = Tensor::from_vec(mask.clone(), (mb, n, s), &Device::Cpu).unwrap();
        let got = masked_softmax(&att, &mask_t, scale).unwrap();
        assert_eq!(got.dims(), att.dims());
        assert_eq!(got.dtype(), dtype);
        let got: Vec<f32> = f32s(&got);
        let x: Vec<f32> = f32s(&att);
        let want = masked_softmax_reference(&x, &mask, s, n, heads * n, mb, scale);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                !g.is_nan() && (*g as f64 - w).abs() <= tol,
                "{dtype:?} b={b} mb={mb}: cell {i}: {g} vs reference {w}"
            );
        }
        // Every row sums to 1, except the fully masked one (zeros).
        for r in 0..b * heads * n {
            let sum: f64 = want[r * s..(r + 1) * s].iter().sum();
            let masked = mask[((if mb == 1 { 0 } else { r / (heads * n) }) * n + r % n) * s..][..s]
                .iter()
                .all(|v| v.is_infinite());
            assert!(if masked {
                sum == 0.0
            } else {
                (sum - 1.0).abs() < 1e-9
            });
        }
        // The naive tensor path (scale, broadcast add, softmax) agrees where a row has a key.
        if dtype == DType::F32 {
            let naive = llm4dsr_llm::candle_nn::ops::softmax_last_dim(
                &(att.clone() * scale)
                    .unwrap()
                    .broadcast_add(
                        &mask_t
                            .unsqueeze(1)
                            .unwrap()
                            .broadcast_as((b, heads, n, s))
                            .unwrap(),
                    )
                    .unwrap(),
            )
            .unwrap();
            let naive: Vec<f32> = naive.flatten_all().unwrap().to_vec1().unwrap();
            for (g, w) in got.iter().zip(&naive) {
                if !w.is_nan() {
                    assert!((g - w).abs() < 1e-6, "naive {w} vs fused {g}");
                }
            }
        }
    }
    // A mask that does not fit is refused, naming both shapes.
    let att = Tensor::zeros((2, 3, 4, 5), DType::F32, &Device::Cpu).unwrap();
    let bad = Tensor::zeros((3, 4, 5), DType::F32, &Device::Cpu).unwrap();
    let e = masked_softmax(&att, &bad, 1.0).unwrap_err().to_string();
    assert!(e.contains("[3, 4, 5]") && e.contains("[2, 3, 4, 5]"), "{e}");
}

/// The decoder's gathers and SwiGLU against candle's own ops (index_select, transpose,
/// silu, mul), on every float dtype; the gathers must be exact copies.
#[test]
fn cpu_decoder_ops_match_candle_ops() {
    use llm4dsr_kernels::{gather_heads_first, gather_token_major, swiglu};
    let cpu = Device::Cpu;
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let (p, heads, hd, b, n) = (23usize, 3usize, 8usize, 4usize, 5usize);
        let src = randn(7, p, heads * hd, 1.0, dtype)
            .reshape((p, heads, hd))
            .unwrap();
        let mut rng = KeyedRng::new(20261127, Purpose::Other, 8);
        let rows: Vec<u32> = (0..b * n).map(|_| rng.below(p as u64) as u32).collect();
        let rows_t = Tensor::new(rows.as_slice(), &cpu).unwrap();
        let got = gather_heads_first(&src, &rows_t, b, n).unwrap();
        let want = src
            .index_select(&rows_t, 0)
            .unwrap()
            .reshape((b, n, heads, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        assert_eq!(got.dims(), [b, heads, n, hd]);
        assert_eq!(
            f64s(&got),
            f64s(&want),
            "{dtype:?}: gather_heads_first is not a copy"
        );
        // The fallback chain (what a CUDA tensor takes by default) gives the same.
        use llm4dsr_kernels::decoder_ops::{
            gather_heads_first_with, gather_token_major_with, swiglu_with, Impl,
        };
        let ops = gather_heads_first_with(&src, &rows_t, b, n, Impl::CandleOps).unwrap();
        let back0 = Tensor::new(&[7u32, 0, 19], &cpu).unwrap();
        for (x, y) in [
            (ops.clone(), got.clone()),
            (
                gather_token_major_with(&ops, &back0, Impl::CandleOps).unwrap(),
                gather_token_major_with(&got, &back0, Impl::Kernel).unwrap(),
            ),
            (
                swiglu_with(&src, &src, Impl::CandleOps).unwrap(),
                swiglu_with(&src, &src, Impl::Kernel).unwrap(),
            ),
        ] {
            for (a, c) in f64s(&x).iter().zip(&f64s(&y)) {
                assert!(
                    (a - c).abs() <= 1e-2 * c.abs().max(1.0),
                    "{dtype:?}: candle ops {a} vs kernel {c}"
                );
            }
        }
        // Back to token-major: a shuffled subset of the b * n rows.
        let back: Vec<u32> = [7u32, 0, 19, 3, 3, 12].to_vec();
        let back_t = Tensor::new(back.as_slice(), &cpu).unwrap();
        let got = gather_token_major(&got, &back_t).unwrap();
        assert_eq!(got.dims(), [back.len(), heads, hd]);
        for (t, &r) in back.iter().enumerate() {
            let want = src.get(rows[r as usize] as usize).unwrap();
            let g = got.get(t).unwrap();
            assert_eq!(
                f64s(&g),
                f64s(&want),
                "{dtype:?}: gather_token_major row {t}"
            );
        }
        // A row index out of range is an error, not a read past the end.
        let bad = Tensor::new(&[0u32, p as u32], &cpu).unwrap();
        assert!(gather_heads_first(&src, &bad, 1, 2).is_err());
        // SwiGLU: silu(gate) * up.
        let g = randn(9, 6, 10, 3.0, dtype);
        let u = randn(10, 6, 10, 1.0, dtype);
        let got: Vec<f64> = swiglu(&g, &u)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let g64: Vec<f64> = f64s(&g);
        let u64_: Vec<f64> = f64s(&u);
        let tol = match dtype {
            DType::BF16 => 1e-2,
            DType::F16 => 2e-3,
            _ => 1e-6,
        };
        for i in 0..got.len() {
            let want = g64[i] / (1.0 + (-g64[i]).exp()) * u64_[i];
            assert!(
                (got[i] - want).abs() <= tol * want.abs().max(1.0),
                "{dtype:?} swiglu cell {i}: {} vs {want}",
                got[i]
            );
        }
        assert!(swiglu(&g, &u.narrow(1, 0, 5).unwrap()).is_err());
        // The residual add fused with the next RMSNorm, against candle's add and candle-nn's
        // rms_norm: bit for bit in f32 (same expressions in the same order), within a unit of
        // the last place or two for 16-bit types (one rounding here, several in candle's CPU
        // path); rows of an odd width take the core-ops fallback.
        for (rows, d) in [(7usize, 64usize), (40, 576), (3, 9)] {
            let x = randn(11, rows, d, 2.0, dtype);
            let delta = randn(12, rows, d, 1.0, dtype);
            let w = randn(13, 1, d, 1.0, dtype).reshape(d).unwrap();
            let eps = 1e-5f32;
            let (s, n) = llm4dsr_kernels::add_rms_norm(&x, &delta, &w, eps).unwrap();
            let want_s = (&x + &delta).unwrap();
            let want_n = if dtype == DType::F64 {
                // candle-nn's rms_norm has no f64 kernel: the formula in f64.
                let ms = (want_s.sqr().unwrap().mean_keepdim(1).unwrap() + eps as f64)
                    .unwrap()
                    .sqrt()
                    .unwrap();
                want_s
                    .broadcast_div(&ms)
                    .unwrap()
                    .broadcast_mul(&w)
                    .unwrap()
            } else {
                llm4dsr_llm::candle_nn::ops::rms_norm(&want_s, &w, eps).unwrap()
            };
            assert_eq!((s.dims(), n.dims()), (x.dims(), x.dims()));
            assert_eq!(f64s(&s), f64s(&want_s), "{dtype:?} {rows}x{d}: the sum");
            let tol = match dtype {
                DType::BF16 => 2e-2,
                DType::F16 => 3e-3,
                DType::F64 => 1e-6,
                _ => 0.0,
            };
            for (i, (a, c)) in f64s(&n).iter().zip(&f64s(&want_n)).enumerate() {
                assert!(
                    (a - c).abs() <= tol * c.abs().max(1.0),
                    "{dtype:?} {rows}x{d} add_rms_norm cell {i}: {a} vs candle {c}"
                );
            }
        }
        let x = randn(11, 2, 8, 1.0, dtype);
        assert!(llm4dsr_kernels::add_rms_norm(
            &x,
            &x,
            &randn(1, 1, 7, 1.0, dtype).reshape(7).unwrap(),
            1e-5
        )
        .is_err());
    }
}

#[test]
fn cpu_nearest_matches_reference_and_naive() {
    for (case, (b, n, d, k)) in [
        (3usize, 10usize, 4usize, 3usize),
        (37, 2100, 24, 10),
        (300, 700, 8, 64),
    ]
    .into_iter()
    .enumerate()
    {
        let key = 300 + case as u64 * 10;
        let q = rand_vec(key, b * d, 1.0);
        let cat = rand_vec(key + 1, n * d, 1.0);
        let exclude = [0u32, 5, 5, (n + 3) as u32];
        let want = reference::nearest_items(&q, &cat, d, k, &exclude).unwrap();
        let blocked = nearest_items_cpu(&q, &cat, d, k, &exclude).unwrap();
        let naive = nearest_items_naive(&q, &cat, d, k, &exclude).unwrap();
        check_nearest(
            &format!("blocked b={b} n={n}"),
            &blocked,
            &want,
            &q,
            &cat,
            d,
            1e-5,
        );
        check_nearest(
            &format!("naive b={b} n={n}"),
            &naive,
            &want,
            &q,
            &cat,
            d,
            1e-5,
        );
        assert!(!blocked.index.iter().any(|&j| j == 0 || j == 5));
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use llm4dsr_kernels::cuda::{kernels, CudaKernels, ScoreMode};
    use llm4dsr_kernels::launch::{FusedVariant, FusedVersion};

    fn gpu() -> Option<&'static CudaKernels> {
        let k = kernels();
        if k.is_none() {
            eprintln!(
                "SKIP: GPU kernel tests: no usable GPU ({}); CPU paths tested above",
                llm4dsr_kernels::backend::decide(
                    true,
                    llm4dsr_kernels::backend::request(),
                    llm4dsr_kernels::backend::driver_present()
                )
                .1
            );
        }
        k
    }

    /// Needs NVRTC only, not a GPU: runs here too with LD_LIBRARY_PATH pointing at the
    /// nvidia-cuda-nvrtc 13.0 wheel's lib folder (docs/kernels.md).
    #[test]
    fn nvrtc_compiles_every_kernel() {
        if !llm4dsr_kernels::backend::nvrtc_present() {
            eprintln!(
                "SKIP: NVRTC compile check: libnvrtc.so.13 not loadable (see docs/kernels.md)"
            );
            return;
        }
        for arch in ["compute_80", "compute_90"] {
            let ptx = llm4dsr_kernels::cuda::compile_sources(arch).unwrap();
            let all: String = ptx.iter().map(|(_, p)| p.as_str()).collect();
            for entry in [
                "item_loglik_fused_bf16",
                "item_loglik_fused_f16",
                "item_loglik_fused_f32",
                "item_loglik_fused_v2_bf16",
                "item_loglik_fused_v2_f16",
                "item_loglik_combine",
                "item_loglik_logits",
                "item_segment_sum",
                "nearest_topk",
                "row_sq_norms",
                "mark_excluded",
                "nearest_tc_prep",
                "nearest_tc_candidates",
                "nearest_tc_rerank",
                "nearest_tc_rerank_all",
                "nearest_tc_gather",
                "attn_softmax_f32",
                "attn_softmax_bf16",
                "attn_softmax_f16",
                "gather_heads_first_w32",
                "gather_token_major_w32",
                "swiglu_f32",
                "swiglu_bf16",
                "swiglu_f16",
            ] {
                assert!(
                    all.contains(&format!(".entry {entry}(")),
                    "{arch}: no entry {entry}"
                );
            }
            assert!(all.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
            for (file, p) in &ptx {
                assert!(!p.contains(".local"), "{arch}: {file} uses local memory");
            }
            // v2a: the async copy ring, ldmatrix fragments, both mma types, and the launch
            // bounds that cap registers for two resident blocks per SM on sm_90 (one on sm_80,
            // whose 164 KB of shared memory holds only one ~98 KB block).
            let v2 = &ptx
                .iter()
                .find(|(f, _)| *f == "item_loglik_fused_v2.cu")
                .expect("v2 compiled")
                .1;
            for needle in [
                "cp.async.cg.shared.global",
                "cp.async.commit_group",
                "cp.async.wait_group 1",
                "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
                "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
                ".maxntid 256, 1, 1",
            ] {
                assert!(v2.contains(needle), "{arch}: v2 PTX lacks {needle}");
            }
            let min_blocks = if arch == "compute_90" { 2 } else { 1 };
            assert_eq!(
                v2.matches(&format!(".minnctapersm {min_blocks}")).count(),
                2,
                "{arch}: v2 launch bounds"
            );
            // The k-loop of a stage is unrolled: 4 x (2 + 4) ldmatrix and 4 x 16 mma per kernel.
            assert_eq!(v2.matches("ldmatrix.sync").count(), 2 * 24, "{arch}");
            assert_eq!(v2.matches("mma.sync").count(), 2 * 64, "{arch}");
            // Tensor-core grounding: v2a's ring (one kernel: 24 ldmatrix, 64 f16 mma), one block
            // per SM, the named barriers of the list insertion, the f16 rounding.
            let tc = &ptx
                .iter()
                .find(|(f, _)| *f == "nearest_tc.cu")
                .expect("nearest_tc compiled")
                .1;
            for needle in [
                "cp.async.cg.shared.global",
                "cp.async.wait_group 1",
                "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
                "bar.sync",
                "bar.arrive",
                "cvt.rn.f16.f32",
                ".minnctapersm 1",
            ] {
                assert!(tc.contains(needle), "{arch}: nearest_tc PTX lacks {needle}");
            }
            assert_eq!(tc.matches("ldmatrix.sync").count(), 24, "{arch}");
            assert_eq!(tc.matches("mma.sync").count(), 64, "{arch}");
            // The re-rank kernels stage the catalogue rows through shared memory: the ring's
            // wait (NT_DOT_STAGES - 1 = 2 groups pending; the candidate kernel waits with 1);
            // the plain loop (`-DNT_DOT_STAGES=0`, the bench's diagnostic build) has none.
            let rerank = |ptx: &str| {
                let a = ptx.find(".entry nearest_tc_rerank(").expect("rerank entry");
                let z = ptx[a..].find("\n}\n").expect("rerank body end");
                ptx[a..a + z].to_string()
            };
            assert!(rerank(tc).contains("cp.async.wait_group 2"), "{arch}");
            assert!(rerank(tc).contains("cp.async.cg.shared.global"), "{arch}");
            let plain = llm4dsr_kernels::cuda::compile_variant(
                "nearest_tc.cu",
                arch,
                &["-DNT_DOT_STAGES=0"],
            )
            .unwrap();
            assert!(
                !rerank(&plain).contains("cp.async"),
                "{arch}: plain re-rank"
            );
            let tc3 = &ptx
                .iter()
                .find(|(f, _)| *f == "nearest_tc_v3.cu")
                .expect("nearest_tc_v3 compiled")
                .1;
            for needle in [
                ".entry nearest_tc_candidates_v3(",
                "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16",
                "fence.proxy.async.shared::cta",
                "wgmma.wait_group.sync.aligned 0",
            ] {
                assert!(tc3.contains(needle), "nearest_tc_v3 PTX lacks {needle}");
            }
            // 4 wgmma per stage in each of v3, v4 (staggered, with its mbarriers), v5
            // (warp-specialised: TMA, transaction barriers) and v6 (v5 on clusters of 2).
            assert_eq!(
                tc3.matches("wgmma.mma_async").count(),
                4 * 4,
                "nearest_tc_v3 wgmma"
            );
            for needle in [
                ".entry nearest_tc_candidates_v4(",
                "mbarrier.try_wait.parity.shared::cta.b64",
                ".entry nearest_tc_candidates_v5(",
                "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes",
                "bar.sync 1, 256",
                ".entry nearest_tc_candidates_v6(",
                ".reqnctapercluster 2, 1, 1",
                ".multicast::cluster",
                "mapa.shared::cluster.u32",
                "barrier.cluster.wait.acquire",
            ] {
                assert!(tc3.contains(needle), "nearest_tc_v3 PTX lacks {needle}");
            }
            // v3 (compiled for compute_90a whatever the arch): 4 wgmma per stage per kernel,
            // the proxy fence between the cp.async copies and wgmma's reads, the waits.
            let v3 = &ptx
                .iter()
                .find(|(f, _)| *f == "item_loglik_fused_v3.cu")
                .expect("v3 compiled")
                .1;
            assert!(v3.contains(".target sm_90a"), "v3 PTX target");
            for needle in [
                ".entry item_loglik_fused_v3_bf16(",
                ".entry item_loglik_fused_v3_f16(",
                "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16",
                "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16",
                "wgmma.fence.sync.aligned",
                "wgmma.commit_group.sync.aligned",
                "wgmma.wait_group.sync.aligned 1",
                "wgmma.wait_group.sync.aligned 0",
                "fence.proxy.async.shared::cta",
                "cp.async.cg.shared.global",
                // v4 (the staggered warpgroups) in the same module: its mbarriers.
                ".entry item_loglik_fused_v4_bf16(",
                ".entry item_loglik_fused_v4_f16(",
                "mbarrier.init.shared::cta.b64",
                "mbarrier.try_wait.parity.shared::cta.b64",
                "cp.async.mbarrier.arrive.noinc.shared::cta.b64",
                "mbarrier.arrive.shared::cta.b64",
                // v5 (warp-specialised): TMA copies, transaction barriers, register moves.
                ".entry item_loglik_fused_v5_bf16(",
                ".entry item_loglik_fused_v5_f16(",
                "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes",
                "mbarrier.arrive.expect_tx.shared::cta.b64",
                "fence.mbarrier_init.release.cluster",
                "setmaxnreg.dec.sync.aligned.u32 40",
                "setmaxnreg.inc.sync.aligned.u32 232",
                // v6 (v5 on clusters of two blocks): the cluster shape, the multicast head
                // copy, the remote releases, the cluster barriers at the start and the end.
                ".entry item_loglik_fused_v6_bf16(",
                ".entry item_loglik_fused_v6_f16(",
                ".explicitcluster",
                ".reqnctapercluster 2, 1, 1",
                "mbarrier::complete_tx::bytes.multicast::cluster",
                "mapa.shared::cluster.u32",
                "mbarrier.arrive.shared::cluster.b64",
                "%cluster_ctarank",
                "barrier.cluster.arrive.release",
                "barrier.cluster.wait.acquire",
            ] {
                assert!(v3.contains(needle), "v3 PTX lacks {needle}");
            }
            // 4 wgmma per stage in each of the 8 kernels (v3, v4, v5, v6; bf16 and f16).
            assert_eq!(
                v3.matches("wgmma.mma_async").count(),
                8 * 4,
                "v3 wgmma count"
            );
            // The remote releases carry no cluster-scope fence (a MEMBAR.ALL.GPU per step):
            // the default semantics, as CUTLASS's ClusterBarrier::arrive.
            assert!(
                !v3.contains("mbarrier.arrive.release.cluster"),
                "v6's releases should not fence at cluster scope"
            );
            assert!(!v3.contains(".local"), "v3 uses local memory");
            // v5's hang diagnosis (LLM4DSR_WG5_HANG_CHECK=1 in the GPU check) compiles: bounded
            // waits with a printf naming the barrier.
            for (file, extra) in [
                ("item_loglik_fused_v3.cu", &["-DWG5_HANG_CHECK"][..]),
                (
                    "nearest_tc_v3.cu",
                    &[
                        "-DWG5_HANG_CHECK",
                        "-DWG5_PRODUCER_REGS=24",
                        "-DWG5_CONSUMER_REGS=240",
                    ][..],
                ),
            ] {
                let ptx = llm4dsr_kernels::cuda::compile_sm90a_variant(file, extra).unwrap();
                assert!(
                    ptx.contains("vprintf"),
                    "{file}: no printf in the hang check"
                );
                assert!(ptx.contains("setmaxnreg"), "{file}");
            }
            // The compact selection (LLM4DSR_NEAREST_TC_SELECT=compact) compiles for every
            // wgmma candidate kernel, with the warp-wide OR of the masks, and keeps the
            // accumulators in registers: its switch over them must not become an indexed
            // local-memory array.
            let compact = llm4dsr_kernels::cuda::compile_sm90a_variant(
                "nearest_tc_v3.cu",
                &["-DNT3_SELECT_COMPACT"],
            )
            .unwrap();
            assert_eq!(
                compact.matches("redux.sync.or").count(),
                4,
                "one per kernel v3-v6"
            );
            assert!(
                !compact.contains(".local"),
                "compact selection uses local memory"
            );
            // Where the epilogue reads the row records from (LLM4DSR_NEAREST_TC_RECORDS):
            // `prefetch` compiles into every wgmma candidate kernel (v3-v6: the first tile's
            // and one per epilogue); `smem` gives v5 and v6 cp.async copies into shared memory
            // and the consumer warpgroups' named barriers, on a 3-stage ring; the default
            // build has neither.
            use llm4dsr_kernels::nearest_tc::TcRecords;
            let prefetch = llm4dsr_kernels::cuda::compile_sm90a_variant(
                "nearest_tc_v3.cu",
                TcRecords::Prefetch.defines(),
            )
            .unwrap();
            assert!(
                prefetch.matches("prefetch.global.L1").count() >= 8,
                "two prefetch sites per kernel v3-v6"
            );
            let smem = llm4dsr_kernels::cuda::compile_sm90a_variant(
                "nearest_tc_v3.cu",
                TcRecords::Smem.defines(),
            )
            .unwrap();
            assert!(
                smem.matches("cp.async.ca.shared.global").count() >= 2,
                "the records' copies in v5 and v6"
            );
            assert!(smem.contains("cp.async.wait_all"));
            let plain =
                llm4dsr_kernels::cuda::compile_sm90a_variant("nearest_tc_v3.cu", &[]).unwrap();
            assert!(
                !plain.contains("prefetch.global.L1") && !plain.contains("cp.async.ca.shared"),
                "the default build prefetches or stages the records"
            );
        }
    }

    /// (n, v, d): a partial row block, a partial vocabulary tile, several tiles per slice;
    /// for v2 (128 x 128 tiles, 64-deep stages) also d < 64, d not a multiple of 64 (96, 200),
    /// a partial 128-row block (130, 257) and a slice of several tiles whose ring crosses tiles.
    const SHAPES: [(usize, usize, usize); 5] = [
        (1, 10, 8),
        (70, 1000, 64),
        (130, 20_011, 96),
        (64, 64, 128),
        (257, 4099, 200),
    ];

    #[test]
    fn gpu_fused_item_loglik_matches_reference() {
        let Some(g) = gpu() else { return };
        // On a GPU machine v2 must load (it is what the GPU check is for); v3 where the card
        // is compute capability 9.0 (H100/H200).
        assert_eq!(g.fused_v2_unavailable(), None, "fused v2 did not load");
        let v3 = v3_expected(g);
        for (case, (n, v, d)) in SHAPES.into_iter().enumerate() {
            for (dt, tol) in [(DType::F32, 2e-5), (DType::BF16, 2e-3), (DType::F16, 2e-3)] {
                let key = 500 + case as u64 * 10;
                let h = randn(key, n, d, 1.0, dt);
                let w = randn(key + 1, v, d, 1.0 / (d as f64).sqrt() * 3.0, dt);
                let (t, o) = targets_offsets(key + 2, n, v);
                let want = reference::item_loglik(&h, &w, &t, &o).unwrap();
                // v2 has no f32 kernel (resolve() sends f32 to v1): test it on 16-bit inputs.
                let versions: &[FusedVersion] = if dt == DType::F32 {
                    &[FusedVersion::V1]
                } else if v3 {
                    &[FusedVersion::V1, FusedVersion::V2, FusedVersion::V3]
                } else {
                    &[FusedVersion::V1, FusedVersion::V2]
                };
                for &version in versions {
                    for mode in [ScoreMode::Fused, ScoreMode::Materialised] {
                        let got = g
                            .item_loglik_version(&h, &w, &t, &o, mode, version)
                            .unwrap();
                        check_loglik(
                            &format!("GPU {version:?} {mode:?} {dt:?} n={n} v={v} d={d}"),
                            &got,
                            &want,
                            tol,
                        );
                    }
                }
            }
        }
        // Dispatch: the public entry point takes the GPU and agrees too.
        let h = randn(1, 33, 16, 1.0, DType::F32);
        let w = randn(2, 77, 16, 0.5, DType::F32);
        let (t, o) = targets_offsets(3, 33, 77);
        let want = reference::item_loglik(&h, &w, &t, &o).unwrap();
        check_loglik(
            "dispatch",
            &llm4dsr_kernels::item_loglik(&h, &w, &t, &o).unwrap(),
            &want,
            2e-5,
        );
    }

    /// Whether v3 must run here: on compute capability 9.0 it has to load (a failure is a
    /// test failure, not a skip); elsewhere it is skipped with a message.
    fn v3_expected(g: &CudaKernels) -> bool {
        sm90a_expected(g, FusedVersion::V3)
    }

    /// The same for an sm_90a version (v3, v4, v5, v6): turned off by the GPU check after a
    /// failed smoke test (`LLM4DSR_FUSED_V3=off`, `..._V4=off`, ...) it is skipped.
    fn sm90a_expected(g: &CudaKernels, version: FusedVersion) -> bool {
        let why = g.fused_unavailable(version);
        if why == Some(llm4dsr_kernels::cuda::V3_DISABLED)
            || why == Some(llm4dsr_kernels::cuda::V4_DISABLED)
            || why == Some(llm4dsr_kernels::cuda::V5_DISABLED)
            || why == Some(llm4dsr_kernels::cuda::V6_DISABLED)
        {
            eprintln!("SKIP: fused {version:?}: {}", why.unwrap_or(""));
            return false;
        }
        if g.cc == (9, 0) {
            assert_eq!(why, None, "fused {version:?} did not load on an sm_90 card");
            true
        } else {
            eprintln!(
                "SKIP: fused {version:?} (wgmma) needs compute capability 9.0, not {:?}",
                g.cc
            );
            false
        }
    }

    /// v3's logits, element by element, against an f64 product of the same bf16 inputs (the
    /// materialising mode writes them): on a mismatch it prints where each wrong value
    /// belongs (which row and column of the reference it equals), so one GPU run tells a
    /// fragment-layout error from a descriptor or swizzle error. Shapes: one tile and one
    /// 64-deep stage; two stages; a partial tile with d = 72.
    #[test]
    fn gpu_v3_logits_layout() {
        let Some(g) = gpu() else { return };
        if v3_expected(g) {
            logits_layout(g, FusedVersion::V3);
        }
    }

    /// v4 (v3's tile with the warpgroups staggered, opt-in): the same element-by-element
    /// check, then the fused outputs against the f64 reference over many tiles and slices
    /// (several B-ring wraps, partial tiles, d = 4096) and bit for bit against v3 (same
    /// products and epilogue, so the same numbers), and repeatable.
    #[test]
    fn gpu_v4_matches_v3() {
        let Some(g) = gpu() else { return };
        if sm90a_expected(g, FusedVersion::V4) {
            matches_v3(g, FusedVersion::V4);
        }
    }

    /// v5 (warp-specialised: TMA producer, two consumer warpgroups; opt-in): the same checks as
    /// v4's. Its tiles arrive through tensor maps (zero fill past the matrix instead of
    /// cp.async's zero-size copies), so the partial tiles and d = 72 / 200 (depth past d in the
    /// last box) test the maps' bounds; bit-equal to v3 (same products, same epilogue).
    #[test]
    fn gpu_v5_matches_v3() {
        let Some(g) = gpu() else { return };
        if sm90a_expected(g, FusedVersion::V5) {
            matches_v3(g, FusedVersion::V5);
        }
    }

    /// v6 (v5 on clusters of two row blocks, the head tile multicast; opt-in): the same checks.
    /// The odd row-block counts (257 rows: 3 blocks, padded to 4; the layout shapes' single
    /// block, padded to 2) run a padding block whose rows all lie past n; bit-equal to v3.
    #[test]
    fn gpu_v6_matches_v3() {
        let Some(g) = gpu() else { return };
        if sm90a_expected(g, FusedVersion::V6) {
            matches_v3(g, FusedVersion::V6);
        }
    }

    fn matches_v3(g: &CudaKernels, version: FusedVersion) {
        logits_layout(g, version);
        for (case, (n, v, d)) in [
            (130usize, 5000usize, 576usize),
            (257, 4099, 200),
            (130, 700, 4096),
        ]
        .into_iter()
        .enumerate()
        {
            let key = 800 + case as u64 * 10;
            let h = randn(key, n, d, 1.0, DType::BF16);
            let w = randn(key + 1, v, d, 3.0 / (d as f64).sqrt(), DType::BF16);
            let (t, o) = targets_offsets(key + 2, n, v);
            let want = reference::item_loglik(&h, &w, &t, &o).unwrap();
            let run = |version| {
                g.item_loglik_version(&h, &w, &t, &o, ScoreMode::Fused, version)
                    .unwrap()
            };
            let got = run(version);
            check_loglik(
                &format!("GPU {version:?} bf16 n={n} v={v} d={d}"),
                &got,
                &want,
                2e-3,
            );
            assert_eq!(
                got,
                run(FusedVersion::V3),
                "{version:?} differs from v3 at n={n} v={v} d={d}"
            );
            assert_eq!(
                got,
                run(version),
                "{version:?} not repeatable at n={n} v={v} d={d}"
            );
        }
    }

    fn logits_layout(g: &CudaKernels, version: FusedVersion) {
        for (n, v, d) in [
            (128usize, 256usize, 64usize),
            (128, 256, 128),
            (100, 300, 72),
        ] {
            let h = randn(61, n, d, 1.0, DType::BF16);
            let w = randn(62, v, d, 0.5, DType::BF16);
            let (t, o) = targets_offsets(63, n, v);
            let hd = g.upload(&h, DType::BF16).unwrap();
            let wd = g.upload(&w, DType::BF16).unwrap();
            let td = g.stream.clone_htod(&t).unwrap();
            let od = g.stream.clone_htod(&o).unwrap();
            let mut buf = g
                .score_buffers_version(
                    version,
                    FusedVariant::TensorCoreBf16,
                    n,
                    v,
                    d,
                    o.len() - 1,
                    ScoreMode::Materialised,
                )
                .unwrap();
            g.score_device(&hd, &wd, &td, &od, &mut buf).unwrap();
            g.stream.synchronize().unwrap();
            let got = g.stream.clone_dtoh(buf.logits.as_ref().unwrap()).unwrap();
            let hv: Vec<f64> = f64s(&h);
            let wv: Vec<f64> = f64s(&w);
            let want: Vec<f64> = (0..n * v)
                .map(|i| {
                    let (r, c) = (i / v, i % v);
                    (0..d).map(|k| hv[r * d + k] * wv[c * d + k]).sum()
                })
                .collect();
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-3 * (1.0 + b.abs());
            let bad: Vec<usize> = (0..n * v)
                .filter(|&i| !close(got[i] as f64, want[i]))
                .collect();
            if !bad.is_empty() {
                eprintln!(
                    "{version:?} layout n={n} v={v} d={d}: {} of {} logits wrong",
                    bad.len(),
                    n * v
                );
                for &i in bad.iter().take(12) {
                    let at = (0..n * v)
                        .filter(|&j| close(got[i] as f64, want[j]))
                        .map(|j| format!("({}, {})", j / v, j % v))
                        .take(3)
                        .collect::<Vec<_>>();
                    eprintln!(
                        "  (row {}, col {}): got {:.5}, want {:.5}; got equals the reference at {:?}",
                        i / v,
                        i % v,
                        got[i],
                        want[i],
                        at
                    );
                }
                let rows: std::collections::BTreeSet<usize> = bad.iter().map(|i| i / v).collect();
                let cols: std::collections::BTreeSet<usize> = bad.iter().map(|i| i % v).collect();
                eprintln!(
                    "  wrong rows {:?}..., wrong columns {:?}...",
                    rows.iter().take(20).collect::<Vec<_>>(),
                    cols.iter().take(20).collect::<Vec<_>>()
                );
                panic!("{version:?} logits differ at n={n} v={v} d={d}");
            }
        }
    }

    #[test]
    fn gpu_fused_results_are_repeatable() {
        // A moving error is a race: the same inputs must give bit-identical outputs.
        let Some(g) = gpu() else { return };
        let (n, v, d) = (200, 5000, 64);
        let h = randn(41, n, d, 1.0, DType::BF16);
        let w = randn(42, v, d, 0.3, DType::BF16);
        let (t, o) = targets_offsets(43, n, v);
        let mut versions = vec![FusedVersion::V1, FusedVersion::V2];
        if v3_expected(g) {
            versions.push(FusedVersion::V3);
        }
        for &version in &versions {
            let run = || {
                g.item_loglik_version(&h, &w, &t, &o, ScoreMode::Fused, version)
                    .unwrap()
            };
            let a = run();
            for _ in 0..3 {
                assert_eq!(run(), a, "{version:?} not repeatable");
            }
        }
        // v2 over many ring steps (d = 4096: 64 stages per tile) against the f64 reference.
        let (n, v, d) = (130, 700, 4096);
        let h = randn(44, n, d, 1.0, DType::BF16);
        let w = randn(45, v, d, 3.0 / (d as f64).sqrt(), DType::BF16);
        let (t, o) = targets_offsets(46, n, v);
        let want = reference::item_loglik(&h, &w, &t, &o).unwrap();
        for &version in &versions[1..] {
            let got = g
                .item_loglik_version(&h, &w, &t, &o, ScoreMode::Fused, version)
                .unwrap();
            check_loglik(&format!("GPU {version:?} bf16 d=4096"), &got, &want, 2e-3);
        }
    }

    #[test]
    fn gpu_nearest_matches_reference() {
        let Some(g) = gpu() else { return };
        for (case, (b, n, d, k)) in [
            (1usize, 5usize, 3usize, 5usize),
            (37, 2100, 24, 10),
            (70, 5000, 64, 64),
            (33, 129, 17, 1),
        ]
        .into_iter()
        .enumerate()
        {
            let key = 700 + case as u64 * 10;
            let q = rand_vec(key, b * d, 1.0);
            let cat = rand_vec(key + 1, n * d, 1.0);
            let exclude = [0u32, 2, 2];
            let want = reference::nearest_items(&q, &cat, d, k, &exclude).unwrap();
            let got = g.nearest_items(&q, &cat, d, k, &exclude).unwrap();
            check_nearest(
                &format!("GPU nearest b={b} n={n} d={d} k={k}"),
                &got,
                &want,
                &q,
                &cat,
                d,
                1e-4,
            );
            assert!(!got.index.iter().any(|&j| j == 0 || j == 2));
            let again = g.nearest_items(&q, &cat, d, k, &exclude).unwrap();
            assert_eq!(got, again, "GPU nearest not repeatable");
        }
    }
}

#[cfg(feature = "cuda")]
mod gpu_tc {
    use super::*;
    use llm4dsr_kernels::launch::TcCandidates;
    use llm4dsr_kernels::nearest_tc::{kernel_f32_search, NearestVersion};

    /// The candidate kernels to test here: v2 everywhere, v3 (wgmma) on compute capability
    /// 9.0, where it must load (unless disabled by the GPU check after a failed v3 smoke test).
    fn candidate_kernels(g: &llm4dsr_kernels::cuda::CudaKernels) -> Vec<TcCandidates> {
        let why = g.nearest_tc_v3_unavailable();
        if std::env::var("LLM4DSR_NEAREST_TC_CANDIDATES").as_deref() == Ok("v2") {
            eprintln!("SKIP: nearest tc v3 candidates: LLM4DSR_NEAREST_TC_CANDIDATES=v2");
            vec![TcCandidates::V2]
        } else if why == Some(llm4dsr_kernels::cuda::V3_DISABLED) {
            eprintln!(
                "SKIP: nearest tc v3 candidates: {}",
                llm4dsr_kernels::cuda::V3_DISABLED
            );
            vec![TcCandidates::V2]
        } else if g.cc == (9, 0) {
            assert_eq!(
                why, None,
                "nearest tc v3 candidates did not load on an sm_90 card"
            );
            vec![TcCandidates::V2, TcCandidates::V3]
        } else {
            eprintln!("SKIP: nearest tc v3 candidates need compute capability 9.0");
            vec![TcCandidates::V2]
        }
    }

    fn gpu() -> Option<&'static llm4dsr_kernels::cuda::CudaKernels> {
        let k = llm4dsr_kernels::cuda::kernels();
        if k.is_none() {
            eprintln!("SKIP: GPU tensor-core grounding tests: no usable GPU");
        }
        k
    }

    #[derive(Clone, Copy, Debug)]
    enum Data {
        /// N(0, 1) queries and rows: the certificate passes for most queries.
        Gauss,
        /// 0/1 coordinates, many duplicate rows: exact ties at the k-th distance beyond the
        /// 32 re-ranked candidates, so some queries must fall back.
        Binary,
        /// Rows at 1 + 1e-6 noise, queries at 0.5: every distance equal within the bound, so
        /// every query falls back.
        Crowded,
    }

    fn data(kind: Data, key: u64, len: usize, query: bool) -> Vec<f32> {
        match kind {
            Data::Gauss => rand_vec(key, len, 1.0),
            Data::Binary => rand_vec(key, len, 1.0)
                .into_iter()
                .map(|x| if x > 0.0 { 1.0 } else { 0.0 })
                .collect(),
            Data::Crowded if query => vec![0.5; len],
            Data::Crowded => rand_vec(key, len, 1e-6)
                .into_iter()
                .map(|x| 1.0 + x)
                .collect(),
        }
    }

    /// The tensor-core search equals the f32 kernel bit for bit (that is what the certificate
    /// proves, fallbacks included) and the f64 reference within f32 rounding; counts add up;
    /// repeatable. Shapes: n < 32 (every row a candidate), partial query blocks and tiles,
    /// d = 8, 72 (not a multiple of the 64-deep stage), 384, k = 1 .. 16, excluded rows, ties.
    #[test]
    fn gpu_nearest_tc_equals_f32_kernel() {
        let Some(g) = gpu() else { return };
        assert_eq!(g.nearest_tc_unavailable(), None, "nearest tc did not load");
        tc_cases(g, &candidate_kernels(g));
        edge_cases(g);
    }

    /// The staggered candidate kernel (v4, opt-in) through the same cases: on compute
    /// capability 9.0 it must load unless the GPU check turned it off after a failure.
    #[test]
    fn gpu_nearest_tc_v4_equals_f32_kernel() {
        let Some(g) = gpu() else { return };
        opt_in_tc_cases(g, TcCandidates::V4);
    }

    /// The warp-specialised candidate kernel (v5, opt-in: TMA tensor maps over the f16 rows,
    /// a named barrier over the consumers before the lists are written) through the same
    /// cases: on compute capability 9.0 it must load unless the GPU check turned it off.
    #[test]
    fn gpu_nearest_tc_v5_equals_f32_kernel() {
        let Some(g) = gpu() else { return };
        opt_in_tc_cases(g, TcCandidates::V5);
    }

    /// The clustered candidate kernel (v6, opt-in: v5 on pairs of query blocks, the catalogue
    /// tile multicast; odd query-block counts padded) through the same cases.
    #[test]
    fn gpu_nearest_tc_v6_equals_f32_kernel() {
        let Some(g) = gpu() else { return };
        opt_in_tc_cases(g, TcCandidates::V6);
    }

    /// [`tc_cases`] for an opt-in candidate kernel: skipped where it is unavailable off
    /// sm_90 or when the GPU check turned it off, a failure on an sm_90 card otherwise.
    fn opt_in_tc_cases(g: &llm4dsr_kernels::cuda::CudaKernels, cand: TcCandidates) {
        let why = g.nearest_tc_candidates_unavailable(cand);
        let disabled = [
            llm4dsr_kernels::cuda::TC_V4_DISABLED,
            llm4dsr_kernels::cuda::TC_V5_DISABLED,
            llm4dsr_kernels::cuda::TC_V6_DISABLED,
        ];
        match why {
            None => tc_cases(g, &[cand]),
            Some(why) if g.cc != (9, 0) || disabled.contains(&why) => {
                eprintln!("SKIP: nearest tc {cand:?} candidates: {why}")
            }
            Some(why) => {
                panic!("nearest tc {cand:?} candidates did not load on an sm_90 card: {why}")
            }
        }
    }

    /// tc with each of `cands` equal to the f32 kernel (and the f64 reference) at 7 shapes.
    fn tc_cases(g: &llm4dsr_kernels::cuda::CudaKernels, cands: &[TcCandidates]) {
        for (case, (b, n, d, k, kind)) in [
            (1usize, 5usize, 8usize, 5usize, Data::Gauss),
            (37, 2100, 24, 10, Data::Gauss),
            (130, 5000, 72, 16, Data::Gauss),
            (33, 129, 16, 1, Data::Gauss),
            (200, 3000, 384, 10, Data::Gauss),
            (64, 1500, 8, 10, Data::Binary),
            (16, 4000, 128, 10, Data::Crowded),
        ]
        .into_iter()
        .enumerate()
        {
            let key = 900 + case as u64 * 10;
            let q = data(kind, key, b * d, true);
            let cat = data(kind, key + 1, n * d, false);
            let exclude = [0u32, 2, 2];
            for &cand in cands {
                let what = format!("GPU nearest tc {cand:?} {kind:?} b={b} n={n} d={d} k={k}");
                let (got, st) = g
                    .nearest_items_tc_with(&q, &cat, d, k, &exclude, cand)
                    .unwrap();
                let f32k = g.nearest_items_f32(&q, &cat, d, k, &exclude).unwrap();
                eprintln!("{what}: {st:?}");
                assert_eq!(got, f32k, "{what}: differs from the f32 kernel");
                let want = reference::nearest_items(&q, &cat, d, k, &exclude).unwrap();
                check_nearest(&what, &got, &want, &q, &cat, d, 1e-4);
                assert_eq!(st.certified + st.fallback, b, "{what}");
                match kind {
                    Data::Gauss => assert!(st.certified > 0, "{what}: nothing certified"),
                    Data::Binary => assert!(
                        st.deep + st.fallback > 0,
                        "{what}: ties at the k-th must be refused by the first level"
                    ),
                    Data::Crowded => assert_eq!(st.fallback, b, "{what}: crowded must fall back"),
                }
                let (again, st2) = g
                    .nearest_items_tc_with(&q, &cat, d, k, &exclude, cand)
                    .unwrap();
                assert_eq!((&got, st), (&again, st2), "{what}: not repeatable");
            }
        }
    }

    /// Fallbacks of the dispatching tc path: a clamped query scale, k > 16, d % 8 != 0.
    fn edge_cases(g: &llm4dsr_kernels::cuda::CudaKernels) {
        // A query with values below 2^-41 (its f16 scale is clamped) falls back and is right;
        // k > 16 and d % 8 != 0 take the f32 kernel through the versioned entry point.
        let (d, n) = (16, 700);
        let mut q = rand_vec(1, 2 * d, 1.0);
        q[..d].iter_mut().for_each(|x| *x *= 1e-14);
        let cat = rand_vec(2, n * d, 1.0);
        let (got, st) = g.nearest_items_tc(&q, &cat, d, 10, &[]).unwrap();
        assert!(st.fallback >= 1, "{st:?}");
        assert_eq!(got, g.nearest_items_f32(&q, &cat, d, 10, &[]).unwrap());
        for (k, d) in [(20usize, 16usize), (10, 12)] {
            let q = rand_vec(3, 3 * d, 1.0);
            let cat = rand_vec(4, n * d, 1.0);
            let v = g
                .nearest_items_version(&q, &cat, d, k, &[0], NearestVersion::Tc)
                .unwrap();
            assert_eq!(v, g.nearest_items_f32(&q, &cat, d, k, &[0]).unwrap());
        }
    }

    /// The f32 kernel's arithmetic is what nearest_tc.rs models on the CPU (sequential fmaf
    /// dot, row_sq_norms' lane-strided norm): the GPU result equals the CPU model bit for bit.
    /// (Independent of the tensor-core path; if this fails, the model, not the kernel, is off.)
    #[test]
    fn gpu_nearest_f32_kernel_equals_cpu_model() {
        let Some(g) = gpu() else { return };
        for (b, n, d, k) in [(37usize, 2100usize, 24usize, 10usize), (5, 900, 200, 16)] {
            let q = rand_vec(11, b * d, 1.0);
            let cat = rand_vec(12, n * d, 1.0);
            let got = g.nearest_items_f32(&q, &cat, d, k, &[1]).unwrap();
            assert_eq!(
                got,
                kernel_f32_search(&q, &cat, d, k, &[1]),
                "b={b} n={n} d={d}"
            );
        }
    }

    /// A catalogue uploaded once and searched in several batches (what grounding does) gives
    /// the f32 kernel's top-k every time, through the tc path (k <= 16) and the f32 path (k > 16),
    /// and for both `NearestVersion`s of the preparation.
    #[test]
    fn gpu_resident_catalogue_equals_f32_kernel() {
        let Some(g) = gpu() else { return };
        let (n, d) = (5000usize, 72usize);
        let cat = rand_vec(21, n * d, 1.0);
        let exclude = [0u32, 7];
        for version in [NearestVersion::Tc, NearestVersion::F32] {
            let dc = g.device_catalog(&cat, d, &exclude, version).unwrap();
            assert_eq!(
                dc.tc.is_some(),
                version == NearestVersion::Tc,
                "{version:?}"
            );
            for (batch, (b, k)) in [(1usize, 1usize), (37, 10), (130, 16), (9, 40)]
                .into_iter()
                .enumerate()
            {
                let q = rand_vec(30 + batch as u64, b * d, 1.0);
                let got = g.nearest_in(&dc, &q, k).unwrap();
                let want = g.nearest_items_f32(&q, &cat, d, k, &exclude).unwrap();
                assert_eq!(got, want, "{version:?} batch {batch}: b={b} k={k}");
            }
        }
        let s = llm4dsr_kernels::CatalogSearch::new(cat.clone(), d, &exclude).unwrap();
        assert_eq!(s.backend(), "cuda");
        let q = rand_vec(40, 3 * d, 1.0);
        // The search centres rows and queries (the catalogue mean subtracted): it equals the
        // f32 kernel on the centred data.
        assert_eq!(
            s.search(&q, 10).unwrap(),
            g.nearest_items_f32(&s.centre(&q), s.centred_rows(), d, 10, &exclude)
                .unwrap()
        );
        // Queries are validated on the device (from their norms): a non-finite value is named
        // by query and dim, a squared norm past f32 by query; neither falls back to the CPU.
        let dc = g
            .device_catalog(&cat, d, &exclude, NearestVersion::Tc)
            .unwrap();
        let mut bad = q.clone();
        bad[2 * d + 5] = f32::NAN;
        for e in [
            g.nearest_in(&dc, &bad, 10).unwrap_err(),
            s.search(&bad, 10).unwrap_err(),
        ] {
            assert!(
                e.downcast_ref::<llm4dsr_kernels::BadQuery>().is_some(),
                "{e:#}"
            );
            let e = e.to_string();
            assert!(e.contains("query 2") && e.contains("dim 5"), "{e}");
        }
        let mut huge = q.clone();
        huge[d] = 3e19;
        let e = g.nearest_in(&dc, &huge, 10).unwrap_err().to_string();
        assert!(e.contains("query 1") && e.contains("overflows"), "{e}");
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_tests_skipped_without_feature() {
    eprintln!("SKIP: GPU kernel tests: built without --features cuda");
}
