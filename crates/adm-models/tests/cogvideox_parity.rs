//! CogVideoXTransformer3DModel: parity with diffusers (float64 reference from
//! scripts/fixtures_cogvideox.py), loading through adm-forward's code, gradients reaching
//! every Var, finite-difference checks of the whole network, checkpoint errors, the published
//! 2B / 5B configs and the Backbone wrapper.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use adm_diffusion::{Schedule, ScheduleConfig};
use adm_models::cogvideox::{
    expected_tensors, CogVideoXBackbone, CogVideoXTransformer3DModel, Config,
};
use adm_models::forward_cli::forward_dir;
use adm_models::loading::{load_into_varmap, load_model};
use adm_models::{guided_prediction, predict_x0_eps, Backbone, Condition};
use adm_nn::{assert_every_var_has_grad, check_gradients, GradCheck, SeededVarMap};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use common::{assert_parity, fixture_dir, load_tensors, relative_error, DIFFUSERS_WEIGHTS};

const KIND: &str = "cogvideox";
const FIXTURES: [&str; 3] = [
    "cogvideox_2b_tiny",
    "cogvideox_5b_tiny",
    "cogvideox_5b_i2v_tiny",
];

struct Fixture {
    dir: PathBuf,
    config: Config,
    model: CogVideoXTransformer3DModel,
    inputs: HashMap<String, Tensor>,
    outputs: HashMap<String, Tensor>,
}

/// The fixture's model, built in `dtype` through `load_model` (which also rejects unused
/// checkpoint tensors).
fn load_fixture(name: &str, dtype: DType) -> Result<Fixture> {
    let f = common::Fixture::<Config>::load(KIND, name, DIFFUSERS_WEIGHTS)?;
    let model = load_model(&f.dir, None, dtype, &Device::Cpu, &[], |vb| {
        CogVideoXTransformer3DModel::new(vb, &f.config)
    })?;
    Ok(Fixture {
        dir: f.dir,
        config: f.config,
        model,
        inputs: f.inputs,
        outputs: f.outputs,
    })
}

fn all_taps(cfg: &Config) -> Vec<String> {
    cfg.feature_taps().into_iter().map(|t| t.name).collect()
}

fn check_parity(name: &str) -> Result<()> {
    let f = load_fixture(name, DType::F32)?;
    let (x, context, t) = (
        &f.inputs["hidden_states"],
        &f.inputs["encoder_hidden_states"],
        &f.inputs["timestep"],
    );
    // Batch 2 with a different timestep per sample.
    let times = t.to_vec1::<f32>()?;
    assert!(times.len() == 2 && times[0] != times[1], "{times:?}");

    // The way adm-forward runs it.
    let sample = forward_dir(&f.dir, None, &f.inputs, DType::F32, &Device::Cpu)?;
    assert_parity(
        &format!("{name}: forward_dir sample"),
        &sample,
        &f.outputs["sample"],
    )?;

    let taps = all_taps(&f.config);
    let (out, features) = f.model.forward_with_features(x, context, t, &taps)?;
    assert_eq!(relative_error(&out, &sample)?, 0.0);
    for (tap, feature) in taps.iter().zip(&features) {
        assert_parity(&format!("{name}: {tap}"), feature, &f.outputs[tap])?;
    }
    // `features` stops early and returns the taps in the order asked for.
    let asked = vec![taps[1].clone(), taps[0].clone()];
    let early = f.model.features(x, context, t, &asked)?;
    assert_eq!(relative_error(&early[0], &features[1])?, 0.0);
    assert_eq!(relative_error(&early[1], &features[0])?, 0.0);
    let err = f
        .model
        .features(x, context, t, &["transformer_blocks.9".into()])
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("no feature tap `transformer_blocks.9`"),
        "{err}"
    );
    Ok(())
}

