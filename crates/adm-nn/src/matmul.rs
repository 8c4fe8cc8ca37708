//! Batched matrix products on candle's CPU worker pool.
//!
//! candle 0.11.1's CPU matmul hands each product to gemm's rayon parallelism while its
//! element-wise ops run on a second pool (the `BarrierPool`), whose idle worker spins for a
//! while after every op. At two threads the spinning worker and the two rayon workers share
//! two cores, so each GEMM waits for its descheduled half: the mid UNet ran slower at two
//! threads than at one (docs/benchmarks.md, "Fourth round"). Here the output is cut into
//! tiles (batch entries, then blocks of 128 rows or columns), each tile is one
//! single-threaded gemm call, and the tiles run on the same barrier pool as candle's
//! element-wise ops, so one set of threads does all the work. The tiles depend on the shapes
//! only, so results are bitwise the same on any number of threads (tests/thread_count.rs).
//! Inputs may be strided (a transposed view costs no copy), the output is written once
//! (candle zero-fills it first) and the backward is the usual `dA = dC Bᵀ`, `dB = Aᵀ dC`,
//! itself two products through the same code.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};

use crate::fused::{tracked, Real};

/// `a @ b` over the last two axes, batched over the leading ones (which must match), as
/// `Tensor::matmul`; a 2-D `b` under an `a` with more axes multiplies all of `a`'s rows (as
/// `broadcast_matmul`, but one product and no reshape nodes). CPU f32 / f64 products run on
/// candle's worker pool; anything else is candle's matmul.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    product(
        a,
        b,
        MatMul {
            rhs_transposed: false,
        },
    )
}

/// `a @ bᵀ` over the last two axes (`b` is (..., n, k)), as [`matmul`] of `a` and `b`'s
/// transpose, but one autograd node whose gradient for `b` comes out in `b`'s own layout.
/// Through a transposed view, candle's backward would add that gradient into a zero tensor
/// element by element (7% of a mid UNet training step, docs/benchmarks.md).
pub fn matmul_t(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    product(
        a,
        b,
        MatMul {
            rhs_transposed: true,
        },
    )
}

/// Whether a product of operands of these ranks takes all rows of a batched `a` against one
/// 2-D `b`.
fn rows_against_one(a_rank: usize, b_rank: usize) -> bool {
    b_rank == 2 && a_rank > 2
}

