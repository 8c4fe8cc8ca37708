//! A forward and backward pass through every block that splits its work over candle's CPU
//! worker pool gives bitwise the same values and gradients on one thread and on three.
//!
//! The pool's size is fixed when a process first uses it, so the test runs itself again in
//! child processes with `RAYON_NUM_THREADS` set and compares what they write.

use std::path::Path;
use std::process::{Command, Stdio};

use adm_nn::ops::{group_norm, layer_norm};
use adm_nn::{
    bias_add, conv2d, geglu, matmul, multi_head_attention, silu, softmax, Conv2dConfig, GroupNorm,
};
use candle_core::{DType, Device, Result, Tensor, Var, D};

const PROBE_OUT: &str = "ADM_THREAD_COUNT_PROBE_OUT";
const TEST_NAME: &str = "results_do_not_depend_on_the_thread_count";

/// Every value and gradient of a small network whose tensors are above the pool's
/// thresholds (64k elements, 2^18 multiply-adds), as raw f32 bits.
fn probe() -> Result<Vec<u8>> {
    let dev = Device::Cpu;
    let var = |shape: &[usize], seed: u64| -> Result<Var> {
        let n: usize = shape.iter().product();
        // A fixed, irregular pattern: no random generator state to depend on.
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 2_654_435_761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &dev)?)
    };
    let x = var(&[2, 16, 48, 48], 1)?;
    let kernel = var(&[32, 16, 3, 3], 2)?;
    let bias = var(&[32], 3)?;
    let (gamma, beta) = (var(&[32], 4)?, var(&[32], 5)?);
    let proj = var(&[256, 128], 6)?;
    let ln = var(&[128], 7)?;
    let cfg = Conv2dConfig {
        padding: 1,
        stride: 1,
    };
    let h = bias_add(&conv2d(x.as_tensor(), kernel.as_tensor(), cfg)?, &bias, 1)?;
    let h = group_norm(&h, 8, Some(&gamma), Some(&beta), 1e-5)?;
    let norm_silu = GroupNorm {
        weight: Some(gamma.as_tensor().clone()),
        bias: Some(beta.as_tensor().clone()),
        groups: 4,
        eps: 1e-5,
    };
    let h = (&h + norm_silu.forward_silu(&h)?)?;
    // (B, 576, 128) tokens through attention-like products, softmax, multi-head attention,
    // SiLU, GEGLU, layer norm.
    let t = h.reshape((2, 576, 128))?;
    let scores = softmax(
        &matmul(&t, &t.transpose(1, 2)?)?.affine(1e-3, 0.0)?,
        D::Minus1,
    )?;
    let t = matmul(&scores, &t)?;
    let t = multi_head_attention(&silu(&t)?, &t, &t, 2, None)?;
    let t = matmul(&t, &proj.as_tensor().t()?.broadcast_left(2)?)?;
    let t = geglu(&t.broadcast_add(&t.sin()?)?)?;
    let t = layer_norm(&t, Some(&ln), None, 1e-5)?;
    let loss = (t.sqr()?.mean_all()? + h.mean_all()?)?;
    let grads = adm_nn::backward(&loss)?;
    let mut bytes = Vec::new();
    let mut push = |t: &Tensor| -> Result<()> {
        for v in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
            bytes.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        Ok(())
    };
    push(&loss)?;
    for v in [&x, &kernel, &bias, &gamma, &beta, &proj, &ln] {
        match grads.get(v.as_tensor()) {
            Some(g) => push(g)?,
            None => candle_core::bail!("no gradient for a Var of shape {:?}", v.dims()),
        }
    }
    Ok(bytes)
}

fn run_child(threads: usize, out: &Path) -> Vec<u8> {
    let status = Command::new(std::env::current_exe().expect("test binary path"))
        .args([TEST_NAME, "--exact", "--test-threads=1"])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env_remove("CANDLE_NUM_THREADS")
        .env(PROBE_OUT, out)
        .stdout(Stdio::null())
        .status()
        .expect("run the test binary again");
    assert!(status.success(), "the {threads}-thread probe failed");
    std::fs::read(out).expect("probe output")
}

#[test]
fn results_do_not_depend_on_the_thread_count() -> Result<()> {
    if let Some(out) = std::env::var_os(PROBE_OUT) {
        std::fs::write(out, probe()?)?;
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("adm-thread-count-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let one = run_child(1, &dir.join("1"));
    let three = run_child(3, &dir.join("3"));
    std::fs::remove_dir_all(&dir)?;
    assert!(!one.is_empty());
    let differing = one.iter().zip(&three).filter(|(a, b)| a != b).count();
    assert_eq!(one.len(), three.len());
    assert_eq!(differing, 0, "bytes differ between one and three threads");
    Ok(())
}
