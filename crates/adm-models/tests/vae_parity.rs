//! AutoencoderKL: parity with diffusers (float64 reference from scripts/make_fixtures.py),
//! gradients through decode reaching every decoder Var, finite differences, the published
//! SDXL / SD3 configs.

mod common;

use std::path::PathBuf;

use adm_models::loading::expected_tensors;
use adm_models::vae::{AutoencoderKL, Config};
use adm_nn::{assert_every_var_has_grad, check_gradients, GradCheck, SeededVarMap};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use common::{assert_parity, relative_error, DIFFUSERS_WEIGHTS};

fn fixture_dir(name: &str) -> PathBuf {
    common::fixture_dir("vae", name)
}

/// A VAE fixture and the model built from its weights (`f.model`).
type Fixture = common::WithModel<Config, AutoencoderKL>;

fn load_fixture(name: &str) -> Result<Fixture> {
    common::Fixture::<Config>::load("vae", name, DIFFUSERS_WEIGHTS)?.with_model(|f| {
        let vb = VarBuilder::from_tensors(f.weights.clone(), DType::F32, &Device::Cpu);
        AutoencoderKL::new(vb, &f.config)
    })
}

fn check_parity(name: &str) -> Result<()> {
    let f = load_fixture(name)?;
    // The checkpoint holds exactly the tensors the config needs.
    let mut expected: Vec<String> = expected_tensors(|vb| AutoencoderKL::new(vb, &f.config))?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut have: Vec<String> = f.weights.keys().cloned().collect();
    expected.sort();
    have.sort();
    assert_eq!(expected, have, "{name}: tensor names");

    let posterior = f.model.encode(&f.inputs["image"])?;
    let sample = posterior.sample(&f.inputs["noise"])?;
    let decoded = f.model.decode(&f.inputs["latent"])?;
    let scaled = f
        .model
        .encode_scaled(&f.inputs["image"], Some(&f.inputs["noise"]))?;
    for (what, got) in [
        ("mean", &posterior.mean),
        ("logvar", &posterior.logvar),
        ("sample", &sample),
        ("scaled", &scaled),
        ("decoded", &decoded),
    ] {
        assert_parity(&format!("vae {name}: {what}"), got, &f.outputs[what])?;
    }
    // decode_scaled undoes scale_latents.
    let back = f
        .model
        .decode_scaled(&f.model.scale_latents(&f.inputs["latent"])?)?;
    assert!(relative_error(&back, &decoded)? < 1e-5);
    // The decoder-only build decodes the same and refuses to encode.
    let vb = VarBuilder::from_tensors(f.weights.clone(), DType::F32, &Device::Cpu);
    let dec = AutoencoderKL::decoder_only(vb, &f.config)?;
    assert_eq!(
        relative_error(&dec.decode(&f.inputs["latent"])?, &decoded)?,
        0.0
    );
    let err = dec.encode(&f.inputs["image"]).unwrap_err().to_string();
    assert!(err.contains("decoder-only"), "{err}");
    Ok(())
}

#[test]
fn sdxl_tiny_matches_diffusers() -> Result<()> {
    check_parity("sdxl_tiny")
}

#[test]
fn sd3_tiny_matches_diffusers() -> Result<()> {
    check_parity("sd3_tiny")
}

/// The pixel-space discriminator back-propagates through decode: every decoder Var (and
/// post_quant_conv) and the latent get a gradient.
#[test]
fn every_decoder_var_and_the_latent_get_a_gradient() -> Result<()> {
    for name in ["sdxl_tiny", "sd3_tiny"] {
        let cfg: Config = common::config(&fixture_dir(name));
        let seeded = SeededVarMap::new(5);
        let vae = AutoencoderKL::decoder_only(seeded.var_builder(DType::F32, &Device::Cpu), &cfg)?;
        let expected = expected_tensors(|vb| AutoencoderKL::decoder_only(vb, &cfg))?;
        assert_eq!(seeded.varmap().all_vars().len(), expected.len(), "{name}");
        let latent =
            candle_core::Var::randn(0f32, 1.0, (2, cfg.latent_channels, 4, 4), &Device::Cpu)?;
        let image = vae.decode_scaled(latent.as_tensor())?;
        let f = cfg.spatial_multiple();
        assert_eq!(image.dims(), &[2, cfg.out_channels, 4 * f, 4 * f]);
        let target = Tensor::randn(0f32, 1.0, image.shape(), &Device::Cpu)?;
        let loss = (image - target)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        assert_every_var_has_grad(seeded.varmap(), &grads)?;
        let g = grads.get(latent.as_tensor()).expect("latent gradient");
        assert!(g.abs()?.max_all()?.to_scalar::<f32>()? > 0.0, "{name}");
    }
    Ok(())
}

