//! End-to-end item-likelihood scoring throughput of the LLM runtime (forward + scoring), with
//! random weights of a named config: the same cases, shapes and token layout as
//! ../shared/bench/hf_scoring_baseline.py (PyTorch + transformers), printing the same JSON
//! fields, so the two compare line by line.
//!
//! ```text
//! cargo bench --bench scoring_e2e -- [--config smollm2-135m|qwen2-0.5b-like|llama3-8b]
//!     [--windows 512] [--batch 64] [--prompt-tokens 256] [--items 10] [--title-tokens 8]
//!     [--device auto|cpu|cuda] [--cases forward_only,first_token,full_title]
//! ```
//!
//! Cases: `first_token` (one packed forward of each window's prompt, log-softmax at its last
//! position, the first token of each item's title gathered) and `full_title` (the prompt's KV
//! cache once per window, all title tokens of all items as continuations in one packed
//! forward, per-item sums of token log-probs by the fused item-likelihood kernel where the
//! build has it). The LLM runs where `--device` says: a GPU needs a build with candle's CUDA
//! backend (`jobs/gpu-check.sh build-candle`), in bf16; the CPU runs f32. Token ids are random
//! (throughput does not depend on them), prompts are distinct per window (no shared prefix).
//! A third, diagnostic case, `forward_only`, times the prompts' packed forward alone (no LM
//! head), so a run shows how much of `first_token` is the forward.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use llm4dsr_data::{KeyedRng, Purpose};
use llm4dsr_llm::decoder::{weight_shapes, PackedBatch};
use llm4dsr_llm::score::{continuation_scores, first_token_scores};
use llm4dsr_llm::tokenizers::{models::wordlevel::WordLevel, Tokenizer};
use llm4dsr_llm::{llm_device, Arch, Decoder, DeviceChoice, Llm, ModelConfig};
use std::collections::HashMap;
use std::time::Instant;

/// The shapes of hf_scoring_baseline.py's CONFIGS (all Llama-architecture there too).
fn config(name: &str) -> Result<ModelConfig> {
    let (hidden, inter, layers, heads, kv, vocab, theta, tie) = match name {
        "smollm2-135m" => (576, 1536, 30, 9, 3, 49152, 100_000.0, true),
        "qwen2-0.5b-like" => (896, 4864, 24, 14, 2, 151_936, 10_000.0, true),
        "llama3-8b" => (4096, 14336, 32, 32, 8, 128_256, 500_000.0, false),
        other => bail!("--config {other}: expected smollm2-135m, qwen2-0.5b-like or llama3-8b"),
    };
    Ok(ModelConfig {
        arch: Arch::Llama,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        rope_scaling: None,
        max_position_embeddings: 4096,
        tie_word_embeddings: tie,
        qkv_bias: false,
        o_bias: false,
        bos_token_id: None,
        eos_token_ids: vec![0],
    })
}

