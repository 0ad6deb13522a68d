//! smelt merges fine-tuned checkpoints of one base model into a single model.
//!
//! The flow: a mergekit-style [`recipe`] is parsed strictly; [`plan`] turns it and the
//! models' safetensors headers into a checked list of output tensors; [`exec`] merges them
//! one by one on a [`backend`] (CPU or GPU) with the [`methods`], and the [`io`] writer
//! streams them into a Hugging Face model folder.

pub mod backend;
pub mod bench;
pub mod compeft;
pub mod dtype;
pub mod error;
pub mod exec;
pub mod hub;
pub mod inputs;
pub mod io;
pub mod linalg;
pub mod lora;
pub mod methods;
pub mod plan;
pub mod recipe;
pub mod rng;
pub mod units;
pub mod workflows;

#[cfg(test)]
mod layering;

pub use error::{Error, Result};
