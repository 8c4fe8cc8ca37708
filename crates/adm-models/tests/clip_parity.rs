//! CLIP text encoder: parity with transformers (float64 reference from
//! scripts/make_fixtures.py) for a CLIP-L-like and an OpenCLIP-bigG-like tiny model, key
//! layouts with and without `text_model.`, gradients, the published configs, and the CLIP
//! BPE tokenizer against transformers' ids (the real 49408-token vocabulary).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use adm_models::clip::{ClipTextModel, ClipTokenizer, Config, IGNORED_TENSORS};
use adm_models::loading::{expected_tensors, load_model, read_config};
use adm_nn::{assert_every_var_has_grad, SeededVarMap};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use common::{assert_parity, relative_error, Fixture, PARITY_TOL};

fn fixtures() -> PathBuf {
    common::fixtures().join("clip")
}

fn load_fixture(name: &str) -> Result<Fixture<Config>> {
    Fixture::load("clip", name, "model.safetensors")
}

fn check_parity(name: &str, with_projection: bool) -> Result<()> {
    let f = load_fixture(name)?;
    assert_eq!(f.config.has_projection(), with_projection);
    // Loaded from the folder: every checkpoint tensor used, none missing.
    let model = load_model(
        &f.dir,
        None,
        DType::F32,
        &Device::Cpu,
        IGNORED_TENSORS,
        |vb| ClipTextModel::new(vb, &f.config),
    )?;
    let mask = f.inputs.get("attention_mask");
    let out = model.forward(&f.inputs["input_ids"], mask)?;
    assert_eq!(out.hidden_states.len(), f.config.num_hidden_layers + 1);
    let mut checks = vec![
        ("last_hidden_state", &out.last_hidden_state),
        ("penultimate", out.penultimate_hidden_state()),
        ("hidden_states.0", &out.hidden_states[0]),
        ("pooled", &out.pooled_output),
    ];
    if let Some(t) = &out.text_embeds {
        checks.push(("text_embeds", t));
    }
    assert_eq!(out.text_embeds.is_some(), with_projection);
    for (what, got) in checks {
        assert_parity(&format!("clip {name}: {what}"), got, &f.outputs[what])?;
    }
    if let Some(want) = f.outputs.get("last_hidden_state_no_mask") {
        let plain = model.forward(&f.inputs["input_ids"], None)?;
        let err = relative_error(&plain.last_hidden_state, want)?;
        println!("clip {name}: without attention_mask relative error {err:.2e}");
        assert!(err < PARITY_TOL);
        // The padding mask does change the padded positions.
        assert!(relative_error(&plain.last_hidden_state, &out.last_hidden_state)? > 1e-3);
    }

    // Keys without the `text_model.` prefix load to the same model.
    let stripped: HashMap<String, Tensor> = f
        .weights
        .iter()
        .map(|(k, v)| {
            (
                k.strip_prefix("text_model.").unwrap_or(k).to_string(),
                v.clone(),
            )
        })
        .collect();
    assert!(stripped.contains_key("embeddings.token_embedding.weight"));
    let vb = VarBuilder::from_tensors(stripped, DType::F32, &Device::Cpu);
    let bare = ClipTextModel::new(vb, &f.config)?;
    let again = bare.forward(&f.inputs["input_ids"], mask)?;
    assert_eq!(
        relative_error(&again.last_hidden_state, &out.last_hidden_state)?,
        0.0
    );
    Ok(())
}

#[test]
fn clip_l_tiny_matches_transformers() -> Result<()> {
    check_parity("clip_l_tiny", false)
}

#[test]
fn bigg_tiny_matches_transformers() -> Result<()> {
    check_parity("bigg_tiny", true)
}

#[test]
fn every_var_gets_a_gradient() -> Result<()> {
    for name in ["clip_l_tiny", "bigg_tiny"] {
        let cfg: Config = read_config(&fixtures().join(name))?;
        let seeded = SeededVarMap::new(9);
        let model = ClipTextModel::new(seeded.var_builder(DType::F32, &Device::Cpu), &cfg)?;
        // Legacy eos_token_id 2: the eos is the largest id; otherwise eos_token_id (301).
        let eos = if cfg.eos_token_id == 2 {
            599u32
        } else {
            cfg.eos_token_id
        };
        let ids = Tensor::new(&[[1u32, 5, 9, eos, 3], [2, eos, 4, 4, 4]], &Device::Cpu)?;
        let out = model.forward(&ids, None)?;
        // Use every output, so that every layer (the last included) gets a gradient.
        let mut loss = (out.last_hidden_state.sqr()?.mean_all()?
            + out.penultimate_hidden_state().sqr()?.mean_all()?)?;
        if let Some(t) = &out.text_embeds {
            loss = (loss + t.sin()?.mean_all()?)?;
        }
        let grads = loss.backward()?;
        assert_every_var_has_grad(seeded.varmap(), &grads)?;
    }
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let f = load_fixture("bigg_tiny")?;
    let vb = VarBuilder::from_tensors(f.weights.clone(), DType::F32, &Device::Cpu);
    let model = ClipTextModel::new(vb, &f.config)?;
    // Longer than max_position_embeddings (16).
    let long = Tensor::zeros((1, 17), DType::U32, &Device::Cpu)?;
    assert!(model.forward(&long, None).is_err());
    // An id outside the vocabulary.
    let big = Tensor::new(&[[300u32, 700, 301]], &Device::Cpu)?;
    let err = model.forward(&big, None).unwrap_err().to_string();
    assert!(err.contains("700"), "{err}");
    // No eos token where the config has a real eos_token_id.
    let no_eos = Tensor::new(&[[300u32, 5, 6]], &Device::Cpu)?;
    let err = model.forward(&no_eos, None).unwrap_err().to_string();
    assert!(err.contains("eos"), "{err}");
    // Mask of the wrong shape.
    let ids = Tensor::new(&[[300u32, 5, 301]], &Device::Cpu)?;
    let mask = Tensor::ones((1, 4), DType::U32, &Device::Cpu)?;
    assert!(model.forward(&ids, Some(&mask)).is_err());
    // A wrong shape in the checkpoint names the tensor and both shapes.
    let mut weights = f.weights.clone();
    weights.insert(
        "text_projection.weight".into(),
        Tensor::zeros((7, 40), DType::F32, &Device::Cpu)?,
    );
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let err = ClipTextModel::new(vb, &f.config).unwrap_err().to_string();
    assert!(
        err.contains("text_projection.weight")
            && err.contains("[7, 40]")
            && err.contains("[24, 40]"),
        "{err}"
    );
    let mut cfg = f.config.clone();
    cfg.hidden_act = "relu".into();
    assert!(cfg.validate().unwrap_err().to_string().contains("relu"));
    Ok(())
}

