//! The seam every model family implements: a native prediction at (x_t, t, condition), named
//! intermediate features for discriminator heads, and the schedule the prediction belongs to.

use adm_diffusion::{cfg_combine, Schedule};
use candle_core::{Result, Tensor};

/// Named condition tensors with a leading batch dimension, under the names of the diffusers
/// forward arguments (`class_labels`, `encoder_hidden_states`, `text_embeds`, `time_ids`, ...).
#[derive(Debug, Clone, Default)]
pub struct Condition {
    tensors: Vec<(String, Tensor)>,
}

impl Condition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the tensor `name`.
    pub fn with(mut self, name: &str, tensor: Tensor) -> Self {
        match self.tensors.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = tensor,
            None => self.tensors.push((name.to_string(), tensor)),
        }
        self
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| {
                let have: Vec<&str> = self.tensors.iter().map(|(n, _)| n.as_str()).collect();
                candle_core::Error::Msg(format!(
                    "condition has no tensor `{name}` (it has: [{}])",
                    have.join(", ")
                ))
            })
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Applies `f` to every tensor, keeping the names.
    pub fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let tensors = self
            .tensors
            .iter()
            .map(|(n, t)| Ok((n.clone(), f(t)?)))
            .collect::<Result<_>>()?;
        Ok(Self { tensors })
    }

    /// This condition with each of `names` replaced by the tensor `negative_{name}`: the
    /// negative-prompt encoding that the data carries for classifier-free guidance. `model`
    /// names the backbone in the error when one is missing.
    pub fn with_negatives(&self, model: &str, names: &[&str]) -> Result<Self> {
        let mut out = self.clone();
        for name in names {
            let negative = format!("negative_{name}");
            let tensor = self.get(&negative).map_err(|_| {
                candle_core::Error::Msg(format!(
                    "{model}: the unconditional (negative prompt) condition must come from the data: the condition needs `{negative}`"
                ))
            })?;
            out = out.with(name, tensor.clone());
        }
        Ok(out)
    }

    /// Concatenates two conditions with the same names along the batch dimension.
    pub fn cat(&self, other: &Self) -> Result<Self> {
        self.map_with(other, |a, b| Tensor::cat(&[a, b], 0))
    }

    fn map_with(
        &self,
        other: &Self,
        f: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        let tensors = self
            .tensors
            .iter()
            .map(|(n, t)| Ok((n.clone(), f(t, other.get(n)?)?)))
            .collect::<Result<_>>()?;
        Ok(Self { tensors })
    }
}

/// A feature map a discriminator head can attach to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureTap {
    pub name: String,
    pub channels: usize,
}

/// A denoising backbone. `t` is a per-sample (B,) timestep tensor in the schedule's units.
pub trait Backbone: Send + Sync {
    /// The schedule (and so the parameterisation) of this backbone's predictions.
    fn schedule(&self) -> &Schedule;

    /// The native prediction (epsilon, v or flow velocity) at (x_t, t).
    fn forward(&self, x_t: &Tensor, t: &Tensor, cond: &Condition) -> Result<Tensor>;

    /// The intermediate features at `taps`, in that order (the forward may stop after the
    /// last one).
    fn features(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        cond: &Condition,
        taps: &[String],
    ) -> Result<Vec<Tensor>>;

    /// Every tap this backbone offers.
    fn feature_taps(&self) -> Vec<FeatureTap>;

    /// The condition classifier-free guidance uses as "unconditional" for this batch.
    fn unconditional(&self, cond: &Condition) -> Result<Condition>;
}

/// (x0_hat, eps_hat) from one forward pass.
pub fn predict_x0_eps(
    model: &dyn Backbone,
    x_t: &Tensor,
    t: &Tensor,
    cond: &Condition,
) -> Result<(Tensor, Tensor)> {
    let prediction = model.forward(x_t, t, cond)?;
    model.schedule().to_x0_eps(&prediction, x_t, t)
}

/// The native prediction with classifier-free guidance `scale` (1 = plain conditional). The
/// conditional and unconditional halves run as one batch.
pub fn guided_prediction(
    model: &dyn Backbone,
    x_t: &Tensor,
    t: &Tensor,
    cond: &Condition,
    scale: f64,
) -> Result<Tensor> {
    if scale == 1.0 {
        return model.forward(x_t, t, cond);
    }
    let batch = x_t.dim(0)?;
    let both = model.forward(
        &Tensor::cat(&[x_t, x_t], 0)?,
        &Tensor::cat(&[t, t], 0)?,
        &model.unconditional(cond)?.cat(cond)?,
    )?;
    cfg_combine(
        &both.narrow(0, 0, batch)?,
        &both.narrow(0, batch, batch)?,
        scale,
    )
}

/// (x0_hat, eps_hat) with classifier-free guidance: the conversion is linear in the
/// prediction, so guiding the native prediction equals guiding x0 and eps.
pub fn guided_x0_eps(
    model: &dyn Backbone,
    x_t: &Tensor,
    t: &Tensor,
    cond: &Condition,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let prediction = guided_prediction(model, x_t, t, cond, scale)?;
    model.schedule().to_x0_eps(&prediction, x_t, t)
}
