//! Convolutional discriminator heads on backbone feature maps (paper Sec. 3.2, Fig. 4: "2D
//! heads for images, 3D heads for video"). Each head is a stack of `conv 4x4 stride 2 ->
//! GroupNorm -> SiLU` blocks ending in a 1x1 conv to one channel; the logit map is averaged to
//! one logit per sample, and the logits of all heads are averaged.
//!
//! The paper gives no head architecture; this one follows the patch-discriminator heads of
//! DMD2 / LADD (strided convs with group norm). The 3D variant uses a `3x4x4` kernel, stride
//! `1x2x2`: it mixes neighbouring frames but keeps the frame count.

use adm_nn::{group_norm, GroupNorm};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::heads::Heads;

/// Images (features `(B, C, H, W)`) or video (features `(B, C, F, H, W)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeadDims {
    #[serde(rename = "2d")]
    Image,
    #[serde(rename = "3d")]
    Video,
}

/// The shape of every head of a [`ConvHeadSet`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvHeadConfig {
    pub dims: HeadDims,
    /// Stride-2 blocks before the logit conv (each halves H and W).
    pub layers: usize,
    /// Channels of every block.
    pub channels: usize,
    /// GroupNorm groups; must divide `channels`.
    pub groups: usize,
}

impl ConvHeadConfig {
    fn validate(&self) -> Result<()> {
        if self.channels == 0 || self.groups == 0 || !self.channels.is_multiple_of(self.groups) {
            candle_core::bail!(
                "conv heads: `groups` ({}) must be positive and divide `channels` ({})",
                self.groups,
                self.channels
            );
        }
        Ok(())
    }
}

const GROUP_NORM_EPS: f64 = 1e-5;
const KERNEL: usize = 4;
const STRIDE: usize = 2;
const PAD: usize = 1;

/// A convolution with PyTorch's default initialisation, `weight` (O, C, k...) and an optional
/// `bias` (O).
/// Image convs are adm-nn's conv2d, video convs adm-nn's conv3d (candle's conv2d backward
/// fails for stride 2 when H and W differ in parity: CANDLE_PITFALLS.md).
#[derive(Debug, Clone)]
enum Conv {
    Image(adm_nn::Conv2d),
    Video(adm_nn::Conv3d),
}

impl Conv {
    // The hyper-parameters of one conv; a struct for them would only be used here.
    #[allow(clippy::too_many_arguments)]
    fn new(
        dims: HeadDims,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
        with_bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        match dims {
            HeadDims::Image => {
                let weight = vb.get_with_hints(
                    (out_channels, in_channels, kernel, kernel),
                    "weight",
                    candle_nn::init::DEFAULT_KAIMING_NORMAL,
                )?;
                let bound = 1.0 / ((in_channels * kernel * kernel) as f64).sqrt();
                let bias = with_bias
                    .then(|| {
                        vb.get_with_hints(
                            out_channels,
                            "bias",
                            Init::Uniform {
                                lo: -bound,
                                up: bound,
                            },
                        )
                    })
                    .transpose()?;
                let cfg = adm_nn::Conv2dConfig {
                    padding: pad,
                    stride,
                };
                Ok(Self::Image(adm_nn::Conv2d::new(weight, bias, cfg)))
            }
            HeadDims::Video => {
                // 3 frames with one frame of zero padding each side when the spatial kernel
                // is 4x4; a pointwise conv stays pointwise in time.
                let (kt, pt) = if kernel == 1 { (1, 0) } else { (3, 1) };
                let cfg = adm_nn::Conv3dConfig {
                    stride: [1, stride, stride],
                    padding: [pt, pad, pad],
                    ..Default::default()
                };
                let build = if with_bias {
                    adm_nn::conv3d
                } else {
                    adm_nn::conv3d_no_bias
                };
                Ok(Self::Video(build(
                    in_channels,
                    out_channels,
                    [kt, kernel, kernel],
                    cfg,
                    vb,
                )?))
            }
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Video(conv) => conv.forward(x),
            Self::Image(conv) => conv.forward(x),
        }
    }
}

/// One head: `layers` x (conv 4x4 stride 2 -> GroupNorm -> SiLU), then a 1x1 conv (no bias)
/// to one channel, averaged over every position to a (B,) logit.
#[derive(Debug, Clone)]
pub struct ConvHead {
    blocks: Vec<(Conv, GroupNorm)>,
    to_logits: Conv,
    dims: HeadDims,
}

