//! diffusers' `UNet2DConditionModel` (SD 1.5 / 2.1 / SDXL) with gradients that reach every
//! parameter, per-sample timesteps, SDXL's `text_time` added conditioning and feature taps.
//!
//! Tensor names follow diffusers exactly, so a diffusers `unet/` folder (config.json +
//! safetensors) loads as it is. Only ops whose backward is verified are used
//! (CANDLE_PITFALLS.md): attention is `adm_nn::scaled_dot_product_attention`, layer norm is
//! `adm_nn::LayerNorm`, nearest upsampling is `adm_nn::upsample_nearest2d`, conv2d is
//! `adm_nn::Conv2d` (candle's conv2d backward is slow and fails on unequal H/W parity),
//! GroupNorm and Linear are `adm_nn::GroupNorm` / `adm_nn::Linear` (fused CPU kernels for
//! the normalisation and the bias).
//!
//! Spatial sizes must be multiples of `2^(number of downsamplers)`: diffusers then never needs
//! an explicit `upsample_size`.
//!
//! Dropout is not applied (every released SD / SDXL config has `dropout = 0`).

use std::collections::BTreeSet;

use adm_diffusion::Schedule;
use adm_nn::{group_norm, linear, linear_no_bias, Conv2d, GroupNorm, Linear};
use candle_core::{DType, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::backbone::{Backbone, Condition, FeatureTap};
use crate::blocks::{conv, ResnetBlock2D};

/// A config value that is either one value for every block or one value per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    fn per_block(&self, blocks: usize, field: &str) -> Result<Vec<T>> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); blocks]),
            Self::Many(vs) if vs.len() == blocks => Ok(vs.clone()),
            Self::Many(vs) => candle_core::bail!(
                "unet config: `{field}` has {} entries, but there are {blocks} down blocks",
                vs.len()
            ),
        }
    }
}

/// `transformer_layers_per_block`: one count for all blocks, or per block either a count or a
/// count per layer (diffusers accepts all three).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TransformerLayers {
    Uniform(usize),
    PerBlock(Vec<OneOrMany<usize>>),
}

/// diffusers' `UNet2DConditionModel` config.json. Unknown keys are ignored (the file has
/// many that do not change the weights); options this implementation does not support are
/// rejected by [`Config::validate`] rather than silently ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default = "default_4")]
    pub in_channels: usize,
    #[serde(default = "default_4")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid_block_type")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_false_per_block")]
    pub only_cross_attention: OneOrMany<bool>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: OneOrMany<usize>,
    #[serde(default = "default_1")]
    pub downsample_padding: usize,
    #[serde(default = "default_1f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: OneOrMany<usize>,
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: TransformerLayers,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<OneOrMany<usize>>>,
    /// The number of attention HEADS per block (a long-standing diffusers naming quirk),
    /// unless `num_attention_heads` is given.
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: OneOrMany<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Only changes the precision of the attention scores in half precision; ignored.
    #[serde(default)]
    pub upcast_attention: Option<bool>,
    #[serde(default = "default_resnet_time_scale_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    /// Only used by block types not supported here (the ones here always use 1).
    #[serde(default = "default_1f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "default_time_embedding_type")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "default_3")]
    pub conv_in_kernel: usize,
    #[serde(default = "default_3")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default = "default_attention_type")]
    pub attention_type: String,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
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
fn default_1f() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}
fn default_mid_block_type() -> Option<String> {
    Some(MID_CROSS_ATTN.to_string())
}
fn default_false_per_block() -> OneOrMany<bool> {
    OneOrMany::One(false)
}
fn default_layers_per_block() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_cross_attention_dim() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn default_transformer_layers() -> TransformerLayers {
    TransformerLayers::Uniform(1)
}
fn default_attention_head_dim() -> OneOrMany<usize> {
    OneOrMany::One(8)
}
fn default_resnet_time_scale_shift() -> String {
    "default".into()
}
fn default_time_embedding_type() -> String {
    "positional".into()
}
fn default_attention_type() -> String {
    "default".into()
}

const DOWN_PLAIN: &str = "DownBlock2D";
const DOWN_CROSS_ATTN: &str = "CrossAttnDownBlock2D";
const UP_PLAIN: &str = "UpBlock2D";
const UP_CROSS_ATTN: &str = "CrossAttnUpBlock2D";
const MID_CROSS_ATTN: &str = "UNetMidBlock2DCrossAttn";
const TEXT_TIME: &str = "text_time";

