//! `medledger cea`: cost-effectiveness analysis from a model file.
//!
//! Thin glue: argument parsing, the PSA progress bar and messages. Every
//! computation and file format lives in the `medledger-econ` crate.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use medledger_econ::raster::Rasteriser;
use medledger_econ::{AnalysisOptions, Model, engine, psa, report};
use rayon::prelude::*;

/// PNG plots are rendered at twice the SVG size, sharp on high-density screens.
const PNG_SCALE: f32 = 2.0;

#[derive(clap::Subcommand, Debug)]
pub enum CeaCommand {
    /// Run the base case, incremental analysis, sensitivity analyses and PSA
    /// of a model file and write the report (HTML, JSON, CSV, SVG and PNG plots).
    Run {
        /// Model file (TOML; see docs/cea-model-format.md).
        model: PathBuf,
        /// Output directory [default: cea-report/<model name>].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Measurements written by medledger's benchmarks (JSON); sets the
        /// parameters the model maps under [measurements].
        #[arg(long)]
        measurements: Option<PathBuf>,
        /// PSA seed [default: the model's settings.seed].
        #[arg(long)]
        seed: Option<u64>,
        /// PSA iterations [default: the model's settings.psa_iterations].
        #[arg(long)]
        psa_iterations: Option<usize>,
        /// Skip the probabilistic sensitivity analysis.
        #[arg(long)]
        no_psa: bool,
    },
    /// Check a model file and print its base-case results.
    Validate {
        /// Model file (TOML).
        model: PathBuf,
    },
    /// Time a probabilistic sensitivity analysis of a model file.
    Bench {
        /// Model file (TOML).
        model: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        iterations: usize,
        #[arg(long)]
        seed: Option<u64>,
        /// Repetitions; the fastest is reported.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
}

pub fn run(cmd: CeaCommand) -> Result<()> {
    match cmd {
        CeaCommand::Run {
            model,
            out,
            measurements,
            seed,
            psa_iterations,
            no_psa,
        } => {
            let mut m = load(&model)?;
            let applied = match &measurements {
                Some(p) => m.apply_measurements(p)?,
                None => Vec::new(),
            };
            for (key, param, value) in &applied {
                println!("measurement {key} -> {param} = {value}");
            }
            let out = out.unwrap_or_else(|| {
                let stem = model
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".into());
                PathBuf::from("cea-report").join(stem)
            });
            let iterations = psa_iterations.unwrap_or(m.settings.psa_iterations);
            let will_psa = !no_psa && !psa::sampled_params(&m).is_empty();
            let bar = if will_psa {
                ProgressBar::new(iterations as u64)
            } else {
                ProgressBar::hidden()
            };
            bar.set_style(
                ProgressStyle::with_template(
                    "PSA {bar:40.cyan/blue} {pos}/{len} iterations ({eta} left)",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            let opts = AnalysisOptions {
                psa_iterations,
                seed,
                skip_psa: no_psa,
                skip_owsa: false,
            };
            let mut analysis =
                medledger_econ::run_analysis(&m, &opts, &|done| bar.set_position(done as u64))
                    .with_context(|| format!("analysing {}", model.display()))?;
            bar.finish_and_clear();
            analysis.measurements = applied;
            let files = report::write_report(&m, &analysis, &out)?;
            let pngs = write_pngs(&files.plots)?;
            print_summary(&m, &analysis);
            println!("report: {}", files.html.display());
            println!(
                "{} files written to {}",
                files.files.len() + pngs.len(),
                files.dir.display()
            );
            Ok(())
        }
        CeaCommand::Validate { model } => {
            let m = load(&model)?;
            let runs =
                engine::base_case(&m).with_context(|| format!("evaluating {}", model.display()))?;
            let outcomes: Vec<_> = runs.into_iter().map(|r| r.outcome).collect();
            let strategies = medledger_econ::analysis::summarise(&m, &outcomes);
            let icer = medledger_econ::analysis::icer_table(&m, &strategies);
            println!(
                "{}: {} strategies, {} parameters ({} with ranges, {} sampled in PSA)",
                m.meta.title,
                m.strategies.len(),
                m.params.len(),
                m.params.iter().filter(|p| p.range.is_some()).count(),
                psa::sampled_params(&m).len()
            );
            for r in icer {
                println!(
                    "  {:<24} cost {:>14} {} {:>12}  {:<3} ICER {}",
                    r.name,
                    report::fmt_num(r.cost, 4),
                    m.meta.effect_label,
                    report::fmt_num(r.effect, 6),
                    r.status.code(),
                    r.icer
                        .map(|v| report::fmt_num(v, 2))
                        .unwrap_or_else(|| "-".into())
                );
            }
            Ok(())
        }
        CeaCommand::Bench {
            model,
            iterations,
            seed,
            repeat,
        } => {
            let m = load(&model)?;
            let seed = seed.unwrap_or(m.settings.seed);
            let mut best = f64::INFINITY;
            let mut result = None;
            for _ in 0..repeat.max(1) {
                let t = Instant::now();
                let r = psa::run(&m, iterations, seed, &|_| {})?;
                best = best.min(t.elapsed().as_secs_f64());
                result = Some(r);
            }
            let r = result.expect("at least one repetition");
            println!(
                "{{\"iterations\": {iterations}, \"seconds\": {best:.6}, \"mean_cost\": [{}], \"mean_effect\": [{}]}}",
                r.cost_summary
                    .iter()
                    .map(|s| format!("{:.4}", s.mean))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.effect_summary
                    .iter()
                    .map(|s| format!("{:.6}", s.mean))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
    }
}

/// Writes a PNG beside each SVG plot, rasterised from the SVG file itself.
fn write_pngs(plots: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if plots.is_empty() {
        return Ok(Vec::new());
    }
    let raster = Rasteriser::with_system_fonts();
    if raster.font_family().is_none() {
        eprintln!(
            "warning: no font found on this system, so the PNG plots have no text (the SVG plots and the report are complete); install a font package such as fonts-dejavu-core"
        );
    }
    plots
        .par_iter()
        .map(|svg_path| {
            let svg = std::fs::read_to_string(svg_path)
                .with_context(|| format!("reading {}", svg_path.display()))?;
            let png = raster
                .png(&svg, PNG_SCALE)
                .with_context(|| svg_path.display().to_string())?;
            let png_path = svg_path.with_extension("png");
            std::fs::write(&png_path, png)
                .with_context(|| format!("writing {}", png_path.display()))?;
            Ok(png_path)
        })
        .collect()
}

fn load(path: &Path) -> Result<Model> {
    Ok(Model::from_path(path)?)
}

fn print_summary(m: &Model, a: &medledger_econ::Analysis) {
    println!("{}", m.meta.title);
    for r in &a.icer {
        println!(
            "  {:<24} {} {:>12}  {} {:>10}  {:<3} ICER {}",
            r.name,
            m.meta.currency,
            report::fmt_money(r.cost),
            m.meta.effect_label,
            report::fmt_effect(r.effect),
            r.status.code(),
            r.icer.map(report::fmt_money).unwrap_or_else(|| "-".into())
        );
    }
    // The CEAC point closest to the model's willingness to pay.
    let point = a.psa.as_ref().and_then(|p| {
        p.ceac
            .iter()
            .min_by(|x, y| (x.wtp - a.wtp).abs().total_cmp(&(y.wtp - a.wtp).abs()))
            .map(|pt| (p, pt))
    });
    if let Some((p, pt)) = point {
        println!(
            "  PSA ({} iterations): at {} {} the most cost-effective is {} (probability {:.1}%), EVPI {} per person",
            p.iterations,
            m.meta.currency,
            report::fmt_money(pt.wtp),
            m.strategies[pt.frontier].name,
            pt.frontier_probability * 100.0,
            report::fmt_money(pt.evpi)
        );
    }
}
