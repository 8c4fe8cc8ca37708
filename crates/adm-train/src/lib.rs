//! Training stages for ADM / DMDX distillation and the toy pipeline behind `adm-train`.

pub mod collect;
pub mod config;
pub mod context;
pub mod distill;
pub mod optim;
pub mod pipeline;
pub mod student;
pub mod teacher;

pub use config::ToyRunConfig;
pub use pipeline::{run_toy, ToyReport};
