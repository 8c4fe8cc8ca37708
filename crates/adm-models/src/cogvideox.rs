//! diffusers' `CogVideoXTransformer3DModel` (CogVideoX-2B / -5B text-to-video) with gradients
//! that reach every parameter, per-sample timesteps and feature taps.
//!
//! Reference: diffusers 0.42.1 `models/transformers/cogvideox_transformer_3d.py`, and in
//! `models/embeddings.py` `CogVideoXPatchEmbed`, `get_3d_sincos_pos_embed` and
//! `get_3d_rotary_pos_embed`; the rotary tables as `CogVideoXPipeline` prepares them.
//! Tensor names follow diffusers, so a `transformer/` folder loads as it is.
//!
//! The model, per forward:
//! - patch embedding: a p x p stride-p conv2d on every latent frame of `hidden_states`
//!   (B, F, C, H, W) gives F·(H/p)·(W/p) video tokens; `text_proj` maps the text encoder's
//!   `encoder_hidden_states`;
//! - positions: CogVideoX-2B adds a 3D sin-cos embedding to the video tokens (computed here
//!   for the input's size, never stored in checkpoints); CogVideoX-5B instead rotates the
//!   queries and keys of the video tokens (3D rotary embedding, computed here as the
//!   diffusers pipeline does and passes in); `use_learned_positional_embeddings` (5B-I2V) adds
//!   the checkpoint's `patch_embed.pos_embedding` to text and video tokens (then the text
//!   must have `max_text_seq_length` tokens; otherwise any length works: diffusers' sin-cos
//!   table is zero over the text tokens, though it demands that length too);
//! - `num_layers` blocks of joint text+video self-attention (qk LayerNorm) and a tanh-GELU
//!   feed-forward, each modulated by CogVideoXLayerNormZero (separate shift / scale / gate for
//!   text and video tokens, from the timestep embedding);
//! - `norm_final`, AdaLayerNorm `norm_out`, `proj_out` and unpatchify to (B, F, C_out, H, W).
//!
//! Only ops whose backward is verified are used (CANDLE_PITFALLS.md): attention is
//! `adm_nn::scaled_dot_product_attention`, layer norms `adm_nn::LayerNorm`, rotary
//! `adm_nn::apply_rotary_emb`. Dropout is not applied (every released config has 0).
//! Not supported: CogVideoX 1.5 (`patch_size_t`, the `ofs` embedding), rejected by
//! [`Config::validate`].

use adm_diffusion::Schedule;
use adm_nn::{linear, linear_b, LayerNorm, Linear, RopeLayout};
use candle_core::{DType, Device, Module, Result, Shape, Tensor};
use candle_nn::{conv2d, conv2d_no_bias, Conv2d, Conv2dConfig, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::backbone::{Backbone, Condition, FeatureTap};
use crate::blocks::FeedForward;
use crate::unet_2d::{timestep_embedding, TimestepEmbedding, ENCODER_HIDDEN_STATES};

/// diffusers' `CogVideoXTransformer3DModel` config.json; the defaults are diffusers' (which
/// are CogVideoX-2B's). Unknown keys are ignored; options this implementation does not
/// support are rejected by [`Config::validate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_time_embed_dim")]
    pub time_embed_dim: usize,
    /// CogVideoX 1.5 I2V only; not supported.
    #[serde(default)]
    pub ofs_embed_dim: Option<usize>,
    #[serde(default = "default_text_embed_dim")]
    pub text_embed_dim: usize,
    #[serde(default = "default_layers")]
    pub num_layers: usize,
    /// Not applied (see the module docs).
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_true")]
    pub attention_bias: bool,
    #[serde(default = "default_sample_width")]
    pub sample_width: usize,
    #[serde(default = "default_sample_height")]
    pub sample_height: usize,
    /// In pixel-space frames: `(latent frames - 1) * temporal_compression_ratio + 1`.
    #[serde(default = "default_sample_frames")]
    pub sample_frames: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    /// CogVideoX 1.5 only; not supported.
    #[serde(default)]
    pub patch_size_t: Option<usize>,
    #[serde(default = "default_temporal_compression_ratio")]
    pub temporal_compression_ratio: usize,
    #[serde(default = "default_max_text_seq_length")]
    pub max_text_seq_length: usize,
    #[serde(default = "default_activation_fn")]
    pub activation_fn: String,
    #[serde(default = "default_timestep_activation_fn")]
    pub timestep_activation_fn: String,
    #[serde(default = "default_true")]
    pub norm_elementwise_affine: bool,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_spatial_interpolation_scale")]
    pub spatial_interpolation_scale: f64,
    #[serde(default = "default_temporal_interpolation_scale")]
    pub temporal_interpolation_scale: f64,
    #[serde(default)]
    pub use_rotary_positional_embeddings: bool,
    #[serde(default)]
    pub use_learned_positional_embeddings: bool,
    #[serde(default = "default_true")]
    pub patch_bias: bool,
}

