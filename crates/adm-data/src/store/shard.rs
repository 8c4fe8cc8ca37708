//! One shard file: a safetensors file holding every pair tensor stacked along dim 0, with
//! the pairs' global indices and prompts in the header metadata.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{CpuStorage, Device, Storage, Tensor};
use safetensors::tensor::Metadata;
use safetensors::{Dtype as StDtype, View};
use serde::{Deserialize, Serialize};

use super::manifest::ShardRecord;
use super::spec::{Partition, TensorLayout, NOISE, SAMPLE};
use super::PairBatch;
use crate::DataError;

/// The one safetensors metadata key this store writes (a single key keeps the header bytes
/// deterministic: safetensors serialises its metadata map in hash order).
pub(crate) const PAIRS_METADATA_KEY: &str = "adm.pairs";
/// Headers beyond this are not ours (prompts of a large shard take a few MB at most).
const MAX_HEADER_BYTES: u64 = 256 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PairsMetadata {
    indices: Vec<u64>,
    prompts: Vec<String>,
}

/// Pairs in storage form: little-endian bytes in the spec's dtypes, one buffer per tensor
/// layout (in [`super::StoreSpec`] layout order), plus indices and prompts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawPairs {
    pub tensors: Vec<Vec<u8>>,
    pub indices: Vec<u64>,
    pub prompts: Vec<String>,
}

impl RawPairs {
    pub fn empty(layouts: &[TensorLayout]) -> Self {
        Self {
            tensors: vec![Vec::new(); layouts.len()],
            indices: Vec::new(),
            prompts: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn append(&mut self, other: RawPairs) {
        for (mine, theirs) in self.tensors.iter_mut().zip(other.tensors) {
            mine.extend_from_slice(&theirs);
        }
        self.indices.extend(other.indices);
        self.prompts.extend(other.prompts);
    }

    /// Removes and returns the first `rows` pairs.
    pub fn split_front(&mut self, rows: usize, layouts: &[TensorLayout]) -> RawPairs {
        let rows = rows.min(self.len());
        let tensors = self
            .tensors
            .iter_mut()
            .zip(layouts)
            .map(|(bytes, layout)| {
                let rest = bytes.split_off(rows * layout.item_bytes());
                std::mem::replace(bytes, rest)
            })
            .collect();
        let rest_indices = self.indices.split_off(rows);
        let rest_prompts = self.prompts.split_off(rows);
        RawPairs {
            tensors,
            indices: std::mem::replace(&mut self.indices, rest_indices),
            prompts: std::mem::replace(&mut self.prompts, rest_prompts),
        }
    }

    /// Appends row `row` of `from`.
    pub fn push_row(&mut self, from: &RawPairs, row: usize, layouts: &[TensorLayout]) {
        for ((mine, theirs), layout) in self.tensors.iter_mut().zip(&from.tensors).zip(layouts) {
            let item = layout.item_bytes();
            mine.extend_from_slice(&theirs[row * item..(row + 1) * item]);
        }
        self.indices.push(from.indices[row]);
        self.prompts.push(from.prompts[row].clone());
    }

    /// Checks a batch against the layouts and converts it to storage form.
    pub fn from_batch(batch: &PairBatch, layouts: &[TensorLayout]) -> Result<Self, DataError> {
        let rows = batch.indices.len();
        if batch.prompts.len() != rows {
            return Err(DataError::invalid(
                "batch.prompts",
                format!("{} prompts for {rows} indices", batch.prompts.len()),
            ));
        }
        for (i, (name, _)) in batch.conditions.iter().enumerate() {
            let known = layouts[2..].iter().any(|l| &l.name == name);
            let repeated = batch.conditions[..i].iter().any(|(n, _)| n == name);
            if !known || repeated {
                let expected: Vec<&str> = layouts[2..].iter().map(|l| l.name.as_str()).collect();
                return Err(DataError::invalid(
                    format!("batch.conditions.{name}"),
                    format!("unexpected or repeated; the spec's conditions are {expected:?}"),
                ));
            }
        }
        let tensors = layouts
            .iter()
            .map(|layout| {
                let field = match layout.name.as_str() {
                    NOISE | SAMPLE => format!("batch.{}", layout.name),
                    name => format!("batch.conditions.{name}"),
                };
                let tensor = batch
                    .tensor(&layout.name)
                    .ok_or_else(|| DataError::invalid(&field, "missing"))?;
                let expected = layout.batch_shape(rows);
                if tensor.dims() != expected.as_slice() {
                    return Err(DataError::invalid(
                        &field,
                        format!("expected shape {expected:?}, got {:?}", tensor.dims()),
                    ));
                }
                tensor_le_bytes(&tensor.to_dtype(layout.dtype.candle())?)
            })
            .collect::<Result<_, DataError>>()?;
        Ok(Self {
            tensors,
            indices: batch.indices.clone(),
            prompts: batch.prompts.clone(),
        })
    }

    /// Builds tensors on `device`, floats converted to f32.
    pub fn into_batch(
        self,
        layouts: &[TensorLayout],
        device: &Device,
    ) -> Result<PairBatch, DataError> {
        let rows = self.len();
        let mut named = layouts
            .iter()
            .zip(&self.tensors)
            .map(|(layout, bytes)| {
                let stored = Tensor::from_raw_buffer(
                    bytes,
                    layout.dtype.candle(),
                    &layout.batch_shape(rows),
                    device,
                )?;
                Ok((
                    layout.name.clone(),
                    stored.to_dtype(layout.dtype.read_dtype())?,
                ))
            })
            .collect::<Result<Vec<_>, DataError>>()?;
        let conditions = named.split_off(2.min(named.len()));
        let Ok([(_, noise), (_, sample)]) = <[(String, Tensor); 2]>::try_from(named) else {
            return Err(DataError::Tensor("a store needs noise and sample".into()));
        };
        Ok(PairBatch {
            noise,
            sample,
            conditions,
            prompts: self.prompts,
            indices: self.indices,
        })
    }
}

/// The little-endian bytes of a tensor in its own dtype.
fn tensor_le_bytes(tensor: &Tensor) -> Result<Vec<u8>, DataError> {
    fn le_bytes<T: Copy, const N: usize>(
        values: &[T],
        range: (usize, usize),
        to_le: impl Fn(T) -> [u8; N],
    ) -> Result<Vec<u8>, DataError> {
        let values = values
            .get(range.0..range.1)
            .ok_or_else(|| DataError::Tensor("tensor layout exceeds its storage".into()))?;
        let mut bytes = Vec::with_capacity(values.len() * N);
        for &value in values {
            bytes.extend_from_slice(&to_le(value));
        }
        Ok(bytes)
    }

    let tensor = tensor.to_device(&Device::Cpu)?.contiguous()?;
    let (storage, layout) = tensor.storage_and_layout();
    let range = layout
        .contiguous_offsets()
        .ok_or_else(|| DataError::Tensor("expected a contiguous tensor".into()))?;
    let Storage::Cpu(cpu) = &*storage else {
        return Err(DataError::Tensor("expected a CPU tensor".into()));
    };
    match cpu {
        CpuStorage::F32(v) => le_bytes(v, range, f32::to_le_bytes),
        CpuStorage::F16(v) => le_bytes(v, range, |x| x.to_le_bytes()),
        CpuStorage::BF16(v) => le_bytes(v, range, |x| x.to_le_bytes()),
        CpuStorage::U32(v) => le_bytes(v, range, u32::to_le_bytes),
        CpuStorage::I64(v) => le_bytes(v, range, i64::to_le_bytes),
        _ => Err(DataError::Tensor(format!(
            "dtype {:?} cannot be stored",
            tensor.dtype()
        ))),
    }
}

struct ByteView<'a> {
    dtype: StDtype,
    shape: Vec<usize>,
    bytes: &'a [u8],
}

impl View for ByteView<'_> {
    fn dtype(&self) -> StDtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.bytes)
    }

    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Serialises pairs as a shard file. Deterministic: the same pairs give the same bytes.
