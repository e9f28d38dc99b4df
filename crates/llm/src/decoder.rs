//! The decoder-only transformer shared by the Llama and Qwen2 families (RMSNorm, RoPE, GQA
//! attention, SwiGLU MLP), with the three ways of running it this project needs:
//!
//! - [`Decoder::forward_packed`]: ragged sequences packed end to end with cumulative lengths
//!   (`cu_seqlens`). The projections and MLPs run once over all tokens of the batch; attention
//!   runs per *group* (one sequence, or a run of consecutive sequences that continue the same
//!   cached prefix), so no compute is spent on padding.
//! - A [`KvCache`] per sequence, returned on request and shareable: many continuations (item
//!   titles, generation prefixes) of one prompt attend to the same cached keys/values, which
//!   are computed once. A continuation group costs one `[n x (P+n)]` attention per layer.
//! - [`Decoder::forward_padded`]: a rectangular `[B, L]` batch with a 0/1 attention mask (left
//!   or right padding), the layout training code and GPUs like.
//!
//! Every path returns per-position hidden states after the final norm (HF's last
//! `hidden_states`); logits are a separate, explicit product with the LM head because a
//! `[tokens x vocab]` f32 matrix is the largest thing in the whole computation.

use crate::config::ModelConfig;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Linear, Module, RmsNorm, VarBuilder};
use llm4dsr_kernels::decoder_ops::{
    add_rms_norm, gather_heads_first_with, gather_token_major_with, swiglu_with, Impl,
};
use llm4dsr_kernels::masked_softmax;
use std::sync::Arc;

/// Sequences continuing the same cache share one attention call while the group holds at most
/// this many tokens. Short continuations (item titles: ~10 x 12 tokens) batch well; long ones
/// (whole prompts after a shared template head) would waste most of a block-diagonal
/// `[n x (P+n)]` product on masked cells, so they get a call each.
pub const MAX_GROUP_TOKENS: usize = 256;

/// Cached keys and values of one sequence (or one sequence plus the prefix it continued):
/// per layer `(k, v)`, each `[len, kv_heads, head_dim]` (token-major) after RoPE.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub layers: Vec<(Tensor, Tensor)>,
    /// Number of cached positions; the next token sits at position `len`.
    pub len: usize,
    /// The caches a packed forward returns are views into that forward's key/value tensors;
    /// a later forward continuing several of them gathers from those tensors once instead of
    /// copying every cache (`None` for a cache that was itself a continuation).
    source: Option<CacheSource>,
}

/// The per-layer `[tokens, kv_heads, head_dim]` keys and values of one packed forward, and
/// where one cache's rows start in them.
#[derive(Clone, Debug)]
struct CacheSource {
    batch: Arc<Vec<(Tensor, Tensor)>>,
    start: usize,
}

/// Ragged sequences packed end to end. Sequence `i` is `tokens[cu_seqlens[i]..cu_seqlens[i+1]]`
/// and, if `prefix[i]` is `Some(c)`, continues the cached sequence `caches[c]` passed to the
/// forward (its positions start at that cache's length).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PackedBatch {
    pub tokens: Vec<u32>,
    pub cu_seqlens: Vec<u32>,
    pub prefix: Vec<Option<usize>>,
}

impl PackedBatch {
    /// Independent sequences, no cached prefix.
    pub fn new<S: AsRef<[u32]>>(seqs: &[S]) -> Self {
        let mut b = Self {
            cu_seqlens: vec![0],
            ..Default::default()
        };
        for s in seqs {
            b.push(s.as_ref(), None);
        }
        b
    }

    /// Append one sequence, optionally continuing cache `prefix`.
    pub fn push(&mut self, tokens: &[u32], prefix: Option<usize>) {
        if self.cu_seqlens.is_empty() {
            self.cu_seqlens.push(0);
        }
        self.tokens.extend_from_slice(tokens);
        self.cu_seqlens.push(self.tokens.len() as u32);
        self.prefix.push(prefix);
    }

    pub fn num_seqs(&self) -> usize {
        self.prefix.len()
    }

    /// Token range of sequence `i`.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.cu_seqlens[i] as usize..self.cu_seqlens[i + 1] as usize
    }

    /// Index (into the packed tokens) of the last token of each sequence.
    pub fn last_positions(&self) -> Vec<u32> {
        self.cu_seqlens[1..].iter().map(|&c| c - 1).collect()
    }
}

/// A rectangular batch: `tokens` and `mask` are `[batch, len]` row-major; mask 1 = real token,
/// 0 = padding. Positions count real tokens only, so left and right padding give the same
/// hidden states at real positions.
#[derive(Clone, Debug, PartialEq)]
pub struct PaddedBatch {
    pub tokens: Vec<u32>,
    pub mask: Vec<u8>,
    pub batch: usize,
    pub len: usize,
}

