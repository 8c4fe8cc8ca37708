//! Scaled dot-product attention with a correct gradient.
//!
//! `candle_nn::ops::sdpa` has no backward (and no CPU kernel) and `softmax_last_dim` drops the
//! gradient (CANDLE_PITFALLS.md); this is the plain math path: two batched matmuls
//! ([`crate::matmul_t`], [`crate::matmul`]) and [`crate::ops::softmax`]. [`multi_head_attention`] is the same
//! function on (B, L, heads x D) tensors as one autograd node.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor, D};

use crate::fused::{par_blocks, slice, softmax_grad_rows, softmax_rows, tracked, Real, Slice};
use crate::matmul::{gemm_batched, gemm_batched_scaled, View};

/// `softmax(q kᵀ · scale + mask) v` for `q` (B, H, Lq, D), `k` (B, H, Lk, D), `v` (B, H, Lk, Dv);
/// returns (B, H, Lq, Dv).
///
/// `mask` is additive (0 to keep, a large negative value or `-inf` to drop) and broadcastable
/// to (B, H, Lq, Lk), e.g. (Lq, Lk), (B, 1, 1, Lk) or (B, 1, Lq, Lk); it is cast to the dtype of
/// `q`. `scale` defaults to `1 / sqrt(D)`, as in PyTorch. A row whose mask drops every key gives
/// NaN, as in PyTorch.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: Option<f64>,
) -> Result<Tensor> {
    let (b, h, _lq, d) = q.dims4()?;
    let (bk, hk, lk, dk) = k.dims4()?;
    let (bv, hv, lv, _dv) = v.dims4()?;
    if (bk, hk, dk) != (b, h, d) || (bv, hv, lv) != (b, h, lk) {
        candle_core::bail!(
            "scaled_dot_product_attention: incompatible shapes q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let q = (q.contiguous()? * scale)?;
    let mut scores = crate::matmul_t(&q, &k.contiguous()?)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    }
    let probs = crate::ops::softmax(&scores, D::Minus1)?;
    crate::matmul(&probs, &v.contiguous()?)
}

/// `softmax(q_h k_hᵀ · scale) v_h` for every head `h` of `q` (B, Lq, H·D), `k` (B, Lk, H·D)
/// and `v` (B, Lk, H·Dv), the heads side by side along the last axis as a linear layer
/// writes them; returns (B, Lq, H·Dv) in the same layout. `scale` defaults to `1 / sqrt(D)`.
///
/// The same function as splitting the heads, [`scaled_dot_product_attention`] and merging
/// them, but on the CPU (f32 / f64) one autograd node that reads each head in place: the
/// composed form puts about fifteen nodes in candle's graph (reshapes, transposes, copies,
/// the scaling, scores and probabilities), each a zero-filled tensor and an addition in the
/// backward. The node keeps the probabilities for its backward, as the composed form does.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: Option<f64>,
) -> Result<Tensor> {
    let (b, lq, hd) = q.dims3()?;
    let (bk, lk, hdk) = k.dims3()?;
    let (bv, lv, hdv) = v.dims3()?;
    if heads == 0
        || hd % heads != 0
        || hdv % heads != 0
        || (bk, hdk) != (b, hd)
        || (bv, lv) != (bk, lk)
    {
        candle_core::bail!(
            "multi_head_attention: {heads} heads do not fit q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let (d, dv) = (hd / heads, hdv / heads);
    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let all_fused = [q, k, v].iter().all(|t| crate::fused::applies(t))
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype();
    if !all_fused {
        let split = |t: &Tensor, l: usize, d: usize| t.reshape((b, l, heads, d))?.transpose(1, 2);
        let out = scaled_dot_product_attention(
            &split(q, lq, d)?,
            &split(k, lk, d)?,
            &split(v, lk, dv)?,
            None,
            Some(scale),
        )?;
        return out.transpose(1, 2)?.reshape((b, lq, hdv));
    }
    let op = MultiHeadAttention {
        dims: HeadDims {
            b,
            lq,
            lk,
            h: heads,
            d,
            dv,
        },
        scale,
        probs: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[derive(Clone, Copy)]
struct HeadDims {
    b: usize,
    lq: usize,
    lk: usize,
    h: usize,
    d: usize,
    dv: usize,
}

impl HeadDims {
    /// The (L, width) matrix of every (sample, head) entry of a (B, L, H·width) tensor, or
    /// their transposes.
    fn heads(&self, l: usize, width: usize, transposed: bool) -> View {
        let v = View {
            offset: 0,
            rows: l,
            cols: width,
            rs: self.h * width,
            cs: 1,
            bs: width,
            group: self.h,
            gs: l * self.h * width,
        };
        if transposed {
            v.t()
        } else {
            v
        }
    }

    /// The (B·H, Lq, Lk) scores or probabilities, or their transposes.
    fn scores(&self, transposed: bool) -> View {
        let v = View::flat(0, (self.lq, self.lk), (self.lk, 1), self.lq * self.lk);
        if transposed {
            v.t()
        } else {
            v
        }
    }
}

struct MultiHeadAttention {
    dims: HeadDims,
    scale: f64,
    /// The softmax probabilities (B·H, Lq, Lk) of the forward, for the backward.
    probs: Mutex<Option<CpuStorage>>,
}

/// (B·H, L, W) head-major rows as one (B, L, H·W) tensor.
fn merge_heads<T: Real>(x: &[T], (h, l, w): (usize, usize, usize)) -> Vec<T> {
    par_blocks(x.len(), h * w, |first, out| {
        for (n, row) in out.chunks_exact_mut(h * w).enumerate() {
            let (e, i) = ((first + n) / l, (first + n) % l);
            for (head, dst) in row.chunks_exact_mut(w).enumerate() {
                dst.copy_from_slice(&x[((e * h + head) * l + i) * w..][..w]);
            }
        }
    })
}

/// Output (B, Lq, H·Dv) and probabilities (B·H, Lq, Lk).
fn attention_fwd<T: Real>(
    (q, k, v): (&[T], &[T], &[T]),
    dm: HeadDims,
    scale: T,
) -> (Vec<T>, Vec<T>) {
    let HeadDims {
        lq, lk, h, d, dv, ..
    } = dm;
    let entries = dm.b * h;
    let (qh, kt) = (dm.heads(lq, d, false), dm.heads(lk, d, true));
    let p = softmax_rows(&gemm_batched_scaled(entries, (q, qh), (k, kt), scale), lk);
    let o = gemm_batched(
        entries,
        (&p, dm.scores(false)),
        (v, dm.heads(lk, dv, false)),
    );
    (merge_heads(&o, (h, lq, dv)), p)
}

/// (dq, dk, dv) from the inputs, the forward's probabilities and the output gradient.
fn attention_bwd<T: Real>(
    (q, k, v): (&[T], &[T], &[T]),
    p: &[T],
    dout: &[T],
    dm: HeadDims,
    scale: T,
) -> [Vec<T>; 3] {
    let HeadDims {
        lq, lk, h, d, dv, ..
    } = dm;
    let entries = dm.b * h;
    let dout_heads = dm.heads(lq, dv, false);
    // dV = Pᵀ dO
    let dvh = gemm_batched(entries, (p, dm.scores(true)), (dout, dout_heads));
    // dS = softmax'(P; dO Vᵀ); dQ = scale dS K, dK = scale dSᵀ Q
    let dp = gemm_batched(entries, (dout, dout_heads), (v, dm.heads(lk, dv, true)));
    let ds = softmax_grad_rows(p, &dp, lk);
    let dqh = gemm_batched_scaled(
        entries,
        (&ds, dm.scores(false)),
        (k, dm.heads(lk, d, false)),
        scale,
    );
    let dkh = gemm_batched_scaled(
        entries,
        (&ds, dm.scores(true)),
        (q, dm.heads(lq, d, false)),
        scale,
    );
    [
        merge_heads(&dqh, (h, lq, d)),
        merge_heads(&dkh, (h, lk, d)),
        merge_heads(&dvh, (h, lk, dv)),
    ]
}

/// Gradients as tensors of the shapes of their inputs.
fn shaped_like<T: candle_core::WithDType>(
    [dq, dk, dv]: [Vec<T>; 3],
    [q, k, v]: [&Tensor; 3],
) -> Result<[Tensor; 3]> {
    let tensor = |g: Vec<T>, t: &Tensor| Tensor::from_vec(g, t.shape(), t.device());
    Ok([tensor(dq, q)?, tensor(dk, k)?, tensor(dv, v)?])
}

impl CustomOp3 for MultiHeadAttention {
    fn name(&self) -> &'static str {
        "adm-multi-head-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dm, name) = (self.dims, self.name());
        let (out, probs) = match (
            slice(name, qs, ql)?,
            slice(name, ks, kl)?,
            slice(name, vs, vl)?,
        ) {
            (Slice::F32(q), Slice::F32(k), Slice::F32(v)) => {
                let (o, p) = attention_fwd((q, k, v), dm, self.scale as f32);
                (CpuStorage::F32(o), CpuStorage::F32(p))
            }
            (Slice::F64(q), Slice::F64(k), Slice::F64(v)) => {
                let (o, p) = attention_fwd((q, k, v), dm, self.scale);
                (CpuStorage::F64(o), CpuStorage::F64(p))
            }
            _ => candle_core::bail!("{name}: operands of different dtypes"),
        };
        if let Ok(mut slot) = self.probs.lock() {
            *slot = Some(probs);
        }
        Ok((out, Shape::from((dm.b, dm.lq, dm.h * dm.dv))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let probs = self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{name}: poisoned lock")))?;
        let Some(probs) = probs.as_ref() else {
            candle_core::bail!("{name}: backward before forward")
        };
        let grad = grad.contiguous()?;
        let guards = [q, k, v, &grad].map(|t| t.storage_and_layout());
        let mut operands = Vec::with_capacity(4);
        for (storage, layout) in &guards {
            let Storage::Cpu(s) = &**storage else {
                candle_core::bail!("{name}: expected CPU tensors")
            };
            operands.push(slice(name, s, layout)?);
        }
        let (dm, like) = (self.dims, [q, k, v]);
        let [dq, dk, dv] = match (&operands[..], probs) {
            ([Slice::F32(q), Slice::F32(k), Slice::F32(v), Slice::F32(g)], CpuStorage::F32(p)) => {
                shaped_like(attention_bwd((q, k, v), p, g, dm, self.scale as f32), like)?
            }
            ([Slice::F64(q), Slice::F64(k), Slice::F64(v), Slice::F64(g)], CpuStorage::F64(p)) => {
                shaped_like(attention_bwd((q, k, v), p, g, dm, self.scale), like)?
            }
            _ => candle_core::bail!("{name}: operands of different dtypes"),
        };
        // Through `tracked`, like every op here: constants get none, and Vars' gradients go
        // to `crate::backward`'s store when it is open.
        Ok((
            tracked(q, || Ok(dq))?,
            tracked(k, || Ok(dk))?,
            tracked(v, || Ok(dv))?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_gradients, GradCheck};
    use crate::test_util::{assert_close, rand_tensor, to_vec};
    use candle_core::{DType, Device};

    /// Loop-based reference: out[b,h,i,:] = Σ_j p_ij v[b,h,j,:], p = softmax_j(q_i·k_j·s + m_ij).
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        mask: Option<&[f64]>, // (Lq, Lk)
        (bh, lq, lk, d, dv): (usize, usize, usize, usize, usize),
        scale: f64,
    ) -> Vec<f64> {
        let mut out = vec![0.0; bh * lq * dv];
        for n in 0..bh {
            for i in 0..lq {
                let mut s: Vec<f64> = (0..lk)
                    .map(|j| {
                        let dot: f64 = (0..d)
                            .map(|c| q[(n * lq + i) * d + c] * k[(n * lk + j) * d + c])
                            .sum();
                        dot * scale + mask.map_or(0.0, |m| m[i * lk + j])
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                s.iter_mut().for_each(|a| *a = (*a - m).exp());
                let z: f64 = s.iter().sum();
                for j in 0..lk {
                    for c in 0..dv {
                        out[(n * lq + i) * dv + c] += s[j] / z * v[(n * lk + j) * dv + c];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn values_match_naive_reference_with_and_without_mask() -> Result<()> {
        let (b, h, lq, lk, d, dv) = (2, 3, 4, 5, 8, 6);
        let q = rand_tensor(&[b, h, lq, d], 1, 1.0)?;
        let k = rand_tensor(&[b, h, lk, d], 2, 1.0)?;
        let v = rand_tensor(&[b, h, lk, dv], 3, 1.0)?;
        let dims = (b * h, lq, lk, d, dv);
        let (qv, kv, vv) = (to_vec(&q)?, to_vec(&k)?, to_vec(&v)?);

        let got = scaled_dot_product_attention(&q, &k, &v, None, None)?;
        assert_eq!(got.dims(), &[b, h, lq, dv]);
        let want = naive(&qv, &kv, &vv, None, dims, 1.0 / (d as f64).sqrt());
        assert_close(&to_vec(&got)?, &want, 1e-12);

        // A (Lq, Lk) mask with -inf entries (causal-like) and an explicit scale.
        let mask: Vec<f64> = (0..lq * lk)
            .map(|p| {
                if p % lk > p / lk + 1 {
                    f64::NEG_INFINITY
                } else {
                    0.1 * p as f64
                }
            })
            .collect();
        let mask_t = Tensor::from_vec(mask.clone(), (lq, lk), &Device::Cpu)?;
        let got = scaled_dot_product_attention(&q, &k, &v, Some(&mask_t), Some(0.7))?;
        let want = naive(&qv, &kv, &vv, Some(&mask), dims, 0.7);
        assert_close(&to_vec(&got)?, &want, 1e-12);

        // Non-contiguous inputs (as produced by a head split) give the same result.
        let qt = q.transpose(1, 2)?.contiguous()?.transpose(1, 2)?;
        assert!(!qt.is_contiguous());
        let got2 = scaled_dot_product_attention(&qt, &k, &v, Some(&mask_t), Some(0.7))?;
        assert_close(&to_vec(&got2)?, &to_vec(&got)?, 0.0);

        // f32 mask with f64 inputs is cast.
        let got3 = scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(&mask_t.to_dtype(DType::F32)?),
            Some(0.7),
        )?;
        assert_close(&to_vec(&got3)?, &want, 1e-6);
        Ok(())
    }

    #[test]
    fn multi_head_attention_matches_split_sdpa_merge() -> Result<()> {
        let (b, h, lq, lk, d, dv) = (2, 3, 5, 7, 4, 2);
        let (q, k, v) = (
            rand_tensor(&[b, lq, h * d], 30, 1.0)?,
            rand_tensor(&[b, lk, h * d], 31, 1.0)?,
            rand_tensor(&[b, lk, h * dv], 32, 1.0)?,
        );
        let composed = composed_heads((b, h, lq, lk, d, dv));
        let fused = |xs: &[Tensor]| multi_head_attention(&xs[0], &xs[1], &xs[2], h, Some(0.7));
        let inputs = [q.clone(), k.clone(), v.clone()];
        same_values_and_gradients(&fused, &composed, &inputs)?;
        let r = check_gradients(fused, &inputs, GradCheck::default())?;
        assert!(r.max_abs_numeric > 1e-3, "{r:?}");
        // f32 within 1e-5 of f64, and the default scale.
        let f32s: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_dtype(DType::F32))
            .collect::<Result<_>>()?;
        let lo = multi_head_attention(&f32s[0], &f32s[1], &f32s[2], h, None)?;
        let hi = multi_head_attention(&q, &k, &v, h, Some(1.0 / (d as f64).sqrt()))?;
        assert_close(&to_vec(&lo)?, &to_vec(&hi)?, 1e-5);
        // Other dtypes take the composed path.
        let f16s: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_dtype(DType::F16))
            .collect::<Result<_>>()?;
        let half = multi_head_attention(&f16s[0], &f16s[1], &f16s[2], h, Some(0.7))?;
        assert_close(&to_vec(&half)?, &to_vec(&composed(&inputs)?)?, 1e-2);
        // Self-attention: one tensor as q, k and v accumulates three gradients.
        let x = rand_tensor(&[b, lq, h * d], 34, 1.0)?;
        check_gradients(
            |xs| multi_head_attention(&xs[0], &xs[0], &xs[0], h, None),
            &[x],
            GradCheck::default(),
        )?;
        assert!(multi_head_attention(&q, &k, &v, 5, None).is_err());
        Ok(())
    }

    /// Outputs big enough for the tiled products and the kernels split over the pool.
    #[test]
    fn multi_head_attention_matches_composed_when_large() -> Result<()> {
        let (b, h, lq, lk, d, dv) = (2, 2, 300, 77, 64, 64);
        let inputs = [
            rand_tensor(&[b, lq, h * d], 35, 1.0)?,
            rand_tensor(&[b, lk, h * d], 36, 1.0)?,
            rand_tensor(&[b, lk, h * dv], 37, 1.0)?,
        ];
        let fused = |xs: &[Tensor]| multi_head_attention(&xs[0], &xs[1], &xs[2], h, Some(0.7));
        same_values_and_gradients(&fused, &composed_heads((b, h, lq, lk, d, dv)), &inputs)
    }

    type Op<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

    /// Splitting the heads, [`scaled_dot_product_attention`] (scale 0.7), merging them.
    fn composed_heads(
        (b, h, lq, lk, d, dv): (usize, usize, usize, usize, usize, usize),
    ) -> impl Fn(&[Tensor]) -> Result<Tensor> {
        move |xs: &[Tensor]| -> Result<Tensor> {
            let split = |t: &Tensor, l: usize, w: usize| {
                t.reshape((b, l, h, w))?.transpose(1, 2)?.contiguous()
            };
            let out = scaled_dot_product_attention(
                &split(&xs[0], lq, d)?,
                &split(&xs[1], lk, d)?,
                &split(&xs[2], lk, dv)?,
                None,
                Some(0.7),
            )?;
            out.transpose(1, 2)?.reshape((b, lq, h * dv))
        }
    }

    /// `f` equals `reference` in value and in the gradient of a random projection, to 1e-12.
    fn same_values_and_gradients(f: Op, reference: Op, inputs: &[Tensor]) -> Result<()> {
        assert_close(&to_vec(&f(inputs)?)?, &to_vec(&reference(inputs)?)?, 1e-12);
        let proj = rand_tensor(f(inputs)?.dims(), 33, 1.0)?;
        let grads_of = |g: Op| -> Result<Vec<Vec<f64>>> {
            let vars: Vec<candle_core::Var> = inputs
                .iter()
                .map(candle_core::Var::from_tensor)
                .collect::<Result<_>>()?;
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let grads = (g(&ts)? * &proj)?.sum_all()?.backward()?;
            vars.iter()
                .map(|v| to_vec(grads.get(v).expect("gradient")))
                .collect()
        };
        for (ours, theirs) in grads_of(f)?.iter().zip(grads_of(reference)?.iter()) {
            assert_close(ours, theirs, 1e-12);
        }
        Ok(())
    }

    #[test]
    fn gradients_wrt_q_k_v_and_mask() -> Result<()> {
        let (b, h, lq, lk, d) = (2, 2, 3, 4, 4);
        let q = rand_tensor(&[b, h, lq, d], 4, 1.0)?;
        let k = rand_tensor(&[b, h, lk, d], 5, 1.0)?;
        let v = rand_tensor(&[b, h, lk, 3], 6, 1.0)?;
        // A per-batch key-padding mask (B, 1, 1, Lk), here finite so it is differentiable too.
        let mask = rand_tensor(&[b, 1, 1, lk], 7, 1.0)?;
        let r = check_gradients(
            |xs| scaled_dot_product_attention(&xs[0], &xs[1], &xs[2], Some(&xs[3]), None),
            &[q.clone(), k.clone(), v.clone(), mask],
            GradCheck::default(),
        )?;
        assert!(r.probes > 0 && r.max_abs_numeric > 1e-3, "{r:?}");

        // Self-attention: the same tensor as q, k and v (gradients must accumulate).
        let r = check_gradients(
            |xs| scaled_dot_product_attention(&xs[0], &xs[0], &xs[0], None, Some(0.9)),
            &[q],
            GradCheck::default(),
        )?;
        assert!(r.probes > 0, "{r:?}");
        Ok(())
    }

    /// The pitfall: candle_nn's sdpa has no CPU kernel / no backward; the softmax it would need
    /// (softmax_last_dim) drops the gradient.
    #[test]
    fn candle_attention_built_on_softmax_last_dim_gets_no_gradient() -> Result<()> {
        let q = rand_tensor(&[1, 1, 3, 4], 8, 1.0)?;
        let k = rand_tensor(&[1, 1, 3, 4], 9, 1.0)?;
        let v = rand_tensor(&[1, 1, 3, 4], 10, 1.0)?;
        let f = |xs: &[Tensor]| {
            let s = xs[0].matmul(&xs[1].t()?.contiguous()?)?;
            candle_nn::ops::softmax_last_dim(&s)?.matmul(&xs[2])
        };
        let err = check_gradients(f, &[q, k, v], GradCheck::default()).unwrap_err();
        assert!(err.to_string().contains("input 0"), "{err}");
        Ok(())
    }
}
