//! llm4dsr-llm: the causal-LLM runtime the denoiser's stages share (scoring, generation,
//! grounding, fine-tuning), written on candle so one code path runs on CPU (f32) and GPU.
//!
//! - [`decoder`]: the Llama/Qwen2 transformer with per-position hidden states, packed ragged
//!   batches (`cu_seqlens`), padded batches with masks, and shareable KV caches.
//! - [`models`]: one file per architecture family (config parsing, naming).
//! - [`load`] / [`gguf`] / [`tokenizer`]: HF directories, GGUF files (dequantised, tokenizer
//!   rebuilt), conversion GGUF -> HF, title-token cache.
//! - [`prompt`]: the one Alpaca template (scoring prefix, generation prefix, SFT text).
//! - [`score`]: first-token and full-title item scores, and the `NoiseScorer` for the LLM.
//! - [`generate`]: batched greedy decoding. [`embed`]: title embeddings. [`ground`]: generated
//!   title -> catalogue item (exact match, else the nearest embedding through the grounding
//!   kernel's [`llm4dsr_kernels::CatalogSearch`]).

pub mod config;
pub mod decoder;
pub mod embed;
pub mod generate;
pub mod gguf;
pub mod ground;
pub mod load;
pub mod models;
pub mod prompt;
pub mod score;
pub mod tokenizer;

pub use candle_nn;
pub use candle_transformers;
pub use config::{Arch, ModelConfig};
pub use decoder::{Decoder, KvCache, PackedBatch, PaddedBatch};
pub use generate::{generate_greedy, GenerateOptions, Generated, StopReason};
pub use llm4dsr_kernels;
pub use load::{llm_device, DeviceChoice, Llm};
pub use score::{LlmNoiseScorer, ScoreMode};
pub use tokenizer::TitleTokens;
/// Re-exported so that callers (and the integration tests) build tokenizers against the same
/// version this crate uses.
pub use tokenizers;
