//! Assembles the tiny SDXL pipeline folder (scripts/fixtures_sdxl_pipeline.py) in a scratch
//! folder: the fixture's model_index.json, scheduler, text encoders and UNet, plus both
//! tokenizer folders made from `clip/tokenizer_small/tokenizer.json` with SDXL's padding
//! (`tokenizer` pads with `<|endoftext|>`, `tokenizer_2` with `!`).
//!
//! Shared by adm-models' and adm-collect-ode-pairs' tests (`#[path]`-included), so it uses
//! only std.

use std::fs;
use std::path::{Path, PathBuf};

/// The fixture's prompts, steps, guidance and resolution (`reference.json`).
pub const PROMPTS: [&str; 2] = [
    "a photo of a cat",
    "An astronaut riding a horse, highly detailed!",
];
pub const STEPS: usize = 4;
pub const GUIDANCE: f64 = 5.0;
pub const RESOLUTION: usize = 64;

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Writes the pipeline folder to `dest` (replacing it) from `fixtures` (adm-models'
/// `tests/fixtures`) and returns `dest`.
pub fn assemble(fixtures: &Path, dest: &Path) -> PathBuf {
    let _ = fs::remove_dir_all(dest);
    copy_dir(&fixtures.join("sdxl/pipeline_tiny"), dest);
    let tokenizer = fixtures.join("clip/tokenizer_small/tokenizer.json");
    for (folder, pad) in [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")] {
        let dir = dest.join(folder);
        fs::create_dir_all(&dir).unwrap();
        fs::copy(&tokenizer, dir.join("tokenizer.json")).unwrap();
        let config = format!("{{\"model_max_length\": 77, \"pad_token\": \"{pad}\"}}");
        fs::write(dir.join("tokenizer_config.json"), config).unwrap();
    }
    dest.to_path_buf()
}

/// Sets model_index.json's `force_zeros_for_empty_prompt` in the pipeline folder `dir`.
pub fn set_force_zeros(dir: &Path, value: bool) {
    let path = dir.join("model_index.json");
    let text = fs::read_to_string(&path).unwrap();
    let (old, new) = if value {
        (
            "\"force_zeros_for_empty_prompt\": false",
            "\"force_zeros_for_empty_prompt\": true",
        )
    } else {
        (
            "\"force_zeros_for_empty_prompt\": true",
            "\"force_zeros_for_empty_prompt\": false",
        )
    };
    assert!(text.contains(old) || text.contains(new), "{text}");
    fs::write(&path, text.replace(old, new)).unwrap();
}
