//! The analyses a report contains: base case, incremental analysis and net
//! benefit, one-way (tornado) and two-way sensitivity analysis, scenarios and
//! the probabilistic sensitivity analysis.
//!
//! [`run_analysis`] is what `medledger cea run` calls; each part is also
//! available on its own.

use serde::Serialize;

use crate::engine::{Evaluator, Outcome, StrategyRun};
use crate::error::{EconError, Result};
use crate::icer::{self, IcerRow};
use crate::model::Model;
use crate::psa::{self, PsaResult};

#[derive(Debug, Clone, Serialize)]
pub struct StrategySummary {
    pub name: String,
    pub label: String,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub effect: f64,
    pub nmb: f64,
    pub nhb: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OwsaRow {
    pub parameter: String,
    pub label: String,
    pub base: f64,
    pub low: f64,
    pub high: f64,
    /// Incremental NMB of the focal strategy against the reference at the low
    /// and high values.
    pub inmb_low: f64,
    pub inmb_high: f64,
    pub icer_low: Option<f64>,
    pub icer_high: Option<f64>,
    /// Strategy with the highest NMB at the low and high values.
    pub best_low: String,
    pub best_high: String,
    /// (cost, effect) of every strategy at the low and high values.
    pub low_results: Vec<(f64, f64)>,
    pub high_results: Vec<(f64, f64)>,
}

impl OwsaRow {
    pub fn swing(&self) -> f64 {
        (self.inmb_high - self.inmb_low).abs()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Owsa {
    pub focal: usize,
    pub reference: usize,
    pub wtp: f64,
    pub base_inmb: f64,
    pub base_icer: Option<f64>,
    /// Sorted by decreasing swing (the tornado order).
    pub rows: Vec<OwsaRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TwoWay {
    pub x: String,
    pub y: String,
    pub focal: usize,
    pub reference: usize,
    pub xs: Vec<f64>,
    pub ys: Vec<f64>,
    /// `inmb[iy][ix]`: incremental NMB of the focal strategy vs the reference.
    pub inmb: Vec<Vec<f64>>,
    /// `best[iy][ix]`: strategy with the highest NMB.
    pub best: Vec<Vec<usize>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    pub label: String,
    pub description: String,
    pub strategies: Vec<StrategySummary>,
    pub icer: Vec<IcerRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    pub title: String,
    pub effect_label: String,
    pub currency: String,
    pub wtp: f64,
    pub strategies: Vec<StrategySummary>,
    pub runs: Vec<StrategyRun>,
    pub icer: Vec<IcerRow>,
    pub owsa: Option<Owsa>,
    pub two_way: Vec<TwoWay>,
    pub scenarios: Vec<ScenarioResult>,
    pub psa: Option<PsaResult>,
    /// Measurements applied to the model: (key, parameter, value).
    pub measurements: Vec<(String, String, f64)>,
}

#[derive(Debug, Clone, Default)]
pub struct AnalysisOptions {
    pub psa_iterations: Option<usize>,
    pub seed: Option<u64>,
    pub skip_psa: bool,
    pub skip_owsa: bool,
}

/// Summaries (with NMB / NHB at the model's WTP) of outcomes per strategy.
pub fn summarise(model: &Model, outcomes: &[Outcome]) -> Vec<StrategySummary> {
    let w = model.settings.wtp;
    model
        .strategies
        .iter()
        .zip(outcomes)
        .map(|(s, o)| {
            let e = o.effect(model.meta.effect);
            StrategySummary {
                name: s.name.clone(),
                label: s.label.clone(),
                outcome: o.clone(),
                effect: e,
                nmb: icer::nmb(o.cost, e, w),
                nhb: icer::nhb(o.cost, e, w),
            }
        })
        .collect()
}

pub fn icer_table(model: &Model, s: &[StrategySummary]) -> Vec<IcerRow> {
    let names: Vec<String> = s.iter().map(|x| x.name.clone()).collect();
    let c: Vec<f64> = s.iter().map(|x| x.outcome.cost).collect();
    let e: Vec<f64> = s.iter().map(|x| x.effect).collect();
    let _ = model;
    icer::incremental(&names, &c, &e)
}

fn evaluate_ce(model: &Model, ev: &mut Evaluator, params: &[f64]) -> Result<Vec<(f64, f64)>> {
    let mut v = Vec::with_capacity(model.strategies.len());
    for s in 0..model.strategies.len() {
        let r = ev.run(model, s, params, false)?;
        v.push((r.outcome.cost, r.outcome.effect(model.meta.effect)));
    }
    Ok(v)
}

/// The strategy the one-way and two-way analyses compare with the reference:
/// the non-reference strategy with the highest base-case NMB.
pub fn focal_strategy(model: &Model, base: &[StrategySummary]) -> usize {
    let r = model.meta.reference;
    (0..base.len())
        .filter(|&s| s != r || base.len() == 1)
        .max_by(|&a, &b| base[a].nmb.total_cmp(&base[b].nmb).then(b.cmp(&a)))
        .unwrap_or(0)
}

fn inmb_icer(ce: &[(f64, f64)], focal: usize, reference: usize, wtp: f64) -> (f64, Option<f64>) {
    let dc = ce[focal].0 - ce[reference].0;
    let de = ce[focal].1 - ce[reference].1;
    (wtp * de - dc, (de != 0.0).then(|| dc / de))
}

fn best(ce: &[(f64, f64)], wtp: f64) -> usize {
    let c: Vec<f64> = ce.iter().map(|x| x.0).collect();
    let e: Vec<f64> = ce.iter().map(|x| x.1).collect();
    icer::best_by_nmb(&c, &e, wtp)
}

/// One-way sensitivity analysis over every parameter with a `range`.
pub fn owsa(model: &Model, base: &[StrategySummary]) -> Result<Option<Owsa>> {
    let params: Vec<usize> = (0..model.params.len())
        .filter(|&i| model.params[i].range.is_some())
        .collect();
    if params.is_empty() || model.strategies.len() < 2 {
        return Ok(None);
    }
    let wtp = model.settings.wtp;
    let focal = focal_strategy(model, base);
    let reference = model.meta.reference;
    let base_ce: Vec<(f64, f64)> = base.iter().map(|s| (s.outcome.cost, s.effect)).collect();
    let (base_inmb, base_icer) = inmb_icer(&base_ce, focal, reference, wtp);
    let mut ev = Evaluator::new(model);
    let mut rows = Vec::new();
    for k in params {
        let p = &model.params[k];
        let (lo, hi) = p.range.expect("filtered on range");
        let mut values = model.base_values();
        values[k] = lo;
        let low = evaluate_ce(model, &mut ev, &values).map_err(|e| context(e, &p.name, lo))?;
        values[k] = hi;
        let high = evaluate_ce(model, &mut ev, &values).map_err(|e| context(e, &p.name, hi))?;
        let (il, cl) = inmb_icer(&low, focal, reference, wtp);
        let (ih, ch) = inmb_icer(&high, focal, reference, wtp);
        rows.push(OwsaRow {
            parameter: p.name.clone(),
            label: p.label.clone(),
            base: p.base,
            low: lo,
            high: hi,
            inmb_low: il,
            inmb_high: ih,
            icer_low: cl,
            icer_high: ch,
            best_low: model.strategies[best(&low, wtp)].name.clone(),
            best_high: model.strategies[best(&high, wtp)].name.clone(),
            low_results: low,
            high_results: high,
        });
    }
    rows.sort_by(|a, b| {
        b.swing()
            .total_cmp(&a.swing())
            .then(a.parameter.cmp(&b.parameter))
    });
    Ok(Some(Owsa {
        focal,
        reference,
        wtp,
        base_inmb,
        base_icer,
        rows,
    }))
}

fn context(e: EconError, param: &str, value: f64) -> EconError {
    match e {
        EconError::Evaluation {
            strategy,
            cycle,
            message,
        } => EconError::Evaluation {
            strategy,
            cycle,
            message: format!("one-way analysis with {param} = {value}: {message}"),
        },
        other => other,
    }
}

/// Two-way sensitivity analyses declared under `[analysis] two_way`.
pub fn two_way(model: &Model, base: &[StrategySummary]) -> Result<Vec<TwoWay>> {
    let wtp = model.settings.wtp;
    let focal = focal_strategy(model, base);
    let reference = model.meta.reference;
    let mut ev = Evaluator::new(model);
    let mut out = Vec::new();
    for spec in &model.two_way {
        let grid = |k: usize| -> Vec<f64> {
            let (lo, hi) = model.params[k]
                .range
                .expect("checked when the model was built");
            (0..spec.steps)
                .map(|i| lo + (hi - lo) * i as f64 / (spec.steps - 1) as f64)
                .collect()
        };
        let xs = grid(spec.x);
        let ys = grid(spec.y);
        let mut inmb = Vec::new();
        let mut bestv = Vec::new();
        for &y in &ys {
            let mut row = Vec::new();
            let mut brow = Vec::new();
            for &x in &xs {
                let mut values = model.base_values();
                values[spec.x] = x;
                values[spec.y] = y;
                let ce = evaluate_ce(model, &mut ev, &values)?;
                row.push(inmb_icer(&ce, focal, reference, wtp).0);
                brow.push(best(&ce, wtp));
            }
            inmb.push(row);
            bestv.push(brow);
        }
        out.push(TwoWay {
            x: model.params[spec.x].name.clone(),
            y: model.params[spec.y].name.clone(),
            focal,
            reference,
            xs,
            ys,
            inmb,
            best: bestv,
        });
    }
    Ok(out)
}

/// Base case and incremental analysis of every declared scenario.
pub fn scenarios(model: &Model) -> Result<Vec<ScenarioResult>> {
    let mut ev = Evaluator::new(model);
    let mut out = Vec::new();
    for sc in &model.scenarios {
        let mut values = model.base_values();
        for &(k, v) in &sc.set {
            values[k] = v;
        }
        let runs = ev.run_all(model, &values, false)?;
        let outcomes: Vec<Outcome> = runs.into_iter().map(|r| r.outcome).collect();
        let strategies = summarise(model, &outcomes);
        let icer = icer_table(model, &strategies);
        out.push(ScenarioResult {
            name: sc.name.clone(),
            label: sc.label.clone(),
            description: sc.description.clone(),
            strategies,
            icer,
        });
    }
    Ok(out)
}

/// Everything a report needs.
pub fn run_analysis(
    model: &Model,
    opts: &AnalysisOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Analysis> {
    let runs = crate::engine::base_case(model)?;
    let outcomes: Vec<Outcome> = runs.iter().map(|r| r.outcome.clone()).collect();
    let strategies = summarise(model, &outcomes);
    let icer = icer_table(model, &strategies);
    let owsa = if opts.skip_owsa {
        None
    } else {
        owsa(model, &strategies)?
    };
    let two_way = if opts.skip_owsa {
        Vec::new()
    } else {
        two_way(model, &strategies)?
    };
    let scenarios = scenarios(model)?;
    let has_uncertainty = !psa::sampled_params(model).is_empty();
    let psa = if opts.skip_psa || !has_uncertainty {
        None
    } else {
        let n = opts.psa_iterations.unwrap_or(model.settings.psa_iterations);
        let seed = opts.seed.unwrap_or(model.settings.seed);
        Some(psa::run(model, n, seed, progress)?)
    };
    Ok(Analysis {
        title: model.meta.title.clone(),
        effect_label: model.meta.effect_label.clone(),
        currency: model.meta.currency.clone(),
        wtp: model.settings.wtp,
        strategies,
        runs,
        icer,
        owsa,
        two_way,
        scenarios,
        psa,
        measurements: Vec::new(),
    })
}
