//! From windows to tensors. A training *instance* is one window read up to some position
//! (`end`): its input is the (at most `max_len`) items before `end`, left-padded with 0, and
//! its target(s) are the item at `end` (or, for [`Targets::AllPositions`], the next item at
//! every input slot). Instances get stable ids (their index in the unshuffled list), which key
//! every random draw made for them (dropout masks, negatives), so a draw never depends on the
//! batch it lands in or on the rank that computes it.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use llm4dsr_data::rng::{mix64, KeyedRng, Purpose};
use llm4dsr_data::Windows;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Which positions of the training windows are targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Targets {
    /// Every distinct (user, position) of the training windows is a target once, with the
    /// longest history the windows hold (at most max_len): the "every prefix is an instance"
    /// protocol of RecBole. Stride-1 windows otherwise repeat each interaction up to 10 times.
    EveryPrefix,
    /// Only the last item of each window (one instance per window).
    Last,
    /// Every position of every window predicts the next item (the original SASRec loss).
    AllPositions,
}

/// One training or evaluation instance: window `window`, items before `end` are the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Instance {
    pub window: u32,
    pub end: u32,
}

/// Whether `targets` can be built from these windows. [`Targets::EveryPrefix`] places each
/// window slot in its user's sequence from the window's `pos` (its target's index in that
/// sequence), so that an interaction held by several overlapping windows is a target once;
/// windows imported as they are (movie-csv: `pos` is the window's ordinal among its user's
/// windows) cannot be placed, and are refused here rather than trained on wrongly.
pub fn check_targets(w: &Windows, targets: Targets) -> Result<()> {
    if targets != Targets::EveryPrefix {
        return Ok(());
    }
    if let Some(win) = w
        .iter()
        .find(|win| (win.pos as usize) + 1 < win.items.len())
    {
        bail!(
            "targets every-prefix: the window of user {} at pos {} holds {} items, so its `pos` \
             is not its target's index in the user's sequence (windows imported as they are, \
             e.g. movie-csv); use targets `last` (one instance per window: the reference \
             code's protocol for such windows) or `all-positions`",
            win.user,
            win.pos,
            win.items.len()
        );
    }
    Ok(())
}

/// Instances for training under `targets`, in a fixed order (independent of ranks).
pub fn training_instances(w: &Windows, targets: Targets) -> Vec<Instance> {
    let mut out = Vec::new();
    match targets {
        Targets::Last | Targets::AllPositions => {
            for i in 0..w.len() {
                let k = w.get(i).items.len();
                if k >= 2 {
                    out.push(Instance {
                        window: i as u32,
                        end: (k - 1) as u32,
                    });
                }
            }
        }
        Targets::EveryPrefix => {
            // First every window's last position (the longest history of its target), then
            // inner positions not already covered. Position in the user's sequence of window
            // slot j is pos - (k-1) + j.
            let mut seen: HashSet<(u32, u32)> = HashSet::new();
            for i in 0..w.len() {
                let win = w.get(i);
                let k = win.items.len();
                if k >= 2 && seen.insert((win.user, win.pos)) {
                    out.push(Instance {
                        window: i as u32,
                        end: (k - 1) as u32,
                    });
                }
            }
            for i in 0..w.len() {
                let win = w.get(i);
                let k = win.items.len() as u32;
                if win.pos + 1 < k {
                    // `pos` is not the target's index in the user's sequence (refused by
                    // `check_targets`): no inner position can be placed.
                    continue;
                }
                for j in (1..k.saturating_sub(1)).rev() {
                    let seq_pos = win.pos + j + 1 - k;
                    if seen.insert((win.user, seq_pos)) {
                        out.push(Instance {
                            window: i as u32,
                            end: j,
                        });
                    }
                }
            }
        }
    }
    out
}

/// Evaluation instances: every window with a non-empty history, predicting its last item.
pub fn eval_instances(w: &Windows) -> Vec<Instance> {
    training_instances(w, Targets::Last)
}

/// Number of loss terms an instance contributes.
pub fn loss_terms(inst: Instance, targets: Targets, max_len: usize) -> usize {
    match targets {
        Targets::AllPositions => (inst.end as usize).min(max_len),
        _ => 1,
    }
}

/// A batch ready for a backbone.
pub struct SeqBatch {
    /// Rows.
    pub b: usize,
    /// Slots per row (max_len).
    pub len: usize,
    /// Item ids [b, len], left-padded with 0.
    pub ids: Tensor,
    pub ids_host: Vec<u32>,
    /// 1.0 at real items, 0.0 at padding: [b, len].
    pub real: Vec<f32>,
    /// User ids [b].
    pub users: Tensor,
    pub users_host: Vec<u32>,
    /// Flat slot indices (row * len + slot) whose hidden state predicts a target, [n].
    pub target_slots: Tensor,
    pub target_slots_host: Vec<u32>,
    /// Target item of each target slot, [n].
    pub targets: Vec<u32>,
    /// Row of each target (for per-row draws such as negatives).
    pub target_rows: Vec<u32>,
    /// Stable instance id of each row.
    pub instance_ids: Vec<u64>,
}

