//! Writing results: JSON, CSV, SVG plots and a self-contained HTML report with
//! a CHEERS 2022 checklist (Husereau et al., Value Health 2022;25:3-9) filled
//! from the model's metadata.
//!
//! This is the only module that writes files; it writes only inside the output
//! directory it is given.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::analysis::Analysis;
use crate::error::{EconError, Result};
use crate::icer::Status;
use crate::model::{Counting, DiscountTiming, Model, ModelKind, Structure};
use crate::svg;

// ------------------------------------------------------------ formatting

/// Fixed-point with thousands separators: `fmt_num(44663.45, 2)` → `44,663.45`.
pub fn fmt_num(v: f64, decimals: usize) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "–".into()
        } else if v > 0.0 {
            "∞".into()
        } else {
            "−∞".into()
        };
    }
    let s = format!("{:.*}", decimals, v.abs());
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i.to_string(), Some(f.to_string())),
        None => (s.clone(), None),
    };
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let neg = v < 0.0 && s.chars().any(|c| c.is_ascii_digit() && c != '0');
    format!(
        "{}{}{}",
        if neg { "−" } else { "" },
        grouped,
        frac.map(|f| format!(".{f}")).unwrap_or_default()
    )
}

/// Money: whole units when large, cents otherwise.
pub fn fmt_money(v: f64) -> String {
    if v.abs() >= 1000.0 {
        fmt_num(v, 0)
    } else {
        fmt_num(v, 2)
    }
}

/// Effects (QALYs, life-years) with enough digits to show small differences.
pub fn fmt_effect(v: f64) -> String {
    if v != 0.0 && v.abs() < 0.01 {
        format!("{v:.6}")
    } else {
        fmt_num(v, 4)
    }
}

/// Compact axis labels: 25000 → `25k`, 0.25 → `0.25`.
pub fn fmt_axis(v: f64) -> String {
    let a = v.abs();
    let trim = |s: String| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    let s = if a >= 1e6 {
        format!("{}M", trim(format!("{:.2}", v / 1e6)))
    } else if a >= 1e4 {
        format!("{}k", trim(format!("{:.1}", v / 1e3)))
    } else if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        trim(format!("{v:.2}"))
    } else {
        trim(format!("{v:.4}"))
    };
    s.replace('-', "−")
}

/// Escapes text for HTML and SVG.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        String::new()
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(csv_num).unwrap_or_default()
}

/// A file name from a strategy / parameter name.
fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

// -------------------------------------------------------------- writing

/// Files written by [`write_report`].
#[derive(Debug, Clone)]
pub struct ReportFiles {
    pub dir: PathBuf,
    pub html: PathBuf,
    pub files: Vec<PathBuf>,
    /// The SVG plots among `files`, for rasterising (see [`crate::raster`]).
    pub plots: Vec<PathBuf>,
}

struct Out {
    dir: PathBuf,
    files: Vec<PathBuf>,
}

impl Out {
    fn write(&mut self, name: &str, content: &str) -> Result<()> {
        let p = self.dir.join(name);
        std::fs::write(&p, content).map_err(|e| EconError::Write {
            path: p.clone(),
            source: e,
        })?;
        self.files.push(p);
        Ok(())
    }
}

/// Writes results.json, CSV tables, SVG plots and report.html into `dir`.
pub fn write_report(model: &Model, a: &Analysis, dir: &Path) -> Result<ReportFiles> {
    std::fs::create_dir_all(dir).map_err(|e| EconError::Write {
        path: dir.to_owned(),
        source: e,
    })?;
    let mut out = Out {
        dir: dir.to_owned(),
        files: Vec::new(),
    };

    let json = serde_json::json!({
        "model": model_summary(model),
        "results": a,
    });
    out.write(
        "results.json",
        &serde_json::to_string_pretty(&json).expect("results serialise"),
    )?;
    for (name, content) in csv_tables(model, a) {
        out.write(&name, &content)?;
    }
    let plots = plots(model, a);
    for (name, content, _) in &plots {
        out.write(name, content)?;
    }
    let html = html(model, a, &plots);
    out.write("report.html", &html)?;
    Ok(ReportFiles {
        dir: dir.to_owned(),
        html: dir.join("report.html"),
        files: out.files,
        plots: plots.iter().map(|(name, _, _)| dir.join(name)).collect(),
    })
}

fn model_summary(model: &Model) -> serde_json::Value {
    serde_json::json!({
        "meta": model.meta,
        "settings": model.settings,
        "parameters": model.params,
        "dirichlet": model.dirichlet,
        "outcomes": model.outcomes,
        "strategies": model.strategies.iter().map(|s| serde_json::json!({
            "name": s.name, "label": s.label, "description": s.description, "overrides": s.overrides,
        })).collect::<Vec<_>>(),
        "source": model.source_path.as_ref().map(|p| p.display().to_string()),
    })
}

