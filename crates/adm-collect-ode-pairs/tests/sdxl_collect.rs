//! The collector with an SDXL teacher (`[teacher] kind = "sdxl"`) on the tiny diffusers
//! pipeline of adm-models' fixtures (scripts/fixtures_sdxl_pipeline.py):
//! - the stored pairs 0 and 1 are diffusers' float64 pipeline output for their prompts and
//!   noise (the fixture's noise is `noise_for_index(NOISE_SEED, 0..2)`, checked here bit for
//!   bit), with diffusers' prompt embeddings as conditions;
//! - two ranks merged, and a collection stopped early and resumed, equal one uninterrupted
//!   run byte for byte;
//! - a pipeline folder without `text_encoder_2` and bad config values fail naming them.

mod common;
// Shared with adm-models' tests, which use all of it.
#[allow(dead_code)]
#[path = "../../adm-models/tests/common/sdxl_pipeline.rs"]
mod pipeline;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use adm_data::store::StoreReader;
use candle_core::{DType, Device, Tensor};
use pipeline::{GUIDANCE, PROMPTS, RESOLUTION, STEPS};

const BIN: &str = env!("CARGO_BIN_EXE_adm-collect-ode-pairs");
/// The seed whose pairs 0 and 1 have the fixture's noise.
const NOISE_SEED: u64 = 7;
/// 7 pairs over 3 prompts (pair i has prompt i % 3), in batches of 3 and shards of 2: four
/// shards, the last one partial.
const PAIRS: usize = 7;
/// max |stored f32 - diffusers f64| / max |diffusers f64| of pairs 0 and 1 after 4 steps with
/// guidance 5. Reached 1.4e-6 (f32 rounding amplified by guidance).
const SAMPLE_TOL: f64 = 1e-4;
/// Prompt embeddings against diffusers (measured 2e-7 .. 7e-7 in adm-models).
const EMBED_TOL: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../adm-models/tests/fixtures")
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sdxl_collect-{}", std::process::id()))
        .join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A work folder with the tiny pipeline, a prompt file and a collection config; returns the
/// config path.
fn setup(dir: &Path) -> PathBuf {
    pipeline::assemble(&fixtures(), &dir.join("pipeline"));
    let prompts = [PROMPTS[0], PROMPTS[1], "a third prompt, about a dog"];
    fs::write(dir.join("prompts.txt"), prompts.join("\n") + "\n").unwrap();
    let config = format!(
        r#"[teacher]
kind = "sdxl"
model = "{model}"
dtype = "f32"

[ode_pairs]
out = "{out}"
prompts = "{prompts}"
count = {PAIRS}
solver = "ddim"
steps = {STEPS}
cfg_scale = {GUIDANCE:?}
resolution = {RESOLUTION}
batch_size = 3
shard_size = 2
seed = {NOISE_SEED}
dtype = "f32"
"#,
        model = dir.join("pipeline").display(),
        out = dir.join("ode-pairs").display(),
        prompts = dir.join("prompts.txt").display(),
    );
    let path = dir.join("sdxl.toml");
    fs::write(&path, config).unwrap();
    path
}

fn collect(config: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .arg("collect")
        .arg("--config")
        .arg(config)
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("cannot start the collector")
}