fn default_heads() -> usize {
    30
}
fn default_head_dim() -> usize {
    64
}
fn default_channels() -> usize {
    16
}
fn default_true() -> bool {
    true
}
fn default_time_embed_dim() -> usize {
    512
}
fn default_text_embed_dim() -> usize {
    4096
}
fn default_layers() -> usize {
    30
}
fn default_sample_width() -> usize {
    90
}
fn default_sample_height() -> usize {
    60
}
fn default_sample_frames() -> usize {
    49
}
fn default_patch_size() -> usize {
    2
}
fn default_temporal_compression_ratio() -> usize {
    4
}
fn default_max_text_seq_length() -> usize {
    226
}
fn default_activation_fn() -> String {
    "gelu-approximate".into()
}
fn default_timestep_activation_fn() -> String {
    "silu".into()
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_spatial_interpolation_scale() -> f64 {
    1.875
}
fn default_temporal_interpolation_scale() -> f64 {
    1.0
}

/// The rotary embedding's base (diffusers' `get_3d_rotary_pos_embed` default).
const ROPE_THETA: f64 = 10_000.0;
/// The sin-cos position embedding's base.
const SINCOS_BASE: f64 = 10_000.0;
/// `Attention(qk_norm="layer_norm", eps=1e-6)` in `CogVideoXBlock`.
const QK_NORM_EPS: f64 = 1e-6;

/// How the video tokens learn where they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Positions {
    /// The 3D sin-cos table added to the video tokens (CogVideoX-2B).
    SinCos,
    /// The 3D rotary embedding on the video tokens' queries and keys (CogVideoX-5B).
    Rotary,
    /// Rotary, plus the checkpoint's `patch_embed.pos_embedding` on all tokens (5B-I2V).
    RotaryAndLearned,
}

impl Config {
    /// THUDM/CogVideoX-2b's transformer (diffusers' defaults).
    pub fn cogvideox_2b() -> Self {
        Self::from_json("{}")
    }

    /// THUDM/CogVideoX-5b's transformer: 48 heads, 42 layers, rotary positions.
    pub fn cogvideox_5b() -> Self {
        Self::from_json(
            r#"{"num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": true}"#,
        )
    }

    fn from_json(json: &str) -> Self {
        serde_json::from_str(json).expect("every Config field has a default")
    }

    /// Heads x head dimension: the width of every token.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Rejects options this implementation does not support, and sizes the position
    /// embeddings cannot be built for.
    pub fn validate(&self) -> Result<()> {
        self.positions().map(|_| ())
    }

    fn positions(&self) -> Result<Positions> {
        let bail = |msg: String| -> Result<Positions> {
            Err(candle_core::Error::Msg(format!("cogvideox config: {msg}")))
        };
        let unsupported: [(&str, bool); 4] = [
            ("patch_size_t (CogVideoX 1.5)", self.patch_size_t.is_some()),
            (
                "ofs_embed_dim (CogVideoX 1.5)",
                self.ofs_embed_dim.is_some_and(|d| d > 0),
            ),
            (
                "activation_fn other than gelu-approximate",
                self.activation_fn != "gelu-approximate",
            ),
            (
                "timestep_activation_fn other than silu",
                self.timestep_activation_fn != "silu",
            ),
        ];
        if let Some((what, _)) = unsupported.iter().find(|(_, bad)| *bad) {
            return bail(format!("{what} is not supported"));
        }
        let sizes = [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("num_layers", self.num_layers),
            ("patch_size", self.patch_size),
            (
                "temporal_compression_ratio",
                self.temporal_compression_ratio,
            ),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            // The rotary grid is fitted into the sample size's patch grid.
            (
                "sample_height / patch_size",
                self.sample_height.checked_div(self.patch_size).unwrap_or(0),
            ),
            (
                "sample_width / patch_size",
                self.sample_width.checked_div(self.patch_size).unwrap_or(0),
            ),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return bail(format!("`{name}` must be positive"));
        }
        match (
            self.use_rotary_positional_embeddings,
            self.use_learned_positional_embeddings,
        ) {
            (false, true) => bail(
                "use_learned_positional_embeddings needs use_rotary_positional_embeddings (as in diffusers)".into(),
            ),
            // The t / h / w rotary tables get head_dim / 4, 3/8, 3/8 dimensions, each even.
            (true, _) if !self.attention_head_dim.is_multiple_of(16) => bail(format!(
                "the 3D rotary embedding needs attention_head_dim divisible by 16, got {}",
                self.attention_head_dim
            )),
            // Temporal D/4 and spatial 3D/8 + 3D/8 sin-cos halves, each even.
            (false, false) if !self.inner_dim().is_multiple_of(16) => bail(format!(
                "the 3D sin-cos position embedding needs num_attention_heads x attention_head_dim divisible by 16, got {}",
                self.inner_dim()
            )),
            (false, false) => Ok(Positions::SinCos),
            (true, false) => Ok(Positions::Rotary),
            (true, true) => Ok(Positions::RotaryAndLearned),
        }
    }