fn csv_tables(model: &Model, a: &Analysis) -> Vec<(String, String)> {
    let mut v = Vec::new();
    let mut s = String::from(
        "strategy,label,cost,qalys,life_years,cost_undiscounted,qalys_undiscounted,life_years_undiscounted,effect,nmb,nhb",
    );
    for o in &model.outcomes {
        let _ = write!(s, ",{}", csv_field(&o.name));
    }
    s.push('\n');
    for st in &a.strategies {
        let o = &st.outcome;
        let _ = write!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{}",
            csv_field(&st.name),
            csv_field(&st.label),
            csv_num(o.cost),
            csv_num(o.qalys),
            csv_num(o.life_years),
            csv_num(o.cost_undiscounted),
            csv_num(o.qalys_undiscounted),
            csv_num(o.life_years_undiscounted),
            csv_num(st.effect),
            csv_num(st.nmb),
            csv_num(st.nhb)
        );
        for x in &o.outcomes {
            let _ = write!(s, ",{}", csv_num(*x));
        }
        s.push('\n');
    }
    v.push(("base_case.csv".into(), s));

    let mut s = String::from(
        "strategy,cost,effect,status,compared_to,inc_cost,inc_effect,icer,dominated_by\n",
    );
    for r in &a.icer {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{}",
            csv_field(&r.name),
            csv_num(r.cost),
            csv_num(r.effect),
            r.status.code(),
            r.compared_to
                .map(|i| model.strategies[i].name.clone())
                .unwrap_or_default(),
            opt(r.inc_cost),
            opt(r.inc_effect),
            opt(r.icer),
            r.dominated_by
                .iter()
                .map(|&i| model.strategies[i].name.clone())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    v.push(("icer.csv".into(), s));

    let mut s = String::from("name,label,base,low,high,distribution,unit,source\n");
    for p in &model.params {
        let (lo, hi) = p
            .range
            .map(|(a, b)| (csv_num(a), csv_num(b)))
            .unwrap_or_default();
        let dist = if let Some(g) = model.dirichlet.iter().find(|g| {
            g.params
                .contains(&model.param_index(&p.name).unwrap_or(usize::MAX))
        }) {
            format!("Dirichlet group {}", g.name)
        } else {
            p.dist.describe()
        };
        let _ = writeln!(
            s,
            "{},{},{},{lo},{hi},{},{},{}",
            csv_field(&p.name),
            csv_field(&p.label),
            csv_num(p.base),
            csv_field(&dist),
            csv_field(&p.unit),
            csv_field(&p.source)
        );
    }
    v.push(("parameters.csv".into(), s));

    if let Structure::Markov(mk) = &model.structure {
        for (i, run) in a.runs.iter().enumerate() {
            let Some(tr) = &run.trace else { continue };
            let mut s = String::from("cycle");
            for st in &mk.states {
                let _ = write!(s, ",{}", csv_field(&st.name));
            }
            s.push_str(",cost_discounted,qalys_discounted,life_years_discounted\n");
            for (k, m) in tr.membership.iter().enumerate() {
                let _ = write!(s, "{k}");
                for x in m {
                    let _ = write!(s, ",{}", csv_num(*x));
                }
                if k == 0 {
                    s.push_str(",,,\n");
                } else {
                    let _ = writeln!(
                        s,
                        ",{},{},{}",
                        tr.cycle_cost
                            .get(k - 1)
                            .map(|x| csv_num(*x))
                            .unwrap_or_default(),
                        tr.cycle_qalys
                            .get(k - 1)
                            .map(|x| csv_num(*x))
                            .unwrap_or_default(),
                        tr.cycle_life_years
                            .get(k - 1)
                            .map(|x| csv_num(*x))
                            .unwrap_or_default()
                    );
                }
            }
            v.push((format!("trace_{}.csv", slug(&model.strategies[i].name)), s));
        }
    } else {
        let mut s = String::from("strategy,path,probability,cost,qalys,life_years\n");
        for (i, run) in a.runs.iter().enumerate() {
            for p in run.paths.iter().flatten() {
                let _ = writeln!(
                    s,
                    "{},{},{},{},{},{}",
                    csv_field(&model.strategies[i].name),
                    csv_field(&p.nodes.join(" > ")),
                    csv_num(p.probability),
                    csv_num(p.cost),
                    csv_num(p.qalys),
                    csv_num(p.life_years)
                );
            }
        }
        v.push(("tree_paths.csv".into(), s));
    }

    if let Some(o) = &a.owsa {
        let mut s = String::from(
            "parameter,label,base,low,high,inmb_low,inmb_high,icer_low,icer_high,best_low,best_high,swing\n",
        );
        for r in &o.rows {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{},{},{},{},{},{}",
                csv_field(&r.parameter),
                csv_field(&r.label),
                csv_num(r.base),
                csv_num(r.low),
                csv_num(r.high),
                csv_num(r.inmb_low),
                csv_num(r.inmb_high),
                opt(r.icer_low),
                opt(r.icer_high),
                csv_field(&r.best_low),
                csv_field(&r.best_high),
                csv_num(r.swing())
            );
        }
        v.push(("owsa.csv".into(), s));
    }
    for t in &a.two_way {
        let mut s = format!("{},{},inmb,best\n", csv_field(&t.x), csv_field(&t.y));
        for (iy, y) in t.ys.iter().enumerate() {
            for (ix, x) in t.xs.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "{},{},{},{}",
                    csv_num(*x),
                    csv_num(*y),
                    csv_num(t.inmb[iy][ix]),
                    model.strategies[t.best[iy][ix]].name
                );
            }
        }
        v.push((format!("two_way_{}_{}.csv", slug(&t.x), slug(&t.y)), s));
    }
    if !a.scenarios.is_empty() {
        let mut s = String::from("scenario,strategy,cost,effect,nmb,status,icer\n");
        for sc in &a.scenarios {
            for st in &sc.strategies {
                let row = sc.icer.iter().find(|r| r.name == st.name);
                let _ = writeln!(
                    s,
                    "{},{},{},{},{},{},{}",
                    csv_field(&sc.name),
                    csv_field(&st.name),
                    csv_num(st.outcome.cost),
                    csv_num(st.effect),
                    csv_num(st.nmb),
                    row.map(|r| r.status.code()).unwrap_or(""),
                    row.and_then(|r| r.icer).map(csv_num).unwrap_or_default()
                );
            }
        }
        v.push(("scenarios.csv".into(), s));
    }
    if let Some(p) = &a.psa {
        let mut s = String::from("iteration");
        for n in &p.sampled {
            let _ = write!(s, ",{}", csv_field(n));
        }
        for st in &model.strategies {
            let _ = write!(s, ",cost_{0},effect_{0}", slug(&st.name));
        }
        s.push('\n');
        for i in 0..p.iterations {
            let _ = write!(s, "{i}");
            for x in &p.samples[i] {
                let _ = write!(s, ",{}", csv_num(*x));
            }
            for k in 0..model.strategies.len() {
                let _ = write!(s, ",{},{}", csv_num(p.cost[k][i]), csv_num(p.effect[k][i]));
            }
            s.push('\n');
        }
        v.push(("psa_samples.csv".into(), s));
        let mut s = String::from("wtp");
        for st in &model.strategies {
            let _ = write!(s, ",p_{}", slug(&st.name));
        }
        s.push_str(",frontier,frontier_probability,evpi,population_evpi\n");
        for c in &p.ceac {
            let _ = write!(s, "{}", csv_num(c.wtp));
            for x in &c.probability {
                let _ = write!(s, ",{}", csv_num(*x));
            }
            let _ = writeln!(
                s,
                ",{},{},{},{}",
                model.strategies[c.frontier].name,
                csv_num(c.frontier_probability),
                csv_num(c.evpi),
                opt(c.population_evpi)
            );
        }
        v.push(("ceac_evpi.csv".into(), s));
    }
    v
}

