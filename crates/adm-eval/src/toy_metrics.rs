//! Metrics for the 2D Gaussian-mixture toy: which modes a sample set covers, how many
//! samples are on-distribution, how well the mode weights match the teacher's, and two
//! sample-based distances (energy distance, RBF-kernel MMD).

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

/// A sample counts as "high quality" (and enters the mode histograms) when it lies within
/// this many standard deviations of its nearest mode.
pub const HIGH_QUALITY_RADIUS_STD: f64 = 3.0;

/// A mode counts as covered when it holds at least this fraction of its teacher share.
pub const DEFAULT_COVERAGE_FRACTION: f64 = 0.2;

/// The distances subsample each set to at most this many points (the double loops are
/// quadratic).
pub const MAX_DISTANCE_SAMPLES: usize = 2000;

/// The mixture's mode means and their shared, isotropic standard deviation.
#[derive(Debug, Clone, PartialEq)]
pub struct ModeSet {
    pub means: Vec<[f64; 2]>,
    pub std: f64,
}

impl ModeSet {
    pub fn new(means: Vec<[f64; 2]>, std: f64) -> Result<Self> {
        let modes = Self { means, std };
        modes.validate()?;
        Ok(modes)
    }

    /// Errors unless there is at least one finite mean and `std` is finite and positive.
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.means.is_empty(), "mode set has no modes");
        ensure!(
            self.std.is_finite() && self.std > 0.0,
            "mode set std must be finite and positive, got {}",
            self.std
        );
        if let Some(index) = self
            .means
            .iter()
            .position(|m| !m.iter().all(|v| v.is_finite()))
        {
            bail!(
                "mode set mean {index} is not finite: {:?}",
                self.means[index]
            );
        }
        Ok(())
    }

    pub fn num_modes(&self) -> usize {
        self.means.len()
    }

    /// The nearest mode and the distance to it in units of `std`; `None` when there are no
    /// modes or the point is not finite.
    pub fn nearest(&self, point: [f32; 2]) -> Option<(usize, f64)> {
        if !point.iter().all(|v| v.is_finite()) {
            return None;
        }
        let [x, y] = point.map(f64::from);
        self.means
            .iter()
            .map(|[mx, my]| (x - mx).hypot(y - my))
            .enumerate()
            .min_by(|(_, a), (_, b)| a.total_cmp(b))
            .map(|(mode, distance)| (mode, distance / self.std))
    }

    /// The mode a sample belongs to, if it lies within [`HIGH_QUALITY_RADIUS_STD`] of it.
    fn high_quality_mode(&self, point: [f32; 2]) -> Option<usize> {
        self.nearest(point)
            .filter(|&(_, distance)| distance <= HIGH_QUALITY_RADIUS_STD)
            .map(|(mode, _)| mode)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ToyMetrics {
    /// Modes holding at least the coverage fraction of their teacher share of all samples
    /// and at least one high-quality sample.
    pub modes_covered: usize,
    pub num_modes: usize,
    /// Fraction of samples within [`HIGH_QUALITY_RADIUS_STD`] of some mode.
    pub high_quality_fraction: f64,
    /// Total variation distance between the student and teacher mode histograms (only
    /// high-quality samples counted); 1.0 when no student sample is high quality.
    pub mode_weight_error: f64,
    /// [`energy_distance`] between the student and teacher samples.
    pub energy_distance: f64,
}

impl ToyMetrics {
    /// Column headers matching [`ToyMetrics::table_cells`] (without the row-label column).
    pub fn table_headers() -> Vec<String> {
        ["modes", "high quality", "weight TV", "energy dist"]
            .map(String::from)
            .to_vec()
    }

    /// The metrics formatted as table cells: coverage as "covered/total", the rest to 3
    /// decimals.
    pub fn table_cells(&self) -> Vec<String> {
        vec![
            crate::format_count(self.modes_covered, self.num_modes),
            crate::format_metric(self.high_quality_fraction),
            crate::format_metric(self.mode_weight_error),
            crate::format_metric(self.energy_distance),
        ]
    }
}

/// [`toy_metrics_with_coverage`] with [`DEFAULT_COVERAGE_FRACTION`].
pub fn toy_metrics(
    modes: &ModeSet,
    samples: &[[f32; 2]],
    teacher: &[[f32; 2]],
) -> Result<ToyMetrics> {
    toy_metrics_with_coverage(modes, samples, teacher, DEFAULT_COVERAGE_FRACTION)
}

/// Scores student `samples` against `teacher` samples of the mixture `modes`. The teacher
/// share of a mode is its fraction of the high-quality teacher samples. Errors on an invalid
/// mode set, empty or non-finite sample sets, a coverage fraction outside [0, 1], or a
/// teacher set with no high-quality sample (which means the modes do not fit the teacher).
pub fn toy_metrics_with_coverage(
    modes: &ModeSet,
    samples: &[[f32; 2]],
    teacher: &[[f32; 2]],
    coverage_fraction: f64,
) -> Result<ToyMetrics> {
    modes.validate()?;
    validate_samples("student samples", samples)?;
    validate_samples("teacher samples", teacher)?;
    ensure!(
        (0.0..=1.0).contains(&coverage_fraction),
        "coverage fraction must lie in [0, 1], got {coverage_fraction}"
    );

    let (teacher_counts, teacher_kept) = high_quality_mode_counts(modes, teacher);
    ensure!(
        teacher_kept > 0,
        "none of the {} teacher samples lies within {HIGH_QUALITY_RADIUS_STD} std of a mode",
        teacher.len()
    );
    let teacher_histogram = normalise(&teacher_counts, teacher_kept);
    let (student_counts, student_kept) = high_quality_mode_counts(modes, samples);
    let student_histogram = normalise(&student_counts, student_kept);

    let total = samples.len() as f64;
    let modes_covered = student_counts
        .iter()
        .zip(&teacher_histogram)
        .filter(|&(&count, &teacher_share)| {
            count > 0 && count as f64 / total >= coverage_fraction * teacher_share
        })
        .count();
    let mode_weight_error = if student_kept == 0 {
        1.0
    } else {
        total_variation(&student_histogram, &teacher_histogram)
    };

    Ok(ToyMetrics {
        modes_covered,
        num_modes: modes.num_modes(),
        high_quality_fraction: student_kept as f64 / total,
        mode_weight_error,
        energy_distance: energy_distance(samples, teacher)?,
    })
}

/// Fraction of samples per mode among the samples within [`HIGH_QUALITY_RADIUS_STD`] of
/// their nearest mode; all zeros when there are none.
pub fn mode_histogram(modes: &ModeSet, samples: &[[f32; 2]]) -> Vec<f64> {
    let (counts, kept) = high_quality_mode_counts(modes, samples);
    normalise(&counts, kept)
}

/// Energy distance `2 E|X-Y| - E|X-X'| - E|Y-Y'|` (V-statistic: pairs of a point with itself
/// included, so a set against itself gives exactly 0). Each set is subsampled to at most
/// [`MAX_DISTANCE_SAMPLES`] evenly spaced points. Errors on empty or non-finite sets.
pub fn energy_distance(a: &[[f32; 2]], b: &[[f32; 2]]) -> Result<f64> {
    let a = distance_input("first sample set", a)?;
    let b = distance_input("second sample set", b)?;
    let euclidean = |squared: f64| squared.sqrt();
    let value = 2.0 * mean_over_pairs(&a, &b, euclidean)
        - mean_over_pairs(&a, &a, euclidean)
        - mean_over_pairs(&b, &b, euclidean);
    // The V-statistic is a squared norm, so only rounding can make it negative.
    Ok(value.max(0.0))
}

/// Biased (V-statistic) squared MMD with the Gaussian kernel
/// `k(x, y) = exp(-|x-y|² / (2 h²))`, `h = bandwidth`: non-negative, exactly 0 for a set
/// against itself. Subsamples like [`energy_distance`]. Errors on empty or non-finite sets
/// and on a bandwidth that is not finite and positive.
pub fn mmd_rbf(a: &[[f32; 2]], b: &[[f32; 2]], bandwidth: f64) -> Result<f64> {
    ensure!(
        bandwidth.is_finite() && bandwidth > 0.0,
        "MMD bandwidth must be finite and positive, got {bandwidth}"
    );
    let a = distance_input("first sample set", a)?;
    let b = distance_input("second sample set", b)?;
    let inverse_two_h_squared = 1.0 / (2.0 * bandwidth * bandwidth);
    let kernel = |squared: f64| (-squared * inverse_two_h_squared).exp();
    let value = mean_over_pairs(&a, &a, kernel) + mean_over_pairs(&b, &b, kernel)
        - 2.0 * mean_over_pairs(&a, &b, kernel);
    Ok(value.max(0.0))
}

fn validate_samples(what: &str, samples: &[[f32; 2]]) -> Result<()> {
    ensure!(!samples.is_empty(), "{what}: the sample set is empty");
    if let Some(index) = samples
        .iter()
        .position(|p| !p.iter().all(|v| v.is_finite()))
    {
        bail!("{what}: sample {index} is not finite: {:?}", samples[index]);
    }
    Ok(())
}

/// Per-mode counts of high-quality samples, and their total.
fn high_quality_mode_counts(modes: &ModeSet, samples: &[[f32; 2]]) -> (Vec<usize>, usize) {
    let mut counts = vec![0; modes.num_modes()];
    for &point in samples {
        if let Some(mode) = modes.high_quality_mode(point) {
            counts[mode] += 1;
        }
    }
    let kept = counts.iter().sum();
    (counts, kept)
}

fn normalise(counts: &[usize], total: usize) -> Vec<f64> {
    let scale = if total == 0 { 0.0 } else { 1.0 / total as f64 };
    counts.iter().map(|&count| count as f64 * scale).collect()
}

fn total_variation(p: &[f64], q: &[f64]) -> f64 {
    0.5 * p.iter().zip(q).map(|(a, b)| (a - b).abs()).sum::<f64>()
}

fn distance_input(what: &str, samples: &[[f32; 2]]) -> Result<Vec<[f64; 2]>> {
    validate_samples(what, samples)?;
    Ok(evenly_spaced(samples))
}

/// At most [`MAX_DISTANCE_SAMPLES`] points at evenly spaced indices (deterministic, and
/// representative even when the set is ordered by mode).
fn evenly_spaced(samples: &[[f32; 2]]) -> Vec<[f64; 2]> {
    let count = samples.len().min(MAX_DISTANCE_SAMPLES);
    (0..count)
        .map(|i| samples[i * samples.len() / count].map(f64::from))
        .collect()
}

/// Mean of `kernel(|x - y|²)` over all pairs.
fn mean_over_pairs(xs: &[[f64; 2]], ys: &[[f64; 2]], kernel: impl Fn(f64) -> f64) -> f64 {
    let sum: f64 = xs
        .iter()
        .map(|[x0, x1]| {
            ys.iter()
                .map(|[y0, y1]| kernel((x0 - y0).powi(2) + (x1 - y1).powi(2)))
                .sum::<f64>()
        })
        .sum();
    sum / (xs.len() * ys.len()) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD: f64 = 0.5;

    /// Four modes on the corners of a square.
    fn square_modes() -> ModeSet {
        ModeSet::new(
            vec![[-4.0, -4.0], [4.0, -4.0], [-4.0, 4.0], [4.0, 4.0]],
            STD,
        )
        .unwrap()
    }

    /// `per_mode` points on a ring of radius 1 std around `mean`.
    fn ring(mean: [f64; 2], per_mode: usize) -> Vec<[f32; 2]> {
        (0..per_mode)
            .map(|i| {
                let angle = std::f64::consts::TAU * i as f64 / per_mode as f64;
                [
                    (mean[0] + STD * angle.cos()) as f32,
                    (mean[1] + STD * angle.sin()) as f32,
                ]
            })
            .collect()
    }

    fn rings(modes: &ModeSet, counts: &[usize]) -> Vec<[f32; 2]> {
        modes
            .means
            .iter()
            .zip(counts)
            .flat_map(|(&mean, &n)| ring(mean, n))
            .collect()
    }

    fn assert_close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
    }

    #[test]
    fn metrics_round_trip_through_json() {
        let metrics = ToyMetrics {
            modes_covered: 3,
            num_modes: 8,
            high_quality_fraction: 0.5,
            mode_weight_error: 0.25,
            energy_distance: 0.125,
        };
        let json = serde_json::to_string(&metrics).unwrap();
        assert_eq!(serde_json::from_str::<ToyMetrics>(&json).unwrap(), metrics);
    }

    #[test]
    fn nearest_reports_mode_and_distance_in_std() {
        let modes = square_modes();
        let (mode, distance) = modes.nearest([4.0, 5.0]).unwrap();
        assert_eq!(mode, 3);
        assert_close(distance, 2.0);
        assert_eq!(modes.nearest([f32::NAN, 0.0]), None);
        assert_eq!(
            ModeSet {
                means: vec![],
                std: 1.0
            }
            .nearest([0.0, 0.0]),
            None
        );
    }

    #[test]
    fn invalid_mode_sets_are_rejected() {
        assert!(ModeSet::new(vec![], 1.0).is_err());
        assert!(ModeSet::new(vec![[0.0, 0.0]], 0.0).is_err());
        assert!(ModeSet::new(vec![[f64::NAN, 0.0]], 1.0).is_err());
    }

    #[test]
    fn perfect_samples_cover_every_mode() {
        let modes = square_modes();
        let teacher = rings(&modes, &[16, 16, 16, 16]);
        let samples = rings(&modes, &[8, 8, 8, 8]);
        let metrics = toy_metrics(&modes, &samples, &teacher).unwrap();
        assert_eq!(metrics.modes_covered, 4);
        assert_eq!(metrics.num_modes, 4);
        assert_close(metrics.high_quality_fraction, 1.0);
        assert_close(metrics.mode_weight_error, 0.0);
        assert_eq!(mode_histogram(&modes, &samples), vec![0.25; 4]);
    }

    #[test]
    fn collapsed_samples_cover_one_mode() {
        let modes = square_modes();
        let teacher = rings(&modes, &[16, 16, 16, 16]);
        let samples = rings(&modes, &[32, 0, 0, 0]);
        let metrics = toy_metrics(&modes, &samples, &teacher).unwrap();
        assert_eq!(metrics.modes_covered, 1);
        assert_close(metrics.high_quality_fraction, 1.0);
        // 0.5 * (|1 - 0.25| + 3 * |0 - 0.25|)
        assert_close(metrics.mode_weight_error, 0.75);
        assert!(metrics.energy_distance > 1.0);
    }

    #[test]
    fn weight_error_follows_uneven_teacher_weights() {
        let modes = square_modes();
        let teacher = rings(&modes, &[40, 20, 20, 20]);
        let samples = rings(&modes, &[10, 10, 10, 10]);
        let metrics = toy_metrics(&modes, &samples, &teacher).unwrap();
        // 0.5 * (|0.25 - 0.4| + 3 * |0.25 - 0.2|)
        assert_close(metrics.mode_weight_error, 0.15);
        assert_eq!(metrics.modes_covered, 4);
    }

    #[test]
    fn coverage_needs_the_fraction_of_the_teacher_share() {
        let modes = square_modes();
        let teacher = rings(&modes, &[16, 16, 16, 16]);
        // Threshold: 0.2 * 0.25 = 0.05 of the 100 samples, i.e. 5.
        let below = rings(&modes, &[96, 4, 0, 0]);
        let above = rings(&modes, &[94, 6, 0, 0]);
        assert_eq!(
            toy_metrics(&modes, &below, &teacher).unwrap().modes_covered,
            1
        );
        assert_eq!(
            toy_metrics(&modes, &above, &teacher).unwrap().modes_covered,
            2
        );
        let lenient = toy_metrics_with_coverage(&modes, &below, &teacher, 0.0).unwrap();
        assert_eq!(lenient.modes_covered, 2);
    }

    #[test]
    fn far_samples_are_low_quality_and_excluded_from_histograms() {
        let modes = square_modes();
        let teacher = rings(&modes, &[16, 16, 16, 16]);
        let far = vec![[100.0f32, 100.0]; 20];
        let metrics = toy_metrics(&modes, &far, &teacher).unwrap();
        assert_eq!(metrics.modes_covered, 0);
        assert_close(metrics.high_quality_fraction, 0.0);
        assert_close(metrics.mode_weight_error, 1.0);
        assert_eq!(mode_histogram(&modes, &far), vec![0.0; 4]);

        let mut half = rings(&modes, &[5, 5, 5, 5]);
        half.extend_from_slice(&far);
        let metrics = toy_metrics(&modes, &half, &teacher).unwrap();
        assert_close(metrics.high_quality_fraction, 0.5);
        assert_close(metrics.mode_weight_error, 0.0);
        assert_eq!(metrics.modes_covered, 4);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let modes = square_modes();
        let teacher = rings(&modes, &[4, 4, 4, 4]);
        assert!(toy_metrics(&modes, &[], &teacher).is_err());
        assert!(toy_metrics(&modes, &teacher, &[]).is_err());
        assert!(toy_metrics(&modes, &[[f32::NAN, 0.0]], &teacher).is_err());
        assert!(toy_metrics(&modes, &teacher, &[[100.0, 100.0]]).is_err());
        assert!(toy_metrics_with_coverage(&modes, &teacher, &teacher, 1.5).is_err());
        assert!(energy_distance(&[], &teacher).is_err());
        assert!(mmd_rbf(&teacher, &teacher, 0.0).is_err());
    }

    #[test]
    fn energy_distance_of_a_set_with_itself_is_zero() {
        let samples = rings(&square_modes(), &[7, 3, 5, 9]);
        assert_eq!(energy_distance(&samples, &samples).unwrap(), 0.0);
    }

    #[test]
    fn energy_distance_grows_with_the_shift() {
        let base = rings(&square_modes(), &[8, 8, 8, 8]);
        let shifted = |by: f32| base.iter().map(|&[x, y]| [x + by, y]).collect::<Vec<_>>();
        let distances: Vec<f64> = [0.1, 0.5, 1.0, 3.0]
            .iter()
            .map(|&by| energy_distance(&base, &shifted(by)).unwrap())
            .collect();
        assert!(distances[0] > 0.0);
        assert!(
            distances.windows(2).all(|pair| pair[0] < pair[1]),
            "{distances:?}"
        );
    }

    #[test]
    fn energy_distance_matches_hand_computation() {
        // E|X-Y| = 1, E|X-X'| = (0 + 2 + 2 + 0) / 4 = 1, E|Y-Y'| = 0.
        let value = energy_distance(&[[0.0, 0.0], [2.0, 0.0]], &[[1.0, 0.0]]).unwrap();
        assert_close(value, 1.0);
        // Two single points 5 apart: 2 * 5.
        assert_close(energy_distance(&[[0.0, 0.0]], &[[3.0, 4.0]]).unwrap(), 10.0);
    }

    #[test]
    fn mmd_is_symmetric_and_zero_for_identical_sets() {
        let modes = square_modes();
        let a = rings(&modes, &[8, 8, 8, 8]);
        let b = rings(&modes, &[20, 4, 4, 4]);
        assert_eq!(mmd_rbf(&a, &a, 1.0).unwrap(), 0.0);
        let ab = mmd_rbf(&a, &b, 1.0).unwrap();
        assert!(ab > 0.0);
        assert!((ab - mmd_rbf(&b, &a, 1.0).unwrap()).abs() < 1e-12);
        // One point each, one bandwidth apart: k(x, x) = 1, k(x, y) = exp(-1/2).
        let single = mmd_rbf(&[[0.0, 0.0]], &[[2.0, 0.0]], 2.0).unwrap();
        assert_close(single, 2.0 - 2.0 * (-0.5f64).exp());
    }

    #[test]
    fn large_sets_are_subsampled_evenly() {
        let samples: Vec<[f32; 2]> = (0..5000).map(|i| [i as f32, 0.0]).collect();
        let picked = evenly_spaced(&samples);
        assert_eq!(picked.len(), MAX_DISTANCE_SAMPLES);
        assert_eq!(picked[0], [0.0, 0.0]);
        assert_eq!(picked[1], [2.0, 0.0]);
        assert_eq!(picked[MAX_DISTANCE_SAMPLES - 1], [4997.0, 0.0]);
    }
}
