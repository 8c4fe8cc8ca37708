//! The SAM ViT image encoder (Kirillov et al. 2023, "Segment Anything"), as transformers'
//! `SamVisionEncoder` / `SamVisionModel` (transformers/models/sam/modeling_sam.py), used as
//! the frozen backbone of ADP's pixel-space discriminator (METHOD.md, "ADP").
//!
//! - Patch embedding (a `patch_size` conv with stride `patch_size`), plus a learned absolute
//!   position embedding `pos_embed` (1, g, g, C) for the `g = image_size / patch_size` grid.
//!   transformers rejects any other input size (`SamPatchEmbeddings.forward`) and never
//!   interpolates `pos_embed`; so does this port: the input must be `image_size` square.
//! - `num_hidden_layers` pre-norm blocks (LayerNorm, attention, LayerNorm, MLP with exact
//!   GELU). Blocks in `global_attn_indexes` attend over the whole grid; the others over
//!   `window_size` windows, the grid zero-padded (after `layer_norm1`) to a multiple of the
//!   window, as transformers' `window_partition` does; the padded tokens take part as keys.
//! - Decomposed relative positions (MViTv2): `rel_pos_h` / `rel_pos_w` of length `2 S - 1`
//!   for the attention's side `S` (window or grid), added to the attention logits as
//!   `q · R_h[i_q - i_k]` + `q · R_w[j_q - j_k]` with the unscaled query. transformers'
//!   `get_rel_pos` linearly resizes the tables to `2 max(q, k) - 1`; since queries and keys
//!   always have the side the tables were made for (fixed input size), that resize is the
//!   identity and is not needed here (a table of another length fails to load, naming it).
//! - The neck: 1x1 conv, channels-first LayerNorm, 3x3 conv, LayerNorm (eps 1e-6 fixed, as
//!   transformers' `SamLayerNorm` default), giving `output_channels` maps.
//!
//! Tensor names are transformers' exactly. A checkpoint may have them bare
//! (`SamVisionEncoder`) or under `vision_encoder.` (`SamVisionModel`, and the full `SamModel`,
//! whose prompt encoder / mask decoder tensors are skipped by prefix, see [`load_frozen`]).
//!
//! Softmax, layer norm and attention are adm-nn's and every conv is `adm_nn::Conv2d`, so
//! gradients reach the input pixels (the generator's loss goes through this network) and, when
//! built on a VarMap, every parameter. Attention is the plain math path: a global layer of
//! ViT-B at 1024 px (64x64 tokens, 12 heads) materialises its (heads, 4096, 4096) logits and
//! relative-position bias, about 0.8 GB each per image in f32, and the backward keeps them.
//!
//! [`SamFeatureExtractor`] maps the VAE's `[-1, 1]` images to SAM's input normalisation and
//! returns the hidden states after chosen blocks; [`pixel_discriminator`] puts
//! `ConvHeadSet` heads on them.

use std::sync::Arc;

use adm_nn::{linear_b, Conv2d, Conv2dConfig, LayerNorm, Linear};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::conv_heads::ConvHeadConfig;
use crate::heads::{FeatureExtractor, PixelDiscriminator};
use crate::loading::Weights;
use crate::pixel_encoder::{self, CheckpointLayout};

/// transformers' `SamVisionConfig` (the `vision_config` of a `SamConfig`); missing keys take
/// transformers' defaults, unknown keys are ignored. `image_size` / `patch_size` must be
/// integers (square images and patches, as every published SAM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub hidden_size: usize,
    pub output_channels: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    /// Only `"gelu"` (exact, erf) is supported: every published SAM uses it.
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
    /// MLP width when `mlp_dim` is unset: `int(hidden_size * mlp_ratio)`.
    pub mlp_ratio: f64,
    pub mlp_dim: Option<usize>,
    pub use_abs_pos: bool,
    pub use_rel_pos: bool,
    pub window_size: usize,
    pub global_attn_indexes: Vec<usize>,
}

