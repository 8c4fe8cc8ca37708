//! One AdamW per trainable network: its own learning rate with linear warm-up, gradient
//! accumulation over micro-batches, gradient-norm clipping, a guard that skips a step whose
//! loss or gradient is not finite, and moments that can be saved and restored (candle's
//! `AdamW` keeps them private, so a resumed run could not continue it exactly).

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

/// Hyper-parameters of one network's optimiser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    pub learning_rate: f64,
    /// Optimiser steps over which the learning rate rises linearly from lr / warmup_steps to
    /// lr (0: none).
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Global gradient-norm clip (DMD2: 10).
    pub grad_clip: f64,
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}

fn default_eps() -> f64 {
    1e-8
}

impl OptimizerConfig {
    /// AdamW with PyTorch's betas and eps, no weight decay and no warm-up.
    pub fn new(learning_rate: f64, grad_clip: f64) -> Self {
        Self {
            learning_rate,
            warmup_steps: 0,
            weight_decay: 0.0,
            betas: default_betas(),
            eps: default_eps(),
            grad_clip,
        }
    }

    pub fn validate(&self, name: &str) -> anyhow::Result<()> {
        let [b1, b2] = self.betas;
        let ok = self.learning_rate > 0.0
            && self.grad_clip > 0.0
            && self.eps > 0.0
            && self.weight_decay >= 0.0
            && (0.0..1.0).contains(&b1)
            && (0.0..1.0).contains(&b2);
        anyhow::ensure!(
            ok,
            "{name}: learning_rate, grad_clip and eps must be > 0, weight_decay >= 0 and betas in [0, 1)"
        );
        Ok(())
    }

    /// The learning rate of optimiser step `step` (0-based) under the linear warm-up.
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            self.learning_rate * (step + 1) as f64 / self.warmup_steps as f64
        } else {
            self.learning_rate
        }
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// The loss, averaged over the micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate the step used.
    pub learning_rate: f64,
    /// The step was skipped because the loss or the gradient was not finite.
    pub skipped: bool,
}

/// A Var with its AdamW moments.
struct Param {
    name: String,
    var: Var,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

pub struct Optimizer {
    name: String,
    config: OptimizerConfig,
    /// Sorted by name, so the gradient norm sums in the same order in every run.
    params: Vec<Param>,
    /// Applied (not skipped) steps: AdamW's bias-correction step count.
    steps: usize,
    skipped: usize,
    /// Gradients summed over the micro-batches of the pending step.
    pending: Vec<Option<Tensor>>,
    pending_losses: Vec<f64>,
}

impl Optimizer {
    /// AdamW (beta 0.9 / 0.999, no weight decay, no warm-up) over every Var of `varmap`.
    pub fn new(name: &str, varmap: &VarMap, learning_rate: f64, clip: f64) -> Result<Self> {
        Self::with_config(name, varmap, OptimizerConfig::new(learning_rate, clip))
    }

