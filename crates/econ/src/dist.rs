//! Probability distributions for probabilistic sensitivity analysis.
//!
//! The samplers are written here rather than taken from a distributions crate
//! so that a seed gives the same draws on every machine and every version of
//! our dependencies: the only external source of randomness is the ChaCha
//! stream, whose output is fixed by its specification.
//!
//! Parameters may be given directly (alpha/beta, shape/scale, ...) or as a mean
//! and standard deviation, converted by the method of moments.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// A distribution as written in a model file:
/// `dist = { type = "beta", mean = 0.2, sd = 0.05 }`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub mean: Option<f64>,
    pub sd: Option<f64>,
    pub alpha: Option<f64>,
    pub beta: Option<f64>,
    pub shape: Option<f64>,
    pub scale: Option<f64>,
    pub rate: Option<f64>,
    pub meanlog: Option<f64>,
    pub sdlog: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub mode: Option<f64>,
}

/// A resolved univariate distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Dist {
    Fixed,
    Normal { mean: f64, sd: f64 },
    LogNormal { meanlog: f64, sdlog: f64 },
    Beta { alpha: f64, beta: f64 },
    Gamma { shape: f64, scale: f64 },
    Uniform { min: f64, max: f64 },
    Triangular { min: f64, mode: f64, max: f64 },
}

impl DistSpec {
    /// Resolves the written form; the error says which fields are missing or
    /// inconsistent.
    pub fn resolve(&self) -> Result<Dist, String> {
        let need = |v: Option<f64>, name: &str| -> Result<f64, String> {
            v.ok_or_else(|| format!("a {} distribution needs `{name}`", self.kind))
        };
        let positive = |v: f64, name: &str| -> Result<f64, String> {
            if v > 0.0 && v.is_finite() {
                Ok(v)
            } else {
                Err(format!("`{name}` must be a positive number, got {v}"))
            }
        };
        let d = match self.kind.to_ascii_lowercase().as_str() {
            "fixed" | "none" | "constant" => Dist::Fixed,
            "normal" => Dist::Normal {
                mean: need(self.mean, "mean")?,
                sd: positive(need(self.sd, "sd")?, "sd")?,
            },
            "lognormal" | "log-normal" => match (self.meanlog, self.sdlog) {
                (Some(ml), Some(sl)) => Dist::LogNormal {
                    meanlog: ml,
                    sdlog: positive(sl, "sdlog")?,
                },
                _ => {
                    let m = positive(need(self.mean, "mean (or meanlog and sdlog)")?, "mean")?;
                    let s = positive(need(self.sd, "sd (or meanlog and sdlog)")?, "sd")?;
                    // Moments of the log-normal: the mean and SD are those of
                    // the parameter itself, not of its logarithm.
                    let sdlog2 = (1.0 + (s * s) / (m * m)).ln();
                    Dist::LogNormal {
                        meanlog: m.ln() - sdlog2 / 2.0,
                        sdlog: sdlog2.sqrt(),
                    }
                }
            },
            "beta" => match (self.alpha, self.beta) {
                (Some(a), Some(b)) => Dist::Beta {
                    alpha: positive(a, "alpha")?,
                    beta: positive(b, "beta")?,
                },
                _ => {
                    let m = need(self.mean, "mean (or alpha and beta)")?;
                    let s = positive(need(self.sd, "sd (or alpha and beta)")?, "sd")?;
                    if !(0.0 < m && m < 1.0) {
                        return Err(format!(
                            "a beta mean must lie strictly between 0 and 1, got {m}"
                        ));
                    }
                    let var = s * s;
                    if var >= m * (1.0 - m) {
                        return Err(format!(
                            "sd {s} is too large for a beta with mean {m}: the variance must be below mean*(1-mean) = {}",
                            m * (1.0 - m)
                        ));
                    }
                    let common = m * (1.0 - m) / var - 1.0;
                    Dist::Beta {
                        alpha: m * common,
                        beta: (1.0 - m) * common,
                    }
                }
            },
            "gamma" => match (self.shape, self.scale, self.rate) {
                (Some(k), Some(th), None) => Dist::Gamma {
                    shape: positive(k, "shape")?,
                    scale: positive(th, "scale")?,
                },
                (Some(k), None, Some(r)) => Dist::Gamma {
                    shape: positive(k, "shape")?,
                    scale: 1.0 / positive(r, "rate")?,
                },
                _ => {
                    let m = positive(need(self.mean, "mean (or shape and scale)")?, "mean")?;
                    let s = positive(need(self.sd, "sd (or shape and scale)")?, "sd")?;
                    Dist::Gamma {
                        shape: (m * m) / (s * s),
                        scale: (s * s) / m,
                    }
                }
            },
            "uniform" => {
                let (lo, hi) = (need(self.min, "min")?, need(self.max, "max")?);
                if lo >= hi {
                    return Err(format!("uniform needs min < max, got {lo} and {hi}"));
                }
                Dist::Uniform { min: lo, max: hi }
            }
            "triangular" => {
                let (lo, mo, hi) = (
                    need(self.min, "min")?,
                    need(self.mode, "mode")?,
                    need(self.max, "max")?,
                );
                if !(lo <= mo && mo <= hi && lo < hi) {
                    return Err(format!(
                        "triangular needs min <= mode <= max and min < max, got {lo}, {mo}, {hi}"
                    ));
                }
                Dist::Triangular {
                    min: lo,
                    mode: mo,
                    max: hi,
                }
            }
            other => {
                return Err(format!(
                    "unknown distribution type `{other}`; use normal, lognormal, beta, gamma, uniform, triangular or fixed (dirichlet goes under [dirichlet.NAME])"
                ));
            }
        };
        Ok(d)
    }
}

