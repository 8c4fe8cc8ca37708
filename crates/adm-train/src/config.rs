//! The typed run configuration, read from TOML with `--set key=value` overrides.
//!
//! Every error names the offending key: unknown keys and bad types come from serde with the
//! dotted path of the line they sit on, semantic checks (`validate`) name their field.

use std::path::{Path, PathBuf};

use adm_data::toy::MixtureConfig;
use adm_diffusion::{ScheduleConfig, TimestepDistribution};
use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The default job's config, built into the binary so `adm-train` runs from any directory.
pub const DEFAULT_CONFIG: &str = include_str!("../../../configs/toy-2d.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToyRunConfig {
    /// Seeds every random draw of the run (weights, noise, timesteps, data).
    pub seed: u64,
    /// Where the teacher, the ODE-pair store, students, metrics and plots go.
    pub run_dir: PathBuf,
    /// Which rows of the results table to produce, in order.
    pub methods: Vec<Method>,
    pub data: MixtureConfig,
    pub schedule: ScheduleConfig,
    pub model: ModelConfig,
    pub teacher: TeacherConfig,
    pub ode_pairs: OdePairsConfig,
    pub student: StudentConfig,
    pub mse: MseConfig,
    pub adp: AdpConfig,
    pub dmd: DmdConfig,
    pub adm: AdmConfig,
    pub eval: EvalConfig,
}

/// A row of the paper's Table 4 (plus multi-step ADM), on the toy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Method {
    /// A1: MSE regression on the ODE pairs (rectified-flow / DMD2 pre-training).
    #[serde(rename = "mse")]
    Mse,
    /// A5: ADP only.
    #[serde(rename = "adp")]
    Adp,
    /// B2: DMD from the teacher initialisation.
    #[serde(rename = "dmd")]
    Dmd,
    /// B3: DMD after ADP.
    #[serde(rename = "adp+dmd")]
    AdpDmd,
    /// B1: ADM from the teacher initialisation.
    #[serde(rename = "adm")]
    Adm,
    /// B4: DMDX = ADP then ADM.
    #[serde(rename = "dmdx")]
    Dmdx,
    /// Multi-step ADM without ADP (the paper's SD3 / CogVideoX setting).
    #[serde(rename = "adm-multistep")]
    AdmMultistep,
}

