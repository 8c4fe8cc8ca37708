//! Gradient and behaviour tests of the toy backbone and the discriminators.

use std::collections::HashMap;
use std::sync::Arc;

use adm_diffusion::{Schedule, ScheduleConfig};
use adm_models::toy_mlp::CLASS_LABELS;
use adm_models::DiscriminatorHeads;
use adm_models::{
    copy_weights, frozen_var_builder, guided_prediction, varmap_tensors, Backbone, Condition,
    FeatureExtractor, HeadSet, LatentDiscriminator, PixelDiscriminator, RandomFeatureMlp, ToyMlp,
    ToyMlpConfig,
};
use adm_nn::{assert_every_var_has_grad, check_gradients, GradCheck, SeededVarMap};
use candle_core::{DType, Device, Result, Tensor};

fn config() -> ToyMlpConfig {
    ToyMlpConfig {
        in_channels: 2,
        hidden_size: 8,
        num_blocks: 2,
        time_embed_dim: 4,
        num_classes: 3,
    }
}

fn schedule() -> Schedule {
    Schedule::new(&ScheduleConfig::sdxl()).unwrap()
}

fn classes(ids: &[u32]) -> Result<Condition> {
    Ok(Condition::new().with(CLASS_LABELS, Tensor::new(ids, &Device::Cpu)?))
}

fn inputs(dtype: DType) -> Result<(Tensor, Tensor)> {
    let x =
        Tensor::new(&[[0.5f32, -1.0], [1.5, 0.25], [-0.3, 0.8]], &Device::Cpu)?.to_dtype(dtype)?;
    let t = Tensor::new(&[10f32, 500., 990.], &Device::Cpu)?;
    Ok((x, t))
}

#[test]
fn every_toy_mlp_var_gets_a_gradient() -> Result<()> {
    let vars = SeededVarMap::new(1);
    let net = ToyMlp::new(
        vars.var_builder(DType::F32, &Device::Cpu),
        &config(),
        schedule(),
    )?;
    let (x, t) = inputs(DType::F32)?;
    let loss = net
        .forward(&x, &t, &classes(&[0, 1, 3])?)?
        .sqr()?
        .sum_all()?;
    assert_every_var_has_grad(vars.varmap(), &loss.backward()?)
}

#[test]
fn toy_mlp_input_gradient_matches_finite_differences() -> Result<()> {
    let vars = SeededVarMap::new(2);
    let net = ToyMlp::new(
        vars.var_builder(DType::F64, &Device::Cpu),
        &config(),
        schedule(),
    )?;
    let (x, t) = inputs(DType::F64)?;
    let cond = classes(&[0, 2, 1])?;
    let report = check_gradients(
        |xs| net.forward(&xs[0], &t, &cond),
        &[x],
        GradCheck::default(),
    )?;
    assert_eq!(report.probes, 6);
    Ok(())
}

#[test]
fn features_are_the_block_outputs_and_bad_taps_are_named() -> Result<()> {
    let vars = SeededVarMap::new(3);
    let net = ToyMlp::new(
        vars.var_builder(DType::F32, &Device::Cpu),
        &config(),
        schedule(),
    )?;
    let (x, t) = inputs(DType::F32)?;
    let cond = classes(&[0, 1, 2])?;
    let taps = vec!["blocks.1".to_string(), "blocks.0".to_string()];
    let features = net.features(&x, &t, &cond, &taps)?;
    assert_eq!(features.len(), 2);
    assert_eq!(features[0].dims(), &[3, 8]);
    // Tap order is honoured: blocks.0 differs from blocks.1.
    let diff = (&features[0] - &features[1])?
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    assert!(diff > 0.0);
    let err = net
        .features(&x, &t, &cond, &["blocks.7".to_string()])
        .unwrap_err();
    assert!(err.to_string().contains("blocks.7"), "{err}");
    let err = net.forward(&x, &t, &classes(&[0, 9, 1])?).unwrap_err();
    assert!(err.to_string().contains("class 9"), "{err}");
    Ok(())
}

#[test]
fn guidance_scale_one_is_the_conditional_prediction_and_scale_extrapolates() -> Result<()> {
    let vars = SeededVarMap::new(4);
    let net = ToyMlp::new(
        vars.var_builder(DType::F64, &Device::Cpu),
        &config(),
        schedule(),
    )?;
    let (x, t) = inputs(DType::F64)?;
    let cond = classes(&[0, 1, 2])?;
    let conditional = net.forward(&x, &t, &cond)?;
    let unconditional = net.forward(&x, &t, &net.unconditional(&cond)?)?;
    let guided = guided_prediction(&net, &x, &t, &cond, 3.0)?;
    let expected = (&unconditional + ((&conditional - &unconditional)? * 3.0)?)?;
    let err = (guided - expected)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(err < 1e-12, "{err}");
    let same = guided_prediction(&net, &x, &t, &cond, 1.0)?;
    assert_eq!(same.to_vec2::<f64>()?, conditional.to_vec2::<f64>()?);
    Ok(())
}

