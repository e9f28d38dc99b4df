//! What the fused CPU engines (`sasrec_fused.rs`, `gru4rec_fused.rs`, `caser_fused.rs`)
//! share, and
//! [`FusedEngine`], the one a model has: batches cut into
//! fixed chunks of [`CHUNK`] instances (the unit of parallel work and of the deterministic
//! gradient sum), the output layer and its loss against the item table, dropout masks from the
//! candle models' keyed draws, and the dense-algebra helpers (one `gemm` call per product on
//! preallocated buffers).

use crate::batch::{Dropout, SeqBatch};
use anyhow::{bail, Result};
use rayon::prelude::*;

/// Instances per chunk (the unit of parallel work and of the deterministic gradient sum).
pub const CHUNK: usize = 128;

/// Added to the padding column's logit: item 0 is never a prediction.
pub(crate) const NEG_BIAS: f32 = -1e9;

/// The loss of a training step.
#[derive(Clone, Copy, Debug)]
pub enum FusedLoss<'a> {
    /// Full softmax over the catalogue (padding column masked).
    Ce,
    /// BCE with one given negative item per target.
    Bce { negatives: &'a [u32] },
}

pub(crate) fn check_ids(batch: &SeqBatch, rows: usize) -> Result<()> {
    if let Some(&bad) = batch
        .ids_host
        .iter()
        .chain(batch.targets.iter())
        .find(|&&i| i as usize >= rows)
    {
        bail!(
            "fused engine: item id {bad} outside the catalogue of {} items",
            rows - 1
        );
    }
    Ok(())
}

/// One chunk's instances [r0, r1) and targets [t0, t1).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Span {
    pub r0: usize,
    pub r1: usize,
    pub t0: usize,
    pub t1: usize,
}

fn chunk_spans(batch: &SeqBatch) -> Vec<Span> {
    let mut out = Vec::new();
    let mut r0 = 0;
    while r0 < batch.b {
        let r1 = (r0 + CHUNK).min(batch.b);
        let t0 = batch.target_rows.partition_point(|&r| (r as usize) < r0);
        let t1 = batch.target_rows.partition_point(|&r| (r as usize) < r1);
        out.push(Span { r0, r1, t0, t1 });
        r0 = r1;
    }
    out
}

pub(crate) fn zeroed(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

pub(crate) fn sized(v: &mut Vec<f32>, n: usize) {
    v.resize(n, 0.0);
}

/// Fill `out` with each instance's mask row for `site`, or leave it empty (= no dropout).
pub(crate) fn masks(
    out: &mut Vec<f32>,
    dropout: Option<&Dropout>,
    rate: f32,
    site: u64,
    ids: &[u64],
    per_row: usize,
) {
    out.clear();
    let Some(dr) = dropout else { return };
    if rate <= 0.0 {
        return;
    }
    let d = Dropout { rate, ..*dr };
    out.resize(ids.len() * per_row, 0.0);
    for (row, &id) in out.chunks_exact_mut(per_row).zip(ids) {
        d.fill_row(site, id, row);
    }
}

pub(crate) fn apply_mask(x: &mut [f32], m: &[f32]) {
    if !m.is_empty() {
        x.iter_mut().zip(m).for_each(|(a, b)| *a *= b);
    }
}

#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Four partial sums let the compiler vectorise without reassociation flags.
    let mut s = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            s[i] += x[i] * y[i];
        }
    }
    let mut t = (s[0] + s[4]) + (s[1] + s[5]) + ((s[2] + s[6]) + (s[3] + s[7]));
    for (x, y) in ra.iter().zip(rb) {
        t += x * y;
    }
    t
}

#[inline]
pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (b, a) in y.iter_mut().zip(x) {
        *b += alpha * a;
    }
}

pub(crate) fn softplus(x: f32) -> f32 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// y[rows, out] = x[rows, in] W[in, out] + b (W and b at offsets of the flat vector).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    wo: usize,
    bo: usize,
    rows: usize,
    d_in: usize,
    d_out: usize,
) {
    matmul(
        y,
        x,
        false,
        &w[wo..wo + d_in * d_out],
        false,
        rows,
        d_out,
        d_in,
        false,
    );
    add_bias(y, &w[bo..bo + d_out]);
}