/// Per-block values resolved from a [`Config`] (diffusers' `__init__` bookkeeping).
#[derive(Debug, Clone)]
struct Resolved {
    layers_per_block: Vec<usize>,
    heads: Vec<usize>,
    cross_attention_dim: Vec<usize>,
    /// Transformer depth per down block and resnet layer.
    down_transformer_layers: Vec<Vec<usize>>,
    /// Per up block, as given (one count per block or per layer).
    up_transformer_layers: Vec<OneOrMany<usize>>,
    time_embed_dim: usize,
}

impl Config {
    /// SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0/unet/config.json).
    pub fn sdxl() -> Self {
        let mut cfg = Self::sd15();
        cfg.down_block_types = vec![
            DOWN_PLAIN.into(),
            DOWN_CROSS_ATTN.into(),
            DOWN_CROSS_ATTN.into(),
        ];
        cfg.up_block_types = vec![UP_CROSS_ATTN.into(), UP_CROSS_ATTN.into(), UP_PLAIN.into()];
        cfg.block_out_channels = vec![320, 640, 1280];
        cfg.attention_head_dim = OneOrMany::Many(vec![5, 10, 20]);
        cfg.cross_attention_dim = OneOrMany::One(2048);
        cfg.transformer_layers_per_block = TransformerLayers::PerBlock(vec![
            OneOrMany::One(1),
            OneOrMany::One(2),
            OneOrMany::One(10),
        ]);
        cfg.use_linear_projection = true;
        cfg.addition_embed_type = Some(TEXT_TIME.into());
        cfg.addition_time_embed_dim = Some(256);
        cfg.projection_class_embeddings_input_dim = Some(2816);
        cfg
    }

