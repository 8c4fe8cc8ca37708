//! Discriminators: frozen feature extractors with small trainable heads on several of their
//! features; the logits of all heads are averaged (paper Sec. 3.2, Fig. 4).

use std::sync::Arc;

use adm_nn::{linear, Linear};
use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

use crate::backbone::{Backbone, Condition};
use crate::conv_heads::{ConvHeadConfig, ConvHeadSet};

/// Trainable heads on a list of feature maps, one logit per sample.
pub trait DiscriminatorHeads: Send + Sync {
    /// (B,) logits averaged over the heads.
    fn logits(&self, features: &[Tensor]) -> Result<Tensor>;
}

/// A head on a (B, C) feature vector: Linear -> SiLU -> Linear -> (B,) logits.
#[derive(Debug, Clone)]
pub struct VectorHead {
    linear_1: Linear,
    linear_2: Linear,
}

impl VectorHead {
    pub fn new(channels: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: linear(channels, hidden, vb.pp("linear_1"))?,
            linear_2: linear(hidden, 1, vb.pp("linear_2"))?,
        })
    }
}

impl Module for VectorHead {
    fn forward(&self, features: &Tensor) -> Result<Tensor> {
        if features.rank() != 2 {
            candle_core::bail!(
                "a vector head takes (batch, channels) features, got shape {:?}",
                features.shape()
            );
        }
        self.linear_2
            .forward(&adm_nn::silu(&self.linear_1.forward(features)?)?)?
            .squeeze(1)
    }
}

/// One head per feature tap, named `heads.{i}`; the discriminator's logit is their mean.
#[derive(Debug, Clone)]
pub struct Heads<H> {
    heads: Vec<H>,
}

/// Vector heads on pooled features (the toy's).
pub type HeadSet = Heads<VectorHead>;

