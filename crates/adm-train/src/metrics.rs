//! Per-step metrics as JSON lines: one object per row with `step` and named numbers.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsLog {
    /// A new, empty log at `path` (an existing one is replaced).
    pub fn create(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let file =
            File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// The log at `path` for a run resumed at `step`: rows of steps before `step` are kept,
    /// later ones (written after the checkpoint by the run that was stopped) are dropped, so
    /// the finished log reads as if the run had never stopped.
    pub fn resume(path: &Path, step: usize) -> Result<Self> {
        if !path.exists() {
            return Self::create(path);
        }
        let read = || -> Result<Vec<String>> {
            let mut kept = Vec::new();
            for line in BufReader::new(File::open(path)?).lines() {
                let line = line?;
                // A torn last line (the process died mid-write) has no step: dropped.
                let row_step = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|row| row.get("step").and_then(|s| s.as_u64()));
                if row_step.is_some_and(|s| (s as usize) < step) {
                    kept.push(line);
                }
            }
            Ok(kept)
        };
        let kept = read().with_context(|| format!("cannot read {}", path.display()))?;
        let tmp = path.with_extension("jsonl.tmp");
        let mut out = BufWriter::new(File::create(&tmp)?);
        for line in &kept {
            writeln!(out, "{line}")?;
        }
        out.into_inner()?.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot replace {}", path.display()))?;
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    pub fn record(&mut self, step: usize, values: &[(&str, f64)]) -> Result<()> {
        let mut row = serde_json::Map::new();
        row.insert("step".into(), step.into());
        for (name, value) in values {
            row.insert((*name).into(), serde_json::json!(value));
        }
        writeln!(self.out, "{}", serde_json::Value::Object(row))?;
        Ok(())
    }

    /// Writes buffered rows through to the disk (before a checkpoint, so that every row of
    /// the steps it covers survives a kill).
    pub fn sync(&mut self) -> Result<()> {
        self.out.flush()?;
        self.out
            .get_ref()
            .sync_data()
            .with_context(|| format!("cannot sync {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_keeps_rows_before_the_step_and_drops_torn_lines() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("adm-metrics-{}", std::process::id()));
        let path = dir.join("m.jsonl");
        let mut log = MetricsLog::create(&path)?;
        for step in 0..4 {
            log.record(step, &[("loss", step as f64)])?;
        }
        log.sync()?;
        drop(log);
        let mut file = OpenOptions::new().append(true).open(&path)?;
        write!(file, "{{\"step\": 4, \"lo")?;
        drop(file);
        let mut log = MetricsLog::resume(&path, 2)?;
        log.record(2, &[("loss", 20.0)])?;
        drop(log);
        let text = std::fs::read_to_string(&path)?;
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, vec![0, 1, 2]);
        assert!(text.contains("20.0"));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
