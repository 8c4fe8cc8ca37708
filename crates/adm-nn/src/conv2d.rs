//! A 2-D convolution whose backward pass runs on candle's fast forward convolution.
//!
//! candle 0.11.1 differentiates `conv2d` with `conv_transpose2d` for the input gradient, a
//! direct loop that is 2-4x slower than the forward on the CPU, and computes a strided
//! convolution's weight gradient with a dilated kernel, about 10x slower than the forward
//! (measured at 64-256 channels, 8-32 px, one thread; docs/benchmarks.md). Its backward also
//! fails when the two spatial sizes have different parities (CANDLE_PITFALLS.md). Here both
//! gradients are ordinary stride-1 convolutions (Dumoulin & Visin 2016, "A guide to
//! convolution arithmetic", sections 4-5): the input gradient is the full correlation of the
//! zero-dilated output gradient with the flipped, transposed kernel; the weight gradient is
//! the correlation of the padded input with the zero-dilated output gradient.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
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
/// On the CPU the backward pass uses [`conv2d_input_grad`] and [`conv2d_weight_grad`]; on
/// other devices this is candle's `conv2d` with its own backward.
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
    if !x.device().is_cpu() {
        return x.conv2d(weight, cfg.padding, cfg.stride, 1, 1);
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, Conv2dOp(cfg))
}

/// The gradient of `conv2d(x, weight, cfg)` with respect to `x` (of size `h` x `w`), given
/// the output gradient `grad` (B, C_out, Ho, Wo).
pub fn conv2d_input_grad(
    grad: &Tensor,
    weight: &Tensor,
    (h, w): (usize, usize),
    cfg: Conv2dConfig,
) -> Result<Tensor> {
    let (_, _, kh, kw) = weight.dims4()?;
    let grad = dilate(grad, cfg.stride)?;
    // The flipped kernel with input and output channels swapped: (C_in, C_out, kh, kw).
    let flipped = flip(&flip(&weight.transpose(0, 1)?.contiguous()?, 2)?, 3)?;
    // Full correlation: rows 0..(Ho-1)s+kh of the padded input; crop the padding and add
    // the rows the last window never reached (their gradient is zero).
    let full = grad
        .pad_with_zeros(2, kh - 1, kh - 1)?
        .pad_with_zeros(3, kw - 1, kw - 1)?
        .conv2d(&flipped, 0, 1, 1, 1)?;
    let (_, _, full_h, full_w) = full.dims4()?;
    full.pad_with_zeros(2, 0, (cfg.padding + h).saturating_sub(full_h))?
        .pad_with_zeros(3, 0, (cfg.padding + w).saturating_sub(full_w))?
        .narrow(2, cfg.padding, h)?
        .narrow(3, cfg.padding, w)
}

/// The gradient of `conv2d(x, weight, cfg)` with respect to a weight of spatial size
/// `kh` x `kw`, given the output gradient `grad`.
pub fn conv2d_weight_grad(
    x: &Tensor,
    grad: &Tensor,
    (kh, kw): (usize, usize),
    cfg: Conv2dConfig,
) -> Result<Tensor> {
    let p = cfg.padding;
    let x = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
    let grad = dilate(grad, cfg.stride)?;
    // Batch becomes the reduction axis: (C_in, B, H', W') * (C_out, B, hd, wd).
    x.transpose(0, 1)?
        .contiguous()?
        .conv2d(&grad.transpose(0, 1)?.contiguous()?, 0, 1, 1, 1)?
        .narrow(2, 0, kh)?
        .narrow(3, 0, kw)?
        .transpose(0, 1)?
        .contiguous()
}

/// Inserts `stride - 1` zeros between neighbouring elements of the last two axes.
fn dilate(x: &Tensor, stride: usize) -> Result<Tensor> {
    if stride == 1 {
        return Ok(x.clone());
    }
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .pad_with_zeros(3, 0, stride - 1)?
        .pad_with_zeros(5, 0, stride - 1)?
        .reshape((b, c, h * stride, w * stride))?
        .narrow(2, 0, (h - 1) * stride + 1)?
        .narrow(3, 0, (w - 1) * stride + 1)
}

/// `x` (contiguous) reversed along `dim`.
fn flip(x: &Tensor, dim: usize) -> Result<Tensor> {
    let n = x.dim(dim)?;
    let reversed: Vec<u32> = (0..n as u32).rev().collect();
    x.index_select(&Tensor::new(reversed, x.device())?, dim)
}

struct Conv2dOp(Conv2dConfig);

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "adm-conv2d"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu_tensor(x, x_layout)?;
        let weight = cpu_tensor(weight, weight_layout)?;
        let out = x.conv2d(&weight, self.0.padding, self.0.stride, 1, 1)?;
        let shape = out.shape().clone();
        let out = out.flatten_all()?;
        let storage = match out.dtype() {
            DType::F32 => CpuStorage::F32(out.to_vec1()?),
            DType::F64 => CpuStorage::F64(out.to_vec1()?),
            DType::F16 => CpuStorage::F16(out.to_vec1()?),
            DType::BF16 => CpuStorage::BF16(out.to_vec1()?),
            other => candle_core::bail!("conv2d: unsupported dtype {other:?}"),
        };
        Ok((storage, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, weight, grad) = (x.detach(), weight.detach(), grad.detach());
        let (_, _, h, w) = x.dims4()?;
        let (_, _, kh, kw) = weight.dims4()?;
        Ok((
            Some(conv2d_input_grad(&grad, &weight, (h, w), self.0)?),
            Some(conv2d_weight_grad(&x, &grad, (kh, kw), self.0)?),
        ))
    }
}

/// A CPU tensor over the contiguous elements of `storage` that `layout` selects.
fn cpu_tensor(storage: &CpuStorage, layout: &Layout) -> Result<Tensor> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("conv2d: operands must be contiguous")
    };
    let shape = layout.shape();
    let device = &candle_core::Device::Cpu;
    match storage {
        CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], shape, device),
        CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], shape, device),
        CpuStorage::F16(v) => Tensor::from_slice(&v[start..end], shape, device),
        CpuStorage::BF16(v) => Tensor::from_slice(&v[start..end], shape, device),
        _ => candle_core::bail!("conv2d: unsupported dtype (f32, f64, f16, bf16 only)"),
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
            Some(bias) => out.broadcast_add(&bias.reshape((1, (), 1, 1))?),
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
        let loss = (conv2d(x.as_tensor(), &weight, cfg)?.sum_all()? + x.sqr()?.sum_all()?)?;
        let grads = loss.backward()?;
        let ours = grads.get(x.as_tensor()).expect("x has a gradient");
        let ones = Tensor::ones((1, 3, 4, 5), DType::F64, x.device())?;
        let want = (conv2d_input_grad(&ones, &weight, (4, 5), cfg)? + (x.as_tensor() * 2.0)?)?;
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
