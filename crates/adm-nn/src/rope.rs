//! Rotary position embeddings with a correct gradient.
//!
//! `candle_nn::rotary_emb::{rope, rope_i, rope_thd}` carry no gradient (CANDLE_PITFALLS.md).
//! This is the real-valued formulation of diffusers' `apply_rotary_emb(use_real=True)`:
//! `out = x · cos + rotate(x) · sin`, built from narrow / cat / neg / broadcast multiplies.

use candle_core::{DType, Result, Tensor, D};

/// How the feature dimension of a head is paired into rotation planes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs (x₀, x₁), (x₂, x₃), …: diffusers `apply_rotary_emb(use_real_unbind_dim=-1)`
    /// (Flux, CogVideoX, HunyuanVideo), candle `rope_i`. cos/sin rows are
    /// `[c₀, c₀, c₁, c₁, …]` (`repeat_interleave(2)`).
    Interleaved,
    /// Pairs (xᵢ, x_{i+D/2}): diffusers `use_real_unbind_dim=-2` (Lumina, SD3-style "rotate
    /// half"), candle `rope`. cos/sin rows are `[c₀, …, c_{D/2-1}, c₀, …, c_{D/2-1}]`.
    HalfSplit,
}

/// `rotate(x)` of the pair convention: each pair (a, b) becomes (-b, a).
fn rotate(x: &Tensor, layout: RopeLayout) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let d = *dims.last().unwrap_or(&0);
    if d % 2 == 1 {
        candle_core::bail!("rotary embedding needs an even feature dimension, got {d}")
    }
    match layout {
        RopeLayout::Interleaved => {
            let mut paired = dims.clone();
            paired.pop();
            paired.extend([d / 2, 2]);
            let x = x.reshape(paired)?;
            let re = x.narrow(D::Minus1, 0, 1)?;
            let im = x.narrow(D::Minus1, 1, 1)?;
            Tensor::cat(&[&im.neg()?, &re], D::Minus1)?.reshape(dims)
        }
        RopeLayout::HalfSplit => {
            let x1 = x.narrow(D::Minus1, 0, d / 2)?;
            let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
            Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
        }
    }
}

/// Applies the rotary embedding to `x` (B, H, L, D) with `cos` / `sin` (L, D) already expanded
/// to the full head dimension for `layout` (see [`rope_cos_sin`]); any shape broadcastable to
/// `x` also works, e.g. (B, 1, L, D) for per-sample positions.
///
/// As diffusers does, sub-32-bit inputs are rotated in f32 and the result cast back.
pub fn apply_rotary_emb(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    layout: RopeLayout,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let cdt = crate::ops::compute_dtype(dtype);
    let x = x.to_dtype(cdt)?;
    let cos = cos.to_dtype(cdt)?;
    let sin = sin.to_dtype(cdt)?;
    let rotated = rotate(&x, layout)?;
    x.broadcast_mul(&cos)?
        .add(&rotated.broadcast_mul(&sin)?)?
        .to_dtype(dtype)
}

