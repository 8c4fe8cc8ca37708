//! The CogVideoX VAE decoder: parity with diffusers' `AutoencoderKLCogVideoX.decode` (float64
//! reference from scripts/fixtures_cogvideox_vae.py, one chunk and chunked with conv caches)
//! through the loader `adm-forward` uses, gradients (finite differences, every Var, causality
//! across chunks), bad weights and inputs, and the published architecture's size.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use adm_models::cogvideox_vae::{self, AutoencoderKLCogVideoX, Config};
use adm_models::forward_cli::forward_dir;
use adm_models::loading::expected_tensors;
use adm_nn::{assert_every_var_has_grad, check_gradients, GradCheck, SeededVarMap};
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarBuilder;
use common::{assert_parity, relative_error, DIFFUSERS_WEIGHTS};

fn tiny_dir() -> PathBuf {
    common::fixture_dir("cogvideox_vae", "tiny")
}

fn fixture() -> Result<common::Fixture<Config>> {
    common::Fixture::load("cogvideox_vae", "tiny", DIFFUSERS_WEIGHTS)
}

/// A temporary folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("adm-cogvae-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A model folder: the fixture's config.json and the given weights.
fn write_folder(dir: &Path, weights: &HashMap<String, Tensor>) -> Result<()> {
    std::fs::copy(tiny_dir().join("config.json"), dir.join("config.json"))?;
    candle_core::safetensors::save(weights, dir.join(DIFFUSERS_WEIGHTS))
}

/// Measured: decoded 2.1e-7, decoded_4 3.6e-7, decoded_5 3.7e-7, decoded_5_whole 2.5e-7,
/// forward_dir as decoded (f32 against the float64 reference; tolerance common::PARITY_TOL).
#[test]
fn tiny_matches_diffusers_through_the_loader() -> Result<()> {
    let f = fixture()?;
    // The fixture is a full checkpoint: the encoder is skipped, the decoder uses the rest.
    let mut expected: Vec<String> =
        expected_tensors(|vb| AutoencoderKLCogVideoX::new(vb, &f.config))?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
    let mut decoder: Vec<String> = f
        .weights
        .keys()
        .filter(|n| !n.starts_with("encoder."))
        .cloned()
        .collect();
    expected.sort();
    decoder.sort();
    assert_eq!(expected, decoder);
    assert!(
        f.weights.len() > decoder.len(),
        "the fixture has the encoder"
    );

    let vae = cogvideox_vae::load(&f.dir, None, DType::F32, &Device::Cpu)?;
    for (input, output) in [
        ("latent", "decoded"),
        ("latent_4", "decoded_4"),
        ("latent_5", "decoded_5"),
    ] {
        let got = vae.decode(&f.inputs[input])?;
        assert_parity(&format!("cogvideox vae {output}"), &got, &f.outputs[output])?;
    }
    // 3 latent frames -> 1 + 2·2·2 = 9 frames, 4x spatially.
    assert_eq!(f.outputs["decoded"].dims(), &[2, 3, 9, 16, 12]);

    // Chunking matters: the 5-frame latent as one chunk is diffusers' whole-sequence decode,
    // and it is far from the chunked one.
    let whole = vae.decode_in_chunks(&f.inputs["latent_5"], 5)?;
    assert_parity(
        "cogvideox vae decoded_5_whole",
        &whole,
        &f.outputs["decoded_5_whole"],
    )?;
    let chunking = relative_error(&f.outputs["decoded_5_whole"], &f.outputs["decoded_5"])?;
    println!("chunked vs whole-sequence decode: relative difference {chunking:.2e}");
    assert!(chunking > 0.05, "{chunking}");

    // decode_latents undoes scale_latents.
    let back = vae.decode_latents(&vae.scale_latents(&f.inputs["latent"])?)?;
    assert!(relative_error(&back, &f.outputs["decoded"])? < 1e-5);

    // adm-forward's path.
    let inputs = HashMap::from([("latent".to_string(), f.inputs["latent"].clone())]);
    let out = forward_dir(&f.dir, None, &inputs, DType::F32, &Device::Cpu)?;
    assert_parity("cogvideox vae forward_dir", &out, &f.outputs["decoded"])?;
    let bad = HashMap::from([("sample".to_string(), f.inputs["latent"].clone())]);
    let err = forward_dir(&f.dir, None, &bad, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sample") && err.contains("latent"), "{err}");
    Ok(())
}

/// f16 runs and stays close to f32 (measured: 1.8e-3 relative). bf16 cannot run on the CPU:
/// candle 0.11.1's CPU matmul (behind conv2d) has no BF16 kernel; the code is dtype-generic.
#[test]
fn f16_decodes_close_to_the_reference() -> Result<()> {
    let f = fixture()?;
    let vae = cogvideox_vae::load(&f.dir, None, DType::F16, &Device::Cpu)?;
    let got = vae.decode(&f.inputs["latent"])?;
    assert_eq!(got.dtype(), DType::F16);
    let err = relative_error(&got, &f.outputs["decoded"])?;
    println!("f16: relative error {err:.2e}");
    assert!(err < 1e-2, "{err}");
    Ok(())
}

/// Finite differences (f64, fixture weights) of the chunked decode (4 latent frames: two
/// chunks joined by conv caches) with respect to the latent and to a spatial-norm weight.
#[test]
fn finite_difference_gradients_of_chunked_decode() -> Result<()> {
    let f = fixture()?;
    let weight_name = "decoder.up_blocks.0.resnets.1.norm2.conv_y.conv.weight";
    let weights: HashMap<String, Tensor> = f
        .weights
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F64)?)))
        .collect::<Result<_>>()?;
    let latent = f.inputs["latent_4"].to_dtype(DType::F64)?;
    let report = check_gradients(
        |xs| {
            let mut w = weights.clone();
            w.insert(weight_name.to_string(), xs[1].clone());
            let vb = VarBuilder::from_tensors(w, DType::F64, &Device::Cpu);
            AutoencoderKLCogVideoX::new(vb, &f.config)?.decode_latents(&xs[0])
        },
        &[latent, weights[weight_name].clone()],
        GradCheck {
            max_probes_per_input: 5,
            ..GradCheck::default()
        },
    )?;
    println!("finite differences: {report:?}");
    assert!(
        report.probes == 10 && report.max_abs_numeric > 1e-3,
        "{report:?}"
    );
    Ok(())
}

