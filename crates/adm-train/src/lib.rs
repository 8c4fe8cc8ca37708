//! Training stages for ADM / DMDX distillation and the toy pipeline behind `adm-train`.

pub mod checkpoint;
pub mod collect;
pub mod config;
pub mod context;
pub mod digits;
pub mod distill;
pub mod ema;
pub mod engine;
pub mod metrics;
pub mod optim;
pub mod pairs;
pub mod pipeline;
pub mod recipe;
pub mod recipe_run;
pub mod score;
pub mod student;
pub mod teacher;

pub use config::ToyRunConfig;
pub use pipeline::{run_toy, ToyReport};

/// Logs to stderr at `info`, or as `RUST_LOG` says (shared by the binaries).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
