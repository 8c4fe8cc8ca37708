//! Training checkpoints (layout in docs/checkpoints.md): a directory `step-{N:08}` per save,
//! written into a temporary directory first (files and directories fsynced, then renamed),
//! with a `latest` pointer file replaced atomically and the last `keep_last` kept.
//!
//! Each network is a diffusers-layout component folder (`<net>/diffusion_pytorch_model.
//! safetensors` with the upstream tensor names, plus `config.json` when given), so
//! `adm_models::loading` reads it like any downloaded model. Optimiser moments sit in
//! `optimizer.safetensors`, everything else in `trainer_state.json`.
//!
//! Loading checks every file, tensor name and shape before it changes anything, and never
//! writes to the checkpoint directory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use adm_models::loading::{check_weights_match, load_weights_into_varmap, Weights};
use adm_models::varmap_tensors;
use anyhow::{bail, Context as _, Result};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::optim::Optimizer;

/// The weights file of every network folder (diffusers' name).
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
pub const LATEST_FILE: &str = "latest";
const FORMAT_VERSION: u32 = 1;

/// One network of a checkpoint: its folder name, its Vars and the config.json to write.
pub struct NetEntry<'a> {
    pub name: &'a str,
    pub varmap: &'a VarMap,
    pub config: Option<serde_json::Value>,
}

/// An optimiser's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptimizerCounters {
    /// Applied steps (AdamW's bias-correction count).
    pub steps: usize,
    /// Steps skipped by the non-finite guard.
    pub skipped: usize,
}

/// `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    pub format_version: u32,
    /// Generator steps completed: training continues with step `step`.
    pub step: usize,
    /// The run seed. Every step draws from a generator seeded by (seed, step), so the seed and
    /// the step are the whole random state.
    pub seed: u64,
    /// Position of the condition source.
    pub data_cursor: u64,
    /// Networks saved, in order (folder names).
    pub nets: Vec<String>,
    pub optimizers: BTreeMap<String, OptimizerCounters>,
    /// The run config the checkpoint was written under (for the record).
    pub config: serde_json::Value,
}

impl TrainerState {
    pub fn new(step: usize, seed: u64, data_cursor: u64, config: serde_json::Value) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            step,
            seed,
            data_cursor,
            nets: Vec::new(),
            optimizers: BTreeMap::new(),
            config,
        }
    }
}

/// The checkpoint folder of a run.
pub struct Checkpoints {
    root: PathBuf,
    keep_last: usize,
}

/// `step-{N:08}`.
pub fn step_dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

