//! End-to-end crash safety of the collector binary: a collection (or a merge) SIGKILLed at
//! pseudo-random points and rerun until it completes leaves exactly the store of one
//! uninterrupted run; rank stores merged equal the single-process store; `verify` names a
//! corrupted shard and exits non-zero.
//!
//! The toy teacher is trained once (20 steps) into a shared run folder and copied into every
//! other run folder (`run_dir/teacher.safetensors` is reused when its settings match).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use adm_data::store::Manifest;

const BIN: &str = env!("CARGO_BIN_EXE_adm-collect-ode-pairs");
/// 600 pairs in shards of 32: 18 full shards and a partial one of 24.
const PAIRS: usize = 600;
const SHARD_SIZE: usize = 32;
const SHARDS: usize = PAIRS.div_ceil(SHARD_SIZE);
/// A kill-and-rerun loop gives up (fails) after this long.
const LOOP_LIMIT: Duration = Duration::from_secs(60);

fn overrides(run_dir: &Path) -> Vec<String> {
    [
        format!("run_dir={}", run_dir.display()),
        "teacher.steps=20".into(),
        "teacher.sampling_steps=16".into(),
        format!("ode_pairs.count={PAIRS}"),
        "ode_pairs.batch_size=16".into(),
        format!("ode_pairs.shard_size={SHARD_SIZE}"),
    ]
    .into_iter()
    .flat_map(|kv| ["--set".to_string(), kv])
    .collect()
}

fn collect_command(run_dir: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("collect")
        .args(overrides(run_dir))
        .args(extra)
        .env("RUST_LOG", "warn");
    command
}

fn run(mut command: Command) -> Output {
    let output = command.output().expect("cannot start the collector");
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A fresh, empty directory under the test target folder.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kill_resume-{}", std::process::id()))
        .join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// The shared run folder: the trained teacher and the uninterrupted single-process store
/// (`<dir>/ode-pairs`).
fn reference() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("reference");
        run(collect_command(&dir, &[]));
        dir
    })
}

/// Tests in this file; the last one to finish removes this process's scratch folder.
static TESTS_LEFT: AtomicUsize = AtomicUsize::new(3);

fn done() {
    if TESTS_LEFT.fetch_sub(1, Ordering::SeqCst) == 1 {
        let _ = fs::remove_dir_all(
            Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("kill_resume-{}", std::process::id())),
        );
    }
}

/// A run folder holding a copy of the reference teacher, so nothing is retrained.
fn run_dir_with_teacher(name: &str) -> PathBuf {
    let dir = scratch(name);
    for file in ["teacher.safetensors", "teacher.json"] {
        fs::copy(reference().join(file), dir.join(file)).unwrap();
    }
    dir
}

/// Same file names with the same bytes, and as many files as a complete store has.
fn assert_same_store(expected: &Path, actual: &Path) {
    assert_eq!(
        common::assert_same_files(expected, actual),
        SHARDS + 1,
        "shards plus manifest.json"
    );
}

/// Committed shards of the store in `dir` (0 before its manifest exists).
fn committed_shards(dir: &Path) -> usize {
    Manifest::read(dir).map_or(0, |m| m.shards.len())
}

/// SplitMix64: a small seeded generator, so the kill points are reproducible per seed.
struct SplitMix(u64);

impl SplitMix {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % bound
    }
}

/// Runs `make()` over and over, SIGKILLing each run (at most `max_kills` times) once the
/// store in `store` has committed a random number of further shards plus a random delay
/// below `max_delay_us`, until one run completes. Returns how many runs were killed while
/// still running, and the committed shard counts seen after each kill.
fn kill_until_done(
    mut make: impl FnMut() -> Command,
    store: &Path,
    seed: u64,
    max_kills: usize,
    max_extra_shards: u64,
    max_delay_us: u64,
) -> (usize, Vec<usize>) {
    let mut rng = SplitMix(seed);
    let started = Instant::now();
    let mut seen = Vec::new();
    loop {
        assert!(
            started.elapsed() < LOOP_LIMIT,
            "no run completed within {LOOP_LIMIT:?}"
        );
        let mut command = make();
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        if seen.len() >= max_kills {
            let output = command.output().unwrap();
            assert!(
                output.status.success(),
                "final run failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            return (seen.len(), seen);
        }
        let target = committed_shards(store) + rng.below(max_extra_shards + 1) as usize;
        let delay = Duration::from_micros(rng.below(max_delay_us));
        let mut child = command.spawn().unwrap();
        let mut target_reached_at = None;
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            let now = Instant::now();
            if target_reached_at.is_none() && committed_shards(store) >= target {
                target_reached_at = Some(now);
            }
            if target_reached_at.is_some_and(|t| now - t >= delay) {
                break None;
            }
            assert!(started.elapsed() < LOOP_LIMIT, "a run hangs");
            std::thread::sleep(Duration::from_micros(200));
        };
        match finished {
            Some(status) => {
                let output = child.wait_with_output().unwrap();
                assert!(
                    status.success(),
                    "run failed: {status}: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                return (seen.len(), seen);
            }
            None => {
                // `Child::kill` is SIGKILL on Unix: no destructor, no flush, no cleanup.
                child.kill().unwrap();
                child.wait().unwrap();
                seen.push(committed_shards(store));
            }
        }
    }
}

#[test]
fn collection_killed_at_random_points_resumes_to_the_uninterrupted_store() {
    let expected = reference().join("ode-pairs");
    for seed in [1u64, 2] {
        let run_dir = run_dir_with_teacher(&format!("killed-collect-{seed}"));
        let store = run_dir.join("ode-pairs");
        let (kills, seen) = kill_until_done(
            || collect_command(&run_dir, &[]),
            &store,
            seed,
            10,
            3,
            20_000,
        );
        eprintln!("seed {seed}: {kills} kills, committed shards after each: {seen:?}");
        assert!(
            kills >= 3,
            "only {kills} runs were killed mid-way: {seen:?}"
        );
        assert!(
            seen.iter().any(|&s| s > 0 && s < SHARDS),
            "no kill left a partly written store: {seen:?}"
        );
        assert_same_store(&expected, &store);
        run({
            let mut verify = Command::new(BIN);
            verify.arg("verify").arg(&store);
            verify
        });
        fs::remove_dir_all(&run_dir).unwrap();
    }
    done();
}

fn merge_command(out: &Path, inputs: &[PathBuf]) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("merge")
        .arg("--out")
        .arg(out)
        .args(inputs)
        .env("RUST_LOG", "warn");
    command
}