    /// Latent frames the sample size stands for.
    fn sample_latent_frames(&self) -> usize {
        self.sample_frames.saturating_sub(1) / self.temporal_compression_ratio + 1
    }

    /// The taps in forward order: `transformer_blocks.{i}`, video tokens after block i as
    /// (B, inner_dim, F, H/p, W/p) maps.
    pub fn feature_taps(&self) -> Vec<FeatureTap> {
        (0..self.num_layers)
            .map(|i| FeatureTap {
                name: format!("transformer_blocks.{i}"),
                channels: self.inner_dim(),
            })
            .collect()
    }
}

/// 1-D sin-cos embedding of `positions` with `dim` features: `[sin(p ω_k), cos(p ω_k)]`,
/// `ω_k = base^(-k / (dim/2))` (diffusers' `get_1d_sincos_pos_embed_from_grid`, float64).
fn sincos_1d(positions: &[f64], dim: usize) -> Vec<f64> {
    let half = dim / 2;
    let mut out = Vec::with_capacity(positions.len() * dim);
    for &p in positions {
        let angle = |k: usize| p / SINCOS_BASE.powf(k as f64 / half as f64);
        out.extend((0..half).map(|k| angle(k).sin()));
        out.extend((0..half).map(|k| angle(k).cos()));
    }
    out
}

/// `0, 1, .., n-1` divided by `scale`, in f32 arithmetic as diffusers computes its grids.
fn scaled_grid(n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|i| (i as f32 / scale as f32) as f64).collect()
}