impl<H> Heads<H> {
    /// Head `i` is `build(channels[i], vb.pp("heads.{i}"))`.
    pub fn build(
        channels: &[usize],
        vb: VarBuilder,
        build: impl Fn(usize, VarBuilder) -> Result<H>,
    ) -> Result<Self> {
        if channels.is_empty() {
            candle_core::bail!("a discriminator needs at least one feature tap");
        }
        let heads = channels
            .iter()
            .enumerate()
            .map(|(i, &c)| build(c, vb.pp(format!("heads.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self { heads })
    }
}

impl HeadSet {
    /// Vector heads with `hidden` units for features with the given channel counts.
    pub fn new(channels: &[usize], hidden: usize, vb: VarBuilder) -> Result<Self> {
        Self::build(channels, vb, |c, vb| VectorHead::new(c, hidden, vb))
    }
}

impl<H: Module + Send + Sync> DiscriminatorHeads for Heads<H> {
    fn logits(&self, features: &[Tensor]) -> Result<Tensor> {
        if features.len() != self.heads.len() {
            candle_core::bail!(
                "{} heads but {} feature maps",
                self.heads.len(),
                features.len()
            );
        }
        let per_head = self
            .heads
            .iter()
            .zip(features)
            .map(|(head, f)| head.forward(f))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&per_head, 0)?.mean(0)
    }
}

/// The latent discriminator D_tau: the frozen teacher backbone read at several taps, with a
/// trainable head on each. Gradients reach its input (the generator loss needs them) and the
/// heads, never the backbone, whose tensors are not Vars.
pub struct LatentDiscriminator {
    backbone: Arc<dyn Backbone>,
    taps: Vec<String>,
    heads: Box<dyn DiscriminatorHeads>,
}

impl LatentDiscriminator {
    /// Vector heads (`HeadSet`): for backbones whose taps are (B, C) vectors (the toy).
    pub fn new(
        backbone: Arc<dyn Backbone>,
        taps: &[String],
        head_hidden: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let channels = tap_channels(backbone.as_ref(), taps)?;
        Ok(Self {
            heads: Box::new(HeadSet::new(&channels, head_hidden, vb)?),
            backbone,
            taps: taps.to_vec(),
        })
    }

    /// Convolutional heads (`ConvHeadSet`): for image (B, C, H, W) or video (B, C, F, H, W)
    /// feature maps.
    pub fn with_conv_heads(
        backbone: Arc<dyn Backbone>,
        taps: &[String],
        cfg: &ConvHeadConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let channels = tap_channels(backbone.as_ref(), taps)?;
        Ok(Self {
            heads: Box::new(ConvHeadSet::new(&channels, cfg, vb)?),
            backbone,
            taps: taps.to_vec(),
        })
    }

    pub fn logits(&self, x_t: &Tensor, t: &Tensor, cond: &Condition) -> Result<Tensor> {
        let features = self.backbone.features(x_t, t, cond, &self.taps)?;
        self.heads.logits(&features)
    }
}

/// The channel count of each tap in `taps`, or an error naming a tap the backbone lacks.
fn tap_channels(backbone: &dyn Backbone, taps: &[String]) -> Result<Vec<usize>> {
    let offered = backbone.feature_taps();
    taps.iter()
        .map(|tap| {
            offered
                .iter()
                .find(|o| &o.name == tap)
                .map(|o| o.channels)
                .ok_or_else(|| {
                    let names: Vec<&str> = offered.iter().map(|o| o.name.as_str()).collect();
                    candle_core::Error::Msg(format!(
                        "discriminator tap `{tap}` is not offered by the backbone (taps: {})",
                        names.join(", ")
                    ))
                })
        })
        .collect()
}

/// A frozen network whose intermediate activations a pixel-space discriminator reads.
pub trait FeatureExtractor: Send + Sync {
    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>>;
    fn feature_channels(&self) -> Vec<usize>;
}

/// A shared extractor (e.g. one chosen at run time) is an extractor.
impl<E: FeatureExtractor + ?Sized> FeatureExtractor for std::sync::Arc<E> {
    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        (**self).features(x)
    }

    fn feature_channels(&self) -> Vec<usize> {
        (**self).feature_channels()
    }
}

/// The pixel discriminator D_tau2 of ADP: a frozen feature extractor (SAM on images; on the
/// toy an independent random network) plus trainable heads. It sees clean samples, no
/// timestep.
pub struct PixelDiscriminator {
    extractor: Arc<dyn FeatureExtractor>,
    heads: Box<dyn DiscriminatorHeads>,
}

impl PixelDiscriminator {
    pub fn new(
        extractor: Arc<dyn FeatureExtractor>,
        head_hidden: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            heads: Box::new(HeadSet::new(
                &extractor.feature_channels(),
                head_hidden,
                vb,
            )?),
            extractor,
        })
    }

    /// Convolutional heads (`ConvHeadSet`) on (B, C, H, W) feature maps (SAM's).
    pub fn with_conv_heads(
        extractor: Arc<dyn FeatureExtractor>,
        cfg: &ConvHeadConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            heads: Box::new(ConvHeadSet::new(&extractor.feature_channels(), cfg, vb)?),
            extractor,
        })
    }

    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.heads.logits(&self.extractor.features(x)?)
    }
}

/// The toy's stand-in for the pixel backbone: a fixed random MLP (Linear -> SiLU per layer),
/// independent of the teacher, tapped after every layer. Build it from a frozen VarBuilder.
#[derive(Debug, Clone)]
pub struct RandomFeatureMlp {
    layers: Vec<Linear>,
    width: usize,
}

impl RandomFeatureMlp {
    pub fn new(in_channels: usize, width: usize, depth: usize, vb: VarBuilder) -> Result<Self> {
        if depth == 0 || width == 0 {
            candle_core::bail!("the random feature network needs depth and width > 0");
        }
        let layers = (0..depth)
            .map(|i| {
                linear(
                    if i == 0 { in_channels } else { width },
                    width,
                    vb.pp(format!("layers.{i}")),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers, width })
    }
}

impl FeatureExtractor for RandomFeatureMlp {
    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut h = x.clone();
        let mut out = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            h = adm_nn::silu(&layer.forward(&h)?)?;
            out.push(h.clone());
        }
        Ok(out)
    }

    fn feature_channels(&self) -> Vec<usize> {
        vec![self.width; self.layers.len()]
    }
}
