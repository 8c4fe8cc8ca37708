//! Regression losses: plain MSE (the ODE-pair regression baseline, ADM arXiv 2507.18569
//! Table 4 A1) and the fake-score denoising loss (DMD2, arXiv 2405.14622).

use adm_diffusion::Schedule;
use candle_core::{Result, Tensor};

use crate::{ensure_non_empty, ensure_same_shape};

/// Mean squared error over all elements: `mean((prediction - target)²)`. Shapes must match.
pub fn mse(prediction: &Tensor, target: &Tensor) -> Result<Tensor> {
    ensure_non_empty("mse", "prediction", prediction)?;
    ensure_same_shape("mse", "prediction", prediction, "target", target)?;
    (prediction - target)?.sqr()?.mean_all()
}

/// Fake-score denoising loss in the schedule's own parameterisation:
/// `mse(prediction, schedule.target(x0, eps, t))` (ε, v or flow velocity).
pub fn denoising(
    schedule: &Schedule,
    prediction: &Tensor,
    x0: &Tensor,
    eps: &Tensor,
    t: &Tensor,
) -> Result<Tensor> {
    ensure_same_shape("denoising", "x0", x0, "prediction", prediction)?;
    ensure_same_shape("denoising", "x0", x0, "eps", eps)?;
    mse(prediction, &schedule.target(x0, eps, t)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{sample, schedules, timesteps};
    use adm_nn::{check_gradients, GradCheck};
    use candle_core::{DType, Device};

    #[test]
    fn mse_by_hand() -> Result<()> {
        // ((1 - 1)² + (2 - 0)² + (3 - 0)²) / 3 = 13 / 3
        let loss = mse(
            &Tensor::new(&[1f64, 2.0, 3.0], &Device::Cpu)?,
            &Tensor::new(&[1f64, 0.0, 0.0], &Device::Cpu)?,
        )?;
        assert!((loss.to_scalar::<f64>()? - 13.0 / 3.0).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn mse_does_not_broadcast() -> Result<()> {
        let prediction = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let target = Tensor::zeros((1, 3), DType::F32, &Device::Cpu)?;
        let err = mse(&prediction, &target).unwrap_err().to_string();
        assert!(err.contains("target"), "{err}");
        Ok(())
    }

    #[test]
    fn mse_gradient_matches_finite_differences() -> Result<()> {
        let inputs = [
            Tensor::randn(0f64, 1.0, (2, 3, 4), &Device::Cpu)?,
            Tensor::randn(0f64, 1.0, (2, 3, 4), &Device::Cpu)?,
        ];
        check_gradients(|xs| mse(&xs[0], &xs[1]), &inputs, GradCheck::default())?;
        Ok(())
    }

    #[test]
    fn denoising_is_mse_against_the_native_target() -> Result<()> {
        for (name, schedule) in schedules()? {
            let (x0, eps) = (sample(0.0)?, sample(1.1)?);
            let (t, _) = timesteps(&schedule)?;
            let target = schedule.target(&x0, &eps, &t)?;
            let exact = denoising(&schedule, &target, &x0, &eps, &t)?.to_scalar::<f64>()?;
            assert_eq!(exact, 0.0, "{name}");
            let prediction = sample(2.3)?;
            let loss = denoising(&schedule, &prediction, &x0, &eps, &t)?;
            let expected = mse(&prediction, &target)?;
            assert_eq!(
                loss.to_scalar::<f64>()?,
                expected.to_scalar::<f64>()?,
                "{name}"
            );
        }
        Ok(())
    }

    #[test]
    fn denoising_gradients_match_finite_differences() -> Result<()> {
        for (name, schedule) in schedules()? {
            let (t, _) = timesteps(&schedule)?;
            let inputs = [sample(2.3)?, sample(0.0)?, sample(1.1)?];
            check_gradients(
                |xs| denoising(&schedule, &xs[0], &xs[1], &xs[2], &t),
                &inputs,
                GradCheck::default(),
            )
            .map_err(|err| err.context(name))?;
        }
        Ok(())
    }

    #[test]
    fn denoising_shape_mismatch_names_the_argument() -> Result<()> {
        let schedule = &schedules()?[0].1;
        let (t, _) = timesteps(schedule)?;
        let (x0, eps) = (sample(0.0)?, sample(1.1)?);
        let wrong = x0.reshape((3, 4))?;
        let err = denoising(schedule, &wrong, &x0, &eps, &t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("prediction"), "{err}");
        let err = denoising(schedule, &x0, &x0, &wrong, &t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("eps"), "{err}");
        Ok(())
    }
}