/// `torch.linspace(start, end, n)` in f32 (its CPU kernel: from the start for the first
/// half, from the end for the second).
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f64> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start as f64];
    }
    let step = (end - start) / (n - 1) as f32;
    (0..n)
        .map(|i| {
            if i < n / 2 {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .map(f64::from)
        .collect()
}

/// Broadcasts per-axis tables over the (F, H, W) token grid and concatenates them along the
/// features in the order given; `(axis, table)` with axis 0 = frames, 1 = rows, 2 = columns
/// and `table` (len of that axis, k). Returns (F·H·W, Σk), frames-major as the tokens are.
fn grid_table(tables: &[(usize, &Tensor)], (f, h, w): (usize, usize, usize)) -> Result<Tensor> {
    let expanded = tables
        .iter()
        .map(|&(axis, table)| {
            let k = table.dim(1)?;
            let mut shape = [1, 1, 1, k];
            shape[axis] = table.dim(0)?;
            table.reshape(shape.to_vec())?.broadcast_as((f, h, w, k))
        })
        .collect::<Result<Vec<_>>>()?;
    let total = expanded.iter().map(|t| t.dim(3)).sum::<Result<usize>>()?;
    Tensor::cat(&expanded, 3)?.reshape((f * h * w, total))
}

/// diffusers' `get_3d_sincos_pos_embed(dim, (w, h), f, spatial, temporal)`: per token
/// `[temporal (dim/4), columns (3dim/8), rows (3dim/8)]` (the spatial half diffusers calls
/// `emb_h` is built from the column coordinate). (F·H·W, dim) in `dtype`.
fn sincos_3d(
    cfg: &Config,
    (f, h, w): (usize, usize, usize),
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let dim = cfg.inner_dim();
    let spatial = 3 * dim / 8;
    let table = |positions: Vec<f64>, k: usize| -> Result<Tensor> {
        let n = positions.len();
        Tensor::from_vec(sincos_1d(&positions, k), (n, k), device)?.to_dtype(dtype)
    };
    let frames = table(scaled_grid(f, cfg.temporal_interpolation_scale), dim / 4)?;
    let rows = table(scaled_grid(h, cfg.spatial_interpolation_scale), spatial)?;
    let cols = table(scaled_grid(w, cfg.spatial_interpolation_scale), spatial)?;
    grid_table(&[(0, &frames), (2, &cols), (1, &rows)], (f, h, w))
}

/// Python's `round` (ties to even) of a non-negative value.
fn py_round(x: f64) -> usize {
    x.round_ties_even() as usize
}

/// The rotary cos / sin tables (F·H·W, head_dim) of an (F, H, W) token grid, as diffusers'
/// `CogVideoXPipeline._prepare_rotary_positional_embeddings` makes them: the grid is
/// resized into the sample size's grid (`get_resize_crop_region_for_grid`), positions are
/// `linspace` over that crop, and the head dimension is split t / h / w = 1/4, 3/8, 3/8
/// (`get_3d_rotary_pos_embed`, interleaved pairs).
fn rotary_3d(
    cfg: &Config,
    (f, h, w): (usize, usize, usize),
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let p = cfg.patch_size;
    let (base_w, base_h) = (cfg.sample_width / p, cfg.sample_height / p);
    let (th, tw) = (base_h as f64, base_w as f64);
    let (resize_h, resize_w) = if h as f64 / w as f64 > th / tw {
        (base_h, py_round(th / h as f64 * w as f64))
    } else {
        (py_round(tw / w as f64 * h as f64), base_w)
    };
    let top = py_round((th - resize_h as f64) / 2.0);
    let left = py_round((tw - resize_w as f64) / 2.0);
    // diffusers scales the crop's end (not its extent) by (n - 1) / n.
    let stop = |end: usize, n: usize| end as f64 * (n - 1) as f64 / n as f64;
    let rows = linspace_f32(top as f64, stop(top + resize_h, h), h);
    let cols = linspace_f32(left as f64, stop(left + resize_w, w), w);
    let frames = linspace_f32(0.0, stop(f, f), f);

    let head = cfg.attention_head_dim;
    let (dim_t, dim_s) = (head / 4, head / 8 * 3);
    let axis = |positions: Vec<f64>, dim: usize| {
        let n = positions.len();
        let positions = Tensor::from_vec(positions, n, device)?;
        adm_nn::rope_cos_sin(&positions, dim, ROPE_THETA, RopeLayout::Interleaved, dtype)
    };
    let (cos_t, sin_t) = axis(frames, dim_t)?;
    let (cos_h, sin_h) = axis(rows, dim_s)?;
    let (cos_w, sin_w) = axis(cols, dim_s)?;
    let grid = (f, h, w);
    Ok((
        grid_table(&[(0, &cos_t), (1, &cos_h), (2, &cos_w)], grid)?,
        grid_table(&[(0, &sin_t), (1, &sin_h), (2, &sin_w)], grid)?,
    ))
}

/// `CogVideoXPatchEmbed` (CogVideoX 1.0: conv2d per frame).
#[derive(Debug, Clone)]
struct PatchEmbed {
    proj: Conv2d,
    text_proj: Linear,
    /// `pos_embedding` (1, max_text_seq_length + sample tokens, dim) when learned.
    learned: Option<Tensor>,
}

impl PatchEmbed {
    fn new(vb: VarBuilder, cfg: &Config, positions: Positions) -> Result<Self> {
        let dim = cfg.inner_dim();
        let conv_cfg = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let build = if cfg.patch_bias {
            conv2d
        } else {
            conv2d_no_bias
        };
        let learned = if positions == Positions::RotaryAndLearned {
            let p = cfg.patch_size;
            let tokens =
                (cfg.sample_height / p) * (cfg.sample_width / p) * cfg.sample_latent_frames();
            Some(vb.get((1, cfg.max_text_seq_length + tokens, dim), "pos_embedding")?)
        } else {
            None
        };
        Ok(Self {
            proj: build(
                cfg.in_channels,
                dim,
                cfg.patch_size,
                conv_cfg,
                vb.pp("proj"),
            )?,
            text_proj: linear(cfg.text_embed_dim, dim, vb.pp("text_proj"))?,
            learned,
        })
    }

    /// Text tokens (B, L, dim) and video tokens (B, F·h·w, dim) of `video` (B, F, C, H, W).
    fn forward(&self, text: &Tensor, video: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, f, c, h, w) = video.dims5()?;
        let patches = self.proj.forward(&video.reshape((b * f, c, h, w))?)?;
        let (_, dim, gh, gw) = patches.dims4()?;
        let video = patches
            .reshape((b, f, dim, gh * gw))?
            .transpose(2, 3)?
            .reshape((b, f * gh * gw, dim))?;
        Ok((self.text_proj.forward(&text.contiguous()?)?, video))
    }
}

/// `x` layer-normed, then `* (1 + scale) + shift` with per-sample (B, 1, D) modulations.
fn modulate(norm: &LayerNorm, x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    norm.forward(x)?
        .broadcast_mul(&(scale + 1.0)?)?
        .broadcast_add(shift)
}

/// Chunk `i` of `n` equal chunks of `mods` (B, n·D) along the features, as (B, 1, D).
fn chunk(mods: &Tensor, i: usize, n: usize) -> Result<Tensor> {
    let d = mods.dim(1)? / n;
    mods.narrow(1, i * d, d)?.unsqueeze(1)
}

/// `CogVideoXLayerNormZero`: one shared LayerNorm, separate shift / scale / gate for the
/// video and the text tokens from `linear(silu(temb))`.
#[derive(Debug, Clone)]
struct LayerNormZero {
    linear: Linear,
    norm: LayerNorm,
}

/// Normed + modulated tokens and the gates of their residual branch.
struct Modulated {
    video: Tensor,
    text: Tensor,
    video_gate: Tensor,
    text_gate: Tensor,
}

impl LayerNormZero {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let dim = cfg.inner_dim();
        Ok(Self {
            linear: linear(cfg.time_embed_dim, 6 * dim, vb.pp("linear"))?,
            norm: adm_nn::layer_norm(
                dim,
                cfg.norm_eps,
                cfg.norm_elementwise_affine,
                vb.pp("norm"),
            )?,
        })
    }

    fn forward(&self, video: &Tensor, text: &Tensor, temb: &Tensor) -> Result<Modulated> {
        let mods = self.linear.forward(&adm_nn::silu(temb)?)?;
        let c = |i| chunk(&mods, i, 6);
        Ok(Modulated {
            video: modulate(&self.norm, video, &c(0)?, &c(1)?)?,
            video_gate: c(2)?,
            text: modulate(&self.norm, text, &c(3)?, &c(4)?)?,
            text_gate: c(5)?,
        })
    }
}

