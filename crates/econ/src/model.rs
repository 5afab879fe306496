//! Model files: the TOML schema, its validation and its compilation.
//!
//! A model file declares parameters, expressions, strategies and either a
//! Markov cohort structure or a decision tree (see `docs/cea-model-format.md`).
//! This module turns the text into a [`Model`] whose expressions are compiled
//! programs over a slot array, checked once here so that evaluation can run
//! without name look-ups. Every error names the file position and field.
//!
//! It must not evaluate models (that is [`crate::engine`]'s job) nor do I/O
//! beyond reading the one file it is given.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::dist::{Dist, DistSpec};
use crate::error::{EconError, Result};
use crate::expr::{self, Ast, Interpolation, Program, Resolver, Table};

// ====================================================================== raw

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum NumOrExpr {
    Num(f64),
    Expr(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    model: RawMeta,
    #[serde(default)]
    settings: RawSettings,
    #[serde(default)]
    parameters: IndexMap<String, Spanned<RawParam>>,
    #[serde(default)]
    dirichlet: IndexMap<String, Spanned<RawDirichlet>>,
    #[serde(default)]
    tables: IndexMap<String, Spanned<RawTable>>,
    #[serde(default)]
    expressions: IndexMap<String, Spanned<NumOrExpr>>,
    #[serde(default)]
    outcomes: IndexMap<String, RawOutcome>,
    markov: Option<RawMarkov>,
    tree: Option<RawTree>,
    #[serde(default)]
    strategy: Vec<Spanned<RawStrategy>>,
    #[serde(default)]
    scenarios: IndexMap<String, RawScenario>,
    #[serde(default)]
    measurements: IndexMap<String, RawMeasurement>,
    #[serde(default)]
    analysis: RawAnalysis,
    #[serde(default)]
    cheers: IndexMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeta {
    title: String,
    kind: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    price_year: Option<i64>,
    #[serde(default)]
    perspective: Option<String>,
    #[serde(default)]
    population: Option<String>,
    #[serde(default)]
    setting: Option<String>,
    #[serde(default)]
    effect: Option<Spanned<String>>,
    #[serde(default)]
    effect_label: Option<String>,
    #[serde(default)]
    reference: Option<Spanned<String>>,
    #[serde(default)]
    authors: Option<String>,
    #[serde(default)]
    sources: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    cycles: Option<usize>,
    cycle_length: Option<f64>,
    counting: Option<Spanned<String>>,
    discount_costs: Option<f64>,
    discount_effects: Option<f64>,
    discount_timing: Option<Spanned<String>>,
    wtp: Option<f64>,
    wtp_grid: Option<RawGrid>,
    psa_iterations: Option<usize>,
    seed: Option<u64>,
    population_size: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawGrid {
    List(Vec<f64>),
    Range { from: f64, to: f64, step: f64 },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawParam {
    Bare(f64),
    Full(Box<RawParamFull>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParamFull {
    value: NumOrExpr,
    #[serde(default)]
    range: Option<[f64; 2]>,
    #[serde(default)]
    dist: Option<DistSpec>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    note: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirichlet {
    parameters: Vec<String>,
    alpha: Vec<f64>,
    #[serde(default)]
    source: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    x: Vec<f64>,
    y: Vec<f64>,
    #[serde(default)]
    interpolation: Option<Interpolation>,
    #[serde(default)]
    source: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutcome {
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    discount: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMarkov {
    states: Vec<String>,
    initial: Vec<f64>,
    #[serde(default)]
    transitions: Option<Spanned<Vec<Vec<Spanned<NumOrExpr>>>>>,
    #[serde(default)]
    state: IndexMap<String, RawState>,
    #[serde(default)]
    on_transition: Vec<Spanned<RawTransitionPayoff>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    #[serde(default)]
    cost: Option<Spanned<NumOrExpr>>,
    #[serde(default)]
    utility: Option<Spanned<NumOrExpr>>,
    #[serde(default)]
    alive: Option<bool>,
    #[serde(default)]
    outcomes: IndexMap<String, Spanned<NumOrExpr>>,
    #[serde(default)]
    label: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransitionPayoff {
    from: String,
    to: String,
    #[serde(default)]
    cost: Option<Spanned<NumOrExpr>>,
    #[serde(default)]
    qaly: Option<Spanned<NumOrExpr>>,
    #[serde(default)]
    outcomes: IndexMap<String, Spanned<NumOrExpr>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTree {
    nodes: IndexMap<String, Spanned<RawNode>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    kind: String,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    branches: Vec<RawBranch>,
    #[serde(default)]
    cost: Option<Spanned<NumOrExpr>>,
    #[serde(default)]
    qaly: Option<Spanned<NumOrExpr>>,
    #[serde(default)]
    life_years: Option<Spanned<NumOrExpr>>,
    #[serde(default)]
    outcomes: IndexMap<String, Spanned<NumOrExpr>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBranch {
    to: Spanned<String>,
    #[serde(default)]
    p: Option<Spanned<NumOrExpr>>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    cost: Option<Spanned<NumOrExpr>>,
    #[serde(default)]
    qaly: Option<Spanned<NumOrExpr>>,
    #[serde(default)]
    life_years: Option<Spanned<NumOrExpr>>,
    #[serde(default)]
    outcomes: IndexMap<String, Spanned<NumOrExpr>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStrategy {
    name: String,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    set: IndexMap<String, Spanned<NumOrExpr>>,
    #[serde(default)]
    transitions: Option<Spanned<Vec<Vec<Spanned<NumOrExpr>>>>>,
    #[serde(default)]
    tree_root: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    set: IndexMap<String, f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeasurement {
    parameter: String,
    #[serde(default = "one")]
    scale: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnalysis {
    #[serde(default)]
    two_way: Vec<RawTwoWay>,
    #[serde(default)]
    tornado_top: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTwoWay {
    x: String,
    y: String,
    #[serde(default)]
    steps: Option<usize>,
}

// ================================================================== compiled

/// How state membership is counted within a cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Counting {
    /// Membership at the start of each cycle (trace points 0..n-1).
    Beginning,
    /// Membership at the end of each cycle (trace points 1..n).
    End,
    /// Mean of start and end membership (half-cycle / life-table method).
    HalfCycle,
    /// Simpson's 1/3 rule over trace points 0..n (n must be even).
    Simpson,
}

impl Counting {
    pub fn describe(&self) -> &'static str {
        match self {
            Counting::Beginning => "beginning of cycle",
            Counting::End => "end of cycle",
            Counting::HalfCycle => "half-cycle correction (life-table method)",
            Counting::Simpson => "Simpson's 1/3 rule",
        }
    }
}

/// When, within a cycle, payoffs are taken to occur for discounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiscountTiming {
    /// Cycle t is discounted by (1+r)^-((t-1)·L): the first cycle is not discounted.
    Start,
    /// (1+r)^-((t-0.5)·L).
    Middle,
    /// (1+r)^-(t·L): discounting starts with the first cycle.
    End,
}

impl DiscountTiming {
    pub fn exponent(&self, t: usize, cycle_length: f64) -> f64 {
        let t = t as f64;
        cycle_length
            * match self {
                DiscountTiming::Start => t - 1.0,
                DiscountTiming::Middle => t - 0.5,
                DiscountTiming::End => t,
            }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscountKind {
    None,
    Costs,
    Effects,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub cycles: usize,
    pub cycle_length: f64,
    pub counting: Counting,
    pub discount_costs: f64,
    pub discount_effects: f64,
    pub discount_timing: DiscountTiming,
    pub wtp: f64,
    pub wtp_grid: Vec<f64>,
    pub psa_iterations: usize,
    pub seed: u64,
    pub population_size: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    pub title: String,
    pub kind: ModelKind,
    pub description: String,
    pub currency: String,
    pub price_year: Option<i64>,
    pub perspective: Option<String>,
    pub population: Option<String>,
    pub setting: Option<String>,
    pub effect: Effect,
    pub effect_label: String,
    pub reference: usize,
    pub authors: Option<String>,
    pub sources: Vec<String>,
    pub cheers: IndexMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    Markov,
    DecisionTree,
}

/// Which outcome is the denominator of ICERs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Effect {
    Qalys,
    LifeYears,
    Outcome(usize),
}

#[derive(Debug, Clone, Serialize)]
pub struct Parameter {
    pub name: String,
    pub label: String,
    pub unit: String,
    pub source: String,
    pub note: String,
    pub base: f64,
    pub range: Option<(f64, f64)>,
    pub dist: Dist,
}

#[derive(Debug, Clone, Serialize)]
pub struct DirichletGroup {
    pub name: String,
    pub params: Vec<usize>,
    pub alpha: Vec<f64>,
    pub source: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutcomeDef {
    pub name: String,
    pub label: String,
    pub unit: String,
    pub discount: DiscountKind,
}

/// A compiled expression together with the text it came from and whether it
/// changes from cycle to cycle.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub program: Program,
    pub text: String,
    pub deps: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum Entry {
    Zero,
    Complement,
    Expr(Compiled),
}

#[derive(Debug, Clone)]
pub struct StateDef {
    pub name: String,
    pub label: String,
    pub cost: Compiled,
    pub utility: Compiled,
    pub alive: bool,
    pub outcomes: Vec<Compiled>,
}

#[derive(Debug, Clone)]
pub struct TransitionPayoff {
    pub from: usize,
    pub to: usize,
    pub cost: Compiled,
    pub qaly: Compiled,
    pub outcomes: Vec<Compiled>,
}

#[derive(Debug, Clone)]
pub struct Markov {
    pub states: Vec<StateDef>,
    pub initial: Vec<f64>,
    pub on_transition: Vec<TransitionPayoff>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Chance,
    Decision,
    Terminal,
}

#[derive(Debug, Clone)]
pub struct Payoffs {
    pub cost: Compiled,
    pub qaly: Compiled,
    pub life_years: Compiled,
    pub outcomes: Vec<Compiled>,
}

#[derive(Debug, Clone)]
pub struct Branch {
    pub to: usize,
    pub label: String,
    pub p: Entry,
    pub payoffs: Payoffs,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub id: String,
    pub label: String,
    pub kind: NodeKind,
    pub branches: Vec<Branch>,
    pub payoffs: Payoffs,
}

#[derive(Debug, Clone)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

#[derive(Debug, Clone)]
pub enum Structure {
    Markov(Markov),
    Tree(Tree),
}

/// One strategy's compiled view: its expression programs (with its
/// overrides) in evaluation order, and its transition matrix or tree root.
#[derive(Debug, Clone)]
pub struct Strategy {
    pub name: String,
    pub label: String,
    pub description: String,
    /// Expressions not depending on the cycle, in dependency order.
    pub static_exprs: Vec<(usize, Program)>,
    /// Expressions depending on the cycle, in dependency order.
    pub dynamic_exprs: Vec<(usize, Program)>,
    /// Expression slots that change with the cycle for this strategy.
    pub dynamic_names: BTreeSet<String>,
    pub matrix: Vec<Entry>,
    pub matrix_dynamic: bool,
    pub values_dynamic: bool,
    /// Whether matrix entries / state values read `cycle` or `time` directly
    /// (if not, they change only when a dynamic expression's value changes,
    /// which the evaluator checks before recomputing them).
    pub matrix_reads_time: bool,
    pub values_read_time: bool,
    pub tree_root: usize,
    /// The expression text this strategy uses for each overridden name.
    pub overrides: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: String,
    pub label: String,
    pub description: String,
    pub set: Vec<(usize, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub key: String,
    pub param: usize,
    pub scale: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TwoWaySpec {
    pub x: usize,
    pub y: usize,
    pub steps: usize,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub meta: Meta,
    pub settings: Settings,
    pub params: Vec<Parameter>,
    pub dirichlet: Vec<DirichletGroup>,
    pub tables: Vec<Table>,
    pub table_names: Vec<String>,
    pub table_sources: Vec<String>,
    pub expr_names: Vec<String>,
    pub expr_texts: Vec<String>,
    pub outcomes: Vec<OutcomeDef>,
    pub structure: Structure,
    pub strategies: Vec<Strategy>,
    pub scenarios: Vec<Scenario>,
    pub measurements: Vec<Measurement>,
    pub two_way: Vec<TwoWaySpec>,
    pub tornado_top: usize,
    pub source_path: Option<PathBuf>,
}

impl Model {
    /// Slot of the cycle number in the evaluation array.
    pub fn cycle_slot(&self) -> usize {
        self.params.len() + self.expr_names.len()
    }

    pub fn time_slot(&self) -> usize {
        self.cycle_slot() + 1
    }

    pub fn n_slots(&self) -> usize {
        self.cycle_slot() + 2
    }

    pub fn base_values(&self) -> Vec<f64> {
        self.params.iter().map(|p| p.base).collect()
    }

    pub fn param_index(&self, name: &str) -> Option<usize> {
        self.params.iter().position(|p| p.name == name)
    }

    pub fn strategy_index(&self, name: &str) -> Option<usize> {
        self.strategies.iter().position(|s| s.name == name)
    }

    pub fn effect_name(&self) -> String {
        match self.meta.effect {
            Effect::Qalys => "qalys".into(),
            Effect::LifeYears => "life_years".into(),
            Effect::Outcome(i) => self.outcomes[i].name.clone(),
        }
    }

    pub fn markov(&self) -> Option<&Markov> {
        match &self.structure {
            Structure::Markov(m) => Some(m),
            Structure::Tree(_) => None,
        }
    }

    /// Reads and compiles a model file.
    pub fn from_path(path: &Path) -> Result<Model> {
        let text = std::fs::read_to_string(path).map_err(|e| EconError::Read {
            path: path.to_owned(),
            source: e,
        })?;
        let mut m = Model::from_toml_named(&text, &path.display().to_string())?;
        m.source_path = Some(path.to_owned());
        Ok(m)
    }

    /// Compiles a model from TOML text; `name` appears in error locations.
    pub fn from_toml_named(text: &str, name: &str) -> Result<Model> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let location = match e.span() {
                Some(span) => locate(name, text, span.start),
                None => name.to_string(),
            };
            EconError::Model {
                location,
                message: e.message().trim().to_string(),
            }
        })?;
        Builder { file: name, text }.build(raw)
    }

    /// Compiles a model from TOML text.
    pub fn from_toml(text: &str) -> Result<Model> {
        Model::from_toml_named(text, "<model>")
    }

    /// Overrides parameter base values from a measurements file written by
    /// medledger's benchmarks (a JSON object of numbers, nested objects
    /// flattened with dots). Only keys mapped under `[measurements]` are used;
    /// returns the (key, parameter, value) triples applied.
    pub fn apply_measurements(&mut self, path: &Path) -> Result<Vec<(String, String, f64)>> {
        let text = std::fs::read_to_string(path).map_err(|e| EconError::Read {
            path: path.to_owned(),
            source: e,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| EconError::Measurements {
                path: path.to_owned(),
                message: format!("not valid JSON: {e}"),
            })?;
        let mut flat = BTreeMap::new();
        flatten(&json, String::new(), &mut flat);
        let mut applied = Vec::new();
        for m in &self.measurements {
            let Some(v) = flat.get(&m.key) else { continue };
            let value = v * m.scale;
            if !value.is_finite() {
                return Err(EconError::Measurements {
                    path: path.to_owned(),
                    message: format!("`{}` is not a finite number", m.key),
                });
            }
            let p = &mut self.params[m.param];
            recentre(p, value);
            applied.push((m.key.clone(), p.name.clone(), value));
        }
        if applied.is_empty() && !self.measurements.is_empty() {
            let wanted: Vec<&str> = self.measurements.iter().map(|m| m.key.as_str()).collect();
            return Err(EconError::Measurements {
                path: path.to_owned(),
                message: format!(
                    "none of the keys the model maps ({}) is present; keys found: {}",
                    wanted.join(", "),
                    flat.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        Ok(applied)
    }
}

/// Moves a parameter to a measured value, keeping its uncertainty relative:
/// the one-way range and a mean-centred distribution are scaled with it.
fn recentre(p: &mut Parameter, value: f64) {
    let old = p.base;
    p.base = value;
    if old != 0.0 {
        let k = value / old;
        if let Some((lo, hi)) = p.range {
            p.range = Some((lo * k, hi * k));
        }
        p.dist = match p.dist {
            Dist::Normal { mean, sd } => Dist::Normal {
                mean: mean * k,
                sd: sd * k.abs(),
            },
            Dist::Gamma { shape, scale } if k > 0.0 => Dist::Gamma {
                shape,
                scale: scale * k,
            },
            Dist::LogNormal { meanlog, sdlog } if k > 0.0 => Dist::LogNormal {
                meanlog: meanlog + k.ln(),
                sdlog,
            },
            Dist::Uniform { min, max } if k > 0.0 => Dist::Uniform {
                min: min * k,
                max: max * k,
            },
            Dist::Triangular { min, mode, max } if k > 0.0 => Dist::Triangular {
                min: min * k,
                mode: mode * k,
                max: max * k,
            },
            d => d,
        };
    }
}

fn flatten(v: &serde_json::Value, prefix: String, out: &mut BTreeMap<String, f64>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(v, key, out);
            }
        }
        serde_json::Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                out.insert(prefix, f);
            }
        }
        _ => {}
    }
}

fn locate(name: &str, text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    format!("{name}:{line}:{col}")
}

// =================================================================== builder

struct Builder<'a> {
    file: &'a str,
    text: &'a str,
}

struct Names<'a> {
    slots: &'a HashMap<String, usize>,
    tables: &'a HashMap<String, usize>,
}

impl Resolver for Names<'_> {
    fn slot(&self, name: &str) -> Option<usize> {
        self.slots.get(name).copied()
    }
    fn table(&self, name: &str) -> Option<usize> {
        self.tables.get(name).copied()
    }
    fn known_names(&self) -> Vec<String> {
        self.slots.keys().cloned().collect()
    }
}

const RESERVED: &[&str] = &["cycle", "time", "C", "complement"];

impl Builder<'_> {
    fn err_at(&self, offset: usize, message: impl Into<String>) -> EconError {
        EconError::Model {
            location: locate(self.file, self.text, offset),
            message: message.into(),
        }
    }

    fn err(&self, message: impl Into<String>) -> EconError {
        EconError::Model {
            location: self.file.to_string(),
            message: message.into(),
        }
    }

    fn build(&self, raw: RawFile) -> Result<Model> {
        let kind = match raw.model.kind.get_ref().as_str() {
            "markov" => ModelKind::Markov,
            "decision-tree" | "tree" => ModelKind::DecisionTree,
            other => {
                return Err(self.err_at(
                    raw.model.kind.span().start,
                    format!("[model] kind = \"{other}\" is not known; use \"markov\" or \"decision-tree\""),
                ));
            }
        };

        // ---------------------------------------------------- parameters
        let mut params = Vec::new();
        let mut slots: HashMap<String, usize> = HashMap::new();
        for (name, sp) in &raw.parameters {
            self.check_name(name, sp.span().start)?;
            let p = match sp.get_ref() {
                RawParam::Bare(v) => Parameter {
                    name: name.clone(),
                    label: name.clone(),
                    unit: String::new(),
                    source: String::new(),
                    note: String::new(),
                    base: *v,
                    range: None,
                    dist: Dist::Fixed,
                },
                RawParam::Full(f) => {
                    let base = match &f.value {
                        NumOrExpr::Num(v) => *v,
                        NumOrExpr::Expr(text) => {
                            self.constant_value(text, sp.span().start, name)?
                        }
                    };
                    let dist = match &f.dist {
                        Some(d) => d.resolve().map_err(|e| {
                            self.err_at(sp.span().start, format!("parameter `{name}`: {e}"))
                        })?,
                        None => Dist::Fixed,
                    };
                    if let Some([lo, hi]) = f.range {
                        if lo > hi {
                            return Err(self.err_at(
                                sp.span().start,
                                format!("parameter `{name}`: range [{lo}, {hi}] must be written [low, high]"),
                            ));
                        }
                    }
                    Parameter {
                        name: name.clone(),
                        label: f.label.clone().unwrap_or_else(|| name.clone()),
                        unit: f.unit.clone().unwrap_or_default(),
                        source: f.source.clone().unwrap_or_default(),
                        note: f.note.clone().unwrap_or_default(),
                        base,
                        range: f.range.map(|[a, b]| (a, b)),
                        dist,
                    }
                }
            };
            if !p.base.is_finite() {
                return Err(self.err_at(
                    sp.span().start,
                    format!("parameter `{name}`: value must be finite"),
                ));
            }
            slots.insert(name.clone(), params.len());
            params.push(p);
        }

        let mut dirichlet = Vec::new();
        let mut in_dirichlet = BTreeSet::new();
        for (name, sp) in &raw.dirichlet {
            let d = sp.get_ref();
            let at = sp.span().start;
            if d.parameters.len() != d.alpha.len() || d.parameters.len() < 2 {
                return Err(self.err_at(
                    at,
                    format!("[dirichlet.{name}]: give at least two parameters and one alpha per parameter"),
                ));
            }
            if d.alpha.iter().any(|a| a.is_nan() || *a <= 0.0) {
                return Err(self.err_at(
                    at,
                    format!("[dirichlet.{name}]: every alpha must be positive"),
                ));
            }
            let mut idx = Vec::new();
            for p in &d.parameters {
                let Some(&i) = slots.get(p) else {
                    return Err(self.err_at(
                        at,
                        format!("[dirichlet.{name}]: `{p}` is not a parameter; declare it under [parameters]"),
                    ));
                };
                if !in_dirichlet.insert(i) {
                    return Err(self.err_at(
                        at,
                        format!("[dirichlet.{name}]: `{p}` is already in another group"),
                    ));
                }
                if params[i].dist != Dist::Fixed {
                    return Err(self.err_at(
                        at,
                        format!("[dirichlet.{name}]: `{p}` also has its own `dist`; remove one of the two"),
                    ));
                }
                idx.push(i);
            }
            dirichlet.push(DirichletGroup {
                name: name.clone(),
                params: idx,
                alpha: d.alpha.clone(),
                source: d.source.clone().unwrap_or_default(),
            });
        }

        // -------------------------------------------------------- tables
        let mut tables = Vec::new();
        let mut table_names = Vec::new();
        let mut table_sources = Vec::new();
        let mut table_idx = HashMap::new();
        for (name, st) in &raw.tables {
            let t = st.get_ref();
            let at = st.span().start;
            if t.x.is_empty() || t.x.len() != t.y.len() {
                return Err(self.err_at(
                    at,
                    format!("[tables.{name}]: x and y must be non-empty and of equal length"),
                ));
            }
            if t.x.windows(2).any(|w| w[0] >= w[1]) {
                return Err(self.err_at(
                    at,
                    format!("[tables.{name}]: x must be strictly increasing"),
                ));
            }
            table_idx.insert(name.clone(), tables.len());
            table_names.push(name.clone());
            table_sources.push(t.source.clone().unwrap_or_default());
            tables.push(Table {
                x: t.x.clone(),
                y: t.y.clone(),
                interpolation: t.interpolation.unwrap_or(Interpolation::Step),
            });
        }

        // --------------------------------------------------- expressions
        let n_params = params.len();
        let mut expr_names = Vec::new();
        let mut expr_src: Vec<(String, usize)> = Vec::new();
        for (name, se) in &raw.expressions {
            self.check_name(name, se.span().start)?;
            if slots.contains_key(name) {
                return Err(self.err_at(
                    se.span().start,
                    format!("`{name}` is both a parameter and an expression; rename one"),
                ));
            }
            slots.insert(name.clone(), n_params + expr_names.len());
            expr_names.push(name.clone());
            expr_src.push((num_or_expr_text(se.get_ref()), se.span().start));
        }
        let cycle_slot = n_params + expr_names.len();
        slots.insert("cycle".into(), cycle_slot);
        slots.insert("time".into(), cycle_slot + 1);

        // ------------------------------------------------------ outcomes
        let mut outcomes = Vec::new();
        for (name, o) in &raw.outcomes {
            if matches!(name.as_str(), "cost" | "qalys" | "life_years") {
                return Err(self.err(format!(
                    "[outcomes.{name}]: `{name}` is built in; custom outcomes need another name"
                )));
            }
            let discount = match o.discount.as_deref().unwrap_or("none") {
                "none" => DiscountKind::None,
                "costs" => DiscountKind::Costs,
                "effects" => DiscountKind::Effects,
                other => {
                    return Err(self.err(format!(
                        "[outcomes.{name}]: discount = \"{other}\" is not known; use \"none\", \"costs\" or \"effects\""
                    )));
                }
            };
            outcomes.push(OutcomeDef {
                name: name.clone(),
                label: o.label.clone().unwrap_or_else(|| name.clone()),
                unit: o.unit.clone().unwrap_or_default(),
                discount,
            });
        }
        let outcome_idx: HashMap<String, usize> = outcomes
            .iter()
            .enumerate()
            .map(|(i, o)| (o.name.clone(), i))
            .collect();

        let names = Names {
            slots: &slots,
            tables: &table_idx,
        };
        let compile = |src: &Spanned<NumOrExpr>, what: &str| -> Result<Compiled> {
            self.compile_spanned(src, what, &names)
        };
        let constant = |v: f64| Compiled {
            program: Program::constant(v),
            text: fmt_const(v),
            deps: vec![],
        };

        // Global expression ASTs (strategy overrides are compiled below).
        let mut expr_compiled = Vec::new();
        for (i, (text, at)) in expr_src.iter().enumerate() {
            let what = format!("expression `{}`", expr_names[i]);
            expr_compiled.push(self.compile_text(text, *at, &what, &names)?);
        }

        let compile_outcomes =
            |map: &IndexMap<String, Spanned<NumOrExpr>>, what: &str| -> Result<Vec<Compiled>> {
                let mut v: Vec<Compiled> = (0..outcomes.len()).map(|_| constant(0.0)).collect();
                for (oname, src) in map {
                    let Some(&oi) = outcome_idx.get(oname) else {
                        return Err(self.err_at(
                            src.span().start,
                            format!(
                                "{what}: outcome `{oname}` is not declared; add [outcomes.{oname}]"
                            ),
                        ));
                    };
                    v[oi] = compile(src, &format!("{what}, outcome `{oname}`"))?;
                }
                Ok(v)
            };

        // ----------------------------------------------------- settings
        let s = &raw.settings;
        let counting = match s
            .counting
            .as_ref()
            .map(|c| (c.get_ref().as_str(), c.span().start))
        {
            None => Counting::HalfCycle,
            Some(("beginning", _)) => Counting::Beginning,
            Some(("end", _)) => Counting::End,
            Some(("half-cycle" | "life-table" | "half_cycle", _)) => Counting::HalfCycle,
            Some(("simpson" | "simpson-1/3", _)) => Counting::Simpson,
            Some((other, at)) => {
                return Err(self.err_at(
                    at,
                    format!(
                        "counting = \"{other}\" is not known; use \"beginning\", \"end\", \"half-cycle\" (or \"life-table\") or \"simpson\""
                    ),
                ));
            }
        };
        let discount_timing = match s
            .discount_timing
            .as_ref()
            .map(|c| (c.get_ref().as_str(), c.span().start))
        {
            None | Some(("start", _)) => DiscountTiming::Start,
            Some(("middle", _)) => DiscountTiming::Middle,
            Some(("end", _)) => DiscountTiming::End,
            Some((other, at)) => {
                return Err(self.err_at(
                    at,
                    format!("discount_timing = \"{other}\" is not known; use \"start\", \"middle\" or \"end\""),
                ));
            }
        };
        let cycles = match (kind, s.cycles) {
            (ModelKind::Markov, None) => {
                return Err(self.err("[settings] cycles is required for a Markov model (the number of cycles in the horizon)"));
            }
            (ModelKind::Markov, Some(0)) => {
                return Err(self.err("[settings] cycles must be at least 1"));
            }
            (_, c) => c.unwrap_or(0),
        };
        if kind == ModelKind::Markov && counting == Counting::Simpson && cycles % 2 != 0 {
            return Err(self.err(format!(
                "[settings] Simpson's 1/3 rule needs an even number of cycles, got {cycles}; add or drop one cycle"
            )));
        }
        let cycle_length = s.cycle_length.unwrap_or(1.0);
        if cycle_length.is_nan() || cycle_length <= 0.0 {
            return Err(self.err("[settings] cycle_length must be positive (in years)"));
        }
        for (v, n) in [
            (s.discount_costs, "discount_costs"),
            (s.discount_effects, "discount_effects"),
        ] {
            if let Some(r) = v {
                if !(0.0..1.0).contains(&r) {
                    return Err(self.err(format!(
                        "[settings] {n} = {r}: give an annual rate as a fraction (0.035 for 3.5%)"
                    )));
                }
            }
        }
        let wtp = s.wtp.unwrap_or(50_000.0);
        let wtp_grid = match &s.wtp_grid {
            Some(RawGrid::List(v)) => v.clone(),
            Some(RawGrid::Range { from, to, step }) => {
                if step.is_nan() || *step <= 0.0 || to < from {
                    return Err(
                        self.err("[settings] wtp_grid needs from <= to and a positive step")
                    );
                }
                let n = ((to - from) / step).round() as usize;
                (0..=n).map(|i| from + step * i as f64).collect()
            }
            None => (0..=60).map(|i| wtp * 3.0 * i as f64 / 60.0).collect(),
        };

        // ------------------------------------------------------ structure
        let structure = match kind {
            ModelKind::Markov => {
                let Some(mk) = &raw.markov else {
                    return Err(self.err("a Markov model needs a [markov] section with states, initial and transitions"));
                };
                let n = mk.states.len();
                if n == 0 {
                    return Err(self.err("[markov] states must list at least one state"));
                }
                let mut seen = BTreeSet::new();
                for st in &mk.states {
                    if !seen.insert(st) {
                        return Err(self.err(format!("[markov] state `{st}` is listed twice")));
                    }
                }
                if mk.initial.len() != n {
                    return Err(self.err(format!(
                        "[markov] initial has {} values but there are {n} states",
                        mk.initial.len()
                    )));
                }
                let total: f64 = mk.initial.iter().sum();
                if mk.initial.iter().any(|v| *v < 0.0) || total.is_nan() || total <= 0.0 {
                    return Err(self.err("[markov] initial must be non-negative and not all zero"));
                }
                for k in mk.state.keys() {
                    if !mk.states.contains(k) {
                        return Err(self.err(format!(
                            "[markov.state.{k}]: `{k}` is not in [markov] states ({})",
                            mk.states.join(", ")
                        )));
                    }
                }
                let mut states = Vec::new();
                for name in &mk.states {
                    let default = RawState::default();
                    let st = mk.state.get(name).unwrap_or(&default);
                    let alive = st.alive.unwrap_or(true);
                    let what = format!("[markov.state.{name}]");
                    states.push(StateDef {
                        name: name.clone(),
                        label: st.label.clone().unwrap_or_else(|| name.clone()),
                        cost: match &st.cost {
                            Some(c) => compile(c, &format!("{what} cost"))?,
                            None => constant(0.0),
                        },
                        utility: match &st.utility {
                            Some(c) => compile(c, &format!("{what} utility"))?,
                            None => constant(if alive { 1.0 } else { 0.0 }),
                        },
                        alive,
                        outcomes: compile_outcomes(&st.outcomes, &what)?,
                    });
                }
                let state_idx = |s: &str, at: usize| -> Result<usize> {
                    mk.states.iter().position(|x| x == s).ok_or_else(|| {
                        self.err_at(
                            at,
                            format!(
                                "state `{s}` is not in [markov] states ({})",
                                mk.states.join(", ")
                            ),
                        )
                    })
                };
                let mut on_transition = Vec::new();
                for tp in &mk.on_transition {
                    let at = tp.span().start;
                    let t = tp.get_ref();
                    let what = format!("[[markov.on_transition]] {} -> {}", t.from, t.to);
                    on_transition.push(TransitionPayoff {
                        from: state_idx(&t.from, at)?,
                        to: state_idx(&t.to, at)?,
                        cost: match &t.cost {
                            Some(c) => compile(c, &format!("{what} cost"))?,
                            None => constant(0.0),
                        },
                        qaly: match &t.qaly {
                            Some(c) => compile(c, &format!("{what} qaly"))?,
                            None => constant(0.0),
                        },
                        outcomes: compile_outcomes(&t.outcomes, &what)?,
                    });
                }
                Structure::Markov(Markov {
                    states,
                    initial: mk.initial.iter().map(|v| v / total).collect(),
                    on_transition,
                })
            }
            ModelKind::DecisionTree => {
                let Some(tr) = &raw.tree else {
                    return Err(self.err("a decision-tree model needs [tree.nodes.ID] tables"));
                };
                let ids: HashMap<&str, usize> = tr
                    .nodes
                    .keys()
                    .enumerate()
                    .map(|(i, k)| (k.as_str(), i))
                    .collect();
                let mut nodes = Vec::new();
                for (id, sn) in &tr.nodes {
                    let n = sn.get_ref();
                    let at = sn.span().start;
                    let kind = match n.kind.as_str() {
                        "chance" => NodeKind::Chance,
                        "decision" => NodeKind::Decision,
                        "terminal" => NodeKind::Terminal,
                        other => {
                            return Err(self.err_at(
                                at,
                                format!("node `{id}`: kind = \"{other}\"; use \"chance\", \"decision\" or \"terminal\""),
                            ));
                        }
                    };
                    if kind == NodeKind::Terminal && !n.branches.is_empty() {
                        return Err(
                            self.err_at(at, format!("node `{id}` is terminal but has branches"))
                        );
                    }
                    if kind != NodeKind::Terminal && n.branches.is_empty() {
                        return Err(self.err_at(
                            at,
                            format!("node `{id}` is a {} node without branches", n.kind),
                        ));
                    }
                    let what = format!("node `{id}`");
                    let payoffs = Payoffs {
                        cost: opt_compile(&n.cost, &format!("{what} cost"), &compile, &constant)?,
                        qaly: opt_compile(&n.qaly, &format!("{what} qaly"), &compile, &constant)?,
                        life_years: opt_compile(
                            &n.life_years,
                            &format!("{what} life_years"),
                            &compile,
                            &constant,
                        )?,
                        outcomes: compile_outcomes(&n.outcomes, &what)?,
                    };
                    let mut branches = Vec::new();
                    let mut complements = 0;
                    for (bi, b) in n.branches.iter().enumerate() {
                        let Some(&to) = ids.get(b.to.get_ref().as_str()) else {
                            return Err(self.err_at(
                                b.to.span().start,
                                format!(
                                    "node `{id}` branch {}: no node `{}`",
                                    bi + 1,
                                    b.to.get_ref()
                                ),
                            ));
                        };
                        let bw = format!("node `{id}` branch to `{}`", b.to.get_ref());
                        let p = match (&b.p, kind) {
                            (None, NodeKind::Decision) => Entry::Zero,
                            (None, _) => {
                                return Err(self.err_at(
                                    b.to.span().start,
                                    format!("{bw}: chance branches need a probability `p` (or \"C\" for the complement)"),
                                ));
                            }
                            (Some(_), NodeKind::Decision) => {
                                return Err(self.err_at(
                                    b.to.span().start,
                                    format!(
                                        "{bw}: decision branches are chosen, not drawn; remove `p`"
                                    ),
                                ));
                            }
                            (Some(sp), _) => match sp.get_ref() {
                                NumOrExpr::Expr(s) if is_complement(s) => {
                                    complements += 1;
                                    Entry::Complement
                                }
                                _ => Entry::Expr(compile(sp, &format!("{bw} p"))?),
                            },
                        };
                        branches.push(Branch {
                            to,
                            label: b.label.clone().unwrap_or_else(|| b.to.get_ref().clone()),
                            p,
                            payoffs: Payoffs {
                                cost: opt_compile(
                                    &b.cost,
                                    &format!("{bw} cost"),
                                    &compile,
                                    &constant,
                                )?,
                                qaly: opt_compile(
                                    &b.qaly,
                                    &format!("{bw} qaly"),
                                    &compile,
                                    &constant,
                                )?,
                                life_years: opt_compile(
                                    &b.life_years,
                                    &format!("{bw} life_years"),
                                    &compile,
                                    &constant,
                                )?,
                                outcomes: compile_outcomes(&b.outcomes, &bw)?,
                            },
                        });
                    }
                    if complements > 1 {
                        return Err(self.err_at(
                            at,
                            format!("node `{id}`: at most one branch may be the complement \"C\""),
                        ));
                    }
                    nodes.push(Node {
                        id: id.clone(),
                        label: n.label.clone().unwrap_or_else(|| id.clone()),
                        kind,
                        branches,
                        payoffs,
                    });
                }
                // A tree must be acyclic; a path longer than the node count
                // means a cycle.
                for start in 0..nodes.len() {
                    let mut stack = vec![(start, 0usize)];
                    while let Some((n, depth)) = stack.pop() {
                        if depth > nodes.len() {
                            return Err(self.err(format!(
                                "the tree has a cycle through node `{}`",
                                nodes[start].id
                            )));
                        }
                        for b in &nodes[n].branches {
                            stack.push((b.to, depth + 1));
                        }
                    }
                }
                Structure::Tree(Tree { nodes })
            }
        };

        // ----------------------------------------------------- strategies
        if raw.strategy.is_empty() {
            return Err(self.err("declare at least one [[strategy]] with a name"));
        }
        let mut strategies: Vec<Strategy> = Vec::new();
        for ss in &raw.strategy {
            let st = ss.get_ref();
            let at = ss.span().start;
            if strategies.iter().any(|s| s.name == st.name) {
                return Err(self.err_at(at, format!("strategy `{}` is declared twice", st.name)));
            }
            // Expression programs with this strategy's overrides.
            let mut programs: Vec<Compiled> = expr_compiled.clone();
            let mut overrides = Vec::new();
            for (name, src) in &st.set {
                let Some(i) = expr_names.iter().position(|e| e == name) else {
                    let hint = if slots.contains_key(name) {
                        format!(
                            "`{name}` is a parameter; strategies may only override [expressions] (add an expression that uses it)"
                        )
                    } else {
                        format!(
                            "`{name}` is not declared under [expressions]; declare a default there first"
                        )
                    };
                    return Err(self.err_at(
                        src.span().start,
                        format!("strategy `{}` set: {hint}", st.name),
                    ));
                };
                programs[i] = compile(src, &format!("strategy `{}` set `{name}`", st.name))?;
                overrides.push((name.clone(), programs[i].text.clone()));
            }
            let order = self.topo_order(&expr_names, &programs, &st.name)?;
            // Dynamic = reads cycle/time, directly or through another expression.
            let mut dynamic_names = BTreeSet::new();
            for &i in &order {
                if programs[i]
                    .deps
                    .iter()
                    .any(|d| d == "cycle" || d == "time" || dynamic_names.contains(d))
                {
                    dynamic_names.insert(expr_names[i].clone());
                }
            }
            let is_dyn = |c: &Compiled| {
                c.deps
                    .iter()
                    .any(|d| d == "cycle" || d == "time" || dynamic_names.contains(d))
            };
            let mut static_exprs = Vec::new();
            let mut dynamic_exprs = Vec::new();
            for &i in &order {
                let entry = (n_params + i, programs[i].program.clone());
                if dynamic_names.contains(&expr_names[i]) {
                    dynamic_exprs.push(entry);
                } else {
                    static_exprs.push(entry);
                }
            }

            let reads_time = |c: &Compiled| c.deps.iter().any(|d| d == "cycle" || d == "time");
            let mut matrix_reads_time = false;
            let mut values_read_time = false;
            let (matrix, matrix_dynamic, values_dynamic, tree_root) = match &structure {
                Structure::Markov(mk) => {
                    let src = st
                        .transitions
                        .as_ref()
                        .or(raw.markov.as_ref().and_then(|m| m.transitions.as_ref()));
                    let Some(src) = src else {
                        return Err(self.err_at(
                            at,
                            format!(
                                "strategy `{}` has no transition matrix: give [markov] transitions or the strategy's own `transitions`",
                                st.name
                            ),
                        ));
                    };
                    let state_names: Vec<String> =
                        mk.states.iter().map(|s| s.name.clone()).collect();
                    let matrix = self.compile_matrix(src, &state_names, &st.name, &names)?;
                    let md = matrix
                        .iter()
                        .any(|e| matches!(e, Entry::Expr(c) if is_dyn(c)));
                    matrix_reads_time = matrix
                        .iter()
                        .any(|e| matches!(e, Entry::Expr(c) if reads_time(c)));
                    values_read_time = mk.states.iter().any(|s| {
                        reads_time(&s.cost)
                            || reads_time(&s.utility)
                            || s.outcomes.iter().any(&reads_time)
                    }) || mk.on_transition.iter().any(|t| {
                        reads_time(&t.cost)
                            || reads_time(&t.qaly)
                            || t.outcomes.iter().any(&reads_time)
                    });
                    let vd = mk.states.iter().any(|s| {
                        is_dyn(&s.cost) || is_dyn(&s.utility) || s.outcomes.iter().any(&is_dyn)
                    }) || mk.on_transition.iter().any(|t| {
                        is_dyn(&t.cost) || is_dyn(&t.qaly) || t.outcomes.iter().any(&is_dyn)
                    });
                    if st.tree_root.is_some() {
                        return Err(self.err_at(
                            at,
                            format!(
                                "strategy `{}`: tree_root is for decision-tree models",
                                st.name
                            ),
                        ));
                    }
                    (matrix, md, vd, 0)
                }
                Structure::Tree(tr) => {
                    let Some(root) = &st.tree_root else {
                        return Err(self.err_at(
                            at,
                            format!("strategy `{}` needs tree_root = \"NODE\" (the node where this strategy starts)", st.name),
                        ));
                    };
                    let Some(r) = tr.nodes.iter().position(|n| n.id == *root.get_ref()) else {
                        return Err(self.err_at(
                            root.span().start,
                            format!(
                                "strategy `{}`: tree_root `{}` is not a node",
                                st.name,
                                root.get_ref()
                            ),
                        ));
                    };
                    if st.transitions.is_some() {
                        return Err(self.err_at(
                            at,
                            format!("strategy `{}`: transitions are for Markov models", st.name),
                        ));
                    }
                    (Vec::new(), false, false, r)
                }
            };
            strategies.push(Strategy {
                name: st.name.clone(),
                label: st.label.clone().unwrap_or_else(|| st.name.clone()),
                description: st.description.clone().unwrap_or_default(),
                static_exprs,
                dynamic_exprs,
                dynamic_names,
                matrix,
                matrix_dynamic,
                values_dynamic,
                matrix_reads_time,
                values_read_time,
                tree_root,
                overrides,
            });
        }

        // ------------------------------------------------------------ meta
        let effect = match raw
            .model
            .effect
            .as_ref()
            .map(|e| (e.get_ref().as_str(), e.span().start))
        {
            None | Some(("qalys" | "qaly", _)) => Effect::Qalys,
            Some(("life_years" | "life-years" | "lys", _)) => Effect::LifeYears,
            Some((o, at)) => match outcome_idx.get(o) {
                Some(&i) => Effect::Outcome(i),
                None => {
                    return Err(self.err_at(
                        at,
                        format!("effect = \"{o}\": use \"qalys\", \"life_years\" or a name declared under [outcomes]"),
                    ));
                }
            },
        };
        let effect_label = raw
            .model
            .effect_label
            .clone()
            .unwrap_or_else(|| match effect {
                Effect::Qalys => "QALYs".into(),
                Effect::LifeYears => "life-years".into(),
                Effect::Outcome(i) => outcomes[i].label.clone(),
            });
        let reference = match &raw.model.reference {
            None => 0,
            Some(r) => strategies
                .iter()
                .position(|s| s.name == *r.get_ref())
                .ok_or_else(|| {
                    self.err_at(
                        r.span().start,
                        format!("reference = \"{}\" is not a strategy name", r.get_ref()),
                    )
                })?,
        };

        let mut scenarios = Vec::new();
        for (name, sc) in &raw.scenarios {
            let mut set = Vec::new();
            for (p, v) in &sc.set {
                let Some(i) = params.iter().position(|x| x.name == *p) else {
                    return Err(
                        self.err(format!("[scenarios.{name}] set: `{p}` is not a parameter"))
                    );
                };
                set.push((i, *v));
            }
            scenarios.push(Scenario {
                name: name.clone(),
                label: sc.label.clone().unwrap_or_else(|| name.clone()),
                description: sc.description.clone().unwrap_or_default(),
                set,
            });
        }
        let mut measurements = Vec::new();
        for (key, m) in &raw.measurements {
            let Some(i) = params.iter().position(|x| x.name == m.parameter) else {
                return Err(self.err(format!(
                    "[measurements.\"{key}\"]: parameter `{}` is not declared",
                    m.parameter
                )));
            };
            measurements.push(Measurement {
                key: key.clone(),
                param: i,
                scale: m.scale,
            });
        }
        let mut two_way = Vec::new();
        for t in &raw.analysis.two_way {
            let find = |n: &str| {
                params
                    .iter()
                    .position(|x| x.name == n && x.range.is_some())
                    .ok_or_else(|| {
                        self.err(format!(
                            "[analysis] two_way: `{n}` must be a parameter with a `range`"
                        ))
                    })
            };
            two_way.push(TwoWaySpec {
                x: find(&t.x)?,
                y: find(&t.y)?,
                steps: t.steps.unwrap_or(11).clamp(2, 101),
            });
        }

        Ok(Model {
            meta: Meta {
                title: raw.model.title,
                kind,
                description: raw.model.description,
                currency: raw.model.currency.unwrap_or_else(|| "USD".into()),
                price_year: raw.model.price_year,
                perspective: raw.model.perspective,
                population: raw.model.population,
                setting: raw.model.setting,
                effect,
                effect_label,
                reference,
                authors: raw.model.authors,
                sources: raw.model.sources,
                cheers: raw.cheers,
            },
            settings: Settings {
                cycles,
                cycle_length,
                counting,
                discount_costs: s.discount_costs.unwrap_or(0.0),
                discount_effects: s.discount_effects.unwrap_or(0.0),
                discount_timing,
                wtp,
                wtp_grid,
                psa_iterations: s.psa_iterations.unwrap_or(1000),
                seed: s.seed.unwrap_or(1),
                population_size: s.population_size,
            },
            params,
            dirichlet,
            tables,
            table_names,
            table_sources,
            expr_texts: expr_src.into_iter().map(|(t, _)| t).collect(),
            expr_names,
            outcomes,
            structure,
            strategies,
            scenarios,
            measurements,
            two_way,
            tornado_top: raw.analysis.tornado_top.unwrap_or(15),
            source_path: None,
        })
    }

    /// A parameter's value may be written as arithmetic on numbers
    /// (`"1251/1734"`), so counts from a source can be kept visible.
    fn constant_value(&self, text: &str, at: usize, name: &str) -> Result<f64> {
        struct NoNames;
        impl Resolver for NoNames {
            fn slot(&self, _: &str) -> Option<usize> {
                None
            }
            fn table(&self, _: &str) -> Option<usize> {
                None
            }
            fn known_names(&self) -> Vec<String> {
                Vec::new()
            }
        }
        let what = format!("parameter `{name}` value");
        let ast =
            expr::parse(text).map_err(|e| self.err_at(at, format!("{what}: `{text}`: {e}")))?;
        let p = expr::compile(&ast, &NoNames).map_err(|_| {
            self.err_at(
                at,
                format!("{what}: `{text}` must use numbers only; put formulas that use other names under [expressions]"),
            )
        })?;
        Ok(p.eval(&[], &[]))
    }

    fn check_name(&self, name: &str, at: usize) -> Result<()> {
        let ok = name
            .chars()
            .next()
            .is_some_and(|c| c.is_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_alphanumeric() || c == '_');
        if !ok {
            return Err(self.err_at(
                at,
                format!("`{name}` is not a valid name: use letters, digits and _"),
            ));
        }
        if RESERVED.contains(&name) {
            return Err(self.err_at(at, format!("`{name}` is reserved; choose another name")));
        }
        Ok(())
    }

    fn compile_text(
        &self,
        text: &str,
        at: usize,
        what: &str,
        names: &Names<'_>,
    ) -> Result<Compiled> {
        let ast: Ast =
            expr::parse(text).map_err(|e| self.err_at(at, format!("{what}: `{text}`: {e}")))?;
        let program = expr::compile(&ast, names)
            .map_err(|e| self.err_at(at, format!("{what}: `{text}`: {e}")))?;
        Ok(Compiled {
            program,
            text: text.to_string(),
            deps: ast.variables(),
        })
    }

    fn compile_spanned(
        &self,
        src: &Spanned<NumOrExpr>,
        what: &str,
        names: &Names<'_>,
    ) -> Result<Compiled> {
        match src.get_ref() {
            NumOrExpr::Num(v) => Ok(Compiled {
                program: Program::constant(*v),
                text: fmt_const(*v),
                deps: vec![],
            }),
            NumOrExpr::Expr(s) => self.compile_text(s, src.span().start, what, names),
        }
    }

    fn compile_matrix(
        &self,
        src: &Spanned<Vec<Vec<Spanned<NumOrExpr>>>>,
        states: &[String],
        strategy: &str,
        names: &Names<'_>,
    ) -> Result<Vec<Entry>> {
        let n = states.len();
        let rows = src.get_ref();
        if rows.len() != n {
            return Err(self.err_at(
                src.span().start,
                format!("strategy `{strategy}`: the transition matrix has {} rows but there are {n} states", rows.len()),
            ));
        }
        let mut out = Vec::with_capacity(n * n);
        for (i, row) in rows.iter().enumerate() {
            if row.len() != n {
                let at = row
                    .first()
                    .map(|c| c.span().start)
                    .unwrap_or(src.span().start);
                return Err(self.err_at(
                    at,
                    format!("strategy `{strategy}`: row `{}` of the transition matrix has {} entries, expected {n}", states[i], row.len()),
                ));
            }
            let mut complements = 0;
            for (j, cell) in row.iter().enumerate() {
                let what = format!(
                    "strategy `{strategy}`, transition {} -> {}",
                    states[i], states[j]
                );
                let e = match cell.get_ref() {
                    NumOrExpr::Num(v) if *v == 0.0 => Entry::Zero,
                    NumOrExpr::Expr(s) if is_complement(s) => {
                        complements += 1;
                        Entry::Complement
                    }
                    _ => Entry::Expr(self.compile_spanned(cell, &what, names)?),
                };
                out.push(e);
            }
            if complements > 1 {
                return Err(self.err_at(
                    row[0].span().start,
                    format!(
                        "strategy `{strategy}`: row `{}` has more than one complement \"C\"",
                        states[i]
                    ),
                ));
            }
        }
        Ok(out)
    }

    /// Orders expressions so each comes after those it reads; reports a cycle
    /// by naming its members.
    fn topo_order(
        &self,
        names: &[String],
        programs: &[Compiled],
        strategy: &str,
    ) -> Result<Vec<usize>> {
        let idx: HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let mut state = vec![0u8; names.len()]; // 0 new, 1 on stack, 2 done
        let mut order = Vec::with_capacity(names.len());
        fn visit(
            i: usize,
            idx: &HashMap<&str, usize>,
            programs: &[Compiled],
            state: &mut [u8],
            order: &mut Vec<usize>,
            path: &mut Vec<usize>,
        ) -> std::result::Result<(), Vec<usize>> {
            if state[i] == 2 {
                return Ok(());
            }
            if state[i] == 1 {
                let pos = path.iter().position(|&p| p == i).unwrap_or(0);
                let mut cyc = path[pos..].to_vec();
                cyc.push(i);
                return Err(cyc);
            }
            state[i] = 1;
            path.push(i);
            for d in &programs[i].deps {
                if let Some(&j) = idx.get(d.as_str()) {
                    visit(j, idx, programs, state, order, path)?;
                }
            }
            path.pop();
            state[i] = 2;
            order.push(i);
            Ok(())
        }
        for i in 0..names.len() {
            let mut path = Vec::new();
            if let Err(cyc) = visit(i, &idx, programs, &mut state, &mut order, &mut path) {
                let chain: Vec<&str> = cyc.iter().map(|&k| names[k].as_str()).collect();
                return Err(self.err(format!(
                    "expressions refer to each other in a circle (strategy `{strategy}`): {}",
                    chain.join(" -> ")
                )));
            }
        }
        Ok(order)
    }
}

fn opt_compile(
    src: &Option<Spanned<NumOrExpr>>,
    what: &str,
    compile: &dyn Fn(&Spanned<NumOrExpr>, &str) -> Result<Compiled>,
    constant: &dyn Fn(f64) -> Compiled,
) -> Result<Compiled> {
    match src {
        Some(s) => compile(s, what),
        None => Ok(constant(0.0)),
    }
}

fn is_complement(s: &str) -> bool {
    matches!(s.trim(), "C" | "complement" | "#")
}

fn num_or_expr_text(v: &NumOrExpr) -> String {
    match v {
        NumOrExpr::Num(x) => fmt_const(*x),
        NumOrExpr::Expr(s) => s.clone(),
    }
}

fn fmt_const(v: f64) -> String {
    format!("{v}")
}
