//! Reading a PEFT LoRA adapter folder: `adapter_config.json` and
//! `adapter_model.safetensors`, as `PeftModel.save_pretrained` writes them.
//!
//! The tensors are the truth about which modules carry a LoRA pair and of what rank; the
//! config supplies what the tensors cannot: `lora_alpha` (with `alpha_pattern`), whether
//! the scale is rsLoRA's, and `fan_in_fan_out`. Every module is checked against the base
//! model it is applied to before any data is read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::{Map, Value};

use crate::backend::Backend;
use crate::dtype::{self, DType};
use crate::error::{Error, Result};
use crate::io::model::{natural_cmp, ModelFolder};
use crate::io::safetensors::{SafetensorsFile, TensorInfo};
use crate::linalg::Mat;

pub const CONFIG_NAME: &str = "adapter_config.json";
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// The prefix PEFT gives every key: the module path inside the `PeftModel`.
pub const KEY_PREFIX: &str = "base_model.model.";

/// How a module's ΔW is laid out relative to its factors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    /// `nn.Linear` (or GPT-2's `Conv1D` with `fan_in_fan_out`): A is [r, in], B is [out, r],
    /// ΔW = B·A·s, transposed when `fan_in_fan_out`.
    Linear { fan_in_fan_out: bool },
    /// `nn.Embedding`: A is [r, vocab], B is [dim, r], ΔW = (B·A)ᵀ·s of shape [vocab, dim].
    Embedding,
}

impl ModuleKind {
    /// Whether ΔW is (B·A)ᵀ rather than B·A.
    pub fn transposed(self) -> bool {
        matches!(
            self,
            ModuleKind::Embedding
                | ModuleKind::Linear {
                    fan_in_fan_out: true
                }
        )
    }
}

/// One module with a LoRA pair.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// Module path without PEFT's prefix, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub kind: ModuleKind,
    /// Keys of the factors in the adapter file.
    pub a_key: String,
    pub b_key: String,
    /// Rank (rows of A), and the shapes of the two factors.
    pub r: usize,
    pub a_shape: [usize; 2],
    pub b_shape: [usize; 2],
    /// lora_alpha for this module after `alpha_pattern`.
    pub alpha: f64,
    /// alpha / r, or alpha / √r with rsLoRA.
    pub scale: f64,
}

impl LoraModule {
    /// The base tensor this module adds its ΔW to.
    pub fn target(&self) -> String {
        format!("{}.weight", self.name)
    }

    /// Shape of ΔW (that of the base tensor).
    pub fn delta_shape(&self) -> [usize; 2] {
        // B·A is [b0, a1]
        let (o, i) = (self.b_shape[0], self.a_shape[1]);
        if self.kind.transposed() {
            [i, o]
        } else {
            [o, i]
        }
    }
}

/// `target_modules` as PEFT stores it.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Suffix names: module `m` matches `t` when `m == t` or `m` ends with `.t`.
    List(Vec<String>),
    /// A regular expression that must match the whole module name.
    Regex(String),
    /// Not given (PEFT then used its per-architecture defaults).
    None,
}

/// The parts of `adapter_config.json` that change the arithmetic.
#[derive(Clone, Debug)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub fan_in_fan_out: bool,
    pub target_modules: Targets,
    /// (pattern, value) in the file's order: the first that matches wins.
    pub rank_pattern: Vec<(String, f64)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub modules_to_save: Vec<String>,
    /// The whole file, for copying into merged adapters.
    pub raw: Map<String, Value>,
}

/// Does `re.match(rf"(.*\.)?({key})$", module)` succeed (PEFT's pattern lookup)?
pub fn pattern_matches(key: &str, module: &str) -> Result<bool> {
    let re = Regex::new(&format!(r"^(.*\.)?({key})$"))
        .map_err(|e| Error::Other(format!("pattern {key:?} is not a valid regex: {e}")))?;
    Ok(re.is_match(module))
}

