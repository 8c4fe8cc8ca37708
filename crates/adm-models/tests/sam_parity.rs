//! SAM ViT image encoder: parity with transformers' SamVisionModel (float64 reference from
//! scripts/fixtures_sam.py), checkpoint layouts (bare, `vision_encoder.`, a full SamModel),
//! bad weights, gradients (finite differences in f64, every Var), the pixel discriminator
//! over SAM, and the published configs.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use adm_models::loading::{expected_tensors, Weights};
use adm_models::sam::{
    load_frozen, load_trainable, pixel_discriminator, Config, SamFeatureExtractor,
    SamVisionEncoder, PIXEL_MEAN, PIXEL_STD,
};
use adm_models::{ConvHeadConfig, FeatureExtractor, HeadDims};
use adm_nn::{assert_every_var_has_grad, check_gradients, GradCheck, SeededVarMap};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_parity, weights_from, Fixture, Loaders, TempDir};

const CPU: Device = Device::Cpu;

fn fixture() -> Result<Fixture<Config>> {
    Fixture::load("sam", "tiny", "model.safetensors")
}

fn heads_cfg() -> ConvHeadConfig {
    ConvHeadConfig {
        dims: HeadDims::Image,
        layers: 1,
        channels: 8,
        groups: 4,
    }
}

/// Writes `tensors` as a safetensors file in `dir` and opens it.
/// The tiny fixture's loaders.
fn loaders(
    cfg: &Config,
) -> Loaders<
    impl Fn(&Weights) -> Result<SamVisionEncoder> + '_,
    impl Fn(&Weights, &VarMap) -> Result<SamVisionEncoder> + '_,
> {
    Loaders {
        frozen: move |w: &Weights| load_frozen(w, cfg, DType::F32, &CPU),
        trainable: move |w: &Weights, v: &VarMap| load_trainable(w, cfg, v, DType::F32, &CPU),
    }
}

/// Measured (f32 against float64): last_hidden_state 4.7e-7, hidden states <= 3.1e-7.
#[test]
fn matches_transformers() -> Result<()> {
    let f = fixture()?;
    assert_eq!(Config::from_json(&f.dir.join("config.json"))?, f.config);
    let weights = Weights::open(&f.dir, None)?;
    let model = load_frozen(&weights, &f.config, DType::F32, &CPU)?;
    let pixels = &f.inputs["pixel_values"];
    assert_parity(
        "sam last_hidden_state",
        &model.forward(pixels)?,
        &f.outputs["last_hidden_state"],
    )?;
    let all = model.forward_with_features(pixels, &[0, 1, 2, 3])?;
    for (i, got) in all.iter().enumerate() {
        let key = format!("hidden_states.{}", i + 1);
        assert_parity(&format!("sam {key}"), got, &f.outputs[&key])?;
    }
    // Any order, stopping early: the same maps.
    let some = model.forward_with_features(pixels, &[2, 0])?;
    assert_eq!(common::relative_error(&some[0], &all[2])?, 0.0);
    assert_eq!(common::relative_error(&some[1], &all[0])?, 0.0);
    Ok(())
}

/// Bare `SamVisionEncoder` names and a full `SamModel` checkpoint (prompt encoder / mask
/// decoder tensors skipped) load the same model; other extra tensors are errors naming them.
#[test]
fn checkpoint_layouts() -> Result<()> {
    let f = fixture()?;
    let tmp = TempDir::new("sam-layouts");
    let pixels = &f.inputs["pixel_values"];
    let want = &f.outputs["last_hidden_state"];

    let bare: HashMap<String, Tensor> = f
        .weights
        .iter()
        .map(|(k, v)| {
            (
                k.strip_prefix("vision_encoder.").unwrap().to_string(),
                v.clone(),
            )
        })
        .collect();
    let model = load_frozen(
        &weights_from(&tmp.0, "bare", &bare)?,
        &f.config,
        DType::F32,
        &CPU,
    )?;
    assert_parity("sam bare names", &model.forward(pixels)?, want)?;

    let mut full = f.weights.clone();
    for name in [
        "shared_image_embedding.positional_embedding",
        "prompt_encoder.mask_embed.conv1.weight",
        "mask_decoder.iou_token.weight",
    ] {
        full.insert(name.to_string(), Tensor::zeros(4, DType::F32, &CPU)?);
    }
    let weights = weights_from(&tmp.0, "full", &full)?;
    let model = load_frozen(&weights, &f.config, DType::F32, &CPU)?;
    assert_parity("sam SamModel checkpoint", &model.forward(pixels)?, want)?;
    let varmap = VarMap::new();
    load_trainable(&weights, &f.config, &varmap, DType::F32, &CPU)?;
    assert!(varmap
        .data()
        .lock()
        .unwrap()
        .contains_key("vision_encoder.neck.conv2.weight"));

    for extra in ["vision_encoder.layers.0.attn.extra", "text_encoder.weight"] {
        let mut more = f.weights.clone();
        more.insert(extra.to_string(), Tensor::zeros(2, DType::F32, &CPU)?);
        loaders(&f.config).assert_rejected(&tmp.0, &more, &[extra, "unexpected"], &[extra]);
    }
    Ok(())
}