/// Joint text + video self-attention with qk LayerNorm (`CogVideoXAttnProcessor2_0`); the
/// rotary embedding, when given, rotates the video tokens' queries and keys only.
#[derive(Debug, Clone)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    norm_q: LayerNorm,
    norm_k: LayerNorm,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (dim, head_dim) = (cfg.inner_dim(), cfg.attention_head_dim);
        let proj = |name: &str| linear_b(dim, dim, cfg.attention_bias, vb.pp(name));
        // diffusers builds the qk norms with affine parameters whatever the config says.
        let qk_norm = |name: &str| adm_nn::layer_norm(head_dim, QK_NORM_EPS, true, vb.pp(name));
        Ok(Self {
            to_q: proj("to_q")?,
            to_k: proj("to_k")?,
            to_v: proj("to_v")?,
            norm_q: qk_norm("norm_q")?,
            norm_k: qk_norm("norm_k")?,
            to_out: linear(dim, dim, vb.pp("to_out.0"))?,
            heads: cfg.num_attention_heads,
            head_dim,
        })
    }

    /// (video, text) outputs for `video` (B, Lv, D) and `text` (B, Lt, D).
    fn forward(
        &self,
        video: &Tensor,
        text: &Tensor,
        rotary: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        let (b, lt, _) = text.dims3()?;
        let lv = video.dim(1)?;
        let l = lt + lv;
        let tokens = Tensor::cat(&[text, video], 1)?;
        let heads = |proj: &Linear| -> Result<Tensor> {
            proj.forward(&tokens)?
                .reshape((b, l, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let rotate = |x: Tensor| -> Result<Tensor> {
            match rotary {
                Some((cos, sin)) => {
                    let video = x.narrow(2, lt, lv)?;
                    let video =
                        adm_nn::apply_rotary_emb(&video, cos, sin, RopeLayout::Interleaved)?;
                    Tensor::cat(&[&x.narrow(2, 0, lt)?, &video], 2)
                }
                None => Ok(x),
            }
        };
        let q = rotate(self.norm_q.forward(&heads(&self.to_q)?)?)?;
        let k = rotate(self.norm_k.forward(&heads(&self.to_k)?)?)?;
        let v = heads(&self.to_v)?;
        let out = adm_nn::scaled_dot_product_attention(&q, &k, &v, None, None)?
            .transpose(1, 2)?
            .reshape((b, l, self.heads * self.head_dim))?;
        let out = self.to_out.forward(&out)?;
        Ok((out.narrow(1, lt, lv)?, out.narrow(1, 0, lt)?))
    }
}

/// `CogVideoXBlock`.
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNormZero,
    attn1: Attention,
    norm2: LayerNormZero,
    ff: FeedForward,
}

impl Block {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Ok(Self {
            norm1: LayerNormZero::new(vb.pp("norm1"), cfg)?,
            attn1: Attention::new(vb.pp("attn1"), cfg)?,
            norm2: LayerNormZero::new(vb.pp("norm2"), cfg)?,
            ff: FeedForward::new(vb.pp("ff"), cfg.inner_dim())?,
        })
    }

    fn forward(
        &self,
        video: &Tensor,
        text: &Tensor,
        temb: &Tensor,
        rotary: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        let m = self.norm1.forward(video, text, temb)?;
        let (attn_video, attn_text) = self.attn1.forward(&m.video, &m.text, rotary)?;
        let video = (video + attn_video.broadcast_mul(&m.video_gate)?)?;
        let text = (text + attn_text.broadcast_mul(&m.text_gate)?)?;
        // The feed-forward is per token: diffusers runs it on the concatenation, the same.
        let m = self.norm2.forward(&video, &text, temb)?;
        let video = (&video + self.ff.forward(&m.video)?.broadcast_mul(&m.video_gate)?)?;
        let text = (&text + self.ff.forward(&m.text)?.broadcast_mul(&m.text_gate)?)?;
        Ok((video, text))
    }
}

