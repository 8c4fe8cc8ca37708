//! SD3's triple text-encoder conditioning against diffusers' real
//! `StableDiffusion3Pipeline.encode_prompt` (float64, scripts/fixtures_t5.py) with the tiny
//! CLIP-L (plus a text projection), bigG and T5 v1.1 fixtures, prompt ids given directly: with
//! T5 and without it (zeros), built from the models and loaded from a pipeline folder.

mod common;

use std::collections::HashMap;
use std::path::Path;

use adm_models::clip::{self, ClipTextModel};
use adm_models::loading::read_config;
use adm_models::sd3_text::{
    Sd3PromptIds, Sd3TextEncoders, Sd3Tokenizers, ENCODER_HIDDEN_STATES, POOLED_PROJECTIONS,
};
use adm_models::t5::{self, T5EncoderModel, T5Tokenizer};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use common::{assert_parity, fixture_dir, load_tensors, TempDir};

struct Sd3Fixture {
    clip_l: HashMap<String, Tensor>,
    clip_l_config: clip::Config,
    inputs: HashMap<String, Tensor>,
    outputs: HashMap<String, Tensor>,
    joint_attention_dim: usize,
    max_sequence_length: usize,
}

/// clip_l_tiny is a CLIPTextModel; SD3's text_encoder is a CLIPTextModelWithProjection: the
/// fixture adds the projection.
fn sd3_fixture() -> Result<Sd3Fixture> {
    let dir = fixture_dir("sd3_text", "tiny");
    let clip_dir = fixture_dir("clip", "clip_l_tiny");
    let mut clip_l = load_tensors(clip_dir.join("model.safetensors"))?;
    clip_l.extend(load_tensors(dir.join("clip_l_projection.safetensors"))?);
    let mut clip_l_config: clip::Config = read_config(&clip_dir)?;
    clip_l_config.architectures = Some(vec!["CLIPTextModelWithProjection".into()]);
    let config: serde_json::Value = read_config(&dir)?;
    Ok(Sd3Fixture {
        clip_l,
        clip_l_config,
        inputs: load_tensors(dir.join("inputs.safetensors"))?,
        outputs: load_tensors(dir.join("outputs.safetensors"))?,
        joint_attention_dim: config["joint_attention_dim"].as_u64().unwrap() as usize,
        max_sequence_length: config["max_sequence_length"].as_u64().unwrap() as usize,
    })
}

fn from_folder<M>(name: &str, build: impl FnOnce(VarBuilder, &Path) -> Result<M>) -> Result<M> {
    let (kind, model) = name.split_once('/').unwrap();
    let dir = fixture_dir(kind, model);
    let vb = VarBuilder::from_tensors(
        load_tensors(dir.join("model.safetensors"))?,
        DType::F32,
        &Device::Cpu,
    );
    build(vb, &dir)
}

fn encoders(f: &Sd3Fixture, with_t5: bool) -> Result<Sd3TextEncoders> {
    let clip_l = ClipTextModel::new(
        VarBuilder::from_tensors(f.clip_l.clone(), DType::F32, &Device::Cpu),
        &f.clip_l_config,
    )?;
    let clip_g = from_folder("clip/bigg_tiny", |vb, dir| {
        ClipTextModel::new(vb, &read_config(dir)?)
    })?;
    let t5 = if with_t5 {
        Some(from_folder("t5/v1_1_tiny", |vb, dir| {
            T5EncoderModel::new(vb, &read_config::<t5::Config>(dir)?)
        })?)
    } else {
        None
    };
    Sd3TextEncoders::new(
        clip_l,
        clip_g,
        t5,
        f.joint_attention_dim,
        f.max_sequence_length,
    )
}

fn ids(f: &Sd3Fixture) -> Sd3PromptIds {
    Sd3PromptIds {
        clip_l: f.inputs["clip_l_ids"].clone(),
        clip_g: f.inputs["clip_g_ids"].clone(),
        t5: Some(f.inputs["t5_ids"].clone()),
    }
}

