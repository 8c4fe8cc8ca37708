//! Loading diffusers-layout model folders, from a local path or from the local Hugging Face
//! hub cache (offline: nothing is downloaded).
//!
//! A diffusers pipeline folder has a `model_index.json` and one folder per component
//! (`unet/`, `vae/`, `text_encoder/`, ...), each with a `config.json` and its weights:
//! `diffusion_pytorch_model.safetensors` (diffusers) or `model.safetensors` (transformers),
//! or shards listed by `*.safetensors.index.json`, optionally as a variant
//! (`diffusion_pytorch_model.fp16.safetensors`,
//! `diffusion_pytorch_model.safetensors.index.fp16.json`).
//!
//! Two ways in:
//! - frozen tensors (teacher, VAE, text encoders): [`load_var_builder`] memory-maps the files;
//!   [`load_model`] also fails when the checkpoint has tensors the model never asked for;
//! - trainable Vars: build the model on a `VarMap` first, then [`load_into_varmap`].
//!
//! Every missing, unexpected or mis-shaped tensor is an error that names the tensor, both
//! shapes and the file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use serde::de::DeserializeOwned;

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

/// The hub cache folder, as `huggingface_hub` finds it: `$HF_HUB_CACHE`, else
/// `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("HF_HUB_CACHE") {
        return Some(dir.into());
    }
    if let Some(home) = var("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    if let Some(cache) = var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(cache).join("huggingface").join("hub"));
    }
    var("HOME").map(|home| PathBuf::from(home).join(".cache/huggingface/hub"))
}

/// Resolves `model` to a local folder: an existing path as it is, otherwise a hub repo id
/// (`org/name`) looked up in the hub cache (see [`hub_cache_dir`]) at `revision` (default
/// `main`). Never touches the network.
pub fn resolve_model(model: &str, revision: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let Some(cache) = hub_cache_dir() else {
        return Err(err(format!(
            "model `{model}` is not a local folder, and there is no hub cache (HF_HUB_CACHE, HF_HOME and HOME are unset)"
        )));
    };
    resolve_in_cache(model, revision, &cache)
}

/// Looks hub repo `repo_id` up in the hub cache folder `cache` (offline). `revision` is a
/// branch or tag (resolved through `refs/`) or a commit hash; default `main`. Returns the
/// snapshot folder.
pub fn resolve_in_cache(repo_id: &str, revision: Option<&str>, cache: &Path) -> Result<PathBuf> {
    let revision = revision.unwrap_or("main");
    if repo_id.is_empty() || repo_id.starts_with('/') || repo_id.split('/').count() > 2 {
        return Err(err(format!(
            "model `{repo_id}` is neither an existing folder nor a hub repo id (`org/name`)"
        )));
    }
    let repo = hf_hub::Repo::with_revision(
        repo_id.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    );
    let repo_dir = cache.join(repo.folder_name());
    let hint = format!(
        "download it first (e.g. `hf download {repo_id}`) or pass a local folder; nothing is fetched from the network"
    );
    if !repo_dir.is_dir() {
        return Err(err(format!(
            "model `{repo_id}` is not a local folder and not in the hub cache ({} does not exist): {hint}",
            repo_dir.display()
        )));
    }
    let cached = hf_hub::Cache::new(cache.to_path_buf()).repo(repo);
    // hf-hub reads refs/<revision> (a branch or tag) and finds files in that snapshot.
    let snapshot = ["model_index.json", "config.json"]
        .iter()
        .find_map(|f| cached.get(f))
        .and_then(|p| p.parent().map(Path::to_path_buf));
    if let Some(snapshot) = snapshot {
        return Ok(snapshot);
    }
    // A commit hash names the snapshot folder directly.
    let direct = repo_dir.join("snapshots").join(revision);
    if direct.is_dir() {
        return Ok(direct);
    }
    Err(err(format!(
        "model `{repo_id}` revision `{revision}`: no snapshot with model_index.json or config.json under {}: {hint}",
        repo_dir.display()
    )))
}

/// Reads and parses a JSON file, naming the file in errors.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| err(format!("cannot parse {}: {e}", path.display())))
}

/// A component's `config.json`, deserialised (e.g. into `unet_2d::Config`, `vae::Config`).
pub fn read_config<T: DeserializeOwned>(dir: &Path) -> Result<T> {
    read_json(&dir.join("config.json"))
}