impl Dist {
    pub fn mean(&self) -> Option<f64> {
        Some(match *self {
            Dist::Fixed => return None,
            Dist::Normal { mean, .. } => mean,
            Dist::LogNormal { meanlog, sdlog } => (meanlog + sdlog * sdlog / 2.0).exp(),
            Dist::Beta { alpha, beta } => alpha / (alpha + beta),
            Dist::Gamma { shape, scale } => shape * scale,
            Dist::Uniform { min, max } => (min + max) / 2.0,
            Dist::Triangular { min, mode, max } => (min + mode + max) / 3.0,
        })
    }

    pub fn sd(&self) -> Option<f64> {
        Some(match *self {
            Dist::Fixed => return None,
            Dist::Normal { sd, .. } => sd,
            Dist::LogNormal { meanlog, sdlog } => {
                let s2 = sdlog * sdlog;
                ((s2.exp() - 1.0) * (2.0 * meanlog + s2).exp()).sqrt()
            }
            Dist::Beta { alpha, beta } => {
                let n = alpha + beta;
                (alpha * beta / (n * n * (n + 1.0))).sqrt()
            }
            Dist::Gamma { shape, scale } => shape.sqrt() * scale,
            Dist::Uniform { min, max } => (max - min) / 12f64.sqrt(),
            Dist::Triangular { min, mode, max } => {
                ((min * min + mode * mode + max * max - min * mode - min * max - mode * max) / 18.0)
                    .sqrt()
            }
        })
    }

    /// One-line description for reports, e.g. `Beta(α=12.0, β=48.0)`.
    pub fn describe(&self) -> String {
        match *self {
            Dist::Fixed => "fixed".into(),
            Dist::Normal { mean, sd } => format!("Normal(mean={}, sd={})", g(mean), g(sd)),
            Dist::LogNormal { meanlog, sdlog } => {
                format!("LogNormal(meanlog={}, sdlog={})", g(meanlog), g(sdlog))
            }
            Dist::Beta { alpha, beta } => format!("Beta(α={}, β={})", g(alpha), g(beta)),
            Dist::Gamma { shape, scale } => {
                format!("Gamma(shape={}, scale={})", g(shape), g(scale))
            }
            Dist::Uniform { min, max } => format!("Uniform({}, {})", g(min), g(max)),
            Dist::Triangular { min, mode, max } => {
                format!("Triangular({}, {}, {})", g(min), g(mode), g(max))
            }
        }
    }

