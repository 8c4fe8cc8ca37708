//! transformers' CLIP text encoder (`CLIPTextModel`, `CLIPTextModelWithProjection`): CLIP-L
//! and OpenCLIP bigG as SD / SDXL / SD3 use them, and the CLIP BPE tokenizer.
//!
//! Tensor names follow transformers exactly (`text_model.encoder.layers.{i}.self_attn.q_proj.weight`,
//! `text_projection.weight`); checkpoints without the `text_model.` prefix load too. Only
//! ops whose backward is verified are used (CANDLE_PITFALLS.md): attention is
//! `adm_nn::scaled_dot_product_attention`, layer norm is `adm_nn::LayerNorm`.
//!
//! Outputs: the last hidden state (after `final_layer_norm`), every hidden state
//! (`hidden_states[0]` is the embeddings, `hidden_states[-2]` is what SDXL conditions on),
//! the pooled output (the EOS token's final state) and, with a projection, `text_embeds`.

use std::path::Path;

use adm_nn::{linear, linear_no_bias, Linear};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

/// transformers' `CLIPTextConfig` (a text encoder's config.json). Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_size")]
    pub projection_dim: usize,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_pad")]
    pub pad_token_id: u32,
    #[serde(default = "default_bos")]
    pub bos_token_id: u32,
    /// 2 (the value in older configs, SD / SDXL included) means "the largest id is the EOS":
    /// the pooled output is taken at the argmax of the ids, as transformers does.
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    /// transformers' class list (`CLIPTextModel` or `CLIPTextModelWithProjection`).
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    8
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> String {
    "quick_gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_pad() -> u32 {
    1
}
fn default_bos() -> u32 {
    49406
}
fn default_eos() -> u32 {
    49407
}

const WITH_PROJECTION: &str = "CLIPTextModelWithProjection";
/// Buffers some checkpoints carry that are not parameters (for [`crate::loading::load_model`]).
pub const IGNORED_TENSORS: &[&str] = &["embeddings.position_ids"];

impl Config {
    /// SD 1.x / SDXL `text_encoder`: OpenAI CLIP ViT-L/14's text tower.
    pub fn clip_l() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            pad_token_id: 1,
            bos_token_id: 0,
            eos_token_id: 2,
            architectures: Some(vec!["CLIPTextModel".into()]),
        }
    }

    /// SDXL `text_encoder_2` / SD3 `text_encoder_2`: OpenCLIP ViT-bigG/14's text tower, with
    /// its projection.
    pub fn open_clip_bigg() -> Self {
        Self {
            hidden_size: 1280,
            intermediate_size: 5120,
            projection_dim: 1280,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: "gelu".into(),
            architectures: Some(vec![WITH_PROJECTION.into()]),
            ..Self::clip_l()
        }
    }

    /// Whether config.json names `CLIPTextModelWithProjection`.
    pub fn has_projection(&self) -> bool {
        self.architectures
            .as_ref()
            .is_some_and(|a| a.iter().any(|c| c == WITH_PROJECTION))
    }

    pub fn validate(&self) -> Result<()> {
        let bail = |msg: String| -> Result<()> {
            Err(candle_core::Error::Msg(format!("clip config: {msg}")))
        };
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bail(format!(
                "num_attention_heads ({}) must divide hidden_size ({})",
                self.num_attention_heads, self.hidden_size
            ));
        }
        if Activation::parse(&self.hidden_act).is_none() {
            return bail(format!(
                "hidden_act `{}` is not supported (quick_gelu, gelu)",
                self.hidden_act
            ));
        }
        if self.vocab_size == 0 || self.max_position_embeddings == 0 || self.num_hidden_layers == 0
        {
            return bail(
                "vocab_size, max_position_embeddings and num_hidden_layers must be positive".into(),
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            // transformers' "gelu" is the exact (erf) GELU.
            "gelu" => Some(Self::Gelu),
            _ => None,
        }
    }

    fn forward(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            // x · sigmoid(1.702 x), from primitives with checked gradients.
            Self::QuickGelu => xs / ((xs * -1.702)?.exp()? + 1.0)?,
            Self::Gelu => xs.gelu_erf(),
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim: d / cfg.num_attention_heads,
        })
    }

    /// `xs` (B, L, D) contiguous; `mask` additive, (L, L) or (B, 1, L, L).
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, d) = xs.dims3()?;
        let split = |t: Tensor| {
            t.reshape((b, l, self.heads, self.head_dim))?
                .transpose(1, 2)
        };
        let q = split(self.q_proj.forward(xs)?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let out = adm_nn::scaled_dot_product_attention(&q, &k, &v, Some(mask), None)?;
        // reshape copies the transposed heads into a contiguous (B, L, D) (candle's Linear
        // is wrong on non-contiguous batched input).
        self.out_proj
            .forward(&out.transpose(1, 2)?.reshape((b, l, d))?)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: adm_nn::LayerNorm,
    self_attn: Attention,
    layer_norm2: adm_nn::LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, cfg: &Config, act: Activation) -> Result<Self> {
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            layer_norm1: adm_nn::layer_norm(d, eps, true, vb.pp("layer_norm1"))?,
            self_attn: Attention::new(vb.pp("self_attn"), cfg)?,
            layer_norm2: adm_nn::layer_norm(d, eps, true, vb.pp("layer_norm2"))?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp.fc2"))?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = (self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, mask)?
            + xs)?;
        let m = self.fc1.forward(&self.layer_norm2.forward(&h)?)?;
        self.fc2.forward(&self.act.forward(&m)?)? + h
    }
}

