//! The distillation stages on any `Backbone`: MSE regression and ADP on ODE pairs (one-step
//! pre-training), and DMD and ADM score distillation (one- or multi-step).
//! Update orders follow METHOD.md: ADM runs f_psi, then G_theta, then D_tau.

use std::collections::HashMap;
use std::sync::Arc;

use adm_data::store::StoreReader;
use adm_losses as losses;
use adm_models::{
    frozen_var_builder, varmap_tensors, Condition, LatentDiscriminator, PixelDiscriminator,
    RandomFeatureMlp, ToyMlp,
};
use anyhow::Result;
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::context::{progress, stage_log, ToyContext};
use crate::optim::Optimizer;
use crate::pairs::{PairSource, Pairs};
use crate::score;
use crate::student::{line_point, Student, Trainable};
use crate::teacher::Teacher;

/// What a distillation stage leaves behind.
pub struct StageOutcome {
    pub weights: HashMap<String, Tensor>,
    /// (generator step, DMD loss) recorded while training (the paper's Fig. 3).
    pub dmd_trace: Vec<(usize, f64)>,
}

/// The student architecture: the teacher's network, initialised from `init`.
pub fn new_student(
    ctx: &ToyContext,
    stream: &str,
    init: &HashMap<String, Tensor>,
    steps: Vec<f64>,
) -> Result<Student<ToyMlp>> {
    Ok(Student {
        model: trainable_net(ctx, stream, init)?,
        output: ctx.config.student.output,
        steps,
    })
}

fn trainable_net(
    ctx: &ToyContext,
    stream: &str,
    init: &HashMap<String, Tensor>,
) -> Result<Trainable<ToyMlp>> {
    let seed = adm_nn::derive_seed(ctx.config.seed, stream);
    Ok(Trainable::from_weights(seed, &ctx.device, init, |vb| {
        ctx.build_net(vb)
    })?)
}

fn fresh_vars(ctx: &ToyContext, stream: &str) -> adm_nn::SeededVarMap {
    adm_nn::SeededVarMap::new(adm_nn::derive_seed(ctx.config.seed, stream))
}

/// Line times from a unit-time distribution.
fn line_times(dist: &adm_diffusion::TimestepDistribution, n: usize, rng: &mut StdRng) -> Vec<f64> {
    dist.sample_unit(n, rng)
}

/// Schedule timesteps from a unit-time distribution.
fn schedule_times(
    ctx: &ToyContext,
    dist: &adm_diffusion::TimestepDistribution,
    n: usize,
    rng: &mut StdRng,
) -> Result<Tensor> {
    Ok(ctx.timesteps(&dist.sample(&ctx.schedule, n, rng))?)
}

