//! Distillation recipes for real models (`job = "distill"`): the model family and its
//! pretrained pipeline, precision, data-parallel world size, ADP's pixel discriminator, the
//! data stores and an ordered list of stages, each an [`EngineConfig`].
//!
//! [`Recipe::dry_run`] builds every network of the recipe from the real model configurations
//! on a VarBuilder that hands out zero-stride broadcasts (`adm_models::loading::
//! expected_tensors`): nothing is allocated, and the parameter counts are exact.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use adm_models::conv_heads::{ConvHeadConfig, ConvHeadSet, HeadDims};
use adm_models::loading::{
    expected_tensors, load_model, read_config, resolve_model, ModelIndex, Weights,
};
use adm_models::{
    clip, cogvideox, cogvideox_vae, dinov2, mmdit, sam, t5, unet_2d, vae, FeatureExtractor,
    FeatureTap, InDtype, PixelDiscriminator,
};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Shape};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::parse_toml;
use crate::engine::{EngineConfig, EngineMethod, PixelNets};

/// The value of the top-level `job` key that selects a recipe.
pub const JOB: &str = "distill";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Always `"distill"` (the key that tells recipes from other jobs' configs).
    pub job: String,
    /// Checkpoints, logs and samples of every stage, one folder per stage.
    pub run_dir: PathBuf,
    pub model: ModelSection,
    pub parallel: ParallelSection,
    /// ADP's pixel encoder (needed by `adp` stages with `adp.lambda_pixel > 0`; the layers it
    /// is read at and the heads are the stage's `engine.adp.pixel_layers` / `pixel_heads`).
    #[serde(default)]
    pub pixel_discriminator: Option<PixelDiscriminatorSection>,
    pub data: DataSection,
    /// Run in order; each stage starts from the previous stage's generator.
    pub stages: Vec<Stage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// SDXL base: UNet, VAE, CLIP-L and bigG text encoders.
    Sdxl,
    /// SD3 / SD3.5: MMDiT transformer, 16-channel VAE, CLIP-L, bigG, T5-XXL.
    Sd3,
    /// CogVideoX: 3D transformer, causal video VAE (decoder), T5-XXL.
    Cogvideox,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sdxl => "sdxl",
            Family::Sd3 => "sd3",
            Family::Cogvideox => "cogvideox",
        }
    }
}

