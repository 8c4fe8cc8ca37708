//! One shard file: a safetensors file holding every pair tensor stacked along dim 0, with
//! the pairs' global indices and prompts in the header metadata.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype as StDtype;
use serde::{Deserialize, Serialize};

use super::manifest::ShardRecord;
use super::spec::{Partition, StoreDtype, TensorLayout, NOISE, SAMPLE};
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
            if mine.is_empty() && mine.capacity() < theirs.len() {
                *mine = theirs;
            } else {
                mine.extend_from_slice(&theirs);
            }
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

    /// Checks a batch against the layouts; returns its tensors in layout order, in the
    /// stored dtypes, contiguous on the CPU, ready for [`RawPairs::extend_from_checked`].
    pub fn check_batch(
        batch: &PairBatch,
        layouts: &[TensorLayout],
    ) -> Result<Vec<Tensor>, DataError> {
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
        layouts
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
                Ok(tensor
                    .to_dtype(layout.dtype.candle())?
                    .to_device(&Device::Cpu)?
                    .contiguous()?)
            })
            .collect()
    }

    /// Appends a batch checked by [`RawPairs::check_batch`], converting its tensors straight
    /// into the buffers (no intermediate copy). On error nothing is appended.
    pub fn extend_from_checked(
        &mut self,
        tensors: &[Tensor],
        batch: &PairBatch,
    ) -> Result<(), DataError> {
        let old_lengths: Vec<usize> = self.tensors.iter().map(Vec::len).collect();
        for (bytes, tensor) in self.tensors.iter_mut().zip(tensors) {
            if let Err(e) = append_le_bytes(tensor, bytes) {
                for (bytes, &len) in self.tensors.iter_mut().zip(&old_lengths) {
                    bytes.truncate(len);
                }
                return Err(e);
            }
        }
        self.indices.extend_from_slice(&batch.indices);
        self.prompts.extend_from_slice(&batch.prompts);
        Ok(())
    }

    /// Empties the buffers, keeping their allocations for the next shard.
    pub fn clear(&mut self) {
        self.tensors.iter_mut().for_each(Vec::clear);
        self.indices.clear();
        self.prompts.clear();
    }
}

/// Uploads stored-dtype little-endian tensors to `device`, floats converted to f32 there.
pub(crate) fn upload(
    layouts: &[TensorLayout],
    tensors: &[&[u8]],
    rows: usize,
    device: &Device,
) -> Result<Vec<Tensor>, DataError> {
    layouts
        .iter()
        .zip(tensors)
        .map(|(layout, bytes)| {
            let stored = Tensor::from_raw_buffer(
                bytes,
                layout.dtype.candle(),
                &layout.batch_shape(rows),
                device,
            )?;
            Ok(stored.to_dtype(layout.dtype.read_dtype())?)
        })
        .collect()
}

/// Names the tensors (in layout order: noise, sample, conditions) and builds the batch.
pub(crate) fn pair_batch(
    layouts: &[TensorLayout],
    tensors: Vec<Tensor>,
    prompts: Vec<String>,
    indices: Vec<u64>,
) -> Result<PairBatch, DataError> {
    let mut named: Vec<(String, Tensor)> = layouts
        .iter()
        .map(|layout| layout.name.clone())
        .zip(tensors)
        .collect();
    let conditions = named.split_off(2.min(named.len()));
    let Ok([(_, noise), (_, sample)]) = <[(String, Tensor); 2]>::try_from(named) else {
        return Err(DataError::Tensor("a store needs noise and sample".into()));
    };
    Ok(PairBatch {
        noise,
        sample,
        conditions,
        prompts,
        indices,
    })
}

/// Bytes read per `pread` when decoding float rows: small enough that the conversion reads
/// them back from cache, large enough to amortise the syscall. A multiple of every element
/// size, so no element straddles two reads.
pub(crate) const STAGING_BYTES: usize = 256 << 10;

/// One tensor of a batch being read on the CPU: float storage decoded to f32 as it is read
/// (no full-size copy in the stored type), integer storage kept as little-endian bytes.
pub(crate) enum Decoded {
    F32(Vec<f32>),
    Bytes(Vec<u8>),
}