impl PaddedBatch {
    /// Right-pad `seqs` with `pad_id` to the longest one.
    pub fn right_padded<S: AsRef<[u32]>>(seqs: &[S], pad_id: u32) -> Self {
        Self::padded(seqs, pad_id, false)
    }

    /// Left-pad `seqs` with `pad_id` to the longest one (the layout batched generation uses).
    pub fn left_padded<S: AsRef<[u32]>>(seqs: &[S], pad_id: u32) -> Self {
        Self::padded(seqs, pad_id, true)
    }

    fn padded<S: AsRef<[u32]>>(seqs: &[S], pad_id: u32, left: bool) -> Self {
        let len = seqs.iter().map(|s| s.as_ref().len()).max().unwrap_or(0);
        let mut tokens = Vec::with_capacity(seqs.len() * len);
        let mut mask = Vec::with_capacity(seqs.len() * len);
        for s in seqs {
            let s = s.as_ref();
            let pad = len - s.len();
            if left {
                tokens.extend(std::iter::repeat_n(pad_id, pad));
                mask.extend(std::iter::repeat_n(0u8, pad));
            }
            tokens.extend_from_slice(s);
            mask.extend(std::iter::repeat_n(1u8, s.len()));
            if !left {
                tokens.extend(std::iter::repeat_n(pad_id, pad));
                mask.extend(std::iter::repeat_n(0u8, pad));
            }
        }
        Self {
            tokens,
            mask,
            batch: seqs.len(),
            len,
        }
    }
}

/// Result of a packed forward.
pub struct Forward {
    /// `[tokens, hidden]` after the final norm, aligned with the packed tokens.
    pub hidden: Tensor,
    /// One cache per sequence (prefix included) when requested, else empty.
    pub caches: Vec<KvCache>,
}

/// RoPE tables `[max_positions, head_dim/2]`, gathered per token by position.
#[derive(Clone, Debug)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &ModelConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let hd = cfg.head_dim;
        let mut inv_freq: Vec<f64> = (0..hd)
            .step_by(2)
            .map(|i| 1.0 / cfg.rope_theta.powf(i as f64 / hd as f64))
            .collect();
        if let Some(s) = &cfg.rope_scaling {
            // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band
            // between interpolated (transformers' `_compute_llama3_parameters`).
            let low_wl = s.original_max_position_embeddings as f64 / s.low_freq_factor;
            let high_wl = s.original_max_position_embeddings as f64 / s.high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wl = 2.0 * std::f64::consts::PI / *f;
                *f = if wl < high_wl {
                    *f
                } else if wl > low_wl {
                    *f / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings as f64 / wl
                        - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * *f / s.factor + smooth * *f
                };
            }
        }
        let n = cfg.max_position_embeddings;
        let half = hd / 2;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (n, half), dev)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (n, half), dev)?.to_dtype(dtype)?,
        })
    }

    /// cos/sin rows for the given positions: `[positions.len(), head_dim/2]`.
    fn gather(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?.contiguous()?,
            self.sin.index_select(positions, 0)?.contiguous()?,
        ))
    }
}

/// Self-attention with grouped-query heads.
#[derive(Clone, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// SwiGLU feed-forward.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, ops: Impl) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?;
        let u = self.up_proj.forward(x)?;
        Ok(self.down_proj.forward(&swiglu_with(&g, &u, ops)?)?)
    }
}

/// One transformer block.
#[derive(Clone, Debug)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

/// The decoder: embeddings, blocks, final norm, LM head.
#[derive(Clone, Debug)]
pub struct Decoder {
    pub cfg: ModelConfig,
    /// `[vocab, hidden]`.
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    /// `[vocab, hidden]`; the embedding matrix itself when embeddings are tied.
    pub lm_head: Tensor,
    rope: Rope,
    /// Who serves the layout and element-wise ops: `Impl::for_device` at load
    /// ([`Decoder::set_ops`] overrides it).
    ops: Impl,
    device: Device,
    dtype: DType,
}

