//! The training engine for real backbones: ADM (or DMD) score distillation over a frozen
//! teacher, a trainable generator and a trainable fake score that all implement `Backbone`,
//! and ADP (or MSE) pre-training of the generator on ODE pairs from a store ([`PairSource`]),
//! with convolutional discriminator heads on the teacher's features (ADP: also on a frozen
//! pixel feature extractor over decoded samples), one AdamW per network
//! (own learning rate, warm-up, clipping, non-finite guard), gradient accumulation, an EMA of
//! the generator, atomic checkpoints with exact resume, JSONL metrics, sample grids and a
//! progress bar.
//!
//! Update order per generator step (METHOD.md, docs/ARCHITECTURE.md):
//! - ADM: `ttur` fake-score updates, one generator update (then the EMA), the DMD probe (a
//!   metric, never optimised), `ttur` discriminator updates.
//! - DMD: `ttur` fake-score updates, one generator update on the DMD2 loss.
//! - ADP: one generator update on `-(l1 D1(x~_t, t) + l2 D2(decode(x~_0)))` (then the EMA),
//!   one discriminator update on the same micro-batches (fakes detached); real and fake are
//!   re-noised with the same fresh noise at the same uniform timesteps.
//! - MSE: one generator update regressing the pairs' x_0 from their line points.
//!
//! Every optimiser step sums `grad_accumulation` micro-batches. Step `n` draws all its
//! randomness from a generator seeded by `(seed, n)`, and conditions come from a
//! [`ConditionSource`] (or pairs from a [`PairSource`]) with a cursor, so a checkpoint's (seed, step, cursor) is the whole
//! random state and a resumed run repeats an uninterrupted one exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use adm_diffusion::{Schedule, TimestepDistribution};
use adm_losses as losses;
use adm_models::{
    Backbone, Condition, ConvHeadConfig, Decoder, FeatureExtractor, LatentDiscriminator,
    PixelDiscriminator,
};
use adm_nn::{derive_seed, SeededVarMap};
use anyhow::{bail, ensure, Context as _, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Checkpoints, NetEntry, TrainerState};
use crate::config::StudentOutput;
use crate::context::progress;
use crate::ema::Ema;
use crate::metrics::MetricsLog;
use crate::optim::{Optimizer, OptimizerConfig, StepStats};
use crate::pairs::PairSource;
use crate::score;
use crate::student::{line_point, Student, Trainable};

/// Which loss trains the generator: score distillation (ADM, DMD) or pre-training on ODE
/// pairs (ADP, MSE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineMethod {
    Adm,
    Dmd,
    Adp,
    Mse,
}