/// dW += x^T dy, db += column sums of dy.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_backward_params(
    g: &mut [f32],
    wo: usize,
    bo: usize,
    x: &[f32],
    dy: &[f32],
    rows: usize,
    d_in: usize,
    d_out: usize,
) {
    matmul(
        &mut g[wo..wo + d_in * d_out],
        x,
        true,
        dy,
        false,
        d_in,
        d_out,
        rows,
        true,
    );
    add_col_sums(&mut g[bo..bo + d_out], dy);
}

/// c[m, n] (+)= op(a)[m, k] op(b)[k, n] with row-major operands: `ta` means `a` is stored
/// [k, m], `tb` that `b` is stored [n, k]. One call of the `gemm` crate (single-threaded:
/// chunks are the unit of parallelism).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    c: &mut [f32],
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].iter_mut().for_each(|x| *x = 0.0);
        }
        return;
    }
    let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the asserts above bound every index the strides reach; the slices do not alias
    // (c is borrowed mutably, a and b shared).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// One engine's work on one chunk: its forward (and backward) pass over a span of the batch,
/// on buffers the chunk keeps from step to step.
pub(crate) trait ChunkWork: Default + Send {
    type Layout: Sync;
    /// The checks before a step (shapes, ids): a clear error, nothing run.
    fn check(
        lay: &Self::Layout,
        flat: &[f32],
        grad_len: usize,
        batch: &SeqBatch,
        loss: FusedLoss,
    ) -> Result<()>;
    /// Run the chunk's forward pass; with `grad` (zeroed, numel values) also the backward
    /// pass: the gradient SUM of the chunk's loss terms is added to it and the loss SUM
    /// returned (0 without `grad`).
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        lay: &Self::Layout,
        w: &[f32],
        batch: &SeqBatch,
        span: &Span,
        dropout: Option<&Dropout>,
        loss: FusedLoss,
        grad: Option<&mut [f32]>,
    ) -> f64;
    /// The hidden states of the chunk's targets after `step` ([nt, d]).
    fn hidden(&self) -> &[f32];
}

/// One model's fused engine: its parameter layout, the reusable chunk buffers and one
/// gradient buffer per chunk.
pub(crate) struct FusedModel<C: ChunkWork> {
    lay: C::Layout,
    chunks: Vec<C>,
    grads: Vec<Vec<f32>>,
}

impl<C: ChunkWork> FusedModel<C> {
    fn new(lay: C::Layout) -> Self {
        Self {
            lay,
            chunks: Vec::new(),
            grads: Vec::new(),
        }
    }

    /// A training step over the whole batch: the loss SUM, and the gradient SUM (chunk
    /// gradients added in chunk order, so any thread count gives the same result) in `grad`.
    fn loss_and_grad(
        &mut self,
        flat: &[f32],
        batch: &SeqBatch,
        dropout: Option<&Dropout>,
        loss: FusedLoss,
        grad: &mut [f32],
    ) -> Result<f64> {
        C::check(&self.lay, flat, grad.len(), batch, loss)?;
        let spans = chunk_spans(batch);
        let n = spans.len();
        if self.chunks.len() < n {
            self.chunks.resize_with(n, C::default);
            self.grads.resize_with(n, Vec::new);
        }
        let lay = &self.lay;
        let losses: Vec<f64> = self.chunks[..n]
            .par_iter_mut()
            .zip(self.grads[..n].par_iter_mut())
            .zip(spans.par_iter())
            .map(|((c, g), span)| {
                zeroed(g, grad.len());
                c.step(lay, flat, batch, span, dropout, loss, Some(g))
            })
            .collect();
        let parts: Vec<&[f32]> = self.grads[..n].iter().map(|g| g.as_slice()).collect();
        sum_grads(&parts, grad);
        Ok(losses.iter().sum())
    }

