//! UNet2DConditionModel CPU timings, to compare with PyTorch eager (scripts/bench_unet.py
//! builds the same configs and inputs). f32, random weights, batch 2.
//!
//! - `forward`: inference (frozen weights, no autograd graph).
//! - `forward+backward`: `out.sum().backward()` with every weight a Var.
//!
//! Each measurement: 2 warm-up calls, then calls until 30 are timed or about 3 s have passed
//! (at least 5); the median is reported. Set the thread count for both sides alike:
//!
//!   RAYON_NUM_THREADS=2 cargo run --release -p adm-models --example unet_bench [tiny|mid]

mod bench_util;

use std::path::Path;

use adm_models::frozen_var_builder;
use adm_models::unet_2d::{Config, OneOrMany, TextTime, UNet2DConditionModel};
use adm_nn::SeededVarMap;
use candle_core::{DType, Device, Result, Tensor};

/// The mid-size config (scripts/bench_unet.py `MID` is the same dict).
fn mid_config() -> Config {
    serde_json::from_value(serde_json::json!({
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [64, 128, 256],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 1, 2],
        "attention_head_dim": [1, 2, 4],
        "cross_attention_dim": 256,
        "norm_num_groups": 32,
        "use_linear_projection": true,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 32,
        "projection_class_embeddings_input_dim": 128 + 6 * 32
    }))
    .expect("mid config")
}

/// (name, config, latent size, context length)
fn cases() -> Vec<(&'static str, Config, usize, usize)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet/sdxl_tiny");
    let tiny = adm_models::loading::read_config(&dir).expect("sdxl_tiny config.json");
    vec![("tiny", tiny, 16, 7), ("mid", mid_config(), 32, 77)]
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
        let context_dim = match &cfg.cross_attention_dim {
            OneOrMany::One(d) => *d,
            OneOrMany::Many(d) => d[0],
        };
        let pooled = cfg.projection_class_embeddings_input_dim.unwrap_or(0)
            - 6 * cfg.addition_time_embed_dim.unwrap_or(0);
        let batch = 2;
        let sample = Tensor::randn(0f32, 1.0, (batch, cfg.in_channels, size, size), &dev)?;
        let t = Tensor::new(&[880f32, 42.0], &dev)?;
        let context = Tensor::randn(0f32, 1.0, (batch, length, context_dim), &dev)?;
        let text = Tensor::randn(0f32, 1.0, (batch, pooled), &dev)?;
        let s = (size * 8) as f32;
        let ids = Tensor::new(&[[s, s, 0., 0., s, s], [s, s, 8., 8., s, s]], &dev)?;
        let added = cfg.uses_text_time().then_some(TextTime {
            text_embeds: &text,
            time_ids: &ids,
        });

        let seeded = SeededVarMap::new(1);
        let trainable = UNet2DConditionModel::new(seeded.var_builder(DType::F32, &dev), &cfg)?;
        let frozen = UNet2DConditionModel::new(
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
            frozen.forward(&sample, &t, &context, added)?;
            Ok(())
        })?;
        let (bwd, n_bwd) = bench_util::median_ms(|| {
            let out = trainable.forward(&sample, &t, &context, added)?;
            let grads = adm_nn::backward(&out.sum_all()?)?;
            // Every weight got its gradient.
            for var in seeded.varmap().all_vars() {
                if grads.get(&var).is_none() {
                    candle_core::bail!("no gradient for a Var of shape {:?}", var.dims());
                }
            }
            Ok(())
        })?;
        println!(
            "{name}: {params} params, sample {:?}: forward {fwd:.2} ms (n={n_fwd}), forward+backward {bwd:.2} ms (n={n_bwd})",
            sample.dims()
        );
    }
    Ok(())
}
