//! Appending pairs to a store, one durable shard at a time.

use std::fs;
use std::path::{Path, PathBuf};

use super::checksum::{xxh64_file, Xxh64};
use super::manifest::{
    is_shard_file_name, shard_file_name, sync_dir, write_atomically_parts, Manifest, ShardRecord,
    MANIFEST_FILE, TMP_SUFFIX,
};
use super::shard::{encode_shard, RawPairs, ShardFile};
use super::spec::{StoreSpec, TensorLayout};
use super::PairBatch;
use crate::DataError;

/// Writes a store, creating it or resuming it after a kill.
///
/// Pairs must arrive in index order: the store of partition `(rank, world)` takes the global
/// indices `rank, rank + world, ...`, and [`StoreWriter::next_index`] says which one is due.
/// Pairs buffered when the writer is dropped without [`StoreWriter::finish`] are not stored;
/// reopening resumes after the last committed shard.
#[derive(Debug)]
pub struct StoreWriter {
    dir: PathBuf,
    manifest: Manifest,
    layouts: Vec<TensorLayout>,
    buffer: RawPairs,
    /// A partial last shard whose pairs were moved into `buffer` to be rewritten as a bigger
    /// shard; its file goes once the manifest no longer lists it.
    superseded: Option<ShardRecord>,
}

fn file_names(dir: &Path) -> Result<Vec<String>, DataError> {
    let entries = fs::read_dir(dir).map_err(|e| DataError::file(dir, e))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DataError::file(dir, e))?;
        // Names that are not UTF-8 are not ours.
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}

fn remove_files(dir: &Path, names: &[String]) -> Result<(), DataError> {
    if names.is_empty() {
        return Ok(());
    }
    for name in names {
        let path = dir.join(name);
        fs::remove_file(&path).map_err(|e| DataError::file(&path, e))?;
    }
    sync_dir(dir)
}

fn is_leftover_tmp(name: &str) -> bool {
    name.strip_suffix(TMP_SUFFIX)
        .is_some_and(|stem| stem == MANIFEST_FILE || is_shard_file_name(stem))
}

impl StoreWriter {
    /// Creates a store in `dir`, or resumes the one there. A store with a different spec is
    /// an error naming the first differing field; files left by a killed run (temporaries,
    /// shards written after the last manifest update) are removed.
    pub fn open(dir: impl AsRef<Path>, spec: StoreSpec) -> Result<Self, DataError> {
        spec.validate()?;
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| DataError::file(&dir, e))?;
        let names = file_names(&dir)?;
        let leftovers: Vec<String> = names
            .iter()
            .filter(|n| is_leftover_tmp(n))
            .cloned()
            .collect();
        remove_files(&dir, &leftovers)?;

        let manifest = if names.iter().any(|n| n == MANIFEST_FILE) {
            let manifest = Manifest::read(&dir)?;
            manifest.spec.ensure_matches(
                &spec,
                &format!("the store at {}", dir.display()),
                "the requested spec",
            )?;
            manifest
        } else {
            if let Some(shard) = names.iter().find(|n| is_shard_file_name(n)) {
                return Err(DataError::file(
                    &dir.join(shard),
                    "shard file without a manifest.json; refusing to write into this directory",
                ));
            }
            let manifest = Manifest::new(spec);
            manifest.write(&dir)?;
            // Make the new directory's own entry durable too.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
            manifest
        };

        for record in &manifest.shards {
            let path = dir.join(&record.file);
            let size = fs::metadata(&path)
                .map_err(|e| DataError::file(&path, e))?
                .len();
            if size != record.bytes {
                return Err(DataError::file(
                    &path,
                    format!("{size} bytes, the manifest records {}", record.bytes),
                ));
            }
        }
        let orphans: Vec<String> = names
            .into_iter()
            .filter(|n| is_shard_file_name(n) && !manifest.shards.iter().any(|s| &s.file == n))
            .collect();
        remove_files(&dir, &orphans)?;

