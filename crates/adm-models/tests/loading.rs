//! Loading diffusers-layout folders: a temporary SDXL-like pipeline made from the fixtures
//! (UNet in two shards with an index, an fp16 variant, a VAE, a CLIP text encoder), the
//! offline hub cache layout, frozen and trainable loading with their errors, and the
//! `adm-forward` logic (library function and binary) against the diffusers reference.

mod common;

use std::collections::HashMap;
use std::path::Path;

use adm_models::forward_cli::{forward_dir, model_dir, run, ForwardArgs};
use adm_models::loading::{
    class_name, load_into_varmap, load_model, load_var_builder, read_config, resolve_in_cache,
    resolve_model, weight_files, ModelIndex, Weights,
};
use adm_models::unet_2d::{self, TextTime, UNet2DConditionModel};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;
use common::{fixtures, relative_error, TempDir, PARITY_TOL};

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn save(tensors: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(tensors, path).unwrap()
}

/// Writes `tensors` as two shards plus diffusers' index into `dir`.
fn write_sharded(tensors: &HashMap<String, Tensor>, dir: &Path) {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let files = [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ];
    let mut shards = [HashMap::new(), HashMap::new()];
    let mut weight_map = serde_json::Map::new();
    for (i, name) in names.into_iter().enumerate() {
        let shard = i % 2;
        shards[shard].insert(name.clone(), tensors[name].clone());
        weight_map.insert(name.clone(), files[shard].into());
    }
    for (shard, file) in shards.iter().zip(files) {
        save(shard, &dir.join(file));
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
}

/// root/model_index.json, unet/ (sharded + fp16 variant), vae/, text_encoder/.
fn make_pipeline(root: &Path) {
    let index = serde_json::json!({
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [null, null],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    });
    std::fs::write(root.join("model_index.json"), index.to_string()).unwrap();

    let unet_src = fixtures().join("unet/sdxl_tiny");
    let unet = root.join("unet");
    std::fs::create_dir_all(&unet).unwrap();
    std::fs::copy(unet_src.join("config.json"), unet.join("config.json")).unwrap();
    let weights = load(&unet_src.join("diffusion_pytorch_model.safetensors"));
    write_sharded(&weights, &unet);
    let half: HashMap<String, Tensor> = weights
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).unwrap()))
        .collect();
    save(
        &half,
        &unet.join("diffusion_pytorch_model.fp16.safetensors"),
    );

    for (component, src, file) in [
        (
            "vae",
            "vae/sdxl_tiny",
            "diffusion_pytorch_model.safetensors",
        ),
        ("text_encoder", "clip/clip_l_tiny", "model.safetensors"),
    ] {
        let dir = root.join(component);
        std::fs::create_dir_all(&dir).unwrap();
        let src = fixtures().join(src);
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        std::fs::copy(src.join(file), dir.join(file)).unwrap();
    }
}

struct UnetCase {
    inputs: HashMap<String, Tensor>,
    want: Tensor,
}

fn unet_case() -> UnetCase {
    let dir = fixtures().join("unet/sdxl_tiny");
    UnetCase {
        inputs: load(&dir.join("inputs.safetensors")),
        want: load(&dir.join("outputs.safetensors"))["sample"].clone(),
    }
}

fn run_unet(unet: &UNet2DConditionModel, inputs: &HashMap<String, Tensor>) -> Result<Tensor> {
    unet.forward(
        &inputs["sample"],
        &inputs["timestep"],
        &inputs["encoder_hidden_states"],
        Some(TextTime {
            text_embeds: &inputs["text_embeds"],
            time_ids: &inputs["time_ids"],
        }),
    )
}

