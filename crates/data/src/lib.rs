//! llm4dsr-data: everything that is data, not model. Interaction logs and catalogues are
//! imported, filtered, windowed, split and noised by the `prepare` stage into a dataset
//! directory of Parquet files, which every later stage reads:
//!
//! ```text
//! <dataset>/catalog.parquet            item_id, title, source_id
//! <dataset>/users.parquet              user, source_id
//! <dataset>/interactions.parquet       user, item, timestamp, noise, original
//! <dataset>/windows/{train,valid,test}.parquet   (see `windows`)
//! <dataset>/sft.parquet                one-swap SFT instances
//! <dataset>/manifest.json              config, seed, input/output sha256, counts
//! ```

pub mod assets;
pub mod atomic;
pub mod catalog;
pub mod import;
pub mod interactions;
pub mod manifest;
pub mod noise;
pub mod parquet_io;
pub mod prepare;
pub mod rng;
pub mod sft;
pub mod shard;
pub mod windows;

pub use catalog::Catalog;
pub use manifest::Manifest;
pub use noise::NoiseScorer;
pub use rng::{KeyedRng, Purpose};
pub use windows::{read_split, WindowRef, Windows};
