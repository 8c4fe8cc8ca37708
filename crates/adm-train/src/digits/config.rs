//! The digits toy's run configuration (`configs/toy-digits.toml`, `job = "toy-digits"`).

use std::path::{Path, PathBuf};

use adm_diffusion::{ScheduleConfig, TimestepDistribution};
use adm_models::unet_2d::Config as UNetConfig;
use adm_models::ConvHeadConfig;
use anyhow::{bail, ensure, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::config::{parse_toml, DmdConfig, MseConfig, StudentOutput, TeacherConfig};

/// The value of the top-level `job` key that selects this job.
pub const JOB: &str = "toy-digits";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigitsRunConfig {
    /// Always [`JOB`].
    pub job: String,
    pub seed: u64,
    pub run_dir: PathBuf,
    /// Rows of the results table, in order.
    pub methods: Vec<DigitsMethod>,
    pub data: DigitsDataConfig,
    pub schedule: ScheduleConfig,
    pub model: DigitsModelConfig,
    pub teacher: TeacherConfig,
    pub ode_pairs: DigitsPairsConfig,
    pub student: DigitsStudentConfig,
    pub mse: MseConfig,
    pub adp: DigitsAdpConfig,
    pub dmd: DmdConfig,
    pub adm: DigitsAdmConfig,
    pub probe: ProbeConfig,
    pub classifier: ClassifierConfig,
    pub eval: DigitsEvalConfig,
}

/// A distillation method of the digits table; every student is one-step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DigitsMethod {
    /// MSE regression on the ODE pairs from the teacher's weights (the paper's A1).
    Mse,
    /// ADP alone (stage 1 of DMDX).
    Adp,
    /// DMD (DMD2 loss) from the teacher's weights.
    Dmd,
    /// ADM from the teacher's weights (no ADP).
    Adm,
    /// DMDX: ADP, then ADM from the ADP generator.
    Dmdx,
}

impl DigitsMethod {
    pub fn name(self) -> &'static str {
        match self {
            DigitsMethod::Mse => "mse",
            DigitsMethod::Adp => "adp",
            DigitsMethod::Dmd => "dmd",
            DigitsMethod::Adm => "adm",
            DigitsMethod::Dmdx => "dmdx",
        }
    }

    /// The config sections its student depends on beyond the teacher's and `student`
    /// (`dmd` holds the DMD probe's timesteps).
    pub fn sections(self) -> &'static [&'static str] {
        match self {
            DigitsMethod::Mse => &["ode_pairs", "mse"],
            DigitsMethod::Adp => &["ode_pairs", "adp"],
            DigitsMethod::Dmd => &["dmd", "probe"],
            DigitsMethod::Adm => &["adm", "dmd", "probe"],
            DigitsMethod::Dmdx => &["ode_pairs", "adp", "adm", "dmd", "probe"],
        }
    }

    /// Whether it trains on the ODE pairs.
    pub fn uses_pairs(self) -> bool {
        matches!(self, Self::Mse | Self::Adp | Self::Dmdx)
    }
}

/// The tiny SDXL-architecture UNet: a plain down block and a cross-attention down block
/// (8x8 -> 4x4), the cross-attention mid block, mirrored up blocks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigitsModelConfig {
    /// Channels of the two resolutions (8x8, 4x4).
    pub block_out_channels: [usize; 2],
    pub layers_per_block: usize,
    /// Attention heads of the cross-attention blocks.
    pub attention_heads: usize,
    pub norm_num_groups: usize,
}

