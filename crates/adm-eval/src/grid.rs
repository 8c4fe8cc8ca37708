//! A grey-scale picture of a batch of latents: one row per sample, one cell per channel. Good
//! enough to watch a tiny model's samples change while it trains, without a VAE.

use std::io::Cursor;
use std::path::Path;

use anyhow::{ensure, Result};
use image::{GrayImage, ImageFormat, Luma};

use crate::plot::write_atomically;

/// Space between cells.
const GAP_PX: u32 = 2;

/// Writes `values`, `dims = [n, c, h, w]` in row-major order, as a PNG at `path` (atomically):
/// cell (i, j) shows channel j of sample i, `pixel_px` pixels per value, each channel scaled
/// from its minimum (black) to its maximum (white) over the whole batch so samples compare.
/// Non-finite values are drawn black.
pub fn channel_grid_png(
    path: &Path,
    values: &[f32],
    dims: [usize; 4],
    pixel_px: u32,
) -> Result<()> {
    let [n, c, h, w] = dims;
    ensure!(
        n * c * h * w == values.len() && !values.is_empty(),
        "{}: {} values do not fill a batch of shape {dims:?}",
        path.display(),
        values.len()
    );
    ensure!(
        pixel_px > 0,
        "{}: pixel_px must be positive",
        path.display()
    );
    let ranges: Vec<(f32, f32)> = (0..c)
        .map(|ch| {
            (0..n)
                .flat_map(|i| &values[(i * c + ch) * h * w..(i * c + ch + 1) * h * w])
                .filter(|v| v.is_finite())
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                })
        })
        .collect();
    let cell_w = w as u32 * pixel_px;
    let cell_h = h as u32 * pixel_px;
    let width = c as u32 * (cell_w + GAP_PX) + GAP_PX;
    let height = n as u32 * (cell_h + GAP_PX) + GAP_PX;
    let mut image = GrayImage::from_pixel(width, height, Luma([128]));
    for i in 0..n {
        for (ch, &(lo, hi)) in ranges.iter().enumerate() {
            let span = if hi > lo { hi - lo } else { 1.0 };
            let plane = &values[(i * c + ch) * h * w..(i * c + ch + 1) * h * w];
            let left = GAP_PX + ch as u32 * (cell_w + GAP_PX);
            let top = GAP_PX + i as u32 * (cell_h + GAP_PX);
            for (k, &v) in plane.iter().enumerate() {
                let grey = if v.is_finite() {
                    (((v - lo) / span).clamp(0.0, 1.0) * 255.0).round() as u8
                } else {
                    0
                };
                let (y, x) = ((k / w) as u32, (k % w) as u32);
                for dy in 0..pixel_px {
                    for dx in 0..pixel_px {
                        image.put_pixel(
                            left + x * pixel_px + dx,
                            top + y * pixel_px + dy,
                            Luma([grey]),
                        );
                    }
                }
            }
        }
    }
    let mut bytes = Vec::new();
    image.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)?;
    write_atomically(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_one_cell_per_sample_and_channel() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("adm-grid-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("grid.png");
        // 2 samples, 2 channels, 1x2 values: channel 0 spans 0..3, channel 1 is constant.
        let values = [0.0, 1.0, 5.0, 5.0, 2.0, 3.0, 5.0, 5.0];
        channel_grid_png(&path, &values, [2, 2, 1, 2], 3)?;
        let img = image::open(&path)?.to_luma8();
        assert_eq!(
            img.dimensions(),
            (2 * (6 + GAP_PX) + GAP_PX, 2 * (3 + GAP_PX) + GAP_PX)
        );
        // Sample 0, channel 0: 0 -> black, 1 -> a third; sample 1: 3 -> white.
        assert_eq!(img.get_pixel(GAP_PX, GAP_PX)[0], 0);
        assert_eq!(img.get_pixel(GAP_PX + 3, GAP_PX)[0], 85);
        assert_eq!(img.get_pixel(GAP_PX + 3, 2 * GAP_PX + 3)[0], 255);
        let err = channel_grid_png(&path, &values[..7], [2, 2, 1, 2], 3).unwrap_err();
        assert!(err.to_string().contains("grid.png"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
