//! Markov cohort runs for [`LANES`] parameter sets at once, for the PSA.
//!
//! Every value is an array with one entry per parameter set (structure of
//! arrays): each expression is interpreted once for all lanes, and the cohort
//! update and payoffs are plain loops over lanes that the compiler
//! vectorises. Each lane performs exactly the floating-point operations of
//! [`crate::engine::Evaluator`], in the same order, so a lane's cost and
//! effect equal the evaluator's bit for bit (tested below); only the cost and
//! the effect are accumulated.
//!
//! A batch that meets an invalid probability reports failure without saying
//! where; the caller reruns those parameter sets through the evaluator, which
//! names the iteration, strategy, cycle and entry.

// Lane loops read and write several arrays at the same lane index; indexing
// by lane says so more plainly than nested zips.
#![allow(clippy::needless_range_loop)]

use crate::engine::discount_table;
use crate::expr::{LANES, Lanes};
use crate::model::{Counting, DiscountKind, Effect, Entry, Markov, Model, Strategy, Structure};

/// Tolerances of [`crate::engine`]: entries may stray outside [0, 1] by
/// `PROB_TOL`; rows without a complement must sum to one within `ROW_TOL`.
const PROB_TOL: f64 = 1e-9;
const ROW_TOL: f64 = 1e-6;

/// What a state or transition contributes to the effect.
#[derive(Debug, Clone, Copy)]
enum EffectKind {
    Qalys,
    LifeYears,
    Outcome(usize, DiscountKind),
}

/// Reusable buffers for batched runs of one Markov model.
#[derive(Debug)]
pub struct Batch<'m> {
    model: &'m Model,
    mk: &'m Markov,
    effect: EffectKind,
    /// `slots[k][l]`: slot k (parameters, expressions, cycle, time) of lane l.
    pub slots: Vec<Lanes>,
    /// The slots that hold one value in every lane (cycle and time), with
    /// that value.
    same: [(u32, f64); 2],
    stack: Vec<Lanes>,
    matrix: Vec<Lanes>,
    prev: Vec<Lanes>,
    next: Vec<Lanes>,
    cost: Vec<Lanes>,
    eff: Vec<Lanes>,
    tcost: Vec<Lanes>,
    teff: Vec<Lanes>,
    tmp: Lanes,
    /// Per state: whether its cost, and its contribution to the effect, are
    /// the constant zero (such states add nothing and are skipped).
    zero: Vec<(bool, bool)>,
    /// `columns[s][j]`: the rows i of strategy s's structurally non-zero
    /// entries (i, j) in column j, in increasing order; `None` for a state
    /// whose occupancy nothing reads.
    columns: Vec<Vec<Option<Vec<usize>>>>,
    disc_cost: Vec<f64>,
    disc_effect: Vec<f64>,
    /// The widest instruction set of this CPU that [`MarkovRun`] is compiled
    /// for.
    arch: pulp::Arch,
}

/// One [`Batch::run_markov`], compiled once per instruction set (SSE2, and
/// AVX2 on x86-64 CPUs that have it, chosen at run time) so that the lane
/// loops work on as many lanes per instruction as the CPU allows. Only the
/// vector width differs: Rust never fuses a multiply and an add on its own,
/// so every lane performs the same IEEE operations, in the same order, on
/// every CPU.
struct MarkovRun<'a, 'm> {
    batch: &'a mut Batch<'m>,
    s: usize,
    strategy: &'a Strategy,
    cost: &'a mut Lanes,
    effect: &'a mut Lanes,
}

impl pulp::WithSimd for MarkovRun<'_, '_> {
    type Output = bool;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> bool {
        self.batch
            .run_markov(self.s, self.strategy, self.cost, self.effect)
    }
}

