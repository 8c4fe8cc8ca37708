//! The DMD2 distribution-matching loss (DMD2, arXiv 2405.14622, Eq. 2 and its released code;
//! the DMD baseline of ADM, arXiv 2507.18569).

use candle_core::{DType, Error, Result, Tensor};

use crate::{ensure_non_empty, ensure_same_shape};

/// Floor on the per-sample normaliser `mean(|x0 - p_real|)`, so that a generator sample that
/// equals the teacher's prediction gives a finite gradient instead of a division by zero
/// (DMD2's code instead replaces the resulting NaNs with `nan_to_num`).
pub const DMD_NORMALISER_FLOOR: f64 = 1e-8;

/// The detached, per-sample normalised DMD gradient
/// `g = (p_fake - p_real) / max(mean_{non-batch}(|x0 - p_real|), 1e-8)`.
///
/// `x0 = G(z)` has shape `(B, ...)`; `p_real` is the teacher's x0-prediction (with CFG) and
/// `p_fake` the fake score's x0-prediction at the noised `x0`, both of `x0`'s shape.
/// Half-precision inputs are computed in f32 (in f16 the floor would round to 0) and the
/// result is cast back to `x0`'s dtype.
pub fn dmd_gradient(x0: &Tensor, p_real: &Tensor, p_fake: &Tensor) -> Result<Tensor> {
    ensure_non_empty("dmd_gradient", "x0", x0)?;
    ensure_same_shape("dmd_gradient", "x0", x0, "p_real", p_real)?;
    ensure_same_shape("dmd_gradient", "x0", x0, "p_fake", p_fake)?;
    if x0.rank() == 0 {
        return Err(Error::Msg(
            "dmd_gradient: `x0` must have a leading batch dimension, got a scalar".into(),
        ));
    }
    let work_dtype = match x0.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let per_sample = |t: &Tensor| -> Result<Tensor> {
        let batch = t.dim(0)?;
        t.detach()
            .to_dtype(work_dtype)?
            .reshape((batch, t.elem_count() / batch))
    };
    let (x0_flat, real_flat, fake_flat) =
        (per_sample(x0)?, per_sample(p_real)?, per_sample(p_fake)?);
    let normaliser = (&x0_flat - &real_flat)?
        .abs()?
        .mean_keepdim(1)?
        .maximum(DMD_NORMALISER_FLOOR)?;
    (fake_flat - real_flat)?
        .broadcast_div(&normaliser)?
        .reshape(x0.shape())?
        .to_dtype(x0.dtype())
}

