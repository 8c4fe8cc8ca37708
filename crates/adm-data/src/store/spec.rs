//! What a store holds: the collection settings and the per-pair tensor layout.

use std::collections::BTreeMap;

use candle_core::DType;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::DataError;

/// Element type of a stored tensor. Noise and samples are stored as a float type and read
/// back as f32; conditions may also be integer (class labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDtype {
    F32,
    F16,
    Bf16,
    U32,
    I64,
}

impl StoreDtype {
    pub fn candle(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
            Self::U32 => DType::U32,
            Self::I64 => DType::I64,
        }
    }

    pub fn size_in_bytes(self) -> usize {
        self.candle().size_in_bytes()
    }

    pub fn is_float(self) -> bool {
        self.candle().is_float()
    }

    /// The dtype a reader hands out: f32 for floats, the stored type for integers.
    pub fn read_dtype(self) -> DType {
        if self.is_float() {
            DType::F32
        } else {
            self.candle()
        }
    }
}

/// Per-pair shape and element type of one condition tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionSpec {
    pub shape: Vec<usize>,
    pub dtype: StoreDtype,
}

/// Which global pair indices a store collects: those `i` with `i % world_size == rank`.
/// The local pair `k` of the store has global index `rank + k * world_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    pub rank: u64,
    pub world_size: u64,
}

impl Default for Partition {
    /// The whole index range (one process, or a merged store).
    fn default() -> Self {
        Self {
            rank: 0,
            world_size: 1,
        }
    }
}

impl Partition {
    pub fn global_index(&self, local: u64) -> u64 {
        self.rank + local * self.world_size
    }

    /// How many of the global indices `0..total` belong to this partition.
    pub fn count_below(&self, total: u64) -> u64 {
        total.saturating_sub(self.rank).div_ceil(self.world_size)
    }

    fn validate(&self) -> Result<(), DataError> {
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(DataError::invalid(
                "spec.partition",
                format!(
                    "need 0 <= rank < world_size, got rank {} of {}",
                    self.rank, self.world_size
                ),
            ));
        }
        Ok(())
    }
}

/// Everything that identifies a collection. A store is only ever resumed or merged with an
/// equal spec, so pairs from different teachers or settings never mix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSpec {
    /// Teacher identity, e.g. a hub repo id plus revision.
    pub teacher: String,
    /// Noise schedule description, e.g. "vp-eps scaled-linear 0.00085..0.012 T=1000".
    pub schedule: String,
    /// ODE solver name, e.g. "ddim".
    pub solver: String,
    /// Solver steps per sample.
    pub steps: usize,
    pub cfg_scale: f64,
    /// Seed of [`super::noise_for_index`].
    pub seed: u64,
    /// Storage type of `noise` and `sample` (f32, f16 or bf16).
    pub dtype: StoreDtype,
    /// Per-pair shape of `noise` (without the batch dimension).
    pub noise_shape: Vec<usize>,
    /// Per-pair shape of `sample`.
    pub sample_shape: Vec<usize>,
    /// Condition tensors by name (e.g. `encoder_hidden_states`, `class_labels`).
    pub conditions: BTreeMap<String, ConditionSpec>,
    /// Pairs per shard file.
    pub shard_size: usize,
    #[serde(default)]
    pub partition: Partition,
}

/// Name, per-pair shape and element type of one tensor in a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorLayout {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: StoreDtype,
}

impl TensorLayout {
    pub fn item_bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }

    /// Shape of `rows` stacked pairs.
    pub fn batch_shape(&self, rows: usize) -> Vec<usize> {
        std::iter::once(rows)
            .chain(self.shape.iter().copied())
            .collect()
    }
}

pub(crate) const NOISE: &str = "noise";
pub(crate) const SAMPLE: &str = "sample";

fn validate_shape(field: &str, shape: &[usize]) -> Result<(), DataError> {
    if shape.contains(&0) {
        return Err(DataError::invalid(
            field,
            format!("dimensions must be positive, got {shape:?}"),
        ));
    }
    Ok(())
}

impl StoreSpec {
    pub fn validate(&self) -> Result<(), DataError> {
        if self.shard_size == 0 {
            return Err(DataError::invalid("spec.shard_size", "must be positive"));
        }
        if !self.dtype.is_float() {
            return Err(DataError::invalid(
                "spec.dtype",
                format!(
                    "noise and samples need f32, f16 or bf16, got {:?}",
                    self.dtype
                ),
            ));
        }
        if !self.cfg_scale.is_finite() {
            return Err(DataError::invalid("spec.cfg_scale", "must be finite"));
        }
        validate_shape("spec.noise_shape", &self.noise_shape)?;
        validate_shape("spec.sample_shape", &self.sample_shape)?;
        for (name, condition) in &self.conditions {
            if name.is_empty() || name == NOISE || name == SAMPLE || name.starts_with("__") {
                return Err(DataError::invalid(
                    "spec.conditions",
                    format!("`{name}` is not a valid condition name"),
                ));
            }
            validate_shape(&format!("spec.conditions.{name}.shape"), &condition.shape)?;
        }
        self.partition.validate()
    }

    /// The tensors of every pair: `noise`, `sample`, then the conditions by name.
    pub(crate) fn tensor_layouts(&self) -> Vec<TensorLayout> {
        let pair = [
            (NOISE, &self.noise_shape, self.dtype),
            (SAMPLE, &self.sample_shape, self.dtype),
        ];
        pair.into_iter()
            .chain(
                self.conditions
                    .iter()
                    .map(|(name, c)| (name.as_str(), &c.shape, c.dtype)),
            )
            .map(|(name, shape, dtype)| TensorLayout {
                name: name.to_string(),
                shape: shape.clone(),
                dtype,
            })
            .collect()
    }

    /// Errors naming the first field where `self` and `other` differ, e.g.
    /// `spec.cfg_scale: the store at X has 7.5, the requested spec has 8.0`.
    pub(crate) fn ensure_matches(
        &self,
        other: &Self,
        self_label: &str,
        other_label: &str,
    ) -> Result<(), DataError> {
        let (Ok(mine), Ok(theirs)) = (serde_json::to_value(self), serde_json::to_value(other))
        else {
            return Err(DataError::invalid("spec", "cannot be represented as JSON"));
        };
        match first_difference(&mine, &theirs, "spec") {
            None => Ok(()),
            Some((field, mine, theirs)) => Err(DataError::invalid(
                field,
                format!("{self_label} has {mine}, {other_label} has {theirs}"),
            )),
        }
    }
}

/// Path and both values of the first place where two JSON values differ.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<(String, Value, Value)> {
    if let (Value::Object(a_map), Value::Object(b_map)) = (a, b) {
        let keys: std::collections::BTreeSet<&String> = a_map.keys().chain(b_map.keys()).collect();
        return keys.into_iter().find_map(|key| {
            let a_value = a_map.get(key).unwrap_or(&Value::Null);
            let b_value = b_map.get(key).unwrap_or(&Value::Null);
            first_difference(a_value, b_value, &format!("{path}.{key}"))
        });
    }
    (a != b).then(|| (path.to_string(), a.clone(), b.clone()))
}
