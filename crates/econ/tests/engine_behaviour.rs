//! Behaviour of the engine on small models whose answers are known in closed
//! form: counting conventions, discounting, transition payoffs, errors,
//! PSA determinism, measurements and the written report.

use medledger_econ::engine;
use medledger_econ::model::Model;
use medledger_econ::{AnalysisOptions, EconError, report, run_analysis};

/// Two states, 10% die each cycle, utility 1, 4 cycles: alive trace
/// 1, .9, .81, .729, .6561.
fn two_state(counting: &str, extra: &str) -> Model {
    let text = format!(
        r#"
[model]
title = "two-state"
kind = "markov"
[settings]
cycles = 4
counting = "{counting}"
{extra}
[parameters]
p = {{ value = 0.1, range = [0.05, 0.2], dist = {{ type = "beta", mean = 0.1, sd = 0.02 }} }}
[markov]
states = ["alive", "dead"]
initial = [1, 0]
transitions = [["C", "p"], [0, 1]]
[markov.state.alive]
cost = 100
[markov.state.dead]
alive = false
[[markov.on_transition]]
from = "alive"
to = "dead"
cost = 1000
[[strategy]]
name = "only"
"#
    );
    Model::from_toml(&text).unwrap_or_else(|e| panic!("{e}"))
}

fn ly(m: &Model) -> f64 {
    engine::base_case(m).unwrap()[0].outcome.life_years
}

#[test]
fn counting_conventions_match_closed_forms() {
    let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    close(ly(&two_state("beginning", "")), 1.0 + 0.9 + 0.81 + 0.729);
    close(ly(&two_state("end", "")), 0.9 + 0.81 + 0.729 + 0.6561);
    close(ly(&two_state("half-cycle", "")), (3.439 + 3.0951) / 2.0);
    close(ly(&two_state("life-table", "")), (3.439 + 3.0951) / 2.0);
    close(
        ly(&two_state("simpson", "")),
        (1.0 + 4.0 * 0.9 + 2.0 * 0.81 + 4.0 * 0.729 + 0.6561) / 3.0,
    );
}

#[test]
fn discount_timing_and_separate_rates() {
    let m = two_state(
        "end",
        "discount_costs = 0.05\ndiscount_effects = 0.0\ndiscount_timing = \"end\"",
    );
    let r = engine::base_case(&m).unwrap();
    let trace = [0.9, 0.81, 0.729, 0.6561];
    let deaths = [0.1, 0.09, 0.081, 0.0729];
    let cost: f64 = (0..4)
        .map(|t| (100.0 * trace[t] + 1000.0 * deaths[t]) / 1.05f64.powi(t as i32 + 1))
        .sum();
    assert!((r[0].outcome.cost - cost).abs() < 1e-9);
    assert!(
        (r[0].outcome.life_years - 3.0951).abs() < 1e-12,
        "effects are not discounted"
    );
    let m = two_state("end", "discount_costs = 0.05\ndiscount_timing = \"start\"");
    let r = engine::base_case(&m).unwrap();
    let cost: f64 = (0..4)
        .map(|t| (100.0 * trace[t] + 1000.0 * deaths[t]) / 1.05f64.powi(t as i32))
        .sum();
    assert!((r[0].outcome.cost - cost).abs() < 1e-9);
    assert!((r[0].outcome.cost_undiscounted - (100.0 * 3.0951 + 1000.0 * 0.3439)).abs() < 1e-9);
}

#[test]
fn cycle_length_scales_qalys_not_costs() {
    let m = two_state("end", "cycle_length = 0.5");
    let r = engine::base_case(&m).unwrap();
    assert!((r[0].outcome.qalys - 0.5 * 3.0951).abs() < 1e-12);
    assert!((r[0].outcome.life_years - 0.5 * 3.0951).abs() < 1e-12);
    assert!((r[0].outcome.cost - (100.0 * 3.0951 + 1000.0 * 0.3439)).abs() < 1e-9);
}

#[test]
fn simpson_needs_an_even_number_of_cycles() {
    let text = r#"
[model]
title = "x"
kind = "markov"
[settings]
cycles = 3
counting = "simpson"
[markov]
states = ["a"]
initial = [1]
transitions = [[1]]
[[strategy]]
name = "s"
"#;
    let e = Model::from_toml(text).unwrap_err().to_string();
    assert!(e.contains("even number of cycles"), "{e}");
}

