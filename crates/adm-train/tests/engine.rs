//! The training engine on a tiny SDXL-architecture UNet (random teacher, 8x8 latents): every
//! trainable Var moves and the teacher does not; a killed and resumed run repeats an
//! uninterrupted one exactly; bad checkpoints fail with errors naming the file and leave the
//! previous checkpoint loadable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use adm_data::store::{ConditionSpec, PairBatch, StoreDtype, StoreReader, StoreSpec, StoreWriter};
use adm_diffusion::{Schedule, ScheduleConfig, TimestepDistribution};
use adm_models::sam::{SamFeatureExtractor, SamVisionEncoder};
use adm_models::unet_2d::{Config, OneOrMany, UNet2DConditionModel, UNetBackbone};
use adm_models::vae::AutoencoderKL;
use adm_models::{varmap_tensors, Condition, ConvHeadConfig, HeadDims};
use adm_nn::SeededVarMap;
use adm_train::checkpoint::{step_dir_name, WEIGHTS_FILE};
use adm_train::config::StudentOutput;
use adm_train::engine::{
    AdpConfig, CheckpointConfig, ConditionBank, ConditionSource, Engine, EngineConfig,
    EngineMethod, EngineNets, EngineStudent, LogConfig, PixelNets,
};
use adm_train::optim::OptimizerConfig;
use adm_train::pairs::PairSource;
use adm_train::recipe::Precision;
use adm_train::student::Trainable;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::SeedableRng;

const CONTEXT_DIM: usize = 8;
const POOLED_DIM: usize = 4;

/// The parity fixture's SDXL-like config (text_time conditioning, both block types), shrunk
/// to block_out_channels [8, 16].
fn tiny_unet_config() -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../adm-models/tests/fixtures/unet/sdxl_tiny/config.json");
    let mut cfg: Config = adm_models::loading::read_json(&path).unwrap();
    cfg.block_out_channels = vec![8, 16];
    cfg.norm_num_groups = 4;
    cfg.cross_attention_dim = OneOrMany::One(CONTEXT_DIM);
    cfg.addition_time_embed_dim = Some(4);
    cfg.projection_class_embeddings_input_dim = Some(POOLED_DIM + 6 * 4);
    cfg
}

fn schedule() -> Schedule {
    Schedule::new(&ScheduleConfig::sdxl()).unwrap()
}

fn unet(vb: VarBuilder, cfg: &Config) -> candle_core::Result<UNetBackbone> {
    Ok(UNetBackbone::new(
        UNet2DConditionModel::new(vb, cfg)?,
        schedule(),
    ))
}

/// A random teacher (its weights, and the frozen backbone over them), and generator and
/// fake score initialised from it.
fn nets(cfg: &Config) -> Result<(HashMap<String, Tensor>, EngineNets<UNetBackbone>)> {
    let seeded = SeededVarMap::new(7);
    unet(seeded.var_builder(DType::F32, &Device::Cpu), cfg)?;
    let weights: HashMap<String, Tensor> = varmap_tensors(seeded.varmap())
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy().unwrap()))
        .collect();
    let teacher = unet(
        VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu),
        cfg,
    )?;
    let trainable = |seed| {
        let cfg = cfg.clone();
        Trainable::from_weights(seed, &Device::Cpu, &weights, move |vb| unet(vb, &cfg))
    };
    let nets = EngineNets {
        teacher: Arc::new(teacher),
        generator: trainable(1)?,
        fake_score: Some(trainable(2)?),
        pixel: None,
        net_config: Some(serde_json::to_value(cfg)?),
    };
    Ok((weights, nets))
}

/// Five pre-encoded "prompts" (a number that does not divide the 12 rows a step reads, so a
/// lost data cursor shows) with SDXL's added conditioning and an empty negative prompt.
fn conditions() -> Result<ConditionBank> {
    let mut rng = StdRng::seed_from_u64(5);
    let dev = Device::Cpu;
    let n = 5;
    let ids = Tensor::new(&[32f32, 32., 0., 0., 32., 32.], &dev)?
        .unsqueeze(0)?
        .repeat((n, 1))?;
    ConditionBank::new(
        Condition::new()
            .with(
                "encoder_hidden_states",
                adm_nn::randn(&mut rng, (n, 3, CONTEXT_DIM), &dev)?,
            )
            .with(
                "text_embeds",
                adm_nn::randn(&mut rng, (n, POOLED_DIM), &dev)?,
            )
            .with("time_ids", ids)
            .with(
                "negative_encoder_hidden_states",
                Tensor::zeros((n, 3, CONTEXT_DIM), DType::F32, &dev)?,
            )
            .with(
                "negative_text_embeds",
                Tensor::zeros((n, POOLED_DIM), DType::F32, &dev)?,
            ),
    )
}