/// (file name, svg, caption)
fn plots(model: &Model, a: &Analysis) -> Vec<(String, String, String)> {
    let mut v = Vec::new();
    if model.strategies.len() > 1 {
        v.push((
            "ce_frontier.svg".into(),
            svg::frontier(model, a),
            "Deterministic cost-effectiveness plane and efficient frontier.".into(),
        ));
    }
    if model.meta.kind == ModelKind::Markov {
        for (i, run) in a.runs.iter().enumerate() {
            if let Some(tr) = &run.trace {
                v.push((
                    format!("trace_{}.svg", slug(&model.strategies[i].name)),
                    svg::markov_trace(model, i, tr),
                    format!("Markov trace, {}.", model.strategies[i].label),
                ));
            }
        }
    }
    if let Some(o) = &a.owsa {
        v.push((
            "tornado.svg".into(),
            svg::tornado(model, o),
            "One-way sensitivity analysis (tornado diagram).".into(),
        ));
    }
    for t in &a.two_way {
        v.push((
            format!("two_way_{}_{}.svg", slug(&t.x), slug(&t.y)),
            svg::two_way(model, t),
            format!("Two-way sensitivity analysis of {} and {}.", t.x, t.y),
        ));
    }
    if let Some(p) = &a.psa {
        if model.strategies.len() > 1 {
            v.push((
                "ce_plane.svg".into(),
                svg::ce_plane(model, p),
                "Cost-effectiveness plane: PSA draws of incremental cost and effect.".into(),
            ));
        }
        v.push((
            "ceac.svg".into(),
            svg::ceac(model, p),
            "Cost-effectiveness acceptability curves and frontier.".into(),
        ));
        v.push((
            "evpi.svg".into(),
            svg::evpi(model, p),
            "Expected value of perfect information.".into(),
        ));
    }
    v
}

// ------------------------------------------------------------------ html

fn horizon(model: &Model) -> String {
    match model.meta.kind {
        ModelKind::Markov => {
            let years = model.settings.cycles as f64 * model.settings.cycle_length;
            format!(
                "{} cycles of {} year(s) = {} years",
                model.settings.cycles,
                fmt_axis(model.settings.cycle_length),
                fmt_axis(years)
            )
        }
        ModelKind::DecisionTree => "decision tree (single episode; no discounting)".into(),
    }
}

fn discounting(model: &Model) -> String {
    if model.meta.kind == ModelKind::DecisionTree {
        return "not applicable (short time horizon)".into();
    }
    let s = &model.settings;
    let timing = match s.discount_timing {
        DiscountTiming::Start => "first cycle undiscounted (factor (1+r)^-(t-1)·L)",
        DiscountTiming::Middle => "mid-cycle (factor (1+r)^-(t-0.5)·L)",
        DiscountTiming::End => "discounted from the first cycle (factor (1+r)^-t·L)",
    };
    let timing = if s.counting == Counting::Simpson {
        "by trace point (factor (1+r)^-k·L)"
    } else {
        timing
    };
    format!(
        "costs {}% and effects {}% per year; {}",
        fmt_axis(s.discount_costs * 100.0),
        fmt_axis(s.discount_effects * 100.0),
        timing
    )
}