impl Default for Config {
    /// transformers' `SamVisionConfig()` defaults (ViT-B sized).
    fn default() -> Self {
        Self {
            hidden_size: 768,
            output_channels: 256,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 1024,
            patch_size: 16,
            hidden_act: "gelu".to_string(),
            layer_norm_eps: 1e-6,
            qkv_bias: true,
            mlp_ratio: 4.0,
            mlp_dim: None,
            use_abs_pos: true,
            use_rel_pos: true,
            window_size: 14,
            global_attn_indexes: vec![2, 5, 8, 11],
        }
    }
}

impl Config {
    /// facebook/sam-vit-base's vision encoder.
    pub fn vit_b() -> Self {
        Self {
            mlp_dim: Some(3072),
            ..Self::default()
        }
    }

    /// facebook/sam-vit-large's vision encoder.
    pub fn vit_l() -> Self {
        Self {
            hidden_size: 1024,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            mlp_dim: Some(4096),
            global_attn_indexes: vec![5, 11, 17, 23],
            ..Self::default()
        }
    }

    /// facebook/sam-vit-huge's vision encoder.
    pub fn vit_h() -> Self {
        Self {
            hidden_size: 1280,
            num_hidden_layers: 32,
            num_attention_heads: 16,
            mlp_dim: Some(5120),
            global_attn_indexes: vec![7, 15, 23, 31],
            ..Self::default()
        }
    }

    /// Reads a `SamVisionConfig` JSON, or the `vision_config` of a `SamModel` config.json.
    pub fn from_json(path: &std::path::Path) -> Result<Self> {
        let value: serde_json::Value = crate::loading::read_json(path)?;
        let vision = value.get("vision_config").cloned().unwrap_or(value);
        serde_json::from_value(vision).map_err(|e| {
            candle_core::Error::Msg(format!("{}: bad SAM vision config: {e}", path.display()))
        })
    }

    pub fn mlp_dim(&self) -> usize {
        self.mlp_dim
            .unwrap_or((self.hidden_size as f64 * self.mlp_ratio) as usize)
    }

    /// Side of the token grid: `image_size / patch_size`.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(candle_core::Error::Msg(format!("SAM config: {msg}")));
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return fail(format!(
                "`num_attention_heads` ({}) must divide `hidden_size` ({})",
                self.num_attention_heads, self.hidden_size
            ));
        }
        if self.patch_size == 0 || self.image_size < self.patch_size {
            return fail(format!(
                "`patch_size` ({}) must be positive and at most `image_size` ({})",
                self.patch_size, self.image_size
            ));
        }
        if let Some(&i) = self
            .global_attn_indexes
            .iter()
            .find(|&&i| i >= self.num_hidden_layers)
        {
            return fail(format!(
                "`global_attn_indexes` has {i}, but there are {} layers",
                self.num_hidden_layers
            ));
        }
        if self.hidden_act != "gelu" {
            return fail(format!(
                "`hidden_act` {:?} is not supported (only \"gelu\")",
                self.hidden_act
            ));
        }
        Ok(())
    }
}

/// A linear layer applied over the last axis of a (..., C) tensor, flattened to a contiguous
/// 2-D matrix first (candle's Linear is wrong on non-contiguous batched inputs).
fn linear_last(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let c = dims.pop().unwrap_or(1);
    let y = layer.forward(&x.contiguous()?.reshape(((), c))?)?;
    dims.push(y.dim(1)?);
    y.reshape(dims)
}

