//! Building blocks the UNet and the VAE share: diffusers uses the same classes (and tensor
//! names) in both.

use adm_nn::{group_norm, linear, Conv2d, Conv2dConfig, GroupNorm, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A biased `kernel`x`kernel` conv2d with the given stride and padding (adm-nn's, whose
/// backward is fast and correct for every input size).
pub(crate) fn conv(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    Conv2d::load(
        cin,
        cout,
        kernel,
        Conv2dConfig { padding, stride },
        true,
        vb,
    )
}

/// diffusers' `ResnetBlock2D` with `time_embedding_norm = "default"`: the projected time
/// embedding is added after conv1. Without `temb_channels` (the VAE) there is no
/// `time_emb_proj` and no time embedding.
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub(crate) fn new(
        vb: VarBuilder,
        (groups, eps): (usize, f64),
        cin: usize,
        cout: usize,
        temb_channels: Option<usize>,
        output_scale_factor: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(groups, cin, eps, vb.pp("norm1"))?,
            conv1: conv(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: match temb_channels {
                Some(temb) => Some(linear(temb, cout, vb.pp("time_emb_proj"))?),
                None => None,
            },
            norm2: group_norm(groups, cout, eps, vb.pp("norm2"))?,
            conv2: conv(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(conv(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
            output_scale_factor,
        })
    }

    /// `temb` is required exactly when the block was built with `temb_channels`.
    pub(crate) fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                // One value per (sample, channel), added over the plane.
                let t = proj.forward(&adm_nn::silu(temb)?)?;
                h = adm_nn::bias_add(&h, &t, 1)?;
            }
            (None, None) => {}
            (Some(_), None) => candle_core::bail!("ResnetBlock2D: needs a time embedding"),
            (None, Some(_)) => candle_core::bail!("ResnetBlock2D: has no time_emb_proj"),
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers' `FeedForward(activation_fn="gelu-approximate")` (SD3, CogVideoX): `net.0.proj`
/// to 4 x dim, tanh GELU, `net.2` back.
#[derive(Debug, Clone)]
pub(crate) struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub(crate) fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            proj: linear(dim, 4 * dim, vb.pp("net.0.proj"))?,
            out: linear(4 * dim, dim, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.out
            .forward(&adm_nn::gelu_tanh(&self.proj.forward(xs)?)?)
    }
}
