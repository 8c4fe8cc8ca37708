//! UNet2DConditionModel: parity with diffusers (float64 reference from
//! scripts/make_fixtures.py), gradients reaching every Var, a finite-difference check of the
//! whole network, and the published SD 1.5 / 2.1 / SDXL configs.

mod common;

use std::path::PathBuf;

use adm_diffusion::{Schedule, ScheduleConfig};
use adm_models::unet_2d::{
    check_tensor_names, expected_tensors, Config, TextTime, UNet2DConditionModel, UNetBackbone,
};
use adm_models::{guided_prediction, Backbone, Condition};
use adm_nn::{assert_every_var_has_grad, check_gradients, GradCheck, SeededVarMap};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use common::{assert_parity, load_tensors, relative_error, DIFFUSERS_WEIGHTS, PARITY_TOL};

fn fixture_dir(name: &str) -> PathBuf {
    common::fixture_dir("unet", name)
}

/// A UNET fixture and the model built from its weights (`f.model`).
type Fixture = common::WithModel<Config, UNet2DConditionModel>;

fn load_fixture(name: &str) -> Result<Fixture> {
    common::Fixture::<Config>::load("unet", name, DIFFUSERS_WEIGHTS)?.with_model(|f| {
        // Every tensor in the file is used and every tensor the model needs is there.
        check_tensor_names(&f.config, f.weights.keys().map(String::as_str))?;
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[f.dir.join(DIFFUSERS_WEIGHTS)],
                DType::F32,
                &Device::Cpu,
            )?
        };
        UNet2DConditionModel::new(vb, &f.config)
    })
}

fn check_parity(name: &str) -> Result<()> {
    let f = load_fixture(name)?;
    let added = if f.config.uses_text_time() {
        Some(TextTime {
            text_embeds: &f.inputs["text_embeds"],
            time_ids: &f.inputs["time_ids"],
        })
    } else {
        None
    };
    let taps: Vec<String> = f
        .config
        .feature_taps()
        .into_iter()
        .map(|t| t.name)
        .collect();
    let (sample, features) = f.model.forward_with_features(
        &f.inputs["sample"],
        &f.inputs["timestep"],
        &f.inputs["encoder_hidden_states"],
        added,
        &taps,
    )?;
    assert_parity(&format!("{name}: sample"), &sample, &f.outputs["sample"])?;
    for (tap, feature) in taps.iter().zip(&features) {
        assert_parity(&format!("{name}: {tap}"), feature, &f.outputs[tap])?;
    }

    // `features` stops early and returns the taps in the order asked for.
    let asked = vec!["mid_block".to_string(), "down_blocks.0".to_string()];
    let early = f.model.features(
        &f.inputs["sample"],
        &f.inputs["timestep"],
        &f.inputs["encoder_hidden_states"],
        added,
        &asked,
    )?;
    let position = |name: &str| taps.iter().position(|t| t == name).unwrap();
    assert_eq!(
        relative_error(&early[0], &features[position("mid_block")])?,
        0.0
    );
    assert_eq!(
        relative_error(&early[1], &features[position("down_blocks.0")])?,
        0.0
    );
    let err = f
        .model
        .features(
            &f.inputs["sample"],
            &f.inputs["timestep"],
            &f.inputs["encoder_hidden_states"],
            added,
            &["nope".into()],
        )
        .unwrap_err();
    assert!(err.to_string().contains("no feature tap `nope`"), "{err}");
    Ok(())
}

#[test]
fn sdxl_tiny_matches_diffusers() -> Result<()> {
    check_parity("sdxl_tiny")
}

#[test]
fn sd15_tiny_matches_diffusers() -> Result<()> {
    check_parity("sd15_tiny")
}

#[test]
fn checkpoint_name_and_shape_errors_are_reported() -> Result<()> {
    let dir = fixture_dir("sdxl_tiny");
    let config: Config = common::config(&dir);
    let mut weights = load_tensors(dir.join(DIFFUSERS_WEIGHTS))?;
    weights.remove("mid_block.attentions.0.proj_in.weight");
    weights.insert(
        "extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,
    );
    let err = check_tensor_names(&config, weights.keys().map(String::as_str))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mid_block.attentions.0.proj_in.weight") && err.contains("extra.weight"),
        "{err}"
    );

    // A wrong shape names the tensor and both shapes.
    let mut weights = load_tensors(dir.join(DIFFUSERS_WEIGHTS))?;
    weights.insert(
        "conv_in.weight".into(),
        Tensor::zeros((16, 4, 1, 1), DType::F32, &Device::Cpu)?,
    );
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let err = UNet2DConditionModel::new(vb, &config)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("conv_in.weight")
            && err.contains("[16, 4, 1, 1]")
            && err.contains("[16, 4, 3, 3]"),
        "{err}"
    );
    Ok(())
}

/// A small SDXL-like config (the fixture's, optionally shrunk).
fn tiny_config(dir: &str) -> Config {
    common::config(&fixture_dir(dir))
}

