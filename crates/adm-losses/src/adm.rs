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
    ensure_same_shape(
        "adm_discriminator",
        "x_t",
        x_t,
        "real_prediction",
        real_prediction,
    )?;
    ensure_same_shape(
        "adm_discriminator",
        "x_t",
        x_t,
        "fake_prediction",
        fake_prediction,
    )?;
    let x_s_real = flow_sample(schedule, real_prediction, x_t, t, s)?.detach();
    let x_s_fake = flow_sample(schedule, fake_prediction, x_t, t, s)?.detach();
    hinge_discriminator(&discriminator(&x_s_real, s)?, &discriminator(&x_s_fake, s)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{sample, schedules, timesteps};
    use adm_nn::{check_gradients, GradCheck};
    use candle_core::{Device, Var};
    use std::cell::RefCell;

    /// A smooth toy discriminator `0.9 tanh(Σ x ⊙ w) + 1e-4 s` per sample. Its logits stay in
    /// (-1, 1), off the hinge kinks, so finite differences are exact. Every `s` it receives is
    /// recorded in `seen_s`.
    fn toy_discriminator<'a>(
        w: &'a Tensor,
        seen_s: &'a RefCell<Vec<Vec<f64>>>,
    ) -> impl Fn(&Tensor, &Tensor) -> Result<Tensor> + 'a {
        move |x_s, s| {
            seen_s.borrow_mut().push(s.to_vec1::<f64>()?);
            let projected = x_s.broadcast_mul(w)?.flatten_from(1)?.sum(1)?;
            projected.tanh()?.affine(0.9, 0.0)? + s.affine(1e-4, 0.0)?
        }
    }

    fn weights() -> Result<Tensor> {
        Tensor::new(&[[0.4f64, -0.3], [0.2, 0.5]], &Device::Cpu)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f64>()
    }

    #[test]
    fn flow_sample_with_the_exact_prediction_lands_on_the_noised_sample_at_s() -> Result<()> {
        for (name, schedule) in schedules()? {
            let (x0, eps) = (sample(0.0)?, sample(1.1)?);
            let (t, s) = timesteps(&schedule)?;
            let x_t = schedule.add_noise(&x0, &eps, &t)?;
            let prediction = schedule.target(&x0, &eps, &t)?;
            let x_s = flow_sample(&schedule, &prediction, &x_t, &t, &s)?;
            let expected = schedule.add_noise(&x0, &eps, &s)?;
            let err = max_abs_diff(&x_s, &expected)?;
            assert!(err < 1e-10, "{name}: {err}");
        }
        Ok(())
    }

    #[test]
    fn adm_generator_value_and_the_s_it_passes_on() -> Result<()> {
        for (name, schedule) in schedules()? {
            let (t, s) = timesteps(&schedule)?;
            let (prediction, x_t) = (sample(2.3)?, sample(0.7)?);
            let w = weights()?;
            let seen_s = RefCell::new(Vec::new());
            let loss = adm_generator(
                &schedule,
                &prediction,
                &x_t,
                &t,
                &s,
                toy_discriminator(&w, &seen_s),
            )?;
            let x_s = flow_sample(&schedule, &prediction, &x_t, &t, &s)?;
            let expected = toy_discriminator(&w, &RefCell::new(Vec::new()))(&x_s, &s)?
                .mean_all()?
                .neg()?;
            assert!(max_abs_diff(&loss, &expected)? < 1e-14, "{name}");
            assert_eq!(*seen_s.borrow(), vec![s.to_vec1::<f64>()?], "{name}");
        }
        Ok(())
    }

    #[test]
    fn adm_generator_gradient_reaches_x_t_and_the_prediction() -> Result<()> {
        // The harness fails when an input gets no gradient, so this also proves that the
        // gradient flows into both `x_t` and the fake prediction.
        let w = weights()?;
        for (name, schedule) in schedules()? {
            let (t, s) = timesteps(&schedule)?;
            let seen_s = RefCell::new(Vec::new());
            check_gradients(
                |xs| {
                    adm_generator(
                        &schedule,
                        &xs[0],
                        &xs[1],
                        &t,
                        &s,
                        toy_discriminator(&w, &seen_s),
                    )
                },
                &[sample(2.3)?, sample(0.7)?],
                GradCheck::default(),
            )
            .map_err(|err| err.context(name))?;
            // The fake score as a function of x_t: the total derivative through both paths.
            check_gradients(
                |xs| {
                    let fake_prediction = xs[0].tanh()?.affine(0.5, 0.1)?;
                    adm_generator(
                        &schedule,
                        &fake_prediction,
                        &xs[0],
                        &t,
                        &s,
                        toy_discriminator(&w, &seen_s),
                    )
                },
                &[sample(0.7)?],
                GradCheck::default(),
            )
            .map_err(|err| err.context(name))?;
        }
        Ok(())
    }

    #[test]
    fn adm_discriminator_value_and_the_s_it_passes_on() -> Result<()> {
        for (name, schedule) in schedules()? {
            let (t, s) = timesteps(&schedule)?;
            let (real, fake, x_t) = (sample(2.3)?, sample(-0.4)?, sample(0.7)?);
            let w = weights()?;
            let seen_s = RefCell::new(Vec::new());
            let loss = adm_discriminator(
                &schedule,
                &real,
                &fake,
                &x_t,
                &t,
                &s,
                toy_discriminator(&w, &seen_s),
            )?;
            let unrecorded = RefCell::new(Vec::new());
            let d = toy_discriminator(&w, &unrecorded);
            let expected = crate::hinge_discriminator(
                &d(&flow_sample(&schedule, &real, &x_t, &t, &s)?, &s)?,
                &d(&flow_sample(&schedule, &fake, &x_t, &t, &s)?, &s)?,
            )?;
            assert!(max_abs_diff(&loss, &expected)? < 1e-14, "{name}");
            let s_values = s.to_vec1::<f64>()?;
            assert_eq!(*seen_s.borrow(), vec![s_values.clone(), s_values], "{name}");
        }
        Ok(())
    }

    #[test]
    fn adm_discriminator_trains_only_the_discriminator() -> Result<()> {
        for (name, schedule) in schedules()? {
            let (t, s) = timesteps(&schedule)?;
            let x_t = Var::from_tensor(&sample(0.7)?)?;
            let real = Var::from_tensor(&sample(2.3)?)?;
            let fake = Var::from_tensor(&sample(-0.4)?)?;
            let w = Var::from_tensor(&weights()?)?;
            let seen_s = RefCell::new(Vec::new());
            let loss = adm_discriminator(
                &schedule,
                &real,
                &fake,
                &x_t,
                &t,
                &s,
                toy_discriminator(&w, &seen_s),
            )?;
            let grads = loss.backward()?;
            assert!(grads.get(&x_t).is_none(), "{name}: x_t must be detached");
            assert!(
                grads.get(&real).is_none(),
                "{name}: real_prediction must be detached"
            );
            assert!(
                grads.get(&fake).is_none(),
                "{name}: fake_prediction must be detached"
            );
            let w_grad = grads.get(&w).expect("the discriminator has a gradient");
            assert!(w_grad.abs()?.max_all()?.to_scalar::<f64>()? > 0.0, "{name}");

            check_gradients(
                |ws| {
                    adm_discriminator(
                        &schedule,
                        &real,
                        &fake,
                        &x_t,
                        &t,
                        &s,
                        toy_discriminator(&ws[0], &seen_s),
                    )
                },
                &[weights()?],
                GradCheck::default(),
            )
            .map_err(|err| err.context(name))?;
        }
        Ok(())
    }

    #[test]
    fn shape_mismatch_names_the_argument() -> Result<()> {
        let schedule = &schedules()?[0].1;
        let (t, s) = timesteps(schedule)?;
        let x_t = sample(0.7)?;
        let wrong = x_t.reshape((3, 4))?;
        let never_called = |_: &Tensor, _: &Tensor| -> Result<Tensor> { unreachable!() };
        let err = adm_discriminator(schedule, &x_t, &wrong, &x_t, &t, &s, never_called)
            .unwrap_err()
            .to_string();
        assert!(err.contains("fake_prediction"), "{err}");
        let err = adm_generator(schedule, &wrong, &x_t, &t, &s, never_called)
            .unwrap_err()
            .to_string();
        assert!(err.contains("prediction"), "{err}");
        Ok(())
    }
}
