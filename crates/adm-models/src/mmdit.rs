//! diffusers' `SD3Transformer2DModel` (MMDiT, Esser et al. 2024, "Scaling Rectified Flow
//! Transformers for High-Resolution Image Synthesis", arXiv:2403.03206;
//! diffusers/models/transformers/transformer_sd3.py) with gradients that reach every trained
//! parameter, per-sample f32 timesteps and feature taps. One implementation, three published
//! configs:
//! - SD3-Medium: joint attention blocks, the last one `context_pre_only`;
//! - SD3.5-Large: `qk_norm = "rms_norm"` (learnable RMS norms on q and k of both streams);
//! - SD3.5-Medium (MMDiT-X): `dual_attention_layers`, a second self-attention `attn2` on the
//!   image stream with its own modulation (`SD35AdaLayerNormZeroX`).
//!
//! Tensor names follow diffusers exactly, so a diffusers `transformer/` folder loads as it is.
//! Only ops with verified backward passes are used (CANDLE_PITFALLS.md): attention is
//! `adm_nn::scaled_dot_product_attention`, layer / RMS norms are adm_nn's; Linear and the
//! patch conv2d (kernel = stride = patch size) come from candle_nn. Linear layers only ever see
//! contiguous inputs (candle's Linear is wrong on non-contiguous 3-D input).
//!
//! Two checkpoint tensors get no gradient, in diffusers too (see
//! [`Config::tensors_without_gradient`]): the position-embedding table `pos_embed.pos_embed`
//! is a saved buffer (frozen: used detached), and the last block's `attn.add_q_proj` /
//! `attn.norm_added_q` compute text-token queries whose outputs that block discards.

use adm_diffusion::{Schedule, ScheduleConfig};
use adm_nn::{linear, Conv2d, Linear};
use candle_core::{Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::backbone::{Backbone, Condition, FeatureTap};
use crate::blocks::{conv, FeedForward};
use crate::unet_2d::{timestep_embedding, TimestepEmbedding};

/// diffusers' `SD3Transformer2DModel` config.json (defaults are diffusers' `__init__`
/// defaults). Unknown keys are ignored; unsupported values are rejected by
/// [`Config::validate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Only sets the size of diffusers' freshly computed position table; the saved table
    /// (`pos_embed_max_size`) is what is used.
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_num_layers")]
    pub num_attention_heads: usize,
    #[serde(default = "default_joint_attention_dim")]
    pub joint_attention_dim: usize,
    #[serde(default = "default_caption_projection_dim")]
    pub caption_projection_dim: usize,
    #[serde(default = "default_pooled_projection_dim")]
    pub pooled_projection_dim: usize,
    /// `null` means `in_channels`, as in diffusers.
    #[serde(default = "default_out_channels")]
    pub out_channels: Option<usize>,
    /// Side of the saved (square) position-embedding grid, cropped around its centre to the
    /// input's patch grid. `null` (no saved table) is not supported.
    #[serde(default = "default_pos_embed_max_size")]
    pub pos_embed_max_size: Option<usize>,
    /// Blocks with the second image self-attention (MMDiT-X, SD3.5-Medium: 0..=12).
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    /// `null` or `"rms_norm"` (SD3.5).
    #[serde(default)]
    pub qk_norm: Option<String>,
}

fn default_sample_size() -> usize {
    128
}
fn default_patch_size() -> usize {
    2
}
fn default_channels() -> usize {
    16
}
fn default_num_layers() -> usize {
    18
}
fn default_attention_head_dim() -> usize {
    64
}
fn default_joint_attention_dim() -> usize {
    4096
}
fn default_caption_projection_dim() -> usize {
    1152
}
fn default_pooled_projection_dim() -> usize {
    2048
}
fn default_out_channels() -> Option<usize> {
    Some(16)
}
fn default_pos_embed_max_size() -> Option<usize> {
    Some(96)
}

const RMS_NORM: &str = "rms_norm";
/// diffusers' `Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)`.
const TIME_PROJ_DIM: usize = 256;
/// The eps of every norm in the model (adaLN layer norms, qk RMS norms).
const NORM_EPS: f64 = 1e-6;