/// cos / sin tables (L, dim) for 1-D `positions` (L,) (any numeric dtype; fractional
/// positions allowed) with frequencies `theta^(-2i/dim)`, i < dim/2, expanded for `layout`;
/// as diffusers' `get_1d_rotary_pos_embed(dim, pos, theta, use_real=True)` with
/// `repeat_interleave_real=True` (Interleaved) or `False` (HalfSplit). Computed in f64,
/// returned in `dtype`, on the device of `positions`.
pub fn rope_cos_sin(
    positions: &Tensor,
    dim: usize,
    theta: f64,
    layout: RopeLayout,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    if dim % 2 == 1 {
        candle_core::bail!("rotary embedding needs an even dimension, got {dim}")
    }
    let positions = positions.flatten_all()?.to_dtype(DType::F64)?;
    let l = positions.dim(0)?;
    let half = dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64))
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), positions.device())?;
    let angles = positions.reshape((l, 1))?.broadcast_mul(&inv_freq)?; // (L, D/2)
    let expand = |t: Tensor| -> Result<Tensor> {
        match layout {
            RopeLayout::Interleaved => t
                .unsqueeze(2)?
                .broadcast_as((l, half, 2))?
                .reshape((l, dim)),
            RopeLayout::HalfSplit => Tensor::cat(&[&t, &t], 1),
        }
    };
    let cos = expand(angles.cos()?)?.to_dtype(dtype)?;
    let sin = expand(angles.sin()?)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_gradients, GradCheck};
    use crate::test_util::{assert_close, rand_tensor, to_vec};
    use candle_core::Device;

    /// Complex-number reference: pair p of position l is multiplied by e^{i·l·θ_p}.
    fn naive(
        x: &[f64],
        (bh, l, d): (usize, usize, usize),
        theta: f64,
        layout: RopeLayout,
    ) -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        for n in 0..bh {
            for pos in 0..l {
                let base = (n * l + pos) * d;
                for p in 0..d / 2 {
                    let ang = pos as f64 * theta.powf(-(2.0 * p as f64) / d as f64);
                    let (i0, i1) = match layout {
                        RopeLayout::Interleaved => (2 * p, 2 * p + 1),
                        RopeLayout::HalfSplit => (p, p + d / 2),
                    };
                    let (a, b) = (x[base + i0], x[base + i1]);
                    out[base + i0] = a * ang.cos() - b * ang.sin();
                    out[base + i1] = a * ang.sin() + b * ang.cos();
                }
            }
        }
        out
    }

    #[test]
    fn cos_sin_tables_follow_the_layout() -> Result<()> {
        let pos = Tensor::new(&[0u32, 1, 2], &Device::Cpu)?;
        let (cos, sin) = rope_cos_sin(&pos, 4, 100.0, RopeLayout::Interleaved, DType::F64)?;
        assert_eq!(cos.dims(), &[3, 4]);
        let c = to_vec(&cos)?;
        let s = to_vec(&sin)?;
        // Row 2: angles 2·1 and 2·100^(-1/2) = 0.2, each repeated twice.
        assert_close(
            &c[8..12],
            &[2f64.cos(), 2f64.cos(), 0.2f64.cos(), 0.2f64.cos()],
            1e-15,
        );
        assert_close(
            &s[8..12],
            &[2f64.sin(), 2f64.sin(), 0.2f64.sin(), 0.2f64.sin()],
            1e-15,
        );
        let (cos, _) = rope_cos_sin(&pos, 4, 100.0, RopeLayout::HalfSplit, DType::F32)?;
        assert_eq!(cos.dtype(), DType::F32);
        let c = to_vec(&cos)?;
        assert_close(
            &c[8..12],
            &[2f64.cos(), 0.2f64.cos(), 2f64.cos(), 0.2f64.cos()],
            1e-7,
        );
        Ok(())
    }

    #[test]
    fn values_match_complex_rotation() -> Result<()> {
        let (b, h, l, d) = (2, 3, 5, 8);
        let theta = 10_000.0;
        let x = rand_tensor(&[b, h, l, d], 1, 1.0)?;
        let pos = Tensor::arange(0u32, l as u32, &Device::Cpu)?;
        for layout in [RopeLayout::Interleaved, RopeLayout::HalfSplit] {
            let (cos, sin) = rope_cos_sin(&pos, d, theta, layout, DType::F64)?;
            let got = apply_rotary_emb(&x, &cos, &sin, layout)?;
            assert_eq!(got.dims(), x.dims());
            let want = naive(&to_vec(&x)?, (b * h, l, d), theta, layout);
            assert_close(&to_vec(&got)?, &want, 1e-12);
        }
        // Interleaved with cos/sin as diffusers builds them equals candle's rope_i; half-split
        // equals candle's rope (forward only: those carry no gradient).
        let half_pos = pos.to_dtype(DType::F64)?.reshape((l, 1))?;
        let inv: Vec<f64> = (0..d / 2)
            .map(|i| theta.powf(-(2.0 * i as f64) / d as f64))
            .collect();
        let ang = half_pos.broadcast_mul(&Tensor::from_vec(inv, (1, d / 2), &Device::Cpu)?)?;
        let (c, s) = (ang.cos()?, ang.sin()?);
        let (cos_i, sin_i) = rope_cos_sin(&pos, d, theta, RopeLayout::Interleaved, DType::F64)?;
        let ours = apply_rotary_emb(&x, &cos_i, &sin_i, RopeLayout::Interleaved)?;
        let theirs = candle_nn::rotary_emb::rope_i(&x, &c, &s)?;
        assert_close(&to_vec(&ours)?, &to_vec(&theirs)?, 1e-12);
        let (cos_h, sin_h) = rope_cos_sin(&pos, d, theta, RopeLayout::HalfSplit, DType::F64)?;
        let ours = apply_rotary_emb(&x, &cos_h, &sin_h, RopeLayout::HalfSplit)?;
        let theirs = candle_nn::rotary_emb::rope(&x, &c, &s)?;
        assert_close(&to_vec(&ours)?, &to_vec(&theirs)?, 1e-12);

        // bf16 input: rotated in f32, returned as bf16.
        let got = apply_rotary_emb(
            &x.to_dtype(DType::BF16)?,
            &cos_h,
            &sin_h,
            RopeLayout::HalfSplit,
        )?;
        assert_eq!(got.dtype(), DType::BF16);
        let err = (got.to_dtype(DType::F64)? - &ours)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(err < 0.02, "{err}");
        Ok(())
    }

    #[test]
    fn gradients_wrt_input_and_tables() -> Result<()> {
        let (b, h, l, d) = (2, 2, 3, 6);
        let x = rand_tensor(&[b, h, l, d], 2, 1.0)?;
        let pos = Tensor::new(&[0.0f64, 1.5, 4.0], &Device::Cpu)?;
        for layout in [RopeLayout::Interleaved, RopeLayout::HalfSplit] {
            let (cos, sin) = rope_cos_sin(&pos, d, 10.0, layout, DType::F64)?;
            let r = check_gradients(
                |xs| apply_rotary_emb(&xs[0], &xs[1], &xs[2], layout),
                &[x.clone(), cos, sin],
                GradCheck::default(),
            )?;
            assert!(
                r.probes > 0 && r.max_abs_numeric > 1e-3,
                "{layout:?}: {r:?}"
            );
        }
        Ok(())
    }

    /// The pitfall: candle's fused rope carries no gradient.
    #[test]
    fn candle_rope_i_carries_no_gradient() -> Result<()> {
        let x = rand_tensor(&[1, 1, 3, 4], 3, 1.0)?;
        let c = rand_tensor(&[3, 2], 4, 1.0)?;
        let s = rand_tensor(&[3, 2], 5, 1.0)?;
        let f = |xs: &[Tensor]| candle_nn::rotary_emb::rope_i(&xs[0], &c, &s);
        assert!(check_gradients(f, &[x], GradCheck::default()).is_err());
        Ok(())
    }
}
