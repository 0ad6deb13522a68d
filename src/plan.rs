//! From a recipe and the inputs' headers to a checked list of output tensors.
//!
//! Nothing here reads tensor data. Every check that can be made from headers is made here,
//! so that a merge that is going to fail fails in seconds, naming the model and the tensor:
//! missing tensors, shape and dtype mismatches, parameters that do not resolve, disk space.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::inputs::ModelInput;
use crate::io::guard::Protected;
use crate::io::model::ModelFolder;
use crate::methods::{self, BasePolicy, MethodInfo, Params, Scope, SideInput};
use crate::recipe::{ModelRef, ParamMap, Recipe, SliceDef, TokenizerSource, Value1};

pub use crate::io::model::TOKENIZER_FILES;

/// Path components that hold a layer number after them (`model.layers.7.mlp`, `h.3.attn`).
const LAYER_WORDS: &[&str] = &["layers", "h", "blocks", "layer", "block"];

/// Byte range and value of the layer number in a tensor name.
pub fn layer_of(name: &str) -> Option<(usize, usize, usize)> {
    let mut pos = 0;
    let mut prev: Option<&str> = None;
    for comp in name.split('.') {
        if let Some(p) = prev {
            if !comp.is_empty()
                && comp.bytes().all(|c| c.is_ascii_digit())
                && LAYER_WORDS.contains(&p)
            {
                return comp.parse().ok().map(|v| (pos, pos + comp.len(), v));
            }
        }
        prev = Some(comp);
        pos += comp.len() + 1;
    }
    None
}

fn with_layer(name: &str, layer: usize) -> String {
    match layer_of(name) {
        Some((a, b, _)) => format!("{}{}{}", &name[..a], layer, &name[b..]),
        None => name.to_string(),
    }
}

/// Names of input embeddings: these come first in a model and from the first slice.
fn is_pre_layer(name: &str) -> bool {
    ["embed", "wte", "wpe", "tok_embeddings", "word_embeddings"]
        .iter()
        .any(|k| name.contains(k))
}

/// A tensor that is not a module's weight or bias: a buffer such as `rotary_emb.inv_freq`
/// or `position_ids`. One that only some models have is copied from the first that has it
/// (mergekit's behaviour); a weight or bias missing from one model is an error.
fn is_buffer(name: &str) -> bool {
    !matches!(name.rsplit('.').next(), Some("weight" | "bias"))
}

/// The names a slice's output takes from its models: the reference model's (`names` of
/// `refm`, in its order), then those only the other sources have, in source order. `keep`
/// selects and renames a model's tensor (None: not this group); a tied model's missing
/// `lm_head` is not added from another model (it is the embedding, as before).
fn union_names(
    models: &[ModelInput],
    refm: usize,
    srcs: &[Src],
    keep: impl Fn(&Src, &str) -> Option<String>,
) -> Vec<String> {
    let ref_src = srcs.iter().find(|s| s.model == refm);
    let mut out: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    let order = ref_src
        .into_iter()
        .chain(srcs.iter().filter(|s| s.model != refm));
    for s in order {
        for n in models[s.model].names() {
            if let Some(k) = keep(s, n) {
                if s.model != refm && k.contains("lm_head") && models[refm].tied_embeddings() {
                    continue;
                }
                if seen.insert(k.clone()) {
                    out.push(k);
                }
            }
        }
    }
    out
}

fn is_vocab_tensor(name: &str) -> bool {
    is_pre_layer(name) || name.contains("lm_head") || name.ends_with("output.weight")
}

#[derive(Clone, Debug)]
pub struct TaskInput {
    /// Index into `Plan::models`.
    pub model: usize,
    pub tensor: String,
}

#[derive(Clone, Debug)]
pub struct TensorTask {
    pub name: String,
    pub shape: Vec<usize>,
    pub out_dtype: DType,
    pub base: Option<TaskInput>,
    /// The inputs merged (for base-using methods, the base is not among them).
    pub models: Vec<TaskInput>,
    /// Resolved parameters; `per_input` is aligned with `models`.
    pub params: Params,
    /// Layer position in [0, 1] used for gradients, and the output layer if any.
    pub t: f64,
    pub layer: Option<usize>,
    /// Not a float tensor: copied from `models[0]` untouched.
    pub copy_only: bool,
}

impl TensorTask {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn out_bytes(&self) -> u64 {
        self.numel() as u64 * self.out_dtype.size() as u64
    }
}

pub struct Plan {
    pub recipe: Recipe,
    pub method: &'static MethodInfo,
    pub models: Vec<ModelInput>,
    pub base: Option<usize>,
    pub tasks: Vec<TensorTask>,
    pub load_dtype: DType,
    pub seed: u64,
    /// Model whose config.json the output starts from.
    pub config_from: usize,
    /// Model whose tokenizer files are copied.
    pub tokenizer_from: Option<usize>,
    pub out_layers: Option<usize>,
    /// Write README.md, the model card (mergekit's `--no-write-model-card` turns it off).
    pub write_card: bool,
    pub warnings: Vec<String>,
    /// Whole-model statistics of the methods that need them
    /// ([`methods::Method::whole_model`]), computed on first use by the executor.
    pub globals: std::sync::Mutex<Option<Vec<f64>>>,
    /// The state an earlier merge of this method left, when this merge continues it
    /// (`smelt continual`: that merge is model 0). The method's whole-model and finish
    /// hooks read it.
    pub prior: Option<serde_json::Value>,
}

