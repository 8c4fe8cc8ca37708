//! The DINOv2 ViT image encoder (Oquab et al. 2023), as transformers' `Dinov2Model`
//! (transformers/models/dinov2/modeling_dinov2.py): the configurable alternative to SAM as
//! the frozen backbone of ADP's pixel-space discriminator (METHOD.md, "ADP").
//!
//! - Patch embedding (a `patch_size` conv with stride `patch_size`; leftover border pixels are
//!   dropped, as PyTorch's conv does), a CLS token in front, plus the learned position
//!   embedding `(1, 1 + g², C)` for the `g = image_size / patch_size` grid (37 for the
//!   published 518 / 14).
//! - Position embedding on other grids: transformers resizes the patch part with
//!   `F.interpolate(mode="bicubic", align_corners=False)` to the input's (gh, gw) grid (the
//!   CLS entry is kept); so does this port, for any grid, square or not, exactly (Keys' cubic
//!   with A = -0.75 and border clamping, as two constant matrices, [`crate::pixel_encoder::resize`],
//!   hence differentiable). transformers runs it in float32 whatever the model's dtype; here it
//!   runs in the model's dtype. The parity test covers the 6x6 embedding grid and an 8x5 grid.
//! - `num_hidden_layers` pre-norm blocks: LayerNorm, attention (separate query / key / value),
//!   layer scale `lambda1`, residual; LayerNorm, MLP (fc1, exact GELU, fc2) or, with
//!   `use_swiglu_ffn` (dinov2-giant), SwiGLU (`weights_in` holds the gate and up projections
//!   stacked, `weights_out` the down one), layer scale, residual. A final `layernorm` gives
//!   `last_hidden_state`.
//! - `embeddings.mask_token` (masked-image pre-training) is loaded when `use_mask_token`, as a
//!   checkpoint carries it, and unused: at inference nothing is masked.
//!
//! Tensor names are the published checkpoints' (facebook/dinov2-*: `embeddings.cls_token`,
//! `encoder.layer.{i}.attention.attention.query`, `mlp.fc1` / `mlp.weights_in`,
//! `layer_scale1.lambda1`, `layernorm`, ...), which transformers 5 renames on load and back on
//! save. A checkpoint may have them bare (`Dinov2Model`, `Dinov2Backbone`) or under `dinov2.`
//! (`Dinov2ForImageClassification`, whose `classifier.` tensors are skipped).
//!
//! Layer norm, softmax (in attention) and the patch conv are adm-nn's, so gradients reach the
//! input pixels and, built on a VarMap, every parameter but the unused mask token.
//! candle-transformers' `dinov2` is not usable here. Its LayerNorms are
//! `candle_nn::layer_norm(dim, 1e-5, vb)`: measured with candle-nn 0.11.1 (a VarMap-built one
//! on a contiguous (2, 5, 8) Var), the output carries no gradient at all, neither to the input
//! nor to `weight` / `bias` (adm-nn's gives one), and the eps is 1e-5 where DINOv2 uses 1e-6.
//! Read in its source: it resizes the position embedding with nearest upsampling (not bicubic;
//! candle's nearest backward is wrong), on the trained grid it adds the tokens to themselves
//! instead of the embedding, and it has no SwiGLU (giant) nor mask token.
//!
//! [`Dinov2FeatureExtractor`] maps the VAE's `[-1, 1]` images to DINOv2's ImageNet
//! normalisation, optionally resized (antialiased bilinear, differentiable), and returns the
//! patch-token maps after chosen blocks; [`pixel_discriminator`] puts `ConvHeadSet` heads on
//! them.

use std::sync::Arc;

use adm_nn::{linear_b, Conv2d, Conv2dConfig, LayerNorm, Linear};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::conv_heads::ConvHeadConfig;
use crate::heads::{FeatureExtractor, PixelDiscriminator};
use crate::loading::Weights;
use crate::pixel_encoder::{self, CheckpointLayout, Resample};

/// transformers' `Dinov2Config` (a facebook/dinov2-* config.json); missing keys take
/// transformers' defaults, unknown keys (dropout rates, backbone `out_features`, ...) are
/// ignored. `image_size` / `patch_size` must be integers (as every published DINOv2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// MLP width: `int(hidden_size * mlp_ratio)` (SwiGLU: two thirds of it, rounded up to a
    /// multiple of 8).
    pub mlp_ratio: f64,
    /// Only `"gelu"` (exact, erf) is supported for the MLP: every published DINOv2 uses it
    /// (the SwiGLU FFN ignores it and uses SiLU).
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub qkv_bias: bool,
    pub layerscale_value: f64,
    pub use_swiglu_ffn: bool,
    pub use_mask_token: bool,
}