impl EngineMethod {
    pub fn name(self) -> &'static str {
        match self {
            Self::Adm => "adm",
            Self::Dmd => "dmd",
            Self::Adp => "adp",
            Self::Mse => "mse",
        }
    }

    /// Whether the method trains a fake score (and probes the DMD loss).
    pub fn uses_fake_score(self) -> bool {
        matches!(self, Self::Adm | Self::Dmd)
    }

    /// Whether the method reads ODE pairs (a [`PairSource`]).
    pub fn uses_pairs(self) -> bool {
        matches!(self, Self::Adp | Self::Mse)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub method: EngineMethod,
    pub seed: u64,
    /// Generator steps of the whole run.
    pub steps: usize,
    /// Samples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches summed per optimiser step.
    pub grad_accumulation: usize,
    /// One latent without the batch dimension, e.g. `[4, 128, 128]`.
    pub latent_shape: Vec<usize>,
    pub student: EngineStudent,
    /// Teacher classifier-free guidance scale.
    pub cfg_scale: f64,
    /// Fake-score (and, for ADM, discriminator) updates per generator update.
    pub ttur: usize,
    /// ADM's flow step: delta_t = T / flow_divisions (paper: 64).
    pub flow_divisions: usize,
    /// Discriminator taps on the teacher (ADM, ADP's latent discriminator).
    pub taps: Vec<String>,
    pub heads: ConvHeadConfig,
    /// DMD's re-noising timesteps (the DMD loss and the DMD probe).
    pub dmd_timesteps: TimestepDistribution,
    pub generator: OptimizerConfig,
    pub fake_score: OptimizerConfig,
    pub discriminator: OptimizerConfig,
    pub ema_decay: f64,
    pub checkpoint: CheckpointConfig,
    pub log: LogConfig,
    /// ADP (and MSE's line times); defaults are METHOD.md's.
    #[serde(default)]
    pub adp: AdpConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdpConfig {
    /// Generator line times on the pair's line (1 = x_T), from unit times: cubic
    /// `1 - u^3` (biased to high noise). MSE draws its line times from it too.
    pub generator_timesteps: TimestepDistribution,
    /// Re-noising timesteps of the latent discriminator (uniform).
    pub discriminator_timesteps: TimestepDistribution,
    pub lambda_latent: f64,
    pub lambda_pixel: f64,
    /// Layers of the pixel feature extractor (e.g. SAM blocks) the caller builds it with;
    /// one head per layer.
    pub pixel_layers: Vec<usize>,
    /// Heads on the pixel features (default: `heads`).
    pub pixel_heads: Option<ConvHeadConfig>,
}

impl Default for AdpConfig {
    fn default() -> Self {
        Self {
            generator_timesteps: TimestepDistribution::Cubic,
            discriminator_timesteps: TimestepDistribution::Uniform { min: 0.0, max: 1.0 },
            lambda_latent: 0.85,
            lambda_pixel: 0.15,
            pixel_layers: Vec::new(),
            pixel_heads: None,
        }
    }
}

impl AdpConfig {
    /// `method`: ADP checks everything, MSE only its line times.
    fn validate(&self, method: EngineMethod) -> Result<()> {
        self.generator_timesteps
            .validate()
            .context("engine.adp.generator_timesteps")?;
        if method != EngineMethod::Adp {
            return Ok(());
        }
        self.discriminator_timesteps
            .validate()
            .context("engine.adp.discriminator_timesteps")?;
        for (name, v) in [
            ("lambda_latent", self.lambda_latent),
            ("lambda_pixel", self.lambda_pixel),
        ] {
            ensure!(
                v.is_finite() && v >= 0.0,
                "engine.adp.{name} must be finite and >= 0, got {v}"
            );
        }
        ensure!(
            self.lambda_latent + self.lambda_pixel > 0.0,
            "engine.adp.lambda_latent and lambda_pixel are both 0: nothing trains the generator"
        );
        ensure!(
            self.lambda_pixel == 0.0 || !self.pixel_layers.is_empty(),
            "engine.adp.pixel_layers: lambda_pixel > 0 needs at least one pixel feature layer"
        );
        Ok(())
    }

    fn pixel_heads<'a>(&'a self, heads: &'a ConvHeadConfig) -> &'a ConvHeadConfig {
        self.pixel_heads.as_ref().unwrap_or(heads)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineStudent {
    pub output: StudentOutput,
    /// Line times s (1 = pure noise) of the sampling steps, descending; one entry: one step.
    pub steps: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every this many generator steps (and at the end of `train`).
    pub every: usize,
    pub keep_last: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Measure the DMD loss on the fixed probe set every this many steps.
    pub probe_every: usize,
    pub probe_size: usize,
    /// Write a sample grid from fixed noise every this many steps (0: never).
    pub sample_every: usize,
    pub sample_count: usize,
}

impl EngineConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.steps > 0, "engine.steps must be positive");
        ensure!(self.batch_size > 0, "engine.batch_size must be positive");
        ensure!(
            self.grad_accumulation > 0,
            "engine.grad_accumulation must be positive"
        );
        ensure!(self.ttur > 0, "engine.ttur must be positive");
        ensure!(
            self.flow_divisions > 0,
            "engine.flow_divisions must be positive"
        );
        ensure!(
            !self.latent_shape.is_empty(),
            "engine.latent_shape must not be empty"
        );
        let s = &self.student.steps;
        ensure!(
            !s.is_empty()
                && s[0] == 1.0
                && s.windows(2).all(|w| w[1] < w[0])
                && s.iter().all(|&v| v > 0.0),
            "engine.student.steps must start at 1.0 and descend in (0, 1]"
        );
        ensure!(
            !matches!(self.method, EngineMethod::Adm | EngineMethod::Adp) || !self.taps.is_empty(),
            "engine.taps: {} needs at least one discriminator tap",
            self.method.name()
        );
        self.adp.validate(self.method)?;
        self.dmd_timesteps
            .validate()
            .context("engine.dmd_timesteps")?;
        self.generator.validate("engine.generator")?;
        self.fake_score.validate("engine.fake_score")?;
        self.discriminator.validate("engine.discriminator")?;
        ensure!(
            (0.0..=1.0).contains(&self.ema_decay),
            "engine.ema_decay must be in [0, 1]"
        );
        ensure!(
            self.checkpoint.every > 0 && self.checkpoint.keep_last > 0,
            "engine.checkpoint.every and keep_last must be positive"
        );
        ensure!(
            self.log.probe_every > 0 && self.log.probe_size > 0 && self.log.sample_count > 0,
            "engine.log.probe_every, probe_size and sample_count must be positive"
        );
        Ok(())
    }
}

/// Where the conditions of training batches come from (pre-encoded prompts, class labels).
/// The cursor makes the stream resumable.
pub trait ConditionSource {
    /// The next `n` conditions; advances the cursor.
    fn next(&mut self, n: usize) -> Result<Condition>;
    /// `n` fixed conditions (for probes and sample grids); leaves the cursor alone.
    fn fixed(&self, n: usize) -> Result<Condition>;
    fn cursor(&self) -> u64;
    fn seek(&mut self, cursor: u64) -> Result<()>;
}

/// A fixed set of conditions (e.g. encoded prompts) served in order, cycling.
pub struct ConditionBank {
    all: Condition,
    len: usize,
    cursor: u64,
}

impl ConditionBank {
    /// `all`: every tensor with the same leading (bank size) dimension.
    pub fn new(all: Condition) -> Result<Self> {
        let mut len = None;
        for (name, t) in all.iter() {
            let n = t.dim(0)?;
            match len {
                None => len = Some(n),
                Some(l) if l != n => {
                    bail!("condition bank: tensor `{name}` has {n} rows, the others {l}")
                }
                Some(_) => {}
            }
        }
        let len = len
            .filter(|&l| l > 0)
            .context("condition bank: no conditions")?;
        Ok(Self {
            all,
            len,
            cursor: 0,
        })
    }

    fn rows(&self, start: u64, n: usize) -> Result<Condition> {
        let idx: Vec<u32> = (0..n as u64)
            .map(|i| ((start + i) % self.len as u64) as u32)
            .collect();
        let device = self.all.iter().next().map(|(_, t)| t.device().clone());
        let idx = Tensor::from_vec(idx, n, &device.unwrap_or(Device::Cpu))?;
        Ok(self.all.map(|t| t.index_select(&idx, 0))?)
    }
}

impl ConditionSource for ConditionBank {
    fn next(&mut self, n: usize) -> Result<Condition> {
        let rows = self.rows(self.cursor, n)?;
        self.cursor += n as u64;
        Ok(rows)
    }

    fn fixed(&self, n: usize) -> Result<Condition> {
        self.rows(0, n)
    }