/// Every tensor a model of `cfg` has, with its shape, in HF naming. Loading checks against
/// this list; tests and the GGUF converter use it too.
pub fn weight_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, hd, nh, kvh, ff, v) = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let mut w = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        w.push((format!("{p}.input_layernorm.weight"), vec![d]));
        w.push((format!("{p}.self_attn.q_proj.weight"), vec![nh * hd, d]));
        w.push((format!("{p}.self_attn.k_proj.weight"), vec![kvh * hd, d]));
        w.push((format!("{p}.self_attn.v_proj.weight"), vec![kvh * hd, d]));
        if cfg.qkv_bias {
            w.push((format!("{p}.self_attn.q_proj.bias"), vec![nh * hd]));
            w.push((format!("{p}.self_attn.k_proj.bias"), vec![kvh * hd]));
            w.push((format!("{p}.self_attn.v_proj.bias"), vec![kvh * hd]));
        }
        w.push((format!("{p}.self_attn.o_proj.weight"), vec![d, nh * hd]));
        if cfg.o_bias {
            w.push((format!("{p}.self_attn.o_proj.bias"), vec![d]));
        }
        w.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        w.push((format!("{p}.mlp.gate_proj.weight"), vec![ff, d]));
        w.push((format!("{p}.mlp.up_proj.weight"), vec![ff, d]));
        w.push((format!("{p}.mlp.down_proj.weight"), vec![d, ff]));
    }
    w.push(("model.norm.weight".to_string(), vec![d]));
    if !cfg.tie_word_embeddings {
        w.push(("lm_head.weight".to_string(), vec![v, d]));
    }
    w
}

