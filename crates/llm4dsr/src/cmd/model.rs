//! `llm4dsr model convert`: write a GGUF model (e.g. the SmolLM2 asset) out as an HF model
//! directory (`config.json`, f32 `model.safetensors`, `tokenizer.json`, `manifest.json`), the
//! form fine-tuning and every other stage load fastest and that HF tools read.

use crate::config::ConfigFile;
use anyhow::{anyhow, Result};
use clap::{ArgMatches, Subcommand};
use llm4dsr_data::manifest::FileDigest;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The SmolLM2 asset, relative to the cache root.
pub const SMOLLM2_GGUF: &str = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Convert a GGUF model to an HF directory (dequantised to f32; llama.cpp's q/k row
    /// permutation undone; tokenizer rebuilt from the GGUF metadata).
    Convert(ConvertArgs),
}

#[derive(clap::Args, Debug, Serialize, Deserialize)]
pub struct ConvertArgs {
    /// GGUF file to convert (default: the SmolLM2-135M-Instruct asset in the cache).
    #[arg(long)]
    pub gguf: Option<PathBuf>,
    /// Output directory (written atomically; or `out` in [model-convert] of the config).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace the output directory if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(config: &ConfigFile, matches: &ArgMatches) -> Result<()> {
    let (name, sub) = matches
        .subcommand()
        .ok_or_else(|| anyhow!("`model` needs a subcommand (convert)"))?;
    match name {
        "convert" => {
            let args: ConvertArgs = config.resolve("model-convert", sub)?;
            let out = args
                .out
                .ok_or_else(|| anyhow!("--out is required (or `out` in [model-convert])"))?;
            let gguf = match args.gguf {
                Some(p) => p,
                None => llm4dsr_data::assets::require(SMOLLM2_GGUF)?,
            };
            let t0 = std::time::Instant::now();
            llm4dsr_llm::gguf::convert_to_hf_dir(&gguf, &out, args.overwrite)?;
            tracing::info!(
                gguf = %gguf.display(),
                out = %out.display(),
                secs = t0.elapsed().as_secs_f32(),
                "converted"
            );
            println!("{}", out.display());
            Ok(())
        }
        other => unreachable!("unhandled model subcommand {other}"),
    }
}

/// What identifies a model, as a manifest input: the GGUF file's sha256, or for an HF
/// directory the sha256 of the hashes of its config.json, tokenizer.json (where present) and
/// weight files, with the bytes of all of them.
pub fn model_input(path: &Path) -> Result<FileDigest> {
    use llm4dsr_data::manifest::{sha256_bytes, sha256_file};
    let (sha256, bytes) = if !path.is_dir() {
        sha256_file(path)?
    } else {
        let mut files = vec![path.join("config.json")];
        files.extend(Some(path.join("tokenizer.json")).filter(|p| p.exists()));
        files.extend(llm4dsr_llm::load::safetensors_files(path)?);
        let parts = files
            .iter()
            .map(|f| sha256_file(f))
            .collect::<Result<Vec<_>>>()?;
        let shas: Vec<&str> = parts.iter().map(|(s, _)| s.as_str()).collect();
        (
            sha256_bytes(shas.join(",").as_bytes()),
            parts.iter().map(|(_, b)| b).sum(),
        )
    };
    Ok(FileDigest {
        path: path.display().to_string(),
        sha256,
        bytes,
    })
}
