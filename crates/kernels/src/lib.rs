//! Fused kernels of llm4dsr's hot loops, each with a CPU path, an f64 CPU reference and (with
//! feature `cuda`) an NVRTC-compiled CUDA kernel from `kernels/*.cu`.
//!
//! - [`item_loglik`]: per-item sum of target-token log-probs from hidden states and the LM
//!   head, never materialising the [tokens x vocab] logits for the whole batch.
//! - [`nearest_items`]: top-k L2-nearest catalogue embeddings for a batch of queries.
//!
//! Both dispatch at run time ([`backend`]): the CUDA kernels when built with `cuda` and a GPU
//! driver is present, otherwise the CPU paths (one log line says which and why).

pub mod attention;
pub mod backend;
#[cfg(feature = "candle-cuda")]
mod candle_cuda;
pub mod cpu_math;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod decoder_ops;
pub mod item_loglik;
pub mod launch;
pub mod nearest;
pub mod nearest_tc;
pub mod reference;
pub mod resident;
pub mod sources;

pub use attention::{masked_softmax, masked_softmax_reference};
pub use backend::{backend, Backend};
pub use decoder_ops::{add_rms_norm, gather_heads_first, gather_token_major, swiglu};
pub use item_loglik::{item_loglik, item_loglik_cpu, ItemLogLik};
pub use nearest::{nearest_items, nearest_items_cpu, BadQuery, CatalogSearch, Nearest};