    /// Draws one value; `base` is returned for a fixed parameter. For many
    /// draws, [`Dist::prepare`] once and sample the [`Sampler`].
    pub fn sample<R: Rng + ?Sized>(&self, base: f64, rng: &mut R) -> f64 {
        self.prepare().sample(base, rng)
    }

    /// The distribution with the constants of its sampler worked out once.
    pub fn prepare(&self) -> Sampler {
        match *self {
            Dist::Fixed => Sampler::Fixed,
            Dist::Normal { mean, sd } => Sampler::Normal { mean, sd },
            Dist::LogNormal { meanlog, sdlog } => Sampler::LogNormal { meanlog, sdlog },
            Dist::Beta { alpha, beta } => Sampler::Beta(Gamma::new(alpha), Gamma::new(beta)),
            Dist::Gamma { shape, scale } => Sampler::Gamma(Gamma::new(shape), scale),
            Dist::Uniform { min, max } => Sampler::Uniform { min, max },
            Dist::Triangular { min, mode, max } => Sampler::Triangular { min, mode, max },
        }
    }
}

/// A [`Dist`] ready for repeated sampling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    Fixed,
    Normal { mean: f64, sd: f64 },
    LogNormal { meanlog: f64, sdlog: f64 },
    Beta(Gamma, Gamma),
    Gamma(Gamma, f64),
    Uniform { min: f64, max: f64 },
    Triangular { min: f64, mode: f64, max: f64 },
}

impl Sampler {
    /// Draws one value from each stream into `out` (the same as [`Sampler::sample`] on each
    /// in turn), with the choice of distribution made once rather than per draw.
    #[inline]
    pub fn sample_each<R: Rng>(&self, base: f64, rngs: &mut [R], out: &mut [f64]) {
        macro_rules! each {
            ($rng:ident => $draw:expr) => {
                for (o, $rng) in out.iter_mut().zip(rngs.iter_mut()) {
                    *o = $draw;
                }
            };
        }
        match *self {
            Sampler::Gamma(g, scale) => each!(rng => g.sample(rng) * scale),
            Sampler::LogNormal { meanlog, sdlog } => {
                each!(rng => (meanlog + sdlog * std_normal(rng)).exp())
            }
            Sampler::Normal { mean, sd } => each!(rng => mean + sd * std_normal(rng)),
            _ => each!(rng => self.sample(base, rng)),
        }
    }

    /// Draws one value; `base` is returned for a fixed parameter.
    #[inline]
    pub fn sample<R: Rng + ?Sized>(&self, base: f64, rng: &mut R) -> f64 {
        match *self {
            Sampler::Fixed => base,
            Sampler::Normal { mean, sd } => mean + sd * std_normal(rng),
            Sampler::LogNormal { meanlog, sdlog } => (meanlog + sdlog * std_normal(rng)).exp(),
            Sampler::Beta(a, b) => {
                let x = a.sample(rng);
                let y = b.sample(rng);
                x / (x + y)
            }
            Sampler::Gamma(g, scale) => g.sample(rng) * scale,
            Sampler::Uniform { min, max } => min + (max - min) * unit(rng),
            Sampler::Triangular { min, mode, max } => {
                let u = unit(rng);
                let f = (mode - min) / (max - min);
                if u < f {
                    min + ((max - min) * (mode - min) * u).sqrt()
                } else {
                    max - ((max - min) * (max - mode) * (1.0 - u)).sqrt()
                }
            }
        }
    }
}

