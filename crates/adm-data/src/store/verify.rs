//! Full integrity check of a store.

use std::fs;
use std::path::Path;

use super::checksum::xxh64_file;
use super::manifest::Manifest;
use crate::DataError;

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub shards_checked: usize,
    /// Pairs listed by the manifest.
    pub pairs: usize,
    pub bad_shards: Vec<BadShard>,
}

/// A shard whose file does not match its manifest record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadShard {
    /// File name inside the store directory.
    pub file: String,
    pub problem: String,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.bad_shards.is_empty()
    }
}

/// Recomputes the checksum of every shard and compares size and checksum with the manifest.
/// Checks all shards and reports every bad one; only an unreadable manifest is an error.
pub fn verify(dir: impl AsRef<Path>) -> Result<VerifyReport, DataError> {
    let dir = dir.as_ref();
    let manifest = Manifest::read(dir)?;
    let bad_shards = manifest
        .shards
        .iter()
        .filter_map(|record| {
            let path = dir.join(&record.file);
            let problem = match fs::metadata(&path) {
                Err(e) => format!("cannot stat: {e}"),
                Ok(meta) if meta.len() != record.bytes => format!(
                    "{} bytes, the manifest records {}",
                    meta.len(),
                    record.bytes
                ),
                Ok(_) => match xxh64_file(&path) {
                    Err(e) => format!("cannot read: {e}"),
                    Ok(sum) if sum != record.checksum => format!(
                        "checksum {sum:016x}, the manifest records {:016x}",
                        record.checksum
                    ),
                    Ok(_) => return None,
                },
            };
            Some(BadShard {
                file: record.file.clone(),
                problem,
            })
        })
        .collect();
    Ok(VerifyReport {
        shards_checked: manifest.shards.len(),
        pairs: manifest.len(),
        bad_shards,
    })
}
