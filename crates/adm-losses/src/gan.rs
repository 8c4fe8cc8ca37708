//! Hinge GAN losses (ADM, arXiv 2507.18569, Sec. 3) and the ADP hybrid-discriminator mix.

use candle_core::{Result, Tensor};

use crate::ensure_non_empty;

/// Hinge discriminator loss: `mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))`.
///
/// The two means are taken separately, so the logit tensors may differ in shape.
pub fn hinge_discriminator(real_logits: &Tensor, fake_logits: &Tensor) -> Result<Tensor> {
    ensure_non_empty("hinge_discriminator", "real_logits", real_logits)?;
    ensure_non_empty("hinge_discriminator", "fake_logits", fake_logits)?;
    let real_term = real_logits.affine(-1.0, 1.0)?.relu()?.mean_all()?;
    let fake_term = fake_logits.affine(1.0, 1.0)?.relu()?.mean_all()?;
    real_term + fake_term
}

/// Hinge generator loss: `-mean(D(fake))`.
pub fn hinge_generator(fake_logits: &Tensor) -> Result<Tensor> {
    ensure_non_empty("hinge_generator", "fake_logits", fake_logits)?;
    fake_logits.mean_all()?.neg()
}

/// ADP generator loss with hybrid discriminators (arXiv 2507.18569, Sec. 4):
/// `-(λ1 mean D_τ1 + λ2 mean D_τ2)`, latent `D_τ1`, pixel `D_τ2`; the paper uses 0.85 / 0.15.
pub fn adp_generator(
    latent_fake_logits: &Tensor,
    pixel_fake_logits: &Tensor,
    lambda_latent: f64,
    lambda_pixel: f64,
) -> Result<Tensor> {
    ensure_non_empty("adp_generator", "latent_fake_logits", latent_fake_logits)?;
    ensure_non_empty("adp_generator", "pixel_fake_logits", pixel_fake_logits)?;
    let latent = hinge_generator(latent_fake_logits)?.affine(lambda_latent, 0.0)?;
    let pixel = hinge_generator(pixel_fake_logits)?.affine(lambda_pixel, 0.0)?;
    latent + pixel
}

/// ADP discriminator loss: `λ1 hinge_d(latent) + λ2 hinge_d(pixel)` (arXiv 2507.18569, Sec. 4).
pub fn adp_discriminator(
    latent_real_logits: &Tensor,
    latent_fake_logits: &Tensor,
    pixel_real_logits: &Tensor,
    pixel_fake_logits: &Tensor,
    lambda_latent: f64,
    lambda_pixel: f64,
) -> Result<Tensor> {
    for (name, logits) in [
        ("latent_real_logits", latent_real_logits),
        ("latent_fake_logits", latent_fake_logits),
        ("pixel_real_logits", pixel_real_logits),
        ("pixel_fake_logits", pixel_fake_logits),
    ] {
        ensure_non_empty("adp_discriminator", name, logits)?;
    }
    let latent =
        hinge_discriminator(latent_real_logits, latent_fake_logits)?.affine(lambda_latent, 0.0)?;
    let pixel =
        hinge_discriminator(pixel_real_logits, pixel_fake_logits)?.affine(lambda_pixel, 0.0)?;
    latent + pixel
}

#[cfg(test)]
mod tests {
    use super::*;
    use adm_nn::{check_gradients, GradCheck};
    use candle_core::Device;

    fn logits(values: &[f64]) -> Result<Tensor> {
        Tensor::new(values, &Device::Cpu)
    }

    fn scalar(t: &Tensor) -> Result<f64> {
        t.to_scalar::<f64>()
    }

    #[test]
    fn hinge_discriminator_by_hand() -> Result<()> {
        // real [2, -0.5]: relu(1 - 2) = 0, relu(1 + 0.5) = 1.5 -> mean 0.75
        // fake [-3, 0.25]: relu(1 - 3) = 0, relu(1 + 0.25) = 1.25 -> mean 0.625
        let loss = hinge_discriminator(&logits(&[2.0, -0.5])?, &logits(&[-3.0, 0.25])?)?;
        assert_eq!(loss.rank(), 0);
        assert!((scalar(&loss)? - 1.375).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn hinge_generator_by_hand() -> Result<()> {
        // -(2 - 0.5 + 1.5) / 3 = -1
        let loss = hinge_generator(&logits(&[2.0, -0.5, 1.5])?)?;
        assert!((scalar(&loss)? + 1.0).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn adp_generator_by_hand() -> Result<()> {
        // latent mean (1 + 3) / 2 = 2, pixel mean -4: -(0.85 * 2 + 0.15 * -4) = -1.1
        let loss = adp_generator(&logits(&[1.0, 3.0])?, &logits(&[-4.0])?, 0.85, 0.15)?;
        assert!((scalar(&loss)? + 1.1).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn adp_discriminator_by_hand() -> Result<()> {
        // latent: 1.375 (as in hinge_discriminator_by_hand);
        // pixel: real [0.5] -> relu(0.5) = 0.5, fake [0.5] -> relu(1.5) = 1.5 -> 2
        // 0.85 * 1.375 + 0.15 * 2 = 1.46875
        let loss = adp_discriminator(
            &logits(&[2.0, -0.5])?,
            &logits(&[-3.0, 0.25])?,
            &logits(&[0.5])?,
            &logits(&[0.5])?,
            0.85,
            0.15,
        )?;
        assert!((scalar(&loss)? - 1.46875).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn empty_logits_are_an_error_naming_the_argument() -> Result<()> {
        let empty = Tensor::zeros(0, candle_core::DType::F64, &Device::Cpu)?;
        let some = logits(&[1.0])?;
        let err = hinge_discriminator(&some, &empty).unwrap_err().to_string();
        assert!(err.contains("fake_logits"), "{err}");
        let err = adp_discriminator(&some, &some, &empty, &some, 0.85, 0.15)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pixel_real_logits"), "{err}");
        Ok(())
    }

    // Logits are kept away from the hinge kinks at ±1 so that central differences are exact.
    fn real_logits() -> Result<Tensor> {
        logits(&[2.0, -0.5, 0.3, 1.7, -2.2, 0.9])
    }

    fn fake_logits() -> Result<Tensor> {
        logits(&[-3.0, 0.25, -0.7, 1.4, -1.6, 0.1])
    }

    #[test]
    fn hinge_gradients_match_finite_differences() -> Result<()> {
        let inputs = [real_logits()?, fake_logits()?];
        check_gradients(
            |xs| hinge_discriminator(&xs[0], &xs[1]),
            &inputs,
            GradCheck::default(),
        )?;
        check_gradients(
            |xs| hinge_generator(&xs[0]),
            &inputs[1..],
            GradCheck::default(),
        )?;
        Ok(())
    }

    #[test]
    fn adp_gradients_match_finite_differences() -> Result<()> {
        let pixel_real = real_logits()?.reshape((2, 3))?.affine(-0.5, 0.1)?;
        let pixel_fake = fake_logits()?.narrow(0, 0, 4)?.affine(0.5, 0.05)?;
        let inputs = [real_logits()?, fake_logits()?, pixel_real, pixel_fake];
        check_gradients(
            |xs| adp_discriminator(&xs[0], &xs[1], &xs[2], &xs[3], 0.85, 0.15),
            &inputs,
            GradCheck::default(),
        )?;
        check_gradients(
            |xs| adp_generator(&xs[0], &xs[1], 0.85, 0.15),
            &[inputs[1].clone(), inputs[3].clone()],
            GradCheck::default(),
        )?;
        Ok(())
    }
}
