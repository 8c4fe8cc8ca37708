//! DINOv2 image encoder: parity with transformers' Dinov2Model (float64 reference from
//! scripts/fixtures_dinov2.py) on the trained grid and on an interpolated one, the image
//! resize against PyTorch, checkpoint layouts (bare, `dinov2.` with a classifier), bad
//! weights, gradients (finite differences in f64, every Var), the pixel discriminator over
//! DINOv2, and the published configs.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use adm_models::dinov2::{
    load_frozen, load_trainable, pixel_discriminator, Config, Dinov2FeatureExtractor, Dinov2Model,
};
use adm_models::loading::{expected_tensors, Weights};
use adm_models::pixel_encoder::{resize, Resample, IMAGENET_MEAN, IMAGENET_STD};
use adm_models::{ConvHeadConfig, FeatureExtractor, HeadDims};
use adm_nn::{assert_every_var_has_grad, check_gradients, GradCheck, SeededVarMap};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_parity, weights_from, Fixture, Loaders, TempDir};

const CPU: Device = Device::Cpu;

fn fixture(name: &str) -> Result<Fixture<Config>> {
    Fixture::load("dinov2", name, "model.safetensors")
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
    impl Fn(&Weights) -> Result<Dinov2Model> + '_,
    impl Fn(&Weights, &VarMap) -> Result<Dinov2Model> + '_,
> {
    Loaders {
        frozen: move |w: &Weights| load_frozen(w, cfg, DType::F32, &CPU),
        trainable: move |w: &Weights, v: &VarMap| load_trainable(w, cfg, v, DType::F32, &CPU),
    }
}

/// f32 against float64: max |error| relative to the largest reference entry, below
/// `common::PARITY_TOL` (1e-5; 1e-4 was asked for).
fn check_model(name: &str, prefixes: &[(&str, &str)]) -> Result<()> {
    let f = fixture(name)?;
    assert_eq!(Config::from_json(&f.dir.join("config.json"))?, f.config);
    let model = load_frozen(&Weights::open(&f.dir, None)?, &f.config, DType::F32, &CPU)?;
    let layers: Vec<usize> = (0..f.config.num_hidden_layers).collect();
    for (input, prefix) in prefixes {
        let pixels = &f.inputs[*input];
        assert_parity(
            &format!("dinov2 {name} {prefix}last_hidden_state"),
            &model.forward(pixels)?,
            &f.outputs[&format!("{prefix}last_hidden_state")],
        )?;
        let states = model.hidden_states(pixels, &layers)?;
        for (i, got) in states.iter().enumerate() {
            let key = format!("{prefix}hidden_states.{}", i + 1);
            assert_parity(&format!("dinov2 {name} {key}"), got, &f.outputs[&key])?;
        }
        // Feature maps: the same states without CLS, channels first; any order.
        let (_, _, h, w) = pixels.dims4()?;
        let (gh, gw) = model.grid(h, w);
        let maps = model.forward_with_features(pixels, &[1, 0])?;
        let want = states[0].narrow(1, 1, gh * gw)?.transpose(1, 2)?.reshape((
            pixels.dim(0)?,
            f.config.hidden_size,
            gh,
            gw,
        ))?;
        assert_eq!(common::relative_error(&maps[1], &want)?, 0.0);
        assert_eq!(
            maps[0].dims(),
            &[pixels.dim(0)?, f.config.hidden_size, gh, gw]
        );
    }
    Ok(())
}

/// Measured (f32 against float64): tiny last_hidden_state 4.1e-7 on the trained grid, 5.2e-7
/// on the interpolated one, hidden states <= 4.4e-7; tiny_swiglu <= 2.9e-7.
#[test]
fn matches_transformers() -> Result<()> {
    // 24x24 pixels: the trained 6x6 grid; 34x22: an 8x5 grid, bicubic position embedding.
    check_model(
        "tiny",
        &[("pixel_values", ""), ("pixel_values_interp", "interp.")],
    )?;
    check_model("tiny_swiglu", &[("pixel_values", "")])
}

/// `resize` against `F.interpolate(bilinear, antialias=True)` and `F.interpolate(bicubic)`,
/// downsampling and upsampling. Measured: <= 1.3e-7 (f32 against float64).
#[test]
fn resize_matches_pytorch() -> Result<()> {
    let f = fixture("tiny")?;
    let x = &f.inputs["resize_in"];
    for (filter, name) in [
        (Resample::BilinearAntialias, "resize"),
        (Resample::Bicubic, "bicubic"),
    ] {
        for (key, (h, w)) in [("down", (4, 3)), ("up", (13, 16))] {
            let key = format!("{name}_{key}");
            assert_parity(&key, &resize(x, h, w, filter)?, &f.outputs[&key])?;
        }
    }
    // Same size: the identity, for both filters.
    for filter in [Resample::Bicubic, Resample::BilinearAntialias] {
        let same = resize(x, 10, 7, filter)?;
        assert!(common::relative_error(&same, x)? < 1e-6);
    }
    assert!(resize(x, 0, 3, Resample::Bicubic).is_err());
    Ok(())
}

/// Both resizes are linear maps of their input: their gradient matches finite differences.
#[test]
fn resize_gradients_match_finite_differences() -> Result<()> {
    let x = adm_nn::randn(
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3),
        (1, 2, 6, 5),
        &CPU,
    )?
    .to_dtype(DType::F64)?;
    for filter in [Resample::Bicubic, Resample::BilinearAntialias] {
        for (h, w) in [(3, 4), (9, 7)] {
            let report = check_gradients(
                |xs| resize(&xs[0], h, w, filter),
                std::slice::from_ref(&x),
                GradCheck::default(),
            )?;
            assert!(report.max_abs_numeric > 1e-3, "{filter:?}: {report:?}");
        }
    }
    Ok(())
}

