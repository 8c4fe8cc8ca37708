//! What `collect` reads: a toy run config (`ToyRunConfig`, no `teacher.kind`), or a teacher
//! collection config whose `[teacher]` section names a pipeline `kind` (today `sdxl`; another
//! family is another variant of [`TeacherConfig`] sharing the `[ode_pairs]` section).
//! Every error names its dotted key (docs/configs.md).

use std::path::{Path, PathBuf};

use adm_data::store::StoreDtype;
use adm_train::config::{parse_toml, DEFAULT_CONFIG};
use adm_train::ToyRunConfig;
use anyhow::{bail, Context, Result};
use candle_core::DType;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

/// A config of either kind.
pub enum JobConfig {
    Toy(Box<ToyRunConfig>),
    Teacher(Box<CollectConfig>),
}

/// Only `teacher.kind`, to tell the two kinds apart (a toy teacher has no `kind`).
#[derive(Deserialize)]
struct Probe {
    teacher: Option<ProbeTeacher>,
}

#[derive(Deserialize)]
struct ProbeTeacher {
    kind: Option<IgnoredAny>,
}

impl JobConfig {
    /// Reads `path` (default: the built-in toy config) with `key=value` overrides.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let (text, origin) = match path {
            Some(path) => (
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config {}", path.display()))?,
                path.display().to_string(),
            ),
            None => (
                DEFAULT_CONFIG.to_string(),
                "configs/toy-2d.toml (built in)".to_string(),
            ),
        };
        let probe: Probe = parse_toml(&text, &origin, overrides)?;
        if probe.teacher.and_then(|t| t.kind).is_some() {
            let config: CollectConfig = parse_toml(&text, &origin, overrides)?;
            config.validate()?;
            Ok(Self::Teacher(Box::new(config)))
        } else {
            Ok(Self::Toy(Box::new(ToyRunConfig::parse(
                &text, &origin, overrides,
            )?)))
        }
    }
}

/// A teacher collection: which pipeline, and what to collect from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectConfig {
    pub teacher: TeacherConfig,
    pub ode_pairs: PairsConfig,
}

/// The teacher: a diffusers pipeline of family `kind`, loaded frozen. (One struct rather
/// than an enum tagged by `kind`, so that errors keep the position of their key.)
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    pub kind: TeacherKind,
    /// A pipeline folder, or a hub repo id looked up in the local hub cache (offline).
    pub model: String,
    /// Hub branch, tag or commit (default `main`); not used for a folder.
    #[serde(default)]
    pub revision: Option<String>,
    /// Weight variant, e.g. `fp16` (`*.fp16.safetensors`).
    #[serde(default)]
    pub variant: Option<String>,
    /// Compute dtype of the teacher: f32 or f16 (candle 0.11's CPU backend has no bf16
    /// matmul, and collection runs on the CPU).
    #[serde(default)]
    pub dtype: ComputeDtype,
    /// The negative prompt of classifier-free guidance. Unset: as diffusers, zeros when the
    /// pipeline's `force_zeros_for_empty_prompt` is true, the encoded "" otherwise.
    #[serde(default)]
    pub negative_prompt: Option<String>,
}

/// Pipeline families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TeacherKind {
    /// A diffusers `StableDiffusionXLPipeline` folder (`adm_models::sdxl`).
    Sdxl,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    F32,
    F16,
}

impl ComputeDtype {
    pub fn candle(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
        }
    }
}

/// Image size in pixels: one number (square) or `[height, width]`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Resolution {
    Square(usize),
    HeightWidth([usize; 2]),
}

impl Resolution {
    /// (height, width).
    pub fn size(self) -> (usize, usize) {
        match self {
            Self::Square(s) => (s, s),
            Self::HeightWidth([h, w]) => (h, w),
        }
    }
}

/// What to collect and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairsConfig {
    /// Store directory (`--out` overrides; with `--world-size` > 1 the default is
    /// `<out>/rank-<r>`).
    pub out: PathBuf,
    /// Prompt file: text (one per line) or `.jsonl`. Pair `i` uses prompt `i % len`.
    pub prompts: PathBuf,
    /// Pairs in the whole collection (all ranks).
    pub count: u64,
    /// The ODE solver: the one adm-diffusion has for the teacher's schedule (`ddim` for
    /// SDXL's VP schedule, `euler` for flow schedules).
    #[serde(default = "default_solver")]
    pub solver: String,
    pub steps: usize,
    pub cfg_scale: f64,
    pub resolution: Resolution,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "default_shard_size")]
    pub shard_size: usize,
    /// Seed of every pair's noise (`noise_for_index(seed, i)`).
    #[serde(default)]
    pub seed: u64,
    /// Storage dtype of noise, samples and float conditions (f32, f16 or bf16).
    #[serde(default = "default_store_dtype")]
    pub dtype: StoreDtype,
}

