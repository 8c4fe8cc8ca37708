//! Exponential moving average of a network's weights (the generator's, for sampling and
//! export): `ema = decay * ema + (1 - decay) * weights` after every optimiser step.

use candle_core::{Result, Var};
use candle_nn::VarMap;

pub struct Ema {
    decay: f64,
    /// (tracked Var, its average), sorted by name.
    pairs: Vec<(Var, Var)>,
    /// The averages under the tracked Vars' names: saved and loaded like any network.
    averages: VarMap,
}

impl Ema {
    /// Starts the average at `varmap`'s current values.
    pub fn new(varmap: &VarMap, decay: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&decay) {
            candle_core::bail!("ema decay {decay} is not in [0, 1]");
        }
        let averages = VarMap::new();
        let mut tracked: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        tracked.sort_by(|a, b| a.0.cmp(&b.0));
        let mut pairs = Vec::with_capacity(tracked.len());
        {
            let mut data = averages.data().lock().unwrap();
            for (name, var) in tracked {
                let average = Var::from_tensor(&var.as_tensor().detach().copy()?)?;
                data.insert(name, average.clone());
                pairs.push((var, average));
            }
        }
        Ok(Self {
            decay,
            pairs,
            averages,
        })
    }

    pub fn update(&self) -> Result<()> {
        for (var, average) in &self.pairs {
            let next = ((average.as_tensor() * self.decay)?
                + (var.as_tensor().detach() * (1.0 - self.decay))?)?;
            average.set(&next)?;
        }
        Ok(())
    }

    /// The averaged weights, named like the tracked network's Vars.
    pub fn varmap(&self) -> &VarMap {
        &self.averages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn averages_towards_the_weights() -> Result<()> {
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        vb.get_with_hints(2, "w", candle_nn::Init::Const(1.0))?;
        let ema = Ema::new(&varmap, 0.9)?;
        let w = varmap.all_vars().remove(0);
        w.set(&Tensor::new(&[2.0, 0.0], &Device::Cpu)?)?;
        ema.update()?;
        ema.update()?;
        // 1 -> 1.1 -> 1.19 towards 2; 1 -> 0.9 -> 0.81 towards 0.
        let got = ema.varmap().all_vars()[0].as_tensor().to_vec1::<f64>()?;
        assert!(
            (got[0] - 1.19).abs() < 1e-12 && (got[1] - 0.81).abs() < 1e-12,
            "{got:?}"
        );
        assert!(Ema::new(&varmap, 1.5).is_err());
        Ok(())
    }
}
