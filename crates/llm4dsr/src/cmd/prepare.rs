//! `llm4dsr prepare`: interactions + catalogue -> dataset directory (see docs/data.md).

use crate::config::ConfigFile;
use anyhow::{anyhow, bail, Context, Result};
use llm4dsr_data::prepare::{Protocol, Source, SourceFormat, SplitProtocol};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Serialize, Deserialize)]
pub struct PrepareArgs {
    /// Output dataset directory (written atomically; see --overwrite).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an output directory that holds a different dataset. Without it, a directory
    /// holding the same dataset (same config and input hashes) with every file intact (the
    /// sha256 values of its manifest) is left alone, a damaged one is rebuilt, and anything
    /// else is refused.
    #[arg(long)]
    pub overwrite: bool,
    /// Source format: recbole (atomic .inter/.item files), parquet (generic), or movie-csv
    /// (the LLM4DSR reference window CSVs).
    #[arg(long, default_value = "recbole")]
    pub format: String,
    /// A fetched dataset asset (ml-100k, ml-1m): reads <cache>/<asset>/<asset>.inter and .item,
    /// so --inter/--item are not needed. Run `llm4dsr assets fetch` first.
    #[arg(long)]
    pub asset: Option<String>,
    /// Interactions file (.inter for recbole, .parquet for parquet).
    #[arg(long)]
    pub inter: Option<PathBuf>,
    /// Catalogue file (.item for recbole, .parquet for parquet).
    #[arg(long)]
    pub item: Option<PathBuf>,
    /// Name of the user-id field/column.
    #[arg(long, default_value = "user_id")]
    pub user_field: String,
    /// Name of the item-id field/column (the same in both files).
    #[arg(long, default_value = "item_id")]
    pub item_field: String,
    /// Name of the timestamp field/column.
    #[arg(long, default_value = "timestamp")]
    pub timestamp_field: String,
    /// Name of the catalogue's title field/column (ML-1M: item_id, whose ids are titles).
    #[arg(long, default_value = "movie_title")]
    pub title_field: String,
    /// Catalogue field appended to the title as "Title (year)" (recbole only); "" for none.
    #[arg(long, default_value = "release_year")]
    pub year_field: String,
    /// movie-csv: directory holding the split CSVs and the catalogue JSON.
    #[arg(long)]
    pub windows_dir: Option<PathBuf>,
    /// movie-csv: training windows file in --windows-dir.
    #[arg(long, default_value = "train_5000.csv")]
    pub train_file: String,
    /// movie-csv: validation windows file in --windows-dir.
    #[arg(long, default_value = "valid_5000.csv")]
    pub valid_file: String,
    /// movie-csv: test windows file in --windows-dir.
    #[arg(long, default_value = "test_5000.csv")]
    pub test_file: String,
    /// movie-csv: catalogue (JSON object id -> title) in --windows-dir.
    #[arg(long, default_value = "id2name4Rec.json")]
    pub catalog_file: String,
    /// Seed of every random draw (noise, SFT swaps, SFT sampling), keyed per user / window.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Iterative k-core: drop users and items with fewer than k interactions until none is left
    /// (0 or 1: no filtering).
    #[arg(long, default_value_t = 5)]
    pub k_core: u32,
    /// Drop items whose title has at most this many characters.
    #[arg(long, default_value_t = 1)]
    pub min_title_chars: usize,
    /// Window length in items: history + 1 target (the reference uses 10 + 1).
    #[arg(long, default_value_t = 11)]
    pub window: usize,
    /// Split protocol: time (all windows by target time, cut by fractions) or leave-one-out.
    #[arg(long, default_value = "time")]
    pub split: String,
    /// Fraction of windows (by target time) in train (time split).
    #[arg(long, default_value_t = 0.8)]
    pub train_frac: f64,
    /// Fraction of windows in valid (time split); test gets the rest.
    #[arg(long, default_value_t = 0.1)]
    pub valid_frac: f64,
    /// Probability in [0, 1] that an interaction is replaced by a random item (synthetic noise,
    /// mask 1); test targets are kept clean.
    #[arg(long, default_value_t = 0.0)]
    pub noise_p: f64,
    /// Number of SFT instances sampled from the training windows (0: one per training window).
    #[arg(long, default_value_t = 0)]
    pub sft_windows: usize,
}

impl PrepareArgs {
    /// The source with paths resolved (an asset name becomes cache paths).
    pub fn source(&self) -> Result<Source> {
        let format: SourceFormat = self
            .format
            .parse()
            .with_context(|| format!("format = {:?}", self.format))?;
        let (mut inter, mut item) = (self.inter.clone(), self.item.clone());
        if let Some(a) = &self.asset {
            if format != SourceFormat::Recbole {
                bail!("--asset {a} is a RecBole dataset: use --format recbole");
            }
            llm4dsr_data::assets::find(a)?;
            // The asset's files, checked against their pinned sha256.
            if inter.is_none() {
                inter = Some(llm4dsr_data::assets::require(&format!("{a}/{a}.inter"))?);
            }
            if item.is_none() {
                item = Some(llm4dsr_data::assets::require(&format!("{a}/{a}.item"))?);
            }
        }
        Ok(Source {
            format,
            inter,
            item,
            user_field: self.user_field.clone(),
            item_field: self.item_field.clone(),
            timestamp_field: self.timestamp_field.clone(),
            title_field: self.title_field.clone(),
            year_field: self.year_field.clone(),
            windows_dir: self.windows_dir.clone(),
            train_file: self.train_file.clone(),
            valid_file: self.valid_file.clone(),
            test_file: self.test_file.clone(),
            catalog_file: self.catalog_file.clone(),
        })
    }

    pub fn protocol(&self) -> Result<Protocol> {
        let split: SplitProtocol = self
            .split
            .parse()
            .with_context(|| format!("split = {:?}", self.split))?;
        Ok(Protocol {
            seed: self.seed,
            k_core: self.k_core,
            min_title_chars: self.min_title_chars,
            window: self.window,
            split,
            train_frac: self.train_frac,
            valid_frac: self.valid_frac,
            noise_p: self.noise_p,
            sft_windows: self.sft_windows,
        })
    }
}

pub fn run(args: PrepareArgs, config: &ConfigFile) -> Result<()> {
    let out = args
        .out
        .clone()
        .ok_or_else(|| anyhow!("no output directory: pass --out or set `out` in [prepare]"))?;
    // Name where the parameters came from, so a bad value points at the right file.
    let origin = match (&config.path, config.section("prepare")?) {
        (Some(p), Some(_)) => format!("{} [prepare] (or its command-line flag)", p.display()),
        _ => "command line".to_string(),
    };
    let source = args.source().with_context(|| origin.clone())?;
    let protocol = args.protocol().with_context(|| origin.clone())?;
    let recorded = serde_json::json!({ "source": source, "protocol": protocol });
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(format!("preparing {}", out.display()));
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let result =
        llm4dsr_data::prepare::run(&source, &protocol, recorded, &out, args.overwrite, &origin);
    bar.finish_and_clear();
    let manifest = result?;
    println!("{:<44} {:>10}", "count", "value");
    for (k, v) in &manifest.counts {
        println!("{k:<44} {v:>10}");
    }
    println!("dataset: {}", out.display());
    Ok(())
}
