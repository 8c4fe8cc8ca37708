//! transformers' T5 encoder (`T5EncoderModel`, `modeling_t5.py`): T5 v1.1 (`gated-gelu`; SD3's
//! `text_encoder_3` is T5-XXL, CogVideoX uses it too) and the original T5 (`relu`), plus the
//! T5 SentencePiece tokenizer from a `tokenizer.json`.
//!
//! Why not candle-transformers' `t5`: it is not a dependency of this workspace (a 4.5 min
//! build on 2 cores), its encoder forward takes no padding attention mask, and it leaves the
//! f16 overflow handling as TODOs. The encoder is frozen in our pipeline, but owning
//! it costs little, reads like the other families (serde `Config`, `new(vb, &cfg)`,
//! transformers' tensor names, loading through `loading.rs`), and is gradient-checked like
//! every other block (CANDLE_PITFALLS.md): attention is `adm_nn::scaled_dot_product_attention`,
//! the T5 layer norm (RMS, no mean subtraction, weight only) is `adm_nn::rms_norm`.
//!
//! The model (Raffel et al. 2020, "Exploring the Limits of Transfer Learning..."): a shared
//! token embedding, no absolute positions; a relative position bias (bucketed signed
//! distances, an embedding of `num_heads` per bucket) computed by the first block and added to
//! the attention scores of every block; no 1/sqrt(d) scaling of the scores (T5 folds it into
//! the weights); pre-norm residual blocks (self-attention, then the feed-forward); a final
//! layer norm. Tensor names: `shared.weight` (or `encoder.embed_tokens.weight`),
//! `encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight`,
//! `encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`,
//! `encoder.block.{i}.layer.{0,1}.layer_norm.weight`,
//! `encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo | wi,wo}.weight`,
//! `encoder.final_layer_norm.weight`.
//!
//! Half precision: T5's activations overflow f16 (transformers clamps the residual stream
//! to the f16 range after each sub-layer and keeps `wo` in f32, `_keep_in_fp32_modules`).
//! Here, for f16 and bf16 weights, the residual stream, the gated product and `wo` are f32;
//! the projections run in the weight dtype on the normalised (f32-computed) inputs. The
//! residual stream therefore never reaches the f16 limit and no clamp is needed.

use std::path::Path;

use adm_nn::{linear_no_bias, Linear};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

/// transformers' `T5Config` (the fields the encoder uses; unknown keys are ignored).
/// `dense_act_fn` and `is_gated_act` are derived from `feed_forward_proj`, as transformers
/// does; when config.json states them they must agree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_d_model")]
    pub d_model: usize,
    #[serde(default = "default_d_kv")]
    pub d_kv: usize,
    #[serde(default = "default_d_ff")]
    pub d_ff: usize,
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    #[serde(default = "default_num_heads")]
    pub num_heads: usize,
    #[serde(default = "default_num_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// `"relu"` (original T5), `"gated-gelu"` (T5 v1.1), or `[gated-]{act}`.
    #[serde(default = "default_feed_forward_proj")]
    pub feed_forward_proj: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dense_act_fn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_gated_act: Option<bool>,
}

fn default_vocab_size() -> usize {
    32128
}
fn default_d_model() -> usize {
    512
}
fn default_d_kv() -> usize {
    64
}
fn default_d_ff() -> usize {
    2048
}
fn default_num_layers() -> usize {
    6
}
fn default_num_heads() -> usize {
    8
}
fn default_num_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_layer_norm_epsilon() -> f64 {
    1e-6
}
fn default_feed_forward_proj() -> String {
    "relu".into()
}

/// Tensors some checkpoints carry that the encoder does not read (for
/// [`crate::loading::load_model`]): the tied copy of `shared.weight`.
pub const IGNORED_TENSORS: &[&str] = &["encoder.embed_tokens.weight"];

