//! llm4dsr-rec: the sequential recommenders the denoiser is judged by. SASRec, GRU4Rec and
//! Caser (CPU, f32), each twice: in candle with autograd (`sasrec.rs`, ...: the reference) and
//! as a fused engine with a hand-written backward pass (`*_fused.rs`, tested equal to the
//! reference; the default, several times faster). Trained with Adam (full-softmax
//! cross-entropy or BCE with a sampled negative), early-stopped on the validation split, and
//! evaluated by full ranking over the whole catalogue (HR@K, NDCG@K, K in 1, 5, 10, 20, 50).
//!
//! Everything random is keyed (`KeyedRng`), so a seed fixes the result on CPU, and training
//! and evaluation take a `Comm`: data-parallel over MPI ranks, or one process with `Local`.

pub mod adam;
pub mod batch;
pub mod caser;
pub mod caser_fused;
pub mod checkpoint;
pub mod dataset;
pub mod evaluate;
pub mod fused;
pub mod gru4rec;
pub mod gru4rec_fused;
pub mod layers;
pub mod metrics;
pub mod model;
pub mod params;
pub mod sasrec;
pub mod sasrec_fused;
pub mod synthetic;
pub mod train;

pub use batch::Targets;
pub use dataset::RecDataset;
pub use evaluate::{evaluate, EvalOptions};
pub use fused::FusedEngine;
pub use metrics::{Metrics, KS};
pub use model::{ModelConfig, ModelKind, Recommender};
pub use train::{train, Engine, LossKind, SelectOn, TrainConfig, TrainOutcome};