#[test]
fn pipeline_index_components_and_weight_files() -> Result<()> {
    let tmp = TempDir::new("loading-index");
    make_pipeline(&tmp.0);
    let index = ModelIndex::read(&tmp.0)?;
    assert_eq!(index.class_name, "StableDiffusionXLPipeline");
    assert_eq!(
        index.components["unet"],
        (
            Some("diffusers".into()),
            Some("UNet2DConditionModel".into())
        )
    );
    assert_eq!(index.components["feature_extractor"], (None, None));
    let unet = index.component_dir(&tmp.0, "unet")?;
    let err = index
        .component_dir(&tmp.0, "transformer")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("transformer") && err.contains("unet, vae"),
        "{err}"
    );
    // scheduler is listed but has no folder here.
    assert!(index.component_dir(&tmp.0, "scheduler").is_err());

    assert_eq!(class_name(&unet)?, "UNet2DConditionModel");
    assert_eq!(class_name(&tmp.0.join("vae"))?, "AutoencoderKL");
    assert_eq!(class_name(&tmp.0.join("text_encoder"))?, "CLIPTextModel");

    let files = weight_files(&unet, None)?;
    assert_eq!(files.len(), 2);
    assert!(files[0].ends_with("diffusion_pytorch_model-00001-of-00002.safetensors"));
    let fp16 = weight_files(&unet, Some("fp16"))?;
    assert!(fp16[0].ends_with("diffusion_pytorch_model.fp16.safetensors"));
    let err = weight_files(&unet, Some("bf16")).unwrap_err().to_string();
    assert!(
        err.contains("bf16") && err.contains("diffusion_pytorch_model.fp16.safetensors"),
        "{err}"
    );
    // transformers' model.safetensors is found too.
    assert!(weight_files(&tmp.0.join("text_encoder"), None)?[0].ends_with("model.safetensors"));

    // An index that lists a missing shard.
    let broken = tmp.0.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(
        broken.join("diffusion_pytorch_model.safetensors.index.json"),
        r#"{"weight_map": {"a": "gone.safetensors"}}"#,
    )
    .unwrap();
    let err = weight_files(&broken, None).unwrap_err().to_string();
    assert!(err.contains("gone.safetensors"), "{err}");
    Ok(())
}

/// Frozen loading from the shards (and the fp16 variant) reproduces the diffusers output.
#[test]
fn frozen_loading_from_shards_and_variant() -> Result<()> {
    let tmp = TempDir::new("loading-frozen");
    make_pipeline(&tmp.0);
    let dir = tmp.0.join("unet");
    let cfg: unet_2d::Config = read_config(&dir)?;
    let case = unet_case();

    let vb = load_var_builder(&dir, DType::F32, &Device::Cpu)?;
    let unet = UNet2DConditionModel::new(vb, &cfg)?;
    let err = relative_error(&run_unet(&unet, &case.inputs)?, &case.want)?;
    println!("sharded load_var_builder: relative error {err:.2e}");
    assert!(err < PARITY_TOL);

    let unet = load_model(&dir, None, DType::F32, &Device::Cpu, &[], |vb| {
        UNet2DConditionModel::new(vb, &cfg)
    })?;
    assert!(relative_error(&run_unet(&unet, &case.inputs)?, &case.want)? < PARITY_TOL);

    // fp16 weights, computed in f32: f16 rounding of the weights only.
    let unet = load_model(&dir, Some("fp16"), DType::F32, &Device::Cpu, &[], |vb| {
        UNet2DConditionModel::new(vb, &cfg)
    })?;
    let err = relative_error(&run_unet(&unet, &case.inputs)?, &case.want)?;
    println!("fp16 variant: relative error {err:.2e}");
    assert!(err < 1e-2);
    Ok(())
}

/// Missing, unexpected, mis-shaped and duplicated tensors: errors naming them.
#[test]
fn frozen_loading_errors_name_tensors_and_shapes() -> Result<()> {
    let tmp = TempDir::new("loading-frozen-errors");
    let src = fixtures().join("unet/sdxl_tiny");
    let cfg: unet_2d::Config = read_config(&src)?;
    let weights = load(&src.join("diffusion_pytorch_model.safetensors"));
    let build = |dir: &Path| {
        load_model(dir, None, DType::F32, &Device::Cpu, &[], |vb| {
            UNet2DConditionModel::new(vb, &cfg)
        })
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };

    let missing = tmp.0.join("missing");
    std::fs::create_dir_all(&missing).unwrap();
    let mut w = weights.clone();
    w.remove("mid_block.attentions.0.proj_in.weight");
    write_sharded(&w, &missing);
    let err = build(&missing);
    assert!(
        err.contains("missing tensor `mid_block.attentions.0.proj_in.weight`")
            && err.contains("[32, 32]"),
        "{err}"
    );

    let extra = tmp.0.join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    let mut w = weights.clone();
    w.insert(
        "extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,
    );
    save(&w, &extra.join("diffusion_pytorch_model.safetensors"));
    let err = build(&extra);
    assert!(
        err.contains("unexpected") && err.contains("`extra.weight`"),
        "{err}"
    );
    // ... unless ignored.
    load_model(
        &extra,
        None,
        DType::F32,
        &Device::Cpu,
        &["extra.weight"],
        |vb| UNet2DConditionModel::new(vb, &cfg),
    )?;

    let shape = tmp.0.join("shape");
    std::fs::create_dir_all(&shape).unwrap();
    let mut w = weights.clone();
    w.insert(
        "conv_in.weight".into(),
        Tensor::zeros((16, 4, 1, 1), DType::F32, &Device::Cpu)?,
    );
    write_sharded(&w, &shape);
    let err = build(&shape);
    assert!(
        err.contains("`conv_in.weight`")
            && err.contains("[16, 4, 1, 1]")
            && err.contains("[16, 4, 3, 3]"),
        "{err}"
    );

    let dup = tmp.0.join("dup");
    std::fs::create_dir_all(&dup).unwrap();
    let a = dup.join("a.safetensors");
    let b = dup.join("b.safetensors");
    let one = HashMap::from([("x".to_string(), Tensor::zeros(2, DType::F32, &Device::Cpu)?)]);
    save(&one, &a);
    save(&one, &b);
    let err = Weights::open_files(&[a, b]).err().unwrap().to_string();
    assert!(err.contains("`x`") && err.contains("both"), "{err}");
    Ok(())
}