struct Args {
    config: String,
    windows: usize,
    batch: usize,
    prompt_tokens: usize,
    items: usize,
    title_tokens: usize,
    device: DeviceChoice,
    cases: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        config: "smollm2-135m".into(),
        windows: 512,
        batch: 64,
        prompt_tokens: 256,
        items: 10,
        title_tokens: 8,
        device: DeviceChoice::Auto,
        cases: ["forward_only", "first_token", "full_title"]
            .map(String::from)
            .to_vec(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--bench" {
            continue; // added by `cargo bench`
        }
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => a.config = value()?,
            "--windows" => a.windows = value()?.parse()?,
            "--batch" => a.batch = value()?.parse()?,
            "--prompt-tokens" => a.prompt_tokens = value()?.parse()?,
            "--items" => a.items = value()?.parse()?,
            "--title-tokens" => a.title_tokens = value()?.parse()?,
            "--cases" => {
                a.cases = value()?.split(',').map(String::from).collect();
                if let Some(c) = a
                    .cases
                    .iter()
                    .find(|c| !["forward_only", "first_token", "full_title"].contains(&c.as_str()))
                {
                    bail!("--cases: unknown case {c} (forward_only, first_token, full_title)");
                }
            }
            "--device" => {
                a.device = match value()?.as_str() {
                    "auto" => DeviceChoice::Auto,
                    "cpu" => DeviceChoice::Cpu,
                    "cuda" => DeviceChoice::Cuda,
                    other => bail!("--device {other}: expected auto, cpu or cuda"),
                }
            }
            other => bail!("unknown flag {other} (see the file's header)"),
        }
    }
    if a.windows == 0 || a.batch == 0 || a.prompt_tokens == 0 || a.items == 0 {
        bail!("--windows, --batch, --prompt-tokens and --items must be positive");
    }
    if a.title_tokens == 0 {
        bail!("--title-tokens must be positive");
    }
    Ok(a)
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let cfg = config(&a.config)?;
    let device = llm_device(a.device)?;
    let dtype = llm4dsr_llm::load::default_dtype(&device);
    let t0 = Instant::now();
    // Random weights made on the device: N(0, 0.02), norms 1.
    let mut weights = HashMap::new();
    let mut params = 0usize;
    for (name, shape) in weight_shapes(&cfg) {
        params += shape.iter().product::<usize>();
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, DType::F32, &device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, &device)?
        };
        weights.insert(name, t.to_dtype(dtype)?);
    }
    let vb = llm4dsr_llm::candle_nn::VarBuilder::from_tensors(weights, dtype, &device);
    let decoder = Decoder::load(vb, &cfg)?;
    let vocab: HashMap<String, u32> = [("[UNK]".to_string(), 0)].into_iter().collect();
    let tokenizer = Tokenizer::new(
        WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let llm = Llm {
        decoder,
        tokenizer,
        source: format!("random {}", a.config).into(),
    };
    eprintln!(
        "{}: {params} parameters, random, on {:?} in {dtype:?} ({:.1} s); kernels: {:?}",
        a.config,
        device.location(),
        t0.elapsed().as_secs_f64(),
        llm4dsr_kernels::backend()
    );

    // Token ids as the Python script draws them: prompts [W, P], titles [W, items, T].
    let v = cfg.vocab_size as u64;
    let prompts: Vec<Vec<u32>> = (0..a.windows)
        .map(|w| {
            let mut r = KeyedRng::new(1, Purpose::Other, w as u64);
            (0..a.prompt_tokens).map(|_| r.below(v) as u32).collect()
        })
        .collect();
    let titles: Vec<Vec<Vec<u32>>> = (0..a.windows)
        .map(|w| {
            let mut r = KeyedRng::new(2, Purpose::Other, w as u64);
            (0..a.items)
                .map(|_| (0..a.title_tokens).map(|_| r.below(v) as u32).collect())
                .collect()
        })
        .collect();
    let firsts: Vec<Vec<u32>> = titles
        .iter()
        .map(|w| w.iter().map(|t| t[0]).collect())
        .collect();

    // Hand-over check: the dispatching fused scoring on tensors living on `device` (with
    // candle's CUDA backend: handed to the kernel device to device) equals the CPU path on the
    // same bf16/f32 values, to f32 accumulation order.
    {
        let (rows, per_item) = (64usize, 4usize);
        let h = Tensor::randn(0f32, 1.0, (rows, cfg.hidden_size), &device)?.to_dtype(dtype)?;
        let head = &llm.decoder.lm_head;
        let mut r = KeyedRng::new(3, Purpose::Other, 0);
        let targets: Vec<u32> = (0..rows).map(|_| r.below(v) as u32).collect();
        let offsets: Vec<u32> = (0..=rows / per_item)
            .map(|i| (i * per_item) as u32)
            .collect();
        let got = llm4dsr_kernels::item_loglik(&h, head, &targets, &offsets)?;
        let cpu = candle_core::Device::Cpu;
        let want = llm4dsr_kernels::item_loglik_cpu(
            &h.to_device(&cpu)?,
            &head.to_device(&cpu)?,
            &targets,
            &offsets,
        )?;
        let worst = got
            .per_item
            .iter()
            .zip(&want.per_item)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(
                0f32,
                |m, x| if x.is_nan() { f32::INFINITY } else { m.max(x) },
            );
        eprintln!(
            "hand-over check: fused scoring on {:?} vs the CPU path: max rel diff {worst:.2e}",
            device.location()
        );
        if worst > 1e-3 {
            bail!("fused scoring on the device differs from the CPU path by {worst:e}");
        }
    }

    // The attention's fused masked softmax on `device` (the NVRTC kernel on candle's stream
    // with candle's CUDA backend) against its f64 reference, for each dtype and both mask
    // layouts, a padded row and a fully masked one included.
    {
        let (b, heads, n, s) = (3usize, 4usize, 33usize, 300usize);
        let mut r = KeyedRng::new(4, Purpose::Other, 0);
        let x: Vec<f32> = (0..b * heads * n * s)
            .map(|_| (r.normal() * 3.0) as f32)
            .collect();
        for mb in [1, b] {
            let mut mask = vec![f32::NEG_INFINITY; mb * n * s];
            for e in 0..mb {
                let p = 200 + 20 * e;
                for i in 0..n {
                    let row = &mut mask[(e * n + i) * s..(e * n + i + 1) * s];
                    if i + 2 < n {
                        row[..p + i + 1].fill(0.0);
                    } else if i + 1 < n {
                        row[0] = 0.0; // a padded query
                    } // the last query of each entry: fully masked (zeros)
                }
            }
            let want =
                llm4dsr_kernels::masked_softmax_reference(&x, &mask, s, n, heads * n, mb, 0.125);
            for dt in [DType::BF16, DType::F16, DType::F32] {
                let att = Tensor::from_vec(x.clone(), (b, heads, n, s), &device)?.to_dtype(dt)?;
                let m = Tensor::from_vec(mask.clone(), (mb, n, s), &device)?;
                let got: Vec<f32> = llm4dsr_kernels::masked_softmax(&att, &m, 0.125)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                // The inputs were rounded to `dt` first: compare with the reference of those.
                let xr: Vec<f32> = att.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let want_r = llm4dsr_kernels::masked_softmax_reference(
                    &xr,
                    &mask,
                    s,
                    n,
                    heads * n,
                    mb,
                    0.125,
                );
                let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
                let worst = got
                    .iter()
                    .zip(&want_r)
                    .map(|(g, w)| {
                        if g.is_nan() {
                            f64::INFINITY
                        } else {
                            (*g as f64 - w).abs()
                        }
                    })
                    .fold(0f64, f64::max);
                let drift = want_r
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f64, f64::max);
                eprintln!(
                    "masked softmax on {:?}, {dt:?}, mask batches {mb}: max abs diff {worst:.2e} (input rounding moves the reference by {drift:.2e})",
                    device.location()
                );
                if worst > tol {
                    bail!("masked softmax on the device differs from its reference by {worst:e} ({dt:?})");
                }
            }
        }
    }

    // The decoder's gather and SwiGLU kernels on `device` against the same ops on the CPU: the
    // gathers must be exact copies, SwiGLU within the dtype's rounding. (The forward uses the
    // kernels unless LLM4DSR_DECODER_OPS=candle; the JSON lines say which.)
    {
        let cpu = candle_core::Device::Cpu;
        let (p, heads, hd, b, n) = (300usize, 3usize, 64usize, 5usize, 37usize);
        let mut r = KeyedRng::new(5, Purpose::Other, 0);
        let x: Vec<f32> = (0..p * heads * hd).map(|_| r.normal() as f32).collect();
        let rows: Vec<u32> = (0..b * n).map(|_| r.below(p as u64) as u32).collect();
        let back: Vec<u32> = (0..100).map(|_| r.below((b * n) as u64) as u32).collect();
        let gate: Vec<f32> = (0..4 * 1536).map(|_| (r.normal() * 3.0) as f32).collect();
        let up: Vec<f32> = (0..4 * 1536).map(|_| r.normal() as f32).collect();
        for dt in [DType::BF16, DType::F16, DType::F32] {
            let mut worst = [0f32; 5];
            let on = |dev: &candle_core::Device| -> Result<[Vec<f32>; 5]> {
                let src = Tensor::from_vec(x.clone(), (p, heads, hd), dev)?.to_dtype(dt)?;
                use llm4dsr_kernels::decoder_ops::{
                    gather_heads_first_with, gather_token_major_with, swiglu_with, Impl,
                };
                let rows = Tensor::new(rows.as_slice(), dev)?;
                let hf = gather_heads_first_with(&src, &rows, b, n, Impl::Kernel)?;
                let back = Tensor::new(back.as_slice(), dev)?;
                let tm = gather_token_major_with(&hf, &back, Impl::Kernel)?;
                let g = Tensor::from_vec(gate.clone(), (4, 1536), dev)?.to_dtype(dt)?;
                let u = Tensor::from_vec(up.clone(), (4, 1536), dev)?.to_dtype(dt)?;
                let sw = swiglu_with(&g, &u, Impl::Kernel)?;
                // The residual add + RMSNorm (rows of 1,536: several words per lane).
                let w = u.get(0)?;
                let (sum, normed) = llm4dsr_kernels::add_rms_norm(&g, &u, &w, 1e-5)?;
                let v = |t: Tensor| -> Result<Vec<f32>> {
                    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
                };
                Ok([v(hf)?, v(tm)?, v(sw)?, v(sum)?, v(normed)?])
            };
            let (a, c) = (on(&device)?, on(&cpu)?);
            for k in 0..5 {
                worst[k] = a[k]
                    .iter()
                    .zip(&c[k])
                    .map(|(x, y)| {
                        if x.is_nan() {
                            f32::INFINITY
                        } else {
                            (x - y).abs() / y.abs().max(1.0)
                        }
                    })
                    .fold(0f32, f32::max);
            }
            eprintln!(
                "decoder ops on {:?}, {dt:?}: gather heads-first / token-major max diff {:.1e} / {:.1e}, swiglu max rel diff {:.2e}, add + rms norm max rel diff {:.2e} / {:.2e}",
                device.location(),
                worst[0],
                worst[1],
                worst[2],
                worst[3],
                worst[4]
            );
            let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
            if worst[0] != 0.0 || worst[1] != 0.0 || worst[2..].iter().any(|&w| w > tol) {
                // Fatal only where the forward uses them: with candle's ops the run still
                // gives the baseline figures.
                if llm4dsr_kernels::decoder_ops::Impl::for_device(&device)
                    == llm4dsr_kernels::decoder_ops::Impl::CandleOps
                {
                    eprintln!(
                        "WARNING: decoder ops on the device differ from the CPU ({dt:?}): \
                         {worst:?}; this run uses candle's ops (LLM4DSR_DECODER_OPS=candle)"
                    );
                } else {
                    bail!("decoder ops on the device differ from the CPU ({dt:?}): {worst:?}");
                }
            }
        }
    }

    let run = |case: &str, n: usize| -> Result<f64> {
        let mut checksum = 0f64;
        for s in (0..n).step_by(a.batch) {
            let e = (s + a.batch).min(n);
            if case == "forward_only" {
                // Diagnostic: the prompts' packed forward alone (no LM head, no scoring).
                let b = PackedBatch::new(&prompts[s..e]);
                let f = llm.decoder.forward_packed(&b, &[], false)?;
                let last = llm.decoder.rows(&f.hidden, &b.last_positions())?;
                checksum += last.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as f64;
            } else if case == "first_token" {
                let out = first_token_scores(&llm, &prompts[s..e], &firsts[s..e])?;
                checksum += out.iter().flatten().map(|&x| x as f64).sum::<f64>();
            } else {
                let out = continuation_scores(&llm, &prompts[s..e], &titles[s..e])?;
                checksum += out.iter().flatten().map(|x| x.sum as f64).sum::<f64>();
            }
        }
        if !checksum.is_finite() {
            bail!("{case}: a score is not finite");
        }
        Ok(checksum)
    };
    // LLM4DSR_E2E_PROFILE=1: the attached profiler records the timed runs only (`ncu
    // --profile-from-start off`), not the weights' initialisation or the warm-ups.
    let profile = std::env::var("LLM4DSR_E2E_PROFILE").is_ok_and(|v| v == "1");
    for case in a.cases.iter().map(String::as_str) {
        run(case, a.batch.min(a.windows))?; // warm-up (and the LM head made resident)
        if profile {
            llm4dsr_kernels::backend::profiler(true);
        }
        let t = Instant::now();
        run(case, a.windows)?;
        let secs = t.elapsed().as_secs_f64();
        if profile {
            llm4dsr_kernels::backend::profiler(false);
        }
        let tokens = a.windows * a.prompt_tokens
            + if case == "full_title" {
                a.windows * a.items * a.title_tokens
            } else {
                0
            };
        let rec = serde_json::json!({
            "impl": "llm4dsr",
            "decoder_ops": format!("{:?}", llm4dsr_kernels::decoder_ops::Impl::for_device(&device)),
            "config": a.config,
            "params": params,
            "device": format!("{:?}", device.location()),
            "dtype": format!("{dtype:?}"),
            "windows": a.windows,
            "batch": a.batch,
            "prompt_tokens": a.prompt_tokens,
            "items": a.items,
            "title_tokens": a.title_tokens,
            "case": case,
            "seconds": (secs * 1e4).round() / 1e4,
            "windows_per_s": (a.windows as f64 / secs * 100.0).round() / 100.0,
            "tokens_per_s": (tokens as f64 / secs * 10.0).round() / 10.0,
        });
        println!("{rec}");
    }
    Ok(())
}