fn g(v: f64) -> String {
    crate::report::fmt_num(v, 4)
}

/// Uniform on [0, 1).
#[inline]
fn unit<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    rng.r#gen::<f64>()
}

/// Layers of the ziggurat: 256, indexed by the low byte of a draw.
const ZIG_LAYERS: usize = 256;
/// Where the tail of the 256-layer normal ziggurat starts, and the area of
/// each layer (Marsaglia & Tsang 2000).
const ZIG_R: f64 = 3.654_152_885_361_009;
const ZIG_V: f64 = 4.928_673_233_99e-3;

/// Layer edges `x[i]` (x[0] is the base layer's equivalent width, x[1] = R,
/// x[256] = 0) and the density `f[i] = exp(-x[i]²/2)` there.
#[derive(Debug)]
struct Ziggurat {
    x: [f64; ZIG_LAYERS + 1],
    f: [f64; ZIG_LAYERS + 1],
}

impl Ziggurat {
    /// The 256 layers of equal area `v` under a decreasing `density` whose tail starts at
    /// `r`: each layer's edge is where the density reaches the top of the layer below
    /// (`inverse` is the density's inverse).
    fn build(
        r: f64,
        v: f64,
        density: impl Fn(f64) -> f64,
        inverse: impl Fn(f64) -> f64,
    ) -> Ziggurat {
        let mut x = [0.0; ZIG_LAYERS + 1];
        x[0] = v / density(r);
        x[1] = r;
        for i in 1..ZIG_LAYERS - 1 {
            x[i + 1] = inverse(v / x[i] + density(x[i]));
        }
        x[ZIG_LAYERS] = 0.0;
        let f = x.map(&density);
        Ziggurat { x, f }
    }
}

fn ziggurat() -> &'static Ziggurat {
    static TABLE: std::sync::OnceLock<Ziggurat> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        Ziggurat::build(
            ZIG_R,
            ZIG_V,
            |x| (-0.5 * x * x).exp(),
            |y| (-2.0 * y.ln()).sqrt(),
        )
    })
}

/// Standard normal by the ziggurat method (Marsaglia & Tsang 2000, 256
/// layers): one 64-bit draw gives the layer (low byte) and a signed abscissa
/// (high 53 bits); about 99% of draws are accepted without a transcendental
/// function.
#[inline(always)]
pub fn std_normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    let z = ziggurat();
    loop {
        let bits = rng.next_u64();
        let i = (bits & 0xff) as usize;
        // [-1, 1) from the top 53 bits.
        let u = (bits >> 11) as f64 * (2.0 / (1u64 << 53) as f64) - 1.0;
        let x = u * z.x[i];
        if x.abs() < z.x[i + 1] {
            return x;
        }
        if i == 0 {
            // The tail beyond R (Marsaglia 1964).
            loop {
                let a = -(1.0 - unit(rng)).ln() / ZIG_R;
                let b = -(1.0 - unit(rng)).ln();
                if 2.0 * b > a * a {
                    return if u < 0.0 { -(ZIG_R + a) } else { ZIG_R + a };
                }
            }
        }
        // The wedge between the layer's rectangle and the density.
        if z.f[i] + (z.f[i + 1] - z.f[i]) * unit(rng) < (-0.5 * x * x).exp() {
            return x;
        }
    }
}

/// Where the tail of the 256-layer exponential ziggurat starts, and the area of
/// each layer (Marsaglia & Tsang 2000).
const EXP_ZIG_R: f64 = 7.697_117_470_131_05;
const EXP_ZIG_V: f64 = 3.949_659_822_581_557e-3;

/// Layer edges and densities of the exponential ziggurat, laid out as
/// [`Ziggurat`]'s are for the normal one.
fn exp_ziggurat() -> &'static Ziggurat {
    static TABLE: std::sync::OnceLock<Ziggurat> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| Ziggurat::build(EXP_ZIG_R, EXP_ZIG_V, |x| (-x).exp(), |y| -y.ln()))
}