fn product(a: &Tensor, b: &Tensor, op: MatMul) -> Result<Tensor> {
    let (ad, bd) = (a.dims(), b.dims());
    let (r, rb) = (ad.len(), bd.len());
    let flat = rows_against_one(r, rb);
    let fits = r >= 2
        && rb >= 2
        && ad[r - 1] == bd[if op.rhs_transposed { rb - 1 } else { rb - 2 }]
        && (flat || (rb == r && ad[..r - 2] == bd[..r - 2]));
    if !fits {
        candle_core::bail!("{}: shapes {ad:?} and {bd:?} do not multiply", op.name())
    }
    if !crate::fused::applies(a) || !crate::fused::applies(b) || a.dtype() != b.dtype() {
        let b = if op.rhs_transposed {
            b.transpose(rb - 2, rb - 1)?
        } else {
            b.clone()
        };
        if !flat {
            return a.matmul(&b);
        }
        let mut dims = ad.to_vec();
        dims[r - 1] = b.dim(1)?;
        return a.flatten_to(r - 2)?.matmul(&b)?.reshape(dims);
    }
    if flat {
        return a.contiguous()?.apply_op2(&b.contiguous()?, op);
    }
    let collapsible = |t: &Tensor| -> Result<Tensor> {
        if batch_stride(t.layout()).is_some() {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    collapsible(a)?.apply_op2(&collapsible(b)?, op)
}

/// The one stride that steps through all batch entries of `l` (its leading axes flattened),
/// if there is one.
fn batch_stride(l: &Layout) -> Option<usize> {
    let r = l.dims().len();
    let batch: Vec<(usize, usize)> = l.dims()[..r - 2]
        .iter()
        .copied()
        .zip(l.stride()[..r - 2].iter().copied())
        .filter(|&(d, _)| d > 1)
        .collect();
    for pair in batch.windows(2) {
        let ((_, outer), (inner_dim, inner)) = (pair[0], pair[1]);
        if outer != inner * inner_dim {
            return None;
        }
    }
    Some(batch.last().map_or(0, |&(_, s)| s))
}

/// A strided batch of matrices: element (i, j) of entry `e` at `entry(e) + i rs + j cs`.
/// Entries step by `bs` within groups of `group` and the groups step by `gs`: attention's
/// (sample, head) entries of a (B, L, heads x D) tensor. One flat batch has `group` 1 and
/// `gs` = `bs`.
#[derive(Clone, Copy)]
pub(crate) struct View {
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
    pub bs: usize,
    pub group: usize,
    pub gs: usize,
}

impl View {
    /// One flat batch of (rows, cols) matrices: entry `e` at `offset + e bs`.
    pub(crate) fn flat(
        offset: usize,
        (rows, cols): (usize, usize),
        (rs, cs): (usize, usize),
        bs: usize,
    ) -> Self {
        Self {
            offset,
            rows,
            cols,
            rs,
            cs,
            bs,
            group: 1,
            gs: bs,
        }
    }

    /// Where entry `e` starts.
    fn entry(&self, e: usize) -> usize {
        self.offset + e / self.group * self.gs + e % self.group * self.bs
    }

    /// The same matrices transposed.
    pub(crate) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn of(l: &Layout) -> Result<Self> {
        let (d, s) = (l.dims(), l.stride());
        let r = d.len();
        let Some(bs) = batch_stride(l) else {
            candle_core::bail!("matmul: batch axes of {d:?} with strides {s:?} do not collapse")
        };
        Ok(Self::flat(
            l.start_offset(),
            (d[r - 2], d[r - 1]),
            (s[r - 2], s[r - 1]),
            bs,
        ))
    }
}

/// Products below this many multiply-adds are one tile per batch entry, run on the calling
/// thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;
/// Larger products are cut along their longer side into tiles of this many rows or columns
/// (a multiple of the 64-row f32 AVX-512 micro-tile of gemm). The tiles depend on the shapes
/// only, never on the thread count, so a product is bitwise the same on any number of
/// threads.
const TILE_EDGE: usize = 128;

/// `out[e] = a[e] b[e]` for `batch` entries; `out` is contiguous (batch, m, n). No axis is
/// empty ([`matmul`] leaves empty operands to candle).
pub(crate) fn gemm_batched<T: Real>(batch: usize, a: (&[T], View), b: (&[T], View)) -> Vec<T> {
    gemm_batched_scaled(batch, a, b, T::ONE)
}

/// [`gemm_batched`] times `scale` (applied inside gemm, no extra pass).
pub(crate) fn gemm_batched_scaled<T: Real>(
    batch: usize,
    (a, av): (&[T], View),
    (b, bv): (&[T], View),
    scale: T,
) -> Vec<T> {
    let (m, k, n) = (av.rows, av.cols, bv.cols);
    let len = batch * m * n;
    let mut out: Vec<T> = Vec::with_capacity(len);
    let out_ptr = out.as_mut_ptr() as usize;
    let (a_ptr, b_ptr) = (a.as_ptr() as usize, b.as_ptr() as usize);
    // One tile: rows `r` and columns `c` of entry `e`.
    let tile = |e: usize, r: std::ops::Range<usize>, c: std::ops::Range<usize>| {
        let a = a_ptr as *const T;
        let b = b_ptr as *const T;
        let dst = out_ptr as *mut T;
        // SAFETY: the views were checked against the storages' lengths by candle's layouts;
        // tiles write disjoint parts of `out`, which holds `len` elements.
        unsafe {
            gemm::gemm(
                r.len(),
                c.len(),
                k,
                dst.add(e * m * n + r.start * n + c.start),
                1,
                n as isize,
                false,
                a.add(av.entry(e) + r.start * av.rs),
                av.cs as isize,
                av.rs as isize,
                b.add(bv.entry(e) + c.start * bv.cs),
                bv.cs as isize,
                bv.rs as isize,
                T::ZERO,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    let small = len * k < PARALLEL_MIN_MACS;
    let (split_rows, side) = if m >= n { (true, m) } else { (false, n) };
    let edge = if small { side } else { TILE_EDGE };
    let parts = side.div_ceil(edge);
    let run = |units: std::ops::Range<usize>| {
        for unit in units {
            let (e, p) = (unit / parts, unit % parts);
            let span = p * edge..side.min((p + 1) * edge);
            if split_rows {
                tile(e, span, 0..n)
            } else {
                tile(e, 0..m, span)
            }
        }
    };
    if small {
        run(0..batch);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(batch * parts, run);
    }
    // SAFETY: every element was written by exactly one tile.
    unsafe { out.set_len(len) };
    out
}

/// `a b`, or `a bᵀ` with `b` as stored.
struct MatMul {
    rhs_transposed: bool,
}

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        if self.rhs_transposed {
            "adm-matmul-t"
        } else {
            "adm-matmul"
        }
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let mut bv = View::of(bl)?;
        if self.rhs_transposed {
            bv = bv.t();
        }
        let d = al.dims();
        let (batch, av) = if rows_against_one(d.len(), bl.dims().len()) {
            // All of (contiguous, see `product`) a's rows against the one b.
            let k = d[d.len() - 1];
            let rows = al.shape().elem_count() / k;
            (1, View::flat(al.start_offset(), (rows, k), (k, 1), 0))
        } else {
            (d[..d.len() - 2].iter().product(), View::of(al)?)
        };
        let mut shape = d.to_vec();
        shape[d.len() - 1] = bv.cols;
        let out = match (a, b) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(gemm_batched(batch, (a, av), (b, bv)))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64(gemm_batched(batch, (a, av), (b, bv)))
            }
            _ => candle_core::bail!(
                "matmul: expected two f32 or two f64 operands, got {:?} and {:?}",
                a.dtype(),
                b.dtype()
            ),
        };
        Ok((out, Shape::from(shape)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _c: &Tensor,
        dc: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (ad, bd, dc) = (a.detach(), b.detach(), dc.detach());
        // For a 2-D b under a batched a, b's gradient sums over all rows of a.
        let (a_rows, dc_rows) = if rows_against_one(a.rank(), b.rank()) {
            let rows = a.elem_count() / a.dim(D::Minus1)?;
            (ad.reshape((rows, ()))?, dc.reshape((rows, ()))?)
        } else {
            (ad.clone(), dc.clone())
        };
        let t = |x: &Tensor| x.transpose(x.rank() - 2, x.rank() - 1);
        // c = a b:  da = dc bᵀ, db = aᵀ dc.  c = a bᵀ:  da = dc b, db = dcᵀ a.
        let (da, db) = if self.rhs_transposed {
            let da = tracked(a, || matmul(&dc, &bd))?;
            (da, tracked(b, || matmul(&t(&dc_rows)?, &a_rows))?)
        } else {
            let da = tracked(a, || matmul_t(&dc, &bd))?;
            (da, tracked(b, || matmul(&t(&a_rows)?, &dc_rows))?)
        };
        Ok((da, db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_gradients, GradCheck};
    use crate::test_util::{assert_close, rand_tensor, to_vec};
    use candle_core::{DType, Var};

    fn assert_matches_candle(a: &Tensor, b: &Tensor) -> Result<()> {
        let reference = a.contiguous()?.matmul(&b.contiguous()?)?;
        assert_close(&to_vec(&matmul(a, b)?)?, &to_vec(&reference)?, 1e-12);
        Ok(())
    }

    #[test]
    fn equals_candle_on_batched_strided_and_broadcast_operands() -> Result<()> {
        let a = rand_tensor(&[2, 3, 5, 4], 1, 1.0)?;
        let b = rand_tensor(&[2, 3, 4, 6], 2, 1.0)?;
        assert_matches_candle(&a, &b)?;
        // 2-D, and transposed views of either operand (no copy is made for those).
        let a2 = rand_tensor(&[7, 9], 3, 1.0)?;
        let b2 = rand_tensor(&[8, 9], 4, 1.0)?;
        assert_matches_candle(&a2, &b2.t()?)?;
        assert_matches_candle(&a2.t()?.t()?, &b2.t()?)?;
        assert_matches_candle(&b2, &a2.t()?)?;
        // A kernel broadcast over the batch (stride 0), as in the convolution.
        let w = rand_tensor(&[5, 4], 5, 1.0)?.broadcast_left(3)?;
        let x = rand_tensor(&[3, 4, 6], 6, 1.0)?;
        assert_matches_candle(&w, &x)?;
        // Batch axes that do not collapse into one stride are copied first.
        let q = rand_tensor(&[2, 5, 3, 4], 7, 1.0)?.transpose(1, 2)?;
        let k = rand_tensor(&[2, 3, 4, 5], 8, 1.0)?;
        assert_matches_candle(&q, &k)?;
        Ok(())
    }

    /// Products big enough to be tiled, along rows and along columns, with remainder tiles,
    /// and with a strided (transposed) operand.
    #[test]
    fn tiled_products_equal_candle() -> Result<()> {
        for (batch, m, k, n) in [(1, 300, 70, 20), (2, 20, 70, 300), (3, 129, 33, 257)] {
            assert!(batch * m * n * k >= PARALLEL_MIN_MACS && m.max(n) > TILE_EDGE);
            let a = rand_tensor(&[batch, m, k], 9, 1.0)?;
            let b = rand_tensor(&[batch, n, k], 10, 1.0)?.transpose(1, 2)?;
            assert_matches_candle(&a, &b)?;
        }
        Ok(())
    }

    #[test]
    fn f32_matches_f64() -> Result<()> {
        let a = rand_tensor(&[3, 40, 50], 11, 1.0)?;
        let b = rand_tensor(&[3, 50, 30], 12, 1.0)?;
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        assert_close(
            &to_vec(&matmul(&f32(&a)?, &f32(&b)?)?)?,
            &to_vec(&matmul(&a, &b)?)?,
            1e-4,
        );
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let a = rand_tensor(&[2, 3, 4], 13, 1.0)?;
        let b = rand_tensor(&[2, 5, 4], 14, 1.0)?;
        // The second operand enters transposed, as in a linear layer or attention's q kᵀ.
        let report = check_gradients(
            |v| matmul(&v[0], &v[1].transpose(1, 2)?),
            &[a, b],
            GradCheck::default(),
        )?;
        assert!(report.max_abs_err < 1e-7, "{report:?}");
        // A kernel shared by the batch: its gradient sums over the batch entries.
        let w = rand_tensor(&[5, 3], 15, 1.0)?;
        let x = rand_tensor(&[2, 3, 4], 16, 1.0)?;
        let report = check_gradients(
            |v| matmul(&v[0].broadcast_left(2)?, &v[1]),
            &[w, x],
            GradCheck::default(),
        )?;
        assert!(report.max_abs_err < 1e-7, "{report:?}");
        Ok(())
    }

    /// `matmul_t` against `matmul` of the transpose, batched and with a 2-D right operand
    /// under a 3-D left one (the linear layer), values and finite-difference gradients.
    #[test]
    fn transposed_and_flattened_products() -> Result<()> {
        let a = rand_tensor(&[2, 3, 4], 23, 1.0)?;
        let b = rand_tensor(&[2, 5, 4], 24, 1.0)?;
        let w = rand_tensor(&[5, 4], 25, 1.0)?;
        let v = rand_tensor(&[4, 5], 26, 1.0)?;
        let t = |x: &Tensor| x.transpose(x.rank() - 2, x.rank() - 1)?.contiguous();
        let close = |x: &Tensor, y: &Tensor| -> Result<()> {
            assert_eq!(x.dims(), y.dims());
            assert_close(&to_vec(x)?, &to_vec(y)?, 1e-12);
            Ok(())
        };
        close(&matmul_t(&a, &b)?, &a.matmul(&t(&b)?)?)?;
        close(&matmul_t(&a, &w)?, &a.broadcast_matmul(&t(&w)?)?)?;
        close(&matmul(&a, &v)?, &a.broadcast_matmul(&v)?)?;
        // Other dtypes take candle's matmul, flattening the rows the same way.
        let half = |x: &Tensor| x.to_dtype(DType::F16);
        let h = matmul_t(&half(&a)?, &half(&w)?)?.to_dtype(DType::F64)?;
        assert_eq!(h.dims(), &[2, 3, 5]);
        assert_close(&to_vec(&h)?, &to_vec(&matmul_t(&a, &w)?)?, 1e-2);
        for (f, inputs) in [
            (
                matmul_t as fn(&Tensor, &Tensor) -> Result<Tensor>,
                [a.clone(), b],
            ),
            (matmul_t, [a.clone(), w]),
            (matmul, [a, v]),
        ] {
            let report = check_gradients(|x| f(&x[0], &x[1]), &inputs, GradCheck::default())?;
            assert!(report.max_abs_err < 1e-7, "{report:?}");
        }
        assert!(matmul_t(
            &rand_tensor(&[2, 3], 27, 1.0)?,
            &rand_tensor(&[4, 2], 28, 1.0)?
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn constant_operand_gets_no_gradient() -> Result<()> {
        let a = Var::from_tensor(&rand_tensor(&[4, 3], 17, 1.0)?)?;
        let b = rand_tensor(&[3, 2], 18, 1.0)?;
        let grads = matmul(a.as_tensor(), &b)?.sum_all()?.backward()?;
        assert!(grads.get(a.as_tensor()).is_some());
        assert!(grads.get(&b).is_none());
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_an_error_naming_both() -> Result<()> {
        let a = rand_tensor(&[2, 3], 19, 1.0)?;
        let b = rand_tensor(&[4, 2], 20, 1.0)?;
        let err = matmul(&a, &b).unwrap_err().to_string();
        assert!(err.contains("[2, 3]") && err.contains("[4, 2]"), "{err}");
        let c = rand_tensor(&[2, 3, 4], 21, 1.0)?;
        assert!(matmul(&c, &rand_tensor(&[3, 4, 2], 22, 1.0)?).is_err());
        Ok(())
    }
}