#[test]
fn errors_name_the_line_and_the_fix() {
    let text = "[model]\ntitle = \"x\"\nkind = \"markov\"\n[settings]\ncycles = 2\n[markov]\nstates = [\"a\", \"b\"]\ninitial = [1, 0]\ntransitions = [[\"C\", \"p_ab\"], [0, 1]]\n[[strategy]]\nname = \"s\"\n";
    let e = Model::from_toml_named(text, "m.toml")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("m.toml:9:"), "{e}");
    assert!(e.contains("unknown name `p_ab`"), "{e}");

    let e = Model::from_toml_named("[model]\ntitle = \"x\"\nkind = \"markow\"\n", "m.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m.toml:3:") && e.contains("\"markov\" or \"decision-tree\""),
        "{e}"
    );

    let e = Model::from_toml_named("[model]\ntitle = 1\n", "m.toml")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("m.toml:2:"), "{e}");

    // A row that does not sum to one, without a complement.
    let text = "[model]\ntitle = \"x\"\nkind = \"markov\"\n[settings]\ncycles = 2\n[markov]\nstates = [\"a\", \"b\"]\ninitial = [1, 0]\ntransitions = [[0.5, 0.4], [0, 1]]\n[[strategy]]\nname = \"s\"\n";
    let m = Model::from_toml(text).unwrap();
    let e = engine::base_case(&m).unwrap_err();
    assert!(
        matches!(e, EconError::Evaluation { cycle: Some(1), .. }),
        "{e}"
    );
    assert!(e.to_string().contains("add up to 0.9"), "{e}");

    // Expressions that refer to each other in a circle.
    let text = "[model]\ntitle = \"x\"\nkind = \"markov\"\n[settings]\ncycles = 2\n[expressions]\na = \"b + 1\"\nb = \"a * 2\"\n[markov]\nstates = [\"s\"]\ninitial = [1]\ntransitions = [[1]]\n[[strategy]]\nname = \"s\"\n";
    let e = Model::from_toml(text).unwrap_err().to_string();
    assert!(e.contains("circle") && e.contains("a -> b -> a"), "{e}");

    // A strategy may only override expressions.
    let text = "[model]\ntitle = \"x\"\nkind = \"markov\"\n[settings]\ncycles = 2\n[parameters]\nq = 1\n[markov]\nstates = [\"s\"]\ninitial = [1]\ntransitions = [[1]]\n[[strategy]]\nname = \"s\"\nset = { q = 2 }\n";
    let e = Model::from_toml(text).unwrap_err().to_string();
    assert!(e.contains("`q` is a parameter"), "{e}");
}

#[test]
fn complement_going_negative_is_reported_with_the_state() {
    let text = "[model]\ntitle = \"x\"\nkind = \"markov\"\n[settings]\ncycles = 3\n[markov]\nstates = [\"a\", \"b\", \"c\"]\ninitial = [1, 0, 0]\ntransitions = [[\"C\", \"0.1 * cycle\", \"0.5\"], [0, 1, 0], [0, 0, 1]]\n[[strategy]]\nname = \"s\"\n";
    // 0.1*t + 0.5 exceeds one only at t = 6; with 3 cycles all is well.
    let m = Model::from_toml(text).unwrap();
    assert!(engine::base_case(&m).is_ok());
    let m = Model::from_toml(&text.replace("cycles = 3", "cycles = 6")).unwrap();
    let e = engine::base_case(&m).unwrap_err().to_string();
    assert!(e.contains("cycle 6") && e.contains("leaving `a`"), "{e}");
}

#[test]
fn psa_is_deterministic_given_the_seed_and_independent_of_threads() {
    let m = two_state("half-cycle", "seed = 7");
    let a = medledger_econ::psa::run(&m, 500, 7, &|_| {}).unwrap();
    let b = medledger_econ::psa::run(&m, 500, 7, &|_| {}).unwrap();
    assert_eq!(a.cost, b.cost);
    assert_eq!(a.samples, b.samples);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let c = pool.install(|| medledger_econ::psa::run(&m, 500, 7, &|_| {}).unwrap());
    assert_eq!(
        a.cost, c.cost,
        "single-threaded PSA must equal the parallel one"
    );
    let d = medledger_econ::psa::run(&m, 500, 8, &|_| {}).unwrap();
    assert_ne!(a.cost, d.cost);
    // The sampled probability has the distribution's mean.
    let mean: f64 = a.samples.iter().map(|s| s[0]).sum::<f64>() / 500.0;
    assert!((mean - 0.1).abs() < 0.004, "{mean}");
}

#[test]
fn ceac_probabilities_sum_to_one_and_evpi_is_zero_without_choice_uncertainty() {
    let m = Model::from_path(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/examples/hiv-briggs-2-5.toml"),
    )
    .unwrap();
    let p = medledger_econ::psa::run(&m, 400, 1, &|_| {}).unwrap();
    for pt in &p.ceac {
        let s: f64 = pt.probability.iter().sum();
        assert!((s - 1.0).abs() < 1e-12);
        assert!(pt.evpi >= 0.0);
    }
    // Where the frontier strategy wins every iteration, information has no value.
    for pt in p.ceac.iter().filter(|pt| pt.frontier_probability == 1.0) {
        assert_eq!(pt.evpi, 0.0, "{pt:?}");
    }
    // At WTP 0 the cheaper monotherapy (nearly) always wins: almost no decision
    // uncertainty (combination is cheaper only with extreme AIDS-state costs).
    assert_eq!(p.ceac[0].wtp, 0.0);
    assert_eq!(p.ceac[0].frontier, 0);
    assert!(p.ceac[0].probability[0] > 0.99, "{:?}", p.ceac[0]);
    assert!(p.ceac[0].evpi < 10.0, "{:?}", p.ceac[0]);
    assert!(p.ceac.iter().any(|pt| pt.frontier_probability == 1.0));
    // Near the ICER (about 6,276) the choice is uncertain and information has value.
    let mid = p.ceac.iter().find(|c| c.wtp == 6000.0).unwrap();
    assert!(
        mid.evpi > 0.0 && mid.probability[1] > 0.05 && mid.probability[1] < 0.95,
        "{mid:?}"
    );
}