fn structure_text(model: &Model) -> String {
    match &model.structure {
        Structure::Markov(mk) => format!(
            "Markov cohort model with {} states ({}); transitions per strategy, cycle length {} year(s), state membership counted by {}.",
            mk.states.len(),
            mk.states
                .iter()
                .map(|s| s.label.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            fmt_axis(model.settings.cycle_length),
            model.settings.counting.describe()
        ),
        Structure::Tree(t) => format!(
            "Decision tree with {} nodes ({} chance, {} decision, {} terminal).",
            t.nodes.len(),
            t.nodes
                .iter()
                .filter(|n| n.kind == crate::model::NodeKind::Chance)
                .count(),
            t.nodes
                .iter()
                .filter(|n| n.kind == crate::model::NodeKind::Decision)
                .count(),
            t.nodes
                .iter()
                .filter(|n| n.kind == crate::model::NodeKind::Terminal)
                .count()
        ),
    }
}

fn abstract_text(model: &Model, a: &Analysis) -> String {
    let cur = &model.meta.currency;
    let mut s = format!(
        "{} strategies were compared ({}) over {} from the {} perspective. ",
        model.strategies.len(),
        model
            .strategies
            .iter()
            .map(|s| s.label.as_str())
            .collect::<Vec<_>>()
            .join("; "),
        horizon(model),
        model.meta.perspective.as_deref().unwrap_or("stated")
    );
    let front: Vec<_> = a
        .icer
        .iter()
        .filter(|r| r.status == Status::NonDominated)
        .collect();
    for r in &front {
        match r.icer {
            None => {
                let _ = write!(
                    s,
                    "{} costs {} {} and yields {} {}. ",
                    r.name,
                    cur,
                    fmt_money(r.cost),
                    fmt_effect(r.effect),
                    a.effect_label
                );
            }
            Some(icer) => {
                let _ = write!(
                    s,
                    "{} costs {} {} more and yields {} {} more than {}, an ICER of {} {} per {}. ",
                    r.name,
                    cur,
                    fmt_money(r.inc_cost.unwrap_or(0.0)),
                    fmt_effect(r.inc_effect.unwrap_or(0.0)),
                    a.effect_label,
                    r.compared_to
                        .map(|i| model.strategies[i].name.as_str())
                        .unwrap_or(""),
                    cur,
                    fmt_money(icer),
                    a.effect_label
                );
            }
        }
    }
    for r in a.icer.iter().filter(|r| r.status != Status::NonDominated) {
        let by: Vec<&str> = r
            .dominated_by
            .iter()
            .map(|&i| model.strategies[i].name.as_str())
            .collect();
        let _ = write!(
            s,
            "{} is {} ({}). ",
            r.name,
            if r.status == Status::Dominated {
                "dominated"
            } else {
                "extendedly dominated"
            },
            by.join(" and ")
        );
    }
    let best = a
        .strategies
        .iter()
        .enumerate()
        .max_by(|x, y| x.1.nmb.total_cmp(&y.1.nmb))
        .map(|x| x.0)
        .unwrap_or(0);
    let _ = write!(
        s,
        "At a willingness to pay of {} {} per {}, {} has the highest net monetary benefit",
        cur,
        fmt_money(a.wtp),
        a.effect_label,
        a.strategies[best].name
    );
    if let Some(p) = &a.psa {
        if let Some(pt) = p
            .ceac
            .iter()
            .min_by(|x, y| (x.wtp - a.wtp).abs().total_cmp(&(y.wtp - a.wtp).abs()))
        {
            let _ = write!(
                s,
                "; in {} PSA iterations it is cost-effective with probability {:.1}% (at {} {}), and the EVPI is {} {} per person",
                p.iterations,
                pt.probability[best] * 100.0,
                cur,
                fmt_money(pt.wtp),
                cur,
                fmt_money(pt.evpi)
            );
        }
    }
    s.push('.');
    s
}

struct Item {
    n: u8,
    section: &'static str,
    topic: &'static str,
    text: String,
    anchor: &'static str,
}

fn cheers(model: &Model, a: &Analysis) -> Vec<Item> {
    let m = &model.meta;
    let c = |key: &str| -> String {
        m.cheers
            .get(key)
            .cloned()
            .unwrap_or_else(|| format!("Not reported in the model file (add [cheers] {key})."))
    };
    let or_missing = |v: &Option<String>, key: &str| -> String {
        v.clone()
            .unwrap_or_else(|| format!("Not reported in the model file ([model] {key})."))
    };
    let params_with_source = model.params.iter().filter(|p| !p.source.is_empty()).count();
    let uncertainty = {
        let n_range = model.params.iter().filter(|p| p.range.is_some()).count();
        let n_dist = crate::psa::sampled_params(model).len();
        let mut s = format!(
            "One-way sensitivity analysis over {n_range} parameter ranges (tornado diagram)"
        );
        if !model.two_way.is_empty() {
            let _ = write!(s, ", {} two-way analysis(es)", model.two_way.len());
        }
        if !model.scenarios.is_empty() {
            let _ = write!(s, ", {} scenario(s)", model.scenarios.len());
        }
        match &a.psa {
            Some(p) => {
                let _ = write!(
                    s,
                    "; probabilistic sensitivity analysis with {} iterations (seed {}) over {n_dist} sampled parameters ({} Dirichlet group(s)); CE plane, CEAC, CE acceptability frontier and EVPI.",
                    p.iterations,
                    p.seed,
                    model.dirichlet.len()
                );
            }
            None => s.push_str(
                "; no probabilistic analysis (no parameter has a distribution, or it was skipped).",
            ),
        }
        s
    };
    let effect_of_uncertainty = {
        let mut s = String::new();
        if let Some(o) = &a.owsa {
            if let Some(r) = o.rows.first() {
                let _ = write!(
                    s,
                    "The most influential parameter is {} (incremental NMB {} to {}). ",
                    r.label,
                    fmt_money(r.inmb_low.min(r.inmb_high)),
                    fmt_money(r.inmb_low.max(r.inmb_high))
                );
            }
            let switches: Vec<&str> = o
                .rows
                .iter()
                .filter(|r| r.best_low != r.best_high)
                .map(|r| r.parameter.as_str())
                .collect();
            if !switches.is_empty() {
                let _ = write!(
                    s,
                    "The optimal strategy changes within the range of: {}. ",
                    switches.join(", ")
                );
            } else {
                s.push_str("No single parameter range changes the optimal strategy. ");
            }
        }
        if let Some(p) = &a.psa {
            if let Some(pt) = p
                .ceac
                .iter()
                .min_by(|x, y| (x.wtp - a.wtp).abs().total_cmp(&(y.wtp - a.wtp).abs()))
            {
                let _ = write!(
                    s,
                    "At {} {} the strategy with the highest expected NMB ({}) is optimal in {:.1}% of PSA iterations; EVPI {} {} per person.",
                    m.currency,
                    fmt_money(pt.wtp),
                    model.strategies[pt.frontier].name,
                    pt.frontier_probability * 100.0,
                    m.currency,
                    fmt_money(pt.evpi)
                );
            }
        }
        if s.is_empty() {
            "No sensitivity analysis was run.".into()
        } else {
            s
        }
    };
    vec![
        Item { n: 1, section: "Title", topic: "Title", text: m.title.clone(), anchor: "top" },
        Item { n: 2, section: "Abstract", topic: "Abstract", text: abstract_text(model, a), anchor: "summary" },
        Item { n: 3, section: "Introduction", topic: "Background and objectives", text: m.cheers.get("background").cloned().unwrap_or_else(|| if m.description.is_empty() { c("background") } else { m.description.clone() }), anchor: "top" },
        Item { n: 4, section: "Methods", topic: "Health economic analysis plan", text: c("analysis_plan"), anchor: "methods" },
        Item { n: 5, section: "Methods", topic: "Study population", text: or_missing(&m.population, "population"), anchor: "methods" },
        Item { n: 6, section: "Methods", topic: "Setting and location", text: or_missing(&m.setting, "setting"), anchor: "methods" },
        Item { n: 7, section: "Methods", topic: "Comparators", text: model.strategies.iter().map(|s| if s.description.is_empty() { s.label.clone() } else { format!("{}: {}", s.label, s.description) }).collect::<Vec<_>>().join("; "), anchor: "methods" },
        Item { n: 8, section: "Methods", topic: "Perspective", text: or_missing(&m.perspective, "perspective"), anchor: "methods" },
        Item { n: 9, section: "Methods", topic: "Time horizon", text: horizon(model), anchor: "methods" },
        Item { n: 10, section: "Methods", topic: "Discount rate", text: discounting(model), anchor: "methods" },
        Item { n: 11, section: "Methods", topic: "Selection of outcomes", text: m.cheers.get("selection_of_outcomes").cloned().unwrap_or_else(|| format!("Effect measure: {}; also reported: costs, QALYs, life-years{}.", m.effect_label, model.outcomes.iter().map(|o| format!(", {}", o.label)).collect::<String>())), anchor: "results" },
        Item { n: 12, section: "Methods", topic: "Measurement of outcomes", text: c("measurement_of_outcomes"), anchor: "parameters" },
        Item { n: 13, section: "Methods", topic: "Valuation of outcomes", text: c("valuation_of_outcomes"), anchor: "parameters" },
        Item { n: 14, section: "Methods", topic: "Measurement and valuation of resources and costs", text: c("resources_and_costs"), anchor: "parameters" },
        Item { n: 15, section: "Methods", topic: "Currency, price date, and conversion", text: format!("{}; price year {}{}", m.currency, m.price_year.map(|y| y.to_string()).unwrap_or_else(|| "not reported ([model] price_year)".into()), m.cheers.get("currency_conversion").map(|s| format!("; {s}")).unwrap_or_default()), anchor: "methods" },
        Item { n: 16, section: "Methods", topic: "Rationale and description of model", text: format!("{} {}", structure_text(model), m.cheers.get("model_rationale").cloned().unwrap_or_default()), anchor: "methods" },
        Item { n: 17, section: "Methods", topic: "Analytics and assumptions", text: format!("{} {}", analytics_text(model), m.cheers.get("assumptions").cloned().unwrap_or_default()), anchor: "methods" },
        Item { n: 18, section: "Methods", topic: "Characterizing heterogeneity", text: c("heterogeneity"), anchor: "scenarios" },
        Item { n: 19, section: "Methods", topic: "Characterizing distributional effects", text: c("distributional_effects"), anchor: "methods" },
        Item { n: 20, section: "Methods", topic: "Characterizing uncertainty", text: uncertainty, anchor: "uncertainty" },
        Item { n: 21, section: "Methods", topic: "Approach to engagement with patients and others affected by the study", text: c("engagement"), anchor: "methods" },
        Item { n: 22, section: "Results", topic: "Study parameters", text: format!("{} parameters listed with base value, range, distribution and source ({} with a cited source).", model.params.len(), params_with_source), anchor: "parameters" },
        Item { n: 23, section: "Results", topic: "Summary of main results", text: "Base-case costs and outcomes per strategy, incremental analysis with dominance, net monetary and net health benefit.".into(), anchor: "results" },
        Item { n: 24, section: "Results", topic: "Effect of uncertainty", text: effect_of_uncertainty, anchor: "uncertainty" },
        Item { n: 25, section: "Results", topic: "Effect of engagement with patients and others affected by the study", text: c("engagement_effect"), anchor: "methods" },
        Item { n: 26, section: "Discussion", topic: "Study findings, limitations, generalizability, and current knowledge", text: c("findings"), anchor: "discussion" },
        Item { n: 27, section: "Other relevant information", topic: "Source of funding", text: c("funding"), anchor: "discussion" },
        Item { n: 28, section: "Other relevant information", topic: "Conflicts of interest", text: c("conflicts"), anchor: "discussion" },
    ]
}

fn analytics_text(model: &Model) -> String {
    match model.meta.kind {
        ModelKind::Markov => format!(
            "Cohort simulation; state membership counted by {}; costs per cycle, utilities per year (QALYs = utility × cycle length); discounting: {}.",
            model.settings.counting.describe(),
            discounting(model)
        ),
        ModelKind::DecisionTree => {
            "Expected values by roll-back of the tree; nested decisions take the branch with the highest net monetary benefit.".into()
        }
    }
}

const CSS: &str = r#"
body{font-family:Georgia,'Times New Roman',serif;max-width:1040px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:2px solid #0072B2;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.5em}table{border-collapse:collapse;margin:1em 0;font-family:Helvetica,Arial,sans-serif;font-size:.88em}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top}th{background:#eef4fa;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}.meta td:first-child{font-weight:bold;width:14em}
.muted{color:#777}.fig{margin:1.2em 0}.fig figcaption{font-size:.9em;color:#444}.missing{color:#a33}
.summary{background:#f6f9fc;border-left:4px solid #0072B2;padding:.8em 1em}code{font-size:.9em}
"#;

fn html(model: &Model, a: &Analysis, plots: &[(String, String, String)]) -> String {
    let m = &model.meta;
    let cur = &m.currency;
    let el = &m.effect_label;
    let mut h = String::new();
    let _ = writeln!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title><style>{CSS}</style></head><body>\n<h1 id=\"top\">{t}</h1>\n<p class=\"muted\">Cost-effectiveness analysis report generated by medledger cea{src}.</p>\n<p>{d}</p>",
        t = esc(&m.title),
        d = esc(&m.description),
        src = model
            .source_path
            .as_ref()
            .map(|p| format!(" from <code>{}</code>", esc(&p.display().to_string())))
            .unwrap_or_default()
    );
    let _ = writeln!(
        h,
        "<h2 id=\"summary\">Summary</h2>\n<p class=\"summary\">{}</p>",
        esc(&abstract_text(model, a))
    );

    // Methods
    let _ = write!(h, "<h2 id=\"methods\">Methods</h2>\n<table class=\"meta\">");
    let rows: Vec<(&str, String)> = vec![
        (
            "Population",
            m.population.clone().unwrap_or_else(|| "–".into()),
        ),
        ("Setting", m.setting.clone().unwrap_or_else(|| "–".into())),
        (
            "Perspective",
            m.perspective.clone().unwrap_or_else(|| "–".into()),
        ),
        (
            "Comparators",
            model
                .strategies
                .iter()
                .map(|s| format!("{} ({})", s.label, s.name))
                .collect::<Vec<_>>()
                .join("; "),
        ),
        (
            "Reference strategy",
            model.strategies[m.reference].label.clone(),
        ),
        ("Model", structure_text(model)),
        ("Time horizon", horizon(model)),
        ("Discounting", discounting(model)),
        ("Effect measure", el.clone()),
        (
            "Currency, price year",
            format!(
                "{}, {}",
                cur,
                m.price_year
                    .map(|y| y.to_string())
                    .unwrap_or_else(|| "–".into())
            ),
        ),
        (
            "Willingness to pay",
            format!("{} {} per {}", cur, fmt_money(model.settings.wtp), el),
        ),
    ];
    for (k, v) in rows {
        let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(&v));
    }
    h.push_str("</table>\n");
    if !a.measurements.is_empty() {
        h.push_str("<p>Parameters set from medledger's measured performance:</p><ul>");
        for (k, p, v) in &a.measurements {
            let _ = write!(
                h,
                "<li><code>{}</code> = {} (measurement <code>{}</code>)</li>",
                esc(p),
                fmt_num(*v, 4),
                esc(k)
            );
        }
        h.push_str("</ul>\n");
    }
    let overridden: Vec<_> = model
        .strategies
        .iter()
        .filter(|s| !s.overrides.is_empty())
        .collect();
    if !overridden.is_empty() {
        h.push_str("<h3>Strategy-specific definitions</h3><table><tr><th>Strategy</th><th>Name</th><th>Definition</th></tr>");
        for s in overridden {
            for (n, t) in &s.overrides {
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td></tr>",
                    esc(&s.label),
                    esc(n),
                    esc(t)
                );
            }
        }
        h.push_str("</table>\n");
    }

    let _ = write!(
        h,
        "<h3 id=\"parameters\">Parameters</h3>\n<table><tr><th>Parameter</th><th>Description</th><th>Base</th><th>Range (one-way)</th><th>Distribution (PSA)</th><th>Source</th></tr>"
    );
    for (k, p) in model.params.iter().enumerate() {
        let dist = match model.dirichlet.iter().find(|g| g.params.contains(&k)) {
            Some(g) => format!(
                "Dirichlet {} (α = {})",
                g.name,
                g.alpha
                    .iter()
                    .map(|x| fmt_axis(*x))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => p.dist.describe(),
        };
        let unit = if p.unit.is_empty() {
            String::new()
        } else {
            format!(" {}", p.unit)
        };
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td>{}</td><td class=\"n\">{}{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td></tr>",
            esc(&p.name),
            esc(&p.label),
            esc(&fmt_param(p.base)),
            esc(&unit),
            p.range
                .map(|(lo, hi)| format!("{} – {}", fmt_param(lo), fmt_param(hi)))
                .unwrap_or_else(|| "–".into()),
            esc(&dist),
            esc(&[p.source.as_str(), p.note.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect::<Vec<_>>()
                .join(". "))
        );
    }
    h.push_str("</table>\n");
    if !model.tables.is_empty() {
        h.push_str("<p>Lookup tables: ");
        for (i, t) in model.table_names.iter().enumerate() {
            let _ = write!(
                h,
                "<code>{}</code> ({} rows{}) ",
                esc(t),
                model.tables[i].x.len(),
                if model.table_sources[i].is_empty() {
                    String::new()
                } else {
                    format!("; {}", esc(&model.table_sources[i]))
                }
            );
        }
        h.push_str("</p>\n");
    }

    // Results
    let _ = write!(
        h,
        "<h2 id=\"results\">Results</h2>\n<h3>Base case</h3>\n<table><tr><th>Strategy</th><th>Cost ({cur})</th><th>QALYs</th><th>Life-years</th><th>Undiscounted cost</th><th>Undiscounted QALYs</th><th>Undiscounted life-years</th>"
    );
    for o in &model.outcomes {
        let _ = write!(
            h,
            "<th>{}{}</th>",
            esc(&o.label),
            if o.unit.is_empty() {
                String::new()
            } else {
                format!(" ({})", esc(&o.unit))
            }
        );
    }
    let _ = write!(h, "<th>NMB ({cur})</th><th>NHB ({})</th></tr>", esc(el));
    for s in &a.strategies {
        let o = &s.outcome;
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>",
            esc(&s.label),
            fmt_money(o.cost),
            fmt_effect(o.qalys),
            fmt_effect(o.life_years),
            fmt_money(o.cost_undiscounted),
            fmt_effect(o.qalys_undiscounted),
            fmt_effect(o.life_years_undiscounted)
        );
        for x in &o.outcomes {
            let _ = write!(h, "<td class=\"n\">{}</td>", fmt_effect(*x));
        }
        let _ = write!(
            h,
            "<td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            fmt_money(s.nmb),
            fmt_effect(s.nhb)
        );
    }
    let _ = writeln!(
        h,
        "</table>\n<p class=\"muted\">NMB and NHB at {cur} {} per {}.</p>",
        fmt_money(a.wtp),
        esc(el)
    );
    h.push_str(&icer_html(model, &a.icer, cur, el));
    for (name, svg, cap) in plots
        .iter()
        .filter(|p| p.0.starts_with("ce_frontier") || p.0.starts_with("trace_"))
    {
        let _ = writeln!(
            h,
            "<figure class=\"fig\">{svg}<figcaption>{} (<code>{}</code>)</figcaption></figure>",
            esc(cap),
            esc(name)
        );
    }
    if let Some(run) = a.runs.first() {
        if run.paths.is_some() {
            h.push_str("<h3>Decision tree paths</h3><table><tr><th>Strategy</th><th>Path</th><th>Probability</th><th>Cost</th><th>Effect (QALYs)</th></tr>");
            for (i, r) in a.runs.iter().enumerate() {
                for p in r.paths.iter().flatten() {
                    let _ = write!(
                        h,
                        "<tr><td>{}</td><td>{}</td><td class=\"n\">{:.4}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                        esc(&model.strategies[i].name),
                        esc(&p.nodes.join(" › ")),
                        p.probability,
                        fmt_money(p.cost),
                        fmt_effect(p.qalys)
                    );
                }
            }
            h.push_str("</table>\n");
        }
    }

    // Uncertainty
    h.push_str("<h2 id=\"uncertainty\">Uncertainty</h2>\n");
    if let Some(o) = &a.owsa {
        let _ = write!(
            h,
            "<h3>One-way sensitivity analysis</h3><p>Incremental net monetary benefit of <b>{}</b> against <b>{}</b> at {cur} {} per {} (base case {}; ICER {}).</p>",
            esc(&model.strategies[o.focal].label),
            esc(&model.strategies[o.reference].label),
            fmt_money(o.wtp),
            esc(el),
            fmt_money(o.base_inmb),
            o.base_icer.map(fmt_money).unwrap_or_else(|| "–".into())
        );
        for (_, svg, cap) in plots.iter().filter(|p| p.0 == "tornado.svg") {
            let _ = writeln!(
                h,
                "<figure class=\"fig\">{svg}<figcaption>{}</figcaption></figure>",
                esc(cap)
            );
        }
        h.push_str("<table><tr><th>Parameter</th><th>Low</th><th>High</th><th>INMB at low</th><th>INMB at high</th><th>ICER at low</th><th>ICER at high</th><th>Optimal at low / high</th></tr>");
        for r in &o.rows {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{} / {}</td></tr>",
                esc(&r.label),
                fmt_param(r.low),
                fmt_param(r.high),
                fmt_money(r.inmb_low),
                fmt_money(r.inmb_high),
                r.icer_low.map(fmt_money).unwrap_or_else(|| "–".into()),
                r.icer_high.map(fmt_money).unwrap_or_else(|| "–".into()),
                esc(&r.best_low),
                esc(&r.best_high)
            );
        }
        h.push_str("</table>\n");
    }
    for (name, svg, cap) in plots.iter().filter(|p| p.0.starts_with("two_way")) {
        let _ = writeln!(
            h,
            "<h3>Two-way sensitivity analysis</h3><figure class=\"fig\">{svg}<figcaption>{} (<code>{}</code>; values in the CSV of the same name)</figcaption></figure>",
            esc(cap),
            esc(name)
        );
    }
    if !a.scenarios.is_empty() {
        h.push_str("<h3 id=\"scenarios\">Scenario analyses</h3>");
        for sc in &a.scenarios {
            let _ = write!(
                h,
                "<h4>{}</h4><p>{}</p>",
                esc(&sc.label),
                esc(&sc.description)
            );
            h.push_str(&icer_html(model, &sc.icer, cur, el));
        }
    }
    if let Some(p) = &a.psa {
        let _ = write!(
            h,
            "<h3>Probabilistic sensitivity analysis</h3><p>{} iterations, seed {}; {} parameters sampled.</p><table><tr><th>Strategy</th><th>Mean cost ({cur})</th><th>95% interval</th><th>Mean {}</th><th>95% interval</th></tr>",
            p.iterations,
            p.seed,
            p.sampled.len(),
            esc(el)
        );
        for (s, st) in model.strategies.iter().enumerate() {
            let (c, e) = (&p.cost_summary[s], &p.effect_summary[s]);
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{} – {}</td><td class=\"n\">{}</td><td class=\"n\">{} – {}</td></tr>",
                esc(&st.label),
                fmt_money(c.mean),
                fmt_money(c.p2_5),
                fmt_money(c.p97_5),
                fmt_effect(e.mean),
                fmt_effect(e.p2_5),
                fmt_effect(e.p97_5)
            );
        }
        h.push_str("</table>\n");
        if model.strategies.len() > 1 {
            h.push_str("<table><tr><th>Strategy vs reference</th><th>NE (more costly, more effective)</th><th>SE (dominant)</th><th>SW</th><th>NW (dominated)</th></tr>");
            for (s, q) in p.quadrants.iter().enumerate() {
                if s == m.reference {
                    continue;
                }
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td class=\"n\">{:.1}%</td><td class=\"n\">{:.1}%</td><td class=\"n\">{:.1}%</td><td class=\"n\">{:.1}%</td></tr>",
                    esc(&model.strategies[s].label),
                    q[0] * 100.0,
                    q[1] * 100.0,
                    q[2] * 100.0,
                    q[3] * 100.0
                );
            }
            h.push_str("</table>\n");
        }
        for (name, svg, cap) in plots
            .iter()
            .filter(|p| matches!(p.0.as_str(), "ce_plane.svg" | "ceac.svg" | "evpi.svg"))
        {
            let _ = writeln!(
                h,
                "<figure class=\"fig\">{svg}<figcaption>{} (<code>{}</code>)</figcaption></figure>",
                esc(cap),
                esc(name)
            );
        }
        let pick: Vec<_> = {
            let n = p.ceac.len();
            let step = (n / 10).max(1);
            (0..n).step_by(step).collect()
        };
        h.push_str("<table><tr><th>WTP</th>");
        for st in &model.strategies {
            let _ = write!(h, "<th>P(cost-effective) {}</th>", esc(&st.name));
        }
        let _ = write!(h, "<th>Frontier</th><th>EVPI per person ({cur})</th></tr>");
        for i in pick {
            let c = &p.ceac[i];
            let _ = write!(h, "<tr><td class=\"n\">{}</td>", fmt_money(c.wtp));
            for x in &c.probability {
                let _ = write!(h, "<td class=\"n\">{:.3}</td>", x);
            }
            let _ = write!(
                h,
                "<td>{}</td><td class=\"n\">{}</td></tr>",
                esc(&model.strategies[c.frontier].name),
                fmt_money(c.evpi)
            );
        }
        h.push_str("</table>\n");
    }

    // Discussion and CHEERS
    let _ = write!(
        h,
        "<h2 id=\"discussion\">Discussion</h2><p>{}</p>",
        esc(&m.cheers.get("findings").cloned().unwrap_or_else(|| {
            "No discussion was provided in the model file ([cheers] findings).".into()
        }))
    );
    if let Some(l) = m.cheers.get("limitations") {
        let _ = write!(h, "<p><b>Limitations.</b> {}</p>", esc(l));
    }
    if !m.sources.is_empty() {
        h.push_str("<h3>Sources</h3><ol>");
        for s in &m.sources {
            let _ = write!(h, "<li>{}</li>", esc(s));
        }
        h.push_str("</ol>");
    }
    let items = cheers(model, a);
    let missing = items
        .iter()
        .filter(|i| i.text.starts_with("Not reported"))
        .count();
    let _ = write!(
        h,
        "<h2 id=\"cheers\">CHEERS 2022 checklist</h2><p>Consolidated Health Economic Evaluation Reporting Standards 2022 (Husereau et al., Value Health 2022;25:3-9). {} of 28 items are filled from the model file; {} are marked as not reported.</p><table><tr><th>#</th><th>Section</th><th>Item</th><th>Reported</th><th>Where</th></tr>",
        28 - missing,
        missing
    );
    for it in items {
        let cls = if it.text.starts_with("Not reported") {
            " class=\"missing\""
        } else {
            ""
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td{cls}>{}</td><td><a href=\"#{}\">{}</a></td></tr>",
            it.n,
            esc(it.section),
            esc(it.topic),
            esc(&it.text),
            it.anchor,
            it.anchor
        );
    }
    h.push_str("</table>\n<p class=\"muted\">Plots are SVG (vector) files beside this report; tables are in the CSV files and every number in results.json.</p>\n</body></html>\n");
    h
}