fn check(f: &Sd3Fixture, encoders: &Sd3TextEncoders, what: &str) -> Result<()> {
    let suffix = if encoders.has_t5() { "" } else { "_no_t5" };
    let cond = encoders.encode(&ids(f))?;
    assert_parity(
        &format!("sd3 {what}{suffix}: encoder_hidden_states"),
        cond.get(ENCODER_HIDDEN_STATES)?,
        &f.outputs[&format!("prompt_embeds{suffix}")],
    )?;
    assert_parity(
        &format!("sd3 {what}{suffix}: pooled_projections"),
        cond.get(POOLED_PROJECTIONS)?,
        &f.outputs[&format!("pooled_prompt_embeds{suffix}")],
    )
}

/// Measured: encoder_hidden_states 3.0e-6 (with T5) / 4.4e-7 (zeros), pooled 3.8e-7.
#[test]
fn conditioning_matches_diffusers_encode_prompt() -> Result<()> {
    let f = sd3_fixture()?;
    for with_t5 in [true, false] {
        let encoders = encoders(&f, with_t5)?;
        check(&f, &encoders, "models")?;
    }
    // The layout: 16 CLIP tokens of width 32 + 40 zero-padded to 80, then 20 T5 tokens.
    let cond = encoders(&f, false)?.encode(&ids(&f))?;
    let hidden = cond.get(ENCODER_HIDDEN_STATES)?;
    assert_eq!(hidden.dims(), &[2, 16 + f.max_sequence_length, 80]);
    let zeros = |t: Tensor| -> Result<f32> { t.abs()?.max_all()?.to_scalar::<f32>() };
    assert_eq!(zeros(hidden.narrow(2, 72, 8)?)?, 0.0);
    assert_eq!(zeros(hidden.narrow(1, 16, f.max_sequence_length)?)?, 0.0);
    Ok(())
}

