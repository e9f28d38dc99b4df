//! The LLM runtime: tiny random Llama / Qwen2 models built here (loading, packed vs padded,
//! KV-cache continuations vs recomputation, first-token vs full-title, generation, bad input),
//! and the real SmolLM2-135M-Instruct / all-MiniLM-L6-v2 from the asset cache (skipped with a
//! visible message when absent; `llm4dsr assets fetch` provides them).

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, D};
use llm4dsr_data::{Catalog, KeyedRng, NoiseScorer, Purpose};
use llm4dsr_kernels::decoder_ops::Impl;
use llm4dsr_llm::decoder::{weight_shapes, PackedBatch, PaddedBatch};
use llm4dsr_llm::score::{continuation_scores, first_token_scores};
use llm4dsr_llm::tokenizers::{
    models::bpe::Vocab, models::wordlevel::WordLevel, pre_tokenizers::whitespace::Whitespace,
    Tokenizer,
};
use llm4dsr_llm::{
    generate_greedy, Arch, GenerateOptions, Llm, LlmNoiseScorer, ModelConfig, ScoreMode,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TITLES: [&str; 8] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
];

fn tiny_config(arch: Arch, tie: bool) -> ModelConfig {
    ModelConfig {
        arch,
        vocab_size: 160,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 256,
        tie_word_embeddings: tie,
        qkv_bias: arch == Arch::Qwen2,
        o_bias: false,
        bos_token_id: None,
        eos_token_ids: vec![1],
    }
}

/// A word-level tokenizer over the template's words, the test titles and a few extras.
fn tiny_tokenizer(extra_words: usize) -> Tokenizer {
    let mut words: Vec<String> = vec!["[UNK]".into(), "</s>".into()];
    let text = format!(
        "{} {}",
        llm4dsr_llm::prompt::sft_text(&TITLES, "alpha", "bravo"),
        TITLES.join(" ")
    );
    let re_words: Vec<String> = text
        .split(|c: char| c.is_whitespace())
        .flat_map(|w| {
            // Whitespace pre-tokenizer: runs of word chars, runs of other chars.
            let mut out = Vec::new();
            let mut cur = String::new();
            let mut cur_word = None;
            for ch in w.chars() {
                let is_word = ch.is_alphanumeric() || ch == '_';
                if cur_word.is_some_and(|x| x != is_word) {
                    out.push(std::mem::take(&mut cur));
                }
                cur_word = Some(is_word);
                cur.push(ch);
            }
            if !cur.is_empty() {
                out.push(cur);
            }
            out
        })
        .collect();
    for w in re_words {
        if !words.contains(&w) {
            words.push(w);
        }
    }
    for i in 0..extra_words {
        words.push(format!("extra{i}"));
    }
    let vocab: Vocab = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok
}

/// Random weights (KeyedRng, so the fixture is the same on every run).
fn tiny_weights(cfg: &ModelConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut m = HashMap::new();
    for (k, (name, shape)) in weight_shapes(cfg).into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let mut rng = KeyedRng::new(seed, Purpose::Other, k as u64);
        let (base, scale) = if name.ends_with("norm.weight") {
            (1.0, 0.1)
        } else if name.contains("embed_tokens") || name.starts_with("lm_head") {
            (0.0, 0.5)
        } else {
            (0.0, 0.15)
        };
        let v: Vec<f32> = (0..n)
            .map(|_| (base + scale * rng.normal()) as f32)
            .collect();
        m.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    }
    m
}

fn write_model_dir(
    dir: &Path,
    cfg: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    tok: &Tokenizer,
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&llm4dsr_llm::models::to_config_json(cfg)).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(weights, dir.join("model.safetensors")).unwrap();
    tok.save(dir.join("tokenizer.json"), false).unwrap();
}

fn tiny_model(arch: Arch, tie: bool) -> (tempfile::TempDir, Llm) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(arch, tie);
    write_model_dir(tmp.path(), &cfg, &tiny_weights(&cfg, 7), &tiny_tokenizer(0));
    let llm = Llm::load(tmp.path(), &Device::Cpu).unwrap();
    (tmp, llm)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn seqs() -> Vec<Vec<u32>> {
    vec![
        vec![5, 9, 17, 3, 44, 21, 8],
        vec![12, 4],
        vec![30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40],
        vec![7],
    ]
}

#[test]
fn tiny_models_load_and_packed_equals_padded() {
    for (arch, tie) in [(Arch::Llama, true), (Arch::Qwen2, false)] {
        let (_tmp, llm) = tiny_model(arch, tie);
        assert_eq!(llm.config().arch, arch);
        let d = &llm.decoder;
        let s = seqs();
        let packed = d
            .forward_packed(&PackedBatch::new(&s), &[], false)
            .unwrap()
            .hidden;
        let packed_logits = d.logits(&packed).unwrap();
        for left in [false, true] {
            let pb = if left {
                PaddedBatch::left_padded(&s, 0)
            } else {
                PaddedBatch::right_padded(&s, 0)
            };
            let padded = d.forward_padded(&pb).unwrap();
            let mut off = 0;
            for (i, q) in s.iter().enumerate() {
                let start = if left { pb.len - q.len() } else { 0 };
                let a = d
                    .logits(&padded.get(i).unwrap().narrow(0, start, q.len()).unwrap())
                    .unwrap();
                let b = packed_logits.narrow(0, off, q.len()).unwrap();
                let diff = max_abs_diff(&a, &b);
                assert!(
                    diff < 1e-4,
                    "{arch:?} left={left} seq {i}: packed vs padded logits differ by {diff}"
                );
                off += q.len();
            }
        }
        // Each sequence alone gives the same states as inside the packed batch.
        let alone = d
            .forward_packed(&PackedBatch::new(&[&s[2]]), &[], false)
            .unwrap()
            .hidden;
        let off = s[0].len() + s[1].len();
        let diff = max_abs_diff(&alone, &packed.narrow(0, off, s[2].len()).unwrap());
        assert!(diff < 1e-4, "{arch:?}: alone vs packed differ by {diff}");
        // Causal: a prefix gives the same states; a different earlier token changes them.
        let prefix = d
            .forward_packed(&PackedBatch::new(&[&s[0][..2]]), &[], false)
            .unwrap()
            .hidden;
        assert!(max_abs_diff(&prefix.get(1).unwrap(), &packed.get(1).unwrap()) < 1e-4);
        let other = d
            .forward_packed(&PackedBatch::new(&[[99u32, s[0][1]]]), &[], false)
            .unwrap()
            .hidden;
        assert!(max_abs_diff(&other.get(1).unwrap(), &packed.get(1).unwrap()) > 1e-3);
    }
}

/// log P(tokens[k] | tokens[..k]) for k >= start, by one full forward.
fn full_logprobs(llm: &Llm, tokens: &[u32], start: usize) -> Vec<f32> {
    let h = llm
        .decoder
        .forward_packed(&PackedBatch::new(&[tokens]), &[], false)
        .unwrap()
        .hidden;
    let lp = candle_nn_log_softmax(&llm.decoder.logits(&h).unwrap());
    (start..tokens.len())
        .map(|k| lp[k - 1][tokens[k] as usize])
        .collect()
}

