//! Metrics for class-conditional image samples scored by a classifier (the digits toy):
//! class coverage, class-histogram KL to the teacher, classifier confidence, a Fréchet
//! distance in the classifier's feature space and within-class diversity.
//!
//! Definitions (also in the README's "Digits toy" section):
//! - **classes covered**: class `c` counts when the samples the classifier assigns to `c`
//!   number at least [`CLASS_COVERAGE_FRACTION`] of the samples that requested `c`.
//! - **class KL**: `KL(p_teacher || p_samples)` between the histograms of classifier-predicted
//!   classes, each smoothed with one pseudo-count per class (Laplace) so that a missing class
//!   gives a large but finite value.
//! - **confidence**: the mean classifier probability of the requested class.
//! - **accuracy**: the fraction of samples whose predicted class is the requested one.
//! - **Fréchet distance**: `|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)` of
//!   the classifier features, both matrix square roots by symmetric (Jacobi) eigen-decomposition
//!   in f64.
//! - **diversity**: the mean Euclidean distance between two different samples of the same
//!   requested class (pixels), averaged over the classes with at least two samples.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// A class is covered when it holds at least this fraction of its requested share.
pub const CLASS_COVERAGE_FRACTION: f64 = 0.2;

/// What a classifier says about a set of samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// `n * num_classes` class probabilities, row per sample.
    pub probs: Vec<f32>,
    /// `n * feature_dim` penultimate-layer features.
    pub features: Vec<f32>,
    pub num_classes: usize,
    pub feature_dim: usize,
}