pub(crate) fn encode_shard(
    layouts: &[TensorLayout],
    pairs: &RawPairs,
) -> Result<Vec<u8>, DataError> {
    let views = layouts.iter().zip(&pairs.tensors).map(|(layout, bytes)| {
        let view = ByteView {
            dtype: layout.dtype.candle().into(),
            shape: layout.batch_shape(pairs.len()),
            bytes,
        };
        (layout.name.clone(), view)
    });
    let metadata = PairsMetadata {
        indices: pairs.indices.clone(),
        prompts: pairs.prompts.clone(),
    };
    let metadata =
        serde_json::to_string(&metadata).map_err(|e| DataError::Tensor(e.to_string()))?;
    let info = HashMap::from([(PAIRS_METADATA_KEY.to_string(), metadata)]);
    safetensors::serialize(views, Some(info))
        .map_err(|e| DataError::Tensor(format!("cannot serialise shard: {e}")))
}

/// A shard whose header has been read and checked against the manifest and spec; rows are
/// then read with positional reads (no memory map: a file truncated under a running trainer
/// gives an error naming it, not a SIGBUS).
#[derive(Debug, Clone)]
pub(crate) struct ShardFile {
    pub path: PathBuf,
    /// Absolute file offset of each layout's data.
    data_offsets: Vec<u64>,
    pub indices: Vec<u64>,
    pub prompts: Vec<String>,
}

