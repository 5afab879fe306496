//! Arithmetic expressions over model parameters and the cycle number.
//!
//! Model files write transition probabilities, costs and utilities as small
//! expressions (`"1 - exp(-lambda * ((cycle - 1)^gamma - cycle^gamma))"`). This
//! module parses them once, resolves every name to a slot index, and compiles
//! them to a flat stack program, because the probabilistic sensitivity analysis
//! evaluates each of them hundreds of thousands of times.
//!
//! It owns the grammar and the evaluator; it knows nothing of models, strategies
//! or files (names are resolved through [`Resolver`]).

use std::fmt;

/// Why an expression could not be parsed or compiled. `column` is 1-based,
/// counted in characters from the start of the expression text.
#[derive(Debug, Clone, PartialEq)]
pub struct ExprError {
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "column {}: {}", self.column, self.message)
    }
}

impl std::error::Error for ExprError {}

/// A parsed expression, before names are resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum Ast {
    Num(f64),
    Var {
        name: String,
        column: usize,
    },
    Unary(UnOp, Box<Ast>),
    Binary(BinOp, Box<Ast>, Box<Ast>),
    Call {
        name: String,
        args: Vec<Ast>,
        column: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
}

impl Ast {
    /// Names of variables this expression reads (tables passed to `lookup` are
    /// not variables and are left out).
    pub fn variables(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_vars(&mut out);
        out.sort();
        out.dedup();
        out
    }

    fn collect_vars(&self, out: &mut Vec<String>) {
        match self {
            Ast::Num(_) => {}
            Ast::Var { name, .. } => out.push(name.clone()),
            Ast::Unary(_, a) => a.collect_vars(out),
            Ast::Binary(_, a, b) => {
                a.collect_vars(out);
                b.collect_vars(out);
            }
            Ast::Call { name, args, .. } => {
                let skip_first = is_table_function(name);
                for (i, a) in args.iter().enumerate() {
                    if skip_first && i == 0 {
                        continue;
                    }
                    a.collect_vars(out);
                }
            }
        }
    }
}

fn is_table_function(name: &str) -> bool {
    matches!(name, "lookup" | "interp")
}

// ---------------------------------------------------------------- lexer

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Ident(String),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
    End,
}