impl AdapterConfig {
    pub fn parse(text: &str, path: &Path) -> Result<AdapterConfig> {
        let bad = |msg: String| Error::BadModel {
            path: path.to_path_buf(),
            msg,
        };
        let v: Value = serde_json::from_str(text)
            .map_err(|e| bad(format!("{CONFIG_NAME} is not valid JSON: {e}")))?;
        let raw = v
            .as_object()
            .ok_or_else(|| bad(format!("{CONFIG_NAME} is not a JSON object")))?
            .clone();
        if let Some(t) = raw.get("peft_type") {
            if t.as_str() != Some("LORA") {
                return Err(bad(format!(
                    "{CONFIG_NAME}: peft_type is {t}; smelt reads LoRA adapters (\"LORA\") only"
                )));
            }
        }
        let num = |key: &str| -> Result<Option<f64>> {
            match raw.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x.as_f64().map(Some).ok_or_else(|| {
                    bad(format!("{CONFIG_NAME}: `{key}` is {x}, expected a number"))
                }),
            }
        };
        let flag = |key: &str| -> Result<bool> {
            match raw.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(x) => Err(bad(format!(
                    "{CONFIG_NAME}: `{key}` is {x}, expected true or false"
                ))),
            }
        };
        let r =
            num("r")?.ok_or_else(|| bad(format!("{CONFIG_NAME} has no `r` (the LoRA rank)")))?;
        if r < 1.0 || r.fract() != 0.0 {
            return Err(bad(format!(
                "{CONFIG_NAME}: `r` is {r}, expected a positive integer"
            )));
        }
        // PEFT's default lora_alpha is 8.
        let lora_alpha = num("lora_alpha")?.unwrap_or(8.0);
        for (key, what) in [
            ("use_dora", "DoRA (weight-decomposed LoRA)"),
            ("lora_bias", "LoRA biases"),
        ] {
            if flag(key)? {
                return Err(bad(format!(
                    "{CONFIG_NAME}: `{key}` is true; smelt does not implement {what}"
                )));
            }
        }
        if let Some(tp) = raw.get("target_parameters") {
            if !tp.is_null() && tp.as_array().is_none_or(|a| !a.is_empty()) {
                return Err(bad(format!(
                    "{CONFIG_NAME}: `target_parameters` is set; smelt applies LoRA to modules only"
                )));
            }
        }
        let target_modules = match raw.get("target_modules") {
            None | Some(Value::Null) => Targets::None,
            Some(Value::String(s)) => Targets::Regex(s.clone()),
            Some(Value::Array(a)) => Targets::List(
                a.iter()
                    .map(|x| {
                        x.as_str().map(str::to_string).ok_or_else(|| {
                            bad(format!(
                                "{CONFIG_NAME}: `target_modules` holds {x}, expected strings"
                            ))
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(x) => {
                return Err(bad(format!(
                    "{CONFIG_NAME}: `target_modules` is {x}, expected a list of names or a regex string"
                )))
            }
        };
        let pattern = |key: &str| -> Result<Vec<(String, f64)>> {
            match raw.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(k, x)| {
                        let v = x.as_f64().ok_or_else(|| {
                            bad(format!(
                                "{CONFIG_NAME}: `{key}` entry {k:?} is {x}, expected a number"
                            ))
                        })?;
                        pattern_matches(k, "")
                            .map_err(|e| bad(format!("{CONFIG_NAME}: `{key}`: {e}")))?;
                        Ok((k.clone(), v))
                    })
                    .collect(),
                Some(x) => Err(bad(format!(
                    "{CONFIG_NAME}: `{key}` is {x}, expected an object"
                ))),
            }
        };
        let modules_to_save = match raw.get("modules_to_save") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            Some(x) => {
                return Err(bad(format!(
                    "{CONFIG_NAME}: `modules_to_save` is {x}, expected a list of names"
                )))
            }
        };
        Ok(AdapterConfig {
            r: r as usize,
            lora_alpha,
            use_rslora: flag("use_rslora")?,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            target_modules,
            rank_pattern: pattern("rank_pattern")?,
            alpha_pattern: pattern("alpha_pattern")?,
            modules_to_save,
            raw,
        })
    }

    /// (r, alpha) of a module after `rank_pattern` / `alpha_pattern`.
    pub fn rank_alpha(&self, module: &str) -> (usize, f64) {
        let find = |p: &[(String, f64)]| {
            p.iter()
                .find(|(k, _)| pattern_matches(k, module).unwrap_or(false))
                .map(|(_, v)| *v)
        };
        (
            find(&self.rank_pattern)
                .map(|v| v as usize)
                .unwrap_or(self.r),
            find(&self.alpha_pattern).unwrap_or(self.lora_alpha),
        )
    }

    /// The scale s of a module of rank r with this alpha.
    pub fn scale(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// The largest rank of any module: PEFT's `max(r, *rank_pattern.values())`.
    pub fn max_rank(&self) -> usize {
        self.rank_pattern
            .iter()
            .map(|(_, v)| *v as usize)
            .fold(self.r, usize::max)
    }
}

/// An opened adapter.
pub struct Adapter {
    pub dir: PathBuf,
    pub label: String,
    pub config: AdapterConfig,
    pub file: SafetensorsFile,
    /// Modules with a LoRA pair, in natural order.
    pub modules: Vec<LoraModule>,
    /// Base tensor name -> index into `modules`.
    by_target: HashMap<String, usize>,
    /// Base tensor name -> key of a full tensor that replaces it (`base_layer.weight`
    /// copies and `modules_to_save`).
    replacements: HashMap<String, String>,
}

fn two_d(t: &TensorInfo) -> Option<[usize; 2]> {
    match t.shape.as_slice() {
        [a, b] => Some([*a, *b]),
        _ => None,
    }
}

impl Adapter {
    /// Opens `dir` (a folder with `adapter_config.json` and `adapter_model.safetensors`).
    pub fn open(dir: &Path, label: &str) -> Result<Adapter> {
        let bad = |msg: String| Error::BadModel {
            path: dir.to_path_buf(),
            msg,
        };
        if !dir.is_dir() {
            return Err(bad(if dir.exists() {
                format!("is not a folder; a LoRA adapter is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}")
            } else {
                "not found (expected a PEFT LoRA adapter folder)".into()
            }));
        }
        let cpath = dir.join(CONFIG_NAME);
        // not `is_file()`: a FIFO or folder of that name is refused by the reader, named
        if !cpath.exists() {
            return Err(bad(format!(
                "has no {CONFIG_NAME}; is it a PEFT adapter folder?"
            )));
        }
        let config = AdapterConfig::parse(
            &crate::io::read::read_string_capped(
                &cpath,
                crate::io::read::JSON_CAP,
                "adapter config",
            )?,
            dir,
        )?;
        let wpath = dir.join(WEIGHTS_NAME);
        if !wpath.exists() {
            let hint = if dir.join("adapter_model.bin").is_file() {
                " (it has adapter_model.bin, a PyTorch pickle; smelt reads safetensors only: re-save it with `save_pretrained(..., safe_serialization=True)`)"
            } else {
                ""
            };
            return Err(bad(format!("has no {WEIGHTS_NAME}{hint}")));
        }
        let file = SafetensorsFile::open(&wpath)?;
        let fbad = |msg: String| Error::BadFile {
            path: wpath.clone(),
            msg,
        };

        // Group the keys by module.
        #[derive(Default)]
        struct Pair {
            a: Option<String>,
            b: Option<String>,
            embedding: bool,
        }
        let mut pairs: HashMap<String, Pair> = HashMap::new();
        let mut replacements = HashMap::new();
        for t in file.tensors() {
            let key = t.name.as_str();
            let rest = key.strip_prefix(KEY_PREFIX).ok_or_else(|| {
                fbad(format!(
                    "tensor {key} does not start with {KEY_PREFIX:?}; this is not a PEFT adapter file"
                ))
            })?;
            if !t.dtype.is_mergeable() {
                return Err(fbad(format!(
                    "tensor {key} has dtype {}; smelt reads F32, F16 and BF16",
                    t.dtype
                )));
            }
            let lora = [
                (".lora_A.weight", true, false),
                (".lora_B.weight", false, false),
                (".lora_embedding_A", true, true),
                (".lora_embedding_B", false, true),
            ]
            .iter()
            .find_map(|(suf, is_a, emb)| rest.strip_suffix(suf).map(|m| (m, *is_a, *emb)));
            if let Some((m, is_a, emb)) = lora {
                let p = pairs.entry(m.to_string()).or_default();
                if (p.a.is_some() || p.b.is_some()) && p.embedding != emb {
                    return Err(fbad(format!(
                        "module {m} has both linear (lora_A/lora_B) and embedding (lora_embedding_A/B) factors"
                    )));
                }
                p.embedding = emb;
                if is_a {
                    p.a = Some(key.to_string());
                } else {
                    p.b = Some(key.to_string());
                }
                continue;
            }
            for unsupported in ["lora_magnitude_vector", ".lora_B.bias", ".lora_A.bias"] {
                if rest.contains(unsupported) {
                    return Err(fbad(format!(
                        "tensor {key} belongs to a LoRA variant smelt does not implement (DoRA or LoRA biases)"
                    )));
                }
            }
            if rest.contains(".lora_") {
                return Err(fbad(format!("tensor {key}: unknown LoRA tensor kind")));
            }
            // A full tensor: `<M>.base_layer.weight` or a modules_to_save copy `<M>.weight`.
            let target = match rest.strip_suffix(".base_layer.weight") {
                Some(m) => format!("{m}.weight"),
                None => rest.replace(".base_layer.", "."),
            };
            replacements.insert(target, key.to_string());
        }

        let mut modules = Vec::new();
        for (name, p) in pairs {
            let (Some(a_key), Some(b_key)) = (p.a.clone(), p.b.clone()) else {
                let (has, lacks) = if p.a.is_some() {
                    ("A", "B")
                } else {
                    ("B", "A")
                };
                return Err(fbad(format!(
                    "module {name} has a LoRA {has} factor but no {lacks} factor"
                )));
            };
            let (ai, bi) = (file.get(&a_key).unwrap(), file.get(&b_key).unwrap());
            let (Some(a_shape), Some(b_shape)) = (two_d(ai), two_d(bi)) else {
                return Err(fbad(format!(
                    "module {name}: factors must be 2-D; {a_key} is {:?} and {b_key} is {:?}",
                    ai.shape, bi.shape
                )));
            };
            if a_shape[0] != b_shape[1] {
                return Err(fbad(format!(
                    "module {name}: {a_key} is {a_shape:?} (rank {}) but {b_key} is {b_shape:?} (rank {})",
                    a_shape[0], b_shape[1]
                )));
            }
            let r = a_shape[0];
            let (cfg_r, alpha) = config.rank_alpha(&name);
            if cfg_r != r {
                return Err(bad(format!(
                    "module {name}: its factors have rank {r} but {CONFIG_NAME} gives it r = {cfg_r} (r / rank_pattern)"
                )));
            }
            let kind = if p.embedding {
                ModuleKind::Embedding
            } else {
                ModuleKind::Linear {
                    fan_in_fan_out: config.fan_in_fan_out,
                }
            };
            modules.push(LoraModule {
                scale: config.scale(r, alpha),
                name,
                kind,
                a_key,
                b_key,
                r,
                a_shape,
                b_shape,
                alpha,
            });
        }
        modules.sort_by(|x, y| natural_cmp(&x.name, &y.name));
        if modules.is_empty() && replacements.is_empty() {
            return Err(fbad("holds no LoRA factors".into()));
        }
        let by_target = modules
            .iter()
            .enumerate()
            .map(|(i, m)| (m.target(), i))
            .collect();
        Ok(Adapter {
            dir: dir.to_path_buf(),
            label: label.to_string(),
            config,
            file,
            modules,
            by_target,
            replacements,
        })
    }

    /// The module that adds a ΔW to base tensor `tensor`, if any.
    pub fn module_for(&self, tensor: &str) -> Option<&LoraModule> {
        self.by_target.get(tensor).map(|&i| &self.modules[i])
    }

    pub fn module(&self, name: &str) -> Option<&LoraModule> {
        self.by_target
            .get(&format!("{name}.weight"))
            .map(|&i| &self.modules[i])
    }

    /// The full tensor that replaces base tensor `tensor` (PEFT loads it over the base).
    pub fn replacement(&self, tensor: &str) -> Option<&TensorInfo> {
        self.replacements.get(tensor).and_then(|k| self.file.get(k))
    }

    pub fn replaced_tensors(&self) -> impl Iterator<Item = &String> {
        self.replacements.keys()
    }

    /// Whether the full tensor that replaces `tensor` is a trained `modules_to_save` copy
    /// (`<M>.weight`), not a `base_layer` copy of the base (`<M>.base_layer.weight`).
    pub fn is_saved_module_tensor(&self, tensor: &str) -> bool {
        self.replacements
            .get(tensor)
            .is_some_and(|k| !k.contains(".base_layer."))
    }

    /// The modules whose trained full copy the adapter carries (`modules_to_save`), from its
    /// tensors, in natural order: `lm_head` for `base_model.model.lm_head.weight`.
    pub fn saved_modules(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .replacements
            .keys()
            .filter(|t| self.is_saved_module_tensor(t))
            .map(|t| {
                t.rsplit_once('.')
                    .map_or(t.as_str(), |(m, _)| m)
                    .to_string()
            })
            .collect();
        out.sort_by(|x, y| natural_cmp(x, y));
        out.dedup();
        out
    }

    /// A tensor of the adapter file as an f32 matrix.
    pub fn matrix(&self, key: &str) -> Mat {
        let t = self.file.get(key).expect("key of this adapter");
        let (rows, cols) = match t.shape.as_slice() {
            [r, c] => (*r, *c),
            [n] => (1, *n),
            _ => (1, t.numel()),
        };
        let mut data = vec![0f32; t.numel()];
        dtype::decode(t.dtype, self.file.data(t), &mut data);
        Mat { rows, cols, data }
    }

    /// Checks that every LoRA factor is finite; names the file, tensor and element of the
    /// first NaN or infinity. Run before merging adapters: a NaN would otherwise come out
    /// as a NaN adapter (linear, cat) or a misleading SVD failure.
    pub fn check_finite(&self) -> Result<()> {
        for m in &self.modules {
            for key in [&m.a_key, &m.b_key] {
                let x = self.matrix(key);
                if let Some(i) = x.data.iter().position(|v| !v.is_finite()) {
                    return Err(Error::BadFile {
                        path: self.file.path.clone(),
                        msg: format!(
                            "LoRA factor {key} holds {} at element {i} (row {}, column {}); a merge would spread it: fix or re-export the adapter",
                            x.data[i],
                            i / x.cols.max(1),
                            i % x.cols.max(1)
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    pub fn a(&self, m: &LoraModule) -> Mat {
        self.matrix(&m.a_key)
    }

    pub fn b(&self, m: &LoraModule) -> Mat {
        self.matrix(&m.b_key)
    }

    /// ΔW of a module, shaped like its base tensor: PEFT's `get_delta_weight`, the product
    /// on the backend and then the scale (f32, as PEFT computes it).
    pub fn delta(&self, m: &LoraModule, backend: &dyn Backend) -> Result<Mat> {
        self.delta_scaled(m, 1.0, backend)
    }

    /// ΔW of a module times `factor` (a recipe's adapter scale), folded into the one
    /// multiplication by s: factor·s·B·A.
    pub fn delta_scaled(&self, m: &LoraModule, factor: f64, backend: &dyn Backend) -> Result<Mat> {
        delta_of(&self.a(m), &self.b(m), m.kind, m.scale * factor, backend)
    }

    /// Checks every module and replacement against the base model's tensors: present, 2-D
    /// and of matching shape. Names the module and both shapes when they differ.
    pub fn check_against(&self, base: &ModelFolder) -> Result<()> {
        let bad = |msg: String| Error::BadModel {
            path: self.dir.clone(),
            msg,
        };
        for m in &self.modules {
            let target = m.target();
            let Some(t) = base.get(&target) else {
                return Err(bad(format!(
                    "module {} adapts tensor {target}, which base model {} does not have",
                    m.name,
                    base.path.display()
                )));
            };
            let want = m.delta_shape();
            if t.shape() != want.as_slice() {
                let (a_exp, b_exp) = match (m.kind.transposed(), t.shape()) {
                    (false, [o, i]) => (format!("[r, {i}]"), format!("[{o}, r]")),
                    (true, [i, o]) => (format!("[r, {i}]"), format!("[{o}, r]")),
                    _ => ("?".into(), "?".into()),
                };
                return Err(bad(format!(
                    "module {}: {} is {:?} and {} is {:?}, which make a ΔW of {want:?}, but {target} in base model {} is {:?} (expected A {a_exp}, B {b_exp}); was this adapter trained on a different base model?",
                    m.name,
                    m.a_key,
                    m.a_shape,
                    m.b_key,
                    m.b_shape,
                    base.path.display(),
                    t.shape()
                )));
            }
        }
        for (target, key) in &self.replacements {
            let info = self.file.get(key).unwrap();
            let Some(t) = base.get(target) else {
                return Err(bad(format!(
                    "full tensor {key} replaces {target}, which base model {} does not have",
                    base.path.display()
                )));
            };
            if t.shape() != info.shape.as_slice() {
                return Err(bad(format!(
                    "full tensor {key} is {:?} but {target} in base model {} is {:?}",
                    info.shape,
                    base.path.display(),
                    t.shape()
                )));
            }
        }
        Ok(())
    }

    /// The adapter's dtype for writing merged adapters: that of its first factor.
    pub fn dtype(&self) -> DType {
        self.modules
            .first()
            .and_then(|m| self.file.get(&m.a_key))
            .map(|t| t.dtype)
            .unwrap_or(DType::F32)
    }
}

/// ΔW = op(B·A)·s with op transposing for embeddings and `fan_in_fan_out`; the product is
/// formed on the backend.
pub fn delta_of(
    a: &Mat,
    b: &Mat,
    kind: ModuleKind,
    scale: f64,
    backend: &dyn Backend,
) -> Result<Mat> {
    // (B·A)ᵀ = Aᵀ·Bᵀ
    let mut d = if kind.transposed() {
        backend.matmul(a, b, true, true)?
    } else {
        backend.matmul(b, a, false, false)?
    };
    let s = scale as f32;
    d.data.iter_mut().for_each(|x| *x *= s);
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_follow_peft() {
        assert!(pattern_matches("v_proj", "model.layers.0.self_attn.v_proj").unwrap());
        assert!(pattern_matches("v_proj", "v_proj").unwrap());
        assert!(!pattern_matches("proj", "model.layers.0.self_attn.v_proj").unwrap());
        assert!(pattern_matches(
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.q_proj"
        )
        .unwrap());
        assert!(!pattern_matches(
            "model.layers.1.self_attn.q_proj",
            "model.layers.11.self_attn.q_proj"
        )
        .unwrap());
        assert!(pattern_matches(r"layers\.\d+\.mlp\..*", "model.layers.3.mlp.up_proj").unwrap());
    }

    #[test]
    fn config_patterns_first_match_wins() {
        let c = AdapterConfig::parse(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"rank_pattern":{"q_proj":4,"layers.1.self_attn.q_proj":2},"alpha_pattern":{"model.layers.1.self_attn.q_proj":32},"use_rslora":true}"#,
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.rank_alpha("model.layers.1.self_attn.q_proj"), (4, 32.0));
        assert_eq!(c.rank_alpha("model.layers.0.self_attn.v_proj"), (8, 16.0));
        assert_eq!(c.max_rank(), 8);
        assert_eq!(c.scale(4, 32.0), 16.0);
        for bad in [
            r#"{"peft_type":"LOHA","r":8}"#,
            r#"{"r":0}"#,
            r#"{"lora_alpha":8}"#,
            r#"{"r":4,"use_dora":true}"#,
            r#"{"r":4,"target_modules":5}"#,
            "[1]",
        ] {
            assert!(AdapterConfig::parse(bad, Path::new("x")).is_err(), "{bad}");
        }
    }
}
