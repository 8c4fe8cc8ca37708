//! A class-conditional residual MLP for low-dimensional toy data. It implements the same
//! [`Backbone`] trait as the image and video models, with a feature tap after every block,
//! so the toy exercises exactly the training code the large models use.

use adm_diffusion::Schedule;
use adm_nn::{linear, Linear};
use candle_core::{DType, Result, Tensor};
use candle_nn::{embedding, Embedding, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::backbone::{Backbone, Condition, FeatureTap};

/// The condition tensor the toy reads: (B,) u32 class ids; `num_classes` is the null class
/// used for condition dropout and classifier-free guidance.
pub const CLASS_LABELS: &str = "class_labels";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToyMlpConfig {
    /// Data dimension (2 for the 2D mixtures).
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    pub hidden_size: usize,
    pub num_blocks: usize,
    /// Width of the sinusoidal timestep embedding.
    pub time_embed_dim: usize,
    pub num_classes: usize,
}

fn default_in_channels() -> usize {
    2
}

impl ToyMlpConfig {
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("in_channels", self.in_channels),
            ("hidden_size", self.hidden_size),
            ("num_blocks", self.num_blocks),
            ("num_classes", self.num_classes),
        ];
        for (field, value) in positive {
            if value == 0 {
                candle_core::bail!("model.{field} must be positive");
            }
        }
        if self.time_embed_dim < 2 || !self.time_embed_dim.is_multiple_of(2) {
            candle_core::bail!(
                "model.time_embed_dim must be an even number >= 2, got {}",
                self.time_embed_dim
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct ResBlock {
    linear_1: Linear,
    emb_proj: Linear,
    linear_2: Linear,
}

impl ResBlock {
    fn new(hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: linear(hidden, hidden, vb.pp("linear_1"))?,
            emb_proj: linear(hidden, hidden, vb.pp("emb_proj"))?,
            linear_2: linear(hidden, hidden, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, h: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let inner = (self.linear_1.forward(&adm_nn::silu(h)?)? + self.emb_proj.forward(emb)?)?;
        h + self.linear_2.forward(&adm_nn::silu(&inner)?)?
    }
}

#[derive(Debug, Clone)]
pub struct ToyMlp {
    config: ToyMlpConfig,
    schedule: Schedule,
    time_linear_1: Linear,
    time_linear_2: Linear,
    class_embedding: Embedding,
    proj_in: Linear,
    blocks: Vec<ResBlock>,
    proj_out: Linear,
}

impl ToyMlp {
    pub fn new(vb: VarBuilder, config: &ToyMlpConfig, schedule: Schedule) -> Result<Self> {
        config.validate()?;
        let hidden = config.hidden_size;
        let blocks = (0..config.num_blocks)
            .map(|i| ResBlock::new(hidden, vb.pp(format!("blocks.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            time_linear_1: linear(
                config.time_embed_dim,
                hidden,
                vb.pp("time_embedding.linear_1"),
            )?,
            time_linear_2: linear(hidden, hidden, vb.pp("time_embedding.linear_2"))?,
            class_embedding: embedding(config.num_classes + 1, hidden, vb.pp("class_embedding"))?,
            proj_in: linear(config.in_channels, hidden, vb.pp("proj_in"))?,
            blocks,
            proj_out: linear(hidden, config.in_channels, vb.pp("proj_out"))?,
            config: config.clone(),
            schedule,
        })
    }

    pub fn config(&self) -> &ToyMlpConfig {
        &self.config
    }

    /// Sinusoidal embedding of the raw timestep (cos half first, as diffusers'
    /// `get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0)`).
    fn timestep_embedding(&self, t: &Tensor) -> Result<Tensor> {
        let half = self.config.time_embed_dim / 2;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32)
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
        let args = t
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&freqs)?;
        Tensor::cat(&[args.cos()?, args.sin()?], 1)
    }

    fn embedding(&self, t: &Tensor, cond: &Condition) -> Result<Tensor> {
        let time = self
            .timestep_embedding(t)?
            .to_dtype(self.proj_in.weight().dtype())?;
        let time = self
            .time_linear_2
            .forward(&adm_nn::silu(&self.time_linear_1.forward(&time)?)?)?;
        let classes = cond.get(CLASS_LABELS)?;
        let max_class = classes
            .max_all()?
            .to_dtype(DType::U32)?
            .to_scalar::<u32>()? as usize;
        if max_class > self.config.num_classes {
            candle_core::bail!(
                "{CLASS_LABELS} holds class {max_class}, but the model has {} classes (+1 null class)",
                self.config.num_classes
            );
        }
        adm_nn::silu(&(time + self.class_embedding.forward(classes)?)?)
    }

    /// Runs the blocks, handing every block output to `visit`; stops when it returns false.
    fn trunk(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        cond: &Condition,
        mut visit: impl FnMut(usize, &Tensor) -> bool,
    ) -> Result<Tensor> {
        let emb = self.embedding(t, cond)?;
        let mut h = self.proj_in.forward(x_t)?;
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h, &emb)?;
            if !visit(i, &h) {
                break;
            }
        }
        Ok(h)
    }
}

impl Backbone for ToyMlp {
    fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    fn forward(&self, x_t: &Tensor, t: &Tensor, cond: &Condition) -> Result<Tensor> {
        let h = self.trunk(x_t, t, cond, |_, _| true)?;
        self.proj_out.forward(&adm_nn::silu(&h)?)
    }

    fn features(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        cond: &Condition,
        taps: &[String],
    ) -> Result<Vec<Tensor>> {
        let indices = taps
            .iter()
            .map(|tap| {
                tap.strip_prefix("blocks.")
                    .and_then(|i| i.parse::<usize>().ok())
                    .filter(|&i| i < self.blocks.len())
                    .ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "toy MLP has no feature tap `{tap}` (taps are blocks.0 .. blocks.{})",
                            self.blocks.len() - 1
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let last = indices.iter().copied().max().unwrap_or(0);
        let mut found = vec![None; self.blocks.len()];
        self.trunk(x_t, t, cond, |i, h| {
            found[i] = Some(h.clone());
            i < last
        })?;
        Ok(indices.iter().filter_map(|&i| found[i].clone()).collect())
    }

    fn feature_taps(&self) -> Vec<FeatureTap> {
        (0..self.blocks.len())
            .map(|i| FeatureTap {
                name: format!("blocks.{i}"),
                channels: self.config.hidden_size,
            })
            .collect()
    }

    fn unconditional(&self, cond: &Condition) -> Result<Condition> {
        let classes = cond.get(CLASS_LABELS)?;
        let null = Tensor::full(
            self.config.num_classes as u32,
            classes.shape(),
            classes.device(),
        )?;
        Ok(cond.clone().with(CLASS_LABELS, null))
    }
}
