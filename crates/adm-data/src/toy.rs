//! 2D Gaussian mixtures: the toy data set on which every stage runs on a CPU in seconds.
//!
//! Modes sit on a ring or a centred grid; each mode has the same isotropic std and an
//! optional weight, and mode `i` belongs to class `i % num_classes`, so a class-conditional
//! model has a known target distribution p(x | class) to be compared against.

use candle_core::{Device, Tensor};
use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution;
use rand::Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::DataError;

/// Where the mixture's modes sit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum MixtureLayout {
    /// `modes` points evenly spaced on a circle of `radius`, mode 0 on the positive x axis.
    Ring { modes: usize, radius: f64 },
    /// A `rows x cols` grid centred at the origin; mode `r * cols + c` sits at
    /// `((c - (cols-1)/2) * spacing, (r - (rows-1)/2) * spacing)`.
    Grid {
        rows: usize,
        cols: usize,
        spacing: f64,
    },
}

/// A Gaussian mixture as written in a config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixtureConfig {
    pub layout: MixtureLayout,
    /// Per-mode isotropic standard deviation.
    pub std: f64,
    /// Unnormalised mode weights; `None` means uniform. Length must equal the number of modes.
    #[serde(default)]
    pub weights: Option<Vec<f64>>,
    /// Mode `i` belongs to class `i % num_classes`.
    pub num_classes: usize,
}

/// A validated mixture, ready to sample from.
#[derive(Debug, Clone)]
pub struct GaussianMixture {
    means: Vec<[f64; 2]>,
    weights: Vec<f64>,
    std: f64,
    num_classes: usize,
    mode_sampler: WeightedIndex<f64>,
    /// Per class: its modes and a sampler over them, for class-conditional sampling.
    class_samplers: Vec<(Vec<usize>, WeightedIndex<f64>)>,
}

/// Points drawn from a mixture with the class and mode each came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ToySamples {
    pub points: Vec<[f32; 2]>,
    pub classes: Vec<u32>,
    pub modes: Vec<usize>,
}

fn positive_finite(field: &str, value: f64) -> Result<(), DataError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(DataError::invalid(
            field,
            format!("must be positive and finite, got {value}"),
        ))
    }
}

fn mode_means(layout: &MixtureLayout) -> Result<Vec<[f64; 2]>, DataError> {
    let means: Vec<[f64; 2]> = match *layout {
        MixtureLayout::Ring { modes, radius } => {
            positive_finite("mixture.layout.radius", radius)?;
            (0..modes)
                .map(|i| {
                    let angle = std::f64::consts::TAU * i as f64 / modes as f64;
                    [radius * angle.cos(), radius * angle.sin()]
                })
                .collect()
        }
        MixtureLayout::Grid {
            rows,
            cols,
            spacing,
        } => {
            positive_finite("mixture.layout.spacing", spacing)?;
            let centre = |i: usize, n: usize| (i as f64 - (n as f64 - 1.0) / 2.0) * spacing;
            (0..rows * cols)
                .map(|i| [centre(i % cols, cols), centre(i / cols, rows)])
                .collect()
        }
    };
    if means.is_empty() {
        return Err(DataError::invalid(
            "mixture.layout",
            "the layout has no modes",
        ));
    }
    Ok(means)
}

fn normalised_weights(weights: Option<&[f64]>, num_modes: usize) -> Result<Vec<f64>, DataError> {
    let Some(weights) = weights else {
        return Ok(vec![1.0 / num_modes as f64; num_modes]);
    };
    if weights.len() != num_modes {
        return Err(DataError::invalid(
            "mixture.weights",
            format!("expected {num_modes} weights, got {}", weights.len()),
        ));
    }
    if let Some((i, w)) = weights
        .iter()
        .enumerate()
        .find(|(_, w)| !(w.is_finite() && **w > 0.0))
    {
        return Err(DataError::invalid(
            format!("mixture.weights[{i}]"),
            format!("must be positive and finite, got {w}"),
        ));
    }
    let total: f64 = weights.iter().sum();
    if !total.is_finite() {
        return Err(DataError::invalid("mixture.weights", "sum overflows"));
    }
    Ok(weights.iter().map(|w| w / total).collect())
}

fn weighted_sampler(weights: &[f64]) -> Result<WeightedIndex<f64>, DataError> {
    WeightedIndex::new(weights).map_err(|e| DataError::invalid("mixture.weights", e.to_string()))
}