#[test]
fn missing_or_misshaped_tensors_are_named() -> Result<()> {
    let f = fixture()?;
    let tmp = TempDir::new("sam-bad");
    let name = "vision_encoder.layers.1.attn.rel_pos_h";

    let mut missing = f.weights.clone();
    missing.remove(name);
    let needles = ["missing tensor", name];
    loaders(&f.config).assert_rejected(&tmp.0, &missing, &needles, &needles);

    // A relative-position table for another window size (global layer 1: 2 * 8 - 1 = 15 rows).
    let mut misshaped = f.weights.clone();
    misshaped.insert(name.to_string(), Tensor::zeros((5, 16), DType::F32, &CPU)?);
    loaders(&f.config).assert_rejected(
        &tmp.0,
        &misshaped,
        &[name, "[5, 16]", "[15, 16]"],
        &[name, "[15, 16]"],
    );
    Ok(())
}

/// The whole tiny encoder (f64) against central differences, with respect to the pixels and
/// to every parameter tensor (a few entries each): relative positions, windows with padding,
/// global attention, MLP and neck.
#[test]
fn encoder_gradients_match_finite_differences() -> Result<()> {
    let f = fixture()?;
    let mut names: Vec<String> = f.weights.keys().cloned().collect();
    names.sort();
    let mut inputs = vec![f.inputs["pixel_values"]
        .narrow(0, 0, 1)?
        .to_dtype(DType::F64)?];
    inputs.extend(
        names
            .iter()
            .map(|n| f.weights[n].to_dtype(DType::F64).unwrap()),
    );
    let report = check_gradients(
        |xs| {
            let map: HashMap<String, Tensor> =
                names.iter().cloned().zip(xs[1..].iter().cloned()).collect();
            let vb = VarBuilder::from_tensors(map, DType::F64, &CPU);
            SamVisionEncoder::new(vb.pp("vision_encoder"), &f.config)?.forward(&xs[0])
        },
        &inputs,
        GradCheck {
            max_probes_per_input: 3,
            ..GradCheck::default()
        },
    )?;
    println!("sam encoder ({} inputs): {report:?}", inputs.len());
    assert!(report.max_abs_numeric > 1e-3, "{report:?}");
    Ok(())
}

/// The pixel discriminator over a frozen SAM (f64): its gradient with respect to the `[-1, 1]`
/// images, what the generator's loss needs, matches finite differences.
#[test]
fn pixel_discriminator_gradient_reaches_the_images() -> Result<()> {
    let f = fixture()?;
    let weights = Weights::open(&f.dir, None)?;
    let encoder = Arc::new(load_frozen(&weights, &f.config, DType::F64, &CPU)?);
    let heads = SeededVarMap::new(11);
    let disc = pixel_discriminator(
        encoder,
        &[1, 3],
        &heads_cfg(),
        heads.var_builder(DType::F64, &CPU),
    )?;
    let images = (f.inputs["pixel_values"].to_dtype(DType::F64)?.tanh()? * 0.9)?;
    assert_eq!(disc.logits(&images)?.dims(), &[2]);
    let report = check_gradients(
        |xs| disc.logits(&xs[0]),
        &[images],
        GradCheck {
            max_probes_per_input: 6,
            ..GradCheck::default()
        },
    )?;
    println!("sam pixel discriminator: {report:?}");
    assert!(report.max_abs_numeric > 1e-5, "{report:?}");
    Ok(())
}

/// SAM loaded trainable plus the discriminator heads: every Var of both gets a gradient
/// (the neck through `forward`, the blocks and heads through the discriminator).
#[test]
fn every_var_gets_a_gradient() -> Result<()> {
    let f = fixture()?;
    let weights = Weights::open(&f.dir, None)?;
    let sam_vars = VarMap::new();
    let encoder = Arc::new(load_trainable(
        &weights,
        &f.config,
        &sam_vars,
        DType::F32,
        &CPU,
    )?);
    assert_eq!(sam_vars.all_vars().len(), f.weights.len());
    let heads = SeededVarMap::new(12);
    let disc = pixel_discriminator(
        encoder.clone(),
        &[1, 3],
        &heads_cfg(),
        heads.var_builder(DType::F32, &CPU),
    )?;
    let images = f.inputs["pixel_values"].tanh()?;
    let loss = (disc.logits(&images)?.sum_all()?
        + encoder
            .forward(&SamFeatureExtractor::normalize(&images)?)?
            .sqr()?
            .mean_all()?)?;
    let grads = loss.backward()?;
    assert_every_var_has_grad(&sam_vars, &grads)?;
    assert_every_var_has_grad(heads.varmap(), &grads)?;
    Ok(())
}