#[test]
fn two_ranks_merged_equal_the_single_process_store_even_when_the_merge_is_killed() {
    let expected = reference().join("ode-pairs");
    let run_dir = run_dir_with_teacher("ranks");
    for rank in ["0", "1"] {
        run(collect_command(
            &run_dir,
            &["--rank", rank, "--world-size", "2"],
        ));
    }
    let inputs: Vec<PathBuf> = ["rank-1", "rank-0"] // any order
        .iter()
        .map(|r| run_dir.join("ode-pairs").join(r))
        .collect();
    for input in &inputs {
        assert_eq!(Manifest::read(input).unwrap().len(), PAIRS / 2);
    }

    let merged = run_dir.join("merged");
    run(merge_command(&merged, &inputs));
    assert_same_store(&expected, &merged);
    // Merging again into a complete store changes nothing.
    run(merge_command(&merged, &inputs));
    assert_same_store(&expected, &merged);

    // A merge is a few milliseconds here, so kill it after a random number of committed
    // shards plus at most 2 ms.
    let killed = run_dir.join("merged-killed");
    let (kills, seen) =
        kill_until_done(|| merge_command(&killed, &inputs), &killed, 7, 8, 4, 2_000);
    eprintln!("merge: {kills} kills, committed shards after each: {seen:?}");
    assert!(kills >= 1, "no merge was killed mid-way");
    assert_same_store(&expected, &killed);
    // The inputs are only read.
    for input in &inputs {
        assert_eq!(Manifest::read(input).unwrap().len(), PAIRS / 2);
    }
    fs::remove_dir_all(&run_dir).unwrap();
    done();
}

#[test]
fn verify_names_corrupted_and_truncated_shards_and_fails() {
    let store = scratch("verify");
    for (name, bytes) in common::files(&reference().join("ode-pairs")) {
        fs::write(store.join(name), bytes).unwrap();
    }
    let verify = || {
        let mut command = Command::new(BIN);
        command.arg("verify").arg(&store).env("RUST_LOG", "warn");
        command.output().unwrap()
    };
    let clean = verify();
    assert!(clean.status.success(), "{clean:?}");
    assert!(String::from_utf8_lossy(&clean.stdout).contains(&format!("{PAIRS} pairs")));

    let manifest = Manifest::read(&store).unwrap();
    let flipped = &manifest.shards[5].file;
    let mut bytes = fs::read(store.join(flipped)).unwrap();
    let middle = bytes.len() - 100; // in the tensor data
    bytes[middle] ^= 0x40;
    fs::write(store.join(flipped), bytes).unwrap();
    let truncated = &manifest.shards[11].file;
    let bytes = fs::read(store.join(truncated)).unwrap();
    fs::write(store.join(truncated), &bytes[..bytes.len() - 1]).unwrap();

    let damaged = verify();
    let stderr = String::from_utf8_lossy(&damaged.stderr);
    assert!(!damaged.status.success(), "verify passed a damaged store");
    assert!(
        stderr.contains(&format!("bad shard {flipped}: checksum")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("bad shard {truncated}:")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("2 of {SHARDS} shards are damaged")),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Not a store at all: an error naming the manifest, no panic.
    let empty = scratch("verify-empty");
    let output = Command::new(BIN)
        .arg("verify")
        .arg(&empty)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("manifest.json"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    fs::remove_dir_all(&store).unwrap();
    fs::remove_dir_all(&empty).unwrap();
    done();
}
