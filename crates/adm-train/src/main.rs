//! `adm-train`: runs the configured job. With no arguments, the CPU toy (configs/toy-2d.toml).

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Distil a diffusion model with ADM / DMDX (default: the 2D toy pipeline)"
)]
struct Args {
    /// Run configuration (TOML). Default: the built-in configs/toy-2d.toml. Its top-level
    /// `job` key picks the job (absent: the 2D toy; "toy-digits": the digits toy).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override any config key, e.g. --set adm.steps=500 --set data.std=0.05 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

fn main() -> Result<()> {
    adm_train::init_logging();
    let args = Args::parse();
    let job = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config {}", path.display()))?;
            adm_train::digits::config::job_of(&text, &path.display().to_string())?
        }
        None => None,
    };
    match job.as_deref() {
        None => run_toy_2d(&args),
        Some(adm_train::digits::JOB) => run_digits(&args),
        Some(other) => bail!(
            "config key `job`: unknown job \"{other}\" (known: \"{}\", or no key for the 2D toy)",
            adm_train::digits::JOB
        ),
    }
}

fn run_toy_2d(args: &Args) -> Result<()> {
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

fn run_digits(args: &Args) -> Result<()> {
    let path = args
        .config
        .as_deref()
        .expect("a job key comes from a config file");
    let config = adm_train::digits::DigitsRunConfig::load(path, &args.overrides)?;
    let run_dir = config.run_dir.clone();
    let report = adm_train::digits::run_digits(config)?;
    println!("{}", report.table);
    println!(
        "classifier held-out accuracy {:.3}; wrote {1}/metrics.json and {1}/samples.png (rows: teacher, then the methods in table order; columns: classes 0..9)",
        report.classifier_test_accuracy,
        run_dir.display()
    );
    Ok(())
}
