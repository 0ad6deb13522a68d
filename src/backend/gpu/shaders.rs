//! WGSL sources, one file per op family under `shaders/`, embedded at build time.
//! WGSL has no `#include`, so each module is the shared prelude plus its family's file.

/// The shader modules the engine builds pipelines from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shader {
    Convert,
    Gta,
    Select,
    Reduce,
    Rank,
    Matmul,
}

pub const COMMON: &str = include_str!("../../../shaders/common.wgsl");
pub const RNG: &str = include_str!("../../../shaders/rng.wgsl");
pub const STORE: &str = include_str!("../../../shaders/store.wgsl");
pub const CONVERT: &str = include_str!("../../../shaders/convert.wgsl");
pub const GTA: &str = include_str!("../../../shaders/gta.wgsl");
pub const SELECT: &str = include_str!("../../../shaders/select.wgsl");
pub const REDUCE: &str = include_str!("../../../shaders/reduce.wgsl");
pub const RANK: &str = include_str!("../../../shaders/rank.wgsl");
pub const MATMUL: &str = include_str!("../../../shaders/matmul.wgsl");

impl Shader {
    pub const ALL: [Shader; 6] = [
        Shader::Convert,
        Shader::Gta,
        Shader::Select,
        Shader::Reduce,
        Shader::Rank,
        Shader::Matmul,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shader::Convert => "convert.wgsl",
            Shader::Gta => "gta.wgsl",
            Shader::Select => "select.wgsl",
            Shader::Reduce => "reduce.wgsl",
            Shader::Rank => "rank.wgsl",
            Shader::Matmul => "matmul.wgsl",
        }
    }

    /// The complete module source.
    pub fn source(self) -> String {
        let parts: &[&str] = match self {
            Shader::Convert => &[COMMON, STORE, CONVERT],
            Shader::Gta => &[COMMON, RNG, STORE, GTA],
            Shader::Select => &[COMMON, SELECT],
            Shader::Reduce => &[COMMON, STORE, REDUCE],
            Shader::Rank => &[COMMON, RANK],
            Shader::Matmul => &[COMMON, MATMUL],
        };
        parts.join("\n")
    }

    pub fn entry_points(self) -> &'static [&'static str] {
        match self {
            Shader::Convert => &["convert"],
            Shader::Gta => &[
                "gta",
                "weighted_sum",
                "masked_sums",
                "nearswap",
                "ternary",
                "fisher",
                "pcb",
            ],
            Shader::Select => &["histogram", "count_equal", "equal_bits"],
            Shader::Reduce => &["dots_whole", "dots_rows", "dots_cols", "combine"],
            Shader::Rank => &["rank_init", "bitonic", "rank_scatter"],
            Shader::Matmul => &["matmul"],
        }
    }
}

/// Parses and validates a module with naga, as wgpu would before building a pipeline.
/// Returns the workgroup memory (bytes) of the largest entry point.
pub fn validate(shader: Shader) -> Result<u64, String> {
    let src = shader.source();
    let module = naga::front::wgsl::parse_str(&src)
        .map_err(|e| e.emit_to_string_with_path(&src, shader.name()))?;
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::default(),
    )
    .validate(&module)
    .map_err(|e| e.emit_to_string_with_path(&src, shader.name()))?;
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
    for want in shader.entry_points() {
        if !names.contains(want) {
            return Err(format!("{}: entry point {want} is missing", shader.name()));
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
        for s in Shader::ALL {
            let wg = validate(s).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                wg <= 16 * 1024,
                "{}: {wg} bytes of workgroup memory",
                s.name()
            );
        }
    }

    #[test]
    fn every_shader_file_is_used() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/shaders");
        let used: String = Shader::ALL.iter().map(|s| s.source()).collect();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(
                used.contains(text.trim()),
                "{} is not part of any shader module",
                p.display()
            );
        }
    }
}
