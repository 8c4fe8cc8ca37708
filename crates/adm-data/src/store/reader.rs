//! Random access to a store's pairs, epoch orders and background prefetching.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::Device;
use rand::seq::SliceRandom;

use super::keyed_rng;
use super::manifest::Manifest;
use super::shard::{RawPairs, ShardFile};
use super::spec::{StoreSpec, TensorLayout};
use super::PairBatch;
use crate::DataError;

/// A store opened for reading. Pairs are addressed by position `0..len()`; position `p`
/// holds global index `partition.global_index(p)` (the same number in an unsplit or merged
/// store), which [`PairBatch::indices`] reports.
#[derive(Debug)]
pub struct StoreReader {
    dir: PathBuf,
    manifest: Manifest,
    layouts: Vec<TensorLayout>,
    /// Per manifest shard: its checked header, or why it cannot be read.
    shards: Vec<Result<ShardFile, DataError>>,
}

impl StoreReader {
    /// Opens a store, checking the manifest and every shard's size, header, shapes and pair
    /// indices; any damaged shard is an error naming its file.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, DataError> {
        let reader = Self::open_skipping_damaged(dir)?;
        let damaged = reader.damaged_shards();
        match damaged.first() {
            None => Ok(reader),
            Some(DataError::File { path, reason }) if damaged.len() > 1 => Err(DataError::File {
                path: path.clone(),
                reason: format!("{reason} (and {} more damaged shards)", damaged.len() - 1),
            }),
            Some(first) => Err((*first).clone()),
        }
    }

    /// Like [`StoreReader::open`], but damaged shards only make their own pairs unreadable:
    /// [`StoreReader::get_batch`] on them errors naming the file, and
    /// [`StoreReader::epoch_indices`] leaves them out. Only a bad manifest is an error.
    pub fn open_skipping_damaged(dir: impl AsRef<Path>) -> Result<Self, DataError> {
        let dir = dir.as_ref().to_path_buf();
        let manifest = Manifest::read(&dir)?;
        let layouts = manifest.spec.tensor_layouts();
        let shards = manifest
            .shards
            .iter()
            .map(|record| ShardFile::open(&dir, record, &layouts, &manifest.spec.partition))
            .collect();
        Ok(Self {
            dir,
            manifest,
            layouts,
            shards,
        })
    }

    /// Why each unreadable shard cannot be read (errors name the file).
    pub fn damaged_shards(&self) -> Vec<&DataError> {
        self.shards
            .iter()
            .filter_map(|s| s.as_ref().err())
            .collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn spec(&self) -> &StoreSpec {
        &self.manifest.spec
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub(crate) fn layouts(&self) -> &[TensorLayout] {
        &self.layouts
    }

    /// Pairs in the store, readable or not.
    pub fn len(&self) -> usize {
        self.manifest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pairs at `positions`, in that order, on `device`; floats as f32.
    pub fn get_batch(&self, positions: &[u64], device: &Device) -> Result<PairBatch, DataError> {
        self.read_raw(positions)?.into_batch(&self.layouts, device)
    }

    /// The pairs at `positions` in storage form. Consecutive positions in one shard are read
    /// together.
    pub(crate) fn read_raw(&self, positions: &[u64]) -> Result<RawPairs, DataError> {
        let shard_size = self.manifest.spec.shard_size as u64;
        let len = self.len();
        let mut locations = Vec::with_capacity(positions.len());
        for (i, &position) in positions.iter().enumerate() {
            if position >= len as u64 {
                return Err(DataError::invalid(
                    format!("indices[{i}]"),
                    format!("position {position} out of range: the store holds {len} pairs"),
                ));
            }
            locations.push((
                (position / shard_size) as usize,
                (position % shard_size) as usize,
            ));
        }

        let mut pairs = RawPairs::empty(&self.layouts);
        for run in locations.chunk_by(|a, b| a.0 == b.0) {
            let shard = self.shards[run[0].0].as_ref().map_err(DataError::clone)?;
            let rows: Vec<usize> = run.iter().map(|&(_, row)| row).collect();
            shard.read_rows(&shard.open_data()?, &rows, &self.layouts, &mut pairs)?;
        }
        Ok(pairs)
    }

    /// This rank's positions for one epoch: every readable position, shuffled by
    /// `(seed, epoch)`, dealt round-robin to `world_size` ranks. The ranks' lists are disjoint,
    /// cover every readable pair and differ in length by at most one (a data-parallel trainer
    /// that needs equal step counts stops at the shortest).
    pub fn epoch_indices(
        &self,
        seed: u64,
        epoch: u64,
        rank: usize,
        world_size: usize,
    ) -> Result<Vec<u64>, DataError> {
        if world_size == 0 || rank >= world_size {
            return Err(DataError::invalid(
                "rank",
                format!("need 0 <= rank < world_size, got rank {rank} of {world_size}"),
            ));
        }
        let shard_size = self.manifest.spec.shard_size as u64;
        let mut positions: Vec<u64> = self
            .manifest
            .shards
            .iter()
            .zip(&self.shards)
            .enumerate()
            .filter(|(_, (_, shard))| shard.is_ok())
            .flat_map(|(i, (record, _))| {
                let start = i as u64 * shard_size;
                start..start + record.count as u64
            })
            .collect();
        positions.shuffle(&mut keyed_rng(b"adm-epoch-order\0", seed, epoch));
        Ok(positions
            .into_iter()
            .skip(rank)
            .step_by(world_size)
            .collect())
    }
}

/// Loads batches on a background thread while the caller trains on earlier ones.
/// Yields one `Result` per requested batch, in order; at most `depth` loaded batches wait.
pub struct Prefetcher {
    receiver: Option<Receiver<Result<PairBatch, DataError>>>,
    worker: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// `batches` are lists of positions, as for [`StoreReader::get_batch`].
    pub fn new(
        reader: Arc<StoreReader>,
        batches: Vec<Vec<u64>>,
        device: Device,
        depth: usize,
    ) -> Result<Self, DataError> {
        let (sender, receiver) = mpsc::sync_channel(depth);
        let worker = std::thread::Builder::new()
            .name("adm-data-prefetch".into())
            .spawn(move || {
                for positions in batches {
                    // A closed channel means the consumer is gone: stop loading.
                    if sender.send(reader.get_batch(&positions, &device)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| DataError::Worker(format!("cannot start the prefetch thread: {e}")))?;
        Ok(Self {
            receiver: Some(receiver),
            worker: Some(worker),
        })
    }
}

impl Iterator for Prefetcher {
    type Item = Result<PairBatch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Ok(batch) = self.receiver.as_ref()?.recv() {
            return Some(batch);
        }
        // The worker is done; report it if it died instead of finishing.
        self.receiver = None;
        match self.worker.take()?.join() {
            Ok(()) => None,
            Err(_) => Some(Err(DataError::Worker(
                "the prefetch thread panicked".into(),
            ))),
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the channel first makes a worker blocked on `send` return.
        self.receiver = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
