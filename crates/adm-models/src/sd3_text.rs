//! SD3 / SD3.5's triple text-encoder conditioning, as diffusers'
//! `StableDiffusion3Pipeline.encode_prompt` builds it (`pipeline_stable_diffusion_3.py`):
//!
//! - CLIP-L (`text_encoder`) and OpenCLIP bigG (`text_encoder_2`), both
//!   `CLIPTextModelWithProjection` without an attention mask: their penultimate hidden states
//!   are concatenated on the channel axis and zero-padded to the T5 width
//!   (`joint_attention_dim`);
//! - T5 v1.1 XXL (`text_encoder_3`, no attention mask): its last hidden state is appended along
//!   the sequence axis; without T5, zeros of (B, max_sequence_length, joint_attention_dim);
//! - the pooled projections are cat(CLIP-L text_embeds, bigG text_embeds).
//!
//! The result is a [`Condition`] named like the arguments of diffusers'
//! `SD3Transformer2DModel.forward`: `encoder_hidden_states` (B, 77 + T, joint_attention_dim) and
//! `pooled_projections` (B, 2048 for SD3). `clip_skip` is not supported (diffusers' default).
//! The classifier-free-guidance negative condition is the backbone's business
//! (`Backbone::unconditional`), not this module's.

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, D};

use crate::clip::{self, ClipTextModel, ClipTokenizer};
use crate::loading::{load_model, read_config, ModelIndex};
use crate::t5::{self, T5EncoderModel, T5Tokenizer};
use crate::Condition;

/// The condition names (diffusers' `SD3Transformer2DModel.forward` arguments).
pub const ENCODER_HIDDEN_STATES: &str = "encoder_hidden_states";
pub const POOLED_PROJECTIONS: &str = "pooled_projections";

/// Token ids of a batch of prompts for each encoder, (B, L) each.
#[derive(Debug, Clone)]
pub struct Sd3PromptIds {
    pub clip_l: Tensor,
    pub clip_g: Tensor,
    /// Required when the encoders include T5; not read otherwise.
    pub t5: Option<Tensor>,
}

/// The three tokenizers of an SD3 pipeline (`tokenizer`, `tokenizer_2`, `tokenizer_3`).
#[derive(Debug, Clone)]
pub struct Sd3Tokenizers {
    pub clip_l: ClipTokenizer,
    pub clip_g: ClipTokenizer,
    pub t5: Option<T5Tokenizer>,
}

impl Sd3Tokenizers {
    /// Ids of `prompts` for every encoder (the same prompt for all three, diffusers' default).
    pub fn encode_batch(&self, prompts: &[&str], device: &Device) -> Result<Sd3PromptIds> {
        Ok(Sd3PromptIds {
            clip_l: self.clip_l.encode_batch(prompts, device)?,
            clip_g: self.clip_g.encode_batch(prompts, device)?,
            t5: match &self.t5 {
                Some(t) => Some(t.encode_batch(prompts, device)?),
                None => None,
            },
        })
    }
}

/// CLIP-L, bigG and (optionally) T5, combined as SD3 conditions on them.
#[derive(Debug, Clone)]
pub struct Sd3TextEncoders {
    clip_l: ClipTextModel,
    clip_g: ClipTextModel,
    t5: Option<T5EncoderModel>,
    joint_attention_dim: usize,
    max_sequence_length: usize,
}

impl Sd3TextEncoders {
    /// `joint_attention_dim`: the transformer's text width (4096 for SD3; T5's `d_model` must
    /// equal it); `max_sequence_length`: the T5 token count (diffusers' default 256), also the
    /// length of the zeros that replace T5 when it is absent.
    pub fn new(
        clip_l: ClipTextModel,
        clip_g: ClipTextModel,
        t5: Option<T5EncoderModel>,
        joint_attention_dim: usize,
        max_sequence_length: usize,
    ) -> Result<Self> {
        let clip_width = clip_l.config().hidden_size + clip_g.config().hidden_size;
        if clip_width > joint_attention_dim {
            candle_core::bail!(
                "sd3 text: CLIP-L + bigG width {clip_width} exceeds joint_attention_dim {joint_attention_dim}"
            )
        }
        if let Some(t5) = &t5 {
            if t5.config().d_model != joint_attention_dim {
                candle_core::bail!(
                    "sd3 text: T5 d_model {} differs from joint_attention_dim {joint_attention_dim}",
                    t5.config().d_model
                )
            }
        }
        if max_sequence_length == 0 {
            candle_core::bail!("sd3 text: max_sequence_length must be positive")
        }
        Ok(Self {
            clip_l,
            clip_g,
            t5,
            joint_attention_dim,
            max_sequence_length,
        })
    }

