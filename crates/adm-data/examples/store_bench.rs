//! Throughput of the ODE-pair store against the disk: writes a store of SDXL-latent-sized
//! pairs (noise and sample 4x128x128, a small `pooled` condition), then reads it back in
//! order and shuffled with `StoreReader::get_batch` (fresh f32 tensors) and with
//! `StoreReader::read_stored` (stored bytes into one reused batch), from a warm page cache and (when
//! `/proc/sys/vm/drop_caches` is writable) a cold one. Baselines on the same disk:
//! `dd if=/dev/zero bs=16M conv=fsync` for writing, `cat shards > /dev/null` for reading.
//! Results: docs/benchmarks.md.
//!
//! ```text
//! cargo run --release -p adm-data --example store_bench -- --dir /tmp/bench-store \
//!     [--dtype bf16|f32|f16] [--gb 3] [--shard-size 256] [--batch 64] [--no-cold] [--keep]
//! ```
//!
//! `--dir` is created and deleted afterwards (unless `--keep`); it must not exist yet.
//! `--existing` skips writing and only reads the store a `--keep` run left in `--dir`
//! (same `--dtype` and `--gb`); the store is kept.
//! Unix only (it shells out to `dd`, `cat` and `sync`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use adm_data::store::{PairBatch, StoreDtype, StoreReader, StoreSpec, StoreWriter, StoredBatch};
use candle_core::{Device, Tensor};

const LATENT: [usize; 3] = [4, 128, 128];
const POOLED: usize = 64;

struct Options {
    dir: PathBuf,
    dtype: StoreDtype,
    gb: f64,
    shard_size: usize,
    batch: usize,
    cold: bool,
    keep: bool,
    /// Read the store a `--keep` run left in `dir` (for profiling the reads).
    existing: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        dir: PathBuf::new(),
        dtype: StoreDtype::Bf16,
        gb: 3.0,
        shard_size: 256,
        batch: 64,
        cold: true,
        keep: false,
        existing: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--dir" => options.dir = PathBuf::from(value()?),
            "--dtype" => {
                options.dtype = match value()?.as_str() {
                    "bf16" => StoreDtype::Bf16,
                    "f16" => StoreDtype::F16,
                    "f32" => StoreDtype::F32,
                    other => return Err(format!("--dtype {other}: expected bf16, f16 or f32")),
                }
            }
            "--gb" => options.gb = value()?.parse().map_err(|e| format!("--gb: {e}"))?,
            "--shard-size" => {
                options.shard_size = value()?.parse().map_err(|e| format!("--shard-size: {e}"))?
            }
            "--batch" => options.batch = value()?.parse().map_err(|e| format!("--batch: {e}"))?,
            "--no-cold" => options.cold = false,
            "--keep" => options.keep = true,
            "--existing" => options.existing = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if options.dir.as_os_str().is_empty() {
        return Err("--dir is required".into());
    }
    if options.batch == 0 || options.shard_size == 0 || options.gb.is_nan() || options.gb <= 0.0 {
        return Err("--batch, --shard-size and --gb must be positive".into());
    }
    Ok(options)
}

fn spec(options: &Options) -> StoreSpec {
    StoreSpec {
        teacher: "store_bench".into(),
        schedule: "none".into(),
        solver: "none".into(),
        steps: 1,
        cfg_scale: 1.0,
        seed: 0,
        dtype: options.dtype,
        noise_shape: LATENT.to_vec(),
        sample_shape: LATENT.to_vec(),
        conditions: [(
            "pooled".to_string(),
            adm_data::store::ConditionSpec {
                shape: vec![POOLED],
                dtype: options.dtype,
            },
        )]
        .into(),
        shard_size: options.shard_size,
        partition: Default::default(),
    }
}

/// `rows` pairs of pseudo-random values, already in the store dtype (the collector's own
/// conversion is not the store's cost).
fn make_batch(rows: usize, dtype: StoreDtype, salt: u64) -> candle_core::Result<PairBatch> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ salt;
    let mut values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    };
    let latent: usize = LATENT.iter().product();
    let shape = [rows, LATENT[0], LATENT[1], LATENT[2]];
    let device = Device::Cpu;
    let tensor = |v: Vec<f32>, shape: &[usize]| {
        Tensor::from_vec(v, shape, &device)?.to_dtype(dtype.candle())
    };
    Ok(PairBatch {
        noise: tensor(values(rows * latent), &shape)?,
        sample: tensor(values(rows * latent), &shape)?,
        conditions: vec![(
            "pooled".into(),
            tensor(values(rows * POOLED), &[rows, POOLED])?,
        )],
        prompts: Vec::new(),
        indices: Vec::new(),
    })
}

fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        total += entry?.metadata()?.len();
    }
    Ok(total)
}

fn mb_per_s(bytes: u64, time: Duration) -> f64 {
    bytes as f64 / 1e6 / time.as_secs_f64()
}

fn shell(script: &str) -> Result<Duration, String> {
    let start = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("`{script}`: {e}"))?;
    if !status.success() {
        return Err(format!("`{script}` failed: {status}"));
    }
    Ok(start.elapsed())
}

/// Drops the page cache; false when not permitted (containers, non-root).
fn drop_caches() -> bool {
    shell("sync && echo 3 > /proc/sys/vm/drop_caches").is_ok()
}

struct Reads {
    cat: Duration,
    sequential: Duration,
    shuffled: Duration,
    stored_sequential: Duration,
    stored_shuffled: Duration,
}

/// How a pass reads its batches.
#[derive(Clone, Copy)]
enum ReadMode {
    /// `get_batch` on the CPU: fresh f32 tensors per batch.
    F32Tensors,
    /// `read_stored` into one reused `StoredBatch`: the stored bytes.
    StoredBytes,
}

/// One timed pass over the store (in order or shuffled), from opening it to the last batch.
fn timed_pass(
    dir: &Path,
    shuffled: bool,
    batch: usize,
    mode: ReadMode,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let start = Instant::now();
    let reader = StoreReader::open(dir)?;
    let order: Vec<u64> = if shuffled {
        reader.epoch_indices(1, 0, 0, 1)?
    } else {
        (0..reader.len() as u64).collect()
    };
    let mut stored = StoredBatch::default();
    for chunk in order.chunks(batch) {
        match mode {
            ReadMode::F32Tensors => drop(reader.get_batch(chunk, &Device::Cpu)?),
            ReadMode::StoredBytes => reader.read_stored(chunk, &mut stored)?,
        }
    }
    Ok(start.elapsed())
}

fn read_passes(
    dir: &Path,
    shard_files: &str,
    batch: usize,
    cold: bool,
) -> Result<Reads, Box<dyn std::error::Error>> {
    let prepare = || -> Result<(), String> {
        if cold && !drop_caches() {
            return Err("cannot drop the page cache".into());
        }
        if !cold {
            // Warm: everything cached before timing.
            shell(&format!("cat {shard_files} > /dev/null"))?;
        }
        Ok(())
    };
    prepare()?;
    let cat = shell(&format!("cat {shard_files} > /dev/null"))?;

    let pass = |shuffled: bool, mode: ReadMode| {
        prepare()?;
        timed_pass(dir, shuffled, batch, mode)
    };
    let sequential = pass(false, ReadMode::F32Tensors)?;
    let shuffled = pass(true, ReadMode::F32Tensors)?;
    let stored_sequential = pass(false, ReadMode::StoredBytes)?;
    let stored_shuffled = pass(true, ReadMode::StoredBytes)?;
    Ok(Reads {
        cat,
        sequential,
        shuffled,
        stored_sequential,
        stored_shuffled,
    })
}

/// Writes the store and the `dd` file of the same size; returns (store write time, dd bytes,
/// dd time).
fn write_store(
    options: &Options,
    spec: StoreSpec,
    pairs: usize,
) -> Result<(Duration, u64, Duration), Box<dyn std::error::Error>> {
    let dir = &options.dir;
    // Write: two pre-made batches, alternated, so data generation is not timed.
    let pool = [
        make_batch(options.batch, options.dtype, 1)?,
        make_batch(options.batch, options.dtype, 2)?,
    ];
    let start = Instant::now();
    let mut writer = StoreWriter::open(dir, spec)?;
    let mut next = 0usize;
    while next < pairs {
        let rows = options.batch.min(pairs - next);
        let template = &pool[(next / options.batch) % 2];
        writer.append(PairBatch {
            noise: template.noise.narrow(0, 0, rows)?,
            sample: template.sample.narrow(0, 0, rows)?,
            conditions: vec![(
                "pooled".into(),
                template.conditions[0].1.narrow(0, 0, rows)?,
            )],
            prompts: vec!["a benchmark prompt".into(); rows],
            indices: (next as u64..(next + rows) as u64).collect(),
        })?;
        next += rows;
    }
    writer.finish()?;
    let write = start.elapsed();
    let store_bytes = dir_bytes(dir)?;

    let dd_blocks = store_bytes.div_ceil(16 << 20);
    let dd_file = dir.join("dd.bin");
    let dd = shell(&format!(
        "dd if=/dev/zero of={} bs=16M count={dd_blocks} conv=fsync 2>/dev/null",
        dd_file.display()
    ))?;
    std::fs::remove_file(&dd_file)?;
    let dd_bytes = dd_blocks * (16 << 20);

    Ok((write, dd_bytes, dd))
}