/// A (B, C, H, W) map normalised over its channels (transformers' channels-first
/// `SamLayerNorm`).
fn layer_norm_channels_first(norm: &LayerNorm, x: &Tensor) -> Result<Tensor> {
    norm.forward(&x.permute((0, 2, 3, 1))?)?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

/// The decomposed relative position tables of one attention: `rel_pos_h` / `rel_pos_w`
/// (2 S - 1, head_dim) for a side-`side` square of tokens, and the index `i_q - i_k + S - 1`
/// of every (query, key) pair along a side.
#[derive(Debug, Clone)]
struct RelativePositions {
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    index: Tensor,
    side: usize,
}

impl RelativePositions {
    fn new(side: usize, head_dim: usize, vb: VarBuilder) -> Result<Self> {
        let len = 2 * side - 1;
        // transformers initialises both tables with zeros.
        let rel_pos_h = vb.get_with_hints((len, head_dim), "rel_pos_h", Init::Const(0.0))?;
        let rel_pos_w = vb.get_with_hints((len, head_dim), "rel_pos_w", Init::Const(0.0))?;
        let index: Vec<u32> = (0..side)
            .flat_map(|q| (0..side).map(move |k| (q + side - 1 - k) as u32))
            .collect();
        let index = Tensor::from_vec(index, side * side, vb.device())?;
        Ok(Self {
            rel_pos_h,
            rel_pos_w,
            index,
            side,
        })
    }

    /// (side, side, head_dim): the table row for every (query, key) pair along one side.
    fn pairs(&self, table: &Tensor) -> Result<Tensor> {
        table
            .index_select(&self.index, 0)?
            .reshape((self.side, self.side, ()))
    }

    /// The additive attention bias (B·heads, 1, L, L) for `query` (B·heads, S, S, d):
    /// `q[h, w] · R_h[h, k_h] + q[h, w] · R_w[w, k_w]` (transformers' `get_decomposed_rel_pos`).
    fn bias(&self, query: &Tensor) -> Result<Tensor> {
        let (bh, s1, s2, d) = query.dims4()?;
        if (s1, s2) != (self.side, self.side) {
            candle_core::bail!(
                "SAM attention: relative positions are for a {0}x{0} grid, got {s1}x{s2}",
                self.side
            );
        }
        let r_h = self.pairs(&self.rel_pos_h)?.transpose(1, 2)?.contiguous()?; // (S1, d, S1k)
        let r_w = self.pairs(&self.rel_pos_w)?.transpose(1, 2)?.contiguous()?; // (S2, d, S2k)
                                                                               // Batched over the row: (S1, BH·S2, d) x (S1, d, S1k).
        let q_rows = query
            .permute((1, 0, 2, 3))?
            .contiguous()?
            .reshape((s1, bh * s2, d))?;
        let rel_h = q_rows
            .matmul(&r_h)?
            .reshape((s1, bh, s2, s1))?
            .permute((1, 0, 2, 3))?; // (BH, S1, S2, S1k)
        let q_cols = query
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((s2, bh * s1, d))?;
        let rel_w = q_cols
            .matmul(&r_w)?
            .reshape((s2, bh, s1, s2))?
            .permute((1, 2, 0, 3))?; // (BH, S1, S2, S2k)
        rel_h
            .unsqueeze(4)?
            .broadcast_add(&rel_w.unsqueeze(3)?)?
            .reshape((bh, 1, s1 * s2, s1 * s2))
    }
}

/// transformers' `SamVisionAttention`: fused `qkv`, `proj`, optional relative positions.
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    rel_pos: Option<RelativePositions>,
}

impl Attention {
    /// `side`: the window size, or the grid size for a global layer.
    fn new(cfg: &Config, side: usize, vb: VarBuilder) -> Result<Self> {
        let c = cfg.hidden_size;
        let head_dim = c / cfg.num_attention_heads;
        Ok(Self {
            qkv: linear_b(c, 3 * c, cfg.qkv_bias, vb.pp("qkv"))?,
            proj: linear_b(c, c, true, vb.pp("proj"))?,
            heads: cfg.num_attention_heads,
            rel_pos: cfg
                .use_rel_pos
                .then(|| RelativePositions::new(side, head_dim, vb.clone()))
                .transpose()?,
        })
    }

    /// `x` (B, S1, S2, C) -> (B, S1, S2, C), every token attending to every other.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s1, s2, c) = x.dims4()?;
        let (l, h) = (s1 * s2, self.heads);
        let qkv = linear_last(&self.qkv, x)?
            .reshape((b, l, 3, h, c / h))?
            .permute((2, 0, 3, 1, 4))?; // (3, B, heads, L, d)
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let bias = match &self.rel_pos {
            Some(rel) => {
                let query = q.contiguous()?.reshape((b * h, s1, s2, c / h))?;
                Some(rel.bias(&query)?.reshape((b, h, l, l))?)
            }
            None => None,
        };
        let out = adm_nn::scaled_dot_product_attention(&q, &k, &v, bias.as_ref(), None)?;
        let out = out.permute((0, 2, 1, 3))?.reshape((b, s1, s2, c))?;
        linear_last(&self.proj, &out)
    }
}

