//! The host side of the structs the kernels read (`prelude/common.wgsl`'s `Meta`, `ModelMeta`
//! and `Tile`, `rank.wgsl`'s `Step`). Each is declared through [`mirror!`], which also
//! records its field names and offsets, so the test at the bottom can hold both sides to the
//! same layout with naga, without a device.

use bytemuck::{Pod, Zeroable};

use super::JobState;
use crate::backend::Job;
use crate::rng::fnv1a32;

/// A `#[repr(C)]` struct of 4-byte scalars, and `FIELDS`: (name, offset, scalar type) of each
/// field, in order, taken from the declaration itself.
macro_rules! mirror {
    ($(#[$doc:meta])* struct $name:ident ($wgsl:literal) { $($field:ident : $ty:ident,)* }) => {
        $(#[$doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Pod, Zeroable, Default, Debug)]
        pub struct $name {
            $(pub $field: $ty,)*
        }

        impl $name {
            /// The WGSL struct this mirrors.
            #[allow(dead_code)]
            pub const WGSL: &'static str = $wgsl;
            /// (name, byte offset, scalar type) of every field, in declaration order.
            #[allow(dead_code)]
            pub const FIELDS: &'static [(&'static str, usize, &'static str)] = &[
                $((stringify!($field), std::mem::offset_of!($name, $field), stringify!($ty)),)*
            ];
        }
    };
}

mirror! {
    /// Per-job metadata: mirrors `struct Meta` of prelude/common.wgsl without its trailing
    /// `models` array (the [`ModelMeta`] entries follow it in the same buffer).
    struct MetaHeader ("Meta") {
        n_models: u32,
        base_offset: u32,
        base_dtype: u32,
        load_dtype: u32,
        out_dtype: u32,
        consensus: u32,
        normalize: u32,
        lambda: f32,
        wsum: f32,
        seed_lo: u32,
        seed_hi: u32,
        name_hash: u32,
        has_divisor: u32,
        divisor: f32,
        focus: u32,
        vote: u32,
        floor_on: u32,
        div_floor: f32,
        inv_m: f32,
        use_var: u32,
        seg_kind: u32,
        seg_len: u32,
        n_items: u32,
        n_pairs: u32,
        t: f32,
        row_len: u32,
        row_inner: u32,
        row_pad: u32,
        n_entries: u32,
        out_offset: u32,
        _p2: u32,
        _p3: u32,
    }
}

mirror! {
    /// One entry of `Meta.models`: mirrors `struct ModelMeta` of prelude/common.wgsl.
    struct ModelMeta ("ModelMeta") {
        offset: u32,
        dtype: u32,
        keep: u32,
        rng_model: u32,
        lo_bits: u32,
        lo_index: u32,
        hi_bits: u32,
        hi_index: u32,
        thr: u32,
        weight: f32,
        scale: f32,
        aux: u32,
        ranks: u32,
        table: u32,
        _p0: u32,
        _p1: u32,
    }
}

mirror! {
    /// Where a tile lies in its job: mirrors `struct Tile` of prelude/common.wgsl.
    struct TileUbo ("Tile") {
        n: u32,
        start: u32,
        _g: u32,
        wg_base: u32,
        index: u32,
        _p0: u32,
        _p1: u32,
        _p2: u32,
    }
}

mirror! {
    /// One (k, j) step of the bitonic network: mirrors `struct Step` of rank.wgsl.
    struct Step ("Step") {
        k: u32,
        j: u32,
        _p0: u32,
        _p1: u32,
    }
}

impl MetaHeader {
    /// The header every job kernel starts from: the job's inputs and dtypes, the random
    /// stream's key, and neutral values (λ = 1, Σw = 1) for the rest.
    pub fn for_job(job: &Job, st: &JobState, seed: u64) -> MetaHeader {
        let m = job.models.len();
        MetaHeader {
            n_models: m as u32,
            base_offset: if job.base.is_some() { st.seg_off[m] } else { 0 },
            base_dtype: job.base.map(|b| b.dtype.code()).unwrap_or(0),
            load_dtype: job.load_dtype.code(),
            out_dtype: job.out_dtype.code(),
            lambda: 1.0,
            wsum: 1.0,
            seed_lo: seed as u32,
            seed_hi: (seed >> 32) as u32,
            name_hash: fnv1a32(job.name),
            inv_m: if m > 0 { 1.0 / m as f32 } else { 0.0 },
            ..Default::default()
        }
    }
}

impl ModelMeta {
    /// Metadata of every model, in order (the head of the `models` array of every kernel).
    pub fn for_models(job: &Job, st: &JobState) -> Vec<ModelMeta> {
        (0..job.models.len())
            .map(|i| ModelMeta {
                offset: st.seg_off[i],
                dtype: job.models[i].dtype.code(),
                rng_model: i as u32,
                weight: 1.0,
                scale: 1.0,
                ..Default::default()
            })
            .collect()
    }
}

/// The bytes of a `Meta` buffer: the header, then the entries (one zeroed entry when there
/// are none: a runtime-sized array binding needs at least one).
pub fn meta_bytes(header: &MetaHeader, models: &[ModelMeta]) -> Vec<u8> {
    let mut bytes = bytemuck::bytes_of(header).to_vec();
    if models.is_empty() {
        bytes.extend_from_slice(bytemuck::bytes_of(&ModelMeta::default()));
    }
    for m in models {
        bytes.extend_from_slice(bytemuck::bytes_of(m));
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::super::kernels;
    use super::*;

    type Fields = &'static [(&'static str, usize, &'static str)];

    /// (name, offset, scalar type) of the members of WGSL struct `name` in `module`, and
    /// the struct's size.
    fn wgsl_struct(
        module: &naga::Module,
        name: &str,
    ) -> (
        Vec<(String, usize, String)>,
        usize,
        naga::Handle<naga::Type>,
    ) {
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).unwrap();
        let (h, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no struct {name} in the WGSL"));
        let naga::TypeInner::Struct { members, .. } = &ty.inner else {
            panic!("{name} is not a struct");
        };
        let fields = members
            .iter()
            .map(|m| {
                let ty = match module.types[m.ty].inner {
                    naga::TypeInner::Scalar(naga::Scalar {
                        kind: naga::ScalarKind::Uint,
                        width: 4,
                    }) => "u32".to_string(),
                    naga::TypeInner::Scalar(naga::Scalar {
                        kind: naga::ScalarKind::Float,
                        width: 4,
                    }) => "f32".to_string(),
                    ref other => format!("{other:?}"),
                };
                (m.name.clone().unwrap_or_default(), m.offset as usize, ty)
            })
            .collect();
        (fields, layouter[h].size as usize, h)
    }

    fn assert_same(what: &str, wgsl: &[(String, usize, String)], rust: Fields) {
        let wgsl: Vec<(&str, usize, &str)> = wgsl
            .iter()
            .map(|(n, o, t)| (n.as_str(), *o, t.as_str()))
            .collect();
        assert_eq!(
            wgsl, rust,
            "{what}: the WGSL struct (left) and the Rust struct (right) differ"
        );
    }

    fn module_of(shader: &kernels::Shader) -> naga::Module {
        kernels::parse(shader).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `Meta` is the header's fields, then `models: array<ModelMeta>` right at the header's
    /// size; `ModelMeta`, `Tile` and `Step` match their Rust structs member for member.
    #[test]
    fn host_structs_match_the_wgsl() {
        let module = module_of(&kernels::convert::SHADER);

        let (meta, _, _) = wgsl_struct(&module, MetaHeader::WGSL);
        let (models, rest) = meta.split_last().expect("Meta has members");
        assert_same("Meta", rest, MetaHeader::FIELDS);
        assert_eq!(models.0, "models", "Meta ends with its models array");
        assert_eq!(models.1, size_of::<MetaHeader>(), "Meta.models offset");
        let models_ty = module.types.iter().find_map(|(_, t)| match t.inner {
            naga::TypeInner::Struct { ref members, .. } if t.name.as_deref() == Some("Meta") => {
                Some(module.types[members.last().unwrap().ty].inner.clone())
            }
            _ => None,
        });
        let (model, model_size, model_h) = wgsl_struct(&module, ModelMeta::WGSL);
        match models_ty {
            Some(naga::TypeInner::Array { base, stride, .. }) => {
                assert_eq!(base, model_h, "Meta.models is an array of ModelMeta");
                assert_eq!(stride as usize, size_of::<ModelMeta>(), "ModelMeta stride");
            }
            other => panic!("Meta.models is {other:?}"),
        }
        assert_same("ModelMeta", &model, ModelMeta::FIELDS);
        assert_eq!(model_size, size_of::<ModelMeta>(), "ModelMeta size");

        let (tile, tile_size, _) = wgsl_struct(&module, TileUbo::WGSL);
        assert_same("Tile", &tile, TileUbo::FIELDS);
        assert_eq!(tile_size, size_of::<TileUbo>(), "Tile size");

        let module = module_of(&kernels::rank::SHADER);
        let (step, step_size, _) = wgsl_struct(&module, Step::WGSL);
        assert_same("Step", &step, Step::FIELDS);
        assert_eq!(step_size, size_of::<Step>(), "Step size");
    }

    /// The check itself notices a field added on one side only.
    #[test]
    fn a_field_on_one_side_only_is_caught() {
        let module = module_of(&kernels::convert::SHADER);
        let (tile, _, _) = wgsl_struct(&module, TileUbo::WGSL);
        let mut extra = TileUbo::FIELDS.to_vec();
        extra.push(("extra", 32, "u32"));
        let extra: Fields = Box::leak(extra.into_boxed_slice());
        let caught = std::panic::catch_unwind(|| assert_same("Tile", &tile, extra));
        assert!(caught.is_err());
        let caught = std::panic::catch_unwind(|| assert_same("Tile", &tile[1..], TileUbo::FIELDS));
        assert!(caught.is_err());
    }
}