fn engine_config(method: EngineMethod, steps: usize, checkpoint_every: usize) -> EngineConfig {
    let opt = |lr| OptimizerConfig {
        warmup_steps: 2,
        ..OptimizerConfig::new(lr, 10.0)
    };
    EngineConfig {
        method,
        seed: 3,
        steps,
        batch_size: 2,
        grad_accumulation: 2,
        latent_shape: vec![4, 8, 8],
        student: EngineStudent {
            output: StudentOutput::Native,
            // Two steps: backward simulation.
            steps: vec![1.0, 0.5],
        },
        cfg_scale: 3.0,
        ttur: 1,
        flow_divisions: 64,
        taps: vec!["down_blocks.1".into(), "up_blocks.0".into()],
        heads: ConvHeadConfig {
            dims: HeadDims::Image,
            layers: 1,
            channels: 8,
            groups: 4,
        },
        dmd_timesteps: TimestepDistribution::Uniform {
            min: 0.02,
            max: 0.98,
        },
        generator: opt(1e-3),
        fake_score: opt(1e-3),
        discriminator: opt(2e-3),
        ema_decay: 0.9,
        checkpoint: CheckpointConfig {
            every: checkpoint_every,
            keep_last: 2,
        },
        log: LogConfig {
            probe_every: 1,
            probe_size: 2,
            sample_every: 2,
            sample_count: 2,
        },
        adp: AdpConfig {
            pixel_layers: vec![0, 1],
            ..AdpConfig::default()
        },
        compute_dtype: Precision::F32,
    }
}

fn run_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("adm-engine-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn engine(
    method: EngineMethod,
    steps: usize,
    every: usize,
    dir: &Path,
) -> Result<Engine<UNetBackbone>> {
    let cfg = tiny_unet_config();
    let (_, nets) = nets(&cfg)?;
    Engine::new(
        engine_config(method, steps, every),
        dir,
        nets,
        Box::new(conditions()?),
    )
}

fn snapshot(varmap: &VarMap) -> HashMap<String, Tensor> {
    varmap_tensors(varmap)
        .into_iter()
        .map(|(n, t)| (n, t.copy().unwrap()))
        .collect()
}

