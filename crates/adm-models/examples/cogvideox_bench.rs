//! CogVideoXTransformer3DModel CPU timings, to compare with PyTorch eager
//! (scripts/bench_cogvideox.py builds the same configs and inputs). f32, random weights,
//! batch 2, per-sample timesteps.
//!
//! - `forward`: inference (frozen weights, no autograd graph).
//! - `forward+backward`: `out.sum().backward()` with every weight a Var.
//!
//! Timing rule as `unet_bench` (bench_util::median_ms). Set the thread count for both sides
//! alike:
//!
//!   RAYON_NUM_THREADS=2 cargo run --release -p adm-models --example cogvideox_bench [tiny|mid]

mod bench_util;

use std::path::Path;

use adm_models::cogvideox::{CogVideoXTransformer3DModel, Config};
use adm_models::frozen_var_builder;
use adm_nn::SeededVarMap;
use candle_core::{DType, Device, Result, Tensor};

/// A CogVideoX-5B-like config scaled down (scripts/bench_cogvideox.py `MID` is the same).
fn mid_config() -> Config {
    serde_json::from_value(serde_json::json!({
        "num_attention_heads": 4,
        "attention_head_dim": 64,
        "in_channels": 16,
        "out_channels": 16,
        "time_embed_dim": 128,
        "text_embed_dim": 256,
        "num_layers": 4,
        "sample_width": 16,
        "sample_height": 16,
        "sample_frames": 9,
        "max_text_seq_length": 32,
        "use_rotary_positional_embeddings": true
    }))
    .expect("mid config")
}

/// A benchmark case: name, config, latent (F, H, W), text length.
type Case = (&'static str, Config, (usize, usize, usize), usize);

fn cases() -> Vec<Case> {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cogvideox/cogvideox_2b_tiny");
    let tiny = adm_models::loading::read_config(&dir).expect("cogvideox_2b_tiny config.json");
    vec![
        ("tiny", tiny, (3, 8, 8), 8),
        ("mid", mid_config(), (3, 16, 16), 32),
    ]
}

fn main() -> Result<()> {
    let only: Option<String> = std::env::args().nth(1);
    let dev = Device::Cpu;
    println!(
        "rust candle, RAYON_NUM_THREADS={}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    for (name, cfg, (f, h, w), length) in cases() {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let batch = 2;
        let latents = Tensor::randn(0f32, 1.0, (batch, f, cfg.in_channels, h, w), &dev)?;
        let t = Tensor::new(&[880f32, 42.0], &dev)?;
        let context = Tensor::randn(0f32, 1.0, (batch, length, cfg.text_embed_dim), &dev)?;

        let seeded = SeededVarMap::new(1);
        let trainable =
            CogVideoXTransformer3DModel::new(seeded.var_builder(DType::F32, &dev), &cfg)?;
        let frozen = CogVideoXTransformer3DModel::new(
            frozen_var_builder(seeded.varmap(), DType::F32, &dev)?,
            &cfg,
        )?;
        let params: usize = seeded
            .varmap()
            .all_vars()
            .iter()
            .map(|v| v.elem_count())
            .sum();

        let (fwd, n_fwd) = bench_util::median_ms(|| {
            frozen.forward(&latents, &context, &t)?;
            Ok(())
        })?;
        let (bwd, n_bwd) = bench_util::median_ms(|| {
            let out = trainable.forward(&latents, &context, &t)?;
            let grads = adm_nn::backward(&out.sum_all()?)?;
            for var in seeded.varmap().all_vars() {
                if grads.get(&var).is_none() {
                    candle_core::bail!("no gradient for a Var of shape {:?}", var.dims());
                }
            }
            Ok(())
        })?;
        println!(
            "{name}: {params} params, latents {:?}: forward {fwd:.2} ms (n={n_fwd}), forward+backward {bwd:.2} ms (n={n_bwd})",
            latents.dims()
        );
    }
    Ok(())
}
