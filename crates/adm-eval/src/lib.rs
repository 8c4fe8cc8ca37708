//! adm-eval: sample metrics, scatter plots and plain-text reports.
//!
//! - [`mod@toy_metrics`]: mode coverage, sample quality and distribution distances for the 2D
//!   Gaussian-mixture toy.
//! - [`digits_metrics`]: classifier-based metrics for class-conditional image samples (the
//!   digits toy), with a Jacobi eigen-decomposition for the Fréchet distance.
//! - [`plot`]: scatter-plot PNGs of sample sets, titled with the built-in [`font`].
//! - [`grid`]: grey-scale per-channel pictures of latent batches.
//! - [`table`]: aligned plain-text and Markdown tables for logs and the README.

pub mod digits_metrics;
pub mod font;
pub mod grid;
pub mod plot;
pub mod table;
pub mod toy_metrics;

pub use digits_metrics::{digits_metrics, DigitsMetrics, Scored, CLASS_COVERAGE_FRACTION};
pub use grid::channel_grid_png;
pub use plot::scatter_png;
pub use table::{format_count, format_metric, Table};
pub use toy_metrics::{
    energy_distance, mmd_rbf, mode_histogram, toy_metrics, toy_metrics_with_coverage, ModeSet,
    ToyMetrics, DEFAULT_COVERAGE_FRACTION, HIGH_QUALITY_RADIUS_STD, MAX_DISTANCE_SAMPLES,
};
