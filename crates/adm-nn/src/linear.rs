//! A linear layer with the tensor names and initialisation of `candle_nn::Linear`. On the
//! CPU its product runs on [`crate::matmul_t`] (the weight as stored, all leading axes of the
//! input as rows) and its backward reduces the bias gradient in one vectorised pass
//! ([`crate::ops::bias_add`]) instead of candle's strided sum over the broadcast axes.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `x Wᵀ + b` over the last dimension of `x`; `weight` is (out, in).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl From<candle_nn::Linear> for Linear {
    fn from(l: candle_nn::Linear) -> Self {
        Self::new(l.weight().clone(), l.bias().cloned())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match x.rank() {
            0 => candle_core::bail!("linear: a scalar input"),
            1 => return self.forward(&x.unsqueeze(0)?)?.squeeze(0),
            _ => {}
        }
        // One GEMM over all rows of x, its leading axes flattened inside the product (a
        // reshape would add two nodes, each a zero-fill and an addition in the backward).
        let y = crate::matmul_t(&x.contiguous()?, &self.weight)?;
        match &self.bias {
            Some(b) => crate::ops::bias_add(&y, b, y.rank() - 1),
            None => Ok(y),
        }
    }
}

/// A biased linear layer loaded (or created, as `candle_nn::linear`) from `vb`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(in_dim, out_dim, vb).map(Linear::from)
}

/// An unbiased linear layer, as `candle_nn::linear_no_bias`.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb).map(Linear::from)
}

/// A linear layer with or without bias, as `candle_nn::linear_b`.
pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_b(in_dim, out_dim, bias, vb).map(Linear::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_gradients, GradCheck};
    use crate::test_util::{assert_close, rand_tensor, to_vec};

    #[test]
    fn forward_equals_candle_nn_on_3d_and_strided_inputs() -> Result<()> {
        let w = rand_tensor(&[5, 4], 1, 1.0)?;
        let b = rand_tensor(&[5], 2, 1.0)?;
        let x = rand_tensor(&[2, 3, 4], 3, 1.0)?;
        let ours = Linear::new(w.clone(), Some(b.clone()));
        let theirs = candle_nn::Linear::new(w, Some(b));
        for x in [x.clone(), x.transpose(0, 1)?] {
            assert_close(
                &to_vec(&ours.forward(&x)?)?,
                &to_vec(&theirs.forward(&x)?)?,
                1e-12,
            );
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let x = rand_tensor(&[2, 3, 4], 4, 1.0)?;
        let w = rand_tensor(&[5, 4], 5, 1.0)?;
        let b = rand_tensor(&[5], 6, 1.0)?;
        let report = check_gradients(
            |v| Linear::new(v[1].clone(), Some(v[2].clone())).forward(&v[0]),
            &[x, w, b],
            GradCheck::default(),
        )?;
        assert!(report.max_abs_err < 1e-7, "{report:?}");
        Ok(())
    }
}