impl SeqBatch {
    /// Build a batch from instances (`ids[i]` is the instance's stable id).
    pub fn build(
        w: &Windows,
        insts: &[Instance],
        ids: &[u64],
        targets: Targets,
        max_len: usize,
    ) -> Result<SeqBatch> {
        let b = insts.len();
        let l = max_len;
        let mut idv = vec![0u32; b * l];
        let mut real = vec![0f32; b * l];
        let mut users = Vec::with_capacity(b);
        let mut slots = Vec::new();
        let mut tg = Vec::new();
        let mut rows = Vec::new();
        for (r, inst) in insts.iter().enumerate() {
            let win = w.get(inst.window as usize);
            let end = inst.end as usize;
            if end == 0 || end >= win.items.len() {
                bail!("instance {inst:?} has no history or no target");
            }
            let start = end.saturating_sub(l);
            let input = &win.items[start..end];
            let off = l - input.len();
            for (s, &it) in input.iter().enumerate() {
                idv[r * l + off + s] = it;
                real[r * l + off + s] = 1.0;
            }
            users.push(win.user);
            match targets {
                Targets::AllPositions => {
                    for s in 0..input.len() {
                        slots.push((r * l + off + s) as u32);
                        tg.push(win.items[start + s + 1]);
                        rows.push(r as u32);
                    }
                }
                _ => {
                    slots.push((r * l + l - 1) as u32);
                    tg.push(win.items[end]);
                    rows.push(r as u32);
                }
            }
        }
        let dev = Device::Cpu;
        Ok(SeqBatch {
            b,
            len: l,
            ids: Tensor::from_slice(&idv, (b, l), &dev)?,
            ids_host: idv,
            real,
            users: Tensor::from_slice(&users, b, &dev)?,
            users_host: users,
            target_slots: Tensor::from_slice(&slots, slots.len(), &dev)?,
            target_slots_host: slots,
            targets: tg,
            target_rows: rows,
            instance_ids: ids.to_vec(),
        })
    }

    /// True when every row has exactly one target, at its last slot.
    pub fn last_slot_only(&self) -> bool {
        self.targets.len() == self.b
            && self
                .target_slots_host
                .iter()
                .enumerate()
                .all(|(r, &s)| s as usize == r * self.len + self.len - 1)
    }

    /// The real-item mask as a tensor of the given shape (e.g. [b, len, 1]).
    pub fn real_mask(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.real, shape, &Device::Cpu)?)
    }
}

/// Dropout masks for one training step, keyed by (seed, epoch, site, instance id).
pub struct Dropout {
    pub seed: u64,
    pub epoch: u64,
    pub rate: f32,
}

