//! Fused kernels of llm4dsr's hot loops, each with a CPU path, an f64 CPU reference and (with
//! feature `cuda`) an NVRTC-compiled CUDA kernel from `kernels/*.cu`.
//!
//! - [`item_loglik`]: per-item sum of target-token log-probs from hidden states and the LM
//!   head, never materialising the [tokens x vocab] logits for the whole batch.
//! - [`nearest_items`]: top-k L2-nearest catalogue embeddings for a batch of queries.

pub mod item_loglik;
pub mod nearest;

pub use item_loglik::{item_loglik, ItemLogLik};
pub use nearest::{nearest_items, Nearest};