impl Default for Config {
    /// transformers' `Dinov2Config()` defaults (ViT-B sized, 224 px).
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            mlp_ratio: 4.0,
            hidden_act: "gelu".to_string(),
            layer_norm_eps: 1e-6,
            image_size: 224,
            patch_size: 14,
            num_channels: 3,
            qkv_bias: true,
            layerscale_value: 1.0,
            use_swiglu_ffn: false,
            use_mask_token: true,
        }
    }
}

impl Config {
    /// The published checkpoints' shared settings: 518 px, patch 14 (a 37x37 grid).
    fn published(hidden_size: usize, num_hidden_layers: usize, num_attention_heads: usize) -> Self {
        Self {
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            image_size: 518,
            ..Self::default()
        }
    }

    /// facebook/dinov2-small (ViT-S/14).
    pub fn vit_s() -> Self {
        Self::published(384, 12, 6)
    }

    /// facebook/dinov2-base (ViT-B/14).
    pub fn vit_b() -> Self {
        Self::published(768, 12, 12)
    }

    /// facebook/dinov2-large (ViT-L/14).
    pub fn vit_l() -> Self {
        Self::published(1024, 24, 16)
    }

    /// facebook/dinov2-giant (ViT-g/14, SwiGLU FFN).
    pub fn vit_g() -> Self {
        Self {
            use_swiglu_ffn: true,
            ..Self::published(1536, 40, 24)
        }
    }

    /// Reads a `Dinov2Config` config.json.
    pub fn from_json(path: &std::path::Path) -> Result<Self> {
        let value: serde_json::Value = crate::loading::read_json(path)?;
        serde_json::from_value(value).map_err(|e| {
            candle_core::Error::Msg(format!("{}: bad DINOv2 config: {e}", path.display()))
        })
    }

    /// The FFN's hidden width, as transformers' `Dinov2MLP` / `Dinov2SwiGLUFFN` compute it.
    pub fn ffn_dim(&self) -> usize {
        let hidden = (self.hidden_size as f64 * self.mlp_ratio) as usize;
        if self.use_swiglu_ffn {
            ((hidden as f64 * 2.0 / 3.0) as usize).div_ceil(8) * 8
        } else {
            hidden
        }
    }

    /// Side of the grid the position embedding was trained for: `image_size / patch_size`.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(candle_core::Error::Msg(format!("DINOv2 config: {msg}")));
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
        if self.ffn_dim() == 0 {
            return fail(format!(
                "`mlp_ratio` ({}) gives no FFN width",
                self.mlp_ratio
            ));
        }
        if !self.use_swiglu_ffn && self.hidden_act != "gelu" {
            return fail(format!(
                "`hidden_act` {:?} is not supported (only \"gelu\")",
                self.hidden_act
            ));
        }
        Ok(())
    }
}

/// transformers' `Dinov2Attention` (checkpoint names `attention.query`, ..., `output.dense`).
#[derive(Debug, Clone)]
struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    heads: usize,
}

impl Attention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let c = cfg.hidden_size;
        let qkv = |name: &str| linear_b(c, c, cfg.qkv_bias, vb.pp("attention").pp(name));
        Ok(Self {
            query: qkv("query")?,
            key: qkv("key")?,
            value: qkv("value")?,
            output: linear_b(c, c, true, vb.pp("output.dense"))?,
            heads: cfg.num_attention_heads,
        })
    }

    /// (B, N, C) -> (B, N, C), every token attending to every other.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let split = |layer: &Linear| {
            layer
                .forward(x)?
                .reshape((b, n, self.heads, c / self.heads))?
                .transpose(1, 2)
        };
        let out = adm_nn::scaled_dot_product_attention(
            &split(&self.query)?,
            &split(&self.key)?,
            &split(&self.value)?,
            None,
            None,
        )?;
        self.output
            .forward(&out.transpose(1, 2)?.contiguous()?.reshape((b, n, c))?)
    }
}

