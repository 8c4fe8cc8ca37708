//! The decoder of diffusers' `AutoencoderKLCogVideoX` (the CogVideoX 3-D causal VAE,
//! diffusers/models/autoencoders/autoencoder_kl_cogvideox.py and `CogVideoXUpsample3D` in
//! diffusers/models/upsampling.py): latents (B, C, F, h, w) to video frames
//! (B, 3, F', h·2^(n-1), w·2^(n-1)) for n up blocks (for the published CogVideoX-2b / 5b VAE:
//! 8x, and F' = 1 + 4·(F - 1) for odd F, 4F for even F), differentiable with respect to the
//! latent and every decoder parameter (a pixel-space discriminator back-propagates through it).
//!
//! Structure, as diffusers builds it:
//! - `CogVideoXCausalConv3d` (3x3x3, `pad_mode = "first"`): two frames in front of the clip
//!   (copies of the first frame, or the conv cache of the previous chunk), zero padding of one
//!   in H and W.
//! - `CogVideoXSpatialNorm3D`: GroupNorm (eps 1e-6, hard-coded: the config's `norm_eps` only
//!   reaches the encoder) scaled and shifted by 1x1x1 convs of the latent, resized (nearest)
//!   to the feature map; for an odd frame count > 1 the first latent frame is resized on its
//!   own and the rest to the remaining frames.
//! - `CogVideoXUpsample3D`: nearest x2 in H and W, and in time for the first
//!   `log2(temporal_compression_ratio)` up blocks (an odd clip keeps its first frame single:
//!   F -> 2F - 1), then a 2-D 3x3 conv per frame.
//!
//! Temporal chunks: diffusers' `decode` runs the decoder on chunks of
//! `num_latent_frames_batch_size = 2` latent frames (the first chunk takes the odd remainder:
//! 13 frames -> 3, 2, 2, 2, 2, 2), carrying each causal conv's last two input frames to the
//! next chunk. That is NOT the same as decoding the whole clip at once: group-norm
//! statistics and the first-frame rule of the upsampler and spatial norm apply per chunk (for
//! the parity fixture's 5-frame latent the two differ by 0.96, 31% of the output's maximum).
//! [`AutoencoderKLCogVideoX::decode`] therefore reproduces the chunking, conv caches included
//! (gradients flow through the caches as in diffusers, which `clone()`s them without
//! detaching); [`AutoencoderKLCogVideoX::decode_in_chunks`] takes another chunk size (one
//! chunk of every frame is the whole-sequence decode).
//!
//! Not implemented: the encoder (its tensors, and `quant_conv` when `use_quant_conv`, are
//! skipped by name when loading a full checkpoint, see [`load`]), spatial tiling
//! (`enable_tiling`: off by default; it blends overlapping tiles, so its output differs),
//! batch slicing (`enable_slicing`: memory only, same result) and `use_post_quant_conv = true`
//! (see [`Config::validate`]). Tensor names follow diffusers
//! (`decoder.up_blocks.0.resnets.1.norm2.conv_y.conv.weight`, ...). Only ops whose backward
//! is verified are used (CANDLE_PITFALLS.md): `adm_nn::conv3d`, `adm_nn::upsample_nearest3d`,
//! `adm_nn::GroupNorm` and `adm_nn::Conv2d`.

use std::path::Path;

use adm_nn::{conv3d, group_norm, upsample_nearest3d, Conv2d, Conv3d, Conv3dConfig, GroupNorm};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::blocks::conv;
use crate::loading::{read_config, Weights};

const UP_BLOCK: &str = "CogVideoXUpBlock3D";
/// `CogVideoXSpatialNorm3D`'s GroupNorm eps (hard-coded in diffusers).
const SPATIAL_NORM_EPS: f64 = 1e-6;
/// Frames a 3x3x3 causal conv adds in front of its input (kernel 3 - 1).
const CAUSAL_PAD: usize = 2;
/// diffusers' `AutoencoderKLCogVideoX.num_latent_frames_batch_size`.
pub const LATENT_FRAMES_PER_CHUNK: usize = 2;

