//! The SDXL teacher of a tiny diffusers pipeline folder against diffusers in float64
//! (scripts/fixtures_sdxl_pipeline.py): `encode_prompt` (both encoders' penultimate states,
//! the pooled projection, the negative prompt with and without
//! `force_zeros_for_empty_prompt`), the time ids, and a 4-step DDIM run with guidance 5;
//! and the errors of a broken pipeline folder.

mod common;
#[path = "common/sdxl_pipeline.rs"]
mod pipeline;

use std::path::{Path, PathBuf};

use adm_diffusion::{BetaSchedule, ScheduleConfig, VpPrediction};
use adm_models::sdxl::{schedule_config, LoadOptions, SdxlTeacher, TimeIds};
use candle_core::{DType, Device, Result};
use common::{assert_parity, load_tensors, relative_error};
use pipeline::{GUIDANCE, PROMPTS, RESOLUTION, STEPS};

/// max |rust f32 - diffusers f64| / max |diffusers f64| of the latents after 4 guided steps
/// of the tiny pipeline. Reached 1.4e-6 (encodings: 2e-7 .. 7e-7); f32 rounding amplified by
/// guidance 5.
const SAMPLING_TOL: f64 = 1e-4;

fn scratch(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sdxl_pipeline-{}", std::process::id()))
        .join(name)
}

fn options() -> LoadOptions {
    LoadOptions {
        variant: None,
        dtype: DType::F32,
        device: Device::Cpu,
    }
}

fn load(name: &str) -> Result<(PathBuf, SdxlTeacher)> {
    let dir = pipeline::assemble(&common::fixtures(), &scratch(name));
    let teacher = SdxlTeacher::load(&dir, &options())?;
    Ok((dir, teacher))
}

#[test]
fn prompt_encoding_and_guided_sampling_match_diffusers() -> Result<()> {
    let reference = load_tensors(common::fixtures().join("sdxl/reference.safetensors"))?;
    let (dir, teacher) = load("parity")?;
    assert!(!teacher.force_zeros_for_empty_prompt);
    assert_eq!(teacher.vae_scale_factor, 8);

    let embeds = teacher.encode_prompts(&PROMPTS)?;
    assert_eq!(embeds.encoder_hidden_states.dims(), [2, 77, 32]);
    assert_parity(
        "encoder_hidden_states",
        &embeds.encoder_hidden_states,
        &reference["prompt_embeds"],
    )?;
    assert_parity(
        "text_embeds",
        &embeds.text_embeds,
        &reference["pooled_prompt_embeds"],
    )?;
    // diffusers encodes "" for the negative when force_zeros_for_empty_prompt is false.
    let negative = teacher.encode_negative(None)?;
    for (got, want) in [
        (&negative.encoder_hidden_states, "negative_prompt_embeds"),
        (&negative.text_embeds, "negative_pooled_prompt_embeds"),
    ] {
        assert_parity(
            want,
            &got.broadcast_as(reference[want].dims())?,
            &reference[want],
        )?;
    }
    let time_ids = TimeIds::for_size((RESOLUTION, RESOLUTION));
    let want_ids: Vec<f64> = reference["add_time_ids"].flatten_all()?.to_vec1()?;
    assert_eq!(time_ids.values().map(f64::from).to_vec(), want_ids);

    let noise = reference["noise"].to_dtype(DType::F32)?;
    assert_eq!(
        teacher.latent_shape((RESOLUTION, RESOLUTION))?,
        noise.dims()[1..]
    );
    let cond = teacher.condition(&embeds, &negative, &time_ids)?;
    let latents = teacher.sample(&noise, &cond, STEPS, GUIDANCE)?;
    let want = &reference["latents"];
    let err = relative_error(&latents, want)?;
    println!(
        "{STEPS}-step DDIM, guidance {GUIDANCE}: latents {:?}, max |ref| {:.2}, relative error {err:.2e}",
        latents.dims(),
        want.abs()?.max_all()?.to_scalar::<f64>()?
    );
    assert!(err < SAMPLING_TOL, "relative error {err:.2e}");
    assert_eq!(
        teacher.backbone.schedule.sampling_timesteps(STEPS)?,
        reference["timesteps"].to_vec1::<f64>()?
    );
    std::fs::remove_dir_all(dir).unwrap();
    Ok(())
}

