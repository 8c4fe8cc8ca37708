//! Random access to a store's pairs, epoch orders and background prefetching.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use candle_core::Device;
use rand::seq::SliceRandom;

use super::keyed_rng;
use super::manifest::Manifest;
use super::shard::{pair_batch, upload, Decoded, RawPairs, ShardFile, Target, STAGING_BYTES};
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
    ///
    /// On the CPU, each shard of the batch is opened once, its rows are read in file order
    /// (consecutive positions in one read per tensor) and floats are converted to f32 in
    /// cache-sized chunks as they arrive; batches of 8 MB and more are read by up to 8
    /// threads. Other devices receive the stored bytes and convert there
    /// (half the transfer for f16/bf16 stores).
    pub fn get_batch(&self, positions: &[u64], device: &Device) -> Result<PairBatch, DataError> {
        if !device.is_cpu() {
            let mut stored = StoredBatch::default();
            self.read_stored(positions, &mut stored)?;
            return stored.to_batch(device);
        }
        let mut outputs: Vec<Decoded> = self.layouts.iter().map(Decoded::for_layout).collect();
        let (indices, prompts) = self.read_into(
            positions,
            &mut outputs,
            self.threads_for(positions),
            PIECE_BYTES,
        )?;
        let tensors = self
            .layouts
            .iter()
            .zip(outputs)
            .map(|(layout, decoded)| decoded.into_tensor(layout, positions.len()))
            .collect::<Result<Vec<_>, _>>()?;
        pair_batch(&self.layouts, tensors, prompts, indices)
    }

    /// Reads the pairs at `positions`, in that order, into `batch` in the stored dtypes,
    /// reusing its buffers: after the first batch of a size, a read allocates nothing and
    /// touches no fresh memory, so a warm read runs at page-cache copy speed. This is the
    /// path that feeds an accelerator ([`StoredBatch::to_batch`] uploads the stored bytes and
    /// converts on the device) or a consumer that works on the stored bytes.
    pub fn read_stored(&self, positions: &[u64], batch: &mut StoredBatch) -> Result<(), DataError> {
        if batch.layouts != self.layouts {
            *batch = StoredBatch {
                layouts: self.layouts.clone(),
                tensors: self
                    .layouts
                    .iter()
                    .map(|_| Decoded::Bytes(Vec::new()))
                    .collect(),
                ..StoredBatch::default()
            };
        }
        let (indices, prompts) = self.read_into(
            positions,
            &mut batch.tensors,
            self.threads_for(positions),
            PIECE_BYTES,
        )?;
        batch.indices = indices;
        batch.prompts = prompts;
        Ok(())
    }

    /// Threads for reading `positions`: several only for batches of 8 MB and more.
    fn threads_for(&self, positions: &[u64]) -> usize {
        let row_bytes: usize = self.layouts.iter().map(TensorLayout::item_bytes).sum();
        if positions.len().saturating_mul(row_bytes) >= PARALLEL_READ_BYTES {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_READ_THREADS))
        } else {
            1
        }
    }

    /// Reads the rows at `positions` into `outputs` (one per layout, resized to the batch,
    /// decoded to f32 or kept as stored bytes as each one says) with `threads` threads,
    /// which share the work in pieces of about `piece_bytes` stored bytes. Returns the
    /// pairs' global indices and prompts.
    pub(crate) fn read_into(
        &self,
        positions: &[u64],
        outputs: &mut [Decoded],
        threads: usize,
        piece_bytes: usize,
    ) -> Result<(Vec<u64>, Vec<String>), DataError> {
        let locations = self.locate(positions)?;
        let rows = locations.len();
        let mut indices = Vec::with_capacity(rows);
        let mut prompts = Vec::with_capacity(rows);
        for &(shard, row) in &locations {
            let shard = self.shards[shard].as_ref().map_err(DataError::clone)?;
            indices.push(shard.indices[row]);
            prompts.push(shard.prompts[row].clone());
        }

        // Batch slots in file order (a stable sort keeps repeated positions in slot order);
        // rows consecutive both in a shard and in the batch go in one read per tensor, cut
        // into pieces for the threads.
        let mut order: Vec<usize> = (0..rows).collect();
        order.sort_by_key(|&slot| locations[slot]);
        let row_bytes: usize = self.layouts.iter().map(TensorLayout::item_bytes).sum();
        let max_rows = (piece_bytes / row_bytes.max(1)).max(1);
        let mut files = Vec::new();
        let mut pieces = Vec::new();
        for group in order.chunk_by(|&a, &b| locations[a].0 == locations[b].0) {
            let shard = self.shards[locations[group[0]].0]
                .as_ref()
                .map_err(DataError::clone)?;
            files.push((shard, shard.open_data()?));
            for run in group.chunk_by(|&a, &b| b == a + 1 && locations[b].1 == locations[a].1 + 1) {
                for part in run.chunks(max_rows) {
                    pieces.push(Piece {
                        file: files.len() - 1,
                        first_row: locations[part[0]].1,
                        rows: part.len(),
                        slot: part[0],
                    });
                }
            }
        }

        // Every piece gets its own rows of every output tensor.
        pieces.sort_by_key(|piece| piece.slot);
        let mut targets: Vec<Vec<Target<'_>>> = pieces
            .iter()
            .map(|_| Vec::with_capacity(self.layouts.len()))
            .collect();
        for (decoded, layout) in outputs.iter_mut().zip(&self.layouts) {
            decoded.resize(layout, rows);
            let split = decoded.split_rows(layout, pieces.iter().map(|piece| piece.rows));
            for (piece_targets, target) in targets.iter_mut().zip(split) {
                piece_targets.push(target);
            }
        }
        let read_piece = |piece: &Piece, targets: &mut [Target<'_>], staging: &mut [u8]| {
            let (shard, file) = &files[piece.file];
            shard.read_run_decoded(file, piece.first_row, &self.layouts, targets, staging)
        };
        let threads = threads.min(pieces.len()).max(1);
        let mut work = pieces.iter().zip(targets);
        if threads == 1 {
            let mut staging = vec![0u8; STAGING_BYTES];
            for (piece, mut targets) in work {
                read_piece(piece, &mut targets, &mut staging)?;
            }
        } else {
            let queue = Mutex::new(&mut work);
            let failure: Mutex<Option<DataError>> = Mutex::new(None);
            let worker = || {
                let mut staging = vec![0u8; STAGING_BYTES];
                loop {
                    let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
                    let Some((piece, mut targets)) = next else {
                        return;
                    };
                    if let Err(e) = read_piece(piece, &mut targets, &mut staging) {
                        let mut failure = failure.lock().unwrap_or_else(PoisonError::into_inner);
                        failure.get_or_insert(e);
                        return;
                    }
                    if failure
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .is_some()
                    {
                        return;
                    }
                }
            };
            std::thread::scope(|scope| {
                for _ in 1..threads {
                    // Fewer threads if the OS refuses one; this thread works too.
                    let _ = std::thread::Builder::new()
                        .name("adm-data-read".into())
                        .spawn_scoped(scope, worker);
                }
                worker();
            });
            if let Some(e) = failure.into_inner().unwrap_or_else(PoisonError::into_inner) {
                return Err(e);
            }
        }

        Ok((indices, prompts))
    }

    /// (shard, row) of every position; an out-of-range position is an error naming it.
    fn locate(&self, positions: &[u64]) -> Result<Vec<(usize, usize)>, DataError> {
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
        Ok(locations)
    }

    /// The pairs at `positions` in storage form. Consecutive positions in one shard are read
    /// together.
    pub(crate) fn read_raw(&self, positions: &[u64]) -> Result<RawPairs, DataError> {
        let locations = self.locate(positions)?;
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

/// A batch in the stored dtypes whose buffers are kept from read to read
/// ([`StoreReader::read_stored`]).
#[derive(Default)]
pub struct StoredBatch {
    layouts: Vec<TensorLayout>,
    /// One [`Decoded::Bytes`] per layout.
    tensors: Vec<Decoded>,
    indices: Vec<u64>,
    prompts: Vec<String>,
}

impl std::fmt::Debug for StoredBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredBatch")
            .field("layouts", &self.layouts)
            .field("indices", &self.indices)
            .finish_non_exhaustive()
    }
}