impl ConvHead {
    pub fn new(in_channels: usize, cfg: &ConvHeadConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let blocks = (0..cfg.layers)
            .map(|i| {
                let vb = vb.pp(format!("blocks.{i}"));
                let c_in = if i == 0 { in_channels } else { cfg.channels };
                let conv = Conv::new(
                    cfg.dims,
                    c_in,
                    cfg.channels,
                    KERNEL,
                    STRIDE,
                    PAD,
                    true,
                    vb.pp("conv"),
                )?;
                let norm = group_norm(cfg.groups, cfg.channels, GROUP_NORM_EPS, vb.pp("norm"))?;
                Ok((conv, norm))
            })
            .collect::<Result<_>>()?;
        let last = if cfg.layers == 0 {
            in_channels
        } else {
            cfg.channels
        };
        Ok(Self {
            blocks,
            // No bias on the logit conv: the GroupNorm shift before it already gives the head
            // an offset, and under the hinge loss a logit bias gets exactly zero gradient
            // while every margin is active (the real and fake terms cancel).
            to_logits: Conv::new(cfg.dims, last, 1, 1, 1, 0, false, vb.pp("to_logits"))?,
            dims: cfg.dims,
        })
    }
}

impl Module for ConvHead {
    /// (B,) logits of `features`: (B, C, H, W) for image heads, (B, C, F, H, W) for video.
    fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let rank = match self.dims {
            HeadDims::Image => 4,
            HeadDims::Video => 5,
        };
        if features.rank() != rank {
            candle_core::bail!(
                "a {:?} conv head takes rank-{rank} features, got shape {:?}",
                self.dims,
                features.shape()
            );
        }
        let mut h = features.clone();
        for (i, (conv, norm)) in self.blocks.iter().enumerate() {
            let spatial = &h.dims()[rank - 2..];
            if spatial.iter().any(|&n| n < KERNEL - 2 * PAD) {
                candle_core::bail!(
                    "conv head block {i}: feature map {:?} is too small for another stride-2 \
                     4x4 conv (use fewer `layers` or an earlier tap)",
                    features.dims()
                );
            }
            h = norm.forward_silu(&conv.forward(&h)?)?;
        }
        let logits = self.to_logits.forward(&h)?;
        logits.flatten_from(1)?.mean(1)
    }
}

/// One [`ConvHead`] per feature tap, named `heads.{i}`; the logit is the mean over heads.
pub type ConvHeadSet = Heads<ConvHead>;

