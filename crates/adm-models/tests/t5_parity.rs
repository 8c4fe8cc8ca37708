//! T5 encoder: parity with transformers' T5EncoderModel (float64 reference from
//! scripts/make_fixtures.py, group `t5`) for a T5 v1.1 (gated-gelu) and an original T5 (relu)
//! tiny model on a padded batch with and without the attention mask; half precision;
//! finite-difference gradients and every-Var-has-a-gradient; bad weights and inputs; the
//! published T5-XXL config; the SentencePiece tokenizer against transformers' ids.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use adm_models::loading::{expected_tensors, load_model, read_json};
use adm_models::t5::{Config, T5EncoderModel, T5Tokenizer, IGNORED_TENSORS};
use adm_nn::{assert_every_var_has_grad, check_gradients, GradCheck, SeededVarMap};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use common::{assert_parity, relative_error, Fixture, TempDir};

fn load_fixture(name: &str) -> Result<Fixture<Config>> {
    Fixture::load("t5", name, "model.safetensors")
}

fn build(weights: HashMap<String, Tensor>, cfg: &Config, dtype: DType) -> Result<T5EncoderModel> {
    T5EncoderModel::new(VarBuilder::from_tensors(weights, dtype, &Device::Cpu), cfg)
}

fn check_parity(name: &str, gated: bool) -> Result<()> {
    let f = load_fixture(name)?;
    assert_eq!(f.config.is_gated()?, gated);
    // Loaded from the folder: every checkpoint tensor used, none missing.
    let model = load_model(
        &f.dir,
        None,
        DType::F32,
        &Device::Cpu,
        IGNORED_TENSORS,
        |vb| T5EncoderModel::new(vb, &f.config),
    )?;
    let ids = &f.inputs["input_ids"];
    let masked = model.forward(ids, Some(&f.inputs["attention_mask"]))?;
    assert_parity(
        &format!("t5 {name}: masked"),
        &masked,
        &f.outputs["last_hidden_state"],
    )?;
    let plain = model.forward(ids, None)?;
    let want_plain = &f.outputs["last_hidden_state_no_mask"];
    assert_parity(&format!("t5 {name}: no mask"), &plain, want_plain)?;
    // The mask changes the padded rows (rows 1 and 2); row 0 has no padding.
    assert!(relative_error(&plain.narrow(0, 1, 2)?, &masked.narrow(0, 1, 2)?)? > 1e-3);
    assert_eq!(
        relative_error(&plain.narrow(0, 0, 1)?, &masked.narrow(0, 0, 1)?)?,
        0.0
    );

    // A checkpoint naming the embedding `encoder.embed_tokens.weight` loads the same model.
    let mut renamed = f.weights.clone();
    let shared = renamed.remove("shared.weight").unwrap();
    renamed.insert("encoder.embed_tokens.weight".into(), shared);
    let again = build(renamed, &f.config, DType::F32)?.forward(ids, None)?;
    assert_eq!(relative_error(&again, &plain)?, 0.0);
    Ok(())
}

/// Measured: 2.6e-6 (v1.1) and 5.6e-7 (relu) relative to the float64 reference.
#[test]
fn t5_v1_1_tiny_matches_transformers() -> Result<()> {
    check_parity("v1_1_tiny", true)
}

#[test]
fn t5_relu_tiny_matches_transformers() -> Result<()> {
    check_parity("t5_tiny", false)
}

/// bf16 / f16 weights: close to the f32 model with the same (rounded) weights, since the
/// stream is f32; and finite where a plain f16 gated product would overflow. Measured: bf16
/// 2.8e-2 (unscaled attention scores rounded to 8 bits of mantissa, as in transformers' bf16),
/// f16 3.6e-3, f16 with the overflowing feed-forward 7.4e-3.
#[test]
fn half_precision_is_close_and_does_not_overflow() -> Result<()> {
    let f = load_fixture("v1_1_tiny")?;
    let ids = &f.inputs["input_ids"];
    let mask = Some(&f.inputs["attention_mask"]);
    let rounded = |dtype: DType| -> Result<HashMap<String, Tensor>> {
        f.weights
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?.to_dtype(DType::F32)?)))
            .collect()
    };
    for (dtype, tol) in [(DType::BF16, 5e-2), (DType::F16, 1e-2)] {
        let want = build(rounded(dtype)?, &f.config, DType::F32)?.forward(ids, mask)?;
        let got = build(f.weights.clone(), &f.config, dtype)?.forward(ids, mask)?;
        assert_eq!(got.dtype(), dtype);
        let err = relative_error(&got, &want)?;
        println!("t5 v1_1_tiny {dtype:?}: relative error {err:.2e}");
        assert!(err < tol, "{dtype:?}: {err}");
    }

    // Scale wi_0 and wi_1 of the last block by 300 so that their product exceeds the f16
    // range (65504; its largest entry becomes about 1.2e6, measured with transformers); the
    // final layer norm makes the result scale-free again.
    let mut loud = f.weights.clone();
    let last = f.config.num_layers - 1;
    for w in ["wi_0", "wi_1"] {
        let name = format!("encoder.block.{last}.layer.1.DenseReluDense.{w}.weight");
        let t = (&loud[&name] * 300.0)?;
        loud.insert(name, t);
    }
    let loud_f16: HashMap<String, Tensor> = loud
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F16)?.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let want = build(loud_f16, &f.config, DType::F32)?.forward(ids, mask)?;
    let got = build(loud, &f.config, DType::F16)?.forward(ids, mask)?;
    let err = relative_error(&got, &want)?;
    println!("t5 v1_1_tiny f16 with an overflowing feed-forward: relative error {err:.2e}");
    assert!(got
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?
        .is_finite());
    assert!(err < 1.5e-2, "{err}");
    Ok(())
}