fn candle_nn_log_softmax(logits: &Tensor) -> Vec<Vec<f32>> {
    llm4dsr_llm::decoder::log_softmax(logits)
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn kv_cache_continuations_match_full_recomputation() {
    for (arch, tie) in [(Arch::Llama, false), (Arch::Qwen2, true)] {
        let (_tmp, llm) = tiny_model(arch, tie);
        let prompts = vec![vec![3u32, 8, 13, 21, 34, 55, 89], vec![2u32, 4, 6, 8, 10]];
        let conts = vec![
            vec![vec![11u32, 12, 13], vec![40], vec![41, 42, 43, 44, 45]],
            vec![vec![7u32, 7], vec![99, 98, 97, 96]],
        ];
        let scores = continuation_scores(&llm, &prompts, &conts).unwrap();
        for (w, p) in prompts.iter().enumerate() {
            for (j, c) in conts[w].iter().enumerate() {
                let full: Vec<u32> = p.iter().chain(c).copied().collect();
                let reference = full_logprobs(&llm, &full, p.len());
                let sum: f32 = reference.iter().sum();
                let got = scores[w][j];
                assert_eq!(got.tokens as usize, c.len());
                assert!(
                    (got.sum - sum).abs() < 1e-5 * c.len().max(1) as f32 + 1e-5,
                    "{arch:?} window {w} item {j}: cached {} vs full {sum}",
                    got.sum
                );
                assert!((got.first - reference[0]).abs() < 1e-5);
            }
        }
        // A cache continued by a continuation equals the cache of the whole sequence.
        let (_, cache) = llm.decoder.prefill(&prompts[0]).unwrap();
        let mut b = PackedBatch::new::<Vec<u32>>(&[]);
        b.push(&conts[0][0], Some(0));
        let f = llm.decoder.forward_packed(&b, &[&cache], true).unwrap();
        let full: Vec<u32> = prompts[0].iter().chain(&conts[0][0]).copied().collect();
        let (hfull, cfull) = llm.decoder.prefill(&full).unwrap();
        assert_eq!(f.caches[0].len, full.len());
        let d = max_abs_diff(&f.caches[0].layers[1].0, &cfull.layers[1].0);
        assert!(d < 1e-5, "continued cache differs by {d}");
        let d = max_abs_diff(&f.hidden, &hfull.narrow(0, prompts[0].len(), 3).unwrap());
        assert!(d < 1e-5, "continued hidden states differ by {d}");
    }
}

/// One packed forward mixing everything the batched attention has to get right: independent
/// sequences of very different lengths (padding, and a split into several calls), sequences
/// continuing caches that are views of one earlier batch, a cache that was itself a
/// continuation, several continuations of one cache, all interleaved. Every sequence's hidden
/// states and cache must equal those of its own full forward.
#[test]
fn mixed_packed_batch_equals_separate_forwards() {
    let tok = |seed: u32, n: usize| -> Vec<u32> {
        (0..n as u32)
            .map(|i| 2 + (seed * 37 + i * 11) % 150)
            .collect()
    };
    // Each architecture with our decoder ops and with candle's (LLM4DSR_DECODER_OPS=candle on a GPU; on the
    // CPU it is the only place its plain-range views run).
    for (arch, tie, ops) in [
        (Arch::Llama, true, Impl::Kernel),
        (Arch::Qwen2, false, Impl::Kernel),
        (Arch::Llama, true, Impl::CandleOps),
    ] {
        let (_tmp, mut llm) = tiny_model(arch, tie);
        llm.decoder.set_ops(ops);
        let d = &llm.decoder;
        // Two prompts forwarded together: their caches are views of one batch.
        let prompts = [tok(1, 9), tok(2, 14)];
        let pf = d
            .forward_packed(&PackedBatch::new(&prompts), &[], true)
            .unwrap();
        // A third cache that is a continuation (prompt 0 + 3 tokens).
        let ext = tok(3, 3);
        let mut b = PackedBatch::new::<Vec<u32>>(&[]);
        b.push(&ext, Some(0));
        let cont = d.forward_packed(&b, &[&pf.caches[0]], true).unwrap();
        let caches = [&pf.caches[0], &pf.caches[1], &cont.caches[0]];
        let full_prefix = |c: usize| -> Vec<u32> {
            match c {
                0 => prompts[0].clone(),
                1 => prompts[1].clone(),
                _ => prompts[0].iter().chain(&ext).copied().collect(),
            }
        };
        // The first groups of the first call have equal masks, a later one differs.
        let items: Vec<(Vec<u32>, Option<usize>)> = vec![
            (tok(20, 3), None),
            (tok(21, 3), None),
            (tok(10, 3), None),
            (tok(11, 4), Some(1)),
            (tok(12, 2), Some(1)),
            (tok(13, 60), None),
            (tok(14, 5), Some(2)),
            (tok(15, 1), Some(0)),
            (tok(16, 17), None),
            (tok(17, 17), None),
            (tok(18, 3), Some(2)),
            (tok(19, 2), Some(0)),
        ];
        let mut batch = PackedBatch::new::<Vec<u32>>(&[]);
        for (t, p) in &items {
            batch.push(t, *p);
        }
        let f = d.forward_packed(&batch, &caches, true).unwrap();
        for (i, (t, p)) in items.iter().enumerate() {
            let r = batch.range(i);
            let whole: Vec<u32> = match p {
                Some(c) => full_prefix(*c)
                    .into_iter()
                    .chain(t.iter().copied())
                    .collect(),
                None => t.clone(),
            };
            let (h, c) = d.prefill(&whole).unwrap();
            let off = whole.len() - t.len();
            let dh = max_abs_diff(
                &f.hidden.narrow(0, r.start, r.len()).unwrap(),
                &h.narrow(0, off, t.len()).unwrap(),
            );
            assert!(
                dh < 1e-4,
                "{arch:?} sequence {i}: hidden states differ by {dh}"
            );
            assert_eq!(f.caches[i].len, whole.len());
            for l in 0..2 {
                let dk = max_abs_diff(&f.caches[i].layers[l].0, &c.layers[l].0);
                let dv = max_abs_diff(&f.caches[i].layers[l].1, &c.layers[l].1);
                assert!(
                    dk < 1e-4 && dv < 1e-4,
                    "{arch:?} sequence {i} layer {l}: cache differs by {dk} / {dv}"
                );
            }
        }
    }
}

fn tiny_catalog() -> Catalog {
    let mut c = Catalog::new();
    for t in TITLES {
        c.push(t.to_string(), t.to_string());
    }
    c
}

#[test]
fn first_token_equals_full_title_on_one_token_titles() {
    let (_tmp, llm) = tiny_model(Arch::Llama, true);
    let catalog = tiny_catalog();
    let mut scorer = LlmNoiseScorer::new(&llm, &catalog, ScoreMode::FirstToken).unwrap();
    for id in 1..=8 {
        assert_eq!(scorer.title_tokens().get(id).len(), 1, "title {id}");
    }
    let windows: Vec<&[u32]> = vec![&[1, 2, 3, 4, 5], &[6, 7, 8], &[2, 2, 5, 1]];
    let first = scorer.score_sequences(&windows).unwrap();
    // Without the closing quote, a one-token title's full-title score is its first-token score.
    let prompts: Vec<Vec<u32>> = windows
        .iter()
        .map(|w| scorer.prompt_tokens(w).unwrap())
        .collect();
    let conts: Vec<Vec<Vec<u32>>> = windows
        .iter()
        .map(|w| {
            w.iter()
                .map(|&i| scorer.title_tokens().get(i).to_vec())
                .collect()
        })
        .collect();
    let full = continuation_scores(&llm, &prompts, &conts).unwrap();
    let ft = first_token_scores(
        &llm,
        &prompts,
        &conts
            .iter()
            .map(|c| c.iter().map(|t| t[0]).collect())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    for w in 0..windows.len() {
        for j in 0..windows[w].len() {
            assert!((first[w][j] - full[w][j].sum).abs() < 1e-5);
            assert!((ft[w][j] - full[w][j].sum).abs() < 1e-5);
        }
    }
    // The scorer's modes through the NoiseScorer trait: packed items in, one score per item out.
    let items: Vec<u32> = windows.iter().flat_map(|w| w.to_vec()).collect();
    let offsets = vec![0u32, 5, 8, 12];
    let s_first = scorer.score(&items, &offsets).unwrap();
    assert_eq!(s_first, first.concat());
    scorer.mode = ScoreMode::FullTitle;
    let s_full = scorer.score(&items, &offsets).unwrap();
    scorer.mode = ScoreMode::FullTitleMean;
    let s_mean = scorer.score(&items, &offsets).unwrap();
    assert_eq!(s_full.len(), 12);
    for k in 0..12 {
        // Title + closing quote: two tokens, the first of which is the first-token score.
        assert!(s_full[k] < s_first[k]);
        assert!((s_mean[k] - s_full[k] / 2.0).abs() < 1e-5);
    }
    assert_eq!(scorer.name(), "llm-full-title-mean");
    // The template head is computed once and shared; the scores are those of full prompts.
    assert!(
        scorer.shared_prefix_len() > 40,
        "{}",
        scorer.shared_prefix_len()
    );
    scorer.set_share_template(false).unwrap();
    assert_eq!(scorer.shared_prefix_len(), 0);
    let unshared = scorer.score(&items, &offsets).unwrap();
    scorer.mode = ScoreMode::FirstToken;
    let unshared_first = scorer.score(&items, &offsets).unwrap();
    for k in 0..12 {
        assert!((unshared[k] - s_mean[k]).abs() < 1e-5, "item {k}");
        assert!((unshared_first[k] - s_first[k]).abs() < 1e-5, "item {k}");
    }
    scorer.mode = ScoreMode::FullTitleMean;
    // Duplicate items of one window get identical scores (same prompt, same continuation).
    assert_eq!(s_full[8], s_full[9]);
    assert!(scorer.score(&[1, 99], &[0, 2]).is_err(), "unknown item id");
}

#[test]
fn greedy_generation_matches_recomputation() {
    let (_tmp, llm) = tiny_model(Arch::Qwen2, false);
    let prompts = vec![vec![3u32, 8, 13], vec![21u32, 34, 55, 89, 5, 6], vec![9u32]];
    let opts = GenerateOptions {
        max_new_tokens: 6,
        stop: None,
        extra_eos: vec![],
    };
    let gen = generate_greedy(&llm, &prompts, &opts).unwrap();
    let eos = llm.eos_ids();
    for (p, g) in prompts.iter().zip(&gen) {
        // Recompute greedily without any cache.
        let mut seq = p.clone();
        let mut expect = Vec::new();
        for _ in 0..6 {
            let h = llm
                .decoder
                .forward_packed(&PackedBatch::new(&[&seq]), &[], false)
                .unwrap()
                .hidden;
            let last = h.get(seq.len() - 1).unwrap().unsqueeze(0).unwrap();
            let t = llm
                .decoder
                .logits(&last)
                .unwrap()
                .argmax(D::Minus1)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()[0];
            if eos.contains(&t) {
                break;
            }
            expect.push(t);
            seq.push(t);
        }
        assert_eq!(g.tokens, expect);
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Arch::Llama, false);
    let w = tiny_weights(&cfg, 3);
    let tok = tiny_tokenizer(0);
    let err = |p: &Path| format!("{:#}", Llm::load(p, &Device::Cpu).err().expect("must fail"));

    // A directory without config.json.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = err(&empty);
    assert!(e.contains("no config.json"), "{e}");

    // A missing tensor.
    let missing = tmp.path().join("missing");
    let mut w2 = w.clone();
    w2.remove("model.layers.1.mlp.up_proj.weight");
    write_model_dir(&missing, &cfg, &w2, &tok);
    let e = err(&missing);
    assert!(e.contains("model.layers.1.mlp.up_proj.weight"), "{e}");

    // A mis-shaped tensor.
    let misshaped = tmp.path().join("misshaped");
    let mut w3 = w.clone();
    w3.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros((16, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    write_model_dir(&misshaped, &cfg, &w3, &tok);
    let e = err(&misshaped);
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.weight")
            && e.contains("shape")
            && e.contains("model.safetensors")
            && e.contains("config.json")
            && e.contains("num_key_value_heads"),
        "{e}"
    );

    // A tensor the configured model does not use (an MLP bias, `mlp_bias` unset): refused,
    // where it used to be dropped without a word.
    let extra = tmp.path().join("extra");
    let mut w4 = w.clone();
    w4.insert(
        "model.layers.1.mlp.gate_proj.bias".into(),
        Tensor::zeros(96, DType::F32, &Device::Cpu).unwrap(),
    );
    write_model_dir(&extra, &cfg, &w4, &tok);
    let e = err(&extra);
    assert!(
        e.contains("model.safetensors")
            && e.contains("`model.layers.1.mlp.gate_proj.bias`")
            && e.contains("not part of the model"),
        "{e}"
    );

    // A tokenizer with more tokens than the model has embeddings.
    let bigtok = tmp.path().join("bigtok");
    write_model_dir(&bigtok, &cfg, &w, &tiny_tokenizer(200));
    let e = err(&bigtok);
    assert!(
        e.contains("tokenizer") && e.contains("160"),
        "tokenizer/model mismatch: {e}"
    );

    // A prompt longer than the context.
    let ok = tmp.path().join("ok");
    write_model_dir(&ok, &cfg, &w, &tok);
    let llm = Llm::load(&ok, &Device::Cpu).unwrap();
    let long = vec![5u32; 300];
    let e = format!(
        "{:#}",
        first_token_scores(&llm, &[long], &[vec![5]]).err().unwrap()
    );
    assert!(e.contains("context is 256"), "{e}");
    // A token id outside the vocabulary.
    let e = format!(
        "{:#}",
        llm.decoder
            .forward_packed(&PackedBatch::new(&[vec![500u32]]), &[], false)
            .err()
            .unwrap()
    );
    assert!(e.contains("outside the model's vocabulary"), "{e}");
    // A non-model path.
    let e = err(&tmp.path().join("nothing.gguf"));
    assert!(e.contains("does not exist"), "{e}");
}

// ---------------------------------------------------------------- real models (asset cache)

fn cache_dir() -> PathBuf {
    llm4dsr_data::assets::cache_dir()
}

fn smollm2_gguf() -> Option<PathBuf> {
    let p = cache_dir().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIP: {} absent (run `llm4dsr assets fetch`)", p.display());
        None
    }
}

const CHATML_FRANCE: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn smollm2_gguf_converted_and_quantized_agree() {
    let Some(gguf) = smollm2_gguf() else { return };
    let llm = Llm::load(&gguf, &Device::Cpu).unwrap();
    let cfg = llm.config();
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads
        ),
        (30, 576, 9, 3)
    );
    assert!(cfg.tie_word_embeddings);
    let prompt = llm.encode_prompt(CHATML_FRANCE).unwrap();
    assert_eq!(
        llm.tokenizer.token_to_id("<|im_start|>"),
        Some(prompt[0]),
        "special tokens are single ids"
    );

    // Converted HF directory: loads and gives the same logits as the GGUF loaded directly.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2-hf");
    llm4dsr_llm::gguf::convert_to_hf_dir(&gguf, &out, false).unwrap();
    assert!(out.join("manifest.json").exists());
    let conv = Llm::load(&out, &Device::Cpu).unwrap();
    assert_eq!(conv.encode_prompt(CHATML_FRANCE).unwrap(), prompt);
    let ours = |m: &Llm| {
        let h = m
            .decoder
            .forward_packed(&PackedBatch::new(&[&prompt]), &[], false)
            .unwrap()
            .hidden;
        m.decoder
            .logits(&h.narrow(0, prompt.len() - 1, 1).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap()
    };
    let a = ours(&llm);
    let b = ours(&conv);
    assert!(max_abs_diff(&a, &b) < 1e-6);

    // The quantised model run by candle-transformers' own GGUF Llama (Q4_1 matmuls).
    let mut f = std::fs::File::open(&gguf).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut q = candle_transformers_quantized_llama(content, &mut f);
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let ql = q.forward(&input, 0).unwrap().squeeze(0).unwrap();
    let diff = max_abs_diff(&a, &ql);
    eprintln!(
        "SmolLM2 next-token logits: ours (f32, dequantised) vs quantised Q4_1: max |diff| = {diff}"
    );
    // Quantised Q4_1 matmuls (activations quantised to Q8) shift log-probs by up to ~0.3 nats
    // on this prompt; the distributions must still agree on the leading candidates.
    let logp = |t: &Tensor| -> Vec<f32> {
        llm4dsr_llm::decoder::log_softmax(t)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (la, lq) = (logp(&a), logp(&ql));
    let top = |v: &[f32], k: usize| {
        let mut i: Vec<usize> = (0..v.len()).collect();
        i.sort_by(|x, y| v[*y].total_cmp(&v[*x]));
        i.truncate(k);
        i
    };
    let (ta, tq) = (top(&la, 5), top(&lq, 5));
    let shared = ta.iter().filter(|t| tq.contains(t)).count();
    let worst = top(&la, 10)
        .iter()
        .map(|&t| (la[t] - lq[t]).abs())
        .fold(0f32, f32::max);
    eprintln!(
        "SmolLM2 next token: ours (f32) top-5 {:?}, quantised top-5 {:?}; max |dlogp| over our top-10 = {worst}",
        ta.iter().map(|&t| llm.decode(&[t as u32]).unwrap()).collect::<Vec<_>>(),
        tq.iter().map(|&t| llm.decode(&[t as u32]).unwrap()).collect::<Vec<_>>()
    );
    assert!(shared >= 4, "top-5 next tokens share only {shared}");
    assert!(
        worst < 0.6,
        "log-probs of the leading tokens differ by {worst}"
    );

    // candle-transformers' own f32 Llama on the converted directory: an independent forward.
    let cfg_json: llm4dsr_llm::candle_transformers::models::llama::LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let ccfg = cfg_json.into_config(false);
    let vb = unsafe { candle_nn_varbuilder(&out.join("model.safetensors")) };
    let reference =
        llm4dsr_llm::candle_transformers::models::llama::Llama::load(vb, &ccfg).unwrap();
    let mut cache = llm4dsr_llm::candle_transformers::models::llama::Cache::new(
        false,
        DType::F32,
        &ccfg,
        &Device::Cpu,
    )
    .unwrap();
    let rl = reference
        .forward(&input, 0, &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let diff = max_abs_diff(&a, &rl);
    eprintln!("SmolLM2 next-token logits: ours vs candle-transformers llama (both f32): max |diff| = {diff}");
    assert!(diff < 1e-3, "ours vs candle llama logits differ by {diff}");
}

#[test]
fn smollm2_scores_real_titles_and_answers_paris() {
    let Some(gguf) = smollm2_gguf() else { return };
    let llm = Llm::load(&gguf, &Device::Cpu).unwrap();
    let prompt = llm.encode_prompt(CHATML_FRANCE).unwrap();
    // Scoring a real window: the shared template head (computed once) gives the scores of
    // full prompts, and the first-token score is the first token of the full-title score.
    let mut catalog = Catalog::new();
    for t in [
        "Toy Story (1995)",
        "GoldenEye (1995)",
        "Four Rooms (1995)",
        "Get Shorty (1995)",
        "Copycat (1995)",
        "(500) Days of Summer (2009)",
    ] {
        catalog.push(t.into(), String::new());
    }
    let window: &[u32] = &[1, 2, 3, 4, 5, 6];
    let mut scorer = LlmNoiseScorer::new(&llm, &catalog, ScoreMode::FullTitle).unwrap();
    // The scored continuation is what the model reads after the prompt when the title and its
    // closing quote follow in one text: `(1995)"` ends in the one token `)"`, not in `)` and
    // `"` tokenised apart (titles starting with punctuation, like `(500) ...`, can merge with
    // the opening quote instead; docs/llm.md).
    let titles: Vec<&str> = window.iter().map(|&i| catalog.title(i)).collect();
    let prefix = llm4dsr_llm::prompt::scoring_prefix(&titles);
    let p = llm.encode_prompt(&prefix).unwrap();
    for id in 1..=5 {
        let t = catalog.title(id);
        let joint = llm.encode_prompt(&format!("{prefix}{t}\"")).unwrap();
        assert_eq!(joint[..p.len()], p[..], "{t}");
        assert_eq!(joint[p.len()..], scorer.continuation(id)[..], "{t}");
        assert_eq!(
            scorer.continuation(id).len(),
            scorer.title_tokens().get(id).len(),
            "{t}: `)\"` is one token"
        );
    }
    assert!(
        scorer.shared_prefix_len() > 60,
        "{}",
        scorer.shared_prefix_len()
    );
    let shared = scorer.score_all(&[window]).unwrap();
    scorer.set_share_template(false).unwrap();
    let full = scorer.score_all(&[window]).unwrap();
    scorer.mode = ScoreMode::FirstToken;
    let first = scorer.score_sequences(&[window]).unwrap();
    for j in 0..window.len() {
        assert!((shared[0][j].sum - full[0][j].sum).abs() < 1e-3, "item {j}");
        assert!((first[0][j] - full[0][j].first).abs() < 1e-3, "item {j}");
        assert!(full[0][j].sum < full[0][j].first);
    }

    // ChatML: the capital of France.
    let g = generate_greedy(
        &llm,
        &[prompt],
        &GenerateOptions {
            max_new_tokens: 16,
            stop: None,
            extra_eos: vec![],
        },
    )
    .unwrap();
    eprintln!("SmolLM2 answered: {:?}", g[0].text);
    assert!(g[0].text.contains("Paris"), "{:?}", g[0].text);
}

fn candle_transformers_quantized_llama(
    content: candle_core::quantized::gguf_file::Content,
    f: &mut std::fs::File,
) -> llm4dsr_llm::candle_transformers::models::quantized_llama::ModelWeights {
    llm4dsr_llm::candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content,
        f,
        &Device::Cpu,
    )
    .unwrap()
}

/// # Safety
/// Read-only memory map of a file this test wrote and does not modify.
unsafe fn candle_nn_varbuilder(path: &Path) -> llm4dsr_llm::candle_nn::VarBuilder<'static> {
    llm4dsr_llm::candle_nn::VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu)
        .unwrap()
}