    fn cursor(&self) -> u64 {
        self.cursor
    }

    fn seek(&mut self, cursor: u64) -> Result<()> {
        self.cursor = cursor;
        Ok(())
    }
}

/// The networks an engine trains: a frozen teacher (real score and discriminator
/// backbone), and generator and fake score initialised by the caller (usually from the
/// teacher's weights) with their Vars in trainable maps.
pub struct EngineNets<B> {
    pub teacher: Arc<dyn Backbone>,
    pub generator: Trainable<B>,
    /// Required by ADM and DMD; ADP and MSE have none (pass `None`).
    pub fake_score: Option<Trainable<B>>,
    /// ADP's pixel discriminator backbone; may be `None` when `adp.lambda_pixel` is 0 (and
    /// for the other methods).
    pub pixel: Option<PixelNets>,
    /// config.json written beside the generator, its EMA and the fake score in checkpoints
    /// (e.g. the UNet's diffusers config), so each folder loads as a model.
    pub net_config: Option<serde_json::Value>,
}

/// ADP's frozen pixel discriminator backbone: latents are decoded (a VAE, or the identity
/// for pixel-space models), then read by the feature extractor (SAM, DINOv2) built with
/// `adp.pixel_layers`.
#[derive(Clone)]
pub struct PixelNets {
    pub decoder: Arc<dyn Decoder>,
    pub extractor: Arc<dyn FeatureExtractor>,
}

/// Where training data comes from: conditions only (ADM, DMD) or ODE pairs (ADP, MSE; also
/// usable by ADM and DMD, which then read only the stored conditions).
pub enum EngineData {
    Conditions(Box<dyn ConditionSource>),
    Pairs(PairSource),
}

impl From<Box<dyn ConditionSource>> for EngineData {
    fn from(source: Box<dyn ConditionSource>) -> Self {
        Self::Conditions(source)
    }
}

impl<S: ConditionSource + 'static> From<Box<S>> for EngineData {
    fn from(source: Box<S>) -> Self {
        Self::Conditions(source)
    }
}

impl From<PairSource> for EngineData {
    fn from(pairs: PairSource) -> Self {
        Self::Pairs(pairs)
    }
}

impl EngineData {
    fn conditions(&self) -> &dyn ConditionSource {
        match self {
            Self::Conditions(source) => source.as_ref(),
            Self::Pairs(pairs) => pairs,
        }
    }

    fn conditions_mut(&mut self) -> &mut dyn ConditionSource {
        match self {
            Self::Conditions(source) => source.as_mut(),
            Self::Pairs(pairs) => pairs,
        }
    }
}

/// The discriminator: conv heads on the frozen teacher (ADM; ADP's latent D_tau1), ADP's
/// pixel discriminator D_tau2 (heads under `pixel.`), and one optimiser for all heads.
struct Discriminator {
    heads: SeededVarMap,
    model: LatentDiscriminator,
    pixel: Option<(Arc<dyn Decoder>, PixelDiscriminator)>,
    opt: Optimizer,
}

impl Discriminator {
    fn pixel_logits(&self, x0: &Tensor) -> Result<Option<Tensor>> {
        Ok(match &self.pixel {
            Some((decoder, model)) => Some(model.logits(&decoder.decode_latents(x0)?)?),
            None => None,
        })
    }

    /// `-(l1 D1(x~_t, t) + l2 D2(decode(x~_0)))`.
    fn adp_generator_loss(
        &self,
        b: &AdpBatch,
        schedule: &Schedule,
        cfg: &AdpConfig,
    ) -> Result<Tensor> {
        let fake_t = schedule.add_noise(&b.fake_x0, &b.eps, &b.t)?;
        let latent = self.model.logits(&fake_t, &b.t, &b.cond)?;
        Ok(match self.pixel_logits(&b.fake_x0)? {
            Some(pixel) => {
                losses::adp_generator(&latent, &pixel, cfg.lambda_latent, cfg.lambda_pixel)?
            }
            None => losses::hinge_generator(&latent)?.affine(cfg.lambda_latent, 0.0)?,
        })
    }

    /// The weighted hinge losses of both discriminators on real and detached fake samples.
    fn adp_loss(&self, b: &AdpBatch, schedule: &Schedule, cfg: &AdpConfig) -> Result<Tensor> {
        let fake_x0 = b.fake_x0.detach();
        let real_t = schedule.add_noise(&b.x0, &b.eps, &b.t)?;
        let fake_t = schedule.add_noise(&fake_x0, &b.eps, &b.t)?;
        let latent_real = self.model.logits(&real_t, &b.t, &b.cond)?;
        let latent_fake = self.model.logits(&fake_t, &b.t, &b.cond)?;
        Ok(
            match (self.pixel_logits(&b.x0)?, self.pixel_logits(&fake_x0)?) {
                (Some(pixel_real), Some(pixel_fake)) => losses::adp_discriminator(
                    &latent_real,
                    &latent_fake,
                    &pixel_real,
                    &pixel_fake,
                    cfg.lambda_latent,
                    cfg.lambda_pixel,
                )?,
                _ => losses::hinge_discriminator(&latent_real, &latent_fake)?
                    .affine(cfg.lambda_latent, 0.0)?,
            },
        )
    }
}

/// One ADP micro-batch: the pairs' x_0, the generator's x~_0 and the shared re-noising.
struct AdpBatch {
    x0: Tensor,
    fake_x0: Tensor,
    cond: Condition,
    t: Tensor,
    eps: Tensor,
}

/// Fixed inputs on which the DMD loss is measured, so values at different steps compare.
struct Probe {
    noise: Tensor,
    cond: Condition,
    t: Tensor,
    eps: Tensor,
    renoise_seed: u64,
}

