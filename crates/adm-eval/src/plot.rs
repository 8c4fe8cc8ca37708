//! Scatter-plot PNGs of 2D sample sets: one titled square panel per set, laid out in a grid.

use std::io::{Cursor, Write};
use std::path::Path;

use anyhow::{ensure, Context, Result};
use image::{ImageFormat, Rgb, RgbImage};

use crate::font::{draw_text, put_pixel_clipped, GLYPH_ADVANCE, GLYPH_HEIGHT};
use crate::ModeSet;

const MAX_COLUMNS: usize = 4;
const MIN_PANEL_PX: u32 = 32;
const MAX_PANEL_PX: u32 = 4096;
/// Space around and between panels.
const MARGIN_PX: u32 = 8;
/// Space above and below a panel title.
const TITLE_PAD_PX: u32 = 3;
/// Opacity of one dot; overlapping dots accumulate, so dense regions read darker.
const DOT_ALPHA: f64 = 0.35;

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const GRID: Rgb<u8> = Rgb([232, 232, 232]);
const AXIS: Rgb<u8> = Rgb([200, 200, 200]);
const BORDER: Rgb<u8> = Rgb([150, 150, 150]);
const TEXT: Rgb<u8> = Rgb([20, 20, 20]);
const DOT: Rgb<u8> = Rgb([25, 70, 160]);
const MODE_CROSS: Rgb<u8> = Rgb([215, 40, 40]);

/// Writes a scatter plot of each `(label, points)` panel to `path` as a PNG, atomically
/// (temporary file, fsync, rename). Every panel shows the square `[-extent, extent]²` with a
/// light grid, the `modes` means as crosses and the points as semi-transparent dots (points
/// outside the extent or not finite are skipped); titles use the built-in 5x7 font and are
/// cut to the panel width. Up to 4 panels per row, each `panel_px` pixels square.
pub fn scatter_png(
    path: &Path,
    panels: &[(String, Vec<[f32; 2]>)],
    modes: &ModeSet,
    extent: f32,
    panel_px: u32,
) -> Result<()> {
    let image = render_scatter(panels, modes, extent, panel_px)
        .with_context(|| format!("scatter plot {}", path.display()))?;
    let mut png = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
        .with_context(|| format!("encoding scatter plot {}", path.display()))?;
    write_atomically(path, &png)
}

fn render_scatter(
    panels: &[(String, Vec<[f32; 2]>)],
    modes: &ModeSet,
    extent: f32,
    panel_px: u32,
) -> Result<RgbImage> {
    ensure!(!panels.is_empty(), "no panels to plot");
    ensure!(
        extent.is_finite() && extent > 0.0,
        "plot extent must be finite and positive, got {extent}"
    );
    ensure!(
        (MIN_PANEL_PX..=MAX_PANEL_PX).contains(&panel_px),
        "panel size must lie in [{MIN_PANEL_PX}, {MAX_PANEL_PX}] px, got {panel_px}"
    );
    let layout = Layout::new(panels.len(), panel_px, extent);
    let mut image = RgbImage::from_pixel(layout.width(), layout.height(), BACKGROUND);
    for (index, (label, points)) in panels.iter().enumerate() {
        let origin = layout.panel_origin(index);
        draw_grid(&mut image, &layout, origin);
        draw_dots(&mut image, &layout, origin, points);
        draw_mode_crosses(&mut image, &layout, origin, modes);
        draw_title(&mut image, &layout, origin, label);
    }
    Ok(image)
}

/// Where the panels go and how data coordinates map to pixels.
struct Layout {
    columns: u32,
    rows: u32,
    panel_px: u32,
    extent: f64,
    /// Font pixel size: titles grow with big panels.
    font_scale: u32,
}

impl Layout {
    fn new(num_panels: usize, panel_px: u32, extent: f32) -> Self {
        let columns = num_panels.min(MAX_COLUMNS);
        Self {
            columns: columns as u32,
            rows: num_panels.div_ceil(columns) as u32,
            panel_px,
            extent: f64::from(extent),
            font_scale: (panel_px / 160).max(1),
        }
    }

    fn title_height(&self) -> u32 {
        GLYPH_HEIGHT * self.font_scale + 2 * TITLE_PAD_PX
    }

    fn width(&self) -> u32 {
        self.columns * (self.panel_px + MARGIN_PX) + MARGIN_PX
    }

    fn height(&self) -> u32 {
        self.rows * (self.title_height() + self.panel_px + MARGIN_PX) + MARGIN_PX
    }

    /// Top-left pixel of panel `index`'s plotting square (below its title).
    fn panel_origin(&self, index: usize) -> (i64, i64) {
        let column = index as u32 % self.columns;
        let row = index as u32 / self.columns;
        let left = MARGIN_PX + column * (self.panel_px + MARGIN_PX);
        let top = MARGIN_PX + row * (self.title_height() + self.panel_px + MARGIN_PX);
        (i64::from(left), i64::from(top + self.title_height()))
    }