/// A `Dinov2ForImageClassification` checkpoint (`dinov2.` prefix, `classifier.` skipped)
/// loads the same model; other extra tensors are errors naming them.
#[test]
fn checkpoint_layouts() -> Result<()> {
    let f = fixture("tiny")?;
    let tmp = TempDir::new("dinov2-layouts");
    let pixels = &f.inputs["pixel_values"];
    let want = &f.outputs["last_hidden_state"];

    let mut classifier: HashMap<String, Tensor> = f
        .weights
        .iter()
        .map(|(k, v)| (format!("dinov2.{k}"), v.clone()))
        .collect();
    classifier.insert(
        "classifier.weight".to_string(),
        Tensor::zeros((5, 32), DType::F32, &CPU)?,
    );
    classifier.insert(
        "classifier.bias".to_string(),
        Tensor::zeros(5, DType::F32, &CPU)?,
    );
    let weights = weights_from(&tmp.0, "classifier", &classifier)?;
    let model = load_frozen(&weights, &f.config, DType::F32, &CPU)?;
    assert_parity(
        "dinov2 classifier checkpoint",
        &model.forward(pixels)?,
        want,
    )?;
    let varmap = VarMap::new();
    load_trainable(&weights, &f.config, &varmap, DType::F32, &CPU)?;
    assert!(varmap
        .data()
        .lock()
        .unwrap()
        .contains_key("dinov2.embeddings.mask_token"));

    for extra in ["encoder.layer.0.attention.extra", "pooler.dense.weight"] {
        let mut more = f.weights.clone();
        more.insert(extra.to_string(), Tensor::zeros(2, DType::F32, &CPU)?);
        loaders(&f.config).assert_rejected(&tmp.0, &more, &[extra, "unexpected"], &[extra]);
    }
    Ok(())
}

#[test]
fn missing_or_misshaped_tensors_are_named() -> Result<()> {
    let f = fixture("tiny")?;
    let tmp = TempDir::new("dinov2-bad");
    for name in [
        "embeddings.mask_token",
        "encoder.layer.2.layer_scale2.lambda1",
    ] {
        let mut missing = f.weights.clone();
        missing.remove(name);
        let needles = ["missing tensor", name];
        loaders(&f.config).assert_rejected(&tmp.0, &missing, &needles, &needles);
    }
    // A position embedding for another grid (7x7 + CLS instead of 6x6 + CLS).
    let name = "embeddings.position_embeddings";
    let mut misshaped = f.weights.clone();
    misshaped.insert(
        name.to_string(),
        Tensor::zeros((1, 50, 16), DType::F32, &CPU)?,
    );
    loaders(&f.config).assert_rejected(
        &tmp.0,
        &misshaped,
        &[name, "[1, 50, 16]", "[1, 37, 16]"],
        &[name, "[1, 37, 16]"],
    );
    Ok(())
}