/// A method's side inputs ([`SideInput`], e.g. Fisher merging's `fisher.safetensors`):
/// opens the side file in the folder of every merged model and adds its tensor as input
/// M + i of every task (same name and shape as input i).
fn attach_side_inputs(
    side: SideInput,
    models: &mut Vec<ModelInput>,
    tasks: &mut [TensorTask],
) -> Result<()> {
    let mut side_of = std::collections::BTreeMap::new();
    for t in tasks.iter_mut().filter(|t| !t.copy_only) {
        let mut extra = Vec::with_capacity(t.models.len());
        for ti in &t.models {
            let fid = match side_of.get(&ti.model) {
                Some(f) => *f,
                None => {
                    let m = &models[ti.model];
                    let path = m.dir().join(side.file);
                    if !path.is_file() {
                        return Err(Error::BadModel {
                            path: m.path.clone(),
                            msg: format!("has no {}: {}", side.file, side.why),
                        });
                    }
                    let label = format!("{} ({})", m.label, side.what);
                    let f = ModelInput::open(&path, &label)?;
                    models.push(f);
                    side_of.insert(ti.model, models.len() - 1);
                    models.len() - 1
                }
            };
            let want = models[ti.model].get(&ti.tensor).unwrap().shape().to_vec();
            let fm = &models[fid];
            let Some(fr) = fm.get(&ti.tensor) else {
                return Err(Error::MissingTensor {
                    model: fm.label.clone(),
                    tensor: ti.tensor.clone(),
                    hint: format!(
                        " (the {} file needs a tensor for every merged weight)",
                        side.what
                    ),
                });
            };
            if fr.shape() != want.as_slice() {
                return Err(Error::ShapeMismatch {
                    tensor: ti.tensor.clone(),
                    reference_model: models[ti.model].label.clone(),
                    expected: want,
                    model: fm.label.clone(),
                    got: fr.shape().to_vec(),
                    hint: format!(" (a {} tensor must have its weight's shape)", side.what),
                });
            }
            if !fr.dtype().is_mergeable() {
                return Err(Error::UnsupportedDtype {
                    model: fm.label.clone(),
                    tensor: ti.tensor.clone(),
                    dtype: fr.dtype().to_string(),
                });
            }
            extra.push(TaskInput {
                model: fid,
                tensor: ti.tensor.clone(),
            });
        }
        t.models.extend(extra);
    }
    Ok(())
}

/// A slice's source after models are opened.
struct Src {
    model: usize,
    /// First input layer of this slice in that model.
    start: usize,
    params: ParamMap,
}

struct OpenModels {
    refs: Vec<ModelRef>,
    folders: Vec<ModelInput>,
}

impl OpenModels {
    fn id(&mut self, r: &ModelRef) -> Result<usize> {
        if let Some(i) = self.refs.iter().position(|x| x == r) {
            return Ok(i);
        }
        let mut f = if crate::compeft::is_compressed(&r.path) && r.adapters.is_empty() {
            // a compressed task vector on its own: added to the base it records
            let c = crate::compeft::Compressed::open(&r.path)?;
            if !c.base.exists() {
                return Err(Error::BadModel {
                    path: r.path.clone(),
                    msg: format!(
                        "this compressed task vector was made against {}, which does not exist here; name the base in the recipe as `BASE+{}`",
                        c.base.display(),
                        r.raw
                    ),
                });
            }
            let mut f = ModelInput::open(&c.base, &r.label())?;
            f.attach_compressed(c)?;
            f
        } else {
            ModelInput::open(&r.path, &r.label())?
        };
        for a in &r.adapters {
            if crate::compeft::is_compressed(&a.path) {
                if a.scale != 1.0 {
                    return Err(Error::BadModel {
                        path: a.path.clone(),
                        msg: format!(
                            "is a compressed task vector; `scale` ({}) applies to LoRA adapters only",
                            a.scale
                        ),
                    });
                }
                f.attach_compressed(crate::compeft::Compressed::open(&a.path)?)?;
            } else {
                let label = a.path.display().to_string();
                f.attach_adapter(crate::lora::Adapter::open(&a.path, &label)?, a.scale)?;
            }
        }
        self.refs.push(r.clone());
        self.folders.push(f);
        Ok(self.folders.len() - 1)
    }
}

/// The layers a model has: the tensors are the truth (config.json is only compared with
/// them, never trusted for a count: a hostile or stale config must not make the plan loop
/// over layers that do not exist). Layers without tensors in the middle are an error.
/// Layer numbers at or above this are refused as implausible (the largest models have a few
/// hundred layers).
const MAX_LAYERS: usize = 1 << 20;

