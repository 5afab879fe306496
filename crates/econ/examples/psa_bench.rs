//! Times the probabilistic sensitivity analysis of a model file; used by
//! `scripts/bench-cea`. Prints one JSON line.
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
    let mut best = f64::INFINITY;
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let r = psa::run(&model, iterations, model.settings.seed, &|_| {}).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1);
        });
        best = best.min(t.elapsed().as_secs_f64());
        if std::env::var_os("PSA_BENCH_TRACE").is_some() {
            eprint!("{:.2} ", t.elapsed().as_secs_f64() * 1e3);
        }
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
        "{{\"iterations\": {iterations}, \"threads\": {}, \"seconds\": {best:.6}, \"mean_cost\": [{}], \"mean_effect\": [{}]}}",
        rayon::current_num_threads(),
        means(&r.cost_summary),
        means(&r.effect_summary)
    );
}
