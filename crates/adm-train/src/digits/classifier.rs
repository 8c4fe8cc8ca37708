//! The digit classifier that scores samples: an MLP (64 -> hidden -> feature_dim -> 10,
//! SiLU) whose feature layer is the space of the Fréchet distance. Trained in the run on the
//! real digits with cross-entropy and AdamW.

use adm_data::{Digits, NUM_DIGIT_CLASSES};
use adm_eval::Scored;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::config::ClassifierConfig;
use crate::context::progress;
use crate::optim::Optimizer;

const PIXELS: usize = adm_data::DIGIT_SIZE * adm_data::DIGIT_SIZE;

pub struct Classifier {
    hidden: Linear,
    feature: Linear,
    out: Linear,
}

impl Classifier {
    pub fn new(vb: VarBuilder, config: &ClassifierConfig) -> candle_core::Result<Self> {
        Ok(Self {
            hidden: candle_nn::linear(PIXELS, config.hidden, vb.pp("hidden"))?,
            feature: candle_nn::linear(config.hidden, config.feature_dim, vb.pp("feature"))?,
            out: candle_nn::linear(config.feature_dim, NUM_DIGIT_CLASSES, vb.pp("out"))?,
        })
    }

    /// (logits, features) of images (N, 1, 8, 8) in [-1, 1].
    pub fn forward(&self, images: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let x = images.flatten_from(1)?;
        let h = adm_nn::silu(&self.hidden.forward(&x)?)?;
        let features = adm_nn::silu(&self.feature.forward(&h)?)?;
        Ok((self.out.forward(&features)?, features))
    }

    /// Mean cross-entropy of `images` against `labels` (u32).
    pub fn loss(&self, images: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
        let (logits, _) = self.forward(images)?;
        let log_p = adm_nn::log_softmax(&logits, D::Minus1)?;
        log_p.gather(&labels.unsqueeze(1)?, 1)?.mean_all()?.neg()
    }

    /// Class probabilities and features of images, for `adm_eval::digits_metrics`.
    pub fn score(&self, images: &Tensor) -> candle_core::Result<Scored> {
        let (logits, features) = self.forward(images)?;
        let probs = adm_nn::softmax(&logits, D::Minus1)?;
        Ok(Scored {
            probs: probs.flatten_all()?.to_vec1::<f32>()?,
            feature_dim: features.dim(1)?,
            features: features.flatten_all()?.to_vec1::<f32>()?,
            num_classes: NUM_DIGIT_CLASSES,
        })
    }

    /// The fraction of `data` classified correctly.
    pub fn accuracy(&self, data: &Digits, device: &Device) -> Result<f64> {
        let scored = self.score(&data.images_tensor(device)?)?;
        let right = scored
            .predicted()
            .iter()
            .zip(&data.labels)
            .filter(|(p, l)| **p == **l as usize)
            .count();
        Ok(right as f64 / data.len() as f64)
    }
}

/// Trains a classifier on `train` with seeded initialisation and batches; returns its Vars.
pub fn train_classifier(
    config: &ClassifierConfig,
    train: &Digits,
    seed: u64,
    device: &Device,
) -> Result<(Classifier, adm_nn::SeededVarMap)> {
    let vars = adm_nn::SeededVarMap::new(adm_nn::derive_seed(seed, "classifier-init"));
    let net = Classifier::new(vars.var_builder(DType::F32, device), config)?;
    let mut opt = Optimizer::new("classifier", vars.varmap(), config.learning_rate, 10.0)?;
    let mut rng = StdRng::seed_from_u64(adm_nn::derive_seed(seed, "classifier"));
    let images = train.images_tensor(device)?;
    let labels = train.labels_tensor(device)?;
    let mut order: Vec<u32> = Vec::new();
    let bar = progress("classifier", config.steps);
    for step in 0..config.steps {
        if order.len() < config.batch_size {
            let mut epoch: Vec<u32> = (0..train.len() as u32).collect();
            epoch.shuffle(&mut rng);
            order.extend(epoch);
        }
        let batch: Vec<u32> = order.drain(..config.batch_size.min(order.len())).collect();
        let idx = Tensor::new(batch.as_slice(), device)?;
        // Cosine decay to 0: the last steps settle the weights.
        let progress_fraction = step as f64 / config.steps as f64;
        opt.set_learning_rate(
            config.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress_fraction).cos()),
        );
        let loss = net.loss(
            &images.index_select(&idx, 0)?,
            &labels.index_select(&idx, 0)?,
        )?;
        let stats = opt.step(&loss)?;
        bar.set_message(format!("loss {:.4}", stats.loss));
        bar.inc(1);
    }
    bar.finish();
    Ok((net, vars))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClassifierConfig {
        ClassifierConfig {
            hidden: 32,
            feature_dim: 16,
            steps: 300,
            batch_size: 64,
            learning_rate: 3e-3,
        }
    }

    #[test]
    fn every_var_gets_a_gradient() -> Result<()> {
        let digits = Digits::load()?.select(&[0, 1, 2, 3, 4, 5]);
        let vars = adm_nn::SeededVarMap::new(1);
        let net = Classifier::new(vars.var_builder(DType::F32, &Device::Cpu), &config())?;
        let loss = net.loss(
            &digits.images_tensor(&Device::Cpu)?,
            &digits.labels_tensor(&Device::Cpu)?,
        )?;
        adm_nn::assert_every_var_has_grad(vars.varmap(), &loss.backward()?)?;
        Ok(())
    }

    #[test]
    fn learns_the_digits_and_scores_consistently() -> Result<()> {
        let (train, test) = Digits::load()?.split(300, 3)?;
        let (net, _) = train_classifier(&config(), &train, 0, &Device::Cpu)?;
        let accuracy = net.accuracy(&test, &Device::Cpu)?;
        assert!(accuracy > 0.9, "held-out accuracy {accuracy}");
        let scored = net.score(&test.images_tensor(&Device::Cpu)?)?;
        assert_eq!((scored.len(), scored.feature_dim), (300, 16));
        for row in scored.probs.chunks(NUM_DIGIT_CLASSES) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        Ok(())
    }
}