/// A pipeline folder (model_index.json, text_encoder{,_2,_3}, transformer/config.json) loads
/// to the same conditioning; an index without text_encoder_3 gives the zeros.
#[test]
fn loads_from_a_pipeline_folder() -> Result<()> {
    let f = sd3_fixture()?;
    let tmp = TempDir::new("sd3-text-pipeline");
    let root = &tmp.0;
    let write = |path: &Path, text: String| std::fs::write(path, text).unwrap();
    for (component, source) in [
        ("text_encoder_2", fixture_dir("clip", "bigg_tiny")),
        ("text_encoder_3", fixture_dir("t5", "v1_1_tiny")),
    ] {
        std::fs::create_dir_all(root.join(component)).unwrap();
        for file in ["config.json", "model.safetensors"] {
            std::fs::copy(source.join(file), root.join(component).join(file)).unwrap();
        }
    }
    let clip_dir = root.join("text_encoder");
    std::fs::create_dir_all(&clip_dir).unwrap();
    candle_core::safetensors::save(&f.clip_l, clip_dir.join("model.safetensors"))?;
    write(
        &clip_dir.join("config.json"),
        serde_json::to_string(&f.clip_l_config).unwrap(),
    );
    std::fs::create_dir_all(root.join("transformer")).unwrap();
    write(
        &root.join("transformer/config.json"),
        format!(
            r#"{{"_class_name": "SD3Transformer2DModel", "joint_attention_dim": {}}}"#,
            f.joint_attention_dim
        ),
    );
    let index = |t5: &str| {
        format!(
            r#"{{"_class_name": "StableDiffusion3Pipeline",
                "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "text_encoder_3": {t5},
                "transformer": ["diffusers", "SD3Transformer2DModel"]}}"#
        )
    };
    write(
        &root.join("model_index.json"),
        index(r#"["transformers", "T5EncoderModel"]"#),
    );
    let loaded = Sd3TextEncoders::load(root, DType::F32, &Device::Cpu, f.max_sequence_length)?;
    assert!(loaded.has_t5());
    check(&f, &loaded, "loaded")?;

    write(&root.join("model_index.json"), index("[null, null]"));
    let loaded = Sd3TextEncoders::load(root, DType::F32, &Device::Cpu, f.max_sequence_length)?;
    assert!(!loaded.has_t5());
    check(&f, &loaded, "loaded")?;

    // Listed but missing is an error, not a silent switch to zeros.
    write(
        &root.join("model_index.json"),
        index(r#"["transformers", "T5EncoderModel"]"#),
    );
    std::fs::remove_dir_all(root.join("text_encoder_3")).unwrap();
    let err = Sd3TextEncoders::load(root, DType::F32, &Device::Cpu, f.max_sequence_length)
        .unwrap_err()
        .to_string();
    assert!(err.contains("text_encoder_3"), "{err}");
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let f = sd3_fixture()?;
    let encoders = encoders(&f, true)?;
    let mut no_t5 = ids(&f);
    no_t5.t5 = None;
    let err = encoders.encode(&no_t5).unwrap_err().to_string();
    assert!(err.contains("t5 ids"), "{err}");
    let mut short = ids(&f);
    short.t5 = Some(f.inputs["t5_ids"].narrow(1, 0, 5)?);
    let err = encoders.encode(&short).unwrap_err().to_string();
    assert!(err.contains("max_sequence_length"), "{err}");
    let mut one_row = ids(&f);
    one_row.clip_g = f.inputs["clip_g_ids"].narrow(0, 0, 1)?;
    assert!(encoders
        .encode(&one_row)
        .unwrap_err()
        .to_string()
        .contains("rows"));

    // CLIP-L without its projection (a plain CLIPTextModel) cannot give the pooled output.
    let mut plain = f.clip_l_config.clone();
    plain.architectures = None;
    let clip_l = ClipTextModel::new(
        VarBuilder::from_tensors(f.clip_l.clone(), DType::F32, &Device::Cpu),
        &plain,
    )?;
    let clip_g = from_folder("clip/bigg_tiny", |vb, dir| {
        ClipTextModel::new(vb, &read_config(dir)?)
    })?;
    let without = Sd3TextEncoders::new(clip_l.clone(), clip_g.clone(), None, 80, 4)?;
    let err = without.encode(&ids(&f)).unwrap_err().to_string();
    assert!(err.contains("text_projection"), "{err}");
    // Widths that do not fit.
    let err = Sd3TextEncoders::new(clip_l, clip_g, None, 64, 4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("joint_attention_dim"), "{err}");
    Ok(())
}

/// The three tokenizers give each encoder its own ids for the same prompts (CLIP pads "!" for
/// bigG as SD3's tokenizer_2 does); without T5 no T5 ids are made.
#[test]
fn tokenizers_encode_every_prompt_for_each_encoder() -> Result<()> {
    let clip_json = fixture_dir("clip", "tokenizer_small").join("tokenizer.json");
    let t5 = T5Tokenizer::from_file(&fixture_dir("t5", "tokenizer").join("tokenizer.json"))?
        .with_max_length(9)?;
    let mut tokenizers = Sd3Tokenizers {
        clip_l: clip::ClipTokenizer::from_file(&clip_json, None)?,
        clip_g: clip::ClipTokenizer::from_file(&clip_json, Some("!"))?,
        t5: Some(t5.clone()),
    };
    let prompts = ["a photo of a cat", "the mat"];
    let ids = tokenizers.encode_batch(&prompts, &Device::Cpu)?;
    for (row, prompt) in prompts.iter().enumerate() {
        let row_of = |t: &Tensor| t.get(row)?.to_vec1::<u32>();
        assert_eq!(row_of(&ids.clip_l)?, tokenizers.clip_l.encode(prompt)?);
        assert_eq!(row_of(&ids.clip_g)?, tokenizers.clip_g.encode(prompt)?);
        assert_eq!(row_of(ids.t5.as_ref().unwrap())?, t5.encode(prompt)?);
    }
    assert_ne!(ids.clip_l.to_vec2::<u32>()?, ids.clip_g.to_vec2::<u32>()?);
    assert_eq!(ids.t5.as_ref().unwrap().dims(), &[2, 9]);
    tokenizers.t5 = None;
    assert!(tokenizers
        .encode_batch(&prompts, &Device::Cpu)?
        .t5
        .is_none());
    Ok(())
}
