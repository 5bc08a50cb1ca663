//! Line charts as PNG files (training curves, accuracy against SNR), drawn with `plotters` on a bitmap.
//! Text uses the bundled DejaVu Sans (`DejaVuSans-LICENSE`: Bitstream Vera licence), so charts render the
//! same on every machine without system fonts. Files are written to a temporary sibling, then renamed.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, bail, Context as _, Result};
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// One named line.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart of a figure; a figure stacks its panels vertically.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Mark every point (for a few points per line, e.g. SNRs), not only the line through them.
    pub markers: bool,
}

const PANEL_HEIGHT: u32 = 420;
/// Matplotlib's "tab10" colours: distinct on white, in a fixed order.
const COLORS: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];
const WIDTH: u32 = 960;

fn register_font() {
    REGISTER.call_once(|| {
        // Fails only on a malformed font, which is bundled and fixed: the first draw would report it.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// The range of `values` with a small margin (a flat line gets a unit-wide range around it).
fn padded_range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return None;
    }
    if hi - lo < 1e-12 {
        return Some((lo - 0.5, hi + 0.5));
    }
    let pad = 0.05 * (hi - lo);
    Some((lo - pad, hi + pad))
}

/// Draws `panels` one above the other into the PNG `path`.
pub fn write_png(path: &Path, panels: &[Panel]) -> Result<()> {
    if panels.is_empty() {
        bail!("nothing to plot into {}", path.display());
    }
    register_font();
    let name = path
        .file_name()
        .with_context(|| format!("plot path {} has no file name", path.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    // The bitmap encoder picks the format from the extension, so the temporary name keeps ".png".
    let tmp = parent.join(format!(".{name}.tmp.{}.png", std::process::id()));
    let drawn = draw(&tmp, panels);
    if let Err(e) = drawn {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("cannot draw {}", path.display())));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

fn draw(tmp: &Path, panels: &[Panel]) -> Result<()> {
    let plot_err = |e: &dyn std::fmt::Display| anyhow!("{e}");
    let height = PANEL_HEIGHT * panels.len() as u32;
    let root = BitMapBackend::new(tmp, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(&e))?;
    let areas = root.split_evenly((panels.len(), 1));
    for (panel, area) in panels.iter().zip(&areas) {
        let xs = padded_range(panel.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
        let ys = padded_range(panel.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
        let (Some((x0, x1)), Some((y0, y1))) = (xs, ys) else {
            area.titled(&format!("{} (no data)", panel.title), ("sans-serif", 22))
                .map_err(|e| plot_err(&e))?;
            continue;
        };
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| plot_err(&e))?;
        chart
            .configure_mesh()
            .x_desc(panel.x_label.as_str())
            .y_desc(panel.y_label.as_str())
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| plot_err(&e))?;
        for (i, s) in panel.series.iter().enumerate() {
            let (r, g, b) = COLORS[i % COLORS.len()];
            let color = RGBColor(r, g, b).to_rgba();
            let points: Vec<(f64, f64)> = s.points.iter().copied().filter(|p| p.1.is_finite()).collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| plot_err(&e))?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            if panel.markers {
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(|e| plot_err(&e))?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::LowerLeft)
            .draw()
            .map_err(|e| plot_err(&e))?;
    }
    root.present().map_err(|e| plot_err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("wgpu-mlkd-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("curves.png");
        let panel = Panel {
            title: "L1 per head".into(),
            x_label: "step".into(),
            y_label: "L1".into(),
            series: vec![
                Series {
                    name: "layer 4".into(),
                    points: (0..50).map(|i| (i as f64, 1.0 / (1.0 + i as f64))).collect(),
                },
                Series {
                    name: "flat".into(),
                    points: vec![(0.0, 0.3), (49.0, 0.3)],
                },
            ],
            markers: false,
        };
        let empty = Panel {
            title: "nothing".into(),
            series: Vec::new(),
            markers: true,
            ..panel.clone()
        };
        write_png(&path, &[panel, empty]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "not a PNG file");
        assert!(bytes.len() > 2000, "suspiciously small PNG: {} bytes", bytes.len());
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unwritable_path_is_an_error() {
        let err = write_png(
            Path::new("/nonexistent-dir/x.png"),
            &[Panel {
                title: "t".into(),
                x_label: "x".into(),
                y_label: "y".into(),
                series: vec![Series {
                    name: "s".into(),
                    points: vec![(0.0, 1.0), (1.0, 2.0)],
                }],
                markers: false,
            }],
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("x.png"), "{err:#}");
    }
}
