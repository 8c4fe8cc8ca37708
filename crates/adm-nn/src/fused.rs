//! Fused CPU kernels with hand-written backward passes: softmax, layer norm, group norm,
//! GEGLU, bias addition, and the im2col unfolding and forward GEMMs behind [`crate::conv2d`].
//!
//! The composed versions in [`crate::ops`] cost one candle pass per primitive (five to eight
//! over the tensor forward, more backward), each allocating a fresh buffer; in the UNet those
//! passes and candle's scalar im2col took over half of a training step on the CPU
//! (docs/benchmarks.md). Here each forward is one kernel over contiguous rows, and each
//! backward is one more kernel that recomputes the row statistics instead of storing them.
//! The gradients are the standard ones:
//!
//! - softmax `y`: `dx = y (dy - Σ dy y)`;
//! - normalisation `x̂ = (x - μ) r`, `r = 1 / sqrt(σ² + ε)` over `n` elements:
//!   `dx = r (g - mean(g) - x̂ mean(g x̂))` with `g = dy w`, `dw = Σ dy x̂`, `db = Σ dy`
//!   (Ioffe & Szegedy 2015, section 3);
//! - GEGLU `y = a gelu(g)`, `gelu(g) = g Φ(g)`: `da = dy gelu(g)`,
//!   `dg = dy a (Φ(g) + g φ(g))` (Shazeer 2020, "GLU variants improve transformer");
//! - bias addition `y = x + b` along one axis: `dx = dy`, `db = Σ dy` over the other axes
//!   (candle reduces broadcast gradients with a slow strided sum);
//! - im2col is linear; its adjoint (col2im) sums each window element back to its pixel;
//! - a sum over the batch axis, for the convolution's weight gradient (candle's reduction
//!   over a leading axis is about 40x slower than an addition of the same size: 6 ms against
//!   0.15 ms for 2 x 590k elements).
//!
//! The kernels run on contiguous f32 / f64 CPU tensors. Callers cast f16 / bf16 to f32 first
//! and use the composed ops on other devices. Outputs of 64k elements or more are split into
//! row blocks over candle's CPU worker pool, the threads its own element-wise ops and
//! [`crate::matmul`] use (one serial kernel had left the second core idle).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use std::mem::MaybeUninit;

use crate::matmul::{gemm_batched, View};

/// The float types the kernels are written for.
pub(crate) trait Real:
    'static
    + Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::Neg<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn from_usize(v: usize) -> Self;
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    /// `Φ(g)` and the density `φ(g)` of the standard normal.
    fn normal_cdf_pdf(self) -> (Self, Self);
}

macro_rules! real {
    ($t:ty, $cdf_pdf:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn from_usize(v: usize) -> Self {
                v as $t
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn normal_cdf_pdf(self) -> (Self, Self) {
                $cdf_pdf(self)
            }
        }
    };
}
real!(f32, normal_cdf_pdf_f32);
real!(f64, normal_cdf_pdf_f64);

/// 1 / sqrt(2 pi).
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// Exact to f64 rounding (libm's erf), for the gradient checks.
fn normal_cdf_pdf_f64(g: f64) -> (f64, f64) {
    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(g * std::f64::consts::FRAC_1_SQRT_2));
    (cdf, (-0.5 * g * g).exp() * INV_SQRT_2PI)
}

/// Abramowitz & Stegun 7.1.26 for `erf(|g| / sqrt 2)`, absolute error below 1.5e-7 (f32
/// rounding is 6e-8): one `exp(-g²/2)` serves the tail and the density, where libm's scalar
/// `erff` alone took 8% of a UNet training step.
fn normal_cdf_pdf_f32(g: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152,
        1.061_405_4,
    ];
    let e = (-0.5 * g * g).exp();
    let t = 1.0 / (1.0 + P * g.abs() * std::f32::consts::FRAC_1_SQRT_2);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let erf_abs = 1.0 - poly * e;
    let erf = if g < 0.0 { -erf_abs } else { erf_abs };
    (0.5 * (1.0 + erf), e * INV_SQRT_2PI as f32)
}

/// Eight independent accumulators, so the compiler vectorises the sum.
const LANES: usize = 8;

fn sum<T: Real>(xs: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    tail.iter().fold(fold(acc), |s, &x| s + x)
}

/// `Σ f(a_i, b_i)`, vectorised like [`sum`].
fn sum_zip<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let mut acc = [T::ZERO; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = ca.remainder().iter().zip(cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += f(x[i], y[i]);
        }
    }
    tail.fold(fold(acc), |s, (&x, &y)| s + f(x, y))
}

fn fold<T: Real>(acc: [T; LANES]) -> T {
    acc.iter().fold(T::ZERO, |s, &x| s + x)
}

/// Outputs below this many elements are computed on the calling thread; larger ones in units
/// of about `PAR_UNIT` elements (the limits of candle's own parallel element-wise ops).
const PAR_MIN: usize = 64 * 1024;
const PAR_UNIT: usize = 16 * 1024;

/// A vector of `len` elements, a run of blocks of `block` elements each computed on its own,
/// filled by calls `f(first_block, part)` where `part` holds whole consecutive blocks, zeroed,
/// spread over candle's CPU worker pool (the pool its element-wise ops and [`crate::matmul`]
/// use). Each part is zeroed by the thread that fills it: a serial zero-fill of the whole
/// output had been 3% of a two-thread UNet training step.
pub(crate) fn par_blocks<T: Real>(
    len: usize,
    block: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    par_blocks_at_least(len, block, 1, f)
}

/// [`par_blocks`] with parts of at least `min_blocks` blocks (but for the last).
fn par_blocks_at_least<T: Real>(
    len: usize,
    block: usize,
    min_blocks: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let no_side = Side {
        per_block: 0,
        spare: 0,
    };
    par_blocks_with_side(len, block, min_blocks, no_side, |first, part, _| {
        f(first, part)
    })
    .0
}

/// What [`par_blocks_with_side`] makes besides the blocks.
#[derive(Clone, Copy)]
struct Side {
    /// Elements of the second vector per block.
    per_block: usize,
    /// Room left in the first vector for this many more elements (appended without moving).
    spare: usize,
}

/// [`par_blocks_at_least`] where each block also fills `side.per_block` elements (zeroed) of
/// a second vector: `f(first_block, part, side_part)`, for per-block partial results that
/// the caller then reduces in block order.
fn par_blocks_with_side<T: Real>(
    len: usize,
    block: usize,
    min_blocks: usize,
    side: Side,
    f: impl Fn(usize, &mut [T], &mut [T]) + Sync,
) -> (Vec<T>, Vec<T>) {
    let zeroed = |first: usize, part: &mut [MaybeUninit<T>], side_part: &mut [T]| {
        part.fill(MaybeUninit::new(T::ZERO));
        // SAFETY: every element was just written.
        let part = unsafe { &mut *(part as *mut [MaybeUninit<T>] as *mut [T]) };
        f(first, part, side_part)
    };
    // SAFETY: `zeroed` writes all of each part.
    unsafe { par_blocks_uninit(len, block, min_blocks, side, zeroed) }
}

/// The work split of [`par_blocks_with_side`], with each part handed over uninitialised: for
/// kernels that write every element anyway, a zero-fill first would double their writes.
///
/// # Safety
/// `f` must write every element of each `part` it is given.
unsafe fn par_blocks_uninit<T: Real>(
    len: usize,
    block: usize,
    min_blocks: usize,
    side: Side,
    f: impl Fn(usize, &mut [MaybeUninit<T>], &mut [T]) + Sync,
) -> (Vec<T>, Vec<T>) {
    let blocks = len / block.max(1);
    let mut sides = vec![T::ZERO; blocks * side.per_block];
    let mut out: Vec<T> = Vec::with_capacity(len + side.spare);
    if len < PAR_MIN || blocks < 2 || blocks * block != len {
        f(0, &mut out.spare_capacity_mut()[..len], &mut sides);
        // SAFETY: `f` wrote all `len` elements (the caller's promise).
        unsafe { out.set_len(len) };
        return (out, sides);
    }
    let per_unit = PAR_UNIT.div_ceil(block).max(min_blocks);
    let (ptr, side_ptr) = (out.as_mut_ptr() as usize, sides.as_mut_ptr() as usize);
    candle_core::utils::barrier_pool().execute_chunked(blocks.div_ceil(per_unit), |units| {
        for unit in units {
            let first = unit * per_unit;
            let count = blocks.min(first + per_unit) - first;
            // SAFETY: units cover disjoint ranges of blocks inside both allocations, which
            // outlive the pool call.
            let (part, side_part) = unsafe {
                let start = (ptr as *mut MaybeUninit<T>).add(first * block);
                let side_start = (side_ptr as *mut T).add(first * side.per_block);
                (
                    std::slice::from_raw_parts_mut(start, count * block),
                    std::slice::from_raw_parts_mut(side_start, count * side.per_block),
                )
            };
            f(first, part, side_part);
        }
    });
    // SAFETY: the units covered all `blocks * block == len` elements, and `f` wrote them.
    unsafe { out.set_len(len) };
    (out, sides)
}

