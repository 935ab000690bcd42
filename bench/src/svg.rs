//! Inline SVG plots for the HTML report, drawn by hand so that the page
//! needs no script or download: a line chart over time and a log-scale
//! histogram with its CDF.

use std::fmt::Write as _;

use crate::report::esc;

const W: f64 = 900.0;
const H: f64 = 300.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 60.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 45.0;

pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// A step of 1, 2 or 5 × 10^k giving about five ticks over `span`.
fn nice_step(span: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    mag * if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    }
}

fn label(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if v.abs() >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn open(title: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12"><text x="{LEFT}" y="18" font-size="14" font-weight="bold">{}</text>"#,
        esc(title)
    );
    s
}

fn frame(s: &mut String, x_label: &str, y_label: &str) {
    let (x1, y1) = (W - RIGHT, H - BOTTOM);
    let _ = write!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#999"/><text x="{}" y="{}" text-anchor="middle">{}</text><text transform="translate(16,{}) rotate(-90)" text-anchor="middle">{}</text>"##,
        x1 - LEFT,
        y1 - TOP,
        (LEFT + x1) / 2.0,
        H - 8.0,
        esc(x_label),
        (TOP + y1) / 2.0,
        esc(y_label)
    );
}

fn no_data(mut s: String) -> String {
    let _ =
        write!(s, r##"<text x="{}" y="{}" text-anchor="middle" fill="#999">no data</text></svg>"##, W / 2.0, H / 2.0);
    s.push('\n');
    s
}

/// Lines over a linear x axis (seconds) and a linear y axis from 0.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let mut s = open(title);
    frame(&mut s, x_label, y_label);
    let all = || series.iter().flat_map(|se| se.points.iter().copied());
    if all().next().is_none() {
        return no_data(s);
    }
    let x_min = all().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x_max = all().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max).max(x_min + 1.0);
    // 15% headroom keeps the lines clear of the legend.
    let top = all().map(|p| p.1).fold(0.0, f64::max) * 1.15;
    let y_step = nice_step(top);
    let y_max = (top / y_step).ceil().max(1.0) * y_step;
    let px = |x: f64| LEFT + (x - x_min) / (x_max - x_min) * (W - RIGHT - LEFT);
    let py = |y: f64| H - BOTTOM - y / y_max * (H - BOTTOM - TOP);
    let mut y = 0.0;
    while y <= y_max + y_step / 2.0 {
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            py(y) + 4.0,
            label(y),
            py = py(y)
        );
        y += y_step;
    }
    let x_step = nice_step(x_max - x_min);
    let mut x = (x_min / x_step).ceil() * x_step;
    while x <= x_max {
        let _ =
            write!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#, px(x), H - BOTTOM + 16.0, label(x));
        x += x_step;
    }
    for (i, se) in series.iter().enumerate() {
        if se.points.is_empty() {
            continue;
        }
        let pts: Vec<String> = se.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/><rect x="{lx}" y="{ly}" width="12" height="3" fill="{c}"/><text x="{}" y="{}">{}</text>"#,
            pts.join(" "),
            W - RIGHT - 134.0,
            TOP + 17.0 + 16.0 * i as f64,
            esc(&se.name),
            lx = W - RIGHT - 150.0,
            ly = TOP + 12.0 + 16.0 * i as f64,
            c = se.color
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Bars for `(upper bound, count)` bins on a log x axis, with the
/// cumulative share drawn as a line against a 0–100% axis on the right.
pub fn histogram(title: &str, x_label: &str, bins: &[(f64, u64)]) -> String {
    let mut s = open(title);
    frame(&mut s, x_label, "count");
    let total: u64 = bins.iter().map(|b| b.1).sum();
    if bins.len() < 2 || total == 0 {
        return no_data(s);
    }
    let ratio = bins[1].0 / bins[0].0;
    let lo = (bins[0].0 / ratio).log10();
    let hi = bins[bins.len() - 1].0.log10();
    let px = |v: f64| LEFT + (v.log10() - lo) / (hi - lo) * (W - RIGHT - LEFT);
    let max = bins.iter().map(|b| b.1).max().unwrap_or(1).max(1) as f64;
    let plot_h = H - BOTTOM - TOP;
    let mut decade = 10f64.powf(lo.ceil());
    while decade.log10() <= hi + 1e-9 {
        let text = if decade >= 1e6 {
            format!("{} s", trim(decade / 1e6))
        } else if decade >= 1e3 {
            format!("{} ms", trim(decade / 1e3))
        } else {
            format!("{} µs", trim(decade))
        };
        let x = px(decade);
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{text}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 16.0
        );
        decade *= 10.0;
    }
    for frac in [0.0, 0.5, 1.0] {
        let y = H - BOTTOM - frac * plot_h;
        let _ = write!(
            s,
            r##"<text x="{}" y="{:.1}" text-anchor="end">{}</text><text x="{}" y="{:.1}" fill="#d62728">{}%</text>"##,
            LEFT - 6.0,
            y + 4.0,
            label(frac * max),
            W - RIGHT + 6.0,
            y + 4.0,
            frac * 100.0
        );
    }
    let mut cdf = Vec::with_capacity(bins.len());
    let mut seen = 0u64;
    let mut prev = bins[0].0 / ratio;
    for &(upper, count) in bins {
        let (x0, x1) = (px(prev), px(upper));
        let h = count as f64 / max * plot_h;
        if count > 0 {
            let _ = write!(
                s,
                r##"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#1f77b4" opacity="0.75"><title>≤ {} µs: {count}</title></rect>"##,
                H - BOTTOM - h,
                (x1 - x0 - 1.0).max(0.5),
                trim(upper)
            );
        }
        seen += count;
        cdf.push(format!("{x1:.1},{:.1}", H - BOTTOM - seen as f64 / total as f64 * plot_h));
        prev = upper;
    }
    let _ =
        write!(s, r##"<polyline fill="none" stroke="#d62728" stroke-width="2" points="{}"/></svg>"##, cdf.join(" "));
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps_are_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(nice_step(10.0), 2.0);
        assert_eq!(nice_step(100.0), 20.0);
        assert_eq!(nice_step(7.0), 2.0);
        assert_eq!(nice_step(23_000.0), 5000.0);
        assert_eq!(nice_step(0.0), 1.0);
        assert_eq!(label(25_000.0), "25k");
        assert_eq!(label(1_500_000.0), "1.5M");
    }

    #[test]
    fn charts_are_closed_svg_without_nan_and_escape_names() {
        let series = [Series { name: "a<b".into(), color: "#000", points: vec![(1.0, 5.0), (2.0, 7.5)] }];
        let line = line_chart("t", "x", "y", &series);
        let hist = histogram("h", "x", &[(1.0, 3), (1.26, 0), (1.58, 9)]);
        for svg in [&line, &hist] {
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
            assert!(!svg.contains("NaN") && !svg.contains("inf"));
        }
        assert!(line.contains("a&lt;b") && line.contains("<polyline"));
        assert_eq!(hist.matches("<rect x=").count(), 1 + 2, "frame + two non-empty bars");
        assert!(line_chart("t", "x", "y", &[]).contains("no data"));
    }
}