/// Measured (f32 against the float64 reference, relative to max |reference|): `sample`
/// 1.8e-7 (2b), 2.3e-7 (5b), 3.5e-7 (5b-i2v); block outputs 1.3e-7 .. 2.4e-7.
#[test]
fn cogvideox_2b_tiny_matches_diffusers() -> Result<()> {
    check_parity("cogvideox_2b_tiny")
}

#[test]
fn cogvideox_5b_tiny_matches_diffusers() -> Result<()> {
    check_parity("cogvideox_5b_tiny")
}

#[test]
fn cogvideox_5b_i2v_tiny_matches_diffusers() -> Result<()> {
    check_parity("cogvideox_5b_i2v_tiny")
}

/// Half precision runs (norms, softmax and rotary in f32) and stays near the reference
/// (measured 1.0e-3 relative). Only f16 here: candle 0.11.1 has no bf16 matmul on the CPU
/// (bf16 compute needs the CUDA build).
#[test]
fn f16_compute() -> Result<()> {
    for name in FIXTURES {
        let f = load_fixture(name, DType::F16)?;
        let out = f.model.forward(
            &f.inputs["hidden_states"],
            &f.inputs["encoder_hidden_states"],
            &f.inputs["timestep"],
        )?;
        assert_eq!(out.dtype(), DType::F16);
        let err = relative_error(&out, &f.outputs["sample"])?;
        println!("{name} f16: relative error {err:.2e}");
        assert!(err < 1e-2, "{name} f16: {err:.2e}");
    }
    Ok(())
}

/// A trainable copy (fixture weights loaded into a VarMap) whose every Var gets a gradient.
fn every_var_gets_a_gradient(name: &str) -> Result<()> {
    let dir = fixture_dir(KIND, name);
    let cfg: Config = common::config(&dir);
    let seeded = SeededVarMap::new(5);
    let model =
        CogVideoXTransformer3DModel::new(seeded.var_builder(DType::F32, &Device::Cpu), &cfg)?;
    assert_eq!(
        seeded.varmap().all_vars().len(),
        expected_tensors(&cfg)?.len()
    );
    load_into_varmap(&dir, seeded.varmap())?;
    let inputs = load_tensors(dir.join("inputs.safetensors"))?;
    let out = model.forward(
        &inputs["hidden_states"],
        &inputs["encoder_hidden_states"],
        &inputs["timestep"],
    )?;
    let target = Tensor::randn(0f32, 1.0, out.shape(), &Device::Cpu)?;
    let grads = (out - target)?.sqr()?.mean_all()?.backward()?;
    assert_every_var_has_grad(seeded.varmap(), &grads)
}

#[test]
fn every_var_gets_a_gradient_2b_tiny() -> Result<()> {
    every_var_gets_a_gradient("cogvideox_2b_tiny")
}

#[test]
fn every_var_gets_a_gradient_5b_tiny() -> Result<()> {
    every_var_gets_a_gradient("cogvideox_5b_tiny")
}

#[test]
fn every_var_gets_a_gradient_5b_i2v_tiny() -> Result<()> {
    every_var_gets_a_gradient("cogvideox_5b_i2v_tiny")
}