impl Config {
    /// stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json.
    pub fn sd3_medium() -> Self {
        Self {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 24,
            attention_head_dim: 64,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            caption_projection_dim: 1536,
            pooled_projection_dim: 2048,
            out_channels: Some(16),
            pos_embed_max_size: Some(192),
            dual_attention_layers: Vec::new(),
            qk_norm: None,
        }
    }

    /// stabilityai/stable-diffusion-3.5-large, transformer/config.json.
    pub fn sd35_large() -> Self {
        Self {
            num_layers: 38,
            num_attention_heads: 38,
            caption_projection_dim: 38 * 64,
            qk_norm: Some(RMS_NORM.into()),
            ..Self::sd3_medium()
        }
    }

    /// stabilityai/stable-diffusion-3.5-medium (MMDiT-X), transformer/config.json.
    pub fn sd35_medium() -> Self {
        Self {
            pos_embed_max_size: Some(384),
            dual_attention_layers: (0..13).collect(),
            qk_norm: Some(RMS_NORM.into()),
            ..Self::sd3_medium()
        }
    }

    /// The token width, `num_attention_heads * attention_head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    fn uses_qk_norm(&self) -> bool {
        self.qk_norm.is_some()
    }

    /// Rejects unsupported options and inconsistent sizes.
    pub fn validate(&self) -> Result<()> {
        let bail = |msg: String| Err(candle_core::Error::Msg(format!("sd3 config: {msg}")));
        for (name, value) in [
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("num_layers", self.num_layers),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("out_channels", self.out_channels()),
        ] {
            if value == 0 {
                return bail(format!("`{name}` must be positive"));
            }
        }
        if !matches!(self.pos_embed_max_size, Some(m) if m > 0) {
            return bail("`pos_embed_max_size` must be a positive number (null, i.e. no saved position table, is not supported)".into());
        }
        if let Some(norm) = self.qk_norm.as_deref().filter(|n| *n != RMS_NORM) {
            return bail(format!(
                "qk_norm `{norm}` is not supported (null or `{RMS_NORM}`)"
            ));
        }
        if self.caption_projection_dim != self.inner_dim() {
            return bail(format!(
                "caption_projection_dim ({}) must equal num_attention_heads x attention_head_dim ({}): the projected text tokens enter the joint attention",
                self.caption_projection_dim,
                self.inner_dim()
            ));
        }
        if let Some(layer) = self
            .dual_attention_layers
            .iter()
            .find(|&&l| l >= self.num_layers)
        {
            return bail(format!(
                "dual_attention_layers has {layer}, but there are {} layers",
                self.num_layers
            ));
        }
        Ok(())
    }

    /// The feature taps: the image tokens after each transformer block as a map
    /// (B, inner_dim, H / patch, W / patch), named `transformer_blocks.{i}`.
    pub fn feature_taps(&self) -> Vec<FeatureTap> {
        (0..self.num_layers)
            .map(|i| FeatureTap {
                name: format!("transformer_blocks.{i}"),
                channels: self.inner_dim(),
            })
            .collect()
    }

    /// Checkpoint tensors that never receive a gradient, as in diffusers: the saved position
    /// table (a frozen buffer) and, in the last (`context_pre_only`) block, the text-query
    /// projection and its norm, whose outputs that block discards. Trainers may leave them
    /// out of the optimiser; they must stay in checkpoints.
    pub fn tensors_without_gradient(&self) -> Vec<String> {
        let last = format!("transformer_blocks.{}.attn", self.num_layers - 1);
        let mut names = vec![
            "pos_embed.pos_embed".to_string(),
            format!("{last}.add_q_proj.weight"),
            format!("{last}.add_q_proj.bias"),
        ];
        if self.uses_qk_norm() {
            names.push(format!("{last}.norm_added_q.weight"));
        }
        names
    }
}

/// `(B, D)` -> `(B, 1, D)`, to broadcast over tokens.
fn per_token(t: &Tensor) -> Result<Tensor> {
    t.unsqueeze(1)
}

/// `x * (1 + scale) + shift` with (B, 1, D) `shift` / `scale`.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// Layer norm without affine parameters, eps 1e-6 (every norm of the adaLN blocks).
fn plain_layer_norm(x: &Tensor) -> Result<Tensor> {
    adm_nn::ops::layer_norm(x, None, None, NORM_EPS)
}

