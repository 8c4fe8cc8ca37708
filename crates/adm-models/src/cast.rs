//! Networks in a low-precision dtype (bf16 / f16) inside an f32 training graph.
//!
//! The frozen networks (teacher, VAE, pixel encoder) are loaded in the recipe's precision to
//! halve their memory. Trainable networks keep f32 master Vars and may compute through a
//! low-precision copy of them ([`crate::compute_var_builder`]). [`InDtype`] casts every float input
//! to the network's dtype and its outputs back to f32. Casts are differentiable, so the
//! generator's gradient still flows through a bf16 teacher or VAE, and a compute copy's
//! gradient lands, in f32, on the master Vars.

use candle_core::{DType, Result, Tensor};

use crate::backbone::{Backbone, Condition, FeatureTap};
use crate::decoder::Decoder;
use crate::heads::FeatureExtractor;
use adm_diffusion::Schedule;

/// A frozen network whose weights are in `dtype`, seen from an f32 graph.
pub struct InDtype<T> {
    pub inner: T,
    pub dtype: DType,
}

impl<T> InDtype<T> {
    pub fn new(inner: T, dtype: DType) -> Self {
        Self { inner, dtype }
    }

    fn input(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype().is_float() {
            x.to_dtype(self.dtype)
        } else {
            Ok(x.clone())
        }
    }

    fn output(x: Tensor) -> Result<Tensor> {
        x.to_dtype(DType::F32)
    }
}

impl<B: Backbone> Backbone for InDtype<B> {
    fn schedule(&self) -> &Schedule {
        self.inner.schedule()
    }

    fn forward(&self, x_t: &Tensor, t: &Tensor, cond: &Condition) -> Result<Tensor> {
        let cond = cond.map(|c| self.input(c))?;
        Self::output(self.inner.forward(&self.input(x_t)?, t, &cond)?)
    }

    fn features(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        cond: &Condition,
        taps: &[String],
    ) -> Result<Vec<Tensor>> {
        let cond = cond.map(|c| self.input(c))?;
        self.inner
            .features(&self.input(x_t)?, t, &cond, taps)?
            .into_iter()
            .map(Self::output)
            .collect()
    }

    fn feature_taps(&self) -> Vec<FeatureTap> {
        self.inner.feature_taps()
    }

    fn unconditional(&self, cond: &Condition) -> Result<Condition> {
        self.inner.unconditional(cond)
    }
}

impl<D: Decoder> Decoder for InDtype<D> {
    fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        Self::output(self.inner.decode_latents(&self.input(latents)?)?)
    }
}

impl<E: FeatureExtractor> FeatureExtractor for InDtype<E> {
    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.inner
            .features(&self.input(x)?)?
            .into_iter()
            .map(Self::output)
            .collect()
    }

    fn feature_channels(&self) -> Vec<usize> {
        self.inner.feature_channels()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute_var_builder;
    use crate::toy_mlp::{ToyMlp, ToyMlpConfig, CLASS_LABELS};
    use adm_diffusion::ScheduleConfig;
    use adm_nn::SeededVarMap;
    use candle_core::{Device, Var};

    /// A bf16 copy of a network gives the f32 network's output to bf16 precision, in f32,
    /// and passes the gradient back to the f32 input.
    #[test]
    fn bf16_backbone_matches_f32_and_passes_gradients() -> Result<()> {
        let device = Device::Cpu;
        let cfg = ToyMlpConfig {
            in_channels: 2,
            hidden_size: 16,
            num_blocks: 2,
            time_embed_dim: 8,
            num_classes: 2,
        };
        let schedule = Schedule::new(&ScheduleConfig::sdxl())?;
        let vars = SeededVarMap::new(3);
        let f32_net = ToyMlp::new(
            vars.var_builder(DType::F32, &device),
            &cfg,
            schedule.clone(),
        )?;
        let bf16 = crate::frozen_var_builder(vars.varmap(), DType::BF16, &device)?;
        let bf16_net = InDtype::new(ToyMlp::new(bf16, &cfg, schedule)?, DType::BF16);

        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 2), &device)?)?;
        let t = Tensor::new(&[10f32, 200.0, 500.0, 900.0], &device)?;
        let cond = Condition::new().with(CLASS_LABELS, Tensor::new(&[0u32, 1, 0, 1], &device)?);
        let want = f32_net.forward(x.as_tensor(), &t, &cond)?;
        let got = bf16_net.forward(x.as_tensor(), &t, &cond)?;
        assert_eq!(got.dtype(), DType::F32);
        let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            err <= 0.05 * scale.max(1.0),
            "bf16 error {err} at scale {scale}"
        );
        let grads = bf16_net
            .forward(x.as_tensor(), &t, &cond)?
            .sum_all()?
            .backward()?;
        let g = grads.get(x.as_tensor()).expect("the input gets a gradient");
        assert_eq!(g.dtype(), DType::F32);
        assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }

    /// A network on a bf16 compute copy back-propagates, in f32, into every f32 Var.
    #[test]
    fn compute_copy_passes_gradients_to_the_f32_vars() -> Result<()> {
        let device = Device::Cpu;
        let vars = SeededVarMap::new(4);
        let vb = vars.var_builder(DType::F32, &device);
        vb.get_with_hints((3, 2), "w", candle_nn::Init::Const(0.5))?;
        let copy = compute_var_builder(vars.varmap(), DType::BF16, &device)?;
        let w = copy.get((3, 2), "w")?;
        assert_eq!(w.dtype(), DType::BF16);
        let x = Tensor::new(&[[1f32, -2.0]], &device)?.to_dtype(DType::BF16)?;
        let loss = x.matmul(&w.t()?)?.to_dtype(DType::F32)?.sum_all()?;
        let grads = loss.backward()?;
        let var = vars.varmap().all_vars().remove(0);
        let g = grads
            .get(var.as_tensor())
            .expect("the f32 Var gets a gradient");
        assert_eq!(g.dtype(), DType::F32);
        assert_eq!(g.to_vec2::<f32>()?, vec![vec![1.0, -2.0]; 3]);
        Ok(())
    }

    /// The frozen pixel path in f16 (the decoder, then the extractor) hands f32 features to
    /// the heads and the exact gradient back to the f32 latents.
    #[test]
    fn f16_decoder_and_extractor_pass_gradients() -> Result<()> {
        struct Square;
        impl FeatureExtractor for Square {
            fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
                assert_eq!(x.dtype(), DType::F16, "the extractor runs in its own dtype");
                Ok(vec![x.sqr()?])
            }
            fn feature_channels(&self) -> Vec<usize> {
                vec![1]
            }
        }
        let decoder = InDtype::new(crate::IdentityDecoder, DType::F16);
        let extractor = InDtype::new(Square, DType::F16);
        let x = Var::from_tensor(&Tensor::new(&[[0.5f32, -1.5, 2.0]], &Device::Cpu)?)?;
        let images = decoder.decode_latents(x.as_tensor())?;
        assert_eq!(images.dtype(), DType::F32);
        let features = extractor.features(&images)?.remove(0);
        assert_eq!(features.dtype(), DType::F32);
        let grads = features.sum_all()?.backward()?;
        let g = grads
            .get(x.as_tensor())
            .expect("the latents get a gradient");
        assert_eq!(g.dtype(), DType::F32);
        // d/dx sum(x^2) = 2x, exact in f16 for these values.
        assert_eq!(g.to_vec2::<f32>()?, vec![vec![1.0, -3.0, 4.0]]);
        Ok(())
    }
}