#[test]
fn force_zeros_for_empty_prompt_zeros_only_an_absent_negative_prompt() -> Result<()> {
    let reference = load_tensors(common::fixtures().join("sdxl/reference.safetensors"))?;
    let dir = pipeline::assemble(&common::fixtures(), &scratch("zeros"));
    pipeline::set_force_zeros(&dir, true);
    let teacher = SdxlTeacher::load(&dir, &options())?;
    assert!(teacher.force_zeros_for_empty_prompt);
    let zeros = teacher.encode_negative(None)?;
    for t in [&zeros.encoder_hidden_states, &zeros.text_embeds] {
        assert_eq!(t.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    }
    assert_eq!(zeros.encoder_hidden_states.dims(), [1, 77, 32]);
    assert_eq!(zeros.text_embeds.dims(), [1, 8]);
    // A negative prompt that is given is encoded, even when it is empty (as in diffusers).
    let given = teacher.encode_negative(Some(""))?;
    let want = &reference["negative_prompt_embeds"];
    assert_parity(
        "explicit empty negative",
        &given.encoder_hidden_states.broadcast_as(want.dims())?,
        want,
    )?;
    std::fs::remove_dir_all(dir).unwrap();
    Ok(())
}

#[test]
fn a_broken_pipeline_folder_names_what_is_wrong() -> Result<()> {
    let message = |dir: &Path| match SdxlTeacher::load(dir, &options()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    };
    // The component folder is gone.
    let dir = pipeline::assemble(&common::fixtures(), &scratch("no-te2-folder"));
    std::fs::remove_dir_all(dir.join("text_encoder_2")).unwrap();
    let text = message(&dir);
    assert!(text.contains("text_encoder_2"), "{text}");

    // model_index.json does not list it.
    let dir = pipeline::assemble(&common::fixtures(), &scratch("no-te2-entry"));
    let index = dir.join("model_index.json");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    value.as_object_mut().unwrap().remove("text_encoder_2");
    std::fs::write(&index, value.to_string()).unwrap();
    let text = message(&dir);
    assert!(text.contains("no component `text_encoder_2`"), "{text}");

    // A UNet that does not fit the encoders.
    let dir = pipeline::assemble(&common::fixtures(), &scratch("unet-mismatch"));
    let config = dir.join("unet/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("\"cross_attention_dim\": 32", "\"cross_attention_dim\": 24"),
    )
    .unwrap();
    let text = message(&dir);
    assert!(text.contains("cross_attention_dim [24]"), "{text}");

    // Weights missing: the message names the component.
    let dir = pipeline::assemble(&common::fixtures(), &scratch("no-weights"));
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let text = message(&dir);
    assert!(
        text.starts_with("unet: ") && text.contains("no plain weights"),
        "{text}"
    );
    // A scheduler whose betas this crate cannot reproduce.
    let dir = pipeline::assemble(&common::fixtures(), &scratch("scheduler"));
    let config = dir.join("scheduler/scheduler_config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        original.replace("\"scaled_linear\"", "\"squaredcos_cap_v2\""),
    )
    .unwrap();
    let text = message(&dir);
    assert!(
        text.contains("`beta_schedule` = \"squaredcos_cap_v2\" is not supported"),
        "{text}"
    );
    // The schedule follows the scheduler config (here: v-prediction, linear betas).
    std::fs::write(
        &config,
        original
            .replace("\"epsilon\"", "\"v_prediction\"")
            .replace("\"scaled_linear\"", "\"linear\""),
    )
    .unwrap();
    let ScheduleConfig::Vp {
        prediction,
        beta_schedule,
        ..
    } = schedule_config(&dir)?
    else {
        panic!("not a VP schedule");
    };
    assert_eq!(
        (prediction, beta_schedule),
        (VpPrediction::V, BetaSchedule::Linear)
    );
    std::fs::remove_dir_all(dir.join("scheduler")).unwrap();
    assert_eq!(schedule_config(&dir)?, ScheduleConfig::sdxl());

    for name in [
        "no-te2-folder",
        "no-te2-entry",
        "unet-mismatch",
        "no-weights",
        "scheduler",
    ] {
        std::fs::remove_dir_all(scratch(name)).unwrap();
    }
    Ok(())
}

/// f16 weights and activations (latents and the solver stay f32): measured 1.5e-3
/// (encoder_hidden_states) and 5.0e-3 (latents after 4 steps with guidance 5).
const F16_TOL: (f64, f64) = (5e-3, 2e-2);

#[test]
fn an_f16_teacher_stays_close_to_diffusers() -> Result<()> {
    let reference = load_tensors(common::fixtures().join("sdxl/reference.safetensors"))?;
    let dir = pipeline::assemble(&common::fixtures(), &scratch("f16"));
    let options = LoadOptions {
        dtype: DType::F16,
        ..options()
    };
    let teacher = SdxlTeacher::load(&dir, &options)?;
    let embeds = teacher.encode_prompts(&PROMPTS)?;
    let negative = teacher.encode_negative(None)?;
    let time_ids = TimeIds::for_size((RESOLUTION, RESOLUTION));
    let cond = teacher.condition(&embeds, &negative, &time_ids)?;
    let latents = teacher.sample(&reference["noise"], &cond, STEPS, GUIDANCE)?;
    assert_eq!(latents.dtype(), DType::F32);
    let embed_err = relative_error(&embeds.encoder_hidden_states, &reference["prompt_embeds"])?;
    let err = relative_error(&latents, &reference["latents"])?;
    println!("f16: encoder_hidden_states relative error {embed_err:.2e}, latents {err:.2e}");
    assert!(
        embed_err < F16_TOL.0 && err < F16_TOL.1,
        "{embed_err:.2e}, {err:.2e}"
    );
    std::fs::remove_dir_all(dir).unwrap();
    Ok(())
}