/// Finite differences (f64) of the whole network with respect to the video latents, the text
/// embeddings and two weights (a block's modulation and its query norm), on the fixture
/// models with fewer frames.
#[test]
fn finite_difference_gradients_through_the_whole_model() -> Result<()> {
    let dev = Device::Cpu;
    for (name, (b, f, h, w)) in [
        ("cogvideox_2b_tiny", (2, 2, 4, 4)),
        ("cogvideox_5b_tiny", (2, 2, 4, 6)),
    ] {
        let dir = fixture_dir(KIND, name);
        let cfg: Config = common::config(&dir);
        let weights = load_tensors(dir.join(DIFFUSERS_WEIGHTS))?;
        let x = Tensor::randn(0f64, 1.0, (b, f, cfg.in_channels, h, w), &dev)?;
        let context = Tensor::randn(0f64, 1.0, (b, 3, cfg.text_embed_dim), &dev)?;
        let t = Tensor::new(&[700f64, 20.0], &dev)?;
        let modulation = "transformer_blocks.1.norm1.linear.weight";
        let qk_norm = "transformer_blocks.0.attn1.norm_q.weight";
        let report = check_gradients(
            |xs| {
                let mut w = weights.clone();
                w.insert(modulation.into(), xs[2].clone());
                w.insert(qk_norm.into(), xs[3].clone());
                let model = CogVideoXTransformer3DModel::new(
                    VarBuilder::from_tensors(w, DType::F64, &dev),
                    &cfg,
                )?;
                model.forward(&xs[0], &xs[1], &t)
            },
            &[
                x,
                context,
                weights[modulation].to_dtype(DType::F64)?,
                weights[qk_norm].to_dtype(DType::F64)?,
            ],
            GradCheck {
                max_probes_per_input: 4,
                ..GradCheck::default()
            },
        )?;
        println!("{name} finite differences: {report:?}");
        assert!(
            report.probes == 16 && report.max_abs_numeric > 1e-3,
            "{name}: {report:?}"
        );
    }
    Ok(())
}

/// Writes the fixture folder `name` with its weights changed by `edit` into a fresh temp
/// folder.
fn edited_copy(name: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> Result<TempDir> {
    let src = fixture_dir(KIND, name);
    let tmp = TempDir::new(name);
    std::fs::copy(src.join("config.json"), tmp.0.join("config.json"))?;
    let mut weights = load_tensors(src.join(DIFFUSERS_WEIGHTS))?;
    edit(&mut weights);
    candle_core::safetensors::save(&weights, tmp.0.join(DIFFUSERS_WEIGHTS))?;
    Ok(tmp)
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("adm-cogvideox-{tag}-{}", std::process::id()));
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

fn frozen(dir: &Path, cfg: &Config) -> Result<CogVideoXTransformer3DModel> {
    load_model(dir, None, DType::F32, &Device::Cpu, &[], |vb| {
        CogVideoXTransformer3DModel::new(vb, cfg)
    })
}

#[test]
fn missing_and_mis_shaped_tensors_are_named() -> Result<()> {
    let name = "cogvideox_5b_i2v_tiny";
    let cfg: Config = common::config(&fixture_dir(KIND, name));
    let missing = "transformer_blocks.1.attn1.norm_k.bias";
    let reshaped = "patch_embed.pos_embedding";
    let tmp = edited_copy(name, |w| {
        w.remove(missing);
        w.insert(
            reshaped.into(),
            Tensor::zeros((1, 40, 32), DType::F32, &Device::Cpu).unwrap(),
        );
    })?;
    // Trainable loading reports every problem at once, with both shapes.
    let seeded = SeededVarMap::new(1);
    CogVideoXTransformer3DModel::new(seeded.var_builder(DType::F32, &Device::Cpu), &cfg)?;
    let err = load_into_varmap(&tmp.0, seeded.varmap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("missing tensor `{missing}`"))
            && err.contains(&format!(
                "tensor `{reshaped}` has shape [1, 40, 32], the model expects [1, 56, 32]"
            )),
        "{err}"
    );
    // Frozen loading (and so adm-forward) fails at the first one it meets.
    let err = frozen(&tmp.0, &cfg).unwrap_err().to_string();
    assert!(
        err.contains(&format!("missing tensor `{missing}`")),
        "{err}"
    );
    let tmp = edited_copy(name, |w| {
        w.insert(
            reshaped.into(),
            Tensor::zeros((1, 40, 32), DType::F32, &Device::Cpu).unwrap(),
        );
    })?;
    let err = forward_dir(
        &tmp.0,
        None,
        &load_tensors(fixture_dir(KIND, name).join("inputs.safetensors"))?,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&format!("tensor `{reshaped}` has shape [1, 40, 32]"))
            && err.contains("[1, 56, 32]"),
        "{err}"
    );

    // An unexpected tensor: the 2B model computes its sin-cos table, a checkpoint that
    // stores one is not silently accepted.
    let tmp = edited_copy("cogvideox_2b_tiny", |w| {
        w.insert(
            "patch_embed.pos_embedding".into(),
            Tensor::zeros((1, 56, 16), DType::F32, &Device::Cpu).unwrap(),
        );
    })?;
    let cfg: Config = common::config(&tmp.0);
    let err = frozen(&tmp.0, &cfg).unwrap_err().to_string();
    assert!(
        err.contains("unexpected") && err.contains("patch_embed.pos_embedding"),
        "{err}"
    );
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let f = load_fixture("cogvideox_2b_tiny", DType::F32)?;
    let dev = Device::Cpu;
    let (x, context, t) = (
        &f.inputs["hidden_states"],
        &f.inputs["encoder_hidden_states"],
        &f.inputs["timestep"],
    );
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev);
    // Not 5-D, wrong channels, H not a multiple of the patch size.
    for shape in [
        &[2, 4, 8, 8][..],
        &[2, 3, 5, 8, 8],
        &[2, 3, 4, 7, 8],
        &[2, 3, 4, 0, 8],
    ] {
        let err = f.model.forward(&zeros(shape)?, context, t).unwrap_err();
        assert!(err.to_string().contains("hidden_states"), "{err}");
    }
    // Text width or batch that do not fit.
    for shape in [&[2, 8, 5][..], &[1, 8, 12]] {
        let err = f.model.forward(x, &zeros(shape)?, t).unwrap_err();
        assert!(err.to_string().contains("encoder_hidden_states"), "{err}");
    }
    // Per-sample timesteps of the wrong length.
    let err = f
        .model
        .forward(x, context, &Tensor::new(&[1f32, 2., 3.], &dev)?)
        .unwrap_err();
    assert!(err.to_string().contains("timestep"), "{err}");
    // A single timestep is broadcast over the batch.
    let one = f
        .model
        .forward(x, context, &Tensor::new(&[400f32], &dev)?)?;
    let both = f
        .model
        .forward(x, context, &Tensor::new(&[400f32, 400.], &dev)?)?;
    assert_eq!(relative_error(&one, &both)?, 0.0);
    // adm-forward names inputs it does not know.
    let mut inputs = f.inputs.clone();
    inputs.insert("sample".into(), x.clone());
    let err = forward_dir(&f.dir, None, &inputs, DType::F32, &dev).unwrap_err();
    assert!(err.to_string().contains("\"sample\""), "{err}");
    Ok(())
}