/// The model class a component folder holds: diffusers' `_class_name`, or transformers'
/// `architectures[0]`.
pub fn class_name(dir: &Path) -> Result<String> {
    let path = dir.join("config.json");
    let value: serde_json::Value = read_json(&path)?;
    value
        .get("_class_name")
        .and_then(|v| v.as_str())
        .or_else(|| {
            value
                .get("architectures")
                .and_then(|a| a.get(0))
                .and_then(|v| v.as_str())
        })
        .map(str::to_string)
        .ok_or_else(|| {
            err(format!(
                "{} has neither `_class_name` nor `architectures`",
                path.display()
            ))
        })
}

/// A pipeline's `model_index.json`: its class and its components (name → (library, class)).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelIndex {
    pub class_name: String,
    pub components: BTreeMap<String, (Option<String>, Option<String>)>,
}

impl ModelIndex {
    pub fn read(root: &Path) -> Result<Self> {
        let path = root.join("model_index.json");
        let value: serde_json::Value = read_json(&path)?;
        let object = value
            .as_object()
            .ok_or_else(|| err(format!("{} is not a JSON object", path.display())))?;
        let class_name = object
            .get("_class_name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| err(format!("{} has no `_class_name`", path.display())))?
            .to_string();
        let mut components = BTreeMap::new();
        for (name, v) in object {
            if name.starts_with('_') {
                continue;
            }
            if let Some([lib, class]) = v.as_array().map(Vec::as_slice) {
                let s = |v: &serde_json::Value| v.as_str().map(str::to_string);
                components.insert(name.clone(), (s(lib), s(class)));
            }
        }
        Ok(Self {
            class_name,
            components,
        })
    }

    /// The folder of component `name` under `root` (an error lists the components).
    pub fn component_dir(&self, root: &Path, name: &str) -> Result<PathBuf> {
        if !self.components.contains_key(name) {
            return Err(err(format!(
                "{}: pipeline {} has no component `{name}` (components: {})",
                root.display(),
                self.class_name,
                self.components
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let dir = root.join(name);
        if !dir.is_dir() {
            return Err(err(format!(
                "component folder {} does not exist",
                dir.display()
            )));
        }
        Ok(dir)
    }
}

const WEIGHT_STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

/// The safetensors files of a component folder, for weight `variant` (`Some("fp16")`) or
/// the plain weights: a single file, or the shards an index lists (checked to exist).
pub fn weight_files(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    for stem in WEIGHT_STEMS {
        let (single, index) = match variant {
            Some(v) => (
                format!("{stem}.{v}.safetensors"),
                format!("{stem}.safetensors.index.{v}.json"),
            ),
            None => (
                format!("{stem}.safetensors"),
                format!("{stem}.safetensors.index.json"),
            ),
        };
        let single = dir.join(single);
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(index);
        if index.is_file() {
            return shard_files(&index);
        }
    }
    let present: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".safetensors"))
                .collect();
            names.sort();
            names
        })
        .unwrap_or_default();
    Err(err(format!(
        "{}: no {} weights (diffusion_pytorch_model / model .safetensors or .safetensors.index.json); safetensors files there: [{}]",
        dir.display(),
        variant.map_or("plain".to_string(), |v| format!("`{v}` variant")),
        present.join(", ")
    )))
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let value: serde_json::Value = read_json(index)?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| err(format!("{} has no `weight_map` object", index.display())))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            err(format!(
                "{}: weight_map entry `{tensor}` is not a file name",
                index.display()
            ))
        })?;
        files.insert(file.to_string());
    }
    if files.is_empty() {
        return Err(err(format!("{}: empty weight_map", index.display())));
    }
    files
        .into_iter()
        .map(|f| {
            let path = dir.join(&f);
            if path.is_file() {
                Ok(path)
            } else {
                Err(err(format!(
                    "{} lists shard {f}, which does not exist",
                    index.display()
                )))
            }
        })
        .collect()
}

/// Where each tensor of a set of safetensors files lives, and its shape.
struct Entry {
    file: usize,
    shape: Vec<usize>,
}

/// Memory-mapped safetensors files of one component, with a record of which tensors a model
/// asked for (so unused, i.e. unexpected, tensors can be reported).
#[derive(Clone)]
pub struct Weights {
    inner: Arc<WeightsInner>,
}

