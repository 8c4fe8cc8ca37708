//! An SDXL teacher from a diffusers `StableDiffusionXLPipeline` folder: the frozen UNet as a
//! [`UNetBackbone`], both CLIP text encoders with their tokenizers, and prompt encoding exactly
//! as diffusers' `StableDiffusionXLPipeline.encode_prompt` does it
//! (diffusers/pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py):
//!
//! - each prompt goes through `tokenizer` + `text_encoder` and `tokenizer_2` +
//!   `text_encoder_2` (padded to the tokenizer's length, truncated); the penultimate hidden
//!   states of both are concatenated on channels: `encoder_hidden_states` (B, 77, 2048 for
//!   SDXL); the pooled condition `text_embeds` is `text_encoder_2`'s projected output;
//! - the negative prompt is encoded the same way, except that with no negative prompt and
//!   `force_zeros_for_empty_prompt` (model_index.json; true for SDXL base) its embeddings are
//!   zeros;
//! - `time_ids` are (original h, w, crop top, left, target h, w), the same for the negative.
//!
//! The VAE is not loaded (sampling latents never decodes). The schedule comes from
//! `scheduler/scheduler_config.json` (betas and prediction type; SDXL's when the folder has no
//! scheduler); sampling uses adm-diffusion's DDIM over trailing timesteps.

use std::path::{Path, PathBuf};

use adm_diffusion::{sample_ode, BetaSchedule, Schedule, ScheduleConfig, VpPrediction};
use candle_core::{DType, Device, Result, Tensor};
use serde_json::Value;

use crate::backbone::{guided_prediction, Backbone, Condition};
use crate::clip::{self, ClipTextModel, ClipTokenizer};
use crate::loading::{load_model, read_config, read_json, ModelIndex};
use crate::unet_2d::{
    self, OneOrMany, UNet2DConditionModel, UNetBackbone, ENCODER_HIDDEN_STATES,
    NEGATIVE_ENCODER_HIDDEN_STATES, NEGATIVE_TEXT_EMBEDS, TEXT_EMBEDS, TIME_IDS,
};

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

/// How the pipeline's weights are loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Weight variant (`Some("fp16")` reads `*.fp16.safetensors`), for every component.
    pub variant: Option<String>,
    /// Compute dtype of the UNet and the text encoders.
    pub dtype: DType,
    pub device: Device,
}

/// SDXL's micro-conditioning (`add_time_ids`): sizes in pixels as (height, width).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeIds {
    pub original_size: (usize, usize),
    pub crop_top_left: (usize, usize),
    pub target_size: (usize, usize),
}

impl TimeIds {
    /// What the pipeline uses by default for an image of `size`: no crop, original = target.
    pub fn for_size(size: (usize, usize)) -> Self {
        Self {
            original_size: size,
            crop_top_left: (0, 0),
            target_size: size,
        }
    }

    /// The six values in diffusers' order.
    pub fn values(&self) -> [f32; 6] {
        let (a, b, c) = (self.original_size, self.crop_top_left, self.target_size);
        [a.0, a.1, b.0, b.1, c.0, c.1].map(|v| v as f32)
    }
}

/// Prompt embeddings of a batch: `encoder_hidden_states` (B, L, D1 + D2) and `text_embeds`
/// (B, projection_dim), in f32.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    pub encoder_hidden_states: Tensor,
    pub text_embeds: Tensor,
}

/// The frozen SDXL teacher of one pipeline folder.
pub struct SdxlTeacher {
    pub backbone: UNetBackbone,
    tokenizer: ClipTokenizer,
    tokenizer_2: ClipTokenizer,
    text_encoder: ClipTextModel,
    text_encoder_2: ClipTextModel,
    /// model_index.json's `force_zeros_for_empty_prompt` (diffusers' default: true).
    pub force_zeros_for_empty_prompt: bool,
    /// Pixels per latent cell: 2^(VAE levels - 1) from `vae/config.json`, else 8 (diffusers'
    /// fallback without a VAE).
    pub vae_scale_factor: usize,
    pub root: PathBuf,
    device: Device,
}