#[derive(Debug, Clone)]
pub struct CogVideoXTransformer3DModel {
    config: Config,
    positions: Positions,
    patch_embed: PatchEmbed,
    time_embedding: TimestepEmbedding,
    transformer_blocks: Vec<Block>,
    norm_final: LayerNorm,
    /// AdaLayerNorm `norm_out` (chunk_dim 1: shift first, then scale).
    norm_out_linear: Linear,
    norm_out_norm: LayerNorm,
    proj_out: Linear,
}

impl CogVideoXTransformer3DModel {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let positions = cfg.positions()?;
        let dim = cfg.inner_dim();
        let p = cfg.patch_size;
        let ln = |name: &str| {
            adm_nn::layer_norm(dim, cfg.norm_eps, cfg.norm_elementwise_affine, vb.pp(name))
        };
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| Block::new(vb.pp(format!("transformer_blocks.{i}")), cfg))
            .collect::<Result<_>>()?;
        Ok(Self {
            config: cfg.clone(),
            positions,
            patch_embed: PatchEmbed::new(vb.pp("patch_embed"), cfg, positions)?,
            time_embedding: TimestepEmbedding::new(
                vb.pp("time_embedding"),
                dim,
                cfg.time_embed_dim,
            )?,
            transformer_blocks,
            norm_final: ln("norm_final")?,
            norm_out_linear: linear(cfg.time_embed_dim, 2 * dim, vb.pp("norm_out.linear"))?,
            norm_out_norm: ln("norm_out.norm")?,
            proj_out: linear(dim, p * p * cfg.out_channels, vb.pp("proj_out"))?,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn dtype(&self) -> DType {
        self.proj_out.weight().dtype()
    }

    /// The prediction (B, F, out_channels, H, W) for `hidden_states` (B, F, in_channels, H, W)
    /// at per-sample `timestep` (B,) (a single value is broadcast) with the text encoder's
    /// `encoder_hidden_states` (B, L, text_embed_dim).
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        timestep: &Tensor,
    ) -> Result<Tensor> {
        let out = self.trunk(
            hidden_states,
            encoder_hidden_states,
            timestep,
            usize::MAX,
            |_, _| Ok(()),
        )?;
        out.ok_or_else(|| candle_core::Error::Msg("cogvideox: the forward stopped early".into()))
    }

    /// The prediction and the feature maps at `taps` (see [`Config::feature_taps`]), in the
    /// order requested.
    pub fn forward_with_features(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        timestep: &Tensor,
        taps: &[String],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let indices = self.tap_indices(taps)?;
        let mut found = vec![None; self.transformer_blocks.len()];
        let out = self.trunk(
            hidden_states,
            encoder_hidden_states,
            timestep,
            usize::MAX,
            |i, map| {
                if indices.contains(&i) {
                    found[i] = Some(map()?);
                }
                Ok(())
            },
        )?;
        let out = out.ok_or_else(|| {
            candle_core::Error::Msg("cogvideox: the forward stopped early".into())
        })?;
        Ok((out, pick(&indices, found)?))
    }

    /// The feature maps at `taps`, in the order requested; the forward stops after the last
    /// block it needs.
    pub fn features(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        timestep: &Tensor,
        taps: &[String],
    ) -> Result<Vec<Tensor>> {
        let indices = self.tap_indices(taps)?;
        let last = indices.iter().copied().max().unwrap_or(0);
        let mut found = vec![None; self.transformer_blocks.len()];
        self.trunk(
            hidden_states,
            encoder_hidden_states,
            timestep,
            last,
            |i, map| {
                if indices.contains(&i) {
                    found[i] = Some(map()?);
                }
                Ok(())
            },
        )?;
        pick(&indices, found)
    }

    fn tap_indices(&self, taps: &[String]) -> Result<Vec<usize>> {
        let all = self.config.feature_taps();
        taps.iter()
            .map(|tap| {
                all.iter().position(|t| &t.name == tap).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "cogvideox has no feature tap `{tap}` (taps: transformer_blocks.0 .. transformer_blocks.{})",
                        all.len().saturating_sub(1)
                    ))
                })
            })
            .collect()
    }

    /// The timestep embedding (B, time_embed_dim).
    fn embedding(&self, timestep: &Tensor, batch: usize) -> Result<Tensor> {
        let t = match timestep.dims() {
            [] | [1] => timestep.reshape(1)?.broadcast_as(batch)?.contiguous()?,
            [b] if *b == batch => timestep.clone(),
            dims => candle_core::bail!(
                "cogvideox: timestep must have shape ({batch},) or be a single value, got {dims:?}"
            ),
        };
        let t_emb = timestep_embedding(
            &t,
            self.config.inner_dim(),
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?;
        self.time_embedding.forward(&t_emb.to_dtype(self.dtype())?)
    }

    /// Adds the absolute position embedding (if any) to the text and video tokens of an
    /// (F, h, w) grid, as `CogVideoXPatchEmbed.forward` does.
    fn add_positions(
        &self,
        text: Tensor,
        video: Tensor,
        (f, h, w): (usize, usize, usize),
    ) -> Result<(Tensor, Tensor)> {
        let cfg = &self.config;
        let (dtype, device) = (video.dtype(), video.device().clone());
        let p = cfg.patch_size;
        let sincos = || -> Result<(Tensor, Tensor)> {
            // diffusers' joint table is zero over the text tokens.
            let table = sincos_3d(cfg, (f, h, w), dtype, &device)?;
            Ok((text.clone(), video.broadcast_add(&table)?))
        };
        match (self.positions, &self.patch_embed.learned) {
            (Positions::SinCos, _) => sincos(),
            (Positions::RotaryAndLearned, Some(table)) => {
                if (h * p, w * p) != (cfg.sample_height, cfg.sample_width) {
                    candle_core::bail!(
                        "cogvideox: learned position embeddings only fit the sample size {}x{}, got {}x{} (as in diffusers)",
                        cfg.sample_height,
                        cfg.sample_width,
                        h * p,
                        w * p
                    )
                }
                // As diffusers: another frame count falls back to the sin-cos table.
                if (f - 1) * cfg.temporal_compression_ratio + 1 != cfg.sample_frames {
                    return sincos();
                }
                let lt = text.dim(1)?;
                if lt != cfg.max_text_seq_length {
                    candle_core::bail!(
                        "cogvideox: learned position embeddings need {} text tokens (max_text_seq_length), got {lt}",
                        cfg.max_text_seq_length
                    )
                }
                let table = table.to_dtype(dtype)?;
                Ok((
                    text.broadcast_add(&table.narrow(1, 0, lt)?)?,
                    video.broadcast_add(&table.narrow(1, lt, video.dim(1)?)?)?,
                ))
            }
            _ => Ok((text, video)),
        }
    }

    /// The whole network, handing each block's video-token map (built on demand) to `visit`;
    /// returns None when it stopped after block `stop_after`.
    fn trunk(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        timestep: &Tensor,
        stop_after: usize,
        mut visit: impl FnMut(usize, &dyn Fn() -> Result<Tensor>) -> Result<()>,
    ) -> Result<Option<Tensor>> {
        let cfg = &self.config;
        let p = cfg.patch_size;
        let dims = hidden_states.dims();
        let &[b, f, c, height, width] = dims else {
            candle_core::bail!("cogvideox: hidden_states must be (B, F, C, H, W), got {dims:?}")
        };
        if c != cfg.in_channels || height % p != 0 || width % p != 0 || f * height * width == 0 {
            candle_core::bail!(
                "cogvideox: hidden_states has shape {dims:?}; expected {} channels, at least one frame and H, W positive multiples of {p}",
                cfg.in_channels
            )
        }
        let context_dims = encoder_hidden_states.dims();
        if !matches!(context_dims, &[cb, _, d] if cb == b && d == cfg.text_embed_dim) {
            candle_core::bail!(
                "cogvideox: encoder_hidden_states has shape {context_dims:?}, expected ({b}, L, {})",
                cfg.text_embed_dim
            )
        }
        let dtype = self.dtype();
        let temb = self.embedding(timestep, b)?;
        let (text, video) = self.patch_embed.forward(
            &encoder_hidden_states.to_dtype(dtype)?,
            &hidden_states.to_dtype(dtype)?,
        )?;
        let grid = (f, height / p, width / p);
        let (mut text, mut video) = self.add_positions(text, video, grid)?;
        let rotary = match self.positions {
            Positions::SinCos => None,
            Positions::Rotary | Positions::RotaryAndLearned => {
                // Rotated in f32 for half-precision models, as diffusers does.
                let table_dtype = if dtype == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                Some(rotary_3d(cfg, grid, table_dtype, video.device())?)
            }
        };
        let (gf, gh, gw) = grid;
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            (video, text) = block.forward(&video, &text, &temb, rotary.as_ref())?;
            let map = || {
                video
                    .reshape((b, gf, gh, gw, cfg.inner_dim()))?
                    .permute((0, 4, 1, 2, 3))?
                    .contiguous()
            };
            visit(i, &map)?;
            if i >= stop_after {
                return Ok(None);
            }
        }
        let video = self.norm_final.forward(&video)?;
        let mods = self.norm_out_linear.forward(&adm_nn::silu(&temb)?)?;
        let video = modulate(
            &self.norm_out_norm,
            &video,
            &chunk(&mods, 0, 2)?,
            &chunk(&mods, 1, 2)?,
        )?;
        let out = self.proj_out.forward(&video)?;
        // Unpatchify: (B, F·h·w, C·p·p) -> (B, F, C, h·p, w·p).
        let cout = cfg.out_channels;
        Ok(Some(
            out.reshape(vec![b, gf, gh, gw, cout, p, p])?
                .permute(vec![0, 1, 4, 2, 5, 3, 6])?
                .reshape((b, gf, cout, height, width))?,
        ))
    }
}