impl<'m> Batch<'m> {
    /// `None` for models the batch does not handle (decision trees, Simpson's
    /// rule); those run through [`crate::engine::Evaluator`].
    pub fn new(model: &'m Model) -> Option<Batch<'m>> {
        let Structure::Markov(mk) = &model.structure else {
            return None;
        };
        if model.settings.counting == Counting::Simpson {
            return None;
        }
        let n = mk.states.len();
        let nt = mk.on_transition.len();
        let effect = match model.meta.effect {
            Effect::Qalys => EffectKind::Qalys,
            Effect::LifeYears => EffectKind::LifeYears,
            Effect::Outcome(o) => EffectKind::Outcome(o, model.outcomes[o].discount),
        };
        let is_zero = |c: &crate::model::Compiled| c.program.as_constant() == Some(0.0);
        let zero: Vec<(bool, bool)> = mk
            .states
            .iter()
            .map(|st| {
                let effect_zero = match effect {
                    EffectKind::Qalys => is_zero(&st.utility),
                    EffectKind::LifeYears => !st.alive,
                    EffectKind::Outcome(o, _) => is_zero(&st.outcomes[o]),
                };
                (is_zero(&st.cost), effect_zero)
            })
            .collect();
        // A state that only ever stays where it is and is worth nothing
        // (death, typically) affects no payoff and no other state: its
        // occupancy is not computed at all (`None`).
        let columns = model
            .strategies
            .iter()
            .map(|s| {
                (0..n)
                    .map(|j| {
                        let absorbing =
                            (0..n).all(|k| k == j || matches!(s.matrix[j * n + k], Entry::Zero));
                        let sink = absorbing
                            && zero[j] == (true, true)
                            && mk.on_transition.iter().all(|tp| tp.from != j);
                        (!sink).then(|| {
                            (0..n)
                                .filter(|&i| !matches!(s.matrix[i * n + j], Entry::Zero))
                                .collect()
                        })
                    })
                    .collect()
            })
            .collect();
        let set = &model.settings;
        Some(Batch {
            model,
            mk,
            effect,
            slots: vec![[0.0; LANES]; model.n_slots()],
            same: [(u32::MAX, 0.0); 2],
            stack: Vec::with_capacity(32),
            matrix: vec![[0.0; LANES]; n * n],
            prev: vec![[0.0; LANES]; n],
            next: vec![[0.0; LANES]; n],
            cost: vec![[0.0; LANES]; n],
            eff: vec![[0.0; LANES]; n],
            tcost: vec![[0.0; LANES]; nt],
            teff: vec![[0.0; LANES]; nt],
            tmp: [0.0; LANES],
            zero,
            columns,
            disc_cost: discount_table(model, set.discount_costs, false),
            disc_effect: discount_table(model, set.discount_effects, false),
            arch: pulp::Arch::new(),
        })
    }

    /// Runs strategy `s` for the parameter values in `slots[..params]` and
    /// writes each lane's discounted cost and effect. Returns false if a
    /// probability was invalid in some lane.
    pub fn run(&mut self, s: usize, cost: &mut Lanes, effect: &mut Lanes) -> bool {
        let model = self.model;
        let strategy = &model.strategies[s];
        let cs = model.cycle_slot();
        self.slots[cs] = [0.0; LANES];
        self.slots[cs + 1] = [0.0; LANES];
        self.same = [(cs as u32, 0.0), (cs as u32 + 1, 0.0)];
        for (slot, p) in &strategy.static_exprs {
            self.eval_to_tmp(p);
            self.slots[*slot] = self.tmp;
        }
        let arch = self.arch;
        arch.dispatch(MarkovRun {
            batch: self,
            s,
            strategy,
            cost,
            effect,
        })
    }

    #[inline(always)]
    fn run_markov(
        &mut self,
        s: usize,
        strategy: &Strategy,
        cost_out: &mut Lanes,
        effect_out: &mut Lanes,
    ) -> bool {
        let model = self.model;
        let mk = self.mk;
        let set = &model.settings;
        let n = mk.states.len();
        let len = set.cycle_length;
        let cs = model.cycle_slot();
        for (p, &x) in self.prev.iter_mut().zip(&mk.initial) {
            *p = [x; LANES];
        }
        let (wp, wn) = match set.counting {
            Counting::Beginning => (1.0, 0.0),
            Counting::End => (0.0, 1.0),
            Counting::HalfCycle | Counting::Simpson => (0.5, 0.5),
        };
        let mut out_cost = [0.0; LANES];
        let mut out_eff = [0.0; LANES];
        for t in 1..=set.cycles {
            self.slots[cs] = [t as f64; LANES];
            self.slots[cs + 1] = [t as f64 * len; LANES];
            self.same = [(cs as u32, t as f64), (cs as u32 + 1, t as f64 * len)];
            let mut changed = false;
            // A slot still holds its value of the last cycle (or, in the
            // first, one that is ignored: everything is computed then).
            for (slot, p) in &strategy.dynamic_exprs {
                self.eval_to_tmp(p);
                let old = &mut self.slots[*slot];
                if old
                    .iter()
                    .zip(&self.tmp)
                    .any(|(a, b)| a.to_bits() != b.to_bits())
                {
                    changed = true;
                    *old = self.tmp;
                }
            }
            if (t == 1 || (strategy.matrix_dynamic && (changed || strategy.matrix_reads_time)))
                && !self.fill_matrix(strategy)
            {
                return false;
            }
            if t == 1 || (strategy.values_dynamic && (changed || strategy.values_read_time)) {
                self.fill_values();
            }
            // next = prev · P over the structurally non-zero entries; each
            // next[j] adds its terms in increasing i, as the evaluator does.
            // Column by column, so that each sum stays in registers.
            for (j, rows) in self.columns[s].iter().enumerate() {
                let Some(rows) = rows else { continue };
                let mut acc = [0.0; LANES];
                for &i in rows {
                    add_product(&mut acc, &self.prev[i], &self.matrix[i * n + j]);
                }
                self.next[j] = acc;
            }

            let fc = self.disc_cost[t];
            let fe = self.disc_effect[t];
            let mut c_t = [0.0; LANES];
            let mut e_t = [0.0; LANES];
            for (k, tp) in mk.on_transition.iter().enumerate() {
                let (p, m) = (&self.prev[tp.from], &self.matrix[tp.from * n + tp.to]);
                let flow: Lanes = std::array::from_fn(|l| p[l] * m[l]);
                add_product(&mut c_t, &flow, &self.tcost[k]);
                match self.effect {
                    EffectKind::Qalys => add_product(&mut e_t, &flow, &self.teff[k]),
                    EffectKind::Outcome(_, d) => {
                        let f = factor(d, fc, fe);
                        for l in 0..LANES {
                            out_eff[l] += flow[l] * self.teff[k][l] * f;
                        }
                    }
                    EffectKind::LifeYears => {}
                }
            }
            let mut oc = [0.0; LANES];
            let mut oe = [0.0; LANES];
            let mut mixed = [0.0; LANES];
            for st in 0..n {
                let (cost_zero, effect_zero) = self.zero[st];
                if cost_zero && effect_zero {
                    continue;
                }
                let (p, x) = (&self.prev[st], &self.next[st]);
                // The evaluator's wp × prev + wn × next. With weights 0 and 1
                // that is exactly one of the two (their entries are finite),
                // up to the sign of a zero, which the sums below ignore.
                let occ: &Lanes = match set.counting {
                    Counting::Beginning => p,
                    Counting::End => x,
                    Counting::HalfCycle | Counting::Simpson => {
                        for l in 0..LANES {
                            mixed[l] = wp * p[l] + wn * x[l];
                        }
                        &mixed
                    }
                };
                // occ == 0: the evaluator skips the state; adding +0.0
                // instead leaves every sum as it is (as does skipping a
                // state whose payoff is the constant zero: these sums start
                // at +0.0, so they never hold -0.0).
                if !cost_zero {
                    add_occupied(&mut oc, occ, |l, o| o * self.cost[st][l]);
                }
                if effect_zero {
                    continue;
                }
                let e = &self.eff[st];
                match self.effect {
                    EffectKind::Qalys => add_occupied(&mut oe, occ, |l, o| o * e[l] * len),
                    EffectKind::LifeYears => add_occupied(&mut oe, occ, |_, o| o * len),
                    EffectKind::Outcome(_, d) => {
                        let f = factor(d, fc, fe);
                        add_occupied(&mut out_eff, occ, |l, o| o * e[l] * f);
                    }
                }
            }
            for l in 0..LANES {
                c_t[l] += oc[l];
                out_cost[l] += c_t[l] * fc;
            }
            match self.effect {
                EffectKind::Qalys => {
                    for l in 0..LANES {
                        e_t[l] += oe[l];
                        out_eff[l] += e_t[l] * fe;
                    }
                }
                EffectKind::LifeYears => {
                    for l in 0..LANES {
                        out_eff[l] += oe[l] * fe;
                    }
                }
                EffectKind::Outcome(..) => {}
            }
            std::mem::swap(&mut self.prev, &mut self.next);
        }
        *cost_out = out_cost;
        *effect_out = out_eff;
        true
    }

    /// Evaluates `p` for every lane into `self.tmp`.
    #[inline(always)]
    fn eval_to_tmp(&mut self, p: &crate::expr::Program) {
        p.eval_lanes(
            &self.slots,
            &self.same,
            &self.model.tables,
            &mut self.stack,
            &mut self.tmp,
        );
    }

    #[inline(always)]
    fn fill_matrix(&mut self, strategy: &Strategy) -> bool {
        let model = self.model;
        let n = self.mk.states.len();
        for i in 0..n {
            let mut sum = [0.0; LANES];
            let mut comp = None;
            for j in 0..n {
                match &strategy.matrix[i * n + j] {
                    Entry::Zero => self.matrix[i * n + j] = [0.0; LANES],
                    Entry::Complement => comp = Some(j),
                    Entry::Expr(c) => {
                        let v = &mut self.matrix[i * n + j];
                        c.program.eval_lanes(
                            &self.slots,
                            &self.same,
                            &model.tables,
                            &mut self.stack,
                            v,
                        );
                        if !v.iter().all(|v| (-PROB_TOL..=1.0 + PROB_TOL).contains(v)) {
                            return false;
                        }
                        for (s, v) in sum.iter_mut().zip(v.iter()) {
                            *s += v;
                        }
                    }
                }
            }
            match comp {
                Some(j) => {
                    if sum.iter().any(|s| 1.0 - s < -PROB_TOL) {
                        return false;
                    }
                    for (m, s) in self.matrix[i * n + j].iter_mut().zip(sum) {
                        *m = (1.0 - s).max(0.0);
                    }
                }
                None => {
                    if sum.iter().any(|s| (s - 1.0).abs() > ROW_TOL) {
                        return false;
                    }
                }
            }
        }
        true
    }

    #[inline(always)]
    fn fill_values(&mut self) {
        let model = self.model;
        let mk = self.mk;
        for (st, def) in mk.states.iter().enumerate() {
            def.cost.program.eval_lanes(
                &self.slots,
                &self.same,
                &model.tables,
                &mut self.stack,
                &mut self.cost[st],
            );
            let e = match self.effect {
                EffectKind::Qalys => &def.utility,
                EffectKind::Outcome(o, _) => &def.outcomes[o],
                EffectKind::LifeYears => continue,
            };
            e.program.eval_lanes(
                &self.slots,
                &self.same,
                &model.tables,
                &mut self.stack,
                &mut self.eff[st],
            );
        }
        for (k, tp) in mk.on_transition.iter().enumerate() {
            tp.cost.program.eval_lanes(
                &self.slots,
                &self.same,
                &model.tables,
                &mut self.stack,
                &mut self.tcost[k],
            );
            let e = match self.effect {
                EffectKind::Qalys => &tp.qaly,
                EffectKind::Outcome(o, _) => &tp.outcomes[o],
                EffectKind::LifeYears => continue,
            };
            e.program.eval_lanes(
                &self.slots,
                &self.same,
                &model.tables,
                &mut self.stack,
                &mut self.teff[k],
            );
        }
    }
}

/// `acc += a * b`, lane by lane (on copies, which the compiler knows do not
/// overlap, so it vectorises the loop).
#[inline(always)]
fn add_product(acc: &mut Lanes, a: &Lanes, b: &Lanes) {
    let (a, b) = (*a, *b);
    let mut r = *acc;
    for l in 0..LANES {
        r[l] += a[l] * b[l];
    }
    *acc = r;
}

/// `acc[l] += term(l, occ[l])` in every lane where the occupancy is not zero
/// (the term is computed in every lane and then selected, without branches).
#[inline(always)]
fn add_occupied(acc: &mut Lanes, occ: &Lanes, term: impl Fn(usize, f64) -> f64) {
    let mut r = *acc;
    for l in 0..LANES {
        let o = occ[l];
        let v = term(l, o);
        r[l] += if o == 0.0 { 0.0 } else { v };
    }
    *acc = r;
}

/// The discount factor of a custom outcome in the current cycle.
#[inline]
fn factor(d: DiscountKind, fc: f64, fe: f64) -> f64 {
    match d {
        DiscountKind::None => 1.0,
        DiscountKind::Costs => fc,
        DiscountKind::Effects => fe,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Evaluator;

    /// Draws PSA iterations 0..LANES with `seed` into the batch's parameter slots; returns
    /// each iteration's parameter values, for the evaluator.
    #[allow(clippy::needless_range_loop)]
    fn draw_into_lanes(model: &Model, batch: &mut Batch<'_>, seed: u64) -> Vec<Vec<f64>> {
        let base = model.base_values();
        let mut scratch = Vec::new();
        let params: Vec<Vec<f64>> = (0..LANES)
            .map(|i| {
                let mut p = base.clone();
                crate::psa::draw(model, seed, i, &mut p, &mut scratch);
                p
            })
            .collect();
        for k in 0..base.len() {
            for l in 0..LANES {
                batch.slots[k][l] = params[l][k];
            }
        }
        params
    }

    /// A state nobody enters may be worth an infinite amount: the evaluator
    /// skips it, and so does every lane (the totals stay finite and equal).
    #[test]
    fn an_empty_state_with_an_infinite_payoff_adds_nothing() {
        let text = r#"
[model]
title = "unreachable"
kind = "markov"
effect = "qalys"

[settings]
cycles = 5
counting = "half-cycle"

[parameters]
p = { value = 0.2, dist = { type = "beta", mean = 0.2, sd = 0.05 } }
c = { value = 100, dist = { type = "gamma", mean = 100, sd = 30 } }

[markov]
states = ["well", "sick", "never"]
initial = [1, 0, 0]
transitions = [
  ["C", "p", 0],
  [0, 1, 0],
  [0, 0, 1],
]

[markov.state.well]
cost = "c"
utility = 1
[markov.state.sick]
cost = "2 * c"
utility = 0.5
[markov.state.never]
cost = "1e308 * 10"
utility = "1e308 * 10"

[[strategy]]
name = "only"
"#;
        let model = Model::from_toml(text).unwrap();
        let mut batch = Batch::new(&model).unwrap();
        let mut ev = Evaluator::new(&model);
        let params = draw_into_lanes(&model, &mut batch, 5);
        let (mut c, mut e) = ([0.0; LANES], [0.0; LANES]);
        assert!(batch.run(0, &mut c, &mut e));
        for l in 0..LANES {
            let o = ev.run(&model, 0, &params[l], false).unwrap().outcome;
            assert!(c[l].is_finite() && e[l].is_finite(), "lane {l}");
            assert_eq!(c[l].to_bits(), o.cost.to_bits(), "lane {l}");
            assert_eq!(
                e[l].to_bits(),
                o.effect(model.meta.effect).to_bits(),
                "lane {l}"
            );
        }
    }

    /// Every lane equals the evaluator bit for bit, for each example Markov
    /// model and each counting convention the batch handles.
    #[test]
    fn lanes_equal_the_evaluator_bit_for_bit() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        for file in [
            "examples/hiv-briggs-2-5.toml",
            "examples/thr-briggs-3-5.toml",
            "medledger-lung-screening.toml",
        ] {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            for counting in ["", "beginning", "end", "half-cycle"] {
                let text = if counting.is_empty() {
                    text.clone()
                } else {
                    text.lines()
                        .filter(|l| !l.trim_start().starts_with("counting ="))
                        .collect::<Vec<_>>()
                        .join("\n")
                        .replace(
                            "[settings]",
                            &format!("[settings]\ncounting = \"{counting}\""),
                        )
                };
                let model = Model::from_toml(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
                let mut batch = Batch::new(&model).expect("a Markov model");
                let mut ev = Evaluator::new(&model);
                let params = draw_into_lanes(&model, &mut batch, 11);
                for s in 0..model.strategies.len() {
                    let (mut c, mut e) = ([0.0; LANES], [0.0; LANES]);
                    assert!(batch.run(s, &mut c, &mut e), "{file} {counting}");
                    for l in 0..LANES {
                        let o = ev.run(&model, s, &params[l], false).unwrap().outcome;
                        assert_eq!(
                            c[l].to_bits(),
                            o.cost.to_bits(),
                            "{file} {counting} s{s} l{l}"
                        );
                        let want = o.effect(model.meta.effect);
                        assert_eq!(
                            e[l].to_bits(),
                            want.to_bits(),
                            "{file} {counting} s{s} l{l}"
                        );
                    }
                }
            }
        }
    }
}
