//! `adm-collect-ode-pairs`: samples (noise, teacher sample, condition) pairs into an ODE-pair
//! store (docs/ode-pair-store.md), checks stores and merges rank stores.
//!
//! Today the teacher is the toy teacher of a toy config (trained, or reused from the run
//! folder); larger teachers plug in through the same `Backbone` trait and `collect` call.

use std::path::PathBuf;

use adm_data::store::{merge, verify, Partition};
use adm_train::collect::collect_toy_pairs_into;
use adm_train::context::ToyContext;
use adm_train::teacher::train_teacher;
use adm_train::ToyRunConfig;
use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

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
        /// Run configuration (TOML). Default: the built-in configs/toy-2d.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override any config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Store directory. Default: <run_dir>/ode-pairs, or <run_dir>/ode-pairs/rank-<r>
        /// when --world-size > 1.
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
            let ctx = ToyContext::new(ToyRunConfig::load(config.as_deref(), &overrides)?)?;
            let dir = out.unwrap_or_else(|| match world_size {
                1 => ctx.path("ode-pairs"),
                _ => ctx.path("ode-pairs").join(format!("rank-{rank}")),
            });
            let teacher = train_teacher(&ctx)?;
            let store =
                collect_toy_pairs_into(&ctx, &teacher, &dir, Partition { rank, world_size })?;
            println!("{}: {} pairs", dir.display(), store.len());
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
