//! Running a recipe on real weights (`adm-train --config RECIPE`): its stages in order on the
//! training engine, each stage in `run_dir/<stage name>` with its own checkpoints, metrics
//! and sample grids.
//!
//! - The teacher (and the VAE and pixel encoder ADP reads through) are frozen, loaded in the
//!   recipe's `precision` and seen from the f32 training graph through
//!   [`adm_models::InDtype`]. The generator, fake score and heads are f32 Vars (master
//!   weights); `precision` is also every stage's `engine.compute_dtype`, so in bf16 / f16 the
//!   generator and fake score compute through a copy in that dtype (the heads in f32). A stage
//!   may leave `compute_dtype` out (or f32) or repeat `model.precision`; anything else is an
//!   error.
//! - Every stage's generator starts from the previous stage's final generator (the first
//!   from the teacher); fake scores start from the teacher (METHOD.md).
//! - A stage resumes from its latest checkpoint; a finished stage is not trained again, its
//!   final generator is read back and handed on. So a killed run continues where it stopped.
//! - ADP / MSE read the ODE-pair store `data.ode_pairs`; ADM / DMD draw the stored conditions
//!   of `data.conditions` (a store `adm-collect-ode-pairs` wrote) and add the encoded
//!   negative prompt `data.negative_prompt` that the teacher's CFG needs.
//!
//! Families: SDXL (the pair collector writes its stores). SD3 and CogVideoX have backbones
//! and dry runs but no collector for their conditions yet, so running them is an error
//! saying so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use adm_data::store::StoreReader;
use adm_models::loading::{read_json, resolve_model, ModelIndex, Weights};
use adm_models::sdxl::{LoadOptions, SdxlTeacher};
use adm_models::unet_2d::{
    self, UNet2DConditionModel, UNetBackbone, NEGATIVE_ENCODER_HIDDEN_STATES, NEGATIVE_TEXT_EMBEDS,
};
use adm_models::{Backbone, Condition, InDtype};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::engine::{ConditionSource, Engine, EngineConfig, EngineData, EngineNets};
use crate::pairs::PairSource;
use crate::recipe::{Family, Precision, Recipe, Stage};
use crate::student::Trainable;

/// What one stage left behind.
#[derive(Debug, Clone)]
pub struct StageOutcome {
    pub name: String,
    /// Generator steps done (the stage's `steps`).
    pub steps: usize,
    /// The final checkpoint (generator, its EMA, ... as diffusers-layout folders).
    pub checkpoint: PathBuf,
}

/// Runs every stage of `recipe` on `device` and returns where each ended.
pub fn run(recipe: &Recipe, device: &Device) -> Result<Vec<StageOutcome>> {
    match recipe.model.family {
        Family::Sdxl => {}
        other => bail!(
            "config key `model.family`: training {other:?} is not wired yet: no collector \
             writes its prompt conditions (adm-collect-ode-pairs has teacher kind sdxl); \
             `--dry-run` builds its networks"
        ),
    }
    let root = resolve_model(&recipe.model.pretrained, None).with_context(|| {
        format!(
            "config key `model.pretrained` = {:?}",
            recipe.model.pretrained
        )
    })?;
    let dtype = recipe.model.precision.dtype();
    let model = SdxlModel::load(&root, dtype, device, recipe.data.negative_prompt.as_deref())?;
    let mut generator = model.teacher_weights(device)?;
    let mut outcomes = Vec::new();
    for (i, stage) in recipe.stages.iter().enumerate() {
        let (weights, outcome) = run_stage(recipe, i, stage, &model, &root, generator, device)
            .with_context(|| format!("stage `{}`", stage.name))?;
        tracing::info!(stage = %stage.name, checkpoint = %outcome.checkpoint.display(), "stage done");
        outcomes.push(outcome);
        generator = weights;
    }
    Ok(outcomes)
}

/// The frozen SDXL teacher and what building its trainable copies takes.
struct SdxlModel {
    teacher: Arc<dyn Backbone>,
    unet_dir: PathBuf,
    config: unet_2d::Config,
    schedule: adm_diffusion::Schedule,
    /// The encoded negative prompt (batch 1), added to every ADM / DMD condition.
    negative: Condition,
}

impl SdxlModel {
    fn load(
        root: &Path,
        dtype: DType,
        device: &Device,
        negative_prompt: Option<&str>,
    ) -> Result<Self> {
        let options = LoadOptions {
            variant: None,
            dtype,
            device: device.clone(),
        };
        let teacher = SdxlTeacher::load(root, &options)
            .with_context(|| format!("SDXL pipeline {}", root.display()))?;
        let negative = teacher.encode_negative(negative_prompt)?;
        let negative = Condition::new()
            .with(
                NEGATIVE_ENCODER_HIDDEN_STATES,
                negative.encoder_hidden_states,
            )
            .with(NEGATIVE_TEXT_EMBEDS, negative.text_embeds);
        let unet_dir = ModelIndex::read(root)?.component_dir(root, "unet")?;
        let backbone = teacher.backbone;
        Ok(Self {
            config: backbone.unet.config().clone(),
            schedule: backbone.schedule.clone(),
            teacher: Arc::new(InDtype::new(backbone, dtype)),
            unet_dir,
            negative,
        })
    }