/// (B, H, W, C) zero-padded to multiples of `window` and cut into (B·n, window, window, C).
fn window_partition(x: &Tensor, window: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let pad_h = (window - h % window) % window;
    let pad_w = (window - w % window) % window;
    let x = x.pad_with_zeros(1, 0, pad_h)?.pad_with_zeros(2, 0, pad_w)?;
    let (nh, nw) = ((h + pad_h) / window, (w + pad_w) / window);
    x.reshape((b, nh, window, nw, window, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b * nh * nw, window, window, c))
}

/// The inverse of [`window_partition`] for a (B, `h`, `w`, C) grid, padding removed.
fn window_unpartition(windows: &Tensor, window: usize, h: usize, w: usize) -> Result<Tensor> {
    let c = windows.dim(3)?;
    let (nh, nw) = (h.div_ceil(window), w.div_ceil(window));
    let b = windows.dim(0)? / (nh * nw);
    windows
        .reshape((b, nh, nw, window, window, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b, nh * window, nw * window, c))?
        .narrow(1, 0, h)?
        .narrow(2, 0, w)?
        .contiguous()
}

/// transformers' `SamVisionLayer`; `window == 0` for global attention (as in transformers,
/// `window_size = 0` makes every layer global).
#[derive(Debug, Clone)]
struct Layer {
    layer_norm1: LayerNorm,
    attn: Attention,
    layer_norm2: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    window: usize,
}

impl Layer {
    fn new(cfg: &Config, window: usize, vb: VarBuilder) -> Result<Self> {
        let c = cfg.hidden_size;
        let side = if window == 0 { cfg.grid_size() } else { window };
        Ok(Self {
            layer_norm1: adm_nn::layer_norm(c, cfg.layer_norm_eps, true, vb.pp("layer_norm1"))?,
            attn: Attention::new(cfg, side, vb.pp("attn"))?,
            layer_norm2: adm_nn::layer_norm(c, cfg.layer_norm_eps, true, vb.pp("layer_norm2"))?,
            lin1: linear_b(c, cfg.mlp_dim(), true, vb.pp("mlp.lin1"))?,
            lin2: linear_b(cfg.mlp_dim(), c, true, vb.pp("mlp.lin2"))?,
            window,
        })
    }

    /// (B, g, g, C) -> (B, g, g, C).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let h = if self.window == 0 {
            self.attn.forward(&h)?
        } else {
            let (_, gh, gw, _) = h.dims4()?;
            let windows = self.attn.forward(&window_partition(&h, self.window)?)?;
            window_unpartition(&windows, self.window, gh, gw)?
        };
        let x = (x + h)?;
        let mlp = linear_last(&self.lin1, &self.layer_norm2.forward(&x)?)?.gelu_erf()?;
        x + linear_last(&self.lin2, &mlp)?
    }
}

/// transformers' `SamVisionNeck`.
#[derive(Debug, Clone)]
struct Neck {
    conv1: Conv2d,
    layer_norm1: LayerNorm,
    conv2: Conv2d,
    layer_norm2: LayerNorm,
}

/// `SamLayerNorm`'s default eps; the neck does not use `layer_norm_eps`.
const NECK_LAYER_NORM_EPS: f64 = 1e-6;

