//! What every toy stage shares: the config, the data, the schedule, seeded randomness,
//! progress bars and per-step logs.

use std::path::PathBuf;

use adm_data::toy::GaussianMixture;
use adm_diffusion::Schedule;
use adm_models::{Condition, ToyMlp, ToyMlpConfig};
use anyhow::{Context as _, Result};
use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::config::ToyRunConfig;
use crate::metrics::MetricsLog;

pub struct ToyContext {
    pub config: ToyRunConfig,
    pub device: Device,
    pub mixture: GaussianMixture,
    pub schedule: Schedule,
    pub model: ToyMlpConfig,
}

impl ToyContext {
    pub fn new(config: ToyRunConfig) -> Result<Self> {
        let mixture = GaussianMixture::new(&config.data)?;
        let schedule = Schedule::new(&config.schedule)?;
        let model = ToyMlpConfig {
            in_channels: 2,
            hidden_size: config.model.hidden_size,
            num_blocks: config.model.num_blocks,
            time_embed_dim: config.model.time_embed_dim,
            num_classes: mixture.num_classes(),
        };
        std::fs::create_dir_all(&config.run_dir)
            .with_context(|| format!("cannot create run_dir {}", config.run_dir.display()))?;
        Ok(Self {
            config,
            device: Device::Cpu,
            mixture,
            schedule,
            model,
        })
    }

    /// The random stream of one named stage: independent of which other stages run.
    pub fn rng(&self, stream: &str) -> StdRng {
        StdRng::seed_from_u64(adm_nn::derive_seed(self.config.seed, stream))
    }

    pub fn build_net(&self, vb: candle_nn::VarBuilder) -> candle_core::Result<ToyMlp> {
        ToyMlp::new(vb, &self.model, self.schedule.clone())
    }

    /// The config sections `sections` (top-level keys) as JSON: what a cached stage output
    /// depends on, stored beside it so that a change of any of them recomputes it.
    pub fn fingerprint(&self, sections: &[&str]) -> serde_json::Value {
        config_fingerprint(&self.config, sections)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.config.run_dir.join(name)
    }

    /// `n` standard-normal 2D points.
    pub fn noise(&self, n: usize, rng: &mut StdRng) -> candle_core::Result<Tensor> {
        adm_nn::randn(rng, (n, self.model.in_channels), &self.device)
    }

    /// A batch of class conditions drawn from the data's class prior.
    pub fn classes(&self, n: usize, rng: &mut StdRng) -> candle_core::Result<Condition> {
        let classes = self.mixture.sample(n, rng).classes_tensor(&self.device)?;
        Ok(class_condition(classes))
    }

    /// Per-sample timesteps as a (B,) tensor.
    pub fn timesteps(&self, t: &[f64]) -> candle_core::Result<Tensor> {
        Tensor::from_vec(
            t.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            t.len(),
            &self.device,
        )
    }
}

/// The top-level sections `sections` of a run config as JSON (what a cached stage output
/// depends on).
pub fn config_fingerprint(config: &impl serde::Serialize, sections: &[&str]) -> serde_json::Value {
    let full = serde_json::to_value(config).expect("the config serialises");
    sections
        .iter()
        .map(|&key| (key.to_string(), full[key].clone()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

pub fn class_condition(classes: Tensor) -> Condition {
    Condition::new().with(adm_models::toy_mlp::CLASS_LABELS, classes)
}

/// A progress bar for `len` steps of the stage `name` (hidden when stderr is not a terminal).
pub fn progress(name: &str, len: usize) -> ProgressBar {
    let bar = ProgressBar::new(len as u64).with_prefix(name.to_string());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>16} [{bar:28}] {pos:>5}/{len} {per_sec:>9} eta {eta:>3} {msg}",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar
}

/// Per-step values of the toy stage `stage` as JSON lines in `run_dir/logs/<stage>.jsonl`.
pub fn stage_log(ctx: &ToyContext, stage: &str) -> Result<MetricsLog> {
    let path = ctx
        .path("logs")
        .join(format!("{}.jsonl", stage.replace('+', "-")));
    MetricsLog::create(&path)
}
