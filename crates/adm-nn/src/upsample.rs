//! Nearest-neighbour upsampling whose gradient accumulates.
//!
//! candle 0.11.1's `upsample_nearest2d` / `1d` backward OVERWRITES the gradient already
//! accumulated for its input instead of adding to it, so any input that is also used
//! elsewhere (skip connections, heads) gets a wrong gradient (CANDLE_PITFALLS.md). Here each
//! axis is given a length-1 companion axis, broadcast to the scale and folded back: broadcast's
//! backward is a sum, reshape's is a reshape, both accumulate correctly.

use candle_core::{Result, Tensor};

/// Nearest upsampling of `x` (B, C, H, W) by integer factors: output (B, C, H·sh, W·sw) with
/// `out[.., i, j] = x[.., i / sh, j / sw]`.
pub fn upsample_nearest2d(x: &Tensor, scale_h: usize, scale_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if scale_h == 0 || scale_w == 0 {
        candle_core::bail!(
            "upsample_nearest2d: scales must be positive, got ({scale_h}, {scale_w})"
        )
    }
    if scale_h == 1 && scale_w == 1 {
        return Ok(x.clone());
    }
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, scale_h, w, scale_w))?
        .reshape((b, c, h * scale_h, w * scale_w))
}

/// Nearest upsampling of `x` (B, C, F, H, W) by integer factors `[sf, sh, sw]`: output
/// (B, C, F·sf, H·sh, W·sw).
pub fn upsample_nearest3d(x: &Tensor, scale: [usize; 3]) -> Result<Tensor> {
    let (b, c, f, h, w) = x.dims5()?;
    let [sf, sh, sw] = scale;
    if scale.contains(&0) {
        candle_core::bail!("upsample_nearest3d: scales must be positive, got {scale:?}")
    }
    if scale == [1, 1, 1] {
        return Ok(x.clone());
    }
    x.reshape(vec![b, c, f, 1, h, 1, w, 1])?
        .broadcast_as(vec![b, c, f, sf, h, sh, w, sw])?
        .reshape((b, c, f * sf, h * sh, w * sw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_gradients, GradCheck};
    use crate::test_util::{assert_close, rand_tensor, to_vec};

    #[test]
    fn values_2d_unequal_scales() -> Result<()> {
        let (b, c, h, w, sh, sw) = (2, 3, 4, 5, 2, 3);
        let x = rand_tensor(&[b, c, h, w], 1, 1.0)?;
        let y = upsample_nearest2d(&x, sh, sw)?;
        assert_eq!(y.dims(), &[b, c, h * sh, w * sw]);
        let xv = to_vec(&x)?;
        let mut want = Vec::new();
        for n in 0..b * c {
            for i in 0..h * sh {
                for j in 0..w * sw {
                    want.push(xv[(n * h + i / sh) * w + j / sw]);
                }
            }
        }
        assert_close(&to_vec(&y)?, &want, 0.0);
        // Equal integer scales agree with candle's forward.
        let theirs = x.upsample_nearest2d(h * 2, w * 2)?;
        assert_close(
            &to_vec(&upsample_nearest2d(&x, 2, 2)?)?,
            &to_vec(&theirs)?,
            0.0,
        );
        Ok(())
    }

    #[test]
    fn values_3d() -> Result<()> {
        let (b, c, f, h, w) = (1, 2, 3, 2, 4);
        let [sf, sh, sw] = [2, 3, 1];
        let x = rand_tensor(&[b, c, f, h, w], 2, 1.0)?;
        let y = upsample_nearest3d(&x, [sf, sh, sw])?;
        assert_eq!(y.dims(), &[b, c, f * sf, h * sh, w * sw]);
        let xv = to_vec(&x)?;
        let mut want = Vec::new();
        for n in 0..b * c {
            for t in 0..f * sf {
                for i in 0..h * sh {
                    for j in 0..w * sw {
                        want.push(xv[((n * f + t / sf) * h + i / sh) * w + j / sw]);
                    }
                }
            }
        }
        assert_close(&to_vec(&y)?, &want, 0.0);
        Ok(())
    }

    /// `x` is used twice: once through the upsample, once directly (a skip connection). With
    /// candle's upsample the direct gradient is overwritten; here it must accumulate.
    fn upsample_plus_skip(x: &Tensor, up: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let skip = x.sqr()?; // computed first, as in a U-Net skip
        let y = up(x)?; // (B, C, 2H, 2W)
                        // Fold the 2x2 blocks back onto the input grid and add the skip.
        let pooled = y.reshape((b, c, h, 2, w, 2))?.sum(5)?.sum(3)?;
        (pooled + skip)?.tanh()
    }

    #[test]
    fn gradients_2d_accumulate_with_other_uses_of_the_input() -> Result<()> {
        let x = rand_tensor(&[2, 2, 3, 4], 3, 1.0)?;
        let r = check_gradients(
            |xs| upsample_plus_skip(&xs[0], |t| upsample_nearest2d(t, 2, 2)),
            std::slice::from_ref(&x),
            GradCheck::default(),
        )?;
        assert!(r.probes > 0 && r.max_abs_numeric > 1e-3, "{r:?}");
        // Also used twice in the opposite order and with unequal scales.
        let r = check_gradients(
            |xs| {
                let up = upsample_nearest2d(&xs[0], 3, 2)?;
                let up2 = upsample_nearest2d(&xs[0].exp()?, 3, 2)?;
                (up * up2)? + upsample_nearest2d(&xs[0], 3, 2)?
            },
            &[x],
            GradCheck::default(),
        )?;
        assert!(r.probes > 0, "{r:?}");
        Ok(())
    }

    #[test]
    fn gradients_3d_accumulate_with_other_uses_of_the_input() -> Result<()> {
        let x = rand_tensor(&[1, 2, 2, 3, 2], 4, 1.0)?;
        let r = check_gradients(
            |xs| {
                let (b, c, f, h, w) = xs[0].dims5()?;
                let skip = xs[0].sin()?;
                let y = upsample_nearest3d(&xs[0], [2, 1, 3])?;
                let pooled = y.reshape(vec![b, c, f, 2, h, w, 3])?.sum(6)?.sum(3)?;
                (pooled * skip)? + y.sum_all()?.broadcast_as((b, c, f, h, w))?
            },
            &[x],
            GradCheck::default(),
        )?;
        assert!(r.probes > 0 && r.max_abs_numeric > 1e-3, "{r:?}");
        Ok(())
    }

    /// The pitfall: candle's `upsample_nearest2d` overwrites the accumulated gradient, so the
    /// very same check fails with it.
    #[test]
    fn candle_upsample_nearest2d_loses_the_other_gradient() -> Result<()> {
        let x = rand_tensor(&[2, 2, 3, 4], 3, 1.0)?;
        let res = check_gradients(
            |xs| upsample_plus_skip(&xs[0], |t| t.upsample_nearest2d(6, 8)),
            &[x],
            GradCheck::default(),
        );
        let err = res.expect_err("candle's upsample_nearest2d gradient was expected to be wrong");
        assert!(err.to_string().contains("gradient mismatch"), "{err}");
        Ok(())
    }
}
