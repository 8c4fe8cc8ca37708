//! The digits job end to end on tiny settings: every stage writes its output, the metrics
//! are finite, a re-run in the same folder reuses every stage with identical numbers, and a
//! changed setting retrains only the stage that depends on it.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use adm_train::digits::{run_digits, DigitsReport, DigitsRunConfig};

fn config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/toy-digits.toml")
}

fn tiny_config(run_dir: &Path, extra: &[&str]) -> DigitsRunConfig {
    let overrides: Vec<String> = [
        "model.block_out_channels=[8, 8]",
        "model.norm_num_groups=4",
        "model.attention_heads=2",
        "adm.heads={ dims = \"2d\", layers = 1, channels = 8, groups = 4 }",
        "teacher.steps=4",
        "teacher.batch_size=8",
        "teacher.sampling_steps=2",
        "ode_pairs.count=10",
        "ode_pairs.batch_size=5",
        "ode_pairs.shard_size=6",
        "student.batch_size=4",
        "student.checkpoint_every=1",
        "dmd.steps=2",
        "adm.steps=2",
        "classifier.steps=30",
        "eval.samples_per_class=3",
        "probe.every=1",
        "probe.size=4",
        "mse.steps=2",
        "adp.steps=2",
        "adp.heads={ dims = \"2d\", layers = 1, channels = 8, groups = 4 }",
        "adp.sam_hidden=4",
        "eval.grid_rows=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(extra.iter().map(|s| s.to_string()))
    .chain(std::iter::once(format!("run_dir={}", run_dir.display())))
    .collect();
    DigitsRunConfig::load(&config_path(), &overrides).unwrap()
}

/// The report without wall-clock seconds and the table (which shows them).
fn numbers(report: &DigitsReport) -> serde_json::Value {
    let mut value = serde_json::to_value(report).unwrap();
    for row in value["rows"].as_array_mut().unwrap() {
        row["seconds"] = serde_json::Value::Null;
    }
    value["table"] = serde_json::Value::Null;
    value["config"] = serde_json::Value::Null;
    value
}

fn modified(path: PathBuf) -> SystemTime {
    std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .modified()
        .unwrap()
}

#[test]
fn the_digits_job_runs_caches_and_retrains_what_changed() {
    let dir = std::env::temp_dir().join(format!("adm-digits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let first = run_digits(tiny_config(&dir, &[])).unwrap();

    let names: Vec<&str> = first.rows.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(names.len(), 7, "{names:?}");
    assert!(names[0].starts_with("real digits") && names[1].starts_with("teacher"));
    assert_eq!(&names[2..], ["mse", "adp", "dmd", "adm", "dmdx"]);
    for row in &first.rows {
        let m = &row.metrics;
        assert!(
            m.classes_covered <= 10 && m.num_classes == 10,
            "{}",
            row.method
        );
        for v in [m.class_kl, m.confidence, m.accuracy, m.frechet, m.diversity] {
            assert!(v.is_finite() && v >= 0.0, "{}: {m:?}", row.method);
        }
    }
    // The real digits are classified by a classifier trained on other real digits.
    assert!(first.rows[0].metrics.accuracy > 0.5, "{:?}", first.rows[0]);
    assert!(first.classifier_test_accuracy > 0.5);
    // Every generator step of DMD and ADM (and DMDX's ADM stage) probed the DMD loss;
    // the pair-trained stages have no fake score to probe with.
    for row in &first.rows[2..] {
        let probes = if row.method.starts_with("mse") || row.method == "adp" {
            0
        } else {
            2
        };
        assert_eq!(row.dmd_trace.len(), probes, "{}", row.method);
    }
    for file in [
        "teacher.safetensors",
        "classifier.safetensors",
        "ode-pairs/manifest.json",
        "methods/dmd/metrics.jsonl",
        "methods/adm/metrics.jsonl",
        "methods/adp/metrics.jsonl",
        "methods/dmdx/metrics.jsonl",
        "methods/mse/metrics.jsonl",
        "metrics.json",
        "samples.png",
        "logs/teacher.jsonl",
    ] {
        assert!(dir.join(file).exists(), "{file} missing");
    }
    let pairs = adm_data::store::StoreReader::open(dir.join("ode-pairs")).unwrap();
    assert_eq!(pairs.len(), 10);
    let png = image::open(dir.join("samples.png")).unwrap();
    assert!(png.width() > png.height(), "10 class columns, 3 rows");

    // Same settings, same folder: every stage is reused and the numbers repeat.
    let stamps = |d: &Path| {
        [
            "teacher.safetensors",
            "classifier.safetensors",
            "ode-pairs/manifest.json",
            "methods/dmd/metrics.jsonl",
            "methods/adp/metrics.jsonl",
            "methods/adm/metrics.jsonl",
            "methods/dmdx/metrics.jsonl",
        ]
        .map(|f| modified(d.join(f)))
    };
    let before = stamps(&dir);
    let again = run_digits(tiny_config(&dir, &[])).unwrap();
    assert_eq!(numbers(&first), numbers(&again));
    assert_eq!(before, stamps(&dir));

    // A changed ADM setting retrains ADM and DMDX's ADM stage only.
    let changed = run_digits(tiny_config(&dir, &["adm.steps=3"])).unwrap();
    let after = stamps(&dir);
    assert_eq!(before[..5], after[..5]);
    assert_ne!(before[5], after[5]);
    assert_ne!(before[6], after[6]);
    for row in 2..5 {
        assert_eq!(changed.rows[row].metrics, first.rows[row].metrics);
    }
    assert_eq!(changed.rows[5].dmd_trace.len(), 3);
    assert_eq!(changed.rows[6].dmd_trace.len(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_digits_config_keys_are_named() {
    let dir = std::env::temp_dir().join("adm-digits-bad-config");
    let load = |set: &str| {
        DigitsRunConfig::load(
            &config_path(),
            &[set.to_string(), format!("run_dir={}", dir.display())],
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    let err = load("adm.stepz=3");
    assert!(err.contains("adm.stepz"), "{err}");
    let err = load("eval.samples_per_class=0");
    assert!(err.contains("eval.samples_per_class"), "{err}");
    let err = load("methods=[\"dmdy\"]");
    assert!(err.contains("methods"), "{err}");
    let err = load("job=\"toy-2d\"");
    assert!(err.contains("job"), "{err}");
}
