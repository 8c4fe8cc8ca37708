//! What the frozen image encoders behind ADP's pixel discriminator (SAM in [`crate::sam`],
//! DINOv2 in [`crate::dinov2`]) share: ImageNet pixel normalisation of the VAE's `[-1, 1]`
//! images, differentiable separable resizing (PyTorch's bicubic and antialiased bilinear
//! `interpolate`, as matrices), loading from a checkpoint that may hold the encoder under a
//! prefix next to other models' tensors, reading hidden states after chosen blocks, and the
//! conv-head discriminator on them.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::conv_heads::{ConvHeadConfig, HeadDims};
use crate::heads::{FeatureExtractor, PixelDiscriminator};
use crate::loading::Weights;

/// The ImageNet mean / std per RGB channel of `SamProcessor` and DINOv2's `BitImageProcessor`
/// (applied after rescaling 8-bit pixels by 1/255).
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// `[-1, 1]` images (B, 3, H, W) to `((x + 1) / 2 - mean) / std`, what the processors make of
/// an 8-bit image of the same content (differentiable, per-channel affine).
pub fn imagenet_normalize(images: &Tensor) -> Result<Tensor> {
    let (dtype, dev) = (images.dtype(), images.device());
    let per_channel = |v: [f64; 3]| Tensor::new(&v, dev)?.to_dtype(dtype)?.reshape((1, 3, 1, 1));
    let scale = per_channel(IMAGENET_STD.map(|s| 0.5 / s))?;
    let shift = per_channel([0, 1, 2].map(|i| (0.5 - IMAGENET_MEAN[i]) / IMAGENET_STD[i]))?;
    images.broadcast_mul(&scale)?.broadcast_add(&shift)
}

/// A 1-D resampling filter of PyTorch's `F.interpolate` (`align_corners=False`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// `mode="bicubic"` without antialiasing: Keys' cubic with `A = -0.75`, source indices
    /// clamped to the border (what transformers uses on position embeddings).
    Bicubic,
    /// `mode="bilinear", antialias=True`: a triangle filter widened by the scale when
    /// downsampling (so every input pixel counts), normalised per output; plain bilinear when
    /// upsampling.
    BilinearAntialias,
}

/// PyTorch's cubic convolution weights for the 4 taps around a source position at fraction
/// `t` past its floor (`upsample_bicubic2d`'s `get_cubic_upsample_coefficients`).
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// The (`out`, `inp`) matrix of a 1-D resize: output `i` is `Σ_j m[i][j] x[j]`.
fn resample_matrix(inp: usize, out: usize, filter: Resample) -> Vec<f64> {
    let scale = inp as f64 / out as f64;
    let mut m = vec![0.0; out * inp];
    for i in 0..out {
        let row = &mut m[i * inp..(i + 1) * inp];
        match filter {
            Resample::Bicubic => {
                let src = (i as f64 + 0.5) * scale - 0.5;
                let floor = src.floor();
                for (k, w) in cubic_weights(src - floor).into_iter().enumerate() {
                    let j = (floor as i64 + k as i64 - 1).clamp(0, inp as i64 - 1);
                    row[j as usize] += w;
                }
            }
            Resample::BilinearAntialias => {
                // aten's `_compute_index_ranges_weights` with the triangle filter.
                let (support, inv) = if scale >= 1.0 {
                    (scale, 1.0 / scale)
                } else {
                    (1.0, 1.0)
                };
                let center = scale * (i as f64 + 0.5);
                let lo = ((center - support + 0.5) as i64).max(0) as usize;
                let hi = ((center + support + 0.5) as i64).min(inp as i64) as usize;
                let mut total = 0.0;
                for (j, w) in row.iter_mut().enumerate().take(hi).skip(lo) {
                    *w = (1.0 - ((j as f64 - center + 0.5) * inv).abs()).max(0.0);
                    total += *w;
                }
                if total != 0.0 {
                    row[lo..hi].iter_mut().for_each(|w| *w /= total);
                }
            }
        }
    }
    m
}

/// Resizes (B, C, H, W) maps to (B, C, `height`, `width`) as PyTorch's `F.interpolate(x,
/// size=(height, width), mode=..., align_corners=False)` does. Both filters are separable, so
/// this is two matmuls with constant matrices: differentiable with respect to `x` (candle's
/// `upsample_bilinear2d` has no backward).
pub fn resize(x: &Tensor, height: usize, width: usize, filter: Resample) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if height == 0 || width == 0 || h == 0 || w == 0 {
        candle_core::bail!(
            "resize: cannot resize {:?} to {height}x{width}: empty",
            x.dims()
        );
    }
    let matrix = |inp, out, shape| {
        Tensor::from_vec(resample_matrix(inp, out, filter), shape, x.device())?.to_dtype(x.dtype())
    };
    let rows = matrix(h, height, (height, h))?; // (height, H)
    let cols = matrix(w, width, (width, w))?.t()?; // (W, width)
    let x = x.contiguous()?.reshape((b * c, h, w))?;
    let x = x.broadcast_matmul(&cols.contiguous()?)?; // (BC, H, width)
    rows.broadcast_matmul(&x)?.reshape((b, c, height, width))
}