/// Mean and `1 / sqrt(var + eps)` (biased variance, two passes).
fn moments<T: Real>(xs: &[T], eps: T) -> (T, T) {
    let n = T::from_usize(xs.len());
    let mean = sum(xs) / n;
    let var = sum_zip(xs, xs, |x, _| (x - mean) * (x - mean)) / n;
    (mean, T::ONE / (var + eps).sqrt())
}

/// The contiguous elements of an f32 / f64 storage, as a typed slice.
pub(crate) enum Slice<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

pub(crate) fn slice<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<Slice<'a>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the operand must be contiguous")
    };
    Ok(match storage {
        CpuStorage::F32(v) => Slice::F32(&v[start..end]),
        CpuStorage::F64(v) => Slice::F64(&v[start..end]),
        other => candle_core::bail!("{op}: {:?} is not supported (f32, f64)", other.dtype()),
    })
}

/// Runs a kernel written once for both float types on operands of one dtype.
macro_rules! dispatch {
    ($op:expr, [$($s:expr),+], |$($v:ident),+| $body:expr) => {{
        match ($(slice($op, $s.0, $s.1)?,)+) {
            ($(Slice::F32($v),)+) => CpuStorage::F32($body),
            ($(Slice::F64($v),)+) => CpuStorage::F64($body),
            #[allow(unreachable_patterns)]
            _ => candle_core::bail!("{}: operands of different dtypes", $op),
        }
    }};
}

/// Whether the fused kernels serve `x`: a non-empty CPU tensor of f32 or f64 (empty ones take
/// the composed path, whose candle ops accept them).
pub(crate) fn applies(x: &Tensor) -> bool {
    let dtype = x.dtype();
    x.device().is_cpu()
        && matches!(dtype, candle_core::DType::F32 | candle_core::DType::F64)
        && x.elem_count() > 0
}

// ---------------------------------------------------------------------------------------
// Softmax over the last dimension.

/// Softmax over the last dimension of a contiguous CPU f32 / f64 tensor.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxLastDim)
}

struct SoftmaxLastDim;

pub(crate) fn softmax_rows<T: Real>(x: &[T], d: usize) -> Vec<T> {
    par_blocks(x.len(), d, |first, out| {
        let x = &x[first * d..][..out.len()];
        for (row, y) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let max = row.iter().fold(row[0], |m, &v| if v > m { v } else { m });
            for (y, &v) in y.iter_mut().zip(row) {
                *y = (v - max).exp();
            }
            let inv = T::ONE / sum(y);
            y.iter_mut().for_each(|v| *v = *v * inv);
        }
    })
}

pub(crate) fn softmax_grad_rows<T: Real>(y: &[T], dy: &[T], d: usize) -> Vec<T> {
    par_blocks(y.len(), d, |first, out| {
        let (y, dy) = (&y[first * d..], &dy[first * d..]);
        for ((y, dy), dx) in y
            .chunks_exact(d)
            .zip(dy.chunks_exact(d))
            .zip(out.chunks_exact_mut(d))
        {
            let dot = sum_zip(y, dy, |a, b| a * b);
            for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
                *dx = y * (dy - dot);
            }
        }
    })
}