    /// Stable Diffusion 1.5's UNet.
    pub fn sd15() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                DOWN_CROSS_ATTN.into(),
                DOWN_CROSS_ATTN.into(),
                DOWN_CROSS_ATTN.into(),
                DOWN_PLAIN.into(),
            ],
            mid_block_type: default_mid_block_type(),
            up_block_types: vec![
                UP_PLAIN.into(),
                UP_CROSS_ATTN.into(),
                UP_CROSS_ATTN.into(),
                UP_CROSS_ATTN.into(),
            ],
            only_cross_attention: default_false_per_block(),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: default_layers_per_block(),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: default_act_fn(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: OneOrMany::One(768),
            transformer_layers_per_block: default_transformer_layers(),
            reverse_transformer_layers_per_block: None,
            attention_head_dim: OneOrMany::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: Some(false),
            resnet_time_scale_shift: default_resnet_time_scale_shift(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: default_time_embedding_type(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_type: default_attention_type(),
            cross_attention_norm: None,
        }
    }

    /// Stable Diffusion 2.1's UNet (768-v; the base model differs only in sample size).
    pub fn sd21() -> Self {
        let mut cfg = Self::sd15();
        cfg.attention_head_dim = OneOrMany::Many(vec![5, 10, 20, 20]);
        cfg.cross_attention_dim = OneOrMany::One(1024);
        cfg.use_linear_projection = true;
        cfg.upcast_attention = Some(true);
        cfg
    }

    /// Whether the model reads `text_embeds` and `time_ids` (SDXL).
    pub fn uses_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some(TEXT_TIME)
    }

    /// Rejects options this implementation does not support, and inconsistent sizes.
    pub fn validate(&self) -> Result<()> {
        self.resolve().map(|_| ())
    }

    fn resolve(&self) -> Result<Resolved> {
        let bail = |msg: String| -> Result<Resolved> {
            Err(candle_core::Error::Msg(format!("unet config: {msg}")))
        };
        let n = self.down_block_types.len();
        if n == 0 || self.block_out_channels.len() != n || self.up_block_types.len() != n {
            return bail(format!(
                "down_block_types ({}), up_block_types ({}) and block_out_channels ({}) must have the same non-zero length",
                n,
                self.up_block_types.len(),
                self.block_out_channels.len()
            ));
        }
        for t in &self.down_block_types {
            if t != DOWN_PLAIN && t != DOWN_CROSS_ATTN {
                return bail(format!(
                    "down block type `{t}` is not supported ({DOWN_PLAIN}, {DOWN_CROSS_ATTN})"
                ));
            }
        }
        for t in &self.up_block_types {
            if t != UP_PLAIN && t != UP_CROSS_ATTN {
                return bail(format!(
                    "up block type `{t}` is not supported ({UP_PLAIN}, {UP_CROSS_ATTN})"
                ));
            }
        }
        if let Some(t) = &self.mid_block_type {
            if t != MID_CROSS_ATTN {
                return bail(format!(
                    "mid block type `{t}` is not supported ({MID_CROSS_ATTN} or null)"
                ));
            }
        }
        let unsupported: [(&str, bool); 15] = [
            ("act_fn other than silu", self.act_fn != "silu"),
            (
                "resnet_time_scale_shift other than default",
                self.resnet_time_scale_shift != "default",
            ),
            (
                "time_embedding_type other than positional",
                self.time_embedding_type != "positional",
            ),
            ("class_embed_type", self.class_embed_type.is_some()),
            ("num_class_embeds", self.num_class_embeds.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            (
                "time_embedding_act_fn",
                self.time_embedding_act_fn.is_some(),
            ),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            ("dual_cross_attention", self.dual_cross_attention),
            (
                "attention_type other than default",
                self.attention_type != "default",
            ),
            ("cross_attention_norm", self.cross_attention_norm.is_some()),
            ("resnet_skip_time_act", self.resnet_skip_time_act),
            (
                "only_cross_attention",
                self.only_cross_attention
                    .per_block(n, "only_cross_attention")?
                    .contains(&true),
            ),
            (
                "addition_embed_type other than text_time",
                self.addition_embed_type
                    .as_deref()
                    .is_some_and(|t| t != TEXT_TIME),
            ),
        ];
        if let Some((what, _)) = unsupported.iter().find(|(_, bad)| *bad) {
            return bail(format!("{what} is not supported"));
        }
        if self.uses_text_time()
            && (self.addition_time_embed_dim.is_none()
                || self.projection_class_embeddings_input_dim.is_none())
        {
            return bail(
                "addition_embed_type = text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim"
                    .into(),
            );
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return bail("conv_in_kernel and conv_out_kernel must be odd".into());
        }
        let groups = self.norm_num_groups;
        if groups == 0
            || self
                .block_out_channels
                .iter()
                .any(|&c| c == 0 || c % groups != 0)
        {
            return bail(format!(
                "norm_num_groups ({groups}) must divide every block_out_channels entry ({:?})",
                self.block_out_channels
            ));
        }
        let layers_per_block = self.layers_per_block.per_block(n, "layers_per_block")?;
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .per_block(n, "attention_head_dim")?;
        let cross_attention_dim = self
            .cross_attention_dim
            .per_block(n, "cross_attention_dim")?;
        let per_block = match &self.transformer_layers_per_block {
            TransformerLayers::Uniform(k) => vec![OneOrMany::One(*k); n],
            TransformerLayers::PerBlock(v) if v.len() == n => v.clone(),
            TransformerLayers::PerBlock(v) => {
                return bail(format!(
                    "transformer_layers_per_block has {} entries, expected {n}",
                    v.len()
                ))
            }
        };
        let mut down_transformer_layers = Vec::with_capacity(n);
        for (i, spec) in per_block.iter().enumerate() {
            down_transformer_layers.push(match spec {
                OneOrMany::One(k) => vec![*k; layers_per_block[i]],
                OneOrMany::Many(v) if v.len() == layers_per_block[i] => v.clone(),
                OneOrMany::Many(v) => {
                    return bail(format!(
                    "transformer_layers_per_block[{i}] has {} entries, but the block has {} layers",
                    v.len(),
                    layers_per_block[i]
                ))
                }
            });
        }
        let up_transformer_layers = match &self.reverse_transformer_layers_per_block {
            Some(v) if v.len() == n => v.clone(),
            Some(v) => {
                return bail(format!(
                    "reverse_transformer_layers_per_block has {} entries, expected {n}",
                    v.len()
                ))
            }
            None if per_block.iter().any(|s| matches!(s, OneOrMany::Many(_))) => return bail(
                "per-layer transformer_layers_per_block needs reverse_transformer_layers_per_block"
                    .into(),
            ),
            None => per_block.iter().rev().cloned().collect(),
        };
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            let has_attn = self.down_block_types[i] == DOWN_CROSS_ATTN
                || self.up_block_types[n - 1 - i] == UP_CROSS_ATTN
                || (i == n - 1 && self.mid_block_type.is_some());
            if has_attn && (h == 0 || c % h != 0) {
                return bail(format!(
                    "block {i}: {h} attention heads do not divide {c} channels"
                ));
            }
        }
        Ok(Resolved {
            layers_per_block,
            heads,
            cross_attention_dim,
            down_transformer_layers,
            up_transformer_layers,
            time_embed_dim: self
                .time_embedding_dim
                .unwrap_or(self.block_out_channels[0] * 4),
        })
    }

    /// The feature taps in forward order: `down_blocks.{i}`, `mid_block`, `up_blocks.{i}`.
    pub fn feature_taps(&self) -> Vec<FeatureTap> {
        let n = self.block_out_channels.len();
        let mut taps: Vec<FeatureTap> = (0..n)
            .map(|i| FeatureTap {
                name: format!("down_blocks.{i}"),
                channels: self.block_out_channels[i],
            })
            .collect();
        if self.mid_block_type.is_some() {
            taps.push(FeatureTap {
                name: "mid_block".into(),
                channels: self.block_out_channels[n - 1],
            });
        }
        taps.extend((0..n).map(|i| FeatureTap {
            name: format!("up_blocks.{i}"),
            channels: self.block_out_channels[n - 1 - i],
        }));
        taps
    }

    /// H and W of the sample must be multiples of this (2^number of downsamplers).
    pub fn spatial_multiple(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// diffusers' `get_timestep_embedding` for per-sample `t` (N,): (N, dim) in f32, computed in
/// f32 as diffusers does (it casts the timesteps with `.float()`).
pub(crate) fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let n = t.elem_count();
    let half = dim / 2;
    let denom = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-(10000f64.ln() as f32) * i as f32) / denom).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .reshape((n, 1))?
        .broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let mut emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb = emb.pad_with_zeros(1, 0, 1)?;
    }
    Ok(emb)
}

