//! The logic of the `adm-forward` binary: run one diffusers model folder on inputs read
//! from a safetensors file, under diffusers' forward-argument names, and write the output.
//!
//! Supported classes (config.json `_class_name`):
//! - `UNet2DConditionModel`: inputs `sample` (B, C, H, W), `timestep` ((B,) or one value),
//!   `encoder_hidden_states` (B, L, D) and, for SDXL (`addition_embed_type = text_time`),
//!   `text_embeds` (B, P) and `time_ids` (B, 6); output `sample`.
//! - `AutoencoderKL`: input `latent` (B, latent_channels, h, w), unscaled as
//!   `AutoencoderKL.decode` takes it; output the decoded `sample`.
//! - `AutoencoderKLCogVideoX`: input `latent` (B, latent_channels, F, h, w), unscaled as
//!   `AutoencoderKLCogVideoX.decode` takes it; output the decoded frames `sample`
//!   (B, 3, F', H, W). Encoder tensors in the checkpoint are skipped.
//! - `CogVideoXTransformer3DModel`: inputs `hidden_states` (B, F, C, H, W), `timestep`
//!   ((B,) or one value), `encoder_hidden_states` (B, L, D); output `sample` (B, F, C, H, W).
//! - `SD3Transformer2DModel` (SD3 / SD3.5): inputs `hidden_states` (B, C, H, W), `timestep`
//!   ((B,) or one value, 1000 x sigma), `encoder_hidden_states` (B, L, D) and
//!   `pooled_projections` (B, P); output `sample` (the flow velocity).
//!
//! The output is written in f32 whatever the compute dtype.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};

use crate::cogvideox::{self, CogVideoXTransformer3DModel};
use crate::cogvideox_vae;
use crate::loading::{class_name, load_model, read_config, resolve_model, ModelIndex};
use crate::mmdit::{self, SD3Transformer2DModel};
use crate::unet_2d::{self, TextTime, UNet2DConditionModel};
use crate::vae::{self, AutoencoderKL};

/// The classes [`forward_dir`] runs.
pub const SUPPORTED: &[&str] = &[
    "UNet2DConditionModel",
    "AutoencoderKL",
    "AutoencoderKLCogVideoX",
    "CogVideoXTransformer3DModel",
    "SD3Transformer2DModel",
];

/// What `adm-forward` was asked to do.
#[derive(Debug, Clone)]
pub struct ForwardArgs {
    /// A component folder (with config.json), a pipeline folder (with model_index.json; then
    /// `component` picks the folder), or a hub repo id found in the local hub cache.
    pub model: String,
    /// The component of a pipeline folder (`unet`, `vae`, ...).
    pub component: Option<String>,
    /// Hub revision when `model` is a repo id (default `main`).
    pub revision: Option<String>,
    /// Weight variant (`fp16` for `diffusion_pytorch_model.fp16.safetensors`).
    pub variant: Option<String>,
    pub inputs: PathBuf,
    pub output: PathBuf,
    pub dtype: DType,
    pub device: Device,
}

/// Parses `f32`, `f16`, `bf16`, `f64`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" | "fp16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f64" | "float64" => Ok(DType::F64),
        other => candle_core::bail!("unknown dtype `{other}` (f32, f16, bf16, f64)"),
    }
}

/// Parses `cpu` or `cuda` / `cuda:N` (the latter needs candle built with CUDA).
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::new_cuda(n),
            None => candle_core::bail!("unknown device `{s}` (cpu, cuda, cuda:N)"),
        },
    }
}

/// The component folder `args` names: a folder with config.json as it is; a pipeline
/// folder's `component`.
pub fn model_dir(model: &str, component: Option<&str>, revision: Option<&str>) -> Result<PathBuf> {
    let root = resolve_model(model, revision)?;
    match component {
        Some(c) if root.join("model_index.json").is_file() => {
            ModelIndex::read(&root)?.component_dir(&root, c)
        }
        Some(c) => {
            let dir = root.join(c);
            if dir.join("config.json").is_file() {
                Ok(dir)
            } else {
                candle_core::bail!(
                    "{} has no component folder `{c}` with a config.json",
                    root.display()
                )
            }
        }
        None if root.join("config.json").is_file() => Ok(root),
        None if root.join("model_index.json").is_file() => {
            let index = ModelIndex::read(&root)?;
            candle_core::bail!(
                "{} is a {} pipeline folder: pick a component with --component ({})",
                root.display(),
                index.class_name,
                index
                    .components
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        None => candle_core::bail!(
            "{} has neither config.json nor model_index.json",
            root.display()
        ),
    }
}

fn check_input_names(
    inputs: &HashMap<String, Tensor>,
    allowed: &[&str],
    class: &str,
) -> Result<()> {
    let mut unknown: Vec<&String> = inputs
        .keys()
        .filter(|k| !allowed.contains(&k.as_str()))
        .collect();
    unknown.sort();
    if !unknown.is_empty() {
        candle_core::bail!(
            "{class} does not take inputs {unknown:?} (it takes {})",
            allowed.join(", ")
        )
    }
    Ok(())
}

fn need<'a>(inputs: &'a HashMap<String, Tensor>, name: &str, class: &str) -> Result<&'a Tensor> {
    inputs.get(name).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{class} needs input `{name}`; the inputs file lacks it"
        ))
    })
}