/// The published configs build (without allocating) to the counts diffusers gives
/// (scripts/fixtures_cogvideox.py prints them), and unsupported options are rejected.
#[test]
fn published_configs_have_diffusers_parameter_counts() -> Result<()> {
    for (name, cfg, tensors, params) in [
        ("2b", Config::cogvideox_2b(), 736, 1_693_783_872usize),
        ("5b", Config::cogvideox_5b(), 1024, 5_570_283_072),
    ] {
        let expected = expected_tensors(&cfg)?;
        let count: usize = expected.iter().map(|(_, s)| s.elem_count()).sum();
        assert_eq!((expected.len(), count), (tensors, params), "{name}");
        let json = serde_json::to_string(&cfg).unwrap();
        let back: Config = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg, "{name}");
    }
    let reject = |edit: fn(&mut Config), what: &str| {
        let mut cfg = Config::cogvideox_5b();
        edit(&mut cfg);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(what), "{err}");
    };
    reject(|c| c.patch_size_t = Some(2), "patch_size_t");
    reject(|c| c.ofs_embed_dim = Some(512), "ofs_embed_dim");
    reject(|c| c.activation_fn = "gelu".into(), "activation_fn");
    reject(|c| c.attention_head_dim = 40, "divisible by 16");
    reject(|c| c.patch_size = 0, "`patch_size` must be positive");
    reject(|c| c.sample_width = 1, "sample_width / patch_size");
    reject(
        |c| {
            c.use_rotary_positional_embeddings = false;
            c.use_learned_positional_embeddings = true
        },
        "use_learned_positional_embeddings",
    );
    Ok(())
}

