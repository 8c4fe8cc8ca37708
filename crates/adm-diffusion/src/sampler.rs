//! Classifier-free guidance and the deterministic multi-step sampler (DDIM for VP schedules,
//! Euler for rectified flow: both are `x_s = alpha_s x0_hat + sigma_s eps_hat`).

use candle_core::{bail, Result, Tensor};

use crate::schedule::{host_tensor, Schedule};

/// Classifier-free guidance: `uncond + scale (cond - uncond)` (Ho & Salimans 2022); the same
/// for eps, v, x0 or flow-velocity predictions since they are all affine in the model output.
pub fn cfg_combine(uncond: &Tensor, cond: &Tensor, scale: f64) -> Result<Tensor> {
    (cond - uncond)?.affine(scale, 0.0)? + uncond
}

/// Deterministic multi-step sampler: from `x` at `timesteps[0]`, at each timestep calls
/// `denoise(x_t, t) -> (x0_hat, eps_hat)` (`t` of shape (B,) with x's dtype and device) and
/// moves with [`Schedule::ode_step`] to the next timestep, the last move to clean. Returns the
/// clean sample. Any parameterisation works: the sampler only sees `(x0_hat, eps_hat)`.
pub fn sample_ode<F>(
    schedule: &Schedule,
    x: Tensor,
    timesteps: &[f64],
    mut denoise: F,
) -> Result<Tensor>
where
    F: FnMut(&Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
{
    if timesteps.is_empty() {
        bail!("sample_ode needs at least one timestep");
    }
    if let Some(t) = timesteps.iter().find(|t| !t.is_finite()) {
        bail!("sample_ode timesteps must be finite, got {t}");
    }
    if let Some(pair) = timesteps.windows(2).find(|pair| pair[0] <= pair[1]) {
        bail!(
            "sample_ode timesteps must be strictly decreasing, got {} then {}",
            pair[0],
            pair[1]
        );
    }
    let batch = x.dim(0)?;
    let per_sample = |time: f64, like: &Tensor| {
        host_tensor(vec![time; batch], &[batch], like.dtype(), like.device())
    };
    let targets = timesteps.iter().skip(1).copied().chain([0.0]);
    timesteps.iter().zip(targets).try_fold(x, |x, (&t, s)| {
        let (x0_hat, eps_hat) = denoise(&x, &per_sample(t, &x)?)?;
        schedule.ode_step(&x0_hat, &eps_hat, &per_sample(s, &x)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleConfig;
    use candle_core::{DType, Device};

    fn schedules() -> Vec<Schedule> {
        [
            ScheduleConfig::sdxl(),
            ScheduleConfig::cogvideox(),
            ScheduleConfig::sd3(),
        ]
        .iter()
        .map(|cfg| Schedule::new(cfg).unwrap())
        .collect()
    }

    fn noise(dtype: DType) -> Tensor {
        Tensor::new(&[[-1.5f64], [-0.5], [0.5], [1.5]], &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn cfg_combine_extrapolates_from_uncond_to_cond() -> Result<()> {
        let uncond = Tensor::new(&[1.0f64, 2.0], &Device::Cpu)?;
        let cond = Tensor::new(&[3.0f64, 5.0], &Device::Cpu)?;
        assert_eq!(values(&cfg_combine(&uncond, &cond, 2.0)?), [5.0, 8.0]);
        assert_eq!(values(&cfg_combine(&uncond, &cond, 1.0)?), [3.0, 5.0]);
        assert_eq!(values(&cfg_combine(&uncond, &cond, 0.0)?), [1.0, 2.0]);
        assert!(cfg_combine(&uncond, &cond.reshape((2, 1))?, 2.0).is_err());
        Ok(())
    }

    /// Data = the single point `c`: the exact denoiser knows x0, and its eps estimate
    /// `(x_t - alpha c) / sigma` stays the same along the whole DDIM/Euler path.
    #[test]
    fn point_mass_lands_exactly_and_keeps_its_noise() -> Result<()> {
        let c = 0.7;
        for schedule in schedules() {
            for steps in [1, 4, 25] {
                let timesteps = schedule.sampling_timesteps(steps)?;
                let mut calls = 0;
                let mut first_eps = None;
                let sample = sample_ode(&schedule, noise(DType::F64), &timesteps, |x_t, t| {
                    assert_eq!(t.dims(), &[4]);
                    assert_eq!(t.dtype(), DType::F64);
                    assert_eq!(values(t), [timesteps[calls]; 4]);
                    calls += 1;
                    let (alpha, sigma) = schedule.alpha_sigma(t, 2)?;
                    let x0 = x_t.ones_like()?.affine(c, 0.0)?;
                    let eps = (x_t - x0.broadcast_mul(&alpha)?)?.broadcast_div(&sigma)?;
                    let first = first_eps.get_or_insert_with(|| values(&eps));
                    for (e, f) in values(&eps).iter().zip(first.iter()) {
                        assert!((e - f).abs() < 1e-9, "eps {e} drifted from {f}");
                    }
                    Ok((x0, eps))
                })?;
                assert_eq!(calls, steps);
                assert_eq!(values(&sample), [c; 4]);
            }
        }
        Ok(())
    }

    /// Data = ±1 with equal weight: the posterior-mean denoiser is `x0 = tanh(alpha x / sigma²)`
    /// and the probability-flow ODE carries each noise to the point on its own side.
    #[test]
    fn two_point_mixture_lands_on_the_nearer_point() -> Result<()> {
        for schedule in schedules() {
            let timesteps = schedule.sampling_timesteps(100)?;
            let sample = sample_ode(&schedule, noise(DType::F32), &timesteps, |x_t, t| {
                assert_eq!(t.dtype(), DType::F32);
                let (alpha, sigma) = schedule.alpha_sigma(t, 2)?;
                let x0 = x_t
                    .broadcast_mul(&alpha)?
                    .broadcast_div(&sigma.sqr()?)?
                    .tanh()?;
                let eps = (x_t - x0.broadcast_mul(&alpha)?)?.broadcast_div(&sigma)?;
                Ok((x0, eps))
            })?;
            for (x, expected) in values(&sample).iter().zip([-1.0, -1.0, 1.0, 1.0]) {
                assert!((x - expected).abs() < 1e-4, "{:?}", values(&sample));
            }
        }
        Ok(())
    }

    #[test]
    fn timesteps_must_be_given_and_decreasing() {
        let schedule = Schedule::new(&ScheduleConfig::sd3()).unwrap();
        let exact = |x: &Tensor, _: &Tensor| Ok((x.clone(), x.clone()));
        let x = noise(DType::F32);
        assert!(sample_ode(&schedule, x.clone(), &[], exact).is_err());
        assert!(sample_ode(&schedule, x.clone(), &[500.0, 500.0], exact).is_err());
        assert!(sample_ode(&schedule, x.clone(), &[200.0, 500.0], exact).is_err());
        assert!(sample_ode(&schedule, x.clone(), &[f64::NAN], exact).is_err());
        assert!(sample_ode(&schedule, x, &[500.0, 0.0], exact).is_ok());
    }
}