/// The whole tiny model (f64) on an interpolated grid against central differences, with
/// respect to the pixels and to every parameter tensor (a few entries each): bicubic position
/// embedding, layer scales, attention, MLP, final norm; and the SwiGLU FFN.
#[test]
fn model_gradients_match_finite_differences() -> Result<()> {
    for (name, input) in [
        ("tiny", "pixel_values_interp"),
        ("tiny_swiglu", "pixel_values"),
    ] {
        let f = fixture(name)?;
        let mut names: Vec<String> = f.weights.keys().cloned().collect();
        // The mask token is unused: it has no gradient to check.
        names.retain(|n| n != "embeddings.mask_token");
        names.sort();
        let mask = f.weights["embeddings.mask_token"].to_dtype(DType::F64)?;
        let mut inputs = vec![f.inputs[input].narrow(0, 0, 1)?.to_dtype(DType::F64)?];
        inputs.extend(
            names
                .iter()
                .map(|n| f.weights[n].to_dtype(DType::F64).unwrap()),
        );
        let report = check_gradients(
            |xs| {
                let mut map: HashMap<String, Tensor> =
                    names.iter().cloned().zip(xs[1..].iter().cloned()).collect();
                map.insert("embeddings.mask_token".to_string(), mask.clone());
                let vb = VarBuilder::from_tensors(map, DType::F64, &CPU);
                Dinov2Model::new(vb, &f.config)?.forward(&xs[0])
            },
            &inputs,
            GradCheck {
                max_probes_per_input: 2,
                ..GradCheck::default()
            },
        )?;
        println!("dinov2 {name} ({} inputs): {report:?}", inputs.len());
        assert!(report.max_abs_numeric > 1e-3, "{report:?}");
    }
    Ok(())
}

/// The pixel discriminator over a frozen DINOv2 (f64), images resized 20x24 -> 28x20 (a 7x5
/// grid): its gradient with respect to the `[-1, 1]` images matches finite differences.
#[test]
fn pixel_discriminator_gradient_reaches_the_images() -> Result<()> {
    let f = fixture("tiny")?;
    let weights = Weights::open(&f.dir, None)?;
    let model = Arc::new(load_frozen(&weights, &f.config, DType::F64, &CPU)?);
    let heads = SeededVarMap::new(21);
    let disc = pixel_discriminator(
        model,
        &[0, 2],
        Some((28, 20)),
        &heads_cfg(),
        heads.var_builder(DType::F64, &CPU),
    )?;
    let images = (f.inputs["pixel_values"]
        .narrow(2, 0, 20)?
        .to_dtype(DType::F64)?
        .tanh()?
        * 0.9)?;
    assert_eq!(disc.logits(&images)?.dims(), &[2]);
    let report = check_gradients(
        |xs| disc.logits(&xs[0]),
        &[images],
        GradCheck {
            max_probes_per_input: 6,
            ..GradCheck::default()
        },
    )?;
    println!("dinov2 pixel discriminator: {report:?}");
    assert!(report.max_abs_numeric > 1e-5, "{report:?}");
    Ok(())
}