fn tiny_config(gated: bool) -> Config {
    Config {
        vocab_size: 20,
        d_model: 8,
        d_kv: 3,
        d_ff: 10,
        num_layers: 2,
        num_heads: 2,
        relative_attention_num_buckets: 8,
        relative_attention_max_distance: 6,
        layer_norm_epsilon: 1e-6,
        feed_forward_proj: if gated { "gated-gelu" } else { "relu" }.into(),
        dense_act_fn: None,
        is_gated_act: None,
    }
}

fn tiny_ids() -> Result<(Tensor, Tensor)> {
    let ids = Tensor::new(
        &[[3u32, 7, 11, 1, 0, 0, 0], [5, 9, 2, 13, 17, 4, 1]],
        &Device::Cpu,
    )?;
    let mask = Tensor::new(
        &[[1u32, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]],
        &Device::Cpu,
    )?;
    Ok((ids, mask))
}

/// Finite differences (f64) through the whole encoder, with respect to the embedding, the
/// relative position bias, every kind of projection and norm.
#[test]
fn gradients_match_finite_differences() -> Result<()> {
    for gated in [true, false] {
        let cfg = tiny_config(gated);
        let seeded = SeededVarMap::new(5);
        T5EncoderModel::new(seeded.var_builder(DType::F64, &Device::Cpu), &cfg)?;
        let mut weights: HashMap<String, Tensor> = seeded
            .varmap()
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let wi = if gated { "wi_0" } else { "wi" };
        let probed = [
            "shared.weight".to_string(),
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight".into(),
            "encoder.block.0.layer.0.SelfAttention.q.weight".into(),
            "encoder.block.1.layer.0.SelfAttention.k.weight".into(),
            "encoder.block.1.layer.0.SelfAttention.v.weight".into(),
            "encoder.block.0.layer.0.SelfAttention.o.weight".into(),
            "encoder.block.0.layer.0.layer_norm.weight".into(),
            format!("encoder.block.1.layer.1.DenseReluDense.{wi}.weight"),
            "encoder.block.0.layer.1.DenseReluDense.wo.weight".into(),
            "encoder.final_layer_norm.weight".into(),
        ];
        let inputs: Vec<Tensor> = probed.iter().map(|n| weights.remove(n).unwrap()).collect();
        let (ids, mask) = tiny_ids()?;
        let opts = GradCheck {
            max_probes_per_input: 4,
            ..GradCheck::default()
        };
        let report = check_gradients(
            |xs| {
                let mut all = weights.clone();
                all.extend(probed.iter().cloned().zip(xs.iter().cloned()));
                build(all, &cfg, DType::F64)?.forward(&ids, Some(&mask))
            },
            &inputs,
            opts,
        )?;
        println!("t5 gated={gated}: {report:?}");
        assert!(report.probes == 4 * probed.len() && report.max_abs_numeric > 1e-3);
    }
    Ok(())
}

#[test]
fn every_var_gets_a_gradient() -> Result<()> {
    for gated in [true, false] {
        let seeded = SeededVarMap::new(7);
        let model = T5EncoderModel::new(
            seeded.var_builder(DType::F32, &Device::Cpu),
            &tiny_config(gated),
        )?;
        let (ids, mask) = tiny_ids()?;
        let out = model.forward(&ids, Some(&mask))?;
        let grads = out.sin()?.mean_all()?.backward()?;
        assert_every_var_has_grad(seeded.varmap(), &grads)?;
    }
    Ok(())
}