/// The compute dtype; trainable networks keep f32 master weights whatever it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    pub fn bytes(self) -> u64 {
        self.dtype().size_in_bytes() as u64
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub family: Family,
    /// A diffusers pipeline folder, or a hub repo id looked up in the local hub cache. When
    /// neither holds it, the dry run uses the copies of the published configs in
    /// configs/models/<repo name> (built into the binary).
    pub pretrained: String,
    pub precision: Precision,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelSection {
    /// Data-parallel processes (one per GPU). Every GPU holds all weights; each stage's
    /// `engine.batch_size` is the per-GPU micro-batch.
    pub world_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelEncoder {
    /// SAM's ViT image encoder (the paper's choice).
    Sam,
    /// DINOv2 (the paper's ablation).
    Dinov2,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PixelDiscriminatorSection {
    pub encoder: PixelEncoder,
    /// SAM: `vit_b`, `vit_l`, `vit_h`; DINOv2: `vit_s`, `vit_b`, `vit_l`, `vit_g`.
    pub variant: String,
    /// A checkpoint folder or hub id; default facebook/sam-vit-{base,large,huge} or
    /// facebook/dinov2-{small,base,large,giant}.
    #[serde(default)]
    pub pretrained: Option<String>,
    /// DINOv2 only: (height, width) the decoded images are resized to (unset: as decoded).
    #[serde(default)]
    pub input_size: Option<[usize; 2]>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// The ODE-pair store (`adm-collect-ode-pairs`) that ADP trains on.
    #[serde(default)]
    pub ode_pairs: Option<PathBuf>,
    /// Pre-encoded prompts (conditions) that ADM / DMD stages draw from.
    #[serde(default)]
    pub conditions: Option<PathBuf>,
    /// The negative prompt of the teacher's classifier-free guidance in ADM / DMD stages
    /// (none: the pipeline's empty-prompt rule, as `adm-collect-ode-pairs` applies it).
    #[serde(default)]
    pub negative_prompt: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub name: String,
    pub engine: EngineConfig,
}

impl Recipe {
    /// Parses `text` (the file at `origin`, for messages) with `key=value` overrides and
    /// validates what needs no model config.
    pub fn parse(text: &str, origin: &str, overrides: &[String]) -> Result<Self> {
        let recipe: Self = parse_toml(text, origin, overrides)?;
        recipe.validate().with_context(|| origin.to_string())?;
        Ok(recipe)
    }

    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.job == JOB,
            "config key `job` must be \"{JOB}\" for a recipe, got {:?}",
            self.job
        );
        ensure!(
            self.parallel.world_size > 0,
            "config key `parallel.world_size` must be positive"
        );
        ensure!(
            !self.stages.is_empty(),
            "config key `stages` lists no stage"
        );
        for (i, stage) in self.stages.iter().enumerate() {
            let key = format!("stages[{i}]");
            ensure!(
                !stage.name.is_empty() && self.stages[..i].iter().all(|s| s.name != stage.name),
                "config key `{key}.name` must be non-empty and unique, got {:?}",
                stage.name
            );
            stage
                .engine
                .validate()
                .with_context(|| format!("config key `{key}.engine` (stage `{}`)", stage.name))?;
            let wants_video = self.model.family == Family::Cogvideox;
            ensure!(
                (stage.engine.heads.dims == HeadDims::Video) == wants_video,
                "config key `{key}.engine.heads.dims` must be \"{}\" for family {}",
                if wants_video { "3d" } else { "2d" },
                self.model.family.name()
            );
            let method = stage.engine.method;
            let (key, store) = if method.uses_pairs() {
                ("data.ode_pairs", &self.data.ode_pairs)
            } else {
                ("data.conditions", &self.data.conditions)
            };
            ensure!(
                store.is_some(),
                "config key `{key}` is needed by stage `{}` ({})",
                stage.name,
                method.name()
            );
            ensure!(
                !uses_pixel(&stage.engine) || self.pixel_discriminator.is_some(),
                "config section `pixel_discriminator` is needed by stage `{}` (adp with \
                 lambda_pixel > 0)",
                stage.name
            );
        }
        if let Some(pixel) = &self.pixel_discriminator {
            pixel_repo(pixel)?;
            ensure!(
                pixel.input_size.is_none() || pixel.encoder == PixelEncoder::Dinov2,
                "config key `pixel_discriminator.input_size` applies to dinov2 only (SAM takes \
                 its image_size)"
            );
        }
        Ok(())
    }

    /// Builds every network of the recipe without allocating weights (exact parameter
    /// counts) and estimates each stage's memory per GPU.
    pub fn dry_run(&self) -> Result<DryRun> {
        let configs = ModelConfigs::resolve(&self.model.pretrained)?;
        let parts = FamilyParts::build(self.model.family, &configs)?;
        let mut run = DryRun {
            family: self.model.family,
            precision: self.model.precision,
            world_size: self.parallel.world_size,
            config_source: configs.describe(),
            networks: Vec::new(),
            stages: Vec::new(),
        };
        // Prompts are encoded into the condition store before training: never resident.
        for encoder in parts.text_encoders {
            run.add(encoder);
        }
        let backbone = &parts.backbone;
        let teacher = run.add(backbone.network("teacher", Role::Frozen));
        // Generator and fake score start from the teacher's weights: same architecture.
        let generator = run.add(backbone.network("generator", Role::Trainable));
        let vae = run.add(parts.vae);
        let mut pixel_encoder: Option<(usize, PixelModel)> = None;
        let mut fake_score = None;
        for (i, stage) in self.stages.iter().enumerate() {
            let engine = &stage.engine;
            backbone.check_latent_shape(&engine.latent_shape, i)?;
            let mut resident = vec![teacher, generator];
            if engine.method.uses_fake_score() {
                if fake_score.is_none() {
                    fake_score = Some(run.add(backbone.network("fake_score", Role::Trainable)));
                }
                resident.extend(fake_score);
            }
            let latent_heads = match engine.method {
                EngineMethod::Adm => true,
                EngineMethod::Adp => engine.adp.lambda_latent > 0.0,
                EngineMethod::Dmd | EngineMethod::Mse => false,
            };
            if latent_heads {
                let channels = backbone.tap_channels(&engine.taps, i)?;
                let params = count(|vb| ConvHeadSet::new(&channels, &engine.heads, vb))
                    .with_context(|| format!("config key `stages[{i}].engine.heads`"))?;
                resident.push(run.add(Network {
                    name: format!("{}.latent_heads", stage.name),
                    class: format!("{} conv heads on the teacher", channels.len()),
                    role: Role::Heads,
                    params,
                }));
            }
            if uses_pixel(engine) {
                let section = self.pixel_discriminator.as_ref().with_context(|| {
                    format!(
                        "config section `pixel_discriminator` is needed by stage `{}`",
                        stage.name
                    )
                })?;
                let (index, encoder) = match &pixel_encoder {
                    Some(built) => built.clone(),
                    None => {
                        let (network, encoder) = pixel_encoder_network(section)?;
                        let built = (run.add(network), encoder);
                        pixel_encoder = Some(built.clone());
                        built
                    }
                };
                let heads = engine.adp.pixel_heads.as_ref().unwrap_or(&engine.heads);
                let params =
                    count(|vb| encoder.discriminator(section, &engine.adp.pixel_layers, heads, vb))
                        .with_context(|| {
                            format!(
                                "config key `stages[{i}].engine.adp.pixel_layers` / `pixel_heads`"
                            )
                        })?;
                resident.extend([vae, index]);
                resident.push(run.add(Network {
                    name: format!("{}.pixel_heads", stage.name),
                    class: format!(
                        "{} conv heads on {}",
                        engine.adp.pixel_layers.len(),
                        encoder.name()
                    ),
                    role: Role::Heads,
                    params,
                }));
            }
            run.stages.push(StageEstimate {
                name: stage.name.clone(),
                method: engine.method,
                resident,
                micro_batch: engine.batch_size,
                grad_accumulation: engine.grad_accumulation,
            });
        }
        Ok(run)
    }
}