fn last_dim(layout: &Layout) -> usize {
    layout.dims().last().copied().unwrap_or(1).max(1)
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "adm-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l);
        let out = dispatch!(self.name(), [(s, l)], |x| softmax_rows(x, d));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "adm-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(yl);
        let out = dispatch!(self.name(), [(ys, yl), (gs, gl)], |y, g| {
            softmax_grad_rows(y, g, d)
        });
        Ok((out, yl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------
// Normalisation: layer norm (rows of the last dimension) and group norm (per sample and
// group of channels), both `x̂ w + b` with one scale and shift per channel.

/// How a contiguous (B, C, S) tensor splits into normalised blocks: `groups` blocks of
/// `C / groups` channels per sample for group norm; for layer norm, C = 1 channel of size
/// S = D per row, `groups` = 1, and the affine parameters run along S.
#[derive(Clone, Copy)]
struct NormShape {
    channels: usize,
    spatial: usize,
    groups: usize,
    /// Layer norm: the per-element affine runs along the last dimension.
    along_last: bool,
}

impl NormShape {
    fn group_len(&self) -> usize {
        self.channels / self.groups * self.spatial
    }
}

/// Group norm: splits the block of `group` into its channels, `(channel index, plane)`.
fn runs<T>(block: &[T], shape: NormShape, group: usize) -> impl Iterator<Item = (usize, &[T])> {
    let first = group * (shape.channels / shape.groups);
    block
        .chunks_exact(shape.spatial)
        .enumerate()
        .map(move |(i, r)| (first + i, r))
}

/// Group norm's per-channel `y = x scale + shift`, one formula for the forward and for the
/// fused SiLU's backward, which must recompute the same bits.
fn channel_affine<T: Real>((mean, r): (T, T), (w, b): (T, T)) -> (T, T) {
    (r * w, b - mean * r * w)
}

fn norm_fwd<T: Real>(x: &[T], w: &[T], b: &[T], norm: Norm) -> Vec<T> {
    let (shape, eps) = (norm.shape, T::from_f64(norm.eps));
    let n = shape.group_len();
    par_blocks(x.len(), n, |first, out| {
        let x = &x[first * n..];
        for (k, (xs, ys)) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)).enumerate() {
            let (mean, r) = moments(xs, eps);
            let group = (first + k) % shape.groups;
            if shape.along_last {
                for ((y, &v), (&w, &b)) in ys.iter_mut().zip(xs).zip(w.iter().zip(b)) {
                    *y = (v - mean) * r * w + b;
                }
            } else {
                let planes = ys.chunks_exact_mut(shape.spatial);
                for ((c, xr), yr) in runs(xs, shape, group).zip(planes) {
                    let (scale, shift) = channel_affine((mean, r), (w[c], b[c]));
                    for (y, &v) in yr.iter_mut().zip(xr) {
                        *y = v * scale + shift;
                    }
                }
            }
            if norm.silu {
                for y in ys {
                    *y = silu_of(*y);
                }
            }
        }
    })
}

/// The gradients `[dx | dw | db]` in one buffer, from `wb = [w | b]`.
fn norm_bwd<T: Real>(x: &[T], wb: &[T], dy: &[T], norm: Norm) -> Vec<T> {
    if norm.shape.along_last {
        layer_norm_bwd(x, wb, dy, norm)
    } else {
        group_norm_bwd(x, wb, dy, norm)
    }
}

/// The input gradient's coefficients for a block from `Σ g w` and `Σ g w x̂`:
/// `dx = r (g w - a - x̂ bm) = r g w - r (a - mean r bm) - x r² bm`, as `(shift, x_coef)`.
fn dx_coefficients<T: Real>((g_sum, gx_sum): (T, T), inv_n: T, (mean, r): (T, T)) -> (T, T) {
    let (a, bm) = (g_sum * inv_n, gx_sum * inv_n);
    (-(r * (a - mean * r * bm)), -(r * r * bm))
}

/// Layer norm (which has no SiLU variant): `dw`, `db` sum over every row, in row order.
fn layer_norm_bwd<T: Real>(x: &[T], wb: &[T], dy: &[T], norm: Norm) -> Vec<T> {
    let (shape, eps) = (norm.shape, T::from_f64(norm.eps));
    let w = &wb[..wb.len() / 2];
    let params = w.len();
    let mut out = vec![T::ZERO; x.len() + 2 * params];
    let (dx, rest) = out.split_at_mut(x.len());
    let (dw, db) = rest.split_at_mut(params);
    let n = shape.group_len();
    let inv_n = T::ONE / T::from_usize(n);
    for ((xs, gs), dxs) in x
        .chunks_exact(n)
        .zip(dy.chunks_exact(n))
        .zip(dx.chunks_exact_mut(n))
    {
        let (mean, r) = moments(xs, eps);
        let (mut g_sum, mut gx_sum) = (T::ZERO, T::ZERO);
        for ((&v, &g), (&w, (dw, db))) in xs
            .iter()
            .zip(gs)
            .zip(w.iter().zip(dw.iter_mut().zip(db.iter_mut())))
        {
            let xhat = (v - mean) * r;
            g_sum += g * w;
            gx_sum += g * w * xhat;
            *dw += g * xhat;
            *db += g;
        }
        let (shift, x_coef) = dx_coefficients((g_sum, gx_sum), inv_n, (mean, r));
        for (((dx, &v), &g), &w) in dxs.iter_mut().zip(xs).zip(gs).zip(w) {
            *dx = r * g * w + x_coef * v + shift;
        }
    }
    out
}

/// Group norm: the (sample, group) blocks on the pool, each leaving its per-channel `dw`, `db`
/// terms, summed afterwards in block order (the same sums whatever the thread count).
fn group_norm_bwd<T: Real>(x: &[T], wb: &[T], dy: &[T], norm: Norm) -> Vec<T> {
    let (shape, eps) = (norm.shape, T::from_f64(norm.eps));
    let (w, b) = wb.split_at(wb.len() / 2);
    let params = w.len();
    let per_group = shape.channels / shape.groups;
    let n = shape.group_len();
    let inv_n = T::ONE / T::from_usize(n);
    let side = Side {
        per_block: 2 * per_group,
        spare: 2 * params,
    };
    let (mut out, terms) = par_blocks_with_side(x.len(), n, 1, side, |first, dx, terms| {
        let mut pre_grad = vec![T::ZERO; if norm.silu { n } else { 0 }];
        let blocks = dx
            .chunks_exact_mut(n)
            .zip(terms.chunks_exact_mut(2 * per_group));
        for (j, (dxs, terms)) in blocks.enumerate() {
            let k = first + j;
            let (xs, gs) = (&x[k * n..][..n], &dy[k * n..][..n]);
            let (mean, r) = moments(xs, eps);
            let group = k % shape.groups;
            let gs = if norm.silu {
                silu_grad_at_norm(&mut pre_grad, (xs, gs), (w, b), (mean, r), shape, group);
                &pre_grad
            } else {
                gs
            };
            // Σ dy w and Σ dy w x̂ over the block; each channel's dw, db terms.
            let (mut g_sum, mut gx_sum) = (T::ZERO, T::ZERO);
            let (dw, db) = terms.split_at_mut(per_group);
            for ((c, xr), gr) in runs(xs, shape, group).zip(gs.chunks_exact(shape.spatial)) {
                let s_g = sum(gr);
                let s_gx = sum_zip(xr, gr, |v, g| v * g);
                // Σ g x̂ = r (Σ g x - mean Σ g).
                let s_gxhat = r * (s_gx - mean * s_g);
                let i = c - group * per_group;
                (dw[i], db[i]) = (s_gxhat, s_g);
                g_sum += s_g * w[c];
                gx_sum += s_gxhat * w[c];
            }
            let (shift, x_coef) = dx_coefficients((g_sum, gx_sum), inv_n, (mean, r));
            for (((c, xr), gr), dxr) in runs(xs, shape, group)
                .zip(gs.chunks_exact(shape.spatial))
                .zip(dxs.chunks_exact_mut(shape.spatial))
            {
                let g_coef = r * w[c];
                for ((dx, &v), &g) in dxr.iter_mut().zip(xr).zip(gr) {
                    *dx = g_coef * g + x_coef * v + shift;
                }
            }
        }
    });
    let (mut dw, mut db) = (vec![T::ZERO; params], vec![T::ZERO; params]);
    for (k, terms) in terms.chunks_exact(2 * per_group).enumerate() {
        let first = (k % shape.groups) * per_group;
        let (tw, tb) = terms.split_at(per_group);
        for (i, (&tw, &tb)) in tw.iter().zip(tb).enumerate() {
            dw[first + i] += tw;
            db[first + i] += tb;
        }
    }
    out.extend_from_slice(&dw);
    out.extend_from_slice(&db);
    out
}

/// For a group-norm block of the input `xs` and its output gradient `gs` under SiLU: the
/// gradient at the normalised output `h` (before SiLU), recomputed exactly as the forward
/// computes it.
fn silu_grad_at_norm<T: Real>(
    out: &mut [T],
    (xs, gs): (&[T], &[T]),
    (w, b): (&[T], &[T]),
    (mean, r): (T, T),
    shape: NormShape,
    group: usize,
) {
    let planes = out.chunks_exact_mut(shape.spatial);
    for (((c, xr), gr), or) in runs(xs, shape, group)
        .zip(gs.chunks_exact(shape.spatial))
        .zip(planes)
    {
        let (scale, shift) = channel_affine((mean, r), (w[c], b[c]));
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(gr) {
            *o = silu_grad_of(v * scale + shift, g);
        }
    }
}

/// Normalises contiguous `x` and applies `w`, `b` (one value per channel; for layer norm per
/// element of the last dimension), then SiLU if `silu`.
fn normalize(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    shape: NormShape,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let norm = Norm { shape, eps, silu };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, norm)
}

/// Layer norm over the last dimension; `weight` / `bias` of its size, or none.
pub(crate) fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let shape = NormShape {
        channels: 1,
        spatial: d,
        groups: 1,
        along_last: true,
    };
    affine_norm(x, (weight, bias), d, shape, eps, false)
}

/// Group norm of (B, C, ...) over `groups` groups of channels, with per-channel `weight` /
/// `bias` or none, then SiLU if `silu` (in the same node: the backward recomputes the
/// normalised values instead of keeping them).
pub(crate) fn group_norm(
    x: &Tensor,
    groups: usize,
    (weight, bias): (Option<&Tensor>, Option<&Tensor>),
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let (batch, channels) = (x.dim(0)?, x.dim(1)?);
    let shape = NormShape {
        channels,
        spatial: x.elem_count() / (batch * channels).max(1),
        groups,
        along_last: false,
    };
    affine_norm(x, (weight, bias), channels, shape, eps, silu)
}

fn affine_norm(
    x: &Tensor,
    (weight, bias): (Option<&Tensor>, Option<&Tensor>),
    params: usize,
    shape: NormShape,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    // Absent parameters are the identity: constant ones and zeros, which get no gradient.
    let ones;
    let zeros;
    let w = match weight {
        Some(w) => w,
        None => {
            ones = Tensor::ones(params, x.dtype(), x.device())?;
            &ones
        }
    };
    let b = match bias {
        Some(b) => b,
        None => {
            zeros = Tensor::zeros(params, x.dtype(), x.device())?;
            &zeros
        }
    };
    for (name, t) in [("weight", w), ("bias", b)] {
        if t.elem_count() != params {
            candle_core::bail!(
                "normalisation: {name} has {} elements, expected {params}",
                t.elem_count()
            )
        }
    }
    normalize(x, w, b, shape, eps, silu)
}

#[derive(Clone, Copy)]
struct Norm {
    shape: NormShape,
    eps: f64,
    /// SiLU applied to the normalised output (group norm only: `layer_norm` passes false).
    silu: bool,
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "adm-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = dispatch!(self.name(), [(xs, xl), (ws, wl), (bs, bl)], |x, w, b| {
            norm_fwd(x, w, b, *self)
        });
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let wb = Tensor::cat(&[w.detach(), b.detach()], 0)?;
        let all = x.apply_op3_no_bwd(&wb, &grad.contiguous()?, &NormGrad(*self))?;
        let (n, p) = (x.elem_count(), w.elem_count());
        let part =
            |t: &Tensor, start: usize, len: usize| all.narrow(0, start, len)?.reshape(t.shape());
        // The parameters' parts are copied out: a handed-over view would keep the input-sized
        // buffer alive until the optimizer step.
        let param = |t: &Tensor, start: usize| tracked(t, || part(t, start, p)?.copy());
        Ok((
            tracked(x, || part(x, 0, n))?,
            param(w, n)?,
            param(b, n + p)?,
        ))
    }
}

/// `grad()` for an operand that takes part in autograd, `None` for a constant (candle would
/// otherwise store a gradient for a frozen tensor, and compute it for nothing) and for a Var
/// whose gradient [`crate::backward`] took over.
pub(crate) fn tracked(t: &Tensor, grad: impl FnOnce() -> Result<Tensor>) -> Result<Option<Tensor>> {
    if t.track_op() {
        crate::backward::hand_over(t, grad()?)
    } else {
        Ok(None)
    }
}

