//! A recipe run on real (tiny) weights: the tiny SDXL pipeline fixture (UNet, both CLIP text
//! encoders, tokenizers) with a tiny VAE, a tiny SAM or DINOv2 and a store of encoded prompts
//! as the collector writes it (no negatives), through `recipe_run::run`: ADP (latent + pixel
//! discriminators on decoded images), then ADM and DMD with the teacher's CFG on the encoded
//! negative prompt. The generator moves, each stage starts from the previous one's generator,
//! a second run trains nothing more, a missing store is named.

#[allow(dead_code)] // the constants serve the other including tests
#[path = "../../adm-models/tests/common/sdxl_pipeline.rs"]
mod sdxl_pipeline;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use adm_data::store::{ConditionSpec, PairBatch, StoreDtype, StoreSpec, StoreWriter};
use adm_diffusion::TimestepDistribution;
use adm_models::conv_heads::{ConvHeadConfig, HeadDims};
use adm_models::sdxl::{LoadOptions, SdxlTeacher, TimeIds};
use adm_train::config::StudentOutput;
use adm_train::engine::{
    AdpConfig, CheckpointConfig, EngineConfig, EngineMethod, EngineStudent, LogConfig,
};
use adm_train::optim::OptimizerConfig;
use adm_train::recipe::{
    DataSection, Family, ModelSection, ParallelSection, PixelDiscriminatorSection, PixelEncoder,
    Precision, Recipe, Stage,
};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../adm-models/tests/fixtures")
}

/// The tiny SDXL pipeline (fixture UNet, text encoders, tokenizers) with the tiny SDXL VAE (2x: 16x16 latents decode to 32x32
/// images, SAM's input size) added as its `vae` component; and the tiny SAM folder.
fn model_folders(root: &Path) -> Result<(PathBuf, PathBuf)> {
    let pipeline = sdxl_pipeline::assemble(&fixtures(), &root.join("pipeline"));
    let vae = pipeline.join("vae");
    std::fs::create_dir_all(&vae)?;
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fixtures().join("vae/sdxl_tiny").join(file), vae.join(file))?;
    }
    let index_path = pipeline.join("model_index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path)?)?;
    index["vae"] = serde_json::json!(["diffusers", "AutoencoderKL"]);
    std::fs::write(&index_path, serde_json::to_string_pretty(&index)?)?;
    let sam = root.join("sam");
    std::fs::create_dir_all(&sam)?;
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("sam/tiny").join(file), sam.join(file))?;
    }
    Ok((pipeline, sam))
}

/// A store of `n` pairs whose conditions are the pipeline's encodings of real prompts (as
/// `adm-collect-ode-pairs` stores them: no negatives); the pairs themselves are synthetic.
fn prompt_store(dir: &Path, pipeline: &Path, n: usize) -> Result<()> {
    let options = LoadOptions {
        variant: None,
        dtype: DType::F32,
        device: Device::Cpu,
    };
    let teacher = SdxlTeacher::load(pipeline, &options)?;
    let prompts: Vec<String> = (0..n)
        .map(|i| format!("a photo of {i} red apples"))
        .collect();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let embeds = teacher.encode_prompts(&refs)?;
    let ids = Tensor::new(&TimeIds::for_size((32, 32)).values(), &Device::Cpu)?
        .unsqueeze(0)?
        .repeat((n, 1))?;
    let conditions: HashMap<String, Tensor> = HashMap::from([
        (
            "encoder_hidden_states".to_string(),
            embeds.encoder_hidden_states,
        ),
        ("text_embeds".to_string(), embeds.text_embeds),
        ("time_ids".to_string(), ids),
    ]);
    let spec = StoreSpec {
        teacher: "tiny sdxl pipeline".into(),
        schedule: "sdxl".into(),
        solver: "ddim".into(),
        steps: 4,
        cfg_scale: 3.0,
        seed: 0,
        dtype: StoreDtype::F32,
        noise_shape: vec![4, 16, 16],
        sample_shape: vec![4, 16, 16],
        conditions: conditions
            .iter()
            .map(|(name, t)| {
                let shape = t.dims()[1..].to_vec();
                (
                    name.clone(),
                    ConditionSpec {
                        shape,
                        dtype: StoreDtype::F32,
                    },
                )
            })
            .collect(),
        shard_size: 4,
        partition: Default::default(),
    };
    let mut writer = StoreWriter::open(dir, spec)?;
    let noise = adm_nn::randn(&mut StdRng::seed_from_u64(5), (n, 4, 16, 16), &Device::Cpu)?;
    let indices = writer.next_indices(n, n as u64);
    writer.append(PairBatch {
        sample: (&noise * 0.5)?.tanh()?,
        noise,
        conditions: conditions.into_iter().collect(),
        prompts,
        indices,
    })?;
    writer.finish()?;
    Ok(())
}

