//! Hand-written SVG plots: Markov trace, cost-effectiveness plane and
//! frontier, CEAC with the acceptability frontier, EVPI, tornado and two-way
//! maps. SVG is text, so the plots are deterministic and embed directly in the
//! HTML report; no plotting dependency is needed. PNG versions are rasterised
//! from this same text by [`crate::raster`].

use std::fmt::Write as _;

use crate::analysis::{Analysis, Owsa, TwoWay};
use crate::engine::Trace;
use crate::model::Model;
use crate::psa::PsaResult;
use crate::report::{esc, fmt_axis};

/// Okabe–Ito palette: distinguishable with common colour-vision deficiencies.
pub const PALETTE: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000",
];

pub fn colour(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// A plotting area with linear axes.
struct Frame {
    w: f64,
    h: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
    svg: String,
}

/// "Nice" tick positions covering [lo, hi].
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if hi.is_nan() || lo.is_nan() || hi <= lo || !lo.is_finite() || !hi.is_finite() {
        return vec![lo];
    }
    let raw = (hi - lo) / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let step = mag
        * if norm < 1.5 {
            1.0
        } else if norm < 3.0 {
            2.0
        } else if norm < 7.0 {
            5.0
        } else {
            10.0
        };
    let start = (lo / step).ceil() as i64;
    let end = (hi / step).floor() as i64;
    (start..=end).map(|k| k as f64 * step).collect()
}

fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if hi.is_nan() || lo.is_nan() || hi <= lo {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - d, hi + d);
    }
    let d = (hi - lo) * 0.05;
    (lo - d, hi + d)
}

impl Frame {
    fn new(title: &str, xlabel: &str, ylabel: &str, x: (f64, f64), y: (f64, f64)) -> Frame {
        let mut f = Frame {
            w: 780.0,
            h: 440.0,
            left: 86.0,
            right: 236.0,
            top: 40.0,
            bottom: 56.0,
            x0: x.0,
            x1: x.1,
            y0: y.0,
            y1: y.1,
            svg: String::new(),
        };
        let _ = write!(
            f.svg,
            r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" font-family="Helvetica, Arial, sans-serif" font-size="12">
<rect width="100%" height="100%" fill="#ffffff"/>
<text x="{tx}" y="22" font-size="15" font-weight="bold" text-anchor="middle">{title}</text>
"##,
            w = f.w,
            h = f.h,
            tx = f.left + f.pw() / 2.0,
            title = esc(title)
        );
        // Grid, ticks and labels.
        for t in ticks(f.x0, f.x1, 6) {
            let px = f.px(t);
            let _ = writeln!(
                f.svg,
                r##"<line x1="{px:.1}" y1="{}" x2="{px:.1}" y2="{}" stroke="#e5e5e5"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
                f.top,
                f.top + f.ph(),
                f.top + f.ph() + 16.0,
                fmt_axis(t)
            );
        }
        for t in ticks(f.y0, f.y1, 6) {
            let py = f.py(t);
            let _ = writeln!(
                f.svg,
                r##"<line x1="{}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#e5e5e5"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                f.left,
                f.left + f.pw(),
                f.left - 6.0,
                py + 4.0,
                fmt_axis(t)
            );
        }
        let _ = writeln!(
            f.svg,
            r##"<rect x="{}" y="{}" width="{:.1}" height="{:.1}" fill="none" stroke="#333"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>
<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"##,
            f.left,
            f.top,
            f.pw(),
            f.ph(),
            f.left + f.pw() / 2.0,
            f.h - 14.0,
            esc(xlabel),
            f.top + f.ph() / 2.0,
            esc(ylabel)
        );
        f
    }

    fn pw(&self) -> f64 {
        self.w - self.left - self.right
    }
    fn ph(&self) -> f64 {
        self.h - self.top - self.bottom
    }
    fn px(&self, x: f64) -> f64 {
        self.left + (x - self.x0) / (self.x1 - self.x0) * self.pw()
    }
    fn py(&self, y: f64) -> f64 {
        self.top + self.ph() - (y - self.y0) / (self.y1 - self.y0) * self.ph()
    }

