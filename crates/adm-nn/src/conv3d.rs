//! 3-D convolution (candle 0.11.1 has none) as a sum of 2-D convolutions over the temporal
//! kernel taps, with zero, causal and replicate temporal padding.
//!
//! For every temporal tap `a` the frames it sees (`a·dt + j·st`, j < F') are folded into the
//! batch, `(B·F', C, H, W)`, and convolved with that tap's 2-D kernel `weight[:, :, a]`; the
//! taps' results are summed. All padding is applied explicitly and the input is cropped to the
//! exact extent the convolution reads, so candle's conv2d is always called with padding 0 and
//! an input whose size is exactly `(out - 1)·stride + dilation·(k - 1) + 1` on both axes. That
//! sidesteps candle's conv2d backward bug for stride 2 with H and W of different parity
//! (its output padding is computed from H only and applied to W too; CANDLE_PITFALLS.md).
//! When the H and W strides or dilations differ (candle's conv2d takes one of each), the
//! rows are folded into the batch as well and each (temporal, row) tap becomes a 1×kw conv2d.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// How frames are added before and after the clip along the temporal axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TemporalPadding {
    /// `padding[0]` zero frames on both sides (PyTorch `Conv3d`).
    #[default]
    Symmetric,
    /// `dilation[0]·(kt - 1)` frames before the clip and none after, so output frame j only
    /// sees input frames ≤ j·stride: zero frames, or copies of the first frame with
    /// `replicate` (CogVideoX `CogVideoXCausalConv3d`). `padding[0]` is ignored.
    Causal { replicate: bool },
    /// `front` / `back` frames, zeros or copies of the first / last frame with `replicate`.
    /// `padding[0]` is ignored.
    Explicit {
        front: usize,
        back: usize,
        replicate: bool,
    },
}

/// Hyper-parameters of [`Conv3d`]; arrays are indexed (time, height, width).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv3dConfig {
    pub stride: [usize; 3],
    /// Zero padding on both sides of each axis; the temporal entry is used only with
    /// [`TemporalPadding::Symmetric`].
    pub padding: [usize; 3],
    pub dilation: [usize; 3],
    pub groups: usize,
    pub temporal_padding: TemporalPadding,
}

impl Default for Conv3dConfig {
    fn default() -> Self {
        Self {
            stride: [1; 3],
            padding: [0; 3],
            dilation: [1; 3],
            groups: 1,
            temporal_padding: TemporalPadding::Symmetric,
        }
    }
}

/// Output length of a padded axis, or an error when the (dilated) kernel does not fit.
fn out_len(padded: usize, k: usize, stride: usize, dilation: usize, axis: &str) -> Result<usize> {
    let span = dilation * (k - 1) + 1;
    if padded < span {
        candle_core::bail!(
            "conv3d: padded {axis} size {padded} is smaller than the kernel span {span}"
        )
    }
    Ok((padded - span) / stride + 1)
}

/// Selects `count` entries `start + step·j` along `dim` (a narrow when `step` is 1).
fn strided_select(
    x: &Tensor,
    dim: usize,
    start: usize,
    count: usize,
    step: usize,
) -> Result<Tensor> {
    if step == 1 {
        x.narrow(dim, start, count)
    } else {
        let idx: Vec<u32> = (0..count).map(|j| (start + step * j) as u32).collect();
        let idx = Tensor::from_vec(idx, count, x.device())?;
        x.index_select(&idx, dim)
    }
}