fn stage(name: &str, method: EngineMethod, steps: usize, generator_lr: f64) -> Stage {
    let opt = |lr| OptimizerConfig::new(lr, 10.0);
    let heads = ConvHeadConfig {
        dims: HeadDims::Image,
        layers: 1,
        channels: 8,
        groups: 4,
    };
    Stage {
        name: name.into(),
        engine: EngineConfig {
            method,
            seed: 1,
            steps,
            batch_size: 2,
            grad_accumulation: 1,
            latent_shape: vec![4, 16, 16],
            student: EngineStudent {
                output: StudentOutput::Velocity,
                steps: vec![1.0],
            },
            cfg_scale: 3.0,
            ttur: 1,
            flow_divisions: 64,
            taps: vec!["down_blocks.1".into(), "mid_block".into()],
            heads: heads.clone(),
            dmd_timesteps: TimestepDistribution::Uniform {
                min: 0.02,
                max: 0.98,
            },
            generator: opt(generator_lr),
            fake_score: opt(1e-3),
            discriminator: opt(1e-3),
            ema_decay: 0.9,
            checkpoint: CheckpointConfig {
                every: 1,
                keep_last: 2,
            },
            log: LogConfig {
                probe_every: 1,
                probe_size: 2,
                sample_every: 0,
                sample_count: 2,
            },
            adp: AdpConfig {
                pixel_layers: vec![1, 3],
                pixel_heads: Some(heads),
                ..AdpConfig::default()
            },
            compute_dtype: Precision::F32,
        },
    }
}

