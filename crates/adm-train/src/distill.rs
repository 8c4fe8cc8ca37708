//! The distillation stages on any `Backbone`: MSE regression and ADP on ODE pairs (one-step
//! pre-training), and DMD and ADM score distillation (one- or multi-step).
//! Update orders follow METHOD.md: ADM runs f_psi, then G_theta, then D_tau.

use std::collections::HashMap;
use std::sync::Arc;

use adm_data::store::StoreReader;
use adm_losses as losses;
use adm_models::{
    frozen_var_builder, guided_x0_eps, guided_prediction, predict_x0_eps, varmap_tensors, Backbone, Condition,
    LatentDiscriminator, PixelDiscriminator, RandomFeatureMlp, ToyMlp,
};
use anyhow::Result;
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::Rng;

use crate::context::{progress, StageLog, ToyContext};
use crate::optim::Optimizer;
use crate::student::{line_point, Student, Trainable};
use crate::teacher::Teacher;

/// What a distillation stage leaves behind.
pub struct StageOutcome {
    pub weights: HashMap<String, Tensor>,
    /// (generator step, DMD loss) recorded while training (the paper's Fig. 3).
    pub dmd_trace: Vec<(usize, f64)>,
}

/// The student architecture: the teacher's network, initialised from `init`.
pub fn new_student(ctx: &ToyContext, stream: &str, init: &HashMap<String, Tensor>, steps: Vec<f64>) -> Result<Student<ToyMlp>> {
    Ok(Student {
        model: trainable_net(ctx, stream, init)?,
        output: ctx.config.student.output,
        steps,
    })
}

fn trainable_net(ctx: &ToyContext, stream: &str, init: &HashMap<String, Tensor>) -> Result<Trainable<ToyMlp>> {
    let seed = adm_nn::derive_seed(ctx.config.seed, stream);
    Ok(Trainable::from_weights(seed, &ctx.device, init, |vb| ctx.build_net(vb))?)
}

fn fresh_vars(ctx: &ToyContext, stream: &str) -> adm_nn::SeededVarMap {
    adm_nn::SeededVarMap::new(adm_nn::derive_seed(ctx.config.seed, stream))
}

/// Shuffled passes over the ODE-pair store, one batch at a time.
struct PairFeed<'a> {
    reader: &'a StoreReader,
    seed: u64,
    epoch: u64,
    order: Vec<u64>,
    cursor: usize,
}

impl<'a> PairFeed<'a> {
    fn new(reader: &'a StoreReader, seed: u64) -> Self {
        Self {
            reader,
            seed,
            epoch: 0,
            order: Vec::new(),
            cursor: 0,
        }
    }

    /// (noise x_T, teacher sample x_0, condition).
    fn next(&mut self, ctx: &ToyContext, batch: usize) -> Result<(Tensor, Tensor, Condition)> {
        let mut indices = Vec::with_capacity(batch);
        while indices.len() < batch {
            if self.cursor == self.order.len() {
                self.order = self.reader.epoch_indices(self.seed, self.epoch, 0, 1);
                self.epoch += 1;
                self.cursor = 0;
            }
            let take = (batch - indices.len()).min(self.order.len() - self.cursor);
            indices.extend_from_slice(&self.order[self.cursor..self.cursor + take]);
            self.cursor += take;
        }
        let pairs = self.reader.get_batch(&indices, &ctx.device)?;
        let cond = pairs
            .conditions
            .iter()
            .fold(Condition::new(), |c, (name, t)| c.with(name, t.clone()));
        Ok((pairs.noise, pairs.sample, cond))
    }
}

/// Line times from a unit-time distribution.
fn line_times(dist: &adm_diffusion::TimestepDistribution, n: usize, rng: &mut StdRng) -> Vec<f64> {
    dist.sample_unit(n, rng)
}

/// Schedule timesteps from a unit-time distribution.
fn schedule_times(ctx: &ToyContext, dist: &adm_diffusion::TimestepDistribution, n: usize, rng: &mut StdRng) -> Result<Tensor> {
    Ok(ctx.timesteps(&dist.sample(&ctx.schedule, n, rng))?)
}