impl Recipe {
    /// ADP's frozen pixel discriminator backbone: the pipeline's VAE (its `vae` component) and
    /// the pixel encoder read after `layers`, both in the recipe's precision.
    pub(crate) fn pixel_nets(
        &self,
        section: &PixelDiscriminatorSection,
        pipeline: &Path,
        layers: &[usize],
        device: &Device,
    ) -> Result<PixelNets> {
        let dtype = self.model.precision.dtype();
        let vae_dir = ModelIndex::read(pipeline)?.component_dir(pipeline, "vae")?;
        let vae_cfg: vae::Config = read_config(&vae_dir)?;
        let vae = load_model(&vae_dir, None, dtype, device, &[], |vb| {
            vae::AutoencoderKL::new(vb, &vae_cfg)
        })?;
        let (cfg, folder) = pixel_config(section)?;
        let dir = folder.with_context(|| {
            format!(
                "config key `pixel_discriminator.pretrained`: `{}` is not a local folder nor \
                 in the hub cache",
                pixel_id(section).unwrap_or_default()
            )
        })?;
        let weights = Weights::open(&dir, None)?;
        let encoder = match cfg {
            PixelConfig::Sam(cfg) => {
                PixelModel::Sam(Arc::new(sam::load_frozen(&weights, &cfg, dtype, device)?))
            }
            PixelConfig::Dinov2(cfg) => PixelModel::Dinov2(Arc::new(dinov2::load_frozen(
                &weights, &cfg, dtype, device,
            )?)),
        };
        Ok(PixelNets {
            decoder: Arc::new(InDtype::new(vae, dtype)),
            extractor: Arc::new(InDtype::new(encoder.extractor(section, layers)?, dtype)),
        })
    }
}

/// The parameter count of whatever `build` constructs, from the tensors it asks for (each
/// name once), without allocating them.
pub fn count<M>(build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>) -> Result<u64> {
    let tensors = expected_tensors(build)?;
    let unique: BTreeMap<String, Shape> = tensors.into_iter().collect();
    Ok(unique.values().map(|s| s.elem_count() as u64).sum())
}

/// The published configs this crate carries (configs/models/<repo>/<component>/config.json),
/// for hub ids that are not in the local hub cache. Verified by scripts/count_recipe_params.py.
macro_rules! built_in {
    ($($repo:literal / $component:literal),* $(,)?) => {
        &[$(($repo, $component, include_str!(concat!(
            "../../../configs/models/", $repo, "/", $component, "/config.json"
        )))),*]
    };
}