/// Every decoder Var and the latent get a gradient; across chunks the gradient follows
/// causality: later output frames reach earlier latent frames through the conv caches, earlier
/// output frames never see later latent frames.
#[test]
fn every_var_gets_a_gradient_and_chunks_are_causal() -> Result<()> {
    let cfg: Config = common::config(&tiny_dir());
    let seeded = SeededVarMap::new(7);
    let vae = AutoencoderKLCogVideoX::new(seeded.var_builder(DType::F32, &Device::Cpu), &cfg)?;
    assert_eq!(
        seeded.varmap().all_vars().len(),
        expected_tensors(|vb| AutoencoderKLCogVideoX::new(vb, &cfg))?.len()
    );
    // 4 latent frames: chunks (0, 1) and (2, 3), 8 output frames each.
    let latent = Var::randn(0f32, 1.0, (1, cfg.latent_channels, 4, 2, 2), &Device::Cpu)?;
    let frames = vae.decode_latents(latent.as_tensor())?;
    assert_eq!(frames.dims(), &[1, 3, 16, 8, 8]);
    let grads = frames.sqr()?.mean_all()?.backward()?;
    assert_every_var_has_grad(seeded.varmap(), &grads)?;

    let max_abs = |frames_out: (usize, usize), frames_in: (usize, usize)| -> Result<f32> {
        let loss = frames
            .narrow(2, frames_out.0, frames_out.1)?
            .sqr()?
            .sum_all()?;
        let grads = loss.backward()?;
        let g = grads.get(latent.as_tensor()).expect("latent gradient");
        g.narrow(2, frames_in.0, frames_in.1)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()
    };
    assert!(max_abs((8, 8), (0, 2))? > 0.0, "caches carry gradient");
    assert_eq!(
        max_abs((0, 8), (2, 2))?,
        0.0,
        "the first chunk saw the second"
    );
    Ok(())
}

/// CogVideoX's 13 latent frames decode in chunks 3, 2, 2, 2, 2, 2 to 9 + 5·8 = 49 frames, as
/// diffusers' comment in `AutoencoderKLCogVideoX.__init__` counts (the tiny model has the
/// published model's two time doublings).
#[test]
fn thirteen_latent_frames_give_49_frames() -> Result<()> {
    let f = fixture()?;
    let vb = VarBuilder::from_tensors(f.weights.clone(), DType::F32, &Device::Cpu);
    let vae = AutoencoderKLCogVideoX::new(vb, &f.config)?;
    let latent = Tensor::randn(0f32, 1.0, (1, 4, 13, 1, 1), &Device::Cpu)?;
    assert_eq!(vae.decode(&latent)?.dims(), &[1, 3, 49, 4, 4]);
    Ok(())
}

