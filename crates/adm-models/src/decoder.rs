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