/// `TimestepEmbedding`: linear_1, SiLU, linear_2.
#[derive(Debug, Clone)]
pub(crate) struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub(crate) fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: linear(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&adm_nn::silu(&self.linear_1.forward(xs)?)?)
    }
}

/// diffusers' `Attention` as used by `BasicTransformerBlock`: no q/k/v bias, biased output.
#[derive(Debug, Clone)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    context_dim: usize,
}

impl Attention {
    fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let context_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            context_dim,
        })
    }

    /// `xs` (B, Lq, C); `context` (B, Lk, context_dim) or None for self-attention.
    fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let b = xs.dim(0)?;
        let (bc, _, dc) = context.dims3()?;
        if bc != b || dc != self.context_dim {
            candle_core::bail!(
                "attention: context has shape {:?}, expected ({b}, L, {})",
                context.dims(),
                self.context_dim
            )
        }
        let out = adm_nn::multi_head_attention(
            &self.to_q.forward(xs)?,
            &self.to_k.forward(context)?,
            &self.to_v.forward(context)?,
            self.heads,
            None,
        )?;
        self.to_out.forward(&out)
    }
}

/// `FeedForward` with GEGLU: `net.0.proj` to 2 x inner, value * gelu(gate), `net.2` back.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: linear(dim, 2 * inner, vb.pp("net.0.proj"))?,
            out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // diffusers' GEGLU: value * F.gelu(gate), the exact (erf) GELU.
        self.out.forward(&adm_nn::geglu(&self.proj.forward(xs)?)?)
    }
}

/// `BasicTransformerBlock` (norm_type = layer_norm): self-attention, cross-attention, GEGLU
/// feed-forward, each pre-normed and residual.
#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: adm_nn::LayerNorm,
    attn1: Attention,
    norm2: adm_nn::LayerNorm,
    attn2: Attention,
    norm3: adm_nn::LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        context_dim: usize,
    ) -> Result<Self> {
        let ln = |name: &str| adm_nn::layer_norm(dim, 1e-5, true, vb.pp(name));
        Ok(Self {
            norm1: ln("norm1")?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, head_dim)?,
            norm2: ln("norm2")?,
            attn2: Attention::new(vb.pp("attn2"), dim, Some(context_dim), heads, head_dim)?,
            norm3: ln("norm3")?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

/// A 1x1 conv (SD 1.5) or a linear layer over tokens (`use_linear_projection`, SD 2.x/SDXL).
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(vb: VarBuilder, cin: usize, cout: usize, use_linear: bool) -> Result<Self> {
        Ok(if use_linear {
            Self::Linear(linear(cin, cout, vb)?)
        } else {
            Self::Conv(conv(vb, cin, cout, 1, 1, 0)?)
        })
    }
}

/// `Transformer2DModel` on continuous (B, C, H, W) input: GroupNorm, proj_in, transformer
/// blocks over the H*W tokens, proj_out, residual.
#[derive(Debug, Clone)]
struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    fn new(
        vb: VarBuilder,
        cfg: &Config,
        channels: usize,
        heads: usize,
        depth: usize,
        context_dim: usize,
    ) -> Result<Self> {
        let head_dim = channels / heads;
        let inner = heads * head_dim;
        let transformer_blocks = (0..depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    inner,
                    heads,
                    head_dim,
                    context_dim,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: group_norm(cfg.norm_num_groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: Projection::new(vb.pp("proj_in"), channels, inner, cfg.use_linear_projection)?,
            transformer_blocks,
            proj_out: Projection::new(
                vb.pp("proj_out"),
                inner,
                channels,
                cfg.use_linear_projection,
            )?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let tokens = |t: &Tensor| {
            let ch = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))
        };
        let mut hs = match &self.proj_in {
            Projection::Linear(l) => l.forward(&tokens(&normed)?)?,
            Projection::Conv(cv) => tokens(&cv.forward(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            hs = block.forward(&hs, context)?;
        }
        let to_map = |t: &Tensor| {
            let ch = t.dim(2)?;
            t.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        let out = match &self.proj_out {
            Projection::Linear(l) => to_map(&l.forward(&hs)?)?,
            Projection::Conv(cv) => cv.forward(&to_map(&hs)?)?,
        };
        out + xs
    }
}

/// `Downsample2D` with a conv: stride 2, padding `downsample_padding` (0 pads right/bottom by
/// one first, as diffusers does).
#[derive(Debug, Clone)]
struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: conv(vb.pp("conv"), channels, channels, 3, 2, padding)?,
            pad_right_bottom: padding == 0,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let xs = xs.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// `Upsample2D` with a conv: nearest x2 (adm_nn's, whose gradient accumulates), 3x3 conv.
#[derive(Debug, Clone)]
struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv(vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }
}

impl Module for Upsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv.forward(&adm_nn::upsample_nearest2d(xs, 2, 2)?)
    }
}