fn linear(vb: &VarBuilder, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    let w = vb.get((out, inp), &format!("{name}.weight"))?;
    let b = if bias {
        Some(vb.get(out, &format!("{name}.bias"))?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

fn rms(vb: &VarBuilder, name: &str, d: usize, eps: f64) -> Result<RmsNorm> {
    Ok(RmsNorm::new(vb.get(d, &format!("{name}.weight"))?, eps))
}

impl Decoder {
    /// Build from HF-named tensors (`vb` at the root). A missing or mis-shaped tensor is an
    /// error naming the tensor.
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let (d, hd, nh, kvh, ff, v) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let dtype = vb.dtype();
        let device = vb.device().clone();
        let embed_tokens = vb.get((v, d), "model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            layers.push(Block {
                input_layernorm: rms(&vb, &format!("{p}.input_layernorm"), d, cfg.rms_norm_eps)?,
                self_attn: Attention {
                    q_proj: linear(&vb, &format!("{a}.q_proj"), nh * hd, d, cfg.qkv_bias)?,
                    k_proj: linear(&vb, &format!("{a}.k_proj"), kvh * hd, d, cfg.qkv_bias)?,
                    v_proj: linear(&vb, &format!("{a}.v_proj"), kvh * hd, d, cfg.qkv_bias)?,
                    o_proj: linear(&vb, &format!("{a}.o_proj"), d, nh * hd, cfg.o_bias)?,
                    num_heads: nh,
                    num_kv_heads: kvh,
                    head_dim: hd,
                },
                post_attention_layernorm: rms(
                    &vb,
                    &format!("{p}.post_attention_layernorm"),
                    d,
                    cfg.rms_norm_eps,
                )?,
                mlp: Mlp {
                    gate_proj: linear(&vb, &format!("{m}.gate_proj"), ff, d, false)?,
                    up_proj: linear(&vb, &format!("{m}.up_proj"), ff, d, false)?,
                    down_proj: linear(&vb, &format!("{m}.down_proj"), d, ff, false)?,
                },
            });
        }
        let norm = rms(&vb, "model.norm", d, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            vb.get((v, d), "lm_head.weight")?
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg, dtype, &device)?,
            ops: Impl::for_device(&device),
            device,
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Serve the decoder's gathers and SwiGLU with our kernels or with candle's ops (the
    /// default: [`Impl::for_device`]); both give the same values.
    pub fn set_ops(&mut self, ops: Impl) {
        self.ops = ops;
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// Logits `[.., vocab]` of hidden states `[.., hidden]`. Costs rows x vocab x 4 bytes: call
    /// it on the rows you need (see `score` for the chunked scoring paths).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(hidden.broadcast_matmul(&self.lm_head.t()?)?)
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            bail!(
                "token id {t} is outside the model's vocabulary of {} (tokenizer and model disagree?)",
                self.cfg.vocab_size
            );
        }
        Ok(())
    }

    fn check_context(&self, end: usize) -> Result<()> {
        if end > self.cfg.max_position_embeddings {
            bail!(
                "a sequence reaches {end} tokens but the model's context is {} tokens \
                 (max_position_embeddings); shorten the prompt",
                self.cfg.max_position_embeddings
            );
        }
        Ok(())
    }

    /// Forward packed ragged sequences, optionally continuing cached prefixes. Returns the
    /// final hidden states `[tokens, hidden]`, and with `want_cache` one [`KvCache`] per
    /// sequence covering its prefix and its own tokens.
    pub fn forward_packed(
        &self,
        batch: &PackedBatch,
        caches: &[&KvCache],
        want_cache: bool,
    ) -> Result<Forward> {
        let t = batch.tokens.len();
        let n_seq = batch.num_seqs();
        ensure!(
            batch.cu_seqlens.len() == n_seq + 1
                && batch.cu_seqlens[0] == 0
                && *batch.cu_seqlens.last().unwrap() as usize == t,
            "packed batch: cu_seqlens must start at 0, end at the token count ({t}) and have one entry per sequence + 1"
        );
        ensure!(t > 0, "packed batch: no tokens");
        for i in 0..n_seq {
            ensure!(
                batch.cu_seqlens[i] < batch.cu_seqlens[i + 1],
                "packed batch: sequence {i} is empty"
            );
        }
        self.check_tokens(&batch.tokens)?;
        // Positions, and the attention groups: a run of consecutive sequences continuing the
        // same cache shares one attention call against that cache.
        let mut positions = Vec::with_capacity(t);
        let mut groups: Vec<Group> = Vec::new();
        for i in 0..n_seq {
            let r = batch.range(i);
            let p0 = match batch.prefix[i] {
                Some(c) => {
                    ensure!(
                        c < caches.len(),
                        "packed batch: sequence {i} continues cache {c}, but {} caches were given",
                        caches.len()
                    );
                    ensure!(
                        caches[c].layers.len() == self.layers.len(),
                        "packed batch: cache {c} has {} layers, the model {}",
                        caches[c].layers.len(),
                        self.layers.len()
                    );
                    caches[c].len
                }
                None => 0,
            };
            self.check_context(p0 + r.len())?;
            positions.extend((p0..p0 + r.len()).map(|p| p as u32));
            match (groups.last_mut(), batch.prefix[i]) {
                (Some(g), Some(c))
                    if g.prefix == Some(c) && g.len + r.len() <= MAX_GROUP_TOKENS =>
                {
                    g.seqs.push((r.start - g.start, r.len()));
                    g.len += r.len();
                }
                _ => groups.push(Group {
                    start: r.start,
                    len: r.len(),
                    prefix: batch.prefix[i],
                    seqs: vec![(0, r.len())],
                }),
            }
        }
        // The key pool every attention call gathers from: the prefix caches' rows (a cache
        // that is a view of an earlier forward brings that forward's whole tensor, once for all
        // its caches), then this forward's own tokens.
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut chunk_starts: Vec<usize> = Vec::new();
        let mut cache_at: Vec<usize> = vec![0; caches.len()];
        let mut pool_len = 0usize;
        let mut used = vec![false; caches.len()];
        for p in batch.prefix.iter().flatten() {
            used[*p] = true;
        }
        for (c, cache) in caches.iter().enumerate() {
            if !used[c] {
                continue;
            }
            if let Some(src) = &cache.source {
                if let Some(at) = chunks.iter().position(|ch| match ch {
                    Chunk::Batch(b) => Arc::ptr_eq(b, &src.batch),
                    Chunk::Cache(_) => false,
                }) {
                    cache_at[c] = chunk_starts[at] + src.start;
                    continue;
                }
                cache_at[c] = pool_len + src.start;
                chunk_starts.push(pool_len);
                pool_len += src.batch[0].0.dim(0)?;
                chunks.push(Chunk::Batch(src.batch.clone()));
            } else {
                cache_at[c] = pool_len;
                chunk_starts.push(pool_len);
                pool_len += cache.len;
                chunks.push(Chunk::Cache(c));
            }
        }
        let own_at = pool_len;
        let plan = AttnPlan::new(
            &groups,
            caches,
            &cache_at,
            own_at,
            self.cfg.num_attention_heads,
            &self.device,
        )?;
        let pos = Tensor::from_vec(positions, t, &self.device)?;
        let (cos, sin) = self.rope.gather(&pos)?;
        let ids = Tensor::from_slice(&batch.tokens, t, &self.device)?;
        // x: the residual stream [T, d]; h: the next block's input (its input_layernorm of x),
        // after the last block the final norm of x. Each residual add is fused with the norm
        // after it (`add_norm`).
        let mut x = self.embed_tokens.index_select(&ids, 0)?;
        let mut h = self.layers[0].input_layernorm.forward(&x)?;
        let mut new_kv: Vec<(Tensor, Tensor)> = Vec::new();
        for (li, block) in self.layers.iter().enumerate() {
            let a = &block.self_attn;
            let (q, k, v) = a.qkv_tokens(&h, t, &cos, &sin)?; // [T, heads, hd]
            let (pool_k, pool_v) = if chunks.is_empty() {
                (k.clone(), v.clone())
            } else {
                let mut ks: Vec<&Tensor> = Vec::with_capacity(chunks.len() + 1);
                let mut vs: Vec<&Tensor> = Vec::with_capacity(chunks.len() + 1);
                for ch in &chunks {
                    let (ck, cv) = match ch {
                        Chunk::Batch(b) => &b[li],
                        Chunk::Cache(c) => &caches[*c].layers[li],
                    };
                    ks.push(ck);
                    vs.push(cv);
                }
                ks.push(&k);
                vs.push(&v);
                (Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)
            };
            let o = plan.attend(a, &q, &pool_k, &pool_v, self.ops)?; // [T, heads * hd]
            let (x1, h1) =
                self.add_norm(&x, &a.o_proj.forward(&o)?, &block.post_attention_layernorm)?;
            (x, h) = self.add_norm(&x1, &block.mlp.forward(&h1, self.ops)?, self.norm_after(li))?;
            if want_cache {
                new_kv.push((k, v));
            }
        }
        let hidden = h;
        let mut out_caches = Vec::new();
        if want_cache {
            let shared = Arc::new(new_kv);
            for i in 0..n_seq {
                let r = batch.range(i);
                let prefix = batch.prefix[i].map(|c| caches[c]);
                let mut layers = Vec::with_capacity(self.layers.len());
                for (li, (k, v)) in shared.iter().enumerate() {
                    let mut ks = k.narrow(0, r.start, r.len())?;
                    let mut vs = v.narrow(0, r.start, r.len())?;
                    if let Some(p) = prefix {
                        ks = Tensor::cat(&[&p.layers[li].0, &ks], 0)?;
                        vs = Tensor::cat(&[&p.layers[li].1, &vs], 0)?;
                    }
                    layers.push((ks, vs));
                }
                out_caches.push(KvCache {
                    layers,
                    len: prefix.map(|p| p.len).unwrap_or(0) + r.len(),
                    source: prefix.is_none().then(|| CacheSource {
                        batch: shared.clone(),
                        start: r.start,
                    }),
                });
            }
        }
        Ok(Forward {
            hidden,
            caches: out_caches,
        })
    }

    /// Forward one sequence and return its hidden states `[len, hidden]` and cache.
    pub fn prefill(&self, tokens: &[u32]) -> Result<(Tensor, KvCache)> {
        let mut f = self.forward_packed(&PackedBatch::new(&[tokens]), &[], true)?;
        Ok((f.hidden, f.caches.pop().unwrap()))
    }

    /// Forward a rectangular batch with a padding mask; returns `[batch, len, hidden]` (rows at
    /// padded positions are computed but meaningless).
    pub fn forward_padded(&self, batch: &PaddedBatch) -> Result<Tensor> {
        let (b, l) = (batch.batch, batch.len);
        ensure!(
            batch.tokens.len() == b * l && batch.mask.len() == b * l,
            "padded batch: tokens and mask must both hold batch x len = {b} x {l} entries"
        );
        ensure!(b > 0 && l > 0, "padded batch: empty");
        self.check_tokens(&batch.tokens)?;
        let mut positions = Vec::with_capacity(b * l);
        let mut mask = vec![f32::NEG_INFINITY; b * l * l];
        for r in 0..b {
            let m = &batch.mask[r * l..(r + 1) * l];
            let mut p = 0u32;
            for (i, &mi) in m.iter().enumerate() {
                if mi != 0 {
                    positions.push(p);
                    p += 1;
                } else {
                    positions.push(0);
                }
                let row = &mut mask[(r * l + i) * l..(r * l + i + 1) * l];
                for (j, cell) in row.iter_mut().enumerate().take(i + 1) {
                    if m[j] != 0 {
                        *cell = 0.0;
                    }
                }
                // A padded query sees only itself, so its softmax stays finite.
                if mi == 0 {
                    row[i] = 0.0;
                }
            }
            self.check_context(p as usize)?;
        }
        let pos = Tensor::from_vec(positions, b * l, &self.device)?;
        let (cos, sin) = self.rope.gather(&pos)?;
        let (cos, sin) = (
            cos.reshape((b, l, self.cfg.head_dim / 2))?,
            sin.reshape((b, l, self.cfg.head_dim / 2))?,
        );
        let mask = Tensor::from_vec(mask, (b, l, l), &self.device)?;
        let ids = Tensor::from_slice(&batch.tokens, (b, l), &self.device)?;
        let mut x = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, self.cfg.hidden_size))?;
        let mut h = self.layers[0].input_layernorm.forward(&x)?;
        for (li, block) in self.layers.iter().enumerate() {
            let a = &block.self_attn;
            let (q, k, v) = a.qkv(&h, b, l, &cos, &sin)?;
            let o = a.attend(&q, &k, &v, &mask)?; // [b, heads, l, hd]
            let o = o
                .transpose(1, 2)?
                .reshape((b, l, a.num_heads * a.head_dim))?;
            let (x1, h1) =
                self.add_norm(&x, &a.o_proj.forward(&o)?, &block.post_attention_layernorm)?;
            (x, h) = self.add_norm(&x1, &block.mlp.forward(&h1, self.ops)?, self.norm_after(li))?;
        }
        Ok(h)
    }

    /// The norm applied to the residual stream after block `li`: the next block's input norm,
    /// or the final norm after the last block.
    fn norm_after(&self, li: usize) -> &RmsNorm {
        match self.layers.get(li + 1) {
            Some(next) => &next.input_layernorm,
            None => &self.norm,
        }
    }

    /// `x + delta` and `norm` of it: one fused op where the decoder's ops are the kernels
    /// ([`add_rms_norm`]), candle's add and RmsNorm otherwise. Returns (sum, normed).
    fn add_norm(&self, x: &Tensor, delta: &Tensor, norm: &RmsNorm) -> Result<(Tensor, Tensor)> {
        if self.ops == Impl::Kernel {
            return add_rms_norm(x, delta, norm.weight(), self.cfg.rms_norm_eps as f32);
        }
        let s = (x + delta)?;
        let n = norm.forward(&s)?;
        Ok((s, n))
    }

    /// Hidden states `[n, hidden]` of the given packed rows.
    pub fn rows(&self, hidden: &Tensor, rows: &[u32]) -> Result<Tensor> {
        let idx = Tensor::from_slice(rows, rows.len(), &self.device)?;
        hidden
            .index_select(&idx, 0)
            .context("selecting hidden-state rows")
    }
}