fn succeed(output: Output) -> Output {
    assert!(
        output.status.success(),
        "{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn fail(output: Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "succeeded: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
    let got = got.to_dtype(DType::F64).unwrap();
    let want = want.to_dtype(DType::F64).unwrap();
    let err = (got - &want).unwrap().abs().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap();
    let (err, scale) = (
        err.max_all().unwrap().to_scalar::<f64>().unwrap(),
        scale.to_scalar::<f64>().unwrap(),
    );
    err / scale
}

#[test]
fn stored_pairs_match_diffusers_and_ranks_merge_to_the_single_run() {
    let dir = scratch("collect");
    let config = setup(&dir);
    let single = dir.join("ode-pairs");
    succeed(collect(&config, &[]));

    let reference =
        candle_core::safetensors::load(fixtures().join("sdxl/reference.safetensors"), &Device::Cpu)
            .unwrap();
    let store = StoreReader::open(&single).unwrap();
    assert_eq!(store.len(), PAIRS);
    let spec = store.spec();
    assert_eq!(spec.noise_shape, [4, 8, 8]);
    assert_eq!((spec.solver.as_str(), spec.steps), ("ddim", STEPS));
    assert!(spec.teacher.starts_with("sdxl model="), "{}", spec.teacher);
    assert!(
        spec.teacher.contains("revision=local-folder"),
        "{}",
        spec.teacher
    );
    let batch = store
        .get_batch(&(0..PAIRS as u64).collect::<Vec<_>>(), &Device::Cpu)
        .unwrap();
    let prompts = [PROMPTS[0], PROMPTS[1], "a third prompt, about a dog"];
    let want: Vec<&str> = (0..PAIRS).map(|i| prompts[i % 3]).collect();
    assert_eq!(batch.prompts, want);

    // Pairs 0 and 1 against diffusers.
    let first_two = |t: &Tensor| t.narrow(0, 0, 2).unwrap();
    let noise = first_two(&batch.noise);
    assert!(
        noise.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == reference["noise"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        "the fixture's noise is no longer noise_for_index({NOISE_SEED}, 0..2)"
    );
    let err = relative_error(&first_two(&batch.sample), &reference["latents"]);
    println!("stored samples of pairs 0, 1 vs diffusers: relative error {err:.2e}");
    assert!(err < SAMPLE_TOL, "relative error {err:.2e}");
    for (name, reference_name) in [
        ("encoder_hidden_states", "prompt_embeds"),
        ("text_embeds", "pooled_prompt_embeds"),
    ] {
        let stored = batch.condition(name).unwrap();
        let err = relative_error(&first_two(stored), &reference[reference_name]);
        println!("stored {name} vs diffusers: relative error {err:.2e}");
        assert!(err < EMBED_TOL, "{name}: relative error {err:.2e}");
        // Pair 3 has pair 0's prompt.
        assert_eq!(
            stored
                .get(3)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            stored
                .get(0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
    let time_ids = batch
        .condition("time_ids")
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(time_ids
        .iter()
        .all(|row| row == &[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]));
    // Guidance matters: pairs 0 and 3 share a prompt but not their noise.
    assert!(relative_error(&batch.sample.get(3).unwrap(), &batch.sample.get(0).unwrap()) > 1e-2);

    // Two ranks, merged in any order, equal the single run.
    for rank in ["1", "0"] {
        succeed(collect(&config, &["--rank", rank, "--world-size", "2"]));
    }
    let ranks: Vec<PathBuf> = ["rank-0", "rank-1"]
        .iter()
        .map(|r| single.join(r))
        .collect();
    assert_eq!(StoreReader::open(&ranks[0]).unwrap().len(), 4);
    assert_eq!(StoreReader::open(&ranks[1]).unwrap().len(), 3);
    let merged = dir.join("merged");
    succeed(
        Command::new(BIN)
            .arg("merge")
            .arg("--out")
            .arg(&merged)
            .args(&ranks)
            .output()
            .unwrap(),
    );
    let files = common::assert_same_files(&single, &merged);
    assert_eq!(files, PAIRS.div_ceil(2) + 1, "shards plus manifest.json");

    // Stopped after 3 pairs (one full shard, one partial), then resumed to all 7.
    let resumed = dir.join("resumed");
    let out = resumed.to_str().unwrap();
    succeed(collect(
        &config,
        &["--out", out, "--set", "ode_pairs.count=3"],
    ));
    assert_eq!(StoreReader::open(&resumed).unwrap().len(), 3);
    succeed(collect(&config, &["--out", out]));
    common::assert_same_files(&single, &resumed);

    // The same store with different settings is refused, naming the field.
    let stderr = fail(collect(&config, &["--set", "ode_pairs.cfg_scale=2.0"]));
    assert!(stderr.contains("cfg_scale"), "{stderr}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_pipelines_and_settings_fail_naming_them() {
    let dir = scratch("errors");
    let config = setup(&dir);
    for (set, named) in [
        ("ode_pairs.solver=\"euler\"", "ode_pairs.solver"),
        ("ode_pairs.resolution=[64, 60]", "ode_pairs.resolution"),
        ("ode_pairs.steps=0", "ode_pairs.steps"),
        ("teacher.kind=\"sd9\"", "teacher.kind"),
        ("teacher.model=\"nobody/no-such-model\"", "teacher.model"),
        (
            &format!("ode_pairs.prompts=\"{}\"", dir.join("none.txt").display()),
            "ode_pairs.prompts",
        ),
    ] {
        let stderr = fail(collect(&config, &["--set", set]));
        assert!(stderr.contains(named), "{set}: {stderr}");
    }

    fs::remove_dir_all(dir.join("pipeline/text_encoder_2")).unwrap();
    let stderr = fail(collect(&config, &[]));
    assert!(stderr.contains("text_encoder_2"), "{stderr}");
    assert!(
        !dir.join("ode-pairs").exists(),
        "a failed load wrote a store"
    );
    fs::remove_dir_all(&dir).unwrap();
}