/// 3-D convolution of `x` (B, C, F, H, W) with `weight` (O, C / groups, kt, kh, kw) and an
/// optional `bias` (O); returns (B, O, F', H', W'), contiguous.
pub fn conv3d_forward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &Conv3dConfig,
) -> Result<Tensor> {
    let (b, c, f, h, w) = x.dims5()?;
    let (o, c_per_group, kt, kh, kw) = weight.dims5()?;
    let g = cfg.groups;
    if g == 0 || c != c_per_group * g || o / g * g != o {
        candle_core::bail!(
            "conv3d: input channels {c}, weight {:?} and groups {g} do not match",
            weight.dims()
        )
    }
    if cfg.stride.contains(&0) || cfg.dilation.contains(&0) || kt * kh * kw == 0 {
        candle_core::bail!("conv3d: strides, dilations and kernel sizes must be positive")
    }
    let [st, sh, sw] = cfg.stride;
    let [dt, dh, dw] = cfg.dilation;
    let [_, ph, pw] = cfg.padding;

    // Explicit padding: temporal (zeros or replicate), then spatial zeros.
    let (front, back, replicate) = match cfg.temporal_padding {
        TemporalPadding::Symmetric => (cfg.padding[0], cfg.padding[0], false),
        TemporalPadding::Causal { replicate } => (dt * (kt - 1), 0, replicate),
        TemporalPadding::Explicit {
            front,
            back,
            replicate,
        } => (front, back, replicate),
    };
    let x = if replicate {
        x.pad_with_same(2, front, back)?
    } else {
        x.pad_with_zeros(2, front, back)?
    };
    let x = x.pad_with_zeros(3, ph, ph)?.pad_with_zeros(4, pw, pw)?;
    let (fp, hp, wp) = (f + front + back, h + 2 * ph, w + 2 * pw);
    let fo = out_len(fp, kt, st, dt, "temporal")?;
    let ho = out_len(hp, kh, sh, dh, "height")?;
    let wo = out_len(wp, kw, sw, dw, "width")?;
    // Crop to the exact extent read (see the module docs), and put frames next to the batch.
    let hx = (ho - 1) * sh + dh * (kh - 1) + 1;
    let wx = (wo - 1) * sw + dw * (kw - 1) + 1;
    let x = x
        .narrow(3, 0, hx)?
        .narrow(4, 0, wx)?
        .permute((0, 2, 1, 3, 4))?
        .contiguous()?; // (B, Fp, C, Hx, Wx)

    let mut acc: Option<Tensor> = None;
    let mut add = |t: Tensor| -> Result<()> {
        acc = Some(match acc.take() {
            None => t,
            Some(a) => (a + t)?,
        });
        Ok(())
    };
    let out = if sh == sw && dh == dw {
        for a in 0..kt {
            let frames = strided_select(&x, 1, a * dt, fo, st)?.reshape((b * fo, c, hx, wx))?;
            let k = weight.narrow(2, a, 1)?.squeeze(2)?.contiguous()?; // (O, C/g, kh, kw)
            add(frames.conv2d(&k, 0, sh, dh, g)?)?; // (B·F', O, H', W')
        }
        acc.expect("kt > 0")
            .reshape((b, fo, o, ho, wo))?
            .permute((0, 2, 1, 3, 4))?
    } else {
        for a in 0..kt {
            let frames = strided_select(&x, 1, a * dt, fo, st)?; // (B, F', C, Hx, Wx)
            for i in 0..kh {
                let rows = strided_select(&frames, 3, i * dh, ho, sh)? // (B, F', C, H', Wx)
                    .permute((0, 1, 3, 2, 4))?
                    .reshape((b * fo * ho, c, 1, wx))?;
                let k = weight
                    .narrow(2, a, 1)?
                    .narrow(3, i, 1)?
                    .squeeze(2)?
                    .contiguous()?; // (O, C/g, 1, kw)
                add(rows.conv2d(&k, 0, sw, dw, g)?)?; // (B·F'·H', O, 1, W')
            }
        }
        acc.expect("kt·kh > 0")
            .reshape((b, fo, ho, o, wo))?
            .permute((0, 3, 1, 2, 4))?
    };
    match bias {
        Some(bias) => out.broadcast_add(&bias.reshape((1, o, 1, 1, 1))?),
        None => out.contiguous(),
    }
}

/// A 3-D convolution layer with PyTorch's parameter names and layout: `weight`
/// (out, in / groups, kt, kh, kw) and `bias` (out).
#[derive(Debug, Clone)]
pub struct Conv3d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: Conv3dConfig,
}

impl Conv3d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: Conv3dConfig) -> Self {
        Self {
            weight,
            bias,
            config,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn config(&self) -> &Conv3dConfig {
        &self.config
    }
}

impl Module for Conv3d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        conv3d_forward(xs, &self.weight, self.bias.as_ref(), &self.config)
    }
}