impl ShardFile {
    /// Opens `dir/record.file` and checks size, header, tensor names, dtypes and shapes,
    /// and that it holds exactly the pairs the manifest says; errors name the file.
    pub fn open(
        dir: &Path,
        record: &ShardRecord,
        layouts: &[TensorLayout],
        partition: &Partition,
    ) -> Result<Self, DataError> {
        let path = dir.join(&record.file);
        Self::read_header(&path, record, layouts, partition)
            .map_err(|reason| DataError::file(&path, reason))
    }

    fn read_header(
        path: &Path,
        record: &ShardRecord,
        layouts: &[TensorLayout],
        partition: &Partition,
    ) -> Result<Self, String> {
        let mut file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "missing".to_string(),
            _ => e.to_string(),
        })?;
        let size = file.metadata().map_err(|e| e.to_string())?.len();
        if size != record.bytes {
            return Err(format!(
                "{size} bytes, the manifest records {} (truncated or replaced)",
                record.bytes
            ));
        }
        let mut header_len = [0u8; 8];
        file.read_exact(&mut header_len)
            .map_err(|e| format!("cannot read header length: {e}"))?;
        let header_len = u64::from_le_bytes(header_len);
        if header_len > MAX_HEADER_BYTES || 8 + header_len > size {
            return Err(format!("header length {header_len} does not fit the file"));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| format!("cannot read header: {e}"))?;
        let metadata: Metadata =
            serde_json::from_slice(&header).map_err(|e| format!("bad safetensors header: {e}"))?;
        let data_start = 8 + header_len;
        if data_start + metadata.data_len() as u64 != size {
            return Err("tensor data does not end at the end of the file".into());
        }
        if metadata.tensors().len() != layouts.len() {
            let mut names: Vec<String> = metadata.tensors().into_keys().collect();
            names.sort();
            return Err(format!(
                "holds tensors {names:?}, expected {:?}",
                layouts.iter().map(|l| &l.name).collect::<Vec<_>>()
            ));
        }
        let data_offsets = layouts
            .iter()
            .map(|layout| {
                let info = metadata
                    .info(&layout.name)
                    .ok_or_else(|| format!("tensor `{}` missing", layout.name))?;
                let expected_shape = layout.batch_shape(record.count);
                let expected_dtype: StDtype = layout.dtype.candle().into();
                if info.dtype != expected_dtype || info.shape != expected_shape {
                    return Err(format!(
                        "tensor `{}` is {:?} {:?}, expected {expected_dtype:?} {expected_shape:?}",
                        layout.name, info.dtype, info.shape
                    ));
                }
                Ok(data_start + info.data_offsets.0 as u64)
            })
            .collect::<Result<_, String>>()?;
        let pairs = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(PAIRS_METADATA_KEY))
            .ok_or_else(|| format!("metadata key `{PAIRS_METADATA_KEY}` missing"))?;
        let pairs: PairsMetadata = serde_json::from_str(pairs)
            .map_err(|e| format!("metadata `{PAIRS_METADATA_KEY}` malformed: {e}"))?;
        let expected_indices: Vec<u64> = (0..record.count as u64)
            .map(|k| record.first_index + k * partition.world_size)
            .collect();
        if pairs.indices != expected_indices {
            return Err("pair indices differ from the manifest's".into());
        }
        if pairs.prompts.len() != record.count {
            return Err(format!(
                "{} prompts for {} pairs",
                pairs.prompts.len(),
                record.count
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            data_offsets,
            indices: pairs.indices,
            prompts: pairs.prompts,
        })
    }

    pub fn open_data(&self) -> Result<File, DataError> {
        File::open(&self.path).map_err(|e| DataError::file(&self.path, e))
    }

    /// Appends the given rows (in order) to `out`, coalescing runs of consecutive rows into
    /// one read per tensor.
    pub fn read_rows(
        &self,
        file: &File,
        rows: &[usize],
        layouts: &[TensorLayout],
        out: &mut RawPairs,
    ) -> Result<(), DataError> {
        let mut start = 0;
        while start < rows.len() {
            let mut end = start + 1;
            while end < rows.len() && rows[end] == rows[end - 1] + 1 {
                end += 1;
            }
            let (first_row, run) = (rows[start], end - start);
            for ((bytes, layout), offset) in
                out.tensors.iter_mut().zip(layouts).zip(&self.data_offsets)
            {
                let item = layout.item_bytes();
                let old_len = bytes.len();
                bytes.resize(old_len + run * item, 0);
                read_exact_at(
                    file,
                    &mut bytes[old_len..],
                    offset + (first_row * item) as u64,
                )
                .map_err(|e| DataError::file(&self.path, format!("read failed: {e}")))?;
            }
            out.indices
                .extend_from_slice(&self.indices[first_row..first_row + run]);
            out.prompts
                .extend_from_slice(&self.prompts[first_row..first_row + run]);
            start = end;
        }
        Ok(())
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