const BUILT_IN: &[(&str, &str, &str)] = built_in![
    "stable-diffusion-xl-base-1.0" / "unet",
    "stable-diffusion-xl-base-1.0" / "vae",
    "stable-diffusion-xl-base-1.0" / "text_encoder",
    "stable-diffusion-xl-base-1.0" / "text_encoder_2",
    "stable-diffusion-3-medium-diffusers" / "transformer",
    "stable-diffusion-3-medium-diffusers" / "vae",
    "stable-diffusion-3-medium-diffusers" / "text_encoder",
    "stable-diffusion-3-medium-diffusers" / "text_encoder_2",
    "stable-diffusion-3-medium-diffusers" / "text_encoder_3",
    "stable-diffusion-3.5-large" / "transformer",
    "stable-diffusion-3.5-large" / "vae",
    "stable-diffusion-3.5-large" / "text_encoder",
    "stable-diffusion-3.5-large" / "text_encoder_2",
    "stable-diffusion-3.5-large" / "text_encoder_3",
    "CogVideoX-2b" / "transformer",
    "CogVideoX-2b" / "vae",
    "CogVideoX-2b" / "text_encoder",
    "CogVideoX-5b" / "transformer",
    "CogVideoX-5b" / "vae",
    "CogVideoX-5b" / "text_encoder",
    "sam-vit-base" / "vision_config",
    "sam-vit-large" / "vision_config",
    "sam-vit-huge" / "vision_config",
];

/// Where a model's component configs come from.
enum ModelConfigs {
    /// A pipeline folder (local, or a hub-cache snapshot): read as real runs read it.
    Folder(PathBuf),
    /// A hub id absent from the hub cache whose repo name has a built-in copy.
    BuiltIn(String),
}

impl ModelConfigs {
    fn resolve(pretrained: &str) -> Result<Self> {
        match resolve_model(pretrained, None) {
            Ok(dir) => Ok(Self::Folder(dir)),
            Err(e) => {
                // Only hub ids (`org/name`) fall back; a missing folder stays an error.
                let repo = match pretrained.split_once('/') {
                    Some((org, name))
                        if !org.is_empty() && !org.starts_with('.') && !name.contains('/') =>
                    {
                        Some(name)
                    }
                    _ => None,
                };
                match repo.filter(|r| BUILT_IN.iter().any(|(b, _, _)| b == r)) {
                    Some(repo) => Ok(Self::BuiltIn(repo.to_string())),
                    None => Err(anyhow::Error::from(e).context(format!(
                        "config key `model.pretrained` ({pretrained}): no local folder, no \
                         hub-cache snapshot and no built-in config"
                    ))),
                }
            }
        }
    }

    fn get<T: DeserializeOwned>(&self, component: &str) -> Result<T> {
        match self {
            Self::Folder(dir) => Ok(read_config(&dir.join(component))?),
            Self::BuiltIn(repo) => {
                let text = BUILT_IN
                    .iter()
                    .find(|(r, c, _)| r == repo && *c == component)
                    .map(|(_, _, text)| *text)
                    .with_context(|| format!("no built-in config for {repo}/{component}"))?;
                serde_json::from_str(text)
                    .with_context(|| format!("built-in config {repo}/{component}"))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Folder(dir) => dir.display().to_string(),
            Self::BuiltIn(repo) => format!("configs/models/{repo} (built in)"),
        }
    }
}

/// The diffusion backbone of a family: its class, parameter count and feature taps.
struct BackboneInfo {
    class: &'static str,
    params: u64,
    taps: Vec<FeatureTap>,
    in_channels: usize,
    /// Where the channel axis sits in one latent (CogVideoX is frames-first: (F, C, H, W)).
    channel_axis: usize,
    rank: usize,
}

impl BackboneInfo {
    fn network(&self, name: &str, role: Role) -> Network {
        Network {
            name: name.into(),
            class: self.class.into(),
            role,
            params: self.params,
        }
    }

    fn check_latent_shape(&self, shape: &[usize], stage: usize) -> Result<()> {
        ensure!(
            shape.len() == self.rank && shape[self.channel_axis] == self.in_channels,
            "config key `stages[{stage}].engine.latent_shape`: {shape:?} does not fit {} \
             ({} dims with {} channels at position {})",
            self.class,
            self.rank,
            self.in_channels,
            self.channel_axis
        );
        Ok(())
    }