fn conv3d_weight(
    in_channels: usize,
    out_channels: usize,
    kernel: [usize; 3],
    cfg: &Conv3dConfig,
    vb: &VarBuilder,
) -> Result<Tensor> {
    let g = cfg.groups;
    if g == 0 || in_channels / g * g != in_channels || out_channels / g * g != out_channels {
        candle_core::bail!(
            "conv3d: channels {in_channels} -> {out_channels} not divisible by groups {}",
            cfg.groups
        )
    }
    let [kt, kh, kw] = kernel;
    vb.get_with_hints(
        (out_channels, in_channels / cfg.groups, kt, kh, kw),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )
}

/// Builds a [`Conv3d`] with bias, loading `weight` / `bias` or creating them with PyTorch's
/// default initialisation scale (Kaiming for the weight, U(±1/√fan_in) for the bias).
pub fn conv3d(
    in_channels: usize,
    out_channels: usize,
    kernel: [usize; 3],
    cfg: Conv3dConfig,
    vb: VarBuilder,
) -> Result<Conv3d> {
    let weight = conv3d_weight(in_channels, out_channels, kernel, &cfg, &vb)?;
    let fan_in = (in_channels / cfg.groups) * kernel.iter().product::<usize>();
    let bound = 1.0 / (fan_in as f64).sqrt();
    let bias = vb.get_with_hints(
        out_channels,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Ok(Conv3d::new(weight, Some(bias), cfg))
}

/// Builds a [`Conv3d`] without bias, loading or creating `weight`.
pub fn conv3d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel: [usize; 3],
    cfg: Conv3dConfig,
    vb: VarBuilder,
) -> Result<Conv3d> {
    let weight = conv3d_weight(in_channels, out_channels, kernel, &cfg, &vb)?;
    Ok(Conv3d::new(weight, None, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_every_var_has_grad, check_gradients, GradCheck};
    use crate::test_util::{assert_close, rand_tensor, to_vec};
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// Nested-loop reference, padding handled by index arithmetic.
    fn naive(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        cfg: &Conv3dConfig,
    ) -> Result<(Vec<f64>, Vec<usize>)> {
        let (b, c, f, h, wd) = x.dims5()?;
        let (o, cg, kt, kh, kw) = w.dims5()?;
        let (xv, wv) = (to_vec(x)?, to_vec(w)?);
        let bv = match bias {
            Some(t) => to_vec(t)?,
            None => vec![0.0; o],
        };
        let g = cfg.groups;
        let [st, sh, sw] = cfg.stride;
        let [dt, dh, dw] = cfg.dilation;
        let [_, ph, pw] = cfg.padding;
        let (front, back, replicate) = match cfg.temporal_padding {
            TemporalPadding::Symmetric => (cfg.padding[0], cfg.padding[0], false),
            TemporalPadding::Causal { replicate } => (dt * (kt - 1), 0, replicate),
            TemporalPadding::Explicit {
                front,
                back,
                replicate,
            } => (front, back, replicate),
        };
        let out =
            |n: usize, p: usize, k: usize, s: usize, d: usize| (n + p - d * (k - 1) - 1) / s + 1;
        let fo = out(f, front + back, kt, st, dt);
        let ho = out(h, 2 * ph, kh, sh, dh);
        let wo = out(wd, 2 * pw, kw, sw, dw);
        let mut y = Vec::with_capacity(b * o * fo * ho * wo);
        for bi in 0..b {
            #[allow(clippy::needless_range_loop)]
            for oi in 0..o {
                let grp = oi / (o / g);
                for t in 0..fo {
                    for i in 0..ho {
                        for j in 0..wo {
                            let mut s = bv[oi];
                            for cl in 0..cg {
                                let ci = grp * cg + cl;
                                for a in 0..kt {
                                    let tt = (t * st + a * dt) as isize - front as isize;
                                    let tt = if tt < 0 {
                                        if replicate {
                                            0
                                        } else {
                                            continue;
                                        }
                                    } else if tt as usize >= f {
                                        if replicate {
                                            f - 1
                                        } else {
                                            continue;
                                        }
                                    } else {
                                        tt as usize
                                    };
                                    for p in 0..kh {
                                        let ii = (i * sh + p * dh) as isize - ph as isize;
                                        if ii < 0 || ii as usize >= h {
                                            continue;
                                        }
                                        for q in 0..kw {
                                            let jj = (j * sw + q * dw) as isize - pw as isize;
                                            if jj < 0 || jj as usize >= wd {
                                                continue;
                                            }
                                            let xi = (((bi * c + ci) * f + tt) * h + ii as usize)
                                                * wd
                                                + jj as usize;
                                            let wi = (((oi * cg + cl) * kt + a) * kh + p) * kw + q;
                                            s += xv[xi] * wv[wi];
                                        }
                                    }
                                }
                            }
                            y.push(s);
                        }
                    }
                }
            }
        }
        Ok((y, vec![b, o, fo, ho, wo]))
    }

    fn cases() -> Vec<(&'static str, Conv3dConfig)> {
        let d = Conv3dConfig::default();
        vec![
            ("plain", d),
            (
                "padded",
                Conv3dConfig {
                    padding: [1, 1, 1],
                    ..d
                },
            ),
            // Stride 2 on H = 5 and W = 4 (different parity): candle's own conv2d backward
            // fails on such a shape.
            (
                "stride2",
                Conv3dConfig {
                    stride: [2, 2, 2],
                    padding: [1, 1, 0],
                    ..d
                },
            ),
            (
                "dilated",
                Conv3dConfig {
                    dilation: [2, 2, 2],
                    padding: [0, 2, 1],
                    ..d
                },
            ),
            (
                "groups",
                Conv3dConfig {
                    groups: 2,
                    padding: [0, 1, 1],
                    stride: [1, 2, 2],
                    ..d
                },
            ),
            (
                "uneven_hw",
                Conv3dConfig {
                    stride: [2, 1, 2],
                    dilation: [1, 2, 1],
                    padding: [1, 2, 1],
                    ..d
                },
            ),
            (
                "causal_zeros",
                Conv3dConfig {
                    padding: [0, 1, 1],
                    temporal_padding: TemporalPadding::Causal { replicate: false },
                    ..d
                },
            ),
            (
                "causal_replicate_strided",
                Conv3dConfig {
                    stride: [2, 1, 1],
                    padding: [0, 1, 1],
                    temporal_padding: TemporalPadding::Causal { replicate: true },
                    ..d
                },
            ),
            (
                "explicit_replicate",
                Conv3dConfig {
                    temporal_padding: TemporalPadding::Explicit {
                        front: 1,
                        back: 2,
                        replicate: true,
                    },
                    ..d
                },
            ),
        ]
    }

    const X_SHAPE: [usize; 5] = [2, 2, 4, 5, 4];

    #[test]
    fn values_match_nested_loops() -> Result<()> {
        let x = rand_tensor(&X_SHAPE, 1, 1.0)?;
        for (name, cfg) in cases() {
            let w = rand_tensor(&[4, 2 / cfg.groups, 2, 3, 2], 2, 1.0)?;
            let bias = rand_tensor(&[4], 3, 1.0)?;
            for bias in [Some(&bias), None] {
                let got = conv3d_forward(&x, &w, bias, &cfg)?;
                let (want, dims) = naive(&x, &w, bias, &cfg)?;
                assert_eq!(got.dims(), dims.as_slice(), "{name}");
                assert!(got.is_contiguous(), "{name}");
                assert_close(&to_vec(&got)?, &want, 1e-12);
            }
        }
        // A single-frame temporal kernel equals candle's conv2d frame by frame.
        let w = rand_tensor(&[3, 2, 1, 3, 3], 4, 1.0)?;
        let cfg = Conv3dConfig {
            padding: [0, 1, 1],
            ..Default::default()
        };
        let got = conv3d_forward(&x, &w, None, &cfg)?;
        for t in 0..X_SHAPE[2] {
            let frame = x.narrow(2, t, 1)?.squeeze(2)?.contiguous()?;
            let want = frame.conv2d(&w.squeeze(2)?.contiguous()?, 1, 1, 1, 1)?;
            assert_close(
                &to_vec(&got.narrow(2, t, 1)?.squeeze(2)?)?,
                &to_vec(&want)?,
                1e-12,
            );
        }
        Ok(())
    }

    #[test]
    fn causal_output_frame_does_not_see_the_future() -> Result<()> {
        let cfg = Conv3dConfig {
            padding: [0, 1, 1],
            temporal_padding: TemporalPadding::Causal { replicate: true },
            ..Default::default()
        };
        let x = rand_tensor(&[1, 2, 5, 3, 3], 5, 1.0)?;
        let w = rand_tensor(&[2, 2, 3, 3, 3], 6, 1.0)?;
        let y = conv3d_forward(&x, &w, None, &cfg)?;
        assert_eq!(y.dims(), &[1, 2, 5, 3, 3]);
        // Change the last two frames: the first three output frames must not move.
        let x2 = Tensor::cat(
            &[&x.narrow(2, 0, 3)?, &rand_tensor(&[1, 2, 2, 3, 3], 7, 1.0)?],
            2,
        )?;
        let y2 = conv3d_forward(&x2, &w, None, &cfg)?;
        assert_close(
            &to_vec(&y.narrow(2, 0, 3)?)?,
            &to_vec(&y2.narrow(2, 0, 3)?)?,
            0.0,
        );
        Ok(())
    }

    #[test]
    fn gradients_wrt_input_weight_and_bias() -> Result<()> {
        let x = rand_tensor(&X_SHAPE, 8, 1.0)?;
        for (name, cfg) in cases() {
            let w = rand_tensor(&[4, 2 / cfg.groups, 2, 3, 2], 9, 1.0)?;
            let bias = rand_tensor(&[4], 10, 1.0)?;
            let r = check_gradients(
                |xs| conv3d_forward(&xs[0], &xs[1], Some(&xs[2]), &cfg),
                &[x.clone(), w, bias],
                GradCheck::default(),
            )
            .map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
            assert!(r.probes > 0 && r.max_abs_numeric > 1e-3, "{name}: {r:?}");
        }
        Ok(())
    }

    #[test]
    fn module_loads_pytorch_names_and_every_var_gets_a_gradient() -> Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let cfg = Conv3dConfig {
            padding: [1, 1, 1],
            ..Default::default()
        };
        let conv = conv3d(2, 3, [3, 3, 3], cfg, vb.pp("conv"))?;
        let conv_nb = conv3d_no_bias(3, 2, [1, 1, 1], Default::default(), vb.pp("proj"))?;
        assert_eq!(conv.weight().dims(), &[3, 2, 3, 3, 3]);
        assert!(conv_nb.bias().is_none());
        let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["conv.bias", "conv.weight", "proj.weight"]);
        let x = rand_tensor(&[1, 2, 3, 4, 4], 11, 1.0)?;
        let y = conv_nb.forward(&conv.forward(&x)?)?;
        assert_eq!(y.dims(), &[1, 2, 3, 4, 4]);
        let grads = y.sqr()?.sum_all()?.backward()?;
        assert_every_var_has_grad(&varmap, &grads)?;
        Ok(())
    }

    /// The pitfall avoided by the exact crop: candle's conv2d backward with stride 2 errors
    /// when H and W have different parity; our conv3d (which calls conv2d) does not.
    #[test]
    fn candle_conv2d_stride2_odd_even_backward_fails_ours_works() -> Result<()> {
        let x = rand_tensor(&[1, 1, 8, 7], 12, 1.0)?;
        let w = rand_tensor(&[1, 1, 3, 3], 13, 1.0)?;
        let candle = check_gradients(
            |xs| xs[0].conv2d(&xs[1], 1, 2, 1, 1),
            &[x.clone(), w.clone()],
            GradCheck::default(),
        );
        let err = candle.unwrap_err().to_string();
        // "shape mismatch in add, lhs: [1, 1, 8, 7], rhs: [1, 1, 8, 8]"
        assert!(err.contains("shape mismatch"), "{err}");
        let cfg = Conv3dConfig {
            stride: [1, 2, 2],
            padding: [0, 1, 1],
            ..Default::default()
        };
        let r = check_gradients(
            |xs| conv3d_forward(&xs[0].unsqueeze(2)?, &xs[1].unsqueeze(2)?, None, &cfg),
            &[x, w],
            GradCheck::default(),
        )?;
        assert!(r.probes > 0);
        Ok(())
    }
}