fn max_change(before: &HashMap<String, Tensor>, name: &str, after: &Tensor) -> f32 {
    (after - &before[name])
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_every_var_moved(what: &str, before: &HashMap<String, Tensor>, varmap: &VarMap) {
    let after = varmap_tensors(varmap);
    assert_eq!(before.len(), after.len());
    let still: Vec<&String> = after
        .iter()
        .filter(|(n, t)| max_change(before, n, t) == 0.0)
        .map(|(n, _)| n)
        .collect();
    assert!(
        still.is_empty(),
        "{what}: {} of {} Vars did not move: {still:?}",
        still.len(),
        after.len()
    );
}

#[test]
fn adm_moves_every_trainable_var_and_never_the_teacher() -> Result<()> {
    let cfg = tiny_unet_config();
    let (teacher_weights, nets) = nets(&cfg)?;
    let teacher_before: HashMap<String, Tensor> = teacher_weights
        .iter()
        .map(|(n, t)| (n.clone(), t.copy().unwrap()))
        .collect();
    let dir = run_dir("moves");
    let mut engine = Engine::new(
        engine_config(EngineMethod::Adm, 2, 10),
        &dir,
        nets,
        Box::new(conditions()?),
    )?;
    let generator = snapshot(engine.generator().varmap());
    let fake = snapshot(engine.fake_score().unwrap().varmap());
    let heads = snapshot(engine.discriminator_heads().unwrap().varmap());
    let ema = snapshot(engine.ema().varmap());
    engine.train(2)?;
    assert_every_var_moved("generator", &generator, engine.generator().varmap());
    assert_every_var_moved("fake score", &fake, engine.fake_score().unwrap().varmap());
    assert_every_var_moved(
        "discriminator heads",
        &heads,
        engine.discriminator_heads().unwrap().varmap(),
    );
    assert_every_var_moved("generator EMA", &ema, engine.ema().varmap());
    for (name, t) in &teacher_weights {
        assert_eq!(
            max_change(&teacher_before, name, t),
            0.0,
            "teacher tensor {name} changed"
        );
    }

    // The metrics log has every loss of both steps; the sample grid and the final checkpoint
    // exist, and its generator folder loads with adm-models' loader like a diffusers UNet.
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(engine.metrics_path())?
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for key in [
        "loss_fake_score",
        "loss_generator",
        "loss_discriminator",
        "grad_norm_generator",
        "grad_norm_fake_score",
        "grad_norm_discriminator",
        "dmd_probe",
        "steps_per_sec",
    ] {
        assert!(
            rows.iter()
                .all(|r| r[key].as_f64().is_some_and(f64::is_finite)),
            "{key}"
        );
    }
    // Warm-up over 2 steps: lr / 2, then lr.
    assert_eq!(rows[0]["lr_generator"], 5e-4);
    assert_eq!(rows[1]["lr_generator"], 1e-3);
    assert!(dir.join("samples/step-00000002.png").is_file());
    let ckpt = dir.join("checkpoints").join(step_dir_name(2));
    let loaded_cfg: Config = adm_models::loading::read_config(&ckpt.join("generator"))?;
    assert_eq!(loaded_cfg, cfg);
    let reloaded = adm_models::loading::load_model(
        &ckpt.join("generator_ema"),
        None,
        DType::F32,
        &Device::Cpu,
        &[],
        |vb| UNet2DConditionModel::new(vb, &loaded_cfg),
    );
    assert!(reloaded.is_ok());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn dmd_moves_the_generator_and_fake_score() -> Result<()> {
    let dir = run_dir("dmd");
    let mut engine = engine(EngineMethod::Dmd, 1, 10, &dir)?;
    assert!(engine.discriminator_heads().is_none());
    let generator = snapshot(engine.generator().varmap());
    let fake = snapshot(engine.fake_score().unwrap().varmap());
    engine.train(1)?;
    assert_every_var_moved("generator", &generator, engine.generator().varmap());
    assert_every_var_moved("fake score", &fake, engine.fake_score().unwrap().varmap());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The rows of the metrics log without the timing column.
fn losses(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut row: serde_json::Value = serde_json::from_str(l).unwrap();
            row.as_object_mut().unwrap().remove("steps_per_sec");
            row
        })
        .collect()
}

/// The uninterrupted run (`whole`) and the killed-and-resumed one (`parts`) logged the same
/// `steps` metric rows and wrote byte-identical final checkpoints of `files` files.
fn assert_runs_identical(whole: &Path, parts: &Path, steps: usize, files: usize, what: &str) {
    let (a, b) = (
        losses(&whole.join("metrics.jsonl")),
        losses(&parts.join("metrics.jsonl")),
    );
    assert_eq!(a.len(), steps);
    assert_eq!(a, b, "the resumed run's metrics differ");
    let last = step_dir_name(steps);
    let (fa, fb) = (
        file_bytes(&whole.join("checkpoints").join(&last)),
        file_bytes(&parts.join("checkpoints").join(&last)),
    );
    assert_eq!(fa.len(), files, "{what}");
    for ((name, x), (_, y)) in fa.iter().zip(&fb) {
        assert!(x == y, "{name} differs between the runs");
    }
}

fn file_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for net in std::fs::read_dir(dir).unwrap() {
        let path = net.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            files.push((
                format!("{name}/{WEIGHTS_FILE}"),
                std::fs::read(path.join(WEIGHTS_FILE)).unwrap(),
            ));
        } else if name.ends_with(".safetensors") {
            files.push((name, std::fs::read(&path).unwrap()));
        }
    }
    files.sort();
    files
}

