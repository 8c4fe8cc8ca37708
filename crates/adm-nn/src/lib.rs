//! Differentiable building blocks that candle 0.11.1 lacks or gets wrong, each checked
//! against finite differences, and the gradient-check harness that checks them.

pub mod attention;
mod backward;
pub mod conv2d;
pub mod conv3d;
mod fused;
pub mod gradcheck;
pub mod init;
pub mod linear;
pub mod matmul;
pub mod ops;
pub mod rope;
pub mod upsample;

#[cfg(test)]
mod test_util;

pub use attention::{multi_head_attention, scaled_dot_product_attention};
pub use backward::backward;
pub use conv2d::{conv2d, Conv2d, Conv2dConfig};
pub use conv3d::{conv3d, conv3d_forward, conv3d_no_bias, Conv3d, Conv3dConfig, TemporalPadding};
pub use gradcheck::{assert_every_var_has_grad, check_gradients, GradCheck, GradReport};
pub use init::{derive_seed, randn, SeededVarMap};
pub use linear::{linear, linear_b, linear_no_bias, Linear};
pub use matmul::{matmul, matmul_t};
pub use ops::layers::{group_norm, layer_norm, rms_norm};
pub use ops::{
    bias_add, geglu, gelu_tanh, log_softmax, silu, softmax, GroupNorm, LayerNorm, RmsNorm,
};
pub use rope::{apply_rotary_emb, rope_cos_sin, RopeLayout};
pub use upsample::{upsample_nearest2d, upsample_nearest3d};