fn num_layers(m: &ModelFolder) -> Result<usize> {
    let present: BTreeSet<usize> = m
        .names()
        .iter()
        .filter_map(|n| layer_of(n).map(|l| l.2))
        .collect();
    let last = present.iter().next_back().copied();
    // A layer number beyond what any model has (a hostile name such as layers.18446744073709551615)
    let count = match last {
        None => 0,
        Some(l) if l < MAX_LAYERS => l + 1,
        Some(l) => {
            let name = m
                .names()
                .iter()
                .find(|n| layer_of(n).map(|x| x.2) == Some(l))
                .cloned();
            return Err(Error::BadModel {
                path: m.path.clone(),
                msg: format!(
                    "tensor {} has layer number {l}; smelt accepts layers below {MAX_LAYERS}",
                    name.unwrap_or_default()
                ),
            });
        }
    };
    if present.len() != count {
        let missing = (0..count).find(|l| !present.contains(l)).unwrap();
        return Err(Error::BadModel {
            path: m.path.clone(),
            msg: format!(
                "has tensors up to layer {} but none for layer {missing}",
                count - 1
            ),
        });
    }
    if let Some(c) = m.config_usize(&["num_hidden_layers", "n_layer", "num_layers"]) {
        if c != count {
            log::warn!(
                "{}: config.json says {c} layers, the tensors have {count}; going by the tensors",
                m.label
            );
        }
    }
    Ok(count)
}

impl Plan {
    /// Every path the plan reads: model folders (or single files), side files, LoRA
    /// adapters and compressed task vectors. A merge's output must keep clear of them all
    /// ([`crate::io::guard`]).
    pub fn input_paths(&self) -> Vec<Protected> {
        let mut out = Vec::new();
        for m in &self.models {
            let what = if m.folder.path.is_file() {
                "input file"
            } else {
                "input model"
            };
            out.push(Protected::input(what, &m.folder.path));
            for a in &m.adapters {
                out.push(Protected::input("adapter", &a.adapter.dir));
            }
            if let Some(c) = &m.compeft {
                out.push(Protected::input("compressed task vector", &c.dir));
            }
        }
        out
    }

