//! SD3Transformer2DModel CPU timings, to compare with PyTorch eager (scripts/bench_mmdit.py
//! builds the same configs and inputs). f32, random weights, batch 2. Same timing rule as
//! `unet_bench`:
//!
//! - `forward`: inference (frozen weights, no autograd graph).
//! - `forward+backward`: `out.sum().backward()` with every weight a Var.
//!
//! Each measurement: 2 warm-up calls, then calls until 30 are timed or about 3 s have passed
//! (at least 5); the median is reported.
//!
//!   RAYON_NUM_THREADS=2 cargo run --release -p adm-models --example mmdit_bench [tiny|mid]

mod bench_util;

use std::path::Path;

use adm_models::frozen_var_builder;
use adm_models::mmdit::{Config, SD3Transformer2DModel};
use adm_nn::SeededVarMap;
use candle_core::{DType, Device, Result, Tensor};

/// The mid-size config (scripts/bench_mmdit.py `MID` is the same dict): SD3.5-Medium-like,
/// 4 blocks of width 256 (4 heads of 64), dual attention in block 0, qk RMS norm.
fn mid_config() -> Config {
    serde_json::from_value(serde_json::json!({
        "sample_size": 32,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 4,
        "attention_head_dim": 64,
        "num_attention_heads": 4,
        "joint_attention_dim": 256,
        "caption_projection_dim": 256,
        "pooled_projection_dim": 128,
        "out_channels": 16,
        "pos_embed_max_size": 32,
        "dual_attention_layers": [0],
        "qk_norm": "rms_norm"
    }))
    .expect("mid config")
}

/// (name, config, latent size, context length)
fn cases() -> Vec<(&'static str, Config, usize, usize)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mmdit/sd3_tiny");
    let tiny = adm_models::loading::read_config(&dir).expect("sd3_tiny config.json");
    vec![("tiny", tiny, 16, 5), ("mid", mid_config(), 32, 77)]
}

fn main() -> Result<()> {
    let only: Option<String> = std::env::args().nth(1);
    let dev = Device::Cpu;
    println!(
        "rust candle, RAYON_NUM_THREADS={}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    for (name, cfg, size, length) in cases() {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let batch = 2;
        let x = Tensor::randn(0f32, 1.0, (batch, cfg.in_channels, size, size), &dev)?;
        let t = Tensor::new(&[880f32, 42.0], &dev)?;
        let context = Tensor::randn(0f32, 1.0, (batch, length, cfg.joint_attention_dim), &dev)?;
        let pooled = Tensor::randn(0f32, 1.0, (batch, cfg.pooled_projection_dim), &dev)?;

        let seeded = SeededVarMap::new(1);
        let trainable = SD3Transformer2DModel::new(seeded.var_builder(DType::F32, &dev), &cfg)?;
        let frozen = SD3Transformer2DModel::new(
            frozen_var_builder(seeded.varmap(), DType::F32, &dev)?,
            &cfg,
        )?;
        let no_gradient = cfg.tensors_without_gradient();
        let vars = seeded.varmap().data().lock().unwrap().clone();
        // PyTorch's parameters() leaves out the position-table buffer.
        let params: usize = vars
            .iter()
            .filter(|(n, _)| *n != "pos_embed.pos_embed")
            .map(|(_, v)| v.elem_count())
            .sum();

        let (fwd, n_fwd) = bench_util::median_ms(|| {
            frozen.forward(&x, &t, &context, &pooled)?;
            Ok(())
        })?;
        let (bwd, n_bwd) = bench_util::median_ms(|| {
            let out = trainable.forward(&x, &t, &context, &pooled)?;
            let grads = adm_nn::backward(&out.sum_all()?)?;
            for (name, var) in &vars {
                if grads.get(var).is_none() && !no_gradient.contains(name) {
                    candle_core::bail!("no gradient for {name}");
                }
            }
            Ok(())
        })?;
        println!(
            "{name}: {params} params, latent {:?}, context {:?}: forward {fwd:.2} ms (n={n_fwd}), forward+backward {bwd:.2} ms (n={n_bwd})",
            x.dims(),
            context.dims()
        );
    }
    Ok(())
}
