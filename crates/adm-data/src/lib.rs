//! adm-data: toy data sets and the ODE-pair store.
//!
//! - [`digits`]: the UCI 8x8 hand-written digits, built in.
//! - [`toy`]: 2D Gaussian mixtures with class labels, the CPU test bed for every stage.
//! - [`prompts`]: prompt files (text or JSONL) for teacher sampling.
//! - [`store`]: the crash-safe, sharded on-disk store of (noise, teacher sample, condition)
//!   pairs that ADP trains on (format: `docs/ode-pair-store.md`).

pub mod digits;
mod error;
pub mod prompts;
pub mod store;
pub mod toy;

pub use digits::{Digits, DIGIT_SIZE, NUM_DIGIT_CLASSES};
pub use error::DataError;
pub use prompts::read_prompts;
pub use toy::{GaussianMixture, MixtureConfig, MixtureLayout, ToySamples};