impl DigitsModelConfig {
    /// The diffusers config of the UNet: 1 channel in and out, cross-attention over the
    /// class token (`context_dim` = 10 classes + the null class).
    pub fn unet(&self, context_dim: usize) -> Result<UNetConfig> {
        let json = serde_json::json!({
            "in_channels": 1,
            "out_channels": 1,
            "sample_size": adm_data::DIGIT_SIZE,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": self.attention_heads,
            "cross_attention_dim": context_dim,
            "norm_num_groups": self.norm_num_groups,
            "transformer_layers_per_block": 1,
            "use_linear_projection": true,
        });
        Ok(serde_json::from_value(json)?)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigitsDataConfig {
    /// Held-out digits (never seen by the teacher or the classifier) for the classifier's
    /// accuracy and the "real digits" row; the rest train both.
    pub test_size: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigitsPairsConfig {
    pub count: usize,
    pub batch_size: usize,
    pub shard_size: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigitsStudentConfig {
    pub output: StudentOutput,
    pub batch_size: usize,
    /// Gradient-norm clip for every network (DMD2: 10).
    pub grad_clip: f64,
    /// EMA decay of the generator; the EMA weights are evaluated.
    pub ema_decay: f64,
    /// Save a checkpoint every this many generator steps (a killed run resumes there).
    pub checkpoint_every: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigitsAdmConfig {
    pub steps: usize,
    pub lr_generator: f64,
    pub lr_fake: f64,
    pub lr_discriminator: f64,
    /// Fake-score and discriminator updates per generator update (paper: 1).
    pub ttur: usize,
    /// The flow step is T / flow_divisions (paper: 64).
    pub flow_divisions: usize,
    /// Discriminator taps on the teacher UNet.
    pub taps: Vec<String>,
    pub heads: ConvHeadConfig,
}

/// ADP: hybrid hinge GAN on the ODE pairs with the latent discriminator (teacher + heads
/// on re-noised samples) and the pixel discriminator, a tiny frozen random-init SAM ViT
/// (8x8 images, patch 2) standing in for pretrained SAM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigitsAdpConfig {
    pub steps: usize,
    pub lr_generator: f64,
    pub lr_discriminator: f64,
    /// Paper: 0.85 and 0.15.
    pub lambda_latent: f64,
    pub lambda_pixel: f64,
    /// Generator line times (paper: cubic, biased to high noise).
    pub generator_timesteps: TimestepDistribution,
    /// Re-noising times of the latent discriminator (paper: uniform).
    pub discriminator_timesteps: TimestepDistribution,
    pub taps: Vec<String>,
    pub heads: ConvHeadConfig,
    /// Width and blocks of the random SAM ViT; one pixel head per block.
    pub sam_hidden: usize,
    pub sam_layers: usize,
}

/// The DMD loss recorded (never optimised) during DMD and ADM on fixed inputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    pub every: usize,
    pub size: usize,
}

/// The classifier that scores samples: an MLP with a feature layer, trained in the run on
/// the real digits minus a held-out test split.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    pub hidden: usize,
    /// Width of the feature layer the Fréchet distance is measured in.
    pub feature_dim: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigitsEvalConfig {
    /// Samples per class for every row (classes requested in equal numbers).
    pub samples_per_class: usize,
    /// Samples per class and method in samples.png.
    pub grid_rows: usize,
}

impl DigitsRunConfig {
    pub fn parse(text: &str, origin: &str, overrides: &[String]) -> Result<Self> {
        let config: Self = parse_toml(text, origin, overrides)?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.job == JOB,
            "config key `job` must be \"{JOB}\" for this job"
        );
        let positive = [
            ("teacher.steps", self.teacher.steps),
            ("teacher.batch_size", self.teacher.batch_size),
            ("teacher.sampling_steps", self.teacher.sampling_steps),
            ("ode_pairs.count", self.ode_pairs.count),
            ("ode_pairs.batch_size", self.ode_pairs.batch_size),
            ("ode_pairs.shard_size", self.ode_pairs.shard_size),
            ("student.batch_size", self.student.batch_size),
            ("student.checkpoint_every", self.student.checkpoint_every),
            ("dmd.steps", self.dmd.steps),
            ("dmd.fake_updates", self.dmd.fake_updates),
            ("adm.steps", self.adm.steps),
            ("adm.ttur", self.adm.ttur),
            ("adm.flow_divisions", self.adm.flow_divisions),
            ("classifier.hidden", self.classifier.hidden),
            ("classifier.feature_dim", self.classifier.feature_dim),
            ("classifier.steps", self.classifier.steps),
            ("classifier.batch_size", self.classifier.batch_size),
            ("data.test_size", self.data.test_size),
            ("mse.steps", self.mse.steps),
            ("adp.steps", self.adp.steps),
            ("adp.sam_hidden", self.adp.sam_hidden),
            ("adp.sam_layers", self.adp.sam_layers),
            ("eval.samples_per_class", self.eval.samples_per_class),
            ("probe.every", self.probe.every),
            ("probe.size", self.probe.size),
            ("eval.grid_rows", self.eval.grid_rows),
            ("model.layers_per_block", self.model.layers_per_block),
            ("model.attention_heads", self.model.attention_heads),
        ];
        crate::config::ensure_positive_counts(&positive)?;
        let rates = [
            ("teacher.learning_rate", self.teacher.learning_rate),
            ("teacher.cfg_scale", self.teacher.cfg_scale),
            ("dmd.lr_generator", self.dmd.lr_generator),
            ("dmd.lr_fake", self.dmd.lr_fake),
            ("adm.lr_generator", self.adm.lr_generator),
            ("adm.lr_fake", self.adm.lr_fake),
            ("adm.lr_discriminator", self.adm.lr_discriminator),
            ("student.grad_clip", self.student.grad_clip),
            ("classifier.learning_rate", self.classifier.learning_rate),
            ("mse.learning_rate", self.mse.learning_rate),
            ("adp.lr_generator", self.adp.lr_generator),
            ("adp.lr_discriminator", self.adp.lr_discriminator),
        ];
        crate::config::ensure_positive_rates(&rates)?;
        if !(0.0..1.0).contains(&self.teacher.condition_dropout) {
            bail!("config key `teacher.condition_dropout` must be in [0, 1)");
        }
        if !(0.0..=1.0).contains(&self.student.ema_decay) {
            bail!("config key `student.ema_decay` must be in [0, 1]");
        }
        if self.methods.is_empty() {
            bail!("config key `methods` lists no method");
        }
        if self.data.test_size >= 1797 {
            bail!("config key `data.test_size` must leave digits to train on (1797 in all)");
        }
        for (key, value) in [
            ("adp.lambda_latent", self.adp.lambda_latent),
            ("adp.lambda_pixel", self.adp.lambda_pixel),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                bail!("config key `{key}` must be >= 0, got {value}");
            }
        }
        if !self.adp.sam_hidden.is_multiple_of(2) {
            bail!("config key `adp.sam_hidden` must be even (2 attention heads)");
        }
        for (c, key) in self.model.block_out_channels.iter().zip(["0", "1"]) {
            if *c == 0
                || c % self.model.norm_num_groups.max(1) != 0
                || self.model.norm_num_groups == 0
            {
                bail!("config key `model.block_out_channels` [{key}] must be a positive multiple of `model.norm_num_groups`");
            }
        }
        if self.adm.taps.is_empty() || self.adp.taps.is_empty() {
            bail!("config keys `adm.taps` and `adp.taps` must list at least one tap");
        }
        for (key, dist) in [
            ("dmd.timesteps", &self.dmd.timesteps),
            ("adp.generator_timesteps", &self.adp.generator_timesteps),
            (
                "adp.discriminator_timesteps",
                &self.adp.discriminator_timesteps,
            ),
        ] {
            dist.validate()
                .with_context(|| format!("config key `{key}`"))?;
        }
        adm_diffusion::Schedule::new(&self.schedule).context("config section `schedule`")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = include_str!("../../../../configs/toy-digits.toml");

    #[test]
    fn the_digits_config_parses_and_names_its_job() {
        let config = DigitsRunConfig::parse(DEFAULT, "toy-digits.toml", &[]).unwrap();
        assert_eq!(config.job, JOB);
        let job = crate::config::job_of(DEFAULT, "x").unwrap();
        assert_eq!(job.as_deref(), Some(JOB));
        let unet = config.model.unet(crate::digits::CONTEXT_DIM).unwrap();
        assert_eq!(unet.in_channels, 1);
        assert_eq!(unet.down_block_types[1], "CrossAttnDownBlock2D");
    }
}