    pub fn build(recipe: Recipe, seed_override: Option<u64>) -> Result<Plan> {
        let method = recipe.method;
        let mut warnings = recipe.warnings.clone();
        let mut om = OpenModels {
            refs: Vec::new(),
            folders: Vec::new(),
        };
        let rerr = |msg: String| Error::Recipe {
            path: recipe.path.clone(),
            msg,
        };

        // Open every model first: a missing folder is the most common mistake.
        let base = recipe.base_model.as_ref().map(|b| om.id(b)).transpose()?;
        let mut slices: Vec<(Vec<Src>, Option<usize>, &SliceDef)> = Vec::new();
        for (si, s) in recipe.slices.iter().enumerate() {
            let mut srcs = Vec::new();
            for src in &s.sources {
                let id = om.id(&src.model)?;
                srcs.push(Src {
                    model: id,
                    start: src.layer_range.map(|r| r.0).unwrap_or(0),
                    params: src.parameters.clone(),
                });
            }
            for (a, x) in srcs.iter().enumerate() {
                if srcs[..a].iter().any(|y| y.model == x.model) {
                    return Err(rerr(format!(
                        "slices[{si}] lists model {} twice; each model may appear once per slice",
                        om.refs[x.model].label()
                    )));
                }
            }
            let sbase = s
                .base_model
                .as_ref()
                .map(|b| om.id(b))
                .transpose()?
                .or(base);
            let uses_base = match (method.base, sbase) {
                (BasePolicy::Required, None) => {
                    return Err(rerr(format!("{} needs a `base_model`", method.name)));
                }
                (BasePolicy::Required | BasePolicy::Optional, Some(b)) => {
                    if !srcs.iter().any(|x| x.model == b) {
                        if recipe.from_models {
                            srcs.push(Src {
                                model: b,
                                start: 0,
                                params: ParamMap::new(),
                            });
                        } else {
                            return Err(rerr(format!(
                                "slices[{si}]: the base model {} must be one of the slice's sources",
                                om.refs[b].label()
                            )));
                        }
                    }
                    true
                }
                (BasePolicy::Ignored, Some(b)) => {
                    if si == 0 && !srcs.iter().any(|x| x.model == b) {
                        warnings.push(format!(
                            "{} does not use a base model; base_model {} is ignored",
                            method.name,
                            om.refs[b].label()
                        ));
                    }
                    false
                }
                (_, None) => false,
            };
            // Inputs merged besides the base (the base may also be listed among the models).
            let merged = srcs.len() - (uses_base && sbase.is_some()) as usize;
            let (lo, hi) = method.models;
            let range = match hi {
                Some(h) if h == lo => format!("exactly {lo}"),
                Some(h) => format!("{lo} to {h}"),
                None => format!("at least {lo}"),
            };
            let besides = if uses_base { " besides the base" } else { "" };
            if merged < lo || hi.is_some_and(|h| merged > h) {
                return Err(rerr(format!(
                    "{} merges {range} model{}{besides}; {} has {merged}",
                    method.name,
                    if lo == 1 && hi == Some(1) { "" } else { "s" },
                    if recipe.from_models {
                        "`models:`".to_string()
                    } else {
                        format!("slices[{si}]")
                    },
                )));
            }
            slices.push((srcs, if uses_base { sbase } else { None }, s));
        }
        let tok = match &recipe.tokenizer_source {
            None => None,
            Some(TokenizerSource::Base) => Some(base.ok_or_else(|| {
                rerr("`tokenizer_source: base` but the recipe has no `base_model`; name the model whose tokenizer to use, or remove the key".into())
            })?),
            Some(TokenizerSource::Model(r)) => Some(om.id(r)?),
        };
        if let Some(t) = tok {
            // as mergekit: a tokenizer asked for by name must exist
            let dir = om.folders[t].dir();
            if !TOKENIZER_FILES.iter().any(|f| dir.join(f).is_file()) {
                let which = match &recipe.tokenizer_source {
                    Some(TokenizerSource::Base) => "base",
                    _ => "a model",
                };
                return Err(rerr(format!(
                    "`tokenizer_source` names {which} {} but {} holds no tokenizer files ({}); copy the tokenizer there, name another model, or remove `tokenizer_source` (the output then takes the tokenizer of the base or first model, if any)",
                    om.refs[t].label(),
                    dir.display(),
                    TOKENIZER_FILES[..4].join(", ")
                )));
            }
        }
        let mut models = om.folders;
        for m in &models {
            warnings.extend(m.adapter_overrides());
        }

        // Layer counts: a `models:` slice spans every layer of each model.
        let mut slice_len = Vec::new();
        for (si, (srcs, _, def)) in slices.iter().enumerate() {
            let len = if recipe.from_models {
                let counts: Vec<usize> = srcs
                    .iter()
                    .map(|s| num_layers(&models[s.model]))
                    .collect::<Result<_>>()?;
                if let Some((j, c)) = counts.iter().enumerate().find(|(_, c)| **c != counts[0]) {
                    return Err(rerr(format!(
                        "{} has {} layers but {} has {c}; models of different depth need `slices:` with layer ranges",
                        models[srcs[0].model].label, counts[0], models[srcs[j].model].label
                    )));
                }
                counts[0]
            } else {
                let (a, b) = def.sources[0].layer_range.unwrap();
                for (j, s) in def.sources.iter().enumerate() {
                    let (_, end) = s.layer_range.unwrap();
                    let have = num_layers(&models[srcs[j].model])?;
                    if end > have {
                        return Err(rerr(format!(
                            "slices[{si}].sources[{j}]: layer_range ends at {end} but {} has {have} layers",
                            s.model.raw
                        )));
                    }
                }
                b - a
            };
            slice_len.push(len);
        }

        let load_dtype = recipe.dtype.unwrap_or(DType::F32);
        let seed = seed_override.or(recipe.seed).unwrap_or(0);
        let mut tasks = Vec::new();
        let mut builder = TaskBuilder {
            recipe: &recipe,
            method,
            models: &models,
            warnings: &mut warnings,
            mixed_halves: 0,
            partial: Default::default(),
        };

        // Non-layer tensors come from the first slice (embeddings) or the last (the rest).
        let reference = |srcs: &[Src], sbase: Option<usize>| sbase.unwrap_or(srcs[0].model);
        let (first_srcs, first_base, first_def) = &slices[0];
        let (last_srcs, last_base, last_def) = slices.last().unwrap();
        let ref_first = reference(first_srcs, *first_base);
        let ref_last = reference(last_srcs, *last_base);
        let non_layer = |refm: usize, srcs: &[Src], pre: bool| -> Vec<String> {
            union_names(&models, refm, srcs, |_, n| {
                (layer_of(n).is_none() && is_pre_layer(n) == pre).then(|| n.to_string())
            })
        };
        for name in non_layer(ref_first, first_srcs, true) {
            tasks.extend(builder.task(
                &name,
                None,
                0.0,
                first_srcs,
                *first_base,
                first_def,
                |_| name.clone(),
            )?);
        }
        let mut out_layer = 0usize;
        for (si, (srcs, sbase, def)) in slices.iter().enumerate() {
            let len = slice_len[si];
            let refm = reference(srcs, *sbase);
            let ref_start = srcs
                .iter()
                .find(|s| s.model == refm)
                .map(|s| s.start)
                .unwrap_or(0);
            for j in 0..len {
                let t = if len > 1 {
                    j as f64 / (len - 1) as f64
                } else {
                    1.0
                };
                let in_layer = ref_start + j;
                // named as in the reference model's layer `in_layer`
                let names = union_names(&models, refm, srcs, |s, n| {
                    (layer_of(n).map(|l| l.2) == Some(s.start + j)).then(|| with_layer(n, in_layer))
                });
                if !models[refm]
                    .names()
                    .iter()
                    .any(|n| layer_of(n).map(|l| l.2) == Some(in_layer))
                {
                    return Err(Error::BadModel {
                        path: models[refm].path.clone(),
                        msg: format!("has no tensors for layer {in_layer}"),
                    });
                }
                for name in &names {
                    let out_name = with_layer(name, out_layer);
                    tasks.extend(builder.task(
                        &out_name,
                        Some(out_layer),
                        t,
                        srcs,
                        *sbase,
                        def,
                        |s: &Src| with_layer(name, s.start + j),
                    )?);
                }
                out_layer += 1;
            }
        }
        for name in non_layer(ref_last, last_srcs, false) {
            tasks.extend(builder.task(
                &name,
                None,
                0.0,
                last_srcs,
                *last_base,
                last_def,
                |_| name.clone(),
            )?);
        }

        for ((from, lack), names) in std::mem::take(&mut builder.partial) {
            let n = names.len();
            let shown = names.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
            let more = if n > 3 {
                format!(" and {} more", n - 3)
            } else {
                String::new()
            };
            builder.warnings.push(format!(
                "{shown}{more}: missing from {lack}, so copied unmerged from {from} ({n} buffer{} that only some models have; mergekit copies them from the first model that has them)",
                if n == 1 { "" } else { "s" }
            ));
        }
        if builder.mixed_halves > 0 {
            let n = builder.mixed_halves;
            warnings.push(format!(
                "{n} tensor{} {} float16 in some models and bfloat16 in others and the recipe sets no `dtype`: written as float32, as mergekit does (set `dtype:` or `out_dtype:` to choose)",
                if n == 1 { "" } else { "s" },
                if n == 1 { "is" } else { "are" }
            ));
        }
        if let Some(side) = method.imp.side_input() {
            attach_side_inputs(side, &mut models, &mut tasks)?;
        }

        let config_from = base.unwrap_or(ref_first);
        let out_layers = if out_layer > 0 { Some(out_layer) } else { None };
        Ok(Plan {
            method,
            models,
            base,
            tasks,
            load_dtype,
            seed,
            config_from,
            tokenizer_from: Some(tok.unwrap_or(config_from)),
            out_layers,
            write_card: true,
            warnings,
            recipe,
            globals: std::sync::Mutex::new(None),
            prior: None,
        })
    }