/// Trainable loading: Vars built on a VarMap get the checkpoint's values (from shards);
/// mismatches are all reported and nothing is set.
#[test]
fn trainable_loading_into_a_varmap() -> Result<()> {
    let tmp = TempDir::new("loading-varmap");
    make_pipeline(&tmp.0);
    let dir = tmp.0.join("unet");
    let cfg: unet_2d::Config = read_config(&dir)?;
    let case = unet_case();

    let varmap = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let unet = UNet2DConditionModel::new(vb, &cfg)?;
    let before = relative_error(&run_unet(&unet, &case.inputs)?, &case.want)?;
    assert!(before > 1e-2);
    load_into_varmap(&dir, &varmap)?;
    let err = relative_error(&run_unet(&unet, &case.inputs)?, &case.want)?;
    println!("load_into_varmap: relative error {err:.2e}");
    assert!(err < PARITY_TOL);
    // The loaded Vars are trainable.
    let loss = run_unet(&unet, &case.inputs)?.sqr()?.mean_all()?;
    let grads = loss.backward()?;
    adm_nn::assert_every_var_has_grad(&varmap, &grads)?;

    // A checkpoint with a missing, an unexpected and a mis-shaped tensor.
    let bad = tmp.0.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let mut w = load(&fixtures().join("unet/sdxl_tiny/diffusion_pytorch_model.safetensors"));
    w.remove("conv_out.bias");
    w.insert(
        "extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,
    );
    w.insert(
        "conv_in.weight".into(),
        Tensor::zeros((16, 4, 1, 1), DType::F32, &Device::Cpu)?,
    );
    write_sharded(&w, &bad);
    let fresh = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&fresh, DType::F32, &Device::Cpu);
    UNet2DConditionModel::new(vb, &cfg)?;
    let snapshot = fresh.data().lock().unwrap()["conv_out.weight"]
        .as_tensor()
        .copy()?;
    let err = load_into_varmap(&bad, &fresh).unwrap_err().to_string();
    for part in [
        "missing tensor `conv_out.bias` (the model expects [4])",
        "`extra.weight`",
        "tensor `conv_in.weight` has shape [16, 4, 1, 1], the model expects [16, 4, 3, 3]",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
    // Nothing was set.
    let after = fresh.data().lock().unwrap()["conv_out.weight"]
        .as_tensor()
        .copy()?;
    assert_eq!(relative_error(&after, &snapshot)?, 0.0);
    Ok(())
}

