//! Every integration test of smelt, in one binary: linking wgpu and faer once instead of once
//! per file is most of a cold `cargo test`. Each module is one former `tests/*.rs` file; the
//! fixtures stay in `tests/fixtures/` and the Python helpers in `tests/py/`.
//!
//! The math tests that hold for every backend are written once and instantiated per backend
//! with `backend_test!` (see `common`): `module::test::cpu`, `::gpu`, `::gpu_streamed`.
//! Filter with e.g. `cargo test --release --test it -- gpu_streamed`.

#[macro_use]
mod common;

mod bad_input;
mod bench_cli;
mod bounded;
mod cli_device;
mod compeft;
mod continual;
mod continual_safety;
mod determinism;
mod fuzz_props;
mod gpu_parity;
mod hand_computed;
mod hand_computed_methods;
mod hub;
mod hub_dryrun;
mod hub_server;
mod linalg_parity;
mod lora;
mod mergekit_cli;
mod mergekit_examples;
mod mergekit_fixtures;
mod method_contracts;
mod output_safety;
mod parsers_prop;
mod python_reader;
mod registry;
mod reliability;
mod research_methods;
mod resume_safety;
mod torch_bin;