/// The backward of [`Norm`]: `[dx | dw | db]` from `x`, `[w | b]` and the output gradient.
struct NormGrad(Norm);

impl CustomOp3 for NormGrad {
    fn name(&self) -> &'static str {
        "adm-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let len = xl.shape().elem_count() + wl.shape().elem_count();
        let out = dispatch!(self.name(), [(xs, xl), (ws, wl), (gs, gl)], |x, wb, g| {
            norm_bwd(x, wb, g, self.0)
        });
        Ok((out, Shape::from(len)))
    }
}

// ---------------------------------------------------------------------------------------
// im2col / col2im.

/// A convolution's window geometry over an `h` x `w` input.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Windows {
    pub kh: usize,
    pub kw: usize,
    pub padding: usize,
    pub stride: usize,
    pub h: usize,
    pub w: usize,
}

impl Windows {
    /// A 1x1 stride-1 window without padding: the input is its own unfolding.
    pub fn pointwise(&self) -> bool {
        (self.kh, self.kw, self.padding, self.stride) == (1, 1, 0, 1)
    }

    pub fn out_size(&self) -> (usize, usize) {
        let p = self.padding;
        (
            (self.h + 2 * p - self.kh) / self.stride + 1,
            (self.w + 2 * p - self.kw) / self.stride + 1,
        )
    }

    /// For kernel offset `k` along an axis of input size `n` and output size `o`: the output
    /// positions whose input `i = o s + k - p` lies inside the input.
    fn valid(&self, k: usize, n: usize, o: usize) -> std::ops::Range<usize> {
        let (s, p) = (self.stride, self.padding);
        // i >= 0  <=>  o s >= p - k
        let lo = p.saturating_sub(k).div_ceil(s);
        // i < n  <=>  o s < n + p - k
        let hi = (n + p).saturating_sub(k).div_ceil(s).min(o);
        lo.min(hi)..hi
    }

    /// Calls `f(kernel position, output row, input row, first input column, output
    /// columns)` for every kernel position and output row that reads inside the input.
    fn for_each_row(&self, mut f: impl FnMut(usize, usize, usize, usize, Range2)) {
        let (ho, wo) = self.out_size();
        for ki in 0..self.kh {
            let rows = self.valid(ki, self.h, ho);
            for kj in 0..self.kw {
                let cols = self.valid(kj, self.w, wo);
                let k = ki * self.kw + kj;
                for oy in rows.clone() {
                    let iy = oy * self.stride + ki - self.padding;
                    let ix0 = cols.start * self.stride + kj - self.padding;
                    f(k, oy, iy, ix0, cols.clone());
                }
            }
        }
    }
}

type Range2 = std::ops::Range<usize>;

/// (B, C, H, W) -> (B, C kh kw, Ho Wo): row `(c, ki, kj)` holds input pixel
/// `(o_y s + ki - p, o_x s + kj - p)` of channel `c` at column `(o_y, o_x)`, zero outside.
fn im2col_planes<T: Real>(x: &[T], (b, c): (usize, usize), win: Windows) -> Vec<T> {
    let (ho, wo) = win.out_size();
    let (k, l, plane) = (win.kh * win.kw, ho * wo, win.h * win.w);
    if win.stride == 1 && (ho, wo) == (win.h, win.w) {
        let planes = |first: usize, out: &mut [MaybeUninit<T>], _: &mut [T]| {
            let x = &x[first * plane..];
            for (src, dst) in x.chunks_exact(plane).zip(out.chunks_exact_mut(k * l)) {
                shifted_copies(src, dst, win);
            }
        };
        let no_side = Side {
            per_block: 0,
            spare: 0,
        };
        // SAFETY: `shifted_copies` writes every element of its channel's block.
        return unsafe { par_blocks_uninit(b * c * k * l, k * l, 1, no_side, planes) }.0;
    }
    par_blocks(b * c * k * l, k * l, |first, out| {
        let x = &x[first * plane..];
        for (src, dst) in x.chunks_exact(plane).zip(out.chunks_exact_mut(k * l)) {
            win.for_each_row(|k, oy, iy, ix0, cols| {
                let row = &mut dst[k * l + oy * wo..][cols.clone()];
                let input = &src[iy * win.w + ix0..];
                if win.stride == 1 {
                    row.copy_from_slice(&input[..row.len()]);
                } else {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = input[j * win.stride];
                    }
                }
            });
        }
    })
}

/// [`im2col_planes`] of one channel for a stride-1 window whose output is the input's size
/// ("same" padding, the 3x3 convolutions), writing every element of `dst`: kernel offset
/// `(dy, dx)` reads the plane shifted by `dy W + dx` elements, so each offset is one copy of
/// the rows it reads (not one per row), then zeros over the rows outside the input and the
/// columns that wrapped around from the neighbouring row.
fn shifted_copies<T: Real>(src: &[T], dst: &mut [MaybeUninit<T>], win: Windows) {
    let (h, w, p) = (win.h, win.w, win.padding);
    let plane = h * w;
    let zero = |s: &mut [MaybeUninit<T>]| s.fill(MaybeUninit::new(T::ZERO));
    for (k, out) in dst.chunks_exact_mut(plane).enumerate() {
        let (ki, kj) = (k / win.kw, k % win.kw);
        let shift = (ki * w + kj) as isize - (p * w + p) as isize;
        // Output rows whose input row lies inside the plane, as a range of elements, less
        // an element that would be read before the plane's start or past its end (such an
        // element lies in a zeroed column).
        let rows = win.valid(ki, h, h);
        let (lo, hi) = (rows.start * w, rows.end * w);
        let start = lo.max((-shift).max(0) as usize).min(hi);
        let end = hi.min((plane as isize - shift).max(0) as usize).max(start);
        zero(&mut out[..start]);
        let from = (start as isize + shift) as usize;
        for (o, &v) in out[start..end].iter_mut().zip(&src[from..]) {
            o.write(v);
        }
        zero(&mut out[end..]);
        let cols = win.valid(kj, w, w);
        for row in out[lo..hi].chunks_exact_mut(w) {
            zero(&mut row[..cols.start]);
            zero(&mut row[cols.end..]);
        }
    }
}

/// The adjoint of [`im2col_planes`]: (B, C kh kw, Ho Wo) -> (B, C, H, W), summing the windows.
fn col2im_planes<T: Real>(cols: &[T], (b, c): (usize, usize), win: Windows) -> Vec<T> {
    let (ho, wo) = win.out_size();
    let (k, l, plane) = (win.kh * win.kw, ho * wo, win.h * win.w);
    par_blocks(b * c * plane, plane, |first, out| {
        let cols = &cols[first * k * l..];
        for (src, dst) in cols.chunks_exact(k * l).zip(out.chunks_exact_mut(plane)) {
            win.for_each_row(|k, oy, iy, ix0, cols| {
                let row = &src[k * l + oy * wo..][cols];
                let target = &mut dst[iy * win.w + ix0..];
                if win.stride == 1 {
                    // Unit stride as its own loop: the compiler vectorises it.
                    for (t, &v) in target[..row.len()].iter_mut().zip(row) {
                        *t += v;
                    }
                } else {
                    for (j, &v) in row.iter().enumerate() {
                        target[j * win.stride] += v;
                    }
                }
            });
        }
    })
}

/// The convolution of contiguous (B, C_in, H, W) `x` with contiguous (C_out, C_in, kh, kw)
/// `w`: (B, C_out, Ho Wo) in one GEMM per sample, `W (C_out, C_in kh kw) · cols_b`, over
/// the unfolded windows (or `x` itself for a 1x1 stride-1 convolution).
pub(crate) fn conv2d_cpu(
    (x, xl): (&CpuStorage, &Layout),
    (w, wl): (&CpuStorage, &Layout),
    win: Windows,
) -> Result<CpuStorage> {
    let (&[b, c_in, ..], &[c_out, ..]) = (xl.dims(), wl.dims()) else {
        candle_core::bail!(
            "conv2d: operands of shapes {:?} and {:?}",
            xl.dims(),
            wl.dims()
        )
    };
    Ok(dispatch!("conv2d", [(x, xl), (w, wl)], |x, w| {
        conv_planes(x, w, (b, c_in, c_out), win)
    }))
}

