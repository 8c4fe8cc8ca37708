//! Recipes (`job = "distill"`) and `adm-train --dry-run`:
//! - every committed recipe builds every network from the published configs with exactly the
//!   parameter counts diffusers / transformers give (scripts/count_recipe_params.py printed
//!   the constants below), and the memory estimate adds up as documented;
//! - a local pipeline folder's configs are read instead (the tiny SDXL pipeline fixture: the
//!   counts equal the element counts of its safetensors files);
//! - bad recipes fail naming the key.
//!
//! Training a recipe is tests/recipe_run.rs.

#[allow(dead_code)]
#[path = "../../adm-models/tests/common/sdxl_pipeline.rs"]
mod pipeline;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use adm_train::recipe::{DryRun, Recipe};

const BIN: &str = env!("CARGO_BIN_EXE_adm-train");

// scripts/count_recipe_params.py (diffusers 0.42.1, transformers 5.24.0, meta device).
const SDXL_UNET: u64 = 2_567_463_684;
const SDXL_VAE: u64 = 83_653_863;
const CLIP_L: u64 = 123_060_480;
/// SD3's CLIP-L is `CLIPTextModelWithProjection`.
const CLIP_L_PROJECTION: u64 = 123_650_304;
const BIG_G_PROJECTION: u64 = 694_659_840;
const T5_XXL_ENCODER: u64 = 4_762_310_656;
/// Parameters 2,028,328,000 plus the saved 192x192x1536 position table (a buffer).
const SD3_MEDIUM_TRANSFORMER: u64 = 2_084_951_104;
/// Parameters 8,056,627,520 plus the saved 192x192x2432 position table.
const SD35_LARGE_TRANSFORMER: u64 = 8_146_280_768;
const SD3_VAE: u64 = 83_819_683;
const COGVIDEOX_2B_TRANSFORMER: u64 = 1_693_783_872;
const COGVIDEOX_5B_TRANSFORMER: u64 = 5_570_283_072;
/// The decoder (adm-models builds no CogVideoX encoder); the whole VAE has 215,583,907.
const COGVIDEOX_VAE_DECODER: u64 = 123_368_451;
const SAM_VIT_B_ENCODER: u64 = 89_670_912;
const SAM_VIT_L_ENCODER: u64 = 308_278_272;
const SAM_VIT_H_ENCODER: u64 = 637_026_048;
/// transformers' `Dinov2Model` for facebook/dinov2-large (hidden 1024, 24 layers, 16 heads,
/// 518 / 14, mask token), on the meta device.
const DINOV2_LARGE: u64 = 304_368_640;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn dry_run(recipe: &str) -> DryRun {
    let path = root().join("configs").join(recipe);
    Recipe::load(&path, &[])
        .and_then(|r| r.dry_run())
        .unwrap_or_else(|e| panic!("{recipe}: {e:#}"))
}

fn params(run: &DryRun, network: &str) -> u64 {
    run.network(network)
        .unwrap_or_else(|| panic!("no network `{network}`"))
        .params
}

#[test]
fn recipes_count_the_published_models_exactly() {
    let sdxl = dry_run("sdxl-dmdx-1step.toml");
    for (network, expected) in [
        ("teacher", SDXL_UNET),
        ("generator", SDXL_UNET),
        ("fake_score", SDXL_UNET),
        ("vae", SDXL_VAE),
        ("text_encoder", CLIP_L),
        ("text_encoder_2", BIG_G_PROJECTION),
        ("pixel_encoder", SAM_VIT_L_ENCODER),
    ] {
        assert_eq!(params(&sdxl, network), expected, "sdxl {network}");
    }
    let names: Vec<&str> = sdxl.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["adp", "adm"]);
    for (recipe, transformer) in [
        ("sd3-medium-adm-4step.toml", SD3_MEDIUM_TRANSFORMER),
        ("sd35-large-adm-4step.toml", SD35_LARGE_TRANSFORMER),
    ] {
        let run = dry_run(recipe);
        for (network, expected) in [
            ("teacher", transformer),
            ("fake_score", transformer),
            ("vae", SD3_VAE),
            ("text_encoder", CLIP_L_PROJECTION),
            ("text_encoder_2", BIG_G_PROJECTION),
            ("text_encoder_3", T5_XXL_ENCODER),
        ] {
            assert_eq!(params(&run, network), expected, "{recipe} {network}");
        }
    }
    for (recipe, transformer) in [
        ("cogvideox-adm-8step.toml", COGVIDEOX_2B_TRANSFORMER),
        ("cogvideox-5b-adm-8step.toml", COGVIDEOX_5B_TRANSFORMER),
    ] {
        let run = dry_run(recipe);
        for (network, expected) in [
            ("teacher", transformer),
            ("generator", transformer),
            ("vae", COGVIDEOX_VAE_DECODER),
            ("text_encoder", T5_XXL_ENCODER),
        ] {
            assert_eq!(params(&run, network), expected, "{recipe} {network}");
        }
    }
}