fn generator(checkpoint: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        checkpoint.join("generator/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )?)
}

fn max_difference(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> Result<f32> {
    let mut max = 0f32;
    for (name, x) in a {
        let d = (x - &b[name])?.abs()?.max_all()?.to_scalar::<f32>()?;
        max = max.max(d);
    }
    Ok(max)
}

#[test]
fn recipe_stages_run_in_order_hand_on_the_generator_and_resume() -> Result<()> {
    let root = std::env::temp_dir().join(format!("adm-recipe-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (pipeline, sam) = model_folders(&root)?;
    prompt_store(&root.join("pairs"), &pipeline, 4)?;
    let recipe = Recipe {
        job: adm_train::recipe::JOB.into(),
        run_dir: root.join("run"),
        model: ModelSection {
            family: Family::Sdxl,
            pretrained: pipeline.display().to_string(),
            precision: Precision::F32,
        },
        parallel: ParallelSection { world_size: 1 },
        pixel_discriminator: Some(PixelDiscriminatorSection {
            encoder: PixelEncoder::Sam,
            variant: "vit_b".into(),
            pretrained: Some(sam.display().to_string()),
            input_size: None,
        }),
        data: DataSection {
            ode_pairs: Some(root.join("pairs")),
            conditions: Some(root.join("pairs")),
            negative_prompt: Some("blurry".into()),
        },
        stages: vec![
            stage("adp", EngineMethod::Adp, 2, 1e-3),
            // A learning rate that cannot move f32 weights: its generator is the one handed in.
            stage("adm", EngineMethod::Adm, 1, 1e-30),
            stage("dmd", EngineMethod::Dmd, 2, 1e-3),
        ],
    };
    recipe.validate()?;
    let outcomes = adm_train::recipe_run::run(&recipe, &Device::Cpu)?;
    let names: Vec<&str> = outcomes.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["adp", "adm", "dmd"]);
    assert_eq!(
        outcomes.iter().map(|o| o.steps).collect::<Vec<_>>(),
        [2, 1, 2]
    );

    let teacher = candle_core::safetensors::load(
        pipeline.join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )?;
    let [adp, adm, dmd] = [0, 1, 2].map(|i| generator(&outcomes[i].checkpoint).unwrap());
    assert!(max_difference(&adp, &teacher)? > 0.0, "ADP did not train");
    assert_eq!(
        max_difference(&adm, &adp)?,
        0.0,
        "the ADM stage did not start from the ADP generator"
    );
    assert!(max_difference(&dmd, &adm)? > 0.0, "DMD did not train");
    let heads = std::fs::read_to_string(outcomes[0].checkpoint.join("discriminator/config.json"))?;
    assert!(heads.contains("pixel_layers"), "{heads}");
    for (dir, rows) in [("adp", 2), ("adm", 1), ("dmd", 2)] {
        let metrics = std::fs::read_to_string(root.join("run").join(dir).join("metrics.jsonl"))?;
        assert_eq!(metrics.lines().count(), rows, "{dir}: {metrics}");
        assert!(
            !metrics.contains("NaN") && !metrics.contains("null"),
            "{metrics}"
        );
    }

    // A second run finds every stage finished: nothing is trained again.
    let metrics = std::fs::read_to_string(root.join("run/dmd/metrics.jsonl"))?;
    let again = adm_train::recipe_run::run(&recipe, &Device::Cpu)?;
    assert_eq!(again[2].checkpoint, outcomes[2].checkpoint);
    assert_eq!(
        std::fs::read_to_string(root.join("run/dmd/metrics.jsonl"))?,
        metrics
    );

    // DINOv2 as the pixel encoder (the tiny one: 3 blocks, images resized to 24 x 24).
    let mut dinov2 = recipe.clone();
    dinov2.run_dir = root.join("run-dinov2");
    dinov2.pixel_discriminator = Some(PixelDiscriminatorSection {
        encoder: PixelEncoder::Dinov2,
        variant: "vit_s".into(),
        pretrained: Some(fixtures().join("dinov2/tiny").display().to_string()),
        input_size: Some([24, 24]),
    });
    dinov2.stages.truncate(1);
    dinov2.stages[0].engine.adp.pixel_layers = vec![0, 2];
    let outcome = adm_train::recipe_run::run(&dinov2, &Device::Cpu)?;
    assert!(max_difference(&generator(&outcome[0].checkpoint)?, &teacher)? > 0.0);

    // Bad input names what is wrong.
    let mut bad = recipe.clone();
    bad.data.conditions = Some(root.join("no-such-store"));
    bad.run_dir = root.join("run-bad");
    let err = format!(
        "{:#}",
        adm_train::recipe_run::run(&bad, &Device::Cpu).unwrap_err()
    );
    assert!(
        err.contains("data.conditions") && err.contains("no-such-store"),
        "{err}"
    );
    // A stage computes in the recipe's precision.
    let mut bad = recipe.clone();
    bad.stages[0].engine.compute_dtype = Precision::Bf16;
    bad.run_dir = root.join("run-bad-dtype");
    let err = format!(
        "{:#}",
        adm_train::recipe_run::run(&bad, &Device::Cpu).unwrap_err()
    );
    assert!(
        err.contains("stages[0].engine.compute_dtype") && err.contains("model.precision"),
        "{err}"
    );
    std::fs::remove_dir_all(&root)?;
    Ok(())
}