fn conv_planes<T: Real>(
    x: &[T],
    w: &[T],
    (b, c_in, c_out): (usize, usize, usize),
    win: Windows,
) -> Vec<T> {
    let (ho, wo) = win.out_size();
    let (k, l) = (c_in * win.kh * win.kw, ho * wo);
    let unfolded;
    let cols = if win.pointwise() {
        x
    } else {
        unfolded = im2col_planes(x, (b, c_in), win);
        &unfolded
    };
    let matrix = |rows, cols, bs| View::flat(0, (rows, cols), (cols, 1), bs);
    gemm_batched(b, (w, matrix(c_out, k, 0)), (cols, matrix(k, l, k * l)))
}

/// Unfolds contiguous (B, C, H, W) `x` into (B, C kh kw, Ho Wo) (no autograd: the
/// convolution differentiates itself).
pub(crate) fn unfold(x: &Tensor, win: Windows) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Im2Col(win))
}

/// The adjoint of [`unfold`]: (B, C kh kw, Ho Wo) -> (B, C, H, W), no autograd.
pub(crate) fn col2im(cols: &Tensor, win: Windows) -> Result<Tensor> {
    cols.contiguous()?.apply_op1_no_bwd(&Col2Im(win))
}

struct Im2Col(Windows);
struct Col2Im(Windows);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "adm-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let win = self.0;
        let [b, c, h, w] = l.dims() else {
            candle_core::bail!("im2col: expected (B, C, H, W), got {:?}", l.dims())
        };
        let (b, c) = (*b, *c);
        if (*h, *w) != (win.h, win.w) {
            candle_core::bail!(
                "im2col: input {h}x{w}, windows made for {}x{}",
                win.h,
                win.w
            )
        }
        let (ho, wo) = win.out_size();
        let out = dispatch!(self.name(), [(s, l)], |x| im2col_planes(x, (b, c), win));
        Ok((out, Shape::from((b, c * win.kh * win.kw, ho * wo))))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "adm-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let win = self.0;
        let k = win.kh * win.kw;
        let [b, ck, _] = l.dims() else {
            candle_core::bail!("col2im: expected (B, C kh kw, L), got {:?}", l.dims())
        };
        let (b, c) = (*b, *ck / k);
        let out = dispatch!(self.name(), [(s, l)], |x| col2im_planes(x, (b, c), win));
        Ok((out, Shape::from((b, c, win.h, win.w))))
    }
}

// ---------------------------------------------------------------------------------------
// Element-wise ops whose backward needs only the input and the output gradient.

/// The two kernels of such an op (GEGLU, SiLU), made candle ops by [`Forward`] (with its
/// backward) and [`Backward`] (the gradient, no autograd).
trait Elementwise: Copy + Send + Sync + 'static {
    const NAME: &'static str;
    const GRAD_NAME: &'static str;
    /// The output shape for a contiguous input laid out as `l`.
    fn out_shape(l: &Layout) -> Shape;
    fn forward<T: Real>(x: &[T], l: &Layout) -> Vec<T>;
    /// The input gradient from the input and the output gradient.
    fn backward<T: Real>(x: &[T], dy: &[T], l: &Layout) -> Vec<T>;
}

struct Forward<K>(K);
struct Backward<K>(K);

impl<K: Elementwise> CustomOp1 for Forward<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch!(K::NAME, [(s, l)], |x| K::forward(x, l));
        Ok((out, K::out_shape(l)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &Backward(self.0),
        )?))
    }
}

impl<K: Elementwise> CustomOp2 for Backward<K> {
    fn name(&self) -> &'static str {
        K::GRAD_NAME
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = dispatch!(K::GRAD_NAME, [(xs, xl), (gs, gl)], |x, g| K::backward(
            x, g, xl
        ));
        Ok((out, xl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------
// GEGLU.

/// `a gelu(g)` for contiguous `x` = (..., [a | g]) with halves of size `n`: (..., n).
pub(crate) fn geglu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Forward(Geglu))
}

fn geglu_rows<T: Real>(x: &[T], n: usize) -> Vec<T> {
    par_blocks(x.len() / 2, n, |first, out| {
        let x = &x[2 * n * first..];
        for (row, y) in x.chunks_exact(2 * n).zip(out.chunks_exact_mut(n)) {
            let (a, g) = row.split_at(n);
            for ((y, &a), &g) in y.iter_mut().zip(a).zip(g) {
                *y = a * g * g.normal_cdf_pdf().0;
            }
        }
    })
}

fn geglu_grad_rows<T: Real>(x: &[T], dy: &[T], n: usize) -> Vec<T> {
    par_blocks(x.len(), 2 * n, |first, out| {
        let (x, dy) = (&x[2 * n * first..], &dy[n * first..]);
        for ((row, dy), dx) in x
            .chunks_exact(2 * n)
            .zip(dy.chunks_exact(n))
            .zip(out.chunks_exact_mut(2 * n))
        {
            let (a, g) = row.split_at(n);
            let (da, dg) = dx.split_at_mut(n);
            for ((((da, dg), &a), &g), &dy) in da.iter_mut().zip(dg).zip(a).zip(g).zip(dy) {
                let (cdf, pdf) = g.normal_cdf_pdf();
                *da = dy * g * cdf;
                *dg = dy * a * (cdf + g * pdf);
            }
        }
    })
}

/// The half size `n` of an even last dimension and the (..., n) output shape
/// (`crate::ops::geglu` checked the parity).
fn halves(l: &Layout) -> (usize, Shape) {
    let n = last_dim(l) / 2;
    let mut dims = l.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    (n, Shape::from(dims))
}

#[derive(Clone, Copy)]
struct Geglu;

impl Elementwise for Geglu {
    const NAME: &'static str = "adm-geglu";
    const GRAD_NAME: &'static str = "adm-geglu-grad";

    fn out_shape(l: &Layout) -> Shape {
        halves(l).1
    }

    fn forward<T: Real>(x: &[T], l: &Layout) -> Vec<T> {
        geglu_rows(x, halves(l).0)
    }

    fn backward<T: Real>(x: &[T], dy: &[T], l: &Layout) -> Vec<T> {
        geglu_grad_rows(x, dy, halves(l).0)
    }
}

// ---------------------------------------------------------------------------------------
// SiLU.

/// `x σ(x)` of a CPU f32 / f64 tensor, one autograd node whose backward is one pass
/// (candle's takes nine tensor ops).
pub(crate) fn silu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Forward(Silu))
}

/// candle's formula, so the forward is bitwise candle's `silu`.
#[inline(always)]
fn silu_of<T: Real>(x: T) -> T {
    x / (T::ONE + (-x).exp())
}

/// `dy d/dx x σ(x) = dy σ(x) (1 + x (1 - σ(x)))`.
#[inline(always)]
fn silu_grad_of<T: Real>(x: T, dy: T) -> T {
    let s = T::ONE / (T::ONE + (-x).exp());
    dy * s * (T::ONE + x * (T::ONE - s))
}

fn silu_elems<T: Real>(x: &[T]) -> Vec<T> {
    par_blocks(x.len(), 1, |first, out| {
        for (y, &x) in out.iter_mut().zip(&x[first..]) {
            *y = silu_of(x);
        }
    })
}

fn silu_grad_elems<T: Real>(x: &[T], dy: &[T]) -> Vec<T> {
    par_blocks(x.len(), 1, |first, out| {
        for ((dx, &x), &dy) in out.iter_mut().zip(&x[first..]).zip(&dy[first..]) {
            *dx = silu_grad_of(x, dy);
        }
    })
}

#[derive(Clone, Copy)]
struct Silu;

impl Elementwise for Silu {
    const NAME: &'static str = "adm-silu";
    const GRAD_NAME: &'static str = "adm-silu-grad";

    fn out_shape(l: &Layout) -> Shape {
        l.shape().clone()
    }

    fn forward<T: Real>(x: &[T], _l: &Layout) -> Vec<T> {
        silu_elems(x)
    }

    fn backward<T: Real>(x: &[T], dy: &[T], _l: &Layout) -> Vec<T> {
        silu_grad_elems(x, dy)
    }
}

// ---------------------------------------------------------------------------------------
// Bias addition along one axis.

/// `x + bias` for contiguous `x` viewed as (outer, n, inner) around `axis` (of size n) and
/// `bias` of n elements (`crate::ops::bias_add` checked the sizes).
pub(crate) fn bias_add(x: &Tensor, bias: &Tensor, axis: usize) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&bias.contiguous()?, BiasAdd { axis })
}

struct BiasAdd {
    axis: usize,
}

/// The number of elements after `axis` of a layout.
fn inner_size(l: &Layout, axis: usize) -> usize {
    l.dims()[axis + 1..].iter().product()
}

