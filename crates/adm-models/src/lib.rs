//! Backbones behind one [`Backbone`] trait (prediction + feature taps + schedule),
//! discriminator heads, and weight handling.

pub mod backbone;
mod blocks;
pub mod clip;
pub mod cogvideox;
pub mod cogvideox_vae;
pub mod conv_heads;
pub mod decoder;
pub mod forward_cli;
pub mod heads;
pub mod loading;
pub mod mmdit;
pub mod sam;
pub mod sd3_text;
pub mod sdxl;
pub mod t5;
pub mod toy_mlp;
pub mod unet_2d;
pub mod vae;
pub mod weights;

pub use backbone::{
    guided_prediction, guided_x0_eps, predict_x0_eps, Backbone, Condition, FeatureTap,
};
pub use conv_heads::{ConvHead, ConvHeadConfig, ConvHeadSet, HeadDims};
pub use decoder::{Decoder, IdentityDecoder};
pub use heads::{
    DiscriminatorHeads, FeatureExtractor, HeadSet, Heads, LatentDiscriminator, PixelDiscriminator,
    RandomFeatureMlp, VectorHead,
};
pub use toy_mlp::{ToyMlp, ToyMlpConfig};
pub use weights::{copy_weights, frozen_var_builder, save_safetensors_atomic, varmap_tensors};
