//! Finite-difference gradient checks and the "every Var gets a gradient" assertion.
//!
//! candle 0.11.1 has ops whose backward silently returns nothing or the wrong thing
//! (see CANDLE_PITFALLS.md), so every differentiable block in this workspace is checked
//! against central differences in f64 before it is trusted.

use candle_core::backprop::GradStore;
use candle_core::{DType, Error, Result, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Tolerances and sampling for [`check_gradients`].
#[derive(Debug, Clone, Copy)]
pub struct GradCheck {
    /// Central-difference step.
    pub eps: f64,
    /// Allowed absolute error.
    pub atol: f64,
    /// Allowed error relative to the finite-difference value.
    pub rtol: f64,
    /// At most this many entries of each input are probed (chosen at random).
    pub max_probes_per_input: usize,
    /// Seed of the output projection and of the probe choice.
    pub seed: u64,
}

impl Default for GradCheck {
    fn default() -> Self {
        Self {
            eps: 1e-6,
            atol: 1e-7,
            rtol: 1e-5,
            max_probes_per_input: 64,
            seed: 0,
        }
    }
}

/// The worst disagreement found by [`check_gradients`].
#[derive(Debug, Clone, PartialEq)]
pub struct GradReport {
    pub probes: usize,
    pub max_abs_err: f64,
    /// Largest |finite difference| seen: a check where this is 0 proves nothing.
    pub max_abs_numeric: f64,
}

/// Checks the autograd gradient of `f` with respect to every input against central finite
/// differences. Inputs are converted to f64 `Var`s. A non-scalar output is reduced with a
/// fixed random projection `sum(f(x) * w)` so that every output element is exercised.
///
/// Fails with a message naming the input and element when an entry disagrees, when an input
/// receives no gradient at all, or when every finite difference is zero (a check that cannot
/// fail).
pub fn check_gradients<F>(f: F, inputs: &[Tensor], opts: GradCheck) -> Result<GradReport>
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
{
    let vars = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(DType::F64)?))
        .collect::<Result<Vec<_>>>()?;
    let as_tensors = |vs: &[Var]| vs.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>();

    let mut rng = StdRng::seed_from_u64(opts.seed);
    let out = f(&as_tensors(&vars))?;
    let projection: Vec<f64> = (0..out.elem_count())
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let projection = Tensor::from_vec(projection, out.shape(), out.device())?;
    let scalar = |o: &Tensor| -> Result<f64> {
        o.to_dtype(DType::F64)?
            .mul(&projection)?
            .sum_all()?
            .to_scalar::<f64>()
    };

    let loss = out.to_dtype(DType::F64)?.mul(&projection)?.sum_all()?;
    let grads = loss.backward()?;

    let mut report = GradReport {
        probes: 0,
        max_abs_err: 0.0,
        max_abs_numeric: 0.0,
    };
    for (index, var) in vars.iter().enumerate() {
        let analytic = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1::<f64>()?,
            None => {
                return Err(Error::Msg(format!(
                    "input {index} (shape {:?}) received no gradient",
                    var.shape()
                )))
            }
        };
        let base = var.flatten_all()?.to_vec1::<f64>()?;
        let mut positions: Vec<usize> = (0..base.len()).collect();
        if positions.len() > opts.max_probes_per_input {
            for i in 0..opts.max_probes_per_input {
                let j = rng.random_range(i..positions.len());
                positions.swap(i, j);
            }
            positions.truncate(opts.max_probes_per_input);
        }
        for &p in &positions {
            let evaluate = |delta: f64| -> Result<f64> {
                let mut shifted = base.clone();
                shifted[p] += delta;
                var.set(&Tensor::from_vec(shifted, var.shape(), var.device())?)?;
                scalar(&f(&as_tensors(&vars))?)
            };
            let numeric = (evaluate(opts.eps)? - evaluate(-opts.eps)?) / (2.0 * opts.eps);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), var.device())?)?;
            let err = (analytic[p] - numeric).abs();
            if err > opts.atol + opts.rtol * numeric.abs() {
                return Err(Error::Msg(format!(
                    "gradient mismatch at input {index} element {p}: autograd {} vs finite difference {numeric}",
                    analytic[p]
                )));
            }
            report.probes += 1;
            report.max_abs_err = report.max_abs_err.max(err);
            report.max_abs_numeric = report.max_abs_numeric.max(numeric.abs());
        }
    }
    if report.max_abs_numeric == 0.0 {
        return Err(Error::Msg(
            "every finite difference was zero: the function does not depend on its inputs".into(),
        ));
    }
    Ok(report)
}

/// Fails unless every Var of `varmap` has a gradient in `grads` with at least one non-zero
/// entry. The error lists every Var that got nothing, by name.
pub fn assert_every_var_has_grad(varmap: &VarMap, grads: &GradStore) -> Result<()> {
    let data = varmap.data().lock().unwrap();
    let mut missing = Vec::new();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let nonzero = match grads.get(var.as_tensor()) {
            Some(g) => {
                g.abs()?
                    .max_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?
                    > 0.0
            }
            None => false,
        };
        if !nonzero {
            missing.push(name.clone());
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Msg(format!(
            "{} of {} Vars received no non-zero gradient: {}",
            missing.len(),
            data.len(),
            missing.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn accepts_a_correct_gradient() -> Result<()> {
        let x = Tensor::new(&[0.3f64, -1.2, 2.0], &Device::Cpu)?;
        let report = check_gradients(|xs| xs[0].sqr()?.sin(), &[x], GradCheck::default())?;
        assert_eq!(report.probes, 3);
        assert!(report.max_abs_numeric > 0.1);
        Ok(())
    }

    #[test]
    fn rejects_a_dropped_gradient() -> Result<()> {
        // `detach` cuts the graph, as a broken op would: the harness must notice.
        let x = Tensor::new(&[0.3f64, -1.2], &Device::Cpu)?;
        let f = |xs: &[Tensor]| xs[0].detach().sqr()? + xs[0].affine(0.0, 0.0)?;
        assert!(check_gradients(f, &[x], GradCheck::default()).is_err());
        Ok(())
    }

    #[test]
    fn rejects_a_wrong_gradient() -> Result<()> {
        // The value of x² but the gradient of x: a wrong backward.
        let x = Tensor::new(&[0.5f64, 1.5], &Device::Cpu)?;
        let f = |xs: &[Tensor]| {
            let x = &xs[0];
            x.sqr()?.detach() + x - x.detach()
        };
        let err = check_gradients(f, &[x], GradCheck::default()).unwrap_err();
        assert!(err.to_string().contains("gradient mismatch"), "{err}");
        Ok(())
    }

    #[test]
    fn every_var_check_names_the_var_without_gradient() -> Result<()> {
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let used = vb.get_with_hints(2, "used", candle_nn::Init::Const(1.0))?;
        let _unused = vb.get_with_hints(2, "unused", candle_nn::Init::Const(1.0))?;
        let grads = used.sqr()?.sum_all()?.backward()?;
        let err = assert_every_var_has_grad(&varmap, &grads).unwrap_err();
        assert!(err.to_string().contains("unused"), "{err}");
        assert!(!err.to_string().contains("used,"), "{err}");
        Ok(())
    }
}