fn bias_add_blocks<T: Real>(x: &[T], b: &[T], inner: usize) -> Vec<T> {
    // Blocks of one bias vector's worth: (n) rows when inner is 1, else runs of `inner`.
    let block = if inner == 1 { b.len() } else { inner };
    par_blocks(x.len(), block, |first, out| {
        let x = &x[first * block..];
        if inner == 1 {
            for (row, xr) in out.chunks_exact_mut(b.len()).zip(x.chunks_exact(b.len())) {
                for ((y, &x), &v) in row.iter_mut().zip(xr).zip(b) {
                    *y = x + v;
                }
            }
        } else {
            for (i, (run, xr)) in out
                .chunks_exact_mut(inner)
                .zip(x.chunks_exact(inner))
                .enumerate()
            {
                let v = b[(first + i) % b.len()];
                for (y, &x) in run.iter_mut().zip(xr) {
                    *y = x + v;
                }
            }
        }
    })
}

fn bias_grad_blocks<T: Real>(g: &[T], n: usize, inner: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; n];
    if inner == 1 {
        // Rows of n: vectorised column sums.
        for row in g.chunks_exact(n) {
            for (o, &v) in out.iter_mut().zip(row) {
                *o += v;
            }
        }
    } else {
        for (i, run) in g.chunks_exact(inner).enumerate() {
            out[i % n] += sum(run);
        }
    }
    out
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "adm-bias-add"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let inner = inner_size(xl, self.axis);
        let out = dispatch!(self.name(), [(xs, xl), (bs, bl)], |x, b| {
            bias_add_blocks(x, b, inner)
        });
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = tracked(bias, || {
            grad.contiguous()?
                .apply_op1_no_bwd(&BiasGrad {
                    axis: self.axis,
                    n: bias.elem_count(),
                })?
                .reshape(bias.shape())
        })?;
        Ok((tracked(x, || Ok(grad.clone()))?, db))
    }
}

struct BiasGrad {
    axis: usize,
    /// The bias's length: the size of `axis`, or of all axes up to it.
    n: usize,
}

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "adm-bias-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, inner) = (self.n, inner_size(l, self.axis));
        let out = dispatch!(self.name(), [(s, l)], |g| bias_grad_blocks(g, n, inner));
        Ok((out, Shape::from(n)))
    }
}

// Sum over the batch axis.

/// The sum of contiguous `x` (B, ...) over its first axis, no autograd (candle's reduction
/// over a leading axis is about 40x slower than an addition of the same size).
pub(crate) fn sum_batch(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&SumBatch(x.dim(0)?))
}

struct SumBatch(usize);

fn sum_rows<T: Real>(x: &[T], b: usize) -> Vec<T> {
    let n = x.len() / b.max(1);
    par_blocks(n, 1, |first, out| {
        out.copy_from_slice(&x[first..first + out.len()]);
        for chunk in x.chunks_exact(n).skip(1) {
            for (o, &v) in out.iter_mut().zip(&chunk[first..]) {
                *o += v;
            }
        }
    })
}

impl CustomOp1 for SumBatch {
    fn name(&self) -> &'static str {
        "adm-sum-batch"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let b = self.0;
        let out = dispatch!(self.name(), [(s, l)], |x| sum_rows(x, b));
        Ok((out, Shape::from(&l.dims()[1..])))
    }
}

// ---------------------------------------------------------------------------------------
// Transposes of stacked matrices.

/// (B, R, C) -> (B, C, R): each matrix of contiguous `x` transposed, no autograd (candle's
/// strided copy of a transposed view moves one element at a time through an index iterator).
pub(crate) fn transpose_planes(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op1_no_bwd(&TransposePlanes { sum: false })
}

/// (B, R, C) -> (C, R): the sum over the batch of the transposed matrices, no autograd.
pub(crate) fn sum_transposed_planes(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op1_no_bwd(&TransposePlanes { sum: true })
}

struct TransposePlanes {
    sum: bool,
}

/// Square blocks of this edge are transposed at a time, so the strided reads of a block stay
/// in L1.
const TRANSPOSE_TILE: usize = 32;

fn transpose_planes_of<T: Real>(x: &[T], (b, r, c): (usize, usize, usize), sum: bool) -> Vec<T> {
    let planes = if sum { 1 } else { b };
    // Parts of whole row tiles: a thinner part would read each cache line of `x` for only a
    // few of the 16 columns it holds.
    par_blocks_at_least(planes * c * r, r, TRANSPOSE_TILE, |first, out| {
        let rows = out.len() / r;
        for t0 in (0..rows).step_by(TRANSPOSE_TILE) {
            for i0 in (0..r).step_by(TRANSPOSE_TILE) {
                let i1 = r.min(i0 + TRANSPOSE_TILE);
                for t in t0..rows.min(t0 + TRANSPOSE_TILE) {
                    // Output row t is column j of input plane `plane` (of every plane for a sum).
                    let (plane, j) = ((first + t) / c, (first + t) % c);
                    let sources = if sum { 0..b } else { plane..plane + 1 };
                    let dst = &mut out[t * r + i0..t * r + i1];
                    for (n, p) in sources.enumerate() {
                        let src = x[p * r * c + i0 * c + j..].iter().step_by(c);
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d = if n == 0 { v } else { *d + v };
                        }
                    }
                }
            }
        }
    })
}

impl CustomOp1 for TransposePlanes {
    fn name(&self) -> &'static str {
        "adm-transpose-planes"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let &[b, r, c] = l.dims() else {
            candle_core::bail!("{}: expected (B, R, C), got {:?}", self.name(), l.dims())
        };
        let sum = self.sum;
        let out = dispatch!(self.name(), [(s, l)], |x| transpose_planes_of(
            x,
            (b, r, c),
            sum
        ));
        let shape = if sum {
            Shape::from((c, r))
        } else {
            Shape::from((b, c, r))
        };
        Ok((out, shape))
    }
}

#[cfg(test)]
mod tests {
    //! Each kernel against the same function composed from candle primitives (values and
    //! autograd gradients), against finite differences, and in f32 against f64.

    use super::*;
    use crate::gradcheck::{check_gradients, GradCheck};
    use crate::test_util::{assert_close, rand_tensor, to_vec};
    use candle_core::{DType, Var, D};