#[test]
fn killed_and_resumed_run_repeats_the_uninterrupted_one() -> Result<()> {
    let (steps, every) = (4, 2);
    let whole = run_dir("whole");
    engine(EngineMethod::Adm, steps, every, &whole)?.train(steps)?;

    let parts = run_dir("parts");
    {
        let mut first = engine(EngineMethod::Adm, steps, every, &parts)?;
        assert_eq!(first.resume()?, None);
        first.train(every)?;
        // Killed here: everything in memory is dropped.
    }
    // A row written after the checkpoint by the killed process must not survive the resume.
    std::fs::write(
        parts.join("metrics.jsonl"),
        std::fs::read_to_string(parts.join("metrics.jsonl"))?
            + "{\"step\": 2, \"loss_generator\": 99.0}\n",
    )?;
    let mut second = engine(EngineMethod::Adm, steps, every, &parts)?;
    assert_eq!(second.resume()?, Some(every));
    second.train(steps)?;

    assert_runs_identical(
        &whole,
        &parts,
        steps,
        5,
        "four networks and the optimiser state",
    );
    // keep_last = 2 of steps 2 and 4.
    let kept: Vec<usize> = adm_train::checkpoint::Checkpoints::new(whole.join("checkpoints"), 2)?
        .list()?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(kept, vec![2, 4]);
    std::fs::remove_dir_all(&whole)?;
    std::fs::remove_dir_all(&parts)?;
    Ok(())
}

fn err_text<T>(r: Result<T>) -> String {
    let msg = format!("{:#}", r.err().expect("loading a bad checkpoint must fail"));
    println!("error: {msg}");
    msg
}