impl GaussianMixture {
    pub fn new(cfg: &MixtureConfig) -> Result<Self, DataError> {
        let means = mode_means(&cfg.layout)?;
        positive_finite("mixture.std", cfg.std)?;
        let weights = normalised_weights(cfg.weights.as_deref(), means.len())?;
        if cfg.num_classes == 0 || cfg.num_classes > means.len() {
            return Err(DataError::invalid(
                "mixture.num_classes",
                format!(
                    "must be between 1 and the number of modes ({}), got {}",
                    means.len(),
                    cfg.num_classes
                ),
            ));
        }
        let class_samplers = (0..cfg.num_classes)
            .map(|class| {
                let modes: Vec<usize> = (class..means.len()).step_by(cfg.num_classes).collect();
                let class_weights: Vec<f64> = modes.iter().map(|&m| weights[m]).collect();
                Ok((modes, weighted_sampler(&class_weights)?))
            })
            .collect::<Result<_, DataError>>()?;
        Ok(Self {
            mode_sampler: weighted_sampler(&weights)?,
            means,
            weights,
            std: cfg.std,
            num_classes: cfg.num_classes,
            class_samplers,
        })
    }

    pub fn means(&self) -> &[[f64; 2]] {
        &self.means
    }

    /// Normalised mode weights (they sum to 1).
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    pub fn std(&self) -> f64 {
        self.std
    }

    pub fn num_modes(&self) -> usize {
        self.means.len()
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    pub fn class_of_mode(&self, mode: usize) -> usize {
        mode % self.num_classes
    }

    /// Weight of each mode within its class (conditional distribution p(mode | class)), as
    /// `(mode, weight)` pairs summing to 1. Empty for a class out of range.
    pub fn mode_weights_given_class(&self, class: usize) -> Vec<(usize, f64)> {
        let Some((modes, _)) = self.class_samplers.get(class) else {
            return Vec::new();
        };
        let class_total: f64 = modes.iter().map(|&m| self.weights[m]).sum();
        modes
            .iter()
            .map(|&m| (m, self.weights[m] / class_total))
            .collect()
    }

    /// `n` samples from the whole mixture.
    pub fn sample<R: Rng>(&self, n: usize, rng: &mut R) -> ToySamples {
        let modes: Vec<usize> = (0..n).map(|_| self.mode_sampler.sample(rng)).collect();
        self.points_for_modes(modes, rng)
    }

    /// One sample per requested class, drawn from p(x | class).
    /// Errors (naming `classes[i]`) when a class id is out of range.
    pub fn sample_for_classes<R: Rng>(
        &self,
        classes: &[u32],
        rng: &mut R,
    ) -> Result<ToySamples, DataError> {
        let modes = classes
            .iter()
            .enumerate()
            .map(|(i, &class)| {
                let (modes, sampler) =
                    self.class_samplers.get(class as usize).ok_or_else(|| {
                        DataError::invalid(
                            format!("classes[{i}]"),
                            format!(
                                "class {class} out of range (num_classes = {})",
                                self.num_classes
                            ),
                        )
                    })?;
                Ok(modes[sampler.sample(rng)])
            })
            .collect::<Result<Vec<_>, DataError>>()?;
        Ok(self.points_for_modes(modes, rng))
    }

    fn points_for_modes<R: Rng>(&self, modes: Vec<usize>, rng: &mut R) -> ToySamples {
        let points = modes
            .iter()
            .map(|&m| {
                let [mx, my] = self.means[m];
                let dx: f64 = rng.sample(StandardNormal);
                let dy: f64 = rng.sample(StandardNormal);
                [(mx + self.std * dx) as f32, (my + self.std * dy) as f32]
            })
            .collect();
        let classes = modes
            .iter()
            .map(|&m| self.class_of_mode(m) as u32)
            .collect();
        ToySamples {
            points,
            classes,
            modes,
        }
    }

    /// Nearest mode and the distance to it in units of std.
    pub fn nearest_mode(&self, p: [f32; 2]) -> (usize, f64) {
        let (px, py) = (f64::from(p[0]), f64::from(p[1]));
        self.means
            .iter()
            .map(|[mx, my]| (mx - px).hypot(my - py) / self.std)
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, f64::INFINITY)) // unreachable: `new` rejects mixtures without modes
    }
}

