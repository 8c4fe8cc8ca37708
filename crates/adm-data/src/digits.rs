//! The UCI ML hand-written digits (1,797 grey 8x8 images, classes 0..9), built into the
//! crate (`data/digits.safetensors`, CC BY 4.0, see `data/README.md`), so nothing is read
//! from elsewhere at run time.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::DataError;

const BYTES: &[u8] = include_bytes!("../data/digits.safetensors");

/// Image side in pixels.
pub const DIGIT_SIZE: usize = 8;
pub const NUM_DIGIT_CLASSES: usize = 10;
/// The largest raw pixel value (the data's 4x4-block counts of set bits).
const MAX_VALUE: f32 = 16.0;

/// A set of digit images scaled to [-1, 1] (row-major 8x8 each) with their classes.
#[derive(Debug, Clone, PartialEq)]
pub struct Digits {
    /// `len() * 64` values.
    pub pixels: Vec<f32>,
    pub labels: Vec<u32>,
}

impl Digits {
    /// All 1,797 images, in the data set's order.
    pub fn load() -> Result<Self, DataError> {
        let here = std::path::Path::new("adm-data/data/digits.safetensors");
        let bad = |reason: String| DataError::file(here, reason);
        let tensors =
            safetensors::SafeTensors::deserialize(BYTES).map_err(|e| bad(e.to_string()))?;
        let read = |name: &str, shape: &[usize]| -> Result<Vec<u8>, DataError> {
            let view = tensors
                .tensor(name)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            if view.dtype() != safetensors::Dtype::U8 || view.shape() != shape {
                return Err(bad(format!(
                    "tensor `{name}` is {:?} {:?}, expected U8 {shape:?}",
                    view.dtype(),
                    view.shape()
                )));
            }
            Ok(view.data().to_vec())
        };
        let labels = read("labels", &[1797])?;
        let images = read("images", &[1797, DIGIT_SIZE, DIGIT_SIZE])?;
        if let Some(v) = images.iter().find(|&&v| f32::from(v) > MAX_VALUE) {
            return Err(bad(format!("pixel value {v} above {MAX_VALUE}")));
        }
        if let Some(c) = labels
            .iter()
            .find(|&&c| usize::from(c) >= NUM_DIGIT_CLASSES)
        {
            return Err(bad(format!("label {c} is not a digit")));
        }
        Ok(Self {
            pixels: images
                .iter()
                .map(|&v| f32::from(v) / MAX_VALUE * 2.0 - 1.0)
                .collect(),
            labels: labels.into_iter().map(u32::from).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// A seeded shuffle split into (train, test) with `test` images in the second part.
    pub fn split(&self, test: usize, seed: u64) -> Result<(Self, Self), DataError> {
        if test >= self.len() {
            return Err(DataError::invalid(
                "test split",
                format!(
                    "{test} test images leave none of {} to train on",
                    self.len()
                ),
            ));
        }
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(seed));
        let (test_idx, train_idx) = order.split_at(test);
        Ok((self.select(train_idx), self.select(test_idx)))
    }

    /// The images at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Self {
        let px = DIGIT_SIZE * DIGIT_SIZE;
        Self {
            pixels: indices
                .iter()
                .flat_map(|&i| &self.pixels[i * px..(i + 1) * px])
                .copied()
                .collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// Images as a (N, 1, 8, 8) tensor.
    pub fn images_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(
            &self.pixels,
            (self.len(), 1, DIGIT_SIZE, DIGIT_SIZE),
            device,
        )
    }

    /// Labels as a (N,) u32 tensor.
    pub fn labels_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.labels, self.len(), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_all_digits_in_range_with_every_class() {
        let d = Digits::load().unwrap();
        assert_eq!(d.len(), 1797);
        assert_eq!(d.pixels.len(), 1797 * 64);
        let (lo, hi) = d
            .pixels
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        assert_eq!((lo, hi), (-1.0, 1.0));
        let mut counts = [0usize; NUM_DIGIT_CLASSES];
        for &c in &d.labels {
            counts[c as usize] += 1;
        }
        // The data set's class sizes (sklearn: 178, 182, 177, 183, 181, 182, 181, 179, 174, 180).
        assert_eq!(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]);
        // The first image is a zero with a hollow centre.
        assert_eq!(d.labels[0], 0);
        assert_eq!(d.pixels[3 * 8 + 3], -1.0);
        let t = d.images_tensor(&Device::Cpu).unwrap();
        assert_eq!(t.dims(), [1797, 1, 8, 8]);
    }

    #[test]
    fn split_is_seeded_and_disjoint() {
        let d = Digits::load().unwrap();
        let (train, test) = d.split(300, 1).unwrap();
        assert_eq!((train.len(), test.len()), (1497, 300));
        assert_eq!(d.split(300, 1).unwrap().1, test);
        assert_ne!(d.split(300, 2).unwrap().1, test);
        let err = d.split(1797, 1).unwrap_err().to_string();
        assert!(err.contains("test split"), "{err}");
    }
}