/// What [`ClipTextModel::forward`] returns.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// (B, L, D), after `final_layer_norm`.
    pub last_hidden_state: Tensor,
    /// The embeddings and every layer's output (before `final_layer_norm`): N + 1 tensors
    /// of (B, L, D), as transformers' `hidden_states`.
    pub hidden_states: Vec<Tensor>,
    /// (B, D): the final state at the EOS token.
    pub pooled_output: Tensor,
    /// (B, projection_dim): the projected pooled output (`CLIPTextModelWithProjection`).
    pub text_embeds: Option<Tensor>,
}

impl ClipTextOutput {
    /// `hidden_states[-2]`: the input of the last layer (what SDXL's UNet conditions on).
    pub fn penultimate_hidden_state(&self) -> &Tensor {
        &self.hidden_states[self.hidden_states.len() - 2]
    }
}

/// transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    config: Config,
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: adm_nn::LayerNorm,
    text_projection: Option<Linear>,
}

impl ClipTextModel {
    /// Builds the model `config.architectures` names (with the projection for
    /// `CLIPTextModelWithProjection`). `vb` is the checkpoint's root: tensors may or may not
    /// carry the `text_model.` prefix.
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Self::build(vb, cfg, cfg.has_projection())
    }

    /// As [`ClipTextModel::new`], choosing explicitly whether to load `text_projection`.
    pub fn build(vb: VarBuilder, cfg: &Config, with_projection: bool) -> Result<Self> {
        cfg.validate()?;
        let act = Activation::parse(&cfg.hidden_act).expect("validated");
        let text = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let d = cfg.hidden_size;
        let position_embedding = text
            .pp("embeddings.position_embedding")
            .get((cfg.max_position_embeddings, d), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(text.pp(format!("encoder.layers.{i}")), cfg, act))
            .collect::<Result<_>>()?;
        Ok(Self {
            config: cfg.clone(),
            token_embedding: embedding(cfg.vocab_size, d, text.pp("embeddings.token_embedding"))?,
            position_embedding,
            layers,
            final_layer_norm: adm_nn::layer_norm(
                d,
                cfg.layer_norm_eps,
                true,
                text.pp("final_layer_norm"),
            )?,
            text_projection: if with_projection {
                Some(linear_no_bias(
                    d,
                    cfg.projection_dim,
                    vb.pp("text_projection"),
                )?)
            } else {
                None
            },
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Runs the encoder on token ids (B, L) (any integer dtype, L <= max_position_embeddings)
    /// with the causal mask and, optionally, a padding `attention_mask` (B, L) of 1 (keep)
    /// and 0 (padding) as transformers takes it (SD / SDXL pass none).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<ClipTextOutput> {
        let (b, l) = input_ids.dims2().map_err(|_| {
            candle_core::Error::Msg(format!(
                "clip: input_ids must be (B, L), got shape {:?}",
                input_ids.dims()
            ))
        })?;
        let cfg = &self.config;
        if l == 0 || l > cfg.max_position_embeddings {
            candle_core::bail!(
                "clip: sequence length {l} must be in 1..={} (max_position_embeddings)",
                cfg.max_position_embeddings
            )
        }
        let ids: Vec<Vec<i64>> = input_ids.to_dtype(DType::I64)?.to_vec2()?;
        if let Some(bad) = ids
            .iter()
            .flatten()
            .find(|&&i| i < 0 || i as usize >= cfg.vocab_size)
        {
            candle_core::bail!(
                "clip: token id {bad} is outside the vocabulary (vocab_size {})",
                cfg.vocab_size
            )
        }
        let device = self.position_embedding.device();
        let dtype = self.position_embedding.dtype();
        let flat_ids = input_ids.to_dtype(DType::U32)?.to_device(device)?;
        let tokens = self.token_embedding.forward(&flat_ids)?;
        let positions = self.position_embedding.narrow(0, 0, l)?;
        let mut h = tokens.broadcast_add(&positions)?;

        let mask = self.mask(b, l, attention_mask, dtype, device)?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(h.clone());
        for layer in &self.layers {
            h = layer.forward(&h, &mask)?;
            hidden_states.push(h.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&h)?;

        // The EOS position per row: the argmax of the ids (legacy eos_token_id 2), or the
        // first eos_token_id.
        let eos = cfg.eos_token_id as i64;
        let positions = ids
            .iter()
            .enumerate()
            .map(|(row, ids)| {
                if eos == 2 {
                    let max = ids.iter().copied().max().unwrap_or(0);
                    Ok(ids.iter().position(|&i| i == max).unwrap_or(0))
                } else {
                    ids.iter().position(|&i| i == eos).ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "clip: row {row} of input_ids has no eos token (id {eos}); the pooled output is taken there"
                        ))
                    })
                }
            })
            .collect::<Result<Vec<usize>>>()?;
        let index: Vec<u32> = positions
            .iter()
            .enumerate()
            .map(|(row, &p)| (row * l + p) as u32)
            .collect();
        let index = Tensor::new(index, device)?;
        let d = cfg.hidden_size;
        let pooled_output = last_hidden_state
            .reshape((b * l, d))?
            .index_select(&index, 0)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled_output)?),
            None => None,
        };
        Ok(ClipTextOutput {
            last_hidden_state,
            hidden_states,
            pooled_output,
            text_embeds,
        })
    }

    /// The additive causal mask (L, L), combined with a padding mask into (B, 1, L, L).
    fn mask(
        &self,
        b: usize,
        l: usize,
        attention_mask: Option<&Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        // The most negative finite value of the dtype, as transformers uses (never -inf, so
        // no row turns into NaN).
        let min = match dtype {
            DType::F16 => -65504.0,
            DType::F64 => f64::MIN,
            _ => f32::MIN as f64,
        };
        let keep: Vec<Vec<bool>> = match attention_mask {
            None => vec![vec![true; l]],
            Some(m) => {
                if m.dims() != [b, l] {
                    candle_core::bail!(
                        "clip: attention_mask has shape {:?}, input_ids ({b}, {l})",
                        m.dims()
                    )
                }
                m.to_dtype(DType::F64)?
                    .to_vec2::<f64>()?
                    .into_iter()
                    .map(|row| row.into_iter().map(|v| v != 0.0).collect())
                    .collect()
            }
        };
        let mut values = Vec::with_capacity(keep.len() * l * l);
        for row in &keep {
            for i in 0..l {
                for (j, &k) in row.iter().enumerate() {
                    values.push(if j <= i && k { 0.0 } else { min });
                }
            }
        }
        let mask = Tensor::from_vec(values, (keep.len(), 1, l, l), &Device::Cpu)?;
        let mask = if attention_mask.is_none() {
            mask.reshape((l, l))?
        } else {
            mask
        };
        mask.to_dtype(dtype)?.to_device(device)
    }
}