/// Repo ids resolve from the hub cache layout (refs/ → snapshots/), offline.
#[test]
fn hub_cache_resolution_is_offline() -> Result<()> {
    let tmp = TempDir::new("loading-hub");
    let cache = tmp.0.join("hub");
    let repo = cache.join("models--org--tiny-sdxl");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    make_pipeline(&snapshot);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();

    assert_eq!(resolve_in_cache("org/tiny-sdxl", None, &cache)?, snapshot);
    assert_eq!(
        resolve_in_cache("org/tiny-sdxl", Some(commit), &cache)?,
        snapshot
    );
    let err = resolve_in_cache("org/tiny-sdxl", Some("v2"), &cache)
        .unwrap_err()
        .to_string();
    assert!(err.contains("v2"), "{err}");
    let err = resolve_in_cache("org/other", None, &cache)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("org/other") && err.contains("not in the hub cache"),
        "{err}"
    );
    assert!(resolve_in_cache("a/b/c", None, &cache).is_err());
    // A local folder is taken as it is.
    assert_eq!(resolve_model(snapshot.to_str().unwrap(), None)?, snapshot);

    // A component of the cached pipeline loads.
    let dir = ModelIndex::read(&snapshot)?.component_dir(&snapshot, "unet")?;
    let cfg: unet_2d::Config = read_config(&dir)?;
    let unet = load_model(&dir, None, DType::F32, &Device::Cpu, &[], |vb| {
        UNet2DConditionModel::new(vb, &cfg)
    })?;
    let case = unet_case();
    assert!(relative_error(&run_unet(&unet, &case.inputs)?, &case.want)? < PARITY_TOL);
    Ok(())
}

/// adm-forward's library function on the sharded UNet and the VAE, against diffusers.
#[test]
fn forward_cli_matches_the_reference() -> Result<()> {
    let tmp = TempDir::new("loading-forward");
    make_pipeline(&tmp.0);
    let case = unet_case();
    let inputs_path = fixtures().join("unet/sdxl_tiny/inputs.safetensors");
    let output = tmp.0.join("out.safetensors");
    let args = ForwardArgs {
        model: tmp.0.to_string_lossy().into_owned(),
        component: Some("unet".into()),
        revision: None,
        variant: None,
        inputs: inputs_path.clone(),
        output: output.clone(),
        dtype: DType::F32,
        device: Device::Cpu,
    };
    run(&args)?;
    let out = load(&output);
    assert_eq!(out.len(), 1);
    assert_eq!(out["sample"].dtype(), DType::F32);
    let err = relative_error(&out["sample"], &case.want)?;
    println!("adm-forward unet: relative error {err:.2e}");
    assert!(err < PARITY_TOL);

    // The VAE decodes `latent` to `sample`.
    let vae_fixture = fixtures().join("vae/sdxl_tiny");
    let vae_inputs = load(&vae_fixture.join("inputs.safetensors"));
    let latent = HashMap::from([("latent".to_string(), vae_inputs["latent"].clone())]);
    let decoded = forward_dir(&tmp.0.join("vae"), None, &latent, DType::F32, &Device::Cpu)?;
    let want = &load(&vae_fixture.join("outputs.safetensors"))["decoded"];
    let err = relative_error(&decoded, want)?;
    println!("adm-forward vae: relative error {err:.2e}");
    assert!(err < PARITY_TOL);

    // Clear errors: unsupported class, a pipeline folder without --component, wrong inputs.
    let err = forward_dir(
        &tmp.0.join("text_encoder"),
        None,
        &latent,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("CLIPTextModel") && err.contains("not supported yet"),
        "{err}"
    );
    let err = model_dir(tmp.0.to_str().unwrap(), None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--component") && err.contains("unet"), "{err}");
    let err = forward_dir(&tmp.0.join("unet"), None, &latent, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("latent"), "{err}");
    let mut partial = case.inputs.clone();
    partial.remove("time_ids");
    let err = forward_dir(
        &tmp.0.join("unet"),
        None,
        &partial,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("time_ids"), "{err}");
    Ok(())
}

/// The binary itself, on the UNet component folder (sharded weights).
#[test]
fn adm_forward_binary_runs() -> Result<()> {
    let tmp = TempDir::new("loading-binary");
    make_pipeline(&tmp.0);
    let output = tmp.0.join("out.safetensors");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_adm-forward"))
        .arg("--model")
        .arg(tmp.0.join("unet"))
        .arg("--inputs")
        .arg(fixtures().join("unet/sdxl_tiny/inputs.safetensors"))
        .arg("--output")
        .arg(&output)
        .status()?;
    assert!(status.success());
    let err = relative_error(&load(&output)["sample"], &unet_case().want)?;
    assert!(err < PARITY_TOL, "{err:.2e}");

    // A failure exits non-zero with the error on stderr.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_adm-forward"))
        .arg("--model")
        .arg(tmp.0.join("text_encoder"))
        .arg("--inputs")
        .arg(fixtures().join("unet/sdxl_tiny/inputs.safetensors"))
        .arg("--output")
        .arg(&output)
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not supported yet"));
    Ok(())
}