    fn polyline(&mut self, pts: &[(f64, f64)], colour: &str, width: f64, dash: Option<&str>) {
        if pts.is_empty() {
            return;
        }
        let mut d = String::new();
        for (x, y) in pts {
            let _ = write!(d, "{:.1},{:.1} ", self.px(*x), self.py(*y));
        }
        let dash = dash
            .map(|d| format!(r#" stroke-dasharray="{d}""#))
            .unwrap_or_default();
        let _ = writeln!(
            self.svg,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="{width}"{dash}/>"#,
            d.trim_end()
        );
    }

    fn point(&mut self, x: f64, y: f64, colour: &str, r: f64, opacity: f64) {
        let _ = writeln!(
            self.svg,
            r#"<circle cx="{:.1}" cy="{:.1}" r="{r}" fill="{colour}" fill-opacity="{opacity}"/>"#,
            self.px(x),
            self.py(y)
        );
    }

    fn label(&mut self, x: f64, y: f64, text: &str) {
        let _ = writeln!(
            self.svg,
            r#"<text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            self.px(x) + 6.0,
            self.py(y) - 6.0,
            esc(text)
        );
    }

    fn legend(&mut self, items: &[(String, String, bool)]) {
        let x = self.left + self.pw() + 14.0;
        for (i, (text, colour, dashed)) in items.iter().enumerate() {
            let y = self.top + 10.0 + i as f64 * 20.0;
            let dash = if *dashed {
                r#" stroke-dasharray="6,4""#
            } else {
                ""
            };
            let _ = writeln!(
                self.svg,
                r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{colour}" stroke-width="3"{dash}/><text x="{}" y="{}" font-size="11">{}</text>"#,
                x + 22.0,
                x + 28.0,
                y + 4.0,
                esc(&truncate(text, 30))
            );
        }
    }

    fn finish(mut self) -> String {
        self.svg.push_str("</svg>\n");
        self.svg
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

fn bounds(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi { (0.0, 1.0) } else { (lo, hi) }
}

/// State membership over time for one strategy.
pub fn markov_trace(model: &Model, strategy: usize, trace: &Trace) -> String {
    let mk = model.markov().expect("trace plots are for Markov models");
    let n = trace.membership.len();
    let len = model.settings.cycle_length;
    let x = padded(0.0, (n - 1) as f64 * len);
    let mut f = Frame::new(
        &format!("Markov trace: {}", model.strategies[strategy].label),
        "Years since start",
        "Proportion of cohort",
        (0.0f64.max(x.0), x.1),
        (0.0, 1.02),
    );
    let mut legend = Vec::new();
    for (s, st) in mk.states.iter().enumerate() {
        let pts: Vec<(f64, f64)> = trace
            .membership
            .iter()
            .enumerate()
            .map(|(k, m)| (k as f64 * len, m[s]))
            .collect();
        f.polyline(&pts, colour(s), 2.0, None);
        legend.push((st.label.clone(), colour(s).to_string(), false));
    }
    f.legend(&legend);
    f.finish()
}

/// Deterministic cost-effectiveness plane with the efficient frontier.
pub fn frontier(model: &Model, a: &Analysis) -> String {
    let (e0, e1) = bounds(a.strategies.iter().map(|s| s.effect));
    let (c0, c1) = bounds(a.strategies.iter().map(|s| s.outcome.cost));
    let mut f = Frame::new(
        "Cost-effectiveness frontier",
        &format!("Effect ({})", a.effect_label),
        &format!("Cost ({})", a.currency),
        padded(e0, e1),
        padded(c0, c1),
    );
    let front: Vec<(f64, f64)> = a
        .icer
        .iter()
        .filter(|r| r.status == crate::icer::Status::NonDominated)
        .map(|r| (r.effect, r.cost))
        .collect();
    f.polyline(&front, "#333", 1.5, None);
    let mut legend = Vec::new();
    for (i, s) in a.strategies.iter().enumerate() {
        f.point(s.effect, s.outcome.cost, colour(i), 5.0, 1.0);
        let status = a
            .icer
            .iter()
            .find(|r| r.strategy == i)
            .map(|r| r.status.code())
            .unwrap_or("");
        f.label(s.effect, s.outcome.cost, &format!("{} ({status})", s.name));
        legend.push((s.label.clone(), colour(i).to_string(), false));
    }
    legend.push(("Efficient frontier".into(), "#333".into(), false));
    let _ = model;
    f.legend(&legend);
    f.finish()
}

/// PSA draws of incremental cost and effect against the reference, with the
/// willingness-to-pay line.
pub fn ce_plane(model: &Model, psa: &PsaResult) -> String {
    let r = model.meta.reference;
    let ns = model.strategies.len();
    let n = psa.iterations;
    // At most 2,000 points per strategy keeps the file small; every k-th draw
    // keeps the picture representative and deterministic.
    let stride = n.div_ceil(2000).max(1);
    let others: Vec<usize> = (0..ns).filter(|&s| s != r).collect();
    let de: Vec<f64> = others
        .iter()
        .flat_map(|&s| (0..n).map(move |i| psa.effect[s][i] - psa.effect[r][i]))
        .collect();
    let dc: Vec<f64> = others
        .iter()
        .flat_map(|&s| (0..n).map(move |i| psa.cost[s][i] - psa.cost[r][i]))
        .collect();
    let (x0, x1) = bounds(de.iter().copied().chain([0.0]));
    let (y0, y1) = bounds(dc.iter().copied().chain([0.0]));
    let mut f = Frame::new(
        &format!("Cost-effectiveness plane (vs {})", model.strategies[r].name),
        &format!("Incremental effect ({})", model.meta.effect_label),
        &format!("Incremental cost ({})", model.meta.currency),
        padded(x0, x1),
        padded(y0, y1),
    );
    // Axes through the origin.
    f.polyline(&[(f.x0, 0.0), (f.x1, 0.0)], "#777", 1.0, None);
    f.polyline(&[(0.0, f.y0), (0.0, f.y1)], "#777", 1.0, None);
    let mut legend = Vec::new();
    for (k, &s) in others.iter().enumerate() {
        let c = colour(s);
        for i in (0..n).step_by(stride) {
            f.point(de[k * n + i] - 0.0, dc[k * n + i], c, 1.8, 0.35);
        }
        let me = psa.effect_summary[s].mean - psa.effect_summary[r].mean;
        let mc = psa.cost_summary[s].mean - psa.cost_summary[r].mean;
        let _ = writeln!(
            f.svg,
            r##"<circle cx="{:.1}" cy="{:.1}" r="6" fill="{c}" stroke="#000" stroke-width="1.5"/>"##,
            f.px(me),
            f.py(mc)
        );
        legend.push((model.strategies[s].label.clone(), c.to_string(), false));
    }
    // WTP line: cost = wtp × effect, clipped to the frame.
    let w = model.settings.wtp;
    let mut pts = Vec::new();
    for x in [f.x0, f.x1] {
        pts.push((x, w * x));
    }
    let clip: Vec<(f64, f64)> = pts
        .iter()
        .map(|&(x, y)| {
            if y > f.y1 {
                (f.y1 / w, f.y1)
            } else if y < f.y0 {
                (f.y0 / w, f.y0)
            } else {
                (x, y)
            }
        })
        .collect();
    if w > 0.0 {
        f.polyline(&clip, "#444", 1.5, Some("6,4"));
        legend.push((format!("WTP {}", fmt_axis(w)), "#444".into(), true));
    }
    f.legend(&legend);
    f.finish()
}

/// Cost-effectiveness acceptability curves and frontier.
pub fn ceac(model: &Model, psa: &PsaResult) -> String {
    let (w0, w1) = bounds(psa.ceac.iter().map(|p| p.wtp));
    let mut f = Frame::new(
        "Cost-effectiveness acceptability curves",
        &format!(
            "Willingness to pay ({} per {})",
            model.meta.currency, model.meta.effect_label
        ),
        "Probability cost-effective",
        (w0, if w1 > w0 { w1 } else { w0 + 1.0 }),
        (0.0, 1.02),
    );
    let mut legend = Vec::new();
    for (s, st) in model.strategies.iter().enumerate() {
        let pts: Vec<(f64, f64)> = psa.ceac.iter().map(|p| (p.wtp, p.probability[s])).collect();
        f.polyline(&pts, colour(s), 2.0, None);
        legend.push((st.label.clone(), colour(s).to_string(), false));
    }
    // The acceptability frontier: probability of the strategy with the highest
    // expected net benefit.
    for p in &psa.ceac {
        f.point(p.wtp, p.frontier_probability, "#000", 2.2, 0.9);
    }
    legend.push(("Acceptability frontier (dots)".into(), "#000".into(), true));
    f.legend(&legend);
    f.finish()
}

pub fn evpi(model: &Model, psa: &PsaResult) -> String {
    let pop = model.settings.population_size.is_some();
    let vals: Vec<(f64, f64)> = psa
        .ceac
        .iter()
        .map(|p| {
            (
                p.wtp,
                if pop {
                    p.population_evpi.unwrap_or(p.evpi)
                } else {
                    p.evpi
                },
            )
        })
        .collect();
    let (w0, w1) = bounds(vals.iter().map(|p| p.0));
    let (_, v1) = bounds(vals.iter().map(|p| p.1));
    let mut f = Frame::new(
        "Expected value of perfect information",
        &format!(
            "Willingness to pay ({} per {})",
            model.meta.currency, model.meta.effect_label
        ),
        &format!(
            "EVPI ({}{})",
            model.meta.currency,
            if pop { ", population" } else { " per person" }
        ),
        (w0, if w1 > w0 { w1 } else { w0 + 1.0 }),
        (0.0, if v1 > 0.0 { v1 * 1.08 } else { 1.0 }),
    );
    f.polyline(&vals, colour(0), 2.0, None);
    f.finish()
}

/// Tornado diagram of incremental NMB.
pub fn tornado(model: &Model, o: &Owsa) -> String {
    let rows: Vec<_> = o.rows.iter().take(model.tornado_top).collect();
    let (lo, hi) = bounds(
        rows.iter()
            .flat_map(|r| [r.inmb_low, r.inmb_high])
            .chain([o.base_inmb]),
    );
    let bar_h = 22.0;
    let h = 90.0 + rows.len() as f64 * (bar_h + 8.0);
    let title = format!(
        "Tornado: incremental NMB of {} vs {} at {} {}/{}",
        model.strategies[o.focal].name,
        model.strategies[o.reference].name,
        fmt_axis(o.wtp),
        model.meta.currency,
        model.meta.effect_label
    );
    // The frame is used for its x mapping only; bars get their own layout
    // with parameter names on the left.
    let mut g = Frame::new(&title, "", "", padded(lo, hi), (0.0, 1.0));
    g.w = 900.0;
    g.h = h;
    g.left = 330.0;
    g.right = 40.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" font-family="Helvetica, Arial, sans-serif" font-size="12">
<rect width="100%" height="100%" fill="#ffffff"/>
<text x="{tx}" y="22" font-size="14" font-weight="bold" text-anchor="middle">{title}</text>
"##,
        w = g.w,
        h = h,
        tx = g.w / 2.0,
        title = esc(&title)
    );
    let top = 40.0;
    let bottom = h - 50.0;
    for t in ticks(g.x0, g.x1, 6) {
        let px = g.px(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{bottom}" stroke="#e5e5e5"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            bottom + 16.0,
            fmt_axis(t)
        );
    }
    let bx = g.px(o.base_inmb);
    for (i, r) in rows.iter().enumerate() {
        let y = top + 8.0 + i as f64 * (bar_h + 8.0);
        for (v, c, tag) in [
            (r.inmb_low, colour(0), "low"),
            (r.inmb_high, colour(1), "high"),
        ] {
            let px = g.px(v);
            let (x, w) = if px < bx {
                (px, bx - px)
            } else {
                (bx, px - bx)
            };
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{bar_h}" fill="{c}" fill-opacity="0.85"><title>{} = {} ({tag}): {}</title></rect>"#,
                w.max(0.5),
                esc(&r.parameter),
                fmt_axis(if tag == "low" { r.low } else { r.high }),
                fmt_axis(v)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{} [{} – {}]</text>"#,
            g.left - 8.0,
            y + bar_h / 2.0 + 4.0,
            esc(&truncate(&r.label, 32)),
            fmt_axis(r.low),
            fmt_axis(r.high)
        );
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{bx:.1}" y1="{top}" x2="{bx:.1}" y2="{bottom}" stroke="#000" stroke-width="1.5"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>
<rect x="{}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{}" y="{:.1}">low value</text>
<rect x="{}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{}" y="{:.1}">high value</text>
</svg>
"##,
        g.left + (g.w - g.left - g.right) / 2.0,
        h - 14.0,
        esc(&format!(
            "Incremental net monetary benefit ({}); base case {}",
            model.meta.currency,
            fmt_axis(o.base_inmb)
        )),
        10.0,
        h - 24.0,
        colour(0),
        26.0,
        h - 14.0,
        90.0,
        h - 24.0,
        colour(1),
        106.0,
        h - 14.0,
    );
    svg
}

/// Two-way analysis: which strategy has the highest NMB over the grid.
pub fn two_way(model: &Model, t: &TwoWay) -> String {
    let (x0, x1) = (t.xs[0], *t.xs.last().expect("grid has points"));
    let (y0, y1) = (t.ys[0], *t.ys.last().expect("grid has points"));
    let label = |name: &str| {
        model
            .param_index(name)
            .map(|k| model.params[k].label.clone())
            .unwrap_or_else(|| name.to_string())
    };
    let mut f = Frame::new(
        &format!(
            "Two-way: incremental NMB at {} {}/{}",
            fmt_axis(model.settings.wtp),
            model.meta.currency,
            model.meta.effect_label
        ),
        &label(&t.x),
        &label(&t.y),
        (x0, x1),
        (y0, y1),
    );
    let nx = t.xs.len();
    let ny = t.ys.len();
    let dx = (x1 - x0) / (nx - 1) as f64;
    let dy = (y1 - y0) / (ny - 1) as f64;
    // Colour: blue where the focal strategy has the higher net benefit,
    // vermilion where the reference has, deeper with the size of the gap.
    let max_abs = t
        .inmb
        .iter()
        .flatten()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    for (iy, row) in t.inmb.iter().enumerate() {
        for (ix, &v) in row.iter().enumerate() {
            let (cx, cy) = (t.xs[ix], t.ys[iy]);
            let (px0, px1) = (f.px((cx - dx / 2.0).max(x0)), f.px((cx + dx / 2.0).min(x1)));
            let (py0, py1) = (f.py((cy + dy / 2.0).min(y1)), f.py((cy - dy / 2.0).max(y0)));
            let fill = if v >= 0.0 { colour(0) } else { colour(1) };
            let alpha = 0.15 + 0.75 * (v.abs() / max_abs);
            let _ = writeln!(
                f.svg,
                r#"<rect x="{px0:.1}" y="{py0:.1}" width="{:.1}" height="{:.1}" fill="{fill}" fill-opacity="{alpha:.2}"><title>{} = {}, {} = {}: INMB {}, best {}</title></rect>"#,
                px1 - px0,
                py1 - py0,
                esc(&t.x),
                fmt_axis(cx),
                esc(&t.y),
                fmt_axis(cy),
                fmt_axis(v),
                esc(&model.strategies[t.best[iy][ix]].name)
            );
        }
    }
    let legend = vec![
        (
            format!("INMB > 0: {}", model.strategies[t.focal].name),
            colour(0).to_string(),
            false,
        ),
        (
            format!("INMB < 0: {}", model.strategies[t.reference].name),
            colour(1).to_string(),
            false,
        ),
        (
            format!("|INMB| up to {}", fmt_axis(max_abs)),
            "#999".to_string(),
            false,
        ),
    ];
    f.legend(&legend);
    f.finish()
}
