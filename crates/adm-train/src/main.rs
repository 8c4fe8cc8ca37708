//! `adm-train`: runs the configured job. With no arguments, the CPU toy (configs/toy-2d.toml).
//! The top-level key `job` selects the job: absent, the 2D toy; `"toy-digits"`, the digits
//! toy (src/digits); `"distill"`, a recipe for a real model (src/recipe.rs).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Distil a diffusion model with ADM / DMDX (default: the 2D toy pipeline)"
)]
struct Args {
    /// Run configuration (TOML). Default: the built-in configs/toy-2d.toml. Its top-level
    /// `job` key picks the job (absent: the 2D toy; "toy-digits": the digits toy;
    /// "distill": a recipe).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override any config key, e.g. --set adm.steps=500 --set data.std=0.05 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Recipes (`job = "distill"`): build every network without allocating weights, print
    /// the parameter counts and the estimated memory per GPU, and exit.
    #[arg(long)]
    dry_run: bool,
}

fn main() -> Result<()> {
    adm_train::init_logging();
    let args = Args::parse();
    let (text, origin) = match &args.config {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (
            adm_train::config::DEFAULT_CONFIG.to_string(),
            "configs/toy-2d.toml (built in)".to_string(),
        ),
    };
    let job = adm_train::config::job_of(&text, &origin)?;
    if args.dry_run && job.as_deref() != Some(adm_train::recipe::JOB) {
        bail!("--dry-run applies to recipes (`job = \"distill\"`), not to {origin}");
    }
    match job.as_deref() {
        None => {
            let config = adm_train::ToyRunConfig::parse(&text, &origin, &args.overrides)?;
            let run_dir = config.run_dir.clone();
            let report = adm_train::run_toy(config)?;
            println!("{}", report.table);
            println!(
                "wrote {0}/metrics.json and {0}/samples.png (panels in table order)",
                run_dir.display()
            );
        }
        Some(adm_train::digits::JOB) => {
            let config =
                adm_train::digits::DigitsRunConfig::parse(&text, &origin, &args.overrides)?;
            let run_dir = config.run_dir.clone();
            let report = adm_train::digits::run_digits(config)?;
            println!("{}", report.table);
            println!(
                "classifier held-out accuracy {:.3}; wrote {1}/metrics.json and {1}/samples.png (rows: teacher, then the methods in table order; columns: classes 0..9)",
                report.classifier_test_accuracy,
                run_dir.display()
            );
        }
        Some(adm_train::recipe::JOB) => {
            let recipe = adm_train::recipe::Recipe::parse(&text, &origin, &args.overrides)?;
            if args.dry_run {
                print!("{}", recipe.dry_run()?);
            } else {
                for stage in adm_train::recipe_run::run(&recipe, &candle_core::Device::Cpu)? {
                    println!(
                        "stage {}: {} steps, final checkpoint {}",
                        stage.name,
                        stage.steps,
                        stage.checkpoint.display()
                    );
                }
            }
        }
        Some(other) => bail!(
            "{origin}: config key `job`: unknown job {other:?} (known: \"{}\", \"{}\", or no \
             `job` for the toy-2d pipeline)",
            adm_train::digits::JOB,
            adm_train::recipe::JOB
        ),
    }
    Ok(())
}
