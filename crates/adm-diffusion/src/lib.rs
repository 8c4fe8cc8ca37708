//! Diffusion schedules as data (discrete VP with epsilon or v prediction, rectified flow with
//! SD3's shift), conversions between native predictions and `(x0, eps)`, the deterministic ODE
//! step, the multi-step sampler with classifier-free guidance, and training-time timestep
//! distributions.
//!
//! Every timestep is a continuous per-sample value with `0 = clean`; see [`schedule`].

pub mod sampler;
pub mod schedule;
pub mod timesteps;

pub use sampler::{cfg_combine, sample_ode};
pub use schedule::{BetaSchedule, Schedule, ScheduleConfig, VpPrediction};
pub use timesteps::TimestepDistribution;