impl ConvHeadSet {
    pub fn new(channels: &[usize], cfg: &ConvHeadConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(channels, vb, |c, vb| ConvHead::new(c, cfg, vb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heads::DiscriminatorHeads;
    use adm_nn::{assert_every_var_has_grad, check_gradients, GradCheck, SeededVarMap};
    use candle_core::{DType, Device};
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::collections::HashMap;

    fn cfg(dims: HeadDims, layers: usize) -> ConvHeadConfig {
        ConvHeadConfig {
            dims,
            layers,
            channels: 4,
            groups: 2,
        }
    }

    fn randn(seed: u64, shape: &[usize]) -> Tensor {
        adm_nn::randn(&mut StdRng::seed_from_u64(seed), shape, &Device::Cpu).unwrap()
    }

    /// Finite differences of a head (f64) with respect to its input and to every one of its
    /// parameters: the parameters are passed as inputs and the head is rebuilt from them.
    fn check_head(dims: HeadDims, layers: usize, shape: &[usize]) -> Result<()> {
        let cfg = cfg(dims, layers);
        let seeded = SeededVarMap::new(3);
        ConvHead::new(shape[1], &cfg, seeded.var_builder(DType::F64, &Device::Cpu))?;
        let mut names: Vec<String> = seeded
            .varmap()
            .data()
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        names.sort();
        let params = crate::varmap_tensors(seeded.varmap());
        let mut inputs = vec![randn(1, shape).to_dtype(DType::F64)?];
        // Non-trivial norm weights and biases.
        inputs.extend(names.iter().map(|n| {
            let t = &params[n];
            (t + randn(5, t.dims()).to_dtype(DType::F64).unwrap() * 0.3).unwrap()
        }));
        let report = check_gradients(
            |xs| {
                let map: HashMap<String, Tensor> =
                    names.iter().cloned().zip(xs[1..].iter().cloned()).collect();
                let vb = VarBuilder::from_tensors(map, DType::F64, &Device::Cpu);
                ConvHead::new(shape[1], &cfg, vb)?.forward(&xs[0])
            },
            &inputs,
            GradCheck {
                max_probes_per_input: 8,
                ..GradCheck::default()
            },
        )?;
        println!("{dims:?} head {shape:?}: {report:?}");
        assert!(report.max_abs_numeric > 1e-4, "{report:?}");
        Ok(())
    }

    #[test]
    fn image_head_matches_finite_differences() -> Result<()> {
        // H and W of different parity: the case candle's stride-2 conv2d backward gets wrong.
        check_head(HeadDims::Image, 2, &[2, 3, 6, 5])
    }

    #[test]
    fn video_head_matches_finite_differences() -> Result<()> {
        check_head(HeadDims::Video, 1, &[2, 3, 3, 4, 5])
    }

    #[test]
    fn every_head_var_gets_a_gradient_and_shapes_are_checked() -> Result<()> {
        for (dims, shapes) in [
            (HeadDims::Image, vec![vec![2, 3, 8, 8], vec![2, 5, 4, 4]]),
            (
                HeadDims::Video,
                vec![vec![2, 3, 2, 8, 8], vec![2, 5, 2, 4, 4]],
            ),
        ] {
            let seeded = SeededVarMap::new(9);
            let set = ConvHeadSet::new(
                &[3, 5],
                &cfg(dims, 2),
                seeded.var_builder(DType::F32, &Device::Cpu),
            )?;
            let features: Vec<Tensor> = shapes.iter().map(|s| randn(2, s)).collect();
            let logits = set.logits(&features)?;
            assert_eq!(logits.dims(), &[2]);
            assert_every_var_has_grad(seeded.varmap(), &logits.sum_all()?.backward()?)?;

            let err = set.logits(&features[..1]).unwrap_err().to_string();
            assert!(err.contains("2 heads but 1 feature maps"), "{err}");
            // A 1x1 map: too small for a stride-2 4x4 conv.
            let r = features[1].rank();
            let one_by_one = features[1].narrow(r - 2, 0, 1)?.narrow(r - 1, 0, 1)?;
            let tiny = vec![features[0].clone(), one_by_one];
            let err = set.logits(&tiny).unwrap_err().to_string();
            assert!(err.contains("too small"), "{err}");
        }
        let err = ConvHead::new(
            3,
            &ConvHeadConfig {
                groups: 3,
                ..cfg(HeadDims::Image, 1)
            },
            SeededVarMap::new(0).var_builder(DType::F32, &Device::Cpu),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("divide `channels`"), "{err}");
        Ok(())
    }

    /// The latent discriminator with conv heads on a frozen tiny SDXL-like UNet (f64): its
    /// gradient with respect to the noisy input matches finite differences (the generator
    /// loss needs it), and every head Var gets a gradient.
    #[test]
    fn latent_discriminator_on_a_unet() -> Result<()> {
        use crate::backbone::Condition;
        use crate::unet_2d::{Config, OneOrMany, UNet2DConditionModel, UNetBackbone};
        use crate::LatentDiscriminator;
        use adm_diffusion::{Schedule, ScheduleConfig};

        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/unet/sdxl_tiny/config.json");
        let mut cfg: Config = crate::loading::read_json(&path)?;
        cfg.block_out_channels = vec![8, 16];
        cfg.norm_num_groups = 4;
        cfg.cross_attention_dim = OneOrMany::One(8);
        cfg.addition_time_embed_dim = Some(4);
        cfg.projection_class_embeddings_input_dim = Some(4 + 6 * 4);
        let dev = Device::Cpu;
        let unet_vars = SeededVarMap::new(4);
        UNet2DConditionModel::new(unet_vars.var_builder(DType::F64, &dev), &cfg)?;
        let frozen = crate::frozen_var_builder(unet_vars.varmap(), DType::F64, &dev)?;
        let backbone = UNetBackbone::new(
            UNet2DConditionModel::new(frozen, &cfg)?,
            Schedule::new(&ScheduleConfig::sdxl())?,
        );
        let heads = SeededVarMap::new(6);
        let disc = LatentDiscriminator::with_conv_heads(
            std::sync::Arc::new(backbone),
            &["down_blocks.1".to_string(), "up_blocks.0".to_string()],
            &cfg_heads(),
            heads.var_builder(DType::F64, &dev),
        )?;
        let f64_randn = |seed, shape: &[usize]| randn(seed, shape).to_dtype(DType::F64);
        let cond = Condition::new()
            .with("encoder_hidden_states", f64_randn(1, &[2, 3, 8])?)
            .with("text_embeds", f64_randn(2, &[2, 4])?)
            .with(
                "time_ids",
                Tensor::new(&[[32f64, 32., 0., 0., 32., 32.]; 2], &dev)?,
            );
        let t = Tensor::new(&[700f64, 120.0], &dev)?;
        let x = f64_randn(3, &[2, 4, 8, 8])?;

        let logits = disc.logits(&x, &t, &cond)?;
        assert_eq!(logits.dims(), &[2]);
        assert_every_var_has_grad(heads.varmap(), &logits.sum_all()?.backward()?)?;
        let report = check_gradients(
            |xs| disc.logits(&xs[0], &t, &cond),
            &[x],
            GradCheck {
                max_probes_per_input: 6,
                ..GradCheck::default()
            },
        )?;
        println!("latent discriminator on a UNet: {report:?}");
        assert!(report.max_abs_numeric > 1e-5, "{report:?}");
        Ok(())
    }

    fn cfg_heads() -> ConvHeadConfig {
        ConvHeadConfig {
            dims: HeadDims::Image,
            layers: 1,
            channels: 8,
            groups: 4,
        }
    }
}