impl Config {
    /// google/t5-v1_1-xxl's encoder: SD3 / SD3.5 `text_encoder_3`, CogVideoX `text_encoder`.
    pub fn t5_v1_1_xxl() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
            dense_act_fn: Some("gelu_new".into()),
            is_gated_act: Some(true),
        }
    }

    /// transformers' derivation: `gated-{act}` is gated; `gated-gelu` means `gelu_new`.
    fn feed_forward(&self) -> Result<(bool, Activation)> {
        let bail = |msg: String| Err(candle_core::Error::Msg(format!("t5 config: {msg}")));
        let proj = self.feed_forward_proj.as_str();
        let (gated, act) = match proj.split('-').collect::<Vec<_>>().as_slice() {
            [act] => (false, *act),
            ["gated", act] => (true, *act),
            _ => {
                return bail(format!(
                    "feed_forward_proj `{proj}` is not `{{act}}` or `gated-{{act}}`"
                ))
            }
        };
        let act_name = if proj == "gated-gelu" {
            "gelu_new"
        } else {
            act
        };
        let Some(activation) = Activation::parse(act_name) else {
            return bail(format!(
                "activation `{act_name}` (from feed_forward_proj `{proj}`) is not supported (relu, gelu, gelu_new, gelu_pytorch_tanh, silu)"
            ));
        };
        if let Some(stated) = self.is_gated_act.filter(|&g| g != gated) {
            return bail(format!(
                "is_gated_act {stated} contradicts feed_forward_proj `{proj}`"
            ));
        }
        if let Some(stated) = self.dense_act_fn.as_deref().filter(|&a| a != act_name) {
            return bail(format!(
                "dense_act_fn `{stated}` contradicts feed_forward_proj `{proj}` (which means `{act_name}`)"
            ));
        }
        Ok((gated, activation))
    }

    /// Whether the feed-forward is gated (`DenseReluDense.wi_0` / `wi_1`).
    pub fn is_gated(&self) -> Result<bool> {
        Ok(self.feed_forward()?.0)
    }

    pub fn validate(&self) -> Result<()> {
        self.feed_forward()?;
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            candle_core::bail!("t5 config: {name} must be positive")
        }
        // Half the buckets per direction, half of those exact: fewer than 4 leaves no exact one.
        if self.relative_attention_num_buckets < 4 {
            candle_core::bail!(
                "t5 config: relative_attention_num_buckets ({}) must be at least 4",
                self.relative_attention_num_buckets
            )
        }
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets / 4 {
            candle_core::bail!(
                "t5 config: relative_attention_max_distance ({}) must exceed num_buckets / 4 ({})",
                self.relative_attention_max_distance,
                self.relative_attention_num_buckets / 4
            )
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    Relu,
    /// Exact (erf) GELU: transformers' `gelu`.
    Gelu,
    /// Tanh-approximated GELU: `gelu_new` / `gelu_pytorch_tanh`.
    GeluTanh,
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "relu" => Some(Self::Relu),
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Self::GeluTanh),
            "silu" | "swish" => Some(Self::Silu),
            _ => None,
        }
    }

    fn forward(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Relu => xs.relu(),
            Self::Gelu => xs.gelu_erf(),
            // candle's `gelu` is the tanh approximation.
            Self::GeluTanh => xs.gelu(),
            Self::Silu => adm_nn::silu(xs),
        }
    }
}

/// The dtype of the residual stream: f32 for half-precision weights (see the module doc).
fn stream_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// transformers' `T5Attention._relative_position_bucket` for the (bidirectional) encoder:
/// half the buckets for keys after the query; in each half, distances below `max_exact` have
/// their own bucket, larger ones are binned logarithmically up to `max_distance` (computed in
/// f32 and truncated, as transformers does).
fn relative_position_bucket(
    relative_position: i64,
    num_buckets: usize,
    max_distance: usize,
) -> u32 {
    let half = num_buckets / 2;
    let offset = if relative_position > 0 { half } else { 0 };
    let distance = relative_position.unsigned_abs() as usize;
    let max_exact = half / 2;
    let bucket = if distance < max_exact {
        distance
    } else {
        let log_ratio = (distance as f32 / max_exact as f32).ln()
            / (max_distance as f64 / max_exact as f64).ln() as f32;
        (max_exact + (log_ratio * (half - max_exact) as f32) as usize).min(half - 1)
    };
    (offset + bucket) as u32
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Only in the first block.
    relative_attention_bias: Option<Embedding>,
    heads: usize,
    d_kv: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &Config, has_relative_bias: bool) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        Ok(Self {
            q: linear_no_bias(cfg.d_model, inner, vb.pp("q"))?,
            k: linear_no_bias(cfg.d_model, inner, vb.pp("k"))?,
            v: linear_no_bias(cfg.d_model, inner, vb.pp("v"))?,
            o: linear_no_bias(inner, cfg.d_model, vb.pp("o"))?,
            relative_attention_bias: if has_relative_bias {
                Some(embedding(
                    cfg.relative_attention_num_buckets,
                    cfg.num_heads,
                    vb.pp("relative_attention_bias"),
                )?)
            } else {
                None
            },
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// `xs` (B, L, d_model) contiguous; `bias` additive, (B or 1, heads, L, L).
    fn forward(&self, xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, l, _) = xs.dims3()?;
        let split = |t: Tensor| t.reshape((b, l, self.heads, self.d_kv))?.transpose(1, 2);
        let q = split(self.q.forward(xs)?)?;
        let k = split(self.k.forward(xs)?)?;
        let v = split(self.v.forward(xs)?)?;
        let out = adm_nn::scaled_dot_product_attention(&q, &k, &v, Some(bias), Some(1.0))?;
        // reshape copies into a contiguous (B, L, inner) for `o` (candle's Linear is wrong on
        // non-contiguous batched input).
        self.o.forward(
            &out.transpose(1, 2)?
                .reshape((b, l, self.heads * self.d_kv))?,
        )
    }
}

