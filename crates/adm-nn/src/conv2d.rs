//! A 2-D convolution with a fast, correct backward pass on the CPU.
//!
//! candle 0.11.1's CPU `conv2d` unfolds its input with a scalar, scattered im2col and copies
//! the product back out element by element (about a quarter of a UNet training step,
//! docs/benchmarks.md); it differentiates itself with `conv_transpose2d`, a direct loop 2-4x
//! slower than the forward, and a dilated kernel for strided weight gradients, about 10x
//! slower; and its backward fails when the two spatial sizes have different parities
//! (CANDLE_PITFALLS.md). On the CPU this convolution is instead our own im2col
//! ([`crate::fused`]) followed by one batched matmul, `out_b = W (C_out, C_in kh kw) ·
//! cols_b`, which writes (B, C_out, Ho Wo) in place (W is repeated per sample, so that its
//! gradient is one vectorised sum over the batch); a 1x1 stride-1 convolution needs no
//! unfolding at all. Autograd then differentiates the matmul (two more GEMMs) and the im2col
//! (its adjoint, col2im). Half-precision CPU inputs are computed in f32 (candle has no CPU
//! bf16 convolution at all).

use candle_core::{DType, Module, Result, Tensor};

use crate::fused::{unfold, Windows};
use candle_nn::VarBuilder;

/// Padding and stride of a convolution (no dilation, no groups).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dConfig {
    pub padding: usize,
    pub stride: usize,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Self {
            padding: 0,
            stride: 1,
        }
    }
}

/// `x` (B, C_in, H, W) convolved with `weight` (C_out, C_in, kh, kw): output
/// (B, C_out, (H + 2p - kh) / s + 1, (W + 2p - kw) / s + 1), as `Tensor::conv2d`.
///
/// On the CPU this is im2col and a matmul; on other devices it is candle's `conv2d` with its
/// own backward.
pub fn conv2d(x: &Tensor, weight: &Tensor, cfg: Conv2dConfig) -> Result<Tensor> {
    let (_, c_in, h, w) = x.dims4()?;
    let (_, k_in, kh, kw) = weight.dims4()?;
    if c_in != k_in {
        candle_core::bail!("conv2d: input has {c_in} channels, the kernel expects {k_in}")
    }
    if cfg.stride == 0 || h + 2 * cfg.padding < kh || w + 2 * cfg.padding < kw {
        candle_core::bail!(
            "conv2d: kernel {kh}x{kw} with padding {} and stride {} does not fit a {h}x{w} input",
            cfg.padding,
            cfg.stride
        )
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F16 | DType::BF16) {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        return conv2d(&f32(x)?, &f32(weight)?, cfg)?.to_dtype(x.dtype());
    }
    if !crate::fused::applies(x) {
        return x.conv2d(weight, cfg.padding, cfg.stride, 1, 1);
    }
    let (b, c_out) = (x.dim(0)?, weight.dim(0)?);
    let win = Windows {
        kh,
        kw,
        padding: cfg.padding,
        stride: cfg.stride,
        h,
        w,
    };
    let (ho, wo) = win.out_size();
    let cols = if (kh, kw, cfg.padding, cfg.stride) == (1, 1, 0, 1) {
        x.reshape((b, c_in, h * w))?
    } else {
        unfold(x, win)?
    };
    // A materialised batch of kernels: candle would reduce a broadcast one's gradient slowly.
    let kernels = crate::fused::repeat_batch(&weight.reshape((c_out, c_in * kh * kw))?, b)?;
    kernels.matmul(&cols)?.reshape((b, c_out, ho, wo))
}

