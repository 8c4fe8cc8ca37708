//! Prompt sources for ODE-pair collection: a text file (one prompt per line) or JSONL (one
//! object per line with a `prompt`, `text` or `caption` string, as COCO-style caption dumps
//! have). Errors name the file and line.

use std::path::Path;

use crate::DataError;

/// The keys a JSONL line may hold its prompt under, in order of preference.
const JSONL_KEYS: [&str; 3] = ["prompt", "text", "caption"];

/// Reads every prompt of `path`: JSONL when the name ends in `.jsonl`, otherwise plain text.
/// Blank lines are skipped; an empty source is an error.
pub fn read_prompts(path: &Path) -> Result<Vec<String>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::file(path, e))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut prompts = Vec::new();
    for (number, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if line.is_empty() {
            continue;
        }
        if !jsonl {
            prompts.push(line.to_string());
            continue;
        }
        let at_line = |reason: String| DataError::file(path, format!("line {number}: {reason}"));
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| at_line(format!("not JSON ({e})")))?;
        let prompt = JSONL_KEYS
            .iter()
            .find_map(|key| value.get(key).and_then(|v| v.as_str()))
            .ok_or_else(|| at_line(format!("no string field {}", JSONL_KEYS.join(" / "))))?;
        prompts.push(prompt.to_string());
    }
    if prompts.is_empty() {
        return Err(DataError::file(path, "holds no prompt"));
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("adm-prompts-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn reads_text_and_jsonl() {
        let text = write("a.txt", "a cat\n\n  a dog  \n");
        assert_eq!(read_prompts(&text).unwrap(), ["a cat", "a dog"]);
        let jsonl = write(
            "b.jsonl",
            "{\"prompt\": \"a cat\"}\n{\"caption\": \"a dog\", \"id\": 3}\n",
        );
        assert_eq!(read_prompts(&jsonl).unwrap(), ["a cat", "a dog"]);
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let bad = write("c.jsonl", "{\"prompt\": \"ok\"}\n{\"id\": 3}\n");
        let err = read_prompts(&bad).unwrap_err().to_string();
        assert!(err.contains("c.jsonl") && err.contains("line 2"), "{err}");
        let broken = write("d.jsonl", "{\"prompt\": \n");
        assert!(read_prompts(&broken)
            .unwrap_err()
            .to_string()
            .contains("line 1"));
        let empty = write("e.txt", "\n\n");
        assert!(read_prompts(&empty)
            .unwrap_err()
            .to_string()
            .contains("no prompt"));
        let missing = std::env::temp_dir().join("adm-prompts-missing.txt");
        assert!(read_prompts(&missing)
            .unwrap_err()
            .to_string()
            .contains("adm-prompts-missing.txt"));
    }
}