    /// Pixel offset inside a panel of a data coordinate (y grows upwards), if it is inside.
    fn to_panel_pixel(&self, [x, y]: [f64; 2]) -> Option<(i64, i64)> {
        let pixels_per_unit = f64::from(self.panel_px) / (2.0 * self.extent);
        let column = ((x + self.extent) * pixels_per_unit).floor();
        let row = ((self.extent - y) * pixels_per_unit).floor();
        let inside = |v: f64| (0.0..f64::from(self.panel_px)).contains(&v);
        (inside(column) && inside(row)).then_some((column as i64, row as i64))
    }
}

fn draw_grid(image: &mut RgbImage, layout: &Layout, (left, top): (i64, i64)) {
    let size = i64::from(layout.panel_px);
    let step = nice_grid_step(layout.extent);
    let lines = (layout.extent / step).floor() as i64;
    for k in -lines..=lines {
        let value = k as f64 * step;
        let color = if k == 0 { AXIS } else { GRID };
        if let Some((offset, _)) = layout.to_panel_pixel([value, 0.0]) {
            for along in 0..size {
                put_pixel_clipped(image, left + offset, top + along, color);
            }
        }
        if let Some((_, offset)) = layout.to_panel_pixel([0.0, value]) {
            for along in 0..size {
                put_pixel_clipped(image, left + along, top + offset, color);
            }
        }
    }
    for along in 0..size {
        for (x, y) in [(along, 0), (along, size - 1), (0, along), (size - 1, along)] {
            put_pixel_clipped(image, left + x, top + y, BORDER);
        }
    }
}

/// The smallest of 1, 2, 5 times a power of ten that gives at most about 4 lines per side.
fn nice_grid_step(extent: f64) -> f64 {
    let raw = extent / 4.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0]
        .into_iter()
        .map(|factor| factor * magnitude)
        .find(|&step| step >= raw)
        .unwrap_or(10.0 * magnitude)
}

fn draw_dots(image: &mut RgbImage, layout: &Layout, (left, top): (i64, i64), points: &[[f32; 2]]) {
    let size = layout.panel_px as usize;
    let dot_px: i64 = if layout.panel_px >= 256 { 2 } else { 1 };
    let mut hits = vec![0u32; size * size];
    for point in points {
        let Some((column, row)) = layout.to_panel_pixel(point.map(f64::from)) else {
            continue;
        };
        for y in row..(row + dot_px).min(size as i64) {
            for x in column..(column + dot_px).min(size as i64) {
                hits[y as usize * size + x as usize] += 1;
            }
        }
    }
    for (index, &count) in hits.iter().enumerate() {
        if count == 0 {
            continue;
        }
        let (x, y) = (left + (index % size) as i64, top + (index / size) as i64);
        let opacity = 1.0 - (1.0 - DOT_ALPHA).powi(count.min(1000) as i32);
        let under = *image.get_pixel(x as u32, y as u32);
        put_pixel_clipped(image, x, y, blend(under, DOT, opacity));
    }
}

fn blend(under: Rgb<u8>, over: Rgb<u8>, opacity: f64) -> Rgb<u8> {
    let channel =
        |u: u8, o: u8| (f64::from(u) * (1.0 - opacity) + f64::from(o) * opacity).round() as u8;
    Rgb([0, 1, 2].map(|c| channel(under[c], over[c])))
}

fn draw_mode_crosses(
    image: &mut RgbImage,
    layout: &Layout,
    (left, top): (i64, i64),
    modes: &ModeSet,
) {
    let arm = i64::from((layout.panel_px / 64).max(3));
    let size = i64::from(layout.panel_px);
    for &mean in &modes.means {
        let Some((column, row)) = layout.to_panel_pixel(mean) else {
            continue;
        };
        for d in -arm..=arm {
            for (x, y) in [(column + d, row), (column, row + d)] {
                if (0..size).contains(&x) && (0..size).contains(&y) {
                    put_pixel_clipped(image, left + x, top + y, MODE_CROSS);
                }
            }
        }
    }
}