/// The adaLN modulation `linear(silu(temb))` split into `chunks` (B, 1, D) tensors, in
/// diffusers' order: `AdaLayerNormZero` (6: shift, scale, gate for attention, then for the
/// MLP), `SD35AdaLayerNormZeroX` (9: those plus shift, scale, gate of `attn2`) and
/// `AdaLayerNormContinuous` (2: scale, shift).
#[derive(Debug, Clone)]
struct AdaLayerNorm {
    linear: Linear,
    chunks: usize,
}

impl AdaLayerNorm {
    fn new(vb: VarBuilder, dim: usize, chunks: usize) -> Result<Self> {
        Ok(Self {
            linear: linear(dim, chunks * dim, vb.pp("linear"))?,
            chunks,
        })
    }

    fn params(&self, temb: &Tensor) -> Result<Vec<Tensor>> {
        self.linear
            .forward(&adm_nn::silu(temb)?)?
            .chunk(self.chunks, 1)?
            .iter()
            .map(per_token)
            .collect()
    }

    /// `AdaLayerNormContinuous`: `norm(x) * (1 + scale) + shift`.
    fn continuous(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let p = self.params(temb)?;
        modulate(&plain_layer_norm(x)?, &p[1], &p[0])
    }
}

/// `PatchEmbed` with SD3's cropped position embedding: a patch conv, then the saved
/// (max, max) position grid cropped around its centre to the input's patch grid.
#[derive(Debug, Clone)]
struct PatchEmbed {
    proj: Conv2d,
    /// (1, max * max, dim) as loaded, detached: a buffer in diffusers, never trained. It shares
    /// the storage of the loaded tensor, so `load_into_varmap` reaches it; kept in the loaded
    /// shape so that building allocates nothing on a dry-run VarBuilder.
    pos_embed: Tensor,
    max_size: usize,
    patch: usize,
    dim: usize,
}

impl PatchEmbed {
    fn new(vb: VarBuilder, cfg: &Config, max_size: usize) -> Result<Self> {
        let dim = cfg.inner_dim();
        let patch = cfg.patch_size;
        // A fresh (random) model gets a small random table; checkpoints bring theirs.
        let pos_embed = vb.get_with_hints(
            (1, max_size * max_size, dim),
            "pos_embed",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        Ok(Self {
            proj: conv(vb.pp("proj"), cfg.in_channels, dim, patch, patch, 0)?,
            pos_embed: pos_embed.detach(),
            max_size,
            patch,
            dim,
        })
    }

    /// (B, C, H, W) -> tokens (B, H/p * W/p, dim), row-major over the patch grid.
    fn forward(&self, latent: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = latent.dims4()?;
        let (gh, gw) = (h / self.patch, w / self.patch);
        let tokens = self
            .proj
            .forward(latent)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .contiguous()?;
        // diffusers' `cropped_pos_embed`.
        let (top, left) = ((self.max_size - gh) / 2, (self.max_size - gw) / 2);
        let pos = self
            .pos_embed
            .reshape((self.max_size, self.max_size, self.dim))?
            .narrow(0, top, gh)?
            .narrow(1, left, gw)?
            .reshape((1, gh * gw, self.dim))?;
        tokens.broadcast_add(&pos)
    }
}

/// diffusers' `CombinedTimestepTextProjEmbeddings`: timestep embedding plus the projected
/// pooled text embedding (`PixArtAlphaTextProjection` with SiLU has the same layers and names
/// as `TimestepEmbedding`).
#[derive(Debug, Clone)]
struct TimeTextEmbed {
    timestep_embedder: TimestepEmbedding,
    text_embedder: TimestepEmbedding,
}

impl TimeTextEmbed {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let dim = cfg.inner_dim();
        Ok(Self {
            timestep_embedder: TimestepEmbedding::new(
                vb.pp("timestep_embedder"),
                TIME_PROJ_DIM,
                dim,
            )?,
            text_embedder: TimestepEmbedding::new(
                vb.pp("text_embedder"),
                cfg.pooled_projection_dim,
                dim,
            )?,
        })
    }

    /// `timestep` (B,) in any float dtype: the sinusoids are computed in f32 (as diffusers
    /// does) and only then cast to the model dtype.
    fn forward(&self, timestep: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        let dtype = pooled.dtype();
        let t = timestep_embedding(timestep, TIME_PROJ_DIM, true, 0.0)?.to_dtype(dtype)?;
        self.timestep_embedder.forward(&t)? + self.text_embedder.forward(pooled)?
    }
}

