use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::shard::{pair_batch, upload, Decoded};
use super::spec::{NOISE, SAMPLE};
use super::*;
use crate::DataError;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("adm-data-{name}-{}-{unique}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        Self(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn spec(dtype: StoreDtype, shard_size: usize) -> StoreSpec {
    StoreSpec {
        teacher: "toy-teacher@v1".into(),
        schedule: "rectified-flow shift=3".into(),
        solver: "euler".into(),
        steps: 32,
        cfg_scale: 4.5,
        seed: 1234,
        dtype,
        noise_shape: vec![2, 3],
        sample_shape: vec![2, 3],
        conditions: BTreeMap::from([
            (
                "class_labels".to_string(),
                ConditionSpec {
                    shape: vec![],
                    dtype: StoreDtype::U32,
                },
            ),
            (
                "pooled".to_string(),
                ConditionSpec {
                    shape: vec![4],
                    dtype,
                },
            ),
        ]),
        shard_size,
        partition: Partition::default(),
    }
}

/// What a deterministic teacher would produce for the given global indices.
fn teacher_batch(spec: &StoreSpec, indices: &[u64]) -> PairBatch {
    let rows = indices.len();
    let noise: Vec<f32> = indices
        .iter()
        .flat_map(|&i| noise_for_index(spec.seed, i, &spec.noise_shape))
        .collect();
    let item = noise.len() / rows.max(1);
    let sample: Vec<f32> = noise
        .iter()
        .enumerate()
        .map(|(k, x)| 0.5 * x + indices[k / item] as f32 / 7.0)
        .collect();
    let pooled: Vec<f32> = indices
        .iter()
        .flat_map(|&i| (0..4).map(move |j| i as f32 * 0.1 - j as f32))
        .collect();
    let labels: Vec<u32> = indices.iter().map(|&i| (i % 3) as u32).collect();
    let device = Device::Cpu;
    PairBatch {
        noise: Tensor::from_vec(noise, (rows, 2, 3), &device).unwrap(),
        sample: Tensor::from_vec(sample, (rows, 2, 3), &device).unwrap(),
        conditions: vec![
            (
                "pooled".into(),
                Tensor::from_vec(pooled, (rows, 4), &device).unwrap(),
            ),
            (
                "class_labels".into(),
                Tensor::from_vec(labels, rows, &device).unwrap(),
            ),
        ],
        prompts: indices
            .iter()
            .map(|i| format!("a photo of pair {i}"))
            .collect(),
        indices: indices.to_vec(),
    }
}

/// Appends pairs in batches of `batch_size` until the writer's partition of `0..total` is done.
fn collect_pairs(writer: &mut StoreWriter, total: u64, batch_size: usize) {
    let spec = writer.spec().clone();
    loop {
        let indices = writer.next_indices(batch_size, total);
        if indices.is_empty() {
            return;
        }
        writer.append(teacher_batch(&spec, &indices)).unwrap();
    }
}

fn write_store(dir: &Path, spec: &StoreSpec, total: u64, batch_size: usize) {
    let mut writer = StoreWriter::open(dir, spec.clone()).unwrap();
    collect_pairs(&mut writer, total, batch_size);
    writer.finish().unwrap();
}

fn dir_contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            (
                entry.file_name().into_string().unwrap(),
                fs::read(entry.path()).unwrap(),
            )
        })
        .collect()
}