impl Dropout {
    /// A mask of `per_row` values for each instance of the batch, shaped `shape` (whose
    /// product is rows * per_row): 0 with probability `rate`, else 1 / (1 - rate).
    pub fn mask(
        &self,
        site: u64,
        instance_ids: &[u64],
        per_row: usize,
        shape: &[usize],
    ) -> Result<Tensor> {
        let mut v = vec![0f32; instance_ids.len() * per_row];
        if per_row > 0 {
            for (row, &id) in v.chunks_exact_mut(per_row).zip(instance_ids) {
                self.fill_row(site, id, row);
            }
        }
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// One instance's mask values for `site` (the row `mask` gives that instance): 0 with
    /// probability `rate`, else 1 / (1 - rate).
    pub fn fill_row(&self, site: u64, instance_id: u64, out: &mut [f32]) {
        let keep_scale = 1.0 / (1.0 - self.rate);
        // 16-bit uniform draws: four per u64. Resolution 1/65536 is ample for a dropout rate.
        let threshold = (self.rate as f64 * 65536.0).round() as u32;
        let key = mix64(self.epoch ^ (site << 40) ^ 0xD80F_0000_0000_0000);
        let mut rng = KeyedRng::new2(self.seed, Purpose::Train, key, instance_id);
        // Four values per draw, low 16 bits first (branch-free: a select per value).
        let mut quads = out.chunks_exact_mut(4);
        for q in &mut quads {
            let bits = rng.next_u64();
            for (k, o) in q.iter_mut().enumerate() {
                let u = ((bits >> (16 * k)) & 0xFFFF) as u32;
                *o = if u >= threshold { keep_scale } else { 0.0 };
            }
        }
        let rest = quads.into_remainder();
        if !rest.is_empty() {
            let bits = rng.next_u64();
            for (k, o) in rest.iter_mut().enumerate() {
                let u = ((bits >> (16 * k)) & 0xFFFF) as u32;
                *o = if u >= threshold { keep_scale } else { 0.0 };
            }
        }
    }

    /// `x * mask` when the rate is positive, else `x`.
    pub fn apply(&self, x: &Tensor, site: u64, instance_ids: &[u64]) -> Result<Tensor> {
        if self.rate <= 0.0 {
            return Ok(x.clone());
        }
        let dims = x.dims().to_vec();
        let per_row = x.elem_count() / dims[0];
        let m = self.mask(site, instance_ids, per_row, &dims)?;
        Ok(x.mul(&m)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_windows(user: u32, seq: &[u32], max_items: usize) -> Windows {
        // Stride-1 windows of up to max_items, as the prepare stage writes them.
        let mut w = Windows::new();
        if seq.len() <= max_items {
            let z = vec![0u8; seq.len()];
            w.push(user, seq.len() as u32 - 1, seq, &z, seq, 0);
        } else {
            for end in max_items..=seq.len() {
                let s = &seq[end - max_items..end];
                let z = vec![0u8; s.len()];
                w.push(user, end as u32 - 1, s, &z, s, 0);
            }
        }
        w
    }

    #[test]
    fn every_prefix_covers_each_interaction_once_with_longest_history() {
        let seq: Vec<u32> = (1..=15).collect();
        let w = user_windows(7, &seq, 11);
        let inst = training_instances(&w, Targets::EveryPrefix);
        // Targets are items 2..=15: 14 instances (the first item has no history).
        assert_eq!(inst.len(), 14);
        let mut targets: Vec<u32> = inst
            .iter()
            .map(|i| w.get(i.window as usize).items[i.end as usize])
            .collect();
        targets.sort();
        assert_eq!(targets, (2..=15).collect::<Vec<_>>());
        for i in &inst {
            let win = w.get(i.window as usize);
            let t = win.items[i.end as usize];
            // History length = min(10, t - 1).
            assert_eq!(i.end, (t - 1).min(10), "{i:?}");
        }
        assert_eq!(training_instances(&w, Targets::Last).len(), 5);
    }

    #[test]
    fn windows_imported_as_they_are_are_refused_for_every_prefix() {
        // movie-csv: `pos` is the window's ordinal, smaller than its length - 1.
        let mut w = Windows::new();
        let items: Vec<u32> = (1..=11).collect();
        let z = vec![0u8; 11];
        w.push(3, 0, &items, &z, &items, 0);
        let e = check_targets(&w, Targets::EveryPrefix)
            .unwrap_err()
            .to_string();
        assert!(e.contains("user 3 at pos 0") && e.contains("`last`"), "{e}");
        check_targets(&w, Targets::Last).unwrap();
        check_targets(&w, Targets::AllPositions).unwrap();
        // No overflow: the inner positions of such a window are simply not placed.
        assert_eq!(training_instances(&w, Targets::EveryPrefix).len(), 1);
        check_targets(
            &user_windows(7, &(1..=15).collect::<Vec<_>>(), 11),
            Targets::EveryPrefix,
        )
        .unwrap();
    }

    #[test]
    fn batch_is_left_padded_and_targets_are_placed() {
        let w = user_windows(1, &[5, 6, 7], 11);
        let b = SeqBatch::build(
            &w,
            &[Instance { window: 0, end: 2 }],
            &[0],
            Targets::Last,
            4,
        )
        .unwrap();
        assert_eq!(b.ids_host, vec![0, 0, 5, 6]);
        assert_eq!(b.targets, vec![7]);
        assert!(b.last_slot_only());
        let b = SeqBatch::build(
            &w,
            &[Instance { window: 0, end: 2 }],
            &[0],
            Targets::AllPositions,
            4,
        )
        .unwrap();
        assert_eq!(b.target_slots_host, vec![2, 3]);
        assert_eq!(b.targets, vec![6, 7]);
    }

    #[test]
    fn dropout_mask_depends_on_instance_not_batch() {
        let d = Dropout {
            seed: 3,
            epoch: 1,
            rate: 0.5,
        };
        let a = d
            .mask(2, &[10, 11], 8, &[2, 8])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let b = d
            .mask(2, &[11], 8, &[1, 8])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(a[1], b[0]);
        let kept = a.iter().flatten().filter(|&&x| x > 0.0).count();
        assert!((3..=13).contains(&kept), "{a:?}");
        assert!(a.iter().flatten().all(|&x| x == 0.0 || x == 2.0));
    }
}