fn parse_step_dir(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("step-")?;
    (digits.len() >= 8 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file =
        File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn save_tensors_synced(tensors: &HashMap<String, candle_core::Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", path.display()))
}

impl Checkpoints {
    /// `keep_last`: how many step directories to keep (at least 1).
    pub fn new(root: impl Into<PathBuf>, keep_last: usize) -> Result<Self> {
        if keep_last == 0 {
            bail!("checkpoint keep_last must be at least 1");
        }
        Ok(Self {
            root: root.into(),
            keep_last,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Step directories present, oldest first (temporary ones excluded).
    pub fn list(&self) -> Result<Vec<(usize, PathBuf)>> {
        if !self.root.exists() {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.root)
            .with_context(|| format!("cannot list {}", self.root.display()))?
        {
            let entry = entry?;
            if let Some(step) = entry.file_name().to_str().and_then(parse_step_dir) {
                if entry.path().is_dir() {
                    found.push((step, entry.path()));
                }
            }
        }
        found.sort();
        Ok(found)
    }

    /// The directory `latest` names, if a checkpoint was written.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        let pointer = self.root.join(LATEST_FILE);
        if !pointer.exists() {
            return Ok(None);
        }
        let name = std::fs::read_to_string(&pointer)
            .with_context(|| format!("cannot read {}", pointer.display()))?;
        let name = name.trim();
        if parse_step_dir(name).is_none() {
            bail!(
                "{} should name a step-NNNNNNNN directory, it holds `{name}`",
                pointer.display()
            );
        }
        let dir = self.root.join(name);
        if !dir.is_dir() {
            bail!(
                "{} names {}, which does not exist",
                pointer.display(),
                dir.display()
            );
        }
        Ok(Some(dir))
    }

    /// Writes checkpoint `state.step` atomically, points `latest` at it and removes the
    /// oldest beyond `keep_last`. Returns its directory.
    pub fn save(
        &self,
        mut state: TrainerState,
        nets: &[NetEntry],
        optimizers: &[&Optimizer],
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create {}", self.root.display()))?;
        let name = step_dir_name(state.step);
        let tmp = self
            .root
            .join(format!(".tmp-{name}-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;

        state.nets = nets.iter().map(|n| n.name.to_string()).collect();
        for net in nets {
            let dir = tmp.join(net.name);
            std::fs::create_dir(&dir)?;
            save_tensors_synced(&varmap_tensors(net.varmap), &dir.join(WEIGHTS_FILE))?;
            if let Some(config) = &net.config {
                write_synced(
                    &dir.join(CONFIG_FILE),
                    serde_json::to_string_pretty(config)?.as_bytes(),
                )?;
            }
            sync_dir(&dir)?;
        }
        let mut moments = HashMap::new();
        for opt in optimizers {
            let (steps, skipped) = opt.counters();
            state
                .optimizers
                .insert(opt.name().to_string(), OptimizerCounters { steps, skipped });
            for (tensor, value) in opt.state_tensors() {
                moments.insert(format!("{}.{tensor}", opt.name()), value);
            }
        }
        save_tensors_synced(&moments, &tmp.join(OPTIMIZER_FILE))?;
        write_synced(
            &tmp.join(STATE_FILE),
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;
        sync_dir(&tmp)?;

        let dir = self.root.join(&name);
        if dir.exists() {
            // Left by a run that went past this step before it was stopped and resumed from
            // an earlier checkpoint: this run's save replaces it.
            let stale = self
                .root
                .join(format!(".stale-{name}-{}", std::process::id()));
            std::fs::rename(&dir, &stale)?;
            std::fs::rename(&tmp, &dir)?;
            std::fs::remove_dir_all(&stale)?;
        } else {
            std::fs::rename(&tmp, &dir)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
        }
        sync_dir(&self.root)?;

        let pointer_tmp = self.root.join(format!(".{LATEST_FILE}.tmp"));
        write_synced(&pointer_tmp, format!("{name}\n").as_bytes())?;
        std::fs::rename(&pointer_tmp, self.root.join(LATEST_FILE))?;
        sync_dir(&self.root)?;

        let all = self.list()?;
        let excess = all.len().saturating_sub(self.keep_last);
        for (_, old) in all.iter().take(excess).filter(|(_, p)| p != &dir) {
            std::fs::remove_dir_all(old)
                .with_context(|| format!("cannot remove old checkpoint {}", old.display()))?;
        }
        Ok(dir)
    }
}

/// Loads checkpoint `dir` into `nets` and `optimizers`. Every file, tensor name and shape is
/// checked first; on any problem nothing is changed and the error names the file (and
/// tensor).
pub fn load(
    dir: &Path,
    nets: &[NetEntry],
    optimizers: &mut [&mut Optimizer],
) -> Result<TrainerState> {
    if !dir.is_dir() {
        bail!("checkpoint {} does not exist", dir.display());
    }
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).with_context(|| {
        format!(
            "checkpoint {}: cannot read the trainer state {}",
            dir.display(),
            state_path.display()
        )
    })?;
    let state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("cannot parse {}", state_path.display()))?;
    if state.format_version != FORMAT_VERSION {
        bail!(
            "{}: format_version {} (this build reads {FORMAT_VERSION})",
            state_path.display(),
            state.format_version
        );
    }
    let wanted: Vec<&str> = nets.iter().map(|n| n.name).collect();
    if state.nets != wanted {
        bail!(
            "{}: the checkpoint holds networks {:?}, this run has {wanted:?}",
            state_path.display(),
            state.nets
        );
    }

    let mut weights = Vec::with_capacity(nets.len());
    for net in nets {
        let w = Weights::open_files(&[dir.join(net.name).join(WEIGHTS_FILE)])?;
        check_weights_match(&w, net.varmap, &[])?;
        weights.push(w);
    }
    let opt_path = dir.join(OPTIMIZER_FILE);
    let moments = Weights::open_files(std::slice::from_ref(&opt_path))?;
    let mut expected = std::collections::BTreeSet::new();
    for opt in optimizers.iter() {
        if !state.optimizers.contains_key(opt.name()) {
            bail!(
                "{}: no counters for optimiser `{}`",
                state_path.display(),
                opt.name()
            );
        }
        for (tensor, shape) in opt.state_shapes() {
            let name = format!("{}.{tensor}", opt.name());
            match moments.shape(&name) {
                None => bail!("{}: missing tensor `{name}`", opt_path.display()),
                Some(have) if have != shape.as_slice() => bail!(
                    "{}: tensor `{name}` has shape {have:?}, the optimiser expects {shape:?}",
                    opt_path.display()
                ),
                Some(_) => {}
            }
            expected.insert(name);
        }
    }
    if let Some(extra) = moments.names().into_iter().find(|n| !expected.contains(n)) {
        bail!(
            "{}: unexpected tensor `{extra}` (no optimiser of this run has it)",
            opt_path.display()
        );
    }

    for (net, w) in nets.iter().zip(&weights) {
        load_weights_into_varmap(w, net.varmap, &[])?;
    }
    for opt in optimizers.iter_mut() {
        let prefix = format!("{}.", opt.name());
        let tensors = moments
            .names()
            .into_iter()
            .filter_map(|n| n.strip_prefix(&prefix).map(str::to_string).map(|k| (n, k)))
            .map(|(full, short)| Ok((short, moments.load(&full, None, &candle_core::Device::Cpu)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        let c = state.optimizers[opt.name()];
        opt.restore(tensors, (c.steps, c.skipped))?;
    }
    Ok(state)
}
