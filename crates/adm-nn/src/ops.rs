//! Softmax, log-softmax, layer norm, group norm and RMS norm with correct gradients.
//!
//! candle's fused `candle_nn::ops::{softmax_last_dim, layer_norm, rms_norm}` and the
//! `LayerNorm` / `RmsNorm` modules built on them return results that carry no gradient at all
//! (see CANDLE_PITFALLS.md): a model using them trains everything except those parameters and
//! whatever sits before them, without any error. Here softmax over the last dimension, layer
//! norm and group norm run on our own fused CPU kernels with hand-written backward passes
//! ([`crate::fused`]); everything else, and every op on other devices, is built from `exp`,
//! `log`, `sqrt`, sums, means and broadcasting arithmetic only.

use candle_core::shape::Dim;
use candle_core::{DType, Module, Result, Tensor, D};

/// The dtype computations are carried out in: f32 for sub-32-bit floats (f16, bf16, f8),
/// the input's own dtype otherwise.
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    if dtype.is_float() && dtype.size_in_bytes() < 4 {
        DType::F32
    } else {
        dtype
    }
}

/// Softmax along `dim`, numerically stable: the (detached) maximum along `dim` is subtracted
/// first, which changes nothing mathematically, so detaching it is exact. Half-precision
/// inputs are computed in f32 and cast back.
pub fn softmax<I: Dim>(x: &Tensor, dim: I) -> Result<Tensor> {
    let dim = dim.to_index(x.shape(), "softmax")?;
    let dtype = x.dtype();
    let x = x.to_dtype(compute_dtype(dtype))?;
    if dim + 1 == x.rank() && crate::fused::applies(&x) {
        return crate::fused::softmax_last_dim(&x)?.to_dtype(dtype);
    }
    let max = x.max_keepdim(dim)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(dim)?;
    e.broadcast_div(&sum)?.to_dtype(dtype)
}

/// The tanh-approximate GELU `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`, written as
/// `x sigmoid(2 √(2/π) (x + 0.044715 x³))` (the same function): candle's CPU `gelu` and its
/// backward call the scalar `tanhf` per element, several times slower than `exp`.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    const TWO_SQRT_2_OVER_PI: f64 = 1.595_769_121_605_730_7;
    let inner = (x + (x.sqr()? * x)?.affine(0.044715, 0.0)?)?;
    x * candle_nn::ops::sigmoid(&inner.affine(TWO_SQRT_2_OVER_PI, 0.0)?)?
}

/// SiLU `x σ(x)`, as `Tensor::silu`; on the CPU (f32 / f64) one autograd node whose
/// backward is one pass where candle's takes nine tensor ops.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if crate::fused::applies(x) {
        crate::fused::silu(x)
    } else {
        x.silu()
    }
}

/// GEGLU of `x` (..., 2n) = (..., [a | g]): `a · gelu(g)` with the exact (erf) GELU, (..., n)
/// (diffusers' `GEGLU`). Half-precision inputs are computed in f32 and cast back.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if !d.is_multiple_of(2) {
        candle_core::bail!("geglu: the last dimension ({d}) must be even")
    }
    let dtype = x.dtype();
    let x = x.to_dtype(compute_dtype(dtype))?;
    if crate::fused::applies(&x) {
        return crate::fused::geglu(&x)?.to_dtype(dtype);
    }
    let n = d / 2;
    let gate = x.narrow(D::Minus1, n, n)?.gelu_erf()?;
    (x.narrow(D::Minus1, 0, n)? * gate)?.to_dtype(dtype)
}

/// `x + bias` with `bias` running along `axis` of `x` and broadcast over the axes after it,
/// and either over the axes before it (`bias` has the size of `axis`: a linear layer's bias
/// on the last axis, a convolution's on axis 1) or along them too (`bias` has one element
/// per index of the axes up to `axis`: a per-sample, per-channel time embedding over a
/// (B, C, H, W) map with `axis` 1). Unlike `broadcast_add`, its CPU backward sums the bias
/// gradient in one vectorised pass.
pub fn bias_add(x: &Tensor, bias: &Tensor, axis: usize) -> Result<Tensor> {
    let dims = x.dims();
    let n = x.dim(axis)?;
    let leading: usize = dims[..=axis].iter().product();
    let mut shape = vec![1; x.rank()];
    if bias.elem_count() == n {
        shape[axis] = n;
    } else if bias.elem_count() == leading {
        shape[..=axis].copy_from_slice(&dims[..=axis]);
    } else {
        candle_core::bail!(
            "bias_add: bias has {} elements; axis {axis} of {dims:?} needs {n} (or {leading}, one per index of the axes up to it)",
            bias.elem_count()
        )
    }
    if crate::fused::applies(x) && bias.dtype() == x.dtype() && bias.device().is_cpu() {
        return crate::fused::bias_add(x, bias, axis);
    }
    x.broadcast_add(&bias.reshape(shape)?)
}

