//! The digits toy (`configs/toy-digits.toml`): a tiny SDXL-architecture UNet teacher,
//! class-conditional through cross-attention on a one-hot class token, trained on the real
//! 8x8 UCI digits; ODE pairs through the store; one-step students by DMD and ADM over the
//! training engine; a classifier trained in the run scores every row
//! (`adm_eval::digits_metrics`). Every stage caches its output with the settings it depends
//! on: a re-run resumes, a changed setting recomputes.

pub mod classifier;
pub mod config;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use adm_data::store::{
    ConditionSpec, Manifest, Partition, StoreDtype, StoreReader, StoreSpec, StoreWriter,
};
use adm_data::{Digits, DIGIT_SIZE, NUM_DIGIT_CLASSES};
use adm_diffusion::Schedule;
use adm_eval::{digits_metrics, DigitsMetrics, Scored, Table};
use adm_models::sam::{SamFeatureExtractor, SamVisionEncoder};
use adm_models::unet_2d::{
    Config as UNetConfig, UNet2DConditionModel, UNetBackbone, ENCODER_HIDDEN_STATES,
    NEGATIVE_ENCODER_HIDDEN_STATES,
};
use adm_models::{varmap_tensors, Backbone, Condition, Decoder};
use adm_nn::derive_seed;
use anyhow::{Context as _, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::collect::collect;
use crate::context::{config_fingerprint, progress};
use crate::engine::{
    AdpConfig, CheckpointConfig, ConditionBank, Engine, EngineConfig, EngineData, EngineMethod,
    EngineNets, EngineStudent, LogConfig, PixelNets,
};
use crate::metrics::MetricsLog;
use crate::optim::{Optimizer, OptimizerConfig};
use crate::pairs::PairSource;
use crate::pipeline::{dmd_span, trace_ends, write_json_atomic};
use crate::student::{Student, Trainable};
use crate::teacher::{cached_weights, store_weights, teacher_lr_decay, Teacher};
pub use classifier::{train_classifier, Classifier};
pub use config::{DigitsMethod, DigitsRunConfig, JOB};

/// The class token: a one-hot over the 10 digits plus the null class (index 10) that
/// condition dropout and classifier-free guidance use.
pub const CONTEXT_DIM: usize = NUM_DIGIT_CLASSES + 1;
const NULL_CLASS: usize = NUM_DIGIT_CLASSES;
const TEACHER_SECTIONS: [&str; 5] = ["seed", "data", "schedule", "model", "teacher"];

/// The `encoder_hidden_states` (B, 1, 11) of `classes` (10 = null) and the null token as
/// `negative_encoder_hidden_states`, the CFG unconditional input.
pub fn class_tokens(classes: &[usize], device: &Device) -> Result<Condition> {
    let n = classes.len();
    let mut positive = vec![0f32; n * CONTEXT_DIM];
    let mut negative = vec![0f32; n * CONTEXT_DIM];
    for (i, &c) in classes.iter().enumerate() {
        anyhow::ensure!(
            c <= NULL_CLASS,
            "class {c} is not a digit or the null class"
        );
        positive[i * CONTEXT_DIM + c] = 1.0;
        negative[i * CONTEXT_DIM + NULL_CLASS] = 1.0;
    }
    Ok(Condition::new()
        .with(
            ENCODER_HIDDEN_STATES,
            Tensor::from_vec(positive, (n, 1, CONTEXT_DIM), device)?,
        )
        .with(
            NEGATIVE_ENCODER_HIDDEN_STATES,
            Tensor::from_vec(negative, (n, 1, CONTEXT_DIM), device)?,
        ))
}

pub struct DigitsContext {
    pub config: DigitsRunConfig,
    pub device: Device,
    pub schedule: Schedule,
    pub unet: UNetConfig,
}

impl DigitsContext {
    pub fn new(config: DigitsRunConfig) -> Result<Self> {
        std::fs::create_dir_all(&config.run_dir)
            .with_context(|| format!("cannot create run_dir {}", config.run_dir.display()))?;
        Ok(Self {
            schedule: Schedule::new(&config.schedule)?,
            unet: config.model.unet(CONTEXT_DIM)?,
            config,
            device: Device::Cpu,
        })
    }

    pub fn rng(&self, stream: &str) -> StdRng {
        StdRng::seed_from_u64(derive_seed(self.config.seed, stream))
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.config.run_dir.join(name)
    }

    pub fn fingerprint(&self, sections: &[&str]) -> serde_json::Value {
        config_fingerprint(&self.config, sections)
    }

    pub fn build_unet(&self, vb: VarBuilder) -> candle_core::Result<UNetBackbone> {
        self.unet_builder()(vb)
    }

    /// [`Self::build_unet`] as an owned closure (trainable networks keep it to rebuild their
    /// compute copy).
    pub fn unet_builder(
        &self,
    ) -> impl Fn(VarBuilder) -> candle_core::Result<UNetBackbone> + Send + Sync + 'static {
        let (unet, schedule) = (self.unet.clone(), self.schedule.clone());
        move |vb| {
            Ok(UNetBackbone::new(
                UNet2DConditionModel::new(vb, &unet)?,
                schedule.clone(),
            ))
        }
    }

    /// `n` standard-normal images (n, 1, 8, 8).
    pub fn noise(&self, n: usize, rng: &mut StdRng) -> candle_core::Result<Tensor> {
        adm_nn::randn(rng, (n, 1, DIGIT_SIZE, DIGIT_SIZE), &self.device)
    }
}

