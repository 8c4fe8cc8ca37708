//! Arbitrary bytes as the one shard file of a store whose manifest is valid: the shard
//! header parser (safetensors header, tensor names, dtypes, shapes, `adm.pairs` metadata)
//! and the row reads behind it must return errors, never panic.
//!
//! Input: byte 0 picks the pair count the manifest records (1..=32), the rest is the shard
//! file. The spec is that of the toy collector (`noise`, `sample`: f32 (2); `class_labels`:
//! u32 scalar), so shards of `adm-collect-ode-pairs collect` (with that byte prepended) are
//! valid inputs. Seeds: `fuzz/seeds/shard`.
#![no_main]

use adm_data::store::{xxh64, Manifest, ShardRecord, StoreSpec};
use libfuzzer_sys::fuzz_target;

mod common;

const SHARD_SIZE: usize = 32;

fn spec() -> StoreSpec {
    serde_json::from_value(serde_json::json!({
        "teacher": "fuzz",
        "schedule": "vp",
        "solver": "ddim",
        "steps": 4,
        "cfg_scale": 2.0,
        "seed": 1,
        "dtype": "f32",
        "noise_shape": [2],
        "sample_shape": [2],
        "conditions": {"class_labels": {"shape": [], "dtype": "u32"}},
        "shard_size": SHARD_SIZE,
        "partition": {"rank": 0, "world_size": 1},
    }))
    .expect("the fuzz spec is valid")
}

fuzz_target!(|data: &[u8]| {
    let Some((&count, shard)) = data.split_first() else {
        return;
    };
    let count = usize::from(count) % SHARD_SIZE + 1;
    let file = format!("shard-0000000000-{count:06}.safetensors");
    let mut manifest = Manifest::new(spec());
    manifest.shards.push(ShardRecord {
        file: file.clone(),
        first_index: 0,
        count,
        bytes: shard.len() as u64,
        checksum: xxh64(shard),
    });
    let dir = common::scratch_dir();
    common::clear(dir);
    std::fs::write(dir.join(&file), shard).expect("scratch directory writable");
    manifest.write(dir).expect("scratch directory writable");
    common::exercise(dir);
});