/// Log-softmax along `dim`: `x - max - log(sum(exp(x - max)))` with the maximum detached.
/// Half-precision inputs are computed in f32 and cast back.
pub fn log_softmax<I: Dim>(x: &Tensor, dim: I) -> Result<Tensor> {
    let dim = dim.to_index(x.shape(), "log_softmax")?;
    let dtype = x.dtype();
    let x = x.to_dtype(compute_dtype(dtype))?;
    let max = x.max_keepdim(dim)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(dim)?.log()?;
    shifted.broadcast_sub(&log_sum)?.to_dtype(dtype)
}

/// Layer normalisation over the last dimension (biased variance, as PyTorch):
/// `(x - mean) / sqrt(var + eps) * weight + bias`. `weight` and `bias` have the size of the
/// last dimension. f16/bf16 inputs are normalised in f32 and the result cast back.
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let cdt = compute_dtype(dtype);
    let x = x.to_dtype(cdt)?;
    let (weight, bias) = (cast(weight, cdt)?, cast(bias, cdt)?);
    if crate::fused::applies(&x) {
        return crate::fused::layer_norm(&x, weight.as_ref(), bias.as_ref(), eps)?.to_dtype(dtype);
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(&w)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&b)?;
    }
    y.to_dtype(dtype)
}

fn cast(t: Option<&Tensor>, dtype: DType) -> Result<Option<Tensor>> {
    t.map(|t| t.to_dtype(dtype)).transpose()
}

/// Group normalisation of `x` (B, C, ...) over `groups` groups of `C / groups` channels
/// (biased variance, as PyTorch), then per-channel `weight` and `bias`. f16/bf16 inputs are
/// normalised in f32 and the result cast back.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    group_norm_then(x, groups, (weight, bias), eps, false)
}

fn group_norm_then(
    x: &Tensor,
    groups: usize,
    (weight, bias): (Option<&Tensor>, Option<&Tensor>),
    eps: f64,
    then_silu: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group_norm: {groups} groups do not divide the channels of {dims:?}")
    }
    let dtype = x.dtype();
    let cdt = compute_dtype(dtype);
    let x = x.to_dtype(cdt)?;
    let (weight, bias) = (cast(weight, cdt)?, cast(bias, cdt)?);
    if crate::fused::applies(&x) {
        let params = (weight.as_ref(), bias.as_ref());
        return crate::fused::group_norm(&x, groups, params, eps, then_silu)?.to_dtype(dtype);
    }
    // Each (sample, group) block is one row of a layer norm without affine parameters.
    let mut y = layer_norm(&x.reshape((dims[0], groups, ()))?, None, None, eps)?;
    y = y.reshape(dims.as_slice())?;
    // (1, C, 1, ...): the per-channel parameters broadcast over the rest.
    let mut per_channel = vec![1; dims.len()];
    per_channel[1] = dims[1];
    if let Some(w) = weight {
        y = y.broadcast_mul(&w.reshape(per_channel.as_slice())?)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&b.reshape(per_channel.as_slice())?)?;
    }
    if then_silu {
        y = silu(&y)?;
    }
    y.to_dtype(dtype)
}

/// RMS normalisation over the last dimension: `x / sqrt(mean(x²) + eps) * weight`.
/// f16/bf16 inputs are normalised in f32 and the result cast back.
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let cdt = compute_dtype(dtype);
    let x = x.to_dtype(cdt)?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(&w.to_dtype(cdt)?)?;
    }
    y.to_dtype(dtype)
}

/// Layer norm over the last dimension with optional affine parameters `weight` / `bias`
/// (the PyTorch / diffusers names). Unlike `candle_nn::LayerNorm` its output carries a
/// gradient.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Option<Tensor>, bias: Option<Tensor>, eps: f64) -> Self {
        Self { weight, bias, eps }
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        layer_norm(xs, self.weight.as_ref(), self.bias.as_ref(), self.eps)
    }
}