impl StoredBatch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Global pair index per pair.
    pub fn indices(&self) -> &[u64] {
        &self.indices
    }

    /// Prompt text (or id) per pair.
    pub fn prompts(&self) -> &[String] {
        &self.prompts
    }

    /// The little-endian stored bytes of tensor `name` (`noise`, `sample` or a condition),
    /// `(B, ..shape)` in the store's dtype.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        let at = self.layouts.iter().position(|layout| layout.name == name)?;
        match &self.tensors[at] {
            Decoded::Bytes(bytes) => Some(bytes),
            Decoded::F32(_) => None,
        }
    }

    /// The batch as tensors on `device`: the stored bytes are copied there and floats
    /// converted to f32 on the device.
    pub fn to_batch(&self, device: &Device) -> Result<PairBatch, DataError> {
        let bytes: Vec<&[u8]> = self
            .layouts
            .iter()
            .filter_map(|layout| self.bytes(&layout.name))
            .collect();
        let tensors = upload(&self.layouts, &bytes, self.len(), device)?;
        pair_batch(
            &self.layouts,
            tensors,
            self.prompts.clone(),
            self.indices.clone(),
        )
    }
}

/// Stored bytes from which a CPU batch is read by several threads.
const PARALLEL_READ_BYTES: usize = 8 << 20;
/// Stored bytes per unit of work of a parallel read.
const PIECE_BYTES: usize = 2 << 20;
/// Most threads one [`StoreReader::get_batch`] call uses.
const MAX_READ_THREADS: usize = 8;

/// Rows `first_row..first_row + rows` of shard file `file` (an index into the batch's open
/// files) go to batch slots `slot..slot + rows`.
struct Piece {
    file: usize,
    first_row: usize,
    rows: usize,
    slot: usize,
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