impl Decoded {
    /// An empty buffer for `layout`: f32 for floats, stored bytes otherwise.
    pub fn for_layout(layout: &TensorLayout) -> Self {
        if layout.dtype.is_float() {
            Self::F32(Vec::new())
        } else {
            Self::Bytes(Vec::new())
        }
    }

    /// Room for exactly `rows` rows (existing memory is kept); every row is then filled by
    /// [`ShardFile::read_run_decoded`].
    pub fn resize(&mut self, layout: &TensorLayout, rows: usize) {
        match self {
            Self::F32(values) => values.resize(rows * layout.shape.iter().product::<usize>(), 0.0),
            Self::Bytes(bytes) => bytes.resize(rows * layout.item_bytes(), 0),
        }
    }

    /// Cuts the buffer into consecutive pieces of `rows` rows each, in order (together they
    /// must cover every row).
    pub fn split_rows(
        &mut self,
        layout: &TensorLayout,
        rows: impl IntoIterator<Item = usize>,
    ) -> Vec<Target<'_>> {
        match self {
            Self::F32(values) => {
                let per_row = layout.shape.iter().product::<usize>();
                let mut rest: &mut [f32] = values;
                rows.into_iter()
                    .map(|n| {
                        let (piece, tail) = std::mem::take(&mut rest).split_at_mut(n * per_row);
                        rest = tail;
                        Target::F32(piece)
                    })
                    .collect()
            }
            Self::Bytes(bytes) => {
                let per_row = layout.item_bytes();
                let mut rest: &mut [u8] = bytes;
                rows.into_iter()
                    .map(|n| {
                        let (piece, tail) = std::mem::take(&mut rest).split_at_mut(n * per_row);
                        rest = tail;
                        Target::Bytes(piece)
                    })
                    .collect()
            }
        }
    }

    pub fn into_tensor(self, layout: &TensorLayout, rows: usize) -> Result<Tensor, DataError> {
        let shape = layout.batch_shape(rows);
        Ok(match self {
            Self::F32(values) => Tensor::from_vec(values, shape, &Device::Cpu)?,
            Self::Bytes(bytes) => {
                Tensor::from_raw_buffer(&bytes, layout.dtype.candle(), &shape, &Device::Cpu)?
            }
        })
    }
}

