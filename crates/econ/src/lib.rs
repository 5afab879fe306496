//! medledger's health-economics engine.
//!
//! Declarative model files (TOML, see `docs/cea-model-format.md`) describe
//! decision trees and Markov cohort models; this crate evaluates them and runs
//! the analyses health economists report: base case, incremental analysis
//! with dominance and the efficient frontier, net benefit, one- and two-way
//! sensitivity analysis, probabilistic sensitivity analysis with CEACs and
//! EVPI, and writes JSON, CSV, SVG plots and an HTML report with a CHEERS 2022
//! checklist; [`raster`] turns the SVG plots into PNG images.
//!
//! The crate is pure: given a model and a seed, every number is the same on
//! every machine. It does no I/O except reading the model / measurements
//! files and writing the report directory it is asked to write.

pub mod analysis;
pub mod batch;
pub mod dist;
pub mod engine;
pub mod error;
pub mod expr;
pub mod icer;
pub mod model;
pub mod psa;
pub mod raster;
pub mod report;
pub mod rng;
pub mod svg;

pub use analysis::{Analysis, AnalysisOptions, run_analysis};
pub use error::{EconError, Result};
pub use model::Model;