impl Scored {
    pub fn len(&self) -> usize {
        self.probs.len() / self.num_classes.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn validate(&self, what: &str) -> Result<()> {
        ensure!(
            self.num_classes > 0 && self.feature_dim > 0,
            "{what}: num_classes and feature_dim must be positive"
        );
        ensure!(
            !self.probs.is_empty()
                && self.probs.len().is_multiple_of(self.num_classes)
                && self.features.len() == self.len() * self.feature_dim,
            "{what}: {} probabilities and {} features do not fit {} classes x {} features",
            self.probs.len(),
            self.features.len(),
            self.num_classes,
            self.feature_dim
        );
        ensure!(
            self.probs
                .iter()
                .chain(&self.features)
                .all(|v| v.is_finite()),
            "{what}: non-finite classifier output"
        );
        Ok(())
    }

    /// The arg-max class of each sample.
    pub fn predicted(&self) -> Vec<usize> {
        self.probs
            .chunks(self.num_classes)
            .map(|row| {
                row.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(c, _)| c)
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DigitsMetrics {
    pub classes_covered: usize,
    pub num_classes: usize,
    pub class_kl: f64,
    pub confidence: f64,
    pub accuracy: f64,
    pub frechet: f64,
    pub diversity: f64,
}

/// Every metric of `samples` (pixels `n * pixels_per_sample`, requested classes, classifier
/// output) against the teacher's scored reference samples.
pub fn digits_metrics(
    pixels: &[f32],
    requested: &[u32],
    scored: &Scored,
    teacher: &Scored,
) -> Result<DigitsMetrics> {
    scored.validate("samples")?;
    teacher.validate("teacher samples")?;
    let n = requested.len();
    ensure!(
        scored.len() == n && n > 0 && pixels.len().is_multiple_of(n),
        "samples: {} requested classes, {} scored samples, {} pixel values",
        n,
        scored.len(),
        pixels.len()
    );
    ensure!(
        scored.num_classes == teacher.num_classes && scored.feature_dim == teacher.feature_dim,
        "samples and teacher samples were scored by different classifiers"
    );
    ensure!(
        requested.iter().all(|&c| (c as usize) < scored.num_classes),
        "samples: a requested class is not below {}",
        scored.num_classes
    );
    let predicted = scored.predicted();
    let k = scored.num_classes;
    let accuracy = predicted
        .iter()
        .zip(requested)
        .filter(|(p, r)| **p == **r as usize)
        .count() as f64
        / n as f64;
    let confidence = requested
        .iter()
        .enumerate()
        .map(|(i, &c)| f64::from(scored.probs[i * k + c as usize]))
        .sum::<f64>()
        / n as f64;
    Ok(DigitsMetrics {
        classes_covered: classes_covered(&predicted, requested, k),
        num_classes: k,
        class_kl: class_kl(&teacher.predicted(), &predicted, k),
        confidence,
        accuracy,
        frechet: frechet_distance(&teacher.features, &scored.features, scored.feature_dim)?,
        diversity: within_class_distance(pixels, requested, k),
    })
}

fn histogram(classes: &[usize], k: usize) -> Vec<f64> {
    let mut counts = vec![0.0; k];
    for &c in classes {
        counts[c] += 1.0;
    }
    counts
}

/// Classes whose predicted count reaches [`CLASS_COVERAGE_FRACTION`] of their requested
/// count (classes nobody requested are not counted).
pub fn classes_covered(predicted: &[usize], requested: &[u32], k: usize) -> usize {
    let got = histogram(predicted, k);
    let asked = histogram(
        &requested.iter().map(|&c| c as usize).collect::<Vec<_>>(),
        k,
    );
    (0..k)
        .filter(|&c| asked[c] > 0.0 && got[c] >= CLASS_COVERAGE_FRACTION * asked[c])
        .count()
}

/// `KL(p || q)` of the Laplace-smoothed histograms of two class lists.
pub fn class_kl(p: &[usize], q: &[usize], k: usize) -> f64 {
    let smoothed = |classes: &[usize]| -> Vec<f64> {
        let total = classes.len() as f64 + k as f64;
        histogram(classes, k)
            .into_iter()
            .map(|c| (c + 1.0) / total)
            .collect()
    };
    let (p, q) = (smoothed(p), smoothed(q));
    p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum()
}

/// Mean Euclidean distance between distinct samples of the same class, averaged over
/// classes with at least two samples (0 when there is none).
pub fn within_class_distance(pixels: &[f32], classes: &[u32], k: usize) -> f64 {
    let d = pixels.len() / classes.len().max(1);
    let mut per_class = Vec::new();
    for c in 0..k as u32 {
        let rows: Vec<&[f32]> = classes
            .iter()
            .enumerate()
            .filter(|(_, &l)| l == c)
            .map(|(i, _)| &pixels[i * d..(i + 1) * d])
            .collect();
        if rows.len() < 2 {
            continue;
        }
        let mut sum = 0.0;
        let mut pairs = 0usize;
        for i in 0..rows.len() {
            for j in i + 1..rows.len() {
                let sq: f64 = rows[i]
                    .iter()
                    .zip(rows[j])
                    .map(|(a, b)| f64::from(a - b).powi(2))
                    .sum();
                sum += sq.sqrt();
                pairs += 1;
            }
        }
        per_class.push(sum / pairs as f64);
    }
    if per_class.is_empty() {
        0.0
    } else {
        per_class.iter().sum::<f64>() / per_class.len() as f64
    }
}

/// Mean and (biased, 1/n) covariance of `n * d` row-major features.
fn mean_cov(x: &[f32], d: usize) -> (Vec<f64>, Vec<f64>) {
    let n = x.len() / d;
    let mut mean = vec![0.0; d];
    for row in x.chunks(d) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += f64::from(v) / n as f64;
        }
    }
    let mut cov = vec![0.0; d * d];
    for row in x.chunks(d) {
        let c: Vec<f64> = row
            .iter()
            .zip(&mean)
            .map(|(&v, m)| f64::from(v) - m)
            .collect();
        for i in 0..d {
            for j in 0..d {
                cov[i * d + j] += c[i] * c[j] / n as f64;
            }
        }
    }
    (mean, cov)
}

/// The Fréchet distance between Gaussians fitted to two feature sets (`* d` row-major).
pub fn frechet_distance(a: &[f32], b: &[f32], d: usize) -> Result<f64> {
    ensure!(
        d > 0
            && !a.is_empty()
            && !b.is_empty()
            && a.len().is_multiple_of(d)
            && b.len().is_multiple_of(d),
        "frechet_distance: feature sets of {} and {} values do not have rows of {d}",
        a.len(),
        b.len()
    );
    let (mu_a, cov_a) = mean_cov(a, d);
    let (mu_b, cov_b) = mean_cov(b, d);
    let root_a = sqrt_psd(&cov_a, d);
    let middle = matmul(&matmul(&root_a, &cov_b, d), &root_a, d);
    let (values, _) = symmetric_eigen(&middle, d);
    let trace_root: f64 = values.iter().map(|v| v.max(0.0).sqrt()).sum();
    let trace = |m: &[f64]| (0..d).map(|i| m[i * d + i]).sum::<f64>();
    let mean_term: f64 = mu_a.iter().zip(&mu_b).map(|(x, y)| (x - y).powi(2)).sum();
    // Rounding can make the difference slightly negative for identical sets.
    Ok((mean_term + trace(&cov_a) + trace(&cov_b) - 2.0 * trace_root).max(0.0))
}

fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut out = vec![0.0; d * d];
    for i in 0..d {
        for k in 0..d {
            let aik = a[i * d + k];
            for j in 0..d {
                out[i * d + j] += aik * b[k * d + j];
            }
        }
    }
    out
}

/// The square root of a symmetric positive semi-definite `d x d` matrix (negative rounding
/// noise in its eigenvalues is clamped to 0).
pub fn sqrt_psd(m: &[f64], d: usize) -> Vec<f64> {
    let (values, vectors) = symmetric_eigen(m, d);
    let roots: Vec<f64> = values.iter().map(|v| v.max(0.0).sqrt()).collect();
    let mut out = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            out[i * d + j] = (0..d)
                .map(|k| vectors[i * d + k] * roots[k] * vectors[j * d + k])
                .sum();
        }
    }
    out
}

