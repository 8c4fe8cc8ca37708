//! One AdamW per trainable network, with gradient-norm clipping and a guard that skips a
//! step whose loss or gradient is not finite.

use candle_core::{Result, Tensor, Var};
use candle_nn::{AdamW, Optimizer as _, ParamsAdamW, VarMap};

/// What one optimiser step did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The step was skipped because the loss or the gradient was not finite.
    pub skipped: bool,
}

pub struct Optimizer {
    name: String,
    vars: Vec<Var>,
    adamw: AdamW,
    clip: f64,
    skipped: usize,
}

impl Optimizer {
    /// AdamW (beta 0.9 / 0.999, no weight decay) over every Var of `varmap`.
    pub fn new(name: &str, varmap: &VarMap, learning_rate: f64, clip: f64) -> Result<Self> {
        let vars = varmap.all_vars();
        if vars.is_empty() {
            candle_core::bail!("optimiser {name}: the network has no trainable Var");
        }
        let params = ParamsAdamW {
            lr: learning_rate,
            weight_decay: 0.0,
            ..Default::default()
        };
        Ok(Self {
            name: name.to_string(),
            adamw: AdamW::new(vars.clone(), params)?,
            vars,
            clip,
            skipped: 0,
        })
    }

    /// Back-propagates `loss` and steps this optimiser's Vars only (other networks in the
    /// graph receive gradients that are simply dropped).
    pub fn step(&mut self, loss: &Tensor) -> Result<StepStats> {
        let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let skip = |this: &mut Self, grad_norm: f64| {
            this.skipped += 1;
            tracing::warn!(
                optimiser = this.name,
                loss = value,
                grad_norm,
                "skipping a step with a non-finite loss or gradient"
            );
            Ok(StepStats {
                loss: value,
                grad_norm,
                skipped: true,
            })
        };
        if !value.is_finite() {
            return skip(self, f64::NAN);
        }
        let mut grads = loss.backward()?;
        let mut squared = 0.0;
        for var in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                squared += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        let grad_norm = squared.sqrt();
        if !grad_norm.is_finite() {
            return skip(self, grad_norm);
        }
        if grad_norm > self.clip {
            let scale = self.clip / grad_norm;
            for var in &self.vars {
                if let Some(g) = grads.remove(var.as_tensor()) {
                    grads.insert(var.as_tensor(), g.affine(scale, 0.0)?);
                }
            }
        }
        self.adamw.step(&grads)?;
        Ok(StepStats {
            loss: value,
            grad_norm,
            skipped: false,
        })
    }

    pub fn set_learning_rate(&mut self, learning_rate: f64) {
        self.adamw.set_learning_rate(learning_rate);
    }

    /// Steps skipped by the non-finite guard so far.
    pub fn skipped(&self) -> usize {
        self.skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn quadratic() -> Result<(VarMap, Var)> {
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        vb.get_with_hints(3, "w", candle_nn::Init::Const(1.0))?;
        let var = varmap.all_vars().remove(0);
        Ok((varmap, var))
    }

    #[test]
    fn clips_and_reports_the_unclipped_norm() -> Result<()> {
        let (varmap, w) = quadratic()?;
        let mut opt = Optimizer::new("test", &varmap, 0.1, 1.0)?;
        // d/dw sum(50 w^2) = 100 w = [100, 100, 100]
        let stats = opt.step(&w.as_tensor().sqr()?.sum_all()?.affine(50.0, 0.0)?)?;
        assert!((stats.grad_norm - 100.0 * 3f64.sqrt()).abs() < 1e-9);
        assert!(!stats.skipped);
        // AdamW's first step moves each coordinate by lr whatever the gradient scale.
        let w_after = w.as_tensor().to_vec1::<f64>()?;
        assert!(
            w_after.iter().all(|v| (v - 0.9).abs() < 1e-6),
            "{w_after:?}"
        );
        Ok(())
    }

    #[test]
    fn skips_non_finite_steps_without_touching_weights() -> Result<()> {
        let (varmap, w) = quadratic()?;
        let mut opt = Optimizer::new("test", &varmap, 0.1, 1.0)?;
        let stats = opt.step(&w.as_tensor().sqrt()?.affine(0.0, f64::NAN)?.sum_all()?)?;
        assert!(stats.skipped);
        assert_eq!(opt.skipped(), 1);
        assert_eq!(w.as_tensor().to_vec1::<f64>()?, vec![1.0; 3]);
        Ok(())
    }
}