struct WeightsInner {
    files: Vec<PathBuf>,
    mmaps: Vec<MmapedSafetensors>,
    entries: HashMap<String, Entry>,
    used: Mutex<BTreeSet<String>>,
}

impl Weights {
    /// Memory-maps `files` (the shards of one checkpoint). A tensor in two files is an error.
    pub fn open_files(files: &[PathBuf]) -> Result<Self> {
        let mut mmaps = Vec::with_capacity(files.len());
        let mut entries: HashMap<String, Entry> = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            // SAFETY: the file is only read; as with every mmap, it must not be modified
            // while mapped (checkpoints are not written in place).
            let st = unsafe { MmapedSafetensors::new(path) }
                .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
            for (name, view) in st.tensors() {
                let entry = Entry {
                    file: i,
                    shape: view.shape().to_vec(),
                };
                if let Some(prev) = entries.insert(name.clone(), entry) {
                    return Err(err(format!(
                        "tensor `{name}` is in both {} and {}",
                        files[prev.file].display(),
                        path.display()
                    )));
                }
            }
            mmaps.push(st);
        }
        Ok(Self {
            inner: Arc::new(WeightsInner {
                files: files.to_vec(),
                mmaps,
                entries,
                used: Mutex::new(BTreeSet::new()),
            }),
        })
    }

    /// The plain (`variant = None`) or variant weights of component folder `dir`.
    pub fn open(dir: &Path, variant: Option<&str>) -> Result<Self> {
        Self::open_files(&weight_files(dir, variant)?)
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.inner.files
    }

    /// Every tensor name in the checkpoint, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.entries.keys().cloned().collect();
        names.sort();
        names
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.inner.entries.get(name).map(|e| e.shape.as_slice())
    }

    fn describe(&self) -> String {
        match self.inner.files.as_slice() {
            [one] => one.display().to_string(),
            files => format!(
                "{} shards in {}",
                files.len(),
                files[0]
                    .parent()
                    .map_or(String::new(), |p| p.display().to_string())
            ),
        }
    }

    /// Loads tensor `name`, checking it against the `expected` shape (when given).
    pub fn load(&self, name: &str, expected: Option<&Shape>, device: &Device) -> Result<Tensor> {
        let entry = self.inner.entries.get(name).ok_or_else(|| {
            err(format!(
                "missing tensor `{name}`{}: not in {}",
                expected.map_or(String::new(), |s| format!(
                    " (the model expects {:?})",
                    s.dims()
                )),
                self.describe()
            ))
        })?;
        let file = &self.inner.files[entry.file];
        if let Some(expected) = expected {
            if entry.shape.as_slice() != expected.dims() {
                return Err(err(format!(
                    "tensor `{name}` has shape {:?} in {}, the model expects {:?}",
                    entry.shape,
                    file.display(),
                    expected.dims()
                )));
            }
        }
        self.inner.used.lock().unwrap().insert(name.to_string());
        self.inner.mmaps[entry.file]
            .load(name, device)
            .map_err(|e| err(format!("cannot load `{name}` from {}: {e}", file.display())))
    }

    /// A VarBuilder over these (frozen) tensors, converted to `dtype` on `device` as they are
    /// requested.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Tensors in the checkpoint that were never loaded, except those whose name ends with
    /// one of `ignore` (e.g. `position_ids` buffers older CLIP checkpoints carry).
    pub fn unused(&self, ignore: &[&str]) -> Vec<String> {
        let used = self.inner.used.lock().unwrap();
        self.names()
            .into_iter()
            .filter(|n| !used.contains(n) && !ignore.iter().any(|s| n.ends_with(s)))
            .collect()
    }

    /// Fails, listing them, when the checkpoint has tensors nothing loaded.
    pub fn check_all_used(&self, ignore: &[&str]) -> Result<()> {
        let unused = self.unused(ignore);
        if unused.is_empty() {
            return Ok(());
        }
        Err(err(format!(
            "{} unexpected tensors in {} (the model does not use them): {}",
            unused.len(),
            self.describe(),
            list(&unused)
        )))
    }
}

fn list(names: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", ... ({} more)", names.len() - SHOWN));
    }
    s
}