#[test]
fn head_set_gradients_match_finite_differences() -> Result<()> {
    let vars = SeededVarMap::new(5);
    let heads = HeadSet::new(&[3, 2], 4, vars.var_builder(DType::F64, &Device::Cpu))?;
    let a = Tensor::new(&[[0.1f64, -0.4, 0.9], [1.1, 0.2, -0.7]], &Device::Cpu)?;
    let b = Tensor::new(&[[0.3f64, -0.2], [-1.0, 0.5]], &Device::Cpu)?;
    let report = check_gradients(|xs| heads.logits(xs), &[a, b], GradCheck::default())?;
    assert_eq!(report.probes, 10);
    Ok(())
}

#[test]
fn latent_discriminator_trains_heads_only_and_passes_gradient_to_its_input() -> Result<()> {
    let teacher_vars = SeededVarMap::new(6);
    ToyMlp::new(
        teacher_vars.var_builder(DType::F32, &Device::Cpu),
        &config(),
        schedule(),
    )?;
    let teacher = ToyMlp::new(
        frozen_var_builder(teacher_vars.varmap(), DType::F32, &Device::Cpu)?,
        &config(),
        schedule(),
    )?;
    let heads = SeededVarMap::new(7);
    let taps = vec!["blocks.0".to_string(), "blocks.1".to_string()];
    let discriminator = LatentDiscriminator::new(
        Arc::new(teacher),
        &taps,
        4,
        heads.var_builder(DType::F32, &Device::Cpu),
    )?;
    let (x, t) = inputs(DType::F32)?;
    let x = candle_core::Var::from_tensor(&x)?;
    let logits = discriminator.logits(x.as_tensor(), &t, &classes(&[0, 1, 2])?)?;
    assert_eq!(logits.dims(), &[3]);
    let grads = logits.sum_all()?.backward()?;
    assert_every_var_has_grad(heads.varmap(), &grads)?;
    assert!(
        grads.get(x.as_tensor()).is_some(),
        "no gradient reached the discriminator input"
    );
    for var in teacher_vars.varmap().all_vars() {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "the frozen teacher received a gradient"
        );
    }
    let err = LatentDiscriminator::new(
        Arc::new(ToyMlp::new(
            teacher_vars.var_builder(DType::F32, &Device::Cpu),
            &config(),
            schedule(),
        )?),
        &["mid".to_string()],
        4,
        heads.var_builder(DType::F32, &Device::Cpu),
    )
    .err()
    .expect("an unknown tap must fail");
    assert!(err.to_string().contains("mid"), "{err}");
    Ok(())
}

#[test]
fn pixel_discriminator_every_head_var_gets_a_gradient() -> Result<()> {
    let backbone_vars = SeededVarMap::new(8);
    RandomFeatureMlp::new(2, 6, 2, backbone_vars.var_builder(DType::F32, &Device::Cpu))?;
    let extractor = RandomFeatureMlp::new(
        2,
        6,
        2,
        frozen_var_builder(backbone_vars.varmap(), DType::F32, &Device::Cpu)?,
    )?;
    assert_eq!(extractor.feature_channels(), vec![6, 6]);
    let heads = SeededVarMap::new(9);
    let discriminator = PixelDiscriminator::new(
        Arc::new(extractor),
        4,
        heads.var_builder(DType::F32, &Device::Cpu),
    )?;
    let (x, _) = inputs(DType::F32)?;
    let grads = discriminator.logits(&x)?.sum_all()?.backward()?;
    assert_every_var_has_grad(heads.varmap(), &grads)
}

#[test]
fn copy_weights_copies_and_names_bad_tensors() -> Result<()> {
    let source = SeededVarMap::new(10);
    ToyMlp::new(
        source.var_builder(DType::F32, &Device::Cpu),
        &config(),
        schedule(),
    )?;
    let target = SeededVarMap::new(11);
    ToyMlp::new(
        target.var_builder(DType::F32, &Device::Cpu),
        &config(),
        schedule(),
    )?;
    let weights = varmap_tensors(source.varmap());
    copy_weights(&weights, target.varmap())?;
    let copied = varmap_tensors(target.varmap());
    for (name, tensor) in &weights {
        assert_eq!(
            tensor.flatten_all()?.to_vec1::<f32>()?,
            copied[name].flatten_all()?.to_vec1::<f32>()?,
            "{name}"
        );
    }

    let mut wrong_shape: HashMap<String, Tensor> = weights.clone();
    wrong_shape.insert(
        "proj_in.weight".into(),
        Tensor::zeros((3, 3), DType::F32, &Device::Cpu)?,
    );
    let err = copy_weights(&wrong_shape, target.varmap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("proj_in.weight") && err.contains("[3, 3]") && err.contains("[8, 2]"),
        "{err}"
    );

    let mut missing = weights.clone();
    missing.remove("proj_out.bias");
    let err = copy_weights(&missing, target.varmap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing tensor `proj_out.bias`"), "{err}");

    let mut extra = weights;
    extra.insert(
        "extra.weight".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu)?,
    );
    let err = copy_weights(&extra, target.varmap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("extra.weight"), "{err}");
    Ok(())
}

#[test]
fn condition_errors_name_the_missing_tensor() -> Result<()> {
    let cond = classes(&[0])?;
    let err = cond.get("encoder_hidden_states").unwrap_err().to_string();
    assert!(
        err.contains("encoder_hidden_states") && err.contains(CLASS_LABELS),
        "{err}"
    );
    let both = cond.cat(&classes(&[2])?)?;
    assert_eq!(both.get(CLASS_LABELS)?.to_vec1::<u32>()?, vec![0, 2]);
    Ok(())
}
