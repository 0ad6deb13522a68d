//! LoRA adapters (PEFT's format): read them, apply them to a base model (`BASE+ADAPTER` in
//! recipes, `smelt lora apply`), merge several into one adapter (`smelt lora merge`, PEFT's
//! `add_weighted_adapter`), and extract one from a fine-tuned model (`smelt lora extract`).

pub mod adapter;
pub mod extract;
pub mod lego;
pub mod merge;
pub mod write;

pub use adapter::{Adapter, AdapterConfig, LoraModule, ModuleKind};
