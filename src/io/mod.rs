//! Model folders in and out, at the bottom of the crate (it depends on `dtype` and `error`
//! only): memory-mapped safetensors reading, PyTorch checkpoints read without running pickle code
//! (`pickle`, `torch_zip`), model folders and their indexes, the staged
//! sharded writer and its manifest, and `smelt verify`.

pub mod fault;
pub mod guard;
pub mod model;
pub mod pickle;
pub mod read;
pub mod safetensors;
pub mod torch_zip;
pub mod verify;
pub mod writer;