#[test]
fn sam_presets_count_as_transformers() {
    use adm_models::sam::{Config, SamVisionEncoder};
    for (cfg, expected) in [
        (Config::vit_b(), SAM_VIT_B_ENCODER),
        (Config::vit_l(), SAM_VIT_L_ENCODER),
        (Config::vit_h(), SAM_VIT_H_ENCODER),
    ] {
        let counted = adm_train::recipe::count(|vb| SamVisionEncoder::new(vb, &cfg)).unwrap();
        assert_eq!(counted, expected, "{cfg:?}");
    }
}

#[test]
fn dinov2_is_the_alternative_pixel_encoder() {
    let path = root().join("configs/sdxl-dmdx-1step.toml");
    let overrides = [
        "pixel_discriminator.encoder=\"dinov2\"".to_string(),
        "pixel_discriminator.input_size=[518, 518]".to_string(),
    ];
    let run = Recipe::load(&path, &overrides).unwrap().dry_run().unwrap();
    assert_eq!(params(&run, "pixel_encoder"), DINOV2_LARGE);
    assert!(run
        .network("pixel_encoder")
        .unwrap()
        .class
        .contains("Dinov2"));
}

#[test]
fn memory_estimate_adds_up_per_stage() {
    let run = dry_run("sdxl-dmdx-1step.toml");
    let adm = run.stages.iter().find(|s| s.name == "adm").unwrap();
    let heads = params(&run, "adm.latent_heads");
    let (frozen, trainable, ema) = run.stage_bytes(adm);
    // bf16 teacher; generator and fake score at 4 (master) + 2 (bf16 copy) + 4 (grad) + 8
    // (AdamW) bytes, the heads (f32 compute) at 16; an f32 EMA of the generator. Text encoders
    // and VAE are not resident.
    assert_eq!(frozen, SDXL_UNET * 2);
    assert_eq!(trainable, 2 * SDXL_UNET * 18 + heads * 16);
    assert_eq!(ema, SDXL_UNET * 4);
    let adp = run.stages.iter().find(|s| s.name == "adp").unwrap();
    let (frozen, _, _) = run.stage_bytes(adp);
    assert_eq!(frozen, (SDXL_UNET + SDXL_VAE + SAM_VIT_L_ENCODER) * 2);
}

#[test]
fn binary_prints_the_dry_run() {
    let out = Command::new(BIN)
        .args(["--config", "configs/cogvideox-adm-8step.toml", "--dry-run"])
        .current_dir(root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&COGVIDEOX_2B_TRANSFORMER.to_string()),
        "{stdout}"
    );
    assert!(stdout.contains("ACTIVATIONS NOT INCLUDED"), "{stdout}");
    assert!(stdout.contains("global batch 1 x 1 x 32 = 32"), "{stdout}");
    // Training is wired for SDXL only: a CogVideoX recipe without --dry-run says so.
    let out = Command::new(BIN)
        .args(["--config", "configs/cogvideox-adm-8step.toml"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dry-run"));
}

/// Element count of every tensor in `file`.
fn stored_elements(file: &Path) -> u64 {
    let tensors = candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap();
    tensors.values().map(|t| t.elem_count() as u64).sum()
}

#[test]
fn a_local_pipeline_folder_supplies_the_configs() {
    let fixtures = root().join("crates/adm-models/tests/fixtures");
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("recipes-{}", std::process::id()));
    let folder = pipeline::assemble(&fixtures, &dir.join("pipeline"));
    fs::create_dir_all(folder.join("vae")).unwrap();
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        fs::copy(
            fixtures.join("vae/sdxl_tiny").join(file),
            folder.join("vae").join(file),
        )
        .unwrap();
    }
    let text = fs::read_to_string(root().join("configs/sdxl-dmdx-1step.toml")).unwrap();
    let overrides: Vec<String> = [
        format!("model.pretrained={:?}", folder.display().to_string()),
        format!(
            "pixel_discriminator.pretrained={:?}",
            fixtures.join("sam/tiny").display().to_string()
        ),
    ]
    .into_iter()
    .collect();
    // The tiny models have 2 UNet blocks and 4 SAM layers: the recipe's taps do not exist.
    let err = Recipe::parse(&text, "sdxl", &overrides)
        .unwrap()
        .dry_run()
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("stages[0].engine.taps"),
        "{err:#}"
    );
    let mut stages: toml::Table = toml::from_str(&text).unwrap();
    for stage in stages["stages"].as_array_mut().unwrap() {
        let engine = stage["engine"].as_table_mut().unwrap();
        engine.insert("taps".into(), toml::Value::try_from(["mid_block"]).unwrap());
        let heads = "{ dims = \"2d\", layers = 1, channels = 8, groups = 4 }";
        engine.insert(
            "heads".into(),
            toml::from_str::<toml::Table>(&format!("h = {heads}")).unwrap()["h"].clone(),
        );
        if let Some(adp) = engine.get_mut("adp").and_then(|a| a.as_table_mut()) {
            adp.insert(
                "pixel_layers".into(),
                toml::Value::try_from([1, 3]).unwrap(),
            );
            adp.remove("pixel_heads");
        }
    }
    let run = Recipe::parse(&toml::to_string(&stages).unwrap(), "tiny", &overrides)
        .unwrap()
        .dry_run()
        .unwrap();
    assert_eq!(run.config_source, folder.display().to_string());
    for (network, file) in [
        ("teacher", "unet/diffusion_pytorch_model.safetensors"),
        ("vae", "vae/diffusion_pytorch_model.safetensors"),
        ("text_encoder", "text_encoder/model.safetensors"),
        ("text_encoder_2", "text_encoder_2/model.safetensors"),
    ] {
        assert_eq!(
            params(&run, network),
            stored_elements(&folder.join(file)),
            "{network}"
        );
    }
    assert_eq!(
        params(&run, "pixel_encoder"),
        stored_elements(&fixtures.join("sam/tiny/model.safetensors"))
    );
    let _ = fs::remove_dir_all(&dir);
}