/// A1: regression of x0 on ODE pairs at line times drawn like ADP's (MSE pre-training).
pub fn mse_pretrain(ctx: &ToyContext, teacher: &Teacher, pairs: &StoreReader) -> Result<StageOutcome> {
    let cfg = &ctx.config.mse;
    let batch = ctx.config.student.batch_size;
    let mut rng = ctx.rng("mse");
    let student = new_student(ctx, "mse-generator", &teacher.weights, vec![1.0])?;
    let mut opt = Optimizer::new("generator", student.model.varmap(), cfg.learning_rate, ctx.config.student.grad_clip)?;
    let mut feed = PairFeed::new(pairs, adm_nn::derive_seed(ctx.config.seed, "mse-pairs"));
    let mut log = StageLog::create(ctx, "mse")?;
    let bar = progress("mse", cfg.steps);
    for step in 0..cfg.steps {
        let (noise, x0, cond) = feed.next(ctx, batch)?;
        let s = line_times(&ctx.config.adp.generator_timesteps, batch, &mut rng);
        let prediction = student.x0_from_line(&line_point(&x0, &noise, &s)?, &s, &cond)?;
        let stats = opt.step(&losses::mse(&prediction, &x0)?)?;
        if step % 50 == 0 {
            log.record(step, &[("loss", stats.loss), ("grad_norm", stats.grad_norm)])?;
            bar.set_message(format!("mse {:.4}", stats.loss));
        }
        bar.inc(1);
    }
    bar.finish();
    Ok(StageOutcome {
        weights: varmap_tensors(student.model.varmap()),
        dmd_trace: Vec::new(),
    })
}

/// ADP: hybrid adversarial pre-training on ODE pairs (paper Sec. 3.3). The latent
/// discriminator D_tau1 is the teacher with heads, on re-noised real and fake x0; the
/// "pixel" discriminator D_tau2 reads clean samples through an independent frozen network.
pub fn adp(ctx: &ToyContext, teacher: &Teacher, pairs: &StoreReader) -> Result<StageOutcome> {
    let cfg = &ctx.config.adp;
    let batch = ctx.config.student.batch_size;
    let clip = ctx.config.student.grad_clip;
    let mut rng = ctx.rng("adp");
    let student = new_student(ctx, "adp-generator", &teacher.weights, vec![1.0])?;

    let pixel_vars = fresh_vars(ctx, "adp-pixel-backbone");
    let pixel_vb = pixel_vars.var_builder(DType::F32, &ctx.device);
    RandomFeatureMlp::new(ctx.model.in_channels, cfg.pixel_width, cfg.pixel_depth, pixel_vb)?;
    let pixel_backbone = RandomFeatureMlp::new(
        ctx.model.in_channels,
        cfg.pixel_width,
        cfg.pixel_depth,
        frozen_var_builder(pixel_vars.varmap(), DType::F32, &ctx.device)?,
    )?;
    let heads = fresh_vars(ctx, "adp-heads");
    let heads_vb = heads.var_builder(DType::F32, &ctx.device);
    let latent = LatentDiscriminator::new(teacher.net.clone(), &cfg.taps, cfg.head_hidden, heads_vb.pp("latent"))?;
    let pixel = PixelDiscriminator::new(Arc::new(pixel_backbone), cfg.head_hidden, heads_vb.pp("pixel"))?;

    let mut opt_g = Optimizer::new("generator", student.model.varmap(), cfg.lr_generator, clip)?;
    let mut opt_d = Optimizer::new("discriminator", heads.varmap(), cfg.lr_discriminator, clip)?;
    let mut feed = PairFeed::new(pairs, adm_nn::derive_seed(ctx.config.seed, "adp-pairs"));
    let mut log = StageLog::create(ctx, "adp")?;
    let bar = progress("adp", cfg.steps);
    let (l1, l2) = (cfg.lambda_latent, cfg.lambda_pixel);
    for step in 0..cfg.steps {
        let (noise, x0, cond) = feed.next(ctx, batch)?;
        let s = line_times(&cfg.generator_timesteps, batch, &mut rng);
        let fake_x0 = student.x0_from_line(&line_point(&x0, &noise, &s)?, &s, &cond)?;
        // Real and fake are re-noised with the same fresh noise at uniform times.
        let t = schedule_times(ctx, &cfg.discriminator_timesteps, batch, &mut rng)?;
        let eps = ctx.noise(batch, &mut rng)?;

        let fake_t = ctx.schedule.add_noise(&fake_x0, &eps, &t)?;
        let g_loss = losses::adp_generator(&latent.logits(&fake_t, &t, &cond)?, &pixel.logits(&fake_x0)?, l1, l2)?;
        let g = opt_g.step(&g_loss)?;

        let fake_x0 = fake_x0.detach();
        let fake_t = ctx.schedule.add_noise(&fake_x0, &eps, &t)?;
        let real_t = ctx.schedule.add_noise(&x0, &eps, &t)?;
        let d_loss = losses::adp_discriminator(
            &latent.logits(&real_t, &t, &cond)?,
            &latent.logits(&fake_t, &t, &cond)?,
            &pixel.logits(&x0)?,
            &pixel.logits(&fake_x0)?,
            l1,
            l2,
        )?;
        let d = opt_d.step(&d_loss)?;
        if step % 50 == 0 {
            log.record(step, &[("loss_g", g.loss), ("loss_d", d.loss), ("grad_norm_g", g.grad_norm)])?;
            bar.set_message(format!("g {:.3} d {:.3}", g.loss, d.loss));
        }
        bar.inc(1);
    }
    bar.finish();
    Ok(StageOutcome {
        weights: varmap_tensors(student.model.varmap()),
        dmd_trace: Vec::new(),
    })
}

