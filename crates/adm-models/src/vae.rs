//! diffusers' `AutoencoderKL` (the SD / SDXL / SD3 VAE): encoder to a diagonal Gaussian over
//! latents, decoder back to pixels, with gradients that reach every decoder parameter and the
//! latent (the pixel-space discriminator back-propagates through `decode`).
//!
//! Tensor names follow diffusers exactly (`encoder.down_blocks.{i}.resnets.{j}.conv1.weight`,
//! `decoder.mid_block.attentions.0.to_q.weight`, `quant_conv.weight`, ...), so a diffusers
//! `vae/` folder (config.json + safetensors) loads as it is. Only ops whose backward is
//! verified are used (CANDLE_PITFALLS.md): the mid-block attention is
//! `adm_nn::scaled_dot_product_attention`, nearest upsampling is `adm_nn::upsample_nearest2d`,
//! conv2d is `adm_nn::Conv2d`, GroupNorm is `adm_nn::GroupNorm`.
//!
//! Latent scaling: the diffusion model sees `(z - shift_factor) * scaling_factor`
//! ([`AutoencoderKL::scale_latents`]); [`AutoencoderKL::decode_scaled`] undoes it before
//! decoding, as diffusers' pipelines do (SDXL: 0.13025, no shift; SD3: 1.5305 / 0.0609).
//!
//! Memory: the mid-block attention is a single head over all latent positions, so its score
//! matrix is (H/8 · W/8)² per image (1 GiB in f32 for a 1024² SDXL image).

use adm_nn::{group_norm, linear, Conv2d, GroupNorm, Linear};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::blocks::{conv, ResnetBlock2D};

const DOWN_ENCODER: &str = "DownEncoderBlock2D";
const UP_DECODER: &str = "UpDecoderBlock2D";
/// diffusers' ResnetBlock2D / Attention eps inside the VAE (hard-coded there too).
const VAE_EPS: f64 = 1e-6;