/// Where a checkpoint may keep an image encoder: bare, or under `prefix` next to other models'
/// tensors (whose names start with one of `foreign`), e.g. a full `SamModel` or a
/// `Dinov2ForImageClassification`.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointLayout {
    /// For messages: "SAM", "DINOv2".
    pub model: &'static str,
    pub prefix: &'static str,
    /// A tensor every encoder has (name without prefix), to tell the layouts apart.
    pub probe: &'static str,
    /// Prefixes of the tensors of the checkpoint's other parts, skipped.
    pub foreign: &'static [&'static str],
}

impl CheckpointLayout {
    /// `vb`, moved under the prefix when `weights` holds the encoder there.
    fn var_builder<'a>(&self, weights: &Weights, vb: VarBuilder<'a>) -> VarBuilder<'a> {
        if weights
            .shape(&format!("{}.{}", self.prefix, self.probe))
            .is_some()
        {
            vb.pp(self.prefix)
        } else {
            vb
        }
    }

    /// Fails, naming them, when `weights` has tensors that are neither loaded nor foreign.
    fn check_no_unexpected(&self, weights: &Weights) -> Result<()> {
        let unexpected: Vec<String> = weights
            .unused(&[])
            .into_iter()
            .filter(|n| !self.foreign.iter().any(|p| n.starts_with(p)))
            .collect();
        if unexpected.is_empty() {
            return Ok(());
        }
        candle_core::bail!(
            "{} unexpected tensors in the {} checkpoint {:?} (neither the encoder's nor under \
             one of the skipped prefixes {:?}): {}",
            unexpected.len(),
            self.model,
            weights.files(),
            self.foreign,
            unexpected.join(", ")
        )
    }

    /// A frozen encoder, `build` on the checkpoint's tensors (prefix handled). Missing or
    /// mis-shaped tensors fail naming them, and so does any tensor neither used nor foreign.
    pub fn load_frozen<M>(
        &self,
        weights: &Weights,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder) -> Result<M>,
    ) -> Result<M> {
        let model = build(self.var_builder(weights, weights.var_builder(dtype, device)))?;
        self.check_no_unexpected(weights)?;
        Ok(model)
    }

    /// A trainable encoder: `build` creates its Vars in `varmap` (named as in the checkpoint,
    /// prefix included), which are then set from `weights`, with [`Self::load_frozen`]'s checks.
    pub fn load_trainable<M>(
        &self,
        weights: &Weights,
        varmap: &VarMap,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder) -> Result<M>,
    ) -> Result<M> {
        let vb = VarBuilder::from_varmap(varmap, dtype, device);
        let model = build(self.var_builder(weights, vb))?;
        {
            let data = varmap.data().lock().unwrap();
            for (name, var) in data.iter() {
                let t = weights.load(name, Some(var.shape()), device)?;
                var.set(&t.to_dtype(dtype)?)?;
            }
        }
        self.check_no_unexpected(weights)?;
        Ok(model)
    }
}

/// Fails unless `layers` is non-empty and every entry is below `depth`.
pub(crate) fn check_layers(model: &str, layers: &[usize], depth: usize) -> Result<()> {
    if layers.is_empty() {
        candle_core::bail!("{model} features: ask for at least one layer");
    }
    if let Some(&i) = layers.iter().find(|&&i| i >= depth) {
        candle_core::bail!(
            "{model} features: layer {i} does not exist (the encoder has {depth} layers)"
        );
    }
    Ok(())
}

/// Runs `blocks` on `x` up to the deepest of `layers` (checked by [`check_layers`]) and
/// returns the state after each block asked for, in the order asked.
pub(crate) fn states_after<B>(
    blocks: &[B],
    mut x: Tensor,
    layers: &[usize],
    forward: impl Fn(&B, &Tensor) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let deepest = layers.iter().copied().max().unwrap_or(0);
    let mut after = Vec::with_capacity(deepest + 1);
    for block in &blocks[..=deepest] {
        x = forward(block, &x)?;
        after.push(x.clone());
    }
    Ok(layers.iter().map(|&i| after[i].clone()).collect())
}

/// ADP's pixel discriminator D_tau2 over an image encoder's feature maps: a 2D conv head
/// ([`crate::ConvHeadSet`], `heads.{i}` in `vb`) on each.
pub(crate) fn conv_pixel_discriminator(
    model: &str,
    extractor: Arc<dyn FeatureExtractor>,
    heads: &ConvHeadConfig,
    vb: VarBuilder,
) -> Result<PixelDiscriminator> {
    if heads.dims != HeadDims::Image {
        candle_core::bail!("the {model} pixel discriminator takes 2d conv heads (`dims = \"2d\"`)");
    }
    PixelDiscriminator::with_conv_heads(extractor, heads, vb)
}