/// A biased or unbiased convolution layer with the tensor names of `candle_nn::Conv2d`
/// (`weight`, `bias`), using [`conv2d`].
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: Conv2dConfig,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: Conv2dConfig) -> Self {
        Self { weight, bias, cfg }
    }

    /// Loads `weight` (C_out, C_in, k, k) and `bias` (C_out) from `vb`, initialised like
    /// `candle_nn::conv2d` when `vb` creates variables.
    pub fn load(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        cfg: Conv2dConfig,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let bound = 1.0 / ((in_channels * kernel * kernel) as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight =
            vb.get_with_hints((out_channels, in_channels, kernel, kernel), "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(out_channels, "bias", init)?)
        } else {
            None
        };
        Ok(Self::new(weight, bias, cfg))
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = conv2d(x, &self.weight, self.cfg)?;
        match &self.bias {
            Some(bias) => crate::ops::bias_add(&out, bias, 1),
            None => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_gradients, GradCheck};
    use crate::test_util::{assert_close, rand_tensor, to_vec};
    use candle_core::Var;

    /// (batch, c_in, c_out, h, w, kernel, padding, stride).
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

    /// Odd / even and unequal sizes, windows that leave rows unread, 1x1 to 4x4 kernels.
    const CASES: &[Case] = &[
        (2, 3, 4, 5, 6, 3, 1, 1),
        (1, 2, 3, 6, 5, 3, 1, 2),
        (2, 2, 2, 7, 4, 3, 0, 2),
        (1, 3, 2, 4, 4, 1, 0, 1),
        (1, 2, 2, 5, 5, 2, 0, 2),
        (2, 1, 3, 6, 7, 4, 2, 3),
    ];

    #[test]
    fn forward_equals_candle() -> Result<()> {
        for (i, &(b, ci, co, h, w, k, p, s)) in CASES.iter().enumerate() {
            let x = rand_tensor(&[b, ci, h, w], 10 + i as u64, 1.0)?;
            let weight = rand_tensor(&[co, ci, k, k], 20 + i as u64, 1.0)?;
            let ours = conv2d(
                &x,
                &weight,
                Conv2dConfig {
                    padding: p,
                    stride: s,
                },
            )?;
            let theirs = x.conv2d(&weight, p, s, 1, 1)?;
            assert_close(&to_vec(&ours)?, &to_vec(&theirs)?, 1e-12);
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        for (i, &(b, ci, co, h, w, k, p, s)) in CASES.iter().enumerate() {
            let x = rand_tensor(&[b, ci, h, w], 30 + i as u64, 1.0)?;
            let weight = rand_tensor(&[co, ci, k, k], 40 + i as u64, 1.0)?;
            let cfg = Conv2dConfig {
                padding: p,
                stride: s,
            };
            let report = check_gradients(
                |v| conv2d(&v[0], &v[1], cfg),
                &[x, weight],
                GradCheck::default(),
            )?;
            assert!(report.max_abs_err < 1e-7, "case {i}: {report:?}");
        }
        Ok(())
    }

    #[test]
    fn gradient_accumulates_with_other_uses() -> Result<()> {
        // x feeds the convolution and a second term: its gradient is the sum of both.
        let x = Var::from_tensor(&rand_tensor(&[1, 2, 4, 5], 50, 1.0)?)?;
        let weight = rand_tensor(&[3, 2, 3, 3], 51, 1.0)?;
        let cfg = Conv2dConfig {
            padding: 1,
            stride: 1,
        };
        let conv = |x: &Tensor| conv2d(x, &weight, cfg)?.sum_all();
        let grads = (conv(x.as_tensor())? + x.sqr()?.sum_all()?)?.backward()?;
        let ours = grads.get(x.as_tensor()).expect("x has a gradient");
        let alone = conv(x.as_tensor())?.backward()?;
        let alone = alone.get(x.as_tensor()).expect("x has a gradient");
        let want = (alone + (x.as_tensor() * 2.0)?)?;
        assert_close(&to_vec(ours)?, &to_vec(&want)?, 1e-12);
        Ok(())
    }

    #[test]
    fn shape_errors_are_clear() -> Result<()> {
        let x = rand_tensor(&[1, 2, 4, 4], 60, 1.0)?;
        let weight = rand_tensor(&[3, 5, 3, 3], 61, 1.0)?;
        let err = conv2d(&x, &weight, Conv2dConfig::default()).unwrap_err();
        assert!(err.to_string().contains("2 channels"), "{err}");
        let weight = rand_tensor(&[3, 2, 5, 5], 62, 1.0)?;
        let err = conv2d(&x, &weight, Conv2dConfig::default()).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        Ok(())
    }
}