pub struct Engine<B: Backbone> {
    config: EngineConfig,
    run_dir: PathBuf,
    teacher: Arc<dyn Backbone>,
    student: Student<B>,
    /// The fake score and its optimiser (ADM, DMD).
    fake: Option<(Trainable<B>, Optimizer)>,
    net_config: Option<serde_json::Value>,
    discriminator: Option<Discriminator>,
    opt_g: Optimizer,
    ema: Ema,
    data: EngineData,
    checkpoints: Checkpoints,
    /// The DMD probe (methods with a fake score).
    probe: Option<Probe>,
    device: Device,
    /// Generator steps completed.
    step: usize,
}

/// Stats of one generator step, for the metrics row.
struct StepRecord {
    fake: Option<StepStats>,
    generator: StepStats,
    discriminator: Option<StepStats>,
    dmd_probe: Option<f64>,
}

const GENERATOR: &str = "generator";
const GENERATOR_EMA: &str = "generator_ema";
const FAKE_SCORE: &str = "fake_score";
const DISCRIMINATOR: &str = "discriminator";

impl<B: Backbone + 'static> Engine<B> {
    /// `data`: a `Box` of any [`ConditionSource`] (ADM, DMD) or a [`PairSource`] (any
    /// method; ADP and MSE need one).
    pub fn new(
        config: EngineConfig,
        run_dir: &Path,
        nets: EngineNets<B>,
        data: impl Into<EngineData>,
    ) -> Result<Self> {
        config.validate()?;
        let data = data.into();
        let method = config.method.name();
        if config.method.uses_pairs() && !matches!(data, EngineData::Pairs(_)) {
            bail!("engine.method = {method} trains on ODE pairs: pass a PairSource as its data");
        }
        let device = nets
            .generator
            .varmap()
            .all_vars()
            .first()
            .map(|v| v.device().clone())
            .context("the generator has no Var")?;
        let discriminator = match config.method {
            EngineMethod::Dmd | EngineMethod::Mse => None,
            EngineMethod::Adm | EngineMethod::Adp => {
                let heads = SeededVarMap::new(derive_seed(config.seed, "discriminator-heads"));
                let vb = heads.var_builder(DType::F32, &device);
                let model = LatentDiscriminator::with_conv_heads(
                    nets.teacher.clone(),
                    &config.taps,
                    &config.heads,
                    vb.clone(),
                )?;
                let pixel = if config.method == EngineMethod::Adp && config.adp.lambda_pixel > 0.0 {
                    let pixel = nets.pixel.clone().context(
                        "engine.adp.lambda_pixel > 0 needs a pixel discriminator backbone \
                         (EngineNets::pixel: decoder and feature extractor)",
                    )?;
                    let layers = pixel.extractor.feature_channels().len();
                    ensure!(
                        layers == config.adp.pixel_layers.len(),
                        "engine.adp.pixel_layers names {} layers, the feature extractor gives {layers}",
                        config.adp.pixel_layers.len()
                    );
                    let model = PixelDiscriminator::with_conv_heads(
                        pixel.extractor,
                        config.adp.pixel_heads(&config.heads),
                        vb.pp("pixel"),
                    )
                    .context("engine.adp.pixel_heads")?;
                    Some((pixel.decoder, model))
                } else {
                    None
                };
                let opt = Optimizer::with_config(
                    DISCRIMINATOR,
                    heads.varmap(),
                    config.discriminator.clone(),
                )?;
                Some(Discriminator {
                    heads,
                    model,
                    pixel,
                    opt,
                })
            }
        };
        let opt_g =
            Optimizer::with_config(GENERATOR, nets.generator.varmap(), config.generator.clone())?;
        let fake = if config.method.uses_fake_score() {
            let fake = nets.fake_score.with_context(|| {
                format!("engine.method = {method} needs a fake score (EngineNets::fake_score)")
            })?;
            let opt = Optimizer::with_config(FAKE_SCORE, fake.varmap(), config.fake_score.clone())?;
            Some((fake, opt))
        } else {
            None
        };
        let ema = Ema::new(nets.generator.varmap(), config.ema_decay)?;
        let probe = if fake.is_some() {
            let n = config.log.probe_size;
            let mut rng = StdRng::seed_from_u64(derive_seed(config.seed, "dmd-probe"));
            let t = config
                .dmd_timesteps
                .sample(nets.teacher.schedule(), n, &mut rng);
            Some(Probe {
                noise: adm_nn::randn(&mut rng, latent_dims(&config, n), &device)?,
                cond: data.conditions().fixed(n)?,
                t: per_sample(&t, &device)?,
                eps: adm_nn::randn(&mut rng, latent_dims(&config, n), &device)?,
                renoise_seed: derive_seed(config.seed, "dmd-probe-renoise"),
            })
        } else {
            None
        };
        Ok(Self {
            checkpoints: Checkpoints::new(
                run_dir.join("checkpoints"),
                config.checkpoint.keep_last,
            )?,
            student: Student {
                model: nets.generator,
                output: config.student.output,
                steps: config.student.steps.clone(),
            },
            fake,
            teacher: nets.teacher,
            net_config: nets.net_config,
            run_dir: run_dir.to_path_buf(),
            discriminator,
            opt_g,
            ema,
            data,
            probe,
            device,
            step: 0,
            config,
        })
    }

    /// Generator steps completed.
    pub fn step(&self) -> usize {
        self.step
    }

    pub fn checkpoints(&self) -> &Checkpoints {
        &self.checkpoints
    }

    pub fn generator(&self) -> &Trainable<B> {
        &self.student.model
    }

    /// The fake score (ADM, DMD).
    pub fn fake_score(&self) -> Option<&Trainable<B>> {
        self.fake.as_ref().map(|(f, _)| f)
    }

    /// The discriminator heads' Vars (ADM; ADP: latent heads, pixel heads under `pixel.`).
    pub fn discriminator_heads(&self) -> Option<&SeededVarMap> {
        self.discriminator.as_ref().map(|d| &d.heads)
    }

    pub fn ema(&self) -> &Ema {
        &self.ema
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.run_dir.join("metrics.jsonl")
    }

    /// (folder name, Vars, config.json) of every network a checkpoint holds. VarMaps are
    /// shared handles: the clones point at the same Vars.
    fn net_maps(&self) -> Vec<(&'static str, VarMap, Option<serde_json::Value>)> {
        let mut nets = vec![
            (
                GENERATOR,
                self.student.model.varmap().clone(),
                self.net_config.clone(),
            ),
            (
                GENERATOR_EMA,
                self.ema.varmap().clone(),
                self.net_config.clone(),
            ),
        ];
        if let Some((fake, _)) = &self.fake {
            nets.push((FAKE_SCORE, fake.varmap().clone(), self.net_config.clone()));
        }
        if let Some(d) = &self.discriminator {
            let mut config =
                serde_json::json!({ "taps": self.config.taps, "heads": self.config.heads });
            if d.pixel.is_some() {
                let adp = &self.config.adp;
                config["pixel_layers"] = serde_json::json!(adp.pixel_layers);
                config["pixel_heads"] = serde_json::json!(adp.pixel_heads(&self.config.heads));
            }
            nets.push((DISCRIMINATOR, d.heads.varmap().clone(), Some(config)));
        }
        nets
    }

    /// Resumes from the checkpoint `latest` names, if any; returns its step. When that
    /// checkpoint is bad the error lists the earlier ones (load one with `resume_from`).
    pub fn resume(&mut self) -> Result<Option<usize>> {
        let Some(dir) = self.checkpoints.latest()? else {
            return Ok(None);
        };
        self.resume_from(&dir).map(Some).map_err(|e| {
            let earlier: Vec<String> = self
                .checkpoints
                .list()
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, d)| d != &dir)
                .map(|(_, d)| d.display().to_string())
                .collect();
            e.context(format!(
                "cannot resume from {} (earlier checkpoints: [{}])",
                dir.display(),
                earlier.join(", ")
            ))
        })
    }

    /// Loads checkpoint `dir` (all nets, optimisers, EMA, step, data cursor). On error
    /// nothing has changed.
    pub fn resume_from(&mut self, dir: &Path) -> Result<usize> {
        let maps = self.net_maps();
        let mut optimizers = vec![&mut self.opt_g];
        if let Some((_, opt)) = self.fake.as_mut() {
            optimizers.push(opt);
        }
        if let Some(d) = self.discriminator.as_mut() {
            optimizers.push(&mut d.opt);
        }
        let state = checkpoint::load(dir, &entries(&maps), &mut optimizers)?;
        if state.seed != self.config.seed {
            tracing::warn!(
                checkpoint = state.seed,
                config = self.config.seed,
                "resuming under a different seed: the run will not repeat the original"
            );
        }
        self.data.conditions_mut().seek(state.data_cursor)?;
        self.step = state.step;
        tracing::info!(step = state.step, dir = %dir.display(), "resumed");
        Ok(state.step)
    }

    /// Writes a checkpoint of the current step.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let state = TrainerState::new(
            self.step,
            self.config.seed,
            self.data.conditions().cursor(),
            serde_json::to_value(&self.config)?,
        );
        let mut optimizers = vec![&self.opt_g];
        if let Some((_, opt)) = &self.fake {
            optimizers.push(opt);
        }
        if let Some(d) = &self.discriminator {
            optimizers.push(&d.opt);
        }
        let maps = self.net_maps();
        let dir = self.checkpoints.save(state, &entries(&maps), &optimizers)?;
        tracing::info!(step = self.step, dir = %dir.display(), "checkpoint");
        Ok(dir)
    }

    /// Trains until `until` generator steps are complete (at most `config.steps`), with
    /// checkpoints every `checkpoint.every` steps and at the end.
    pub fn train(&mut self, until: usize) -> Result<()> {
        let until = until.min(self.config.steps);
        let mut log = if self.step == 0 {
            MetricsLog::create(&self.metrics_path())?
        } else {
            MetricsLog::resume(&self.metrics_path(), self.step)?
        };
        let bar = progress(self.config.method.name(), until);
        bar.set_position(self.step as u64);
        let mut saved_at = None;
        while self.step < until {
            let started = Instant::now();
            let record = self.train_step()?;
            self.step += 1;
            let per_sec = 1.0 / started.elapsed().as_secs_f64();
            let mut row = Vec::new();
            if let Some(f) = &record.fake {
                row.push(("loss_fake_score", f.loss));
                row.push(("grad_norm_fake_score", f.grad_norm));
            }
            row.extend([
                ("loss_generator", record.generator.loss),
                ("grad_norm_generator", record.generator.grad_norm),
                ("lr_generator", record.generator.learning_rate),
                ("skipped_steps", self.skipped_steps() as f64),
                ("steps_per_sec", per_sec),
            ]);
            if let Some(d) = &record.discriminator {
                row.push(("loss_discriminator", d.loss));
                row.push(("grad_norm_discriminator", d.grad_norm));
            }
            if let Some(p) = record.dmd_probe {
                row.push(("dmd_probe", p));
            }
            log.record(self.step - 1, &row)?;
            bar.set_message(match (&record.fake, &record.discriminator) {
                (Some(f), _) => format!("g {:.4} f {:.4}", record.generator.loss, f.loss),
                (None, Some(d)) => format!("g {:.4} d {:.4}", record.generator.loss, d.loss),
                (None, None) => format!("g {:.4}", record.generator.loss),
            });
            bar.inc(1);
            if self.config.log.sample_every > 0
                && self.step.is_multiple_of(self.config.log.sample_every)
            {
                self.write_samples()?;
            }
            if self.step.is_multiple_of(self.config.checkpoint.every) || self.step == until {
                log.sync()?;
                self.save_checkpoint()?;
                saved_at = Some(self.step);
            }
        }
        if saved_at.is_none() {
            log.sync()?;
        }
        bar.finish();
        Ok(())
    }

    fn skipped_steps(&self) -> usize {
        self.opt_g.skipped()
            + self.fake.as_ref().map_or(0, |(_, opt)| opt.skipped())
            + self.discriminator.as_ref().map_or(0, |d| d.opt.skipped())
    }

    /// One generator step in METHOD.md's order.
    fn train_step(&mut self) -> Result<StepRecord> {
        let mut rng = StdRng::seed_from_u64(derive_seed(
            self.config.seed,
            &format!("step-{}", self.step),
        ));
        match self.config.method {
            EngineMethod::Adm | EngineMethod::Dmd => self.score_step(&mut rng),
            EngineMethod::Adp => self.adp_step(&mut rng),
            EngineMethod::Mse => self.mse_step(&mut rng),
        }
    }

    /// ADM / DMD: fake score, generator (and EMA), DMD probe, discriminator (ADM).
    fn score_step(&mut self, rng: &mut StdRng) -> Result<StepRecord> {
        let micro = self.config.grad_accumulation;
        let scale = 1.0 / micro as f64;
        let delta_t = self.teacher.schedule().delta_t(self.config.flow_divisions);
        let (fake_net, opt_f) = self
            .fake
            .as_mut()
            .context("ADM and DMD train a fake score")?;

        let mut fake = None;
        for _ in 0..self.config.ttur {
            for _ in 0..micro {
                let (x0, cond) = student_batch(
                    &self.student,
                    self.data.conditions_mut(),
                    &self.config,
                    &self.device,
                    rng,
                )?;
                let x0 = x0.detach();
                let (x_t, t, eps) = score::noised(self.teacher.schedule(), &x0, 0.0, rng)?;
                let loss =
                    score::fake_score_loss(fake_net.net.as_ref(), &x0, (&x_t, &t, &eps), &cond)?;
                opt_f.accumulate(&loss, scale)?;
            }
            fake = Some(opt_f.apply()?);
        }
        let fake_net = fake_net.net.clone();

        for _ in 0..micro {
            let (x0, cond) = student_batch(
                &self.student,
                self.data.conditions_mut(),
                &self.config,
                &self.device,
                rng,
            )?;
            let loss = match &self.discriminator {
                Some(d) => {
                    let (x_t, t, _) = score::noised(self.teacher.schedule(), &x0, delta_t, rng)?;
                    score::adm_generator_loss(
                        fake_net.as_ref(),
                        &d.model,
                        &x_t,
                        &t,
                        delta_t,
                        &cond,
                    )?
                }
                None => {
                    let n = x0.dim(0)?;
                    let t = self
                        .config
                        .dmd_timesteps
                        .sample(self.teacher.schedule(), n, rng);
                    let t = per_sample(&t, &self.device)?;
                    let eps = adm_nn::randn(rng, x0.shape(), &self.device)?;
                    score::dmd_loss(
                        self.teacher.as_ref(),
                        self.config.cfg_scale,
                        fake_net.as_ref(),
                        &x0,
                        &cond,
                        &t,
                        &eps,
                    )?
                }
            };
            self.opt_g.accumulate(&loss, scale)?;
        }
        let generator = self.opt_g.apply()?;
        if !generator.skipped {
            self.ema.update()?;
        }

        let dmd_probe = if self.step.is_multiple_of(self.config.log.probe_every) {
            self.probe_dmd_loss()?
        } else {
            None
        };

        let mut discriminator = None;
        if let Some(d) = self.discriminator.as_mut() {
            for _ in 0..self.config.ttur {
                for _ in 0..micro {
                    let (x0, cond) = student_batch(
                        &self.student,
                        self.data.conditions_mut(),
                        &self.config,
                        &self.device,
                        rng,
                    )?;
                    let (x_t, t, _) =
                        score::noised(self.teacher.schedule(), &x0.detach(), delta_t, rng)?;
                    let loss = score::adm_discriminator_loss(
                        self.teacher.as_ref(),
                        self.config.cfg_scale,
                        fake_net.as_ref(),
                        &d.model,
                        &x_t,
                        &t,
                        delta_t,
                        &cond,
                    )?;
                    d.opt.accumulate(&loss, scale)?;
                }
                discriminator = Some(d.opt.apply()?);
            }
        }
        Ok(StepRecord {
            fake,
            generator,
            discriminator,
            dmd_probe,
        })
    }

    /// The next pairs and the generator's x~_0 from their line points at line times drawn
    /// from `adp.generator_timesteps`: (pairs' x_0, x~_0 with gradient, condition).
    fn line_batch(&mut self, rng: &mut StdRng) -> Result<(Tensor, Tensor, Condition)> {
        let EngineData::Pairs(pairs) = &mut self.data else {
            bail!("ADP and MSE train on ODE pairs");
        };
        let n = self.config.batch_size;
        let p = pairs.next_pairs(n)?;
        let s = self.config.adp.generator_timesteps.sample_unit(n, rng);
        let fake_x0 =
            self.student
                .x0_from_line(&line_point(&p.sample, &p.noise, &s)?, &s, &p.cond)?;
        Ok((p.sample, fake_x0, p.cond))
    }

    /// ADP: generator update (then the EMA), then a discriminator update on the same
    /// micro-batches with detached fakes.
    fn adp_step(&mut self, rng: &mut StdRng) -> Result<StepRecord> {
        let micro = self.config.grad_accumulation;
        let scale = 1.0 / micro as f64;
        let mut batches = Vec::with_capacity(micro);
        for _ in 0..micro {
            let (x0, fake_x0, cond) = self.line_batch(rng)?;
            let n = x0.dim(0)?;
            let t = self
                .config
                .adp
                .discriminator_timesteps
                .sample(self.teacher.schedule(), n, rng);
            let batch = AdpBatch {
                t: per_sample(&t, &self.device)?,
                eps: adm_nn::randn(rng, x0.shape(), &self.device)?,
                x0,
                fake_x0,
                cond,
            };
            let d = self
                .discriminator
                .as_ref()
                .context("ADP has a discriminator")?;
            let loss = d.adp_generator_loss(&batch, self.teacher.schedule(), &self.config.adp)?;
            self.opt_g.accumulate(&loss, scale)?;
            batches.push(AdpBatch {
                fake_x0: batch.fake_x0.detach(),
                ..batch
            });
        }
        let generator = self.opt_g.apply()?;
        if !generator.skipped {
            self.ema.update()?;
        }
        let d = self
            .discriminator
            .as_mut()
            .context("ADP has a discriminator")?;
        for batch in &batches {
            let loss = d.adp_loss(batch, self.teacher.schedule(), &self.config.adp)?;
            d.opt.accumulate(&loss, scale)?;
        }
        Ok(StepRecord {
            fake: None,
            generator,
            discriminator: Some(d.opt.apply()?),
            dmd_probe: None,
        })
    }

    /// MSE: regression of the pairs' x_0 (rectified-flow / DMD2 pre-training, the ablation).
    fn mse_step(&mut self, rng: &mut StdRng) -> Result<StepRecord> {
        let micro = self.config.grad_accumulation;
        for _ in 0..micro {
            let (x0, fake_x0, _) = self.line_batch(rng)?;
            let loss = losses::mse(&fake_x0, &x0)?;
            self.opt_g.accumulate(&loss, 1.0 / micro as f64)?;
        }
        let generator = self.opt_g.apply()?;
        if !generator.skipped {
            self.ema.update()?;
        }
        Ok(StepRecord {
            fake: None,
            generator,
            discriminator: None,
            dmd_probe: None,
        })
    }

    /// The DMD loss of the current generator on the fixed probe set (methods with a fake
    /// score; `None` for the others).
    pub fn probe_dmd_loss(&self) -> Result<Option<f64>> {
        let (Some(p), Some((fake, _))) = (&self.probe, &self.fake) else {
            return Ok(None);
        };
        let mut renoise = StdRng::seed_from_u64(p.renoise_seed);
        let x0 = self.student.sample(&p.noise, &p.cond, &mut renoise)?;
        let loss = score::dmd_loss(
            self.teacher.as_ref(),
            self.config.cfg_scale,
            fake.net.as_ref(),
            &x0,
            &p.cond,
            &p.t,
            &p.eps,
        )?;
        Ok(Some(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?))
    }

    /// `samples/step-{N:08}.png`: the generator's samples from fixed noise and conditions,
    /// one row per sample, one grey-scale cell per channel (frames of video latents are shown
    /// as further channels).
    pub fn write_samples(&self) -> Result<PathBuf> {
        let n = self.config.log.sample_count;
        let mut rng = StdRng::seed_from_u64(derive_seed(self.config.seed, "sample-noise"));
        let noise = adm_nn::randn(&mut rng, latent_dims(&self.config, n), &self.device)?;
        let cond = self.data.conditions().fixed(n)?;
        let x0 = self.student.sample(&noise, &cond, &mut rng)?;
        let dims = x0.dims().to_vec();
        let grid_dims = match dims.as_slice() {
            [n, c, h, w] => [*n, *c, *h, *w],
            [n, rest @ .., h, w] if !rest.is_empty() => [*n, rest.iter().product(), *h, *w],
            [n, c] => [*n, *c, 1, 1],
            _ => bail!("cannot draw samples of shape {dims:?}"),
        };
        let values = x0.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let dir = self.run_dir.join("samples");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.png", checkpoint::step_dir_name(self.step)));
        adm_eval::channel_grid_png(&path, &values, grid_dims, 8)?;
        Ok(path)
    }

    /// The generator's and its EMA's weights, by tensor name.
    pub fn generator_weights(&self) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
        (
            adm_models::varmap_tensors(self.student.model.varmap()),
            adm_models::varmap_tensors(self.ema.varmap()),
        )
    }
}