/// RMS norms of q and k over each head's channels (`qk_norm = "rms_norm"`).
#[derive(Debug, Clone)]
struct QkNorm {
    q: adm_nn::RmsNorm,
    k: adm_nn::RmsNorm,
}

impl QkNorm {
    /// `prefix` is `norm` (image stream: norm_q, norm_k) or `norm_added` (text stream).
    fn new(vb: &VarBuilder, prefix: &str, head_dim: usize) -> Result<Self> {
        Ok(Self {
            q: adm_nn::rms_norm(head_dim, NORM_EPS, vb.pp(format!("{prefix}_q")))?,
            k: adm_nn::rms_norm(head_dim, NORM_EPS, vb.pp(format!("{prefix}_k")))?,
        })
    }
}

/// One stream's projections: q, k, v and optionally q/k norms.
#[derive(Debug, Clone)]
struct Projections {
    q: Option<Linear>,
    k: Linear,
    v: Linear,
    norm: Option<QkNorm>,
}

/// diffusers' `Attention` with `JointAttnProcessor2_0`: image tokens (`to_q/k/v`, `to_out.0`)
/// and, for joint attention, text tokens (`add_q/k/v_proj`, `to_add_out`) attend together over
/// the concatenation [image; text].
#[derive(Debug, Clone)]
struct Attention {
    image: Projections,
    to_out: Linear,
    /// Joint attention only; `to_add_out` is None in the last (`context_pre_only`) block.
    text: Option<(Projections, Option<Linear>)>,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    /// `joint`: None for `attn2` (image self-attention), else Some(context_pre_only).
    fn new(vb: VarBuilder, cfg: &Config, joint: Option<bool>) -> Result<Self> {
        let dim = cfg.inner_dim();
        let head_dim = cfg.attention_head_dim;
        let lin = |name: &str| linear(dim, dim, vb.pp(name));
        let image = Projections {
            q: Some(lin("to_q")?),
            k: lin("to_k")?,
            v: lin("to_v")?,
            norm: match cfg.uses_qk_norm() {
                true => Some(QkNorm::new(&vb, "norm", head_dim)?),
                false => None,
            },
        };
        let text = match joint {
            None => None,
            Some(context_pre_only) => {
                let q = lin("add_q_proj")?;
                let norm = match cfg.uses_qk_norm() {
                    true => Some(QkNorm::new(&vb, "norm_added", head_dim)?),
                    false => None,
                };
                // In a context_pre_only block the text queries' outputs are discarded, so the
                // (checkpointed) add_q_proj is loaded but not applied; its norm_added_q is
                // never applied either.
                let projections = Projections {
                    q: (!context_pre_only).then_some(q),
                    k: lin("add_k_proj")?,
                    v: lin("add_v_proj")?,
                    norm,
                };
                let to_add_out = match context_pre_only {
                    true => None,
                    false => Some(lin("to_add_out")?),
                };
                Some((projections, to_add_out))
            }
        };
        Ok(Self {
            image,
            to_out: lin("to_out.0")?,
            text,
            heads: cfg.num_attention_heads,
            head_dim,
        })
    }

