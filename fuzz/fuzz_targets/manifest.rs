//! Arbitrary bytes as `manifest.json` of a store directory without shard files: reading,
//! opening (strict and skipping damaged shards), batches and `verify` must return errors,
//! never panic. Seeds: `fuzz/seeds/manifest`.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch_dir();
    common::clear(dir);
    std::fs::write(dir.join("manifest.json"), data).expect("scratch directory writable");
    common::exercise(dir);
});
