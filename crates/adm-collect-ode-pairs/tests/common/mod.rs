//! Store comparison shared by the collector's tests.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// Every file of a directory (not recursing) by name, with its bytes.
pub fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| entry.file_type().unwrap().is_file())
        .map(|entry| {
            let name = entry.file_name().into_string().unwrap();
            (name, fs::read(entry.path()).unwrap())
        })
        .collect()
}

/// Same file names with the same bytes (the manifest holds no timestamps, so it is compared
/// whole too). Returns the number of files.
pub fn assert_same_files(expected: &Path, actual: &Path) -> usize {
    let (expected_files, actual_files) = (files(expected), files(actual));
    assert_eq!(
        expected_files.keys().collect::<Vec<_>>(),
        actual_files.keys().collect::<Vec<_>>(),
        "file lists of {} and {} differ",
        expected.display(),
        actual.display()
    );
    for (name, bytes) in &expected_files {
        assert!(
            bytes == &actual_files[name],
            "{name} differs between {} and {}",
            expected.display(),
            actual.display()
        );
    }
    expected_files.len()
}
