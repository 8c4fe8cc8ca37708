//! The crate's error type.

use std::path::{Path, PathBuf};

/// Every fallible operation in this crate returns this error. Messages name the offending
/// config field or file, so a user can act on them without a backtrace.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DataError {
    /// A config field or argument is out of range or inconsistent.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// A file is missing, unreadable, damaged or does not match what the store expects.
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// A tensor operation (dtype conversion, device copy) failed.
    #[error("tensor operation failed: {0}")]
    Tensor(String),
    /// A background worker could not start or died.
    #[error("{0}")]
    Worker(String),
}

impl DataError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn file(path: &Path, reason: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

impl From<candle_core::Error> for DataError {
    fn from(err: candle_core::Error) -> Self {
        Self::Tensor(err.to_string())
    }
}

impl From<DataError> for candle_core::Error {
    fn from(err: DataError) -> Self {
        candle_core::Error::wrap(err)
    }
}