    fn tap_channels(&self, taps: &[String], stage: usize) -> Result<Vec<usize>> {
        taps.iter()
            .map(|tap| {
                self.taps
                    .iter()
                    .find(|t| &t.name == tap)
                    .map(|t| t.channels)
                    .with_context(|| {
                        let names: Vec<&str> = self.taps.iter().map(|t| t.name.as_str()).collect();
                        format!(
                            "config key `stages[{stage}].engine.taps`: `{tap}` is not a tap of {} \
                             (taps: {})",
                            self.class,
                            names.join(", ")
                        )
                    })
            })
            .collect()
    }
}

/// Every network of a model family, counted.
struct FamilyParts {
    backbone: BackboneInfo,
    vae: Network,
    text_encoders: Vec<Network>,
}

impl FamilyParts {
    fn build(family: Family, configs: &ModelConfigs) -> Result<Self> {
        let frozen = |name: &str, class: &str, params: u64| Network {
            name: name.into(),
            class: class.into(),
            role: Role::Frozen,
            params,
        };
        let clip = |component: &str| -> Result<Network> {
            let cfg: clip::Config = configs.get(component)?;
            let params = count(|vb| clip::ClipTextModel::new(vb, &cfg))
                .with_context(|| format!("{component} (CLIP)"))?;
            let class = if cfg.has_projection() {
                "CLIPTextModelWithProjection"
            } else {
                "CLIPTextModel"
            };
            Ok(frozen(component, class, params))
        };
        let t5 = |component: &str| -> Result<Network> {
            let cfg: t5::Config = configs.get(component)?;
            let params = count(|vb| t5::T5EncoderModel::new(vb, &cfg))
                .with_context(|| format!("{component} (T5)"))?;
            Ok(frozen(component, "T5EncoderModel", params))
        };
        let image_vae = || -> Result<Network> {
            let cfg: vae::Config = configs.get("vae")?;
            let params = count(|vb| vae::AutoencoderKL::new(vb, &cfg)).context("vae")?;
            Ok(frozen("vae", "AutoencoderKL", params))
        };
        Ok(match family {
            Family::Sdxl => {
                let cfg: unet_2d::Config = configs.get("unet")?;
                let params =
                    count(|vb| unet_2d::UNet2DConditionModel::new(vb, &cfg)).context("unet")?;
                Self {
                    backbone: BackboneInfo {
                        class: "UNet2DConditionModel",
                        params,
                        taps: cfg.feature_taps(),
                        in_channels: cfg.in_channels,
                        channel_axis: 0,
                        rank: 3,
                    },
                    vae: image_vae()?,
                    text_encoders: vec![clip("text_encoder")?, clip("text_encoder_2")?],
                }
            }
            Family::Sd3 => {
                let cfg: mmdit::Config = configs.get("transformer")?;
                let params = count(|vb| mmdit::SD3Transformer2DModel::new(vb, &cfg))
                    .context("transformer")?;
                Self {
                    backbone: BackboneInfo {
                        class: "SD3Transformer2DModel",
                        params,
                        taps: cfg.feature_taps(),
                        in_channels: cfg.in_channels,
                        channel_axis: 0,
                        rank: 3,
                    },
                    vae: image_vae()?,
                    text_encoders: vec![
                        clip("text_encoder")?,
                        clip("text_encoder_2")?,
                        t5("text_encoder_3")?,
                    ],
                }
            }
            Family::Cogvideox => {
                let cfg: cogvideox::Config = configs.get("transformer")?;
                let params = count(|vb| cogvideox::CogVideoXTransformer3DModel::new(vb, &cfg))
                    .context("transformer")?;
                let vae_cfg: cogvideox_vae::Config = configs.get("vae")?;
                let vae_params =
                    count(|vb| cogvideox_vae::AutoencoderKLCogVideoX::new(vb, &vae_cfg))
                        .context("vae")?;
                Self {
                    backbone: BackboneInfo {
                        class: "CogVideoXTransformer3DModel",
                        params,
                        taps: cfg.feature_taps(),
                        in_channels: cfg.in_channels,
                        channel_axis: 1,
                        rank: 4,
                    },
                    vae: frozen("vae", "AutoencoderKLCogVideoX (decoder)", vae_params),
                    text_encoders: vec![t5("text_encoder")?],
                }
            }
        })
    }
}

/// The checkpoint repo name of the section's encoder and variant.
fn pixel_repo(pixel: &PixelDiscriminatorSection) -> Result<&'static str> {
    Ok(match (pixel.encoder, pixel.variant.as_str()) {
        (PixelEncoder::Sam, "vit_b") => "sam-vit-base",
        (PixelEncoder::Sam, "vit_l") => "sam-vit-large",
        (PixelEncoder::Sam, "vit_h") => "sam-vit-huge",
        (PixelEncoder::Dinov2, "vit_s") => "dinov2-small",
        (PixelEncoder::Dinov2, "vit_b") => "dinov2-base",
        (PixelEncoder::Dinov2, "vit_l") => "dinov2-large",
        (PixelEncoder::Dinov2, "vit_g") => "dinov2-giant",
        (PixelEncoder::Sam, other) => bail!(
            "config key `pixel_discriminator.variant`: SAM has vit_b, vit_l and vit_h, got {other:?}"
        ),
        (PixelEncoder::Dinov2, other) => bail!(
            "config key `pixel_discriminator.variant`: DINOv2 has vit_s, vit_b, vit_l and vit_g, \
             got {other:?}"
        ),
    })
}