fn inputs(
    cfg: &Config,
    batch: usize,
    size: usize,
    dtype: DType,
) -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
    let dev = Device::Cpu;
    let context_dim = match &cfg.cross_attention_dim {
        adm_models::unet_2d::OneOrMany::One(d) => *d,
        adm_models::unet_2d::OneOrMany::Many(d) => d[0],
    };
    let pooled = cfg.projection_class_embeddings_input_dim.unwrap_or(0)
        - 6 * cfg.addition_time_embed_dim.unwrap_or(0);
    let sample =
        Tensor::randn(0f32, 1.0, (batch, cfg.in_channels, size, size), &dev)?.to_dtype(dtype)?;
    let t = Tensor::new(&[880f32, 42.0][..batch], &dev)?;
    let context = Tensor::randn(0f32, 1.0, (batch, 3, context_dim), &dev)?.to_dtype(dtype)?;
    let text = Tensor::randn(0f32, 1.0, (batch, pooled), &dev)?.to_dtype(dtype)?;
    let ids = Tensor::new(
        &[[32f32, 32., 0., 0., 32., 32.], [16., 48., 2., 0., 32., 32.]],
        &dev,
    )?
    .narrow(0, 0, batch)?;
    Ok((sample, t, context, text, ids))
}

fn every_var_gets_a_gradient(dir: &str) -> Result<()> {
    let cfg = tiny_config(dir);
    let seeded = SeededVarMap::new(7);
    let unet = UNet2DConditionModel::new(seeded.var_builder(DType::F32, &Device::Cpu), &cfg)?;
    assert_eq!(
        seeded.varmap().all_vars().len(),
        expected_tensors(&cfg)?.len()
    );
    let (sample, t, context, text, ids) = inputs(&cfg, 2, 8, DType::F32)?;
    let added = cfg.uses_text_time().then_some(TextTime {
        text_embeds: &text,
        time_ids: &ids,
    });
    let out = unet.forward(&sample, &t, &context, added)?;
    let target = Tensor::randn(0f32, 1.0, out.shape(), &Device::Cpu)?;
    let loss = (out - target)?.sqr()?.mean_all()?;
    // The training path (Var gradients handed over) against candle's own pass.
    let grads = adm_nn::backward(&loss)?;
    assert_every_var_has_grad(seeded.varmap(), &grads)?;
    let candle = loss.backward()?;
    for var in seeded.varmap().all_vars() {
        let ours = grads.get(var.as_tensor()).expect("checked above");
        let theirs = candle
            .get(var.as_tensor())
            .expect("candle's pass reaches it too");
        let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{dir}: a Var of shape {:?}", var.shape());
    }
    Ok(())
}

#[test]
fn every_var_gets_a_gradient_sdxl_tiny() -> Result<()> {
    every_var_gets_a_gradient("sdxl_tiny")
}

#[test]
fn every_var_gets_a_gradient_sd15_tiny() -> Result<()> {
    every_var_gets_a_gradient("sd15_tiny")
}

/// Finite differences of the whole network (f64) with respect to the input sample, on a
/// very small SDXL-like config (text_time, two transformer layers, both block types).
#[test]
fn finite_difference_gradient_wrt_sample() -> Result<()> {
    let mut cfg = tiny_config("sdxl_tiny");
    cfg.block_out_channels = vec![8, 16];
    cfg.norm_num_groups = 4;
    cfg.cross_attention_dim = adm_models::unet_2d::OneOrMany::One(8);
    cfg.addition_time_embed_dim = Some(4);
    cfg.projection_class_embeddings_input_dim = Some(4 + 6 * 4);
    let seeded = SeededVarMap::new(11);
    let unet = UNet2DConditionModel::new(seeded.var_builder(DType::F64, &Device::Cpu), &cfg)?;
    let (sample, t, context, text, ids) = inputs(&cfg, 2, 4, DType::F64)?;
    let added = Some(TextTime {
        text_embeds: &text,
        time_ids: &ids,
    });
    let report = check_gradients(
        |xs| unet.forward(&xs[0], &t, &context, added),
        &[sample],
        GradCheck {
            max_probes_per_input: 6,
            ..GradCheck::default()
        },
    )?;
    println!("finite differences: {report:?}");
    assert!(
        report.probes == 6 && report.max_abs_numeric > 1e-3,
        "{report:?}"
    );
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let cfg = tiny_config("sdxl_tiny");
    let seeded = SeededVarMap::new(3);
    let unet = UNet2DConditionModel::new(seeded.var_builder(DType::F32, &Device::Cpu), &cfg)?;
    let (sample, t, context, text, ids) = inputs(&cfg, 2, 8, DType::F32)?;
    let added = Some(TextTime {
        text_embeds: &text,
        time_ids: &ids,
    });
    // H, W must be multiples of 2 (one downsampler).
    let odd = Tensor::zeros((2, 4, 7, 8), DType::F32, &Device::Cpu)?;
    assert!(unet.forward(&odd, &t, &context, added).is_err());
    // Per-sample timesteps of the wrong length.
    let t3 = Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?;
    assert!(unet.forward(&sample, &t3, &context, added).is_err());
    // A single timestep is broadcast over the batch.
    let t1 = Tensor::new(&[880f32], &Device::Cpu)?;
    let one = unet.forward(&sample, &t1, &context, added)?;
    let both = unet.forward(
        &sample,
        &Tensor::new(&[880f32, 880.], &Device::Cpu)?,
        &context,
        added,
    )?;
    assert_eq!(relative_error(&one, &both)?, 0.0);
    // text_time needs the added condition.
    let err = unet.forward(&sample, &t, &context, None).unwrap_err();
    assert!(err.to_string().contains("text_embeds"), "{err}");
    // Wrong context width.
    let wide = Tensor::zeros((2, 3, 5), DType::F32, &Device::Cpu)?;
    assert!(unet.forward(&sample, &t, &wide, added).is_err());
    Ok(())
}