/// One attention call: `len` query tokens at packed offset `start`, made of sequences
/// `(local offset, len)`, optionally continuing a cache.
struct Group {
    start: usize,
    len: usize,
    prefix: Option<usize>,
    seqs: Vec<(usize, usize)>,
}

/// A source of prefix keys/values in the key pool of a packed forward.
enum Chunk {
    /// All rows of an earlier forward (shared by the caches that are views of it).
    Batch(Arc<Vec<(Tensor, Tensor)>>),
    /// One cache's own tensors (a cache that was itself a continuation).
    Cache(usize),
}

/// Attention calls hold at most this many score cells (batch x heads x queries x keys): with
/// the softmax's copy, 2^26 cells are 256 MiB in bf16, 512 MiB in f32.
const MAX_ATTN_CELLS: usize = 1 << 26;

/// Rows of a token-major tensor picked by a call: the u32 index on the device, and its start
/// when it is a plain range (then candle's ops take a view instead of a gather).
struct Rows {
    idx: Tensor,
    range_start: Option<usize>,
}

impl Rows {
    fn new(idx: Vec<u32>, dev: &Device) -> Result<Self> {
        let start = idx.first().copied().unwrap_or(0);
        let range = idx.iter().enumerate().all(|(i, &r)| r == start + i as u32);
        Ok(Self {
            range_start: range.then_some(start as usize),
            idx: Tensor::new(idx, dev)?,
        })
    }