/// The frozen UNet teacher and its weights.
pub type DigitsTeacher = Teacher<UNetBackbone>;

impl DigitsTeacher {
    fn from_weights(ctx: &DigitsContext, weights: HashMap<String, Tensor>) -> Result<Self> {
        Self::frozen(weights, &ctx.device, ctx.unet_builder())
    }

    /// Deterministic DDIM samples with CFG from `noise`.
    pub fn sample(&self, ctx: &DigitsContext, noise: &Tensor, cond: &Condition) -> Result<Tensor> {
        let t = &ctx.config.teacher;
        self.sample_guided(t.sampling_steps, t.cfg_scale, noise, cond)
    }
}

/// Trains the teacher with the plain denoising loss and condition dropout on `train`, or
/// reuses `run_dir/teacher.safetensors` made with the same settings.
pub fn train_digits_teacher(ctx: &DigitsContext, train: &Digits) -> Result<DigitsTeacher> {
    let path = ctx.path("teacher.safetensors");
    let fingerprint = ctx.fingerprint(&TEACHER_SECTIONS);
    if let Some(weights) = cached_weights(&ctx.device, &path, &fingerprint)? {
        tracing::info!("teacher: reusing {}", path.display());
        return DigitsTeacher::from_weights(ctx, weights);
    }
    let cfg = &ctx.config.teacher;
    let mut rng = ctx.rng("teacher");
    let vars = adm_nn::SeededVarMap::new(derive_seed(ctx.config.seed, "teacher-init"));
    let net = ctx.build_unet(vars.var_builder(DType::F32, &ctx.device))?;
    let mut opt = Optimizer::new(
        "teacher",
        vars.varmap(),
        cfg.learning_rate,
        ctx.config.student.grad_clip,
    )?;
    let mut log = MetricsLog::create(&ctx.path("logs").join("teacher.jsonl"))?;
    let images = train.images_tensor(&ctx.device)?;
    let bar = progress("teacher", cfg.steps);
    for step in 0..cfg.steps {
        opt.set_learning_rate(cfg.learning_rate * teacher_lr_decay(step, cfg.steps));
        let rows: Vec<u32> = (0..cfg.batch_size)
            .map(|_| rng.random_range(0..train.len() as u32))
            .collect();
        let classes: Vec<usize> = rows
            .iter()
            .map(|&r| {
                if rng.random::<f64>() < cfg.condition_dropout {
                    NULL_CLASS
                } else {
                    train.labels[r as usize] as usize
                }
            })
            .collect();
        let x0 = images.index_select(&Tensor::new(rows.as_slice(), &ctx.device)?, 0)?;
        let cond = class_tokens(&classes, &ctx.device)?;
        let t: Vec<f32> = (0..cfg.batch_size)
            .map(|_| rng.random_range(0.0..=ctx.schedule.t_max()) as f32)
            .collect();
        let t = Tensor::new(t.as_slice(), &ctx.device)?;
        let eps = ctx.noise(cfg.batch_size, &mut rng)?;
        let x_t = ctx.schedule.add_noise(&x0, &eps, &t)?;
        let prediction = net.forward(&x_t, &t, &cond)?;
        let loss = adm_losses::denoising(&ctx.schedule, &prediction, &x0, &eps, &t)?;
        let stats = opt.step(&loss)?;
        if step % 50 == 0 {
            log.record(
                step,
                &[("loss", stats.loss), ("grad_norm", stats.grad_norm)],
            )?;
            bar.set_message(format!("loss {:.4}", stats.loss));
        }
        bar.inc(1);
    }
    bar.finish();
    log.sync()?;
    let weights = varmap_tensors(vars.varmap());
    store_weights(&path, &fingerprint, &weights)?;
    DigitsTeacher::from_weights(ctx, weights)
}

