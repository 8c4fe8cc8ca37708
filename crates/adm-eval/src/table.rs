//! Plain-text and Markdown tables: a row-label column, then one column per metric.

use anyhow::{ensure, Result};

/// A metric to 3 decimals.
pub fn format_metric(value: f64) -> String {
    format!("{value:.3}")
}

/// A count out of a total, like "8/8".
pub fn format_count(count: usize, total: usize) -> String {
    format!("{count}/{total}")
}

/// Rows of pre-formatted cells (see [`format_metric`], [`format_count`]). The label column
/// is left-aligned, every other column right-aligned.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Each row starts with its label; the first row is the header.
    rows: Vec<Vec<String>>,
}

impl Table {
    /// `headers` names every column, the label column first.
    pub fn new(headers: Vec<String>) -> Result<Self> {
        ensure!(
            !headers.is_empty(),
            "a table needs at least the label column header"
        );
        Ok(Self {
            rows: vec![headers],
        })
    }

    /// Appends a row; `cells` must have one entry per column after the label column.
    pub fn add_row(&mut self, label: impl Into<String>, cells: Vec<String>) -> Result<()> {
        let label = label.into();
        let expected = self.rows[0].len() - 1;
        ensure!(
            cells.len() == expected,
            "table row {label:?} has {} cells, the header has {expected} metric columns",
            cells.len()
        );
        self.rows
            .push(std::iter::once(label).chain(cells).collect());
        Ok(())
    }

    /// The header, a rule line of dashes, then the rows; columns separated by two spaces.
    pub fn render(&self) -> String {
        let widths = column_widths(&self.rows, 0);
        let rule: Vec<String> = widths.iter().map(|&width| "-".repeat(width)).collect();
        let mut lines = vec![join_aligned(&self.rows[0], &widths, "  ")];
        lines.push(join_aligned(&rule, &widths, "  "));
        lines.extend(
            self.rows[1..]
                .iter()
                .map(|row| join_aligned(row, &widths, "  ")),
        );
        lines
            .into_iter()
            .map(|line| line.trim_end().to_string() + "\n")
            .collect()
    }

    /// A GitHub-flavoured Markdown table with the same alignment ('|' in cells escaped).
    pub fn to_markdown(&self) -> String {
        let escaped: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|row| row.iter().map(|cell| cell.replace('|', "\\|")).collect())
            .collect();
        // Room for the ":---" / "---:" alignment markers.
        let widths = column_widths(&escaped, 4);
        let markers: Vec<String> = widths
            .iter()
            .enumerate()
            .map(|(column, &width)| match column {
                0 => format!(":{}", "-".repeat(width - 1)),
                _ => format!("{}:", "-".repeat(width - 1)),
            })
            .collect();
        let markdown_line =
            |cells: &Vec<String>| format!("| {} |\n", join_aligned(cells, &widths, " | "));
        let mut text = markdown_line(&escaped[0]);
        text += &markdown_line(&markers);
        for row in &escaped[1..] {
            text += &markdown_line(row);
        }
        text
    }
}

fn column_widths(rows: &[Vec<String>], min_width: usize) -> Vec<usize> {
    let mut widths = vec![min_width; rows[0].len()];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    widths
}

/// Pads the label column on the right and the others on the left, then joins them.
fn join_aligned(cells: &[String], widths: &[usize], separator: &str) -> String {
    cells
        .iter()
        .zip(widths)
        .enumerate()
        .map(|(column, (cell, &width))| match column {
            0 => format!("{cell:<width$}"),
            _ => format!("{cell:>width$}"),
        })
        .collect::<Vec<_>>()
        .join(separator)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ToyMetrics;

    fn strings(cells: &[&str]) -> Vec<String> {
        cells.iter().map(|cell| cell.to_string()).collect()
    }

    fn example() -> Table {
        let mut table = Table::new(strings(&["method", "modes", "energy"])).unwrap();
        table
            .add_row("teacher", vec![format_count(8, 8), format_metric(0.0)])
            .unwrap();
        table
            .add_row("DMD", vec![format_count(3, 8), format_metric(1.23456)])
            .unwrap();
        table
    }

    #[test]
    fn render_aligns_columns() {
        let expected = "\
method   modes  energy
-------  -----  ------
teacher    8/8   0.000
DMD        3/8   1.235
";
        assert_eq!(example().render(), expected);
    }

    #[test]
    fn markdown_marks_alignment_and_escapes_pipes() {
        let expected = "\
| method  | modes | energy |
| :------ | ----: | -----: |
| teacher |   8/8 |  0.000 |
| DMD     |   3/8 |  1.235 |
";
        assert_eq!(example().to_markdown(), expected);
        let mut table = Table::new(strings(&["a|b"])).unwrap();
        table.add_row("x", vec![]).unwrap();
        assert_eq!(table.to_markdown(), "| a\\|b |\n| :--- |\n| x    |\n");
    }

    #[test]
    fn rows_must_match_the_header() {
        assert!(Table::new(vec![]).is_err());
        let mut table = example();
        let error = table.add_row("ADM", strings(&["1/8"])).unwrap_err();
        assert!(error.to_string().contains("ADM"));
    }

    #[test]
    fn toy_metrics_fill_a_row() {
        let metrics = ToyMetrics {
            modes_covered: 7,
            num_modes: 8,
            high_quality_fraction: 0.98765,
            mode_weight_error: 0.05,
            energy_distance: 0.0123,
        };
        let mut headers = strings(&["method"]);
        headers.extend(ToyMetrics::table_headers());
        let mut table = Table::new(headers).unwrap();
        table.add_row("ADM", metrics.table_cells()).unwrap();
        let rendered = table.render();
        let row = rendered.lines().nth(2).unwrap();
        assert_eq!(row, "ADM       7/8         0.988      0.050        0.012");
    }
}
