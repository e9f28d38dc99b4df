//! `llm4dsr ground`: map generated titles to real catalogue items (method.md, step 4): an
//! exact title match, else the catalogue item whose title embedding is nearest in L2
//! distance ([`llm4dsr_llm::ground`]; the search runs in the grounding kernel when a GPU is
//! present, on the CPU otherwise, with the same exact result).
//!
//! Input: a prepared dataset (its `catalog.parquet`) and a Parquet file of titles to ground:
//!
//! ```text
//! query_id   u64 (or i64 >= 0, u32, i32 >= 0), unique   the caller's key for the title
//! title      utf8                                         the text (empty: nothing to ground)
//! ```
//!
//! Output directory:
//!
//! ```text
//! <out>/grounded.parquet
//!     query_id u64, title utf8          as read, in input order
//!     item_id u32                       the grounded item (0 when the title is empty)
//!     match utf8                        "exact" | "nearest" | "empty"
//!     dist2 f32                         squared L2 distance to item_id (0 unless nearest)
//!     neighbours list<u32>              nearest: the --k nearest items, nearest first
//!     neighbour_dist2 list<f32>         and their squared distances
//! <out>/catalog_embeddings.parquet      item_id u32, embedding list<f32>: every catalogue
//!                                       title's embedding, ids 1..=n in order
//! <out>/manifest.json                   config, input hashes, counts (queries = exact +
//!                                       nearest + empty), the search backend
//! ```
//!
//! Two sharded passes ([`crate::sharded`]): the catalogue's embeddings in fixed blocks of
//! `--catalog-shard-items` items, then the titles in fixed blocks of `--query-shard-rows`
//! rows; rank r of n takes blocks r, r+n, ... Every block is embedded in the same batches
//! whatever the number of ranks, so the output is byte-identical for any rank count, and a
//! killed run re-run with the same flags reuses every finished block (`<out>.parts/`).

use crate::config::ConfigFile;
use crate::sharded::{
    fingerprint, parts_root_of, prepare_output, OutputPlan, ShardOutput, ShardedStage,
};
use anyhow::{bail, ensure, Context, Result};
use arrow_array::builder::{Float32Builder, ListBuilder, UInt32Builder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int32Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, Float32Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use llm4dsr_comm::Comm;
use llm4dsr_data::manifest::sha256_file;
use llm4dsr_data::parquet_io::{read_columns, ColumnSpec};
use llm4dsr_data::{Catalog, Manifest};
use llm4dsr_llm::ground::{
    check_title, embed_items, CatalogueIndex, LastTokenEmbedder, Match, MiniLmEmbedder,
    TitleEmbedder,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The all-MiniLM-L6-v2 asset's weights, relative to the cache root.
pub const MINILM_WEIGHTS: &str = "all-minilm-l6-v2/model.safetensors";

#[derive(clap::Args, Debug, Serialize, Deserialize)]
pub struct GroundArgs {
    /// Prepared dataset directory (its catalog.parquet is what titles are grounded to).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Parquet file of titles to ground: columns `query_id` (unsigned, unique) and `title`.
    #[arg(long)]
    pub queries: Option<PathBuf>,
    /// Output directory (grounded.parquet, catalog_embeddings.parquet, manifest.json). Part
    /// files of an unfinished run live in <out>.parts/ and are reused by the next run.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Title embedding for the nearest-item search. The reference is the LLM's last-token
    /// state; with a small untuned LLM (the SmolLM2 default) it grounds damaged titles poorly
    /// (2-29% right vs 82-100% for minilm: `cargo bench --bench ground`, docs/llm.md).
    #[arg(long, value_enum, default_value_t = EmbedderKind::LlmLastToken)]
    pub embedder: EmbedderKind,
    /// llm-last-token: HF model directory or .gguf file (default: the SmolLM2-135M-Instruct
    /// asset; the reference uses the base model, without LoRA adapters).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// minilm: model directory (default: the all-MiniLM-L6-v2 asset).
    #[arg(long)]
    pub minilm: Option<PathBuf>,
    /// Where the embedding model runs: auto = this rank's GPU in a build with candle's CUDA backend
    /// (jobs/build-cuda.sh), else the CPU; cpu; cuda (an error when it cannot).
    #[arg(long, value_enum, default_value_t = llm4dsr_llm::DeviceChoice::Auto)]
    pub device: llm4dsr_llm::DeviceChoice,
    /// Nearest items recorded per title (the first is the grounded item).
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Titles per embedding forward.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Catalogue items per shard of the embedding pass (fixed by the config, not the ranks).
    #[arg(long, default_value_t = 512)]
    pub catalog_shard_items: u32,
    /// Titles per shard of the grounding pass.
    #[arg(long, default_value_t = 1024)]
    pub query_shard_rows: u32,
    /// Replace an output directory that holds something else. Without it, a directory
    /// holding this same run's output (same fingerprint: config, inputs, model, tool version)
    /// with every file intact is left alone (nothing to do), a damaged one is rebuilt, and
    /// anything else is refused.
    #[arg(long)]
    pub overwrite: bool,
}

/// The title embeddings `ground` can search with.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EmbedderKind {
    /// The LLM's last-layer hidden state at the title's last token (the reference).
    LlmLastToken,
    /// all-MiniLM-L6-v2 sentence embeddings (mean-pooled, unit length).
    Minilm,
}

/// Schema of `catalog_embeddings.parquet`.
pub fn embeddings_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("item_id", DataType::UInt32, false),
        Field::new(
            "embedding",
            DataType::List(Arc::new(Field::new("item", DataType::Float32, true))),
            false,
        ),
    ]))
}