    /// (B, L, dim) -> (q if this stream projects queries, k, v), each (B, H, L, head_dim),
    /// q and k normed.
    fn project(&self, p: &Projections, x: &Tensor) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let (b, l, _) = x.dims3()?;
        let heads = |lin: &Linear| -> Result<Tensor> {
            lin.forward(x)?
                .reshape((b, l, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let mut q = p.q.as_ref().map(heads).transpose()?;
        let mut k = heads(&p.k)?;
        if let Some(norm) = &p.norm {
            q = q.map(|q| norm.q.forward(&q)).transpose()?;
            k = norm.k.forward(&k)?;
        }
        Ok((q, k, heads(&p.v)?))
    }

    /// Image tokens `x` (B, Li, dim) and, for joint attention, text tokens `context`
    /// (B, Lc, dim); returns the image output and the text output (None when the block is
    /// `context_pre_only` or this is `attn2`).
    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let (b, li, dim) = x.dims3()?;
        let (Some(mut q), mut k, mut v) = self.project(&self.image, x)? else {
            candle_core::bail!("sd3 attention: the image stream has no query projection")
        };
        let mut text_queries = 0;
        if let (Some((p, _)), Some(context)) = (&self.text, context) {
            let (cq, ck, cv) = self.project(p, context)?;
            if let Some(cq) = cq {
                text_queries = cq.dim(2)?;
                q = Tensor::cat(&[&q, &cq], 2)?;
            }
            k = Tensor::cat(&[&k, &ck], 2)?;
            v = Tensor::cat(&[&v, &cv], 2)?;
        }
        let out = adm_nn::scaled_dot_product_attention(&q, &k, &v, None, None)?
            .transpose(1, 2)?
            .reshape((b, li + text_queries, dim))?;
        let image = self.to_out.forward(&out.narrow(1, 0, li)?.contiguous()?)?;
        let text = match &self.text {
            Some((_, Some(to_add_out))) if text_queries > 0 => {
                Some(to_add_out.forward(&out.narrow(1, li, text_queries)?.contiguous()?)?)
            }
            _ => None,
        };
        Ok((image, text))
    }
}

/// diffusers' `JointTransformerBlock`.
#[derive(Debug, Clone)]
struct JointTransformerBlock {
    /// `AdaLayerNormZero`, or `SD35AdaLayerNormZeroX` with `attn2`.
    norm1: AdaLayerNorm,
    /// `AdaLayerNormZero`, or `AdaLayerNormContinuous` when `context_pre_only`.
    norm1_context: AdaLayerNorm,
    attn: Attention,
    attn2: Option<Attention>,
    ff: FeedForward,
    /// None when `context_pre_only` (the last block: the text tokens are not updated).
    ff_context: Option<FeedForward>,
}

impl JointTransformerBlock {
    fn new(vb: VarBuilder, cfg: &Config, index: usize) -> Result<Self> {
        let dim = cfg.inner_dim();
        let context_pre_only = index + 1 == cfg.num_layers;
        let dual = cfg.dual_attention_layers.contains(&index);
        Ok(Self {
            norm1: AdaLayerNorm::new(vb.pp("norm1"), dim, if dual { 9 } else { 6 })?,
            norm1_context: AdaLayerNorm::new(
                vb.pp("norm1_context"),
                dim,
                if context_pre_only { 2 } else { 6 },
            )?,
            attn: Attention::new(vb.pp("attn"), cfg, Some(context_pre_only))?,
            attn2: match dual {
                true => Some(Attention::new(vb.pp("attn2"), cfg, None)?),
                false => None,
            },
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            ff_context: match context_pre_only {
                true => None,
                false => Some(FeedForward::new(vb.pp("ff_context"), dim)?),
            },
        })
    }