    /// mergekit's rule: models whose config.json names another architecture (the first of
    /// `architectures`, or `model_type`) are not merged unless `--allow-crimes` says so.
    /// Models without a config.json, or without these keys, are not compared.
    pub fn check_architectures(&self) -> Result<()> {
        let arch = |m: &ModelInput| {
            let c = m.config.as_ref()?;
            let a = c
                .get("architectures")
                .and_then(|a| a.get(0))
                .and_then(|a| a.as_str());
            let t = c.get("model_type").and_then(|t| t.as_str());
            (a.is_some() || t.is_some()).then(|| (a.map(str::to_string), t.map(str::to_string)))
        };
        // (architectures[0], model_type)
        type Arch = (Option<String>, Option<String>);
        let mut first: Option<(&ModelInput, Arch)> = None;
        for m in &self.models {
            let Some(a) = arch(m) else { continue };
            let Some((fm, fa)) = &first else {
                first = Some((m, a));
                continue;
            };
            let show = |x: &Arch| match x {
                (Some(a), Some(t)) => format!("{a} (model_type {t})"),
                (Some(a), None) => a.clone(),
                (None, Some(t)) => format!("model_type {t}"),
                (None, None) => unreachable!(),
            };
            let differ =
                |x: &Option<String>, y: &Option<String>| x.is_some() && y.is_some() && x != y;
            if differ(&fa.0, &a.0) || differ(&fa.1, &a.1) {
                return Err(Error::BadModel {
                    path: m.folder.path.clone(),
                    msg: format!(
                        "its config.json names architecture {} but {} is {}; smelt, as mergekit, does not mix architectures: pass --allow-crimes to merge them anyway",
                        show(&a),
                        fm.label,
                        show(fa)
                    ),
                });
            }
        }
        Ok(())
    }

    /// Total bytes of all output tensors.
    pub fn out_bytes(&self) -> u64 {
        self.tasks.iter().map(|t| t.out_bytes()).sum()
    }

    pub fn largest_task_bytes(&self) -> u64 {
        self.tasks
            .iter()
            .map(|t| t.numel() as u64 * 4 * (t.models.len() as u64 + 2))
            .max()
            .unwrap_or(0)
    }

    /// Peak memory of the merge besides the memory-mapped inputs (which live in the page
    /// cache): output buffers in flight, the writer queue, per-thread scratch.
    pub fn peak_ram_estimate(&self, threads: usize) -> u64 {
        let largest_out = self.tasks.iter().map(|t| t.out_bytes()).max().unwrap_or(0);
        let max_models = self
            .tasks
            .iter()
            .map(|t| t.models.len() + 1)
            .max()
            .unwrap_or(1) as u64;
        let scratch = threads as u64 * (max_models + 4) * crate::backend::cpu::CHUNK as u64 * 4;
        let hist = threads as u64 * max_models * (1 << 16) * 8;
        3 * largest_out + scratch + hist + 32 * 1024 * 1024
    }

