//! Reverse mode that hands the gradients of Vars over instead of adding them into zeros.
//!
//! candle's `Tensor::backward` stores every gradient it receives as `zeros_like(arg) + grad`:
//! a zero-filled tensor and an addition per operand, even for the first (and usually only)
//! contribution. For the parameters of a model that is a memset and an addition over every
//! weight on every step (33 M parameters in the mid-size UNet benchmark). [`backward`] runs
//! candle's pass while this crate's ops hand the gradient of each Var operand to a store of
//! their own (adding it to an earlier one only when a Var is used twice), and merges that
//! store into candle's afterwards. The gradients are the same; candle's path remains for
//! every other operand and for Vars used by candle's own ops.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId};
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    /// The Var gradients handed over during a [`backward`] call on this thread (candle runs
    /// the whole backward pass on the calling thread).
    static HANDED_OVER: RefCell<Option<HashMap<TensorId, Tensor>>> = const { RefCell::new(None) };
}

/// The gradients of `loss` with respect to every Var it depends on, as
/// `loss.backward()` computes them.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    let opened = HANDED_OVER.with(|h| {
        let mut h = h.borrow_mut();
        h.is_none() && h.replace(HashMap::new()).is_none()
    });
    if !opened {
        candle_core::bail!("adm_nn::backward: called again from inside a backward pass")
    }
    // Closes the store even when candle's pass fails.
    struct Close;
    impl Drop for Close {
        fn drop(&mut self) {
            HANDED_OVER.with(|h| h.borrow_mut().take());
        }
    }
    let close = Close;
    let mut grads = loss.backward()?;
    let handed = HANDED_OVER
        .with(|h| h.borrow_mut().take())
        .unwrap_or_default();
    drop(close);
    for (id, grad) in handed {
        let grad = match grads.get_id(id) {
            Some(from_candle) => (from_candle + grad)?,
            None => grad,
        };
        grads.insert_id(id, grad);
    }
    Ok(grads)
}