/// CLIP-L and bigG build (without allocating) to transformers' tensor and parameter counts
/// (`make_fixtures.py counts`).
#[test]
fn published_configs_have_transformers_parameter_counts() -> Result<()> {
    for (name, cfg, tensors, params) in [
        ("clip_l", Config::clip_l(), 196, 123_060_480usize),
        ("bigg", Config::open_clip_bigg(), 517, 694_659_840),
    ] {
        let expected = expected_tensors(|vb| ClipTextModel::new(vb, &cfg))?;
        let count: usize = expected.iter().map(|(_, s)| s.elem_count()).sum();
        assert_eq!((expected.len(), count), (tensors, params), "{name}");
        assert!(expected
            .iter()
            .all(|(n, _)| n.starts_with("text_model.") || n == "text_projection.weight"));
    }
    // SDXL's text_encoder_2/config.json (the fields that matter).
    let cfg: Config = serde_json::from_str(
        r#"{"architectures": ["CLIPTextModelWithProjection"], "attention_dropout": 0.0,
            "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu",
            "hidden_size": 1280, "initializer_factor": 1.0, "initializer_range": 0.02,
            "intermediate_size": 5120, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
            "model_type": "clip_text_model", "num_attention_heads": 20, "num_hidden_layers": 32,
            "pad_token_id": 1, "projection_dim": 1280, "torch_dtype": "float16",
            "transformers_version": "4.32.0.dev0", "vocab_size": 49408}"#,
    )
    .unwrap();
    assert_eq!(cfg, Config::open_clip_bigg());
    Ok(())
}

#[derive(serde::Deserialize)]
struct Tokens {
    prompts: Vec<String>,
    full_pad_eos: Vec<Vec<u32>>,
    full_pad_bang: Vec<Vec<u32>>,
    small_pad_bang: Vec<Vec<u32>>,
    small_vocab_size: usize,
}

fn tokens() -> Tokens {
    let text = std::fs::read_to_string(fixtures().join("tokens.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check_ids(tok: &ClipTokenizer, prompts: &[String], want: &[Vec<u32>], what: &str) -> Result<()> {
    for (prompt, want) in prompts.iter().zip(want) {
        let got = tok.encode(prompt)?;
        assert_eq!(&got, want, "{what}: {prompt:?}");
    }
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let batch = tok.encode_batch(&refs, &Device::Cpu)?;
    assert_eq!(batch.dims(), &[prompts.len(), 77]);
    assert_eq!(&batch.to_vec2::<u32>()?, want);
    Ok(())
}

/// The real CLIP vocabulary from vocab.json + merges.txt (as SD / SDXL ship `tokenizer/`),
/// padded with the EOS (CLIP-L's `tokenizer`) or with "!" (SDXL's `tokenizer_2`).
#[test]
fn tokenizer_from_vocab_and_merges_matches_transformers() -> Result<()> {
    let t = tokens();
    let dir = fixtures().join("tokenizer");
    let tok = ClipTokenizer::from_folder(&dir)?;
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (49406, 49407, 49407)
    );
    assert_eq!(tok.vocab_size(), 49408);
    assert_eq!(
        tok.encode("a photo of a cat")?[..8],
        [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    );
    check_ids(&tok, &t.prompts, &t.full_pad_eos, "pad eos")?;
    let bang = ClipTokenizer::from_vocab_merges(
        &dir.join("vocab.json"),
        &dir.join("merges.txt"),
        Some("!"),
    )?;
    assert_eq!(bang.pad_id(), 0);
    check_ids(&bang, &t.prompts, &t.full_pad_bang, "pad !")?;
    Ok(())
}

/// A tokenizer.json (transformers' CLIPTokenizer, 2000 merges).
#[test]
fn tokenizer_json_matches_transformers() -> Result<()> {
    let t = tokens();
    let tok = ClipTokenizer::from_file(
        &fixtures().join("tokenizer_small/tokenizer.json"),
        Some("!"),
    )?;
    assert_eq!(tok.vocab_size(), t.small_vocab_size);
    check_ids(&tok, &t.prompts, &t.small_pad_bang, "tokenizer.json")?;
    let short = tok.clone().with_max_length(5)?;
    assert_eq!(
        short.encode("a photo of a cat")?,
        vec![tok.bos_id(), 320, 1125, 539, tok.eos_id()]
    );
    assert!(tok.clone().with_max_length(1).is_err());
    assert!(ClipTokenizer::from_file(
        &fixtures().join("tokenizer_small/tokenizer.json"),
        Some("<nope>")
    )
    .is_err());
    Ok(())
}
