//! Workflows built on plans and the executor rather than single merges.

pub mod continual;