#[test]
fn bad_checkpoints_fail_clearly_and_leave_the_previous_one_loadable() -> Result<()> {
    let dir = run_dir("bad");
    let mut trained = engine(EngineMethod::Adm, 2, 1, &dir)?;
    trained.train(2)?;
    let good = dir.join("checkpoints").join(step_dir_name(1));
    let bad = dir.join("checkpoints").join(step_dir_name(2));
    let good_bytes = file_bytes(&good);
    let fresh = |dir: &Path| engine(EngineMethod::Adm, 2, 1, dir);

    // Truncated weights: `latest` names the bad checkpoint, resume fails naming the file.
    let weights = bad.join("generator").join(WEIGHTS_FILE);
    let full = std::fs::read(&weights)?;
    std::fs::write(&weights, &full[..full.len() / 2])?;
    let mut e = fresh(&dir)?;
    let msg = err_text(e.resume());
    assert!(
        msg.contains("step-00000002/generator/diffusion_pytorch_model.safetensors")
            && msg.contains("earlier checkpoints: [")
            && msg.contains("step-00000001]"),
        "{msg}"
    );
    assert_eq!(e.step(), 0);
    std::fs::write(&weights, &full)?;

    // A tensor of the wrong shape: the error names the tensor, both shapes and the file.
    let fake_path = bad.join("fake_score").join(WEIGHTS_FILE);
    let original = std::fs::read(&fake_path)?;
    let mut tensors = candle_core::safetensors::load(&fake_path, &Device::Cpu)?;
    tensors.insert(
        "conv_in.bias".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,
    );
    candle_core::safetensors::save(&tensors, &fake_path)?;
    let msg = err_text(fresh(&dir)?.resume_from(&bad));
    assert!(
        msg.contains("fake_score/diffusion_pytorch_model.safetensors")
            && msg.contains("`conv_in.bias` has shape [3]")
            && msg.contains("[8]"),
        "{msg}"
    );
    std::fs::write(&fake_path, &original)?;

    // Missing trainer state.
    let state = bad.join("trainer_state.json");
    std::fs::rename(&state, dir.join("state.bak"))?;
    let msg = err_text(fresh(&dir)?.resume_from(&bad));
    assert!(msg.contains("step-00000002/trainer_state.json"), "{msg}");

    // A wrong model: a UNet with other channels cannot take this checkpoint.
    let mut other = tiny_unet_config();
    other.block_out_channels = vec![8, 8];
    let (_, other_nets) = nets(&other)?;
    let mut wrong = Engine::new(
        engine_config(EngineMethod::Adm, 2, 1),
        &run_dir("wrong"),
        other_nets,
        Box::new(conditions()?),
    )?;
    let msg = err_text(wrong.resume_from(&good));
    assert!(
        msg.contains("step-00000001/generator/diffusion_pytorch_model.safetensors")
            && msg.contains("shape"),
        "{msg}"
    );

    // The previous checkpoint is untouched and loads.
    assert!(
        file_bytes(&good) == good_bytes,
        "a failed load changed the good checkpoint"
    );
    let mut e = fresh(&dir)?;
    assert_eq!(e.resume_from(&good)?, 1);
    let (loaded, _) = e.generator_weights();
    let on_disk =
        candle_core::safetensors::load(good.join("generator").join(WEIGHTS_FILE), &Device::Cpu)?;
    for (name, t) in &on_disk {
        assert_eq!(max_change(&loaded, name, t), 0.0, "{name}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

// ADP and MSE on ODE pairs from a store.

/// A store of `n` ODE pairs for the tiny UNet: Gaussian x_T, a "teacher sample" that is a
/// fixed function of it, and the conditions of [`conditions`] (rows cycled), negatives
/// included.
fn pair_store(dir: &Path, n: usize) -> Result<Arc<StoreReader>> {
    let _ = std::fs::remove_dir_all(dir);
    let cond = conditions()?.fixed(n)?;
    let spec = StoreSpec {
        teacher: "tiny-unet".into(),
        schedule: "sdxl".into(),
        solver: "ddim".into(),
        steps: 4,
        cfg_scale: 3.0,
        seed: 0,
        dtype: StoreDtype::F32,
        noise_shape: vec![4, 8, 8],
        sample_shape: vec![4, 8, 8],
        conditions: cond
            .iter()
            .map(|(name, t)| {
                let shape = t.dims()[1..].to_vec();
                let dtype = StoreDtype::F32;
                (name.to_string(), ConditionSpec { shape, dtype })
            })
            .collect(),
        shard_size: 4,
        partition: Default::default(),
    };
    let mut writer = StoreWriter::open(dir, spec)?;
    let noise = adm_nn::randn(&mut StdRng::seed_from_u64(11), (n, 4, 8, 8), &Device::Cpu)?;
    let indices = writer.next_indices(n, n as u64);
    writer.append(PairBatch {
        sample: (&noise * 0.5)?.tanh()?,
        noise,
        conditions: cond
            .iter()
            .map(|(name, t)| (name.to_string(), t.clone()))
            .collect(),
        prompts: (0..n).map(|i| format!("prompt {i}")).collect(),
        indices,
    })?;
    writer.finish()?;
    Ok(Arc::new(StoreReader::open(dir)?))
}

/// ADP's pixel discriminator backbone: a random frozen one-block VAE decoder (8x8 latents to
/// 8x8 RGB) and a random frozen two-layer SAM read after both layers; and its weights.
fn pixel_nets() -> Result<(HashMap<String, Tensor>, PixelNets)> {
    let vae_cfg: adm_models::vae::Config = serde_json::from_value(serde_json::json!({
        "block_out_channels": [8], "norm_num_groups": 4, "latent_channels": 4
    }))?;
    let sam_cfg = adm_models::sam::Config {
        hidden_size: 8,
        output_channels: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        image_size: 8,
        patch_size: 2,
        mlp_dim: Some(16),
        window_size: 2,
        global_attn_indexes: vec![1],
        ..Default::default()
    };
    let build = |vb: VarBuilder| -> candle_core::Result<(AutoencoderKL, SamVisionEncoder)> {
        Ok((
            AutoencoderKL::decoder_only(vb.pp("vae"), &vae_cfg)?,
            SamVisionEncoder::new(vb.pp("sam"), &sam_cfg)?,
        ))
    };
    let seeded = SeededVarMap::new(9);
    build(seeded.var_builder(DType::F32, &Device::Cpu))?;
    let weights: HashMap<String, Tensor> = varmap_tensors(seeded.varmap())
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy().unwrap()))
        .collect();
    let (vae, sam) = build(VarBuilder::from_tensors(
        weights.clone(),
        DType::F32,
        &Device::Cpu,
    ))?;
    let extractor = SamFeatureExtractor::new(Arc::new(sam), &[0, 1])?;
    Ok((
        weights,
        PixelNets {
            decoder: Arc::new(vae),
            extractor: Arc::new(extractor),
        },
    ))
}

/// The frozen weights an ADP / MSE engine must leave alone: the teacher's and the pixel
/// backbone's (ADP).
struct Frozen {
    teacher: HashMap<String, Tensor>,
    pixel: HashMap<String, Tensor>,
}

fn pair_engine(
    config: EngineConfig,
    dir: &Path,
    store: &Arc<StoreReader>,
) -> Result<(Frozen, Engine<UNetBackbone>)> {
    let (teacher, mut nets) = nets(&tiny_unet_config())?;
    nets.fake_score = None;
    let (pixel, pixel_nets) = pixel_nets()?;
    if config.method == EngineMethod::Adp {
        nets.pixel = Some(pixel_nets);
    }
    let pairs = PairSource::new(store.clone(), 13, &Device::Cpu)?;
    let engine = Engine::new(config, dir, nets, pairs)?;
    Ok((Frozen { teacher, pixel }, engine))
}

fn copies(weights: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    weights
        .iter()
        .map(|(n, t)| (n.clone(), t.copy().unwrap()))
        .collect()
}

fn assert_unchanged(what: &str, before: &HashMap<String, Tensor>, now: &HashMap<String, Tensor>) {
    for (name, t) in now {
        assert_eq!(
            max_change(before, name, t),
            0.0,
            "{what} tensor {name} changed"
        );
    }
}

fn metric_rows(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn adp_moves_the_generator_and_every_head_but_no_frozen_network() -> Result<()> {
    let dir = run_dir("adp");
    let store = pair_store(&dir.join("store"), 5)?;
    let (frozen, mut engine) = pair_engine(engine_config(EngineMethod::Adp, 2, 10), &dir, &store)?;
    assert!(engine.fake_score().is_none());
    let (teacher, pixel) = (copies(&frozen.teacher), copies(&frozen.pixel));
    let heads_map = engine.discriminator_heads().unwrap().varmap();
    let names: Vec<String> = varmap_tensors(heads_map).into_keys().collect();
    assert!(
        names.iter().any(|n| n.starts_with("pixel."))
            && names.iter().any(|n| !n.starts_with("pixel.")),
        "latent and pixel heads: {names:?}"
    );
    let heads = snapshot(heads_map);
    let generator = snapshot(engine.generator().varmap());
    engine.train(2)?;
    assert_every_var_moved("generator", &generator, engine.generator().varmap());
    assert_every_var_moved(
        "latent and pixel discriminator heads",
        &heads,
        engine.discriminator_heads().unwrap().varmap(),
    );
    assert_unchanged("teacher", &teacher, &frozen.teacher);
    assert_unchanged("pixel backbone", &pixel, &frozen.pixel);

    let rows = metric_rows(&engine.metrics_path());
    assert_eq!(rows.len(), 2);
    for key in [
        "loss_generator",
        "grad_norm_generator",
        "loss_discriminator",
        "grad_norm_discriminator",
    ] {
        assert!(
            rows.iter()
                .all(|r| r[key].as_f64().is_some_and(f64::is_finite)),
            "{key}"
        );
    }
    assert!(rows.iter().all(|r| r.get("loss_fake_score").is_none()));
    // No fake score is built or saved; the discriminator holds both head sets.
    let ckpt = dir.join("checkpoints").join(step_dir_name(2));
    assert!(!ckpt.join("fake_score").exists());
    let saved = candle_core::safetensors::load(
        ckpt.join("discriminator").join(WEIGHTS_FILE),
        &Device::Cpu,
    )?;
    assert_eq!(saved.len(), names.len());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn mse_loss_falls_and_every_generator_var_moves() -> Result<()> {
    let dir = run_dir("mse");
    // Two pairs and a fixed line time (s = 0.5): every step sees the same regression problem,
    // so the loss is a function of the weights alone.
    let store = pair_store(&dir.join("store"), 2)?;
    let mut config = engine_config(EngineMethod::Mse, 6, 10);
    config.adp.generator_timesteps = TimestepDistribution::Uniform { min: 0.5, max: 0.5 };
    let (_, mut engine) = pair_engine(config, &dir, &store)?;
    assert!(engine.discriminator_heads().is_none() && engine.fake_score().is_none());
    let generator = snapshot(engine.generator().varmap());
    engine.train(6)?;
    assert_every_var_moved("generator", &generator, engine.generator().varmap());
    let loss: Vec<f64> = metric_rows(&engine.metrics_path())
        .iter()
        .map(|r| r["loss_generator"].as_f64().unwrap())
        .collect();
    println!("mse losses: {loss:?}");
    assert!(
        loss.windows(2).all(|w| w[1] < w[0]) && loss[5] < 0.9 * loss[0],
        "the MSE loss did not fall: {loss:?}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn killed_and_resumed_adp_run_repeats_the_uninterrupted_one() -> Result<()> {
    let (steps, every) = (4, 2);
    let root = run_dir("adp-resume");
    // Five pairs: a step reads four, so a lost pair cursor shows.
    let store = pair_store(&root.join("store"), 5)?;
    let config = engine_config(EngineMethod::Adp, steps, every);
    let (whole, parts) = (root.join("whole"), root.join("parts"));
    pair_engine(config.clone(), &whole, &store)?
        .1
        .train(steps)?;
    {
        let (_, mut first) = pair_engine(config.clone(), &parts, &store)?;
        first.train(every)?;
    }
    let (_, mut second) = pair_engine(config, &parts, &store)?;
    assert_eq!(second.resume()?, Some(every));
    second.train(steps)?;

    assert_runs_identical(
        &whole,
        &parts,
        steps,
        4,
        "generator, its EMA, the discriminator heads and the optimiser state",
    );
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

#[test]
fn methods_without_their_networks_or_data_fail_clearly() -> Result<()> {
    let dir = run_dir("missing");
    let store = pair_store(&dir.join("store"), 2)?;
    let cfg = tiny_unet_config();
    // ADP needs pairs, not a condition bank.
    let (_, nets_a) = nets(&cfg)?;
    let err = Engine::new(
        engine_config(EngineMethod::Adp, 1, 1),
        &dir,
        nets_a,
        Box::new(conditions()?),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("adp") && err.contains("PairSource"), "{err}");
    // ADP with lambda_pixel > 0 needs the pixel backbone.
    let (_, nets_b) = nets(&cfg)?;
    let pairs = PairSource::new(store.clone(), 0, &Device::Cpu)?;
    let err = Engine::new(engine_config(EngineMethod::Adp, 1, 1), &dir, nets_b, pairs)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("engine.adp.lambda_pixel"), "{err}");
    // ADM needs a fake score; it may read its conditions from the store.
    let (_, mut nets_c) = nets(&cfg)?;
    nets_c.fake_score = None;
    let pairs = PairSource::new(store, 0, &Device::Cpu)?;
    let err = Engine::new(engine_config(EngineMethod::Adm, 1, 1), &dir, nets_c, pairs)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("fake score"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Every tensor of every safetensors file of checkpoint `dir` (networks and optimiser state).
fn checkpoint_tensors(dir: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut all = Vec::new();
    for (name, bytes) in file_bytes(dir) {
        for (tensor, t) in candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)? {
            all.push((format!("{name}: {tensor}"), t));
        }
    }
    Ok(all)
}

fn engine_in(compute_dtype: Precision, steps: usize, dir: &Path) -> Result<Engine<UNetBackbone>> {
    let cfg = tiny_unet_config();
    let (_, nets) = nets(&cfg)?;
    let config = EngineConfig {
        compute_dtype,
        ..engine_config(EngineMethod::Adm, steps, 10)
    };
    Engine::new(config, dir, nets, Box::new(conditions()?))
}

/// f16 compute (bf16 is the same path, but candle's CPU matmul has no bf16 kernel): every
/// trainable Var moves, Vars, EMA, checkpoint weights and optimiser state stay f32, the
/// networks really run in f16, and the losses track the f32 run's.
#[test]
fn f16_compute_trains_f32_master_weights_close_to_the_f32_run() -> Result<()> {
    let steps = 2;
    let f32_dir = run_dir("f32-compute");
    engine_in(Precision::F32, steps, &f32_dir)?.train(steps)?;

    let dir = run_dir("f16-compute");
    let mut engine = engine_in(Precision::F16, steps, &dir)?;
    assert_eq!(engine.generator().compute_dtype(), DType::F16);
    let generator = snapshot(engine.generator().varmap());
    let fake = snapshot(engine.fake_score().unwrap().varmap());
    let heads = snapshot(engine.discriminator_heads().unwrap().varmap());
    let ema = snapshot(engine.ema().varmap());
    engine.train(steps)?;
    let maps = [
        ("generator", &generator, engine.generator().varmap()),
        ("fake score", &fake, engine.fake_score().unwrap().varmap()),
        (
            "discriminator heads",
            &heads,
            engine.discriminator_heads().unwrap().varmap(),
        ),
        ("generator EMA", &ema, engine.ema().varmap()),
    ];
    for (what, before, varmap) in maps {
        assert_every_var_moved(what, before, varmap);
        for (name, t) in varmap_tensors(varmap) {
            assert_eq!(t.dtype(), DType::F32, "{what}: {name}");
        }
    }
    let ckpt = dir.join("checkpoints").join(step_dir_name(steps));
    let tensors = checkpoint_tensors(&ckpt)?;
    assert!(tensors.iter().any(|(n, _)| n.contains("exp_avg_sq")));
    for (name, t) in &tensors {
        assert_eq!(t.dtype(), DType::F32, "{name}");
    }

    // The generator computes through an f16 copy of its current Vars: f32 outputs within
    // f16 rounding of the f32 network's, but not equal to them.
    let x = adm_nn::randn(&mut StdRng::seed_from_u64(9), (2, 4, 8, 8), &Device::Cpu)?;
    let t = Tensor::new(&[300f32, 700.0], &Device::Cpu)?;
    let cond = conditions()?.fixed(2)?;
    let trainable = engine.generator();
    let want = adm_models::Backbone::forward(trainable.net.as_ref(), &x, &t, &cond)?;
    let copy = trainable.compute()?;
    let got = copy.forward(&x, &t, &cond)?;
    assert_eq!(got.dtype(), DType::F32);
    let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(
        err > 0.0 && err < 0.05 * scale,
        "f16 error {err} at scale {scale}"
    );
    // The copy is built once per change of the Vars, not per use.
    assert!(Arc::ptr_eq(&copy, &trainable.compute()?));
    trainable.master_changed();
    assert!(!Arc::ptr_eq(&copy, &trainable.compute()?));

    let (a, b) = (
        losses(&f32_dir.join("metrics.jsonl")),
        losses(&dir.join("metrics.jsonl")),
    );
    // Measured (2 steps): at step 0 (same weights, only f16 rounding apart) the training
    // losses are within 0.05% of the f32 run's; at step 1, after one Adam step (sign-like at
    // first: a weight whose gradient is at rounding level moves by the full learning rate
    // either way), within 5.4%. The DMD probe (a difference of teacher and fake-score
    // predictions, so f16 rounding weighs more) within 12%.
    assert_eq!(a.len(), steps);
    for (step, (a, b)) in a.iter().zip(&b).enumerate() {
        let loss_tolerance = if step == 0 { 0.01 } else { 0.1 };
        for (key, tolerance) in [
            ("loss_fake_score", loss_tolerance),
            ("loss_generator", loss_tolerance),
            ("loss_discriminator", loss_tolerance),
            ("dmd_probe", 0.3),
        ] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= tolerance * x.abs(),
                "step {step} {key}: f32 {x}, f16 {y}"
            );
        }
        assert_eq!(b["skipped_steps"], 0.0);
    }
    std::fs::remove_dir_all(&f32_dir)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// f16 compute: a fake-score weight finite in f32 but beyond f16's range (65504) makes every
/// update that runs the fake score non-finite; the guard skips them all and no Var changes.
#[test]
fn f16_overflow_is_skipped_by_the_non_finite_guard() -> Result<()> {
    let dir = run_dir("f16-overflow");
    let mut engine = engine_in(Precision::F16, 1, &dir)?;
    let fake = engine.fake_score().unwrap();
    let conv_in = fake.varmap().data().lock().unwrap()["conv_in.weight"].clone();
    conv_in.set(&conv_in.ones_like()?.affine(1e5, 0.0)?)?;
    fake.master_changed();
    let generator = snapshot(engine.generator().varmap());
    let fake = snapshot(engine.fake_score().unwrap().varmap());
    let heads = snapshot(engine.discriminator_heads().unwrap().varmap());
    engine.train(1)?;
    let row = &metric_rows(&engine.metrics_path())[0];
    assert_eq!(row["skipped_steps"], 3.0, "{row}");
    for (what, before, varmap) in [
        ("generator", &generator, engine.generator().varmap()),
        ("fake score", &fake, engine.fake_score().unwrap().varmap()),
        (
            "discriminator heads",
            &heads,
            engine.discriminator_heads().unwrap().varmap(),
        ),
    ] {
        for (name, t) in varmap_tensors(varmap) {
            assert_eq!(max_change(before, &name, &t), 0.0, "{what}: {name} moved");
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
