//! Training-time distributions of noise levels, drawn as unit times `u` in [0,1]
//! (0 = clean, 1 = noise end) and mapped to timesteps by [`Schedule::timestep_from_unit`].

use candle_core::{bail, Result};
use rand::Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::schedule::Schedule;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TimestepDistribution {
    /// `u ~ U(min, max)`.
    Uniform {
        #[serde(default)]
        min: f64,
        #[serde(default = "one")]
        max: f64,
    },
    /// ADP's generator schedule `t = (1 - u^3) T` (arXiv 2507.18569): unit time `1 - u^3`,
    /// `u ~ U(0, 1)`, biased to high noise (mean 3/4).
    Cubic,
    /// `u = sigmoid(n)`, `n ~ N(mean, std)` (SD3's logit-normal training times; defaults 0, 1).
    LogitNormal {
        #[serde(default)]
        mean: f64,
        #[serde(default = "one")]
        std: f64,
    },
}

fn one() -> f64 {
    1.0
}

impl TimestepDistribution {
    /// Errs, naming the field, unless `0 <= min <= max <= 1` (uniform) or `std > 0` with a
    /// finite `mean` (logit-normal).
    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::Uniform { min, max } => {
                if !(0.0..=1.0).contains(&min) {
                    bail!("uniform timesteps: min must be in [0, 1], got {min}");
                }
                if !(min..=1.0).contains(&max) {
                    bail!("uniform timesteps: max must be in [min = {min}, 1], got {max}");
                }
            }
            Self::Cubic => {}
            Self::LogitNormal { mean, std } => {
                if !mean.is_finite() {
                    bail!("logit-normal timesteps: mean must be finite, got {mean}");
                }
                if !(std > 0.0 && std.is_finite()) {
                    bail!("logit-normal timesteps: std must be positive, got {std}");
                }
            }
        }
        Ok(())
    }

    /// `n` unit times in [0,1] (1 = noise end). Call [`Self::validate`] first: an invalid
    /// distribution samples without panicking, but outside its meaning.
    pub fn sample_unit<R: Rng>(&self, n: usize, rng: &mut R) -> Vec<f64> {
        (0..n)
            .map(|_| match *self {
                Self::Uniform { min, max } => min + (max - min) * rng.random::<f64>(),
                Self::Cubic => 1.0 - rng.random::<f64>().powi(3),
                Self::LogitNormal { mean, std } => {
                    let normal: f64 = rng.sample(StandardNormal);
                    1.0 / (1.0 + (-(mean + std * normal)).exp())
                }
            })
            .collect()
    }

    /// `n` timesteps: unit times through [`Schedule::timestep_from_unit`].
    pub fn sample<R: Rng>(&self, schedule: &Schedule, n: usize, rng: &mut R) -> Vec<f64> {
        self.sample_unit(n, rng)
            .into_iter()
            .map(|u| schedule.timestep_from_unit(u))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleConfig;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const N: usize = 100_000;

    fn draw(dist: &TimestepDistribution) -> Vec<f64> {
        dist.validate().unwrap();
        dist.sample_unit(N, &mut StdRng::seed_from_u64(7))
    }

    fn mean(xs: &[f64]) -> f64 {
        xs.iter().sum::<f64>() / xs.len() as f64
    }

    fn fraction_below(xs: &[f64], bound: f64) -> f64 {
        xs.iter().filter(|&&x| x < bound).count() as f64 / xs.len() as f64
    }

    fn in_range(xs: &[f64], low: f64, high: f64) -> bool {
        xs.iter().all(|x| (low..=high).contains(x))
    }

    // Tolerances are about 5 standard errors of a 100k-sample mean or fraction.

    #[test]
    fn uniform_mean_and_range() {
        let us = draw(&TimestepDistribution::Uniform { min: 0.0, max: 1.0 });
        assert!((mean(&us) - 0.5).abs() < 0.005);
        assert!(in_range(&us, 0.0, 1.0));
        let us = draw(&TimestepDistribution::Uniform { min: 0.2, max: 0.6 });
        assert!((mean(&us) - 0.4).abs() < 0.002);
        assert!(in_range(&us, 0.2, 0.6));
    }

    #[test]
    fn cubic_is_biased_to_noise() {
        // E[1 - u^3] = 3/4; P(1 - u^3 < 1/2) = P(u^3 > 1/2) = 1 - 2^(-1/3).
        let us = draw(&TimestepDistribution::Cubic);
        assert!((mean(&us) - 0.75).abs() < 0.005);
        assert!((fraction_below(&us, 0.5) - (1.0 - 0.5f64.powf(1.0 / 3.0))).abs() < 0.007);
        assert!(in_range(&us, 0.0, 1.0));
    }

    #[test]
    fn logit_normal_quantiles() {
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let (mean_logit, std) = (0.5, 0.8);
        let us = draw(&TimestepDistribution::LogitNormal {
            mean: mean_logit,
            std,
        });
        // The median is sigmoid(mean); one std above it lies the normal CDF's Φ(1) = 0.8413.
        assert!((fraction_below(&us, sigmoid(mean_logit)) - 0.5).abs() < 0.008);
        assert!((fraction_below(&us, sigmoid(mean_logit + std)) - 0.8413).abs() < 0.006);
        assert!(in_range(&us, 0.0, 1.0));
        let symmetric = draw(&TimestepDistribution::LogitNormal {
            mean: 0.0,
            std: 1.0,
        });
        assert!((mean(&symmetric) - 0.5).abs() < 0.005);
    }

    #[test]
    fn sample_maps_unit_times_through_the_schedule() {
        let flow = Schedule::new(&ScheduleConfig::sd3()).unwrap();
        let fixed = TimestepDistribution::Uniform { min: 0.5, max: 0.5 };
        let mut rng = StdRng::seed_from_u64(0);
        for t in fixed.sample(&flow, 5, &mut rng) {
            assert!((t - 750.0).abs() < 1e-9);
        }
        let vp = Schedule::new(&ScheduleConfig::sdxl()).unwrap();
        let ts = TimestepDistribution::Cubic.sample(&vp, 1000, &mut rng);
        assert_eq!(ts.len(), 1000);
        assert!(in_range(&ts, 0.0, 999.0));
    }

    #[test]
    fn validate_rejects_bad_fields() {
        let message = |dist: TimestepDistribution| dist.validate().unwrap_err().to_string();
        assert!(message(TimestepDistribution::Uniform { min: 0.7, max: 0.3 }).contains("max"));
        assert!(message(TimestepDistribution::Uniform {
            min: -0.1,
            max: 0.3
        })
        .contains("min"));
        assert!(message(TimestepDistribution::Uniform { min: 0.0, max: 1.5 }).contains("max"));
        for std in [0.0, -1.0, f64::NAN] {
            let dist = TimestepDistribution::LogitNormal { mean: 0.0, std };
            assert!(message(dist).contains("std"));
        }
        let dist = TimestepDistribution::LogitNormal {
            mean: f64::INFINITY,
            std: 1.0,
        };
        assert!(message(dist).contains("mean"));
        assert!(TimestepDistribution::Cubic.validate().is_ok());
    }

    #[test]
    fn toml_forms() {
        let parse = |text: &str| toml::from_str::<TimestepDistribution>(text);
        assert_eq!(
            parse("kind = \"cubic\"").unwrap(),
            TimestepDistribution::Cubic
        );
        assert_eq!(
            parse("kind = \"uniform\"").unwrap(),
            TimestepDistribution::Uniform { min: 0.0, max: 1.0 }
        );
        assert_eq!(
            parse("kind = \"uniform\"\nmin = 0.02\nmax = 0.98").unwrap(),
            TimestepDistribution::Uniform {
                min: 0.02,
                max: 0.98
            }
        );
        assert_eq!(
            parse("kind = \"logit-normal\"\nstd = 0.5").unwrap(),
            TimestepDistribution::LogitNormal {
                mean: 0.0,
                std: 0.5
            }
        );
        assert!(parse("kind = \"uniform\"\nmaximum = 0.9").is_err());
        assert!(parse("kind = \"normal\"").is_err());
    }
}