#[test]
fn minilm_embeddings_are_unit_and_semantic() {
    let dir = cache_dir().join("all-minilm-l6-v2");
    if !dir.join("model.safetensors").exists() {
        eprintln!(
            "SKIP: {} absent (run `llm4dsr assets fetch`)",
            dir.display()
        );
        return;
    }
    let m = llm4dsr_llm::embed::MiniLm::load(&dir, &Device::Cpu).unwrap();
    let titles = [
        "Star Wars (1977)",
        "Empire Strikes Back, The (1980)",
        "A cat is sitting on the mat",
        "The cat sits on a mat",
    ];
    let e = m.embed(&titles, 3).unwrap();
    let d = m.hidden;
    assert_eq!(e.len(), titles.len() * d);
    let row = |i: usize| &e[i * d..(i + 1) * d];
    for i in 0..titles.len() {
        let n: f32 = row(i).iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-4, "row {i} has squared norm {n}");
    }
    let dist = |i: usize, j: usize| -> f32 {
        row(i)
            .iter()
            .zip(row(j))
            .map(|(a, b)| (a - b) * (a - b))
            .sum()
    };
    assert!(
        dist(0, 1) < dist(0, 2),
        "Star Wars nearer to Empire than to a cat"
    );
    assert!(dist(2, 3) < 0.2, "paraphrases are near: {}", dist(2, 3));
    assert!(dist(2, 3) < dist(2, 0) && dist(2, 3) < dist(2, 1));
    // Batch composition does not change an embedding.
    let alone = m.embed(&titles[2..3], 1).unwrap();
    let diff = alone
        .iter()
        .zip(row(2))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "padding changed the embedding by {diff}");
}

