//! Evaluation of a compiled model for one parameter vector: the Markov cohort
//! simulation and the decision-tree roll-back.
//!
//! [`Evaluator`] keeps its scratch buffers between calls so that the PSA loop
//! allocates nothing per iteration when traces are not requested.
//!
//! Conventions (documented for users in `docs/cea-model-format.md`): cycle
//! `t = 1..n` moves the cohort from trace point `t-1` to `t` with the matrix
//! evaluated at `cycle = t`; state values of cycle `t` are evaluated at
//! `cycle = t`; costs are per cycle, utilities per year (a cycle's QALYs are
//! utility × cycle length), life-years count alive states × cycle length.

use serde::Serialize;

use crate::error::{EconError, Result};
use crate::model::{
    Compiled, Counting, DiscountKind, Effect, Entry, Markov, Model, NodeKind, Payoffs, Strategy,
    Structure, Tree,
};

/// Tolerance on probabilities: rows must sum to one within this, entries may
/// stray outside [0, 1] by at most this (rounding in user expressions).
const PROB_TOL: f64 = 1e-9;

/// Totals of one strategy.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Outcome {
    pub cost: f64,
    pub qalys: f64,
    pub life_years: f64,
    pub cost_undiscounted: f64,
    pub qalys_undiscounted: f64,
    pub life_years_undiscounted: f64,
    /// Custom outcomes, in the order of `Model::outcomes`.
    pub outcomes: Vec<f64>,
}

impl Outcome {
    pub fn effect(&self, e: Effect) -> f64 {
        match e {
            Effect::Qalys => self.qalys,
            Effect::LifeYears => self.life_years,
            Effect::Outcome(i) => self.outcomes[i],
        }
    }
}

/// Per-cycle detail of a Markov run, for the trace plot and CSV.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Trace {
    /// `membership[k][s]`: share of the cohort in state `s` at trace point k (0..=n).
    pub membership: Vec<Vec<f64>>,
    /// Discounted cost, QALYs and life-years accrued in cycle t (index t-1);
    /// for Simpson's rule, the weighted contribution of trace point t.
    pub cycle_cost: Vec<f64>,
    pub cycle_qalys: Vec<f64>,
    pub cycle_life_years: Vec<f64>,
}

/// One root-to-leaf path of a decision tree.
#[derive(Debug, Clone, Serialize)]
pub struct TreePath {
    pub nodes: Vec<String>,
    pub probability: f64,
    /// Payoffs accumulated along the path (not weighted by its probability).
    pub cost: f64,
    pub qalys: f64,
    pub life_years: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StrategyRun {
    pub outcome: Outcome,
    pub trace: Option<Trace>,
    pub paths: Option<Vec<TreePath>>,
}

/// Reusable evaluation state.
#[derive(Debug)]
pub struct Evaluator {
    slots: Vec<f64>,
    matrix: Vec<f64>,
    prev: Vec<f64>,
    next: Vec<f64>,
    cost: Vec<f64>,
    util: Vec<f64>,
    outc: Vec<f64>,
    tcost: Vec<f64>,
    tqaly: Vec<f64>,
    toutc: Vec<f64>,
    first_vals: Vec<f64>,
    /// Scratch stack for expression evaluation.
    stack: Vec<f64>,
    /// Values of the dynamic expressions in the previous cycle.
    dyn_prev: Vec<f64>,
    /// Discount factors by cycle (index t, 1..=n) for costs and effects, and
    /// by trace point (index k) for Simpson's rule; computed once because
    /// `powf` would otherwise dominate the PSA inner loop.
    disc_cost: Vec<f64>,
    disc_effect: Vec<f64>,
    point_cost: Vec<f64>,
    point_effect: Vec<f64>,
}

impl Evaluator {
    pub fn new(model: &Model) -> Self {
        let n = model.markov().map(|m| m.states.len()).unwrap_or(0);
        let no = model.outcomes.len();
        let nt = model.markov().map(|m| m.on_transition.len()).unwrap_or(0);
        Evaluator {
            slots: vec![0.0; model.n_slots()],
            matrix: vec![0.0; n * n],
            prev: vec![0.0; n],
            next: vec![0.0; n],
            cost: vec![0.0; n],
            util: vec![0.0; n],
            outc: vec![0.0; n * no],
            tcost: vec![0.0; nt],
            tqaly: vec![0.0; nt],
            toutc: vec![0.0; nt * no],
            first_vals: Vec::new(),
            dyn_prev: Vec::new(),
            stack: Vec::with_capacity(32),
            disc_cost: discount_table(model, model.settings.discount_costs, false),
            disc_effect: discount_table(model, model.settings.discount_effects, false),
            point_cost: discount_table(model, model.settings.discount_costs, true),
            point_effect: discount_table(model, model.settings.discount_effects, true),
        }
    }

