//! Teacher sampling into the ODE-pair store: the code path shared by the toy pipeline and
//! the `adm-collect-ode-pairs` binary.
//!
//! Pair `i`'s noise comes from (seed, i) alone (`adm_data::store::noise_for_index`) and so
//! does its condition, so a collection split across ranks, or killed and resumed, writes
//! exactly the pairs of one uninterrupted run.

use adm_data::read_prompts;
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

/// The classes that a prompt file asks for: every prompt must be a class id.
fn toy_prompt_classes(ctx: &ToyContext, path: &std::path::Path) -> Result<Vec<u32>> {
    let classes = ctx.mixture.num_classes();
    read_prompts(path)?
        .iter()
        .enumerate()
        .map(|(i, prompt)| match prompt.parse::<u32>() {
            Ok(c) if (c as usize) < classes => Ok(c),
            _ => anyhow::bail!(
                "{}: prompt {} (`{prompt}`) is not a class id of the toy (0..{classes})",
                path.display(),
                i + 1
            ),
        })
        .collect()
}

/// The store spec of the toy's pairs for one partition of the collection.
pub fn toy_store_spec(ctx: &ToyContext, partition: Partition) -> StoreSpec {
    let c = &ctx.config;
    let prompts = match &c.ode_pairs.prompts {
        Some(path) => format!(" prompts={}", path.display()),
        None => String::new(),
    };
    let class_labels = ConditionSpec {
        shape: vec![],
        dtype: StoreDtype::U32,
    };
    StoreSpec {
        teacher: format!("adm toy-mlp {}{prompts}", teacher_fingerprint(ctx)),
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
    let prompt_classes = match &ctx.config.ode_pairs.prompts {
        Some(path) => Some(toy_prompt_classes(ctx, path)?),
        None => None,
    };
    let class_of = |i: u64| match &prompt_classes {
        Some(classes) => classes[i as usize % classes.len()],
        None => toy_class(ctx, seed, i),
    };
    let writer = StoreWriter::open(dir, spec)
        .with_context(|| format!("ODE-pair store {}", dir.display()))?;
    let count = ctx.config.ode_pairs.count as u64;
    collect(
        writer,
        count,
        ctx.config.ode_pairs.batch_size,
        &ctx.device,
        |indices, noise| {
            let classes: Vec<u32> = indices.iter().map(|&i| class_of(i)).collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::tests::{random_teacher, tiny_context};

    #[test]
    fn a_prompt_file_sets_the_classes_in_order() -> Result<()> {
        let prompts = std::env::temp_dir().join(format!("adm-classes-{}.txt", std::process::id()));
        std::fs::write(&prompts, "1\n0\n1\n")?;
        let ctx = tiny_context(
            "prompts",
            &[&format!("ode_pairs.prompts=\"{}\"", prompts.display())],
        );
        let teacher = random_teacher(&ctx);
        let store = collect_toy_pairs(&ctx, &teacher)?;
        let batch = store.get_batch(&[0, 1, 2, 3, 4], &ctx.device)?;
        let labels = batch.condition(CLASS_LABELS).expect("class labels stored");
        assert_eq!(labels.to_vec1::<u32>()?, [1, 0, 1, 1, 0]);

        std::fs::write(&prompts, "1\nseven\n")?;
        let bad = tiny_context(
            "prompts-bad",
            &[&format!("ode_pairs.prompts=\"{}\"", prompts.display())],
        );
        let Err(err) = collect_toy_pairs(&bad, &teacher) else {
            panic!("a bad prompt must fail");
        };
        let message = format!("{err:#}");
        assert!(
            message.contains("prompt 2") && message.contains("seven"),
            "{message}"
        );
        Ok(())
    }
}
