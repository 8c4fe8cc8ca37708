//! The versioned JSON manifest, and the crash-safe way every store file is written.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::spec::StoreSpec;
use crate::DataError;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT: &str = "adm-ode-pair-store";
pub const SCHEMA_VERSION: u32 = 1;
pub const CHECKSUM_ALGORITHM: &str = "xxh64";
/// Suffix of files being written; any left over belong to a killed run and are removed.
pub(crate) const TMP_SUFFIX: &str = ".tmp";

/// The store's table of contents: the spec and every committed shard, in index order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`]; tells a store manifest from any other JSON file.
    pub format: String,
    pub schema_version: u32,
    pub checksum_algorithm: String,
    pub spec: StoreSpec,
    pub shards: Vec<ShardRecord>,
}

/// One committed shard file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardRecord {
    pub file: String,
    /// Global index of the shard's first pair.
    pub first_index: u64,
    /// Pairs in the shard.
    pub count: usize,
    /// File size in bytes.
    pub bytes: u64,
    /// XXH64 (seed 0) of the whole file, as 16 lowercase hex digits.
    #[serde(with = "hex_u64")]
    pub checksum: u64,
}

mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{value:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.len() != 16 {
            return Err(serde::de::Error::custom(format!(
                "checksum `{text}` is not 16 hex digits"
            )));
        }
        u64::from_str_radix(&text, 16).map_err(serde::de::Error::custom)
    }
}

/// Shards are named by their first global index and pair count, so a resumed run rewrites
/// exactly the same file names, and a partial shard that is later completed gets a new name
/// instead of being overwritten in place.
pub(crate) fn shard_file_name(first_index: u64, count: usize) -> String {
    format!("shard-{first_index:010}-{count:06}.safetensors")
}

pub(crate) fn is_shard_file_name(name: &str) -> bool {
    name.starts_with("shard-") && name.ends_with(".safetensors")
}

impl Manifest {
    pub fn new(spec: StoreSpec) -> Self {
        Self {
            format: FORMAT.to_string(),
            schema_version: SCHEMA_VERSION,
            checksum_algorithm: CHECKSUM_ALGORITHM.to_string(),
            spec,
            shards: Vec::new(),
        }
    }

    /// Committed pairs.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.count).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_FILE)
    }

    /// Reads and validates `dir/manifest.json`; errors name that file.
    pub fn read(dir: &Path) -> Result<Self, DataError> {
        let path = Self::path(dir);
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                DataError::file(&path, "missing: this directory is not an ODE-pair store")
            }
            _ => DataError::file(&path, e),
        })?;
        Self::parse(&bytes).map_err(|reason| DataError::file(&path, reason))
    }

    /// Parses manifest bytes; the error is a reason without the file name.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, String> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
        let format = value.get("format").and_then(Value::as_str);
        if format != Some(FORMAT) {
            return Err(format!(
                "not an ODE-pair store manifest (expected \"format\": \"{FORMAT}\")"
            ));
        }
        let version = value.get("schema_version").and_then(Value::as_u64);
        if version != Some(u64::from(SCHEMA_VERSION)) {
            return Err(format!(
                "schema version {}, this build reads version {SCHEMA_VERSION}",
                version.map_or_else(|| "missing".to_string(), |v| v.to_string())
            ));
        }
        let manifest: Self =
            serde_json::from_value(value).map_err(|e| format!("malformed manifest: {e}"))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// The shard list must tile the store's index range exactly, in order, with full shards
    /// everywhere but the last one; that makes position -> shard a division.
    fn validate(&self) -> Result<(), String> {
        if self.checksum_algorithm != CHECKSUM_ALGORITHM {
            return Err(format!(
                "checksum_algorithm `{}` unsupported (expected `{CHECKSUM_ALGORITHM}`)",
                self.checksum_algorithm
            ));
        }
        self.spec.validate().map_err(|e| e.to_string())?;
        let shard_size = self.spec.shard_size;
        // Every global index the shards can hold must fit in a u64 (and every position in a
        // usize), so no index arithmetic below or in the reader can overflow.
        let partition = self.spec.partition;
        let capacity = (self.shards.len() as u64)
            .checked_mul(shard_size as u64)
            .filter(|&pairs| usize::try_from(pairs).is_ok());
        if capacity
            .and_then(|pairs| pairs.checked_mul(partition.world_size))
            .and_then(|span| span.checked_add(partition.rank))
            .is_none()
        {
            return Err(format!(
                "shards: {} shards of {shard_size} pairs (world_size {}) overflow the index range",
                self.shards.len(),
                partition.world_size
            ));
        }
        for (i, shard) in self.shards.iter().enumerate() {
            let is_last = i + 1 == self.shards.len();
            let expected_first = partition.global_index(i as u64 * shard_size as u64);
            let problem = if shard.first_index != expected_first {
                Some(format!("first_index should be {expected_first}"))
            } else if shard.count == 0 || shard.count > shard_size {
                Some(format!("count must be in 1..={shard_size}"))
            } else if !is_last && shard.count != shard_size {
                Some(format!(
                    "only the last shard may hold fewer than {shard_size} pairs"
                ))
            } else if shard.file != shard_file_name(shard.first_index, shard.count) {
                Some(format!(
                    "file should be named {}",
                    shard_file_name(shard.first_index, shard.count)
                ))
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(format!("shards[{i}] ({}): {problem}", shard.file));
            }
        }
        Ok(())
    }

    /// Replaces `dir/manifest.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<(), DataError> {
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| DataError::file(&Self::path(dir), e))?;
        write_atomically(dir, MANIFEST_FILE, &json)
    }
}

/// Writes `dir/name` so that after a crash it holds either its old content or all of `bytes`:
/// write a temporary file, fsync it, rename it over the target, fsync the directory.
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), DataError> {
    write_atomically_parts(dir, name, &[bytes])
}

/// [`write_atomically`] for a file given as consecutive pieces.
pub(crate) fn write_atomically_parts(
    dir: &Path,
    name: &str,
    parts: &[&[u8]],
) -> Result<(), DataError> {
    let target = dir.join(name);
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let write_tmp = || -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        for part in parts {
            file.write_all(part)?;
        }
        file.sync_all()
    };
    write_tmp().map_err(|e| DataError::file(&tmp, e))?;
    fs::rename(&tmp, &target).map_err(|e| DataError::file(&target, e))?;
    sync_dir(dir)
}

/// Makes renames and removals in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), DataError> {
    // Only Unix can open and fsync a directory; elsewhere the rename is as durable as the OS makes it.
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| DataError::file(dir, e))?;
    }
    Ok(())
}