    /// Returns the new image tokens and, unless `context_pre_only`, the new text tokens.
    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        temb: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let m = self.norm1.params(temb)?;
        let (shift_msa, scale_msa, gate_msa) = (&m[0], &m[1], &m[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (&m[3], &m[4], &m[5]);
        let normed = plain_layer_norm(x)?;
        let norm_x = modulate(&normed, shift_msa, scale_msa)?;

        let (norm_context, c) = match &self.ff_context {
            None => (self.norm1_context.continuous(context, temb)?, Vec::new()),
            Some(_) => {
                let c = self.norm1_context.params(temb)?;
                (modulate(&plain_layer_norm(context)?, &c[0], &c[1])?, c)
            }
        };
        let (attn_out, context_attn_out) = self.attn.forward(&norm_x, Some(&norm_context))?;
        let mut x = (x + attn_out.broadcast_mul(gate_msa)?)?;
        if let Some(attn2) = &self.attn2 {
            // SD35AdaLayerNormZeroX: attn2 sees the same normed input, modulated apart.
            let norm_x2 = modulate(&normed, &m[6], &m[7])?;
            x = (&x + attn2.forward(&norm_x2, None)?.0.broadcast_mul(&m[8])?)?;
        }
        let ff_in = modulate(&plain_layer_norm(&x)?, shift_mlp, scale_mlp)?;
        let x = (&x + self.ff.forward(&ff_in)?.broadcast_mul(gate_mlp)?)?;

        let Some(ff_context) = &self.ff_context else {
            return Ok((x, None));
        };
        let context_attn_out = context_attn_out.ok_or_else(|| {
            candle_core::Error::Msg("sd3: joint attention returned no text output".into())
        })?;
        let context = (context + context_attn_out.broadcast_mul(&c[2])?)?;
        let ff_in = modulate(&plain_layer_norm(&context)?, &c[3], &c[4])?;
        let context = (&context + ff_context.forward(&ff_in)?.broadcast_mul(&c[5])?)?;
        Ok((x, Some(context)))
    }
}

#[derive(Debug, Clone)]
pub struct SD3Transformer2DModel {
    config: Config,
    pos_embed: PatchEmbed,
    time_text_embed: TimeTextEmbed,
    context_embedder: Linear,
    transformer_blocks: Vec<JointTransformerBlock>,
    norm_out: AdaLayerNorm,
    proj_out: Linear,
}

impl SD3Transformer2DModel {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let dim = cfg.inner_dim();
        let max_size = cfg.pos_embed_max_size.unwrap_or_default();
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| JointTransformerBlock::new(vb.pp(format!("transformer_blocks.{i}")), cfg, i))
            .collect::<Result<_>>()?;
        let patch_out = cfg.patch_size * cfg.patch_size * cfg.out_channels();
        Ok(Self {
            config: cfg.clone(),
            pos_embed: PatchEmbed::new(vb.pp("pos_embed"), cfg, max_size)?,
            time_text_embed: TimeTextEmbed::new(vb.pp("time_text_embed"), cfg)?,
            context_embedder: linear(
                cfg.joint_attention_dim,
                cfg.caption_projection_dim,
                vb.pp("context_embedder"),
            )?,
            transformer_blocks,
            norm_out: AdaLayerNorm::new(vb.pp("norm_out"), dim, 2)?,
            proj_out: linear(dim, patch_out, vb.pp("proj_out"))?,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The velocity prediction (B, out_channels, H, W) for `hidden_states` (B, in_channels,
    /// H, W) at `timestep` (B,) (or one value for the whole batch) in diffusers' units
    /// (1000 x sigma), with text tokens `encoder_hidden_states` (B, L, joint_attention_dim)
    /// and `pooled_projections` (B, pooled_projection_dim).
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_projections: &Tensor,
    ) -> Result<Tensor> {
        let (sample, _) = self.forward_with_features(
            hidden_states,
            timestep,
            encoder_hidden_states,
            pooled_projections,
            &[],
        )?;
        Ok(sample)
    }
    /// The prediction and the feature maps at `taps` (see [`Config::feature_taps`]), in the
    /// order requested.
    pub fn forward_with_features(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_projections: &Tensor,
        taps: &[String],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let inputs = self.inputs(
            hidden_states,
            timestep,
            encoder_hidden_states,
            pooled_projections,
        )?;
        let (sample, features) = self.trunk(&inputs, &self.tap_indices(taps)?, true)?;
        let sample = sample
            .ok_or_else(|| candle_core::Error::Msg("sd3: the forward stopped early".into()))?;
        Ok((sample, features))
    }

    /// The feature maps at `taps`, in the order requested; the forward stops after the last
    /// block it needs.
    pub fn features(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_projections: &Tensor,
        taps: &[String],
    ) -> Result<Vec<Tensor>> {
        let inputs = self.inputs(
            hidden_states,
            timestep,
            encoder_hidden_states,
            pooled_projections,
        )?;
        Ok(self.trunk(&inputs, &self.tap_indices(taps)?, false)?.1)
    }

    fn tap_indices(&self, taps: &[String]) -> Result<Vec<usize>> {
        taps.iter()
            .map(|tap| {
                tap.strip_prefix("transformer_blocks.")
                    .and_then(|i| i.parse::<usize>().ok())
                    .filter(|&i| i < self.config.num_layers && tap == &format!("transformer_blocks.{i}"))
                    .ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "sd3 has no feature tap `{tap}` (taps: transformer_blocks.0 .. transformer_blocks.{})",
                            self.config.num_layers - 1
                        ))
                    })
            })
            .collect()
    }

    /// Checks the inputs and brings them to the model's dtype (the timestep stays as it is:
    /// its embedding is computed in f32).
    fn inputs(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_projections: &Tensor,
    ) -> Result<Inputs> {
        let cfg = &self.config;
        let dtype = self.proj_out.weight().dtype();
        let (p, max) = (cfg.patch_size, self.pos_embed.max_size);
        let bail = |msg: String| Err(candle_core::Error::Msg(format!("sd3: {msg}")));
        let dims = hidden_states.dims();
        let fits = |side: usize| side > 0 && side.is_multiple_of(p) && side / p <= max;
        let (b, h, w) = match *dims {
            [b, c, h, w] if c == cfg.in_channels && fits(h) && fits(w) => (b, h, w),
            _ => {
                return bail(format!(
                    "hidden_states has shape {dims:?}; expected (B, {}, H, W) with H and W positive multiples of patch_size {p} and at most {} (pos_embed_max_size {max} patches)",
                    cfg.in_channels,
                    max * p
                ))
            }
        };
        let context = encoder_hidden_states;
        if !matches!(context.dims(), [cb, l, d] if *cb == b && *l > 0 && *d == cfg.joint_attention_dim)
        {
            return bail(format!(
                "encoder_hidden_states has shape {:?}, expected ({b}, L > 0, {})",
                context.dims(),
                cfg.joint_attention_dim
            ));
        }
        if pooled_projections.dims() != [b, cfg.pooled_projection_dim] {
            return bail(format!(
                "pooled_projections has shape {:?}, expected ({b}, {})",
                pooled_projections.dims(),
                cfg.pooled_projection_dim
            ));
        }
        let timestep = match timestep.dims() {
            [] | [1] => timestep.reshape(1)?.broadcast_as(b)?.contiguous()?,
            [n] if *n == b => timestep.clone(),
            other => {
                return bail(format!(
                    "timestep must have shape ({b},) or be a single value, got {other:?}"
                ))
            }
        };
        // Contiguous: candle's Linear is wrong on non-contiguous 3-D input.
        Ok(Inputs {
            hidden_states: hidden_states.to_dtype(dtype)?.contiguous()?,
            timestep,
            context: context.to_dtype(dtype)?.contiguous()?,
            pooled: pooled_projections.to_dtype(dtype)?.contiguous()?,
            grid: (h / p, w / p),
        })
    }

    /// The network; collects the image-token maps after the blocks in `taps` (in that order)
    /// and, with `to_the_end`, the prediction (otherwise it stops after the last tap).
    fn trunk(
        &self,
        inputs: &Inputs,
        taps: &[usize],
        to_the_end: bool,
    ) -> Result<(Option<Tensor>, Vec<Tensor>)> {
        let (gh, gw) = inputs.grid;
        let last_needed = match (to_the_end, taps.iter().max()) {
            (false, Some(&last)) => last,
            (false, None) => return Ok((None, Vec::new())),
            (true, _) => usize::MAX,
        };
        let mut x = self.pos_embed.forward(&inputs.hidden_states)?;
        let temb = self
            .time_text_embed
            .forward(&inputs.timestep, &inputs.pooled)?;
        let mut context = self.context_embedder.forward(&inputs.context)?;
        let mut found: Vec<Option<Tensor>> = vec![None; self.transformer_blocks.len()];
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            let (new_x, new_context) = block.forward(&x, &context, &temb)?;
            x = new_x;
            if let Some(c) = new_context {
                context = c;
            }
            if taps.contains(&i) {
                found[i] = Some(tokens_to_map(&x, gh, gw)?);
            }
            if i == last_needed {
                break;
            }
        }
        let features = taps
            .iter()
            .map(|&i| {
                found[i]
                    .clone()
                    .ok_or_else(|| candle_core::Error::Msg(format!("sd3: tap {i} not reached")))
            })
            .collect::<Result<Vec<_>>>()?;
        if !to_the_end {
            return Ok((None, features));
        }
        let x = self
            .proj_out
            .forward(&self.norm_out.continuous(&x, &temb)?)?;
        Ok((Some(self.unpatchify(&x, gh, gw)?), features))
    }

    /// (B, gh * gw, p * p * C) -> (B, C, gh * p, gw * p), diffusers' `nhwpqc -> nchpwq`.
    fn unpatchify(&self, x: &Tensor, gh: usize, gw: usize) -> Result<Tensor> {
        let b = x.dim(0)?;
        let p = self.config.patch_size;
        let c = self.config.out_channels();
        x.reshape((b, gh, gw, p, p, c))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((b, c, gh * p, gw * p))
    }
}