    /// What model `i` is to this merge, for listings: ` (base)`, ` (tokenizer)` or nothing.
    pub fn role(&self, i: usize) -> &'static str {
        if Some(i) == self.base {
            " (base)"
        } else if Some(i) == self.tokenizer_from
            && !self
                .tasks
                .iter()
                .any(|t| t.models.iter().any(|m| m.model == i))
        {
            " (tokenizer only)"
        } else {
            ""
        }
    }

    pub fn model_label(&self, i: usize) -> &str {
        &self.models[i].label
    }

    /// A readable summary of what the merge will do (`--dry-run`).
    pub fn summary(&self, threads: usize, shards: usize, verbose_tensors: bool) -> String {
        let mut s = String::new();
        let gb = crate::units::bytes;
        let _ = writeln!(
            s,
            "method      {} — {}",
            self.method.name, self.method.pretty
        );
        let _ = writeln!(s, "recipe      {}", self.recipe.path.display());
        for (i, m) in self.models.iter().enumerate() {
            let role = self.role(i);
            let dts: BTreeSet<String> = m
                .files()
                .iter()
                .flat_map(|f| f.tensors())
                .map(|t| t.dtype.to_string())
                .collect();
            let _ = writeln!(
                s,
                "model {i}     {}{role}: {} tensors, {}, {}",
                m.label,
                m.names().len(),
                dts.into_iter().collect::<Vec<_>>().join("/"),
                gb(m.total_bytes())
            );
            for a in &m.adapters {
                let ad = &a.adapter;
                let full = ad.replaced_tensors().count();
                let _ = writeln!(
                    s,
                    "  + adapter {}: {} LoRA module{} (rank {}){}, ΔW ×{}",
                    ad.label,
                    ad.modules.len(),
                    if ad.modules.len() == 1 { "" } else { "s" },
                    ad.config.max_rank(),
                    if full > 0 {
                        format!(", {full} full tensor{}", if full == 1 { "" } else { "s" })
                    } else {
                        String::new()
                    },
                    a.scale
                );
            }
        }
        let params: usize = self.tasks.iter().map(|t| t.numel()).sum();
        let out_dt: BTreeSet<String> = self.tasks.iter().map(|t| t.out_dtype.to_string()).collect();
        let _ = writeln!(
            s,
            "output      {} tensors, {} parameters, {}, {} in {} shard{}",
            self.tasks.len(),
            crate::units::count(params as u64),
            out_dt.into_iter().collect::<Vec<_>>().join("/"),
            gb(self.out_bytes()),
            shards,
            if shards == 1 { "" } else { "s" }
        );
        if let Some(l) = self.out_layers {
            let _ = writeln!(s, "layers      {l}");
        }
        let _ = writeln!(
            s,
            "compute     f32 (inputs loaded as {}), seed {}",
            self.load_dtype.torch_name(),
            self.seed
        );
        let _ = writeln!(
            s,
            "memory      ~{} peak RAM besides page cache ({} threads)",
            gb(self.peak_ram_estimate(threads)),
            threads
        );
        for w in &self.warnings {
            let _ = writeln!(s, "warning     {w}");
        }
        let _ = writeln!(s);
        let shown = if verbose_tensors {
            self.tasks.len()
        } else {
            self.tasks.len().min(40)
        };
        for t in &self.tasks[..shown] {
            let _ = writeln!(s, "{}", self.describe_task(t));
        }
        if shown < self.tasks.len() {
            let _ = writeln!(
                s,
                "... and {} more tensors (-v lists all)",
                self.tasks.len() - shown
            );
        }
        s
    }

    pub fn describe_task(&self, t: &TensorTask) -> String {
        let mut line = format!("{} {:?} {}", t.name, t.shape, t.out_dtype);
        if t.copy_only {
            let _ = write!(line, " <- copy of {}", self.model_label(t.models[0].model));
            return line;
        }
        let shared: Vec<String> = t
            .params
            .shared
            .iter()
            .filter_map(|(n, v)| v.map(|v| format!("{n}={v}")))
            .collect();
        let mut parts = Vec::new();
        if let Some(b) = &t.base {
            parts.push(format!("base {}", self.model_label(b.model)));
        }
        for (i, m) in t.models.iter().enumerate() {
            let ps: Vec<String> = t
                .params
                .per_input
                .get(i)
                .into_iter()
                .flatten()
                .filter_map(|(n, v)| v.map(|v| format!("{n}={v}")))
                .collect();
            let mut p = self.model_label(m.model).to_string();
            if m.tensor != t.name {
                p.push_str(&format!(":{}", m.tensor));
            }
            if !ps.is_empty() {
                p.push_str(&format!(" ({})", ps.join(", ")));
            }
            parts.push(p);
        }
        let _ = write!(line, " <- {}", parts.join(" | "));
        if !shared.is_empty() {
            let _ = write!(line, " | {}", shared.join(", "));
        }
        line
    }

    /// The folder the output starts its config and tokenizer from.
    pub fn config_dir(&self) -> PathBuf {
        self.models[self.config_from].dir().to_path_buf()
    }
}