/// The pieces DMD and ADM share: student, fake score f_psi (initialised from the teacher)
/// and a stream of student outputs.
struct ScoreDistillation<'a> {
    ctx: &'a ToyContext,
    teacher: &'a Teacher,
    student: Student<ToyMlp>,
    fake: Trainable<ToyMlp>,
    rng: StdRng,
}

impl ScoreDistillation<'_> {
    /// Student outputs with gradient (backward simulation for multi-step students), their
    /// conditions.
    fn student_batch(&mut self) -> Result<(Tensor, Condition)> {
        let n = self.ctx.config.student.batch_size;
        let cond = self.ctx.classes(n, &mut self.rng)?;
        let noise = self.ctx.noise(n, &mut self.rng)?;
        let x0 = self.student.training_output(&noise, &cond, &mut self.rng)?;
        Ok((x0, cond))
    }

    /// Noise at uniform timesteps in [t_min, t_max].
    fn noised(&mut self, x0: &Tensor, t_min: f64) -> Result<(Tensor, Tensor, Tensor)> {
        let n = x0.dim(0)?;
        let t_max = self.ctx.schedule.t_max();
        let t: Vec<f64> = (0..n).map(|_| self.rng.random_range(t_min..=t_max)).collect();
        let t = self.ctx.timesteps(&t)?;
        let eps = self.ctx.noise(n, &mut self.rng)?;
        let x_t = self.ctx.schedule.add_noise(x0, &eps, &t)?;
        Ok((x_t, t, eps))
    }

    /// f_psi update: the plain denoising loss on detached student samples.
    fn update_fake_score(&mut self, opt: &mut Optimizer) -> Result<f64> {
        let (x0, cond) = self.student_batch()?;
        let x0 = x0.detach();
        let (x_t, t, eps) = self.noised(&x0, 0.0)?;
        let prediction = self.fake.net.forward(&x_t, &t, &cond)?;
        Ok(opt.step(&losses::denoising(&self.ctx.schedule, &prediction, &x0, &eps, &t)?)?.loss)
    }

    /// The DMD loss of `x0` with the teacher (CFG) as real score and f_psi as fake score.
    fn dmd_loss(&mut self, x0: &Tensor, cond: &Condition) -> Result<Tensor> {
        let dist = self.ctx.config.dmd.timesteps.clone();
        let t = schedule_times(self.ctx, &dist, x0.dim(0)?, &mut self.rng)?;
        let eps = self.ctx.noise(x0.dim(0)?, &mut self.rng)?;
        let x_t = self.ctx.schedule.add_noise(&x0.detach(), &eps, &t)?;
        let cfg = self.ctx.config.teacher.cfg_scale;
        let p_real = guided_x0_eps(self.teacher.net.as_ref(), &x_t, &t, cond, cfg)?.0.detach();
        let p_fake = predict_x0_eps(self.fake.net.as_ref(), &x_t, &t, cond)?.0.detach();
        Ok(losses::dmd(x0, &p_real, &p_fake)?)
    }

    fn outcome(&self, dmd_trace: Vec<(usize, f64)>) -> StageOutcome {
        StageOutcome {
            weights: varmap_tensors(self.student.model.varmap()),
            dmd_trace,
        }
    }
}

fn score_distillation<'a>(
    ctx: &'a ToyContext,
    teacher: &'a Teacher,
    name: &str,
    init: &HashMap<String, Tensor>,
    steps: Vec<f64>,
) -> Result<ScoreDistillation<'a>> {
    Ok(ScoreDistillation {
        ctx,
        teacher,
        student: new_student(ctx, &format!("{name}-generator"), init, steps)?,
        fake: trainable_net(ctx, &format!("{name}-fake-score"), &teacher.weights)?,
        rng: ctx.rng(name),
    })
}

