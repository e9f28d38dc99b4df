//! Sharding: users are partitioned into a fixed number of shards by a stable hash of the user
//! id. The shard count comes from the config and never depends on the number of ranks; ranks
//! take shards round-robin. Part files are named by shard, so any rank count writes the same
//! files.

use crate::rng::mix64;

/// The shard of `user` among `num_shards` (stable across runs, platforms and versions).
pub fn shard_of(user: u32, num_shards: u32) -> u32 {
    assert!(num_shards > 0);
    (mix64(0x5348_4152_4400_0000 ^ user as u64) % num_shards as u64) as u32
}

/// The shards rank `rank` of `size` owns: rank, rank + size, rank + 2*size, ...
pub fn shards_of_rank(rank: usize, size: usize, num_shards: u32) -> Vec<u32> {
    (rank as u32..num_shards).step_by(size.max(1)).collect()
}

/// Part-file name of a shard, e.g. `part-00003-of-00016.parquet`.
pub fn part_name(shard: u32, num_shards: u32) -> String {
    format!("part-{shard:05}-of-{num_shards:05}.parquet")
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn every_shard_owned_exactly_once() {
        for size in 1..5 {
            let mut all: Vec<u32> = (0..size)
                .flat_map(|r| shards_of_rank(r, size, 16))
                .collect();
            all.sort();
            assert_eq!(all, (0..16).collect::<Vec<_>>());
        }
    }
    #[test]
    fn shards_are_balanced() {
        let mut c = [0u32; 8];
        for u in 0..80_000 {
            c[shard_of(u, 8) as usize] += 1;
        }
        assert!(c.iter().all(|&x| (9_000..11_000).contains(&x)), "{c:?}");
    }
}
