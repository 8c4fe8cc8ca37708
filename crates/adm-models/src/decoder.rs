//! Latents to images for pixel-space discriminators (ADP's D_tau2 reads decoded samples).

use candle_core::{Result, Tensor};

use crate::vae::AutoencoderKL;

/// The diffusion model's latents to images in about `[-1, 1]`, differentiably with respect
/// to the latents (the generator's gradient flows through it). Not clamped: a clamp would cut
/// the gradient of out-of-range pixels.
pub trait Decoder: Send + Sync {
    fn decode_latents(&self, latents: &Tensor) -> Result<Tensor>;
}

/// A VAE decodes the diffusion model's scaled latents (undoing its scaling / shift factors).
/// Build it from frozen weights so that no optimiser touches it.
impl Decoder for AutoencoderKL {
    fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode_scaled(latents)
    }
}

/// Pixel-space models (the toys): the samples are the images.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentityDecoder;

impl Decoder for IdentityDecoder {
    fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(latents.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adm_nn::SeededVarMap;
    use candle_core::{DType, Device};

    /// The VAE seam decodes the scaled latents (its scaling factor undone) and passes the
    /// gradient to them; the identity returns its input.
    #[test]
    fn vae_decodes_scaled_latents_differentiably() -> Result<()> {
        let cfg: crate::vae::Config = serde_json::from_value(serde_json::json!({
            "block_out_channels": [8], "norm_num_groups": 4, "scaling_factor": 0.5
        }))
        .map_err(candle_core::Error::wrap)?;
        let vars = SeededVarMap::new(1);
        let vae = AutoencoderKL::decoder_only(vars.var_builder(DType::F32, &Device::Cpu), &cfg)?;
        let latents = candle_core::Var::from_tensor(&adm_nn::randn(
            &mut rand::SeedableRng::seed_from_u64(2),
            (1, 4, 4, 4),
            &Device::Cpu,
        )?)?;
        let decoder: &dyn Decoder = &vae;
        let images = decoder.decode_latents(&latents)?;
        assert_eq!(images.dims(), [1, 3, 4, 4]);
        let direct = vae.decode(&(latents.as_tensor() * 2.0)?)?;
        let diff = (&images - &direct)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let grads = images.sqr()?.sum_all()?.backward()?;
        let g = grads.get(&latents).expect("the latents get a gradient");
        assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);

        let x = Tensor::ones((1, 2), DType::F32, &Device::Cpu)?;
        assert_eq!(
            IdentityDecoder.decode_latents(&x)?.to_vec2::<f32>()?,
            [[1.0, 1.0]]
        );
        Ok(())
    }
}
