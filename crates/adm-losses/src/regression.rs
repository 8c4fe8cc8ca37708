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
}