/// The FFN: `Dinov2MLP` or `Dinov2SwiGLUFFN`.
#[derive(Debug, Clone)]
enum Ffn {
    Mlp {
        fc1: Linear,
        fc2: Linear,
    },
    SwiGlu {
        weights_in: Linear,
        weights_out: Linear,
    },
}

impl Ffn {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (c, h) = (cfg.hidden_size, cfg.ffn_dim());
        Ok(if cfg.use_swiglu_ffn {
            Self::SwiGlu {
                weights_in: linear_b(c, 2 * h, true, vb.pp("weights_in"))?,
                weights_out: linear_b(h, c, true, vb.pp("weights_out"))?,
            }
        } else {
            Self::Mlp {
                fc1: linear_b(c, h, true, vb.pp("fc1"))?,
                fc2: linear_b(h, c, true, vb.pp("fc2"))?,
            }
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Mlp { fc1, fc2 } => fc2.forward(&fc1.forward(x)?.gelu_erf()?),
            Self::SwiGlu {
                weights_in,
                weights_out,
            } => {
                let both = weights_in.forward(x)?;
                let h = both.dim(D::Minus1)? / 2;
                // The gate is the first half (the checkpoint's `chunk(2, dim=-1)`).
                let gate = adm_nn::silu(&both.narrow(D::Minus1, 0, h)?)?;
                weights_out.forward(&(gate * both.narrow(D::Minus1, h, h)?)?)
            }
        }
    }
}

/// transformers' `Dinov2Layer`.
#[derive(Debug, Clone)]
struct Layer {
    norm1: LayerNorm,
    attention: Attention,
    layer_scale1: Tensor,
    norm2: LayerNorm,
    mlp: Ffn,
    layer_scale2: Tensor,
}

impl Layer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let c = cfg.hidden_size;
        let scale = |name: &str| {
            vb.pp(name)
                .get_with_hints(c, "lambda1", Init::Const(cfg.layerscale_value))
        };
        Ok(Self {
            norm1: adm_nn::layer_norm(c, cfg.layer_norm_eps, true, vb.pp("norm1"))?,
            attention: Attention::new(cfg, vb.pp("attention"))?,
            layer_scale1: scale("layer_scale1")?,
            norm2: adm_nn::layer_norm(c, cfg.layer_norm_eps, true, vb.pp("norm2"))?,
            mlp: Ffn::new(cfg, vb.pp("mlp"))?,
            layer_scale2: scale("layer_scale2")?,
        })
    }

    /// (B, N, C) -> (B, N, C).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.attention.forward(&self.norm1.forward(x)?)?;
        let x = (x + h.broadcast_mul(&self.layer_scale1)?)?;
        let h = self.mlp.forward(&self.norm2.forward(&x)?)?;
        x + h.broadcast_mul(&self.layer_scale2)?
    }
}

/// transformers' `Dinov2Model`, tensor names without prefix (`embeddings.cls_token`,
/// `encoder.layer.{i}.norm1.weight`, `layernorm.weight`, ...).
#[derive(Debug, Clone)]
pub struct Dinov2Model {
    patch_embed: Conv2d,
    cls_token: Tensor,
    position_embeddings: Tensor,
    layers: Vec<Layer>,
    layernorm: LayerNorm,
    cfg: Config,
}