/// Exponential with rate one by the ziggurat method (Marsaglia & Tsang 2000,
/// 256 layers): one 64-bit draw gives the layer and the abscissa, and about
/// 99% of draws are accepted without a transcendental function. Gamma(1, 1).
#[inline(always)]
pub fn std_exponential<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    let z = exp_ziggurat();
    loop {
        let bits = rng.next_u64();
        let i = (bits & 0xff) as usize;
        let x = (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64) * z.x[i];
        if x < z.x[i + 1] {
            return x;
        }
        if i == 0 {
            // Beyond R the density is R's tail, itself exponential.
            return EXP_ZIG_R - (1.0 - unit(rng)).ln();
        }
        if z.f[i] + (z.f[i + 1] - z.f[i]) * unit(rng) < (-x).exp() {
            return x;
        }
    }
}

/// Gamma(shape, 1) by Marsaglia and Tsang (2000), with its constants worked
/// out once; shapes below one use the boost `G(a) = G(a + 1) * U^(1/a)`.
///
/// Shape one is the exponential distribution, drawn by [`std_exponential`]
/// (cheaper than the general method, and common: a gamma whose standard
/// deviation equals its mean).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gamma {
    d: f64,
    c: f64,
    /// `1/shape` when shape < 1 (boosted).
    boost: Option<f64>,
    exponential: bool,
}

impl Gamma {
    pub fn new(shape: f64) -> Gamma {
        let (base, boost) = if shape < 1.0 {
            (shape + 1.0, Some(1.0 / shape))
        } else {
            (shape, None)
        };
        let d = base - 1.0 / 3.0;
        Gamma {
            d,
            c: 1.0 / (9.0 * d).sqrt(),
            boost,
            exponential: shape == 1.0,
        }
    }

    #[inline(always)]
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> f64 {
        let Gamma {
            d,
            c,
            boost,
            exponential,
        } = *self;
        if exponential {
            return std_exponential(rng);
        }
        let boost = boost.map(|inv| (1.0 - unit(rng)).powf(inv));
        loop {
            let mut x;
            let mut v;
            loop {
                x = std_normal(rng);
                v = 1.0 + c * x;
                if v > 0.0 {
                    break;
                }
            }
            v = v * v * v;
            let u = unit(rng);
            let x2 = x * x;
            if u < 1.0 - 0.0331 * x2 * x2
                || u.max(f64::MIN_POSITIVE).ln() < 0.5 * x2 + d * (1.0 - v + v.ln())
            {
                return match boost {
                    Some(b) => d * v * b,
                    None => d * v,
                };
            }
        }
    }
}

/// Gamma(shape, 1); see [`Gamma`].
pub fn gamma<R: Rng + ?Sized>(shape: f64, rng: &mut R) -> f64 {
    Gamma::new(shape).sample(rng)
}

/// Dirichlet draw into `out` (same length as `alpha`).
pub fn dirichlet<R: Rng + ?Sized>(alpha: &[f64], rng: &mut R, out: &mut [f64]) {
    for (o, &a) in out.iter_mut().zip(alpha) {
        *o = gamma(a, rng);
    }
    normalise(out);
}

/// A Dirichlet draw with prepared gamma samplers, one per component.
#[inline]
pub fn dirichlet_prepared<R: Rng + ?Sized>(alpha: &[Gamma], rng: &mut R, out: &mut [f64]) {
    for (o, a) in out.iter_mut().zip(alpha) {
        *o = a.sample(rng);
    }
    normalise(out);
}