#[test]
fn one_way_analysis_orders_by_swing_and_full_report_is_written() {
    let m = Model::from_path(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/examples/hiv-briggs-2-5.toml"),
    )
    .unwrap();
    let opts = AnalysisOptions {
        psa_iterations: Some(200),
        ..Default::default()
    };
    let a = run_analysis(&m, &opts, &|_| {}).unwrap();
    let o = a.owsa.as_ref().unwrap();
    assert!(o.rows.windows(2).all(|w| w[0].swing() >= w[1].swing()));
    // The treatment effect moves the ICER most: lower RR = more effective = lower ICER.
    assert_eq!(o.rows[0].parameter, "rr");
    assert!(o.rows[0].icer_low.unwrap() < o.base_icer.unwrap());

    let dir = std::env::temp_dir().join(format!("medledger-econ-report-{}", std::process::id()));
    let files = report::write_report(&m, &a, &dir).unwrap();
    let html = std::fs::read_to_string(&files.html).unwrap();
    assert!(html.contains("CHEERS 2022 checklist"));
    assert!(html.contains("<svg"), "plots are embedded");
    assert!(html.contains("6,276"), "the ICER appears in the report");
    let cheers_rows = html.matches("<tr><td>").count();
    assert!(cheers_rows >= 28);
    for f in [
        "results.json",
        "icer.csv",
        "psa_samples.csv",
        "ceac_evpi.csv",
        "tornado.svg",
        "ce_plane.svg",
        "ceac.svg",
        "trace_mono.svg",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["results"]["icer"][1]["name"], "comb");
    let psa_csv = std::fs::read_to_string(dir.join("psa_samples.csv")).unwrap();
    assert_eq!(psa_csv.lines().count(), 201);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn measurements_override_mapped_parameters() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/medledger-lung-screening.toml");
    let mut m = Model::from_path(&path).unwrap();
    let before = m.params[m.param_index("storage_bytes_per_study").unwrap()].base;
    let file = std::env::temp_dir().join(format!("medledger-measure-{}.json", std::process::id()));
    std::fs::write(&file, r#"{"storage_bytes_per_study": 98000000, "retrieval": {"unused": 1}, "retrieval_seconds": 4.5}"#).unwrap();
    let applied = m.apply_measurements(&file).unwrap();
    assert_eq!(applied.len(), 2);
    let k = m.param_index("storage_bytes_per_study").unwrap();
    assert_eq!(m.params[k].base, 98e6);
    assert_ne!(before, 98e6);
    // The one-way range moves with the measured value.
    let (lo, hi) = m.params[k].range.unwrap();
    assert!((lo - 50e6 * 98e6 / 150e6).abs() < 1.0 && (hi - 300e6 * 98e6 / 150e6).abs() < 1.0);
    std::fs::write(&file, r#"{"something_else": 1}"#).unwrap();
    let e = m.apply_measurements(&file).unwrap_err().to_string();
    assert!(e.contains("none of the keys"), "{e}");
    std::fs::remove_file(&file).ok();
}

#[test]
fn medledger_model_runs_with_both_perspectives() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/medledger-lung-screening.toml");
    let m = Model::from_path(&path).unwrap();
    let a = run_analysis(
        &m,
        &AnalysisOptions {
            skip_psa: true,
            ..Default::default()
        },
        &|_| {},
    )
    .unwrap();
    let names: Vec<&str> = a.scenarios.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"health_system") && names.contains(&"societal"));
    let hs = &a.scenarios[0];
    let so = &a.scenarios[1];
    // Patient time only counts in the societal perspective, and current
    // practice uses more of it.
    let gap = |s: &medledger_econ::analysis::ScenarioResult| {
        s.strategies[0].outcome.cost - s.strategies[1].outcome.cost
    };
    assert!(gap(so) > gap(hs));
    // Sharing reduces repeat scans, radiation and clinician time.
    let idx = |n: &str| m.outcomes.iter().position(|o| o.name == n).unwrap();
    let cur = &a.strategies[0].outcome.outcomes;
    let led = &a.strategies[1].outcome.outcomes;
    for o in [
        "repeat_scans",
        "radiation_msv",
        "clinician_minutes",
        "delay_days",
    ] {
        assert!(
            led[idx(o)] < cur[idx(o)],
            "{o}: ledger {} vs current {}",
            led[idx(o)],
            cur[idx(o)]
        );
    }
    assert_eq!(
        cur[idx("exchanges")],
        led[idx("exchanges")],
        "the same exchanges are needed either way"
    );
}
