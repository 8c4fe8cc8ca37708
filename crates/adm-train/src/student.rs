//! The student generator G_theta: a copy of the teacher's network that maps points on the
//! straight line between data and noise to x0, in one step or a few.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use adm_diffusion::Schedule;
use adm_models::{compute_var_builder, copy_weights, Backbone, Condition, InDtype};
use adm_nn::SeededVarMap;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;

use crate::config::StudentOutput;

type Build<M> = Box<dyn Fn(VarBuilder<'static>) -> Result<M> + Send + Sync>;

/// A trainable network with its f32 master Vars, initialised from given weights, and the
/// dtype it computes in.
///
/// In f32 it computes on the Vars themselves (`net`). In bf16 / f16 it computes on a copy
/// built from casts of the Vars ([`compute_var_builder`]) and seen through [`InDtype`]
/// (inputs cast to the compute dtype, outputs back to f32); the gradient lands on the f32
/// Vars, which the optimiser, the EMA and checkpoints read. The copy is a snapshot: whoever
/// changes the Vars (an optimiser step, a checkpoint load) calls [`Trainable::master_changed`]
/// and the next [`Trainable::compute`] rebuilds it.
pub struct Trainable<M> {
    /// The network on the f32 master Vars (computes in f32, always current).
    pub net: Arc<M>,
    pub vars: SeededVarMap,
    build: Build<M>,
    device: Device,
    dtype: DType,
    /// The compute copy (bf16 / f16); `None` until built or after the master changed.
    copy: Mutex<Option<Arc<InDtype<M>>>>,
}

impl<M> Trainable<M> {
    /// Builds `M` with `build` (kept to build compute copies), then overwrites every Var with
    /// `init` (the teacher's or a pre-trained student's weights). Computes in f32 until
    /// [`Trainable::set_compute_dtype`].
    pub fn from_weights(
        seed: u64,
        device: &Device,
        init: &HashMap<String, Tensor>,
        build: impl Fn(VarBuilder<'static>) -> Result<M> + Send + Sync + 'static,
    ) -> Result<Self> {
        let vars = SeededVarMap::new(seed);
        let net = build(vars.var_builder(DType::F32, device))?;
        copy_weights(init, vars.varmap())?;
        Ok(Self {
            net: Arc::new(net),
            vars,
            build: Box::new(build),
            device: device.clone(),
            dtype: DType::F32,
            copy: Mutex::new(None),
        })
    }

    pub fn varmap(&self) -> &VarMap {
        self.vars.varmap()
    }

    /// The dtype the network computes in (its Vars stay f32).
    pub fn compute_dtype(&self) -> DType {
        self.dtype
    }

    /// Computes in `dtype` from now on: f32, bf16 or f16.
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            candle_core::bail!("compute dtype {dtype:?}: expected f32, bf16 or f16");
        }
        self.dtype = dtype;
        self.master_changed();
        Ok(())
    }

    /// The Vars changed: the next [`Trainable::compute`] rebuilds the compute copy.
    pub fn master_changed(&self) {
        *self.copy.lock().unwrap() = None;
    }
}

impl<M: Backbone + 'static> Trainable<M> {
    /// The network to run: `net` in f32, else the compute copy of the current Vars (built
    /// on first use after a change).
    pub fn compute(&self) -> Result<Arc<dyn Backbone>> {
        if self.dtype == DType::F32 {
            return Ok(self.net.clone());
        }
        let mut copy = self.copy.lock().unwrap();
        if let Some(net) = copy.as_ref() {
            return Ok(net.clone());
        }
        let vb = compute_var_builder(self.varmap(), self.dtype, &self.device)?;
        let net = Arc::new(InDtype::new((self.build)(vb)?, self.dtype));
        *copy = Some(net.clone());
        Ok(net)
    }
}

/// A student generator: the network plus how its output is read and its step list.
pub struct Student<M> {
    pub model: Trainable<M>,
    pub output: StudentOutput,
    /// Line times s of the sampling steps, descending from 1 (pure noise).
    pub steps: Vec<f64>,
}

/// `s` as a (B,) tensor.
fn per_sample(values: &[f64], device: &Device) -> Result<Tensor> {
    Tensor::from_vec(
        values.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        values.len(),
        device,
    )
}

/// Broadcasts a (B,) tensor over the trailing dims of `like`.
pub fn expand_like(per_sample: &Tensor, like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![like.dim(0)?];
    shape.resize(like.rank(), 1);
    per_sample.reshape(shape)?.broadcast_as(like.shape())
}

/// The straight-line point x_s = (1 - s) x0 + s noise, per-sample s.
pub fn line_point(x0: &Tensor, noise: &Tensor, s: &[f64]) -> Result<Tensor> {
    let s = expand_like(&per_sample(s, x0.device())?, x0)?;
    (x0 * (1.0 - &s)?)? + (noise * s)?
}

