//! `adm-collect-ode-pairs`: samples (noise, teacher sample, condition) pairs into an ODE-pair
//! store (docs/ode-pair-store.md), checks stores and merges rank stores.
//!
//! The teacher is either the toy teacher of a toy config (trained, or reused from the run
//! folder) or a pretrained pipeline named by a collection config's `[teacher]` section
//! (`kind = "sdxl"`, see `config.rs`); both go through `adm_train::collect::collect`.

mod config;
mod teacher;

use std::path::PathBuf;

use adm_data::store::{merge, verify, Partition};
use adm_train::collect::collect_toy_pairs_into;
use adm_train::context::ToyContext;
use adm_train::teacher::train_teacher;
use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use crate::config::JobConfig;

#[derive(Parser)]
#[command(version, about = "Collect, verify and merge ODE-pair stores")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Collect (or resume collecting) the pairs of a config's teacher.
    Collect {
        /// Run configuration (TOML): a toy run config or a teacher collection config
        /// (`[teacher] kind = ...`). Default: the built-in configs/toy-2d.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override any config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Store directory. Default: <run_dir>/ode-pairs (toy) or `ode_pairs.out` (teacher),
        /// with /rank-<r> appended when --world-size > 1.
        #[arg(long)]
        out: Option<PathBuf>,
        /// This process collects the pairs i with i % world_size == rank.
        #[arg(long, default_value_t = 0)]
        rank: u64,
        #[arg(long, default_value_t = 1)]
        world_size: u64,
    },
    /// Recompute every shard checksum and report bad shards by file name.
    Verify { dir: PathBuf },
    /// Combine the stores of all ranks into one store, in global pair order.
    Merge {
        #[arg(long)]
        out: PathBuf,
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
}

fn main() -> Result<()> {
    adm_train::init_logging();
    match Args::parse().command {
        Command::Collect {
            config,
            overrides,
            out,
            rank,
            world_size,
        } => {
            if world_size == 0 || rank >= world_size {
                bail!("--rank must be below --world-size (got rank {rank} of {world_size})");
            }
            let partition = Partition { rank, world_size };
            let store_dir = |default: PathBuf| {
                out.unwrap_or_else(|| match world_size {
                    1 => default.clone(),
                    _ => default.join(format!("rank-{rank}")),
                })
            };
            let (dir, pairs) = match JobConfig::load(config.as_deref(), &overrides)? {
                JobConfig::Toy(config) => {
                    let ctx = ToyContext::new(*config)?;
                    let dir = store_dir(ctx.path("ode-pairs"));
                    let teacher = train_teacher(&ctx)?;
                    let store = collect_toy_pairs_into(&ctx, &teacher, &dir, partition)?;
                    (dir, store.len())
                }
                JobConfig::Teacher(config) => {
                    let dir = store_dir(config.ode_pairs.out.clone());
                    let pairs = teacher::collect_teacher_pairs(&config, &dir, partition)?;
                    (dir, pairs)
                }
            };
            println!("{}: {pairs} pairs", dir.display());
        }
        Command::Verify { dir } => {
            let report = verify(&dir)?;
            println!(
                "{}: {} shards, {} pairs checked",
                dir.display(),
                report.shards_checked,
                report.pairs
            );
            if !report.is_ok() {
                for bad in &report.bad_shards {
                    eprintln!("bad shard {}: {}", bad.file, bad.problem);
                }
                bail!(
                    "{} of {} shards are damaged",
                    report.bad_shards.len(),
                    report.shards_checked
                );
            }
        }
        Command::Merge { out, inputs } => {
            let pairs = merge(&inputs, &out)?;
            println!("{}: {pairs} pairs", out.display());
        }
    }
    Ok(())
}
