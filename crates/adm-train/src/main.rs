//! `adm-train`: runs the configured job. With no arguments, the CPU toy (configs/toy-2d.toml).

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Distil a diffusion model with ADM / DMDX (default: the 2D toy pipeline)"
)]
struct Args {
    /// Run configuration (TOML). Default: the built-in configs/toy-2d.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override any config key, e.g. --set adm.steps=500 --set data.std=0.05 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

fn main() -> Result<()> {
    adm_train::init_logging();
    let args = Args::parse();
    let config = adm_train::ToyRunConfig::load(args.config.as_deref(), &args.overrides)?;
    let run_dir = config.run_dir.clone();
    let report = adm_train::run_toy(config)?;
    println!("{}", report.table);
    println!(
        "wrote {0}/metrics.json and {0}/samples.png (panels in table order)",
        run_dir.display()
    );
    Ok(())
}
