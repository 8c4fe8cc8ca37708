//! `adm-forward --model DIR --inputs IN.safetensors --output OUT.safetensors`: one forward
//! pass of a diffusers model folder (UNet2DConditionModel, AutoencoderKL and
//! AutoencoderKLCogVideoX decode, SD3Transformer2DModel, CogVideoXTransformer3DModel), inputs
//! and output under diffusers' argument names. See `adm_models::forward_cli`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Run one diffusers model folder on safetensors inputs")]
struct Cli {
    /// Component folder (config.json), pipeline folder (model_index.json, with --component)
    /// or hub repo id from the local hub cache (offline).
    #[arg(long)]
    model: String,
    /// Component of a pipeline folder: unet, vae, ...
    #[arg(long)]
    component: Option<String>,
    /// Hub revision (branch, tag or commit) when --model is a repo id.
    #[arg(long)]
    revision: Option<String>,
    /// Weight variant, e.g. fp16.
    #[arg(long)]
    variant: Option<String>,
    /// Inputs: sample, timestep, encoder_hidden_states[, text_embeds, time_ids] (UNet) or
    /// latent (AutoencoderKL, AutoencoderKLCogVideoX) or hidden_states, timestep,
    /// encoder_hidden_states[, pooled_projections] (CogVideoXTransformer3DModel,
    /// SD3Transformer2DModel).
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write the output `sample` (f32).
    #[arg(long)]
    output: PathBuf,
    /// Compute dtype: f32, f16, bf16, f64.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let args = adm_models::forward_cli::ForwardArgs {
        model: cli.model,
        component: cli.component,
        revision: cli.revision,
        variant: cli.variant,
        inputs: cli.inputs,
        output: cli.output,
        dtype: adm_models::forward_cli::parse_dtype(&cli.dtype)?,
        device: adm_models::forward_cli::parse_device(&cli.device)?,
    };
    adm_models::forward_cli::run(&args)?;
    eprintln!("wrote {}", args.output.display());
    Ok(())
}
