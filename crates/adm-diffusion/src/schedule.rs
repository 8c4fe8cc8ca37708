//! Noise schedules as data: `x_t = alpha_t x0 + sigma_t eps` for discrete variance-preserving
//! schedules (DDPM/DDIM: SDXL, CogVideoX) and rectified flow (SD3), with the conversions
//! between each model's native prediction and the `(x0, eps)` pair that every sampler and loss
//! in this workspace is written against.
//!
//! Timesteps are continuous, one per sample, `0 = clean`:
//! - VP: `t` in `[0, T - 1]`, `alphas_cumprod` interpolated linearly between integer indices;
//! - flow: `t` in `[0, T]`, `sigma = t / T` (diffusers' SD3 convention, timestep = 1000 sigma).

use candle_core::{bail, DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BetaSchedule {
    /// `betas = linspace(beta_start, beta_end, T)`.
    Linear,
    /// `betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2` (Stable Diffusion).
    #[default]
    ScaledLinear,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VpPrediction {
    /// The model predicts the noise `eps`.
    #[default]
    Epsilon,
    /// The model predicts `v = alpha eps - sigma x0` (diffusers' `v_prediction`).
    V,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ScheduleConfig {
    /// Discrete variance-preserving (DDPM/DDIM) schedule. Defaults = SDXL: 1000 steps,
    /// scaled-linear 0.00085 -> 0.012, epsilon.
    Vp {
        #[serde(default = "default_num_train_timesteps")]
        num_train_timesteps: usize,
        #[serde(default = "default_beta_start")]
        beta_start: f64,
        #[serde(default = "default_beta_end")]
        beta_end: f64,
        #[serde(default)]
        beta_schedule: BetaSchedule,
        #[serde(default)]
        prediction: VpPrediction,
        /// CogVideoX's `snr_shift_scale`: alphas_cumprod / (s + (1 - s) alphas_cumprod), which
        /// divides the SNR by `s`; 1.0 = off.
        #[serde(default = "default_snr_shift_scale")]
        snr_shift_scale: f64,
        /// diffusers' `rescale_betas_zero_snr` (Lin et al. 2023): sqrt(alphas_cumprod) is
        /// shifted and scaled so that the last step is pure noise and the first is unchanged.
        #[serde(default)]
        rescale_betas_zero_snr: bool,
    },
    /// Rectified flow `x_t = (1 - sigma) x0 + sigma eps`, velocity `v = eps - x0` (SD3).
    /// `shift` maps sampling/training unit times u in [0,1] to
    /// `sigma = s u / (1 + (s - 1) u)`.
    Flow {
        #[serde(default = "default_num_train_timesteps")]
        num_train_timesteps: usize,
        #[serde(default = "default_flow_shift")]
        shift: f64,
    },
}

fn default_num_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.00085
}
fn default_beta_end() -> f64 {
    0.012
}
fn default_snr_shift_scale() -> f64 {
    1.0
}
fn default_flow_shift() -> f64 {
    3.0
}

impl ScheduleConfig {
    /// SDXL's DDIM/Euler schedule: scaled-linear 0.00085 -> 0.012, epsilon prediction.
    pub fn sdxl() -> Self {
        Self::Vp {
            num_train_timesteps: default_num_train_timesteps(),
            beta_start: default_beta_start(),
            beta_end: default_beta_end(),
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction: VpPrediction::Epsilon,
            snr_shift_scale: 1.0,
            rescale_betas_zero_snr: false,
        }
    }

    /// SD3 / SD3.5: FlowMatchEulerDiscreteScheduler with `shift = 3.0`.
    pub fn sd3() -> Self {
        Self::Flow {
            num_train_timesteps: default_num_train_timesteps(),
            shift: default_flow_shift(),
        }
    }

    /// CogVideoX-2b's CogVideoXDDIMScheduler as its `scheduler_config.json` sets it (the class
    /// defaults differ: epsilon, no zero-SNR rescale): scaled-linear 0.00085 -> 0.012,
    /// `v_prediction`, `snr_shift_scale = 3.0`, `rescale_betas_zero_snr = true`.
    /// CogVideoX-5b ships the same with `snr_shift_scale = 1.0`.
    pub fn cogvideox() -> Self {
        Self::Vp {
            num_train_timesteps: default_num_train_timesteps(),
            beta_start: default_beta_start(),
            beta_end: default_beta_end(),
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction: VpPrediction::V,
            snr_shift_scale: 3.0,
            rescale_betas_zero_snr: true,
        }
    }

    /// CogVideoX-5b's scheduler: [`Self::cogvideox`] with `snr_shift_scale = 1.0`.
    pub fn cogvideox_5b() -> Self {
        let mut cfg = Self::cogvideox();
        if let Self::Vp {
            snr_shift_scale, ..
        } = &mut cfg
        {
            *snr_shift_scale = 1.0;
        }
        cfg
    }
}

/// A validated schedule with its precomputed tables.
#[derive(Debug, Clone)]
pub struct Schedule {
    config: ScheduleConfig,
    /// VP only (empty for flow): one entry per integer timestep.
    alphas_cumprod: Vec<f64>,
}

impl Schedule {
    pub fn new(cfg: &ScheduleConfig) -> Result<Self> {
        let alphas_cumprod = match *cfg {
            ScheduleConfig::Vp {
                num_train_timesteps,
                beta_start,
                beta_end,
                beta_schedule,
                snr_shift_scale,
                rescale_betas_zero_snr,
                ..
            } => {
                if num_train_timesteps < 2 {
                    bail!("schedule: num_train_timesteps must be at least 2, got {num_train_timesteps}");
                }
                if !(0.0..1.0).contains(&beta_start) {
                    bail!("schedule: beta_start must be in [0, 1), got {beta_start}");
                }
                if !(beta_start..1.0).contains(&beta_end) {
                    bail!("schedule: beta_end must be in [beta_start = {beta_start}, 1), got {beta_end}");
                }
                if !(snr_shift_scale > 0.0 && snr_shift_scale.is_finite()) {
                    bail!("schedule: snr_shift_scale must be positive, got {snr_shift_scale}");
                }
                if rescale_betas_zero_snr && beta_end == 0.0 {
                    bail!(
                        "schedule: rescale_betas_zero_snr needs beta_end > 0 (all betas are zero)"
                    );
                }
                vp_alphas_cumprod(
                    num_train_timesteps,
                    beta_start,
                    beta_end,
                    beta_schedule,
                    snr_shift_scale,
                    rescale_betas_zero_snr,
                )
            }
            ScheduleConfig::Flow {
                num_train_timesteps,
                shift,
            } => {
                if num_train_timesteps == 0 {
                    bail!("schedule: num_train_timesteps must be at least 1, got 0");
                }
                if !(shift > 0.0 && shift.is_finite()) {
                    bail!("schedule: shift must be positive, got {shift}");
                }
                Vec::new()
            }
        };
        Ok(Self {
            config: cfg.clone(),
            alphas_cumprod,
        })
    }

    pub fn config(&self) -> &ScheduleConfig {
        &self.config
    }

    pub fn num_train_timesteps(&self) -> usize {
        match self.config {
            ScheduleConfig::Vp {
                num_train_timesteps,
                ..
            }
            | ScheduleConfig::Flow {
                num_train_timesteps,
                ..
            } => num_train_timesteps,
        }
    }

    /// The noise end: `T - 1` for VP (the last table index), `T` for flow (sigma = 1).
    pub fn t_max(&self) -> f64 {
        match self.config {
            ScheduleConfig::Vp { .. } => (self.num_train_timesteps() - 1) as f64,
            ScheduleConfig::Flow { .. } => self.num_train_timesteps() as f64,
        }
    }

    /// The ADM flow-step interval `T / divisions` in timestep units (paper: divisions = 64;
    /// flow: 1000 / 64, i.e. 1/64 in sigma). `divisions = 0` gives an infinite step.
    pub fn delta_t(&self, divisions: usize) -> f64 {
        self.num_train_timesteps() as f64 / divisions as f64
    }

    /// `(alpha_t, sigma_t)` on the host; `t` is clamped to `[0, t_max]`.
    pub fn alpha_sigma_f64(&self, t: f64) -> (f64, f64) {
        match self.config {
            ScheduleConfig::Vp { .. } => {
                let alpha_cumprod = self.alpha_cumprod_at(t);
                (alpha_cumprod.sqrt(), (1.0 - alpha_cumprod).sqrt())
            }
            ScheduleConfig::Flow { .. } => {
                let sigma = (t / self.t_max()).clamp(0.0, 1.0);
                (1.0 - sigma, sigma)
            }
        }
    }

    /// Linear interpolation of the VP table between neighbouring integer timesteps.
    fn alpha_cumprod_at(&self, t: f64) -> f64 {
        let table = &self.alphas_cumprod;
        let t = t.clamp(0.0, self.t_max());
        let below = (t.floor() as usize).min(table.len() - 2);
        let frac = t - below as f64;
        table[below] + frac * (table[below + 1] - table[below])
    }

    /// Per-sample `(alpha, sigma)` of shape `(B, 1, ..., 1)` with `rank` dims, broadcastable
    /// against a sample of that rank; same dtype and device as `t`.
    pub fn alpha_sigma(&self, t: &Tensor, rank: usize) -> Result<(Tensor, Tensor)> {
        per_sample_pair(t, rank, t.dtype(), |t| Ok(self.alpha_sigma_f64(t)))
    }

    /// `x_t = alpha_t x0 + sigma_t eps`.
    pub fn add_noise(&self, x0: &Tensor, eps: &Tensor, t: &Tensor) -> Result<Tensor> {
        combine(t, x0, eps, |t| Ok(self.alpha_sigma_f64(t)))
    }

    /// The model's native training target at `t`: eps, v, or the flow velocity `eps - x0`.
    pub fn target(&self, x0: &Tensor, eps: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.from_x0_eps(x0, eps, t)
    }

    /// `(p, q)` with `native prediction = p x0 + q eps`.
    fn native_coefficients(&self, t: f64) -> (f64, f64) {
        match self.config {
            ScheduleConfig::Vp {
                prediction: VpPrediction::Epsilon,
                ..
            } => (0.0, 1.0),
            ScheduleConfig::Vp {
                prediction: VpPrediction::V,
                ..
            } => {
                let (alpha, sigma) = self.alpha_sigma_f64(t);
                (-sigma, alpha)
            }
            ScheduleConfig::Flow { .. } => (-1.0, 1.0),
        }
    }

    /// The inverse of `[x_t; pred] = [[alpha, sigma], [p, q]] [x0; eps]`, as the rows
    /// `x0 = a x_t + b pred` and `eps = c x_t + d pred`.
    fn inverse_coefficients(&self, t: f64) -> Result<[(f64, f64); 2]> {
        let (alpha, sigma) = self.alpha_sigma_f64(t);
        let (p, q) = self.native_coefficients(t);
        let det = alpha * q - sigma * p;
        if det == 0.0 {
            bail!("the epsilon prediction at t = {t} determines no x0: alpha_t = 0 (zero-SNR end)");
        }
        Ok([(q / det, -sigma / det), (-p / det, alpha / det)])
    }

    /// Converts a native prediction at `(x_t, t)` into `(x0_hat, eps_hat)`; differentiable in
    /// `pred` and `x_t`. Errs for epsilon prediction where `alpha_t = 0`.
    pub fn to_x0_eps(&self, pred: &Tensor, x_t: &Tensor, t: &Tensor) -> Result<(Tensor, Tensor)> {
        let x0 = combine(t, x_t, pred, |t| Ok(self.inverse_coefficients(t)?[0]))?;
        let eps = combine(t, x_t, pred, |t| Ok(self.inverse_coefficients(t)?[1]))?;
        Ok((x0, eps))
    }

    /// The native prediction that `(x0, eps)` corresponds to at `t`.
    pub fn from_x0_eps(&self, x0: &Tensor, eps: &Tensor, t: &Tensor) -> Result<Tensor> {
        combine(t, x0, eps, |t| Ok(self.native_coefficients(t)))
    }

    /// One deterministic ODE move to `s` (DDIM / flow Euler): `x_s = alpha_s x0_hat +
    /// sigma_s eps_hat`. `s <= 0` is the final move to clean and gives `x0_hat` (DDIM's
    /// `set_alpha_to_one`: the VP table's entry 0 still carries a little noise). Differentiable.
    pub fn ode_step(&self, x0_hat: &Tensor, eps_hat: &Tensor, s: &Tensor) -> Result<Tensor> {
        combine(s, x0_hat, eps_hat, |s| {
            Ok(if s <= 0.0 {
                (1.0, 0.0)
            } else {
                self.alpha_sigma_f64(s)
            })
        })
    }

    /// Maps a unit time `u` in [0,1] (0 = clean, 1 = noise end) to a timestep:
    /// VP `u * t_max`; flow `1000 * shift(u)` with SD3's shift.
    pub fn timestep_from_unit(&self, u: f64) -> f64 {
        let u = u.clamp(0.0, 1.0);
        match self.config {
            ScheduleConfig::Vp { .. } => u * self.t_max(),
            ScheduleConfig::Flow { shift, .. } => {
                shift * u / (1.0 + (shift - 1.0) * u) * self.t_max()
            }
        }
    }

    /// Descending timesteps of a `steps`-step deterministic sampler, starting at the noise end;
    /// the sampler's last move goes to clean (`t = 0`).
    /// - VP: diffusers DDIM `timestep_spacing = "trailing"`:
    ///   `round(arange(T, 0, -T/steps)) - 1`, e.g. 4 of 1000 -> [999, 749, 499, 249].
    /// - flow: unit times `1, 1 - 1/steps, ..., 1/steps` through the shift, as the sigmas
    ///   `linspace(1, 1/steps, steps)` diffusers' flow pipelines pass to FlowMatchEuler
    ///   (e.g. 4 steps, shift 3 -> sigmas 1.0, 0.9, 0.75, 0.5).
    pub fn sampling_timesteps(&self, steps: usize) -> Result<Vec<f64>> {
        if steps == 0 {
            bail!("sampling steps must be at least 1");
        }
        let fraction = |i: usize| i as f64 / steps as f64;
        match self.config {
            ScheduleConfig::Vp {
                num_train_timesteps,
                ..
            } => {
                if steps > num_train_timesteps {
                    bail!("sampling steps ({steps}) exceed num_train_timesteps ({num_train_timesteps})");
                }
                let n = num_train_timesteps as f64;
                // numpy's round is round-half-to-even.
                Ok((0..steps)
                    .map(|i| (n - fraction(i) * n).round_ties_even() - 1.0)
                    .collect())
            }
            ScheduleConfig::Flow { .. } => Ok((0..steps)
                .map(|i| self.timestep_from_unit(1.0 - fraction(i)))
                .collect()),
        }
    }

    /// The timestep whose `alpha_t / sigma_t` (square root of the SNR) equals `ratio`, clamped to
    /// `[0, t_max]`. Found by bisection: the ratio falls monotonically with `t`.
    pub fn timestep_for_alpha_over_sigma(&self, ratio: f64) -> f64 {
        let alpha_over_sigma = |t: f64| {
            let (alpha, sigma) = self.alpha_sigma_f64(t);
            alpha / sigma
        };
        let (mut low, mut high) = (0.0, self.t_max());
        if ratio >= alpha_over_sigma(low) {
            return low;
        }
        if ratio <= alpha_over_sigma(high) {
            return high;
        }
        // 64 halvings of [0, 1000] reach below the f64 spacing there.
        for _ in 0..64 {
            let mid = 0.5 * (low + high);
            if alpha_over_sigma(mid) > ratio {
                low = mid;
            } else {
                high = mid;
            }
        }
        0.5 * (low + high)
    }
}

fn linspace(start: f64, end: f64, n: usize) -> impl Iterator<Item = f64> {
    (0..n).map(move |i| start + (end - start) * i as f64 / (n - 1) as f64)
}

/// alphas_cumprod as diffusers' CogVideoXDDIMScheduler builds it: betas, cumulative product,
/// SNR shift, then the zero-terminal-SNR rescale (the last two are no-ops for SDXL).
fn vp_alphas_cumprod(
    n: usize,
    beta_start: f64,
    beta_end: f64,
    beta_schedule: BetaSchedule,
    snr_shift_scale: f64,
    rescale_zero_snr: bool,
) -> Vec<f64> {
    let betas: Vec<f64> = match beta_schedule {
        BetaSchedule::Linear => linspace(beta_start, beta_end, n).collect(),
        BetaSchedule::ScaledLinear => linspace(beta_start.sqrt(), beta_end.sqrt(), n)
            .map(|b| b * b)
            .collect(),
    };
    let alphas_cumprod = betas.iter().scan(1.0, |product, beta| {
        *product *= 1.0 - beta;
        Some(*product)
    });
    let shifted: Vec<f64> = alphas_cumprod
        .map(|a| a / (snr_shift_scale + (1.0 - snr_shift_scale) * a))
        .collect();
    if !rescale_zero_snr {
        return shifted;
    }
    // diffusers' rescale_zero_terminal_snr: shift sqrt(alphas_cumprod) so the last is 0, scale
    // so the first is unchanged.
    let first = shifted[0].sqrt();
    let last = shifted[n - 1].sqrt();
    shifted
        .iter()
        .map(|a| ((a.sqrt() - last) * first / (first - last)).powi(2))
        .collect()
}

/// A host vector as a tensor of `shape`, `dtype` and `device`.
pub(crate) fn host_tensor(
    values: Vec<f64>,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    Tensor::from_vec(values, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// Two per-sample coefficients `f(t_i)` as tensors of shape `(B, 1, ..., 1)` with `rank` dims.
/// Built on the host: `t` is a short vector and the schedule tables live there.
fn per_sample_pair(
    t: &Tensor,
    rank: usize,
    dtype: DType,
    f: impl Fn(f64) -> Result<(f64, f64)>,
) -> Result<(Tensor, Tensor)> {
    if t.rank() != 1 {
        bail!("timesteps must have shape (B,), got {:?}", t.dims());
    }
    if rank == 0 {
        bail!("samples need a leading batch dimension (rank >= 1)");
    }
    let times = t.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let mut first = Vec::with_capacity(times.len());
    let mut second = Vec::with_capacity(times.len());
    for &time in &times {
        if !time.is_finite() {
            bail!("timesteps must be finite, got {time}");
        }
        let (a, b) = f(time)?;
        first.push(a);
        second.push(b);
    }
    let mut shape = vec![times.len()];
    shape.resize(rank, 1);
    Ok((
        host_tensor(first, &shape, dtype, t.device())?,
        host_tensor(second, &shape, dtype, t.device())?,
    ))
}

/// `a(t) u + b(t) v` per sample, with `(a, b) = f(t)`; differentiable in `u` and `v`.
fn combine(
    t: &Tensor,
    u: &Tensor,
    v: &Tensor,
    f: impl Fn(f64) -> Result<(f64, f64)>,
) -> Result<Tensor> {
    if u.dims() != v.dims() {
        bail!("sample shapes differ: {:?} vs {:?}", u.dims(), v.dims());
    }
    let (a, b) = per_sample_pair(t, u.rank(), u.dtype(), f)?;
    if a.dim(0)? != u.dim(0)? {
        bail!("{} timesteps for a batch of {}", a.dim(0)?, u.dim(0)?);
    }
    u.broadcast_mul(&a)? + v.broadcast_mul(&b)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use adm_nn::{check_gradients, GradCheck};

    fn schedule(cfg: ScheduleConfig) -> Schedule {
        Schedule::new(&cfg).unwrap()
    }

    fn vp(beta_schedule: BetaSchedule, prediction: VpPrediction) -> ScheduleConfig {
        ScheduleConfig::Vp {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule,
            prediction,
            snr_shift_scale: 1.0,
            rescale_betas_zero_snr: false,
        }
    }

    fn alpha_cumprod(s: &Schedule, t: f64) -> f64 {
        s.alpha_sigma_f64(t).0.powi(2)
    }

    fn times(values: &[f64]) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    fn assert_close(actual: &[f64], expected: &[f64], tol: f64) {
        assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
        for (a, e) in actual.iter().zip(expected) {
            assert!((a - e).abs() <= tol, "{actual:?} vs {expected:?}");
        }
    }

    /// x0, eps of shape (3, 2, 2) in f64 and one timestep per sample.
    fn sample_pair() -> (Tensor, Tensor) {
        let x0 = Tensor::arange(0.0f64, 12.0, &Device::Cpu).unwrap();
        let x0 = x0.affine(0.3, -1.7).unwrap().reshape((3, 2, 2)).unwrap();
        let eps = x0.sin().unwrap().affine(2.0, 0.1).unwrap();
        (x0, eps)
    }

    #[test]
    fn sdxl_alphas_cumprod_endpoints() {
        let s = schedule(ScheduleConfig::sdxl());
        assert!((alpha_cumprod(&s, 0.0) - 0.99915).abs() < 1e-14);
        // Lin et al. 2023 quote sqrt(alphas_cumprod[999]) = 0.068265 for SD's schedule.
        assert!((alpha_cumprod(&s, 999.0) - 0.068265f64.powi(2)).abs() < 1e-7);
        assert!((alpha_cumprod(&s, 999.0) - 0.004660099).abs() < 1e-9);
        assert_eq!(s.t_max(), 999.0);
        assert_eq!(s.num_train_timesteps(), 1000);
    }

    #[test]
    fn scaled_linear_and_linear_betas() {
        let step = 1.0 / 999.0;
        let scaled = schedule(vp(BetaSchedule::ScaledLinear, VpPrediction::Epsilon));
        let beta1 = (0.00085f64.sqrt() + (0.012f64.sqrt() - 0.00085f64.sqrt()) * step).powi(2);
        let expected = (1.0 - 0.00085) * (1.0 - beta1);
        assert!((alpha_cumprod(&scaled, 1.0) - expected).abs() < 1e-15);

        let linear = schedule(vp(BetaSchedule::Linear, VpPrediction::Epsilon));
        let beta1 = 0.00085 + (0.012 - 0.00085) * step;
        let expected = (1.0 - 0.00085) * (1.0 - beta1);
        assert!((alpha_cumprod(&linear, 1.0) - expected).abs() < 1e-15);
        assert!((alpha_cumprod(&linear, 999.0) - 0.0015789629).abs() < 1e-9);
    }

    #[test]
    fn non_integer_timesteps_interpolate_alphas_cumprod() {
        let s = schedule(ScheduleConfig::sdxl());
        let mid = 0.5 * (alpha_cumprod(&s, 0.0) + alpha_cumprod(&s, 1.0));
        assert!((alpha_cumprod(&s, 0.5) - mid).abs() < 1e-15);
        let quarter = 0.75 * alpha_cumprod(&s, 400.0) + 0.25 * alpha_cumprod(&s, 401.0);
        assert!((alpha_cumprod(&s, 400.25) - quarter).abs() < 1e-15);
        // Out of range clamps to the ends.
        assert_eq!(s.alpha_sigma_f64(-3.0), s.alpha_sigma_f64(0.0));
        assert_eq!(s.alpha_sigma_f64(1e6), s.alpha_sigma_f64(999.0));
    }

    #[test]
    fn zero_snr_rescale_ends_in_pure_noise_and_keeps_the_first_step() {
        let plain = schedule(ScheduleConfig::sdxl());
        let mut cfg = ScheduleConfig::sdxl();
        if let ScheduleConfig::Vp {
            rescale_betas_zero_snr,
            ..
        } = &mut cfg
        {
            *rescale_betas_zero_snr = true;
        }
        let rescaled = schedule(cfg);
        assert_eq!(rescaled.alpha_sigma_f64(999.0), (0.0, 1.0));
        assert!((alpha_cumprod(&rescaled, 0.0) - 0.99915).abs() < 1e-14);
        // sqrt(alphas_cumprod) is an affine map of the original one.
        let (a0, at) = (0.99915f64.sqrt(), plain.alpha_sigma_f64(999.0).0);
        let expected = (plain.alpha_sigma_f64(500.0).0 - at) * a0 / (a0 - at);
        assert!((rescaled.alpha_sigma_f64(500.0).0 - expected).abs() < 1e-14);
    }

    #[test]
    fn snr_shift_divides_the_snr() {
        let plain = schedule(ScheduleConfig::sdxl());
        let mut cfg = ScheduleConfig::sdxl();
        if let ScheduleConfig::Vp {
            snr_shift_scale, ..
        } = &mut cfg
        {
            *snr_shift_scale = 3.0;
        }
        let shifted = schedule(cfg);
        let snr = |s: &Schedule, t: f64| {
            let (alpha, sigma) = s.alpha_sigma_f64(t);
            (alpha / sigma).powi(2)
        };
        for t in [0.0, 10.0, 500.0, 999.0] {
            assert!((snr(&shifted, t) * 3.0 / snr(&plain, t) - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn cogvideox_is_zero_snr_v_prediction() {
        let s = schedule(ScheduleConfig::cogvideox());
        assert_eq!(s.alpha_sigma_f64(999.0), (0.0, 1.0));
        // Entry 0: 0.99915 / (3 - 2 * 0.99915), untouched by the rescale.
        let expected = 0.99915 / (3.0 - 2.0 * 0.99915);
        assert!((alpha_cumprod(&s, 0.0) - expected).abs() < 1e-14);
        assert!(matches!(
            s.config(),
            ScheduleConfig::Vp {
                prediction: VpPrediction::V,
                ..
            }
        ));
    }

    #[test]
    fn flow_sigma_and_shift() {
        let s = schedule(ScheduleConfig::sd3());
        assert_eq!(s.t_max(), 1000.0);
        assert_eq!(s.alpha_sigma_f64(250.0), (0.75, 0.25));
        assert_eq!(s.alpha_sigma_f64(0.0), (1.0, 0.0));
        assert!((s.timestep_from_unit(0.5) - 750.0).abs() < 1e-12);
        assert_eq!(s.timestep_from_unit(1.0), 1000.0);
        assert_eq!(s.timestep_from_unit(0.0), 0.0);
        let vp = schedule(ScheduleConfig::sdxl());
        assert_eq!(vp.timestep_from_unit(0.5), 499.5);
    }

    #[test]
    fn delta_t_is_t_over_divisions() {
        assert_eq!(schedule(ScheduleConfig::sd3()).delta_t(64), 15.625);
        assert_eq!(schedule(ScheduleConfig::sdxl()).delta_t(64), 15.625);
        let s = schedule(ScheduleConfig::sd3());
        let (_, sigma) = s.alpha_sigma_f64(500.0 + s.delta_t(64));
        assert!((sigma - (0.5 + 1.0 / 64.0)).abs() < 1e-15);
    }

    #[test]
    fn alpha_sigma_tensors_broadcast_per_sample() {
        let s = schedule(ScheduleConfig::sd3());
        let t = Tensor::new(&[0.0f32, 250.0, 1000.0], &Device::Cpu).unwrap();
        let (alpha, sigma) = s.alpha_sigma(&t, 4).unwrap();
        assert_eq!(alpha.dims(), &[3, 1, 1, 1]);
        assert_eq!(alpha.dtype(), DType::F32);
        assert_eq!(
            alpha.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1.0, 0.75, 0.0]
        );
        assert_eq!(
            sigma.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.0, 0.25, 1.0]
        );
        assert!(s
            .alpha_sigma(&Tensor::new(3.0f32, &Device::Cpu).unwrap(), 2)
            .is_err());
        assert!(s.alpha_sigma(&times(&[f64::NAN]), 2).is_err());
    }

    #[test]
    fn add_noise_is_alpha_x0_plus_sigma_eps() {
        let s = schedule(ScheduleConfig::sd3());
        let x0 = Tensor::new(&[[2.0f64], [2.0]], &Device::Cpu).unwrap();
        let eps = Tensor::new(&[[-1.0f64], [-1.0]], &Device::Cpu).unwrap();
        let x_t = s.add_noise(&x0, &eps, &times(&[250.0, 1000.0])).unwrap();
        assert_eq!(values(&x_t), [0.75 * 2.0 - 0.25, -1.0]);
        // A timestep count that does not match the batch is an error, not a broadcast.
        assert!(s.add_noise(&x0, &eps, &times(&[1.0, 2.0, 3.0])).is_err());
    }

    #[test]
    fn native_predictions_from_x0_eps() {
        let x0 = Tensor::new(&[3.0f64], &Device::Cpu).unwrap();
        let eps = Tensor::new(&[-2.0f64], &Device::Cpu).unwrap();
        let t = times(&[600.0]);
        let eps_model = schedule(ScheduleConfig::sdxl());
        assert_eq!(
            values(&eps_model.from_x0_eps(&x0, &eps, &t).unwrap()),
            [-2.0]
        );
        let v_model = schedule(ScheduleConfig::cogvideox());
        let (alpha, sigma) = v_model.alpha_sigma_f64(600.0);
        let v = values(&v_model.target(&x0, &eps, &t).unwrap());
        assert_close(&v, &[alpha * -2.0 - sigma * 3.0], 1e-15);
        let flow = schedule(ScheduleConfig::sd3());
        assert_eq!(values(&flow.from_x0_eps(&x0, &eps, &t).unwrap()), [-5.0]);
    }

    #[test]
    fn to_x0_eps_inverts_the_target_for_every_parameterisation() {
        let (x0, eps) = sample_pair();
        for cfg in [
            ScheduleConfig::sdxl(),
            vp(BetaSchedule::Linear, VpPrediction::V),
            ScheduleConfig::cogvideox(),
            ScheduleConfig::sd3(),
        ] {
            let s = schedule(cfg);
            let t = times(&[0.0, 400.5, s.t_max()]);
            let x_t = s.add_noise(&x0, &eps, &t).unwrap();
            let target = s.target(&x0, &eps, &t).unwrap();
            let (x0_hat, eps_hat) = s.to_x0_eps(&target, &x_t, &t).unwrap();
            assert_close(&values(&x0_hat), &values(&x0), 1e-12);
            assert_close(&values(&eps_hat), &values(&eps), 1e-12);
            // from_x0_eps inverts to_x0_eps too.
            let again = s.from_x0_eps(&x0_hat, &eps_hat, &t).unwrap();
            assert_close(&values(&again), &values(&target), 1e-12);
        }
    }

    #[test]
    fn epsilon_prediction_at_zero_snr_cannot_give_x0() {
        let mut cfg = ScheduleConfig::sdxl();
        if let ScheduleConfig::Vp {
            rescale_betas_zero_snr,
            ..
        } = &mut cfg
        {
            *rescale_betas_zero_snr = true;
        }
        let s = schedule(cfg);
        let x = Tensor::ones((2, 3), DType::F64, &Device::Cpu).unwrap();
        let err = s.to_x0_eps(&x, &x, &times(&[10.0, 999.0])).unwrap_err();
        assert!(err.to_string().contains("alpha_t = 0"), "{err}");
        assert!(s.to_x0_eps(&x, &x, &times(&[10.0, 998.0])).is_ok());
    }

    #[test]
    fn ode_step_to_clean_returns_x0_and_to_t_returns_x_t() {
        let (x0, eps) = sample_pair();
        for cfg in [ScheduleConfig::sdxl(), ScheduleConfig::sd3()] {
            let s = schedule(cfg);
            let clean = s.ode_step(&x0, &eps, &times(&[0.0, -5.0, 0.0])).unwrap();
            assert_eq!(values(&clean), values(&x0));
            let t = times(&[1.0, 300.0, 999.0]);
            let x_t = s.ode_step(&x0, &eps, &t).unwrap();
            assert_eq!(values(&x_t), values(&s.add_noise(&x0, &eps, &t).unwrap()));
        }
    }

    #[test]
    fn ddim_trailing_timesteps_match_diffusers() {
        let s = schedule(ScheduleConfig::sdxl());
        assert_eq!(s.sampling_timesteps(1).unwrap(), [999.0]);
        assert_eq!(s.sampling_timesteps(3).unwrap(), [999.0, 666.0, 332.0]);
        assert_eq!(
            s.sampling_timesteps(4).unwrap(),
            [999.0, 749.0, 499.0, 249.0]
        );
        // 937.5 and 812.5 round half to even, as numpy does.
        assert_eq!(
            s.sampling_timesteps(16).unwrap()[..6],
            [999.0, 937.0, 874.0, 811.0, 749.0, 687.0]
        );
        assert!(s.sampling_timesteps(0).is_err());
        assert!(s.sampling_timesteps(1001).is_err());
        assert_eq!(s.sampling_timesteps(1000).unwrap().last(), Some(&0.0));
    }

    #[test]
    fn flow_timesteps_are_shifted_sigmas() {
        let s = schedule(ScheduleConfig::sd3());
        assert_close(
            &s.sampling_timesteps(4).unwrap(),
            &[1000.0, 900.0, 750.0, 500.0],
            1e-9,
        );
        let unshifted = schedule(ScheduleConfig::Flow {
            num_train_timesteps: 1000,
            shift: 1.0,
        });
        assert_close(
            &unshifted.sampling_timesteps(4).unwrap(),
            &[1000.0, 750.0, 500.0, 250.0],
            1e-9,
        );
        assert!(s.sampling_timesteps(0).is_err());
    }

    #[test]
    fn timestep_for_alpha_over_sigma_inverts_the_schedule() {
        let flow = schedule(ScheduleConfig::sd3());
        assert!((flow.timestep_for_alpha_over_sigma(1.0) - 500.0).abs() < 1e-9);
        assert!((flow.timestep_for_alpha_over_sigma(3.0) - 250.0).abs() < 1e-9);
        assert_eq!(flow.timestep_for_alpha_over_sigma(f64::INFINITY), 0.0);
        assert_eq!(flow.timestep_for_alpha_over_sigma(0.0), 1000.0);
        for cfg in [ScheduleConfig::sdxl(), ScheduleConfig::cogvideox()] {
            let s = schedule(cfg);
            for t in [3.0, 321.7, 900.25] {
                let (alpha, sigma) = s.alpha_sigma_f64(t);
                assert!((s.timestep_for_alpha_over_sigma(alpha / sigma) - t).abs() < 1e-7);
            }
            assert_eq!(s.timestep_for_alpha_over_sigma(1e9), 0.0);
            assert_eq!(s.timestep_for_alpha_over_sigma(-1.0), 999.0);
        }
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let vp_with = |edit: fn(&mut ScheduleConfig)| {
            let mut cfg = ScheduleConfig::sdxl();
            edit(&mut cfg);
            Schedule::new(&cfg).unwrap_err().to_string()
        };
        let err = vp_with(|c| {
            if let ScheduleConfig::Vp { beta_end, .. } = c {
                *beta_end = 0.0001;
            }
        });
        assert!(err.contains("beta_end"), "{err}");
        let err = vp_with(|c| {
            if let ScheduleConfig::Vp { beta_start, .. } = c {
                *beta_start = -0.1;
            }
        });
        assert!(err.contains("beta_start"), "{err}");
        let err = vp_with(|c| {
            if let ScheduleConfig::Vp {
                snr_shift_scale, ..
            } = c
            {
                *snr_shift_scale = 0.0;
            }
        });
        assert!(err.contains("snr_shift_scale"), "{err}");
        let err = vp_with(|c| {
            if let ScheduleConfig::Vp {
                num_train_timesteps,
                ..
            } = c
            {
                *num_train_timesteps = 1;
            }
        });
        assert!(err.contains("num_train_timesteps"), "{err}");
        for shift in [0.0, -1.0, f64::NAN] {
            let cfg = ScheduleConfig::Flow {
                num_train_timesteps: 1000,
                shift,
            };
            let err = Schedule::new(&cfg).unwrap_err().to_string();
            assert!(err.contains("shift"), "{err}");
        }
        let cfg = ScheduleConfig::Flow {
            num_train_timesteps: 0,
            shift: 3.0,
        };
        assert!(Schedule::new(&cfg).is_err());
    }

    #[test]
    fn toml_configs_with_defaults() {
        let parse = |text: &str| toml::from_str::<ScheduleConfig>(text);
        assert_eq!(parse("kind = \"vp\"").unwrap(), ScheduleConfig::sdxl());
        assert_eq!(parse("kind = \"flow\"").unwrap(), ScheduleConfig::sd3());
        let cog = "kind = \"vp\"\nprediction = \"v\"\nsnr_shift_scale = 3.0\n\
                   rescale_betas_zero_snr = true\nbeta_schedule = \"scaled-linear\"";
        assert_eq!(parse(cog).unwrap(), ScheduleConfig::cogvideox());
        let linear = parse("kind = \"vp\"\nbeta_schedule = \"linear\"\nbeta_end = 0.02").unwrap();
        assert_eq!(
            linear,
            ScheduleConfig::Vp {
                num_train_timesteps: 1000,
                beta_start: 0.00085,
                beta_end: 0.02,
                beta_schedule: BetaSchedule::Linear,
                prediction: VpPrediction::Epsilon,
                snr_shift_scale: 1.0,
                rescale_betas_zero_snr: false,
            }
        );
        assert!(parse("kind = \"vp\"\nbeta_ending = 0.02").is_err());
        assert!(parse("kind = \"flow\"\nbeta_end = 0.02").is_err());
        assert!(parse("kind = \"ddpm\"").is_err());
        let round_trip = toml::to_string(&ScheduleConfig::cogvideox()).unwrap();
        assert_eq!(parse(&round_trip).unwrap(), ScheduleConfig::cogvideox());
    }

    fn gradient_check(f: impl Fn(&[Tensor]) -> Result<Tensor>) {
        let (x0, eps) = sample_pair();
        check_gradients(f, &[x0, eps], GradCheck::default()).unwrap();
    }

    #[test]
    fn conversions_and_steps_have_exact_gradients() {
        let t = times(&[5.0, 400.5, 999.0]);
        let s_times = times(&[0.0, 380.0, 900.0]);
        for cfg in [
            ScheduleConfig::sdxl(),
            ScheduleConfig::cogvideox(),
            ScheduleConfig::sd3(),
        ] {
            let s = schedule(cfg);
            gradient_check(|xs| s.add_noise(&xs[0], &xs[1], &t));
            gradient_check(|xs| s.ode_step(&xs[0], &xs[1], &s_times));
            // Inputs: (prediction, x_t); both outputs enter the projected sum.
            gradient_check(|xs| {
                let (x0_hat, eps_hat) = s.to_x0_eps(&xs[0], &xs[1], &t)?;
                x0_hat + eps_hat.affine(0.7, 0.0)?
            });
        }
    }

    /// Video latents (B, F, C, H, W): every per-sample coefficient broadcasts over four
    /// trailing dims, and the 5B schedule differs from the 2B one only by its SNR shift.
    #[test]
    fn video_latents_and_the_cogvideox_5b_schedule() {
        let mut expected = ScheduleConfig::cogvideox();
        if let ScheduleConfig::Vp {
            snr_shift_scale, ..
        } = &mut expected
        {
            assert_eq!(*snr_shift_scale, 3.0);
            *snr_shift_scale = 1.0;
        }
        assert_eq!(ScheduleConfig::cogvideox_5b(), expected);
        let five_b = schedule(expected);

        let shape = (2, 3, 4, 2, 2);
        let x0 = Tensor::randn(0f64, 1.0, shape, &Device::Cpu).unwrap();
        let eps = Tensor::randn(0f64, 1.0, shape, &Device::Cpu).unwrap();
        let t = times(&[900.0, 30.0]);
        let x_t = five_b.add_noise(&x0, &eps, &t).unwrap();
        assert_eq!(x_t.dims(), &[2, 3, 4, 2, 2]);
        for (i, &time) in [900.0, 30.0].iter().enumerate() {
            let (alpha, sigma) = five_b.alpha_sigma_f64(time);
            let want =
                (x0.get(i).unwrap() * alpha).unwrap() + (eps.get(i).unwrap() * sigma).unwrap();
            assert_close(
                &values(&x_t.get(i).unwrap()),
                &values(&want.unwrap()),
                1e-14,
            );
        }
        let v = five_b.target(&x0, &eps, &t).unwrap();
        let (x0_hat, eps_hat) = five_b.to_x0_eps(&v, &x_t, &t).unwrap();
        assert_close(&values(&x0_hat), &values(&x0), 1e-12);
        assert_close(&values(&eps_hat), &values(&eps), 1e-12);
        let x_s = five_b
            .ode_step(&x0_hat, &eps_hat, &times(&[500.0, 0.0]))
            .unwrap();
        assert_close(
            &values(&x_s.get(1).unwrap()),
            &values(&x0.get(1).unwrap()),
            1e-12,
        );
    }
}