/// Missing, mis-shaped and unexpected tensors name the tensor; bad inputs are errors.
#[test]
fn bad_weights_and_inputs_are_errors() -> Result<()> {
    let f = load_fixture("t5_tiny")?;
    let tmp = TempDir::new("t5-bad-weights");
    std::fs::copy(f.dir.join("config.json"), tmp.0.join("config.json")).unwrap();
    let try_load = |weights: &HashMap<String, Tensor>| -> String {
        candle_core::safetensors::save(weights, tmp.0.join("model.safetensors")).unwrap();
        load_model(
            &tmp.0,
            None,
            DType::F32,
            &Device::Cpu,
            IGNORED_TENSORS,
            |vb| T5EncoderModel::new(vb, &f.config),
        )
        .unwrap_err()
        .to_string()
    };
    let missing = "encoder.block.1.layer.1.DenseReluDense.wi.weight";
    let mut weights = f.weights.clone();
    weights.remove(missing);
    let err = try_load(&weights);
    assert!(err.contains(missing) && err.contains("missing"), "{err}");

    let mut weights = f.weights.clone();
    weights.insert(
        "encoder.final_layer_norm.weight".into(),
        Tensor::ones(7, DType::F32, &Device::Cpu)?,
    );
    let err = try_load(&weights);
    assert!(
        err.contains("encoder.final_layer_norm.weight")
            && err.contains("[7]")
            && err.contains("[32]"),
        "{err}"
    );

    let mut weights = f.weights.clone();
    weights.insert(
        "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight".into(),
        Tensor::ones((32, 4), DType::F32, &Device::Cpu)?,
    );
    let err = try_load(&weights);
    assert!(
        err.contains("block.1.layer.0.SelfAttention.relative_attention_bias"),
        "{err}"
    );

    let model = build(f.weights.clone(), &f.config, DType::F32)?;
    let big = Tensor::new(&[[3u32, 120, 1]], &Device::Cpu)?;
    let err = model.forward(&big, None).unwrap_err().to_string();
    assert!(err.contains("120") && err.contains("vocab"), "{err}");
    let ids = Tensor::new(&[[3u32, 4, 1]], &Device::Cpu)?;
    let wrong = Tensor::ones((1, 4), DType::U32, &Device::Cpu)?;
    assert!(model
        .forward(&ids, Some(&wrong))
        .unwrap_err()
        .to_string()
        .contains("attention_mask"));
    let empty = Tensor::zeros((1, 3), DType::U32, &Device::Cpu)?;
    let err = model.forward(&ids, Some(&empty)).unwrap_err().to_string();
    assert!(err.contains("row 0"), "{err}");
    let flat = Tensor::new(&[3u32, 4, 1], &Device::Cpu)?;
    assert!(model
        .forward(&flat, None)
        .unwrap_err()
        .to_string()
        .contains("(B, L)"));
    Ok(())
}

/// google/t5-v1_1-xxl (SD3's text_encoder_3/config.json) parses to [`Config::t5_v1_1_xxl`] and
/// builds (without allocating) to transformers' T5EncoderModel counts without the tied
/// `encoder.embed_tokens.weight` (220 tensors, 4,893,906,944 parameters with it).
#[test]
fn published_t5_xxl_config_and_counts() -> Result<()> {
    let cfg: Config = serde_json::from_str(
        r#"{"architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096,
            "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
            "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
            "is_encoder_decoder": true, "is_gated_act": true, "layer_norm_epsilon": 1e-06,
            "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
            "output_past": true, "pad_token_id": 0, "relative_attention_max_distance": 128,
            "relative_attention_num_buckets": 32, "tie_word_embeddings": false,
            "torch_dtype": "float16", "transformers_version": "4.40.0.dev0", "use_cache": true,
            "vocab_size": 32128}"#,
    )
    .unwrap();
    assert_eq!(cfg, Config::t5_v1_1_xxl());
    let expected = expected_tensors(|vb| T5EncoderModel::new(vb, &cfg))?;
    let count: usize = expected.iter().map(|(_, s)| s.elem_count()).sum();
    assert_eq!((expected.len(), count), (219, 4_893_906_944 - 32128 * 4096));
    Ok(())
}

#[derive(serde::Deserialize)]
struct Tokens {
    prompts: Vec<String>,
    max_length: usize,
    ids: Vec<Vec<u32>>,
    vocab_size: usize,
}

/// A tiny unigram tokenizer.json made by transformers' T5Tokenizer: ids (with `</s>`,
/// `<pad>`, `<unk>`, truncation) equal transformers'.
#[test]
fn tokenizer_matches_transformers() -> Result<()> {
    let dir: PathBuf = common::fixture_dir("t5", "tokenizer");
    let tokens: Tokens = read_json(&dir.join("tokens.json"))?;
    let tok =
        T5Tokenizer::from_file(&dir.join("tokenizer.json"))?.with_max_length(tokens.max_length)?;
    assert_eq!((tok.eos_id(), tok.pad_id()), (1, 0));
    assert_eq!(tok.vocab_size(), tokens.vocab_size);
    for (prompt, want) in tokens.prompts.iter().zip(&tokens.ids) {
        assert_eq!(&tok.encode(prompt)?, want, "{prompt:?}");
    }
    let refs: Vec<&str> = tokens.prompts.iter().map(String::as_str).collect();
    let batch = tok.encode_batch(&refs, &Device::Cpu)?;
    assert_eq!(batch.to_vec2::<u32>()?, tokens.ids);
    assert!(tok.clone().with_max_length(0).is_err());
    assert!(T5Tokenizer::from_file(&dir.join("missing.json")).is_err());
    Ok(())
}