fn draw_title(image: &mut RgbImage, layout: &Layout, (left, top): (i64, i64), label: &str) {
    let scale = layout.font_scale;
    // n glyphs take (6n - 1) * scale pixels; keep as many as fit the panel width.
    let max_chars = ((layout.panel_px + scale) / (GLYPH_ADVANCE * scale)) as usize;
    let title: String = label.chars().take(max_chars).collect();
    let title_top = top - i64::from(layout.title_height()) + i64::from(TITLE_PAD_PX);
    draw_text(image, left, title_top, &title, scale, TEXT);
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`,
/// so readers never see a partial file.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = path
        .file_name()
        .with_context(|| format!("output path {} has no file name", path.display()))?;
    let temporary = path.with_file_name(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let written = std::fs::File::create(&temporary)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temporary, path));
    if written.is_err() {
        // Best effort: the write already failed and that error is the one to report.
        let _ = std::fs::remove_file(&temporary);
    }
    written.with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("adm-eval-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn modes() -> ModeSet {
        ModeSet {
            means: vec![[-2.0, -2.0], [2.0, 2.0]],
            std: 0.25,
        }
    }

    #[test]
    fn writes_a_decodable_png_with_dots_crosses_and_titles() {
        let dir = scratch_dir("scatter");
        let path = dir.join("samples.png");
        let panels = vec![
            ("A".to_string(), vec![[0.5f32, 1.5]; 50]),
            ("teacher".to_string(), vec![[-1.5f32, 0.5]; 3]),
        ];
        scatter_png(&path, &panels, &modes(), 4.0, 64).unwrap();

        let image = image::open(&path).unwrap().to_rgb8();
        // 2 columns of (64 + 8) plus a margin; one row of title (7 + 2 * 3) + 64 + 8, plus 8.
        assert_eq!(image.dimensions(), (152, 93));
        // Panel 1 starts at (8, 8 + 13); (0.5, 1.5) maps to offset (36, 20).
        let dot = *image.get_pixel(8 + 36, 21 + 20);
        assert!(
            dot[0] < 40 && dot[2] > 140,
            "dense dots are nearly opaque: {dot:?}"
        );
        // The same spot in panel 2 (starting at x = 80) holds no dots.
        assert_eq!(*image.get_pixel(80 + 36, 21 + 20), BACKGROUND);
        // Mode (-2, -2) maps to offset (16, 48) in every panel.
        assert_eq!(*image.get_pixel(8 + 16, 21 + 48), MODE_CROSS);
        assert_eq!(*image.get_pixel(80 + 16, 21 + 48), MODE_CROSS);
        // Title "A": the top row of the glyph is .###. at y = 8 + 3.
        assert_eq!(*image.get_pixel(8 + 1, 11), TEXT);
        assert_eq!(*image.get_pixel(8, 11), BACKGROUND);

        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("samples.png")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lays_out_at_most_four_columns() {
        let panels: Vec<_> = (0..5)
            .map(|i| (format!("run {i}"), vec![[0.0f32, 0.0]]))
            .collect();
        let image = render_scatter(&panels, &modes(), 3.0, 40).unwrap();
        assert_eq!(image.dimensions(), (4 * 48 + 8, 2 * (13 + 40 + 8) + 8));
    }

    #[test]
    fn long_titles_are_cut_to_the_panel_width() {
        let long = "W".repeat(30);
        let panels = vec![(long, vec![]), ("y".to_string(), vec![])];
        let image = render_scatter(&panels, &modes(), 4.0, 64).unwrap();
        // Ten 'W's fill 59 of the 64 px; the 8 px gap before panel 2 (x = 72..80) stays empty.
        let title_rows = 11..18;
        assert!(title_rows
            .clone()
            .any(|y| *image.get_pixel(8 + 58, y) == TEXT));
        for y in title_rows {
            for x in 72..80 {
                assert_eq!(*image.get_pixel(x, y), BACKGROUND, "({x}, {y})");
            }
        }
    }

    #[test]
    fn faint_dots_accumulate() {
        let single = vec![("x".to_string(), vec![[0.5f32, 1.5]])];
        let many = vec![("x".to_string(), vec![[0.5f32, 1.5]; 4])];
        let light = render_scatter(&single, &modes(), 4.0, 64).unwrap();
        let dark = render_scatter(&many, &modes(), 4.0, 64).unwrap();
        let (x, y) = (8 + 36, 21 + 20);
        assert!(light.get_pixel(x, y)[0] > dark.get_pixel(x, y)[0]);
        assert!(light.get_pixel(x, y)[0] < BACKGROUND[0]);
    }

    #[test]
    fn bad_arguments_are_errors_naming_the_path() {
        let panels = vec![("x".to_string(), vec![[0.0f32, 0.0]])];
        let path = Path::new("/nonexistent-adm-eval-dir/plot.png");
        let error = scatter_png(path, &panels, &modes(), 4.0, 64).unwrap_err();
        assert!(format!("{error:#}").contains("/nonexistent-adm-eval-dir/plot.png"));
        assert!(scatter_png(path, &[], &modes(), 4.0, 64).is_err());
        assert!(render_scatter(&panels, &modes(), 0.0, 64).is_err());
        assert!(render_scatter(&panels, &modes(), f32::NAN, 64).is_err());
        assert!(render_scatter(&panels, &modes(), 4.0, 8).is_err());
    }

    #[test]
    fn grid_steps_are_round_numbers() {
        assert_eq!(nice_grid_step(4.0), 1.0);
        assert_eq!(nice_grid_step(6.0), 2.0);
        assert_eq!(nice_grid_step(15.0), 5.0);
        assert!((nice_grid_step(0.3) - 0.1).abs() < 1e-12);
    }
}