/// The class of pair `index`: the classes cycle, so every class gets the same share.
fn pair_class(index: u64) -> usize {
    (index % NUM_DIGIT_CLASSES as u64) as usize
}

/// Collects (or resumes) the teacher's ODE pairs into `run_dir/ode-pairs`: the class id
/// (`class_labels`) and the class token with its null token, so that the stored conditions
/// are the UNet's own inputs.
pub fn collect_digit_pairs(ctx: &DigitsContext, teacher: &DigitsTeacher) -> Result<StoreReader> {
    let c = &ctx.config;
    let token = ConditionSpec {
        shape: vec![1, CONTEXT_DIM],
        dtype: StoreDtype::F32,
    };
    let spec = StoreSpec {
        teacher: format!("adm digits unet {}", ctx.fingerprint(&TEACHER_SECTIONS)),
        schedule: serde_json::to_string(&c.schedule)?,
        solver: "ddim".to_string(),
        steps: c.teacher.sampling_steps,
        cfg_scale: c.teacher.cfg_scale,
        seed: derive_seed(c.seed, "ode-pairs"),
        dtype: StoreDtype::F32,
        noise_shape: vec![1, DIGIT_SIZE, DIGIT_SIZE],
        sample_shape: vec![1, DIGIT_SIZE, DIGIT_SIZE],
        conditions: [
            (
                "class_labels".to_string(),
                ConditionSpec {
                    shape: vec![],
                    dtype: StoreDtype::U32,
                },
            ),
            (ENCODER_HIDDEN_STATES.to_string(), token.clone()),
            (NEGATIVE_ENCODER_HIDDEN_STATES.to_string(), token),
        ]
        .into(),
        shard_size: c.ode_pairs.shard_size,
        partition: Partition::default(),
    };
    let dir = ctx.path("ode-pairs");
    // Pairs of another teacher or sampler are not resumed but collected anew.
    if let Ok(manifest) = Manifest::read(&dir) {
        if manifest.spec != spec {
            tracing::info!("ode pairs: settings changed, collecting anew");
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
    }
    let writer = StoreWriter::open(&dir, spec)
        .with_context(|| format!("ODE-pair store {}", dir.display()))?;
    collect(
        writer,
        c.ode_pairs.count as u64,
        c.ode_pairs.batch_size,
        &ctx.device,
        |indices, noise| {
            let classes: Vec<usize> = indices.iter().map(|&i| pair_class(i)).collect();
            let cond = class_tokens(&classes, &ctx.device)?;
            let samples = teacher.sample(ctx, noise, &cond)?;
            let labels: Vec<u32> = classes.iter().map(|&c| c as u32).collect();
            let mut conditions = vec![(
                "class_labels".to_string(),
                Tensor::new(labels.as_slice(), &ctx.device)?,
            )];
            for (name, t) in cond.iter() {
                conditions.push((name.to_string(), t.clone()));
            }
            let prompts = classes.iter().map(|c| format!("digit {c}")).collect();
            Ok((samples, conditions, prompts))
        },
    )?;
    Ok(StoreReader::open(&dir)?)
}

/// The engine's conditions: every class equally often, in a seeded order.
fn condition_bank(ctx: &DigitsContext) -> Result<ConditionBank> {
    let mut classes: Vec<usize> = (0..NUM_DIGIT_CLASSES * 100)
        .map(|i| i % NUM_DIGIT_CLASSES)
        .collect();
    classes.shuffle(&mut ctx.rng("engine-classes"));
    ConditionBank::new(class_tokens(&classes, &ctx.device)?)
}

/// ADP's pixel-space "decoder" for grey digits: the SAM stand-in reads RGB, so the one
/// channel is repeated three times (differentiable: a concatenation).
#[derive(Debug, Clone, Copy)]
pub struct GreyToRgb;

impl Decoder for GreyToRgb {
    fn decode_latents(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        Tensor::cat(&[latents, latents, latents], 1)
    }
}

/// ADP's frozen pixel discriminator backbone: a random-init SAM ViT on 8x8 images (patch 2,
/// window 2, the last block global), read after every block; a stand-in for pretrained SAM.
pub fn sam_pixel_nets(ctx: &DigitsContext) -> Result<PixelNets> {
    let a = &ctx.config.adp;
    let cfg = adm_models::sam::Config {
        hidden_size: a.sam_hidden,
        output_channels: a.sam_hidden,
        num_hidden_layers: a.sam_layers,
        num_attention_heads: 2,
        image_size: DIGIT_SIZE,
        patch_size: 2,
        mlp_dim: Some(2 * a.sam_hidden),
        window_size: 2,
        global_attn_indexes: vec![a.sam_layers - 1],
        ..Default::default()
    };
    let seeded = adm_nn::SeededVarMap::new(derive_seed(ctx.config.seed, "sam-init"));
    SamVisionEncoder::new(seeded.var_builder(DType::F32, &ctx.device), &cfg)?;
    let frozen = varmap_tensors(seeded.varmap())
        .into_iter()
        .map(|(n, t)| (n, t.detach()))
        .collect();
    let encoder = SamVisionEncoder::new(
        VarBuilder::from_tensors(frozen, DType::F32, &ctx.device),
        &cfg,
    )?;
    let layers: Vec<usize> = (0..a.sam_layers).collect();
    Ok(PixelNets {
        decoder: Arc::new(GreyToRgb),
        extractor: Arc::new(SamFeatureExtractor::new(Arc::new(encoder), &layers)?),
    })
}

/// The engine config of a one-step student trained by `method`.
fn engine_config(ctx: &DigitsContext, method: EngineMethod) -> EngineConfig {
    let c = &ctx.config;
    let opt = |lr| OptimizerConfig::new(lr, c.student.grad_clip);
    // (steps, ttur, generator lr, fake-score lr, discriminator lr); unused rates are
    // validated but never stepped.
    let (steps, ttur, generator, fake, discriminator) = match method {
        EngineMethod::Dmd => (
            c.dmd.steps,
            c.dmd.fake_updates,
            c.dmd.lr_generator,
            c.dmd.lr_fake,
            c.adm.lr_discriminator,
        ),
        EngineMethod::Adm => (
            c.adm.steps,
            c.adm.ttur,
            c.adm.lr_generator,
            c.adm.lr_fake,
            c.adm.lr_discriminator,
        ),
        EngineMethod::Adp => (
            c.adp.steps,
            1,
            c.adp.lr_generator,
            c.adm.lr_fake,
            c.adp.lr_discriminator,
        ),
        EngineMethod::Mse => (
            c.mse.steps,
            1,
            c.mse.learning_rate,
            c.adm.lr_fake,
            c.adm.lr_discriminator,
        ),
    };
    let (taps, heads) = if method == EngineMethod::Adp {
        (c.adp.taps.clone(), c.adp.heads.clone())
    } else {
        (c.adm.taps.clone(), c.adm.heads.clone())
    };
    EngineConfig {
        method,
        seed: c.seed,
        steps,
        batch_size: c.student.batch_size,
        grad_accumulation: 1,
        compute_dtype: crate::recipe::Precision::F32,
        latent_shape: vec![1, DIGIT_SIZE, DIGIT_SIZE],
        student: EngineStudent {
            output: c.student.output,
            steps: vec![1.0],
        },
        cfg_scale: c.teacher.cfg_scale,
        ttur,
        flow_divisions: c.adm.flow_divisions,
        taps,
        heads,
        dmd_timesteps: c.dmd.timesteps.clone(),
        generator: opt(generator),
        fake_score: opt(fake),
        discriminator: opt(discriminator),
        ema_decay: c.student.ema_decay,
        checkpoint: CheckpointConfig {
            every: c.student.checkpoint_every,
            keep_last: 1,
        },
        log: LogConfig {
            probe_every: c.probe.every,
            probe_size: c.probe.size,
            sample_every: 0,
            sample_count: NUM_DIGIT_CLASSES,
        },
        adp: AdpConfig {
            generator_timesteps: c.adp.generator_timesteps.clone(),
            discriminator_timesteps: c.adp.discriminator_timesteps.clone(),
            lambda_latent: c.adp.lambda_latent,
            lambda_pixel: c.adp.lambda_pixel,
            pixel_layers: (0..c.adp.sam_layers).collect(),
            pixel_heads: None,
        },
    }
}

/// What one method's stage leaves: the generator's EMA weights and the DMD probe trace.
pub struct DigitsStage {
    pub weights: HashMap<String, Tensor>,
    pub dmd_trace: Vec<(usize, f64)>,
}

/// Runs one engine stage in `run_dir/methods/<name>`, resuming its checkpoints; a folder
/// made with other settings (the teacher's sections, `student` and `sections`) is cleared
/// first. The generator starts from `init`, the fake score (ADM, DMD) from the teacher.
fn run_stage(
    ctx: &DigitsContext,
    teacher: &DigitsTeacher,
    name: &str,
    sections: &[&str],
    method: EngineMethod,
    init: &HashMap<String, Tensor>,
    pairs: Option<&Arc<StoreReader>>,
) -> Result<DigitsStage> {
    let dir = ctx.path(&format!("methods/{name}"));
    let sections: Vec<&str> = TEACHER_SECTIONS
        .iter()
        .chain(&["student"])
        .chain(sections)
        .copied()
        .collect();
    let settings = ctx.fingerprint(&sections);
    let settings_path = dir.join("settings.json");
    let same = std::fs::read_to_string(&settings_path)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        == Some(settings.clone());
    if !same && dir.exists() {
        tracing::info!("{name}: settings changed, retraining");
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    write_json_atomic(&settings_path, &settings)?;
    let seed = |net: &str| derive_seed(ctx.config.seed, &format!("{name}-{net}"));
    let trainable =
        |seed, weights| Trainable::from_weights(seed, &ctx.device, weights, ctx.unet_builder());
    let nets = EngineNets {
        teacher: teacher.net.clone() as Arc<dyn Backbone>,
        generator: trainable(seed("generator"), init)?,
        fake_score: match method.uses_fake_score() {
            true => Some(trainable(seed("fake-score"), &teacher.weights)?),
            false => None,
        },
        pixel: match method {
            EngineMethod::Adp => Some(sam_pixel_nets(ctx)?),
            _ => None,
        },
        net_config: Some(serde_json::to_value(&ctx.unet)?),
    };
    let config = engine_config(ctx, method);
    let steps = config.steps;
    let data: EngineData = match (method.uses_pairs(), pairs) {
        (true, Some(reader)) => PairSource::new(
            reader.clone(),
            derive_seed(ctx.config.seed, &format!("{name}-pairs")),
            &ctx.device,
        )?
        .into(),
        (true, None) => anyhow::bail!("{name} trains on ODE pairs, none were collected"),
        (false, _) => EngineData::Conditions(Box::new(condition_bank(ctx)?)),
    };
    let mut engine = Engine::new(config, &dir, nets, data)?;
    if let Some(step) = engine.resume()? {
        tracing::info!("{name}: resumed at step {step}");
    }
    // A finished stage is only read back (train would rewrite its metrics log).
    if engine.step() < steps {
        engine.train(steps)?;
    }
    let (_, ema) = engine.generator_weights();
    Ok(DigitsStage {
        weights: ema,
        dmd_trace: read_probe_trace(&engine.metrics_path())?,
    })
}

/// Trains (or reads back) `method`'s student; DMDX runs (or reads back) ADP first.
pub fn run_method(
    ctx: &DigitsContext,
    teacher: &DigitsTeacher,
    method: DigitsMethod,
    pairs: Option<&Arc<StoreReader>>,
) -> Result<DigitsStage> {
    let stage = |engine_method, init| {
        run_stage(
            ctx,
            teacher,
            method.name(),
            method.sections(),
            engine_method,
            init,
            pairs,
        )
    };
    match method {
        DigitsMethod::Mse => stage(EngineMethod::Mse, &teacher.weights),
        DigitsMethod::Adp => stage(EngineMethod::Adp, &teacher.weights),
        DigitsMethod::Dmd => stage(EngineMethod::Dmd, &teacher.weights),
        DigitsMethod::Adm => stage(EngineMethod::Adm, &teacher.weights),
        DigitsMethod::Dmdx => {
            let adp = run_method(ctx, teacher, DigitsMethod::Adp, pairs)?;
            stage(EngineMethod::Adm, &adp.weights)
        }
    }
}

/// The `dmd_probe` values of an engine's metrics.jsonl.
fn read_probe_trace(path: &Path) -> Result<Vec<(usize, f64)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|row| Some((row["step"].as_u64()? as usize, row["dmd_probe"].as_f64()?)))
        .collect())
}