/// The gradient an op returns to candle for its operand `arg`: `None` when `arg` is a Var and
/// a [`backward`] pass on this thread took `grad` over, else `grad`.
pub(crate) fn hand_over(arg: &Tensor, grad: Tensor) -> Result<Option<Tensor>> {
    if !arg.is_variable() {
        return Ok(Some(grad));
    }
    HANDED_OVER.with(|h| {
        let mut h = h.borrow_mut();
        let Some(store) = h.as_mut() else {
            return Ok(Some(grad));
        };
        let sum = match store.remove(&arg.id()) {
            Some(earlier) => (earlier + grad)?,
            None => grad,
        };
        store.insert(arg.id(), sum);
        Ok(None)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{rand_tensor, to_vec};
    use crate::{conv2d, matmul_t, multi_head_attention, silu, Conv2dConfig, GroupNorm};
    use candle_core::Var;

    /// A graph where Vars reach the loss through this crate's ops (products, SiLU, a
    /// convolution, attention, group norm), through candle's ops, and through both, some of
    /// them twice. `vars`: w (4, 4), b (4), k (1, 1, 3, 3), memory (1, 4, 4), gamma and
    /// beta (2).
    fn loss(vars: &[Var], x: &Tensor) -> Result<Tensor> {
        let [w, b, k, memory, gamma, beta] = vars else {
            candle_core::bail!("six Vars")
        };
        let h = silu(&matmul_t(x, w.as_tensor())?)?;
        // w a second time through this crate's op, and once through candle's.
        let h = (matmul_t(&h, w.as_tensor())? + h.matmul(w.as_tensor())?)?;
        let h = h.broadcast_add(b.as_tensor())?;
        let m = memory.as_tensor();
        let h = multi_head_attention(&h.reshape((1, 4, 4))?, m, m, 2, None)?;
        let img = h.reshape((1, 2, 2, 4))?;
        let norm = GroupNorm {
            weight: Some(gamma.as_tensor().clone()),
            bias: Some(beta.as_tensor().clone()),
            groups: 1,
            eps: 1e-5,
        };
        let img = norm.forward_silu(&img)?;
        let cfg = Conv2dConfig {
            padding: 1,
            stride: 1,
        };
        let y = conv2d(&img.reshape((2, 1, 2, 4))?, k.as_tensor(), cfg)?;
        (y.sqr()?.sum_all()? + b.sqr()?.sum_all()?)? + x.sum_all()?
    }

    #[test]
    fn equals_candle_backward() -> Result<()> {
        let shapes: [&[usize]; 6] = [&[4, 4], &[4], &[1, 1, 3, 3], &[1, 4, 4], &[2], &[2]];
        let vars = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| Var::from_tensor(&rand_tensor(s, 1 + i as u64, 0.5)?))
            .collect::<Result<Vec<_>>>()?;
        let x = rand_tensor(&[4, 4], 10, 1.0)?;
        let ours = backward(&loss(&vars, &x)?)?;
        let theirs = loss(&vars, &x)?.backward()?;
        for var in &vars {
            let got = to_vec(ours.get(var.as_tensor()).expect("a gradient"))?;
            let want = to_vec(theirs.get(var.as_tensor()).expect("a gradient"))?;
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{g} against {w}");
            }
        }
        // x is no Var and gets no gradient in either.
        assert!(ours.get(&x).is_none() && theirs.get(&x).is_none());
        // The store is closed again: outside a pass, ops return gradients to candle.
        assert!(HANDED_OVER.with(|h| h.borrow().is_none()));
        assert!(hand_over(vars[0].as_tensor(), x.clone())?.is_some());
        Ok(())
    }

    #[test]
    fn inside_a_pass_var_gradients_are_taken_and_summed() -> Result<()> {
        let w = Var::from_tensor(&rand_tensor(&[2], 6, 1.0)?)?;
        let x = rand_tensor(&[2], 7, 1.0)?;
        HANDED_OVER.with(|h| h.borrow_mut().replace(HashMap::new()));
        assert!(hand_over(w.as_tensor(), x.clone())?.is_none());
        assert!(hand_over(w.as_tensor(), x.clone())?.is_none());
        assert!(hand_over(&x, x.clone())?.is_some(), "x is no Var");
        let store = HANDED_OVER.with(|h| h.borrow_mut().take()).expect("open");
        assert_eq!(store.len(), 1);
        assert_eq!(to_vec(&store[&w.id()])?, to_vec(&(&x + &x)?)?);
        Ok(())
    }

    /// The identity, whose backward fails.
    struct FailingBackward;

    impl candle_core::CustomOp1 for FailingBackward {
        fn name(&self) -> &'static str {
            "failing-backward"
        }

        fn cpu_fwd(
            &self,
            s: &candle_core::CpuStorage,
            l: &candle_core::Layout,
        ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
            Ok((s.clone(), l.shape().clone()))
        }

        fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
            candle_core::bail!("no backward")
        }
    }

    #[test]
    fn nesting_is_refused_and_a_failed_pass_closes_the_store() -> Result<()> {
        let w = Var::from_tensor(&rand_tensor(&[3], 5, 1.0)?)?;
        let failing = w.as_tensor().apply_op1(FailingBackward)?.sum_all()?;
        assert!(backward(&failing).is_err());
        assert!(HANDED_OVER.with(|h| h.borrow().is_none()));
        // A pass started inside another is refused, and leaves the outer one's store open.
        HANDED_OVER.with(|h| h.borrow_mut().replace(HashMap::new()));
        let err = backward(&w.as_tensor().sum_all()?).unwrap_err().to_string();
        assert!(err.contains("inside a backward pass"), "{err}");
        assert!(HANDED_OVER.with(|h| h.borrow_mut().take().is_some()));
        Ok(())
    }
}