/// A1: regression of x0 on ODE pairs at line times drawn like ADP's (MSE pre-training).
pub fn mse_pretrain(
    ctx: &ToyContext,
    teacher: &Teacher,
    pairs: &StoreReader,
) -> Result<StageOutcome> {
    let cfg = &ctx.config.mse;
    let batch = ctx.config.student.batch_size;
    let mut rng = ctx.rng("mse");
    let student = new_student(ctx, "mse-generator", &teacher.weights, vec![1.0])?;
    let mut opt = Optimizer::new(
        "generator",
        student.model.varmap(),
        cfg.learning_rate,
        ctx.config.student.grad_clip,
    )?;
    let mut feed = PairSource::new(
        pairs,
        adm_nn::derive_seed(ctx.config.seed, "mse-pairs"),
        &ctx.device,
    )?;
    let mut log = stage_log(ctx, "mse")?;
    let bar = progress("mse", cfg.steps);
    for step in 0..cfg.steps {
        let p = feed.next_pairs(batch)?;
        let s = line_times(&ctx.config.adp.generator_timesteps, batch, &mut rng);
        let prediction =
            student.x0_from_line(&line_point(&p.sample, &p.noise, &s)?, &s, &p.cond)?;
        let stats = opt.step(&losses::mse(&prediction, &p.sample)?)?;
        if step % 50 == 0 {
            log.record(
                step,
                &[("loss", stats.loss), ("grad_norm", stats.grad_norm)],
            )?;
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

/// ADP's networks: the student and the hybrid discriminators (paper Sec. 3.3). The latent
/// discriminator D_tau1 is the teacher with heads, on re-noised real and fake x0; the
/// "pixel" discriminator D_tau2 reads clean samples through an independent frozen network
/// (on images: SAM on VAE-decoded samples; on the toy, decoding is the identity).
struct AdpNetworks {
    student: Student<ToyMlp>,
    heads: adm_nn::SeededVarMap,
    latent: LatentDiscriminator,
    pixel: PixelDiscriminator,
}

/// One ADP batch: pairs, generator output and the shared re-noising.
struct AdpBatch {
    x0: Tensor,
    fake_x0: Tensor,
    cond: Condition,
    t: Tensor,
    eps: Tensor,
}

impl AdpNetworks {
    fn new(ctx: &ToyContext, teacher: &Teacher) -> Result<Self> {
        let cfg = &ctx.config.adp;
        // Drawing the random pixel backbone in a seeded map, then reading it back frozen,
        // keeps it out of every optimiser and every gradient.
        let pixel_vars = fresh_vars(ctx, "adp-pixel-backbone");
        let build_pixel =
            |vb| RandomFeatureMlp::new(ctx.model.in_channels, cfg.pixel_width, cfg.pixel_depth, vb);
        build_pixel(pixel_vars.var_builder(DType::F32, &ctx.device))?;
        let pixel_backbone = build_pixel(frozen_var_builder(
            pixel_vars.varmap(),
            DType::F32,
            &ctx.device,
        )?)?;
        let heads = fresh_vars(ctx, "adp-heads");
        let heads_vb = heads.var_builder(DType::F32, &ctx.device);
        Ok(Self {
            student: new_student(ctx, "adp-generator", &teacher.weights, vec![1.0])?,
            latent: LatentDiscriminator::new(
                teacher.net.clone(),
                &cfg.taps,
                cfg.head_hidden,
                heads_vb.pp("latent"),
            )?,
            pixel: PixelDiscriminator::new(
                Arc::new(pixel_backbone),
                cfg.head_hidden,
                heads_vb.pp("pixel"),
            )?,
            heads,
        })
    }

    fn batch(
        &self,
        ctx: &ToyContext,
        feed: &mut PairSource<&StoreReader>,
        rng: &mut StdRng,
    ) -> Result<AdpBatch> {
        let cfg = &ctx.config.adp;
        let n = ctx.config.student.batch_size;
        let Pairs {
            noise,
            sample: x0,
            cond,
        } = feed.next_pairs(n)?;
        let s = line_times(&cfg.generator_timesteps, n, rng);
        let fake_x0 = self
            .student
            .x0_from_line(&line_point(&x0, &noise, &s)?, &s, &cond)?;
        // Real and fake are re-noised with the same fresh noise at the same times.
        let t = schedule_times(ctx, &cfg.discriminator_timesteps, n, rng)?;
        let eps = ctx.noise(n, rng)?;
        Ok(AdpBatch {
            x0,
            fake_x0,
            cond,
            t,
            eps,
        })
    }

    /// -(l1 D1(x~_t, t) + l2 D2(x~_0)).
    fn generator_loss(&self, ctx: &ToyContext, b: &AdpBatch) -> Result<Tensor> {
        let cfg = &ctx.config.adp;
        let fake_t = ctx.schedule.add_noise(&b.fake_x0, &b.eps, &b.t)?;
        Ok(losses::adp_generator(
            &self.latent.logits(&fake_t, &b.t, &b.cond)?,
            &self.pixel.logits(&b.fake_x0)?,
            cfg.lambda_latent,
            cfg.lambda_pixel,
        )?)
    }

    /// Weighted hinge losses of both discriminators on detached fakes.
    fn discriminator_loss(&self, ctx: &ToyContext, b: &AdpBatch) -> Result<Tensor> {
        let cfg = &ctx.config.adp;
        let fake_x0 = b.fake_x0.detach();
        let fake_t = ctx.schedule.add_noise(&fake_x0, &b.eps, &b.t)?;
        let real_t = ctx.schedule.add_noise(&b.x0, &b.eps, &b.t)?;
        Ok(losses::adp_discriminator(
            &self.latent.logits(&real_t, &b.t, &b.cond)?,
            &self.latent.logits(&fake_t, &b.t, &b.cond)?,
            &self.pixel.logits(&b.x0)?,
            &self.pixel.logits(&fake_x0)?,
            cfg.lambda_latent,
            cfg.lambda_pixel,
        )?)
    }
}

/// ADP: hybrid adversarial pre-training on ODE pairs; generator update, then discriminators.
pub fn adp(ctx: &ToyContext, teacher: &Teacher, pairs: &StoreReader) -> Result<StageOutcome> {
    let cfg = &ctx.config.adp;
    let clip = ctx.config.student.grad_clip;
    let mut rng = ctx.rng("adp");
    let nets = AdpNetworks::new(ctx, teacher)?;
    let mut opt_g = Optimizer::new(
        "generator",
        nets.student.model.varmap(),
        cfg.lr_generator,
        clip,
    )?;
    let mut opt_d = Optimizer::new(
        "discriminator",
        nets.heads.varmap(),
        cfg.lr_discriminator,
        clip,
    )?;
    let mut feed = PairSource::new(
        pairs,
        adm_nn::derive_seed(ctx.config.seed, "adp-pairs"),
        &ctx.device,
    )?;
    let mut log = stage_log(ctx, "adp")?;
    let bar = progress("adp", cfg.steps);
    for step in 0..cfg.steps {
        let batch = nets.batch(ctx, &mut feed, &mut rng)?;
        let g = opt_g.step(&nets.generator_loss(ctx, &batch)?)?;
        let d = opt_d.step(&nets.discriminator_loss(ctx, &batch)?)?;
        if step % 50 == 0 {
            log.record(
                step,
                &[
                    ("loss_g", g.loss),
                    ("loss_d", d.loss),
                    ("grad_norm_g", g.grad_norm),
                ],
            )?;
            bar.set_message(format!("g {:.3} d {:.3}", g.loss, d.loss));
        }
        bar.inc(1);
    }
    bar.finish();
    Ok(StageOutcome {
        weights: varmap_tensors(nets.student.model.varmap()),
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
    probe: DmdProbe,
}

/// A fixed set of noise, classes, timesteps and re-noising noise on which the DMD loss is
/// measured during training, so that values at different steps are comparable (Fig. 3).
struct DmdProbe {
    noise: Tensor,
    cond: Condition,
    t: Tensor,
    eps: Tensor,
    seed: u64,
}

/// Samples in the DMD probe.
const PROBE_SIZE: usize = 1024;

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
        Ok(score::noised(&self.ctx.schedule, x0, t_min, &mut self.rng)?)
    }

    /// The f_psi loss: the plain denoising loss on detached student samples.
    fn fake_score_loss(&mut self) -> Result<Tensor> {
        let (x0, cond) = self.student_batch()?;
        let x0 = x0.detach();
        let (x_t, t, eps) = self.noised(&x0, 0.0)?;
        Ok(score::fake_score_loss(
            self.fake.net.as_ref(),
            &x0,
            (&x_t, &t, &eps),
            &cond,
        )?)
    }

    /// ADM's generator loss -D(x_s^fake, s).
    fn adm_generator_loss(
        &mut self,
        discriminator: &LatentDiscriminator,
        delta_t: f64,
    ) -> Result<Tensor> {
        let (x0, cond) = self.student_batch()?;
        let (x_t, t, _) = self.noised(&x0, delta_t)?;
        Ok(score::adm_generator_loss(
            self.fake.net.as_ref(),
            discriminator,
            &x_t,
            &t,
            delta_t,
            &cond,
        )?)
    }

    /// ADM's hinge discriminator loss on teacher-CFG and fake-score flow steps from the same
    /// detached x_t.
    fn adm_discriminator_loss(
        &mut self,
        discriminator: &LatentDiscriminator,
        delta_t: f64,
    ) -> Result<Tensor> {
        let (x0, cond) = self.student_batch()?;
        let (x_t, t, _) = self.noised(&x0.detach(), delta_t)?;
        Ok(score::adm_discriminator_loss(
            self.teacher.net.as_ref(),
            self.ctx.config.teacher.cfg_scale,
            self.fake.net.as_ref(),
            discriminator,
            &x_t,
            &t,
            delta_t,
            &cond,
        )?)
    }

    /// The DMD loss of `x0` at noise `eps` and times `t`, with the teacher (CFG) as real
    /// score and f_psi as fake score.
    fn dmd_loss_at(
        &self,
        x0: &Tensor,
        cond: &Condition,
        t: &Tensor,
        eps: &Tensor,
    ) -> Result<Tensor> {
        Ok(score::dmd_loss(
            self.teacher.net.as_ref(),
            self.ctx.config.teacher.cfg_scale,
            self.fake.net.as_ref(),
            x0,
            cond,
            t,
            eps,
        )?)
    }

    /// The DMD generator loss on a fresh batch (DMD2: t from `dmd.timesteps`).
    fn dmd_loss(&mut self, x0: &Tensor, cond: &Condition) -> Result<Tensor> {
        let dist = self.ctx.config.dmd.timesteps.clone();
        let t = schedule_times(self.ctx, &dist, x0.dim(0)?, &mut self.rng)?;
        let eps = self.ctx.noise(x0.dim(0)?, &mut self.rng)?;
        self.dmd_loss_at(x0, cond, &t, &eps)
    }

    /// The DMD loss of the current student on the fixed probe set.
    fn probe_dmd_loss(&self) -> Result<f64> {
        let p = &self.probe;
        let mut renoise = StdRng::seed_from_u64(p.seed);
        let x0 = self.student.sample(&p.noise, &p.cond, &mut renoise)?;
        let loss = self.dmd_loss_at(&x0, &p.cond, &p.t, &p.eps)?;
        Ok(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
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
    // The same probe for every method, so their DMD traces are comparable.
    let mut rng = ctx.rng("dmd-probe");
    let probe = DmdProbe {
        noise: ctx.noise(PROBE_SIZE, &mut rng)?,
        cond: ctx.classes(PROBE_SIZE, &mut rng)?,
        t: schedule_times(ctx, &ctx.config.dmd.timesteps, PROBE_SIZE, &mut rng)?,
        eps: ctx.noise(PROBE_SIZE, &mut rng)?,
        seed: adm_nn::derive_seed(ctx.config.seed, "dmd-probe-renoise"),
    };
    Ok(ScoreDistillation {
        ctx,
        teacher,
        student: new_student(ctx, &format!("{name}-generator"), init, steps)?,
        fake: trainable_net(ctx, &format!("{name}-fake-score"), &teacher.weights)?,
        rng: ctx.rng(name),
        probe,
    })
}

/// DMD (DMD2's normalised distribution-matching gradient), from `init`.
pub fn dmd(
    ctx: &ToyContext,
    teacher: &Teacher,
    name: &str,
    init: &HashMap<String, Tensor>,
) -> Result<StageOutcome> {
    let cfg = &ctx.config.dmd;
    let clip = ctx.config.student.grad_clip;
    let mut run = score_distillation(ctx, teacher, name, init, vec![1.0])?;
    let mut opt_g = Optimizer::new(
        "generator",
        run.student.model.varmap(),
        cfg.lr_generator,
        clip,
    )?;
    let mut opt_f = Optimizer::new("fake-score", run.fake.varmap(), cfg.lr_fake, clip)?;
    let mut log = stage_log(ctx, name)?;
    let mut trace = Vec::new();
    let bar = progress(name, cfg.steps);
    for step in 0..cfg.steps {
        let mut fake_loss = 0.0;
        for _ in 0..cfg.fake_updates {
            fake_loss = opt_f.step(&run.fake_score_loss()?)?.loss;
        }
        let (x0, cond) = run.student_batch()?;
        let loss = run.dmd_loss(&x0, &cond)?;
        let g = opt_g.step(&loss)?;
        if step % ctx.config.eval.probe_every == 0 {
            let probe = run.probe_dmd_loss()?;
            trace.push((step, probe));
            log.record(
                step,
                &[
                    ("loss_g", g.loss),
                    ("dmd_probe", probe),
                    ("fake_score", fake_loss),
                    ("grad_norm_g", g.grad_norm),
                ],
            )?;
            bar.set_message(format!("dmd {:.4} fake {:.4}", g.loss, fake_loss));
        }
        bar.inc(1);
    }
    bar.finish();
    Ok(run.outcome(trace))
}

/// D_tau of ADM: the teacher with fresh heads on `adm.taps`.
fn adm_discriminator(
    ctx: &ToyContext,
    teacher: &Teacher,
    name: &str,
) -> Result<(adm_nn::SeededVarMap, LatentDiscriminator)> {
    let cfg = &ctx.config.adm;
    let heads = fresh_vars(ctx, &format!("{name}-heads"));
    let discriminator = LatentDiscriminator::new(
        teacher.net.clone(),
        &cfg.taps,
        cfg.head_hidden,
        heads.var_builder(DType::F32, &ctx.device),
    )?;
    Ok((heads, discriminator))
}

/// ADM: adversarial distribution matching (paper Sec. 3.2) from `init`, with `steps` line
/// times (one entry = one-step student).
pub fn adm(
    ctx: &ToyContext,
    teacher: &Teacher,
    name: &str,
    init: &HashMap<String, Tensor>,
    steps: Vec<f64>,
) -> Result<StageOutcome> {
    let cfg = &ctx.config.adm;
    let clip = ctx.config.student.grad_clip;
    let delta_t = ctx.schedule.delta_t(cfg.flow_divisions);
    let mut run = score_distillation(ctx, teacher, name, init, steps)?;
    let (heads, discriminator) = adm_discriminator(ctx, teacher, name)?;
    let mut opt_g = Optimizer::new(
        "generator",
        run.student.model.varmap(),
        cfg.lr_generator,
        clip,
    )?;
    let mut opt_f = Optimizer::new("fake-score", run.fake.varmap(), cfg.lr_fake, clip)?;
    let mut opt_d = Optimizer::new("discriminator", heads.varmap(), cfg.lr_discriminator, clip)?;
    let mut log = stage_log(ctx, name)?;
    let mut trace = Vec::new();
    let bar = progress(name, cfg.steps);
    for step in 0..cfg.steps {
        let mut fake_loss = 0.0;
        for _ in 0..cfg.ttur {
            fake_loss = opt_f.step(&run.fake_score_loss()?)?.loss;
        }
        let g = opt_g.step(&run.adm_generator_loss(&discriminator, delta_t)?)?;
        let probe = if step % ctx.config.eval.probe_every == 0 {
            Some(run.probe_dmd_loss()?)
        } else {
            None
        };
        let mut d_loss = 0.0;
        for _ in 0..cfg.ttur {
            d_loss = opt_d
                .step(&run.adm_discriminator_loss(&discriminator, delta_t)?)?
                .loss;
        }

        if let Some(dmd) = probe {
            trace.push((step, dmd));
            log.record(
                step,
                &[
                    ("loss_g", g.loss),
                    ("loss_d", d_loss),
                    ("fake_score", fake_loss),
                    ("dmd_probe", dmd),
                    ("grad_norm_g", g.grad_norm),
                ],
            )?;
            bar.set_message(format!("g {:.3} d {:.3} dmd {:.4}", g.loss, d_loss, dmd));
        }
        bar.inc(1);
    }
    bar.finish();
    Ok(run.outcome(trace))
}

#[cfg(test)]
pub(crate) mod tests {
    //! Every trainable network receives a gradient on every Var from the loss that trains
    //! it, and nothing reaches the frozen teacher.

    use super::*;
    use crate::collect::collect_toy_pairs;
    use crate::config::ToyRunConfig;
    use adm_nn::assert_every_var_has_grad;

    pub(crate) fn tiny_context(name: &str, extra: &[&str]) -> ToyContext {
        let dir = std::env::temp_dir().join(format!("adm-distill-{name}-{}", std::process::id()));
        let mut overrides: Vec<String> = [
            "model.hidden_size=8",
            "model.num_blocks=2",
            "model.time_embed_dim=4",
            "adp.taps=[\"blocks.0\", \"blocks.1\"]",
            "adm.taps=[\"blocks.0\", \"blocks.1\"]",
            "adp.head_hidden=4",
            "adp.pixel_width=4",
            "adm.head_hidden=4",
            "student.batch_size=8",
            "ode_pairs.count=16",
            "ode_pairs.batch_size=8",
            "ode_pairs.shard_size=8",
            "teacher.sampling_steps=3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        overrides.push(format!("run_dir={}", dir.display()));
        overrides.extend(extra.iter().map(|s| s.to_string()));
        ToyContext::new(ToyRunConfig::load(None, &overrides).unwrap()).unwrap()
    }

    /// An untrained teacher: gradient coverage does not depend on training.
    pub(crate) fn random_teacher(ctx: &ToyContext) -> Teacher {
        let vars = adm_nn::SeededVarMap::new(99);
        ctx.build_net(vars.var_builder(DType::F32, &ctx.device))
            .unwrap();
        Teacher::from_weights(ctx, varmap_tensors(vars.varmap())).unwrap()
    }

    fn assert_teacher_untouched(teacher: &Teacher, grads: &candle_core::backprop::GradStore) {
        for tensor in teacher.weights.values() {
            assert!(
                grads.get(tensor).is_none(),
                "the frozen teacher received a gradient"
            );
        }
    }

    #[test]
    fn score_distillation_losses_reach_every_var() -> Result<()> {
        for output in ["velocity", "native"] {
            let ctx = tiny_context(
                &format!("score-{output}"),
                &[&format!("student.output=\"{output}\"")],
            );
            let teacher = random_teacher(&ctx);
            let mut run = score_distillation(&ctx, &teacher, "adm", &teacher.weights, vec![1.0])?;
            let (heads, discriminator) = adm_discriminator(&ctx, &teacher, "adm")?;
            let delta_t = ctx.schedule.delta_t(ctx.config.adm.flow_divisions);

            let grads = run.fake_score_loss()?.backward()?;
            assert_every_var_has_grad(run.fake.varmap(), &grads)?;

            let grads = run
                .adm_generator_loss(&discriminator, delta_t)?
                .backward()?;
            assert_every_var_has_grad(run.student.model.varmap(), &grads)?;
            assert_teacher_untouched(&teacher, &grads);

            let grads = run
                .adm_discriminator_loss(&discriminator, delta_t)?
                .backward()?;
            assert_every_var_has_grad(heads.varmap(), &grads)?;
            for var in run.student.model.varmap().all_vars() {
                assert!(
                    grads.get(var.as_tensor()).is_none(),
                    "the discriminator loss reached the generator"
                );
            }

            let (x0_live, cond_live) = run.student_batch()?;
            let grads = run.dmd_loss(&x0_live, &cond_live)?.backward()?;
            assert_every_var_has_grad(run.student.model.varmap(), &grads)?;
            assert_teacher_untouched(&teacher, &grads);
            // The probe is a plain number, the same twice for the same student.
            let probe = run.probe_dmd_loss()?;
            assert!(probe.is_finite() && probe > 0.0);
            assert_eq!(probe, run.probe_dmd_loss()?);
        }
        Ok(())
    }

    #[test]
    fn multistep_student_gets_gradients_at_every_step() -> Result<()> {
        let ctx = tiny_context("multistep", &[]);
        let teacher = random_teacher(&ctx);
        let steps = ctx.config.student.multistep.clone();
        let mut run = score_distillation(&ctx, &teacher, "adm-multistep", &teacher.weights, steps)?;
        // The step is drawn per batch: enough draws cover every step with near certainty.
        for _ in 0..12 {
            let (x0, _) = run.student_batch()?;
            assert_every_var_has_grad(
                run.student.model.varmap(),
                &x0.sqr()?.sum_all()?.backward()?,
            )?;
        }
        Ok(())
    }

    #[test]
    fn adp_losses_reach_every_var() -> Result<()> {
        let ctx = tiny_context("adp", &[]);
        let teacher = random_teacher(&ctx);
        let pairs = collect_toy_pairs(&ctx, &teacher)?;
        let nets = AdpNetworks::new(&ctx, &teacher)?;
        let mut feed = PairSource::new(&pairs, 1, &ctx.device)?;
        let batch = nets.batch(&ctx, &mut feed, &mut ctx.rng("test"))?;
        let grads = nets.generator_loss(&ctx, &batch)?.backward()?;
        assert_every_var_has_grad(nets.student.model.varmap(), &grads)?;
        assert_teacher_untouched(&teacher, &grads);
        let grads = nets.discriminator_loss(&ctx, &batch)?.backward()?;
        assert_every_var_has_grad(nets.heads.varmap(), &grads)?;
        Ok(())
    }
}