/// The section's checkpoint folder or hub id.
fn pixel_id(pixel: &PixelDiscriminatorSection) -> Result<String> {
    let repo = pixel_repo(pixel)?;
    Ok(pixel
        .pretrained
        .clone()
        .unwrap_or_else(|| format!("facebook/{repo}")))
}

enum PixelConfig {
    Sam(sam::Config),
    Dinov2(dinov2::Config),
}

/// The encoder's config, and its checkpoint folder when the id resolves to one. A hub id that
/// does not resolve falls back to the published config: SAM's built-in copy, or DINOv2's
/// preset for the variant (the default id only).
fn pixel_config(pixel: &PixelDiscriminatorSection) -> Result<(PixelConfig, Option<PathBuf>)> {
    let id = pixel_id(pixel)?;
    match pixel.encoder {
        PixelEncoder::Sam => match ModelConfigs::resolve(&id)? {
            ModelConfigs::Folder(dir) => {
                let cfg = sam::Config::from_json(&dir.join("config.json"))?;
                Ok((PixelConfig::Sam(cfg), Some(dir)))
            }
            built_in @ ModelConfigs::BuiltIn(_) => {
                Ok((PixelConfig::Sam(built_in.get("vision_config")?), None))
            }
        },
        PixelEncoder::Dinov2 => match resolve_model(&id, None) {
            Ok(dir) => {
                let cfg = dinov2::Config::from_json(&dir.join("config.json"))?;
                Ok((PixelConfig::Dinov2(cfg), Some(dir)))
            }
            Err(_) if pixel.pretrained.is_none() => {
                let cfg = match pixel.variant.as_str() {
                    "vit_s" => dinov2::Config::vit_s(),
                    "vit_b" => dinov2::Config::vit_b(),
                    "vit_l" => dinov2::Config::vit_l(),
                    _ => dinov2::Config::vit_g(),
                };
                Ok((PixelConfig::Dinov2(cfg), None))
            }
            Err(e) => Err(anyhow::Error::from(e).context(format!(
                "config key `pixel_discriminator.pretrained` ({id})"
            ))),
        },
    }
}

/// A frozen pixel encoder (over broadcast tensors in the dry run, loaded for training).
#[derive(Clone)]
enum PixelModel {
    Sam(Arc<sam::SamVisionEncoder>),
    Dinov2(Arc<dinov2::Dinov2Model>),
}