/// diffusers' `AutoencoderKLCogVideoX` config.json (the keys the decoder depends on; the
/// encoder's keys, `sample_height` / `sample_width` (tiling), `shift_factor`, `latents_mean`,
/// `latents_std` and `invert_scale_latents` are ignored: the CogVideoX pipelines decode with
/// `latents / scaling_factor` only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default = "default_out_channels")]
    pub out_channels: usize,
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    /// Time doubles in the first `floor(log2(ratio))` up blocks that have an upsampler.
    #[serde(default = "default_temporal_compression_ratio")]
    pub temporal_compression_ratio: f64,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Encoder side: only decides whether `quant_conv.*` may be in the checkpoint.
    #[serde(default)]
    pub use_quant_conv: bool,
    #[serde(default)]
    pub use_post_quant_conv: bool,
}

fn default_out_channels() -> usize {
    3
}
fn default_up_block_types() -> Vec<String> {
    vec![UP_BLOCK.into(); 4]
}
fn default_block_out_channels() -> Vec<usize> {
    vec![128, 256, 256, 512]
}
fn default_latent_channels() -> usize {
    16
}
fn default_layers_per_block() -> usize {
    3
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_temporal_compression_ratio() -> f64 {
    4.0
}
fn default_scaling_factor() -> f64 {
    1.15258426
}

impl Default for Config {
    /// diffusers' defaults: the architecture of the published CogVideoX-2b / 5b VAE.
    fn default() -> Self {
        Self {
            out_channels: default_out_channels(),
            up_block_types: default_up_block_types(),
            block_out_channels: default_block_out_channels(),
            latent_channels: default_latent_channels(),
            layers_per_block: default_layers_per_block(),
            act_fn: default_act_fn(),
            norm_num_groups: default_norm_num_groups(),
            temporal_compression_ratio: default_temporal_compression_ratio(),
            scaling_factor: default_scaling_factor(),
            use_quant_conv: false,
            use_post_quant_conv: false,
        }
    }
}

impl Config {
    /// Rejects options this implementation does not support, and inconsistent sizes.
    pub fn validate(&self) -> Result<()> {
        let bail = |msg: String| -> Result<()> {
            Err(candle_core::Error::Msg(format!(
                "cogvideox vae config: {msg}"
            )))
        };
        let n = self.block_out_channels.len();
        if n == 0 || self.up_block_types.len() != n {
            return bail(format!(
                "up_block_types ({}) and block_out_channels ({n}) must have the same non-zero length",
                self.up_block_types.len()
            ));
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != UP_BLOCK) {
            return bail(format!("up block type `{t}` is not supported ({UP_BLOCK})"));
        }
        // diffusers' get_activation maps both names to SiLU.
        if self.act_fn != "silu" && self.act_fn != "swish" {
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
        if self.out_channels == 0 || self.latent_channels == 0 {
            return bail("out_channels and latent_channels must be positive".into());
        }
        if !(self.temporal_compression_ratio >= 1.0 && self.temporal_compression_ratio.is_finite())
        {
            return bail(format!(
                "temporal_compression_ratio must be finite and >= 1, got {}",
                self.temporal_compression_ratio
            ));
        }
        if self.scaling_factor == 0.0 || !self.scaling_factor.is_finite() {
            return bail(format!(
                "scaling_factor must be finite and non-zero, got {}",
                self.scaling_factor
            ));
        }
        if self.use_post_quant_conv {
            return bail(format!(
                "use_post_quant_conv = true is not supported: no published CogVideoX VAE uses it, and diffusers builds it with out_channels ({}) channels, so it only runs when latent_channels ({}) equals out_channels",
                self.out_channels, self.latent_channels
            ));
        }
        Ok(())
    }

    /// How many up blocks (from the first) double the frame count: diffusers'
    /// `int(np.log2(temporal_compression_ratio))`.
    fn temporal_compress_level(&self) -> usize {
        self.temporal_compression_ratio.log2().floor() as usize
    }

    /// The spatial upsampling factor of the decoder, 2^(n - 1).
    pub fn spatial_scale(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// Per chunk, the last [`CAUSAL_PAD`] frames each causal conv saw (padding included), in
/// call order: the next chunk's convs put them in front instead of first-frame copies
/// (diffusers' `conv_cache`).
#[derive(Default)]
struct ConvCache {
    frames: Vec<Tensor>,
    cursor: usize,
}

impl ConvCache {
    fn start_chunk(&mut self) {
        self.cursor = 0;
    }

    /// `xs` (B, C, F, H, W) with [`CAUSAL_PAD`] frames in front, remembering its tail.
    fn pad_front(&mut self, xs: &Tensor) -> Result<Tensor> {
        let padded = match self.frames.get(self.cursor) {
            Some(previous) => Tensor::cat(&[previous, xs], 2)?,
            None => xs.pad_with_same(2, CAUSAL_PAD, 0)?,
        };
        let tail = padded.narrow(2, padded.dim(2)? - CAUSAL_PAD, CAUSAL_PAD)?;
        match self.frames.get_mut(self.cursor) {
            Some(slot) => *slot = tail,
            None => self.frames.push(tail),
        }
        self.cursor += 1;
        Ok(padded)
    }
}

/// `CogVideoXCausalConv3d` with a 3x3x3 kernel and `pad_mode = "first"`: time padded in front
/// (by the cache), H and W zero-padded by one.
#[derive(Debug, Clone)]
struct CausalConv3d {
    conv: Conv3d,
}

impl CausalConv3d {
    fn new(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        let cfg = Conv3dConfig {
            padding: [0, 1, 1],
            ..Default::default()
        };
        Ok(Self {
            conv: conv3d(cin, cout, [3, 3, 3], cfg, vb.pp("conv"))?,
        })
    }

    fn forward(&self, xs: &Tensor, cache: &mut ConvCache) -> Result<Tensor> {
        self.conv.forward(&cache.pad_front(xs)?)
    }
}

/// A biased 1x1x1 conv3d (`CogVideoXSafeConv3d` / a kernel-1 `CogVideoXCausalConv3d`).
fn pointwise_conv3d(vb: VarBuilder, cin: usize, cout: usize) -> Result<Conv3d> {
    conv3d(cin, cout, [1, 1, 1], Conv3dConfig::default(), vb)
}

/// Nearest resize of `xs` (B, C, f, h, w) to `size`, which must be integer multiples (always
/// the case in this decoder: frame counts grow as 2F or 2F - 1 with the split first frame).
fn resize_nearest(xs: &Tensor, size: [usize; 3]) -> Result<Tensor> {
    let (_, _, f, h, w) = xs.dims5()?;
    let from = [f, h, w];
    if from
        .iter()
        .zip(size)
        .any(|(&a, b)| a == 0 || !b.is_multiple_of(a))
    {
        candle_core::bail!(
            "cogvideox vae: cannot resize the latent {from:?} to {size:?} by integer factors"
        )
    }
    upsample_nearest3d(xs, [size[0] / f, size[1] / h, size[2] / w])
}

/// `CogVideoXSpatialNorm3D`: `GroupNorm(f) · conv_y(zq) + conv_b(zq)`, zq resized to f.
#[derive(Debug, Clone)]
struct SpatialNorm3D {
    norm_layer: GroupNorm,
    conv_y: Conv3d,
    conv_b: Conv3d,
}

impl SpatialNorm3D {
    fn new(vb: VarBuilder, channels: usize, zq_channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm_layer: group_norm(groups, channels, SPATIAL_NORM_EPS, vb.pp("norm_layer"))?,
            conv_y: pointwise_conv3d(vb.pp("conv_y.conv"), zq_channels, channels)?,
            conv_b: pointwise_conv3d(vb.pp("conv_b.conv"), zq_channels, channels)?,
        })
    }

    fn forward(&self, xs: &Tensor, zq: &Tensor) -> Result<Tensor> {
        let (_, _, frames, h, w) = xs.dims5()?;
        let zq_frames = zq.dim(2)?;
        let zq = if frames > 1 && frames % 2 == 1 {
            let first = resize_nearest(&zq.narrow(2, 0, 1)?, [1, h, w])?;
            let rest = resize_nearest(&zq.narrow(2, 1, zq_frames - 1)?, [frames - 1, h, w])?;
            Tensor::cat(&[first, rest], 2)?
        } else {
            resize_nearest(zq, [frames, h, w])?
        };
        let norm = self.norm_layer.forward(xs)?;
        norm.mul(&self.conv_y.forward(&zq)?)? + self.conv_b.forward(&zq)?
    }
}

/// `CogVideoXResnetBlock3D` as the decoder uses it: spatial norms, no time embedding, a 1x1x1
/// `conv_shortcut` when the channel count changes.
#[derive(Debug, Clone)]
struct ResnetBlock3D {
    norm1: SpatialNorm3D,
    conv1: CausalConv3d,
    norm2: SpatialNorm3D,
    conv2: CausalConv3d,
    conv_shortcut: Option<Conv3d>,
}

impl ResnetBlock3D {
    fn new(vb: VarBuilder, cfg: &Config, cin: usize, cout: usize) -> Result<Self> {
        let (zq, groups) = (cfg.latent_channels, cfg.norm_num_groups);
        Ok(Self {
            norm1: SpatialNorm3D::new(vb.pp("norm1"), cin, zq, groups)?,
            conv1: CausalConv3d::new(vb.pp("conv1"), cin, cout)?,
            norm2: SpatialNorm3D::new(vb.pp("norm2"), cout, zq, groups)?,
            conv2: CausalConv3d::new(vb.pp("conv2"), cout, cout)?,
            conv_shortcut: if cin != cout {
                Some(pointwise_conv3d(vb.pp("conv_shortcut"), cin, cout)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, xs: &Tensor, zq: &Tensor, cache: &mut ConvCache) -> Result<Tensor> {
        let h = adm_nn::silu(&self.norm1.forward(xs, zq)?)?;
        let h = self.conv1.forward(&h, cache)?;
        let h = adm_nn::silu(&self.norm2.forward(&h, zq)?)?;
        let h = self.conv2.forward(&h, cache)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        h + skip
    }
}

/// `CogVideoXUpsample3D`: nearest x2 in H and W (and in time with `compress_time`, the first
/// frame of an odd clip staying single), then a 2-D 3x3 conv per frame.
#[derive(Debug, Clone)]
struct Upsample3D {
    conv: Conv2d,
    compress_time: bool,
}

impl Upsample3D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let frames = xs.dim(2)?;
        let up = if self.compress_time && frames > 1 && frames % 2 == 1 {
            let first = upsample_nearest3d(&xs.narrow(2, 0, 1)?, [1, 2, 2])?;
            let rest = upsample_nearest3d(&xs.narrow(2, 1, frames - 1)?, [2, 2, 2])?;
            Tensor::cat(&[first, rest], 2)?
        } else if self.compress_time && frames > 1 {
            upsample_nearest3d(xs, [2, 2, 2])?
        } else {
            upsample_nearest3d(xs, [1, 2, 2])?
        };
        let (b, c, f, h, w) = up.dims5()?;
        let per_frame = up.permute((0, 2, 1, 3, 4))?.reshape((b * f, c, h, w))?;
        let out = self.conv.forward(&per_frame)?;
        let c_out = out.dim(1)?;
        out.reshape((b, f, c_out, h, w))?.permute((0, 2, 1, 3, 4))
    }
}

/// `CogVideoXUpBlock3D`: `layers_per_block + 1` resnets, then (except the last block) an
/// upsampler.
#[derive(Debug, Clone)]
struct UpBlock3D {
    resnets: Vec<ResnetBlock3D>,
    upsampler: Option<Upsample3D>,
}

/// `CogVideoXDecoder3D` on one temporal chunk.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: CausalConv3d,
    mid_block: Vec<ResnetBlock3D>,
    up_blocks: Vec<UpBlock3D>,
    norm_out: SpatialNorm3D,
    conv_out: CausalConv3d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let channels: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let n = channels.len();
        let mid_vb = vb.pp("mid_block.resnets");
        let mid_block = (0..2)
            .map(|j| ResnetBlock3D::new(mid_vb.pp(j), cfg, channels[0], channels[0]))
            .collect::<Result<_>>()?;
        let level = cfg.temporal_compress_level();
        let mut up_blocks = Vec::with_capacity(n);
        let mut cin = channels[0];
        for (i, &cout) in channels.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let c = if j == 0 { cin } else { cout };
                    ResnetBlock3D::new(vb.pp(format!("resnets.{j}")), cfg, c, cout)
                })
                .collect::<Result<_>>()?;
            let upsampler = if i + 1 < n {
                Some(Upsample3D {
                    conv: conv(vb.pp("upsamplers.0.conv"), cout, cout, 3, 1, 1)?,
                    compress_time: i < level,
                })
            } else {
                None
            };
            up_blocks.push(UpBlock3D { resnets, upsampler });
            cin = cout;
        }
        let zq = cfg.latent_channels;
        Ok(Self {
            conv_in: CausalConv3d::new(vb.pp("conv_in"), zq, channels[0])?,
            mid_block,
            up_blocks,
            norm_out: SpatialNorm3D::new(
                vb.pp("norm_out"),
                channels[n - 1],
                zq,
                cfg.norm_num_groups,
            )?,
            conv_out: CausalConv3d::new(vb.pp("conv_out"), channels[n - 1], cfg.out_channels)?,
        })
    }

    /// One chunk of latents `z` (B, C, f, h, w); `z` is also every spatial norm's `zq`.
    fn forward(&self, z: &Tensor, cache: &mut ConvCache) -> Result<Tensor> {
        cache.start_chunk();
        let mut h = self.conv_in.forward(z, cache)?;
        for resnet in &self.mid_block {
            h = resnet.forward(&h, z, cache)?;
        }
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h, z, cache)?;
            }
            if let Some(up) = &block.upsampler {
                h = up.forward(&h)?;
            }
        }
        let h = adm_nn::silu(&self.norm_out.forward(&h, z)?)?;
        self.conv_out.forward(&h, cache)
    }
}