/// Runs the model in component folder `dir` on `inputs`; returns the output in f32.
pub fn forward_dir(
    dir: &Path,
    variant: Option<&str>,
    inputs: &HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let class = class_name(dir)?;
    let inputs: HashMap<String, Tensor> = inputs
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(device)?)))
        .collect::<Result<_>>()?;
    let out = match class.as_str() {
        "UNet2DConditionModel" => {
            let cfg: unet_2d::Config = read_config(dir)?;
            let allowed: &[&str] = if cfg.uses_text_time() {
                &[
                    "sample",
                    "timestep",
                    "encoder_hidden_states",
                    "text_embeds",
                    "time_ids",
                ]
            } else {
                &["sample", "timestep", "encoder_hidden_states"]
            };
            check_input_names(&inputs, allowed, &class)?;
            let unet = load_model(dir, variant, dtype, device, &[], |vb| {
                UNet2DConditionModel::new(vb, &cfg)
            })?;
            let added = if cfg.uses_text_time() {
                Some(TextTime {
                    text_embeds: need(&inputs, "text_embeds", &class)?,
                    time_ids: need(&inputs, "time_ids", &class)?,
                })
            } else {
                None
            };
            unet.forward(
                need(&inputs, "sample", &class)?,
                need(&inputs, "timestep", &class)?,
                need(&inputs, "encoder_hidden_states", &class)?,
                added,
            )?
        }
        "AutoencoderKL" => {
            let cfg: vae::Config = read_config(dir)?;
            check_input_names(&inputs, &["latent"], &class)?;
            // The whole VAE, so that the checkpoint is checked completely (no tensor unused).
            let vae = load_model(dir, variant, dtype, device, &[], |vb| {
                AutoencoderKL::new(vb, &cfg)
            })?;
            vae.decode(need(&inputs, "latent", &class)?)?
        }
        "AutoencoderKLCogVideoX" => {
            check_input_names(&inputs, &["latent"], &class)?;
            let vae = cogvideox_vae::load(dir, variant, dtype, device)?;
            vae.decode(need(&inputs, "latent", &class)?)?
        }
        "CogVideoXTransformer3DModel" => {
            let cfg: cogvideox::Config = read_config(dir)?;
            check_input_names(
                &inputs,
                &["hidden_states", "timestep", "encoder_hidden_states"],
                &class,
            )?;
            let model = load_model(dir, variant, dtype, device, &[], |vb| {
                CogVideoXTransformer3DModel::new(vb, &cfg)
            })?;
            model.forward(
                need(&inputs, "hidden_states", &class)?,
                need(&inputs, "encoder_hidden_states", &class)?,
                need(&inputs, "timestep", &class)?,
            )?
        }
        "SD3Transformer2DModel" => {
            let cfg: mmdit::Config = read_config(dir)?;
            let names = [
                "hidden_states",
                "timestep",
                "encoder_hidden_states",
                "pooled_projections",
            ];
            check_input_names(&inputs, &names, &class)?;
            let model = load_model(dir, variant, dtype, device, &[], |vb| {
                SD3Transformer2DModel::new(vb, &cfg)
            })?;
            let [x, t, context, pooled] = names.map(|n| need(&inputs, n, &class));
            model.forward(x?, t?, context?, pooled?)?
        }
        other => candle_core::bail!(
            "adm-forward: model class `{other}` ({}) is not supported yet ({})",
            dir.display(),
            SUPPORTED.join(", ")
        ),
    };
    out.to_dtype(DType::F32)
}

/// Everything `adm-forward` does: resolve the folder, read the inputs, run, write `sample`.
pub fn run(args: &ForwardArgs) -> Result<()> {
    let dir = model_dir(
        &args.model,
        args.component.as_deref(),
        args.revision.as_deref(),
    )?;
    let class = class_name(&dir)?;
    if !SUPPORTED.contains(&class.as_str()) {
        candle_core::bail!(
            "adm-forward: model class `{class}` ({}) is not supported yet ({})",
            dir.display(),
            SUPPORTED.join(", ")
        )
    }
    let inputs = candle_core::safetensors::load(&args.inputs, &Device::Cpu).map_err(|e| {
        candle_core::Error::Msg(format!("cannot read inputs {}: {e}", args.inputs.display()))
    })?;
    let out = forward_dir(
        &dir,
        args.variant.as_deref(),
        &inputs,
        args.dtype,
        &args.device,
    )?;
    let tensors = HashMap::from([("sample".to_string(), out.to_device(&Device::Cpu)?)]);
    crate::weights::save_safetensors_atomic(&tensors, &args.output)
}
