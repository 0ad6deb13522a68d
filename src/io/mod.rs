//! Model folders in and out, at the bottom of the crate (it depends on `dtype` and `error`
//! only): memory-mapped safetensors reading, model folders and their indexes, the staged
//! sharded writer and its manifest, and `smelt verify`.

pub mod fault;
pub mod guard;
pub mod model;
pub mod read;
pub mod safetensors;
pub mod verify;
pub mod writer;