impl Method {
    /// The config sections a method's student depends on beyond the teacher's (the probe
    /// schedule in `eval` shapes the recorded DMD trace).
    pub fn sections(self) -> &'static [&'static str] {
        match self {
            Method::Mse => &["student", "ode_pairs", "mse"],
            Method::Adp => &["student", "ode_pairs", "adp"],
            Method::Dmd => &["student", "dmd", "eval"],
            Method::AdpDmd => &["student", "ode_pairs", "adp", "dmd", "eval"],
            Method::Adm | Method::AdmMultistep => &["student", "adm", "dmd", "eval"],
            Method::Dmdx => &["student", "ode_pairs", "adp", "adm", "dmd", "eval"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Mse => "mse",
            Method::Adp => "adp",
            Method::Dmd => "dmd",
            Method::AdpDmd => "adp+dmd",
            Method::Adm => "adm",
            Method::Dmdx => "dmdx",
            Method::AdmMultistep => "adm-multistep",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub num_blocks: usize,
    pub time_embed_dim: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Probability of replacing the class by the null class, so that CFG works.
    pub condition_dropout: f64,
    /// CFG scale of the teacher wherever it acts as the real score or makes ODE pairs.
    pub cfg_scale: f64,
    /// Steps of the deterministic sampler for teacher samples and ODE pairs.
    pub sampling_steps: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OdePairsConfig {
    pub count: usize,
    pub batch_size: usize,
    pub shard_size: usize,
    /// Prompts (text: one per line, or JSONL with `prompt`) cycled over the pairs; for the
    /// toy each prompt is a class id. Unset: classes drawn from the data's class prior.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<PathBuf>,
}

/// How a student's network output becomes x0 (METHOD.md [choice]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StudentOutput {
    /// ADP's reading: the input sits on the straight line x_s = (1 - s) x0 + s z and the
    /// output is the velocity z - x0, so x0 = x_s - s v.
    Velocity,
    /// The teacher's own parameterisation, with the line point mapped to the schedule's
    /// sample of equal signal-to-noise ratio.
    Native,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentConfig {
    pub output: StudentOutput,
    pub batch_size: usize,
    /// Line times s (1 = pure noise) of the multi-step student, descending.
    pub multistep: Vec<f64>,
    /// Gradient-norm clip for every network (DMD2: 10).
    pub grad_clip: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MseConfig {
    pub steps: usize,
    pub learning_rate: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdpConfig {
    pub steps: usize,
    pub lr_generator: f64,
    pub lr_discriminator: f64,
    /// Weight of the latent discriminator (paper: 0.85).
    pub lambda_latent: f64,
    /// Weight of the pixel discriminator (paper: 0.15).
    pub lambda_pixel: f64,
    /// Generator line times (paper: cubic, biased to high noise).
    pub generator_timesteps: TimestepDistribution,
    /// Re-noising times of the latent discriminator (paper: uniform).
    pub discriminator_timesteps: TimestepDistribution,
    pub taps: Vec<String>,
    pub head_hidden: usize,
    /// Width and depth of the toy's independent random "pixel" feature network.
    pub pixel_width: usize,
    pub pixel_depth: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmdConfig {
    pub steps: usize,
    pub lr_generator: f64,
    pub lr_fake: f64,
    /// Fake-score updates per generator update (DMD2: 5).
    pub fake_updates: usize,
    /// Noise levels of the DMD gradient, as unit times (DMD2: 0.02 .. 0.98).
    pub timesteps: TimestepDistribution,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmConfig {
    pub steps: usize,
    pub lr_generator: f64,
    pub lr_fake: f64,
    pub lr_discriminator: f64,
    /// Fake-score and discriminator updates per generator update (paper: 1).
    pub ttur: usize,
    /// The flow step is T / flow_divisions (paper: 64).
    pub flow_divisions: usize,
    pub taps: Vec<String>,
    pub head_hidden: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Samples per method, and teacher reference samples.
    pub samples: usize,
    /// Record the DMD loss every this many generator steps (the paper's Fig. 3).
    pub probe_every: usize,
    /// Half-width of the square plotted in samples.png.
    pub plot_extent: f32,
}

impl ToyRunConfig {
    /// Parses `text` (the file at `origin`, for messages), applies `key=value` overrides
    /// and validates.
    pub fn parse(text: &str, origin: &str, overrides: &[String]) -> Result<Self> {
        let config: Self = parse_toml(text, origin, overrides)?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config {}", path.display()))?;
                Self::parse(&text, &path.display().to_string(), overrides)
            }
            None => Self::parse(DEFAULT_CONFIG, "configs/toy-2d.toml (built in)", overrides),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("teacher.steps", self.teacher.steps),
            ("teacher.batch_size", self.teacher.batch_size),
            ("teacher.sampling_steps", self.teacher.sampling_steps),
            ("ode_pairs.count", self.ode_pairs.count),
            ("ode_pairs.batch_size", self.ode_pairs.batch_size),
            ("ode_pairs.shard_size", self.ode_pairs.shard_size),
            ("student.batch_size", self.student.batch_size),
            ("mse.steps", self.mse.steps),
            ("adp.steps", self.adp.steps),
            ("adp.head_hidden", self.adp.head_hidden),
            ("dmd.steps", self.dmd.steps),
            ("dmd.fake_updates", self.dmd.fake_updates),
            ("adm.steps", self.adm.steps),
            ("adm.ttur", self.adm.ttur),
            ("adm.flow_divisions", self.adm.flow_divisions),
            ("adm.head_hidden", self.adm.head_hidden),
            ("eval.samples", self.eval.samples),
            ("eval.probe_every", self.eval.probe_every),
        ];
        ensure_positive_counts(&positive)?;
        let rates = [
            ("teacher.learning_rate", self.teacher.learning_rate),
            ("mse.learning_rate", self.mse.learning_rate),
            ("adp.lr_generator", self.adp.lr_generator),
            ("adp.lr_discriminator", self.adp.lr_discriminator),
            ("dmd.lr_generator", self.dmd.lr_generator),
            ("dmd.lr_fake", self.dmd.lr_fake),
            ("adm.lr_generator", self.adm.lr_generator),
            ("adm.lr_fake", self.adm.lr_fake),
            ("adm.lr_discriminator", self.adm.lr_discriminator),
            ("student.grad_clip", self.student.grad_clip),
            ("teacher.cfg_scale", self.teacher.cfg_scale),
        ];
        ensure_positive_rates(&rates)?;
        if !(0.0..1.0).contains(&self.teacher.condition_dropout) {
            bail!(
                "config key `teacher.condition_dropout` must be in [0, 1), got {}",
                self.teacher.condition_dropout
            );
        }
        for (key, value) in [
            ("adp.lambda_latent", self.adp.lambda_latent),
            ("adp.lambda_pixel", self.adp.lambda_pixel),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                bail!("config key `{key}` must be >= 0, got {value}");
            }
        }
        let steps = &self.student.multistep;
        if steps.is_empty()
            || steps.iter().any(|s| !(*s > 0.0 && *s <= 1.0))
            || steps.windows(2).any(|w| w[1] >= w[0])
        {
            bail!("config key `student.multistep` must be a non-empty descending list in (0, 1], got {steps:?}");
        }
        if self.methods.is_empty() {
            bail!("config key `methods` lists no method");
        }
        for (key, dist) in [
            ("adp.generator_timesteps", &self.adp.generator_timesteps),
            (
                "adp.discriminator_timesteps",
                &self.adp.discriminator_timesteps,
            ),
            ("dmd.timesteps", &self.dmd.timesteps),
        ] {
            dist.validate()
                .with_context(|| format!("config key `{key}`"))?;
        }
        adm_data::toy::GaussianMixture::new(&self.data).context("config section `data`")?;
        adm_diffusion::Schedule::new(&self.schedule).context("config section `schedule`")?;
        Ok(())
    }
}

/// Parses the TOML document `text` (the file at `origin`, for messages) with `key=value`
/// overrides applied into `T`; unknown keys and bad types are errors naming the dotted key.
pub fn parse_toml<T: DeserializeOwned>(
    text: &str,
    origin: &str,
    overrides: &[String],
) -> Result<T> {
    let mut table: toml::Table =
        toml::from_str(text).with_context(|| format!("{origin} is not valid TOML"))?;
    for assignment in overrides {
        apply_override(&mut table, assignment)?;
    }
    // Re-parse the merged document as text so that serde errors carry a line, from which the
    // dotted key is recovered.
    let merged = toml::to_string(&table)?;
    toml::from_str(&merged).map_err(|e| {
        let key = e
            .span()
            .map(|span| dotted_key_at(&merged, span.start))
            .unwrap_or_default();
        anyhow::anyhow!("{origin}: config key `{key}`: {}", e.message())
    })
}

/// Applies `a.b.c=value`; the value is read as TOML (numbers, booleans, arrays, inline
/// tables) and otherwise taken as a string.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .with_context(|| format!("--set {assignment}: expected key=value"))?;
    let key = key.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut parsed) => parsed.remove("v").expect("the key was just written"),
        Err(_) => toml::Value::String(raw.trim().to_string()),
    };
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts
        .pop()
        .filter(|k| !k.is_empty())
        .with_context(|| format!("--set {assignment}: empty key"))?;
    let mut node = table;
    for (depth, part) in parts.iter().enumerate() {
        node = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| {
                format!(
                    "--set {key}: `{}` is not a table",
                    parts[..=depth].join(".")
                )
            })?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

/// The dotted key of the line holding byte `offset` of a TOML document written by `toml`
/// (headers `[a.b]`, then `key = value` lines).
fn dotted_key_at(document: &str, offset: usize) -> String {
    let mut section = String::new();
    let mut key = String::new();
    let mut position = 0;
    for line in document.split_inclusive('\n') {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            section = trimmed.trim_matches(|c| c == '[' || c == ']').to_string();
            key.clear();
        } else if let Some((k, _)) = trimmed.split_once('=') {
            key = k.trim().to_string();
        }
        position += line.len();
        if position > offset {
            break;
        }
    }
    match (section.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => section,
        (false, false) => format!("{section}.{key}"),
    }
}

/// Each `(key, count)` is positive, else an error naming the key.
pub fn ensure_positive_counts(counts: &[(&str, usize)]) -> Result<()> {
    for &(key, value) in counts {
        if value == 0 {
            bail!("config key `{key}` must be positive");
        }
    }
    Ok(())
}

/// Each `(key, value)` is a finite positive number, else an error naming the key.
pub fn ensure_positive_rates(rates: &[(&str, f64)]) -> Result<()> {
    for &(key, value) in rates {
        if !(value.is_finite() && value > 0.0) {
            bail!("config key `{key}` must be a positive number, got {value}");
        }
    }
    Ok(())
}

/// Peeks at the top-level `job` key of a TOML document (absent: `None`), which selects the
/// job: none the 2D toy, `"toy-digits"` the digits toy, `"distill"` a recipe.
pub fn job_of(text: &str, origin: &str) -> Result<Option<String>> {
    let table: toml::Table =
        toml::from_str(text).with_context(|| format!("{origin} is not valid TOML"))?;
    match table.get("job") {
        None => Ok(None),
        Some(toml::Value::String(job)) => Ok(Some(job.clone())),
        Some(other) => bail!("{origin}: config key `job` must be a string, got {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_is_peeked_without_parsing_the_rest() {
        assert_eq!(
            job_of("job = \"distill\"\nx = 1", "t").unwrap().as_deref(),
            Some("distill")
        );
        assert_eq!(job_of(DEFAULT_CONFIG, "t").unwrap(), None);
        let err = job_of("job = 3", "t").unwrap_err();
        assert!(format!("{err:#}").contains("`job`"));
    }

    #[test]
    fn the_default_config_parses() {
        let config = ToyRunConfig::load(None, &[]).unwrap();
        assert!(config.methods.contains(&Method::Dmdx));
    }

    #[test]
    fn unknown_key_is_named_with_its_section() {
        let err = ToyRunConfig::load(None, &["adm.learning_rte=0.1".into()]).unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("adm.learning_rte"), "{message}");
    }

    #[test]
    fn bad_value_type_is_named() {
        let err = ToyRunConfig::load(None, &["teacher.steps=\"many\"".into()]).unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("teacher.steps"), "{message}");
    }

    #[test]
    fn semantic_check_names_the_key() {
        let err = ToyRunConfig::load(None, &["adm.ttur=0".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("adm.ttur"));
        let err = ToyRunConfig::load(None, &["student.multistep=[0.5, 0.75]".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("student.multistep"));
    }

    #[test]
    fn overrides_reach_nested_fields() {
        let config = ToyRunConfig::load(
            None,
            &[
                "adm.steps=7".into(),
                "data.layout={kind=\"grid\", rows=2, cols=4, spacing=1.0}".into(),
                "run_dir=/tmp/x".into(),
            ],
        )
        .unwrap();
        assert_eq!(config.adm.steps, 7);
        assert_eq!(config.run_dir, PathBuf::from("/tmp/x"));
        assert!(matches!(
            config.data.layout,
            adm_data::toy::MixtureLayout::Grid { rows: 2, .. }
        ));
    }
}