#[inline]
fn normalise(out: &mut [f64]) {
    let sum: f64 = out.iter().sum();
    for o in out.iter_mut() {
        *o /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn spec(kind: &str) -> DistSpec {
        DistSpec {
            kind: kind.into(),
            ..Default::default()
        }
    }

    #[test]
    fn method_of_moments_round_trips() {
        let cases = [
            DistSpec {
                mean: Some(0.3),
                sd: Some(0.05),
                ..spec("beta")
            },
            DistSpec {
                mean: Some(1701.0),
                sd: Some(400.0),
                ..spec("gamma")
            },
            DistSpec {
                mean: Some(0.509),
                sd: Some(0.09),
                ..spec("lognormal")
            },
        ];
        for c in cases {
            let d = c.resolve().unwrap();
            assert!((d.mean().unwrap() - c.mean.unwrap()).abs() < 1e-9, "{d:?}");
            assert!((d.sd().unwrap() - c.sd.unwrap()).abs() < 1e-9, "{d:?}");
        }
    }

    #[test]
    fn impossible_moments_are_rejected_with_reason() {
        let e = DistSpec {
            mean: Some(0.5),
            sd: Some(0.6),
            ..spec("beta")
        }
        .resolve()
        .unwrap_err();
        assert!(e.contains("too large"), "{e}");
        let e = spec("weibull").resolve().unwrap_err();
        assert!(e.contains("unknown distribution"), "{e}");
        let e = spec("normal").resolve().unwrap_err();
        assert!(e.contains("needs `mean`"), "{e}");
    }

    #[test]
    fn sample_moments_match() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let dists = [
            Dist::Normal { mean: 2.0, sd: 0.5 },
            Dist::Beta {
                alpha: 2.0,
                beta: 5.0,
            },
            Dist::Gamma {
                shape: 0.5,
                scale: 3.0,
            },
            Dist::Gamma {
                shape: 16.1,
                scale: 1.0,
            },
            Dist::LogNormal {
                meanlog: -0.7,
                sdlog: 0.2,
            },
            Dist::Uniform { min: 1.0, max: 3.0 },
            Dist::Triangular {
                min: 0.0,
                mode: 1.0,
                max: 4.0,
            },
        ];
        let n = 200_000;
        for d in dists {
            let xs: Vec<f64> = (0..n).map(|_| d.sample(0.0, &mut rng)).collect();
            let m = xs.iter().sum::<f64>() / n as f64;
            let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64;
            let (em, es) = (d.mean().unwrap(), d.sd().unwrap());
            assert!(
                (m - em).abs() < 4.0 * es / (n as f64).sqrt() + 1e-12,
                "{d:?}: mean {m} vs {em}"
            );
            assert!(
                (v.sqrt() - es).abs() / es < 0.02,
                "{d:?}: sd {} vs {es}",
                v.sqrt()
            );
        }
    }

    #[test]
    fn ziggurat_normal_has_normal_moments_and_tails() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 1_000_000;
        let (mut s1, mut s2, mut s4) = (0.0, 0.0, 0.0);
        let (mut beyond2, mut beyond_r) = (0usize, 0usize);
        for _ in 0..n {
            let x = std_normal(&mut rng);
            s1 += x;
            s2 += x * x;
            s4 += x * x * x * x;
            beyond2 += usize::from(x.abs() > 2.0);
            beyond_r += usize::from(x.abs() > ZIG_R);
        }
        let nf = n as f64;
        assert!((s1 / nf).abs() < 0.005, "mean {}", s1 / nf);
        assert!((s2 / nf - 1.0).abs() < 0.005, "variance {}", s2 / nf);
        assert!((s4 / nf - 3.0).abs() < 0.05, "fourth moment {}", s4 / nf);
        // P(|Z| > 2) = 0.0455, P(|Z| > 3.654) = 2.58e-4.
        assert!((beyond2 as f64 / nf - 0.0455).abs() < 0.001, "{beyond2}");
        assert!(
            (beyond_r as f64 / nf - 2.58e-4).abs() < 0.6e-4,
            "{beyond_r}"
        );
        let z = ziggurat();
        assert!(z.x.windows(2).all(|w| w[0] > w[1]), "layers narrow upwards");
        assert!(z.x[ZIG_LAYERS - 1] > 0.0 && z.x[ZIG_LAYERS - 1] < 0.3);
    }

    #[test]
    fn ziggurat_exponential_has_exponential_moments_and_tails() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let n = 1_000_000;
        let (mut s1, mut s2, mut s3) = (0.0, 0.0, 0.0);
        let (mut beyond1, mut beyond_r, mut below) = (0usize, 0usize, 0usize);
        for _ in 0..n {
            let x = std_exponential(&mut rng);
            assert!(x >= 0.0 && x.is_finite());
            s1 += x;
            s2 += x * x;
            s3 += x * x * x;
            beyond1 += usize::from(x > 1.0);
            beyond_r += usize::from(x > EXP_ZIG_R);
            below += usize::from(x < 0.1);
        }
        let nf = n as f64;
        // Exp(1): moments 1, 2, 6; P(X > 1) = e^-1, P(X > 7.697) = 4.54e-4,
        // P(X < 0.1) = 1 - e^-0.1.
        assert!((s1 / nf - 1.0).abs() < 0.005, "mean {}", s1 / nf);
        assert!((s2 / nf - 2.0).abs() < 0.02, "second moment {}", s2 / nf);
        assert!((s3 / nf - 6.0).abs() < 0.15, "third moment {}", s3 / nf);
        assert!(
            (beyond1 as f64 / nf - (-1.0f64).exp()).abs() < 0.0015,
            "{beyond1}"
        );
        assert!(
            (beyond_r as f64 / nf - (-EXP_ZIG_R).exp()).abs() < 1e-4,
            "{beyond_r}"
        );
        assert!(
            (below as f64 / nf - (1.0 - (-0.1f64).exp())).abs() < 0.001,
            "{below}"
        );
        let z = exp_ziggurat();
        assert!(z.x.windows(2).all(|w| w[0] > w[1]), "layers narrow upwards");
        // The recursion closes: the top layer, from the density at its edge up to the
        // density at zero, has the same area as every other.
        let top = z.x[ZIG_LAYERS - 1];
        assert!(
            (top * (1.0 - z.f[ZIG_LAYERS - 1]) - EXP_ZIG_V).abs() < 1e-12,
            "{top}"
        );
        // A gamma of shape one is this exponential, scaled.
        let g = Gamma::new(1.0);
        let (mut a, mut b) = (ChaCha8Rng::seed_from_u64(9), ChaCha8Rng::seed_from_u64(9));
        for _ in 0..100 {
            assert_eq!(
                g.sample(&mut a).to_bits(),
                std_exponential(&mut b).to_bits()
            );
        }
    }

    #[test]
    fn dirichlet_rows_sum_to_one_with_expected_means() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let alpha = [1251.0, 350.0, 116.0, 17.0];
        let mut acc = [0.0; 4];
        let mut out = [0.0; 4];
        for _ in 0..20_000 {
            dirichlet(&alpha, &mut rng, &mut out);
            assert!((out.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            for (a, o) in acc.iter_mut().zip(out) {
                *a += o;
            }
        }
        let total: f64 = alpha.iter().sum();
        for (a, al) in acc.iter().zip(alpha) {
            assert!((a / 20_000.0 - al / total).abs() < 2e-3);
        }
    }

    #[test]
    fn same_seed_same_draws() {
        let d = Dist::Gamma {
            shape: 2.0,
            scale: 1.0,
        };
        let a: Vec<f64> = {
            let mut r = ChaCha8Rng::seed_from_u64(42);
            (0..5).map(|_| d.sample(0.0, &mut r)).collect()
        };
        let b: Vec<f64> = {
            let mut r = ChaCha8Rng::seed_from_u64(42);
            (0..5).map(|_| d.sample(0.0, &mut r)).collect()
        };
        assert_eq!(a, b);
    }
}
