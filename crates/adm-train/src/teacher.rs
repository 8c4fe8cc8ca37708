//! Stage 0 of the toy: train the class-conditional teacher with condition dropout, and
//! sample from it with classifier-free guidance.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use adm_diffusion::sample_ode;
use adm_models::{
    guided_x0_eps, save_safetensors_atomic, varmap_tensors, Backbone, Condition, ToyMlp,
};
use anyhow::{Context as _, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use rand::Rng;

use crate::context::{class_condition, progress, stage_log, ToyContext};
use crate::optim::Optimizer;

/// The frozen teacher F_phi and its weights (which initialise students and fake scores): the
/// toy's MLP, or the digits toy's UNet.
pub struct Teacher<B = ToyMlp> {
    pub net: Arc<B>,
    pub weights: HashMap<String, Tensor>,
}

impl<B: Backbone> Teacher<B> {
    /// The teacher over detached copies of `weights`: even if they are a trainable
    /// network's Var tensors, no gradient is ever computed for them.
    pub fn frozen(
        weights: HashMap<String, Tensor>,
        device: &candle_core::Device,
        build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<B>,
    ) -> Result<Self> {
        let weights: HashMap<String, Tensor> = weights
            .into_iter()
            .map(|(name, t)| (name, t.detach()))
            .collect();
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, device);
        Ok(Self {
            net: Arc::new(build(vb)?),
            weights,
        })
    }

    /// Deterministic `steps`-step samples with CFG `cfg_scale` from `noise`.
    pub fn sample_guided(
        &self,
        steps: usize,
        cfg_scale: f64,
        noise: &Tensor,
        cond: &Condition,
    ) -> Result<Tensor> {
        let schedule = self.net.schedule();
        let timesteps = schedule.sampling_timesteps(steps)?;
        Ok(sample_ode(schedule, noise.clone(), &timesteps, |x, t| {
            guided_x0_eps(self.net.as_ref(), x, t, cond, cfg_scale)
        })?)
    }
}

impl Teacher {
    pub fn from_weights(ctx: &ToyContext, weights: HashMap<String, Tensor>) -> Result<Self> {
        Self::frozen(weights, &ctx.device, |vb| ctx.build_net(vb))
    }

    /// The configured sampler: `teacher.sampling_steps` steps at `teacher.cfg_scale`.
    pub fn sample(&self, ctx: &ToyContext, noise: &Tensor, cond: &Condition) -> Result<Tensor> {
        let t = &ctx.config.teacher;
        self.sample_guided(t.sampling_steps, t.cfg_scale, noise, cond)
    }
}

/// Weights saved with a sidecar JSON of everything they depend on, so that a re-run with the
/// same settings reuses them (stage-level resume) and a changed config retrains.
pub fn cached_weights(
    device: &candle_core::Device,
    path: &Path,
    fingerprint: &serde_json::Value,
) -> Result<Option<HashMap<String, Tensor>>> {
    let sidecar = path.with_extension("json");
    let Ok(text) = std::fs::read_to_string(&sidecar) else {
        return Ok(None);
    };
    if serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .as_ref()
        != Some(fingerprint)
    {
        return Ok(None);
    }
    let weights = candle_core::safetensors::load(path, device)
        .with_context(|| format!("cannot read cached weights {}", path.display()))?;
    Ok(Some(weights))
}

pub fn store_weights(
    path: &Path,
    fingerprint: &serde_json::Value,
    weights: &HashMap<String, Tensor>,
) -> Result<()> {
    save_safetensors_atomic(weights, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let sidecar = path.with_extension("json");
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(fingerprint)?)?;
    std::fs::rename(&tmp, &sidecar)?;
    Ok(())
}

/// What the teacher depends on.
pub const TEACHER_SECTIONS: [&str; 5] = ["seed", "data", "schedule", "model", "teacher"];

pub fn teacher_fingerprint(ctx: &ToyContext) -> serde_json::Value {
    ctx.fingerprint(&TEACHER_SECTIONS)
}

/// The teacher's learning-rate factor at `step` of `steps`: cosine decay to 10% keeps the
/// late teacher sharp without a long schedule.
pub(crate) fn teacher_lr_decay(step: usize, steps: usize) -> f64 {
    let fraction = step as f64 / steps as f64;
    0.1 + 0.45 * (1.0 + (std::f64::consts::PI * fraction).cos())
}

/// Trains the teacher, or reuses `run_dir/teacher.safetensors` made with the same settings.
pub fn train_teacher(ctx: &ToyContext) -> Result<Teacher> {
    let path = ctx.path("teacher.safetensors");
    let fingerprint = teacher_fingerprint(ctx);
    if let Some(weights) = cached_weights(&ctx.device, &path, &fingerprint)? {
        tracing::info!("teacher: reusing {}", path.display());
        return Teacher::from_weights(ctx, weights);
    }
    let cfg = &ctx.config.teacher;
    let mut rng = ctx.rng("teacher");
    let vars = adm_nn::SeededVarMap::new(adm_nn::derive_seed(ctx.config.seed, "teacher-init"));
    let net = ctx.build_net(vars.var_builder(DType::F32, &ctx.device))?;
    let mut opt = Optimizer::new(
        "teacher",
        vars.varmap(),
        cfg.learning_rate,
        ctx.config.student.grad_clip,
    )?;
    let mut log = stage_log(ctx, "teacher")?;
    let bar = progress("teacher", cfg.steps);
    let null_class = ctx.mixture.num_classes() as u32;
    for step in 0..cfg.steps {
        opt.set_learning_rate(cfg.learning_rate * teacher_lr_decay(step, cfg.steps));

        let batch = ctx.mixture.sample(cfg.batch_size, &mut rng);
        let classes: Vec<u32> = batch
            .classes
            .iter()
            .map(|&c| {
                if rng.random::<f64>() < cfg.condition_dropout {
                    null_class
                } else {
                    c
                }
            })
            .collect();
        let cond = class_condition(Tensor::new(classes.as_slice(), &ctx.device)?);
        let x0 = batch.points_tensor(&ctx.device)?;
        let t: Vec<f64> = (0..cfg.batch_size)
            .map(|_| rng.random_range(0.0..=ctx.schedule.t_max()))
            .collect();
        let t = ctx.timesteps(&t)?;
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
    let weights = varmap_tensors(vars.varmap());
    store_weights(&path, &fingerprint, &weights)?;
    Teacher::from_weights(ctx, weights)
}
