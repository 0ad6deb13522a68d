//! The GPU kernels, one family per file pair: `<family>.wgsl` holds the family's entry points
//! and `<family>.rs` beside it the host code that fills the metadata, binds the buffers and
//! reads the results back (through [`super::dispatch`]). WGSL has no `#include`, so each
//! family's module is the preludes it names (`prelude/*.wgsl`) followed by its own file.
//!
//! Adding a family: a `.wgsl` with its entry points, a `.rs` with its [`Shader`] and host
//! function, a `mod` line and an entry in [`ALL`] here (the validation test below then checks
//! it without a device).

pub mod convert;
pub mod fisher;
pub mod gta;
pub mod matmul;
pub mod nearswap;
pub mod pcb;
pub mod rank;
pub mod reduce;
pub mod select;
pub mod ternary;
pub mod weighted_sum;

/// Bindings, metadata structs (`struct Meta`, `struct ModelMeta`, `struct Tile`), dtype
/// conversions and loads: every module starts with it.
pub const COMMON: &str = include_str!("prelude/common.wgsl");
/// Philox4x32-10, bit-identical to `src/rng.rs`.
pub const RNG: &str = include_str!("prelude/rng.wgsl");
/// The output binding and `store4` for kernels that write a tensor.
pub const STORE: &str = include_str!("prelude/store.wgsl");

/// One shader module: a kernel family.
#[derive(Debug)]
pub struct Shader {
    /// The family's file, for labels and error messages (unique: it keys the caches).
    pub name: &'static str,
    /// Preludes, in order, before the family's own source.
    pub preludes: &'static [&'static str],
    pub body: &'static str,
    pub entries: &'static [&'static str],
    /// Entry points that also bind group 1 (a per-dispatch step at a dynamic offset).
    pub stepped: &'static [&'static str],
}

impl Shader {
    /// The complete module source.
    pub fn source(&self) -> String {
        let mut parts = self.preludes.to_vec();
        parts.push(self.body);
        parts.join("\n")
    }
}

/// Every kernel family (the tests below validate each one and check that no `.wgsl` here is
/// left out).
#[cfg(test)]
pub const ALL: [&Shader; 11] = [
    &convert::SHADER,
    &weighted_sum::SHADER,
    &gta::SHADER,
    &nearswap::SHADER,
    &ternary::SHADER,
    &fisher::SHADER,
    &pcb::SHADER,
    &select::SHADER,
    &reduce::SHADER,
    &rank::SHADER,
    &matmul::SHADER,
];

/// Parses a module with naga (without validating it).
#[cfg(test)]
pub fn parse(shader: &Shader) -> Result<naga::Module, String> {
    let src = shader.source();
    naga::front::wgsl::parse_str(&src).map_err(|e| e.emit_to_string_with_path(&src, shader.name))
}

/// Parses and validates a module with naga, as wgpu would before building a pipeline.
/// Returns the workgroup memory (bytes) of the largest entry point.
#[cfg(test)]
pub fn validate(shader: &Shader) -> Result<u64, String> {
    let src = shader.source();
    let module = parse(shader)?;
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::default(),
    )
    .validate(&module)
    .map_err(|e| e.emit_to_string_with_path(&src, shader.name))?;
    let mut wg_bytes = 0u64;
    for (_, var) in module.global_variables.iter() {
        if var.space == naga::AddressSpace::WorkGroup {
            let mut layouter = naga::proc::Layouter::default();
            layouter
                .update(module.to_ctx())
                .map_err(|e| e.to_string())?;
            wg_bytes += layouter[var.ty].size as u64;
        }
    }
    let names: Vec<&str> = module
        .entry_points
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    for want in shader.entries {
        if !names.contains(want) {
            return Err(format!("{}: entry point {want} is missing", shader.name));
        }
    }
    for name in &names {
        if !shader.entries.contains(name) {
            return Err(format!("{}: entry point {name} is not listed", shader.name));
        }
    }
    Ok(wg_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shader parses and validates without a device, and stays within the 16 KiB of
    /// workgroup memory every WebGPU adapter offers (wgpu does not check this limit itself).
    #[test]
    fn shaders_validate_with_naga() {
        for s in ALL {
            let wg = validate(s).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                wg <= 16 * 1024,
                "{}: {wg} bytes of workgroup memory",
                s.name
            );
        }
    }

    /// Each `.wgsl` file here is some family's source or prelude, and each family's file
    /// is named after it.
    #[test]
    fn every_shader_file_is_used() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend/gpu/kernels");
        let used: String = ALL.iter().map(|s| s.source()).collect();
        let mut files = Vec::new();
        for sub in [dir.clone(), dir.join("prelude")] {
            for e in std::fs::read_dir(sub).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "wgsl") {
                    files.push(p);
                }
            }
        }
        assert_eq!(files.len(), ALL.len() + 3, "{files:?}");
        for p in files {
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(
                used.contains(text.trim()),
                "{} is not part of any shader module",
                p.display()
            );
        }
        for s in ALL {
            let rs = dir.join(s.name).with_extension("rs");
            assert!(rs.exists(), "{}: no host file {}", s.name, rs.display());
        }
    }
}
