//! Errors of the economics engine. Each says what is wrong and where (file,
//! line and field for model files), so the user can fix the model.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EconError {
    /// The model file is malformed or inconsistent. `location` is
    /// `file:line:column` when known, otherwise the file name.
    #[error("{location}: {message}")]
    Model { location: String, message: String },

    /// A probability or value went out of bounds while the model ran (for
    /// example a complement entry became negative for a sampled parameter set).
    #[error("strategy `{strategy}`{at}: {message}", at = cycle.map(|c| format!(", cycle {c}")).unwrap_or_default())]
    Evaluation {
        strategy: String,
        cycle: Option<usize>,
        message: String,
    },

    /// An analysis was asked for something the model cannot provide.
    #[error("{0}")]
    Analysis(String),

    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("measurements file {path}: {message}")]
    Measurements { path: PathBuf, message: String },
}

pub type Result<T, E = EconError> = std::result::Result<T, E>;