fn lex(src: &str) -> Result<Vec<(Tok, usize)>, ExprError> {
    let chars: Vec<char> = src.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < chars.len() {
        let c = chars[i];
        let col = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            if i < chars.len() && (chars[i] == 'e' || chars[i] == 'E') {
                let mut j = i + 1;
                if j < chars.len() && (chars[j] == '+' || chars[j] == '-') {
                    j += 1;
                }
                if j < chars.len() && chars[j].is_ascii_digit() {
                    i = j;
                    while i < chars.len() && chars[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
            let text: String = chars[start..i].iter().collect();
            let v: f64 = text.parse().map_err(|_| ExprError {
                column: col,
                message: format!("`{text}` is not a number"),
            })?;
            out.push((Tok::Num(v), col));
            continue;
        }
        if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((Tok::Ident(chars[start..i].iter().collect()), col));
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        let op2 = match two.as_str() {
            "<=" => Some("<="),
            ">=" => Some(">="),
            "==" => Some("=="),
            "!=" => Some("!="),
            "&&" => Some("&&"),
            "||" => Some("||"),
            "**" => Some("^"),
            _ => None,
        };
        if let Some(op) = op2 {
            out.push((Tok::Op(op), col));
            i += 2;
            continue;
        }
        let tok = match c {
            '+' => Tok::Op("+"),
            '-' => Tok::Op("-"),
            '*' => Tok::Op("*"),
            '/' => Tok::Op("/"),
            '^' => Tok::Op("^"),
            '<' => Tok::Op("<"),
            '>' => Tok::Op(">"),
            '!' => Tok::Op("!"),
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            ',' => Tok::Comma,
            _ => {
                return Err(ExprError {
                    column: col,
                    message: format!("unexpected character `{c}`"),
                });
            }
        };
        out.push((tok, col));
        i += 1;
    }
    out.push((Tok::End, chars.len() + 1));
    Ok(out)
}

// ---------------------------------------------------------------- parser

/// Parses an expression. Grammar (loosest binding first): `||`, `&&`,
/// comparisons, `+ -`, `* /`, unary `- !`, `^` (right-associative), then
/// numbers, names, calls and parentheses.
pub fn parse(src: &str) -> Result<Ast, ExprError> {
    let toks = lex(src)?;
    let mut p = Parser { toks, pos: 0 };
    let ast = p.expr(0)?;
    match &p.toks[p.pos] {
        (Tok::End, _) => Ok(ast),
        (t, col) => Err(ExprError {
            column: *col,
            message: format!("unexpected {} after a complete expression", describe(t)),
        }),
    }
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Num(v) => format!("number {v}"),
        Tok::Ident(s) => format!("name `{s}`"),
        Tok::Op(o) => format!("`{o}`"),
        Tok::LParen => "`(`".into(),
        Tok::RParen => "`)`".into(),
        Tok::Comma => "`,`".into(),
        Tok::End => "end of expression".into(),
    }
}

fn infix(op: &str) -> Option<(u8, u8, BinOp)> {
    // (left binding power, right binding power, operator)
    Some(match op {
        "||" => (1, 2, BinOp::Or),
        "&&" => (3, 4, BinOp::And),
        "<" => (5, 6, BinOp::Lt),
        "<=" => (5, 6, BinOp::Le),
        ">" => (5, 6, BinOp::Gt),
        ">=" => (5, 6, BinOp::Ge),
        "==" => (5, 6, BinOp::Eq),
        "!=" => (5, 6, BinOp::Ne),
        "+" => (7, 8, BinOp::Add),
        "-" => (7, 8, BinOp::Sub),
        "*" => (9, 10, BinOp::Mul),
        "/" => (9, 10, BinOp::Div),
        "^" => (14, 13, BinOp::Pow),
        _ => return None,
    })
}

const PREFIX_BP: u8 = 11;

impl Parser {
    fn next(&mut self) -> (Tok, usize) {
        let t = self.toks[self.pos].clone();
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn peek(&self) -> &Tok {
        &self.toks[self.pos].0
    }

    fn expr(&mut self, min_bp: u8) -> Result<Ast, ExprError> {
        let (tok, col) = self.next();
        let mut lhs = match tok {
            Tok::Num(v) => Ast::Num(v),
            Tok::Ident(name) => {
                if *self.peek() == Tok::LParen {
                    self.next();
                    let mut args = Vec::new();
                    if *self.peek() != Tok::RParen {
                        loop {
                            args.push(self.expr(0)?);
                            match self.next() {
                                (Tok::Comma, _) => continue,
                                (Tok::RParen, _) => break,
                                (t, c) => {
                                    return Err(ExprError {
                                        column: c,
                                        message: format!(
                                            "expected `,` or `)` in the arguments of `{name}`, found {}",
                                            describe(&t)
                                        ),
                                    });
                                }
                            }
                        }
                    } else {
                        self.next();
                    }
                    Ast::Call {
                        name,
                        args,
                        column: col,
                    }
                } else {
                    Ast::Var { name, column: col }
                }
            }
            Tok::Op("-") => Ast::Unary(UnOp::Neg, Box::new(self.expr(PREFIX_BP)?)),
            Tok::Op("+") => self.expr(PREFIX_BP)?,
            Tok::Op("!") => Ast::Unary(UnOp::Not, Box::new(self.expr(PREFIX_BP)?)),
            Tok::LParen => {
                let inner = self.expr(0)?;
                match self.next() {
                    (Tok::RParen, _) => inner,
                    (t, c) => {
                        return Err(ExprError {
                            column: c,
                            message: format!("expected `)`, found {}", describe(&t)),
                        });
                    }
                }
            }
            t => {
                return Err(ExprError {
                    column: col,
                    message: format!("expected a number, a name or `(`, found {}", describe(&t)),
                });
            }
        };
        while let Tok::Op(op) = self.peek() {
            let Some((lbp, rbp, bin)) = infix(op) else {
                break;
            };
            if lbp < min_bp {
                break;
            }
            self.next();
            let rhs = self.expr(rbp)?;
            lhs = Ast::Binary(bin, Box::new(lhs), Box::new(rhs));
        }
        Ok(lhs)
    }
}

// ---------------------------------------------------------------- tables

/// How a lookup table maps an argument between its break points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Interpolation {
    /// Value of the last break point at or below the argument (age bands of a
    /// life table).
    Step,
    /// Linear between break points, constant outside them.
    Linear,
}

/// A one-dimensional table, e.g. mortality by age.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Table {
    pub x: Vec<f64>,
    pub y: Vec<f64>,
    pub interpolation: Interpolation,
}

