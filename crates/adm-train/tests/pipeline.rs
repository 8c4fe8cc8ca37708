//! The whole toy pipeline on a tiny config: every method runs, the outputs are written,
//! a seed gives the same numbers twice, and a re-run in the same folder resumes from the
//! cached stages with identical results.

use std::path::{Path, PathBuf};

use adm_train::{run_toy, ToyRunConfig};

fn tiny_config(run_dir: &Path) -> ToyRunConfig {
    let overrides: Vec<String> = [
        "model.hidden_size=16",
        "model.num_blocks=2",
        "model.time_embed_dim=8",
        "adp.taps=[\"blocks.0\", \"blocks.1\"]",
        "adm.taps=[\"blocks.1\"]",
        "adp.head_hidden=8",
        "adp.pixel_width=8",
        "adm.head_hidden=8",
        "teacher.steps=150",
        "data.std=0.4",
        "teacher.batch_size=64",
        "teacher.sampling_steps=4",
        "ode_pairs.count=96",
        "ode_pairs.batch_size=32",
        "ode_pairs.shard_size=40",
        "student.batch_size=32",
        "mse.steps=6",
        "adp.steps=6",
        "dmd.steps=6",
        "dmd.fake_updates=2",
        "adm.steps=6",
        "eval.samples=128",
        "eval.probe_every=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(std::iter::once(format!("run_dir={}", run_dir.display())))
    .collect();
    ToyRunConfig::load(None, &overrides).unwrap()
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("adm-pipeline-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn metrics_of(report: &adm_train::ToyReport) -> serde_json::Value {
    let mut value = serde_json::to_value(report).unwrap();
    // Wall-clock seconds are the one thing allowed to differ.
    for row in value["methods"].as_array_mut().unwrap() {
        row["seconds"] = serde_json::Value::Null;
    }
    value["teacher"]["seconds"] = serde_json::Value::Null;
    value["config"]["run_dir"] = serde_json::Value::Null;
    value["table"] = serde_json::Value::Null;
    value
}

#[test]
fn every_method_runs_deterministically_and_resumes() {
    let first_dir = fresh_dir("first");
    let first = run_toy(tiny_config(&first_dir)).unwrap();

    let names: Vec<&str> = first.methods.iter().map(|m| m.method.as_str()).collect();
    assert_eq!(
        names,
        [
            "mse",
            "adp",
            "dmd",
            "adp+dmd",
            "adm",
            "dmdx",
            "adm-multistep"
        ]
    );
    for name in &names {
        assert!(
            first.table.contains(name),
            "table lacks {name}:\n{}",
            first.table
        );
    }
    for method in &first.methods {
        assert!(method.metrics.energy_distance.is_finite());
    }
    // The DMD loss is recorded during ADM, DMD and DMDX, never for the pre-training rows.
    let by_name = |n: &str| first.methods.iter().find(|m| m.method == n).unwrap();
    assert!(by_name("adm").dmd_trace.len() == 3 && by_name("dmdx").dmd_loss_end.is_some());
    assert!(by_name("mse").dmd_trace.is_empty());
    for file in [
        "metrics.json",
        "samples.png",
        "teacher.safetensors",
        "logs/adm.jsonl",
        "students/dmdx.safetensors",
    ] {
        assert!(first_dir.join(file).is_file(), "{file} was not written");
    }
    let png = image::open(first_dir.join("samples.png")).unwrap();
    assert!(png.width() > 256 && png.height() > 256);

    let second_dir = fresh_dir("second");
    let second = run_toy(tiny_config(&second_dir)).unwrap();
    assert_eq!(
        metrics_of(&first),
        metrics_of(&second),
        "same seed, different results"
    );

    // Same folder again: every stage is reused, results identical.
    let resumed = run_toy(tiny_config(&first_dir)).unwrap();
    assert_eq!(metrics_of(&first), metrics_of(&resumed));

    let mut other_seed = tiny_config(&fresh_dir("seed"));
    other_seed.seed = 1;
    let other = run_toy(other_seed).unwrap();
    assert_ne!(metrics_of(&first)["methods"], metrics_of(&other)["methods"]);

    for dir in [first_dir, second_dir] {
        let _ = std::fs::remove_dir_all(dir);
    }
}
