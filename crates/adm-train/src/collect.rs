//! Teacher sampling into the ODE-pair store: the code path shared by the toy pipeline and
//! the `adm-collect-ode-pairs` binary.
//!
//! Pair `i`'s noise comes from (seed, i) alone (`adm_data::store::noise_for_index`) and so
//! does its condition, so a collection split across ranks, or killed and resumed, writes
//! exactly the pairs of one uninterrupted run.

use adm_data::store::{noise_for_index, PairBatch, StoreReader, StoreSpec, StoreWriter};
use anyhow::{Context as _, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::context::{class_condition, progress, ToyContext};
use crate::teacher::{teacher_fingerprint, Teacher};

/// Which pairs this process collects: indices `i < count` with `i % world_size == rank`.
#[derive(Debug, Clone, Copy)]
pub struct Shard {
    pub rank: usize,
    pub world_size: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { rank: 0, world_size: 1 };
}

/// Collects the pairs of `shard` that `writer` does not hold yet. `sample` turns a batch of
/// pair indices and their noise into (teacher samples, named conditions, prompts).
pub fn collect<F>(writer: &mut StoreWriter, count: u64, batch_size: usize, shard: Shard, device: &Device, mut sample: F) -> Result<()>
where
    F: FnMut(&[u64], &Tensor) -> Result<(Tensor, Vec<(String, Tensor)>, Vec<String>)>,
{
    let spec = writer.spec().clone();
    let mine: Vec<u64> = (0..count)
        .filter(|i| *i as usize % shard.world_size == shard.rank)
        .collect();
    let done = writer.next_index() as usize;
    let todo = &mine[done.min(mine.len())..];
    let bar = progress("ode-pairs", mine.len());
    bar.set_position(done.min(mine.len()) as u64);
    for indices in todo.chunks(batch_size) {
        let mut values = Vec::with_capacity(indices.len() * spec.noise_shape.iter().product::<usize>());
        for &i in indices {
            values.extend(noise_for_index(spec.seed, i, &spec.noise_shape));
        }
        let mut shape = vec![indices.len()];
        shape.extend(&spec.noise_shape);
        let noise = Tensor::from_vec(values, shape, device)?;
        let (samples, conditions, prompts) = sample(indices, &noise)?;
        writer.append(PairBatch {
            noise,
            sample: samples,
            conditions,
            prompts,
            indices: indices.to_vec(),
        })?;
        bar.inc(indices.len() as u64);
    }
    writer.finish()?;
    bar.finish();
    Ok(())
}

/// The class of toy pair `index`, drawn from the class prior with a generator seeded by
/// (seed, index).
fn toy_class(ctx: &ToyContext, seed: u64, index: u64) -> u32 {
    let mut rng = StdRng::seed_from_u64(adm_nn::derive_seed(seed, &format!("pair-class-{index}")));
    ctx.mixture.sample(1, &mut rng).classes[0]
}

/// The store spec of the toy's pairs.
pub fn toy_store_spec(ctx: &ToyContext) -> StoreSpec {
    let c = &ctx.config;
    StoreSpec::new(
        format!("toy-mlp {}", teacher_fingerprint(ctx)),
        serde_json::to_string(&c.schedule).expect("schedules serialise"),
        "ddim".to_string(),
        c.teacher.sampling_steps,
        c.teacher.cfg_scale,
        adm_nn::derive_seed(c.seed, "ode-pairs"),
        adm_data::store::StorageDtype::F32,
        vec![ctx.model.in_channels],
        vec![ctx.model.in_channels],
        vec![(adm_models::toy_mlp::CLASS_LABELS.to_string(), vec![], candle_core::DType::U32)],
        c.ode_pairs.shard_size,
    )
}

/// Collects (or resumes) the toy's ODE pairs into `dir` and opens them for reading.
pub fn collect_toy_pairs_into(ctx: &ToyContext, teacher: &Teacher, dir: &std::path::Path, shard: Shard) -> Result<StoreReader> {
    let spec = toy_store_spec(ctx);
    let seed = spec.seed;
    let mut writer = StoreWriter::open(dir, spec).with_context(|| format!("ODE-pair store {}", dir.display()))?;
    let count = ctx.config.ode_pairs.count as u64;
    collect(&mut writer, count, ctx.config.ode_pairs.batch_size, shard, &ctx.device, |indices, noise| {
        let classes: Vec<u32> = indices.iter().map(|&i| toy_class(ctx, seed, i)).collect();
        let labels = Tensor::new(classes.as_slice(), &ctx.device)?;
        let samples = teacher.sample(ctx, noise, &class_condition(labels.clone()))?;
        let prompts = classes.iter().map(|c| format!("class {c}")).collect();
        Ok((samples, vec![(adm_models::toy_mlp::CLASS_LABELS.to_string(), labels)], prompts))
    })?;
    Ok(StoreReader::open(dir)?)
}

/// The pipeline's pairs: `run_dir/ode-pairs`, whole.
pub fn collect_toy_pairs(ctx: &ToyContext, teacher: &Teacher) -> Result<StoreReader> {
    collect_toy_pairs_into(ctx, teacher, &ctx.path("ode-pairs"), Shard::WHOLE)
}