impl Table {
    pub fn get(&self, x: f64, how: Interpolation) -> f64 {
        let n = self.x.len();
        if x <= self.x[0] {
            return self.y[0];
        }
        if x >= self.x[n - 1] {
            return self.y[n - 1];
        }
        // Largest i with x[i] <= x; tables are short, so a binary search is
        // cheap and predictable.
        let i = self.x.partition_point(|&b| b <= x) - 1;
        match how {
            Interpolation::Step => self.y[i],
            Interpolation::Linear => {
                let (x0, x1) = (self.x[i], self.x[i + 1]);
                let (y0, y1) = (self.y[i], self.y[i + 1]);
                y0 + (y1 - y0) * (x - x0) / (x1 - x0)
            }
        }
    }
}

// ---------------------------------------------------------------- compiler

/// Maps names to slots and tables; implemented by the model compiler.
pub trait Resolver {
    fn slot(&self, name: &str) -> Option<usize>;
    fn table(&self, name: &str) -> Option<usize>;
    /// Names offered in "unknown name" errors.
    fn known_names(&self) -> Vec<String>;
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Const(f64),
    Load(u32),
    Neg,
    Not,
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
    Exp,
    Ln,
    Log10,
    Sqrt,
    Abs,
    Floor,
    Ceil,
    Round,
    Min,
    Max,
    If,
    RateToProb,
    ProbToRate,
    Lookup(u32, Interpolation),
}

/// The operations that compute a value from the values on top of the stack, written once
/// for the scalar and the lane evaluators (so that both perform the same IEEE operations):
/// each caller defines `$un!(f)` and `$bin!(f)` to apply `f` to its own stack.
macro_rules! arithmetic {
    ($op:expr, $tables:expr, $un:ident, $bin:ident) => {{
        let truth = |b: bool| if b { 1.0 } else { 0.0 };
        match $op {
            Op::Neg => $un!(|a: f64| -a),
            Op::Not => $un!(|a: f64| truth(a == 0.0)),
            Op::Add => $bin!(|a, b| a + b),
            Op::Sub => $bin!(|a, b| a - b),
            Op::Mul => $bin!(|a, b| a * b),
            Op::Div => $bin!(|a, b| a / b),
            Op::Pow => $bin!(pow),
            Op::Lt => $bin!(|a, b| truth(a < b)),
            Op::Le => $bin!(|a, b| truth(a <= b)),
            Op::Gt => $bin!(|a, b| truth(a > b)),
            Op::Ge => $bin!(|a, b| truth(a >= b)),
            Op::Eq => $bin!(|a, b| truth(a == b)),
            Op::Ne => $bin!(|a, b| truth(a != b)),
            Op::And => $bin!(|a, b| truth(a != 0.0 && b != 0.0)),
            Op::Or => $bin!(|a, b| truth(a != 0.0 || b != 0.0)),
            Op::Exp => $un!(f64::exp),
            Op::Ln => $un!(f64::ln),
            Op::Log10 => $un!(f64::log10),
            Op::Sqrt => $un!(f64::sqrt),
            Op::Abs => $un!(f64::abs),
            Op::Floor => $un!(f64::floor),
            Op::Ceil => $un!(f64::ceil),
            Op::Round => $un!(f64::round),
            Op::Min => $bin!(f64::min),
            Op::Max => $bin!(f64::max),
            Op::RateToProb => $bin!(|r: f64, t: f64| 1.0 - (-r * t).exp()),
            Op::ProbToRate => $bin!(|p: f64, t: f64| -(1.0 - p).ln() / t),
            Op::Lookup(t, how) => $un!(|x| $tables[t as usize].get(x, how)),
            Op::Const(_) | Op::Load(_) | Op::If => {
                unreachable!("the evaluators handle constants, loads and `if` themselves")
            }
        }
    }};
}

/// A compiled expression: a stack program over a slot array.
#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    ops: Vec<Op>,
}

const MAX_STACK: usize = 32;

impl Program {
    pub fn constant(v: f64) -> Self {
        Program {
            ops: vec![Op::Const(v)],
        }
    }

    /// The value if the program reads no slot.
    pub fn as_constant(&self) -> Option<f64> {
        match self.ops.as_slice() {
            [Op::Const(v)] => Some(*v),
            _ => None,
        }
    }