        let layouts = manifest.spec.tensor_layouts();
        Ok(Self {
            buffer: RawPairs::empty(&layouts),
            dir,
            manifest,
            layouts,
            superseded: None,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn spec(&self) -> &StoreSpec {
        &self.manifest.spec
    }

    /// Pairs durably on disk.
    pub fn committed(&self) -> usize {
        self.manifest.len() + self.superseded.as_ref().map_or(0, |s| s.count)
    }

    fn next_local(&self) -> u64 {
        (self.manifest.len() + self.buffer.len()) as u64
    }

    /// Global index of the next pair [`StoreWriter::append`] expects (right after opening,
    /// with one rank, the number of committed pairs).
    pub fn next_index(&self) -> u64 {
        self.manifest.spec.partition.global_index(self.next_local())
    }

    /// The next `count` global indices this store expects, stopping below `total`.
    pub fn next_indices(&self, count: usize, total: u64) -> Vec<u64> {
        let partition = self.manifest.spec.partition;
        (self.next_local()..)
            .map(|local| partition.global_index(local))
            .take_while(|&index| index < total)
            .take(count)
            .collect()
    }

    /// Buffers a batch, committing a shard whenever `shard_size` pairs are buffered.
    /// `batch.indices` must be the next indices this store expects.
    pub fn append(&mut self, batch: PairBatch) -> Result<(), DataError> {
        let tensors = RawPairs::check_batch(&batch, &self.layouts)?;
        self.check_indices(&batch.indices)?;
        if batch.is_empty() {
            return Ok(());
        }
        self.reopen_partial_shard()?;
        self.buffer.extend_from_checked(&tensors, &batch)?;
        self.commit_full_shards()
    }

    pub(crate) fn append_raw(&mut self, pairs: RawPairs) -> Result<(), DataError> {
        self.check_indices(&pairs.indices)?;
        if pairs.len() == 0 {
            return Ok(());
        }
        self.reopen_partial_shard()?;
        self.buffer.append(pairs);
        self.commit_full_shards()
    }

    /// `indices` must be the next global indices this store expects.
    fn check_indices(&self, indices: &[u64]) -> Result<(), DataError> {
        let partition = self.manifest.spec.partition;
        let first_local = self.next_local();
        for (k, &index) in indices.iter().enumerate() {
            let expected = partition.global_index(first_local + k as u64);
            if index != expected {
                return Err(DataError::invalid(
                    format!("batch.indices[{k}]"),
                    format!("the store needs pair {expected} next, got {index}"),
                ));
            }
        }
        Ok(())
    }

    fn commit_full_shards(&mut self) -> Result<(), DataError> {
        while self.buffer.len() >= self.manifest.spec.shard_size {
            self.commit(self.manifest.spec.shard_size)?;
        }
        Ok(())
    }

    /// Commits the buffered pairs as a last, possibly partial, shard; returns the number of
    /// pairs in the store.
    pub fn finish(mut self) -> Result<usize, DataError> {
        if self.buffer.len() > 0 {
            self.commit(self.buffer.len())?;
        }
        Ok(self.manifest.len())
    }

    /// A store finished with a partial last shard grows by rewriting that shard (under a new
    /// name) with the new pairs, so its layout stays that of an uninterrupted run.
    fn reopen_partial_shard(&mut self) -> Result<(), DataError> {
        let shard_size = self.manifest.spec.shard_size;
        let Some(last) = self.manifest.shards.last().filter(|s| s.count < shard_size) else {
            return Ok(());
        };
        let shard = ShardFile::open(
            &self.dir,
            last,
            &self.layouts,
            &self.manifest.spec.partition,
        )?;
        let checksum = xxh64_file(&shard.path).map_err(|e| DataError::file(&shard.path, e))?;
        if checksum != last.checksum {
            return Err(DataError::file(
                &shard.path,
                "checksum mismatch: the shard is corrupted; restore or delete the store",
            ));
        }
        let rows: Vec<usize> = (0..last.count).collect();
        let mut pairs = RawPairs::empty(&self.layouts);
        shard.read_rows(&shard.open_data()?, &rows, &self.layouts, &mut pairs)?;
        pairs.append(std::mem::replace(
            &mut self.buffer,
            RawPairs::empty(&self.layouts),
        ));
        self.buffer = pairs;
        self.superseded = self.manifest.shards.pop();
        Ok(())
    }

    /// Writes the first `rows` buffered pairs as a shard; on failure they stay buffered.
    fn commit(&mut self, rows: usize) -> Result<(), DataError> {
        let mut shard = self.buffer.split_front(rows, &self.layouts);
        let result = self.write_shard(&shard);
        // Either way the shard's buffers (with their allocation) become the buffer again:
        // holding its pairs on failure, empty and reused for the next shard on success.
        if result.is_ok() {
            shard.clear();
        }
        let rest = std::mem::replace(&mut self.buffer, shard);
        self.buffer.append(rest);
        result
    }

    fn write_shard(&mut self, shard: &RawPairs) -> Result<(), DataError> {
        let first_index = self
            .manifest
            .spec
            .partition
            .global_index(self.manifest.len() as u64);
        let parts = encode_shard(&self.layouts, shard)?;
        let parts: Vec<&[u8]> = parts.iter().map(|part| part.as_ref()).collect();
        let mut hasher = Xxh64::new();
        parts.iter().for_each(|part| hasher.update(part));
        let record = ShardRecord {
            file: shard_file_name(first_index, shard.len()),
            first_index,
            count: shard.len(),
            bytes: parts.iter().map(|part| part.len() as u64).sum(),
            checksum: hasher.finish(),
        };
        write_atomically_parts(&self.dir, &record.file, &parts)?;
        self.manifest.shards.push(record);
        if let Err(e) = self.manifest.write(&self.dir) {
            self.manifest.shards.pop();
            return Err(e);
        }
        if let Some(old) = self.superseded.take() {
            // No manifest lists it any more; if removal fails the next open removes it.
            let _ = fs::remove_file(self.dir.join(old.file));
        }
        Ok(())
    }
}