impl Neck {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (c, out) = (cfg.hidden_size, cfg.output_channels);
        let norm = |name| adm_nn::layer_norm(out, NECK_LAYER_NORM_EPS, true, vb.pp(name));
        Ok(Self {
            conv1: Conv2d::load(c, out, 1, Conv2dConfig::default(), false, vb.pp("conv1"))?,
            layer_norm1: norm("layer_norm1")?,
            conv2: Conv2d::load(
                out,
                out,
                3,
                Conv2dConfig {
                    padding: 1,
                    stride: 1,
                },
                false,
                vb.pp("conv2"),
            )?,
            layer_norm2: norm("layer_norm2")?,
        })
    }

    /// (B, g, g, C) -> (B, output_channels, g, g).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self
            .conv1
            .forward(&x.permute((0, 3, 1, 2))?.contiguous()?)?;
        let x = layer_norm_channels_first(&self.layer_norm1, &x)?;
        layer_norm_channels_first(&self.layer_norm2, &self.conv2.forward(&x)?)
    }
}

/// transformers' `SamVisionEncoder`, tensor names without prefix (`patch_embed.projection.weight`,
/// `pos_embed`, `layers.{i}.attn.qkv.weight`, `neck.conv1.weight`, ...).
#[derive(Debug, Clone)]
pub struct SamVisionEncoder {
    patch_embed: Conv2d,
    pos_embed: Option<Tensor>,
    layers: Vec<Layer>,
    neck: Neck,
    cfg: Config,
}

impl SamVisionEncoder {
    /// Builds the encoder from `vb` at the encoder's level (for a `SamVisionModel` or
    /// `SamModel` checkpoint pass `vb.pp("vision_encoder")`; [`load_frozen`] and
    /// [`load_trainable`] do that for you).
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let (c, g) = (cfg.hidden_size, cfg.grid_size());
        let patch = cfg.patch_size;
        let patch_embed = Conv2d::load(
            cfg.num_channels,
            c,
            patch,
            Conv2dConfig {
                padding: 0,
                stride: patch,
            },
            true,
            vb.pp("patch_embed.projection"),
        )?;
        let pos_embed = cfg
            .use_abs_pos
            .then(|| vb.get_with_hints((1, g, g, c), "pos_embed", Init::Const(0.0)))
            .transpose()?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let window = if cfg.global_attn_indexes.contains(&i) {
                    0
                } else {
                    cfg.window_size
                };
                Layer::new(cfg, window, vb.pp(format!("layers.{i}")))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            patch_embed,
            pos_embed,
            layers,
            neck: Neck::new(cfg, vb.pp("neck"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Patch + position embedding of `pixels` (B, num_channels, image_size, image_size),
    /// channels last: (B, g, g, C).
    fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = pixels.dims4()?;
        let n = self.cfg.image_size;
        if c != self.cfg.num_channels || h != n || w != n {
            candle_core::bail!(
                "SAM vision encoder: takes ({}, {n}, {n}) pixels (config num_channels, \
                 image_size), got {:?}; like transformers, it neither resizes the input nor \
                 interpolates the position embedding",
                self.cfg.num_channels,
                pixels.dims()
            );
        }
        let x = self
            .patch_embed
            .forward(pixels)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        match &self.pos_embed {
            Some(pos) => x.broadcast_add(pos),
            None => Ok(x),
        }
    }

    /// The neck output (B, output_channels, g, g): transformers' `last_hidden_state`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut x = self.embed(pixels)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.neck.forward(&x)
    }

    /// The hidden states after blocks `layers` (0-based, any order) as (B, hidden_size, g, g)
    /// maps, in the order asked (transformers' `hidden_states[i + 1]`, channels first). Runs
    /// only up to the deepest block asked for; the neck is not run.
    pub fn forward_with_features(&self, pixels: &Tensor, layers: &[usize]) -> Result<Vec<Tensor>> {
        self.check_layers(layers)?;
        pixel_encoder::states_after(&self.layers, self.embed(pixels)?, layers, Layer::forward)?
            .iter()
            .map(|x| x.permute((0, 3, 1, 2))?.contiguous())
            .collect()
    }

    fn check_layers(&self, layers: &[usize]) -> Result<()> {
        pixel_encoder::check_layers("SAM", layers, self.layers.len())
    }
}

/// Prefixes of `SamModel` tensors that are not the vision encoder's.
pub const NON_VISION_PREFIXES: &[&str] = &[
    "prompt_encoder.",
    "mask_decoder.",
    "shared_image_embedding.",
];