impl<M: Backbone + 'static> Student<M> {
    fn schedule(&self) -> &Schedule {
        self.model.net.schedule()
    }

    /// x0 predicted from line points `x_line` at line times `s` (per sample).
    pub fn x0_from_line(&self, x_line: &Tensor, s: &[f64], cond: &Condition) -> Result<Tensor> {
        let device = x_line.device();
        let schedule = self.schedule();
        match self.output {
            StudentOutput::Velocity => {
                let t: Vec<f64> = s.iter().map(|&s| s * schedule.t_max()).collect();
                let v = self
                    .model
                    .compute()?
                    .forward(x_line, &per_sample(&t, device)?, cond)?;
                x_line - (v * expand_like(&per_sample(s, device)?, x_line)?)?
            }
            StudentOutput::Native => {
                // The schedule sample with the same signal-to-noise ratio as the line point:
                // alpha/sigma = (1 - s)/s, and x_t = x_line * sigma / s = x_line * alpha / (1 - s).
                let mut t = Vec::with_capacity(s.len());
                let mut scale = Vec::with_capacity(s.len());
                for &s in s {
                    let ts = schedule.timestep_for_alpha_over_sigma((1.0 - s) / s);
                    let (alpha, sigma) = schedule.alpha_sigma_f64(ts);
                    t.push(ts);
                    scale.push(if s >= 0.5 {
                        sigma / s
                    } else {
                        alpha / (1.0 - s)
                    });
                }
                let t = per_sample(&t, device)?;
                let x_t = (x_line * expand_like(&per_sample(&scale, device)?, x_line)?)?;
                let prediction = self.model.compute()?.forward(&x_t, &t, cond)?;
                Ok(schedule.to_x0_eps(&prediction, &x_t, &t)?.0)
            }
        }
    }

    fn x0_at_step(&self, x_line: &Tensor, step: usize, cond: &Condition) -> Result<Tensor> {
        self.x0_from_line(x_line, &vec![self.steps[step]; x_line.dim(0)?], cond)
    }

    /// Runs steps `0..=last` from `noise`; between steps the x0 estimate is re-noised to the
    /// next line time with fresh noise (DMD2's multi-step sampler). Steps before `last` run
    /// without gradient.
    fn run_to(
        &self,
        noise: &Tensor,
        cond: &Condition,
        last: usize,
        rng: &mut StdRng,
    ) -> Result<Tensor> {
        let mut x = noise.clone();
        for step in 0..last {
            let x0 = self.x0_at_step(&x, step, cond)?.detach();
            let fresh = adm_nn::randn(rng, x0.shape(), x0.device())?;
            x = line_point(&x0, &fresh, &vec![self.steps[step + 1]; x0.dim(0)?])?;
        }
        self.x0_at_step(&x, last, cond)
    }

    /// A detached sample through all steps.
    pub fn sample(&self, noise: &Tensor, cond: &Condition, rng: &mut StdRng) -> Result<Tensor> {
        Ok(self
            .run_to(noise, cond, self.steps.len() - 1, rng)?
            .detach())
    }

    /// A training output with gradient: one step chosen uniformly, reached by running the
    /// student without gradient from noise ("backward simulation", DMD2).
    pub fn training_output(
        &self,
        noise: &Tensor,
        cond: &Condition,
        rng: &mut StdRng,
    ) -> Result<Tensor> {
        let last = rand::Rng::random_range(rng, 0..self.steps.len());
        self.run_to(noise, cond, last, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Video latents (B, F, C, H, W): the per-sample line time broadcasts over all four
    /// trailing dims.
    #[test]
    fn line_points_of_video_latents() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f32, 1.0, (2, 3, 4, 2, 2), &dev)?;
        let noise = Tensor::randn(0f32, 1.0, (2, 3, 4, 2, 2), &dev)?;
        let s = [0.25, 1.0];
        let x = line_point(&x0, &noise, &s)?;
        assert_eq!(x.dims(), x0.dims());
        for (i, &si) in s.iter().enumerate() {
            let want = ((x0.get(i)? * (1.0 - si))? + (noise.get(i)? * si)?)?;
            let err = (x.get(i)? - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-6, "sample {i}: {err}");
        }
        let expanded = expand_like(&Tensor::new(&[3f32, 5.0], &dev)?, &x0)?;
        assert_eq!(expanded.dims(), x0.dims());
        assert_eq!(
            expanded.get(1)?.flatten_all()?.min(0)?.to_scalar::<f32>()?,
            5.0
        );
        Ok(())
    }
}