struct TaskBuilder<'a> {
    recipe: &'a Recipe,
    method: &'static MethodInfo,
    models: &'a [ModelInput],
    warnings: &'a mut Vec<String>,
    /// Tensors whose inputs mix float16 and bfloat16 (written as float32).
    mixed_halves: usize,
    /// Buffers only some models have, copied: (from, models lacking them) -> names.
    partial: std::collections::BTreeMap<(String, String), Vec<String>>,
}

impl TaskBuilder<'_> {
    /// Builds the task of one output tensor; `input_name` maps a source to the tensor name
    /// to read from it. Returns None for a tensor that is skipped.
    #[allow(clippy::too_many_arguments)]
    fn task(
        &mut self,
        out_name: &str,
        layer: Option<usize>,
        t: f64,
        srcs: &[Src],
        sbase: Option<usize>,
        def: &SliceDef,
        input_name: impl Fn(&Src) -> String,
    ) -> Result<Option<TensorTask>> {
        let models = self.models;
        // (source, resolved tensor name)
        let mut found: Vec<(&Src, String)> = Vec::new();
        // sources without this tensor (a buffer only some models have)
        let mut lacking: Vec<usize> = Vec::new();
        for s in srcs {
            let want = input_name(s);
            let m = &models[s.model];
            let name = if m.get(&want).is_some() {
                want
            } else if want.contains("lm_head") && m.tied_embeddings() {
                // A tied model reads its output embedding from the input embedding.
                match m
                    .names()
                    .iter()
                    .find(|n| is_pre_layer(n) && n.contains("embed_tokens"))
                {
                    Some(e) => e.clone(),
                    None => return Err(missing(m, &want, None)),
                }
            } else if is_buffer(&want) {
                lacking.push(s.model);
                continue;
            } else {
                let holder = srcs
                    .iter()
                    .find(|o| models[o.model].get(&input_name(o)).is_some())
                    .map(|o| models[o.model].label.as_str());
                return Err(missing(m, &want, holder));
            };
            found.push((s, name));
        }
        if !lacking.is_empty() {
            // mergekit's rule for a tensor only some models have: the first that has it
            // (the reference model when it does) gives it unmerged
            let Some((s, n)) = sbase
                .and_then(|b| found.iter().find(|(s, _)| s.model == b))
                .or(found.first())
                .cloned()
            else {
                return Ok(None);
            };
            let m = &models[s.model];
            let tr = m.get(&n).unwrap();
            let lack: Vec<&str> = lacking.iter().map(|l| models[*l].label.as_str()).collect();
            self.partial
                .entry((m.label.clone(), lack.join(", ")))
                .or_default()
                .push(out_name.to_string());
            return Ok(Some(TensorTask {
                name: out_name.to_string(),
                shape: tr.shape().to_vec(),
                out_dtype: tr.dtype(),
                base: None,
                models: vec![TaskInput {
                    model: s.model,
                    tensor: n,
                }],
                params: Params {
                    shared: vec![],
                    per_input: vec![vec![]],
                },
                t,
                layer,
                copy_only: true,
            }));
        }
        let (ref_src, ref_name) = match sbase.and_then(|b| found.iter().find(|(s, _)| s.model == b))
        {
            Some(x) => x.clone(),
            None => found[0].clone(),
        };
        let rt = models[ref_src.model].get(&ref_name).unwrap();
        let shape = rt.shape().to_vec();
        let ref_label = &models[ref_src.model].label;
        for (s, name) in &found {
            let tr = models[s.model].get(name).unwrap();
            if tr.shape() != shape.as_slice() {
                let hint = if is_vocab_tensor(out_name) {
                    " (vocabulary sizes differ; smelt does not resize embeddings yet — merge models that share a tokenizer)"
                } else {
                    ""
                };
                return Err(Error::ShapeMismatch {
                    tensor: out_name.to_string(),
                    reference_model: ref_label.clone(),
                    expected: shape.clone(),
                    model: models[s.model].label.clone(),
                    got: tr.shape().to_vec(),
                    hint: hint.to_string(),
                });
            }
        }
        let mergeable = found
            .iter()
            .all(|(s, n)| models[s.model].get(n).unwrap().dtype().is_mergeable());
        if !mergeable {
            if rt.dtype().is_mergeable() {
                let (s, n) = found
                    .iter()
                    .find(|(s, n)| !models[s.model].get(n).unwrap().dtype().is_mergeable())
                    .unwrap();
                return Err(Error::UnsupportedDtype {
                    model: models[s.model].label.clone(),
                    tensor: n.clone(),
                    dtype: models[s.model].get(n).unwrap().dtype().to_string(),
                });
            }
            self.warnings.push(format!(
                "{out_name} is {} (not a float tensor): copied from {ref_label} unmerged",
                rt.dtype()
            ));
            return Ok(Some(TensorTask {
                name: out_name.to_string(),
                shape,
                out_dtype: rt.dtype(),
                base: None,
                models: vec![TaskInput {
                    model: ref_src.model,
                    tensor: ref_name,
                }],
                params: Params {
                    shared: vec![],
                    per_input: vec![vec![]],
                },
                t,
                layer,
                copy_only: true,
            }));
        }

        let dtypes: BTreeSet<DType> = found
            .iter()
            .map(|(s, n)| models[s.model].get(n).unwrap().dtype())
            .collect();
        // float16 and bfloat16 cannot hold each other's values: mergekit's torch promotes
        // the pair to float32, and so does smelt (any other mix keeps the reference's dtype)
        let mixed_halves = dtypes.contains(&DType::F16) && dtypes.contains(&DType::BF16);
        let out_dtype = match self.recipe.out_dtype.or(self.recipe.dtype) {
            Some(d) => d,
            None if mixed_halves => {
                self.mixed_halves += 1;
                DType::F32
            }
            None => rt.dtype(),
        };
        let mut base = None;
        let mut inputs: Vec<(&Src, String)> = Vec::new();
        for (s, n) in found {
            if Some(s.model) == sbase && base.is_none() {
                base = Some(TaskInput {
                    model: s.model,
                    tensor: n,
                });
            } else {
                inputs.push((s, n));
            }
        }

        // Parameters: shared ones against the output name, per-model ones against the input
        // name, highest precedence first (source, slice, top level).
        let shared_chain = [&def.parameters, &self.recipe.parameters];
        let mut shared = Vec::new();
        for p in self
            .method
            .params
            .iter()
            .filter(|p| p.scope == Scope::Shared)
        {
            shared.push((p.name, resolve(p, &shared_chain, out_name, t, None)?));
        }
        let mut per_input = Vec::new();
        for (s, n) in &inputs {
            let chain = [&s.params, &def.parameters, &self.recipe.parameters];
            let mut v = Vec::new();
            for p in self
                .method
                .params
                .iter()
                .filter(|p| p.scope != Scope::Shared)
            {
                v.push((
                    p.name,
                    resolve(p, &chain, n, t, Some(&models[s.model].label))?,
                ));
            }
            per_input.push(v);
        }
        let params = Params { shared, per_input };
        methods::check(self.method, &params, out_name)?;
        if shape.iter().product::<usize>() >= u32::MAX as usize {
            return Err(Error::Param {
                tensor: out_name.to_string(),
                msg: format!(
                    "{shape:?} has 2^32 or more elements; smelt indexes elements with 32 bits"
                ),
            });
        }
        Ok(Some(TensorTask {
            name: out_name.to_string(),
            shape,
            out_dtype,
            base,
            models: inputs
                .into_iter()
                .map(|(s, n)| TaskInput {
                    model: s.model,
                    tensor: n,
                })
                .collect(),
            params,
            t,
            layer,
            copy_only: false,
        }))
    }
}

