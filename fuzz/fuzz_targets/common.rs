//! Shared by the fuzz targets: a scratch store directory and the reader calls to exercise.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use adm_data::store::{verify, Manifest, StoreReader};
use candle_core::Device;

/// One scratch directory per fuzzing process, rewritten by every input.
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("adm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("cannot create the scratch directory");
        dir
    })
}

/// Removes every file of the scratch directory, so no input sees the previous one's files.
pub fn clear(dir: &Path) {
    for entry in std::fs::read_dir(dir)
        .expect("scratch directory readable")
        .flatten()
    {
        let _ = std::fs::remove_file(entry.path());
    }
}

/// Everything a trainer or `verify` does with a store; errors are fine, panics are not.
pub fn exercise(dir: &Path) {
    let _ = Manifest::read(dir);
    if let Ok(reader) = StoreReader::open_skipping_damaged(dir) {
        let len = reader.len() as u64;
        let _ = reader.is_empty();
        let _ = reader.damaged_shards();
        let _ = reader.epoch_indices(3, 1, 0, 1);
        if let Ok(order) = reader.epoch_indices(3, 1, 1, 2) {
            let _ = reader.get_batch(&order, &Device::Cpu);
        }
        // Leading positions in order, then a few from the end backwards, then out of range.
        let mut positions: Vec<u64> = (0..len.min(40)).collect();
        positions.extend((0..len.min(8)).map(|k| len - 1 - k));
        let _ = reader.get_batch(&positions, &Device::Cpu);
        let _ = reader.get_batch(&[len], &Device::Cpu);
        let _ = reader.get_batch(&[], &Device::Cpu);
    }
    let _ = StoreReader::open(dir);
    let _ = verify(dir);
}