/// The published configs build (without allocating) to the parameter counts diffusers gives.
#[test]
fn published_configs_have_diffusers_parameter_counts() -> Result<()> {
    for (name, cfg, tensors, params) in [
        ("sd15", Config::sd15(), 686, 859_520_964usize),
        ("sd21", Config::sd21(), 686, 865_910_724),
        ("sdxl", Config::sdxl(), 1680, 2_567_463_684),
    ] {
        let expected = expected_tensors(&cfg)?;
        let count: usize = expected.iter().map(|(_, s)| s.elem_count()).sum();
        assert_eq!((expected.len(), count), (tensors, params), "{name}");
        // The presets survive a config.json round trip.
        let json = serde_json::to_string(&cfg).unwrap();
        let back: Config = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg, "{name}");
    }
    // Unsupported options are rejected, not ignored.
    let mut cfg = Config::sdxl();
    cfg.resnet_time_scale_shift = "scale_shift".into();
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("resnet_time_scale_shift"));
    Ok(())
}

/// The Backbone wrapper reads the condition by diffusers' argument names, offers every block
/// output as a tap, and takes the unconditional (negative prompt) condition from the data.
#[test]
fn backbone_wrapper_condition_taps_and_unconditional() -> Result<()> {
    let f = load_fixture("sdxl_tiny")?;
    let backbone = UNetBackbone::new(f.model.clone(), Schedule::new(&ScheduleConfig::sdxl())?);
    let (x, t) = (&f.inputs["sample"], &f.inputs["timestep"]);
    let cond = Condition::new()
        .with(
            "encoder_hidden_states",
            f.inputs["encoder_hidden_states"].clone(),
        )
        .with("text_embeds", f.inputs["text_embeds"].clone())
        .with("time_ids", f.inputs["time_ids"].clone());
    let out = backbone.forward(x, t, &cond)?;
    assert!(relative_error(&out, &f.outputs["sample"])? < PARITY_TOL);

    let taps: Vec<(String, usize)> = backbone
        .feature_taps()
        .into_iter()
        .map(|t| (t.name, t.channels))
        .collect();
    let names = [
        "down_blocks.0",
        "down_blocks.1",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
    ];
    assert_eq!(
        taps,
        names
            .iter()
            .zip([16, 32, 32, 32, 16])
            .map(|(n, c)| (n.to_string(), c))
            .collect::<Vec<_>>()
    );
    let asked = vec!["up_blocks.0".to_string(), "down_blocks.1".to_string()];
    let features = backbone.features(x, t, &cond, &asked)?;
    for (tap, feature) in asked.iter().zip(&features) {
        assert_eq!(
            feature.dim(1)?,
            taps.iter().find(|(n, _)| n == tap).unwrap().1
        );
        assert!(
            relative_error(feature, &f.outputs[tap])? < PARITY_TOL,
            "{tap}"
        );
    }

    // No negative prompt in the condition: a clear error.
    let err = backbone.unconditional(&cond).unwrap_err().to_string();
    assert!(err.contains("negative_encoder_hidden_states"), "{err}");
    // With one, guidance runs both halves as one batch; guiding towards the same condition
    // changes nothing.
    let same = cond
        .clone()
        .with(
            "negative_encoder_hidden_states",
            f.inputs["encoder_hidden_states"].clone(),
        )
        .with("negative_text_embeds", f.inputs["text_embeds"].clone());
    let guided = guided_prediction(&backbone, x, t, &same, 4.5)?;
    assert!(relative_error(&guided, &out)? < 1e-5);
    let other = same.clone().with(
        "negative_encoder_hidden_states",
        (f.inputs["encoder_hidden_states"].clone() * 0.0)?,
    );
    let uncond = backbone.unconditional(&other)?;
    assert_eq!(
        uncond
            .get("encoder_hidden_states")?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?,
        0.0
    );
    assert!(relative_error(&guided_prediction(&backbone, x, t, &other, 4.5)?, &out)? > 1e-3);
    Ok(())
}