/// Schema of `grounded.parquet`.
pub fn grounded_schema() -> SchemaRef {
    let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
    Arc::new(Schema::new(vec![
        Field::new("query_id", DataType::UInt64, false),
        Field::new("title", DataType::Utf8, false),
        Field::new("item_id", DataType::UInt32, false),
        Field::new("match", DataType::Utf8, false),
        Field::new("dist2", DataType::Float32, false),
        Field::new("neighbours", list(DataType::UInt32), false),
        Field::new("neighbour_dist2", list(DataType::Float32), false),
    ]))
}

/// The titles to ground, in file order.
pub struct Queries {
    pub ids: Vec<u64>,
    pub titles: Vec<String>,
}

/// Read and check a queries file: the two columns with accepted types, no nulls, ids
/// non-negative and unique, every title accepted by [`check_title`]. Errors name the file,
/// the field and the row.
pub fn read_queries(path: &Path) -> Result<Queries> {
    let ints = [
        DataType::UInt64,
        DataType::Int64,
        DataType::UInt32,
        DataType::Int32,
    ];
    let batches = read_columns(
        path,
        &[
            ColumnSpec {
                name: "query_id",
                accepts: &ints,
            },
            ColumnSpec {
                name: "title",
                accepts: &[DataType::Utf8],
            },
        ],
    )?;
    let (mut ids, mut titles) = (Vec::new(), Vec::new());
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for b in &batches {
        let col = b.column(0);
        let title = b.column(1).as_string::<i32>();
        for r in 0..b.num_rows() {
            let row = ids.len();
            if col.is_null(r) {
                bail!("{}: field `query_id`: null at row {row}", path.display());
            }
            let id: i128 = match col.data_type() {
                DataType::UInt64 => col.as_primitive::<UInt64Type>().value(r) as i128,
                DataType::Int64 => col.as_primitive::<Int64Type>().value(r) as i128,
                DataType::UInt32 => col.as_primitive::<UInt32Type>().value(r) as i128,
                _ => col.as_primitive::<Int32Type>().value(r) as i128,
            };
            if id < 0 {
                bail!(
                    "{}: field `query_id`: negative id {id} at row {row}",
                    path.display()
                );
            }
            let id = id as u64;
            if let Some(first) = seen.insert(id, row) {
                bail!(
                    "{}: field `query_id`: id {id} at rows {first} and {row} (ids must be unique)",
                    path.display()
                );
            }
            if title.is_null(r) {
                bail!("{}: field `title`: null at row {row}", path.display());
            }
            let t = title.value(r);
            if let Err(e) = check_title(t) {
                bail!("{}: field `title`: row {row}: {e}", path.display());
            }
            ids.push(id);
            titles.push(t.to_string());
        }
    }
    Ok(Queries { ids, titles })
}