fn values(tensor: &Tensor) -> Vec<f32> {
    tensor
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The values a store of `dtype` hands back for an f32 tensor.
fn through_dtype(tensor: &Tensor, dtype: StoreDtype) -> Vec<f32> {
    values(&tensor.to_dtype(dtype.candle()).unwrap())
}

fn assert_same_batch(a: &PairBatch, b: &PairBatch) {
    assert_eq!(a.indices, b.indices);
    assert_eq!(a.prompts, b.prompts);
    assert_eq!(values(&a.noise), values(&b.noise));
    assert_eq!(values(&a.sample), values(&b.sample));
    assert_eq!(a.conditions.len(), b.conditions.len());
    for ((name_a, t_a), (name_b, t_b)) in a.conditions.iter().zip(&b.conditions) {
        assert_eq!(name_a, name_b);
        assert_eq!(t_a.dtype(), t_b.dtype());
        assert_eq!(values(t_a), values(t_b));
    }
}

fn shard_path(dir: &Path, shard: usize) -> PathBuf {
    let manifest = Manifest::read(dir).unwrap();
    dir.join(&manifest.shards[shard].file)
}

fn error_text<T: std::fmt::Debug>(result: Result<T, DataError>) -> String {
    result.unwrap_err().to_string()
}

fn invalid_field<T: std::fmt::Debug>(result: Result<T, DataError>) -> String {
    match result {
        Err(DataError::Invalid { field, .. }) => field,
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn round_trip_for_each_dtype() {
    for dtype in [StoreDtype::F32, StoreDtype::F16, StoreDtype::Bf16] {
        let tmp = TempDir::new("round-trip");
        let spec = spec(dtype, 4);
        write_store(&tmp.0, &spec, 10, 3);

        let reader = StoreReader::open(&tmp.0).unwrap();
        assert_eq!(reader.len(), 10);
        assert_eq!(reader.spec(), &spec);
        let counts: Vec<usize> = reader.manifest().shards.iter().map(|s| s.count).collect();
        assert_eq!(counts, [4, 4, 2]);
        assert!(verify(&tmp.0).unwrap().is_ok());

        let positions = [9, 0, 5, 6];
        let batch = reader.get_batch(&positions, &Device::Cpu).unwrap();
        let expected = teacher_batch(&spec, &positions);
        assert_eq!(batch.indices, positions);
        assert_eq!(batch.prompts, expected.prompts);
        assert_eq!(batch.noise.dims(), &[4, 2, 3]);
        assert_eq!(batch.noise.dtype(), DType::F32);
        assert_eq!(values(&batch.noise), through_dtype(&expected.noise, dtype));
        assert_eq!(
            values(&batch.sample),
            through_dtype(&expected.sample, dtype)
        );
        let names: Vec<&str> = batch.conditions.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["class_labels", "pooled"]);
        let labels = batch.condition("class_labels").unwrap();
        assert_eq!(labels.dtype(), DType::U32);
        assert_eq!(labels.to_vec1::<u32>().unwrap(), [0, 0, 2, 0]);
        assert_eq!(
            values(batch.condition("pooled").unwrap()),
            through_dtype(expected.condition("pooled").unwrap(), dtype)
        );
    }
}

#[test]
fn f32_store_round_trips_exactly_and_shrinking_dtypes_save_space() {
    let sizes: Vec<u64> = [StoreDtype::F32, StoreDtype::Bf16]
        .into_iter()
        .map(|dtype| {
            let tmp = TempDir::new("sizes");
            write_store(&tmp.0, &spec(dtype, 8), 8, 8);
            let reader = StoreReader::open(&tmp.0).unwrap();
            let batch = reader.get_batch(&[3], &Device::Cpu).unwrap();
            if dtype == StoreDtype::F32 {
                let expected = teacher_batch(reader.spec(), &[3]);
                assert_eq!(values(&batch.noise), values(&expected.noise));
            }
            reader.manifest().shards[0].bytes
        })
        .collect();
    assert!(sizes[1] < sizes[0], "{sizes:?}");
}

#[test]
fn resume_after_kill_gives_byte_identical_store() {
    let spec = spec(StoreDtype::F16, 4);
    let uninterrupted = TempDir::new("uninterrupted");
    write_store(&uninterrupted.0, &spec, 11, 3);

    let killed = TempDir::new("killed");
    {
        let mut writer = StoreWriter::open(&killed.0, spec.clone()).unwrap();
        collect_pairs(&mut writer, 6, 3);
        assert_eq!(writer.committed(), 4);
        assert_eq!(writer.next_index(), 6);
        // Dropped without finish: the 2 buffered pairs are lost.
    }
    // What a kill mid-commit leaves: temporaries, and a shard renamed before the manifest
    // update.
    fs::write(killed.join("manifest.json.tmp"), b"{\"half\": ").unwrap();
    fs::write(
        killed.join("shard-0000000008-000004.safetensors.tmp"),
        b"junk",
    )
    .unwrap();
    fs::write(killed.join("shard-0000000004-000004.safetensors"), b"junk").unwrap();

    let mut writer = StoreWriter::open(&killed.0, spec.clone()).unwrap();
    assert_eq!(writer.next_index(), 4);
    collect_pairs(&mut writer, 11, 3);
    assert_eq!(writer.finish().unwrap(), 11);
    assert_eq!(dir_contents(&killed.0), dir_contents(&uninterrupted.0));
}

#[test]
fn extending_a_finished_store_rewrites_its_partial_shard() {
    let spec = spec(StoreDtype::Bf16, 4);
    let uninterrupted = TempDir::new("uninterrupted-ext");
    write_store(&uninterrupted.0, &spec, 11, 2);

    let extended = TempDir::new("extended");
    write_store(&extended.0, &spec, 6, 2);
    assert_eq!(Manifest::read(&extended.0).unwrap().shards[1].count, 2);
    let mut writer = StoreWriter::open(&extended.0, spec.clone()).unwrap();
    assert_eq!(writer.next_index(), 6);
    collect_pairs(&mut writer, 11, 2);
    writer.finish().unwrap();
    assert_eq!(dir_contents(&extended.0), dir_contents(&uninterrupted.0));
}

#[test]
fn reopening_with_a_different_spec_names_the_field() {
    let tmp = TempDir::new("mismatch");
    let original = spec(StoreDtype::F16, 4);
    write_store(&tmp.0, &original, 5, 5);

    let mut changed = original.clone();
    changed.cfg_scale = 7.5;
    let err = StoreWriter::open(&tmp.0, changed).unwrap_err();
    assert!(
        matches!(&err, DataError::Invalid { field, reason } if field == "spec.cfg_scale" && reason.contains("4.5") && reason.contains("7.5")),
        "{err}"
    );

    let mut changed = original.clone();
    changed.conditions.get_mut("pooled").unwrap().shape = vec![5];
    assert_eq!(
        invalid_field(StoreWriter::open(&tmp.0, changed)),
        "spec.conditions.pooled.shape"
    );
    let mut changed = original.clone();
    changed.partition = Partition {
        rank: 1,
        world_size: 2,
    };
    assert_eq!(
        invalid_field(StoreWriter::open(&tmp.0, changed)),
        "spec.partition.rank"
    );
    // The store is untouched by the refused opens.
    assert!(verify(&tmp.0).unwrap().is_ok());
    assert_eq!(StoreReader::open(&tmp.0).unwrap().len(), 5);
}

#[test]
fn append_rejects_bad_batches_naming_the_field() {
    let tmp = TempDir::new("bad-batches");
    let spec = spec(StoreDtype::F32, 4);
    let mut writer = StoreWriter::open(&tmp.0, spec.clone()).unwrap();

    assert_eq!(
        invalid_field(writer.append(teacher_batch(&spec, &[1, 2]))),
        "batch.indices[0]"
    );
    let mut batch = teacher_batch(&spec, &[0, 1]);
    batch.noise = Tensor::zeros((2, 3, 2), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(invalid_field(writer.append(batch)), "batch.noise");
    let mut batch = teacher_batch(&spec, &[0, 1]);
    batch.conditions.retain(|(name, _)| name != "class_labels");
    assert_eq!(
        invalid_field(writer.append(batch)),
        "batch.conditions.class_labels"
    );
    let mut batch = teacher_batch(&spec, &[0, 1]);
    batch.conditions.push((
        "extra".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    ));
    assert_eq!(
        invalid_field(writer.append(batch)),
        "batch.conditions.extra"
    );
    let mut batch = teacher_batch(&spec, &[0, 1]);
    batch.prompts.pop();
    assert_eq!(invalid_field(writer.append(batch)), "batch.prompts");

    // Nothing was buffered by the refused batches.
    assert_eq!(writer.next_index(), 0);
    writer.append(teacher_batch(&spec, &[0, 1])).unwrap();
    assert_eq!(writer.next_index(), 2);

    let mut bad_spec = spec.clone();
    bad_spec.shard_size = 0;
    assert_eq!(
        invalid_field(StoreWriter::open(tmp.join("other"), bad_spec)),
        "spec.shard_size"
    );
}

#[test]
fn verify_names_every_corrupted_shard_and_the_rest_stays_readable() {
    let tmp = TempDir::new("corrupt");
    let spec = spec(StoreDtype::F16, 4);
    write_store(&tmp.0, &spec, 12, 4);
    for shard in [0, 2] {
        let path = shard_path(&tmp.0, shard);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&path, bytes).unwrap();
    }
    let report = verify(&tmp.0).unwrap();
    assert_eq!(report.shards_checked, 3);
    assert_eq!(report.pairs, 12);
    let bad: Vec<&str> = report.bad_shards.iter().map(|b| b.file.as_str()).collect();
    assert_eq!(
        bad,
        [
            "shard-0000000000-000004.safetensors",
            "shard-0000000008-000004.safetensors"
        ]
    );
    assert!(report.bad_shards[0].problem.contains("checksum"));

    let reader = StoreReader::open(&tmp.0).unwrap();
    let batch = reader.get_batch(&[4, 7], &Device::Cpu).unwrap();
    assert_same_batch(
        &batch,
        &StoreReader::open(&tmp.0)
            .unwrap()
            .get_batch(&[4, 7], &Device::Cpu)
            .unwrap(),
    );
    assert_eq!(
        values(&batch.noise),
        through_dtype(&teacher_batch(&spec, &[4, 7]).noise, StoreDtype::F16)
    );
}

#[test]
fn truncated_shard_is_named_and_other_shards_stay_readable() {
    let tmp = TempDir::new("truncated");
    let spec = spec(StoreDtype::F32, 4);
    write_store(&tmp.0, &spec, 12, 4);
    let truncated = shard_path(&tmp.0, 1);
    let bytes = fs::read(&truncated).unwrap();
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let name = "shard-0000000004-000004.safetensors";

    let err = error_text(StoreReader::open(&tmp.0));
    assert!(err.contains(name) && err.contains("truncated"), "{err}");

    let reader = StoreReader::open_skipping_damaged(&tmp.0).unwrap();
    assert_eq!(reader.damaged_shards().len(), 1);
    let batch = reader.get_batch(&[0, 11], &Device::Cpu).unwrap();
    assert_eq!(batch.indices, [0, 11]);
    let err = error_text(reader.get_batch(&[0, 5], &Device::Cpu));
    assert!(err.contains(name), "{err}");
    let mut readable = reader.epoch_indices(0, 0, 0, 1).unwrap();
    readable.sort_unstable();
    assert_eq!(readable, [0, 1, 2, 3, 8, 9, 10, 11]);
    assert_eq!(verify(&tmp.0).unwrap().bad_shards[0].file, name);

    fs::remove_file(&truncated).unwrap();
    let err = error_text(StoreReader::open(&tmp.0));
    assert!(err.contains(name) && err.contains("missing"), "{err}");
    assert!(verify(&tmp.0).unwrap().bad_shards[0]
        .problem
        .contains("stat"));
}

#[test]
fn manifest_faults_name_the_manifest() {
    let tmp = TempDir::new("manifest-faults");
    let missing = error_text(StoreReader::open(&tmp.0));
    assert!(
        missing.contains("manifest.json") && missing.contains("missing"),
        "{missing}"
    );

    write_store(&tmp.0, &spec(StoreDtype::F32, 4), 6, 6);
    let manifest_path = tmp.join("manifest.json");
    let original = fs::read_to_string(&manifest_path).unwrap();

    let cases = [
        (
            r#"{"name": "someone else's file"}"#.to_string(),
            "not an ODE-pair store",
        ),
        (
            original.replace("\"schema_version\": 1", "\"schema_version\": 2"),
            "schema version 2",
        ),
        ("\u{0}\u{1}garbage".to_string(), "not valid JSON"),
        (
            original.replace("\"solver\"", "\"solver_name\""),
            "malformed",
        ),
        (
            original.replace("\"count\": 4", "\"count\": 3"),
            "shards[0]",
        ),
    ];
    for (content, expected) in cases {
        fs::write(&manifest_path, &content).unwrap();
        let err = error_text(StoreReader::open(&tmp.0));
        assert!(
            err.contains("manifest.json") && err.contains(expected),
            "{err}"
        );
        assert!(error_text(verify(&tmp.0)).contains(expected));
    }

    // A manifest whose shapes disagree with the shard files: the shard is named.
    let wrong_shape = original.replacen(
        "\"noise_shape\": [\n      2,\n      3\n    ]",
        "\"noise_shape\": [\n      3,\n      2\n    ]",
        1,
    );
    assert_ne!(wrong_shape, original);
    fs::write(&manifest_path, wrong_shape).unwrap();
    let err = error_text(StoreReader::open(&tmp.0));
    assert!(
        err.contains("shard-0000000000-000004.safetensors") && err.contains("noise"),
        "{err}"
    );
}

#[test]
fn writer_refuses_a_directory_with_shards_but_no_manifest() {
    let tmp = TempDir::new("no-manifest");
    write_store(&tmp.0, &spec(StoreDtype::F32, 4), 4, 4);
    fs::remove_file(tmp.join("manifest.json")).unwrap();
    let err = error_text(StoreWriter::open(&tmp.0, spec(StoreDtype::F32, 4)));
    assert!(err.contains("shard-0000000000-000004.safetensors"), "{err}");
    assert!(tmp.join("shard-0000000000-000004.safetensors").exists());
}

#[test]
fn epoch_indices_are_rank_shards_of_a_permutation() {
    let tmp = TempDir::new("epochs");
    write_store(&tmp.0, &spec(StoreDtype::F32, 4), 10, 10);
    let reader = StoreReader::open(&tmp.0).unwrap();

    let whole = reader.epoch_indices(5, 0, 0, 1).unwrap();
    let mut sorted = whole.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    assert_ne!(whole, sorted, "shuffled");
    assert_eq!(whole, reader.epoch_indices(5, 0, 0, 1).unwrap());
    assert_ne!(whole, reader.epoch_indices(5, 1, 0, 1).unwrap());

    let world = 3;
    let shards: Vec<Vec<u64>> = (0..world)
        .map(|rank| reader.epoch_indices(5, 2, rank, world).unwrap())
        .collect();
    let lengths: Vec<usize> = shards.iter().map(Vec::len).collect();
    assert_eq!(lengths, [4, 3, 3]);
    let mut union: Vec<u64> = shards.concat();
    union.sort_unstable();
    assert_eq!(union, (0..10).collect::<Vec<_>>(), "disjoint and covering");

    assert_eq!(invalid_field(reader.epoch_indices(5, 0, 3, 3)), "rank");
    assert_eq!(invalid_field(reader.epoch_indices(5, 0, 0, 0)), "rank");
    assert_eq!(
        invalid_field(reader.get_batch(&[3, 10], &Device::Cpu)),
        "indices[1]"
    );
}

#[test]
fn merged_rank_stores_equal_one_uninterrupted_collection() {
    let base = spec(StoreDtype::F16, 4);
    let single = TempDir::new("single");
    write_store(&single.0, &base, 11, 3);

    let ranks = TempDir::new("ranks");
    let world = 3;
    let inputs: Vec<PathBuf> = (0..world)
        .map(|rank| {
            let dir = ranks.join(&format!("rank-{rank}"));
            let rank_spec = StoreSpec {
                partition: Partition {
                    rank,
                    world_size: world,
                },
                ..base.clone()
            };
            write_store(&dir, &rank_spec, 11, 2);
            dir
        })
        .collect();
    let rank1 = StoreReader::open(&inputs[1]).unwrap();
    assert_eq!(rank1.len(), 4);
    assert_eq!(
        rank1.get_batch(&[0, 3], &Device::Cpu).unwrap().indices,
        [1, 10]
    );

    let merged = ranks.join("merged");
    // Input order does not matter.
    let shuffled = vec![inputs[2].clone(), inputs[0].clone(), inputs[1].clone()];
    assert_eq!(merge(&shuffled, &merged).unwrap(), 11);
    assert_eq!(dir_contents(&merged), dir_contents(&single.0));
    // Rerunning a finished merge changes nothing.
    assert_eq!(merge(&inputs, &merged).unwrap(), 11);
    assert_eq!(dir_contents(&merged), dir_contents(&single.0));

    assert_eq!(
        invalid_field(merge(&inputs[..2], &ranks.join("partial"))),
        "inputs"
    );
    // A rank that stopped early leaves a gap: refused, naming that rank's store.
    let short = ranks.join("rank-2-short");
    write_store(
        &short,
        &StoreSpec {
            partition: Partition {
                rank: 2,
                world_size: 3,
            },
            ..base.clone()
        },
        5,
        2,
    );
    let gap = vec![inputs[0].clone(), inputs[1].clone(), short];
    let err = error_text(merge(&gap, &ranks.join("gap")));
    assert!(
        err.contains("rank-2-short") && err.contains("resume"),
        "{err}"
    );
}

#[test]
fn prefetcher_delivers_what_get_batch_returns() {
    let tmp = TempDir::new("prefetch");
    write_store(&tmp.0, &spec(StoreDtype::Bf16, 4), 13, 5);
    let reader = Arc::new(StoreReader::open(&tmp.0).unwrap());
    let order = reader.epoch_indices(9, 0, 0, 1).unwrap();
    let batches: Vec<Vec<u64>> = order.chunks(3).map(<[u64]>::to_vec).collect();

    let prefetcher = Prefetcher::new(reader.clone(), batches.clone(), Device::Cpu, 2).unwrap();
    let delivered: Vec<PairBatch> = prefetcher.map(Result::unwrap).collect();
    assert_eq!(delivered.len(), batches.len());
    for (batch, positions) in delivered.iter().zip(&batches) {
        assert_same_batch(batch, &reader.get_batch(positions, &Device::Cpu).unwrap());
    }

    // Dropping it early stops the worker instead of hanging.
    let mut early = Prefetcher::new(reader.clone(), batches.clone(), Device::Cpu, 1).unwrap();
    assert!(early.next().unwrap().is_ok());
    drop(early);

    // A bad batch is reported in its place; the following ones still arrive.
    let mixed = vec![vec![0], vec![99], vec![1]];
    let results: Vec<_> = Prefetcher::new(reader, mixed, Device::Cpu, 0)
        .unwrap()
        .collect();
    assert!(results[0].is_ok() && results[1].is_err() && results[2].is_ok());
}

#[test]
fn noise_depends_only_on_seed_and_index() {
    let shape = [4, 8, 8];
    let a = noise_for_index(7, 42, &shape);
    assert_eq!(a.len(), 256);
    assert_eq!(a, noise_for_index(7, 42, &shape));
    assert_ne!(a, noise_for_index(7, 43, &shape));
    assert_ne!(a, noise_for_index(8, 42, &shape));
    // Pinned: a changed stream (e.g. a `rand` upgrade) would break resuming old collections.
    assert_eq!(
        noise_for_index(1234, 5, &[3]),
        [0.5789766, -0.40801758, -0.42786658]
    );
    // Swapping seed and index must not collide.
    assert_ne!(noise_for_index(1, 2, &[8]), noise_for_index(2, 1, &[8]));

    let many = noise_for_index(0, 0, &[20_000]);
    let mean = many.iter().sum::<f32>() / many.len() as f32;
    let var = many.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / many.len() as f32;
    assert!(
        mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
        "{mean} {var}"
    );
}

#[test]
fn manifest_parsing_never_panics_on_damaged_input() {
    let manifest = Manifest {
        shards: vec![ShardRecord {
            file: "shard-0000000000-000004.safetensors".into(),
            first_index: 0,
            count: 4,
            bytes: 1000,
            checksum: 0x0123_4567_89ab_cdef,
        }],
        ..Manifest::new(spec(StoreDtype::F16, 4))
    };
    let valid = serde_json::to_vec_pretty(&manifest).unwrap();
    assert_eq!(Manifest::parse(&valid).unwrap(), manifest);

    let mut rng = StdRng::seed_from_u64(11);
    let mut accepted = 0;
    for _ in 0..3000 {
        let mut bytes = valid.clone();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..bytes.len());
            match rng.random_range(0..3) {
                0 => bytes[at] = rng.random(),
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, b"0123456789-.e\"{}[],:"[rng.random_range(0..20)]),
            }
        }
        accepted += usize::from(Manifest::parse(&bytes).is_ok());
        let noise: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
        assert!(Manifest::parse(&noise).is_err());
    }
    // Most mutations break something; the ones that parse are still valid manifests.
    assert!(accepted < 1500, "{accepted}");
}

