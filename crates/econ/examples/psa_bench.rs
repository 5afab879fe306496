//! Times the probabilistic sensitivity analysis of a model file; used by
//! `scripts/bench-cea`. Prints one JSON line: `seconds` for the draws and
//! cohort runs alone (what the numpy script computes), `full_seconds` for the
//! whole PSA with its CEACs, EVPI and summaries.
//!
//! Usage: psa_bench MODEL [ITERATIONS] [REPEAT]

use std::time::Instant;

use medledger_econ::{Model, psa};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: psa_bench MODEL [ITERATIONS] [REPEAT]");
        std::process::exit(2);
    };
    let iterations: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let repeat: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let model = match Model::from_path(std::path::Path::new(path)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    // Warm up for half a second first, as criterion does: on a shared or
    // virtual machine the first runs also pay for waking idle cores and
    // raising their clock, which says nothing about the code.
    let warm = Instant::now();
    while warm.elapsed().as_secs_f64() < 0.5 {
        let _ = psa::run(&model, iterations, model.settings.seed, &|_| {});
    }
    let fail = |e: medledger_econ::EconError| -> ! {
        eprintln!("{e}");
        std::process::exit(1);
    };
    // The draws and cohort runs alone (the work of the numpy script), and the
    // whole PSA with its CEACs, EVPI and summaries, each the best of `repeat`.
    let mut best_sim = f64::INFINITY;
    let mut best_full = f64::INFINITY;
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let sim = psa::simulate(&model, iterations, model.settings.seed, &|_| {})
            .unwrap_or_else(|e| fail(e));
        best_sim = best_sim.min(t.elapsed().as_secs_f64());
        drop(sim);
        let t = Instant::now();
        let r =
            psa::run(&model, iterations, model.settings.seed, &|_| {}).unwrap_or_else(|e| fail(e));
        best_full = best_full.min(t.elapsed().as_secs_f64());
        last = Some(r);
    }
    let r = last.expect("ran at least once");
    let means = |v: &[psa::Summary]| {
        v.iter()
            .map(|s| format!("{:.6}", s.mean))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "{{\"iterations\": {iterations}, \"threads\": {}, \"seconds\": {best_sim:.6}, \"full_seconds\": {best_full:.6}, \"mean_cost\": [{}], \"mean_effect\": [{}]}}",
        rayon::current_num_threads(),
        means(&r.cost_summary),
        means(&r.effect_summary)
    );
}
