//! The default job: teacher -> ODE pairs -> every method of the config -> one table,
//! `metrics.json` and `samples.png` in the run folder.

use std::collections::HashMap;
use std::time::Instant;

use adm_eval::{scatter_png, toy_metrics, ModeSet, Table, ToyMetrics};
use anyhow::{Context as _, Result};
use candle_core::Tensor;
use serde::Serialize;

use crate::collect::collect_toy_pairs;
use crate::config::{Method, ToyRunConfig};
use crate::context::ToyContext;
use crate::distill::{self, new_student, StageOutcome};
use crate::teacher::{cached_weights, store_weights, train_teacher, TEACHER_SECTIONS};

/// One row of the results.
#[derive(Debug, Clone, Serialize)]
pub struct MethodReport {
    pub method: String,
    pub metrics: ToyMetrics,
    /// Mean DMD loss over the first and the last 20% of the probes, when recorded.
    pub dmd_loss_start: Option<f64>,
    pub dmd_loss_end: Option<f64>,
    pub dmd_trace: Vec<(usize, f64)>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ToyReport {
    pub config: ToyRunConfig,
    pub teacher: MethodReport,
    pub methods: Vec<MethodReport>,
    pub table: String,
}

fn to_points(samples: &Tensor) -> Result<Vec<[f32; 2]>> {
    Ok(samples
        .to_vec2::<f32>()?
        .into_iter()
        .map(|p| [p[0], p[1]])
        .collect())
}

pub(crate) fn trace_ends(trace: &[(usize, f64)]) -> (Option<f64>, Option<f64>) {
    if trace.is_empty() {
        return (None, None);
    }
    let k = (trace.len() / 5).max(1);
    let mean = |xs: &[(usize, f64)]| xs.iter().map(|x| x.1).sum::<f64>() / xs.len() as f64;
    (
        Some(mean(&trace[..k])),
        Some(mean(&trace[trace.len() - k..])),
    )
}

/// Runs the whole toy job.
pub fn run_toy(config: ToyRunConfig) -> Result<ToyReport> {
    let ctx = ToyContext::new(config)?;
    let methods = ctx.config.methods.clone();
    let started = Instant::now();
    let teacher = train_teacher(&ctx)?;
    let teacher_seconds = started.elapsed().as_secs_f64();
    tracing::info!("teacher ready after {teacher_seconds:.1}s");

    let needs_pairs = methods
        .iter()
        .any(|m| matches!(m, Method::Mse | Method::Adp | Method::AdpDmd | Method::Dmdx));
    let pairs = if needs_pairs {
        Some(collect_toy_pairs(&ctx, &teacher)?)
    } else {
        None
    };
    let pairs = || {
        pairs
            .as_ref()
            .context("the ODE-pair store was not collected")
    };

    // Fixed evaluation noise and classes, shared by every method.
    let mut eval_rng = ctx.rng("eval");
    let n = ctx.config.eval.samples;
    let eval_cond = ctx.classes(n, &mut eval_rng)?;
    let eval_noise = ctx.noise(n, &mut eval_rng)?;
    let reference = to_points(&teacher.sample(
        &ctx,
        &ctx.noise(n, &mut ctx.rng("eval-reference"))?,
        &eval_cond,
    )?)?;
    let modes = ModeSet {
        means: ctx.mixture.means().to_vec(),
        std: ctx.mixture.std(),
    };

    let teacher_points = to_points(&teacher.sample(&ctx, &eval_noise, &eval_cond)?)?;
    let teacher_report = MethodReport {
        method: format!("teacher ({} NFE x2 CFG)", ctx.config.teacher.sampling_steps),
        metrics: toy_metrics(&modes, &teacher_points, &reference)?,
        dmd_loss_start: None,
        dmd_loss_end: None,
        dmd_trace: Vec::new(),
        seconds: teacher_seconds,
    };
    let mut panels = vec![("teacher".to_string(), teacher_points)];

    let mut adp_weights: Option<HashMap<String, Tensor>> = None;
    let mut reports = Vec::new();
    for method in methods {
        let started = Instant::now();
        let one_step = vec![1.0];
        let outcome = cached_stage(&ctx, method, || {
            let mut adp_init = || -> Result<HashMap<String, Tensor>> {
                if adp_weights.is_none() {
                    adp_weights = Some(
                        cached_stage(&ctx, Method::Adp, || distill::adp(&ctx, &teacher, pairs()?))?
                            .weights,
                    );
                }
                Ok(adp_weights.clone().expect("set above"))
            };
            match method {
                Method::Mse => distill::mse_pretrain(&ctx, &teacher, pairs()?),
                Method::Adp => Ok(StageOutcome {
                    weights: adp_init()?,
                    dmd_trace: Vec::new(),
                }),
                Method::Dmd => distill::dmd(&ctx, &teacher, "dmd", &teacher.weights),
                Method::AdpDmd => distill::dmd(&ctx, &teacher, "adp+dmd", &adp_init()?),
                Method::Adm => {
                    distill::adm(&ctx, &teacher, "adm", &teacher.weights, one_step.clone())
                }
                Method::Dmdx => {
                    distill::adm(&ctx, &teacher, "dmdx", &adp_init()?, one_step.clone())
                }
                Method::AdmMultistep => distill::adm(
                    &ctx,
                    &teacher,
                    "adm-multistep",
                    &teacher.weights,
                    ctx.config.student.multistep.clone(),
                ),
            }
        })?;
        let steps = if method == Method::AdmMultistep {
            ctx.config.student.multistep.clone()
        } else {
            one_step
        };
        let student = new_student(&ctx, "eval", &outcome.weights, steps)?;
        let samples =
            to_points(&student.sample(&eval_noise, &eval_cond, &mut ctx.rng("eval-renoise"))?)?;
        let (dmd_loss_start, dmd_loss_end) = trace_ends(&outcome.dmd_trace);
        reports.push(MethodReport {
            method: method.name().to_string(),
            metrics: toy_metrics(&modes, &samples, &reference)?,
            dmd_loss_start,
            dmd_loss_end,
            dmd_trace: outcome.dmd_trace,
            seconds: started.elapsed().as_secs_f64(),
        });
        panels.push((method.name().to_string(), samples));
    }

    let table = render_table(&teacher_report, &reports)?;
    let report = ToyReport {
        config: ctx.config.clone(),
        teacher: teacher_report,
        methods: reports,
        table,
    };
    write_json_atomic(&ctx.path("metrics.json"), &report)?;
    scatter_png(
        &ctx.path("samples.png"),
        &panels,
        &modes,
        ctx.config.eval.plot_extent,
        256,
    )?;
    Ok(report)
}

/// Runs `stage`, or reuses `run_dir/students/<name>.safetensors` if it was made with the
/// same settings (the teacher's sections and `Method::sections`).
fn cached_stage(
    ctx: &ToyContext,
    method: Method,
    stage: impl FnOnce() -> Result<StageOutcome>,
) -> Result<StageOutcome> {
    let name = method.name();
    let sections: Vec<&str> = TEACHER_SECTIONS
        .iter()
        .chain(method.sections())
        .copied()
        .collect();
    let fingerprint = ctx.fingerprint(&sections);
    let dir = ctx.path("students");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.safetensors", name.replace('+', "-")));
    let trace_path = path.with_extension("trace.json");
    if let Some(weights) = cached_weights(&ctx.device, &path, &fingerprint)? {
        if let Ok(trace) = std::fs::read_to_string(&trace_path) {
            tracing::info!("{name}: reusing {}", path.display());
            return Ok(StageOutcome {
                weights,
                dmd_trace: serde_json::from_str(&trace)?,
            });
        }
    }
    let outcome = stage()?;
    write_json_atomic(&trace_path, &outcome.dmd_trace)?;
    store_weights(&path, &fingerprint, &outcome.weights)?;
    Ok(outcome)
}

pub(crate) fn write_json_atomic(path: &std::path::Path, value: &impl Serialize) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn render_table(teacher: &MethodReport, methods: &[MethodReport]) -> Result<String> {
    let mut table = Table::new(
        [
            "method",
            "modes",
            "in 3 std",
            "mode TV",
            "energy dist",
            "DMD loss start -> end",
            "seconds",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    )?;
    for row in std::iter::once(teacher).chain(methods) {
        let m = &row.metrics;
        let dmd = dmd_span(row.dmd_loss_start, row.dmd_loss_end);
        table.add_row(
            row.method.clone(),
            vec![
                format!("{}/{}", m.modes_covered, m.num_modes),
                format!("{:.3}", m.high_quality_fraction),
                format!("{:.3}", m.mode_weight_error),
                format!("{:.4}", m.energy_distance),
                dmd,
                format!("{:.0}", row.seconds),
            ],
        )?;
    }
    Ok(table.render())
}

/// The DMD probe's first and last values as a table cell ("-" when not recorded).
pub(crate) fn dmd_span(start: Option<f64>, end: Option<f64>) -> String {
    match (start, end) {
        (Some(a), Some(b)) => format!("{a:.4} -> {b:.4}"),
        _ => "-".to_string(),
    }
}