#[derive(Debug, Clone)]
enum FeedForward {
    /// `DenseReluDense.wi`, `wo` (original T5).
    Plain { wi: Linear, wo: Linear },
    /// `DenseReluDense.wi_0` (activated), `wi_1` (linear gate), `wo` (T5 v1.1).
    Gated {
        wi_0: Linear,
        wi_1: Linear,
        wo: Linear,
    },
}

impl FeedForward {
    fn new(vb: VarBuilder, cfg: &Config, gated: bool) -> Result<Self> {
        let (d, ff) = (cfg.d_model, cfg.d_ff);
        // `wo` reads the f32 stream in half precision (transformers keeps it in f32 too).
        let wo = linear_no_bias(ff, d, vb.pp("wo").to_dtype(stream_dtype(vb.dtype())))?;
        Ok(if gated {
            Self::Gated {
                wi_0: linear_no_bias(d, ff, vb.pp("wi_0"))?,
                wi_1: linear_no_bias(d, ff, vb.pp("wi_1"))?,
                wo,
            }
        } else {
            Self::Plain {
                wi: linear_no_bias(d, ff, vb.pp("wi"))?,
                wo,
            }
        })
    }

    /// `xs` in the weight dtype; the result in the stream dtype.
    fn forward(&self, xs: &Tensor, act: Activation) -> Result<Tensor> {
        let stream = stream_dtype(xs.dtype());
        match self {
            Self::Plain { wi, wo } => wo.forward(&act.forward(&wi.forward(xs)?)?.to_dtype(stream)?),
            Self::Gated { wi_0, wi_1, wo } => {
                let gate = act.forward(&wi_0.forward(xs)?)?.to_dtype(stream)?;
                let linear = wi_1.forward(xs)?.to_dtype(stream)?;
                wo.forward(&(gate * linear)?)
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Block {
    attention_norm: adm_nn::RmsNorm,
    attention: Attention,
    feed_forward_norm: adm_nn::RmsNorm,
    feed_forward: FeedForward,
}

impl Block {
    fn new(vb: VarBuilder, cfg: &Config, index: usize, gated: bool) -> Result<Self> {
        let (d, eps) = (cfg.d_model, cfg.layer_norm_epsilon);
        let attn = vb.pp("layer.0");
        let ff = vb.pp("layer.1");
        Ok(Self {
            attention_norm: adm_nn::rms_norm(d, eps, attn.pp("layer_norm"))?,
            attention: Attention::new(attn.pp("SelfAttention"), cfg, index == 0)?,
            feed_forward_norm: adm_nn::rms_norm(d, eps, ff.pp("layer_norm"))?,
            feed_forward: FeedForward::new(ff.pp("DenseReluDense"), cfg, gated)?,
        })
    }

    /// `h`: the residual stream (stream dtype); `dtype`: the weight dtype.
    fn forward(&self, h: &Tensor, bias: &Tensor, act: Activation, dtype: DType) -> Result<Tensor> {
        let stream = h.dtype();
        let normed = self.attention_norm.forward(h)?.to_dtype(dtype)?;
        let h = (h + self.attention.forward(&normed, bias)?.to_dtype(stream)?)?;
        let normed = self.feed_forward_norm.forward(&h)?.to_dtype(dtype)?;
        &h + self.feed_forward.forward(&normed, act)?
    }
}

/// transformers' `T5EncoderModel`.
#[derive(Debug, Clone)]
pub struct T5EncoderModel {
    config: Config,
    shared: Embedding,
    blocks: Vec<Block>,
    final_layer_norm: adm_nn::RmsNorm,
    activation: Activation,
    dtype: DType,
    device: Device,
}

impl T5EncoderModel {
    /// `vb` is the checkpoint's root. The token embedding is `shared.weight`, or
    /// `encoder.embed_tokens.weight` when the checkpoint has only that.
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let (gated, activation) = cfg.feed_forward()?;
        let embed = if !vb.contains_tensor("shared.weight")
            && vb.contains_tensor("encoder.embed_tokens.weight")
        {
            vb.pp("encoder.embed_tokens")
        } else {
            vb.pp("shared")
        };
        let encoder = vb.pp("encoder");
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(encoder.pp(format!("block.{i}")), cfg, i, gated))
            .collect::<Result<_>>()?;
        Ok(Self {
            config: cfg.clone(),
            shared: embedding(cfg.vocab_size, cfg.d_model, embed)?,
            blocks,
            final_layer_norm: adm_nn::rms_norm(
                cfg.d_model,
                cfg.layer_norm_epsilon,
                encoder.pp("final_layer_norm"),
            )?,
            activation,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The last hidden state (B, L, d_model), in the weight dtype, of token ids (B, L) (any
    /// integer dtype). `attention_mask` (B, L): 1 keeps a token, 0 hides it as a key (padding),
    /// as transformers takes it; SD3 and CogVideoX pass none.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, l) = input_ids.dims2().map_err(|_| {
            candle_core::Error::Msg(format!(
                "t5: input_ids must be (B, L), got shape {:?}",
                input_ids.dims()
            ))
        })?;
        if l == 0 {
            candle_core::bail!("t5: input_ids has no tokens")
        }
        let ids = input_ids.to_dtype(DType::I64)?;
        let (min, max) = (
            ids.min_all()?.to_scalar::<i64>()?,
            ids.max_all()?.to_scalar::<i64>()?,
        );
        let vocab = self.config.vocab_size as i64;
        if let Some(bad) = [min, max].into_iter().find(|&i| i < 0 || i >= vocab) {
            candle_core::bail!("t5: token id {bad} is outside the vocabulary (vocab_size {vocab})")
        }
        let stream = stream_dtype(self.dtype);
        let ids = ids.to_dtype(DType::U32)?.to_device(&self.device)?;
        let mut h = self.shared.forward(&ids)?.to_dtype(stream)?;
        let bias = self.attention_bias(b, l, attention_mask)?;
        for block in &self.blocks {
            h = block.forward(&h, &bias, self.activation, self.dtype)?;
        }
        self.final_layer_norm.forward(&h)?.to_dtype(self.dtype)
    }

    /// The relative position bias of the first block (1, heads, L, L), plus the padding mask
    /// as (B, 1, 1, L) when given; in the stream dtype.
    fn attention_bias(
        &self,
        b: usize,
        l: usize,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let buckets: Vec<u32> = (0..l as i64)
            .flat_map(|query| {
                (0..l as i64).map(move |key| {
                    relative_position_bucket(
                        key - query,
                        cfg.relative_attention_num_buckets,
                        cfg.relative_attention_max_distance,
                    )
                })
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, (l, l), &self.device)?;
        let table = self.blocks[0]
            .attention
            .relative_attention_bias
            .as_ref()
            .expect("block 0 has the relative attention bias");
        let position_bias = table
            .forward(&buckets)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_dtype(stream_dtype(self.dtype))?;
        let Some(mask) = attention_mask else {
            return Ok(position_bias);
        };
        if mask.dims() != [b, l] {
            candle_core::bail!(
                "t5: attention_mask has shape {:?}, input_ids ({b}, {l})",
                mask.dims()
            )
        }
        let keep = mask
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?;
        if let Some(row) = keep.iter().position(|r| r.iter().all(|&v| v == 0.0)) {
            candle_core::bail!("t5: attention_mask row {row} hides every token")
        }
        // The most negative value of the attention dtype, as transformers uses: finite, and
        // exp(score - max) underflows to exactly 0.
        let hidden = match self.dtype {
            DType::F16 => -65504.0,
            DType::BF16 => -3.389_531_389_251_535_5e38,
            DType::F64 => f64::MIN,
            _ => f32::MIN as f64,
        };
        let additive: Vec<f64> = keep
            .iter()
            .flatten()
            .map(|&v| if v != 0.0 { 0.0 } else { hidden })
            .collect();
        let additive = Tensor::from_vec(additive, (b, 1, 1, l), &Device::Cpu)?
            .to_dtype(position_bias.dtype())?
            .to_device(&self.device)?;
        position_bias.broadcast_add(&additive)
    }
}

fn tok_err(what: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("t5 tokenizer: {what}"))
}

/// The T5 SentencePiece tokenizer (transformers' `T5TokenizerFast`) from its `tokenizer.json`:
/// prompts to `[tokens (truncated to max_length - 1)..., </s>, <pad>...]`, as diffusers asks
/// for them (`padding="max_length"`, `truncation=True`).
#[derive(Clone)]
pub struct T5Tokenizer {
    tokenizer: tokenizers::Tokenizer,
    max_length: usize,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("max_length", &self.max_length)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl T5Tokenizer {
    /// diffusers' SD3 default `max_sequence_length` (CogVideoX uses 226).
    pub const DEFAULT_MAX_LENGTH: usize = 256;

    /// From a `tokenizer.json` with the `</s>` and `<pad>` tokens.
    pub fn from_file(path: &Path) -> Result<Self> {
        let tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| tok_err(format!("cannot load {}: {e}", path.display())))?;
        let id = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| tok_err(format!("token `{token}` is not in {}", path.display())))
        };
        Ok(Self {
            eos_id: id("</s>")?,
            pad_id: id("<pad>")?,
            max_length: Self::DEFAULT_MAX_LENGTH,
            tokenizer,
        })
    }

    /// Sequence length, the eos included.
    pub fn with_max_length(mut self, max_length: usize) -> Result<Self> {
        if max_length == 0 {
            return Err(tok_err("max_length must leave room for the eos token"));
        }
        self.max_length = max_length;
        Ok(self)
    }

    pub fn max_length(&self) -> usize {
        self.max_length
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

    /// Ids of one prompt, `max_length` long.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| tok_err(format!("cannot encode {prompt:?}: {e}")))?;
        let tokens = encoding.get_ids();
        let n = tokens.len().min(self.max_length - 1);
        let mut ids = Vec::with_capacity(self.max_length);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets against transformers' `_relative_position_bucket` (bidirectional, 32 buckets,
    /// max_distance 128), values printed by torch for these distances.
    #[test]
    fn relative_position_buckets_match_transformers() {
        let distances = [
            -200, -128, -100, -20, -9, -8, -7, -1, 0, 1, 7, 8, 9, 20, 100, 127, 128, 500,
        ];
        let want = [
            15, 15, 15, 10, 8, 8, 7, 1, 0, 17, 23, 24, 24, 26, 31, 31, 31, 31,
        ];
        let got: Vec<u32> = distances
            .iter()
            .map(|&d| relative_position_bucket(d, 32, 128))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn config_derives_the_feed_forward_like_transformers() {
        let cfg = |proj: &str| Config {
            feed_forward_proj: proj.into(),
            dense_act_fn: None,
            is_gated_act: None,
            ..Config::t5_v1_1_xxl()
        };
        assert!(cfg("gated-gelu").is_gated().unwrap());
        assert!(!cfg("relu").is_gated().unwrap());
        assert!(cfg("gated-silu").is_gated().unwrap());
        for bad in ["gated-tanh", "gelu-gated", "gated-gelu-x"] {
            let err = cfg(bad).validate().unwrap_err().to_string();
            assert!(
                err.contains("feed_forward_proj") || err.contains("activation"),
                "{err}"
            );
        }
        let mut c = cfg("relu");
        c.is_gated_act = Some(true);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("is_gated_act"));
        let mut c = cfg("gated-gelu");
        c.dense_act_fn = Some("gelu".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("dense_act_fn"));
        Config::t5_v1_1_xxl().validate().unwrap();
        let mut c = Config::t5_v1_1_xxl();
        c.relative_attention_num_buckets = 2;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("num_buckets"));
    }
}