    /// The encoders of an SD3 pipeline folder (`model_index.json`, `text_encoder`,
    /// `text_encoder_2`, `text_encoder_3` unless the index lists it as null or not at all,
    /// `transformer/config.json` for `joint_attention_dim`), frozen, in `dtype`.
    pub fn load(
        root: &Path,
        dtype: DType,
        device: &Device,
        max_sequence_length: usize,
    ) -> Result<Self> {
        let index = ModelIndex::read(root)?;
        let load_clip = |name: &str| -> Result<ClipTextModel> {
            let dir = index.component_dir(root, name)?;
            let cfg: clip::Config = read_config(&dir)?;
            load_model(&dir, None, dtype, device, clip::IGNORED_TENSORS, |vb| {
                ClipTextModel::new(vb, &cfg)
            })
        };
        let clip_l = load_clip("text_encoder")?;
        let clip_g = load_clip("text_encoder_2")?;
        // diffusers loads a pipeline without T5 when the index lists it as null.
        let t5_listed = index
            .components
            .get("text_encoder_3")
            .is_some_and(|(_, class)| class.is_some());
        let t5 = if t5_listed {
            let dir = index.component_dir(root, "text_encoder_3")?;
            let cfg: t5::Config = read_config(&dir)?;
            Some(load_model(
                &dir,
                None,
                dtype,
                device,
                t5::IGNORED_TENSORS,
                |vb| T5EncoderModel::new(vb, &cfg),
            )?)
        } else {
            None
        };
        let transformer: serde_json::Value =
            read_config(&index.component_dir(root, "transformer")?)?;
        let joint_attention_dim = transformer["joint_attention_dim"].as_u64().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: transformer/config.json has no integer `joint_attention_dim`",
                root.display()
            ))
        })? as usize;
        Self::new(clip_l, clip_g, t5, joint_attention_dim, max_sequence_length)
    }

    pub fn has_t5(&self) -> bool {
        self.t5.is_some()
    }

    pub fn max_sequence_length(&self) -> usize {
        self.max_sequence_length
    }

    /// `encoder_hidden_states` and `pooled_projections` for a batch of prompt ids, in the
    /// CLIP-L dtype.
    pub fn encode(&self, ids: &Sd3PromptIds) -> Result<Condition> {
        let batch = ids.clip_l.dim(0)?;
        if ids.clip_g.dim(0)? != batch {
            candle_core::bail!(
                "sd3 text: clip_l ids have {batch} rows, clip_g ids {}",
                ids.clip_g.dim(0)?
            )
        }
        let l = self.clip_l.forward(&ids.clip_l, None)?;
        let g = self.clip_g.forward(&ids.clip_g, None)?;
        let projected = |out: &clip::ClipTextOutput, name: &str| {
            out.text_embeds.clone().ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "sd3 text: {name} has no text_projection (SD3 needs CLIPTextModelWithProjection)"
                ))
            })
        };
        let pooled = Tensor::cat(
            &[projected(&l, "clip_l")?, projected(&g, "clip_g")?],
            D::Minus1,
        )?;
        let dtype = pooled.dtype();
        let clip = Tensor::cat(
            &[l.penultimate_hidden_state(), g.penultimate_hidden_state()],
            D::Minus1,
        )?;
        let clip = clip.pad_with_zeros(
            D::Minus1,
            0,
            self.joint_attention_dim - clip.dim(D::Minus1)?,
        )?;
        let t5 = match &self.t5 {
            Some(t5) => {
                let t5_ids = ids.t5.as_ref().ok_or_else(|| {
                    candle_core::Error::Msg(
                        "sd3 text: the encoders include T5 but no t5 ids were given".into(),
                    )
                })?;
                if t5_ids.dims() != [batch, self.max_sequence_length] {
                    candle_core::bail!(
                        "sd3 text: t5 ids have shape {:?}, expected ({batch}, {}) (max_sequence_length)",
                        t5_ids.dims(),
                        self.max_sequence_length
                    )
                }
                t5.forward(t5_ids, None)?.to_dtype(dtype)?
            }
            None => Tensor::zeros(
                (batch, self.max_sequence_length, self.joint_attention_dim),
                dtype,
                clip.device(),
            )?,
        };
        Ok(Condition::new()
            .with(ENCODER_HIDDEN_STATES, Tensor::cat(&[clip, t5], 1)?)
            .with(POOLED_PROJECTIONS, pooled))
    }
}