    /// Evaluates every strategy with parameter values `params`.
    pub fn run_all(
        &mut self,
        model: &Model,
        params: &[f64],
        detail: bool,
    ) -> Result<Vec<StrategyRun>> {
        (0..model.strategies.len())
            .map(|s| self.run(model, s, params, detail))
            .collect()
    }

    /// Evaluates strategy `s`; `detail` asks for the trace / tree paths.
    pub fn run(
        &mut self,
        model: &Model,
        s: usize,
        params: &[f64],
        detail: bool,
    ) -> Result<StrategyRun> {
        let strategy = &model.strategies[s];
        self.slots[..params.len()].copy_from_slice(params);
        let cs = model.cycle_slot();
        self.slots[cs] = 0.0;
        self.slots[cs + 1] = 0.0;
        for (slot, p) in &strategy.static_exprs {
            self.slots[*slot] = p.eval_in(&self.slots, &model.tables, &mut self.stack);
        }
        match &model.structure {
            Structure::Markov(mk) => self.run_markov(model, mk, strategy, detail),
            Structure::Tree(tr) => {
                // Tree expressions see cycle = 0; dynamic ones are evaluated once.
                for (slot, p) in &strategy.dynamic_exprs {
                    self.slots[*slot] = p.eval_in(&self.slots, &model.tables, &mut self.stack);
                }
                self.run_tree(model, tr, strategy, detail)
            }
        }
    }

    #[inline]
    fn val(&mut self, c: &Compiled, model: &Model) -> f64 {
        c.program
            .eval_in(&self.slots, &model.tables, &mut self.stack)
    }

    /// Evaluation for decision trees, which are small and evaluated through
    /// shared references while rolling back.
    fn tval(&self, c: &Compiled, model: &Model) -> f64 {
        c.program.eval(&self.slots, &model.tables)
    }