    /// The teacher's weights in f32: the start of the generator and of every fake score.
    fn teacher_weights(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let weights = Weights::open(&self.unet_dir, None)?;
        weights
            .names()
            .into_iter()
            .map(|name| {
                let t = weights.load(&name, None, device)?.to_dtype(DType::F32)?;
                Ok((name, t))
            })
            .collect()
    }

    fn trainable(
        &self,
        seed: u64,
        init: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Trainable<UNetBackbone>> {
        let (config, schedule) = (self.config.clone(), self.schedule.clone());
        let build = move |vb: VarBuilder<'static>| -> candle_core::Result<UNetBackbone> {
            Ok(UNetBackbone::new(
                UNet2DConditionModel::new(vb, &config)?,
                schedule.clone(),
            ))
        };
        Ok(Trainable::from_weights(seed, device, init, build)?)
    }
}

fn run_stage(
    recipe: &Recipe,
    index: usize,
    stage: &Stage,
    model: &SdxlModel,
    root: &Path,
    generator: HashMap<String, Tensor>,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, StageOutcome)> {
    let precision = recipe.model.precision;
    if ![Precision::F32, precision].contains(&stage.engine.compute_dtype) {
        bail!(
            "config key `stages[{index}].engine.compute_dtype` = {:?}: a recipe computes in \
             `model.precision` = {precision:?} (leave the key out)",
            stage.engine.compute_dtype
        );
    }
    let config = &EngineConfig {
        compute_dtype: precision,
        ..stage.engine.clone()
    };
    let method = config.method;
    let seed = adm_nn::derive_seed(config.seed, &stage.name);
    let fake_score = match method.uses_fake_score() {
        true => Some(model.trainable(
            adm_nn::derive_seed(seed, "fake-score"),
            &model.teacher_weights(device)?,
            device,
        )?),
        false => None,
    };
    let pixel = match method.uses_pairs() && config.adp.lambda_pixel > 0.0 {
        true => {
            let section = recipe.pixel_discriminator.as_ref().context(
                "config section `pixel_discriminator` is needed by ADP with lambda_pixel > 0",
            )?;
            Some(recipe.pixel_nets(section, root, &config.adp.pixel_layers, device)?)
        }
        false => None,
    };
    let store = |key: &str, path: &Option<PathBuf>| -> Result<PairSource> {
        let path = path
            .as_ref()
            .with_context(|| format!("config key `{key}` is needed by this stage"))?;
        let reader = StoreReader::open(path).with_context(|| format!("config key `{key}`"))?;
        PairSource::new(Arc::new(reader), adm_nn::derive_seed(seed, "data"), device)
    };
    let data: EngineData = if method.uses_pairs() {
        store("data.ode_pairs", &recipe.data.ode_pairs)?.into()
    } else {
        let source = WithNegatives {
            inner: store("data.conditions", &recipe.data.conditions)?,
            negative: model.negative.clone(),
        };
        Box::new(source).into()
    };
    let nets = EngineNets {
        teacher: model.teacher.clone(),
        generator: model.trainable(adm_nn::derive_seed(seed, "generator"), &generator, device)?,
        fake_score,
        pixel,
        net_config: Some(read_json(&model.unet_dir.join("config.json"))?),
    };
    let dir = recipe.run_dir.join(&stage.name);
    let mut engine = Engine::new(config.clone(), &dir, nets, data)
        .with_context(|| format!("config key `stages[{index}].engine`"))?;
    if let Some(step) = engine.resume()? {
        tracing::info!(stage = %stage.name, step, "resuming");
    }
    engine.train(config.steps)?;
    let checkpoint = engine
        .checkpoints()
        .latest()?
        .context("the stage wrote no checkpoint")?;
    Ok((
        engine.generator_weights().0,
        StageOutcome {
            name: stage.name.clone(),
            steps: engine.step(),
            checkpoint,
        },
    ))
}

/// Stored conditions plus the encoded negative prompt, repeated over the batch, under the
/// `negative_*` names the teacher's classifier-free guidance reads.
struct WithNegatives<S> {
    inner: S,
    negative: Condition,
}

impl<S> WithNegatives<S> {
    fn add(&self, cond: Condition) -> Result<Condition> {
        let batch = match cond.iter().next() {
            Some((_, t)) => t.dim(0)?,
            None => bail!("the condition store has no condition tensors"),
        };
        let mut out = cond;
        for (name, t) in self.negative.iter() {
            let mut dims = t.dims().to_vec();
            dims[0] = batch;
            out = out.with(name, t.broadcast_as(dims)?.contiguous()?);
        }
        Ok(out)
    }
}

impl<S: ConditionSource> ConditionSource for WithNegatives<S> {
    fn next(&mut self, n: usize) -> Result<Condition> {
        let cond = self.inner.next(n)?;
        self.add(cond)
    }

    fn fixed(&self, n: usize) -> Result<Condition> {
        self.add(self.inner.fixed(n)?)
    }

    fn cursor(&self) -> u64 {
        self.inner.cursor()
    }

    fn seek(&mut self, cursor: u64) -> Result<()> {
        self.inner.seek(cursor)
    }
}
