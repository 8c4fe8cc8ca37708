//! Adversarial distribution matching (ADM, arXiv 2507.18569, Sec. 3): a score estimator's
//! prediction at `x_t` is turned into one deterministic ODE step `x_t → x_s` (`s = t - Δt`),
//! and a discriminator on `(x_s, s)` tells the teacher's step from the fake score's.

use adm_diffusion::Schedule;
use candle_core::{Result, Tensor};

use crate::ensure_same_shape;
use crate::gan::{hinge_discriminator, hinge_generator};

/// One ODE step from a score estimator's native prediction:
/// `(x̂0, ε̂) = to_x0_eps(prediction, x_t, t)`, `x_s = α_s x̂0 + σ_s ε̂`
/// (the paper's `x_{t-Δt}`; DDIM for VP schedules, Euler for rectified flow).
pub fn flow_sample(
    schedule: &Schedule,
    prediction: &Tensor,
    x_t: &Tensor,
    t: &Tensor,
    s: &Tensor,
) -> Result<Tensor> {
    ensure_same_shape("flow_sample", "x_t", x_t, "prediction", prediction)?;
    let (x0_hat, eps_hat) = schedule.to_x0_eps(prediction, x_t, t)?;
    schedule.ode_step(&x0_hat, &eps_hat, s)
}

/// ADM generator loss `-mean(D(x_s^fake, s))`, `x_s^fake = flow_sample(fake_prediction, x_t)`.
///
/// Nothing is detached: the gradient reaches `x_t` (and so the generator) both directly through
/// the conversion and through `fake_prediction` when the caller built it from `x_t`.
/// `discriminator(x_s, s)` returns logits.
pub fn adm_generator<D>(
    schedule: &Schedule,
    fake_prediction: &Tensor,
    x_t: &Tensor,
    t: &Tensor,
    s: &Tensor,
    discriminator: D,
) -> Result<Tensor>
where
    D: Fn(&Tensor, &Tensor) -> Result<Tensor>,
{
    let x_s_fake = flow_sample(schedule, fake_prediction, x_t, t, s)?;
    hinge_generator(&discriminator(&x_s_fake, s)?)
}

/// ADM discriminator loss: `hinge_d(D(x_s^real, s), D(x_s^fake, s))` with `x_s^real` stepped
/// by the teacher's (CFG) prediction and `x_s^fake` by the fake score's, both detached, so only
/// the discriminator's own parameters receive gradient.
pub fn adm_discriminator<D>(
    schedule: &Schedule,
    real_prediction: &Tensor,
    fake_prediction: &Tensor,
    x_t: &Tensor,
    t: &Tensor,
    s: &Tensor,
    discriminator: D,
) -> Result<Tensor>
where
    D: Fn(&Tensor, &Tensor) -> Result<Tensor>,
{
    ensure_same_shape("adm_discriminator", "x_t", x_t, "real_prediction", real_prediction)?;
    ensure_same_shape("adm_discriminator", "x_t", x_t, "fake_prediction", fake_prediction)?;
    let x_s_real = flow_sample(schedule, real_prediction, x_t, t, s)?.detach();
    let x_s_fake = flow_sample(schedule, fake_prediction, x_t, t, s)?.detach();
    hinge_discriminator(&discriminator(&x_s_real, s)?, &discriminator(&x_s_fake, s)?)
}