    /// Evaluates the program. Allocates nothing; for hot loops prefer
    /// [`Program::eval_in`] with a reused stack.
    pub fn eval(&self, slots: &[f64], tables: &[Table]) -> f64 {
        if let [Op::Const(v)] = self.ops.as_slice() {
            return *v;
        }
        let mut stack = Vec::with_capacity(MAX_STACK);
        self.eval_in(slots, tables, &mut stack)
    }

    /// Evaluates with `stack` as scratch space (cleared first), so the PSA
    /// inner loop neither allocates nor zeroes a stack per evaluation.
    #[inline]
    pub fn eval_in(&self, slots: &[f64], tables: &[Table], st: &mut Vec<f64>) -> f64 {
        match self.ops.as_slice() {
            [Op::Const(v)] => return *v,
            [Op::Load(i)] => return slots[*i as usize],
            _ => {}
        }
        st.clear();
        macro_rules! bin {
            ($f:expr) => {{
                let b = st.pop().unwrap_or(f64::NAN);
                let a = st.last_mut().expect("compiled programs are balanced");
                *a = $f(*a, b);
            }};
        }
        macro_rules! un {
            ($f:expr) => {{
                let a = st.last_mut().expect("compiled programs are balanced");
                *a = $f(*a);
            }};
        }
        for op in &self.ops {
            match *op {
                Op::Const(v) => st.push(v),
                Op::Load(i) => st.push(slots[i as usize]),
                Op::If => {
                    let b = st.pop().unwrap_or(f64::NAN);
                    let a = st.pop().unwrap_or(f64::NAN);
                    let c = st.last_mut().expect("compiled programs are balanced");
                    *c = if *c != 0.0 { a } else { b };
                }
                arithmetic => arithmetic!(arithmetic, tables, un, bin),
            }
        }
        st.first().copied().unwrap_or(f64::NAN)
    }
}

/// Parameter sets evaluated together by [`Program::eval_lanes`].
pub const LANES: usize = 64;

/// One value per lane.
pub type Lanes = [f64; LANES];

/// A value on the stack of [`Program::eval_lanes`]: the same number in
/// every lane, a slot read in place, or a scratch array.
#[derive(Debug, Clone, Copy)]
enum LaneValue {
    Uniform(f64),
    Slot(u32),
    Scratch(u32),
}

impl Program {
    /// Evaluates the program for [`LANES`] slot vectors at once (`slots[k][l]`
    /// is slot k of lane l) into `out`, with `st` as scratch. Each lane gets
    /// exactly the operations, in the same order, as [`Program::eval_in`]
    /// would, so the results are bit for bit the same; the interpretation is
    /// paid once per program instead of once per lane.
    ///
    /// Constants stay scalars (an operation on two of them is done once, on
    /// the scalars) and slots are read where they are, so an array is
    /// written only for the result of an operation; the value at stack depth
    /// d that is not a scalar or a slot lives in `st[d]`.
    ///
    /// `same` lists slots known to hold the same value in every lane (the
    /// cycle number and time of a cohort run), with that value: they are
    /// treated as constants.
    #[inline(always)]
    pub fn eval_lanes(
        &self,
        slots: &[Lanes],
        same: &[(u32, f64)],
        tables: &[Table],
        st: &mut Vec<Lanes>,
        out: &mut Lanes,
    ) {
        match self.ops.as_slice() {
            [Op::Const(v)] => {
                *out = [*v; LANES];
                return;
            }
            [Op::Load(i)] => {
                *out = slots[*i as usize];
                return;
            }
            _ => {}
        }
        if st.len() < MAX_STACK {
            st.resize(MAX_STACK, [0.0; LANES]);
        }
        let mut vals = [LaneValue::Uniform(f64::NAN); MAX_STACK];
        let mut depth = 0usize;
        macro_rules! un {
            ($f:expr) => {{
                let d = depth - 1;
                vals[d] = lanes_un(slots, st, vals[d], d, $f);
            }};
        }
        macro_rules! bin {
            ($f:expr) => {{
                depth -= 1;
                let d = depth - 1;
                vals[d] = lanes_bin(slots, st, vals[d], vals[depth], d, $f);
            }};
        }
        for op in &self.ops {
            match *op {
                Op::Const(v) => {
                    vals[depth] = LaneValue::Uniform(v);
                    depth += 1;
                }
                Op::Load(i) => {
                    vals[depth] = match same.iter().find(|(k, _)| *k == i) {
                        Some(&(_, v)) => LaneValue::Uniform(v),
                        None => LaneValue::Slot(i),
                    };
                    depth += 1;
                }
                Op::If => {
                    depth -= 2;
                    let d = depth - 1;
                    let (c, a, b) = (vals[d], vals[d + 1], vals[d + 2]);
                    vals[d] = match c {
                        // The same branch in every lane: take it as it is.
                        LaneValue::Uniform(c) => {
                            let v = if c != 0.0 { a } else { b };
                            match v {
                                LaneValue::Scratch(k) if k as usize != d => {
                                    st[d] = st[k as usize];
                                    LaneValue::Scratch(d as u32)
                                }
                                v => v,
                            }
                        }
                        _ => {
                            let r: Lanes = {
                                let cv = lanes_of(slots, st, c);
                                let (ua, ub) = (uniform(a), uniform(b));
                                let av = lanes_of(slots, st, a);
                                let bv = lanes_of(slots, st, b);
                                std::array::from_fn(|l| {
                                    let x = ua.unwrap_or_else(|| av[l]);
                                    let y = ub.unwrap_or_else(|| bv[l]);
                                    if cv[l] != 0.0 { x } else { y }
                                })
                            };
                            st[d] = r;
                            LaneValue::Scratch(d as u32)
                        }
                    };
                }
                arithmetic => arithmetic!(arithmetic, tables, un, bin),
            }
        }
        *out = match vals[0] {
            LaneValue::Uniform(v) => [v; LANES],
            v => *lanes_of(slots, st, v),
        };
    }
}