/// Found by `fuzz/` (the `manifest` target, with overflow checks): huge shard sizes or world
/// sizes made the index arithmetic overflow.
#[test]
fn manifest_index_range_overflow_is_an_error_not_a_panic() {
    let huge = 1usize << 63;
    let record = |first_index: u64, count: usize| ShardRecord {
        file: format!("shard-{first_index:010}-{count:06}.safetensors"),
        first_index,
        count,
        bytes: 10,
        checksum: 0,
    };
    let manifest = Manifest {
        shards: vec![record(0, huge), record(huge as u64, huge)],
        ..Manifest::new(spec(StoreDtype::F16, huge))
    };
    let text = serde_json::to_vec(&manifest).unwrap();
    let error = Manifest::parse(&text).unwrap_err();
    assert!(error.contains("overflow the index range"), "{error}");

    let mut wide = Manifest {
        shards: vec![record(1, 2), record(1, 2)],
        ..Manifest::new(spec(StoreDtype::F16, 2))
    };
    wide.spec.partition = Partition {
        rank: 1,
        world_size: 1 << 63,
    };
    let error = Manifest::parse(&serde_json::to_vec(&wide).unwrap()).unwrap_err();
    assert!(error.contains("overflow the index range"), "{error}");
}

/// The CPU read path (chunked reads decoded to f32 on the fly, on one thread or several)
/// returns exactly what the stored bytes converted by candle give, for every dtype, for rows
/// larger than one read chunk, shuffled and repeated positions, and runs across shards.
#[test]
fn cpu_reads_decode_like_candle_across_chunks_and_shards() {
    for dtype in [StoreDtype::F32, StoreDtype::F16, StoreDtype::Bf16] {
        let dir = TempDir::new("decode");
        let small = spec(dtype, 4);
        let spec = StoreSpec {
            // 200x170 elements: 136 kB per f32 row, so runs of rows span several reads.
            noise_shape: vec![200, 170],
            sample_shape: vec![200, 170],
            ..small.clone()
        };
        let mut writer = StoreWriter::open(&dir.0, spec.clone()).unwrap();
        let elements = 200 * 170;
        let indices: Vec<u64> = (0..11).collect();
        let base = teacher_batch(&small, &indices);
        let values: Vec<f32> = (0..11 * elements)
            .map(|k| ((k as f32) * 0.37).sin() * 3.0)
            .collect();
        let noise = Tensor::from_vec(values, (11, 200, 170), &Device::Cpu).unwrap();
        writer
            .append(PairBatch {
                sample: (&noise * -0.5).unwrap(),
                noise,
                ..base
            })
            .unwrap();
        writer.finish().unwrap();

        let reader = StoreReader::open(&dir.0).unwrap();
        // One reused stored batch for every read: the sizes go up and down.
        let mut stored = StoredBatch::default();
        for positions in [
            (0..11).collect::<Vec<u64>>(),
            vec![10, 3, 4, 5, 3, 0, 9, 8, 1, 2, 2],
            vec![2, 3, 4, 5, 6],
            vec![7],
            vec![],
            vec![1, 0, 6, 5, 4, 3, 2],
        ] {
            let fast = reader.get_batch(&positions, &Device::Cpu).unwrap();
            let raw = reader.read_raw(&positions).unwrap();
            let raw_bytes: Vec<&[u8]> = raw.tensors.iter().map(Vec::as_slice).collect();
            let tensors = upload(reader.layouts(), &raw_bytes, raw.len(), &Device::Cpu).unwrap();
            let reference =
                pair_batch(reader.layouts(), tensors, raw.prompts, raw.indices).unwrap();
            assert_eq!(fast.noise.dims(), reference.noise.dims());
            assert_eq!(fast.noise.dtype(), DType::F32);
            assert_same_batch(&fast, &reference);
            // Several threads, in pieces of one row or of two.
            for piece_bytes in [1, 2 * 200 * 170 * 4 * 2] {
                let mut outputs: Vec<Decoded> =
                    reader.layouts().iter().map(Decoded::for_layout).collect();
                let (indices, prompts) = reader
                    .read_into(&positions, &mut outputs, 3, piece_bytes)
                    .unwrap();
                let tensors = reader
                    .layouts()
                    .iter()
                    .zip(outputs)
                    .map(|(layout, decoded)| decoded.into_tensor(layout, positions.len()).unwrap())
                    .collect();
                let parallel = pair_batch(reader.layouts(), tensors, prompts, indices).unwrap();
                assert_same_batch(&parallel, &reference);
            }
            // The stored bytes, read into reused buffers, are exactly the file's bytes.
            reader.read_stored(&positions, &mut stored).unwrap();
            assert_eq!(stored.indices(), reference.indices.as_slice());
            assert_eq!(stored.prompts(), reference.prompts.as_slice());
            for (name, bytes) in [(NOISE, &raw_bytes[0]), (SAMPLE, &raw_bytes[1])] {
                assert_eq!(stored.bytes(name).unwrap(), *bytes, "{name}");
            }
            assert_same_batch(&stored.to_batch(&Device::Cpu).unwrap(), &reference);
        }
    }
}