/// The Backbone wrapper: condition by diffusers' argument names, taps as (B, C, F, h, w)
/// maps, the negative prompt from the data, and the v-prediction schedule on 5-D latents.
#[test]
fn backbone_wrapper() -> Result<()> {
    let f = load_fixture("cogvideox_5b_tiny", DType::F32)?;
    let schedule = Schedule::new(&ScheduleConfig::cogvideox_5b())?;
    let backbone = CogVideoXBackbone::new(f.model.clone(), schedule)?;
    let (x, t) = (&f.inputs["hidden_states"], &f.inputs["timestep"]);
    let context = &f.inputs["encoder_hidden_states"];
    let cond = Condition::new().with("encoder_hidden_states", context.clone());
    let out = backbone.forward(x, t, &cond)?;
    assert_parity("backbone forward", &out, &f.outputs["sample"])?;

    let taps = backbone.feature_taps();
    assert_eq!(taps.len(), 2);
    assert!(taps.iter().all(|tap| tap.channels == 32));
    let features = backbone.features(x, t, &cond, &[taps[1].name.clone()])?;
    assert_eq!(features[0].dims(), &[2, 32, 3, 4, 6]);
    assert_parity("backbone tap", &features[0], &f.outputs[&taps[1].name])?;

    // x0 / eps from the v prediction on (B, F, C, H, W) latents: x_t = alpha x0 + sigma eps.
    let (x0, eps) = predict_x0_eps(&backbone, x, t, &cond)?;
    let (alpha, sigma) = backbone.schedule().alpha_sigma(t, 5)?;
    let rebuilt = (x0.broadcast_mul(&alpha)? + eps.broadcast_mul(&sigma)?)?;
    assert!(relative_error(&rebuilt, x)? < 1e-5);

    // No negative prompt in the condition: a clear error. With one equal to the prompt,
    // guidance changes nothing; with another one it does.
    let err = backbone.unconditional(&cond).unwrap_err().to_string();
    assert!(err.contains("negative_encoder_hidden_states"), "{err}");
    let same = cond
        .clone()
        .with("negative_encoder_hidden_states", context.clone());
    assert!(relative_error(&guided_prediction(&backbone, x, t, &same, 6.0)?, &out)? < 1e-5);
    let other = cond.with("negative_encoder_hidden_states", (context * 0.5)?);
    assert!(relative_error(&guided_prediction(&backbone, x, t, &other, 6.0)?, &out)? > 1e-3);

    // Image-to-video checkpoints predict fewer channels than they take; their learned
    // position table fixes the text length and the latent size.
    let i2v = load_fixture("cogvideox_5b_i2v_tiny", DType::F32)?;
    let (x, context, t) = (
        &i2v.inputs["hidden_states"],
        &i2v.inputs["encoder_hidden_states"],
        &i2v.inputs["timestep"],
    );
    let err = i2v
        .model
        .forward(x, &context.narrow(1, 0, 5)?, t)
        .unwrap_err();
    assert!(err.to_string().contains("max_text_seq_length"), "{err}");
    let err = i2v
        .model
        .forward(&x.narrow(3, 0, 4)?, context, t)
        .unwrap_err();
    assert!(err.to_string().contains("sample size 8x8"), "{err}");
    let err = CogVideoXBackbone::new(i2v.model, Schedule::new(&ScheduleConfig::cogvideox())?)
        .unwrap_err()
        .to_string();
    assert!(err.contains("in_channels (8)"), "{err}");
    Ok(())
}