fn fmt_param(v: f64) -> String {
    if v == 0.0 || (v.abs() >= 0.001 && v.abs() < 1e7) {
        let s = format!("{v:.6}");
        let s = s.trim_end_matches('0').trim_end_matches('.').to_string();
        if v.abs() >= 1000.0 {
            fmt_num(v, if v.fract() == 0.0 { 0 } else { 2 })
        } else {
            s
        }
    } else {
        format!("{v:.4e}")
    }
}

fn icer_html(model: &Model, rows: &[crate::icer::IcerRow], cur: &str, el: &str) -> String {
    let mut h = format!(
        "<h3>Incremental analysis</h3><table><tr><th>Strategy</th><th>Cost ({cur})</th><th>{}</th><th>Incremental cost</th><th>Incremental {}</th><th>ICER ({cur} per {})</th><th>Status</th></tr>",
        esc(el),
        esc(el),
        esc(el)
    );
    for r in rows {
        let status = match r.status {
            Status::NonDominated => "on frontier".to_string(),
            Status::Dominated => format!(
                "dominated by {}",
                r.dominated_by
                    .iter()
                    .map(|&i| model.strategies[i].name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Status::ExtendedlyDominated => format!(
                "extendedly dominated ({})",
                r.dominated_by
                    .iter()
                    .map(|&i| model.strategies[i].name.as_str())
                    .collect::<Vec<_>>()
                    .join(" / ")
            ),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{} ({})</td></tr>",
            esc(&model.strategies[r.strategy].label),
            fmt_money(r.cost),
            fmt_effect(r.effect),
            r.inc_cost.map(fmt_money).unwrap_or_else(|| "–".into()),
            r.inc_effect.map(fmt_effect).unwrap_or_else(|| "–".into()),
            r.icer.map(fmt_money).unwrap_or_else(|| "–".into()),
            esc(&status),
            r.status.code()
        );
    }
    h.push_str("</table>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(fmt_num(44663.4535, 2), "44,663.45");
        assert_eq!(fmt_num(-1234567.0, 0), "−1,234,567");
        assert_eq!(fmt_num(-0.001, 2), "0.00");
        assert_eq!(fmt_money(6275.9556), "6,276");
        assert_eq!(fmt_money(22.058), "22.06");
        assert_eq!(fmt_axis(25000.0), "25k");
        assert_eq!(fmt_axis(-2500.0), "−2500");
        assert_eq!(fmt_axis(0.25), "0.25");
        assert_eq!(esc("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