/// Validated model inputs.
struct Inputs {
    hidden_states: Tensor,
    timestep: Tensor,
    context: Tensor,
    pooled: Tensor,
    /// The patch grid (H / p, W / p).
    grid: (usize, usize),
}

/// Image tokens (B, gh * gw, C) -> map (B, C, gh, gw).
fn tokens_to_map(x: &Tensor, gh: usize, gw: usize) -> Result<Tensor> {
    let (b, _, c) = x.dims3()?;
    x.reshape((b, gh, gw, c))?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

/// Every tensor a checkpoint for `cfg` holds (diffusers names) and its shape, in construction
/// order, without allocating the model.
pub fn expected_tensors(cfg: &Config) -> Result<Vec<(String, Shape)>> {
    crate::loading::expected_tensors(|vb| SD3Transformer2DModel::new(vb, cfg))
}

/// Condition tensor names the SD3 backbone reads (diffusers' forward-argument names).
pub const ENCODER_HIDDEN_STATES: &str = "encoder_hidden_states";
pub const POOLED_PROJECTIONS: &str = "pooled_projections";
/// The negative-prompt counterparts [`MMDiTBackbone::unconditional`] swaps in.
pub const NEGATIVE_ENCODER_HIDDEN_STATES: &str = "negative_encoder_hidden_states";
pub const NEGATIVE_POOLED_PROJECTIONS: &str = "negative_pooled_projections";

/// The SD3 transformer as a [`Backbone`] on a rectified-flow schedule (SD3 / SD3.5:
/// [`ScheduleConfig::sd3`], shift 3.0).
///
/// Time units: our flow schedule's `t` lies in `[0, T]` with `sigma = t / T`, and diffusers'
/// `FlowMatchEulerDiscreteScheduler` hands the transformer `timestep = sigma * T`
/// (`timesteps = sigmas * num_train_timesteps`), so with SD3's `T = 1000` the backbone passes
/// `t` unchanged: `t = 1000 sigma` is exactly the transformer's `timestep`. The prediction is
/// the flow velocity `eps - x0`.
///
/// Conditions carry `encoder_hidden_states` (B, L, joint_attention_dim) and
/// `pooled_projections` (B, pooled_projection_dim). The unconditional condition of
/// classifier-free guidance is the encoded negative (usually empty) prompt, which only the
/// data pipeline can produce: it travels in the condition as `negative_encoder_hidden_states`
/// and `negative_pooled_projections`.
#[derive(Debug, Clone)]
pub struct MMDiTBackbone {
    pub model: SD3Transformer2DModel,
    schedule: Schedule,
}

impl MMDiTBackbone {
    /// Fails unless `schedule` is a rectified-flow schedule with 1000 training timesteps
    /// (the transformer was trained on `timestep = 1000 sigma`).
    pub fn new(model: SD3Transformer2DModel, schedule: Schedule) -> Result<Self> {
        match schedule.config() {
            ScheduleConfig::Flow {
                num_train_timesteps: 1000,
                ..
            } => Ok(Self { model, schedule }),
            other => candle_core::bail!(
                "sd3 backbone: needs a flow schedule with num_train_timesteps = 1000 (timestep = 1000 sigma), got {other:?}"
            ),
        }
    }

    fn inputs<'a>(&self, cond: &'a Condition) -> Result<(&'a Tensor, &'a Tensor)> {
        Ok((
            cond.get(ENCODER_HIDDEN_STATES)?,
            cond.get(POOLED_PROJECTIONS)?,
        ))
    }
}

impl Backbone for MMDiTBackbone {
    fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    fn forward(&self, x_t: &Tensor, t: &Tensor, cond: &Condition) -> Result<Tensor> {
        let (context, pooled) = self.inputs(cond)?;
        self.model.forward(x_t, t, context, pooled)
    }

    fn features(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        cond: &Condition,
        taps: &[String],
    ) -> Result<Vec<Tensor>> {
        let (context, pooled) = self.inputs(cond)?;
        self.model.features(x_t, t, context, pooled, taps)
    }

    fn feature_taps(&self) -> Vec<FeatureTap> {
        self.model.config.feature_taps()
    }

    fn unconditional(&self, cond: &Condition) -> Result<Condition> {
        cond.with_negatives("sd3", &[ENCODER_HIDDEN_STATES, POOLED_PROJECTIONS])
    }
}