impl PixelModel {
    fn build(cfg: &PixelConfig, vb: VarBuilder<'static>) -> candle_core::Result<Self> {
        Ok(match cfg {
            PixelConfig::Sam(cfg) => Self::Sam(Arc::new(sam::SamVisionEncoder::new(vb, cfg)?)),
            PixelConfig::Dinov2(cfg) => Self::Dinov2(Arc::new(dinov2::Dinov2Model::new(vb, cfg)?)),
        })
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Sam(_) => "SamVisionEncoder",
            Self::Dinov2(_) => "Dinov2Model",
        }
    }

    /// The conv heads on the features after `layers`, built on `vb`.
    fn discriminator(
        &self,
        section: &PixelDiscriminatorSection,
        layers: &[usize],
        heads: &ConvHeadConfig,
        vb: VarBuilder<'static>,
    ) -> candle_core::Result<PixelDiscriminator> {
        match self {
            Self::Sam(encoder) => sam::pixel_discriminator(encoder.clone(), layers, heads, vb),
            Self::Dinov2(model) => {
                let size = section.input_size.map(|[h, w]| (h, w));
                dinov2::pixel_discriminator(model.clone(), layers, size, heads, vb)
            }
        }
    }

    fn extractor(
        &self,
        section: &PixelDiscriminatorSection,
        layers: &[usize],
    ) -> Result<Arc<dyn FeatureExtractor>> {
        Ok(match self {
            Self::Sam(encoder) => Arc::new(sam::SamFeatureExtractor::new(encoder.clone(), layers)?),
            Self::Dinov2(model) => {
                let size = section.input_size.map(|[h, w]| (h, w));
                Arc::new(dinov2::Dinov2FeatureExtractor::new(
                    model.clone(),
                    layers,
                    size,
                )?)
            }
        })
    }
}

/// Whether an engine stage runs ADP's pixel discriminator.
fn uses_pixel(engine: &EngineConfig) -> bool {
    engine.method == EngineMethod::Adp && engine.adp.lambda_pixel > 0.0
}

/// The frozen pixel encoder, counted, and the encoder (over broadcast tensors) its heads are
/// built on.
fn pixel_encoder_network(pixel: &PixelDiscriminatorSection) -> Result<(Network, PixelModel)> {
    let (cfg, _) = pixel_config(pixel)?;
    let mut encoder = None;
    let params = count(|vb| {
        encoder = Some(PixelModel::build(&cfg, vb)?);
        Ok(())
    })
    .context("pixel_discriminator: the encoder")?;
    let encoder = encoder.expect("built when counted");
    let network = Network {
        name: "pixel_encoder".into(),
        class: format!("{} ({})", encoder.name(), pixel.variant),
        role: Role::Frozen,
        params,
    };
    Ok((network, encoder))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Weights at the compute precision, no gradient.
    Frozen,
    /// f32 master weights, a compute-precision copy (none in f32), f32 gradients and AdamW's
    /// two f32 moments: the generator and fake score (`engine.compute_dtype`).
    Trainable,
    /// Discriminator heads: trainable, but they compute in f32 whatever the precision (f32
    /// weights, gradients and AdamW's two moments, no copy).
    Heads,
}

#[derive(Debug, Clone)]
pub struct Network {
    pub name: String,
    pub class: String,
    pub role: Role,
    /// Exact parameter count.
    pub params: u64,
}

#[derive(Debug, Clone)]
pub struct StageEstimate {
    pub name: String,
    pub method: EngineMethod,
    /// Indices into [`DryRun::networks`] of the networks the stage holds on every GPU.
    pub resident: Vec<usize>,
    pub micro_batch: usize,
    pub grad_accumulation: usize,
}

/// What [`Recipe::dry_run`] found; `Display` prints the table.
#[derive(Debug, Clone)]
pub struct DryRun {
    pub family: Family,
    pub precision: Precision,
    pub world_size: usize,
    pub config_source: String,
    pub networks: Vec<Network>,
    pub stages: Vec<StageEstimate>,
}

/// Bytes per parameter of each part of the estimate.
const F32: u64 = 4;
const ADAMW_MOMENTS: u64 = 2 * F32;

impl DryRun {
    fn add(&mut self, network: Network) -> usize {
        self.networks.push(network);
        self.networks.len() - 1
    }