fn entries<'a>(maps: &'a [(&'static str, VarMap, Option<serde_json::Value>)]) -> Vec<NetEntry<'a>> {
    maps.iter()
        .map(|(name, varmap, config)| NetEntry {
            name,
            varmap,
            config: config.clone(),
        })
        .collect()
}

/// Generator outputs with gradient (backward simulation for multi-step students) and their
/// conditions.
fn student_batch<B: Backbone>(
    student: &Student<B>,
    source: &mut dyn ConditionSource,
    config: &EngineConfig,
    device: &Device,
    rng: &mut StdRng,
) -> Result<(Tensor, Condition)> {
    let n = config.batch_size;
    let cond = source.next(n)?;
    let noise = adm_nn::randn(rng, latent_dims(config, n), device)?;
    let x0 = student.training_output(&noise, &cond, rng)?;
    Ok((x0, cond))
}

fn latent_dims(config: &EngineConfig, n: usize) -> Vec<usize> {
    let mut dims = vec![n];
    dims.extend(&config.latent_shape);
    dims
}

fn per_sample(values: &[f64], device: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_vec(
        values.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        values.len(),
        device,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine config as a TOML section reads it (e.g. a `[stage]` of a recipe).
    const TOML: &str = r#"
        method = "adm"
        seed = 0
        steps = 1000
        batch_size = 4
        grad_accumulation = 2
        latent_shape = [4, 128, 128]
        cfg_scale = 8.0
        ttur = 1
        flow_divisions = 64
        taps = ["down_blocks.2", "mid_block", "up_blocks.1"]
        ema_decay = 0.999
        dmd_timesteps = { kind = "uniform", min = 0.02, max = 0.98 }
        student = { output = "native", steps = [1.0] }
        heads = { dims = "2d", layers = 2, channels = 256, groups = 32 }
        generator = { learning_rate = 5e-7, warmup_steps = 100, grad_clip = 10.0 }
        fake_score = { learning_rate = 5e-7, grad_clip = 10.0 }
        discriminator = { learning_rate = 5e-7, grad_clip = 10.0, weight_decay = 0.01 }
        checkpoint = { every = 500, keep_last = 3 }
        log = { probe_every = 50, probe_size = 8, sample_every = 250, sample_count = 4 }

        [adp]
        pixel_layers = [2, 5, 8, 11]
        pixel_heads = { dims = "2d", layers = 1, channels = 128, groups = 32 }
    "#;

    #[test]
    fn config_reads_from_toml_and_bad_values_are_named() -> Result<()> {
        let cfg: EngineConfig = toml::from_str(TOML)?;
        cfg.validate()?;
        assert_eq!(cfg.heads.dims, adm_models::HeadDims::Image);
        assert_eq!(cfg.generator.betas, [0.9, 0.999]);
        assert_eq!(cfg.generator.learning_rate_at(49), 5e-7 * 0.5);

        let err = toml::from_str::<EngineConfig>(&TOML.replace("\"2d\"", "\"4d\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("heads") && err.contains("4d"), "{err}");
        let mut bad = cfg.clone();
        bad.student.steps = vec![0.5, 1.0];
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("engine.student.steps"), "{err}");
        let mut bad = cfg.clone();
        bad.discriminator.grad_clip = 0.0;
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("engine.discriminator"), "{err}");
        Ok(())
    }

    #[test]
    fn adp_config_has_method_defaults_and_bad_values_are_named() -> Result<()> {
        let cfg: EngineConfig = toml::from_str(&TOML.replace("\"adm\"", "\"adp\""))?;
        cfg.validate()?;
        assert_eq!(cfg.adp.generator_timesteps, TimestepDistribution::Cubic);
        assert_eq!(
            cfg.adp.discriminator_timesteps,
            TimestepDistribution::Uniform { min: 0.0, max: 1.0 }
        );
        assert_eq!((cfg.adp.lambda_latent, cfg.adp.lambda_pixel), (0.85, 0.15));
        assert_eq!(cfg.adp.pixel_layers, [2, 5, 8, 11]);
        assert_eq!(cfg.adp.pixel_heads(&cfg.heads).channels, 128);
        // Without the table: the defaults, pixel heads as the latent ones.
        let plain: EngineConfig = toml::from_str(TOML.split("[adp]").next().unwrap())?;
        assert_eq!(plain.adp.pixel_heads(&plain.heads), &plain.heads);

        let named = |edit: fn(&mut AdpConfig)| {
            let mut bad = cfg.clone();
            edit(&mut bad.adp);
            bad.validate().unwrap_err().to_string()
        };
        let err = named(|a| a.lambda_pixel = -0.1);
        assert!(err.contains("engine.adp.lambda_pixel"), "{err}");
        let err = named(|a| a.lambda_latent = f64::NAN);
        assert!(err.contains("engine.adp.lambda_latent"), "{err}");
        let err = named(|a| a.pixel_layers.clear());
        assert!(err.contains("engine.adp.pixel_layers"), "{err}");
        let err = named(|a| {
            a.discriminator_timesteps = TimestepDistribution::Uniform { min: 0.5, max: 0.2 }
        });
        assert!(err.contains("engine.adp.discriminator_timesteps"), "{err}");
        let err = toml::from_str::<EngineConfig>(&TOML.replace("pixel_layers", "pixel_layer"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pixel_layer"), "{err}");
        // With lambda_pixel = 0 no pixel layers are needed.
        let mut latent_only = cfg;
        latent_only.adp.lambda_pixel = 0.0;
        latent_only.adp.pixel_layers.clear();
        latent_only.validate()?;
        Ok(())
    }

    #[test]
    fn condition_bank_cycles_and_seeks() -> Result<()> {
        let rows = Tensor::arange(0f32, 5.0, &Device::Cpu)?;
        let mut bank = ConditionBank::new(Condition::new().with("c", rows))?;
        let take = |c: Condition| c.get("c").unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(take(bank.next(3)?), [0.0, 1.0, 2.0]);
        assert_eq!(take(bank.next(3)?), [3.0, 4.0, 0.0]);
        assert_eq!(bank.cursor(), 6);
        assert_eq!(take(bank.fixed(2)?), [0.0, 1.0]);
        bank.seek(4)?;
        assert_eq!(take(bank.next(2)?), [4.0, 0.0]);
        let ragged = Condition::new()
            .with("a", Tensor::zeros(2, DType::F32, &Device::Cpu)?)
            .with("b", Tensor::zeros(3, DType::F32, &Device::Cpu)?);
        let err = ConditionBank::new(ragged).err().unwrap().to_string();
        assert!(err.contains("`b` has 3 rows"), "{err}");
        Ok(())
    }
}
