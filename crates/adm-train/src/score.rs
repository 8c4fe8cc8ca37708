//! The score-distillation losses over any `Backbone`, shared by the toy stages
//! (`distill.rs`) and the engine (`engine.rs`): the fake-score denoising loss, ADM's generator
//! and discriminator losses, and the DMD loss. Random draws stay with the caller, so each
//! keeps its own random stream.

use adm_diffusion::Schedule;
use adm_losses as losses;
use adm_models::LatentDiscriminator;
use adm_models::{guided_prediction, guided_x0_eps, predict_x0_eps, Backbone, Condition};
use candle_core::{Result, Tensor};
use rand::rngs::StdRng;
use rand::Rng;

/// `x0` noised at per-sample timesteps uniform in `[t_min, t_max]`: (x_t, t, eps).
pub fn noised(
    schedule: &Schedule,
    x0: &Tensor,
    t_min: f64,
    rng: &mut StdRng,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = x0.dim(0)?;
    let t_max = schedule.t_max();
    let t: Vec<f32> = (0..n)
        .map(|_| rng.random_range(t_min..=t_max) as f32)
        .collect();
    let t = Tensor::from_vec(t, n, x0.device())?;
    let eps = adm_nn::randn(rng, x0.shape(), x0.device())?;
    let x_t = schedule.add_noise(x0, &eps, &t)?;
    Ok((x_t, t, eps))
}

/// The f_psi loss: the plain denoising loss of the fake score at `x_t`, the noised `x0` (a
/// detached student sample).
pub fn fake_score_loss(
    fake: &dyn Backbone,
    x0: &Tensor,
    (x_t, t, eps): (&Tensor, &Tensor, &Tensor),
    cond: &Condition,
) -> Result<Tensor> {
    let prediction = fake.forward(x_t, t, cond)?;
    losses::denoising(fake.schedule(), &prediction, x0, eps, t)
}

/// ADM's generator loss -D(x_s^fake, s) with s = t - delta_t: x_s^fake = step(f_psi, x_t)
/// carries the gradient into x_t and so into the generator that made it.
pub fn adm_generator_loss(
    fake: &dyn Backbone,
    discriminator: &LatentDiscriminator,
    x_t: &Tensor,
    t: &Tensor,
    delta_t: f64,
    cond: &Condition,
) -> Result<Tensor> {
    let s = t.affine(1.0, -delta_t)?;
    let fake_prediction = fake.forward(x_t, t, cond)?;
    losses::adm_generator(fake.schedule(), &fake_prediction, x_t, t, &s, |x, s| {
        discriminator.logits(x, s, cond)
    })
}

/// ADM's hinge discriminator loss on the teacher's (CFG) and the fake score's flow steps
/// from the same detached x_t.
#[allow(clippy::too_many_arguments)]
pub fn adm_discriminator_loss(
    teacher: &dyn Backbone,
    cfg_scale: f64,
    fake: &dyn Backbone,
    discriminator: &LatentDiscriminator,
    x_t: &Tensor,
    t: &Tensor,
    delta_t: f64,
    cond: &Condition,
) -> Result<Tensor> {
    let s = t.affine(1.0, -delta_t)?;
    let real_prediction = guided_prediction(teacher, x_t, t, cond, cfg_scale)?.detach();
    let fake_prediction = fake.forward(x_t, t, cond)?.detach();
    losses::adm_discriminator(
        teacher.schedule(),
        &real_prediction,
        &fake_prediction,
        x_t,
        t,
        &s,
        |x, s| discriminator.logits(x, s, cond),
    )
}

/// The DMD loss of `x0` re-noised with `eps` at `t`, with the teacher (CFG) as real score and
/// the fake score as fake score.
pub fn dmd_loss(
    teacher: &dyn Backbone,
    cfg_scale: f64,
    fake: &dyn Backbone,
    x0: &Tensor,
    cond: &Condition,
    t: &Tensor,
    eps: &Tensor,
) -> Result<Tensor> {
    let x_t = teacher.schedule().add_noise(&x0.detach(), eps, t)?;
    let p_real = guided_x0_eps(teacher, &x_t, t, cond, cfg_scale)?.0.detach();
    let p_fake = predict_x0_eps(fake, &x_t, t, cond)?.0.detach();
    losses::dmd(x0, &p_real, &p_fake)
}