/// Group norm over `groups` groups of channels with optional per-channel `weight` / `bias`
/// (the PyTorch / diffusers names), a drop-in for `candle_nn::GroupNorm`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    /// `silu(self.forward(xs))` as one autograd node on the CPU: the ResNet blocks' pattern.
    /// Its backward recomputes the normalised values, and saves a node and two passes over
    /// the activation; for f32 / f64 inputs the results are bitwise those of the two calls
    /// (f16 / bf16 ones take SiLU in f32 before the cast back, not after it).
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        let params = (self.weight.as_ref(), self.bias.as_ref());
        group_norm_then(xs, self.groups, params, self.eps, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let params = (self.weight.as_ref(), self.bias.as_ref());
        group_norm_then(xs, self.groups, params, self.eps, false)
    }
}

/// RMS norm over the last dimension with an optional scale `weight`. Unlike
/// `candle_nn::RmsNorm::forward` its output carries a gradient.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Option<Tensor>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Option<Tensor>, eps: f64) -> Self {
        Self { weight, eps }
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        rms_norm(xs, self.weight.as_ref(), self.eps)
    }
}

/// Constructors of [`LayerNorm`] / [`RmsNorm`] from a `VarBuilder`, named like candle_nn's
/// (`candle_nn::layer_norm` builds a module, `candle_nn::ops::layer_norm` is the function);
/// re-exported at the crate root as `adm_nn::layer_norm` / `adm_nn::rms_norm`.
pub mod layers {
    use super::{GroupNorm, LayerNorm, RmsNorm};
    use candle_core::Result;
    use candle_nn::{Init, VarBuilder};

    /// Builds a [`LayerNorm`] of `size` features. With `elementwise_affine` it loads (or
    /// creates, initialised to 1 and 0) `weight` and `bias`; without, it has no parameters.
    pub fn layer_norm(
        size: usize,
        eps: f64,
        elementwise_affine: bool,
        vb: VarBuilder,
    ) -> Result<LayerNorm> {
        if elementwise_affine {
            let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
            let bias = vb.get_with_hints(size, "bias", Init::Const(0.0))?;
            Ok(LayerNorm::new(Some(weight), Some(bias), eps))
        } else {
            Ok(LayerNorm::new(None, None, eps))
        }
    }