    /// The forward pass alone (no dropout): hidden states at the batch's target slots.
    fn hidden(&mut self, flat: &[f32], batch: &SeqBatch) -> Result<Vec<f32>> {
        C::check(&self.lay, flat, flat.len(), batch, FusedLoss::Ce)?;
        let spans = chunk_spans(batch);
        let n = spans.len();
        if self.chunks.len() < n {
            self.chunks.resize_with(n, C::default);
            self.grads.resize_with(n, Vec::new);
        }
        let lay = &self.lay;
        self.chunks[..n]
            .par_iter_mut()
            .zip(spans.par_iter())
            .for_each(|(c, span)| {
                c.step(lay, flat, batch, span, None, FusedLoss::Ce, None);
            });
        Ok(self.chunks[..n]
            .iter()
            .flat_map(|c| c.hidden())
            .copied()
            .collect())
    }
}

/// Offset of parameter `name` in the flat vector, checking its shape.
pub(crate) fn param_offset(
    params: &crate::params::ParamStore,
    engine: &str,
    name: &str,
    shape: &[usize],
) -> Result<usize> {
    let Some(p) = params.params().iter().find(|p| p.name == name) else {
        bail!("{engine}: parameter `{name}` missing");
    };
    if p.shape != shape {
        bail!(
            "{engine}: parameter `{name}` has shape {:?}, expected {shape:?}",
            p.shape
        );
    }
    Ok(p.offset)
}

/// Add `b` to every row of `y` (rows of b.len() values).
pub(crate) fn add_bias(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        row.iter_mut().zip(b).for_each(|(a, c)| *a += c);
    }
}

/// `g` += the column sums of `dy` (rows of g.len() values): a bias gradient.
pub(crate) fn add_col_sums(g: &mut [f32], dy: &[f32]) {
    let n = g.len();
    for row in dy.chunks_exact(n) {
        g.iter_mut().zip(row).for_each(|(a, c)| *a += c);
    }
}

/// The output layer and its loss for one chunk's targets: `h` [nt, d] scored against the item
/// table (`table`, [rows, d]); CE over every item (padding column masked) or BCE against one
/// positive and one given negative. Returns the loss SUM; writes dL/dh into `dh` and
/// accumulates the table's gradient into `g_table`. `logits` is scratch ([nt, rows] for CE).
#[allow(clippy::too_many_arguments)]
pub(crate) fn output_loss(
    loss: FusedLoss,
    span: &Span,
    targets: &[u32],
    table: &[f32],
    rows: usize,
    d: usize,
    h: &[f32],
    logits: &mut Vec<f32>,
    dh: &mut Vec<f32>,
    g_table: &mut [f32],
) -> f64 {
    let nt = targets.len();
    zeroed(dh, nt * d);
    let mut total = 0f64;
    match loss {
        FusedLoss::Ce => {
            let v = rows;
            sized(logits, nt * v);
            matmul(logits, h, false, table, true, nt, v, d, false);
            for (t, &tg) in targets.iter().enumerate() {
                let row = &mut logits[t * v..(t + 1) * v];
                row[0] += NEG_BIAS;
                let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let zt = row[tg as usize] - mx;
                let mut sum = 0f32;
                for x in row.iter_mut() {
                    *x = (*x - mx).exp();
                    sum += *x;
                }
                total += (sum.ln() - zt) as f64;
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
                row[tg as usize] -= 1.0;
            }
            // dH = dZ E ; dE += dZ^T H
            matmul(dh, logits, false, table, false, nt, d, v, false);
            matmul(g_table, logits, true, h, false, v, d, nt, true);
        }
        FusedLoss::Bce { negatives } => {
            let negs = &negatives[span.t0..span.t1];
            for t in 0..nt {
                let hrow = &h[t * d..(t + 1) * d];
                for (item, sign) in [(targets[t] as usize, -1f32), (negs[t] as usize, 1f32)] {
                    let e = &table[item * d..(item + 1) * d];
                    let z = sign * dot(hrow, e);
                    total += softplus(z) as f64;
                    let gz = sign * sigmoid(z);
                    axpy(gz, e, &mut dh[t * d..(t + 1) * d]);
                    axpy(gz, hrow, &mut g_table[item * d..(item + 1) * d]);
                }
            }
        }
    }
    total
}

