//! Combining the per-rank stores of one collection into a single store.

use std::path::{Path, PathBuf};

use super::reader::StoreReader;
use super::shard::RawPairs;
use super::spec::{Partition, StoreSpec};
use super::writer::StoreWriter;
use crate::DataError;

fn unsplit(spec: &StoreSpec) -> StoreSpec {
    StoreSpec {
        partition: Partition::default(),
        ..spec.clone()
    }
}

/// Merges the stores of ranks `0..world_size` of one collection (same spec but for the
/// partition; e.g. `dir/rank-0`, `dir/rank-1`, ...) into one store at `out` holding global
/// indices `0..N` in order. The inputs must be gap-free together: a rank that stopped early
/// must be resumed first. The inputs are only read; the pairs are copied. Rerunning after a
/// kill continues where `out` stopped. Returns the number of pairs in `out`.
pub fn merge(inputs: &[PathBuf], out: &Path) -> Result<usize, DataError> {
    let mut readers = inputs
        .iter()
        .map(StoreReader::open)
        .collect::<Result<Vec<_>, _>>()?;
    readers.sort_by_key(|r| r.spec().partition.rank);
    let Some(first) = readers.first() else {
        return Err(DataError::invalid("inputs", "no stores to merge"));
    };
    let merged_spec = unsplit(first.spec());
    let world = first.spec().partition.world_size;
    for reader in &readers {
        merged_spec.ensure_matches(
            &unsplit(reader.spec()),
            &format!("the store at {}", first.dir().display()),
            &format!("the store at {}", reader.dir().display()),
        )?;
    }
    let ranks: Vec<(u64, u64)> = readers
        .iter()
        .map(|r| (r.spec().partition.rank, r.spec().partition.world_size))
        .collect();
    if !ranks
        .iter()
        .enumerate()
        .all(|(i, &rank)| rank == (i as u64, world))
        || ranks.len() as u64 != world
    {
        return Err(DataError::invalid(
            "inputs",
            format!("need one store per rank 0..{world}, got (rank, world_size) {ranks:?}"),
        ));
    }

    // Each rank's first missing global index; the smallest is where the merged range ends.
    let total: u64 = readers.iter().map(|r| r.len() as u64).sum();
    let gap = readers
        .iter()
        .map(|r| (r.spec().partition.global_index(r.len() as u64), r))
        .min_by_key(|(first_missing, _)| *first_missing);
    if let Some((first_missing, short)) = gap.filter(|(first_missing, _)| *first_missing < total) {
        return Err(DataError::file(
            short.dir(),
            format!(
                "lacks pair {first_missing} while other ranks hold {total} pairs in all: \
                 resume this rank's collection first"
            ),
        ));
    }

    let mut writer = StoreWriter::open(out, merged_spec)?;
    let layouts = readers[0].layouts();
    let chunk = writer.spec().shard_size as u64;
    let mut next = writer.next_index();
    if next > total {
        return Err(DataError::file(
            out,
            format!("already holds {next} pairs, more than the {total} of the inputs"),
        ));
    }
    while next < total {
        let end = (next + chunk).min(total);
        let per_rank = readers
            .iter()
            .map(|reader| {
                let rank = reader.spec().partition.rank;
                let positions: Vec<u64> = (next..end)
                    .filter(|g| g % world == rank)
                    .map(|g| g / world)
                    .collect();
                reader.read_raw(&positions)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut merged = RawPairs::empty(layouts);
        let mut cursors = vec![0usize; readers.len()];
        for global in next..end {
            let rank = (global % world) as usize;
            merged.push_row(&per_rank[rank], cursors[rank], layouts);
            cursors[rank] += 1;
        }
        writer.append_raw(merged)?;
        next = end;
    }
    writer.finish()
}