impl ToySamples {
    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The points as an `(n, 2)` f32 tensor.
    pub fn points_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        let flat: Vec<f32> = self.points.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (self.points.len(), 2), device)
    }

    /// The class ids as an `(n,)` u32 tensor.
    pub fn classes_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.classes, self.classes.len(), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn ring(modes: usize, num_classes: usize, weights: Option<Vec<f64>>) -> MixtureConfig {
        MixtureConfig {
            layout: MixtureLayout::Ring { modes, radius: 2.0 },
            std: 0.05,
            weights,
            num_classes,
        }
    }

    fn assert_close(a: [f64; 2], b: [f64; 2]) {
        assert!(
            (a[0] - b[0]).abs() < 1e-12 && (a[1] - b[1]).abs() < 1e-12,
            "{a:?} vs {b:?}"
        );
    }

    fn invalid_field(cfg: &MixtureConfig) -> String {
        match GaussianMixture::new(cfg) {
            Err(DataError::Invalid { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn ring_modes_are_evenly_spaced_on_the_circle() {
        let mix = GaussianMixture::new(&ring(4, 2, None)).unwrap();
        assert_eq!(mix.num_modes(), 4);
        assert_close(mix.means()[0], [2.0, 0.0]);
        assert_close(mix.means()[1], [0.0, 2.0]);
        assert_close(mix.means()[2], [-2.0, 0.0]);
        assert_close(mix.means()[3], [0.0, -2.0]);
    }

    #[test]
    fn grid_modes_are_centred_at_the_origin() {
        let cfg = MixtureConfig {
            layout: MixtureLayout::Grid {
                rows: 2,
                cols: 3,
                spacing: 1.5,
            },
            std: 0.1,
            weights: None,
            num_classes: 3,
        };
        let mix = GaussianMixture::new(&cfg).unwrap();
        assert_eq!(mix.num_modes(), 6);
        assert_close(mix.means()[0], [-1.5, -0.75]);
        assert_close(mix.means()[1], [0.0, -0.75]);
        assert_close(mix.means()[5], [1.5, 0.75]);
        let centroid = mix
            .means()
            .iter()
            .fold([0.0, 0.0], |acc, m| [acc[0] + m[0], acc[1] + m[1]]);
        assert_close(centroid, [0.0, 0.0]);
    }

    #[test]
    fn weights_are_normalised() {
        let mix = GaussianMixture::new(&ring(4, 1, Some(vec![1.0, 2.0, 3.0, 4.0]))).unwrap();
        assert_eq!(mix.weights(), &[0.1, 0.2, 0.3, 0.4]);
        let uniform = GaussianMixture::new(&ring(5, 1, None)).unwrap();
        assert!(uniform.weights().iter().all(|&w| (w - 0.2).abs() < 1e-15));
    }

    #[test]
    fn empirical_mode_frequencies_match_weights() {
        let mix = GaussianMixture::new(&ring(4, 2, Some(vec![1.0, 2.0, 3.0, 4.0]))).unwrap();
        let n = 40_000;
        let samples = mix.sample(n, &mut StdRng::seed_from_u64(7));
        assert_eq!(samples.len(), n);
        let mut counts = [0usize; 4];
        for &m in &samples.modes {
            counts[m] += 1;
        }
        for (count, weight) in counts.iter().zip(mix.weights()) {
            // 4 binomial standard deviations at n = 40k is below 0.01.
            assert!(
                (*count as f64 / n as f64 - weight).abs() < 0.01,
                "{counts:?}"
            );
        }
        // Each point lies near the mode it was drawn from.
        for (p, &m) in samples.points.iter().zip(&samples.modes) {
            assert_eq!(mix.nearest_mode(*p).0, m);
        }
    }

    #[test]
    fn classes_follow_modes_and_class_sampling_stays_in_class() {
        let mix =
            GaussianMixture::new(&ring(6, 3, Some(vec![1.0, 1.0, 1.0, 3.0, 1.0, 1.0]))).unwrap();
        assert_eq!(mix.class_of_mode(4), 1);
        assert_eq!(mix.mode_weights_given_class(0), vec![(0, 0.25), (3, 0.75)]);
        assert!(mix.mode_weights_given_class(3).is_empty());

        let mut rng = StdRng::seed_from_u64(3);
        let samples = mix.sample(500, &mut rng);
        for (&class, &mode) in samples.classes.iter().zip(&samples.modes) {
            assert_eq!(class as usize, mix.class_of_mode(mode));
        }
        let requested: Vec<u32> = (0..600).map(|i| i % 3).collect();
        let samples = mix.sample_for_classes(&requested, &mut rng).unwrap();
        assert_eq!(samples.classes, requested);
        let class0_mode3 = samples
            .modes
            .iter()
            .zip(&requested)
            .filter(|(_, &c)| c == 0)
            .filter(|(&m, _)| m == 3)
            .count();
        assert!((class0_mode3 as f64 / 200.0 - 0.75).abs() < 0.1);
        match mix.sample_for_classes(&[0, 5], &mut rng) {
            Err(DataError::Invalid { field, .. }) => assert_eq!(field, "classes[1]"),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn nearest_mode_reports_distance_in_stds() {
        let mix = GaussianMixture::new(&ring(4, 1, None)).unwrap();
        let (mode, distance) = mix.nearest_mode([0.0, 2.1]);
        assert_eq!(mode, 1);
        assert!((distance - 2.0).abs() < 1e-5, "{distance}");
    }

    #[test]
    fn tensors_have_the_documented_shapes() {
        let mix = GaussianMixture::new(&ring(4, 2, None)).unwrap();
        let samples = mix.sample(5, &mut StdRng::seed_from_u64(0));
        let points = samples.points_tensor(&Device::Cpu).unwrap();
        assert_eq!(points.dims(), &[5, 2]);
        assert_eq!(points.to_vec2::<f32>().unwrap()[2], samples.points[2]);
        let classes = samples.classes_tensor(&Device::Cpu).unwrap();
        assert_eq!(classes.to_vec1::<u32>().unwrap(), samples.classes);
    }

    #[test]
    fn validation_errors_name_the_field() {
        let mut cfg = ring(8, 2, Some(vec![1.0; 5]));
        let err = GaussianMixture::new(&cfg).unwrap_err().to_string();
        assert_eq!(err, "mixture.weights: expected 8 weights, got 5");
        cfg.weights = Some(vec![1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(invalid_field(&cfg), "mixture.weights[2]");
        cfg.weights = Some(vec![1.0, f64::NAN, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(invalid_field(&cfg), "mixture.weights[1]");
        assert_eq!(invalid_field(&ring(0, 1, None)), "mixture.layout");
        assert_eq!(invalid_field(&ring(4, 0, None)), "mixture.num_classes");
        assert_eq!(invalid_field(&ring(4, 5, None)), "mixture.num_classes");
        let mut bad_std = ring(4, 1, None);
        bad_std.std = 0.0;
        assert_eq!(invalid_field(&bad_std), "mixture.std");
        let mut bad_radius = ring(4, 1, None);
        bad_radius.layout = MixtureLayout::Ring {
            modes: 4,
            radius: f64::INFINITY,
        };
        assert_eq!(invalid_field(&bad_radius), "mixture.layout.radius");
    }

    #[test]
    fn config_parses_from_toml_and_rejects_unknown_keys() {
        let text = r#"
            std = 0.05
            num_classes = 2
            weights = [1.0, 2.0, 1.0, 2.0]
            [layout]
            kind = "ring"
            modes = 4
            radius = 2.0
        "#;
        let cfg: MixtureConfig = toml::from_str(text).unwrap();
        assert_eq!(cfg, ring(4, 2, Some(vec![1.0, 2.0, 1.0, 2.0])));

        let grid: MixtureConfig = toml::from_str(
            "std = 0.1\nnum_classes = 1\nlayout = { kind = \"grid\", rows = 3, cols = 3, spacing = 1.0 }",
        )
        .unwrap();
        assert_eq!(grid.weights, None);
        assert_eq!(GaussianMixture::new(&grid).unwrap().num_modes(), 9);

        let unknown_top = toml::from_str::<MixtureConfig>(&format!("{text}\nstdev = 1.0"));
        assert!(unknown_top.unwrap_err().to_string().contains("stdev"));
        let unknown_layout = toml::from_str::<MixtureConfig>(
            "std = 0.1\nnum_classes = 1\nlayout = { kind = \"ring\", modes = 3, radius = 1.0, angle = 2.0 }",
        );
        assert!(unknown_layout.unwrap_err().to_string().contains("angle"));
    }
}