/// `out` = the sum of the chunk gradients in chunk order (parallel over parameter ranges, so
/// the result does not depend on the thread count).
fn sum_grads(parts: &[&[f32]], out: &mut [f32]) {
    const SPAN: usize = 1 << 14;
    out.par_chunks_mut(SPAN).enumerate().for_each(|(i, o)| {
        let (lo, hi) = (i * SPAN, i * SPAN + o.len());
        o.copy_from_slice(&parts[0][lo..hi]);
        for p in &parts[1..] {
            for (a, b) in o.iter_mut().zip(&p[lo..hi]) {
                *a += b;
            }
        }
    });
}

/// The checks every fused engine makes before a step.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_step(
    engine: &str,
    numel: usize,
    flat: &[f32],
    grad_len: usize,
    batch: &SeqBatch,
    len: usize,
    rows: usize,
    loss: FusedLoss,
) -> Result<()> {
    if flat.len() != numel || grad_len != numel {
        bail!(
            "{engine}: {} parameters / {grad_len} gradients, the model has {numel}",
            flat.len()
        );
    }
    if batch.len != len {
        bail!(
            "{engine}: batch of {} slots, the model has {len}",
            batch.len
        );
    }
    if let FusedLoss::Bce { negatives } = loss {
        if negatives.len() != batch.targets.len() {
            bail!("{engine}: one negative per target needed");
        }
        check_item_ids(negatives, rows)?;
    }
    check_ids(batch, rows)
}

fn check_item_ids(ids: &[u32], rows: usize) -> Result<()> {
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
        bail!(
            "fused engine: item id {bad} outside the catalogue of {} items",
            rows - 1
        );
    }
    Ok(())
}

/// A backbone's fused CPU engine: a hand-written forward and backward pass on the model's
/// flat parameter vector (`sasrec_fused.rs`, `gru4rec_fused.rs`, `caser_fused.rs`), equal to
/// the candle model's autograd to float tolerance.
pub struct FusedEngine(Inner);

enum Inner {
    Sasrec(FusedModel<crate::sasrec_fused::Chunk>),
    Gru4rec(FusedModel<crate::gru4rec_fused::Chunk>),
    Caser(FusedModel<crate::caser_fused::Chunk>),
}

impl FusedEngine {
    /// The fused engine of `cfg.kind`, bound to the layout of `params` (names and shapes are
    /// checked). Option: a model without a fused engine would run on candle; every backbone
    /// has one today.
    pub fn for_model(
        cfg: &crate::ModelConfig,
        num_items: u32,
        num_users: u32,
        params: &crate::params::ParamStore,
    ) -> Result<Option<Self>> {
        use crate::ModelKind;
        Ok(Some(Self(match cfg.kind {
            ModelKind::Sasrec => Inner::Sasrec(FusedModel::new(crate::sasrec_fused::Layout::new(
                cfg, num_items, params,
            )?)),
            ModelKind::Gru4rec => Inner::Gru4rec(FusedModel::new(
                crate::gru4rec_fused::Layout::new(cfg, num_items, params)?,
            )),
            ModelKind::Caser => Inner::Caser(FusedModel::new(crate::caser_fused::Layout::new(
                cfg, num_items, num_users, params,
            )?)),
        })))
    }

    /// The SUM of the loss over the batch's target terms; `grad` (numel values) receives the
    /// SUM of their gradients. `dropout` is the training dropout (None = no dropout).
    pub fn loss_and_grad(
        &mut self,
        flat: &[f32],
        batch: &SeqBatch,
        dropout: Option<&Dropout>,
        loss: FusedLoss,
        grad: &mut [f32],
    ) -> Result<f64> {
        match &mut self.0 {
            Inner::Sasrec(e) => e.loss_and_grad(flat, batch, dropout, loss, grad),
            Inner::Gru4rec(e) => e.loss_and_grad(flat, batch, dropout, loss, grad),
            Inner::Caser(e) => e.loss_and_grad(flat, batch, dropout, loss, grad),
        }
    }