fn default_solver() -> String {
    "ddim".into()
}
fn default_batch_size() -> usize {
    4
}
fn default_shard_size() -> usize {
    256
}
fn default_store_dtype() -> StoreDtype {
    StoreDtype::F16
}

impl CollectConfig {
    pub fn validate(&self) -> Result<()> {
        let p = &self.ode_pairs;
        let (h, w) = p.resolution.size();
        for (key, value) in [
            ("ode_pairs.count", p.count as usize),
            ("ode_pairs.steps", p.steps),
            ("ode_pairs.batch_size", p.batch_size),
            ("ode_pairs.shard_size", p.shard_size),
            ("ode_pairs.resolution", h.min(w)),
        ] {
            if value == 0 {
                bail!("config key `{key}` must be positive");
            }
        }
        if !(p.cfg_scale.is_finite() && p.cfg_scale > 0.0) {
            bail!(
                "config key `ode_pairs.cfg_scale` must be a positive number, got {}",
                p.cfg_scale
            );
        }
        if !p.dtype.is_float() {
            bail!(
                "config key `ode_pairs.dtype` must be f32, f16 or bf16, got {:?}",
                p.dtype
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SDXL: &str = r#"
[teacher]
kind = "sdxl"
model = "stabilityai/stable-diffusion-xl-base-1.0"
dtype = "f16"

[ode_pairs]
out = "runs/sdxl/ode-pairs"
prompts = "prompts.txt"
count = 100
steps = 25
cfg_scale = 5.0
resolution = 1024
"#;

    fn parse(overrides: &[&str]) -> Result<JobConfig> {
        // One file per call: the tests of this module run in parallel in one process.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "adm-collect-config-{}-{call}.toml",
            std::process::id()
        ));
        std::fs::write(&path, SDXL)?;
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let config = JobConfig::load(Some(&path), &overrides);
        std::fs::remove_file(&path)?;
        config
    }

    fn error(overrides: &[&str]) -> String {
        match parse(overrides) {
            Ok(_) => panic!("{overrides:?} parsed"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn a_teacher_kind_selects_the_collection_config_with_defaults() -> Result<()> {
        let JobConfig::Teacher(config) = parse(&[])? else {
            panic!("not a teacher config");
        };
        let pipeline = &config.teacher;
        assert_eq!(pipeline.kind, TeacherKind::Sdxl);
        assert_eq!(pipeline.dtype, ComputeDtype::F16);
        assert_eq!(pipeline.negative_prompt, None);
        let p = &config.ode_pairs;
        assert_eq!(p.resolution.size(), (1024, 1024));
        assert_eq!((p.solver.as_str(), p.batch_size, p.seed), ("ddim", 4, 0));
        assert_eq!(p.dtype, StoreDtype::F16);
        let JobConfig::Teacher(config) = parse(&["ode_pairs.resolution=[768, 1344]"])? else {
            panic!("not a teacher config");
        };
        assert_eq!(config.ode_pairs.resolution.size(), (768, 1344));
        assert!(matches!(JobConfig::load(None, &[])?, JobConfig::Toy(_)));
        Ok(())
    }

    #[test]
    fn the_shipped_sdxl_config_parses() -> Result<()> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/sdxl-ode-pairs.toml");
        let JobConfig::Teacher(config) = JobConfig::load(Some(&path), &[])? else {
            panic!("not a teacher config");
        };
        assert_eq!(config.teacher.variant.as_deref(), Some("fp16"));
        assert_eq!(config.ode_pairs.resolution.size(), (1024, 1024));
        Ok(())
    }

    #[test]
    fn errors_name_the_key() {
        for (overrides, key) in [
            (&["teacher.kind=\"sd9\""][..], "teacher.kind"),
            (&["teacher.modle=\"x\""], "modle"),
            (&["teacher.dtype=\"f8\""], "teacher.dtype"),
            (&["ode_pairs.steps=0"], "ode_pairs.steps"),
            (&["ode_pairs.count=\"many\""], "ode_pairs.count"),
            (&["ode_pairs.cfg_scale=-1.0"], "ode_pairs.cfg_scale"),
            (&["ode_pairs.dtype=\"u32\""], "ode_pairs.dtype"),
            (&["ode_pairs.resolution=0"], "ode_pairs.resolution"),
            (&["ode_pairs.seeds=1"], "ode_pairs.seeds"),
        ] {
            let message = error(overrides);
            assert!(message.contains(key), "{overrides:?}: {message}");
        }
        assert!(error(&["teacher.kind=\"sd9\""]).contains("sdxl"));
    }
}