    fn composed_softmax(x: &Tensor) -> Result<Tensor> {
        let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    /// Normalises rows of the last dimension, no affine parameters.
    fn composed_rows(x: &Tensor, eps: f64) -> Result<Tensor> {
        let c = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = c.sqr()?.mean_keepdim(D::Minus1)?;
        c.broadcast_div(&(var + eps)?.sqrt()?)
    }

    fn composed_group_norm(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let y = composed_rows(&x.reshape((dims[0], groups, ()))?, 1e-5)?.reshape(dims)?;
        let mut per_channel = vec![1; dims.len()];
        per_channel[1] = dims[1];
        y.broadcast_mul(&w.reshape(per_channel.as_slice())?)?
            .broadcast_add(&b.reshape(per_channel.as_slice())?)
    }

    fn composed_geglu(x: &Tensor) -> Result<Tensor> {
        let n = x.dim(D::Minus1)? / 2;
        x.narrow(D::Minus1, 0, n)? * x.narrow(D::Minus1, n, n)?.gelu_erf()?
    }

    /// [`compare`], and `f`'s gradient matches finite differences.
    fn check_tol(
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
        inputs: &[Tensor],
        grad_tol: f64,
    ) -> Result<()> {
        compare(&f, reference, inputs, grad_tol)?;
        let report = check_gradients(f, inputs, GradCheck::default())?;
        assert!(report.max_abs_err < 1e-6, "{report:?}");
        Ok(())
    }

    /// `f` and `reference` agree in value (to 1e-12) and in the gradient of a random
    /// projection of the output with respect to every input (to `grad_tol`), which is
    /// nowhere all zero.
    fn compare(
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
        inputs: &[Tensor],
        grad_tol: f64,
    ) -> Result<()> {
        let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (ours, theirs) = (f(&ts)?, reference(&ts)?);
        assert_eq!(ours.dims(), theirs.dims());
        assert_close(&to_vec(&ours)?, &to_vec(&theirs)?, 1e-12);
        let proj = rand_tensor(ours.dims(), 99, 1.0)?;
        let g_ours = (ours * &proj)?.sum_all()?.backward()?;
        let g_theirs = (theirs * &proj)?.sum_all()?.backward()?;
        for (i, v) in vars.iter().enumerate() {
            let a = g_ours.get(v).expect("fused gradient");
            let b = g_theirs.get(v).expect("composed gradient");
            assert_close(&to_vec(a)?, &to_vec(b)?, grad_tol);
            assert!(
                to_vec(a)?.iter().any(|g| *g != 0.0),
                "input {i}: zero gradient"
            );
        }
        Ok(())
    }

    fn check(
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
        inputs: &[Tensor],
    ) -> Result<()> {
        check_tol(f, reference, inputs, 1e-10)
    }

    /// The f32 kernel agrees with the f64 one, forward and backward.
    fn f32_close(f: impl Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor]) -> Result<()> {
        let run = |dtype: DType| -> Result<Vec<Vec<f64>>> {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(&t.to_dtype(dtype)?))
                .collect::<Result<_>>()?;
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts)?;
            let proj = rand_tensor(y.dims(), 98, 1.0)?.to_dtype(dtype)?;
            let grads = (&y * proj)?.sum_all()?.backward()?;
            let mut out = vec![to_vec(&y)?];
            for v in &vars {
                out.push(to_vec(grads.get(v).expect("gradient"))?);
            }
            Ok(out)
        };
        for (a, b) in run(DType::F32)?.iter().zip(run(DType::F64)?.iter()) {
            assert_close(a, b, 5e-5);
        }
        Ok(())
    }

    #[test]
    fn softmax_matches_composed() -> Result<()> {
        // Rows longer than the accumulator lanes, with a remainder.
        let x = rand_tensor(&[2, 3, 19], 1, 4.0)?;
        check(
            |v| softmax_last_dim(&v[0]),
            |v| composed_softmax(&v[0]),
            std::slice::from_ref(&x),
        )?;
        f32_close(|v| softmax_last_dim(&v[0]), &[x])
    }

    #[test]
    fn layer_norm_matches_composed_with_and_without_affine() -> Result<()> {
        let x = rand_tensor(&[3, 2, 21], 2, 2.0)?;
        let w = rand_tensor(&[21], 3, 1.0)?;
        let b = rand_tensor(&[21], 4, 1.0)?;
        let fused = |v: &[Tensor]| layer_norm(&v[0], Some(&v[1]), Some(&v[2]), 1e-5);
        let composed = |v: &[Tensor]| {
            composed_rows(&v[0], 1e-5)?
                .broadcast_mul(&v[1])?
                .broadcast_add(&v[2])
        };
        check(fused, composed, &[x.clone(), w.clone(), b.clone()])?;
        f32_close(fused, &[x.clone(), w, b])?;
        check(
            |v| layer_norm(&v[0], None, None, 1e-5),
            |v| composed_rows(&v[0], 1e-5),
            &[x],
        )
    }

    #[test]
    fn group_norm_matches_composed_for_ranks_three_to_five() -> Result<()> {
        for (i, (dims, groups)) in [
            (vec![2, 6, 3, 4], 3),
            (vec![1, 4, 5], 2),
            (vec![2, 4, 2, 3, 3], 4),
            (vec![1, 8, 17], 1),
        ]
        .into_iter()
        .enumerate()
        {
            let c = dims[1];
            let x = rand_tensor(&dims, 10 + i as u64, 2.0)?;
            let w = rand_tensor(&[c], 20 + i as u64, 1.0)?;
            let b = rand_tensor(&[c], 30 + i as u64, 1.0)?;
            for then_silu in [false, true] {
                let fused = |v: &[Tensor]| {
                    group_norm(&v[0], groups, (Some(&v[1]), Some(&v[2])), 1e-5, then_silu)
                };
                let composed = |v: &[Tensor]| {
                    let y = composed_group_norm(&v[0], groups, &v[1], &v[2])?;
                    if then_silu {
                        y.silu()
                    } else {
                        Ok(y)
                    }
                };
                check(fused, composed, &[x.clone(), w.clone(), b.clone()])?;
                f32_close(fused, &[x.clone(), w.clone(), b.clone()])?;
            }
        }
        Ok(())
    }

    #[test]
    fn group_norm_silu_is_bitwise_the_two_nodes() -> Result<()> {
        // Large enough for the pooled forward; f32, the dtype training runs in.
        for dims in [[2, 64, 16, 16], [1, 6, 3, 5]] {
            let c = dims[1];
            let f32s = |shape: &[usize], seed| rand_tensor(shape, seed, 2.0)?.to_dtype(DType::F32);
            let x = Var::from_tensor(&f32s(&dims, 80)?)?;
            let w = Var::from_tensor(&f32s(&[c], 81)?)?;
            let b = Var::from_tensor(&f32s(&[c], 82)?)?;
            let dy = f32s(&dims, 83)?;
            let run = |fused: bool| -> Result<Vec<Vec<f64>>> {
                let params = (Some(w.as_tensor()), Some(b.as_tensor()));
                let y = if fused {
                    group_norm(x.as_tensor(), 2, params, 1e-5, true)?
                } else {
                    silu(&group_norm(x.as_tensor(), 2, params, 1e-5, false)?)?
                };
                let grads = (&y * &dy)?.sum_all()?.backward()?;
                let mut all = vec![to_vec(&y)?];
                for v in [&x, &w, &b] {
                    all.push(to_vec(grads.get(v.as_tensor()).expect("a gradient"))?);
                }
                Ok(all)
            };
            assert_eq!(run(true)?, run(false)?, "{dims:?}");
        }
        Ok(())
    }

    #[test]
    fn constant_operands_get_no_gradient() -> Result<()> {
        // A frozen network's weights are plain tensors: they must not appear in the
        // gradient store (the trainer checks that a frozen teacher receives nothing).
        let x = Var::from_tensor(&rand_tensor(&[2, 4, 3], 40, 1.0)?)?;
        let (w, b) = (rand_tensor(&[4], 41, 1.0)?, rand_tensor(&[4], 42, 1.0)?);
        let y = group_norm(x.as_tensor(), 2, (Some(&w), Some(&b)), 1e-5, false)?;
        let y = bias_add(&y, &b, 1)?;
        let y = layer_norm(&y, Some(&rand_tensor(&[3], 43, 1.0)?), None, 1e-5)?;
        let grads = (y * rand_tensor(&[2, 4, 3], 44, 1.0)?)?
            .sum_all()?
            .backward()?;
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
        // A constant input with a trainable bias: only the bias gets a gradient.
        let bias = Var::from_tensor(&b)?;
        let c = rand_tensor(&[2, 4, 3], 45, 1.0)?;
        let grads = bias_add(&c, bias.as_tensor(), 1)?.sum_all()?.backward()?;
        assert!(grads.get(&c).is_none() && grads.get(bias.as_tensor()).is_some());
        Ok(())
    }

    #[test]
    fn geglu_matches_composed() -> Result<()> {
        let x = rand_tensor(&[2, 3, 2 * 11], 5, 3.0)?;
        // candle's gelu_erf backward rounds 1/sqrt(2 pi) to 0.398942 (relative error 7e-7);
        // the finite differences hold ours to 1e-6 absolute.
        check_tol(
            |v| geglu(&v[0]),
            |v| composed_geglu(&v[0]),
            std::slice::from_ref(&x),
            1e-5,
        )?;
        f32_close(|v| geglu(&v[0]), &[x])
    }

    #[test]
    fn silu_matches_candle() -> Result<()> {
        let x = rand_tensor(&[2, 3, 17], 9, 4.0)?;
        assert_eq!(to_vec(&silu(&x)?)?, to_vec(&x.silu()?)?);
        check(|v| silu(&v[0]), |v| v[0].silu(), std::slice::from_ref(&x))?;
        f32_close(|v| silu(&v[0]), &[x])
    }

    #[test]
    fn bias_add_matches_broadcast_add_on_every_axis() -> Result<()> {
        let x = rand_tensor(&[2, 3, 4, 5], 6, 1.0)?;
        for axis in 0..4 {
            let n = x.dim(axis)?;
            let b = rand_tensor(&[n], 7 + axis as u64, 1.0)?;
            let mut shape = vec![1; 4];
            shape[axis] = n;
            check(
                |v| bias_add(&v[0], &v[1], axis),
                |v| v[0].broadcast_add(&v[1].reshape(shape.as_slice())?),
                &[x.clone(), b],
            )?;
            // One bias element per index of the axes up to `axis` (through the public entry
            // point, which accepts both lengths).
            let leading = &x.dims()[..=axis];
            let b = rand_tensor(&[leading.iter().product()], 20 + axis as u64, 1.0)?;
            let mut shape = vec![1; 4];
            shape[..=axis].copy_from_slice(leading);
            check(
                |v| crate::ops::bias_add(&v[0], &v[1], axis),
                |v| v[0].broadcast_add(&v[1].reshape(shape.as_slice())?),
                &[x.clone(), b],
            )?;
        }
        let wrong = rand_tensor(&[7], 30, 1.0)?;
        let err = crate::ops::bias_add(&x, &wrong, 1).unwrap_err().to_string();
        assert!(
            err.contains("7 elements") && err.contains("needs 3 (or 6"),
            "{err}"
        );
        Ok(())
    }

    /// Inputs above `PAR_MIN` elements, which the kernels split over candle's worker pool
    /// (the other tests' inputs are small enough to stay on one thread).
    #[test]
    fn kernels_split_over_the_pool_match_composed() -> Result<()> {
        let x = rand_tensor(&[4, 96, 200], 70, 3.0)?;
        assert!(x.elem_count() >= PAR_MIN);
        compare(
            |v| softmax_last_dim(&v[0]),
            |v| composed_softmax(&v[0]),
            std::slice::from_ref(&x),
            1e-10,
        )?;
        compare(
            |v| geglu(&v[0]),
            |v| composed_geglu(&v[0]),
            std::slice::from_ref(&x),
            1e-5,
        )?;
        compare(
            |v| silu(&v[0]),
            |v| v[0].silu(),
            std::slice::from_ref(&x),
            1e-10,
        )?;
        let (w, b) = (rand_tensor(&[96], 71, 1.0)?, rand_tensor(&[96], 72, 1.0)?);
        compare(
            |v| group_norm(&v[0], 8, (Some(&v[1]), Some(&v[2])), 1e-5, false),
            |v| composed_group_norm(&v[0], 8, &v[1], &v[2]),
            &[x.clone(), w.clone(), b.clone()],
            1e-10,
        )?;
        compare(
            |v| group_norm(&v[0], 8, (Some(&v[1]), Some(&v[2])), 1e-5, true),
            |v| composed_group_norm(&v[0], 8, &v[1], &v[2])?.silu(),
            &[x.clone(), w.clone(), b.clone()],
            1e-10,
        )?;
        let last = rand_tensor(&[200], 73, 1.0)?;
        compare(
            |v| layer_norm(&v[0], Some(&v[1]), None, 1e-5),
            |v| composed_rows(&v[0], 1e-5)?.broadcast_mul(&v[1]),
            &[x.clone(), last.clone()],
            1e-10,
        )?;
        compare(
            |v| bias_add(&v[0], &v[1], 1),
            |v| v[0].broadcast_add(&v[1].reshape((96, 1))?),
            &[x.clone(), w],
            1e-10,
        )?;
        compare(
            |v| bias_add(&v[0], &v[1], 2),
            |v| v[0].broadcast_add(&v[1]),
            &[x.clone(), last],
            1e-10,
        )?;
        // im2col and col2im, through the convolution against candle's own.
        let image = rand_tensor(&[2, 8, 72, 72], 74, 1.0)?;
        let kernel = rand_tensor(&[4, 8, 3, 3], 75, 1.0)?;
        let cfg = crate::Conv2dConfig {
            padding: 1,
            stride: 1,
        };
        compare(
            |v| crate::conv2d(&v[0], &v[1], cfg),
            |v| v[0].conv2d(&v[1], 1, 1, 1, 1),
            &[image, kernel],
            1e-9,
        )
    }

    #[test]
    fn sum_batch_matches_candle() -> Result<()> {
        // One below the parallel threshold, one above.
        for dims in [[3, 4, 5], [3, 300, 260]] {
            let x = rand_tensor(&dims, 8, 1.0)?;
            assert_close(&to_vec(&sum_batch(&x)?)?, &to_vec(&x.sum(0)?)?, 1e-12);
        }
        Ok(())
    }

    #[test]
    fn transposes_match_candle() -> Result<()> {
        // Odd sizes on both sides of the block edge, and outputs past the parallel threshold.
        for dims in [[3, 5, 7], [2, 70, 33], [3, 300, 260]] {
            let x = rand_tensor(&dims, 8, 1.0)?;
            let t = x.transpose(1, 2)?;
            assert_eq!(to_vec(&transpose_planes(&x)?)?, to_vec(&t)?);
            assert_close(
                &to_vec(&sum_transposed_planes(&x)?)?,
                &to_vec(&t.sum(0)?)?,
                1e-12,
            );
        }
        Ok(())
    }

    #[test]
    fn im2col_matches_its_definition() -> Result<()> {
        // Same-size stride-1 windows take whole-plane shifted copies into unzeroed memory;
        // the others go row by row. Both against the definition, element by element.
        let cases = [
            (2, 3, 5, 6, 3, 1, 1),
            (1, 2, 6, 7, 5, 2, 1),
            (1, 2, 4, 4, 1, 0, 1),
            (1, 1, 2, 2, 3, 1, 1),
            (2, 3, 7, 4, 3, 0, 2),
            (2, 3, 6, 7, 4, 2, 3),
            (2, 8, 32, 32, 3, 1, 1),
        ];
        for (i, &(b, c, h, w, k, padding, stride)) in cases.iter().enumerate() {
            let win = Windows {
                kh: k,
                kw: k,
                padding,
                stride,
                h,
                w,
            };
            let x = rand_tensor(&[b, c, h, w], 80 + i as u64, 1.0)?;
            let xs = to_vec(&x)?;
            let (ho, wo) = win.out_size();
            let mut want = Vec::with_capacity(b * c * k * k * ho * wo);
            for bc in 0..b * c {
                for (ki, kj) in (0..k).flat_map(|ki| (0..k).map(move |kj| (ki, kj))) {
                    for (oy, ox) in (0..ho).flat_map(|oy| (0..wo).map(move |ox| (oy, ox))) {
                        let iy = (oy * stride + ki) as isize - padding as isize;
                        let ix = (ox * stride + kj) as isize - padding as isize;
                        let inside = (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix);
                        want.push(if inside {
                            xs[bc * h * w + iy as usize * w + ix as usize]
                        } else {
                            0.0
                        });
                    }
                }
            }
            assert_eq!(to_vec(&unfold(&x, win)?)?, want, "case {i}");
        }
        Ok(())
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col() -> Result<()> {
        // <im2col(x), y> = <x, col2im(y)> for padded and strided windows.
        for (i, &(h, w, k, padding, stride)) in [(5, 6, 3, 1, 1), (7, 4, 3, 0, 2), (6, 7, 4, 2, 3)]
            .iter()
            .enumerate()
        {
            let win = Windows {
                kh: k,
                kw: k,
                padding,
                stride,
                h,
                w,
            };
            let x = rand_tensor(&[2, 3, h, w], 50 + i as u64, 1.0)?;
            let cols = unfold(&x, win)?;
            let y = rand_tensor(cols.dims(), 60 + i as u64, 1.0)?;
            let back = col2im(&y, win)?;
            let lhs = (cols * &y)?.sum_all()?.to_scalar::<f64>()?;
            let rhs = (x * back)?.sum_all()?.to_scalar::<f64>()?;
            assert!((lhs - rhs).abs() < 1e-10, "case {i}: {lhs} vs {rhs}");
        }
        Ok(())
    }

    #[test]
    fn empty_tensors_do_not_panic() -> Result<()> {
        let x = Tensor::zeros((2, 0, 3), DType::F64, &candle_core::Device::Cpu)?;
        assert!(!applies(&x));
        assert_eq!(
            crate::ops::layer_norm(&x, None, None, 1e-5)?.dims(),
            &[2, 0, 3]
        );
        let bias = Tensor::zeros(3, DType::F64, &candle_core::Device::Cpu)?;
        assert_eq!(crate::ops::bias_add(&x, &bias, 2)?.dims(), &[2, 0, 3]);
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() -> Result<()> {
        let x = rand_tensor(&[2, 3, 5], 70, 1.0)?;
        let err = crate::ops::bias_add(&x, &rand_tensor(&[4], 71, 1.0)?, 1).unwrap_err();
        assert!(err.to_string().contains("bias has 4 elements"), "{err}");
        let err = crate::ops::geglu(&x).unwrap_err();
        assert!(err.to_string().contains("must be even"), "{err}");
        let err = layer_norm(&x, Some(&rand_tensor(&[3], 72, 1.0)?), None, 1e-5).unwrap_err();
        assert!(err.to_string().contains("weight has 3 elements"), "{err}");
        Ok(())
    }
}