/// A weight or bias one model lacks; `holder` is a model of the slice that has it.
fn missing(m: &ModelFolder, tensor: &str, holder: Option<&str>) -> Error {
    Error::MissingTensor {
        model: m.label.clone(),
        tensor: tensor.to_string(),
        hint: if tensor.contains("lm_head") {
            " (and its config.json does not tie the embeddings)".into()
        } else if let Some(h) = holder.filter(|h| *h != m.label) {
            format!(
                " but {h} has it; smelt merges a weight only when every model has it (merge models with the same weights, or pick layers with `slices:`)"
            )
        } else {
            String::new()
        },
    }
}

fn resolve(
    p: &methods::ParamSpec,
    chain: &[&ParamMap],
    tensor: &str,
    t: f64,
    model: Option<&str>,
) -> Result<Option<Value1>> {
    for scope in chain {
        if let Some(setting) = scope.get(p.name) {
            let v = setting.eval(tensor, t, p.kind).map_err(|e| Error::Param {
                tensor: tensor.to_string(),
                msg: format!("parameter `{}`: {e}", p.name),
            })?;
            if v.is_some() {
                return Ok(v);
            }
        }
    }
    Ok(match p.default {
        methods::Default::Required => {
            let who = model.map(|m| format!(" for model {m}")).unwrap_or_default();
            return Err(Error::Param {
                tensor: tensor.to_string(),
                msg: format!(
                    "required parameter `{}` is not set{who} (set it in that model's `parameters:` or in the top-level `parameters:`)",
                    p.name
                ),
            });
        }
        methods::Default::Unset => None,
        methods::Default::Float(x) => Some(Value1::Float(x)),
        methods::Default::Bool(b) => Some(Value1::Bool(b)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_numbers() {
        assert_eq!(
            layer_of("model.layers.12.mlp.up_proj.weight").map(|l| l.2),
            Some(12)
        );
        assert_eq!(
            layer_of("transformer.h.3.attn.c_attn.weight").map(|l| l.2),
            Some(3)
        );
        assert_eq!(layer_of("model.embed_tokens.weight"), None);
        assert_eq!(
            layer_of("model.layers.1.mlp.experts.7.w1").map(|l| l.2),
            Some(1)
        );
        assert_eq!(
            with_layer("model.layers.12.mlp.up_proj.weight", 3),
            "model.layers.3.mlp.up_proj.weight"
        );
        assert_eq!(with_layer("lm_head.weight", 3), "lm_head.weight");
    }
}