/// diffusers' `AutoencoderKL` config.json. Unknown keys are ignored; unsupported options are
/// rejected by [`Config::validate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default = "default_3")]
    pub in_channels: usize,
    #[serde(default = "default_3")]
    pub out_channels: usize,
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_1")]
    pub layers_per_block: usize,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_4")]
    pub latent_channels: usize,
    #[serde(default = "default_32")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// Whether diffusers runs this VAE in f32 even in a half-precision pipeline (SDXL's
    /// overflows in f16). Informational here: the caller picks the dtype.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn default_1() -> usize {
    1
}
fn default_3() -> usize {
    3
}
fn default_4() -> usize {
    4
}
fn default_32() -> usize {
    32
}
fn default_true() -> bool {
    true
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_down_block_types() -> Vec<String> {
    vec![DOWN_ENCODER.into()]
}
fn default_up_block_types() -> Vec<String> {
    vec![UP_DECODER.into()]
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}

impl Config {
    /// Stable Diffusion 1.5's VAE (4 latent channels, scaling 0.18215).
    pub fn sd15() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec![DOWN_ENCODER.into(); 4],
            up_block_types: vec![UP_DECODER.into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            act_fn: default_act_fn(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: Some(512),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }

    /// SDXL base 1.0's VAE (stabilityai/stable-diffusion-xl-base-1.0/vae/config.json).
    pub fn sdxl() -> Self {
        Self {
            sample_size: Some(1024),
            scaling_factor: 0.13025,
            ..Self::sd15()
        }
    }

    /// SD3 / SD3.5's VAE: 16 latent channels, no quant convs, scaling 1.5305, shift 0.0609.
    pub fn sd3() -> Self {
        Self {
            latent_channels: 16,
            sample_size: Some(1024),
            scaling_factor: 1.5305,
            shift_factor: Some(0.0609),
            force_upcast: true,
            use_quant_conv: false,
            use_post_quant_conv: false,
            ..Self::sd15()
        }
    }

    /// Rejects options this implementation does not support, and inconsistent sizes.
    pub fn validate(&self) -> Result<()> {
        let bail = |msg: String| -> Result<()> {
            Err(candle_core::Error::Msg(format!("vae config: {msg}")))
        };
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bail(format!(
                "down_block_types ({}), up_block_types ({}) and block_out_channels ({n}) must have the same non-zero length",
                self.down_block_types.len(),
                self.up_block_types.len(),
            ));
        }
        if let Some(t) = self.down_block_types.iter().find(|t| *t != DOWN_ENCODER) {
            return bail(format!(
                "down block type `{t}` is not supported ({DOWN_ENCODER})"
            ));
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != UP_DECODER) {
            return bail(format!(
                "up block type `{t}` is not supported ({UP_DECODER})"
            ));
        }
        if self.act_fn != "silu" {
            return bail(format!("act_fn `{}` is not supported (silu)", self.act_fn));
        }
        let groups = self.norm_num_groups;
        if groups == 0
            || self
                .block_out_channels
                .iter()
                .any(|&c| c == 0 || !c.is_multiple_of(groups))
        {
            return bail(format!(
                "norm_num_groups ({groups}) must divide every block_out_channels entry ({:?})",
                self.block_out_channels
            ));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return bail("in_channels, out_channels and latent_channels must be positive".into());
        }
        if self.scaling_factor == 0.0 || !self.scaling_factor.is_finite() {
            return bail(format!(
                "scaling_factor must be finite and non-zero, got {}",
                self.scaling_factor
            ));
        }
        Ok(())
    }

    /// Pixel H and W must be multiples of this (the encoder downsamples `n - 1` times).
    pub fn spatial_multiple(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// `ResnetBlock2D` without a time embedding (`temb_channels = None`), eps 1e-6.
fn resnet(vb: VarBuilder, groups: usize, cin: usize, cout: usize) -> Result<ResnetBlock2D> {
    ResnetBlock2D::new(vb, (groups, VAE_EPS), cin, cout, None, 1.0)
}

/// diffusers' `Attention` over the H·W positions of a (B, C, H, W) map, as the VAE mid block
/// uses it: one head of width C, biased q/k/v/out projections, GroupNorm first, residual.
#[derive(Debug, Clone)]
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn new(vb: VarBuilder, groups: usize, channels: usize) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, channels, VAE_EPS, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            to_out: linear(channels, channels, vb.pp("to_out.0"))?,
        })
    }
}

impl Module for SpatialAttention {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            // candle 0.11.1's Linear on a transposed (non-contiguous) 3-D input silently
            // computes wrong rows for batch > 1 (its broadcast, transposed weight meets the
            // strided lhs in gemm); contiguous input is exact.
            .contiguous()?;
        // One head: (B, 1, HW, C).
        let q = self.to_q.forward(&tokens)?.unsqueeze(1)?;
        let k = self.to_k.forward(&tokens)?.unsqueeze(1)?;
        let v = self.to_v.forward(&tokens)?.unsqueeze(1)?;
        let out = adm_nn::scaled_dot_product_attention(&q, &k, &v, None, None)?.squeeze(1)?;
        let out = self
            .to_out
            .forward(&out)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + xs
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, (attention), resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet_0: ResnetBlock2D,
    attention: Option<SpatialAttention>,
    resnet_1: ResnetBlock2D,
}

impl MidBlock {
    fn new(vb: VarBuilder, cfg: &Config, channels: usize) -> Result<Self> {
        let groups = cfg.norm_num_groups;
        Ok(Self {
            resnet_0: resnet(vb.pp("resnets.0"), groups, channels, channels)?,
            attention: if cfg.mid_block_add_attention {
                Some(SpatialAttention::new(
                    vb.pp("attentions.0"),
                    groups,
                    channels,
                )?)
            } else {
                None
            },
            resnet_1: resnet(vb.pp("resnets.1"), groups, channels, channels)?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet_0.forward(xs, None)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h)?;
        }
        self.resnet_1.forward(&h, None)
    }
}

/// `DownEncoderBlock2D`: resnets, then (except in the last block) a stride-2 conv after
/// padding right and bottom by one (diffusers' `downsample_padding = 0`).
#[derive(Debug, Clone)]
struct DownEncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Conv2d>,
}

