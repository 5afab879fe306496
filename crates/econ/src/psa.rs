//! Probabilistic sensitivity analysis: sampling, Monte Carlo runs, the CE
//! plane, cost-effectiveness acceptability curves and frontier, and EVPI.
//!
//! Iteration `i` draws from its own xoshiro256++ stream ([`crate::rng`])
//! seeded from `(seed, i)`, so results do not depend on how the iterations
//! are split across threads: the same seed gives the same PSA on every
//! machine, serial or parallel.

use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;
use serde::Serialize;

use crate::batch::Batch;
use crate::dist::{self, Dist, Gamma, Sampler};
use crate::engine::Evaluator;
use crate::error::Result;
use crate::expr::{LANES, Lanes};
use crate::icer::nmb;
use crate::model::Model;
use crate::rng::Stream;

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
        Summary {
            mean,
            sd: var.sqrt(),
            p2_5: select_quantile(&mut s, 0.025),
            p97_5: select_quantile(&mut s, 0.975),
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

/// [`quantile`] of unsorted data, by selection instead of a full sort: the
/// same value, in linear time. Reorders `xs`.
pub fn select_quantile(xs: &mut [f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let h = (xs.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = h.ceil() as usize;
    let (_, &mut x_lo, above) = xs.select_nth_unstable_by(lo, f64::total_cmp);
    let x_hi = if hi == lo {
        x_lo
    } else {
        above.iter().copied().min_by(f64::total_cmp).unwrap_or(x_lo)
    };
    x_lo + (h - lo as f64) * (x_hi - x_lo)
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
    pub samples: Samples,
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

/// The sampled parameter values of a PSA, one row per iteration, stored in
/// one buffer. Serialised as a list of rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples {
    rows: usize,
    columns: usize,
    values: Vec<f64>,
}

impl Samples {
    /// Number of iterations.
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The values of iteration `i`, in the order of [`PsaResult::sampled`].
    pub fn row(&self, i: usize) -> &[f64] {
        &self.values[i * self.columns..(i + 1) * self.columns]
    }

    pub fn iter(&self) -> impl Iterator<Item = &[f64]> + '_ {
        (0..self.rows).map(|i| self.row(i))
    }
}

impl std::ops::Index<usize> for Samples {
    type Output = [f64];

    fn index(&self, i: usize) -> &[f64] {
        self.row(i)
    }
}

impl Serialize for Samples {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
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

/// The PSA's distributions with their samplers prepared, in drawing order:
/// parameters with their own distribution (in declaration order), then the
/// Dirichlet groups.
#[derive(Debug)]
struct Draws {
    single: Vec<(usize, Sampler)>,
    groups: Vec<(Vec<usize>, Vec<Gamma>)>,
}

impl Draws {
    fn new(model: &Model) -> Draws {
        Draws {
            single: (0..model.params.len())
                .filter(|&k| model.params[k].dist != Dist::Fixed)
                .map(|k| (k, model.params[k].dist.prepare()))
                .collect(),
            groups: model
                .dirichlet
                .iter()
                .map(|g| {
                    (
                        g.params.clone(),
                        g.alpha.iter().map(|&a| Gamma::new(a)).collect(),
                    )
                })
                .collect(),
        }
    }

    fn draw(&self, model: &Model, seed: u64, i: usize, out: &mut [f64], scratch: &mut Vec<f64>) {
        let mut rng = Stream::new(iteration_seed(seed, i));
        for (k, d) in &self.single {
            out[*k] = d.sample(model.params[*k].base, &mut rng);
        }
        for (params, alpha) in &self.groups {
            scratch.resize(alpha.len(), 0.0);
            dist::dirichlet_prepared(alpha, &mut rng, scratch);
            for (&k, v) in params.iter().zip(scratch.iter()) {
                out[k] = *v;
            }
        }
    }
}

impl Draws {
    /// Draws iterations `first .. first + lanes` into lane arrays:
    /// `slots[k][l]` is parameter k of iteration `first + l`, each iteration
    /// from its own stream exactly as [`Draws::draw`] would draw it. Lanes
    /// past `lanes` repeat the first iteration.
    ///
    /// One parameter is drawn for all lanes before the next: the lanes'
    /// streams are independent, so the processor overlaps their draws, and
    /// each distribution's constants stay in registers.
    fn draw_lanes(
        &self,
        base: &[f64],
        seed: u64,
        first: usize,
        lanes: usize,
        slots: &mut [Lanes],
        streams: &mut Vec<Stream>,
    ) {
        streams.clear();
        streams.extend((0..lanes).map(|l| Stream::new(iteration_seed(seed, first + l))));
        for (slot, &b) in slots.iter_mut().zip(base) {
            *slot = [b; LANES];
        }
        for (k, d) in &self.single {
            d.sample_each(base[*k], streams, &mut slots[*k][..lanes]);
        }
        // A Dirichlet group component by component, each for all lanes (every stream still
        // draws the components in order), then each lane divided by its sum, added in
        // component order as `dist::dirichlet_prepared` adds them.
        for (params, alpha) in &self.groups {
            for (&k, g) in params.iter().zip(alpha) {
                let slot = &mut slots[k];
                for (v, rng) in slot[..lanes].iter_mut().zip(streams.iter_mut()) {
                    *v = g.sample(rng);
                }
            }
            let mut sums = [-0.0; LANES];
            for &k in params {
                for (s, v) in sums.iter_mut().zip(&slots[k]) {
                    *s += v;
                }
            }
            for &k in params {
                for (v, s) in slots[k][..lanes].iter_mut().zip(&sums) {
                    *v /= s;
                }
            }
        }
        if lanes < LANES {
            for k in self
                .single
                .iter()
                .map(|(k, _)| *k)
                .chain(self.groups.iter().flat_map(|(p, _)| p.iter().copied()))
            {
                let v = slots[k][0];
                slots[k][lanes..].fill(v);
            }
        }
    }
}

/// Draws one parameter vector into `out` (which starts as the base values),
/// as iteration `i` of a PSA with `seed` does.
pub fn draw(model: &Model, seed: u64, i: usize, out: &mut [f64], scratch: &mut Vec<f64>) {
    Draws::new(model).draw(model, seed, i, out, scratch);
}

/// Iterations per parallel task (a multiple of [`LANES`]).
const TASK: usize = 4 * LANES;

/// One task's share: `cost[s * len + k]`, `effect[s * len + k]` for strategy s and the task's
/// k-th iteration.
struct TaskResult {
    len: usize,
    cost: Vec<f64>,
    effect: Vec<f64>,
}

/// The Monte Carlo part of a PSA: every iteration's sampled values, and each
/// strategy's cost and effect in it.
#[derive(Debug, Clone)]
pub struct Simulation {
    pub samples: Samples,
    /// `cost[s][i]`, `effect[s][i]`: strategy s, iteration i.
    pub cost: Vec<Vec<f64>>,
    pub effect: Vec<Vec<f64>>,
}

/// Runs the PSA: [`simulate`], then the CE plane, CEACs, EVPI and summaries.
/// `progress` is called with the number of iterations done so far (from
/// worker threads, roughly every 1% of the work).
pub fn run(
    model: &Model,
    iterations: usize,
    seed: u64,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<PsaResult> {
    // The whole analysis runs on a worker of the thread pool: its parallel
    // steps then start from a running worker instead of each waking the
    // pool from this thread and waiting to be woken again (a few tens of
    // microseconds each, on a busy machine far more).
    rayon::scope(|_| {
        let sim = simulate_in_pool(model, iterations, seed, progress)?;
        Ok(analyse(model, iterations, seed, sim))
    })
}

/// Draws the iterations of a PSA and runs every strategy on each: the work a
/// hand-written Monte Carlo loop does, without the analyses [`run`] adds.
///
/// Markov models run [`LANES`] iterations at a time through [`Batch`];
/// decision trees, Simpson's rule and any batch that meets an invalid
/// probability run through [`Evaluator`], which gives the same numbers and
/// names the iteration, strategy and cycle of an error.
pub fn simulate(
    model: &Model,
    iterations: usize,
    seed: u64,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Simulation> {
    rayon::scope(|_| simulate_in_pool(model, iterations, seed, progress))
}

fn simulate_in_pool(
    model: &Model,
    iterations: usize,
    seed: u64,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Simulation> {
    let ns = model.strategies.len();
    let base = model.base_values();
    let np = base.len();
    let sampled = sampled_params(model);
    let draws = Draws::new(model);
    let done = AtomicUsize::new(0);
    let report_every = (iterations / 100).max(1);
    let effect = model.meta.effect;

    // Tasks are fixed ranges of iterations and every iteration has its own
    // random stream, so the outcome does not depend on scheduling.
    // Each task writes its rows of the sampled values straight into the
    // result (a copy after the parallel part would run on one thread).
    let columns = sampled.len();
    let mut sample_values = vec![0.0; iterations * columns];
    let mut parts = Vec::with_capacity(iterations.div_ceil(TASK));
    let mut rest = sample_values.as_mut_slice();
    for c in 0..iterations.div_ceil(TASK) {
        let len = TASK.min(iterations - c * TASK);
        let (part, tail) = std::mem::take(&mut rest).split_at_mut(len * columns);
        parts.push((c, part));
        rest = tail;
    }
    // Each worker's buffers serve all the tasks it runs: a batch keeps nothing from one run
    // to the next that the next does not set again.
    let buffers = || {
        (
            Batch::new(model),
            Vec::with_capacity(LANES),
            // The parameter values of the current block, one row per iteration, for the
            // evaluator.
            vec![0.0; LANES * np],
            Vec::new(),
            None::<Evaluator>,
        )
    };
    let tasks: Vec<Result<TaskResult>> = parts
        .into_par_iter()
        .map_init(buffers, |buffers, (c, sample_rows)| {
            let (batch, streams, params, scratch, evaluator) = buffers;
            let start = c * TASK;
            let len = TASK.min(iterations - start);
            let mut cost = vec![0.0; ns * len];
            let mut eff = vec![0.0; ns * len];
            for first in (0..len).step_by(LANES) {
                let lanes = LANES.min(len - first);
                let sample_block = &mut sample_rows[first * columns..(first + lanes) * columns];
                if let Some(b) = batch.as_mut() {
                    draws.draw_lanes(
                        &base,
                        seed,
                        start + first,
                        lanes,
                        &mut b.slots[..np],
                        streams,
                    );
                    for (l, out) in sample_block.chunks_exact_mut(columns.max(1)).enumerate() {
                        for (o, &p) in out.iter_mut().zip(&sampled) {
                            *o = b.slots[p][l];
                        }
                    }
                    let (mut c, mut e) = ([0.0; LANES], [0.0; LANES]);
                    let mut ok = true;
                    for s in 0..ns {
                        if !b.run(s, &mut c, &mut e) {
                            ok = false;
                            break;
                        }
                        cost[s * len + first..][..lanes].copy_from_slice(&c[..lanes]);
                        eff[s * len + first..][..lanes].copy_from_slice(&e[..lanes]);
                    }
                    if ok {
                        continue;
                    }
                    for (l, row) in params.chunks_exact_mut(np.max(1)).take(lanes).enumerate() {
                        for (k, v) in row.iter_mut().enumerate() {
                            *v = b.slots[k][l];
                        }
                    }
                } else {
                    for (l, row) in params.chunks_exact_mut(np.max(1)).take(lanes).enumerate() {
                        row.copy_from_slice(&base);
                        draws.draw(model, seed, start + first + l, row, scratch);
                        let out = &mut sample_block[l * columns..(l + 1) * columns];
                        for (o, &p) in out.iter_mut().zip(&sampled) {
                            *o = row[p];
                        }
                    }
                }
                let ev = evaluator.get_or_insert_with(|| Evaluator::new(model));
                for l in 0..lanes {
                    let k = first + l;
                    for s in 0..ns {
                        let row = &params[l * np..(l + 1) * np];
                        let r = ev.run(model, s, row, false).map_err(|e| match e {
                            crate::EconError::Evaluation {
                                strategy,
                                cycle,
                                message,
                            } => crate::EconError::Evaluation {
                                strategy,
                                cycle,
                                message: format!("PSA iteration {}: {message}", start + k),
                            },
                            other => other,
                        })?;
                        cost[s * len + k] = r.outcome.cost;
                        eff[s * len + k] = r.outcome.effect(effect);
                    }
                }
            }
            let before = done.fetch_add(len, Ordering::Relaxed);
            let after = before + len;
            if after / report_every != before / report_every || after == iterations {
                progress(after);
            }
            Ok(TaskResult {
                len,
                cost,
                effect: eff,
            })
        })
        .collect();

    let samples = Samples {
        rows: iterations,
        columns,
        values: sample_values,
    };
    let mut cost = vec![Vec::with_capacity(iterations); ns];
    let mut eff = vec![Vec::with_capacity(iterations); ns];
    for t in tasks {
        let t = t?;
        let len = t.len;
        for s in 0..ns {
            cost[s].extend_from_slice(&t.cost[s * len..(s + 1) * len]);
            eff[s].extend_from_slice(&t.effect[s * len..(s + 1) * len]);
        }
    }
    Ok(Simulation {
        samples,
        cost,
        effect: eff,
    })
}

/// The analyses of a PSA's simulation.
fn analyse(model: &Model, iterations: usize, seed: u64, sim: Simulation) -> PsaResult {
    let Simulation {
        samples,
        cost,
        effect: eff,
    } = sim;
    let ns = model.strategies.len();
    let sampled = sampled_params(model);
    // The CEACs, the quadrants and the summaries are independent: they run
    // side by side.
    let r = model.meta.reference;
    let quadrants = || -> Vec<[f64; 4]> {
        (0..ns)
            .map(|s| {
                let mut count = [0usize; 4];
                for i in 0..iterations {
                    let dc = cost[s][i] - cost[r][i];
                    let de = eff[s][i] - eff[r][i];
                    let k = match (de >= 0.0, dc >= 0.0) {
                        (true, true) => 0,
                        (true, false) => 1,
                        (false, false) => 2,
                        (false, true) => 3,
                    };
                    count[k] += 1;
                }
                count.map(|c| c as f64 / iterations as f64)
            })
            .collect()
    };
    let ((ceac, quadrants), (cost_summary, effect_summary)) = rayon::join(
        || (ceac(model, &cost, &eff), quadrants()),
        || {
            rayon::join(
                || cost.par_iter().map(|v| Summary::of(v)).collect(),
                || eff.par_iter().map(|v| Summary::of(v)).collect(),
            )
        },
    );
    PsaResult {
        iterations,
        seed,
        sampled: sampled
            .iter()
            .map(|&k| model.params[k].name.clone())
            .collect(),
        samples,
        cost_summary,
        effect_summary,
        cost,
        effect: eff,
        ceac,
        quadrants,
    }
}

/// Sum in a fixed order with four running totals (so the additions need not
/// wait for one another); the result depends only on the data.
fn sum4(xs: impl Iterator<Item = f64>) -> f64 {
    let mut acc = [0.0; 4];
    for (i, x) in xs.enumerate() {
        acc[i % 4] += x;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// [`Increments::at`] compiled for the widest instruction set of the CPU.
struct IncrementsAt<'a> {
    increments: &'a Increments,
    n: usize,
    w: f64,
    frontier: usize,
}

impl pulp::WithSimd for IncrementsAt<'_> {
    type Output = (Vec<usize>, [f64; 4]);

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> Self::Output {
        self.increments.at(self.n, self.w, self.frontier)
    }
}

/// Iterations per block of [`Increments::at`] (a multiple of 4).
const CEAC_BLOCK: usize = 64;

/// Costs and effects of each strategy less those of the first one, per
/// iteration: the NMB of strategy s over that of strategy 0 is
/// `wtp × effect[s][i] − cost[s][i]` of these, and strategy 0's is zero.
#[derive(Debug)]
struct Increments {
    cost: Vec<Vec<f64>>,
    effect: Vec<Vec<f64>>,
}

impl Increments {
    fn new(cost: &[Vec<f64>], effect: &[Vec<f64>]) -> Increments {
        let less_first = |v: &[Vec<f64>]| -> Vec<Vec<f64>> {
            v.iter()
                .skip(1)
                .map(|x| x.iter().zip(&v[0]).map(|(x, x0)| x - x0).collect())
                .collect()
        };
        Increments {
            cost: less_first(cost),
            effect: less_first(effect),
        }
    }

    /// For one WTP: how often each strategy has the highest NMB (the first
    /// one on ties) and the four partial sums of how much that NMB exceeds the
    /// `frontier` strategy's (iteration i adds to `gap[i % 4]`).
    ///
    /// Iterations go a block at a time through fixed-size arrays, each step a
    /// loop that computes new arrays from old ones (no store depends on a
    /// comparison), so the compiler vectorises them (for AVX2 where the CPU
    /// has it, through [`IncrementsAt`]).
    #[inline(always)]
    fn at(&self, n: usize, w: f64, frontier: usize) -> (Vec<usize>, [f64; 4]) {
        let ns = self.cost.len() + 1;
        let mut wins = vec![0usize; ns];
        let mut gap = [0.0; 4];
        if ns == 2 {
            // The arithmetic of the blocks below, fused into one pass.
            let front_is_1 = frontier == 1;
            let step = |c: f64, e: f64, gap: &mut f64, won: &mut usize| {
                let d = nmb(c, e, w);
                let better = d > 0.0;
                *gap += if better { d } else { 0.0 } - if front_is_1 { d } else { 0.0 };
                *won += usize::from(better);
            };
            let (c, e) = (&self.cost[0][..n], &self.effect[0][..n]);
            let (c4, e4) = (c.chunks_exact(4), e.chunks_exact(4));
            let (c_rest, e_rest) = (c4.remainder(), e4.remainder());
            let mut won = [0usize; 4];
            for (c, e) in c4.zip(e4) {
                for j in 0..4 {
                    step(c[j], e[j], &mut gap[j], &mut won[j]);
                }
            }
            for (j, (&c, &e)) in c_rest.iter().zip(e_rest).enumerate() {
                step(c, e, &mut gap[j], &mut won[j]);
            }
            let won = won.iter().sum::<usize>();
            wins[0] = n - won;
            wins[1] = won;
            return (wins, gap);
        }
        let mut v = [0.0; CEAC_BLOCK];
        let mut front = [0.0; CEAC_BLOCK];
        let mut best_v = [[0.0; CEAC_BLOCK]; 2];
        let mut best = [[0.0; CEAC_BLOCK]; 2];
        for start in (0..n).step_by(CEAC_BLOCK) {
            let m = CEAC_BLOCK.min(n - start);
            // Strategy 0 leads with an increment of zero.
            best_v[0] = [0.0; CEAC_BLOCK];
            best[0] = [0.0; CEAC_BLOCK];
            for s in 1..ns {
                let (c, e) = (
                    &self.cost[s - 1][start..start + m],
                    &self.effect[s - 1][start..start + m],
                );
                fill_nmb(&mut v, c, e, w);
                if s == frontier {
                    front = v;
                }
                let ([v0, v1], [b0, b1]) = (&mut best_v, &mut best);
                if s % 2 == 1 {
                    keep_better(&v, s as f64, v0, b0, v1, b1);
                } else {
                    keep_better(&v, s as f64, v1, b1, v0, b0);
                }
            }
            let last = (ns - 1) % 2;
            if frontier == 0 {
                front = [0.0; CEAC_BLOCK];
            }
            for (b, f) in best_v[last][..m].chunks(4).zip(front.chunks(4)) {
                for j in 0..b.len() {
                    gap[j] += b[j] - f[j];
                }
            }
            for (s, wins) in wins.iter_mut().enumerate() {
                let s = s as f64;
                *wins += best[last][..m].iter().filter(|&&b| b == s).count();
            }
        }
        (wins, gap)
    }
}

/// `v[k] = nmb(c[k], e[k], w)` for the first `c.len()` lanes; the rest keep
/// stale values, which are never read.
#[inline]
fn fill_nmb(v: &mut [f64; CEAC_BLOCK], c: &[f64], e: &[f64], w: f64) {
    for (v, (&c, &e)) in v.iter_mut().zip(c.iter().zip(e)) {
        *v = nmb(c, e, w);
    }
}

/// The best value and strategy so far, after strategy `s` with values `v`:
/// `s` replaces the best only if strictly better.
#[inline]
fn keep_better(
    v: &[f64; CEAC_BLOCK],
    s: f64,
    best_v: &[f64; CEAC_BLOCK],
    best: &[f64; CEAC_BLOCK],
    new_v: &mut [f64; CEAC_BLOCK],
    new: &mut [f64; CEAC_BLOCK],
) {
    for k in 0..CEAC_BLOCK {
        let better = v[k] > best_v[k];
        new_v[k] = if better { v[k] } else { best_v[k] };
        new[k] = if better { s } else { best[k] };
    }
}

/// CEAC, acceptability frontier and EVPI over the model's WTP grid (points in
/// parallel; each point is computed the same way whatever the threads).
///
/// The expected NMB of a strategy is `wtp × mean effect − mean cost`. EVPI is
/// the mean over iterations of how much the best strategy of the iteration
/// beats the frontier strategy, so it is never negative and exactly zero when
/// the frontier strategy wins every iteration.
pub fn ceac(model: &Model, cost: &[Vec<f64>], effect: &[Vec<f64>]) -> Vec<CeacPoint> {
    let ns = cost.len();
    let n = cost.first().map(|v| v.len()).unwrap_or(0);
    let nf = n.max(1) as f64;
    let mean_cost: Vec<f64> = cost.iter().map(|v| sum4(v.iter().copied()) / nf).collect();
    let mean_effect: Vec<f64> = effect
        .iter()
        .map(|v| sum4(v.iter().copied()) / nf)
        .collect();
    let increments = Increments::new(cost, effect);
    let arch = pulp::Arch::new();
    model
        .settings
        .wtp_grid
        .par_iter()
        .map(|&w| {
            let mean_nmb: Vec<f64> = (0..ns)
                .map(|s| nmb(mean_cost[s], mean_effect[s], w))
                .collect();
            let mut frontier = 0;
            for s in 1..ns {
                if mean_nmb[s] > mean_nmb[frontier] {
                    frontier = s;
                }
            }
            let (wins, gap) = arch.dispatch(IncrementsAt {
                increments: &increments,
                n,
                w,
                frontier,
            });
            let probability: Vec<f64> = wins.iter().map(|&k| k as f64 / nf).collect();
            let evpi = ((gap[0] + gap[1]) + (gap[2] + gap[3])) / nf;
            CeacPoint {
                wtp: w,
                frontier,
                frontier_probability: probability[frontier],
                probability,
                evpi,
                population_evpi: model.settings.population_size.map(|p| p * evpi),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drawing a block of iterations into lanes gives each iteration exactly
    /// the values it gets drawn alone, and the unused lanes of a short block
    /// repeat its first iteration.
    #[test]
    #[allow(clippy::needless_range_loop)]
    fn lanes_draw_what_each_iteration_draws_alone() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        for file in [
            "examples/hiv-briggs-2-5.toml",
            "medledger-lung-screening.toml",
        ] {
            let model = Model::from_path(&root.join(file)).unwrap();
            let base = model.base_values();
            let draws = Draws::new(&model);
            let (mut streams, mut scratch) = (Vec::new(), Vec::new());
            for (first, lanes) in [(0, LANES), (1000, 5)] {
                let mut slots = vec![[f64::NAN; LANES]; base.len()];
                draws.draw_lanes(&base, 99, first, lanes, &mut slots, &mut streams);
                for l in 0..LANES {
                    let mut row = base.clone();
                    let i = first + if l < lanes { l } else { 0 };
                    draws.draw(&model, 99, i, &mut row, &mut scratch);
                    for (k, want) in row.iter().enumerate() {
                        assert_eq!(
                            slots[k][l].to_bits(),
                            want.to_bits(),
                            "{file} {first}+{l} p{k}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn quantiles_interpolate() {
        let s = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&s, 0.5), 3.0);
        assert_eq!(quantile(&s, 0.0), 1.0);
        assert_eq!(quantile(&s, 1.0), 5.0);
        assert!((quantile(&s, 0.1) - 1.4).abs() < 1e-12);
    }

    #[test]
    fn selection_gives_the_sorted_quantiles() {
        let xs: Vec<f64> = (0..1001)
            .map(|i| ((i * 7919) % 1001) as f64 * 0.37 - 50.0)
            .collect();
        let mut sorted = xs.clone();
        sorted.sort_by(f64::total_cmp);
        for q in [0.0, 0.025, 0.1, 0.5, 0.975, 0.99, 1.0] {
            let mut v = xs.clone();
            assert_eq!(select_quantile(&mut v, q), quantile(&sorted, q), "q = {q}");
        }
        assert!(select_quantile(&mut [], 0.5).is_nan());
    }

    /// The blocked CEAC loop against the plain one: the same winners, and
    /// the same EVPI sums up to rounding, for several strategies and a length
    /// that leaves a partial block.
    #[test]
    fn ceac_blocks_match_the_plain_loop() {
        let n = 1001;
        let all = 3;
        let cost: Vec<Vec<f64>> = (0..all)
            .map(|s| {
                (0..n)
                    .map(|i| 1000.0 * s as f64 + ((i * 7919 + s * 31) % 997) as f64)
                    .collect()
            })
            .collect();
        let effect: Vec<Vec<f64>> = (0..all)
            .map(|s| {
                (0..n)
                    .map(|i| 0.1 * s as f64 + ((i * 104_729 + s * 17) % 1009) as f64 * 1e-4)
                    .collect()
            })
            .collect();
        for ns in [2, all] {
            let (cost, effect) = (&cost[..ns], &effect[..ns]);
            let inc = Increments::new(cost, effect);
            for w in [0.0, 5_000.0, 10_000.0, 12_345.0, 50_000.0] {
                for frontier in 0..ns {
                    let mut wins = vec![0usize; ns];
                    let mut gap = 0.0;
                    for i in 0..n {
                        let v: Vec<f64> =
                            (0..ns).map(|s| nmb(cost[s][i], effect[s][i], w)).collect();
                        let mut best = 0;
                        for s in 1..ns {
                            if v[s] > v[best] {
                                best = s;
                            }
                        }
                        wins[best] += 1;
                        gap += v[best] - v[frontier];
                    }
                    let (got_wins, got_gap) = inc.at(n, w, frontier);
                    assert_eq!(got_wins, wins, "w {w} frontier {frontier}");
                    let got = got_gap.iter().sum::<f64>();
                    assert!(
                        (got - gap).abs() <= 1e-9 * gap.abs().max(1.0),
                        "w {w} frontier {frontier}: {got} vs {gap}"
                    );
                }
            }
        }
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
