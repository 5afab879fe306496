//! De-identification.