    fn fill_matrix(
        &mut self,
        model: &Model,
        mk: &Markov,
        strategy: &Strategy,
        cycle: usize,
    ) -> Result<()> {
        let n = mk.states.len();
        for i in 0..n {
            let mut sum = 0.0;
            let mut comp = None;
            for j in 0..n {
                let v = match &strategy.matrix[i * n + j] {
                    Entry::Zero => 0.0,
                    Entry::Complement => {
                        comp = Some(j);
                        0.0
                    }
                    Entry::Expr(c) => {
                        let v = c
                            .program
                            .eval_in(&self.slots, &model.tables, &mut self.stack);
                        if !(-PROB_TOL..=1.0 + PROB_TOL).contains(&v) {
                            return Err(EconError::Evaluation {
                                strategy: strategy.name.clone(),
                                cycle: Some(cycle),
                                message: format!(
                                    "transition {} -> {} = `{}` evaluates to {v}, outside [0, 1]",
                                    mk.states[i].name, mk.states[j].name, c.text
                                ),
                            });
                        }
                        v
                    }
                };
                self.matrix[i * n + j] = v;
                sum += v;
            }
            match comp {
                Some(j) => {
                    let c = 1.0 - sum;
                    if c < -PROB_TOL {
                        return Err(EconError::Evaluation {
                            strategy: strategy.name.clone(),
                            cycle: Some(cycle),
                            message: format!(
                                "the probabilities leaving `{}` add up to {sum} > 1, so its complement \"C\" would be negative; check that row's expressions and distributions (a Dirichlet group keeps a row consistent)",
                                mk.states[i].name
                            ),
                        });
                    }
                    self.matrix[i * n + j] = c.max(0.0);
                }
                None => {
                    if (sum - 1.0).abs() > 1e-6 {
                        return Err(EconError::Evaluation {
                            strategy: strategy.name.clone(),
                            cycle: Some(cycle),
                            message: format!(
                                "the probabilities leaving `{}` add up to {sum}, not 1; make one entry the complement \"C\" or correct the row",
                                mk.states[i].name
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn fill_values(&mut self, model: &Model, mk: &Markov) {
        let no = model.outcomes.len();
        for (s, st) in mk.states.iter().enumerate() {
            self.cost[s] = self.val(&st.cost, model);
            self.util[s] = self.val(&st.utility, model);
            for k in 0..no {
                self.outc[s * no + k] = self.val(&st.outcomes[k], model);
            }
        }
        for (t, tp) in mk.on_transition.iter().enumerate() {
            self.tcost[t] = self.val(&tp.cost, model);
            self.tqaly[t] = self.val(&tp.qaly, model);
            for k in 0..no {
                self.toutc[t * no + k] = self.val(&tp.outcomes[k], model);
            }
        }
    }

    fn run_markov(
        &mut self,
        model: &Model,
        mk: &Markov,
        strategy: &Strategy,
        detail: bool,
    ) -> Result<StrategyRun> {
        let set = &model.settings;
        let n = mk.states.len();
        let no = model.outcomes.len();
        let len = set.cycle_length;
        let cs = model.cycle_slot();

        self.prev.copy_from_slice(&mk.initial);
        let mut out = Outcome {
            outcomes: vec![0.0; no],
            ..Default::default()
        };
        let mut trace = detail.then(|| Trace {
            membership: vec![mk.initial.clone()],
            ..Default::default()
        });

        self.dyn_prev.clear();
        self.dyn_prev.resize(strategy.dynamic_exprs.len(), f64::NAN);
        let simpson = set.counting == Counting::Simpson;
        let (wp, wn) = match set.counting {
            Counting::Beginning => (1.0, 0.0),
            Counting::End => (0.0, 1.0),
            Counting::HalfCycle => (0.5, 0.5),
            Counting::Simpson => (0.0, 0.0),
        };

        for t in 1..=set.cycles {
            self.slots[cs] = t as f64;
            self.slots[cs + 1] = t as f64 * len;
            // Most time-dependent expressions settle after a few cycles
            // (`if(cycle <= 2, rr, 1)`); matrices and values that read cycle
            // only through them are recomputed only when one changed.
            let mut changed = false;
            for (k, (slot, p)) in strategy.dynamic_exprs.iter().enumerate() {
                let v = p.eval_in(&self.slots, &model.tables, &mut self.stack);
                self.slots[*slot] = v;
                if v.to_bits() != self.dyn_prev[k].to_bits() {
                    changed = true;
                    self.dyn_prev[k] = v;
                }
            }
            if t == 1 || (strategy.matrix_dynamic && (changed || strategy.matrix_reads_time)) {
                self.fill_matrix(model, mk, strategy, t)?;
            }
            if t == 1 || (strategy.values_dynamic && (changed || strategy.values_read_time)) {
                self.fill_values(model, mk);
            }
            // next = prev · P
            for j in 0..n {
                self.next[j] = 0.0;
            }
            for i in 0..n {
                let pi = self.prev[i];
                if pi == 0.0 {
                    continue;
                }
                let row = &self.matrix[i * n..(i + 1) * n];
                for (nj, pj) in self.next.iter_mut().zip(row) {
                    *nj += pi * pj;
                }
            }

            let fc = self.disc_cost[t];
            let fe = self.disc_effect[t];
            let out_factor = |k: usize| match model.outcomes[k].discount {
                DiscountKind::None => 1.0,
                DiscountKind::Costs => fc,
                DiscountKind::Effects => fe,
            };

            // Transition payoffs happen once per cycle, whatever the counting.
            let mut c_t = 0.0;
            let mut q_t = 0.0;
            for (k, tp) in mk.on_transition.iter().enumerate() {
                let flow = self.prev[tp.from] * self.matrix[tp.from * n + tp.to];
                c_t += flow * self.tcost[k];
                q_t += flow * self.tqaly[k];
                for o in 0..no {
                    let v = flow * self.toutc[k * no + o];
                    out.outcomes[o] += v * out_factor(o);
                }
            }
            let mut ly_t = 0.0;
            if simpson {
                // Trace point 0 takes the values of cycle 1.
                if t == 1 {
                    self.add_point(model, mk, 0, &mut out, trace.as_mut(), true);
                }
                self.add_point(model, mk, t, &mut out, trace.as_mut(), false);
            } else {
                let mut oc = 0.0;
                let mut oq = 0.0;
                for s in 0..n {
                    let occ = wp * self.prev[s] + wn * self.next[s];
                    if occ == 0.0 {
                        continue;
                    }
                    oc += occ * self.cost[s];
                    oq += occ * self.util[s] * len;
                    if mk.states[s].alive {
                        ly_t += occ * len;
                    }
                    for o in 0..no {
                        let v = occ * self.outc[s * no + o];
                        out.outcomes[o] += v * out_factor(o);
                    }
                }
                c_t += oc;
                q_t += oq;
            }
            out.cost += c_t * fc;
            out.qalys += q_t * fe;
            out.life_years += ly_t * fe;
            out.cost_undiscounted += c_t;
            out.qalys_undiscounted += q_t;
            out.life_years_undiscounted += ly_t;
            if let Some(tr) = trace.as_mut() {
                tr.membership.push(self.next.clone());
                if simpson {
                    // add_point already pushed the state-based parts; add transitions.
                    if let Some(last) = tr.cycle_cost.last_mut() {
                        *last += c_t * fc;
                    }
                    if let Some(last) = tr.cycle_qalys.last_mut() {
                        *last += q_t * fe;
                    }
                } else {
                    tr.cycle_cost.push(c_t * fc);
                    tr.cycle_qalys.push(q_t * fe);
                    tr.cycle_life_years.push(ly_t * fe);
                }
            }
            std::mem::swap(&mut self.prev, &mut self.next);
        }
        Ok(StrategyRun {
            outcome: out,
            trace,
            paths: None,
        })
    }

    /// Simpson's rule: adds the weighted state payoffs of trace point `k`
    /// (membership `prev` when `at_start`, else `next`), discounted at time k·L.
    fn add_point(
        &mut self,
        model: &Model,
        mk: &Markov,
        k: usize,
        out: &mut Outcome,
        trace: Option<&mut Trace>,
        at_start: bool,
    ) {
        let set = &model.settings;
        let n = mk.states.len();
        let no = model.outcomes.len();
        let len = set.cycle_length;
        let last = set.cycles;
        let w = if k == 0 || k == last {
            1.0 / 3.0
        } else if k % 2 == 1 {
            4.0 / 3.0
        } else {
            2.0 / 3.0
        };
        let fc = self.point_cost[k];
        let fe = self.point_effect[k];
        let (mut c, mut q, mut ly) = (0.0, 0.0, 0.0);
        if self.first_vals.len() != no {
            self.first_vals = vec![0.0; no];
        }
        for s in 0..n {
            let occ = if at_start { self.prev[s] } else { self.next[s] };
            if occ == 0.0 {
                continue;
            }
            c += occ * self.cost[s];
            q += occ * self.util[s] * len;
            if mk.states[s].alive {
                ly += occ * len;
            }
            for o in 0..no {
                let f = match model.outcomes[o].discount {
                    DiscountKind::None => 1.0,
                    DiscountKind::Costs => fc,
                    DiscountKind::Effects => fe,
                };
                out.outcomes[o] += w * occ * self.outc[s * no + o] * f;
            }
        }
        out.cost += w * c * fc;
        out.qalys += w * q * fe;
        out.life_years += w * ly * fe;
        out.cost_undiscounted += w * c;
        out.qalys_undiscounted += w * q;
        out.life_years_undiscounted += w * ly;
        if let Some(tr) = trace {
            if at_start {
                // Point 0 is folded into cycle 1's row.
                self.first_vals = vec![w * c * fc, w * q * fe, w * ly * fe];
            } else {
                let (c0, q0, l0) = match self.first_vals.as_slice() {
                    [a, b, d] if k == 1 => (*a, *b, *d),
                    _ => (0.0, 0.0, 0.0),
                };
                tr.cycle_cost.push(w * c * fc + c0);
                tr.cycle_qalys.push(w * q * fe + q0);
                tr.cycle_life_years.push(w * ly * fe + l0);
            }
        }
    }

    fn run_tree(
        &mut self,
        model: &Model,
        tree: &Tree,
        strategy: &Strategy,
        detail: bool,
    ) -> Result<StrategyRun> {
        let mut paths = detail.then(Vec::new);
        let mut prefix = Vec::new();
        let acc = Acc::zero(model.outcomes.len());
        let out = self.roll_back(
            model,
            tree,
            strategy,
            strategy.tree_root,
            acc,
            1.0,
            &mut prefix,
            paths.as_mut(),
        )?;
        Ok(StrategyRun {
            outcome: out,
            trace: None,
            paths,
        })
    }

    fn payoffs(&self, model: &Model, p: &Payoffs) -> Acc {
        Acc {
            cost: self.tval(&p.cost, model),
            qalys: self.tval(&p.qaly, model),
            life_years: self.tval(&p.life_years, model),
            outcomes: p.outcomes.iter().map(|c| self.tval(c, model)).collect(),
        }
    }

    /// Expected payoffs below `node`, given payoffs `acc` accumulated on the
    /// way (so paths can be listed with their totals). Returns the expected
    /// value of the sub-tree including `acc`.
    #[allow(clippy::too_many_arguments)]
    fn roll_back(
        &self,
        model: &Model,
        tree: &Tree,
        strategy: &Strategy,
        node: usize,
        acc: Acc,
        prob: f64,
        prefix: &mut Vec<String>,
        mut paths: Option<&mut Vec<TreePath>>,
    ) -> Result<Outcome> {
        let nd = &tree.nodes[node];
        let acc = acc.plus(&self.payoffs(model, &nd.payoffs));
        prefix.push(nd.id.clone());
        let result = match nd.kind {
            NodeKind::Terminal => {
                if let Some(p) = paths {
                    p.push(TreePath {
                        nodes: prefix.clone(),
                        probability: prob,
                        cost: acc.cost,
                        qalys: acc.qalys,
                        life_years: acc.life_years,
                    });
                }
                acc.to_outcome()
            }
            NodeKind::Chance => {
                let mut probs = Vec::with_capacity(nd.branches.len());
                let mut sum = 0.0;
                let mut comp = None;
                for (bi, b) in nd.branches.iter().enumerate() {
                    let p = match &b.p {
                        Entry::Expr(c) => self.tval(c, model),
                        Entry::Complement => {
                            comp = Some(bi);
                            0.0
                        }
                        Entry::Zero => 0.0,
                    };
                    if !(-PROB_TOL..=1.0 + PROB_TOL).contains(&p) {
                        return Err(EconError::Evaluation {
                            strategy: strategy.name.clone(),
                            cycle: None,
                            message: format!(
                                "node `{}` branch `{}`: probability {p} is outside [0, 1]",
                                nd.id, b.label
                            ),
                        });
                    }
                    sum += p;
                    probs.push(p);
                }
                if let Some(c) = comp {
                    if sum > 1.0 + PROB_TOL {
                        return Err(EconError::Evaluation {
                            strategy: strategy.name.clone(),
                            cycle: None,
                            message: format!(
                                "node `{}`: branch probabilities add up to {sum} > 1, leaving a negative complement",
                                nd.id
                            ),
                        });
                    }
                    probs[c] = (1.0 - sum).max(0.0);
                } else if (sum - 1.0).abs() > 1e-6 {
                    return Err(EconError::Evaluation {
                        strategy: strategy.name.clone(),
                        cycle: None,
                        message: format!(
                            "node `{}`: branch probabilities add up to {sum}, not 1; make one branch \"C\"",
                            nd.id
                        ),
                    });
                }
                let mut total = Outcome {
                    outcomes: vec![0.0; model.outcomes.len()],
                    ..Default::default()
                };
                for (b, p) in nd.branches.iter().zip(probs) {
                    let bacc = acc.plus(&self.payoffs(model, &b.payoffs));
                    let sub = self.roll_back(
                        model,
                        tree,
                        strategy,
                        b.to,
                        bacc,
                        prob * p,
                        prefix,
                        paths.as_deref_mut(),
                    )?;
                    total.add_scaled(&sub, p);
                }
                total
            }
            NodeKind::Decision => {
                // A nested decision is taken at the model's willingness to pay:
                // the branch with the highest net monetary benefit.
                let mut best: Option<(f64, Outcome, Vec<TreePath>)> = None;
                for b in &nd.branches {
                    let bacc = acc.plus(&self.payoffs(model, &b.payoffs));
                    let mut sub_paths = paths.is_some().then(Vec::new);
                    let sub = self.roll_back(
                        model,
                        tree,
                        strategy,
                        b.to,
                        bacc,
                        prob,
                        prefix,
                        sub_paths.as_mut(),
                    )?;
                    let nmb = model.settings.wtp * sub.effect(model.meta.effect) - sub.cost;
                    if best.as_ref().is_none_or(|(v, _, _)| nmb > *v) {
                        best = Some((nmb, sub, sub_paths.unwrap_or_default()));
                    }
                }
                let (_, o, bp) = best.expect("decision node has branches");
                if let Some(p) = paths {
                    p.extend(bp);
                }
                o
            }
        };
        prefix.pop();
        Ok(result)
    }
}

#[derive(Debug, Clone)]
struct Acc {
    cost: f64,
    qalys: f64,
    life_years: f64,
    outcomes: Vec<f64>,
}

impl Acc {
    fn zero(n: usize) -> Self {
        Acc {
            cost: 0.0,
            qalys: 0.0,
            life_years: 0.0,
            outcomes: vec![0.0; n],
        }
    }
    fn plus(&self, o: &Acc) -> Acc {
        Acc {
            cost: self.cost + o.cost,
            qalys: self.qalys + o.qalys,
            life_years: self.life_years + o.life_years,
            outcomes: self
                .outcomes
                .iter()
                .zip(&o.outcomes)
                .map(|(a, b)| a + b)
                .collect(),
        }
    }
    fn to_outcome(&self) -> Outcome {
        // Decision trees are short-horizon: no discounting, so discounted and
        // undiscounted totals coincide.
        Outcome {
            cost: self.cost,
            qalys: self.qalys,
            life_years: self.life_years,
            cost_undiscounted: self.cost,
            qalys_undiscounted: self.qalys,
            life_years_undiscounted: self.life_years,
            outcomes: self.outcomes.clone(),
        }
    }
}

impl Outcome {
    fn add_scaled(&mut self, o: &Outcome, w: f64) {
        self.cost += w * o.cost;
        self.qalys += w * o.qalys;
        self.life_years += w * o.life_years;
        self.cost_undiscounted += w * o.cost_undiscounted;
        self.qalys_undiscounted += w * o.qalys_undiscounted;
        self.life_years_undiscounted += w * o.life_years_undiscounted;
        for (a, b) in self.outcomes.iter_mut().zip(&o.outcomes) {
            *a += w * b;
        }
    }
}

pub(crate) fn discount_table(model: &Model, rate: f64, by_point: bool) -> Vec<f64> {
    let s = &model.settings;
    (0..=s.cycles)
        .map(|t| {
            let x = if by_point {
                t as f64 * s.cycle_length
            } else {
                s.discount_timing.exponent(t, s.cycle_length)
            };
            (1.0 + rate).powf(-x)
        })
        .collect()
}

/// Convenience: base-case runs with traces / paths.
pub fn base_case(model: &Model) -> Result<Vec<StrategyRun>> {
    let mut ev = Evaluator::new(model);
    ev.run_all(model, &model.base_values(), true)
}