/// Some consecutive rows of one [`Decoded`] tensor: what one read fills.
pub(crate) enum Target<'a> {
    F32(&'a mut [f32]),
    Bytes(&'a mut [u8]),
}

/// bf16 -> f32 exactly as `half` 2 (candle's conversion) does it: NaNs get the quiet bit.
fn bf16_to_f32(bits: u16) -> f32 {
    let bits = if bits & 0x7fff > 0x7f80 {
        bits | 0x0040
    } else {
        bits
    };
    f32::from_bits(u32::from(bits) << 16)
}

/// Converts little-endian floats of `dtype` to f32, `out.len()` of them.
fn decode_floats(dtype: StoreDtype, bytes: &[u8], out: &mut [f32]) -> Result<(), DataError> {
    match dtype {
        // Blocks of 8 fixed-size arrays, so the loops compile to wide loads and stores.
        StoreDtype::F32 => {
            let mut blocks = out.chunks_exact_mut(8);
            let mut sources = bytes.chunks_exact(32);
            for (block, source) in (&mut blocks).zip(&mut sources) {
                for (value, b) in block.iter_mut().zip(source.chunks_exact(4)) {
                    *value = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            let tail = sources.remainder().chunks_exact(4);
            for (value, b) in blocks.into_remainder().iter_mut().zip(tail) {
                *value = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        StoreDtype::Bf16 => {
            let mut blocks = out.chunks_exact_mut(8);
            let mut sources = bytes.chunks_exact(16);
            for (block, source) in (&mut blocks).zip(&mut sources) {
                // Always arrays (exact chunks); the conversion only tells the compiler.
                let (Ok(block), Ok(source)) = (
                    <&mut [f32; 8]>::try_from(block),
                    <&[u8; 16]>::try_from(source),
                ) else {
                    continue;
                };
                for (k, value) in block.iter_mut().enumerate() {
                    *value = bf16_to_f32(u16::from_le_bytes([source[2 * k], source[2 * k + 1]]));
                }
            }
            let tail = sources.remainder().chunks_exact(2);
            for (value, b) in blocks.into_remainder().iter_mut().zip(tail) {
                *value = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        _ => {
            // f16: candle's own conversion, one cache-sized chunk at a time.
            let converted =
                Tensor::from_raw_buffer(bytes, dtype.candle(), &[out.len()], &Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
            out.copy_from_slice(&converted);
        }
    }
    Ok(())
}

/// Appends the little-endian bytes of a contiguous CPU tensor, in its own dtype, to `out`.
fn append_le_bytes(tensor: &Tensor, out: &mut Vec<u8>) -> Result<(), DataError> {
    fn le_bytes<T: Copy, const N: usize>(
        values: &[T],
        range: (usize, usize),
        out: &mut Vec<u8>,
        to_le: impl Fn(T) -> [u8; N],
    ) -> Result<(), DataError> {
        let values = values
            .get(range.0..range.1)
            .ok_or_else(|| DataError::Tensor("tensor layout exceeds its storage".into()))?;
        let start = out.len();
        out.resize(start + values.len() * N, 0);
        for (bytes, &value) in out[start..].chunks_exact_mut(N).zip(values) {
            bytes.copy_from_slice(&to_le(value));
        }
        Ok(())
    }

    let (storage, layout) = tensor.storage_and_layout();
    let range = layout
        .contiguous_offsets()
        .ok_or_else(|| DataError::Tensor("expected a contiguous tensor".into()))?;
    let Storage::Cpu(cpu) = &*storage else {
        return Err(DataError::Tensor("expected a CPU tensor".into()));
    };
    match cpu {
        CpuStorage::F32(v) => le_bytes(v, range, out, f32::to_le_bytes),
        CpuStorage::F16(v) => le_bytes(v, range, out, |x| x.to_le_bytes()),
        CpuStorage::BF16(v) => le_bytes(v, range, out, |x| x.to_le_bytes()),
        CpuStorage::U32(v) => le_bytes(v, range, out, u32::to_le_bytes),
        CpuStorage::I64(v) => le_bytes(v, range, out, i64::to_le_bytes),
        _ => Err(DataError::Tensor(format!(
            "dtype {:?} cannot be stored",
            tensor.dtype()
        ))),
    }
}

/// Largest header `safetensors::serialize` writes (its `MAX_HEADER_SIZE`).
const MAX_SERIALIZED_HEADER: usize = 100_000_000;

/// A shard file in pieces: the header (8-byte length and JSON) and the tensor buffers in
/// file order. The same bytes `safetensors::serialize` writes (tensors sorted by descending
/// dtype, then name; header padded with spaces to 8 bytes), without copying the data into
/// one buffer. Deterministic: the same pairs give the same bytes.
pub(crate) fn encode_shard<'a>(
    layouts: &[TensorLayout],
    pairs: &'a RawPairs,
) -> Result<Vec<Cow<'a, [u8]>>, DataError> {
    let rows = pairs.len();
    let st_dtype = |i: usize| StDtype::from(layouts[i].dtype.candle());
    let mut order: Vec<usize> = (0..layouts.len()).collect();
    order.sort_by(|&a, &b| {
        st_dtype(b)
            .cmp(&st_dtype(a))
            .then(layouts[a].name.cmp(&layouts[b].name))
    });
    let mut offset = 0;
    let mut infos = Vec::with_capacity(order.len());
    for &i in &order {
        let len = pairs.tensors[i].len();
        let info = TensorInfo {
            dtype: st_dtype(i),
            shape: layouts[i].batch_shape(rows),
            data_offsets: (offset, offset + len),
        };
        offset += len;
        infos.push((layouts[i].name.clone(), info));
    }
    let pairs_metadata = PairsMetadata {
        indices: pairs.indices.clone(),
        prompts: pairs.prompts.clone(),
    };
    let pairs_metadata =
        serde_json::to_string(&pairs_metadata).map_err(|e| DataError::Tensor(e.to_string()))?;
    let info = HashMap::from([(PAIRS_METADATA_KEY.to_string(), pairs_metadata)]);
    let metadata = Metadata::new(Some(info), infos)
        .map_err(|e| DataError::Tensor(format!("cannot serialise shard: {e}")))?;
    let mut json = serde_json::to_string(&metadata)
        .map_err(|e| DataError::Tensor(format!("cannot serialise shard: {e}")))?
        .into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    if json.len() > MAX_SERIALIZED_HEADER {
        return Err(DataError::Tensor(format!(
            "cannot serialise shard: header of {} bytes is too large",
            json.len()
        )));
    }
    let mut header = Vec::with_capacity(8 + json.len());
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    header.extend_from_slice(&json);
    let mut parts = vec![Cow::Owned(header)];
    parts.extend(
        order
            .iter()
            .map(|&i| Cow::Borrowed(pairs.tensors[i].as_slice())),
    );
    Ok(parts)
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

    /// Reads rows `first_row..first_row + rows` of every tensor into `out` (one [`Target`]
    /// of exactly that many rows per layout); floats are read in `staging`-sized chunks and
    /// decoded to f32 while they are still in cache.
    pub fn read_run_decoded(
        &self,
        file: &File,
        first_row: usize,
        layouts: &[TensorLayout],
        out: &mut [Target<'_>],
        staging: &mut [u8],
    ) -> Result<(), DataError> {
        let read = |buf: &mut [u8], at: u64| {
            read_exact_at(file, buf, at)
                .map_err(|e| DataError::file(&self.path, format!("read failed: {e}")))
        };
        for ((layout, &offset), target) in layouts.iter().zip(&self.data_offsets).zip(out) {
            let mut at = offset + (first_row * layout.item_bytes()) as u64;
            match target {
                Target::Bytes(bytes) => read(bytes, at)?,
                Target::F32(values) => {
                    let size = layout.dtype.size_in_bytes();
                    for values in values.chunks_mut((staging.len() / size).max(1)) {
                        let chunk = &mut staging[..values.len() * size];
                        read(chunk, at)?;
                        decode_floats(layout.dtype, chunk, values)?;
                        at += chunk.len() as u64;
                    }
                }
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use safetensors::View;

    use super::*;

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

    /// The shard encoding before it was split into pieces: `safetensors::serialize`.
    fn serialize_with_safetensors(
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

    #[test]
    fn shard_pieces_equal_safetensors_serialize() {
        use super::super::spec::StoreSpec;
        let spec: StoreSpec = serde_json::from_value(serde_json::json!({
            "teacher": "t", "schedule": "s", "solver": "ddim", "steps": 4, "cfg_scale": 2.0,
            "seed": 1, "dtype": "bf16", "noise_shape": [3, 5], "sample_shape": [2, 7],
            "conditions": {
                "class_labels": {"shape": [], "dtype": "u32"},
                "time_ids": {"shape": [6], "dtype": "f32"},
                "a_ids": {"shape": [2], "dtype": "i64"},
                "pooled": {"shape": [4], "dtype": "f16"}
            },
            "shard_size": 8
        }))
        .unwrap();
        let layouts = spec.tensor_layouts();
        for rows in [0usize, 1, 5] {
            let mut pairs = RawPairs::empty(&layouts);
            for (k, (bytes, layout)) in pairs.tensors.iter_mut().zip(&layouts).enumerate() {
                *bytes = (0..rows * layout.item_bytes())
                    .map(|i| (i * 31 + k * 7) as u8)
                    .collect();
            }
            pairs.indices = (0..rows as u64).map(|i| i * 3 + 1).collect();
            pairs.prompts = (0..rows)
                .map(|i| format!("prompt \"{i}\" \u{e9}"))
                .collect();
            let pieces: Vec<u8> = encode_shard(&layouts, &pairs).unwrap().concat();
            assert_eq!(
                pieces,
                serialize_with_safetensors(&layouts, &pairs).unwrap()
            );
        }
    }

    #[test]
    fn bf16_decoding_matches_candle_for_every_bit_pattern() {
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let mut ours = vec![0f32; bits.len()];
        decode_floats(StoreDtype::Bf16, &bytes, &mut ours).unwrap();
        let candle: Vec<f32> =
            Tensor::from_raw_buffer(&bytes, DType::BF16, &[bits.len()], &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap();
        for ((b, x), y) in bits.iter().zip(&ours).zip(&candle) {
            assert_eq!(x.to_bits(), y.to_bits(), "bf16 bits {b:#06x}");
        }
    }
}
