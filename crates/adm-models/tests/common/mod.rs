//! Helpers the integration tests share: fixture folders (made by scripts/make_fixtures.py),
//! safetensors loading and the relative error the parity checks measure.

// Each test crate uses a subset of these.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use adm_models::loading::{read_config, Weights};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;
use serde::de::DeserializeOwned;

/// Parity target: max |rust f32 - reference f64| / max |reference f64| (diffusers or
/// transformers in float64). Reached about 5e-7 (CLIP), 8e-7 (UNet) and 1e-6 (VAE, where the
/// brief asked for 1e-4): f32 rounding; 1e-5 leaves a 10x margin.
pub const PARITY_TOL: f64 = 1e-5;

/// diffusers' weight file name in a component folder.
pub const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// max |got - want| / max |want|, computed in f64; the shapes must agree.
pub fn relative_error(got: &Tensor, want: &Tensor) -> Result<f64> {
    assert_eq!(got.dims(), want.dims());
    let got = got.to_dtype(DType::F64)?;
    let want = want.to_dtype(DType::F64)?;
    let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = want.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(err / scale)
}

/// Prints the relative error of `got` against `want` and asserts it is under [`PARITY_TOL`].
pub fn assert_parity(what: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    let err = relative_error(got, want)?;
    println!("{what} {:?} relative error {err:.2e}", got.dims());
    assert!(err < PARITY_TOL, "{what} relative error {err:.2e}");
    Ok(())
}

/// `fixtures()/{kind}/{name}`.
pub fn fixture_dir(kind: &str, name: &str) -> PathBuf {
    fixtures().join(kind).join(name)
}

/// A fixture folder's config.json.
pub fn config<C: DeserializeOwned>(dir: &Path) -> C {
    read_config(dir).expect("config.json parses")
}

/// The tensors of a safetensors file, on the CPU.
pub fn load_tensors(path: impl AsRef<Path>) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
}

/// A parity fixture: `fixtures()/{kind}/{name}` holds config.json, the weights, and the
/// reference's inputs.safetensors and outputs.safetensors.
pub struct Fixture<C> {
    pub dir: PathBuf,
    pub config: C,
    pub weights: HashMap<String, Tensor>,
    pub inputs: HashMap<String, Tensor>,
    pub outputs: HashMap<String, Tensor>,
}

impl<C: DeserializeOwned> Fixture<C> {
    /// `weights_file`: [`DIFFUSERS_WEIGHTS`] or transformers' `model.safetensors`.
    pub fn load(kind: &str, name: &str, weights_file: &str) -> Result<Self> {
        let dir = fixture_dir(kind, name);
        Ok(Self {
            config: read_config(&dir)?,
            weights: load_tensors(dir.join(weights_file))?,
            inputs: load_tensors(dir.join("inputs.safetensors"))?,
            outputs: load_tensors(dir.join("outputs.safetensors"))?,
            dir,
        })
    }

    /// Builds the model from the fixture (which it may check first).
    pub fn with_model<M>(self, build: impl FnOnce(&Self) -> Result<M>) -> Result<WithModel<C, M>> {
        let model = build(&self)?;
        Ok(WithModel {
            fixture: self,
            model,
        })
    }
}

/// A fixture and the model built from its weights; derefs to the fixture.
pub struct WithModel<C, M> {
    pub fixture: Fixture<C>,
    pub model: M,
}

impl<C, M> Deref for WithModel<C, M> {
    type Target = Fixture<C>;
    fn deref(&self) -> &Fixture<C> {
        &self.fixture
    }
}

/// A temporary folder, `{temp}/adm-{tag}-{pid}`, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("adm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `tensors` written as `{dir}/{name}.safetensors` and opened as a checkpoint.
pub fn weights_from(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>) -> Result<Weights> {
    let path = dir.join(format!("{name}.safetensors"));
    candle_core::safetensors::save(tensors, &path)?;
    Weights::open_files(&[path])
}

/// A model's two ways of loading a checkpoint: frozen, and into the Vars of a VarMap.
pub struct Loaders<F, T> {
    pub frozen: F,
    pub trainable: T,
}

impl<F, T, A, B> Loaders<F, T>
where
    F: Fn(&Weights) -> Result<A>,
    T: Fn(&Weights, &VarMap) -> Result<B>,
{
    /// Both loaders reject the checkpoint `tensors` (written under `dir`): the frozen one
    /// with an error holding every one of `frozen`, the trainable one every one of
    /// `trainable`.
    pub fn assert_rejected(
        &self,
        dir: &Path,
        tensors: &HashMap<String, Tensor>,
        frozen: &[&str],
        trainable: &[&str],
    ) {
        let weights = weights_from(dir, "rejected", tensors).unwrap();
        let check = |result: std::result::Result<(), String>, needles: &[&str]| match result {
            Ok(()) => panic!("a loader accepted the checkpoint that should fail with {needles:?}"),
            Err(err) => assert!(
                needles.iter().all(|n| err.contains(n)),
                "{needles:?}: {err}"
            ),
        };
        let frozen_result = (self.frozen)(&weights).map(drop).map_err(|e| e.to_string());
        check(frozen_result, frozen);
        let trainable_result = (self.trainable)(&weights, &VarMap::new())
            .map(drop)
            .map_err(|e| e.to_string());
        check(trainable_result, trainable);
    }
}