impl Module for DownEncoderBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = xs.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h, None)?;
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
        }
        Ok(h)
    }
}

/// `UpDecoderBlock2D`: resnets, then (except in the last block) nearest x2 and a 3x3 conv.
#[derive(Debug, Clone)]
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Conv2d>,
}

impl Module for UpDecoderBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = xs.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h, None)?;
        }
        if let Some(up) = &self.upsampler {
            h = up.forward(&adm_nn::upsample_nearest2d(&h, 2, 2)?)?;
        }
        Ok(h)
    }
}

/// The VAE encoder: pixels (B, in_channels, H, W) to moments (B, 2·latent, H/f, W/f).
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let groups = cfg.norm_num_groups;
        let conv_in = conv(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?;
        let mut down_blocks = Vec::with_capacity(n);
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let c = if j == 0 { cin } else { cout };
                    resnet(vb.pp(format!("resnets.{j}")), groups, c, cout)
                })
                .collect::<Result<_>>()?;
            let downsampler = if i + 1 < n {
                Some(conv(vb.pp("downsamplers.0.conv"), cout, cout, 3, 2, 0)?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock {
                resnets,
                downsampler,
            });
            cin = cout;
        }
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), cfg, ch[n - 1])?,
            conv_norm_out: group_norm(groups, ch[n - 1], VAE_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv(
                vb.pp("conv_out"),
                ch[n - 1],
                2 * cfg.latent_channels,
                3,
                1,
                1,
            )?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(xs)?;
        for block in &self.down_blocks {
            h = block.forward(&h)?;
        }
        let h = self.mid_block.forward(&h)?;
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}

/// The VAE decoder: latents (B, latent, h, w) to pixels (B, out_channels, h·f, w·f).
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let groups = cfg.norm_num_groups;
        let conv_in = conv(vb.pp("conv_in"), cfg.latent_channels, ch[n - 1], 3, 1, 1)?;
        let mid_block = MidBlock::new(vb.pp("mid_block"), cfg, ch[n - 1])?;
        let mut up_blocks = Vec::with_capacity(n);
        let mut cin = ch[n - 1];
        for i in 0..n {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let cout = ch[n - 1 - i];
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let c = if j == 0 { cin } else { cout };
                    resnet(vb.pp(format!("resnets.{j}")), groups, c, cout)
                })
                .collect::<Result<_>>()?;
            let upsampler = if i + 1 < n {
                Some(conv(vb.pp("upsamplers.0.conv"), cout, cout, 3, 1, 1)?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock { resnets, upsampler });
            cin = cout;
        }
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(groups, ch[0], VAE_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv(vb.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(xs)?;
        h = self.mid_block.forward(&h)?;
        for block in &self.up_blocks {
            h = block.forward(&h)?;
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}

/// diffusers' `DiagonalGaussianDistribution`: the encoder's posterior over latents, with
/// `logvar` clamped to [-30, 20].
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits moments (B, 2·C, h, w) into mean and (clamped) log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c2 = moments.dim(1)?;
        if moments.rank() != 4 || c2 % 2 != 0 {
            candle_core::bail!(
                "vae: moments must be (B, 2·C, h, w), got shape {:?}",
                moments.dims()
            )
        }
        let c = c2 / 2;
        Ok(Self {
            mean: moments.narrow(1, 0, c)?,
            logvar: moments.narrow(1, c, c)?.clamp(-30.0, 20.0)?,
        })
    }

    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// The mode (the mean), what pipelines use for deterministic encoding.
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// `mean + std · noise` for standard normal `noise` of the mean's shape.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        if noise.dims() != self.mean.dims() {
            candle_core::bail!(
                "vae: noise has shape {:?}, the latent distribution has {:?}",
                noise.dims(),
                self.mean.dims()
            )
        }
        self.mean
            .broadcast_add(&self.std()?.mul(&noise.to_dtype(self.mean.dtype())?)?)
    }

    /// KL divergence to the standard normal, summed over (C, h, w): shape (B,).
    pub fn kl(&self) -> Result<Tensor> {
        let var = self.logvar.exp()?;
        let terms = ((self.mean.sqr()? + var)? - 1.0)?.sub(&self.logvar)?;
        terms.sum((1, 2, 3))? * 0.5
    }
}