/// The scalar of a uniform value.
#[inline(always)]
fn uniform(v: LaneValue) -> Option<f64> {
    match v {
        LaneValue::Uniform(x) => Some(x),
        _ => None,
    }
}

/// The lanes of a slot or scratch value (a uniform value has none: callers
/// read its scalar instead, and get a dummy here).
#[inline(always)]
fn lanes_of<'a>(slots: &'a [Lanes], st: &'a [Lanes], v: LaneValue) -> &'a Lanes {
    match v {
        LaneValue::Slot(i) => &slots[i as usize],
        LaneValue::Scratch(k) => &st[k as usize],
        LaneValue::Uniform(_) => &st[0],
    }
}

/// `f` of one value; the result goes to scratch array `d` unless it is
/// uniform.
#[inline(always)]
fn lanes_un(
    slots: &[Lanes],
    st: &mut [Lanes],
    a: LaneValue,
    d: usize,
    f: impl Fn(f64) -> f64,
) -> LaneValue {
    if let LaneValue::Uniform(x) = a {
        return LaneValue::Uniform(f(x));
    }
    let av = lanes_of(slots, st, a);
    let r: Lanes = std::array::from_fn(|l| f(av[l]));
    st[d] = r;
    LaneValue::Scratch(d as u32)
}

/// `f` of two values; the result goes to scratch array `d` unless both are
/// uniform.
#[inline(always)]
fn lanes_bin(
    slots: &[Lanes],
    st: &mut [Lanes],
    a: LaneValue,
    b: LaneValue,
    d: usize,
    f: impl Fn(f64, f64) -> f64,
) -> LaneValue {
    let r: Lanes = match (a, b) {
        (LaneValue::Uniform(x), LaneValue::Uniform(y)) => return LaneValue::Uniform(f(x, y)),
        (LaneValue::Uniform(x), b) => {
            let bv = lanes_of(slots, st, b);
            std::array::from_fn(|l| f(x, bv[l]))
        }
        (a, LaneValue::Uniform(y)) => {
            let av = lanes_of(slots, st, a);
            std::array::from_fn(|l| f(av[l], y))
        }
        (a, b) => {
            let (av, bv) = (lanes_of(slots, st, a), lanes_of(slots, st, b));
            std::array::from_fn(|l| f(av[l], bv[l]))
        }
    };
    st[d] = r;
    LaneValue::Scratch(d as u32)
}

/// `a^b` with an exact result for `0^b`, b > 0, which `powf` already gives;
/// kept as a function so the evaluator has one place to change.
#[inline]
fn pow(a: f64, b: f64) -> f64 {
    if b == 1.0 {
        a
    } else if b == 2.0 {
        a * a
    } else {
        a.powf(b)
    }
}

