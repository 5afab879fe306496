//! Probabilistic sensitivity analysis: sampling, Monte Carlo runs, the CE
//! plane, cost-effectiveness acceptability curves and frontier, and EVPI.
//!
//! Iteration `i` draws from its own ChaCha8 stream seeded from `(seed, i)`, so
//! results do not depend on how the iterations are split across threads: the
//! same seed gives the same PSA on every machine, serial or parallel.

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use crate::dist::{self, Dist};
use crate::engine::Evaluator;
use crate::error::Result;
use crate::icer::nmb;
use crate::model::Model;

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub mean: f64,
    pub sd: f64,
    pub p2_5: f64,
    pub p97_5: f64,
}

impl Summary {
    pub fn of(xs: &[f64]) -> Summary {
        let n = xs.len().max(1) as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = if xs.len() > 1 {
            xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        let mut s = xs.to_vec();
        s.sort_by(f64::total_cmp);
        Summary {
            mean,
            sd: var.sqrt(),
            p2_5: quantile(&s, 0.025),
            p97_5: quantile(&s, 0.975),
        }
    }
}

/// Linear-interpolated quantile of sorted data (R's type 7).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let h = (sorted.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = h.ceil() as usize;
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

#[derive(Debug, Clone, Serialize)]
pub struct CeacPoint {
    pub wtp: f64,
    /// Probability each strategy has the highest NMB.
    pub probability: Vec<f64>,
    /// Strategy with the highest expected NMB (the CE acceptability frontier).
    pub frontier: usize,
    pub frontier_probability: f64,
    /// Expected value of perfect information per person.
    pub evpi: f64,
    /// EVPI for the population, when the model gives a population size.
    pub population_evpi: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PsaResult {
    pub iterations: usize,
    pub seed: u64,
    /// Names of the sampled parameters, in the column order of `samples`.
    pub sampled: Vec<String>,
    /// `samples[i][k]`: value of sampled parameter k in iteration i.
    pub samples: Vec<Vec<f64>>,
    /// `cost[s][i]`, `effect[s][i]`: strategy s, iteration i.
    pub cost: Vec<Vec<f64>>,
    pub effect: Vec<Vec<f64>>,
    pub cost_summary: Vec<Summary>,
    pub effect_summary: Vec<Summary>,
    pub ceac: Vec<CeacPoint>,
    /// Share of iterations in each CE-plane quadrant for each strategy against
    /// the reference: [NE, SE (dominant), SW, NW (dominated)].
    pub quadrants: Vec<[f64; 4]>,
}

/// Indices of parameters drawn in a PSA (own distribution or a Dirichlet group).
pub fn sampled_params(model: &Model) -> Vec<usize> {
    let mut v: Vec<usize> = (0..model.params.len())
        .filter(|&i| model.params[i].dist != Dist::Fixed)
        .collect();
    for g in &model.dirichlet {
        v.extend(&g.params);
    }
    v
}

fn iteration_seed(seed: u64, i: usize) -> u64 {
    // SplitMix64 of (seed, i): decorrelates neighbouring iterations' streams.
    let mut z = seed
        ^ (i as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Draws one parameter vector into `out` (which starts as the base values).
pub fn draw(model: &Model, seed: u64, i: usize, out: &mut [f64], scratch: &mut Vec<f64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(iteration_seed(seed, i));
    for (k, p) in model.params.iter().enumerate() {
        if p.dist != Dist::Fixed {
            out[k] = p.dist.sample(p.base, &mut rng);
        }
    }
    for g in &model.dirichlet {
        scratch.resize(g.alpha.len(), 0.0);
        dist::dirichlet(&g.alpha, &mut rng, scratch);
        for (&k, v) in g.params.iter().zip(scratch.iter()) {
            out[k] = *v;
        }
    }
}

/// Sampled parameter values and (cost, effect) per strategy of one iteration.
type IterationResult = (Vec<f64>, Vec<(f64, f64)>);

/// Runs the PSA. `progress` is called with the number of iterations done so
/// far (from worker threads, roughly every 1% of the work).
pub fn run(
    model: &Model,
    iterations: usize,
    seed: u64,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<PsaResult> {
    let ns = model.strategies.len();
    let base = model.base_values();
    let sampled = sampled_params(model);
    let done = AtomicUsize::new(0);
    let report_every = (iterations / 100).max(1);
    let effect = model.meta.effect;

    // Chunks keep one evaluator per task; results are written by index, so
    // the outcome does not depend on scheduling.
    let chunk = 256usize;
    let chunks: Vec<Result<Vec<IterationResult>>> = (0..iterations.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let mut ev = Evaluator::new(model);
            let mut params = base.clone();
            let mut scratch = Vec::new();
            let start = c * chunk;
            let end = (start + chunk).min(iterations);
            let mut out = Vec::with_capacity(end - start);
            for i in start..end {
                params.copy_from_slice(&base);
                draw(model, seed, i, &mut params, &mut scratch);
                let mut ce = Vec::with_capacity(ns);
                for s in 0..ns {
                    let r = ev.run(model, s, &params, false).map_err(|e| match e {
                        crate::EconError::Evaluation {
                            strategy,
                            cycle,
                            message,
                        } => crate::EconError::Evaluation {
                            strategy,
                            cycle,
                            message: format!("PSA iteration {i}: {message}"),
                        },
                        other => other,
                    })?;
                    ce.push((r.outcome.cost, r.outcome.effect(effect)));
                }
                out.push((sampled.iter().map(|&k| params[k]).collect(), ce));
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if d % report_every == 0 || d == iterations {
                    progress(d);
                }
            }
            Ok(out)
        })
        .collect();

    let mut samples = Vec::with_capacity(iterations);
    let mut cost = vec![Vec::with_capacity(iterations); ns];
    let mut eff = vec![Vec::with_capacity(iterations); ns];
    for c in chunks {
        for (sv, ce) in c? {
            samples.push(sv);
            for (s, (c, e)) in ce.into_iter().enumerate() {
                cost[s].push(c);
                eff[s].push(e);
            }
        }
    }
    let ceac = ceac(model, &cost, &eff);
    let r = model.meta.reference;
    let quadrants = (0..ns)
        .map(|s| {
            let mut q = [0.0; 4];
            for i in 0..iterations {
                let dc = cost[s][i] - cost[r][i];
                let de = eff[s][i] - eff[r][i];
                let k = match (de >= 0.0, dc >= 0.0) {
                    (true, true) => 0,
                    (true, false) => 1,
                    (false, false) => 2,
                    (false, true) => 3,
                };
                q[k] += 1.0 / iterations as f64;
            }
            q
        })
        .collect();
    Ok(PsaResult {
        iterations,
        seed,
        sampled: sampled
            .iter()
            .map(|&k| model.params[k].name.clone())
            .collect(),
        samples,
        cost_summary: cost.iter().map(|v| Summary::of(v)).collect(),
        effect_summary: eff.iter().map(|v| Summary::of(v)).collect(),
        cost,
        effect: eff,
        ceac,
        quadrants,
    })
}

/// CEAC, acceptability frontier and EVPI over the model's WTP grid.
pub fn ceac(model: &Model, cost: &[Vec<f64>], effect: &[Vec<f64>]) -> Vec<CeacPoint> {
    let ns = cost.len();
    let n = cost.first().map(|v| v.len()).unwrap_or(0);
    let mut out = Vec::new();
    for &w in &model.settings.wtp_grid {
        let mut wins = vec![0usize; ns];
        let mut mean_nmb = vec![0.0; ns];
        let mut mean_max = 0.0;
        for i in 0..n {
            let mut best = 0;
            let mut best_v = f64::NEG_INFINITY;
            for s in 0..ns {
                let v = nmb(cost[s][i], effect[s][i], w);
                mean_nmb[s] += v;
                if v > best_v {
                    best_v = v;
                    best = s;
                }
            }
            wins[best] += 1;
            mean_max += best_v;
        }
        let nf = n.max(1) as f64;
        for m in &mut mean_nmb {
            *m /= nf;
        }
        mean_max /= nf;
        let mut frontier = 0;
        for s in 1..ns {
            if mean_nmb[s] > mean_nmb[frontier] {
                frontier = s;
            }
        }
        let probability: Vec<f64> = wins.iter().map(|&k| k as f64 / nf).collect();
        let evpi = (mean_max - mean_nmb[frontier]).max(0.0);
        out.push(CeacPoint {
            wtp: w,
            frontier,
            frontier_probability: probability[frontier],
            probability,
            evpi,
            population_evpi: model.settings.population_size.map(|p| p * evpi),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate() {
        let s = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&s, 0.5), 3.0);
        assert_eq!(quantile(&s, 0.0), 1.0);
        assert_eq!(quantile(&s, 1.0), 5.0);
        assert!((quantile(&s, 0.1) - 1.4).abs() < 1e-12);
    }

    #[test]
    fn iteration_seeds_differ() {
        let a: Vec<u64> = (0..1000).map(|i| iteration_seed(1, i)).collect();
        let mut b = a.clone();
        b.sort();
        b.dedup();
        assert_eq!(a.len(), b.len());
    }
}
