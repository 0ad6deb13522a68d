//! Extracting a LoRA adapter from a fine-tuned model: for every 2-D weight that differs from
//! the base, the truncated SVD of ΔW = tuned − base on the backend gives B = U·diag(S) and
//! A = Vᵀ of rank r (mergekit's `mergekit-extract-lora`). One module's ΔW exists at a time.
//! The share of ‖ΔW‖²_F the rank keeps (Σ_{i<r} σ_i² / ‖ΔW‖²_F) is reported per module.

use serde_json::{Map, Value};

use super::adapter::ModuleKind;
use super::merge::{refactor, MergedAdapter, MergedModule};
use crate::backend::Backend;
use crate::dtype::{self, DType};
use crate::error::{Error, Result};
use crate::io::model::ModelFolder;
use crate::linalg::Mat;

/// What extraction did with one tensor.
#[derive(Clone, Debug)]
pub struct ModuleReport {
    pub tensor: String,
    pub shape: Vec<usize>,
    /// ‖ΔW‖_F
    pub norm: f64,
    /// Σ_{i<r} σ_i² / ‖ΔW‖²_F, in [0, 1].
    pub energy: f64,
}

pub struct Extracted {
    pub adapter: MergedAdapter,
    pub modules: Vec<ModuleReport>,
    /// Tensors that differ but are not 2-D weights (norms, biases): a LoRA cannot carry them.
    pub not_representable: Vec<(String, f64)>,
    pub dtype: DType,
}

/// Input embeddings are `nn.Embedding` in transformers, so PEFT gives them
/// `lora_embedding_A/B` with ΔW = (B·A)ᵀ; every other 2-D weight is a linear layer.
fn is_embedding(name: &str) -> bool {
    ["embed_tokens", "wte", "word_embeddings", "tok_embeddings"]
        .iter()
        .any(|k| name.contains(k))
}

fn values(m: &ModelFolder, name: &str) -> Vec<f32> {
    let t = m.get(name).unwrap();
    let mut v = vec![0f32; t.numel()];
    dtype::decode(t.dtype(), t.bytes(), &mut v);
    v
}

pub fn extract(
    base: &ModelFolder,
    tuned: &ModelFolder,
    rank: usize,
    backend: &dyn Backend,
) -> Result<Extracted> {
    if rank == 0 {
        return Err(Error::Other("--rank must be at least 1".into()));
    }
    // A truncated SVD of an m×n ΔW has at most min(m, n) ranks: a rank beyond that of the
    // largest 2-D weight would only pad every factor with zeros (and a huge --rank would
    // allocate factors of that many rows).
    let mut warnings = Vec::new();
    let cap = tuned
        .names()
        .iter()
        .filter_map(|n| tuned.get(n))
        .filter_map(|t| match t.shape() {
            [r, c] if t.dtype().is_mergeable() => Some((*r).min(*c)),
            _ => None,
        })
        .max()
        .unwrap_or(rank)
        .max(1);
    let rank = if rank > cap {
        warnings.push(format!(
            "--rank {rank} is more than any weight can hold (min(rows, columns) of the largest is {cap}); using {cap}"
        ));
        cap
    } else {
        rank
    };
    let mut modules = Vec::new();
    let mut reports = Vec::new();
    let mut not_representable = Vec::new();
    let mut dtype = None;
    for name in tuned.names() {
        let t = tuned.get(name).unwrap();
        if !t.dtype().is_mergeable() {
            continue;
        }
        let Some(b) = base.get(name) else {
            return Err(Error::MissingTensor {
                model: base.label.clone(),
                tensor: name.clone(),
                hint: format!(
                    " (it is in {}; extraction needs the same architecture)",
                    tuned.label
                ),
            });
        };
        if b.shape() != t.shape() {
            return Err(Error::ShapeMismatch {
                tensor: name.clone(),
                reference_model: base.label.clone(),
                expected: b.shape().to_vec(),
                model: tuned.label.clone(),
                got: t.shape().to_vec(),
                hint: " (a LoRA cannot change a tensor's shape)".into(),
            });
        }
        let mut d = values(tuned, name);
        let bv = values(base, name);
        d.iter_mut().zip(&bv).for_each(|(x, y)| *x -= y);
        let norm = d.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        if norm == 0.0 {
            continue;
        }
        let (Some(module), [rows, cols]) = (name.strip_suffix(".weight"), t.shape()) else {
            not_representable.push((name.clone(), norm));
            continue;
        };
        dtype.get_or_insert(t.dtype());
        let kind = if is_embedding(name) {
            ModuleKind::Embedding
        } else {
            ModuleKind::Linear {
                fan_in_fan_out: false,
            }
        };
        let mut dm = Mat {
            rows: *rows,
            cols: *cols,
            data: d,
        };
        if kind.transposed() {
            dm = dm.transpose();
        }
        let (a, bm) = refactor(&dm, rank, backend)?;
        // ‖B·A‖² = Σ σ_i² since A has orthonormal rows: the squared column norms of B.
        let kept: f64 = bm.data.iter().map(|x| (*x as f64).powi(2)).sum();
        reports.push(ModuleReport {
            tensor: name.clone(),
            shape: t.shape().to_vec(),
            norm,
            energy: (kept / (norm * norm)).min(1.0),
        });
        modules.push(MergedModule {
            name: module.to_string(),
            kind,
            a,
            b: bm,
        });
    }
    if modules.is_empty() {
        return Err(Error::Other(format!(
            "{} and {} have no differing 2-D weights: there is nothing to extract",
            base.label, tuned.label
        )));
    }
    let mut config = Map::new();
    config.insert("peft_type".into(), "LORA".into());
    config.insert("r".into(), rank.into());
    config.insert("lora_alpha".into(), rank.into());
    config.insert("use_rslora".into(), false.into());
    config.insert("fan_in_fan_out".into(), false.into());
    config.insert(
        "target_modules".into(),
        Value::Array(
            modules
                .iter()
                .map(|m| Value::String(m.name.clone()))
                .collect(),
        ),
    );
    config.insert(
        "base_model_name_or_path".into(),
        base.path.display().to_string().into(),
    );
    if let Some(t) = base
        .config
        .as_ref()
        .and_then(|c| c.get("architectures"))
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
    {
        if t.ends_with("ForCausalLM") {
            config.insert("task_type".into(), "CAUSAL_LM".into());
        }
    }
    Ok(Extracted {
        adapter: MergedAdapter {
            config,
            modules,
            full: Vec::new(),
            rank,
            scale: 1.0,
            warnings,
        },
        modules: reports,
        not_representable,
        dtype: dtype.unwrap_or(DType::F32),
    })
}
