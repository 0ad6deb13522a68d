//! Model folders in and out: memory-mapped safetensors reading, streaming sharded writing,
//! and the side files (config, tokenizer, model card).

pub mod model;
pub mod output;
pub mod safetensors;
pub mod verify;
pub mod writer;