/// Finite differences of decode (f64, the sdxl_tiny fixture weights) with respect to the
/// latent.
#[test]
fn finite_difference_gradient_of_decode() -> Result<()> {
    let dir = fixture_dir("sdxl_tiny");
    let cfg: Config = common::config(&dir);
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join(DIFFUSERS_WEIGHTS)],
            DType::F64,
            &Device::Cpu,
        )?
    };
    let vae = AutoencoderKL::decoder_only(vb, &cfg)?;
    let latent = Tensor::randn(0f64, 1.0, (1, 4, 2, 4), &Device::Cpu)?;
    let report = check_gradients(
        |xs| vae.decode_scaled(&xs[0]),
        &[latent],
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
fn bad_inputs_and_configs_are_errors() -> Result<()> {
    let f = load_fixture("sdxl_tiny")?;
    // H, W must be multiples of 2 (one downsampler); channel counts must match.
    let odd = Tensor::zeros((1, 3, 7, 8), DType::F32, &Device::Cpu)?;
    assert!(f.model.encode(&odd).is_err());
    let wrong = Tensor::zeros((1, 16, 4, 4), DType::F32, &Device::Cpu)?;
    let err = f.model.decode(&wrong).unwrap_err().to_string();
    assert!(err.contains("[1, 16, 4, 4]"), "{err}");
    let posterior = f.model.encode(&f.inputs["image"])?;
    assert!(posterior.sample(&wrong).is_err());
    assert_eq!(posterior.kl()?.dims(), &[2]);

    // A wrong shape in the checkpoint names the tensor and both shapes.
    let mut weights = f.weights.clone();
    weights.insert(
        "decoder.conv_in.weight".into(),
        Tensor::zeros((16, 4, 1, 1), DType::F32, &Device::Cpu)?,
    );
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let err = AutoencoderKL::new(vb, &f.config).unwrap_err().to_string();
    assert!(
        err.contains("decoder.conv_in.weight")
            && err.contains("[16, 4, 1, 1]")
            && err.contains("[16, 4, 3, 3]"),
        "{err}"
    );

    let mut cfg = f.config.clone();
    cfg.up_block_types[0] = "AttnUpDecoderBlock2D".into();
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("AttnUpDecoderBlock2D"));
    let mut cfg = f.config.clone();
    cfg.norm_num_groups = 3;
    assert!(cfg.validate().is_err());
    Ok(())
}

/// The published configs build (without allocating) to diffusers' tensor and parameter
/// counts (`make_fixtures.py counts`), and parse from their config.json form.
#[test]
fn published_configs_have_diffusers_parameter_counts() -> Result<()> {
    for (name, cfg, tensors, params) in [
        ("sdxl", Config::sdxl(), 248, 83_653_863usize),
        ("sd3", Config::sd3(), 244, 83_819_683),
        ("sd15", Config::sd15(), 248, 83_653_863),
    ] {
        let expected = expected_tensors(|vb| AutoencoderKL::new(vb, &cfg))?;
        let count: usize = expected.iter().map(|(_, s)| s.elem_count()).sum();
        assert_eq!((expected.len(), count), (tensors, params), "{name}");
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(
            serde_json::from_str::<Config>(&json).unwrap(),
            cfg,
            "{name}"
        );
    }
    assert_eq!(Config::sdxl().scaling_factor, 0.13025);
    assert_eq!(
        (Config::sd3().scaling_factor, Config::sd3().shift_factor),
        (1.5305, Some(0.0609))
    );
    // SDXL's published vae/config.json (fields as on the hub).
    let sdxl: Config = serde_json::from_str(
        r#"{"_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0.dev0",
            "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "force_upcast": true, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
    )
    .unwrap();
    assert_eq!(sdxl, Config::sdxl());
    Ok(())
}