pub fn run(args: GroundArgs, _config: &ConfigFile, comm: &dyn Comm) -> Result<()> {
    let Some(dataset) = args.dataset.clone() else {
        bail!("--dataset is required (or `dataset` in [ground] of the config)");
    };
    let Some(queries_path) = args.queries.clone() else {
        bail!("--queries is required (or `queries` in [ground] of the config)");
    };
    let Some(out) = args.out.clone() else {
        bail!("--out is required (or `out` in [ground] of the config)");
    };
    ensure!(args.k >= 1, "--k must be at least 1");
    ensure!(args.batch >= 1, "--batch must be at least 1");
    ensure!(
        args.catalog_shard_items >= 1 && args.query_shard_rows >= 1,
        "--catalog-shard-items and --query-shard-rows must be at least 1"
    );
    let device = llm4dsr_llm::llm_device(args.device)?;
    let catalog_path = dataset.join("catalog.parquet");
    let catalog = Catalog::read_parquet(&catalog_path)
        .with_context(|| format!("reading the catalogue of {}", dataset.display()))?;
    let n = catalog.num_items();
    ensure!(
        n > 0,
        "{}: the catalogue has no items",
        catalog_path.display()
    );
    let queries = read_queries(&queries_path)?;

    // The embedder (and the hash of what defines it).
    let (llm, minilm, model_path);
    let embedder: Box<dyn TitleEmbedder + '_> = match args.embedder {
        EmbedderKind::LlmLastToken => {
            model_path = match &args.model {
                Some(p) => p.clone(),
                None => llm4dsr_data::assets::require(crate::cmd::model::SMOLLM2_GGUF)?,
            };
            llm = llm4dsr_llm::Llm::load(&model_path, &device)?;
            Box::new(LastTokenEmbedder {
                llm: &llm,
                batch: args.batch,
            })
        }
        EmbedderKind::Minilm => {
            model_path = match &args.minilm {
                Some(p) => p.clone(),
                None => llm4dsr_data::assets::require(MINILM_WEIGHTS)?
                    .parent()
                    .expect("asset file has a directory")
                    .to_path_buf(),
            };
            minilm = llm4dsr_llm::embed::MiniLm::load(&model_path, &device)?;
            Box::new(MiniLmEmbedder {
                model: minilm,
                batch: args.batch,
            })
        }
    };
    let embedder = embedder.as_ref();
    let model_input = crate::cmd::model::model_input(&model_path)?;
    let model_sha = model_input.sha256.clone();
    let catalog_sha = sha256_file(&catalog_path)?.0;
    let queries_sha = sha256_file(&queries_path)?.0;

    let mut manifest = Manifest::new("ground", 0, serde_json::to_value(&args)?);
    manifest.add_input(&catalog_path)?;
    manifest.add_input(&queries_path)?;
    manifest.inputs.push(model_input);
    // Everything each pass's output depends on.
    let d = embedder.dim();
    let block = args.catalog_shard_items;
    let embed_fp = fingerprint(&serde_json::json!({
        "stage": "ground/embeddings",
        "tool_version": env!("CARGO_PKG_VERSION"),
        "catalog": catalog_sha,
        "embedder": embedder.name(),
        "model": model_sha,
        "device": llm4dsr_llm::load::run_tag(&device, llm4dsr_llm::load::runtime_dtype(&device)?),
        "batch": args.batch,
        "block": block,
    }))?;
    let q = queries.ids.len() as u32;
    let rows = args.query_shard_rows;
    let query_fp = fingerprint(&serde_json::json!({
        "stage": "ground/queries",
        "embeddings": embed_fp,
        "queries": queries_sha,
        "k": args.k,
        "rows": rows,
        // CPU and GPU searches round differently (near ties can order differently): a run
        // resumed on the other backend redoes its blocks rather than mixing the two.
        "search": format!("{:?}", llm4dsr_kernels::backend::backend()),
    }))?;
    manifest.fingerprint = query_fp.clone();
    let staging = match prepare_output(comm, &out, args.overwrite, "ground", &manifest.fingerprint)?
    {
        OutputPlan::UpToDate => return Ok(()),
        OutputPlan::Build(staging) => staging,
    };
    let parts_root = parts_root_of(&out);

    // Pass 1: the catalogue's embeddings.
    let embed_stage = ShardedStage {
        name: "ground/embeddings".into(),
        parts_dir: parts_root.join("embeddings"),
        num_shards: n.div_ceil(block),
        schema: embeddings_schema(),
        fingerprint: embed_fp.clone(),
        comm,
    };
    let dest = staging
        .as_ref()
        .map(|s| s.path().join("catalog_embeddings.parquet"));
    let summary = embed_stage.run(dest.as_deref(), n as u64, |shard| {
        let lo = shard * block + 1;
        let ids: Vec<u32> = (lo..=n.min(lo + block - 1)).collect();
        let e = embed_items(&catalog, &ids, embedder)?;
        ensure!(e.len() == ids.len() * d, "embedder returned a wrong size");
        Ok(ShardOutput {
            batches: vec![embeddings_batch(&ids, &e, d)?],
            input_rows: ids.len() as u64,
        })
    })?;
    tracing::info!(
        "ground/embeddings: {} items in {} shards ({} written now, {} reused)",
        summary.rows,
        summary.shards,
        summary.parts_written,
        summary.parts_reused
    );
    let embeddings = read_embeddings(&embed_stage.read_parts()?, n, d)?;
    let index = CatalogueIndex::new(&catalog, &embeddings, d)?;
    drop(embeddings);
    tracing::info!(
        "ground: {} catalogue items ({} titles held by more than one id), d = {d}, search on {}",
        n,
        index.duplicate_titles(),
        index.backend()
    );

    // Pass 2: the titles.
    let query_stage = ShardedStage {
        name: "ground/queries".into(),
        parts_dir: parts_root.join("queries"),
        num_shards: q.div_ceil(rows).max(1),
        schema: grounded_schema(),
        fingerprint: query_fp,
        comm,
    };
    let dest = staging.as_ref().map(|s| s.path().join("grounded.parquet"));
    let summary = query_stage.run(dest.as_deref(), q as u64, |shard| {
        let lo = (shard * rows).min(q) as usize;
        let hi = (lo + rows as usize).min(q as usize);
        let titles: Vec<&str> = queries.titles[lo..hi].iter().map(|s| s.as_str()).collect();
        let g = index
            .ground(&titles, embedder, args.k)
            .with_context(|| format!("{}: rows {lo}..{hi}", queries_path.display()))?;
        Ok(ShardOutput {
            batches: vec![grounded_batch(&queries.ids[lo..hi], &titles, &g)?],
            input_rows: (hi - lo) as u64,
        })
    })?;
    tracing::info!(
        "ground/queries: {} titles in {} shards ({} written now, {} reused)",
        summary.rows,
        summary.shards,
        summary.parts_written,
        summary.parts_reused
    );

    if let Some(staging) = staging {
        let mut counts: HashMap<String, u64> = HashMap::new();
        for b in query_stage.read_parts()? {
            let m = b.column(3).as_string::<i32>();
            for r in 0..b.num_rows() {
                *counts.entry(m.value(r).to_string()).or_default() += 1;
            }
        }
        let get = |m: Match| counts.get(m.name()).copied().unwrap_or(0);
        let (exact, nearest, empty) = (get(Match::Exact), get(Match::Nearest), get(Match::Empty));
        ensure!(
            exact + nearest + empty == q as u64,
            "ground: {q} titles read but {exact} exact + {nearest} nearest + {empty} empty written"
        );
        manifest.count("catalog.items", n as u64);
        manifest.count("catalog.duplicate_titles", index.duplicate_titles());
        manifest.count("queries.read", q as u64);
        manifest.count("queries.exact", exact);
        manifest.count("queries.nearest", nearest);
        manifest.count("queries.empty", empty);
        manifest.notes.push(format!(
            "embedder {} (model sha256 {model_sha}), d = {d}; nearest-item search on {}; \
             exact = title equal to a catalogue title after trimming whitespace (lowest id on \
             duplicates); empty titles are not grounded (item_id 0)",
            embedder.name(),
            index.backend()
        ));
        manifest.add_outputs_under(staging.path())?;
        manifest.write(staging.path())?;
        let dest = staging.commit()?;
        embed_stage.remove_parts()?;
        query_stage.remove_parts()?;
        std::fs::remove_dir(&parts_root).ok();
        tracing::info!(
            "wrote {}: {q} titles, {exact} exact, {nearest} nearest, {empty} empty",
            dest.display()
        );
    }
    comm.barrier()?;
    Ok(())
}