#[test]
fn feature_extractor_normalises_and_checks_inputs() -> Result<()> {
    let f = fixture()?;
    let weights = Weights::open(&f.dir, None)?;
    let encoder = Arc::new(load_frozen(&weights, &f.config, DType::F32, &CPU)?);
    // -1 is black (0), +1 white (255): SamProcessor gives -mean/std and (1-mean)/std.
    let images = Tensor::new(&[-1f32, 1.0], &CPU)?
        .reshape((1, 1, 2, 1))?
        .repeat((1, 3, 1, 1))?;
    let got = &SamFeatureExtractor::normalize(&images)?
        .get(0)?
        .to_vec3::<f32>()?;
    for c in 0..3 {
        let black = -PIXEL_MEAN[c] / PIXEL_STD[c];
        let white = (1.0 - PIXEL_MEAN[c]) / PIXEL_STD[c];
        assert!((got[c][0][0] as f64 - black).abs() < 1e-6);
        assert!((got[c][1][0] as f64 - white).abs() < 1e-6);
    }

    let extractor = SamFeatureExtractor::new(encoder.clone(), &[0, 2])?;
    assert_eq!(extractor.feature_channels(), vec![32, 32]);
    let features = extractor.features(&f.inputs["pixel_values"].tanh()?)?;
    assert_eq!(features[1].dims(), &[2, 32, 8, 8]);

    let err = SamFeatureExtractor::new(encoder.clone(), &[4])
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 4 does not exist"), "{err}");
    let small = Tensor::zeros((1, 3, 16, 16), DType::F32, &CPU)?;
    let err = extractor.features(&small).unwrap_err().to_string();
    assert!(
        err.contains("(3, 32, 32)") && err.contains("[1, 3, 16, 16]"),
        "{err}"
    );
    let video_heads = ConvHeadConfig {
        dims: HeadDims::Video,
        ..heads_cfg()
    };
    let vb = SeededVarMap::new(0).var_builder(DType::F32, &CPU);
    assert!(pixel_discriminator(encoder, &[0], &video_heads, vb).is_err());
    Ok(())
}

/// Tensor and parameter counts of facebook/sam-vit-{base,large,huge}'s vision encoders, as
/// transformers counts them (printed by scripts/fixtures_sam.py); configs from JSON.
#[test]
fn published_configs() -> Result<()> {
    for (cfg, tensors, params) in [
        (Config::vit_b(), 177, 89_670_912),
        (Config::vit_l(), 345, 308_278_272),
        (Config::vit_h(), 457, 637_026_048),
    ] {
        let names = expected_tensors(|vb| SamVisionEncoder::new(vb, &cfg))?;
        let count: usize = names.iter().map(|(_, s)| s.elem_count()).sum();
        assert_eq!((names.len(), count), (tensors, params), "{cfg:?}");
    }
    assert_eq!(Config::vit_b().mlp_dim(), Config::default().mlp_dim());
    // `window_size = 0`: every layer global, so every table spans the 64x64 grid.
    let all_global = Config {
        window_size: 0,
        ..Config::vit_b()
    };
    let names = expected_tensors(|vb| SamVisionEncoder::new(vb, &all_global))?;
    let tables: Vec<_> = names
        .iter()
        .filter(|(n, _)| n.ends_with("rel_pos_h"))
        .collect();
    assert_eq!(tables.len(), 12);
    assert!(tables.iter().all(|(_, s)| s.dims() == [127, 64]));

    let tmp = TempDir::new("sam-config");
    let path = tmp.0.join("config.json");
    let sam_model = r#"{"model_type": "sam", "vision_config": {"hidden_size": 1280,
        "num_hidden_layers": 32, "num_attention_heads": 16, "mlp_dim": 5120,
        "global_attn_indexes": [7, 15, 23, 31], "model_type": "sam_vision_model"},
        "mask_decoder_config": {"hidden_size": 256}}"#;
    std::fs::write(&path, sam_model)?;
    assert_eq!(Config::from_json(&path)?, Config::vit_h());

    let bad = Config {
        hidden_act: "relu".to_string(),
        ..Config::vit_b()
    };
    let err = expected_tensors(|vb| SamVisionEncoder::new(vb, &bad))
        .unwrap_err()
        .to_string();
    assert!(err.contains("hidden_act"), "{err}");
    let bad = Config {
        global_attn_indexes: vec![12],
        ..Config::vit_b()
    };
    let err = expected_tensors(|vb| SamVisionEncoder::new(vb, &bad))
        .unwrap_err()
        .to_string();
    assert!(err.contains("global_attn_indexes"), "{err}");
    Ok(())
}