/// diffusers' split of `frames` latent frames into decode chunks of `per_chunk`, the first
/// taking the remainder: (start, length) pairs.
fn frame_chunks(frames: usize, per_chunk: usize) -> Vec<(usize, usize)> {
    let chunks = (frames / per_chunk).max(1);
    let remainder = frames % per_chunk;
    (0..chunks)
        .map(|i| {
            let start = if i == 0 { 0 } else { per_chunk * i + remainder };
            let end = (per_chunk * (i + 1) + remainder).min(frames);
            (start, end - start)
        })
        .collect()
}

/// The decoder half of diffusers' `AutoencoderKLCogVideoX`, built from a VarBuilder rooted at
/// the VAE's checkpoint (keys `decoder.*`).
#[derive(Debug, Clone)]
pub struct AutoencoderKLCogVideoX {
    config: Config,
    decoder: Decoder,
}

impl AutoencoderKLCogVideoX {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            config: cfg.clone(),
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn dtype(&self) -> DType {
        self.decoder.conv_in.conv.weight().dtype()
    }

    /// Decodes unscaled latents `z` (B, latent_channels, F, h, w) as diffusers' `decode` does
    /// (chunks of [`LATENT_FRAMES_PER_CHUNK`] latent frames with conv caches) to frames
    /// (B, out_channels, F', h·s, w·s), s = [`Config::spatial_scale`].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_in_chunks(z, LATENT_FRAMES_PER_CHUNK)
    }

    /// [`Self::decode`] with `per_chunk` latent frames per chunk (diffusers'
    /// `num_latent_frames_batch_size`); `per_chunk >= F` decodes the whole clip at once.
    pub fn decode_in_chunks(&self, z: &Tensor, per_chunk: usize) -> Result<Tensor> {
        let dims = z.dims();
        if z.rank() != 5 || dims[1] != self.config.latent_channels || dims[2..].contains(&0) {
            candle_core::bail!(
                "cogvideox vae decode: latent has shape {dims:?}; expected (B, {}, F, h, w) with F, h, w > 0",
                self.config.latent_channels
            )
        }
        if per_chunk == 0 {
            candle_core::bail!("cogvideox vae decode: per_chunk must be positive")
        }
        let z = z.to_dtype(self.dtype())?;
        let mut cache = ConvCache::default();
        let chunks = frame_chunks(dims[2], per_chunk)
            .into_iter()
            .map(|(start, len)| self.decoder.forward(&z.narrow(2, start, len)?, &mut cache))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&chunks, 2)
    }

    /// Unscaled latents to the diffusion model's space: `z · scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        z * self.config.scaling_factor
    }

    /// Decodes the diffusion model's (scaled) latents, (B, C, F, h, w), as the CogVideoX
    /// pipelines do: `decode(latents / scaling_factor)`. (The transformer works on
    /// (B, F, C, h, w): permute first.)
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode(&(latents / self.config.scaling_factor)?)
    }
}

