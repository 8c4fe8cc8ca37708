//! A 2-D convolution with a fast, correct backward pass on the CPU.
//!
//! candle 0.11.1's CPU `conv2d` unfolds its input with a scalar, scattered im2col and copies
//! the product back out element by element (about a quarter of a UNet training step,
//! docs/benchmarks.md); it differentiates itself with `conv_transpose2d`, a direct loop 2-4x
//! slower than the forward, and a dilated kernel for strided weight gradients, about 10x
//! slower; and its backward fails when the two spatial sizes have different parities
//! (CANDLE_PITFALLS.md). On the CPU this convolution is instead our own im2col
//! ([`crate::fused`]) and one batched GEMM, `out_b = W (C_out, C_in kh kw) · cols_b`, which
//! writes (B, C_out, Ho Wo) in place; a 1x1 stride-1 convolution needs no unfolding. It is
//! one autograd node whose backward is `dcols_b = Wᵀ dy_b` folded back onto the input
//! (col2im, the adjoint of im2col) and `dW = Σ_b dy_b cols_bᵀ` (Dumoulin & Visin 2016, "A
//! guide to convolution arithmetic"). Half-precision CPU inputs are computed in f32 (candle
//! has no CPU bf16 convolution at all).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::fused::{
    col2im, sum_batch, sum_transposed_planes, tracked, transpose_planes, unfold, Windows,
};

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
    if !crate::fused::applies(x) || !crate::fused::applies(weight) {
        return x.conv2d(weight, cfg.padding, cfg.stride, 1, 1);
    }
    let win = Windows {
        kh,
        kw,
        padding: cfg.padding,
        stride: cfg.stride,
        h,
        w,
    };
    let op = Conv2dOp(Conv2dCpu { win, c_in });
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    if !x.track_op() && !weight.track_op() {
        return x.apply_op2_no_bwd(&weight, &op);
    }
    x.apply_op2(&weight, op)
}

/// The backward of the CPU convolution in GEMMs over unfolded windows (no autograd; the
/// forward is [`crate::fused::conv2d_cpu`]).
#[derive(Clone, Copy)]
struct Conv2dCpu {
    win: Windows,
    c_in: usize,
}

impl Conv2dCpu {
    /// (B, C_in kh kw, Ho Wo): the windows of `x`, or `x` itself for a 1x1 convolution.
    fn cols(&self, x: &Tensor) -> Result<Tensor> {
        if self.win.pointwise() {
            x.reshape((x.dim(0)?, self.c_in, ()))
        } else {
            unfold(x, self.win)
        }
    }

    /// `weight` as the (C_out, C_in kh kw) matrix.
    fn matrix(&self, weight: &Tensor) -> Result<Tensor> {
        weight.reshape((weight.dim(0)?, ()))
    }

    /// dx = fold(Wᵀ dy_b) per sample.
    fn input_grad(&self, weight: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (b, h, w) = (grad.dim(0)?, self.win.h, self.win.w);
        let cols = crate::matmul(&self.matrix(weight)?.t()?.broadcast_left(b)?, grad)?;
        if self.win.pointwise() {
            cols.reshape((b, self.c_in, h, w))
        } else {
            col2im(&cols, self.win)
        }
    }

    /// dW = Σ_b dy_b colsᵀ_b. gemm packs the operand it reads along the output's rows by
    /// transposing it, slowly, so where the window matrices (C_in kh kw, Ho Wo) outweigh the
    /// weight (more output positions than output channels) it computes `(Σ_b cols_b dy_bᵀ)ᵀ`
    /// instead: the windows are read as they lie, and the transposes are of `dy` and of the
    /// weight-sized result (docs/benchmarks.md, "Fifth round").
    fn weight_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (c_out, positions) = (grad.dim(1)?, grad.dim(2)?);
        let cols = self.cols(x)?;
        if positions > c_out {
            sum_transposed_planes(&crate::matmul(&cols, &transpose_planes(grad)?)?)
        } else {
            sum_batch(&crate::matmul(grad, &cols.t()?)?)
        }
    }
}

/// The convolution as one autograd node: the forward is [`crate::fused::conv2d_cpu`] on the
/// operands' storage, the backward two batched GEMMs and the adjoint of the unfolding (it
/// unfolds `x` again rather than keep the windows, 9x the input for a 3x3 kernel, alive in
/// the graph).
/// Candle's own graph of the same ops would accumulate the gradient of the unfolded windows
/// (C_in kh kw times the input) into a fresh zero tensor and reduce the broadcast kernel's
/// gradient with a slow strided sum.
struct Conv2dOp(Conv2dCpu);

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "adm-conv2d"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (ho, wo) = self.0.win.out_size();
        let out = crate::fused::conv2d_cpu((x, xl), (w, wl), self.0.win)?;
        Ok((out, Shape::from((xl.dims()[0], wl.dims()[0], ho, wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.detach().contiguous()?;
        let grad = grad.reshape((grad.dim(0)?, grad.dim(1)?, ()))?;
        let dx = tracked(x, || self.0.input_grad(&weight.detach(), &grad))?;
        let dw = tracked(weight, || {
            self.0
                .weight_grad(&x.detach(), &grad)?
                .reshape(weight.shape())
        })?;
        Ok((dx, dw))
    }
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
    fn a_frozen_operand_gets_no_gradient() -> Result<()> {
        // A frozen network's kernel is a plain tensor: only the input's gradient is stored,
        // and it equals the one computed with a trainable kernel; and the other way round.
        let cfg = Conv2dConfig {
            padding: 1,
            stride: 2,
        };
        let (x, weight) = (
            rand_tensor(&[2, 2, 5, 6], 52, 1.0)?,
            rand_tensor(&[3, 2, 3, 3], 53, 1.0)?,
        );
        let (xv, wv) = (Var::from_tensor(&x)?, Var::from_tensor(&weight)?);
        let both = conv2d(xv.as_tensor(), wv.as_tensor(), cfg)?
            .sqr()?
            .sum_all()?
            .backward()?;
        let only_x = conv2d(xv.as_tensor(), &weight, cfg)?
            .sqr()?
            .sum_all()?
            .backward()?;
        assert!(only_x.get(&weight).is_none());
        assert_close(
            &to_vec(only_x.get(xv.as_tensor()).unwrap())?,
            &to_vec(both.get(xv.as_tensor()).unwrap())?,
            1e-12,
        );
        let only_w = conv2d(&x, wv.as_tensor(), cfg)?
            .sqr()?
            .sum_all()?
            .backward()?;
        assert!(only_w.get(&x).is_none());
        assert_close(
            &to_vec(only_w.get(wv.as_tensor()).unwrap())?,
            &to_vec(both.get(wv.as_tensor()).unwrap())?,
            1e-12,
        );
        // Nothing trainable: no autograd node at all.
        assert!(!conv2d(&x, &weight, cfg)?.track_op());
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