    fn len(&self) -> usize {
        self.idx.dim(0).unwrap_or(0)
    }

    /// `src` `[P, heads, hd]` -> `[b, heads, rows / b, hd]`.
    fn heads_first(&self, src: &Tensor, b: usize, ops: Impl) -> Result<Tensor> {
        let n = self.len() / b;
        match (self.range_start, ops) {
            (Some(start), Impl::CandleOps) => {
                let (_, h, hd) = src.dims3()?;
                Ok(src
                    .narrow(0, start, self.len())?
                    .reshape((b, n, h, hd))?
                    .transpose(1, 2)?
                    .contiguous()?)
            }
            _ => Ok(gather_heads_first_with(src, &self.idx, b, n, ops)?),
        }
    }

    /// `src` `[b, heads, n, hd]` -> the picked rows `[rows, heads * hd]`.
    fn token_major(&self, src: &Tensor, ops: Impl) -> Result<Tensor> {
        let (b, h, n, hd) = src.dims4()?;
        match (self.range_start, ops) {
            (Some(0), Impl::CandleOps) if self.len() == b * n => {
                Ok(src.transpose(1, 2)?.reshape((b * n, h * hd))?)
            }
            _ => Ok(gather_token_major_with(src, &self.idx, ops)?.reshape(((), h * hd))?),
        }
    }
}