impl SdxlTeacher {
    /// Loads the UNet, both text encoders and both tokenizers of the pipeline folder `root`
    /// and checks that they fit together. Errors name the missing component or file.
    pub fn load(root: &Path, options: &LoadOptions) -> Result<Self> {
        let index = ModelIndex::read(root)?;
        let dir = |name: &str| index.component_dir(root, name);
        let variant = options.variant.as_deref();
        let (dtype, device) = (options.dtype, &options.device);
        let encoder = |name: &str| -> Result<ClipTextModel> {
            let dir = dir(name)?;
            let cfg: clip::Config = read_config(&dir)?;
            load_model(&dir, variant, dtype, device, clip::IGNORED_TENSORS, |vb| {
                ClipTextModel::new(vb, &cfg)
            })
            .map_err(|e| err(format!("{name}: {e}")))
        };
        let text_encoder = encoder("text_encoder")?;
        let text_encoder_2 = encoder("text_encoder_2")?;
        let tokenizer = ClipTokenizer::from_folder(&dir("tokenizer")?)?;
        let tokenizer_2 = ClipTokenizer::from_folder(&dir("tokenizer_2")?)?;
        let unet_dir = dir("unet")?;
        let unet_cfg: unet_2d::Config = read_config(&unet_dir)?;
        check_fit(&unet_cfg, text_encoder.config(), text_encoder_2.config())
            .map_err(|e| err(format!("{}: {e}", root.display())))?;
        let unet = load_model(&unet_dir, variant, dtype, device, &[], |vb| {
            UNet2DConditionModel::new(vb, &unet_cfg)
        })
        .map_err(|e| err(format!("unet: {e}")))?;
        let schedule = Schedule::new(&schedule_config(root)?)?;

        let model_index: Value = read_json(&root.join("model_index.json"))?;
        let force_zeros_for_empty_prompt = match model_index.get("force_zeros_for_empty_prompt") {
            None => true,
            Some(v) => v.as_bool().ok_or_else(|| {
                err(format!(
                    "{}: `force_zeros_for_empty_prompt` must be true or false, got {v}",
                    root.join("model_index.json").display()
                ))
            })?,
        };
        Ok(Self {
            backbone: UNetBackbone::new(unet, schedule),
            tokenizer,
            tokenizer_2,
            text_encoder,
            text_encoder_2,
            force_zeros_for_empty_prompt,
            vae_scale_factor: vae_scale_factor(root)?,
            root: root.to_path_buf(),
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The latent shape (C, H / f, W / f) of an image of `size` = (height, width) pixels;
    /// an error unless both are multiples of the VAE factor times the UNet's.
    pub fn latent_shape(&self, size: (usize, usize)) -> Result<[usize; 3]> {
        let unet = self.backbone.unet.config();
        let multiple = self.vae_scale_factor * unet.spatial_multiple();
        if size.0 == 0
            || size.1 == 0
            || !size.0.is_multiple_of(multiple)
            || !size.1.is_multiple_of(multiple)
        {
            return Err(err(format!(
                "sdxl: resolution {}x{} must be a positive multiple of {multiple} (VAE factor {} x UNet {})",
                size.0,
                size.1,
                self.vae_scale_factor,
                unet.spatial_multiple()
            )));
        }
        Ok([
            unet.in_channels,
            size.0 / self.vae_scale_factor,
            size.1 / self.vae_scale_factor,
        ])
    }

    /// `encode_prompt` for one batch of prompts (no negative): see the module docs.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<PromptEmbeds> {
        let run = |tokenizer: &ClipTokenizer, encoder: &ClipTextModel| {
            let ids = tokenizer.encode_batch(prompts, &self.device)?;
            encoder.forward(&ids, None)
        };
        let first = run(&self.tokenizer, &self.text_encoder)?;
        let second = run(&self.tokenizer_2, &self.text_encoder_2)?;
        let text_embeds = second
            .text_embeds
            .clone()
            .ok_or_else(|| err("sdxl: text_encoder_2 has no text projection".into()))?;
        let encoder_hidden_states = Tensor::cat(
            &[
                first.penultimate_hidden_state(),
                second.penultimate_hidden_state(),
            ],
            2,
        )?;
        Ok(PromptEmbeds {
            encoder_hidden_states: encoder_hidden_states.to_dtype(DType::F32)?,
            text_embeds: text_embeds.to_dtype(DType::F32)?,
        })
    }

    /// The negative embeddings for one sample (batch 1): `negative_prompt` encoded, or, with
    /// none, zeros when `force_zeros_for_empty_prompt` and the encoded "" otherwise.
    pub fn encode_negative(&self, negative_prompt: Option<&str>) -> Result<PromptEmbeds> {
        let encoded = self.encode_prompts(&[negative_prompt.unwrap_or("")])?;
        if negative_prompt.is_none() && self.force_zeros_for_empty_prompt {
            return Ok(PromptEmbeds {
                encoder_hidden_states: encoded.encoder_hidden_states.zeros_like()?,
                text_embeds: encoded.text_embeds.zeros_like()?,
            });
        }
        Ok(encoded)
    }

    /// The condition of a batch: `encoder_hidden_states`, `text_embeds`, `time_ids` and the
    /// `negative` embeddings (repeated over the batch) that [`UNetBackbone::unconditional`]
    /// swaps in for classifier-free guidance (the negative's time ids are the same).
    pub fn condition(
        &self,
        embeds: &PromptEmbeds,
        negative: &PromptEmbeds,
        time_ids: &TimeIds,
    ) -> Result<Condition> {
        let batch = embeds.text_embeds.dim(0)?;
        let repeat = |t: &Tensor| -> Result<Tensor> {
            let mut dims = t.dims().to_vec();
            dims[0] = batch;
            t.broadcast_as(dims)?.contiguous()
        };
        let ids = Tensor::new(&time_ids.values(), &self.device)?
            .unsqueeze(0)?
            .broadcast_as((batch, 6))?
            .contiguous()?;
        Ok(Condition::new()
            .with(ENCODER_HIDDEN_STATES, embeds.encoder_hidden_states.clone())
            .with(TEXT_EMBEDS, embeds.text_embeds.clone())
            .with(TIME_IDS, ids)
            .with(
                NEGATIVE_ENCODER_HIDDEN_STATES,
                repeat(&negative.encoder_hidden_states)?,
            )
            .with(NEGATIVE_TEXT_EMBEDS, repeat(&negative.text_embeds)?))
    }

    /// Latents from `noise` (B, C, h, w) by `steps` DDIM steps over trailing timesteps with
    /// classifier-free guidance `cfg_scale`, computed in the noise's dtype (the UNet runs in
    /// its own and its prediction is cast back).
    pub fn sample(
        &self,
        noise: &Tensor,
        cond: &Condition,
        steps: usize,
        cfg_scale: f64,
    ) -> Result<Tensor> {
        let schedule = self.backbone.schedule();
        let timesteps = schedule.sampling_timesteps(steps)?;
        sample_ode(schedule, noise.clone(), &timesteps, |x_t, t| {
            let prediction = guided_prediction(&self.backbone, x_t, t, cond, cfg_scale)?
                .to_dtype(x_t.dtype())?;
            schedule.to_x0_eps(&prediction, x_t, t)
        })
    }
}

/// The UNet must read what the encoders produce: cross-attention width = both hidden sizes,
/// the added embedding = text_encoder_2's projection plus six time ids.
fn check_fit(unet: &unet_2d::Config, te: &clip::Config, te2: &clip::Config) -> Result<()> {
    if !unet.uses_text_time() {
        return Err(err(
            "unet/config.json has no `addition_embed_type = \"text_time\"`: not an SDXL UNet"
                .into(),
        ));
    }
    if !te2.has_projection() {
        return Err(err(
            "text_encoder_2/config.json is not a CLIPTextModelWithProjection".into(),
        ));
    }
    let context = te.hidden_size + te2.hidden_size;
    let cross = match &unet.cross_attention_dim {
        OneOrMany::One(d) => vec![*d],
        OneOrMany::Many(ds) => ds.clone(),
    };
    if cross.iter().any(|&d| d != context) {
        return Err(err(format!(
            "unet cross_attention_dim {cross:?} does not match text_encoder + text_encoder_2 hidden sizes {} + {} = {context}",
            te.hidden_size, te2.hidden_size
        )));
    }
    let added = te2.projection_dim + 6 * unet.addition_time_embed_dim.unwrap_or(0);
    if unet.projection_class_embeddings_input_dim != Some(added) {
        return Err(err(format!(
            "unet projection_class_embeddings_input_dim {:?} does not match text_encoder_2 projection_dim {} + 6 time ids x addition_time_embed_dim {:?} = {added}",
            unet.projection_class_embeddings_input_dim,
            te2.projection_dim,
            unet.addition_time_embed_dim
        )));
    }
    Ok(())
}

/// The VP schedule of `scheduler/scheduler_config.json` (any of diffusers' discrete VP
/// schedulers: DDIM, Euler, DPM-Solver, ... share these keys), or SDXL's without the file.
/// Settings that change the betas or the prediction and are not supported are errors naming
/// the key.
pub fn schedule_config(root: &Path) -> Result<ScheduleConfig> {
    let path = root.join("scheduler").join("scheduler_config.json");
    if !path.is_file() {
        return Ok(ScheduleConfig::sdxl());
    }
    let value: Value = read_json(&path)?;
    let bad = |key: &str, what: &str| {
        err(format!(
            "{}: `{key}` = {} is not supported ({what})",
            path.display(),
            value[key]
        ))
    };
    let number = |key: &str, default: f64| match value.get(key) {
        None => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| bad(key, "expected a number")),
    };
    if value.get("trained_betas").is_some_and(|v| !v.is_null()) {
        return Err(bad("trained_betas", "only computed betas"));
    }
    let mut config = ScheduleConfig::sdxl();
    if let ScheduleConfig::Vp {
        num_train_timesteps,
        beta_start,
        beta_end,
        beta_schedule,
        prediction,
        rescale_betas_zero_snr,
        ..
    } = &mut config
    {
        *num_train_timesteps = number("num_train_timesteps", *num_train_timesteps as f64)? as usize;
        *beta_start = number("beta_start", *beta_start)?;
        *beta_end = number("beta_end", *beta_end)?;
        *beta_schedule = match value.get("beta_schedule").and_then(Value::as_str) {
            None | Some("scaled_linear") => BetaSchedule::ScaledLinear,
            Some("linear") => BetaSchedule::Linear,
            Some(_) => return Err(bad("beta_schedule", "scaled_linear, linear")),
        };
        *prediction = match value.get("prediction_type").and_then(Value::as_str) {
            None | Some("epsilon") => VpPrediction::Epsilon,
            Some("v_prediction") => VpPrediction::V,
            Some(_) => return Err(bad("prediction_type", "epsilon, v_prediction")),
        };
        *rescale_betas_zero_snr = value
            .get("rescale_betas_zero_snr")
            .and_then(Value::as_bool)
            .unwrap_or(false);
    }
    Ok(config)
}

fn vae_scale_factor(root: &Path) -> Result<usize> {
    let path = root.join("vae").join("config.json");
    if !path.is_file() {
        return Ok(8);
    }
    let value: Value = read_json(&path)?;
    match value["block_out_channels"].as_array().map(Vec::len) {
        Some(levels) if levels > 0 => Ok(1 << (levels - 1)),
        _ => Err(err(format!(
            "{}: `block_out_channels` must be a non-empty list",
            path.display()
        ))),
    }
}