fn parse_error(recipe: &str, overrides: &[&str]) -> String {
    let text = fs::read_to_string(root().join("configs").join(recipe)).unwrap();
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    match Recipe::parse(&text, "sd3", &overrides).and_then(|r| r.dry_run()) {
        Ok(_) => panic!("{overrides:?} was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_recipes_name_the_key() {
    let sd3 = "sd3-medium-adm-4step.toml";
    let sdxl = "sdxl-dmdx-1step.toml";
    for (recipe, overrides, key) in [
        (sd3, &["model.famly=\"sd3\""][..], "model.famly"),
        (sd3, &["model.family=\"flux\""], "model.family"),
        (sd3, &["parallel.world_size=0"], "parallel.world_size"),
        (sd3, &["job=\"train\""], "job"),
        (sd3, &["data={}"], "data.conditions"),
        (
            sd3,
            &["model.pretrained=\"/nonexistent/folder\""],
            "model.pretrained",
        ),
        (
            sdxl,
            &["pixel_discriminator.variant=\"vit_x\""],
            "pixel_discriminator.variant",
        ),
        (
            sdxl,
            &[
                "pixel_discriminator.encoder=\"dinov2\"",
                "pixel_discriminator.variant=\"vit_h\"",
            ],
            "pixel_discriminator.variant",
        ),
        (
            sdxl,
            &["pixel_discriminator.input_size=[224, 224]"],
            "pixel_discriminator.input_size",
        ),
        (sdxl, &["data.ode_pairs=[]"], "data.ode_pairs"),
    ] {
        let message = parse_error(recipe, overrides);
        assert!(message.contains(key), "{overrides:?}: {message}");
    }
    // Training is wired for the SDXL family only, said before anything is loaded.
    let recipe = Recipe::load(&root().join("configs/cogvideox-adm-8step.toml"), &[]).unwrap();
    let err = adm_train::recipe_run::run(&recipe, &candle_core::Device::Cpu).unwrap_err();
    assert!(format!("{err:#}").contains("model.family"), "{err:#}");
    // A stage without `steps`, a tap the model lacks and an image latent shape on the
    // wrong channel count.
    let text = fs::read_to_string(root().join("configs/sd3-medium-adm-4step.toml")).unwrap();
    let cases = [
        ("steps = 8000", "", "steps"),
        (
            "\"transformer_blocks.23\"",
            "\"transformer_blocks.24\"",
            "stages[0].engine.taps",
        ),
        (
            "[16, 128, 128]",
            "[4, 128, 128]",
            "stages[0].engine.latent_shape",
        ),
    ];
    for (from, to, key) in cases {
        let broken = text.replacen(from, to, 1);
        let message = match Recipe::parse(&broken, "sd3", &[]).and_then(|r| r.dry_run()) {
            Ok(_) => panic!("{from} -> {to} was accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(message.contains(key), "{from} -> {to}: {message}");
        if key == "steps" {
            assert!(message.contains("stages.engine"), "{message}");
        }
    }
}