/// One batched attention call: `b` groups padded to `n` queries and `s` keys each.
struct AttnCall {
    b: usize,
    n: usize,
    s: usize,
    /// `b * n` query rows of the packed tokens (padding repeats a real row).
    q_rows: Rows,
    /// `b * s` rows of the key pool.
    k_rows: Rows,
    /// The real rows among the `b * n` outputs, in packed order.
    out_rows: Rows,
    /// Additive f32 mask `[b or 1, n, s]`, shared by the heads ([`masked_softmax`]).
    mask: Tensor,
}

/// How a packed forward's attention runs: its groups batched into few padded calls, so the
/// number of kernel launches per layer does not grow with the number of sequences (a batch of
/// 64 prompts is one call, not 64). Built once per forward, used by every layer.
struct AttnPlan {
    calls: Vec<AttnCall>,
}

impl AttnPlan {
    /// `cache_at[c]`: where cache `c`'s rows start in the key pool; the forward's own tokens
    /// start at `own_at`.
    fn new(
        groups: &[Group],
        caches: &[&KvCache],
        cache_at: &[usize],
        own_at: usize,
        heads: usize,
        dev: &Device,
    ) -> Result<Self> {
        let prefix_len = |g: &Group| g.prefix.map(|c| caches[c].len).unwrap_or(0);
        // Consecutive groups share a call while padding adds at most half the real score
        // cells and the call stays under MAX_ATTN_CELLS.
        let mut spans: Vec<std::ops::Range<usize>> = Vec::new();
        let (mut n, mut s, mut real, mut first) = (0usize, 0usize, 0usize, 0usize);
        for (i, g) in groups.iter().enumerate() {
            let (gn, gs) = (g.len, prefix_len(g) + g.len);
            let (nn, ss, rr) = (n.max(gn), s.max(gs), real + gn * gs);
            let b = i - first + 1;
            if i > first
                && (b * nn * ss > rr + rr / 2 + 1024 || b * heads * nn * ss > MAX_ATTN_CELLS)
            {
                spans.push(first..i);
                first = i;
                (n, s, real) = (gn, gs, gn * gs);
            } else {
                (n, s, real) = (nn, ss, rr);
            }
        }
        if !groups.is_empty() {
            spans.push(first..groups.len());
        }
        let mut calls = Vec::with_capacity(spans.len());
        for span in spans {
            let gs = &groups[span];
            let b = gs.len();
            let n = gs.iter().map(|g| g.len).max().unwrap();
            let s = gs.iter().map(|g| prefix_len(g) + g.len).max().unwrap();
            let mut q_rows = Vec::with_capacity(b * n);
            let mut k_rows = Vec::with_capacity(b * s);
            let mut out_rows = Vec::new();
            // One mask for the whole call when every group has the same shape of mask (prefix
            // length and sequences): the common case, and 64 masks of 256 x 256 are 16 MB to
            // build on the host before the GPU can start.
            let g0 = &gs[0];
            let one_mask = gs
                .iter()
                .all(|g| prefix_len(g) == prefix_len(g0) && g.len == g0.len && g.seqs == g0.seqs);
            let mut masks: Vec<Vec<f32>> = Vec::with_capacity(if one_mask { 1 } else { b });
            for (gi, g) in gs.iter().enumerate() {
                let p = prefix_len(g);
                q_rows.extend((g.start..g.start + g.len).map(|r| r as u32));
                q_rows.extend(std::iter::repeat_n(g.start as u32, n - g.len));
                out_rows.extend((0..g.len).map(|i| (gi * n + i) as u32));
                if let Some(c) = g.prefix {
                    k_rows.extend((cache_at[c]..cache_at[c] + p).map(|r| r as u32));
                }
                let own = own_at + g.start;
                k_rows.extend((own..own + g.len).map(|r| r as u32));
                k_rows.extend(std::iter::repeat_n(own as u32, s - p - g.len));
                if !one_mask || gi == 0 {
                    masks.push(g.mask(p, n, s));
                }
            }
            let mb = masks.len();
            let mask = Tensor::from_vec(masks.concat(), (mb, n, s), dev)?;
            calls.push(AttnCall {
                b,
                n,
                s,
                q_rows: Rows::new(q_rows, dev)?,
                k_rows: Rows::new(k_rows, dev)?,
                out_rows: Rows::new(out_rows, dev)?,
                mask,
            });
        }
        Ok(Self { calls })
    }

