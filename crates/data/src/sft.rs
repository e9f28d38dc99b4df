//! Self-supervised fine-tuning instances (method.md, "SFT"): a training window with ONE
//! uniformly chosen position swapped for a uniformly random catalogue item; the LLM learns to
//! name the intruder and the original. `sft.parquet`:
//!
//! | column     | type      | meaning                                                        |
//! |------------|-----------|----------------------------------------------------------------|
//! | `user`     | u32       | dense user id                                                  |
//! | `pos`      | u32       | the window's target index in the user's sequence (its key)     |
//! | `items`    | list<u32> | the window with the swap applied                               |
//! | `mask`     | list<u8>  | the window's dataset mask (1 = synthetic noise), 2 at the swap |
//! | `swap_pos` | u32       | index of the swapped position within the window                |
//! | `inserted` | u32       | the intruder now at `swap_pos`                                 |
//! | `original` | u32       | the item that was at `swap_pos` before the swap                |
//!
//! Draws are keyed by (seed, user, pos), so any subset or sharding of windows gets the same
//! instance for the same window. The intruder never equals an item already in the window (that
//! would make the answer ambiguous). Cost: O(window) per instance.

use crate::parquet_io::{read_columns, write_batches, ColumnSpec};
use crate::rng::{KeyedRng, Purpose};
use crate::windows::{Windows, MASK_SFT_SWAP};
use anyhow::{bail, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{UInt32Type, UInt8Type};
use arrow_array::{RecordBatch, UInt32Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use std::path::Path;
use std::sync::Arc;

/// SFT instances: `windows` holds the swapped windows (its `original` list is the window before
/// the swap); the other vectors are per instance.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SftInstances {
    pub windows: Windows,
    pub swap_pos: Vec<u32>,
    pub inserted: Vec<u32>,
    pub original: Vec<u32>,
}

impl SftInstances {
    pub fn len(&self) -> usize {
        self.swap_pos.len()
    }
    pub fn is_empty(&self) -> bool {
        self.swap_pos.is_empty()
    }

    pub fn schema() -> SchemaRef {
        let list_u32 = DataType::List(Arc::new(Field::new("item", DataType::UInt32, true)));
        let list_u8 = DataType::List(Arc::new(Field::new("item", DataType::UInt8, true)));
        Arc::new(Schema::new(vec![
            Field::new("user", DataType::UInt32, false),
            Field::new("pos", DataType::UInt32, false),
            Field::new("items", list_u32, false),
            Field::new("mask", list_u8, false),
            Field::new("swap_pos", DataType::UInt32, false),
            Field::new("inserted", DataType::UInt32, false),
            Field::new("original", DataType::UInt32, false),
        ]))
    }

    pub fn write_parquet(&self, path: &Path) -> Result<()> {
        let w = &self.windows;
        let offsets = crate::windows::list_offsets(&w.offsets);
        let batch = RecordBatch::try_new(
            Self::schema(),
            vec![
                Arc::new(UInt32Array::from(w.user.clone())),
                Arc::new(UInt32Array::from(w.pos.clone())),
                crate::windows::packed_list::<UInt32Type>(&offsets, w.items.clone()),
                crate::windows::packed_list::<UInt8Type>(&offsets, w.mask.clone()),
                Arc::new(UInt32Array::from(self.swap_pos.clone())),
                Arc::new(UInt32Array::from(self.inserted.clone())),
                Arc::new(UInt32Array::from(self.original.clone())),
            ],
        )?;
        write_batches(path, Self::schema(), &[batch])
    }

    /// Read `sft.parquet`. The windows' `original` list is rebuilt (items with the swap undone);
    /// their `target_timestamp` is not stored and reads as 0.
    pub fn read_parquet(path: &Path) -> Result<Self> {
        let list_u32 = DataType::List(Arc::new(Field::new("item", DataType::UInt32, true)));
        let list_u8 = DataType::List(Arc::new(Field::new("item", DataType::UInt8, true)));
        let u32s = [DataType::UInt32];
        let batches = read_columns(
            path,
            &[
                ColumnSpec {
                    name: "user",
                    accepts: &u32s,
                },
                ColumnSpec {
                    name: "pos",
                    accepts: &u32s,
                },
                ColumnSpec {
                    name: "items",
                    accepts: std::slice::from_ref(&list_u32),
                },
                ColumnSpec {
                    name: "mask",
                    accepts: std::slice::from_ref(&list_u8),
                },
                ColumnSpec {
                    name: "swap_pos",
                    accepts: &u32s,
                },
                ColumnSpec {
                    name: "inserted",
                    accepts: &u32s,
                },
                ColumnSpec {
                    name: "original",
                    accepts: &u32s,
                },
            ],
        )?;
        let mut out = SftInstances {
            windows: Windows::new(),
            ..Default::default()
        };
        let mut undone = Vec::new();
        for b in &batches {
            let user = b.column(0).as_primitive::<UInt32Type>();
            let pos = b.column(1).as_primitive::<UInt32Type>();
            let items = b.column(2).as_list::<i32>();
            let mask = b.column(3).as_list::<i32>();
            let swap = b.column(4).as_primitive::<UInt32Type>();
            let ins = b.column(5).as_primitive::<UInt32Type>();
            let orig = b.column(6).as_primitive::<UInt32Type>();
            for r in 0..b.num_rows() {
                let it = items.value(r);
                let it = it.as_primitive::<UInt32Type>();
                let mk = mask.value(r);
                let mk = mk.as_primitive::<UInt8Type>();
                let s = swap.value(r) as usize;
                if it.len() != mk.len() || s >= it.len() || it.value(s) != ins.value(r) {
                    bail!(
                        "{}: row {r}: fields `items`/`mask`/`swap_pos`/`inserted` disagree",
                        path.display()
                    );
                }
                undone.clear();
                undone.extend_from_slice(it.values());
                undone[s] = orig.value(r);
                out.windows.push(
                    user.value(r),
                    pos.value(r),
                    it.values(),
                    mk.values(),
                    &undone,
                    0,
                );
                out.swap_pos.push(s as u32);
                out.inserted.push(ins.value(r));
                out.original.push(orig.value(r));
            }
        }
        Ok(out)
    }
}

/// Which training windows become SFT instances: all of them when `max` is 0 or at least the
/// count, else the `max` windows with the smallest keyed priority (a uniform sample without
/// replacement that does not depend on the windows' order), kept in their original order.
pub fn sample_windows(train: &Windows, seed: u64, max: usize) -> Vec<usize> {
    if max == 0 || max >= train.len() {
        return (0..train.len()).collect();
    }
    let mut keyed: Vec<(u64, usize)> = (0..train.len())
        .map(|i| {
            let k = KeyedRng::new2(
                seed,
                Purpose::SftSample,
                train.user[i] as u64,
                train.pos[i] as u64,
            )
            .next_u64();
            (k, i)
        })
        .collect();
    keyed.select_nth_unstable(max - 1);
    let mut chosen: Vec<usize> = keyed[..max].iter().map(|&(_, i)| i).collect();
    chosen.sort_unstable();
    chosen
}

/// Make one SFT instance per chosen training window. `num_items` is the catalogue size; the
/// intruder is uniform over the items not already in the window.
pub fn make_instances(
    train: &Windows,
    chosen: &[usize],
    num_items: u32,
    seed: u64,
) -> Result<SftInstances> {
    let mut out = SftInstances {
        windows: Windows::new(),
        ..Default::default()
    };
    let mut items = Vec::new();
    let mut mask = Vec::new();
    for &i in chosen {
        let w = train.get(i);
        // The rejection loop below needs an item outside the window.
        if (num_items as usize) <= w.items.len() && (1..=num_items).all(|c| w.items.contains(&c)) {
            bail!(
                "catalogue of {num_items} items is too small for SFT swaps in windows of {}",
                w.items.len()
            );
        }
        let mut rng = KeyedRng::new2(seed, Purpose::SftSwap, w.user as u64, w.pos as u64);
        let s = rng.below(w.items.len() as u64) as usize;
        // Rejection: at most 11 of >= 12 items are excluded, so this ends quickly.
        let inserted = loop {
            let c = 1 + rng.below(num_items as u64) as u32;
            if !w.items.contains(&c) {
                break c;
            }
        };
        items.clear();
        items.extend_from_slice(w.items);
        items[s] = inserted;
        mask.clear();
        mask.extend_from_slice(w.mask);
        mask[s] = MASK_SFT_SWAP;
        out.windows
            .push(w.user, w.pos, &items, &mask, w.items, w.target_timestamp);
        out.swap_pos.push(s as u32);
        out.inserted.push(inserted);
        out.original.push(w.items[s]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train() -> Windows {
        let mut w = Windows::new();
        for u in 1..=50u32 {
            let items: Vec<u32> = (0..11).map(|k| 1 + (u * 7 + k) % 40).collect();
            w.push(u, 10, &items, &[0; 11], &items, u as i64);
        }
        w
    }

    #[test]
    fn one_swap_per_instance_with_a_new_item() {
        let t = train();
        let chosen = sample_windows(&t, 42, 0);
        let s = make_instances(&t, &chosen, 40, 42).unwrap();
        assert_eq!(s.len(), 50);
        for i in 0..s.len() {
            let w = s.windows.get(i);
            let src = t.get(i);
            let diff: Vec<usize> = (0..11).filter(|&k| w.items[k] != src.items[k]).collect();
            assert_eq!(diff, vec![s.swap_pos[i] as usize]);
            assert_eq!(w.mask[s.swap_pos[i] as usize], 2);
            assert_eq!(s.original[i], src.items[s.swap_pos[i] as usize]);
            assert!(!src.items.contains(&s.inserted[i]));
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sft.parquet");
        s.write_parquet(&p).unwrap();
        let r = SftInstances::read_parquet(&p).unwrap();
        assert_eq!(r.inserted, s.inserted);
        assert_eq!(r.windows.original, s.windows.original);
    }

    #[test]
    fn sampling_is_keyed_not_ordered() {
        let t = train();
        let a = sample_windows(&t, 7, 10);
        assert_eq!(a.len(), 10);
        // Same windows in another order pick the same (user, pos) set.
        let rev = t.select(|_, _| true);
        let mut rw = Windows::new();
        for i in (0..rev.len()).rev() {
            let w = rev.get(i);
            rw.push(
                w.user,
                w.pos,
                w.items,
                w.mask,
                w.original,
                w.target_timestamp,
            );
        }
        let b = sample_windows(&rw, 7, 10);
        let mut ua: Vec<u32> = a.iter().map(|&i| t.user[i]).collect();
        let mut ub: Vec<u32> = b.iter().map(|&i| rw.user[i]).collect();
        ua.sort();
        ub.sort();
        assert_eq!(ua, ub);
    }
}