fn tok_err(what: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("clip tokenizer: {what}"))
}

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// The CLIP BPE tokenizer (transformers' `CLIPTokenizer`), on the `tokenizers` crate:
/// prompts to ids `[bos, tokens..., eos, pad...]`, truncated and padded to `max_length`.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: tokenizers::Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_length", &self.max_length)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl ClipTokenizer {
    /// From a `tokenizer.json` (as transformers' CLIPTokenizer saves it). Pads with
    /// `pad_token` (default: the EOS token, as CLIP-L's tokenizer does), 77 tokens.
    pub fn from_file(path: &Path, pad_token: Option<&str>) -> Result<Self> {
        let tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| tok_err(format!("cannot load {}: {e}", path.display())))?;
        Self::from_tokenizer(tokenizer, pad_token)
    }

    /// From CLIP's `vocab.json` and `merges.txt` (what SD / SDXL repos ship in `tokenizer/`),
    /// with the same normalizer and pre-tokenizer as transformers' CLIPTokenizer; the pad
    /// token (default EOS), like the BOS and EOS, is a special token.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path, pad_token: Option<&str>) -> Result<Self> {
        let vocab_text = std::fs::read_to_string(vocab)
            .map_err(|e| tok_err(format!("cannot read {}: {e}", vocab.display())))?;
        let vocab_map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&vocab_text)
                .map_err(|e| tok_err(format!("cannot parse {}: {e}", vocab.display())))?;
        let merges_text = std::fs::read_to_string(merges)
            .map_err(|e| tok_err(format!("cannot read {}: {e}", merges.display())))?;
        let mut pairs = Vec::new();
        for (n, line) in merges_text.lines().enumerate() {
            if line.starts_with("#version") || line.trim().is_empty() {
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => pairs.push(serde_json::json!([a, b])),
                _ => {
                    return Err(tok_err(format!(
                        "{} line {}: expected two symbols, got `{line}`",
                        merges.display(),
                        n + 1
                    )))
                }
            }
        }
        let pad = pad_token.unwrap_or(EOS);
        let mut added = Vec::new();
        for token in [pad, BOS, EOS] {
            let id = vocab_map
                .get(token)
                .and_then(|v| v.as_u64())
                .ok_or_else(|| tok_err(format!("token `{token}` is not in {}", vocab.display())))?;
            if !added.iter().any(|t: &serde_json::Value| t["id"] == id) {
                added.push(serde_json::json!({
                    "id": id, "content": token, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true
                }));
            }
        }
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex":
                    "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
                 "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": EOS,
                "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab_map, "merges": pairs
            }
        });
        let tokenizer: tokenizers::Tokenizer = json
            .to_string()
            .parse()
            .map_err(|e| tok_err(format!("cannot build from {}: {e}", vocab.display())))?;
        Self::from_tokenizer(tokenizer, Some(pad))
    }

    /// From a tokenizer folder: `tokenizer.json` if present, else `vocab.json` +
    /// `merges.txt`; the pad token and length from `tokenizer_config.json` /
    /// `special_tokens_map.json` when they say.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let mut pad: Option<String> = None;
        let mut max_length = None;
        for file in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(file);
            if !path.is_file() {
                continue;
            }
            let value: serde_json::Value = crate::loading::read_json(&path)?;
            if pad.is_none() {
                pad = match &value["pad_token"] {
                    serde_json::Value::String(s) => Some(s.clone()),
                    v => v["content"].as_str().map(str::to_string),
                };
            }
            if max_length.is_none() {
                max_length = value["model_max_length"]
                    .as_u64()
                    .filter(|&n| n > 0 && n < 1 << 20)
                    .map(|n| n as usize);
            }
        }
        let json = dir.join("tokenizer.json");
        let tok = if json.is_file() {
            Self::from_file(&json, pad.as_deref())?
        } else {
            Self::from_vocab_merges(
                &dir.join("vocab.json"),
                &dir.join("merges.txt"),
                pad.as_deref(),
            )?
        };
        Ok(match max_length {
            Some(n) => tok.with_max_length(n)?,
            None => tok,
        })
    }

    fn from_tokenizer(tokenizer: tokenizers::Tokenizer, pad_token: Option<&str>) -> Result<Self> {
        let id = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| tok_err(format!("token `{token}` is not in the vocabulary")))
        };
        let pad = match pad_token {
            Some(p) => id(p)?,
            None => match tokenizer.get_padding() {
                Some(p) => p.pad_id,
                None => id(EOS)?,
            },
        };
        Ok(Self {
            bos_id: id(BOS)?,
            eos_id: id(EOS)?,
            pad_id: pad,
            max_length: 77,
            tokenizer,
        })
    }

    /// Sequence length (default 77, CLIP's context).
    pub fn with_max_length(mut self, max_length: usize) -> Result<Self> {
        if max_length < 2 {
            return Err(tok_err(format!(
                "max_length {max_length} leaves no room for bos and eos"
            )));
        }
        self.max_length = max_length;
        Ok(self)
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Ids of one prompt: `[bos, tokens (truncated to max_length - 2)..., eos, pad...]`.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| tok_err(format!("cannot encode {prompt:?}: {e}")))?;
        let tokens = encoding.get_ids();
        let n = tokens.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&tokens[..n]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// Ids of a batch of prompts as a (B, max_length) u32 tensor.
    pub fn encode_batch(&self, prompts: &[&str], device: &Device) -> Result<Tensor> {
        let rows = prompts
            .iter()
            .map(|p| self.encode(p))
            .collect::<Result<Vec<_>>>()?;
        let flat: Vec<u32> = rows.into_iter().flatten().collect();
        Tensor::from_vec(flat, (prompts.len(), self.max_length), device)
    }
}