/// Eigenvalues and eigenvectors (columns of the row-major `d x d` result) of the symmetric
/// matrix `m` by cyclic Jacobi rotations.
pub fn symmetric_eigen(m: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = m.to_vec();
    let mut v = vec![0.0; d * d];
    for i in 0..d {
        v[i * d + i] = 1.0;
    }
    let scale = a
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j].powi(2))
            .sum::<f64>()
            .sqrt();
        if off <= 1e-15 * scale {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // A <- J^T A J with the rotation J in the (p, q) plane.
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i * d + i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn jacobi_finds_known_eigenpairs_and_square_roots() {
        let (mut values, vectors) = symmetric_eigen(&[2.0, 1.0, 1.0, 2.0], 2);
        // Each column is an eigenvector: M v = lambda v.
        for k in 0..2 {
            let (x, y) = (vectors[k], vectors[2 + k]);
            assert!(close(2.0 * x + y, values[k] * x, 1e-12));
            assert!(close(x + 2.0 * y, values[k] * y, 1e-12));
        }
        values.sort_by(f64::total_cmp);
        assert!(close(values[0], 1.0, 1e-12) && close(values[1], 3.0, 1e-12));
        // sqrt([[5, 4], [4, 5]]) = [[2, 1], [1, 2]].
        let root = sqrt_psd(&[5.0, 4.0, 4.0, 5.0], 2);
        for (r, e) in root.iter().zip([2.0, 1.0, 1.0, 2.0]) {
            assert!(close(*r, e, 1e-12), "{root:?}");
        }
        // A 3x3 SPD matrix: the root squared gives it back.
        let m = [4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0];
        let root = sqrt_psd(&m, 3);
        for (x, y) in matmul(&root, &root, 3).iter().zip(m) {
            assert!(close(*x, y, 1e-12));
        }
    }

    #[test]
    fn frechet_distance_of_known_cases() {
        let a: Vec<f32> = vec![1.0, 0.0, -1.0, 0.0, 0.0, 2.0, 0.0, -2.0];
        assert!(frechet_distance(&a, &a, 2).unwrap() < 1e-9);
        // A shift adds |shift|^2.
        let shifted: Vec<f32> = a.chunks(2).flat_map(|r| [r[0] + 3.0, r[1] - 1.0]).collect();
        assert!(close(
            frechet_distance(&a, &shifted, 2).unwrap(),
            10.0,
            1e-9
        ));
        // Scaling by s gives (1 - s)^2 tr(S): tr(S) = (2 + 8) / 4 = 2.5.
        let scaled: Vec<f32> = a.iter().map(|v| v * 3.0).collect();
        assert!(close(
            frechet_distance(&a, &scaled, 2).unwrap(),
            4.0 * 2.5,
            1e-9
        ));
        assert!(frechet_distance(&a, &a[..3], 2).is_err());
    }

    #[test]
    fn coverage_kl_and_diversity_of_small_inputs() {
        // Requested: 5 of class 0, 5 of class 1, 0 of class 2. One class-1 sample in five
        // is exactly the 20% threshold; none misses it.
        let requested = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1];
        let predicted = [0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(classes_covered(&predicted, &requested, 3), 2);
        assert_eq!(classes_covered(&[0; 10], &requested, 3), 1);
        let predicted = [0, 0, 0, 0, 1, 1, 0, 0, 0, 2];
        assert_eq!(classes_covered(&predicted, &requested, 3), 2);

        let same = [0, 1, 2, 0];
        assert!(class_kl(&same, &same, 3).abs() < 1e-15);
        // p = (3, 1, 1) / 5, q = (1, 1, 3) / 5 after smoothing.
        let kl = class_kl(&[0, 0], &[2, 2], 3);
        let expected = 0.6 * 3f64.ln() + 0.2 * (1f64 / 3.0).ln();
        assert!(close(kl, expected, 1e-12), "{kl} vs {expected}");

        // Class 0: points (0,0), (3,4): distance 5. Class 1: (0,0), (0,1), (0,2): mean 4/3.
        let pixels = [0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 1.0, 0.0, 2.0];
        let d = within_class_distance(&pixels, &[0, 0, 1, 1, 1], 3);
        assert!(close(d, (5.0 + 4.0 / 3.0) / 2.0, 1e-12), "{d}");
    }

    #[test]
    fn digits_metrics_on_a_tiny_scored_set() {
        let scored = Scored {
            probs: vec![0.9, 0.1, 0.2, 0.8, 0.6, 0.4],
            features: vec![0.0, 1.0, 1.0, 0.0, 0.5, 0.5],
            num_classes: 2,
            feature_dim: 2,
        };
        let m = digits_metrics(&[0.0, 1.0, 2.0], &[0, 1, 1], &scored, &scored).unwrap();
        assert_eq!((m.classes_covered, m.num_classes), (2, 2));
        assert!(close(m.confidence, (0.9 + 0.8 + 0.4) / 3.0, 1e-6));
        assert!(close(m.accuracy, 2.0 / 3.0, 1e-12));
        assert!(m.class_kl.abs() < 1e-12 && m.frechet < 1e-9);
        assert!(close(m.diversity, 1.0, 1e-12));
        let err = digits_metrics(&[0.0], &[0, 1, 1], &scored, &scored).unwrap_err();
        assert!(err.to_string().contains("pixel values"), "{err}");
        let mut bad = scored.clone();
        bad.features[0] = f32::NAN;
        let err = digits_metrics(&[0.0, 1.0, 2.0], &[0, 1, 1], &bad, &scored).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
    }
}
