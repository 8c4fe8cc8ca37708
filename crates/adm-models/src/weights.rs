//! Moving weights between trainable Vars, frozen tensors and safetensors files.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

/// A VarBuilder over detached copies of `varmap`'s current values: a frozen snapshot (the
/// teacher, or a fixed random network) that no optimiser and no gradient reaches.
pub fn frozen_var_builder(
    varmap: &VarMap,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    var_builder_of(varmap, dtype, device, |t| t.detach().copy())
}

/// A VarBuilder over `dtype` casts of `varmap`'s Vars that keep the gradient path: a network
/// built from it computes in `dtype` and back-propagates into the (f32) Vars. The casts are a
/// snapshot: build again after the Vars change (`Var::set` does not reach them).
pub fn compute_var_builder(
    varmap: &VarMap,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    var_builder_of(varmap, dtype, device, |t| t.to_dtype(dtype))
}

/// A VarBuilder over `tensor(var)` of every Var of `varmap`, by name.
fn var_builder_of(
    varmap: &VarMap,
    dtype: DType,
    device: &Device,
    tensor: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<VarBuilder<'static>> {
    let tensors = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| Ok((name.clone(), tensor(var.as_tensor())?)))
        .collect::<Result<HashMap<_, _>>>()?;
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

/// Sets every Var of `into` from the tensor of the same name in `from` (initialising a
/// student or fake score from the teacher). Missing, unexpected and mis-shaped tensors are
/// errors naming the tensor.
pub fn copy_weights(from: &HashMap<String, Tensor>, into: &VarMap) -> Result<()> {
    let data = into.data().lock().unwrap();
    for name in from.keys() {
        if !data.contains_key(name) {
            candle_core::bail!("unexpected tensor `{name}`: the model has no such parameter");
        }
    }
    for (name, var) in data.iter() {
        let source = from
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor `{name}`")))?;
        if source.shape() != var.shape() {
            candle_core::bail!(
                "tensor `{name}` has shape {:?}, the model expects {:?}",
                source.dims(),
                var.dims()
            );
        }
        var.set(&source.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// Writes `tensors` as safetensors atomically: a temporary file, fsync, rename, fsync of the
/// directory. A crash leaves either the old file or the new one, never a torn one.
pub fn save_safetensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp)?;
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The current values of a VarMap's Vars, by name.
pub fn varmap_tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect()
}