/// Name prefixes of the encoder side of a full `AutoencoderKLCogVideoX` checkpoint, which
/// [`load`] skips: `encoder.*`, and `quant_conv.*` when the config has `use_quant_conv`.
fn encoder_prefixes(cfg: &Config) -> &'static [&'static str] {
    if cfg.use_quant_conv {
        &["encoder.", "quant_conv."]
    } else {
        &["encoder."]
    }
}

/// Loads the (frozen) decoder from an `AutoencoderKLCogVideoX` folder (config.json and
/// weights, `variant` as in [`crate::loading::weight_files`]). Encoder tensors are skipped on
/// purpose; any other tensor the decoder does not use is an error naming it, as are missing
/// and mis-shaped ones.
pub fn load(
    dir: &Path,
    variant: Option<&str>,
    dtype: DType,
    device: &Device,
) -> Result<AutoencoderKLCogVideoX> {
    let cfg: Config = read_config(dir)?;
    let weights = Weights::open(dir, variant)?;
    let vae = AutoencoderKLCogVideoX::new(weights.var_builder(dtype, device), &cfg)?;
    let skipped = encoder_prefixes(&cfg);
    let unexpected: Vec<String> = weights
        .unused(&[])
        .into_iter()
        .filter(|n| !skipped.iter().any(|p| n.starts_with(p)))
        .collect();
    if !unexpected.is_empty() {
        let files: Vec<String> = weights
            .files()
            .iter()
            .map(|f| f.display().to_string())
            .collect();
        candle_core::bail!(
            "{} unexpected tensors in {} (neither the decoder nor the skipped encoder side {skipped:?} uses them): {}",
            unexpected.len(),
            files.join(", "),
            unexpected
                .iter()
                .take(20)
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
    Ok(vae)
}

#[cfg(test)]
mod tests {
    use super::frame_chunks;

    #[test]
    fn frame_chunks_follow_diffusers() {
        // autoencoder_kl_cogvideox.py's comment: 13 frames -> (0, 1, 2), (3, 4), ... (11, 12).
        assert_eq!(
            frame_chunks(13, 2),
            [(0, 3), (3, 2), (5, 2), (7, 2), (9, 2), (11, 2)]
        );
        assert_eq!(frame_chunks(12, 2).len(), 6);
        assert_eq!(frame_chunks(1, 2), [(0, 1)]);
        assert_eq!(frame_chunks(3, 2), [(0, 3)]);
        assert_eq!(frame_chunks(4, 2), [(0, 2), (2, 2)]);
        assert_eq!(frame_chunks(5, 8), [(0, 5)]);
    }
}