/// DMD2 distribution-matching loss `0.5 * mean((x0 - sg(x0 - g))²)` over all elements, with
/// `g` from [`dmd_gradient`] (DMD2's `0.5 * F.mse_loss(x, (x - grad).detach())`).
///
/// Its value is `0.5 * mean(g²)`; its gradient with respect to `x0` is exactly `g / numel`,
/// which in the generator's parameters is the reverse-KL gradient. Only `x0` carries gradient.
pub fn dmd(x0: &Tensor, p_real: &Tensor, p_fake: &Tensor) -> Result<Tensor> {
    let gradient = dmd_gradient(x0, p_real, p_fake)?;
    let target = (x0.detach() - gradient)?;
    (x0 - target)?.sqr()?.mean_all()?.affine(0.5, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn matrix(rows: &[[f64; 2]; 2]) -> Result<Tensor> {
        Tensor::new(rows, &Device::Cpu)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f64>()
    }

    #[test]
    fn value_and_gradient_by_hand() -> Result<()> {
        // |x0 - p_real| = [[1, 0], [0, 2]] -> per-sample normalisers [0.5, 1.0]
        // p_fake - p_real = [[1, -1], [1, 1]] -> g = [[2, -2], [1, 1]]
        // loss = 0.5 * (4 + 4 + 1 + 1) / 4 = 1.25; d loss / d x0 = g / 4
        let x0 = Var::from_tensor(&matrix(&[[1.0, 2.0], [3.0, 4.0]])?)?;
        let p_real = matrix(&[[0.0, 2.0], [3.0, 2.0]])?;
        let p_fake = matrix(&[[1.0, 1.0], [4.0, 3.0]])?;
        let expected_g = matrix(&[[2.0, -2.0], [1.0, 1.0]])?;
        assert_eq!(
            max_abs_diff(&dmd_gradient(&x0, &p_real, &p_fake)?, &expected_g)?,
            0.0
        );
        let loss = dmd(&x0, &p_real, &p_fake)?;
        assert!((loss.to_scalar::<f64>()? - 1.25).abs() < 1e-12);
        let grad = loss
            .backward()?
            .get(&x0)
            .cloned()
            .expect("x0 has a gradient");
        assert!(max_abs_diff(&grad, &expected_g.affine(0.25, 0.0)?)? < 1e-12);
        Ok(())
    }

    // A finite-difference check of `dmd` would NOT reproduce its autograd gradient: the loss
    // value is 0.5 * mean(g(x0)²), whose derivative in x0 includes how the normaliser
    // mean|x0 - p_real| moves, while the stop-gradient makes autograd return exactly g / numel
    // (the DMD update direction, not the derivative of the loss value). So the autograd
    // gradient is tested against that closed form instead.
    #[test]
    fn autograd_gradient_is_g_over_numel_and_only_reaches_x0() -> Result<()> {
        let device = Device::Cpu;
        let shape = (3, 2, 4, 4);
        let x0 = Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &device)?)?;
        let p_real = Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &device)?)?;
        let p_fake = Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &device)?)?;
        let grads = dmd(&x0, &p_real, &p_fake)?.backward()?;
        let expected = dmd_gradient(&x0, &p_real, &p_fake)?.affine(1.0 / 96.0, 0.0)?;
        let grad = grads.get(&x0).expect("x0 has a gradient");
        assert!(max_abs_diff(grad, &expected)? < 1e-14);
        assert!(grads.get(&p_real).is_none(), "p_real must be detached");
        assert!(grads.get(&p_fake).is_none(), "p_fake must be detached");
        Ok(())
    }

    #[test]
    fn zero_when_real_and_fake_scores_agree() -> Result<()> {
        let device = Device::Cpu;
        let x0 = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 5), &device)?)?;
        let p = Tensor::randn(0f64, 1.0, (2, 5), &device)?;
        let loss = dmd(&x0, &p, &p)?;
        assert_eq!(loss.to_scalar::<f64>()?, 0.0);
        let grad = loss
            .backward()?
            .get(&x0)
            .cloned()
            .expect("x0 has a gradient");
        assert_eq!(grad.abs()?.max_all()?.to_scalar::<f64>()?, 0.0);
        Ok(())
    }

    #[test]
    fn floor_keeps_the_gradient_finite_when_x0_equals_the_teacher() -> Result<()> {
        let x0 = matrix(&[[1.0, 2.0], [3.0, 4.0]])?;
        let p_fake = x0.affine(1.0, 1e-9)?;
        let g = dmd_gradient(&x0, &x0, &p_fake)?;
        let expected = (p_fake - &x0)?.affine(1.0 / DMD_NORMALISER_FLOOR, 0.0)?;
        assert!(max_abs_diff(&g, &expected)? < 1e-6);
        Ok(())
    }

    #[test]
    fn half_precision_keeps_its_dtype_and_the_floor() -> Result<()> {
        // In f16 the 1e-8 floor itself rounds to 0, so x0 == p_real == p_fake would give 0 / 0.
        let x0 = matrix(&[[1.0, 2.0], [3.0, 4.0]])?.to_dtype(DType::F16)?;
        let g = dmd_gradient(&x0, &x0, &x0)?;
        assert_eq!(g.dtype(), DType::F16);
        let g = g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        assert_eq!(g, vec![0.0; 4]);
        Ok(())
    }

    #[test]
    fn shape_mismatch_names_the_argument() -> Result<()> {
        let x0 = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let wrong = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
        let err = dmd(&x0, &x0, &wrong).unwrap_err().to_string();
        assert!(err.contains("p_fake"), "{err}");
        let err = dmd(&x0, &wrong, &x0).unwrap_err().to_string();
        assert!(err.contains("p_real"), "{err}");
        let scalar = Tensor::new(1f32, &Device::Cpu)?;
        let err = dmd(&scalar, &scalar, &scalar).unwrap_err().to_string();
        assert!(err.contains("batch"), "{err}");
        Ok(())
    }
}
