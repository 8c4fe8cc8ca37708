//! The ODE-pair store: (noise `x_T`, teacher sample `x_0`, condition) pairs collected offline
//! for ADP, in checksummed safetensors shards listed by a versioned JSON manifest.
//! The on-disk format is specified in `docs/ode-pair-store.md`.
//!
//! Crash safety: every file is written to a temporary name, fsynced and renamed, and the
//! manifest is only updated after its shard is durable, so a store killed at any point
//! reopens to its last committed shard. Pair `i` depends only on `(seed, i)` (see
//! [`noise_for_index`]), so a resumed or rank-split collection yields exactly the pairs of one
//! uninterrupted run. One writer per directory at a time.

mod checksum;
mod manifest;
mod merge;
mod reader;
mod shard;
mod spec;
mod verify;
mod writer;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

pub use checksum::{xxh64, Xxh64};
pub use manifest::{Manifest, ShardRecord, FORMAT, MANIFEST_FILE, SCHEMA_VERSION};
pub use merge::merge;
pub use reader::{Prefetcher, StoreReader, StoredBatch};
pub use spec::{ConditionSpec, Partition, StoreDtype, StoreSpec};
pub use verify::{verify, BadShard, VerifyReport};
pub use writer::StoreWriter;

/// A batch of pairs. Written with tensors in any float dtype on any device; read back with
/// float tensors as f32 (integer conditions keep their type).
#[derive(Debug, Clone)]
pub struct PairBatch {
    /// `(B, ..noise_shape)`.
    pub noise: Tensor,
    /// `(B, ..sample_shape)`.
    pub sample: Tensor,
    /// `(name, (B, ..shape))` for every condition of the spec; read back in name order.
    pub conditions: Vec<(String, Tensor)>,
    /// Prompt text (or id) per pair.
    pub prompts: Vec<String>,
    /// Global pair index per pair.
    pub indices: Vec<u64>,
}

impl PairBatch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    pub fn condition(&self, name: &str) -> Option<&Tensor> {
        self.conditions
            .iter()
            .find_map(|(n, t)| (n == name).then_some(t))
    }

    /// `noise`, `sample` or a condition, by its tensor name in the shard files.
    pub(crate) fn tensor(&self, name: &str) -> Option<&Tensor> {
        match name {
            spec::NOISE => Some(&self.noise),
            spec::SAMPLE => Some(&self.sample),
            _ => self.condition(name),
        }
    }
}

/// A generator keyed by two numbers and a domain tag, with no collisions between keys
/// (they fill the 256-bit seed side by side instead of being hashed together).
pub(crate) fn keyed_rng(domain: &[u8; 16], a: u64, b: u64) -> StdRng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&a.to_le_bytes());
    key[8..16].copy_from_slice(&b.to_le_bytes());
    key[16..].copy_from_slice(domain);
    StdRng::from_seed(key)
}

/// Standard normal noise for pair `index` of a collection seeded with `seed`: a function of
/// `(seed, index)` only, so ranks and resumed runs reproduce an uninterrupted run exactly.
/// (The stream is StdRng = ChaCha12 of the `rand` version pinned in Cargo.lock.)
pub fn noise_for_index(seed: u64, index: u64, shape: &[usize]) -> Vec<f32> {
    let mut rng = keyed_rng(b"adm-ode-pair-x_T", seed, index);
    let len = shape.iter().product();
    (0..len).map(|_| rng.sample(StandardNormal)).collect()
}

#[cfg(test)]
mod tests;