/// diffusers' `AutoencoderKL`. Built from a VarBuilder rooted at the VAE's checkpoint (keys
/// `encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`); see
/// [`AutoencoderKL::decoder_only`] to skip the encoder.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    config: Config,
    encoder: Option<Encoder>,
    quant_conv: Option<Conv2d>,
    decoder: Decoder,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let mut vae = Self::decoder_only(vb.clone(), cfg)?;
        vae.encoder = Some(Encoder::new(vb.pp("encoder"), cfg)?);
        if cfg.use_quant_conv {
            let c = 2 * cfg.latent_channels;
            vae.quant_conv = Some(conv(vb.pp("quant_conv"), c, c, 1, 1, 0)?);
        }
        Ok(vae)
    }

    /// The decoder (and `post_quant_conv`) only: what a pixel-space discriminator needs.
    /// [`AutoencoderKL::encode`] then fails with an error saying so.
    pub fn decoder_only(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let c = cfg.latent_channels;
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv(vb.pp("post_quant_conv"), c, c, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            config: cfg.clone(),
            encoder: None,
            quant_conv: None,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            post_quant_conv,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn has_encoder(&self) -> bool {
        self.encoder.is_some()
    }

    fn dtype(&self) -> DType {
        self.decoder.conv_in.weight().dtype()
    }

    /// The posterior over (unscaled) latents for images `xs` (B, in_channels, H, W) in
    /// [-1, 1]; H and W must be multiples of [`Config::spatial_multiple`].
    pub fn encode(&self, xs: &Tensor) -> Result<DiagonalGaussian> {
        let Some(encoder) = &self.encoder else {
            candle_core::bail!(
                "vae: this AutoencoderKL was built decoder-only; encode needs the encoder"
            )
        };
        let m = self.config.spatial_multiple();
        let dims = xs.dims();
        if xs.rank() != 4
            || dims[1] != self.config.in_channels
            || !dims[2].is_multiple_of(m)
            || !dims[3].is_multiple_of(m)
        {
            candle_core::bail!(
                "vae encode: input has shape {dims:?}; expected (B, {}, H, W) with H, W multiples of {m}",
                self.config.in_channels
            )
        }
        let mut moments = encoder.forward(&xs.to_dtype(self.dtype())?)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        DiagonalGaussian::from_moments(&moments)
    }

    /// Decodes unscaled latents `z` (B, latent_channels, h, w) to images (B, out_channels,
    /// h·f, w·f), differentiably with respect to `z` and every decoder parameter.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let dims = z.dims();
        if z.rank() != 4 || dims[1] != self.config.latent_channels {
            candle_core::bail!(
                "vae decode: latent has shape {dims:?}; expected (B, {}, h, w)",
                self.config.latent_channels
            )
        }
        let mut z = z.to_dtype(self.dtype())?;
        if let Some(q) = &self.post_quant_conv {
            z = q.forward(&z)?;
        }
        self.decoder.forward(&z)
    }

    /// Unscaled latents to the diffusion model's space: `(z - shift_factor) · scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        (z - shift)? * self.config.scaling_factor
    }

    /// The diffusion model's latents back to the VAE's: `z / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        (latents / self.config.scaling_factor)? + shift
    }

    /// Decodes the diffusion model's (scaled) latents, as diffusers' pipelines do.
    pub fn decode_scaled(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode(&self.unscale_latents(latents)?)
    }

    /// Encodes images to the diffusion model's (scaled) latents: the posterior mean, or a
    /// sample with the given standard normal noise.
    pub fn encode_scaled(&self, xs: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let posterior = self.encode(xs)?;
        let z = match noise {
            Some(noise) => posterior.sample(noise)?,
            None => posterior.mean,
        };
        self.scale_latents(&z)
    }
}