impl SimpleBackend for Weights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.load(name, Some(&shape), dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.load(name, None, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.entries.contains_key(name)
    }
}

/// A VarBuilder over the memory-mapped (frozen) weights of component folder `dir`. Missing
/// and mis-shaped tensors fail when the model asks for them; use [`load_model`] to also
/// reject unexpected ones.
pub fn load_var_builder(dir: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    Ok(Weights::open(dir, None)?.var_builder(dtype, device))
}

/// Builds a frozen model from component folder `dir` (`variant` as in [`weight_files`]) and
/// fails if the checkpoint has tensors the model did not use (names ending with one of
/// `ignore` excepted).
pub fn load_model<M>(
    dir: &Path,
    variant: Option<&str>,
    dtype: DType,
    device: &Device,
    ignore: &[&str],
    build: impl FnOnce(VarBuilder<'static>) -> Result<M>,
) -> Result<M> {
    let weights = Weights::open(dir, variant)?;
    let model = build(weights.var_builder(dtype, device))?;
    weights.check_all_used(ignore)?;
    Ok(model)
}

/// Sets every Var of `varmap` (built by constructing the model on it) from the plain weights
/// of component folder `dir`. Every problem is reported at once: missing tensors, unexpected
/// ones, and wrong shapes (with both shapes); nothing is set unless all match.
pub fn load_into_varmap(dir: &Path, varmap: &VarMap) -> Result<()> {
    load_weights_into_varmap(&Weights::open(dir, None)?, varmap, &[])
}

/// [`load_into_varmap`] from already opened weights; checkpoint tensors whose names end with
/// one of `ignore` may be left unused.
pub fn load_weights_into_varmap(weights: &Weights, varmap: &VarMap, ignore: &[&str]) -> Result<()> {
    check_weights_match(weights, varmap, ignore)?;
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        let t = weights.load(name, None, var.device())?;
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Checks, without setting anything, that `weights` has exactly `varmap`'s Vars with their
/// shapes (tensors whose names end with one of `ignore` may be extra); the error lists every
/// problem and names the file.
pub fn check_weights_match(weights: &Weights, varmap: &VarMap, ignore: &[&str]) -> Result<()> {
    let data = varmap.data().lock().unwrap();
    let mut problems = Vec::new();
    let mut vars: Vec<(&String, &candle_core::Var)> = data.iter().collect();
    vars.sort_by(|a, b| a.0.cmp(b.0));
    for (name, var) in &vars {
        match weights.shape(name) {
            None => problems.push(format!(
                "missing tensor `{name}` (the model expects {:?})",
                var.dims()
            )),
            Some(shape) if shape != var.dims() => problems.push(format!(
                "tensor `{name}` has shape {shape:?}, the model expects {:?}",
                var.dims()
            )),
            Some(_) => {}
        }
    }
    let unexpected: Vec<String> = weights
        .names()
        .into_iter()
        .filter(|n| !data.contains_key(n) && !ignore.iter().any(|s| n.ends_with(s)))
        .collect();
    if !unexpected.is_empty() {
        problems.push(format!(
            "{} unexpected tensors (the model has no such Var): {}",
            unexpected.len(),
            list(&unexpected)
        ));
    }
    if !problems.is_empty() {
        let shown: Vec<String> = problems.iter().take(20).cloned().collect();
        return Err(err(format!(
            "{} does not match the model ({} problems): {}",
            weights.describe(),
            problems.len(),
            shown.join("; ")
        )));
    }
    Ok(())
}

/// A VarBuilder backend that records the requested names and shapes and hands out broadcast
/// zeros (no allocation), to list a model's tensors without building it for real.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(String, Shape)>>>);

impl SimpleBackend for Recorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.0
            .lock()
            .unwrap()
            .push((name.to_string(), shape.clone()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        Err(err(format!("tensor `{name}` requested without a shape")))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Every tensor `build` asks its VarBuilder for (name and shape, in construction order),
/// without allocating the model: e.g. `expected_tensors(|vb| AutoencoderKL::new(vb, &cfg))`.
pub fn expected_tensors<M>(
    build: impl FnOnce(VarBuilder<'static>) -> Result<M>,
) -> Result<Vec<(String, Shape)>> {
    let recorder = Recorder::default();
    let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
    build(vb)?;
    let names = recorder.0.lock().unwrap().clone();
    Ok(names)
}