/// Missing, mis-shaped and unexpected tensors are errors naming the tensor; encoder tensors
/// are skipped.
#[test]
fn bad_weights_are_errors_naming_the_tensor() -> Result<()> {
    let f = fixture()?;
    let tmp = TempDir::new("weights");
    let name = "decoder.up_blocks.2.resnets.0.conv_shortcut.weight";
    let load = |weights: &HashMap<String, Tensor>| -> String {
        write_folder(&tmp.0, weights).unwrap();
        cogvideox_vae::load(&tmp.0, None, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string()
    };

    let mut missing = f.weights.clone();
    missing.remove(name);
    let err = load(&missing);
    assert!(err.contains(name) && err.contains("missing"), "{err}");

    let mut shape = f.weights.clone();
    shape.insert(
        name.into(),
        Tensor::zeros((4, 8, 1, 1), DType::F32, &Device::Cpu)?,
    );
    let err = load(&shape);
    assert!(
        err.contains(name) && err.contains("[4, 8, 1, 1]") && err.contains("[4, 8, 1, 1, 1]"),
        "{err}"
    );

    // quant_conv is encoder-side only with use_quant_conv; here it is unexpected.
    for extra in [
        "decoder.extra.weight",
        "post_quant_conv.weight",
        "quant_conv.weight",
    ] {
        let mut weights = f.weights.clone();
        weights.insert(extra.into(), Tensor::zeros(3, DType::F32, &Device::Cpu)?);
        let err = load(&weights);
        assert!(err.contains(extra) && err.contains("unexpected"), "{err}");
    }

    // Decoder tensors only (no encoder) load too.
    let decoder_only: HashMap<String, Tensor> = f
        .weights
        .iter()
        .filter(|(k, _)| k.starts_with("decoder."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    write_folder(&tmp.0, &decoder_only)?;
    cogvideox_vae::load(&tmp.0, None, DType::F32, &Device::Cpu)?;
    Ok(())
}

#[test]
fn bad_inputs_and_configs_are_errors() -> Result<()> {
    let f = fixture()?;
    let vb = VarBuilder::from_tensors(f.weights.clone(), DType::F32, &Device::Cpu);
    let vae = AutoencoderKLCogVideoX::new(vb, &f.config)?;
    for shape in [vec![1, 16, 3, 2, 2], vec![1, 4, 2, 2], vec![1, 4, 0, 2, 2]] {
        let z = Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu)?;
        let err = vae.decode(&z).unwrap_err().to_string();
        assert!(err.contains(&format!("{shape:?}")), "{err}");
    }
    let z = Tensor::zeros((1, 4, 3, 2, 2), DType::F32, &Device::Cpu)?;
    assert!(vae.decode_in_chunks(&z, 0).is_err());

    let invalid = |edit: fn(&mut Config), needle: &str| {
        let mut cfg = f.config.clone();
        edit(&mut cfg);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    };
    invalid(
        |c| c.up_block_types[1] = "UpDecoderBlock2D".into(),
        "UpDecoderBlock2D",
    );
    invalid(|c| c.norm_num_groups = 3, "norm_num_groups");
    invalid(|c| c.use_post_quant_conv = true, "use_post_quant_conv");
    invalid(
        |c| c.temporal_compression_ratio = 0.5,
        "temporal_compression_ratio",
    );
    invalid(|c| c.act_fn = "gelu".into(), "gelu");
    Ok(())
}

/// diffusers' default config (the CogVideoX-2b / 5b VAE) builds, without allocating, to the
/// decoder's tensor and parameter counts that `make_fixtures.py cogvideox_vae` prints, and
/// parses from a config.json as published (CogVideoX-2b's keys).
#[test]
fn published_architecture_has_diffusers_parameter_count() -> Result<()> {
    let cfg = Config::default();
    let tensors = expected_tensors(|vb| AutoencoderKLCogVideoX::new(vb, &cfg))?;
    let params: usize = tensors.iter().map(|(_, s)| s.elem_count()).sum();
    assert_eq!((tensors.len(), params), (308, 123_368_451));
    assert_eq!(cfg.spatial_scale(), 8);
    let parsed: Config = serde_json::from_str(
        r#"{"_class_name": "AutoencoderKLCogVideoX", "act_fn": "silu",
            "block_out_channels": [128, 256, 256, 512],
            "down_block_types": ["CogVideoXDownBlock3D", "CogVideoXDownBlock3D", "CogVideoXDownBlock3D", "CogVideoXDownBlock3D"],
            "force_upcast": true, "in_channels": 3, "latent_channels": 16, "latents_mean": null,
            "latents_std": null, "layers_per_block": 3, "norm_eps": 1e-06, "norm_num_groups": 32,
            "out_channels": 3, "sample_height": 480, "sample_width": 720,
            "scaling_factor": 1.15258426, "shift_factor": null, "temporal_compression_ratio": 4,
            "up_block_types": ["CogVideoXUpBlock3D", "CogVideoXUpBlock3D", "CogVideoXUpBlock3D", "CogVideoXUpBlock3D"],
            "use_post_quant_conv": false, "use_quant_conv": false}"#,
    )
    .unwrap();
    assert_eq!(parsed, cfg);
    Ok(())
}
