//! Losses for adversarial distribution matching (ADM / DMDX, arXiv 2507.18569) and its
//! baselines (DMD2, arXiv 2405.14622), as pure functions of tensors.
//!
//! - [`gan`]: hinge discriminator / generator losses and the ADP hybrid (latent + pixel) mix.
//! - [`dmd`]: the DMD2 distribution-matching loss.
//! - [`regression`]: MSE and the fake-score denoising loss.
//! - [`adm`]: the ADM flow step `x_t → x_s` and the losses built on it.
//!
//! Every loss returns a scalar tensor; shape mismatches are errors that name the argument.

pub mod adm;
pub mod dmd;
pub mod gan;
pub mod regression;

pub use adm::{adm_discriminator, adm_generator, flow_sample};
pub use dmd::{dmd, dmd_gradient};
pub use gan::{adp_discriminator, adp_generator, hinge_discriminator, hinge_generator};
pub use regression::{denoising, mse};

use candle_core::{Error, Result, Tensor};

/// Errors unless `a` and `b` have exactly the same shape (no broadcasting).
fn ensure_same_shape(
    function: &str,
    a_name: &str,
    a: &Tensor,
    b_name: &str,
    b: &Tensor,
) -> Result<()> {
    if a.shape() == b.shape() {
        Ok(())
    } else {
        Err(Error::Msg(format!(
            "{function}: `{b_name}` has shape {:?} but `{a_name}` has shape {:?}",
            b.dims(),
            a.dims()
        )))
    }
}

/// Errors when `t` has no elements (its mean would silently be NaN).
fn ensure_non_empty(function: &str, name: &str, t: &Tensor) -> Result<()> {
    if t.elem_count() == 0 {
        Err(Error::Msg(format!(
            "{function}: `{name}` is empty (shape {:?})",
            t.dims()
        )))
    } else {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use adm_diffusion::{Schedule, ScheduleConfig};
    use candle_core::{Device, Result, Tensor};

    /// The three schedule families of the recipes: VP-ε (SDXL), rectified flow (SD3),
    /// zero-terminal-SNR VP-v (CogVideoX).
    pub fn schedules() -> Result<Vec<(&'static str, Schedule)>> {
        Ok(vec![
            ("sdxl", Schedule::new(&ScheduleConfig::sdxl())?),
            ("sd3", Schedule::new(&ScheduleConfig::sd3())?),
            ("cogvideox", Schedule::new(&ScheduleConfig::cogvideox())?),
        ])
    }

    /// A deterministic f64 sample of shape (3, 2, 2); different `phase`s give different tensors.
    pub fn sample(phase: f64) -> Result<Tensor> {
        Tensor::arange(0f64, 12.0, &Device::Cpu)?
            .affine(0.37, phase)?
            .sin()?
            .affine(1.3, 0.0)?
            .reshape((3, 2, 2))
    }

    /// Per-sample `t` at unit times [1 (the noise end), 0.45, 0.2] and the ADM step target
    /// `s = t - T/64`, both of shape (3,).
    pub fn timesteps(schedule: &Schedule) -> Result<(Tensor, Tensor)> {
        let t: Vec<f64> = [1.0, 0.45, 0.2]
            .iter()
            .map(|&u| schedule.timestep_from_unit(u))
            .collect();
        let s: Vec<f64> = t.iter().map(|t| t - schedule.delta_t(64)).collect();
        Ok((
            Tensor::new(t.as_slice(), &Device::Cpu)?,
            Tensor::new(s.as_slice(), &Device::Cpu)?,
        ))
    }
}
