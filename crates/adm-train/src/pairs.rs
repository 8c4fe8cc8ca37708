//! ODE pairs `(x_T, x_0, condition)` from a store, in shuffled epochs, resumable.

use std::ops::Deref;
use std::sync::Arc;

use adm_data::store::StoreReader;
use adm_models::Condition;
use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};

use crate::engine::ConditionSource;

/// One batch of pairs.
pub struct Pairs {
    /// x_T, the teacher's starting noise.
    pub noise: Tensor,
    /// x_0, the teacher's sample from it.
    pub sample: Tensor,
    /// The stored conditions (encoded prompts, `negative_*` for CFG), by their store names.
    pub cond: Condition,
}

/// Every readable pair of a store once per epoch, epoch `e` in the order
/// `StoreReader::epoch_indices(seed, e)`. The cursor counts pairs consumed, so
/// `(seed, cursor)` is the whole state: `seek` to a checkpoint's cursor and the stream
/// continues exactly. It is also a [`ConditionSource`] (the stored conditions only), for
/// ADM / DMD stages that run on the prompts of a collection.
pub struct PairSource<R: Deref<Target = StoreReader> = Arc<StoreReader>> {
    reader: R,
    seed: u64,
    device: Device,
    /// Readable pairs (one epoch).
    epoch_len: u64,
    cursor: u64,
    /// (epoch, its order) of the last epoch read.
    order: (u64, Vec<u64>),
}

impl<R: Deref<Target = StoreReader>> PairSource<R> {
    /// Errs, naming the store, when it has no readable pair.
    pub fn new(reader: R, seed: u64, device: &Device) -> Result<Self> {
        let first = reader.epoch_indices(seed, 0, 0, 1)?;
        ensure!(
            !first.is_empty(),
            "the ODE-pair store {} has no readable pair",
            reader.dir().display()
        );
        Ok(Self {
            epoch_len: first.len() as u64,
            reader,
            seed,
            device: device.clone(),
            cursor: 0,
            order: (0, first),
        })
    }

    pub fn reader(&self) -> &StoreReader {
        &self.reader
    }

    /// Store positions of the pairs `start..start + n` of the stream.
    fn positions(&mut self, start: u64, n: usize) -> Result<Vec<u64>> {
        let mut positions = Vec::with_capacity(n);
        for k in start..start + n as u64 {
            let epoch = k / self.epoch_len;
            if self.order.0 != epoch {
                self.order = (epoch, self.reader.epoch_indices(self.seed, epoch, 0, 1)?);
            }
            positions.push(self.order.1[(k % self.epoch_len) as usize]);
        }
        Ok(positions)
    }

    fn read(&self, positions: &[u64]) -> Result<Pairs> {
        let batch = self.reader.get_batch(positions, &self.device)?;
        let cond = batch
            .conditions
            .iter()
            .fold(Condition::new(), |c, (name, t)| c.with(name, t.clone()));
        Ok(Pairs {
            noise: batch.noise,
            sample: batch.sample,
            cond,
        })
    }

    /// The next `n` pairs; advances the cursor.
    pub fn next_pairs(&mut self, n: usize) -> Result<Pairs> {
        let positions = self.positions(self.cursor, n)?;
        let pairs = self.read(&positions)?;
        self.cursor += n as u64;
        Ok(pairs)
    }

    /// The first `n` pairs of epoch 0 (fixed inputs for probes and sample grids).
    pub fn fixed_pairs(&self, n: usize) -> Result<Pairs> {
        let first = self.reader.epoch_indices(self.seed, 0, 0, 1)?;
        let positions: Vec<u64> = (0..n).map(|i| first[i % first.len()]).collect();
        self.read(&positions)
    }
}

impl ConditionSource for PairSource {
    fn next(&mut self, n: usize) -> Result<Condition> {
        Ok(self.next_pairs(n)?.cond)
    }

    fn fixed(&self, n: usize) -> Result<Condition> {
        Ok(self.fixed_pairs(n)?.cond)
    }

    fn cursor(&self) -> u64 {
        self.cursor
    }

    fn seek(&mut self, cursor: u64) -> Result<()> {
        self.cursor = cursor;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adm_data::store::{ConditionSpec, PairBatch, StoreDtype, StoreSpec, StoreWriter};

    /// A store of `n` scalar pairs: noise = index, sample = -index, condition `c` = index.
    fn store(name: &str, n: usize) -> Result<Arc<StoreReader>> {
        let dir = std::env::temp_dir().join(format!("adm-pairs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spec = StoreSpec {
            teacher: "t".into(),
            schedule: "s".into(),
            solver: "ddim".into(),
            steps: 1,
            cfg_scale: 1.0,
            seed: 0,
            dtype: StoreDtype::F32,
            noise_shape: vec![1],
            sample_shape: vec![1],
            conditions: [(
                "c".to_string(),
                ConditionSpec {
                    shape: vec![1],
                    dtype: StoreDtype::F32,
                },
            )]
            .into(),
            shard_size: 3,
            partition: Default::default(),
        };
        let mut writer = StoreWriter::open(&dir, spec)?;
        if n > 0 {
            let indices = writer.next_indices(n, n as u64);
            let values = Tensor::arange(0f32, n as f32, &Device::Cpu)?.reshape((n, 1))?;
            writer.append(PairBatch {
                noise: values.clone(),
                sample: values.neg()?,
                conditions: vec![("c".into(), values)],
                prompts: vec![String::new(); n],
                indices,
            })?;
        }
        writer.finish()?;
        Ok(Arc::new(StoreReader::open(&dir)?))
    }

    fn ids(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn epochs_cover_every_pair_once_and_seek_repeats_the_stream() -> Result<()> {
        let reader = store("epochs", 5)?;
        let mut source = PairSource::new(reader.clone(), 7, &Device::Cpu)?;
        // Three batches of 4: epochs 0 and 1 whole, two pairs of epoch 2.
        let batches: Vec<Pairs> = (0..3)
            .map(|_| source.next_pairs(4))
            .collect::<Result<_>>()?;
        let stream: Vec<f32> = batches.iter().flat_map(|b| ids(&b.noise)).collect();
        for epoch in [&stream[..5], &stream[5..10]] {
            let mut sorted = epoch.to_vec();
            sorted.sort_by(f32::total_cmp);
            assert_eq!(sorted, [0.0, 1.0, 2.0, 3.0, 4.0]);
        }
        assert_ne!(stream[..5], stream[5..10], "epochs are reshuffled");
        for b in &batches {
            // Pairs and conditions stay together.
            assert_eq!(ids(&b.sample), ids(&b.noise.neg()?));
            assert_eq!(ids(b.cond.get("c")?), ids(&b.noise));
        }
        assert_eq!(source.cursor(), 12);

        let mut resumed = PairSource::new(reader, 7, &Device::Cpu)?;
        resumed.seek(6)?;
        assert_eq!(ids(resumed.next(6)?.get("c")?), stream[6..12]);
        assert_eq!(ids(source.fixed(2)?.get("c")?), stream[..2]);
        std::fs::remove_dir_all(source.reader().dir())?;
        Ok(())
    }

    #[test]
    fn an_empty_store_is_an_error_naming_it() -> Result<()> {
        let reader = store("empty", 0)?;
        let err = PairSource::new(reader.clone(), 0, &Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("adm-pairs-empty"), "{err}");
        std::fs::remove_dir_all(reader.dir())?;
        Ok(())
    }
}