#[test]
fn last_token_embeddings_are_batch_invariant() {
    let (_tmp, llm) = tiny_model(Arch::Llama, false);
    let texts = ["alpha bravo", "charlie", "delta echo foxtrot golf"];
    let all = llm4dsr_llm::embed::last_token_embeddings(&llm, &texts, 8).unwrap();
    let d = llm.decoder.hidden_size();
    assert_eq!(all.len(), 3 * d);
    for (i, t) in texts.iter().enumerate() {
        let one = llm4dsr_llm::embed::last_token_embeddings(&llm, &[t], 1).unwrap();
        let diff = one
            .iter()
            .zip(&all[i * d..(i + 1) * d])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "text {i}: {diff}");
    }
    assert!(all[..d] != all[d..2 * d]);
}

// ------------------------------------------------------------------ GGUF fixtures, CLI

/// llama.cpp's HF -> GGUF permutation of Llama q/k rows (convert_hf_to_gguf.py `permute`).
fn llamacpp_permute(w: &Tensor, heads: usize) -> Tensor {
    let dims = w.dims().to_vec();
    let (out, inp) = (dims[0], dims[1]);
    w.reshape((heads, 2, out / heads / 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

fn gguf_name(hf: &str) -> String {
    hf.replace("model.embed_tokens", "token_embd")
        .replace("model.norm", "output_norm")
        .replace("lm_head", "output")
        .replace("model.layers.", "blk.")
        .replace("input_layernorm", "attn_norm")
        .replace("post_attention_layernorm", "ffn_norm")
        .replace("self_attn.q_proj", "attn_q")
        .replace("self_attn.k_proj", "attn_k")
        .replace("self_attn.v_proj", "attn_v")
        .replace("self_attn.o_proj", "attn_output")
        .replace("mlp.gate_proj", "ffn_gate")
        .replace("mlp.up_proj", "ffn_up")
        .replace("mlp.down_proj", "ffn_down")
}

/// Write `weights` as an f32 GGUF file the way llama.cpp lays a model out, with a byte-level
/// BPE vocabulary (the 256 byte symbols + `<|im_end|>` as a control token) in the metadata.
fn write_gguf(path: &Path, cfg: &ModelConfig, weights: &HashMap<String, Tensor>, pre: &str) {
    use candle_core::quantized::{gguf_file::Value, GgmlDType, QTensor};
    let a = cfg.arch.name();
    let mut alphabet: Vec<String> =
        llm4dsr_llm::tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .map(|c| c.to_string())
            .collect();
    alphabet.sort();
    let mut types = vec![Value::I32(1); alphabet.len()];
    alphabet.push("<|im_end|>".into());
    types.push(Value::I32(3));
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (
            format!("{a}.context_length"),
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        (
            format!("{a}.embedding_length"),
            Value::U32(cfg.hidden_size as u32),
        ),
        (
            format!("{a}.block_count"),
            Value::U32(cfg.num_hidden_layers as u32),
        ),
        (
            format!("{a}.feed_forward_length"),
            Value::U32(cfg.intermediate_size as u32),
        ),
        (
            format!("{a}.attention.head_count"),
            Value::U32(cfg.num_attention_heads as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(cfg.num_key_value_heads as u32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            format!("{a}.rope.freq_base"),
            Value::F32(cfg.rope_theta as f32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(alphabet.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(256)),
    ];
    let mut tensors = Vec::new();
    for (name, _) in weight_shapes(cfg) {
        let mut t = weights[&name].clone();
        if cfg.arch == Arch::Llama && name.contains("q_proj.weight") {
            t = llamacpp_permute(&t, cfg.num_attention_heads);
        } else if cfg.arch == Arch::Llama && name.contains("k_proj.weight") {
            t = llamacpp_permute(&t, cfg.num_key_value_heads);
        }
        tensors.push((
            gguf_name(&name),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

#[test]
fn gguf_fixtures_load_like_their_hf_directories() {
    for (arch, tie, pre) in [(Arch::Llama, false, "smollm"), (Arch::Qwen2, true, "qwen2")] {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = tiny_config(arch, tie);
        cfg.vocab_size = 300;
        cfg.eos_token_ids = vec![256];
        let w = tiny_weights(&cfg, 11);
        let gguf = tmp.path().join("tiny.gguf");
        write_gguf(&gguf, &cfg, &w, pre);
        let from_gguf = Llm::load(&gguf, &Device::Cpu).unwrap();
        assert_eq!(
            from_gguf.config(),
            &cfg,
            "{arch:?}: config from GGUF metadata"
        );
        // The rebuilt byte-level tokenizer: bytes map to their symbols, the control token is one id.
        let ids = from_gguf.encode_prompt("hi <|im_end|>").unwrap();
        assert_eq!(ids.len(), 4, "{ids:?}");
        assert_eq!(ids[3], 256);
        assert_eq!(from_gguf.decode(&ids[..3]).unwrap(), "hi ");
        // Same logits as the HF directory of the same weights (q/k un-permuted for Llama).
        let dir = tmp.path().join("hf");
        llm4dsr_llm::gguf::convert_to_hf_dir(&gguf, &dir, false).unwrap();
        let hf_dir = tmp.path().join("hf-direct");
        write_model_dir(&hf_dir, &cfg, &w, &from_gguf.tokenizer);
        let direct = Llm::load(&hf_dir, &Device::Cpu).unwrap();
        let converted = Llm::load(&dir, &Device::Cpu).unwrap();
        let s = seqs();
        let logits = |m: &Llm| {
            let h = m
                .decoder
                .forward_packed(&PackedBatch::new(&s), &[], false)
                .unwrap()
                .hidden;
            m.decoder.logits(&h).unwrap()
        };
        let (a, b, c) = (logits(&from_gguf), logits(&direct), logits(&converted));
        assert!(max_abs_diff(&a, &b) < 1e-5, "{arch:?}: GGUF vs HF dir");
        assert!(max_abs_diff(&c, &b) < 1e-5, "{arch:?}: converted vs HF dir");
        // Converting onto an existing directory needs --overwrite.
        let e = llm4dsr_llm::gguf::convert_to_hf_dir(&gguf, &dir, false).unwrap_err();
        assert!(format!("{e:#}").contains("already exists"), "{e:#}");
    }
}

#[test]
fn cli_inspect_scores_and_model_convert() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Arch::Llama, true);
    let model = tmp.path().join("model");
    write_model_dir(&model, &cfg, &tiny_weights(&cfg, 5), &tiny_tokenizer(0));
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("windows")).unwrap();
    tiny_catalog()
        .write_parquet(&data.join("catalog.parquet"))
        .unwrap();
    let mut w = llm4dsr_data::Windows::new();
    w.push(
        1,
        4,
        &[1, 2, 3, 4, 5],
        &[0, 0, 1, 0, 0],
        &[1, 2, 7, 4, 5],
        100,
    );
    w.push(2, 3, &[6, 7, 8, 1], &[0, 0, 0, 0], &[6, 7, 8, 1], 200);
    w.write_parquet(&data.join("windows/test.parquet")).unwrap();
    let bin = env!("CARGO_BIN_EXE_llm4dsr");
    let out = std::process::Command::new(bin)
        .args(["inspect-scores", "--dataset"])
        .arg(&data)
        .arg("--model")
        .arg(&model)
        .args(["--windows", "5"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("first-token") && stdout.contains("full-title"),
        "{stdout}"
    );
    // History only on test windows: items 1-4 of window 0 and 6, 7, 8 of window 1.
    for t in [
        "alpha", "bravo", "charlie", "delta", "foxtrot", "golf", "hotel",
    ] {
        assert!(stdout.contains(t), "{t} missing:\n{stdout}");
    }
    assert!(
        stdout.contains("window 1 (user 2, pos 3), 3 items scored"),
        "{stdout}"
    );
    // --stride 2 from window 1: window 1 alone (3 is past the split's end).
    let out = std::process::Command::new(bin)
        .args(["inspect-scores", "--dataset"])
        .arg(&data)
        .arg("--model")
        .arg(&model)
        .args(["--windows", "5", "--start", "1", "--stride", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("window 1 (user 2,"),
        "{stdout}"
    );
    assert!(!stdout.contains("window 0 ("), "{stdout}");
    // A missing GGUF: non-zero exit, the path in the message, nothing written.
    let dest = tmp.path().join("converted");
    let out = std::process::Command::new(bin)
        .args(["model", "convert", "--gguf"])
        .arg(tmp.path().join("nope.gguf"))
        .arg("--out")
        .arg(&dest)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.gguf"));
    assert!(!dest.exists());
}

// ------------------------------------------------------------------------------- ground (CLI)

/// A Parquet file of (query_id, title) rows; `id_type` picks the id column's type.
fn write_queries(path: &Path, ids: arrow_array::ArrayRef, titles: &[&str]) {
    use std::sync::Arc;
    let batch = arrow_array::RecordBatch::try_from_iter([
        ("query_id", ids),
        (
            "title",
            Arc::new(arrow_array::StringArray::from(titles.to_vec())) as arrow_array::ArrayRef,
        ),
    ])
    .unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// (query_id, item_id, match, dist2, neighbours) rows of a grounded.parquet.
type GroundedRow = (u64, u32, String, f32, Vec<u32>);

fn read_grounded(path: &Path) -> Vec<GroundedRow> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, UInt32Type, UInt64Type};
    let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(path).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap();
    let mut out = Vec::new();
    for b in r {
        let b = b.unwrap();
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let (qid, item, how, dist, nb) = (
            col("query_id"),
            col("item_id"),
            col("match"),
            col("dist2"),
            col("neighbours"),
        );
        for i in 0..b.num_rows() {
            let n = nb.as_list::<i32>().value(i);
            out.push((
                qid.as_primitive::<UInt64Type>().value(i),
                item.as_primitive::<UInt32Type>().value(i),
                how.as_string::<i32>().value(i).to_string(),
                dist.as_primitive::<Float32Type>().value(i),
                n.as_primitive::<UInt32Type>().values().to_vec(),
            ));
        }
    }
    out
}

/// `llm4dsr ground` with a tiny model: exact, nearest (equal to the library's search over the
/// same embeddings) and empty titles; counts in the manifest; a killed run resumes to the same
/// bytes; bad query files are refused naming the file and the field, with no output.
#[test]
fn cli_ground_exact_nearest_empty_resume_and_bad_input() {
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Arch::Llama, true);
    let model = tmp.path().join("model");
    write_model_dir(&model, &cfg, &tiny_weights(&cfg, 9), &tiny_tokenizer(0));
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let catalog = tiny_catalog();
    catalog
        .write_parquet(&data.join("catalog.parquet"))
        .unwrap();
    let titles = ["charlie", "  golf ", "alpha bravo", "", "hotel echo delta"];
    let queries = tmp.path().join("q.parquet");
    let ids = Arc::new(arrow_array::Int64Array::from(vec![10i64, 11, 12, 13, 14]));
    write_queries(&queries, ids, &titles);
    let bin = env!("CARGO_BIN_EXE_llm4dsr");
    let ground = |out: &Path, q: &Path, env: &[(&str, &str)]| {
        let mut c = std::process::Command::new(bin);
        c.arg("ground")
            .arg("--dataset")
            .arg(&data)
            .arg("--queries")
            .arg(q)
            .arg("--out")
            .arg(out)
            .arg("--model")
            .arg(&model)
            .args([
                "--k",
                "3",
                "--catalog-shard-items",
                "3",
                "--query-shard-rows",
                "2",
            ])
            .env_remove("LLM4DSR_TEST_ABORT_AFTER_SHARDS");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let out = tmp.path().join("g");
    let o = ground(&out, &queries, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = read_grounded(&out.join("grounded.parquet"));
    assert_eq!(rows.len(), 5);
    assert_eq!((rows[0].0, rows[0].1, rows[0].2.as_str()), (10, 3, "exact"));
    assert_eq!((rows[1].0, rows[1].1, rows[1].2.as_str()), (11, 7, "exact"));
    assert_eq!((rows[3].1, rows[3].2.as_str()), (0, "empty"));
    // Nearest rows: what the library finds over the embeddings of the same model.
    let llm = Llm::load(&model, &Device::Cpu).unwrap();
    let emb = llm4dsr_llm::ground::LastTokenEmbedder {
        llm: &llm,
        batch: 16,
    };
    let ids: Vec<u32> = (1..=catalog.num_items()).collect();
    let e = llm4dsr_llm::ground::embed_items(&catalog, &ids, &emb).unwrap();
    let d = cfg.hidden_size;
    let index = llm4dsr_llm::ground::CatalogueIndex::new(&catalog, &e, d).unwrap();
    let want = index.ground(&titles, &emb, 3).unwrap();
    for i in [2, 4] {
        assert_eq!(rows[i].2, "nearest", "{i}");
        assert_eq!(rows[i].4, want[i].neighbours, "query {i}");
        assert_eq!(rows[i].1, rows[i].4[0]);
        assert!((rows[i].3 - want[i].dist2).abs() <= 1e-4 * want[i].dist2.max(1.0));
        assert!(!rows[i].4.contains(&0));
    }
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    for (k, v) in [
        ("queries.read", 5),
        ("queries.exact", 2),
        ("queries.nearest", 2),
        ("queries.empty", 1),
        ("catalog.items", 8),
    ] {
        assert_eq!(m["counts"][k], v, "{k}");
    }
    // The model is an input: its directory, the hash of its files, their bytes.
    let inputs = m["inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), 3, "{m}");
    assert_eq!(inputs[2]["path"], model.display().to_string());
    assert!(inputs[2]["bytes"].as_u64().unwrap() > 0);
    assert!(out.join("catalog_embeddings.parquet").exists());
    assert!(!tmp.path().join("g.parts").exists());

    // Killed after 2 of the 3 embedding parts: no output; the re-run reuses them, same bytes.
    let killed = tmp.path().join("k");
    let o = ground(
        &killed,
        &queries,
        &[("LLM4DSR_TEST_ABORT_AFTER_SHARDS", "0:2")],
    );
    assert!(!o.status.success());
    assert!(!killed.exists());
    assert!(tmp
        .path()
        .join("k.parts/embeddings/part-00001-of-00003.json")
        .exists());
    let o = ground(&killed, &queries, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already complete"));
    for f in ["grounded.parquet", "catalog_embeddings.parquet"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(killed.join(f)).unwrap(),
            "{f}"
        );
    }

    // Bad query files: named file and field, non-zero exit, nothing written.
    let bad = tmp.path().join("bad.parquet");
    let long = "x".repeat(2000);
    let cases: Vec<(arrow_array::ArrayRef, Vec<&str>, &str)> = vec![
        (
            Arc::new(arrow_array::StringArray::from(vec!["a", "b"])),
            vec!["alpha", "bravo"],
            "column `query_id` has type Utf8",
        ),
        (
            Arc::new(arrow_array::UInt64Array::from(vec![1u64, 1])),
            vec!["alpha", "bravo"],
            "field `query_id`: id 1 at rows 0 and 1",
        ),
        (
            Arc::new(arrow_array::Int32Array::from(vec![1, -2])),
            vec!["alpha", "bravo"],
            "field `query_id`: negative id -2 at row 1",
        ),
        (
            Arc::new(arrow_array::UInt32Array::from(vec![1u32, 2])),
            vec!["alpha", long.as_str()],
            "field `title`: row 1: title of 2000 characters",
        ),
    ];
    for (ids, t, msg) in cases {
        write_queries(&bad, ids, &t);
        let dest = tmp.path().join("bad-out");
        let o = ground(&dest, &bad, &[]);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{msg}");
        assert!(e.contains("bad.parquet") && e.contains(msg), "{msg}: {e}");
        assert!(!dest.exists() && !tmp.path().join("bad-out.parts").exists());
    }
    // A file without the title column.
    let batch = arrow_array::RecordBatch::try_from_iter([(
        "query_id",
        Arc::new(arrow_array::UInt64Array::from(vec![1u64])) as arrow_array::ArrayRef,
    )])
    .unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&bad).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let o = ground(&tmp.path().join("bad-out"), &bad, &[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("missing column `title`"),
        "{e}"
    );
}

/// `--device`: cpu always works; cuda in a build without candle's CUDA backend is a clear
/// error (exit != 0, the build script named); auto falls back to the CPU.
#[test]
fn device_choice() {
    use llm4dsr_llm::{llm_device, DeviceChoice};
    assert!(llm_device(DeviceChoice::Cpu).unwrap().is_cpu());
    if candle_core::utils::cuda_is_available() {
        eprintln!("SKIP: device_choice: built with candle's CUDA backend");
        return;
    }
    assert!(llm_device(DeviceChoice::Auto).unwrap().is_cpu());
    let e = llm_device(DeviceChoice::Cuda).unwrap_err().to_string();
    assert!(e.contains("jobs/build-cuda.sh"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llm4dsr"))
        .args(["ground", "--device", "cuda", "--dataset"])
        .arg(tmp.path())
        .arg("--queries")
        .arg(tmp.path().join("q.parquet"))
        .arg("--out")
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--device cuda"), "{e}");
}

// ------------------------------------------------- load-time consistency of tokenizer / config

/// `inspect-scores` on a tiny dataset (`windows`: (user, pos, items) of the test split) with
/// the model at `model`; returns (success, stdout, stderr).
fn run_inspect(
    dir: &Path,
    model: &Path,
    windows: &[(u32, u32, Vec<u32>)],
) -> (bool, String, String) {
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("windows")).unwrap();
    tiny_catalog()
        .write_parquet(&data.join("catalog.parquet"))
        .unwrap();
    let mut w = llm4dsr_data::Windows::new();
    for (user, pos, items) in windows {
        w.push(*user, *pos, items, &vec![0; items.len()], items, 100);
    }
    w.write_parquet(&data.join("windows/test.parquet")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llm4dsr"))
        .args(["inspect-scores", "--device", "cpu", "--dataset"])
        .arg(&data)
        .arg("--model")
        .arg(model)
        .args(["--windows", "5"])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tokenizer_of_another_model_is_refused_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tiny_tokenizer(0);
    let err = |p: &Path| format!("{:#}", Llm::load(p, &Device::Cpu).err().expect("must fail"));

    // The config's EOS id is an ordinary word of this tokenizer.
    let mut cfg = tiny_config(Arch::Llama, false);
    let word = tok.id_to_token(5).unwrap();
    cfg.eos_token_ids = vec![5];
    let dir = tmp.path().join("eos");
    write_model_dir(&dir, &cfg, &tiny_weights(&cfg, 3), &tok);
    let e = err(&dir);
    assert!(
        e.contains("tokenizer.json")
            && e.contains("config.json `eos_token_id` = 5")
            && e.contains(&format!("{word:?}")),
        "{e}"
    );
    // Same for BOS, and an id past the tokenizer's tokens.
    let mut cfg = tiny_config(Arch::Llama, false);
    cfg.bos_token_id = Some(150);
    let dir = tmp.path().join("bos");
    write_model_dir(&dir, &cfg, &tiny_weights(&cfg, 3), &tok);
    let e = err(&dir);
    assert!(
        e.contains("tokenizer.json") && e.contains("`bos_token_id` = 150"),
        "{e}"
    );

    // A BERT-style post-processor appends [SEP] after every prompt.
    let cfg = tiny_config(Arch::Llama, false);
    let mut bert = tiny_tokenizer(0);
    bert.add_special_tokens(vec![
        llm4dsr_llm::tokenizers::AddedToken::from("[CLS]", true),
        llm4dsr_llm::tokenizers::AddedToken::from("[SEP]", true),
    ])
    .unwrap();
    let (cls, sep) = (
        bert.token_to_id("[CLS]").unwrap(),
        bert.token_to_id("[SEP]").unwrap(),
    );
    bert.with_post_processor(Some(
        llm4dsr_llm::tokenizers::processors::template::TemplateProcessing::builder()
            .try_single("[CLS] $A [SEP]")
            .unwrap()
            .special_tokens(vec![("[CLS]", cls), ("[SEP]", sep)])
            .build()
            .unwrap(),
    ));
    let dir = tmp.path().join("sep");
    write_model_dir(&dir, &cfg, &tiny_weights(&cfg, 3), &bert);
    let e = err(&dir);
    assert!(
        e.contains("tokenizer.json") && e.contains("appends") && e.contains("[SEP]"),
        "{e}"
    );

    // The fixture itself passes.
    let dir = tmp.path().join("ok");
    write_model_dir(&dir, &cfg, &tiny_weights(&cfg, 3), &tok);
    Llm::load(&dir, &Device::Cpu).unwrap();

    // The auditor's case: SmolLM2's special ids (bos 1, eos 2) with MiniLM's WordPiece
    // tokenizer (ids 1, 2 are "[unused0]", "[unused1]").
    let minilm = cache_dir().join("all-minilm-l6-v2");
    if !minilm.join("tokenizer.json").exists() {
        eprintln!("SKIP: {} absent", minilm.display());
        return;
    }
    let bert = llm4dsr_llm::tokenizer::load_tokenizer_json(&minilm.join("tokenizer.json")).unwrap();
    let mut cfg = tiny_config(Arch::Llama, true);
    cfg.vocab_size = 30522;
    cfg.bos_token_id = Some(1);
    cfg.eos_token_ids = vec![2];
    let dir = tmp.path().join("minilm-tok");
    write_model_dir(&dir, &cfg, &tiny_weights(&cfg, 3), &bert);
    let e = err(&dir);
    assert!(
        e.contains("tokenizer.json") && e.contains("`bos_token_id` = 1") && e.contains("[unused0]"),
        "{e}"
    );
}

#[test]
fn layers_beyond_the_configured_count_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Arch::Llama, false);
    let mut deep = cfg.clone();
    deep.num_hidden_layers = 3;
    let w = tiny_weights(&deep, 3);
    // HF directory: config.json says 2 layers, the safetensors hold 3.
    let dir = tmp.path().join("hf");
    write_model_dir(&dir, &cfg, &w, &tiny_tokenizer(0));
    let e = format!(
        "{:#}",
        Llm::load(&dir, &Device::Cpu).err().expect("must fail")
    );
    assert!(
        e.contains("model.safetensors")
            && e.contains("`num_hidden_layers` is 2")
            && e.contains("hold 3 layers"),
        "{e}"
    );

    // GGUF: 3 blocks of tensors, `llama.block_count` patched to 2.
    let mut cfg = deep.clone();
    cfg.vocab_size = 300;
    cfg.eos_token_ids = vec![256];
    let w = tiny_weights(&cfg, 11);
    let good = tmp.path().join("good.gguf");
    write_gguf(&good, &cfg, &w, "smollm");
    Llm::load(&good, &Device::Cpu).unwrap();
    let patched = tmp.path().join("patched.gguf");
    patch_gguf_metadata(&good, &patched, |md| {
        for (k, v) in md.iter_mut() {
            if k == "llama.block_count" {
                *v = gguf_file::Value::U32(2);
            }
        }
    });
    let e = format!(
        "{:#}",
        Llm::load(&patched, &Device::Cpu).err().expect("must fail")
    );
    assert!(
        e.contains("patched.gguf")
            && e.contains("`llama.block_count` is 2")
            && e.contains("3 blocks"),
        "{e}"
    );
    let dest = tmp.path().join("converted");
    let e = llm4dsr_llm::gguf::convert_to_hf_dir(&patched, &dest, false).unwrap_err();
    assert!(format!("{e:#}").contains("block_count"), "{e:#}");
    assert!(!dest.exists());

    // RoPE scaling in the metadata, which llama.cpp applies and this runtime does not: refused
    // (it used to load and run unscaled).
    let scaled = tmp.path().join("scaled.gguf");
    patch_gguf_metadata(&good, &scaled, |md| {
        md.push((
            "llama.rope.scaling.type".into(),
            gguf_file::Value::String("linear".into()),
        ))
    });
    let e = format!(
        "{:#}",
        Llm::load(&scaled, &Device::Cpu).err().expect("must fail")
    );
    assert!(e.contains("`llama.rope.scaling.type` = \"linear\""), "{e}");
}

/// Copy the GGUF file `src` to `dst` with its metadata edited by `edit`.
fn patch_gguf_metadata(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, gguf_file::Value)>),
) {
    let mut f = std::fs::File::open(src).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut md: Vec<(String, gguf_file::Value)> = c
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    edit(&mut md);
    let names: Vec<String> = c.tensor_infos.keys().cloned().collect();
    let ts: Vec<_> = names
        .iter()
        .map(|n| c.tensor(&mut f, n, &Device::Cpu).unwrap())
        .collect();
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, _)> = names.iter().map(|n| n.as_str()).zip(ts.iter()).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &md_refs, &t_refs).unwrap();
}

#[test]
fn minilm_refuses_another_tokenizer_and_extra_layers() {
    let minilm = cache_dir().join("all-minilm-l6-v2");
    let Some(gguf) = smollm2_gguf() else { return };
    if !minilm.join("model.safetensors").exists() {
        eprintln!("SKIP: {} absent", minilm.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let link = |dir: &Path, name: &str| {
        std::os::unix::fs::symlink(minilm.join(name), dir.join(name)).unwrap();
    };
    let load = |dir: &Path| {
        format!(
            "{:#}",
            llm4dsr_llm::embed::MiniLm::load(dir, &Device::Cpu)
                .err()
                .expect("must fail")
        )
    };
    // SmolLM2's byte-level BPE tokenizer (49152 tokens) with MiniLM's 30522 embeddings.
    let dir = tmp.path().join("smol-tok");
    std::fs::create_dir_all(&dir).unwrap();
    link(&dir, "config.json");
    link(&dir, "model.safetensors");
    let smol = Llm::load(&gguf, &Device::Cpu).unwrap();
    smol.tokenizer
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    let e = load(&dir);
    assert!(
        e.contains("tokenizer.json") && e.contains("`vocab_size`") && e.contains("30522"),
        "{e}"
    );
    // A tokenizer that fits the vocabulary but is no BERT tokenizer (no [CLS] ... [SEP]).
    let dir = tmp.path().join("word-tok");
    std::fs::create_dir_all(&dir).unwrap();
    link(&dir, "config.json");
    link(&dir, "model.safetensors");
    tiny_tokenizer(0)
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    let e = load(&dir);
    assert!(
        e.contains("tokenizer.json") && e.contains("[CLS] ... [SEP]"),
        "{e}"
    );
    // config.json with 2 layers, the weights with 6.
    let dir = tmp.path().join("two-layers");
    std::fs::create_dir_all(&dir).unwrap();
    link(&dir, "model.safetensors");
    link(&dir, "tokenizer.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(minilm.join("config.json")).unwrap())
            .unwrap();
    v["num_hidden_layers"] = 2.into();
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    let e = load(&dir);
    assert!(
        e.contains("model.safetensors")
            && e.contains("`num_hidden_layers` is 2")
            && e.contains("hold 6 layers"),
        "{e}"
    );
}

#[test]
fn inspect_scores_refuses_nan_scores_and_overlong_windows() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Arch::Llama, true);
    // NaN weights: non-zero exit naming the window, nothing printed.
    let mut w = tiny_weights(&cfg, 5);
    w.insert(
        "model.norm.weight".into(),
        Tensor::full(f32::NAN, 64, &Device::Cpu).unwrap(),
    );
    let model = tmp.path().join("nan-model");
    write_model_dir(&model, &cfg, &w, &tiny_tokenizer(0));
    let (ok, stdout, stderr) = run_inspect(
        &tmp.path().join("nan"),
        &model,
        &[(1, 4, vec![1, 2, 3, 4, 5]), (2, 3, vec![6, 7, 8, 1])],
    );
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains("non-finite")
            && stderr.contains("test.parquet")
            && stderr.contains("window 0 (user 1, pos 4)"),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "{stdout}");

    // A window whose prompt is longer than the context (256): refused from token counts,
    // naming the split file, window, user and pos.
    let model = tmp.path().join("model");
    write_model_dir(&model, &cfg, &tiny_weights(&cfg, 5), &tiny_tokenizer(0));
    let long: Vec<u32> = (0..80).map(|i| 1 + i % 8).collect();
    let (ok, stdout, stderr) = run_inspect(
        &tmp.path().join("long"),
        &model,
        &[(1, 4, vec![1, 2, 3, 4, 5]), (7, 80, long.clone())],
    );
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains("test.parquet")
            && stderr.contains("window 1 (user 7, pos 80)")
            && stderr.contains("is 256 tokens"),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "{stdout}");

    // The scorer names the refused sequence by its index in `offsets` (empty ones counted),
    // so that `score` can name the window.
    let llm = Llm::load(&model, &Device::Cpu).unwrap();
    let catalog = tiny_catalog();
    for mode in [ScoreMode::FirstToken, ScoreMode::FullTitle] {
        let mut scorer = LlmNoiseScorer::new(&llm, &catalog, mode).unwrap();
        let mut items = vec![1, 2, 3];
        items.extend_from_slice(&long);
        let offsets = [0u32, 3, 3, items.len() as u32];
        let e = scorer.score(&items, &offsets).unwrap_err();
        let t = e
            .downcast_ref::<llm4dsr_llm::score::SequenceTooLong>()
            .unwrap_or_else(|| panic!("{e:#}"));
        assert_eq!((t.sequence, t.items, t.context), (2, 80, 256), "{mode:?}");
        assert!(t.prompt_tokens + t.title_tokens > 256);
    }
}