impl Dinov2Model {
    /// Builds the model from `vb` at the model's level (for a `Dinov2ForImageClassification`
    /// checkpoint pass `vb.pp("dinov2")`; [`load_frozen`] and [`load_trainable`] do that for
    /// you).
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let (c, g) = (cfg.hidden_size, cfg.grid_size());
        let emb = vb.pp("embeddings");
        let patch_embed = Conv2d::load(
            cfg.num_channels,
            c,
            cfg.patch_size,
            Conv2dConfig {
                padding: 0,
                stride: cfg.patch_size,
            },
            true,
            emb.pp("patch_embeddings.projection"),
        )?;
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let cls_token = emb.get_with_hints((1, 1, c), "cls_token", init)?;
        if cfg.use_mask_token {
            // Loaded (a checkpoint has it) and unused at inference.
            emb.get_with_hints((1, c), "mask_token", Init::Const(0.0))?;
        }
        let position_embeddings =
            emb.get_with_hints((1, 1 + g * g, c), "position_embeddings", init)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp(format!("encoder.layer.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            patch_embed,
            cls_token,
            position_embeddings,
            layers,
            layernorm: adm_nn::layer_norm(c, cfg.layer_norm_eps, true, vb.pp("layernorm"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The token grid (gh, gw) of (B, C, `height`, `width`) pixels: `floor(side / patch)`.
    pub fn grid(&self, height: usize, width: usize) -> (usize, usize) {
        (height / self.cfg.patch_size, width / self.cfg.patch_size)
    }

    /// The position embedding (1, 1 + gh·gw, C) for a (gh, gw) grid: the trained one, or its
    /// patch part resized bicubically (transformers' `interpolate_pos_encoding`).
    fn position_embeddings(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let g = self.cfg.grid_size();
        if (gh, gw) == (g, g) {
            return Ok(self.position_embeddings.clone());
        }
        let c = self.cfg.hidden_size;
        let cls = self.position_embeddings.narrow(1, 0, 1)?;
        let patches = self
            .position_embeddings
            .narrow(1, 1, g * g)?
            .reshape((1, g, g, c))?
            .permute((0, 3, 1, 2))?;
        let patches = pixel_encoder::resize(&patches, gh, gw, Resample::Bicubic)?
            .permute((0, 2, 3, 1))?
            .reshape((1, gh * gw, c))?;
        Tensor::cat(&[cls, patches], 1)
    }

    /// CLS + patch tokens with position embeddings, (B, 1 + gh·gw, C), and the grid.
    fn embed(&self, pixels: &Tensor) -> Result<(Tensor, (usize, usize))> {
        let (b, ch, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        if ch != self.cfg.num_channels || h < p || w < p {
            candle_core::bail!(
                "DINOv2: takes (B, {}, H, W) pixels with H, W >= {p} (config num_channels, \
                 patch_size), got {:?}",
                self.cfg.num_channels,
                pixels.dims()
            );
        }
        let (gh, gw) = self.grid(h, w);
        let c = self.cfg.hidden_size;
        let patches = self
            .patch_embed
            .forward(pixels)?
            .reshape((b, c, gh * gw))?
            .transpose(1, 2)?;
        let cls = self.cls_token.broadcast_as((b, 1, c))?;
        let x = Tensor::cat(&[cls, patches], 1)?;
        Ok((
            x.broadcast_add(&self.position_embeddings(gh, gw)?)?,
            (gh, gw),
        ))
    }

    /// transformers' `last_hidden_state` (B, 1 + gh·gw, hidden_size): the tokens (CLS first)
    /// after every block and the final `layernorm`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (mut x, _) = self.embed(pixels)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.layernorm.forward(&x)
    }

    /// The tokens (B, 1 + gh·gw, hidden_size) after blocks `layers` (0-based, any order;
    /// transformers' `hidden_states[i + 1]`, not normalised), in the order asked. Runs only up
    /// to the deepest block asked for.
    pub fn hidden_states(&self, pixels: &Tensor, layers: &[usize]) -> Result<Vec<Tensor>> {
        self.check_layers(layers)?;
        let (x, _) = self.embed(pixels)?;
        pixel_encoder::states_after(&self.layers, x, layers, Layer::forward)
    }

    /// [`Self::hidden_states`] without the CLS token, as (B, hidden_size, gh, gw) maps (what
    /// conv heads take; SAM's features have the same layout).
    pub fn forward_with_features(&self, pixels: &Tensor, layers: &[usize]) -> Result<Vec<Tensor>> {
        let (_, _, h, w) = pixels.dims4()?;
        let (gh, gw) = self.grid(h, w);
        let c = self.cfg.hidden_size;
        self.hidden_states(pixels, layers)?
            .iter()
            .map(|x| {
                let b = x.dim(0)?;
                x.narrow(1, 1, gh * gw)?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((b, c, gh, gw))
            })
            .collect()
    }

    fn check_layers(&self, layers: &[usize]) -> Result<()> {
        pixel_encoder::check_layers("DINOv2", layers, self.layers.len())
    }
}

/// Prefix of `Dinov2ForImageClassification` tensors that are not the model's.
pub const NON_MODEL_PREFIXES: &[&str] = &["classifier."];

const LAYOUT: CheckpointLayout = CheckpointLayout {
    model: "DINOv2",
    prefix: "dinov2",
    probe: "embeddings.patch_embeddings.projection.weight",
    foreign: NON_MODEL_PREFIXES,
};

/// A frozen model from a `Dinov2Model` / `Dinov2Backbone` or `Dinov2ForImageClassification`
/// checkpoint (e.g. `Weights::open(folder, None)` of facebook/dinov2-small). Missing or
/// mis-shaped tensors fail naming them; any tensor neither used nor a classifier one is an
/// error too.
pub fn load_frozen(
    weights: &Weights,
    cfg: &Config,
    dtype: DType,
    device: &Device,
) -> Result<Dinov2Model> {
    LAYOUT.load_frozen(weights, dtype, device, |vb| Dinov2Model::new(vb, cfg))
}

/// A trainable model: its Vars are created in `varmap` (named as in the checkpoint, `dinov2.`
/// included when the checkpoint has it) and set from `weights`, with the checks of
/// [`load_frozen`].
pub fn load_trainable(
    weights: &Weights,
    cfg: &Config,
    varmap: &VarMap,
    dtype: DType,
    device: &Device,
) -> Result<Dinov2Model> {
    LAYOUT.load_trainable(weights, varmap, dtype, device, |vb| {
        Dinov2Model::new(vb, cfg)
    })
}

/// DINOv2 read at several blocks, for [`PixelDiscriminator`]: VAE images in `[-1, 1]`
/// (B, 3, H, W) are resized to `input_size` (antialiased bilinear, as `F.interpolate(...,
/// antialias=True)`; skipped when `None` or already that size) and mapped to
/// `((x + 1) / 2 - mean) / std` with ImageNet's mean / std, what DINOv2's `BitImageProcessor`
/// makes of an 8-bit image (it would also resize the short side to 256 and centre-crop 224;
/// this extractor keeps the whole image). Features: the patch-token maps after `layers`,
/// (B, hidden_size, gh, gw) for the (resized) input's grid.
#[derive(Debug, Clone)]
pub struct Dinov2FeatureExtractor {
    model: Arc<Dinov2Model>,
    layers: Vec<usize>,
    input_size: Option<(usize, usize)>,
}

impl Dinov2FeatureExtractor {
    /// `input_size`: (height, width) the images are resized to, e.g. (224, 224) or (518, 518).
    pub fn new(
        model: Arc<Dinov2Model>,
        layers: &[usize],
        input_size: Option<(usize, usize)>,
    ) -> Result<Self> {
        model.check_layers(layers)?;
        if model.cfg.num_channels != 3 {
            candle_core::bail!(
                "DINOv2 features: the pixel normalisation is for RGB, the model takes {} channels",
                model.cfg.num_channels
            );
        }
        if let Some((h, w)) = input_size {
            let p = model.cfg.patch_size;
            if h < p || w < p {
                candle_core::bail!(
                    "DINOv2 features: `input_size` {h}x{w} is smaller than a patch ({p})"
                );
            }
        }
        Ok(Self {
            model,
            layers: layers.to_vec(),
            input_size,
        })
    }

    /// `[-1, 1]` images to the model's input: resized, then ImageNet-normalised.
    pub fn preprocess(&self, images: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = images.dims4()?;
        let images = match self.input_size {
            Some(size) if size != (h, w) => {
                pixel_encoder::resize(images, size.0, size.1, Resample::BilinearAntialias)?
            }
            _ => images.clone(),
        };
        pixel_encoder::imagenet_normalize(&images)
    }
}

impl FeatureExtractor for Dinov2FeatureExtractor {
    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.model
            .forward_with_features(&self.preprocess(x)?, &self.layers)
    }

    fn feature_channels(&self) -> Vec<usize> {
        vec![self.model.cfg.hidden_size; self.layers.len()]
    }
}

/// ADP's pixel discriminator D_tau2 over a frozen DINOv2 read after `layers` (images resized
/// to `input_size`, see [`Dinov2FeatureExtractor`]), with a 2D conv head
/// ([`crate::ConvHeadSet`], `heads.{i}` in `vb`) on each feature map.
pub fn pixel_discriminator(
    model: Arc<Dinov2Model>,
    layers: &[usize],
    input_size: Option<(usize, usize)>,
    heads: &ConvHeadConfig,
    vb: VarBuilder,
) -> Result<PixelDiscriminator> {
    let extractor = Dinov2FeatureExtractor::new(model, layers, input_size)?;
    pixel_encoder::conv_pixel_discriminator("DINOv2", Arc::new(extractor), heads, vb)
}
