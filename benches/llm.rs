//! LLM runtime throughput with the real SmolLM2-135M-Instruct (dequantised to f32) on the CPU:
//! windows/s for first-token and full-title scoring (10 items per window, ~230-token prompts
//! built from ML-100K titles), tokens/s for batched greedy generation, titles/s for title
//! embeddings (SmolLM2 last token, MiniLM mean-pooled).
//!
//! Run: `cargo bench --bench llm` (release). Needs the assets (`llm4dsr assets fetch`); skips
//! with a message otherwise. LLM4DSR_BENCH_WINDOWS sets the number of scored windows (16).

use candle_core::Device;
use llm4dsr_data::{assets, KeyedRng, Purpose};
use llm4dsr_llm::candle_transformers::models::llama as candle_llama;
use llm4dsr_llm::embed::{last_token_embeddings, MiniLm};
use llm4dsr_llm::{generate_greedy, prompt, GenerateOptions, Llm, LlmNoiseScorer, ScoreMode};
use std::time::Instant;

#[path = "common/ml100k.rs"]
mod ml100k;
use ml100k::ml100k_catalog;

fn main() -> anyhow::Result<()> {
    let gguf = assets::asset_path("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let Some(catalog) = ml100k_catalog().filter(|_| gguf.exists()) else {
        eprintln!("SKIP: SmolLM2 or ML-100K assets absent (run `llm4dsr assets fetch`)");
        return Ok(());
    };
    let n_windows: usize = std::env::var("LLM4DSR_BENCH_WINDOWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let llm = Llm::load(&gguf, &dev)?;
    let load_s = t0.elapsed().as_secs_f64();
    // Windows of 10 random catalogue items (keyed, so every run scores the same windows).
    let windows: Vec<Vec<u32>> = (0..n_windows)
        .map(|w| {
            let mut r = KeyedRng::new(1, Purpose::Other, w as u64);
            (0..10)
                .map(|_| 1 + r.below(catalog.num_items() as u64) as u32)
                .collect()
        })
        .collect();
    let seqs: Vec<&[u32]> = windows.iter().map(|w| w.as_slice()).collect();
    let mut rows: Vec<(String, String)> =
        vec![("load GGUF + dequantise".into(), format!("{load_s:.2} s"))];
    let mut scorer = LlmNoiseScorer::new(&llm, &catalog, ScoreMode::FirstToken)?;
    // One prompt's prefill: ours vs candle-transformers' own Llama on the same f32 weights.
    {
        let p = scorer.prompt_tokens(&windows[0])?;
        llm.decoder.prefill(&p)?;
        let t = Instant::now();
        for _ in 0..3 {
            llm.decoder.prefill(&p)?;
        }
        let ours = t.elapsed().as_secs_f64() / 3.0;
        let m = llm4dsr_llm::gguf::read_gguf(&gguf)?;
        let cfg_json = llm4dsr_llm::models::to_config_json(&m.config);
        let ccfg: candle_llama::LlamaConfig = serde_json::from_value(cfg_json)?;
        let ccfg = ccfg.into_config(false);
        let vb = llm4dsr_llm::candle_nn::VarBuilder::from_tensors(
            m.tensors,
            candle_core::DType::F32,
            &dev,
        );
        let reference = candle_llama::Llama::load(vb, &ccfg)?;
        let input = candle_core::Tensor::new(p.as_slice(), &dev)?.unsqueeze(0)?;
        let mut cache = candle_llama::Cache::new(false, candle_core::DType::F32, &ccfg, &dev)?;
        reference.forward(&input, 0, &mut cache)?;
        let t = Instant::now();
        for _ in 0..3 {
            reference.forward(&input, 0, &mut cache)?;
        }
        let theirs = t.elapsed().as_secs_f64() / 3.0;
        rows.push((
            format!("prefill of one {}-token prompt: ours", p.len()),
            format!("{:.0} ms", ours * 1e3),
        ));
        rows.push((
            "  same prompt, candle-transformers llama (last logits only)".into(),
            format!("{:.0} ms", theirs * 1e3),
        ));
    }
    let prompt_len: usize = seqs
        .iter()
        .map(|s| scorer.prompt_tokens(s).map(|p| p.len()))
        .sum::<anyhow::Result<usize>>()?
        / seqs.len();
    for bs in [1usize, 8] {
        scorer.windows_per_batch = bs;
        for mode in [ScoreMode::FirstToken, ScoreMode::FullTitle] {
            scorer.mode = mode;
            scorer.score_sequences(&seqs[..bs.min(seqs.len())])?; // warm-up
            let t = Instant::now();
            scorer.score_sequences(&seqs)?;
            let s = t.elapsed().as_secs_f64();
            rows.push((
                format!("{} scoring, {bs} windows/batch", mode.name()),
                format!("{:.2} windows/s", seqs.len() as f64 / s),
            ));
        }
    }
    // The same without the shared template head (every prompt forwarded in full).
    scorer.set_share_template(false)?;
    scorer.mode = ScoreMode::FirstToken;
    let t = Instant::now();
    scorer.score_sequences(&seqs)?;
    rows.push((
        "llm-first-token scoring, 8 windows/batch, template head not shared".into(),
        format!(
            "{:.2} windows/s",
            seqs.len() as f64 / t.elapsed().as_secs_f64()
        ),
    ));
    scorer.set_share_template(true)?;
    let shared_len = scorer.shared_prefix_len();
    // Generation: replacement titles after the generation prefix, 8 prompts at once.
    let gen_prompts: Vec<Vec<u32>> = seqs
        .iter()
        .take(8)
        .map(|s| {
            let titles: Vec<&str> = s.iter().map(|&i| catalog.title(i)).collect();
            llm.encode_prompt(&prompt::generation_prefix(&titles, titles[3]))
        })
        .collect::<anyhow::Result<_>>()?;
    for bs in [1usize, 8] {
        let opts = GenerateOptions {
            max_new_tokens: 24,
            stop: None,
            extra_eos: vec![],
        };
        let t = Instant::now();
        let mut tokens = 0;
        for chunk in gen_prompts.chunks(bs) {
            tokens += generate_greedy(&llm, chunk, &opts)?
                .iter()
                .map(|g| g.tokens.len())
                .sum::<usize>();
        }
        let s = t.elapsed().as_secs_f64();
        rows.push((
            format!("greedy generation, {bs} prompts/batch (prefill included)"),
            format!("{:.1} tokens/s", tokens as f64 / s),
        ));
    }
    let titles: Vec<&str> = (1..=256.min(catalog.num_items()))
        .map(|i| catalog.title(i))
        .collect();
    let t = Instant::now();
    last_token_embeddings(&llm, &titles, 64)?;
    rows.push((
        "SmolLM2 last-token title embeddings, 64/batch".into(),
        format!(
            "{:.1} titles/s",
            titles.len() as f64 / t.elapsed().as_secs_f64()
        ),
    ));
    let minilm_dir = assets::asset_path("all-minilm-l6-v2");
    if minilm_dir.join("model.safetensors").exists() {
        let m = MiniLm::load(&minilm_dir, &dev)?;
        m.embed(&titles[..8], 8)?;
        let t = Instant::now();
        m.embed(&titles, 64)?;
        rows.push((
            "MiniLM mean-pooled title embeddings, 64/batch".into(),
            format!(
                "{:.1} titles/s",
                titles.len() as f64 / t.elapsed().as_secs_f64()
            ),
        ));
    }
    println!(
        "SmolLM2-135M-Instruct f32 on CPU, {} windows of 10 items, mean prompt {prompt_len} tokens ({shared_len} shared template tokens computed once)",
        seqs.len()
    );
    println!("{:<62} {:>18}", "measure", "result");
    for (k, v) in rows {
        println!("{k:<62} {v:>18}");
    }
    Ok(())
}
