//! Incremental analysis: strong and extended dominance, the efficient
//! frontier and ICERs, and net monetary / health benefit.
//!
//! The procedure is the textbook one (Drummond et al., Methods for the
//! Economic Evaluation of Health Care Programmes, 4th ed., ch. 4; as in
//! dampack's `calculate_icers`): remove strongly dominated strategies (costlier
//! and no more effective than another), then repeatedly remove the strategy
//! whose ICER exceeds that of the next more effective one (extended dominance),
//! and report ICERs along the remaining frontier.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Status {
    /// Non-dominated: on the efficient frontier.
    #[serde(rename = "ND")]
    NonDominated,
    /// Strongly dominated.
    #[serde(rename = "D")]
    Dominated,
    /// Extendedly (weakly) dominated.
    #[serde(rename = "ED")]
    ExtendedlyDominated,
}

impl Status {
    pub fn code(&self) -> &'static str {
        match self {
            Status::NonDominated => "ND",
            Status::Dominated => "D",
            Status::ExtendedlyDominated => "ED",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct IcerRow {
    /// Index of the strategy in the input.
    pub strategy: usize,
    pub name: String,
    pub cost: f64,
    pub effect: f64,
    pub status: Status,
    /// Frontier strategy this one is compared with (the next less effective
    /// non-dominated strategy).
    pub compared_to: Option<usize>,
    pub inc_cost: Option<f64>,
    pub inc_effect: Option<f64>,
    pub icer: Option<f64>,
    /// For dominated strategies: who dominates them (one strategy for D, the
    /// two frontier neighbours for ED).
    pub dominated_by: Vec<usize>,
}

/// Runs the incremental analysis. Rows come back as dampack orders them:
/// frontier strategies by increasing cost, then extendedly dominated, then
/// strongly dominated ones, each group by increasing cost.
pub fn incremental(names: &[String], cost: &[f64], effect: &[f64]) -> Vec<IcerRow> {
    let n = names.len();
    assert!(
        cost.len() == n && effect.len() == n,
        "one cost and one effect per strategy"
    );
    let mut status = vec![Status::NonDominated; n];
    let mut dom_by: Vec<Vec<usize>> = vec![Vec::new(); n];

    // Strong dominance (identical strategies: the first declared is kept).
    for i in 0..n {
        for j in 0..n {
            if i == j {
                continue;
            }
            let same = cost[j] == cost[i] && effect[j] == effect[i];
            let dominates = cost[j] <= cost[i]
                && effect[j] >= effect[i]
                && (cost[j] < cost[i] || effect[j] > effect[i]);
            if dominates || (same && j < i) {
                status[i] = Status::Dominated;
                dom_by[i] = vec![j];
                break;
            }
        }
    }

    // Extended dominance on the rest, ordered by effect.
    let mut front: Vec<usize> = (0..n)
        .filter(|&i| status[i] == Status::NonDominated)
        .collect();
    front.sort_by(|&a, &b| {
        effect[a]
            .total_cmp(&effect[b])
            .then(cost[a].total_cmp(&cost[b]))
    });
    loop {
        let mut removed = false;
        if front.len() >= 3 {
            for k in 1..front.len() - 1 {
                let (a, b, c) = (front[k - 1], front[k], front[k + 1]);
                let icer_b = (cost[b] - cost[a]) / (effect[b] - effect[a]);
                let icer_c = (cost[c] - cost[b]) / (effect[c] - effect[b]);
                if icer_b > icer_c {
                    status[b] = Status::ExtendedlyDominated;
                    dom_by[b] = vec![a, c];
                    front.remove(k);
                    removed = true;
                    break;
                }
            }
        }
        if !removed {
            break;
        }
    }

    let mut rows: Vec<IcerRow> = Vec::with_capacity(n);
    for (k, &i) in front.iter().enumerate() {
        let prev = (k > 0).then(|| front[k - 1]);
        let (ic, ie, icer) = match prev {
            Some(p) => {
                let dc = cost[i] - cost[p];
                let de = effect[i] - effect[p];
                (Some(dc), Some(de), Some(dc / de))
            }
            None => (None, None, None),
        };
        rows.push(IcerRow {
            strategy: i,
            name: names[i].clone(),
            cost: cost[i],
            effect: effect[i],
            status: Status::NonDominated,
            compared_to: prev,
            inc_cost: ic,
            inc_effect: ie,
            icer,
            dominated_by: Vec::new(),
        });
    }
    for st in [Status::ExtendedlyDominated, Status::Dominated] {
        let mut group: Vec<usize> = (0..n).filter(|&i| status[i] == st).collect();
        group.sort_by(|&a, &b| cost[a].total_cmp(&cost[b]));
        for i in group {
            rows.push(IcerRow {
                strategy: i,
                name: names[i].clone(),
                cost: cost[i],
                effect: effect[i],
                status: st,
                compared_to: None,
                inc_cost: None,
                inc_effect: None,
                icer: None,
                dominated_by: dom_by[i].clone(),
            });
        }
    }
    rows
}

/// Net monetary benefit at willingness to pay `wtp`.
pub fn nmb(cost: f64, effect: f64, wtp: f64) -> f64 {
    wtp * effect - cost
}

/// Net health benefit at willingness to pay `wtp` (effect units); undefined
/// (infinite) at a zero threshold.
pub fn nhb(cost: f64, effect: f64, wtp: f64) -> f64 {
    effect - cost / wtp
}

/// Index of the strategy with the highest NMB; ties go to the cheaper, then
/// the first declared, so the choice is stable.
pub fn best_by_nmb(cost: &[f64], effect: &[f64], wtp: f64) -> usize {
    let mut best = 0;
    for i in 1..cost.len() {
        let (a, b) = (
            nmb(cost[i], effect[i], wtp),
            nmb(cost[best], effect[best], wtp),
        );
        if a > b || (a == b && cost[i] < cost[best]) {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn single_strategy_has_no_icer() {
        let r = incremental(&names(&["s"]), &[1.0], &[2.0]);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].status, Status::NonDominated);
        assert!(r[0].icer.is_none());
    }

    #[test]
    fn cheaper_and_better_dominates() {
        let r = incremental(&names(&["a", "b"]), &[100.0, 90.0], &[1.0, 2.0]);
        assert_eq!(r[0].name, "b");
        assert_eq!(r[1].status, Status::Dominated);
        assert_eq!(r[1].dominated_by, vec![1]);
    }

    #[test]
    fn nmb_and_nhb() {
        assert_eq!(nmb(1000.0, 0.5, 20000.0), 9000.0);
        assert!((nhb(1000.0, 0.5, 20000.0) - 0.45).abs() < 1e-15);
        assert_eq!(best_by_nmb(&[0.0, 1000.0], &[0.0, 0.04], 20000.0), 0);
        assert_eq!(best_by_nmb(&[0.0, 1000.0], &[0.0, 0.06], 20000.0), 1);
    }
}