    pub fn network(&self, name: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.name == name)
    }

    /// Bytes per parameter of a trainable network (`Trainable` or `Heads`): f32 master
    /// weights, the compute copy (none in f32, none for heads), f32 gradients and AdamW's
    /// moments.
    fn trainable_bytes(&self, role: Role) -> u64 {
        let copy = match (role, self.precision) {
            (Role::Trainable, p) if p != Precision::F32 => p.bytes(),
            _ => 0,
        };
        F32 + copy + F32 + ADAMW_MOMENTS
    }

    /// The weight bytes a network holds: frozen at the compute precision, trainable as f32
    /// master weights.
    pub fn weight_bytes(&self, network: &Network) -> u64 {
        match network.role {
            Role::Frozen => network.params * self.precision.bytes(),
            Role::Trainable | Role::Heads => network.params * F32,
        }
    }

    /// (frozen weights, trainable weights + copies + gradients + moments, EMA) bytes per GPU.
    pub fn stage_bytes(&self, stage: &StageEstimate) -> (u64, u64, u64) {
        let (mut frozen, mut trainable) = (0, 0);
        for &i in &stage.resident {
            let network = &self.networks[i];
            match network.role {
                Role::Frozen => frozen += self.weight_bytes(network),
                role => trainable += network.params * self.trainable_bytes(role),
            }
        }
        // The engine always keeps an EMA of the generator (ema_decay only weighs it).
        let ema = self.network("generator").map_or(0, |g| g.params * F32);
        (frozen, trainable, ema)
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

impl fmt::Display for DryRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let precision = format!("{:?}", self.precision).to_lowercase();
        writeln!(
            f,
            "dry run: family {}, configs from {}, compute precision {precision}, world size {}",
            self.family.name(),
            self.config_source,
            self.world_size
        )?;
        writeln!(
            f,
            "{:<22} {:<34} {:<9} {:>14} {:>11}  stages",
            "network", "class", "role", "parameters", "weights"
        )?;
        for (i, network) in self.networks.iter().enumerate() {
            let stages: Vec<&str> = self
                .stages
                .iter()
                .filter(|s| s.resident.contains(&i))
                .map(|s| s.name.as_str())
                .collect();
            let stages = if stages.is_empty() {
                "- (not resident while training)".to_string()
            } else {
                stages.join(", ")
            };
            let role = match network.role {
                Role::Frozen => "frozen",
                Role::Trainable | Role::Heads => "trainable",
            };
            writeln!(
                f,
                "{:<22} {:<34} {:<9} {:>14} {:>11}  {stages}",
                network.name,
                network.class,
                role,
                network.params,
                gib(self.weight_bytes(network))
            )?;
        }
        writeln!(
            f,
            "\nEstimated memory per GPU: weights and optimiser state only, ACTIVATIONS NOT INCLUDED."
        )?;
        writeln!(
            f,
            "Frozen networks at {precision}; generator and fake score as f32 master weights + {} \
             + f32 gradients + AdamW moments (2 x f32) = {} bytes/parameter; discriminator heads \
             compute in f32: {} bytes/parameter; EMA of the generator in f32.",
            if self.precision == Precision::F32 {
                "no copy".to_string()
            } else {
                format!("{precision} compute copy")
            },
            self.trainable_bytes(Role::Trainable),
            self.trainable_bytes(Role::Heads)
        )?;
        writeln!(
            f,
            "Data parallel: every GPU holds all weights (replicated), so the figure does not \
             shrink with the world size; each GPU runs the micro-batch, the global batch is \
             micro-batch x grad_accumulation x world size."
        )?;
        for stage in &self.stages {
            let (frozen, trainable, ema) = self.stage_bytes(stage);
            writeln!(
                f,
                "stage {} ({}): micro-batch {} per GPU, global batch {} x {} x {} = {}: frozen {}, \
                 trainable {}, EMA {}, total {}",
                stage.name,
                stage.method.name(),
                stage.micro_batch,
                stage.micro_batch,
                stage.grad_accumulation,
                self.world_size,
                stage.micro_batch * stage.grad_accumulation * self.world_size,
                gib(frozen),
                gib(trainable),
                gib(ema),
                gib(frozen + trainable + ema)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_sam_configs_are_the_presets() {
        for (variant, preset) in [
            ("vit_b", sam::Config::vit_b()),
            ("vit_l", sam::Config::vit_l()),
            ("vit_h", sam::Config::vit_h()),
        ] {
            let section = PixelDiscriminatorSection {
                encoder: PixelEncoder::Sam,
                variant: variant.into(),
                pretrained: None,
                input_size: None,
            };
            let repo = pixel_repo(&section).unwrap();
            let cfg: sam::Config = ModelConfigs::BuiltIn(repo.into())
                .get("vision_config")
                .unwrap();
            assert_eq!(cfg, preset, "{variant}");
        }
    }
}