/// DMD (DMD2's normalised distribution-matching gradient), from `init`.
pub fn dmd(ctx: &ToyContext, teacher: &Teacher, name: &str, init: &HashMap<String, Tensor>) -> Result<StageOutcome> {
    let cfg = &ctx.config.dmd;
    let clip = ctx.config.student.grad_clip;
    let mut run = score_distillation(ctx, teacher, name, init, vec![1.0])?;
    let mut opt_g = Optimizer::new("generator", run.student.model.varmap(), cfg.lr_generator, clip)?;
    let mut opt_f = Optimizer::new("fake-score", run.fake.varmap(), cfg.lr_fake, clip)?;
    let mut log = StageLog::create(ctx, name)?;
    let mut trace = Vec::new();
    let bar = progress(name, cfg.steps);
    for step in 0..cfg.steps {
        let mut fake_loss = 0.0;
        for _ in 0..cfg.fake_updates {
            fake_loss = run.update_fake_score(&mut opt_f)?;
        }
        let (x0, cond) = run.student_batch()?;
        let loss = run.dmd_loss(&x0, &cond)?;
        let g = opt_g.step(&loss)?;
        if step % ctx.config.eval.probe_every == 0 {
            trace.push((step, g.loss));
            log.record(step, &[("dmd", g.loss), ("fake_score", fake_loss), ("grad_norm_g", g.grad_norm)])?;
            bar.set_message(format!("dmd {:.4} fake {:.4}", g.loss, fake_loss));
        }
        bar.inc(1);
    }
    bar.finish();
    Ok(run.outcome(trace))
}

/// ADM: adversarial distribution matching (paper Sec. 3.2) from `init`, with `steps` line
/// times (one entry = one-step student).
pub fn adm(ctx: &ToyContext, teacher: &Teacher, name: &str, init: &HashMap<String, Tensor>, steps: Vec<f64>) -> Result<StageOutcome> {
    let cfg = &ctx.config.adm;
    let clip = ctx.config.student.grad_clip;
    let cfg_scale = ctx.config.teacher.cfg_scale;
    let schedule = &ctx.schedule;
    let delta_t = schedule.delta_t(cfg.flow_divisions);
    let mut run = score_distillation(ctx, teacher, name, init, steps)?;
    let heads = fresh_vars(ctx, &format!("{name}-heads"));
    let discriminator = LatentDiscriminator::new(
        teacher.net.clone(),
        &cfg.taps,
        cfg.head_hidden,
        heads.var_builder(DType::F32, &ctx.device),
    )?;
    let mut opt_g = Optimizer::new("generator", run.student.model.varmap(), cfg.lr_generator, clip)?;
    let mut opt_f = Optimizer::new("fake-score", run.fake.varmap(), cfg.lr_fake, clip)?;
    let mut opt_d = Optimizer::new("discriminator", heads.varmap(), cfg.lr_discriminator, clip)?;
    let mut log = StageLog::create(ctx, name)?;
    let mut trace = Vec::new();
    let bar = progress(name, cfg.steps);
    let earlier = |t: &Tensor| t.affine(1.0, -delta_t);
    for step in 0..cfg.steps {
        let mut fake_loss = 0.0;
        for _ in 0..cfg.ttur {
            fake_loss = run.update_fake_score(&mut opt_f)?;
        }

        // G: x_s^fake = step(f_psi, x_t, t -> t - dt) carries the gradient into x_t and theta.
        let (x0, cond) = run.student_batch()?;
        let (x_t, t, _) = run.noised(&x0, delta_t)?;
        let s = earlier(&t)?;
        let fake_prediction = run.fake.net.forward(&x_t, &t, &cond)?;
        let g_loss = losses::adm_generator(schedule, &fake_prediction, &x_t, &t, &s, |x, s| discriminator.logits(x, s, &cond))?;
        let g = opt_g.step(&g_loss)?;
        let probe = if step % ctx.config.eval.probe_every == 0 {
            Some(run.dmd_loss(&x0.detach(), &cond)?.to_scalar::<f32>()? as f64)
        } else {
            None
        };

        // D: real and fake flow steps from the same detached x_t.
        let mut d_loss = 0.0;
        for _ in 0..cfg.ttur {
            let (x0, cond) = run.student_batch()?;
            let (x_t, t, _) = run.noised(&x0.detach(), delta_t)?;
            let s = earlier(&t)?;
            let real_prediction = guided_prediction(teacher.net.as_ref(), &x_t, &t, &cond, cfg_scale)?.detach();
            let fake_prediction = run.fake.net.forward(&x_t, &t, &cond)?.detach();
            let loss = losses::adm_discriminator(schedule, &real_prediction, &fake_prediction, &x_t, &t, &s, |x, s| {
                discriminator.logits(x, s, &cond)
            })?;
            d_loss = opt_d.step(&loss)?.loss;
        }

        if let Some(dmd) = probe {
            trace.push((step, dmd));
            log.record(
                step,
                &[("loss_g", g.loss), ("loss_d", d_loss), ("fake_score", fake_loss), ("dmd", dmd), ("grad_norm_g", g.grad_norm)],
            )?;
            bar.set_message(format!("g {:.3} d {:.3} dmd {:.4}", g.loss, d_loss, dmd));
        }
        bar.inc(1);
    }
    bar.finish();
    Ok(run.outcome(trace))
}