/// The classifier, trained on `train` or reused from `run_dir/classifier.safetensors`.
fn classifier(ctx: &DigitsContext, train: &Digits) -> Result<Classifier> {
    let path = ctx.path("classifier.safetensors");
    let fingerprint = ctx.fingerprint(&["seed", "data", "classifier"]);
    let cfg = &ctx.config.classifier;
    if let Some(weights) = cached_weights(&ctx.device, &path, &fingerprint)? {
        tracing::info!("classifier: reusing {}", path.display());
        let vb = VarBuilder::from_tensors(weights, DType::F32, &ctx.device);
        return Ok(Classifier::new(vb, cfg)?);
    }
    let (net, vars) = train_classifier(cfg, train, ctx.config.seed, &ctx.device)?;
    store_weights(&path, &fingerprint, &varmap_tensors(vars.varmap()))?;
    Ok(net)
}

/// One row of the results.
#[derive(Debug, Clone, Serialize)]
pub struct DigitsRow {
    pub method: String,
    pub metrics: DigitsMetrics,
    pub dmd_loss_start: Option<f64>,
    pub dmd_loss_end: Option<f64>,
    pub dmd_trace: Vec<(usize, f64)>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DigitsReport {
    pub config: DigitsRunConfig,
    pub classifier_test_accuracy: f64,
    pub rows: Vec<DigitsRow>,
    pub table: String,
}

/// Samples clipped to the data range [-1, 1], as images are.
fn clip(samples: &Tensor) -> Result<Tensor> {
    Ok(samples.clamp(-1f32, 1f32)?)
}

/// Runs the whole digits job.
pub fn run_digits(config: DigitsRunConfig) -> Result<DigitsReport> {
    let ctx = DigitsContext::new(config)?;
    let c = &ctx.config;
    let (train, test) =
        Digits::load()?.split(c.data.test_size, derive_seed(c.seed, "digits-split"))?;

    let started = Instant::now();
    let teacher = train_digits_teacher(&ctx, &train)?;
    let teacher_seconds = started.elapsed().as_secs_f64();

    // Evaluation: classes requested in equal numbers, fixed noise shared by every row, and
    // teacher reference samples from independent noise.
    let per_class = c.eval.samples_per_class;
    let requested: Vec<usize> = (0..per_class * NUM_DIGIT_CLASSES)
        .map(|i| i % NUM_DIGIT_CLASSES)
        .collect();
    let requested_u32: Vec<u32> = requested.iter().map(|&c| c as u32).collect();
    let n = requested.len();
    let eval_cond = class_tokens(&requested, &ctx.device)?;
    let eval_noise = ctx.noise(n, &mut ctx.rng("eval"))?;

    let classifier = classifier(&ctx, &train)?;
    let classifier_test_accuracy = classifier.accuracy(&test, &ctx.device)?;
    tracing::info!("classifier: held-out accuracy {classifier_test_accuracy:.3}");
    let reference = clip(&teacher.sample(
        &ctx,
        &ctx.noise(n, &mut ctx.rng("eval-reference"))?,
        &eval_cond,
    )?)?;
    let reference = classifier.score(&reference)?;

    let mut rows = Vec::new();
    let mut grid: Vec<Tensor> = Vec::new();
    let row_of = |name: String,
                  samples: &Tensor,
                  labels: &[u32],
                  stage: Option<&DigitsStage>,
                  seconds: f64|
     -> Result<DigitsRow> {
        let pixels = samples.flatten_all()?.to_vec1::<f32>()?;
        let scored: Scored = classifier.score(samples)?;
        let metrics = digits_metrics(&pixels, labels, &scored, &reference)?;
        let trace = stage.map(|s| s.dmd_trace.clone()).unwrap_or_default();
        let (dmd_loss_start, dmd_loss_end) = trace_ends(&trace);
        Ok(DigitsRow {
            method: name,
            metrics,
            dmd_loss_start,
            dmd_loss_end,
            dmd_trace: trace,
            seconds,
        })
    };

    // The real held-out digits: the scale every distance is read against.
    let real = test.images_tensor(&ctx.device)?;
    rows.push(row_of(
        "real digits (held out)".into(),
        &real,
        &test.labels,
        None,
        0.0,
    )?);
    let teacher_samples = clip(&teacher.sample(&ctx, &eval_noise, &eval_cond)?)?;
    rows.push(row_of(
        format!(
            "teacher ({} steps, CFG {})",
            c.teacher.sampling_steps, c.teacher.cfg_scale
        ),
        &teacher_samples,
        &requested_u32,
        None,
        teacher_seconds,
    )?);
    grid.push(teacher_samples);

    let pairs = if c.methods.iter().any(|m| m.uses_pairs()) {
        let pairs = collect_digit_pairs(&ctx, &teacher)?;
        tracing::info!("ode pairs: {} in {}", pairs.len(), pairs.dir().display());
        Some(Arc::new(pairs))
    } else {
        None
    };
    for &method in &c.methods {
        let started = Instant::now();
        let stage = run_method(&ctx, &teacher, method, pairs.as_ref())?;
        let student = Student {
            model: Trainable::from_weights(
                derive_seed(c.seed, "eval-student"),
                &ctx.device,
                &stage.weights,
                ctx.unet_builder(),
            )?,
            output: c.student.output,
            steps: vec![1.0],
        };
        let samples =
            clip(&student.sample(&eval_noise, &eval_cond, &mut ctx.rng("eval-renoise"))?)?;
        rows.push(row_of(
            method.name().to_string(),
            &samples,
            &requested_u32,
            Some(&stage),
            started.elapsed().as_secs_f64(),
        )?);
        grid.push(samples);
    }

    let table = render_table(&rows)?;
    let report = DigitsReport {
        config: ctx.config.clone(),
        classifier_test_accuracy,
        rows,
        table,
    };
    write_json_atomic(&ctx.path("metrics.json"), &report)?;
    write_grid(&ctx, &grid)?;
    Ok(report)
}

/// `samples.png`: per row (teacher, then the methods in order) `grid_rows` lines of one
/// sample per class 0..9.
fn write_grid(ctx: &DigitsContext, rows: &[Tensor]) -> Result<()> {
    let k = ctx
        .config
        .eval
        .grid_rows
        .min(ctx.config.eval.samples_per_class);
    let mut values = Vec::new();
    for samples in rows {
        // Samples are ordered class 0..9, then again: the first k * 10 hold k per class.
        values.extend(
            samples
                .narrow(0, 0, k * NUM_DIGIT_CLASSES)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
    }
    adm_eval::channel_grid_png(
        &ctx.path("samples.png"),
        &values,
        [rows.len() * k, NUM_DIGIT_CLASSES, DIGIT_SIZE, DIGIT_SIZE],
        4,
    )
}

fn render_table(rows: &[DigitsRow]) -> Result<String> {
    let mut table = Table::new(
        [
            "method",
            "classes",
            "class KL",
            "confidence",
            "accuracy",
            "Frechet",
            "diversity",
            "DMD loss start -> end",
            "seconds",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    )?;
    for row in rows {
        let m = &row.metrics;
        let dmd = dmd_span(row.dmd_loss_start, row.dmd_loss_end);
        table.add_row(
            row.method.clone(),
            vec![
                format!("{}/{}", m.classes_covered, m.num_classes),
                format!("{:.3}", m.class_kl),
                format!("{:.3}", m.confidence),
                format!("{:.3}", m.accuracy),
                format!("{:.2}", m.frechet),
                format!("{:.3}", m.diversity),
                dmd,
                format!("{:.0}", row.seconds),
            ],
        )?;
    }
    Ok(table.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_to_rgb_repeats_the_channel_and_passes_every_gradient() -> Result<()> {
        let x = Tensor::arange(0f32, 8.0, &Device::Cpu)?.reshape((2, 1, 2, 2))?;
        let x = candle_core::Var::from_tensor(&x)?;
        let rgb = GreyToRgb.decode_latents(x.as_tensor())?;
        assert_eq!(rgb.dims(), [2, 3, 2, 2]);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for c in 0..3 {
            assert_eq!(flat(&rgb.narrow(1, c, 1)?), flat(x.as_tensor()));
        }
        // d/dx of sum(w * rgb) is the sum of w over the three copies.
        let w = Tensor::arange(0f32, 24.0, &Device::Cpu)?.reshape((2, 3, 2, 2))?;
        let grads = (rgb * &w)?.sum_all()?.backward()?;
        let g = grads.get(x.as_tensor()).expect("x has a gradient");
        assert_eq!(flat(g), flat(&w.sum_keepdim(1)?));
        Ok(())
    }

    #[test]
    fn class_tokens_are_one_hot_with_the_null_token_as_negative() -> Result<()> {
        let cond = class_tokens(&[3, 10], &Device::Cpu)?;
        let pos = cond.get(ENCODER_HIDDEN_STATES)?.to_vec3::<f32>()?;
        let neg = cond.get(NEGATIVE_ENCODER_HIDDEN_STATES)?.to_vec3::<f32>()?;
        assert_eq!(pos[0][0].iter().position(|&v| v == 1.0), Some(3));
        assert_eq!(pos[1][0].iter().position(|&v| v == 1.0), Some(NULL_CLASS));
        for row in neg {
            assert_eq!(row[0].iter().sum::<f32>(), 1.0);
            assert_eq!(row[0][NULL_CLASS], 1.0);
        }
        assert!(class_tokens(&[11], &Device::Cpu).is_err());
        Ok(())
    }
}