    pub fn with_config(name: &str, varmap: &VarMap, config: OptimizerConfig) -> Result<Self> {
        let mut vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, v)| v.dtype().is_float())
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        if vars.is_empty() {
            candle_core::bail!("optimiser {name}: the network has no trainable Var");
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.zeros_like()?;
                Ok(Param {
                    name,
                    exp_avg: zeros.clone(),
                    exp_avg_sq: zeros,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            name: name.to_string(),
            pending: vec![None; params.len()],
            params,
            config,
            steps: 0,
            skipped: 0,
            pending_losses: Vec::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Back-propagates one micro-batch's `loss` and adds its gradient, times `scale`, to the
    /// pending step's (1 / micro-batches for a mean). Gradients other networks receive from
    /// the same graph are dropped.
    pub fn accumulate(&mut self, loss: &Tensor, scale: f64) -> Result<()> {
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        self.pending_losses.push(value);
        if !value.is_finite() {
            return Ok(());
        }
        let grads = adm_nn::backward(loss)?;
        for (param, slot) in self.params.iter().zip(self.pending.iter_mut()) {
            if let Some(g) = grads.get(param.var.as_tensor()) {
                let g = if scale == 1.0 {
                    g.clone()
                } else {
                    g.affine(scale, 0.0)?
                };
                *slot = Some(match slot.take() {
                    Some(sum) => (sum + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// Applies the pending (accumulated) gradient: clip, non-finite guard, AdamW.
    pub fn apply(&mut self) -> Result<StepStats> {
        if self.pending_losses.is_empty() {
            candle_core::bail!("optimiser {}: apply without a micro-batch", self.name);
        }
        let losses = std::mem::take(&mut self.pending_losses);
        let grads = std::mem::replace(&mut self.pending, vec![None; self.params.len()]);
        let loss = losses.iter().sum::<f64>() / losses.len() as f64;
        let learning_rate = self.config.learning_rate_at(self.steps);
        let mut stats = StepStats {
            loss,
            grad_norm: f64::NAN,
            learning_rate,
            skipped: true,
        };
        if loss.is_finite() {
            let mut squared = 0.0;
            for g in grads.iter().flatten() {
                squared += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
            }
            stats.grad_norm = squared.sqrt();
        }
        if !stats.grad_norm.is_finite() {
            self.skipped += 1;
            tracing::warn!(
                optimiser = self.name,
                loss,
                grad_norm = stats.grad_norm,
                "skipping a step with a non-finite loss or gradient"
            );
            return Ok(stats);
        }
        let clip_scale = (stats.grad_norm > self.config.grad_clip)
            .then(|| self.config.grad_clip / stats.grad_norm);
        self.adamw(&grads, learning_rate, clip_scale)?;
        stats.skipped = false;
        Ok(stats)
    }

    /// `accumulate` one loss and `apply`.
    pub fn step(&mut self, loss: &Tensor) -> Result<StepStats> {
        self.accumulate(loss, 1.0)?;
        self.apply()
    }

    /// AdamW in candle-nn 0.11.1's exact operation order (so a run that switched from
    /// candle's optimiser computes the same numbers); Vars without a gradient are left alone.
    fn adamw(&mut self, grads: &[Option<Tensor>], lr: f64, clip: Option<f64>) -> Result<()> {
        self.steps += 1;
        let [beta1, beta2] = self.config.betas;
        let t = self.steps as i32;
        let scale_m = 1.0 / (1.0 - beta1.powi(t));
        let scale_v = 1.0 / (1.0 - beta2.powi(t));
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            let g = match clip {
                Some(scale) => g.affine(scale, 0.0)?,
                None => g.clone(),
            };
            let next_m = ((&p.exp_avg * beta1)? + (&g * (1.0 - beta1))?)?;
            let next_v = ((&p.exp_avg_sq * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let theta = (p.var.as_tensor() * (1.0 - lr * self.config.weight_decay))?;
            let adjusted = (m_hat / (v_hat.sqrt()? + self.config.eps)?)?;
            p.var.set(&(theta - (adjusted * lr)?)?)?;
            p.exp_avg = next_m;
            p.exp_avg_sq = next_v;
        }
        Ok(())
    }

    pub fn set_learning_rate(&mut self, learning_rate: f64) {
        self.config.learning_rate = learning_rate;
    }

    /// Steps skipped by the non-finite guard so far.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// (applied steps, skipped steps): the counters a checkpoint keeps.
    pub fn counters(&self) -> (usize, usize) {
        (self.steps, self.skipped)
    }

    /// The moments under PyTorch's state names: `{var}.exp_avg`, `{var}.exp_avg_sq`.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .flat_map(|p| {
                [
                    (format!("{}.exp_avg", p.name), p.exp_avg.clone()),
                    (format!("{}.exp_avg_sq", p.name), p.exp_avg_sq.clone()),
                ]
            })
            .collect()
    }

    /// Every moment's name and shape, as `state_tensors` names them.
    pub fn state_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.params
            .iter()
            .flat_map(|p| {
                [
                    (format!("{}.exp_avg", p.name), p.var.dims().to_vec()),
                    (format!("{}.exp_avg_sq", p.name), p.var.dims().to_vec()),
                ]
            })
            .collect()
    }

    /// Restores moments (named as by `state_tensors`; the caller has checked names and
    /// shapes) and counters.
    pub fn restore(
        &mut self,
        mut tensors: HashMap<String, Tensor>,
        counters: (usize, usize),
    ) -> Result<()> {
        let mut take = |name: String, like: &Var| -> Result<Tensor> {
            let t = tensors.remove(&name).ok_or_else(|| {
                candle_core::Error::Msg(format!("optimiser {}: missing `{name}`", self.name))
            })?;
            t.to_dtype(like.dtype())?.to_device(like.device())
        };
        let restored = self
            .params
            .iter()
            .map(|p| {
                Ok((
                    take(format!("{}.exp_avg", p.name), &p.var)?,
                    take(format!("{}.exp_avg_sq", p.name), &p.var)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        for (p, (m, v)) in self.params.iter_mut().zip(restored) {
            p.exp_avg = m;
            p.exp_avg_sq = v;
        }
        (self.steps, self.skipped) = counters;
        self.pending = vec![None; self.params.len()];
        self.pending_losses.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::Optimizer as _;

    fn quadratic() -> Result<(VarMap, Var)> {
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        vb.get_with_hints(3, "w", candle_nn::Init::Const(1.0))?;
        let var = varmap.all_vars().remove(0);
        Ok((varmap, var))
    }

    fn loss(w: &Var, coeffs: [f64; 3]) -> Result<Tensor> {
        let c = Tensor::new(&coeffs, &Device::Cpu)?;
        (w.as_tensor().sqr()? * c)?.sum_all()
    }

    #[test]
    fn clips_and_reports_the_unclipped_norm() -> Result<()> {
        let (varmap, w) = quadratic()?;
        let mut opt = Optimizer::new("test", &varmap, 0.1, 1.0)?;
        // d/dw sum(50 w^2) = 100 w = [100, 100, 100]
        let stats = opt.step(&loss(&w, [50.0; 3])?)?;
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
        assert_eq!(opt.counters(), (0, 1));
        assert_eq!(w.as_tensor().to_vec1::<f64>()?, vec![1.0; 3]);
        Ok(())
    }

    /// Same numbers as candle-nn's AdamW, with weight decay, over several steps.
    #[test]
    fn matches_candle_adamw() -> Result<()> {
        let (varmap_a, w_a) = quadratic()?;
        let (varmap_b, w_b) = quadratic()?;
        let config = OptimizerConfig {
            weight_decay: 0.1,
            ..OptimizerConfig::new(0.05, 1e9)
        };
        let mut ours = Optimizer::with_config("ours", &varmap_a, config)?;
        let mut theirs = candle_nn::AdamW::new(
            varmap_b.all_vars(),
            candle_nn::ParamsAdamW {
                lr: 0.05,
                weight_decay: 0.1,
                ..Default::default()
            },
        )?;
        for step in 0..5 {
            let c = [1.0 + step as f64, 0.5, -2.0];
            ours.step(&loss(&w_a, c)?)?;
            theirs.backward_step(&loss(&w_b, c)?)?;
        }
        assert_eq!(
            w_a.as_tensor().to_vec1::<f64>()?,
            w_b.as_tensor().to_vec1::<f64>()?
        );
        Ok(())
    }

    /// Two micro-batches with scale 1/2 step like one batch with the mean loss; warm-up
    /// scales the first steps' learning rate.
    #[test]
    fn accumulates_micro_batches_and_warms_up() -> Result<()> {
        let (varmap_a, w_a) = quadratic()?;
        let (varmap_b, w_b) = quadratic()?;
        let config = OptimizerConfig {
            warmup_steps: 4,
            ..OptimizerConfig::new(0.1, 1e9)
        };
        let mut a = Optimizer::with_config("a", &varmap_a, config.clone())?;
        let mut b = Optimizer::with_config("b", &varmap_b, config)?;
        let (c1, c2) = ([1.0, 2.0, 3.0], [3.0, -1.0, 0.5]);
        a.accumulate(&loss(&w_a, c1)?, 0.5)?;
        a.accumulate(&loss(&w_a, c2)?, 0.5)?;
        let sa = a.apply()?;
        let mean = ((loss(&w_b, c1)? + loss(&w_b, c2)?)? * 0.5)?;
        let sb = b.step(&mean)?;
        assert!((sa.loss - sb.loss).abs() < 1e-12 && (sa.grad_norm - sb.grad_norm).abs() < 1e-9);
        assert_eq!(sa.learning_rate, 0.025);
        let (wa, wb) = (
            w_a.as_tensor().to_vec1::<f64>()?,
            w_b.as_tensor().to_vec1::<f64>()?,
        );
        for (x, y) in wa.iter().zip(&wb) {
            assert!((x - y).abs() < 1e-12, "{wa:?} vs {wb:?}");
        }
        // First AdamW step: each coordinate moves by the warmed-up lr, 0.1 / 4.
        assert!((wa[0] - 0.975).abs() < 1e-9, "{wa:?}");
        assert_eq!(a.config.learning_rate_at(3), 0.1);
        Ok(())
    }

    /// Saving and restoring the moments continues the same trajectory.
    #[test]
    fn restored_state_continues_identically() -> Result<()> {
        let (varmap_a, w_a) = quadratic()?;
        let mut a = Optimizer::new("a", &varmap_a, 0.1, 1.0)?;
        for _ in 0..3 {
            a.step(&loss(&w_a, [1.0, 2.0, 3.0])?)?;
        }
        let (varmap_b, w_b) = quadratic()?;
        w_b.set(w_a.as_tensor())?;
        let mut b = Optimizer::new("b", &varmap_b, 0.1, 1.0)?;
        b.restore(a.state_tensors(), a.counters())?;
        for _ in 0..2 {
            a.step(&loss(&w_a, [1.0, 2.0, 3.0])?)?;
            b.step(&loss(&w_b, [1.0, 2.0, 3.0])?)?;
        }
        assert_eq!(
            w_a.as_tensor().to_vec1::<f64>()?,
            w_b.as_tensor().to_vec1::<f64>()?
        );
        let err = b.restore(HashMap::new(), (0, 0)).unwrap_err().to_string();
        assert!(err.contains("missing `w.exp_avg`"), "{err}");
        Ok(())
    }
}