fn pick(indices: &[usize], found: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    indices
        .iter()
        .map(|&i| {
            found[i].clone().ok_or_else(|| {
                candle_core::Error::Msg(format!("cogvideox: block {i} was not reached"))
            })
        })
        .collect()
}

/// Every tensor a checkpoint for `cfg` holds (diffusers names) and its shape, in construction
/// order, without allocating the model.
pub fn expected_tensors(cfg: &Config) -> Result<Vec<(String, Shape)>> {
    crate::loading::expected_tensors(|vb| CogVideoXTransformer3DModel::new(vb, cfg))
}

/// The transformer as a [`Backbone`]: `x_t` is (B, F, C, H, W) as diffusers lays out video
/// latents, `t` is passed as it is (CogVideoX's discrete training timesteps, 0..999; the
/// schedule is `ScheduleConfig::cogvideox()` for 2B, `cogvideox_5b()` for 5B).
///
/// Conditions carry `encoder_hidden_states` (B, L, text_embed_dim) (T5 of the prompt). The
/// unconditional condition of classifier-free guidance is the encoded negative (usually
/// empty) prompt, which only the data pipeline can produce: it must travel in the condition
/// as `negative_encoder_hidden_states`.
#[derive(Debug, Clone)]
pub struct CogVideoXBackbone {
    pub model: CogVideoXTransformer3DModel,
    pub schedule: Schedule,
}