    /// Softmax attention of the packed queries `q` `[T, heads, hd]` over the key pool
    /// (`k`, `v`: `[pool, kv_heads, hd]`); returns `[T, heads * hd]` in packed order. Query
    /// heads sharing a key/value head are folded into one matmul (no repeated K/V copies).
    fn attend(
        &self,
        a: &Attention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ops: Impl,
    ) -> Result<Tensor> {
        let (nh, kvh, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let rep = nh / kvh;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::with_capacity(self.calls.len());
        for c in &self.calls {
            let (b, n, s) = (c.b, c.n, c.s);
            // Token-major rows -> [b, heads, rows, hd]: one gather each (llm4dsr_kernels::
            // decoder_ops), or a view + transpose when the rows are a plain range.
            let qc = c
                .q_rows
                .heads_first(q, b, ops)?
                .reshape((b, kvh, rep * n, hd))?;
            let kc = c.k_rows.heads_first(k, b, ops)?;
            let vc = c.k_rows.heads_first(v, b, ops)?;
            let att = qc.matmul(&kc.t()?)?; // [b, kvh, rep*n, s] = [b, heads, n, s]
            let att = masked_softmax(&att.reshape((b, nh, n, s))?, &c.mask, scale)?.reshape((
                b,
                kvh,
                rep * n,
                s,
            ))?;
            let o = att.matmul(&vc)?.reshape((b, nh, n, hd))?;
            outs.push(c.out_rows.token_major(&o, ops)?);
        }
        Ok(if outs.len() == 1 {
            outs.pop().unwrap()
        } else {
            Tensor::cat(&outs, 0)?
        })
    }
}

impl Group {
    /// Additive mask `[n, s]` of this group padded to `n` queries and `s` keys: every query
    /// sees the whole prefix (`p` keys) and, among the group's own tokens, the earlier tokens
    /// of its own sequence; padding keys are hidden, and a padding query sees key 0 only (its
    /// output is dropped, but its softmax stays finite).
    fn mask(&self, p: usize, n: usize, s: usize) -> Vec<f32> {
        let mut m = vec![f32::NEG_INFINITY; n * s];
        for &(off, len) in &self.seqs {
            for i in 0..len {
                let row = &mut m[(off + i) * s..(off + i + 1) * s];
                row[..p].fill(0.0);
                row[p + off..p + off + i + 1].fill(0.0);
            }
        }
        for i in self.len..n {
            m[i * s] = 0.0;
        }
        m
    }
}

impl Attention {
    /// Project and rotate: q `[b, heads, l, hd]`, k and v `[b, kv_heads, l, hd]`. `x` is
    /// `[b*l, d]` (packed, b = 1) or `[b, l, d]`; cos/sin `[l, hd/2]` or `[b, l, hd/2]`.
    fn qkv(
        &self,
        x: &Tensor,
        b: usize,
        l: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let split = |y: Tensor, heads: usize| -> Result<Tensor> {
            Ok(y.reshape((b, l, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.q_proj.forward(x)?, self.num_heads)?;
        let k = split(self.k_proj.forward(x)?, self.num_kv_heads)?;
        let v = split(self.v_proj.forward(x)?, self.num_kv_heads)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        Ok((q, k, v))
    }

    /// Project and rotate the packed tokens `x` `[T, d]`: q `[T, heads, hd]`, k and v
    /// `[T, kv_heads, hd]` (token-major, the layout of the caches).
    fn qkv_tokens(
        &self,
        x: &Tensor,
        t: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let hd = self.head_dim;
        let q = self
            .q_proj
            .forward(x)?
            .reshape((1, t, self.num_heads, hd))?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((1, t, self.num_kv_heads, hd))?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((t, self.num_kv_heads, hd))?;
        let q = candle_nn::rotary_emb::rope_thd(&q.contiguous()?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_thd(&k.contiguous()?, cos, sin)?;
        Ok((q.squeeze(0)?, k.squeeze(0)?, v.contiguous()?))
    }

    /// Softmax attention of q `[b, heads, n, hd]` over k, v `[b, kv_heads, s, hd]` with an
    /// additive f32 mask `[b or 1, n, s]`. Query heads sharing a KV head are folded into one
    /// matmul (no repeated K/V copies).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, nh, n, hd) = q.dims4()?;
        let s = k.dim(2)?;
        let kvh = self.num_kv_heads;
        let rep = nh / kvh;
        let scale = 1.0 / (hd as f64).sqrt();
        let q = q.reshape((b, kvh, rep * n, hd))?;
        let k = k.contiguous()?;
        let v = v.contiguous()?;
        let att = q.matmul(&k.t()?)?; // [b, kvh, rep*n, s] = [b, heads, n, s]
        let att = masked_softmax(&att.reshape((b, nh, n, s))?, mask, scale)?.reshape((
            b,
            kvh,
            rep * n,
            s,
        ))?;
        let o = att.matmul(&v)?; // [b, kvh, rep*n, hd]
        Ok(o.reshape((b, nh, n, hd))?)
    }
}

/// Log-softmax over the last dimension, in f32.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    Ok(candle_nn::ops::log_softmax(&x, D::Minus1)?)
}