/// `DownBlock2D` (no attentions) or `CrossAttnDownBlock2D`.
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// Returns the block output and the skip tensors it contributes (one per resnet, plus
    /// the downsampled output).
    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `UpBlock2D` (no attentions) or `CrossAttnUpBlock2D`.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// Consumes one skip tensor per resnet from the end of `skips`.
    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                candle_core::Error::Msg("unet: ran out of skip connections".into())
            })?;
            h = resnet.forward(&Tensor::cat(&[&h, &skip], 1)?, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&h),
            None => Ok(h),
        }
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) per layer (one layer).
#[derive(Debug, Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(xs, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = resnet.forward(&attn.forward(&h, context)?, Some(temb))?;
        }
        Ok(h)
    }
}

/// SDXL's added conditioning: pooled text embeddings (B, P) and micro-conditioning time ids
/// (B, K) (original size, crop top-left, target size: K = 6).
#[derive(Debug, Clone, Copy)]
pub struct TextTime<'a> {
    pub text_embeds: &'a Tensor,
    pub time_ids: &'a Tensor,
}

#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: Config,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let r = cfg.resolve()?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb = r.time_embed_dim;
        let norm = (cfg.norm_num_groups, cfg.norm_eps);
        let conv_in = conv(
            vb.pp("conv_in"),
            cfg.in_channels,
            ch[0],
            cfg.conv_in_kernel,
            1,
            cfg.conv_in_kernel / 2,
        )?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], temb)?;
        let add_embedding = match (
            cfg.uses_text_time(),
            cfg.projection_class_embeddings_input_dim,
        ) {
            (true, Some(dim)) => Some(TimestepEmbedding::new(vb.pp("add_embedding"), dim, temb)?),
            _ => None,
        };

        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let cout = ch[i];
            let resnets = (0..r.layers_per_block[i])
                .map(|j| {
                    let c = if j == 0 { cin } else { cout };
                    ResnetBlock2D::new(
                        vb.pp(format!("resnets.{j}")),
                        norm,
                        c,
                        cout,
                        Some(temb),
                        1.0,
                    )
                })
                .collect::<Result<_>>()?;
            let attentions = if cfg.down_block_types[i] == DOWN_CROSS_ATTN {
                (0..r.layers_per_block[i])
                    .map(|j| {
                        Transformer2DModel::new(
                            vb.pp(format!("attentions.{j}")),
                            cfg,
                            cout,
                            r.heads[i],
                            r.down_transformer_layers[i][j],
                            r.cross_attention_dim[i],
                        )
                    })
                    .collect::<Result<_>>()?
            } else {
                Vec::new()
            };
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(
                    vb.pp("downsamplers.0"),
                    cout,
                    cfg.downsample_padding,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let mid_block = match &cfg.mid_block_type {
            Some(_) => {
                let vb = vb.pp("mid_block");
                let c = ch[n - 1];
                // diffusers hands the mid block the last down block's spec and reads its
                // first entry.
                let depth = *r.down_transformer_layers[n - 1].first().unwrap_or(&1);
                let resnets = (0..2)
                    .map(|j| {
                        ResnetBlock2D::new(
                            vb.pp(format!("resnets.{j}")),
                            norm,
                            c,
                            c,
                            Some(temb),
                            cfg.mid_block_scale_factor,
                        )
                    })
                    .collect::<Result<_>>()?;
                let attention = Transformer2DModel::new(
                    vb.pp("attentions.0"),
                    cfg,
                    c,
                    r.heads[n - 1],
                    depth,
                    r.cross_attention_dim[n - 1],
                )?;
                Some(MidBlock {
                    resnets,
                    attentions: vec![attention],
                })
            }
            None => None,
        };

        let mut up_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let rev = n - 1 - i;
            let prev_out = ch[(rev + 1).min(n - 1)];
            let cout = ch[rev];
            let cin = ch[rev.saturating_sub(1)];
            let layers = r.layers_per_block[rev] + 1;
            let depths = match &r.up_transformer_layers[i] {
                OneOrMany::One(k) => vec![*k; layers],
                OneOrMany::Many(v) if v.len() == layers => v.clone(),
                OneOrMany::Many(v) => candle_core::bail!(
                    "unet config: reverse_transformer_layers_per_block[{i}] has {} entries, up block {i} has {layers} layers",
                    v.len()
                ),
            };
            let resnets = (0..layers)
                .map(|j| {
                    let skip = if j + 1 == layers { cin } else { cout };
                    let c = if j == 0 { prev_out } else { cout };
                    ResnetBlock2D::new(
                        vb.pp(format!("resnets.{j}")),
                        norm,
                        c + skip,
                        cout,
                        Some(temb),
                        1.0,
                    )
                })
                .collect::<Result<_>>()?;
            let attentions = if cfg.up_block_types[i] == UP_CROSS_ATTN {
                (0..layers)
                    .map(|j| {
                        Transformer2DModel::new(
                            vb.pp(format!("attentions.{j}")),
                            cfg,
                            cout,
                            r.heads[rev],
                            depths[j],
                            r.cross_attention_dim[rev],
                        )
                    })
                    .collect::<Result<_>>()?
            } else {
                Vec::new()
            };
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(vb.pp("upsamplers.0"), cout)?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        Ok(Self {
            config: cfg.clone(),
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(
                cfg.norm_num_groups,
                ch[0],
                cfg.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv(
                vb.pp("conv_out"),
                ch[0],
                cfg.out_channels,
                cfg.conv_out_kernel,
                1,
                cfg.conv_out_kernel / 2,
            )?,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The noise (or v) prediction for `sample` (B, in_channels, H, W) at per-sample
    /// `timesteps` (B,) (a single value is broadcast), `encoder_hidden_states` (B, L, D) and,
    /// for SDXL, the added text/time conditioning.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<TextTime>,
    ) -> Result<Tensor> {
        let out = self.trunk(
            sample,
            timesteps,
            encoder_hidden_states,
            added,
            usize::MAX,
            |_, _| {},
        )?;
        out.ok_or_else(|| candle_core::Error::Msg("unet: the forward stopped early".into()))
    }

    /// The prediction and the feature maps at `taps` (see [`Config::feature_taps`]), in the
    /// order requested.
    pub fn forward_with_features(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<TextTime>,
        taps: &[String],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (indices, _) = self.tap_indices(taps)?;
        let mut found = vec![None; self.tap_count()];
        let out = self.trunk(
            sample,
            timesteps,
            encoder_hidden_states,
            added,
            usize::MAX,
            |i, h| {
                if indices.contains(&i) {
                    found[i] = Some(h.clone());
                }
            },
        )?;
        let out =
            out.ok_or_else(|| candle_core::Error::Msg("unet: the forward stopped early".into()))?;
        Ok((out, Self::pick(&indices, found)?))
    }

    /// The feature maps at `taps`, in the order requested; the forward stops after the last
    /// one it needs.
    pub fn features(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<TextTime>,
        taps: &[String],
    ) -> Result<Vec<Tensor>> {
        let (indices, last) = self.tap_indices(taps)?;
        let mut found = vec![None; self.tap_count()];
        self.trunk(
            sample,
            timesteps,
            encoder_hidden_states,
            added,
            last,
            |i, h| {
                if indices.contains(&i) {
                    found[i] = Some(h.clone());
                }
            },
        )?;
        Self::pick(&indices, found)
    }

    fn tap_count(&self) -> usize {
        2 * self.down_blocks.len() + usize::from(self.mid_block.is_some())
    }

    fn tap_indices(&self, taps: &[String]) -> Result<(Vec<usize>, usize)> {
        let all = self.config.feature_taps();
        let indices = taps
            .iter()
            .map(|tap| {
                all.iter().position(|t| &t.name == tap).ok_or_else(|| {
                    let names: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
                    candle_core::Error::Msg(format!(
                        "unet has no feature tap `{tap}` (taps: {})",
                        names.join(", ")
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let last = indices.iter().copied().max().unwrap_or(0);
        Ok((indices, last))
    }

    fn pick(indices: &[usize], found: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
        indices
            .iter()
            .map(|&i| {
                found[i].clone().ok_or_else(|| {
                    candle_core::Error::Msg(format!("unet: tap {i} was not reached"))
                })
            })
            .collect()
    }

    /// The time embedding (B, time_embed_dim), including SDXL's added text/time embedding.
    fn embedding(
        &self,
        timesteps: &Tensor,
        batch: usize,
        added: Option<TextTime>,
        dtype: DType,
    ) -> Result<Tensor> {
        let t = match timesteps.dims() {
            [] | [1] => timesteps.reshape(1)?.broadcast_as(batch)?.contiguous()?,
            [b] if *b == batch => timesteps.clone(),
            dims => candle_core::bail!(
                "unet: timesteps must have shape ({batch},) or be a single value, got {dims:?}"
            ),
        };
        let t_emb = timestep_embedding(
            &t,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?;
        let emb = self.time_embedding.forward(&t_emb.to_dtype(dtype)?)?;
        let Some(add_embedding) = &self.add_embedding else {
            return Ok(emb);
        };
        let Some(TextTime {
            text_embeds,
            time_ids,
        }) = added
        else {
            candle_core::bail!(
                "unet: addition_embed_type = text_time needs `text_embeds` and `time_ids`"
            )
        };
        let (tb, pooled) = text_embeds.dims2()?;
        let (ib, k) = time_ids.dims2()?;
        let add_dim = self.config.addition_time_embed_dim.unwrap_or(0);
        let expected = self
            .config
            .projection_class_embeddings_input_dim
            .unwrap_or(0);
        if tb != batch || ib != batch || pooled + k * add_dim != expected {
            candle_core::bail!(
                "unet: text_embeds {:?} and time_ids {:?} do not fit batch {batch} and projection_class_embeddings_input_dim {expected} (= pooled width + time ids x {add_dim})",
                text_embeds.dims(),
                time_ids.dims()
            )
        }
        let time_embeds = timestep_embedding(
            &time_ids.flatten_all()?,
            add_dim,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .reshape((batch, k * add_dim))?
        .to_dtype(dtype)?;
        let add = Tensor::cat(&[&text_embeds.to_dtype(dtype)?, &time_embeds], 1)?;
        emb + add_embedding.forward(&add)?
    }

    /// The whole network, handing each tap's map to `visit` (index into
    /// [`Config::feature_taps`]); returns None when it stopped after tap `stop_after`.
    fn trunk(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<TextTime>,
        stop_after: usize,
        mut visit: impl FnMut(usize, &Tensor),
    ) -> Result<Option<Tensor>> {
        let (b, c, h, w) = sample.dims4()?;
        let m = self.config.spatial_multiple();
        if c != self.config.in_channels || h % m != 0 || w % m != 0 {
            candle_core::bail!(
                "unet: sample has shape {:?}; expected {} channels and H, W multiples of {m}",
                sample.dims(),
                self.config.in_channels
            )
        }
        let dtype = self.conv_in.weight().dtype();
        let context = encoder_hidden_states.to_dtype(dtype)?;
        if context.rank() != 3 || context.dim(0)? != b {
            candle_core::bail!(
                "unet: encoder_hidden_states has shape {:?}, expected ({b}, L, D)",
                context.dims()
            )
        }
        let emb = self.embedding(timesteps, b, added, dtype)?;

        let mut x = sample.to_dtype(dtype)?;
        if self.config.center_input_sample {
            x = ((x * 2.0)? - 1.0)?;
        }
        let mut h = self.conv_in.forward(&x)?;
        let mut skips = vec![h.clone()];
        let mut tap = 0;
        let mut reached = |tap: &mut usize, h: &Tensor| {
            visit(*tap, h);
            *tap += 1;
            *tap > stop_after
        };
        for block in &self.down_blocks {
            h = block.forward(&h, &emb, &context, &mut skips)?;
            if reached(&mut tap, &h) {
                return Ok(None);
            }
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &emb, &context)?;
            if reached(&mut tap, &h) {
                return Ok(None);
            }
        }
        for block in &self.up_blocks {
            h = block.forward(&h, &emb, &context, &mut skips)?;
            if reached(&mut tap, &h) {
                return Ok(None);
            }
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        Ok(Some(self.conv_out.forward(&h)?))
    }
}

/// Every tensor a checkpoint for `cfg` holds (diffusers names) and its shape, in construction
/// order, without allocating the model.
pub fn expected_tensors(cfg: &Config) -> Result<Vec<(String, Shape)>> {
    crate::loading::expected_tensors(|vb| UNet2DConditionModel::new(vb, cfg))
}

/// Fails, listing them, when `names` (a checkpoint's tensor names) has tensors `cfg` does not
/// use or lacks tensors it needs.
pub fn check_tensor_names<'a>(
    cfg: &Config,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    let expected: BTreeSet<String> = expected_tensors(cfg)?.into_iter().map(|(n, _)| n).collect();
    let have: BTreeSet<String> = names.into_iter().map(str::to_string).collect();
    let missing: Vec<&String> = expected.difference(&have).collect();
    let unexpected: Vec<&String> = have.difference(&expected).collect();
    if missing.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    candle_core::bail!(
        "unet checkpoint does not match the config: {} missing {:?}, {} unexpected {:?}",
        missing.len(),
        missing.iter().take(20).collect::<Vec<_>>(),
        unexpected.len(),
        unexpected.iter().take(20).collect::<Vec<_>>()
    )
}

/// Condition tensor names the UNet backbone reads.
pub const ENCODER_HIDDEN_STATES: &str = "encoder_hidden_states";
pub const TEXT_EMBEDS: &str = "text_embeds";
pub const TIME_IDS: &str = "time_ids";
/// The negative-prompt counterparts [`UNetBackbone::unconditional`] swaps in.
pub const NEGATIVE_ENCODER_HIDDEN_STATES: &str = "negative_encoder_hidden_states";
pub const NEGATIVE_TEXT_EMBEDS: &str = "negative_text_embeds";
pub const NEGATIVE_TIME_IDS: &str = "negative_time_ids";

/// The UNet as a [`Backbone`]: `t` is passed to the UNet as it is, so the schedule's time
/// units must be the UNet's (discrete training timesteps, 0..999, for SD / SDXL).
///
/// Conditions carry `encoder_hidden_states` (B, L, D) and, for SDXL, `text_embeds` (B, P)
/// and `time_ids` (B, 6). The unconditional condition of classifier-free guidance is the
/// encoded negative (usually empty) prompt, which only the data pipeline can produce: it
/// must travel in the condition as `negative_encoder_hidden_states` (and
/// `negative_text_embeds`, optionally `negative_time_ids`, for SDXL).
#[derive(Debug, Clone)]
pub struct UNetBackbone {
    pub unet: UNet2DConditionModel,
    pub schedule: Schedule,
}

impl UNetBackbone {
    pub fn new(unet: UNet2DConditionModel, schedule: Schedule) -> Self {
        Self { unet, schedule }
    }

    fn inputs<'a>(&self, cond: &'a Condition) -> Result<(&'a Tensor, Option<TextTime<'a>>)> {
        let context = cond.get(ENCODER_HIDDEN_STATES)?;
        let added = if self.unet.config.uses_text_time() {
            Some(TextTime {
                text_embeds: cond.get(TEXT_EMBEDS)?,
                time_ids: cond.get(TIME_IDS)?,
            })
        } else {
            None
        };
        Ok((context, added))
    }
}

impl Backbone for UNetBackbone {
    fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    fn forward(&self, x_t: &Tensor, t: &Tensor, cond: &Condition) -> Result<Tensor> {
        let (context, added) = self.inputs(cond)?;
        self.unet.forward(x_t, t, context, added)
    }

    fn features(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        cond: &Condition,
        taps: &[String],
    ) -> Result<Vec<Tensor>> {
        let (context, added) = self.inputs(cond)?;
        self.unet.features(x_t, t, context, added, taps)
    }

    fn feature_taps(&self) -> Vec<FeatureTap> {
        self.unet.config.feature_taps()
    }

    fn unconditional(&self, cond: &Condition) -> Result<Condition> {
        let mut out = cond.with_negatives("unet", &[ENCODER_HIDDEN_STATES])?;
        if self.unet.config.uses_text_time() {
            out = out.with_negatives("unet", &[TEXT_EMBEDS])?;
            if let Ok(ids) = cond.get(NEGATIVE_TIME_IDS) {
                out = out.with(TIME_IDS, ids.clone());
            }
        }
        Ok(out)
    }
}
