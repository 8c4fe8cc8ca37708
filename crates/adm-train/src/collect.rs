//! Teacher sampling into the ODE-pair store: the code path shared by the toy pipeline and
//! the `adm-collect-ode-pairs` binary.
//!
//! Pair `i`'s noise comes from (seed, i) alone (`adm_data::store::noise_for_index`) and so
//! does its condition, so a collection split across ranks, or killed and resumed, writes
//! exactly the pairs of one uninterrupted run.

use adm_data::store::{
    noise_for_index, ConditionSpec, PairBatch, Partition, StoreDtype, StoreReader, StoreSpec,
    StoreWriter,
};
use adm_models::toy_mlp::CLASS_LABELS;
use anyhow::{Context as _, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::context::{class_condition, progress, ToyContext};
use crate::teacher::{teacher_fingerprint, Teacher};

/// Collects the pairs of the writer's partition that it does not hold yet (indices below
/// `count`), then commits the last shard. `sample` turns a batch of pair indices and their
/// noise into (teacher samples, named conditions, prompts). Returns the pairs in the store.
pub fn collect<F>(
    mut writer: StoreWriter,
    count: u64,
    batch_size: usize,
    device: &Device,
    mut sample: F,
) -> Result<usize>
where
    F: FnMut(&[u64], &Tensor) -> Result<(Tensor, Vec<(String, Tensor)>, Vec<String>)>,
{
    let spec = writer.spec().clone();
    let bar = progress("ode-pairs", spec.partition.count_below(count) as usize);
    bar.set_position(writer.committed() as u64);
    loop {
        let indices = writer.next_indices(batch_size, count);
        if indices.is_empty() {
            break;
        }
        let mut values =
            Vec::with_capacity(indices.len() * spec.noise_shape.iter().product::<usize>());
        for &i in &indices {
            values.extend(noise_for_index(spec.seed, i, &spec.noise_shape));
        }
        let mut shape = vec![indices.len()];
        shape.extend(&spec.noise_shape);
        let noise = Tensor::from_vec(values, shape, device)?;
        let (samples, conditions, prompts) = sample(&indices, &noise)?;
        bar.inc(indices.len() as u64);
        writer.append(PairBatch {
            noise,
            sample: samples,
            conditions,
            prompts,
            indices,
        })?;
    }
    let stored = writer.finish()?;
    bar.finish();
    Ok(stored)
}

/// The class of toy pair `index`, drawn from the class prior with a generator seeded by
/// (seed, index).
fn toy_class(ctx: &ToyContext, seed: u64, index: u64) -> u32 {
    let mut rng = StdRng::seed_from_u64(adm_nn::derive_seed(seed, &format!("pair-class-{index}")));
    ctx.mixture.sample(1, &mut rng).classes[0]
}

/// The store spec of the toy's pairs for one partition of the collection.
pub fn toy_store_spec(ctx: &ToyContext, partition: Partition) -> StoreSpec {
    let c = &ctx.config;
    let class_labels = ConditionSpec {
        shape: vec![],
        dtype: StoreDtype::U32,
    };
    StoreSpec {
        teacher: format!("adm toy-mlp {}", teacher_fingerprint(ctx)),
        schedule: serde_json::to_string(&c.schedule).expect("schedules serialise"),
        solver: "ddim".to_string(),
        steps: c.teacher.sampling_steps,
        cfg_scale: c.teacher.cfg_scale,
        seed: adm_nn::derive_seed(c.seed, "ode-pairs"),
        dtype: StoreDtype::F32,
        noise_shape: vec![ctx.model.in_channels],
        sample_shape: vec![ctx.model.in_channels],
        conditions: [(CLASS_LABELS.to_string(), class_labels)].into(),
        shard_size: c.ode_pairs.shard_size,
        partition,
    }
}

/// Collects (or resumes) the toy's ODE pairs into `dir` and opens them for reading.
pub fn collect_toy_pairs_into(
    ctx: &ToyContext,
    teacher: &Teacher,
    dir: &std::path::Path,
    partition: Partition,
) -> Result<StoreReader> {
    let spec = toy_store_spec(ctx, partition);
    let seed = spec.seed;
    let writer = StoreWriter::open(dir, spec)
        .with_context(|| format!("ODE-pair store {}", dir.display()))?;
    let count = ctx.config.ode_pairs.count as u64;
    collect(
        writer,
        count,
        ctx.config.ode_pairs.batch_size,
        &ctx.device,
        |indices, noise| {
            let classes: Vec<u32> = indices.iter().map(|&i| toy_class(ctx, seed, i)).collect();
            let labels = Tensor::new(classes.as_slice(), &ctx.device)?;
            let samples = teacher.sample(ctx, noise, &class_condition(labels.clone()))?;
            let prompts = classes.iter().map(|c| format!("class {c}")).collect();
            Ok((samples, vec![(CLASS_LABELS.to_string(), labels)], prompts))
        },
    )?;
    Ok(StoreReader::open(dir)?)
}

/// The pipeline's pairs: `run_dir/ode-pairs`, whole.
pub fn collect_toy_pairs(ctx: &ToyContext, teacher: &Teacher) -> Result<StoreReader> {
    collect_toy_pairs_into(ctx, teacher, &ctx.path("ode-pairs"), Partition::default())
}