impl CogVideoXBackbone {
    /// Fails for models whose prediction cannot live in the input's space (image-to-video
    /// checkpoints take more input channels than they predict).
    pub fn new(model: CogVideoXTransformer3DModel, schedule: Schedule) -> Result<Self> {
        let cfg = model.config();
        if cfg.in_channels != cfg.out_channels {
            candle_core::bail!(
                "cogvideox backbone: in_channels ({}) must equal out_channels ({}) (text-to-video checkpoints)",
                cfg.in_channels,
                cfg.out_channels
            )
        }
        Ok(Self { model, schedule })
    }
}

impl Backbone for CogVideoXBackbone {
    fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    fn forward(&self, x_t: &Tensor, t: &Tensor, cond: &Condition) -> Result<Tensor> {
        self.model.forward(x_t, cond.get(ENCODER_HIDDEN_STATES)?, t)
    }

    fn features(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        cond: &Condition,
        taps: &[String],
    ) -> Result<Vec<Tensor>> {
        self.model
            .features(x_t, cond.get(ENCODER_HIDDEN_STATES)?, t, taps)
    }

    fn feature_taps(&self) -> Vec<FeatureTap> {
        self.model.config().feature_taps()
    }

    fn unconditional(&self, cond: &Condition) -> Result<Condition> {
        cond.with_negatives("cogvideox", &[ENCODER_HIDDEN_STATES])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_torch_and_rounding_is_pythons() {
        assert_eq!(linspace_f32(0.0, 2.25, 4), [0.0, 0.75, 1.5, 2.25]);
        assert_eq!(linspace_f32(3.0, 9.0, 1), [3.0]);
        assert_eq!(
            [py_round(0.5), py_round(1.5), py_round(2.5), py_round(2.6)],
            [0, 2, 2, 3]
        );
    }
}