const LAYOUT: CheckpointLayout = CheckpointLayout {
    model: "SAM",
    prefix: "vision_encoder",
    probe: "patch_embed.projection.weight",
    foreign: NON_VISION_PREFIXES,
};

/// A frozen encoder from a `SamVisionEncoder`, `SamVisionModel` or full `SamModel` checkpoint
/// (e.g. `Weights::open(folder, None)` of facebook/sam-vit-base). Missing or mis-shaped
/// tensors fail naming them; any tensor that is neither used nor a `SamModel` prompt encoder /
/// mask decoder one is an error too.
pub fn load_frozen(
    weights: &Weights,
    cfg: &Config,
    dtype: DType,
    device: &Device,
) -> Result<SamVisionEncoder> {
    LAYOUT.load_frozen(weights, dtype, device, |vb| SamVisionEncoder::new(vb, cfg))
}

/// A trainable encoder: its Vars are created in `varmap` (named as in the checkpoint,
/// `vision_encoder.` included when the checkpoint has it) and set from `weights`, with the
/// checks of [`load_frozen`].
pub fn load_trainable(
    weights: &Weights,
    cfg: &Config,
    varmap: &VarMap,
    dtype: DType,
    device: &Device,
) -> Result<SamVisionEncoder> {
    LAYOUT.load_trainable(weights, varmap, dtype, device, |vb| {
        SamVisionEncoder::new(vb, cfg)
    })
}

/// `SamProcessor`'s normalisation (transformers' `SamImageProcessor`: rescale by 1/255, then
/// ImageNet mean / std per channel).
pub use crate::pixel_encoder::{IMAGENET_MEAN as PIXEL_MEAN, IMAGENET_STD as PIXEL_STD};

/// SAM read at several blocks, for [`PixelDiscriminator`]: VAE images in `[-1, 1]`
/// (B, 3, image_size, image_size) become `((x + 1) / 2 - mean) / std`, what `SamProcessor`
/// makes of an 8-bit image of the same content. `SamProcessor` would also resize the longest
/// side to 1024 (bilinear) and zero-pad to 1024 x 1024; this extractor does neither: images
/// must already have the encoder's `image_size` (SDXL's 1024 x 1024 decodes do), anything
/// else is an error. Features: the hidden states after `layers`, (B, hidden_size, g, g).
#[derive(Debug, Clone)]
pub struct SamFeatureExtractor {
    encoder: Arc<SamVisionEncoder>,
    layers: Vec<usize>,
}

impl SamFeatureExtractor {
    pub fn new(encoder: Arc<SamVisionEncoder>, layers: &[usize]) -> Result<Self> {
        encoder.check_layers(layers)?;
        if encoder.cfg.num_channels != 3 {
            candle_core::bail!(
                "SAM features: the pixel normalisation is for RGB, the encoder takes {} channels",
                encoder.cfg.num_channels
            );
        }
        Ok(Self {
            encoder,
            layers: layers.to_vec(),
        })
    }

    /// `[-1, 1]` images to SAM's normalised pixels (differentiable, per-channel affine).
    pub fn normalize(images: &Tensor) -> Result<Tensor> {
        pixel_encoder::imagenet_normalize(images)
    }
}

impl FeatureExtractor for SamFeatureExtractor {
    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.encoder
            .forward_with_features(&Self::normalize(x)?, &self.layers)
    }

    fn feature_channels(&self) -> Vec<usize> {
        vec![self.encoder.cfg.hidden_size; self.layers.len()]
    }
}

/// ADP's pixel discriminator D_tau2: the frozen SAM encoder read after `layers`, with a 2D
/// conv head ([`crate::ConvHeadSet`], `heads.{i}` in `vb`) on each feature map.
pub fn pixel_discriminator(
    encoder: Arc<SamVisionEncoder>,
    layers: &[usize],
    heads: &ConvHeadConfig,
    vb: VarBuilder,
) -> Result<PixelDiscriminator> {
    let extractor = SamFeatureExtractor::new(encoder, layers)?;
    pixel_encoder::conv_pixel_discriminator("SAM", Arc::new(extractor), heads, vb)
}