    /// Hidden states at the batch's target slots ([n_targets, d], no dropout): the forward
    /// pass alone, as `Backbone::hidden` gives it.
    pub fn hidden(&mut self, flat: &[f32], batch: &SeqBatch) -> Result<Vec<f32>> {
        match &mut self.0 {
            Inner::Sasrec(e) => e.hidden(flat, batch),
            Inner::Gru4rec(e) => e.hidden(flat, batch),
            Inner::Caser(e) => e.hidden(flat, batch),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_naive_for_every_transpose() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        for ta in [false, true] {
            for tb in [false, true] {
                let ga = |i: usize, p: usize| if ta { a[p * m + i] } else { a[i * k + p] };
                let gb = |p: usize, j: usize| if tb { b[j * k + p] } else { b[p * n + j] };
                let mut c = vec![1f32; m * n];
                matmul(&mut c, &a, ta, &b, tb, m, n, k, true);
                let mut c2 = vec![0f32; m * n];
                matmul(&mut c2, &a, ta, &b, tb, m, n, k, false);
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = (0..k).map(|p| ga(i, p) * gb(p, j)).sum();
                        assert!((c[i * n + j] - 1.0 - want).abs() < 1e-5);
                        assert!((c2[i * n + j] - want).abs() < 1e-5);
                    }
                }
            }
        }
    }
}

/// Each fused engine against the candle model (autograd) it must equal.
#[cfg(test)]
mod equivalence {
    use super::*;
    use crate::batch::{training_instances, Targets};
    use crate::model::{ModelConfig, ModelKind};
    use crate::synthetic::{windows, SyntheticSpec};
    use crate::train::{loss_sum_of, sample_negatives, LossKind, TrainConfig};
    use crate::Recommender;
    use candle_core::{Device, Tensor};

    /// The synthetic data both tests train on.
    fn spec() -> SyntheticSpec {
        SyntheticSpec {
            users: 100,
            items: 30,
            seq_len: 14,
            jump: 0.3,
            seed: 9,
        }
    }

    /// Logit bias that keeps the padding column out of the softmax.
    fn pad_bias(items: u32) -> Tensor {
        let mut v = vec![0f32; items as usize + 1];
        v[0] = -1e9;
        Tensor::from_vec(v, (1, items as usize + 1), &Device::Cpu).unwrap()
    }

    fn shapes() -> Vec<(&'static str, ModelConfig)> {
        let mut caser = ModelConfig::defaults(ModelKind::Caser);
        caser.dim = 16;
        caser.max_len = 6;
        caser.nv = 3;
        caser.nh = 5;
        caser.dropout = 0.3;
        let mut gru = ModelConfig::defaults(ModelKind::Gru4rec);
        gru.dim = 16;
        gru.gru_hidden = 24;
        gru.max_len = 6;
        gru.dropout = 0.3;
        let mut reference = ModelConfig::defaults(ModelKind::Sasrec);
        reference.dim = 16;
        reference.inner = 16;
        reference.max_len = 6;
        reference.dropout = 0.3;
        reference.attn_dropout = 0.2;
        let recbole = ModelConfig {
            heads: 2,
            inner: 40,
            act: "gelu".into(),
            blocks: 3,
            ..reference.clone()
        };
        vec![
            ("sasrec reference", reference),
            ("sasrec recbole", recbole),
            ("gru4rec", gru),
            ("caser", caser),
        ]
    }