fn embeddings_batch(ids: &[u32], e: &[f32], d: usize) -> Result<RecordBatch> {
    let mut list = ListBuilder::new(Float32Builder::with_capacity(e.len()));
    for row in e.chunks_exact(d) {
        list.values().append_slice(row);
        list.append(true);
    }
    Ok(RecordBatch::try_new(
        embeddings_schema(),
        vec![
            Arc::new(UInt32Array::from(ids.to_vec())),
            Arc::new(list.finish()),
        ],
    )?)
}

/// The embeddings of items 1..=n, in order, each of width d.
fn read_embeddings(batches: &[RecordBatch], n: u32, d: usize) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(n as usize * d);
    let mut next = 1u32;
    for b in batches {
        let ids = b.column(0).as_primitive::<UInt32Type>();
        let emb = b.column(1).as_list::<i32>();
        for r in 0..b.num_rows() {
            ensure!(
                ids.value(r) == next,
                "catalogue embeddings: expected item {next}, found {}",
                ids.value(r)
            );
            let v = emb.value(r);
            let v = v.as_primitive::<Float32Type>();
            ensure!(
                v.len() == d,
                "catalogue embeddings: item {next} has width {}, expected {d}",
                v.len()
            );
            out.extend_from_slice(v.values());
            next += 1;
        }
    }
    ensure!(
        next == n + 1,
        "catalogue embeddings: {} of {n} items present",
        next - 1
    );
    Ok(out)
}

fn grounded_batch(
    ids: &[u64],
    titles: &[&str],
    g: &[llm4dsr_llm::ground::Grounded],
) -> Result<RecordBatch> {
    let mut neighbours = ListBuilder::new(UInt32Builder::new());
    let mut ndist = ListBuilder::new(Float32Builder::new());
    for x in g {
        neighbours.values().append_slice(&x.neighbours);
        neighbours.append(true);
        ndist.values().append_slice(&x.neighbour_dist2);
        ndist.append(true);
    }
    Ok(RecordBatch::try_new(
        grounded_schema(),
        vec![
            Arc::new(UInt64Array::from(ids.to_vec())),
            Arc::new(StringArray::from_iter_values(titles.iter())),
            Arc::new(UInt32Array::from_iter_values(g.iter().map(|x| x.item))),
            Arc::new(StringArray::from_iter_values(
                g.iter().map(|x| x.how.name()),
            )),
            Arc::new(Float32Array::from_iter_values(g.iter().map(|x| x.dist2))),
            Arc::new(neighbours.finish()),
            Arc::new(ndist.finish()),
        ],
    )?)
}
