//! Collection from a pretrained pipeline teacher (a [`CollectConfig`]) through the shared,
//! resumable, rank-splittable `adm_train::collect::collect` loop.
//!
//! Pair `i` samples from noise `noise_for_index(seed, i)` with prompt `prompts[i % len]`, so
//! ranks, resumed runs and merges reproduce an uninterrupted run. Stored per pair: the noise,
//! the teacher's latents, the prompt text and the conditions `encoder_hidden_states`,
//! `text_embeds` and `time_ids` (the negative prompt's embeddings are not stored: they are the
//! same for every pair and follow from the teacher identity in the manifest).

use std::collections::BTreeMap;
use std::path::Path;

use adm_data::read_prompts;
use adm_data::store::{xxh64, ConditionSpec, Partition, StoreSpec, StoreWriter};
use adm_diffusion::ScheduleConfig;
use adm_models::loading::resolve_model;
use adm_models::sdxl::{LoadOptions, SdxlTeacher, TimeIds};
use adm_models::unet_2d::{ENCODER_HIDDEN_STATES, TEXT_EMBEDS, TIME_IDS};
use adm_train::collect::collect;
use anyhow::{bail, Context, Result};
use candle_core::Device;

use crate::config::{CollectConfig, PairsConfig, TeacherConfig, TeacherKind};

/// Collects (or resumes) the pairs of `partition` into the store `dir`; returns the pairs
/// the store holds.
pub fn collect_teacher_pairs(
    config: &CollectConfig,
    dir: &Path,
    partition: Partition,
) -> Result<usize> {
    match config.teacher.kind {
        TeacherKind::Sdxl => collect_sdxl(&config.teacher, &config.ode_pairs, dir, partition),
    }
}

/// The solver adm-diffusion's `sample_ode` amounts to on a schedule.
fn solver_for(schedule: &ScheduleConfig) -> &'static str {
    match schedule {
        ScheduleConfig::Vp { .. } => "ddim",
        ScheduleConfig::Flow { .. } => "euler",
    }
}

fn collect_sdxl(
    pipeline: &TeacherConfig,
    pairs: &PairsConfig,
    dir: &Path,
    partition: Partition,
) -> Result<usize> {
    let prompts = read_prompts(&pairs.prompts).context("config key `ode_pairs.prompts`")?;
    let root = resolve_model(&pipeline.model, pipeline.revision.as_deref())
        .context("config key `teacher.model`")?;
    // The workspace builds candle without CUDA, so the teacher runs on the CPU.
    let device = Device::Cpu;
    let teacher = SdxlTeacher::load(
        &root,
        &LoadOptions {
            variant: pipeline.variant.clone(),
            dtype: pipeline.dtype.candle(),
            device: device.clone(),
        },
    )
    .with_context(|| format!("SDXL pipeline {}", root.display()))?;
    let schedule = teacher.backbone.schedule.config().clone();
    let solver = solver_for(&schedule);
    if pairs.solver != solver {
        bail!(
            "config key `ode_pairs.solver`: `{}` is not available for this teacher's schedule; adm-diffusion samples it with `{solver}`",
            pairs.solver
        );
    }
    let size = pairs.resolution.size();
    let latent = teacher
        .latent_shape(size)
        .context("config key `ode_pairs.resolution`")?
        .to_vec();
    let time_ids = TimeIds::for_size(size);
    let negative = teacher.encode_negative(pipeline.negative_prompt.as_deref())?;

    let per_pair = |shape: &[usize]| ConditionSpec {
        shape: shape[1..].to_vec(),
        dtype: pairs.dtype,
    };
    let conditions = BTreeMap::from([
        (
            ENCODER_HIDDEN_STATES.to_string(),
            per_pair(negative.encoder_hidden_states.dims()),
        ),
        (
            TEXT_EMBEDS.to_string(),
            per_pair(negative.text_embeds.dims()),
        ),
        (TIME_IDS.to_string(), per_pair(&[1, 6])),
    ]);
    // A hub snapshot folder is named by its commit; a local folder has no revision.
    let revision = match Path::new(&pipeline.model).is_dir() {
        true => "local-folder".to_string(),
        false => root
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned()),
    };
    let teacher_id = format!(
        "sdxl model={} revision={revision} variant={} dtype={:?} negative_prompt={:?} force_zeros_for_empty_prompt={} time_ids={:?} prompts={} ({} prompts, xxh64 {:016x})",
        pipeline.model,
        pipeline.variant.as_deref().unwrap_or("none"),
        pipeline.dtype,
        pipeline.negative_prompt,
        teacher.force_zeros_for_empty_prompt,
        time_ids.values(),
        pairs.prompts.display(),
        prompts.len(),
        xxh64(prompts.join("\n").as_bytes()),
    );
    let spec = StoreSpec {
        teacher: teacher_id,
        schedule: serde_json::to_string(&schedule)?,
        solver: solver.to_string(),
        steps: pairs.steps,
        cfg_scale: pairs.cfg_scale,
        seed: pairs.seed,
        dtype: pairs.dtype,
        noise_shape: latent.clone(),
        sample_shape: latent,
        conditions,
        shard_size: pairs.shard_size,
        partition,
    };
    let writer = StoreWriter::open(dir, spec)
        .with_context(|| format!("ODE-pair store {}", dir.display()))?;
    collect(
        writer,
        pairs.count,
        pairs.batch_size,
        &device,
        |indices, noise| {
            let batch: Vec<&str> = indices
                .iter()
                .map(|&i| prompts[(i % prompts.len() as u64) as usize].as_str())
                .collect();
            let embeds = teacher.encode_prompts(&batch)?;
            let cond = teacher.condition(&embeds, &negative, &time_ids)?;
            let samples = teacher.sample(noise, &cond, pairs.steps, pairs.cfg_scale)?;
            let stored = [ENCODER_HIDDEN_STATES, TEXT_EMBEDS, TIME_IDS]
                .iter()
                .map(|&name| Ok((name.to_string(), cond.get(name)?.clone())))
                .collect::<Result<Vec<_>>>()?;
            Ok((
                samples,
                stored,
                batch.iter().map(|p| p.to_string()).collect(),
            ))
        },
    )
}