    fn close(what: &str, a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-3);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                x.is_finite() && (x - y).abs() <= 2e-4 * scale + 1e-6,
                "{what}[{i}]: fused {x} vs candle {y} (scale {scale})"
            );
        }
    }

    #[test]
    fn fused_engines_equal_candle_in_loss_gradients_and_hidden() {
        let spec = spec();
        let (train, _, _) = windows(spec);
        // Unpadded: max_len 6 and the first instances (full histories). Padded: max_len 12
        // and, for every-prefix, the last instances (the short histories of each user's first
        // window), so the padding paths (and Caser's tied all-padding windows) are checked.
        for (name, mcfg, padded) in shapes().into_iter().flat_map(|(n, c)| {
            let wide = ModelConfig {
                max_len: 12,
                ..c.clone()
            };
            [(n, c, false), (n, wide, true)]
        }) {
            for targets in [Targets::EveryPrefix, Targets::AllPositions] {
                if mcfg.kind == ModelKind::Caser && targets == Targets::AllPositions {
                    continue; // Caser predicts only the item after a window
                }
                for loss in [LossKind::Ce, LossKind::Bce] {
                    let what = format!("{name} padded={padded} {targets:?} {loss:?}");
                    let mut cfg = TrainConfig::new(mcfg.clone());
                    cfg.loss = loss;
                    cfg.targets = targets;
                    let model = Recommender::new(mcfg.clone(), spec.items, spec.users, 3).unwrap();
                    // Perturb the zero-initialised biases and unit gammas so every term matters.
                    let mut flat = model.params.flat_values().unwrap();
                    for (i, v) in flat.iter_mut().enumerate() {
                        *v += 0.05 * ((i as f32) * 0.618).sin();
                    }
                    model.params.set_flat(&flat).unwrap();
                    let insts = training_instances(&train, targets);
                    // More than one chunk, and a ragged last one.
                    let take = (CHUNK + 9).min(insts.len());
                    assert!(take > CHUNK, "{what}: synthetic set too small");
                    let ids: Vec<u64> = (0..take as u64).map(|i| i * 7 + 1).collect();
                    let chosen = if padded && targets == Targets::EveryPrefix {
                        &insts[insts.len() - take..]
                    } else {
                        &insts[..take]
                    };
                    let batch =
                        SeqBatch::build(&train, chosen, &ids, targets, mcfg.max_len).unwrap();
                    let pads = batch.real.iter().filter(|&&x| x == 0.0).count();
                    assert!(
                        if padded {
                            pads * 10 > batch.real.len()
                        } else {
                            pads == 0
                        },
                        "{what}: {pads} padding slots of {}",
                        batch.real.len()
                    );
                    let dropout = Dropout {
                        seed: 11,
                        epoch: 2,
                        rate: mcfg.dropout,
                    };
                    let pad_bias = pad_bias(spec.items);
                    let h = model.net.hidden(&batch, Some(&dropout)).unwrap();
                    let l =
                        loss_sum_of(&model, &h, &batch, &cfg, 2, &pad_bias, spec.items).unwrap();
                    let grads = l.backward().unwrap();
                    let n = model.params.numel();
                    let mut want = vec![0f32; n];
                    model.params.flat_grads(&grads, &mut want).unwrap();
                    let want_loss = l.to_scalar::<f32>().unwrap() as f64;

                    let mut fused =
                        FusedEngine::for_model(&mcfg, spec.items, spec.users, &model.params)
                            .unwrap()
                            .unwrap();
                    let negs = sample_negatives(&batch, cfg.seed, 2, spec.items);
                    let fl = match loss {
                        LossKind::Ce => FusedLoss::Ce,
                        LossKind::Bce => FusedLoss::Bce { negatives: &negs },
                    };
                    let mut got = vec![f32::NAN; n];
                    let got_loss = fused
                        .loss_and_grad(&flat, &batch, Some(&dropout), fl, &mut got)
                        .unwrap();
                    assert!(
                        (got_loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
                        "{what}: loss fused {got_loss} vs candle {want_loss}"
                    );
                    for p in model.params.params() {
                        let k: usize = p.shape.iter().product();
                        let r = p.offset..p.offset + k;
                        close(&format!("{what} {}", p.name), &got[r.clone()], &want[r]);
                    }
                    // A second step on the same buffers gives the same answer.
                    let mut again = vec![0f32; n];
                    fused
                        .loss_and_grad(&flat, &batch, Some(&dropout), fl, &mut again)
                        .unwrap();
                    assert_eq!(again, got, "{what}: buffers reused");
                    // Forward alone, no dropout.
                    let hc = model
                        .net
                        .hidden(&batch, None)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    let hf = fused.hidden(&flat, &batch).unwrap();
                    close(&format!("{what} hidden"), &hf, &hc);
                }
            }
        }
    }

    /// Caser's max-pool over time against finite differences: equal windows (all-padding ones
    /// after left padding, or repeated items) tie for the maximum, and the gradient must reach
    /// the pooled value once, as PyTorch's max_pool1d routes it, not once per tied position.
    #[test]
    fn tied_windows_get_the_gradient_once() {
        let spec = spec();
        let (train, _, _) = windows(spec);
        let mut mcfg = ModelConfig::defaults(ModelKind::Caser);
        mcfg.dim = 16;
        mcfg.max_len = 12;
        mcfg.nv = 3;
        mcfg.nh = 5;
        let cfg = TrainConfig::new(mcfg.clone());
        let model = Recommender::new(mcfg.clone(), spec.items, spec.users, 3).unwrap();
        let bias = model
            .params
            .params()
            .iter()
            .find(|p| p.name == "conv_h.bias")
            .unwrap()
            .offset;
        let mut flat = model.params.flat_values().unwrap();
        for (i, v) in flat.iter_mut().enumerate() {
            *v += 0.05 * ((i as f32) * 0.618).sin();
        }
        // Positive biases: the all-padding windows' ReLU is active, and they tie.
        for v in &mut flat[bias..bias + 12 * mcfg.nh] {
            *v = 0.3;
        }
        model.params.set_flat(&flat).unwrap();
        // Histories of at most 2 items in 12 slots: most windows of every height are padding.
        let chosen: Vec<_> = training_instances(&train, Targets::EveryPrefix)
            .into_iter()
            .filter(|i| i.end <= 2)
            .take(40)
            .collect();
        assert_eq!(chosen.len(), 40);
        let ids: Vec<u64> = (0..40).collect();
        let batch =
            SeqBatch::build(&train, &chosen, &ids, Targets::EveryPrefix, mcfg.max_len).unwrap();
        let pad_bias = pad_bias(spec.items);
        let h = model.net.hidden(&batch, None).unwrap();
        let l = loss_sum_of(&model, &h, &batch, &cfg, 0, &pad_bias, spec.items).unwrap();
        let mut candle_grad = vec![0f32; model.params.numel()];
        model
            .params
            .flat_grads(&l.backward().unwrap(), &mut candle_grad)
            .unwrap();
        let mut engine = FusedEngine::for_model(&mcfg, spec.items, spec.users, &model.params)
            .unwrap()
            .unwrap();
        let mut fused_grad = vec![0f32; model.params.numel()];
        engine
            .loss_and_grad(&flat, &batch, None, FusedLoss::Ce, &mut fused_grad)
            .unwrap();
        let mut loss_at = |k: usize, x: f32| {
            let mut f = flat.clone();
            f[k] += x;
            let mut g = vec![0f32; f.len()];
            engine
                .loss_and_grad(&f, &batch, None, FusedLoss::Ce, &mut g)
                .unwrap()
        };
        // Central differences of the fused loss (f64 sums): within ~3% at eps = 0.01 here; the
        // rule that sent the gradient to every tied position was off by up to 10x, with the
        // wrong sign. Height 12 has one window, so no ties: a control.
        for (hgt, f) in [(1usize, 0usize), (1, 2), (3, 1), (6, 4), (12, 0), (12, 3)] {
            let k = bias + (hgt - 1) * mcfg.nh + f;
            let eps = 1e-2f32;
            let fd = (loss_at(k, eps) - loss_at(k, -eps)) / (2.0 * eps as f64);
            for (engine, g) in [("candle", candle_grad[k]), ("fused", fused_grad[k])] {
                assert!(
                    (g as f64 - fd).abs() <= 0.1 * fd.abs() + 1e-4,
                    "conv_h.bias height {hgt} filter {f}: {engine} {g} vs finite difference {fd}"
                );
            }
        }
    }
}