/// Compiles `ast` against `resolver`, folding constant sub-expressions.
pub fn compile(ast: &Ast, resolver: &dyn Resolver) -> Result<Program, ExprError> {
    let mut ops = Vec::new();
    emit(ast, resolver, &mut ops)?;
    let ops = fold(ops);
    let mut depth = 0usize;
    let mut max_depth = 0usize;
    for op in &ops {
        depth = (depth as isize + stack_effect(op)) as usize;
        max_depth = max_depth.max(depth);
    }
    if max_depth > MAX_STACK {
        return Err(ExprError {
            column: 1,
            message: format!(
                "expression is nested too deeply ({max_depth} levels, at most {MAX_STACK}); split it into named expressions"
            ),
        });
    }
    Ok(Program { ops })
}

fn stack_effect(op: &Op) -> isize {
    match op {
        Op::Const(_) | Op::Load(_) => 1,
        Op::Neg
        | Op::Not
        | Op::Exp
        | Op::Ln
        | Op::Log10
        | Op::Sqrt
        | Op::Abs
        | Op::Floor
        | Op::Ceil
        | Op::Round
        | Op::Lookup(..) => 0,
        Op::If => -2,
        _ => -1,
    }
}

fn emit(ast: &Ast, r: &dyn Resolver, ops: &mut Vec<Op>) -> Result<(), ExprError> {
    match ast {
        Ast::Num(v) => ops.push(Op::Const(*v)),
        Ast::Var { name, column } => match r.slot(name) {
            Some(i) => ops.push(Op::Load(i as u32)),
            None => {
                let mut known = r.known_names();
                known.sort();
                let hint = suggest(name, &known);
                return Err(ExprError {
                    column: *column,
                    message: format!(
                        "unknown name `{name}`{hint}; declare it under [parameters] or [expressions], or use `cycle` / `time`"
                    ),
                });
            }
        },
        Ast::Unary(op, a) => {
            emit(a, r, ops)?;
            ops.push(match op {
                UnOp::Neg => Op::Neg,
                UnOp::Not => Op::Not,
            });
        }
        Ast::Binary(op, a, b) => {
            emit(a, r, ops)?;
            emit(b, r, ops)?;
            ops.push(match op {
                BinOp::Add => Op::Add,
                BinOp::Sub => Op::Sub,
                BinOp::Mul => Op::Mul,
                BinOp::Div => Op::Div,
                BinOp::Pow => Op::Pow,
                BinOp::Lt => Op::Lt,
                BinOp::Le => Op::Le,
                BinOp::Gt => Op::Gt,
                BinOp::Ge => Op::Ge,
                BinOp::Eq => Op::Eq,
                BinOp::Ne => Op::Ne,
                BinOp::And => Op::And,
                BinOp::Or => Op::Or,
            });
        }
        Ast::Call { name, args, column } => {
            let arity_err = |want: &str| ExprError {
                column: *column,
                message: format!("`{name}` takes {want} argument(s), got {}", args.len()),
            };
            let unary = |op: Op, ops: &mut Vec<Op>| -> Result<(), ExprError> {
                if args.len() != 1 {
                    return Err(arity_err("1"));
                }
                emit(&args[0], r, ops)?;
                ops.push(op);
                Ok(())
            };
            match name.as_str() {
                "exp" => unary(Op::Exp, ops)?,
                "ln" | "log" => unary(Op::Ln, ops)?,
                "log10" => unary(Op::Log10, ops)?,
                "sqrt" => unary(Op::Sqrt, ops)?,
                "abs" => unary(Op::Abs, ops)?,
                "floor" => unary(Op::Floor, ops)?,
                "ceil" => unary(Op::Ceil, ops)?,
                "round" => unary(Op::Round, ops)?,
                "pow" => {
                    if args.len() != 2 {
                        return Err(arity_err("2"));
                    }
                    emit(&args[0], r, ops)?;
                    emit(&args[1], r, ops)?;
                    ops.push(Op::Pow);
                }
                "min" | "max" => {
                    if args.is_empty() {
                        return Err(arity_err("at least 1"));
                    }
                    emit(&args[0], r, ops)?;
                    for a in &args[1..] {
                        emit(a, r, ops)?;
                        ops.push(if name == "min" { Op::Min } else { Op::Max });
                    }
                }
                "if" => {
                    if args.len() != 3 {
                        return Err(arity_err("3 (condition, value if true, value if false)"));
                    }
                    for a in args {
                        emit(a, r, ops)?;
                    }
                    ops.push(Op::If);
                }
                "rate_to_prob" | "prob_to_rate" => {
                    if args.is_empty() || args.len() > 2 {
                        return Err(arity_err("1 or 2 (value, time = 1)"));
                    }
                    emit(&args[0], r, ops)?;
                    match args.get(1) {
                        Some(t) => emit(t, r, ops)?,
                        None => ops.push(Op::Const(1.0)),
                    }
                    ops.push(if name == "rate_to_prob" {
                        Op::RateToProb
                    } else {
                        Op::ProbToRate
                    });
                }
                "lookup" | "interp" => {
                    if args.len() != 2 {
                        return Err(arity_err("2 (table, value)"));
                    }
                    let Ast::Var {
                        name: tname,
                        column: tcol,
                    } = &args[0]
                    else {
                        return Err(ExprError {
                            column: *column,
                            message: format!(
                                "the first argument of `{name}` must be a table name from [tables]"
                            ),
                        });
                    };
                    let Some(t) = r.table(tname) else {
                        return Err(ExprError {
                            column: *tcol,
                            message: format!(
                                "unknown table `{tname}`; declare it under [tables.{tname}]"
                            ),
                        });
                    };
                    emit(&args[1], r, ops)?;
                    let how = if name == "lookup" {
                        Interpolation::Step
                    } else {
                        Interpolation::Linear
                    };
                    ops.push(Op::Lookup(t as u32, how));
                }
                _ => {
                    return Err(ExprError {
                        column: *column,
                        message: format!(
                            "unknown function `{name}`; available: exp, ln, log10, sqrt, abs, floor, ceil, round, pow, min, max, if, rate_to_prob, prob_to_rate, lookup, interp"
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Folds operations whose operands are constants, so a matrix entry written as
/// `350/1734` costs one load at run time.
fn fold(ops: Vec<Op>) -> Vec<Op> {
    let mut out: Vec<Op> = Vec::with_capacity(ops.len());
    for op in ops {
        let arity = match op {
            Op::Const(_) | Op::Load(_) | Op::Lookup(..) => 0,
            Op::If => 3,
            o if stack_effect(&o) == 0 => 1,
            _ => 2,
        };
        let n = out.len();
        if arity > 0 && n >= arity && out[n - arity..].iter().all(|o| matches!(o, Op::Const(_))) {
            let mut tmp = out[n - arity..].to_vec();
            tmp.push(op);
            let v = Program { ops: tmp }.eval(&[], &[]);
            out.truncate(n - arity);
            out.push(Op::Const(v));
        } else {
            out.push(op);
        }
    }
    out
}

fn suggest(name: &str, known: &[String]) -> String {
    let lower = name.to_lowercase();
    let close: Vec<&String> = known
        .iter()
        .filter(|k| {
            let kl = k.to_lowercase();
            kl == lower
                || kl.contains(&lower)
                || lower.contains(&kl)
                || edit_distance(&kl, &lower) <= 2
        })
        .take(3)
        .collect();
    if close.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = close.iter().map(|k| format!("`{k}`")).collect();
        format!(" (did you mean {}?)", list.join(" or "))
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    struct R;
    impl Resolver for R {
        fn slot(&self, name: &str) -> Option<usize> {
            ["a", "b", "cycle"].iter().position(|n| *n == name)
        }
        fn table(&self, name: &str) -> Option<usize> {
            (name == "t").then_some(0)
        }
        fn known_names(&self) -> Vec<String> {
            vec!["a".into(), "b".into(), "cycle".into()]
        }
    }

    fn ev(src: &str, slots: &[f64]) -> f64 {
        let tables = vec![Table {
            x: vec![35.0, 45.0, 55.0],
            y: vec![1.0, 2.0, 3.0],
            interpolation: Interpolation::Step,
        }];
        compile(&parse(src).unwrap(), &R)
            .unwrap()
            .eval(slots, &tables)
    }

    #[test]
    fn precedence_and_associativity() {
        assert_eq!(ev("1 + 2 * 3", &[]), 7.0);
        assert_eq!(ev("2 ^ 3 ^ 2", &[]), 512.0);
        assert_eq!(ev("-2 ^ 2", &[]), -4.0);
        assert_eq!(ev("(1 + 2) * 3", &[]), 9.0);
        assert_eq!(ev("10 - 4 - 3", &[]), 3.0);
        assert_eq!(ev("1 < 2 && 3 >= 3", &[]), 1.0);
        assert_eq!(ev("!(1 == 1) || 0", &[]), 0.0);
        assert_eq!(ev("1.5e-3 * 1000", &[]), 1.5);
    }

    #[test]
    fn variables_functions_and_tables() {
        let s = [2.0, 3.0, 4.0];
        assert_eq!(ev("a * b + cycle", &s), 10.0);
        assert_eq!(ev("if(cycle <= 2, a, b)", &s), 3.0);
        assert_eq!(ev("min(a, b, 1)", &s), 1.0);
        assert_eq!(ev("max(a, b)", &s), 3.0);
        assert!((ev("rate_to_prob(ln(2))", &s) - 0.5).abs() < 1e-15);
        assert!((ev("prob_to_rate(0.5, 2)", &s) - 2f64.ln() / 2.0).abs() < 1e-15);
        assert_eq!(ev("lookup(t, 44.9)", &s), 1.0);
        assert_eq!(ev("lookup(t, 45)", &s), 2.0);
        assert_eq!(ev("lookup(t, 99)", &s), 3.0);
        assert_eq!(ev("interp(t, 40)", &s), 1.5);
    }

    #[test]
    fn constant_folding_leaves_one_constant() {
        let p = compile(&parse("350/1734 * (1 - 0.5)").unwrap(), &R).unwrap();
        assert_eq!(p.as_constant(), Some(350.0 / 1734.0 * 0.5));
        let p = compile(&parse("a * 2").unwrap(), &R).unwrap();
        assert_eq!(p.as_constant(), None);
    }

    #[test]
    fn errors_point_at_the_problem() {
        let e = compile(&parse("a + c").unwrap(), &R).unwrap_err();
        assert_eq!(e.column, 5);
        assert!(e.message.contains("unknown name `c`"), "{}", e.message);
        let e = parse("a + * b").unwrap_err();
        assert_eq!(e.column, 5);
        let e = parse("(a + b").unwrap_err();
        assert!(e.message.contains("expected `)`"));
        let e = compile(&parse("foo(a)").unwrap(), &R).unwrap_err();
        assert!(e.message.contains("unknown function `foo`"));
        let e = compile(&parse("lookup(q, a)").unwrap(), &R).unwrap_err();
        assert!(e.message.contains("unknown table `q`"));
        let e = parse("a $ b").unwrap_err();
        assert!(e.message.contains("unexpected character"));
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn lanes_give_the_scalar_results_bit_for_bit() {
        let tables = vec![Table {
            x: vec![35.0, 45.0, 55.0],
            y: vec![1.0, 2.0, 3.0],
            interpolation: Interpolation::Linear,
        }];
        let mut slots = vec![[0.0; LANES]; 3];
        for l in 0..LANES {
            slots[0][l] = 0.37 * l as f64 - 3.1;
            slots[1][l] = 1.0 + (l as f64).sqrt() / 7.0;
            slots[2][l] = (l % 5) as f64;
        }
        let mut st = Vec::new();
        let mut out = [0.0; LANES];
        for src in [
            "a * b + cycle",
            "if(cycle <= 2, a, b) ^ 1.7",
            "1 - exp(-b * ((cycle - 1)^b - cycle^b))",
            "interp(t, 40 + a) / max(b, 1.1, a) - !(a > 0) || 0",
            "rate_to_prob(b, 0.5) + prob_to_rate(0.2) + sqrt(abs(a)) + round(a) + floor(b) + ceil(-a) + log10(b) + ln(b) + min(a, 2) * -a",
            "a",
            "3",
        ] {
            let p = compile(&parse(src).unwrap(), &R).unwrap();
            p.eval_lanes(&slots, &[], &tables, &mut st, &mut out);
            for l in 0..LANES {
                let scalar: Vec<f64> = slots.iter().map(|s| s[l]).collect();
                let want = p.eval(&scalar, &tables);
                assert_eq!(out[l].to_bits(), want.to_bits(), "{src}, lane {l}");
            }
            // The same with slot 2 (`cycle`) declared uniform.
            let mut uniform = slots.clone();
            uniform[2] = [3.0; LANES];
            p.eval_lanes(&uniform, &[(2, 3.0)], &tables, &mut st, &mut out);
            for l in 0..LANES {
                let scalar: Vec<f64> = uniform.iter().map(|s| s[l]).collect();
                let want = p.eval(&scalar, &tables);
                assert_eq!(
                    out[l].to_bits(),
                    want.to_bits(),
                    "{src}, uniform cycle, lane {l}"
                );
            }
        }
    }

    #[test]
    fn variables_exclude_table_names() {
        let ast = parse("lookup(t, a + cycle) * b").unwrap();
        assert_eq!(ast.variables(), vec!["a", "b", "cycle"]);
    }
}
