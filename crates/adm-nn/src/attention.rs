//! Scaled dot-product attention with a correct gradient.
//!
//! `candle_nn::ops::sdpa` has no backward (and no CPU kernel) and `softmax_last_dim` drops the
//! gradient (CANDLE_PITFALLS.md); this is the plain math path: two batched matmuls
//! ([`crate::matmul`]) and [`crate::ops::softmax`].

use candle_core::{Result, Tensor, D};

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