    /// Builds a [`GroupNorm`] of `channels` in `groups` groups, loading (or creating,
    /// initialised to 1 and 0) `weight` and `bias`, as `candle_nn::group_norm`.
    pub fn group_norm(
        groups: usize,
        channels: usize,
        eps: f64,
        vb: VarBuilder,
    ) -> Result<GroupNorm> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("group_norm: {groups} groups do not divide {channels} channels")
        }
        Ok(GroupNorm {
            weight: Some(vb.get_with_hints(channels, "weight", Init::Const(1.0))?),
            bias: Some(vb.get_with_hints(channels, "bias", Init::Const(0.0))?),
            groups,
            eps,
        })
    }

    /// Builds an [`RmsNorm`] of `size` features, loading (or creating, initialised to 1)
    /// `weight`.
    pub fn rms_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        Ok(RmsNorm::new(Some(weight), eps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_gradients, GradCheck};
    use crate::test_util::{assert_close, rand_tensor, to_vec};
    use candle_core::Device;
    use candle_nn::{VarBuilder, VarMap};

    const EPS: f64 = 1e-5;

    fn naive_softmax_rows(v: &[f64], n: usize) -> Vec<f64> {
        v.chunks(n)
            .flat_map(|row| {
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = row.iter().map(|a| (a - m).exp()).sum();
                row.iter()
                    .map(move |a| (a - m).exp() / s)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn softmax_values_last_and_middle_dim() -> Result<()> {
        let x = rand_tensor(&[2, 3, 5], 1, 3.0)?;
        let got = to_vec(&softmax(&x, D::Minus1)?)?;
        assert_close(&got, &naive_softmax_rows(&to_vec(&x)?, 5), 1e-12);
        // Along dim 1: transpose so that dim is last, then compare.
        let got = softmax(&x, 1)?.transpose(1, 2)?;
        let want = naive_softmax_rows(&to_vec(&x.transpose(1, 2)?)?, 3);
        assert_close(&to_vec(&got)?, &want, 1e-12);
        // Large values must not overflow.
        let big = Tensor::new(&[[1000f64, 1001.0, 999.0]], &Device::Cpu)?;
        let got = to_vec(&softmax(&big, D::Minus1)?)?;
        assert_close(
            &got,
            &naive_softmax_rows(&[1000.0, 1001.0, 999.0], 3),
            1e-12,
        );
        Ok(())
    }

    #[test]
    fn log_softmax_values() -> Result<()> {
        let x = rand_tensor(&[4, 6], 2, 3.0)?;
        let got = to_vec(&log_softmax(&x, 1)?)?;
        let want: Vec<f64> = naive_softmax_rows(&to_vec(&x)?, 6)
            .iter()
            .map(|p| p.ln())
            .collect();
        assert_close(&got, &want, 1e-12);
        let big = Tensor::new(&[[1000f64, -1000.0]], &Device::Cpu)?;
        let got = to_vec(&log_softmax(&big, 1)?)?;
        assert_close(&got, &[0.0, -2000.0], 1e-9);
        Ok(())
    }

    #[test]
    fn softmax_gradients() -> Result<()> {
        let x = rand_tensor(&[2, 3, 5], 3, 2.0)?;
        let r = check_gradients(
            |xs| softmax(&xs[0], D::Minus1),
            std::slice::from_ref(&x),
            GradCheck::default(),
        )?;
        assert!(r.probes > 0 && r.max_abs_numeric > 1e-3, "{r:?}");
        let r = check_gradients(
            |xs| softmax(&xs[0], 1),
            std::slice::from_ref(&x),
            GradCheck::default(),
        )?;
        assert!(r.probes > 0, "{r:?}");
        let r = check_gradients(|xs| log_softmax(&xs[0], 0), &[x], GradCheck::default())?;
        assert!(r.probes > 0 && r.max_abs_numeric > 1e-3, "{r:?}");
        Ok(())
    }

    #[test]
    fn layer_norm_values() -> Result<()> {
        let (rows, n) = (6, 7);
        let x = rand_tensor(&[2, 3, n], 4, 2.0)?;
        let w = rand_tensor(&[n], 5, 1.0)?;
        let b = rand_tensor(&[n], 6, 1.0)?;
        let got = to_vec(&layer_norm(&x, Some(&w), Some(&b), EPS)?)?;
        let (xv, wv, bv) = (to_vec(&x)?, to_vec(&w)?, to_vec(&b)?);
        let mut want = Vec::new();
        for r in 0..rows {
            let row = &xv[r * n..(r + 1) * n];
            let mean = row.iter().sum::<f64>() / n as f64;
            let var = row.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n as f64;
            for j in 0..n {
                want.push((row[j] - mean) / (var + EPS).sqrt() * wv[j] + bv[j]);
            }
        }
        assert_close(&got, &want, 1e-12);
        Ok(())
    }

    #[test]
    fn rms_norm_values() -> Result<()> {
        let n = 5;
        let x = rand_tensor(&[3, n], 7, 2.0)?;
        let w = rand_tensor(&[n], 8, 1.0)?;
        let got = to_vec(&rms_norm(&x, Some(&w), EPS)?)?;
        let (xv, wv) = (to_vec(&x)?, to_vec(&w)?);
        let mut want = Vec::new();
        for row in xv.chunks(n) {
            let ms = row.iter().map(|a| a * a).sum::<f64>() / n as f64;
            for j in 0..n {
                want.push(row[j] / (ms + EPS).sqrt() * wv[j]);
            }
        }
        assert_close(&got, &want, 1e-12);
        Ok(())
    }

    #[test]
    fn layer_norm_gradients_wrt_input_weight_bias() -> Result<()> {
        let x = rand_tensor(&[2, 3, 6], 9, 2.0)?;
        let w = rand_tensor(&[6], 10, 1.0)?;
        let b = rand_tensor(&[6], 11, 1.0)?;
        let r = check_gradients(
            |xs| layer_norm(&xs[0], Some(&xs[1]), Some(&xs[2]), EPS),
            &[x.clone(), w, b],
            GradCheck::default(),
        )?;
        assert!(r.probes > 0 && r.max_abs_numeric > 1e-3, "{r:?}");
        let r = check_gradients(
            |xs| layer_norm(&xs[0], None, None, EPS),
            &[x],
            GradCheck::default(),
        )?;
        assert!(r.probes > 0, "{r:?}");
        Ok(())
    }

    #[test]
    fn rms_norm_gradients_wrt_input_weight() -> Result<()> {
        let x = rand_tensor(&[2, 3, 6], 12, 2.0)?;
        let w = rand_tensor(&[6], 13, 1.0)?;
        let r = check_gradients(
            |xs| rms_norm(&xs[0], Some(&xs[1]), EPS),
            &[x.clone(), w],
            GradCheck::default(),
        )?;
        assert!(r.probes > 0 && r.max_abs_numeric > 1e-3, "{r:?}");
        let r = check_gradients(|xs| rms_norm(&xs[0], None, EPS), &[x], GradCheck::default())?;
        assert!(r.probes > 0, "{r:?}");
        Ok(())
    }

    #[test]
    fn modules_load_pytorch_names_and_pass_gradients_to_every_var() -> Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let ln = layers::layer_norm(6, EPS, true, vb.pp("ln"))?;
        let rn = layers::rms_norm(6, EPS, vb.pp("rn"))?;
        let no_affine = layers::layer_norm(6, EPS, false, vb.pp("plain"))?;
        assert!(no_affine.weight.is_none() && no_affine.bias.is_none());
        let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["ln.bias", "ln.weight", "rn.weight"]);

        let x = rand_tensor(&[3, 6], 14, 2.0)?;
        let proj = rand_tensor(&[3, 6], 15, 1.0)?;
        let y = rn.forward(&ln.forward(&no_affine.forward(&x)?)?)?;
        let grads = (y * proj)?.sum_all()?.backward()?;
        crate::gradcheck::assert_every_var_has_grad(&varmap, &grads)?;
        Ok(())
    }

    #[test]
    fn half_precision_inputs_are_normalised_in_f32() -> Result<()> {
        // Values with a large common offset: computing the variance in bf16 would lose
        // everything, in f32 it is fine.
        let x = (rand_tensor(&[4, 16], 16, 1.0)? + 100.0)?;
        let w = rand_tensor(&[16], 17, 1.0)?;
        let want = layer_norm(&x, Some(&w), None, EPS)?;
        for dt in [DType::BF16, DType::F16] {
            let got = layer_norm(&x.to_dtype(dt)?, Some(&w.to_dtype(dt)?), None, EPS)?;
            assert_eq!(got.dtype(), dt);
            let err = (got.to_dtype(DType::F64)? - &want)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            // Input quantisation of bf16 at 100 is 0.5: tolerate that, not garbage.
            let tol = if dt == DType::BF16 { 1.0 } else { 0.1 };
            assert!(err < tol, "{dt:?}: {err}");

            let got = rms_norm(&x.to_dtype(dt)?, Some(&w.to_dtype(dt)?), EPS)?;
            assert_eq!(got.dtype(), dt);
            let want = rms_norm(&x, Some(&w), EPS)?;
            let err = (got.to_dtype(DType::F64)? - &want)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            assert!(err < 0.05, "{dt:?}: {err}");

            let got = softmax(&x.to_dtype(dt)?, 1)?;
            assert_eq!(got.dtype(), dt);
        }
        Ok(())
    }

    /// The pitfalls these functions exist for: candle's fused versions carry no gradient.
    #[test]
    fn candle_fused_norms_and_softmax_carry_no_gradient() -> Result<()> {
        let x = rand_tensor(&[2, 6], 18, 2.0)?;
        let w = rand_tensor(&[6], 19, 1.0)?;
        let b = rand_tensor(&[6], 20, 1.0)?;
        let opts = GradCheck::default();
        assert!(check_gradients(
            |xs| candle_nn::ops::softmax_last_dim(&xs[0]),
            std::slice::from_ref(&x),
            opts
        )
        .is_err());
        assert!(check_gradients(
            |xs| candle_nn::ops::layer_norm(&xs[0], &xs[1], &xs[2], 1e-5),
            &[x.clone(), w.clone(), b.clone()],
            opts
        )
        .is_err());
        assert!(check_gradients(
            |xs| candle_nn::ops::rms_norm(&xs[0], &xs[1], 1e-5),
            &[x.clone(), w.clone()],
            opts
        )
        .is_err());
        // Ours, same inputs.
        check_gradients(
            |xs| softmax(&xs[0], D::Minus1),
            std::slice::from_ref(&x),
            opts,
        )?;
        check_gradients(
            |xs| layer_norm(&xs[0], Some(&xs[1]), Some(&xs[2]), 1e-5),
            &[x.clone(), w.clone(), b],
            opts,
        )?;
        check_gradients(|xs| rms_norm(&xs[0], Some(&xs[1]), 1e-5), &[x, w], opts)?;
        Ok(())
    }

    #[test]
    fn gelu_tanh_equals_candles_tanh_gelu_and_has_exact_gradients() -> Result<()> {
        let x = (Tensor::randn(0f64, 1.0, (3, 50), &candle_core::Device::Cpu)? * 3.0)?;
        let err = (gelu_tanh(&x)? - x.gelu()?)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(err < 1e-14, "{err}");
        let report =
            crate::check_gradients(|xs| gelu_tanh(&xs[0]), &[x], crate::GradCheck::default())?;
        assert!(report.max_abs_numeric > 0.1, "{report:?}");
        Ok(())
    }
}
