//! Typed errors of the library. Every variant names what the user needs to find the
//! culprit: the file, the model, the tensor, the shape or the recipe key.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A safetensors file (or its index) that cannot be trusted.
    #[error("{path}: invalid safetensors file: {msg}")]
    BadFile { path: PathBuf, msg: String },

    /// A PyTorch checkpoint (`pytorch_model.bin`) that is damaged or holds more than tensors.
    #[error("{path}: cannot read this PyTorch checkpoint: {msg}")]
    BadTorchFile { path: PathBuf, msg: String },

    /// A model folder that cannot be used as it is.
    #[error("model {path}: {msg}")]
    BadModel { path: PathBuf, msg: String },

    /// The recipe is not valid YAML, uses an unknown key, method or parameter, or a value of
    /// the wrong type.
    #[error("recipe {path}: {msg}")]
    Recipe { path: PathBuf, msg: String },

    #[error("tensor {tensor} is missing from model {model}{hint}")]
    MissingTensor {
        model: String,
        tensor: String,
        hint: String,
    },

    #[error("shape mismatch for tensor {tensor}: {reference_model} has {expected:?} but {model} has {got:?}{hint}")]
    ShapeMismatch {
        tensor: String,
        reference_model: String,
        expected: Vec<usize>,
        model: String,
        got: Vec<usize>,
        hint: String,
    },

    #[error("tensor {tensor} of model {model} has dtype {dtype}, which cannot be merged (smelt merges F32, F16 and BF16)")]
    UnsupportedDtype {
        model: String,
        tensor: String,
        dtype: String,
    },

    /// Parameters that are well-formed but make no sense for this tensor.
    #[error("tensor {tensor}: {msg}")]
    Param { tensor: String, msg: String },

    #[error("output {path}: {msg}")]
    Output { path: PathBuf, msg: String },

    /// An input holds NaN or infinity.
    #[error("tensor {tensor} of model {model} holds {value} at element {index}; merging would spread it (pass --allow-nonfinite to merge anyway)")]
    NonFinite {
        model: String,
        tensor: String,
        index: usize,
        value: String,
    },

    /// A stop was requested (internal: turned into `Stopped` with what was kept).
    #[error("interrupted")]
    Interrupted,

    #[error("stopped: {done} of {total} shards are finished and kept in {path}; run the same command with --resume to continue")]
    Stopped {
        path: PathBuf,
        done: usize,
        total: usize,
    },

    /// A command without `--resume` was stopped; what it had written is removed.
    #[error("stopped; the partial output {path} was removed (this command cannot resume): run it again to start over")]
    Cancelled { path: PathBuf },

    /// The GPU could not be used, or failed while working.
    #[error("GPU: {0}")]
    Gpu(String),

    /// An input that is not a regular file, or is larger than smelt reads for its kind.
    #[error("{what} {path}: {msg}")]
    Unreadable {
        what: String,
        path: PathBuf,
        msg: String,
    },

    /// A model named by Hub id that could not be found, fetched or trusted.
    #[error("Hub model {id}: {msg}")]
    Hub { id: String, msg: String },

    /// An input file is not what was read before: changed since an interrupted merge, or
    /// while the merge was reading it. `msg` says what changed and what to do.
    #[error("{path} {msg}")]
    InputChanged { path: PathBuf, msg: String },

    /// The output's filesystem is full (or over quota). `path` is the file being written.
    #[error("{path}: {msg}")]
    DiskFull { path: PathBuf, msg: String },

    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether this is a full disk (or quota): the work done so far is worth keeping.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Error::DiskFull { .. } => true,
            Error::Io { source, .. } => is_no_space(source),
            _ => false,
        }
    }
}

/// Whether an I/O error means the filesystem is full (ENOSPC) or the quota spent (EDQUOT).
pub fn is_no_space(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
    }
    #[cfg(not(unix))]
    {
        e.kind() == std::io::ErrorKind::StorageFull
    }
}

/// `map_err` helper for `std::io::Result`s about one path.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