/// DINOv2 loaded trainable plus the discriminator heads: every Var of both gets a non-zero
/// gradient (the final norm through `forward`), except the mask token, which gets none; the
/// images get one.
#[test]
fn every_var_gets_a_gradient() -> Result<()> {
    let f = fixture("tiny")?;
    let weights = Weights::open(&f.dir, None)?;
    let vars = VarMap::new();
    let model = Arc::new(load_trainable(
        &weights,
        &f.config,
        &vars,
        DType::F32,
        &CPU,
    )?);
    assert_eq!(vars.all_vars().len(), f.weights.len());
    let heads = SeededVarMap::new(22);
    let disc = pixel_discriminator(
        model.clone(),
        &[1, 2],
        Some((28, 20)),
        &heads_cfg(),
        heads.var_builder(DType::F32, &CPU),
    )?;
    let images = candle_core::Var::from_tensor(&f.inputs["pixel_values"].tanh()?)?;
    let loss = (disc.logits(images.as_tensor())?.sum_all()?
        + model
            .forward(
                &Dinov2FeatureExtractor::new(model.clone(), &[0], Some((28, 20)))?
                    .preprocess(images.as_tensor())?,
            )?
            .sqr()?
            .mean_all()?)?;
    let grads = loss.backward()?;
    let mask = vars
        .data()
        .lock()
        .unwrap()
        .remove("embeddings.mask_token")
        .expect("the mask token is loaded");
    assert!(grads.get(mask.as_tensor()).is_none());
    assert_every_var_has_grad(&vars, &grads)?;
    assert_every_var_has_grad(heads.varmap(), &grads)?;
    let g = grads
        .get(images.as_tensor())
        .expect("the images get a gradient");
    assert!(g.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
    Ok(())
}

#[test]
fn feature_extractor_normalises_resizes_and_checks_inputs() -> Result<()> {
    let f = fixture("tiny")?;
    let weights = Weights::open(&f.dir, None)?;
    let model = Arc::new(load_frozen(&weights, &f.config, DType::F32, &CPU)?);
    // -1 is black (0), +1 white (255): the processor gives -mean/std and (1-mean)/std; a
    // constant image stays constant through the resize.
    let extractor = Dinov2FeatureExtractor::new(model.clone(), &[0, 2], Some((8, 4)))?;
    for (value, want) in [(-1f32, 0.0), (1.0, 1.0)] {
        let images = Tensor::full(value, (1, 3, 9, 6), &CPU)?;
        let got = extractor.preprocess(&images)?;
        assert_eq!(got.dims(), &[1, 3, 8, 4]);
        let got = got.get(0)?.to_vec3::<f32>()?;
        for c in 0..3 {
            let expected = (want - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            assert!(got[c]
                .iter()
                .flatten()
                .all(|&v| (v as f64 - expected).abs() < 1e-5));
        }
    }
    assert_eq!(extractor.feature_channels(), vec![16, 16]);
    // Without a resize the grid follows the input: 34x22 -> 8x5.
    let native = Dinov2FeatureExtractor::new(model.clone(), &[1], None)?;
    let features = native.features(&f.inputs["pixel_values_interp"].tanh()?)?;
    assert_eq!(features[0].dims(), &[1, 16, 8, 5]);

    let err = Dinov2FeatureExtractor::new(model.clone(), &[3], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 3 does not exist"), "{err}");
    assert!(Dinov2FeatureExtractor::new(model.clone(), &[], None).is_err());
    let err = Dinov2FeatureExtractor::new(model.clone(), &[0], Some((2, 30)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("input_size"), "{err}");
    let small = Tensor::zeros((1, 3, 3, 16), DType::F32, &CPU)?;
    let err = native.features(&small).unwrap_err().to_string();
    assert!(err.contains("[1, 3, 3, 16]"), "{err}");
    let video_heads = ConvHeadConfig {
        dims: HeadDims::Video,
        ..heads_cfg()
    };
    let vb = SeededVarMap::new(0).var_builder(DType::F32, &CPU);
    assert!(pixel_discriminator(model, &[0], None, &video_heads, vb).is_err());
    Ok(())
}

/// Tensor and parameter counts of facebook/dinov2-{small,base,large,giant} as transformers
/// counts them (`Dinov2Model` on the meta device, printed by scripts/fixtures_dinov2.py). For
/// giant transformers 5 holds each fused SwiGLU `weights_in` as two tensors (`gate_proj`,
/// `up_proj`): 807 = 727 checkpoint tensors + 2 per layer, the same parameters.
#[test]
fn published_configs() -> Result<()> {
    for (cfg, tensors, params) in [
        (Config::vit_s(), 223, 22_056_576),
        (Config::vit_b(), 223, 86_580_480),
        (Config::vit_l(), 439, 304_368_640),
        (Config::vit_g(), 807 - 2 * 40, 1_136_480_768),
    ] {
        let names = expected_tensors(|vb| Dinov2Model::new(vb, &cfg))?;
        let count: usize = names.iter().map(|(_, s)| s.elem_count()).sum();
        assert_eq!((names.len(), count), (tensors, params), "{cfg:?}");
    }
    assert_eq!(Config::vit_g().ffn_dim(), 4096);
    assert_eq!(Config::vit_g().grid_size(), 37);

    let tmp = TempDir::new("dinov2-config");
    let path = tmp.0.join("config.json");
    // facebook/dinov2-giant's config.json (abridged: the keys it sets).
    let giant = r#"{"architectures": ["Dinov2Model"], "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "hidden_size": 1536, "image_size": 518, "initializer_range": 0.02,
        "layer_norm_eps": 1e-06, "layerscale_value": 1.0, "mlp_ratio": 4,
        "model_type": "dinov2", "num_attention_heads": 24, "num_channels": 3,
        "num_hidden_layers": 40, "patch_size": 14, "qkv_bias": true, "use_swiglu_ffn": true}"#;
    std::fs::write(&path, giant)?;
    assert_eq!(Config::from_json(&path)?, Config::vit_g());

    let bad = Config {
        hidden_act: "relu".to_string(),
        ..Config::vit_s()
    };
    let err = expected_tensors(|vb| Dinov2Model::new(vb, &bad))
        .unwrap_err()
        .to_string();
    assert!(err.contains("hidden_act"), "{err}");
    let bad = Config {
        num_attention_heads: 5,
        ..Config::vit_s()
    };
    let err = expected_tensors(|vb| Dinov2Model::new(vb, &bad))
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_attention_heads"), "{err}");
    Ok(())
}