fn run(options: &Options) -> Result<(), Box<dyn std::error::Error>> {
    let dir = &options.dir;
    let spec = spec(options);
    let latent: usize = LATENT.iter().product();
    let pair_bytes = (2 * latent + POOLED) * options.dtype.size_in_bytes();
    let pairs = ((options.gb * 1e9) as usize / pair_bytes).max(1);
    println!(
        "store_bench: {pairs} pairs of {:?} 2x{LATENT:?} + pooled[{POOLED}] ({:.3} MB/pair), \
         shards of {}, batches of {}",
        options.dtype,
        pair_bytes as f64 / 1e6,
        options.shard_size,
        options.batch
    );

    let write = if options.existing {
        None
    } else {
        Some(write_store(options, spec, pairs)?)
    };
    let store_bytes = dir_bytes(dir)?;
    let mut shard_files: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path().display().to_string())
        .filter(|p| p.ends_with(".safetensors"))
        .collect();
    shard_files.sort();
    let shard_files = shard_files.join(" ");
    let data_bytes = (pairs * pair_bytes) as u64;

    println!(
        "store: {} on disk in {} shards",
        store_bytes,
        shard_files.split(' ').count()
    );
    if let Some((write, dd_bytes, dd)) = write {
        let write_rate = mb_per_s(store_bytes, write);
        let dd_rate = mb_per_s(dd_bytes, dd);
        println!(
            "write     {:>8.0} MB/s ({:.2} s) | dd conv=fsync {:>8.0} MB/s | ratio {:.2} (target 0.70)",
            write_rate,
            write.as_secs_f64(),
            dd_rate,
            write_rate / dd_rate
        );
    }

    let mut cache_states = vec![false];
    if options.cold {
        if drop_caches() {
            cache_states.push(true);
        } else {
            println!("cold cache: /proc/sys/vm/drop_caches is not writable here; skipped");
        }
    }
    for cold in cache_states {
        let reads = read_passes(dir, &shard_files, options.batch, cold)?;
        let label = if cold { "cold" } else { "warm" };
        let cat = mb_per_s(store_bytes, reads.cat);
        // Tensor bytes delivered per second (headers and prompts are not counted).
        let sequential = mb_per_s(data_bytes, reads.sequential);
        let shuffled = mb_per_s(data_bytes, reads.shuffled);
        let stored_sequential = mb_per_s(data_bytes, reads.stored_sequential);
        let stored_shuffled = mb_per_s(data_bytes, reads.stored_shuffled);
        println!(
            "{label} cat {cat:>8.0} MB/s | get_batch (f32): sequential {sequential:>8.0} MB/s \
             ({:.2} of cat, target 0.80), shuffled {shuffled:>8.0} MB/s ({:.2}, target 0.50) \
             | read_stored: sequential {stored_sequential:>8.0} MB/s ({:.2}), shuffled \
             {stored_shuffled:>8.0} MB/s ({:.2})",
            sequential / cat,
            shuffled / cat,
            stored_sequential / cat,
            stored_shuffled / cat
        );
    }

    if !options.keep && !options.existing {
        std::fs::remove_dir_all(dir)?;
    }
    Ok(())
}

fn main() {
    let options = match parse_args() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("store_bench: {e}");
            std::process::exit(2);
        }
    };
    if options.dir.exists() && !options.existing {
        eprintln!(
            "store_bench: {} exists; pass a new directory",
            options.dir.display()
        );
        std::process::exit(2);
    }
    if let Err(e) = run(&options) {
        eprintln!("store_bench: {e}");
        // Only ever the directory this run created.
        if !options.keep && !options.existing && options.dir.exists() {
            let _ = std::fs::remove_dir_all(&options.dir);
        }
        std::process::exit(1);
    }
}
