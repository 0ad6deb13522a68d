//! mergekit's YAML recipe schema, read strictly: unknown keys and methods are errors that
//! list what is valid, raised before any model is opened. Parameters follow mergekit: one
//! that the method does not take but another method does (`int8_mask` or `density` on
//! `linear`, `weight` on a slerp entry) is ignored with a warning, as mergekit ignores it; a
//! name no method takes is an error (a typo), with the nearest parameter of the method as a
//! hint. YAML merge keys (`<<: *anchor`) are expanded before the recipe is read.

pub mod params;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_norway::Value;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::hub::Found;
use crate::methods::{self, MethodInfo};
pub use params::{Kind, Scalar, Setting, Value1};

/// A LoRA adapter folder applied to a model: mergekit's `model+adapter`, or an entry of
/// smelt's `adapters:` list.
#[derive(Clone, Debug)]
pub struct AdapterRef {
    /// As written in the recipe.
    pub raw: String,
    pub path: PathBuf,
    /// Multiplies the adapter's ΔW (1 unless the recipe gives a `scale`).
    pub scale: f64,
}

/// A model named by a recipe, resolved against the recipe's folder.
#[derive(Clone, Debug)]
pub struct ModelRef {
    /// The `model:` string as written in the recipe (with a `+adapter` if it has one).
    pub raw: String,
    pub path: PathBuf,
    /// LoRA adapters applied on top, in order: the one of `model+adapter` first, then those
    /// of the `adapters:` list.
    pub adapters: Vec<AdapterRef>,
    /// How many of `adapters` are already named in `raw` (0 or 1: the `+adapter`).
    pub in_raw: usize,
}

impl ModelRef {
    /// Identity used to match the base model among sources: the model, and every adapter
    /// with its scale, in order.
    pub fn key(&self) -> (PathBuf, Vec<(PathBuf, u64)>) {
        let canon = |p: &PathBuf| p.canonicalize().unwrap_or_else(|_| p.clone());
        (
            canon(&self.path),
            self.adapters
                .iter()
                .map(|a| (canon(&a.path), a.scale.to_bits()))
                .collect(),
        )
    }

    /// How the model is named in messages, the plan and the model card: the `model:` string,
    /// then ` + ADAPTER` (with ` ×SCALE` unless 1) for each adapter of the `adapters:` list.
    pub fn label(&self) -> String {
        let mut s = self.raw.clone();
        for a in &self.adapters[self.in_raw..] {
            s.push_str(" + ");
            s.push_str(&a.raw);
            if a.scale != 1.0 {
                s.push_str(&format!(" ×{}", a.scale));
            }
        }
        s
    }
}

impl PartialEq for ModelRef {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

pub type ParamMap = BTreeMap<String, Setting>;

#[derive(Clone, Debug)]
pub struct SourceDef {
    pub model: ModelRef,
    /// Half-open input layer range; `None` = every layer of the model (a `models:` recipe).
    pub layer_range: Option<(usize, usize)>,
    pub parameters: ParamMap,
}

#[derive(Clone, Debug)]
pub struct SliceDef {
    pub sources: Vec<SourceDef>,
    pub base_model: Option<ModelRef>,
    pub parameters: ParamMap,
}

#[derive(Clone, Debug)]
pub enum TokenizerSource {
    Base,
    Model(ModelRef),
}

#[derive(Clone, Debug)]
pub struct Recipe {
    pub path: PathBuf,
    /// The recipe text as given, for the model card.
    pub text: String,
    pub method: &'static MethodInfo,
    pub base_model: Option<ModelRef>,
    /// `models:` recipes become one slice whose sources have no layer range.
    pub slices: Vec<SliceDef>,
    pub from_models: bool,
    pub parameters: ParamMap,
    pub dtype: Option<DType>,
    pub out_dtype: Option<DType>,
    pub tokenizer_source: Option<TokenizerSource>,
    pub seed: Option<u64>,
    /// One line per thing the recipe says that smelt (as mergekit) ignores.
    pub warnings: Vec<String>,
}

/// Parameter names mergekit's methods take that no smelt method does; like the parameters
/// of smelt's other methods, they are ignored with a warning where the method does not use
/// them (mergekit ignores them silently).
const MERGEKIT_ONLY_PARAMS: &[&str] = &["nuslerp_flatten", "nuslerp_row_wise"];

/// Whether any method (smelt's or mergekit's) takes a parameter of this name.
fn known_param(name: &str) -> bool {
    MERGEKIT_ONLY_PARAMS.contains(&name) || methods::all().iter().any(|m| m.param(name).is_some())
}

/// ` (did you mean `x`?)` for the method's parameter nearest to a misspelt one.
fn param_hint(method: &MethodInfo, name: &str) -> String {
    method
        .params
        .iter()
        .map(|p| (methods::edit_distance(name, p.name), p.name))
        .filter(|(d, p)| *d <= 2 && *d < p.len())
        .min()
        .map(|(_, p)| format!(" (did you mean `{p}`?)"))
        .unwrap_or_default()
}

// ---- raw serde schema -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    merge_method: String,
    /// A path, or `{model: PATH, adapters: [...]}`.
    #[serde(default)]
    base_model: Option<Value>,
    #[serde(default)]
    models: Option<Vec<RawModel>>,
    #[serde(default)]
    slices: Option<Vec<RawSlice>>,
    #[serde(default)]
    parameters: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    out_dtype: Option<String>,
    #[serde(default)]
    tokenizer_source: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    // mergekit keys that smelt does not implement: named so the error can say so.
    #[serde(default)]
    modules: Option<Value>,
    #[serde(default)]
    tokenizer: Option<Value>,
    #[serde(default)]
    chat_template: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    model: String,
    #[serde(default)]
    adapters: Option<Value>,
    #[serde(default)]
    parameters: Option<BTreeMap<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    model: String,
    layer_range: [i64; 2],
    #[serde(default)]
    adapters: Option<Value>,
    #[serde(default)]
    parameters: Option<BTreeMap<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlice {
    sources: Vec<RawSource>,
    #[serde(default)]
    base_model: Option<Value>,
    #[serde(default)]
    parameters: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    residual_weight: Option<Value>,
}

/// The largest recipe text accepted, and the deepest nesting of flow collections (`[`, `{`).
/// Real recipes are a few KiB deep 3 or 4; the YAML parser takes seconds to minutes on
/// hostile nesting tens of thousands deep, so such text is refused before it is parsed.
const MAX_RECIPE_BYTES: usize = crate::io::read::RECIPE_CAP as usize;
const MAX_NESTING: usize = 64;

/// Refuses recipe text that is too large or nested too deeply, before the YAML parser sees
/// it. Quoted strings and comments are skipped; block nesting by indentation is bounded by
/// the size limit.
fn check_shape(text: &str) -> std::result::Result<(), String> {
    if text.len() > MAX_RECIPE_BYTES {
        return Err(format!(
            "is {} bytes; a recipe may be at most {MAX_RECIPE_BYTES} bytes",
            text.len()
        ));
    }
    let (mut depth, mut line) = (0usize, 1usize);
    let mut quote: Option<char> = None;
    let mut comment = false;
    let mut prev = '\n';
    for c in text.chars() {
        if c == '\n' {
            line += 1;
            comment = false;
        }
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if comment => {}
            None => match c {
                '#' if prev.is_whitespace() => comment = true,
                '"' | '\'' if !prev.is_alphanumeric() => quote = Some(c),
                '[' | '{' => {
                    depth += 1;
                    if depth > MAX_NESTING {
                        return Err(format!(
                            "line {line}: lists or maps nested more than {MAX_NESTING} deep"
                        ));
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
        prev = c;
    }
    Ok(())
}

impl Recipe {
    pub fn load(path: &Path) -> Result<Recipe> {
        let text =
            crate::io::read::read_string_capped(path, crate::io::read::RECIPE_CAP, "recipe")?;
        Recipe::parse(&text, path)
    }

    /// Parses recipe text; model paths resolve against `path`'s folder.
    pub fn parse(text: &str, path: &Path) -> Result<Recipe> {
        Recipe::parse_with_hub(text, path, &crate::hub::HubEnv::from_env())
    }

    /// [`Recipe::parse`] with Hub ids looked up through `env` instead of the process's
    /// environment variables (tests give it a cache of their own).
    pub fn parse_with_hub(text: &str, path: &Path, env: &crate::hub::HubEnv) -> Result<Recipe> {
        let err = |msg: String| Error::Recipe {
            path: path.to_path_buf(),
            msg,
        };
        check_shape(text).map_err(err)?;
        let raw: RawRecipe = if text.contains("<<") {
            // YAML merge keys (`<<: *defaults`), which mergekit's PyYAML expands: expanded
            // here on the parsed tree (the tree loses line numbers, so only such recipes take
            // this road)
            let mut v: Value =
                serde_norway::from_str(text).map_err(|e| err(yaml_msg(&e.to_string())))?;
            v.apply_merge()
                .map_err(|e| err(format!("YAML merge key `<<`: {e}")))?;
            serde_norway::from_value(v).map_err(|e| err(yaml_msg(&e.to_string())))?
        } else {
            serde_norway::from_str(text).map_err(|e| err(yaml_msg(&e.to_string())))?
        };
        let warnings = std::cell::RefCell::new(Vec::new());
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();

        for (key, present) in [
            ("modules", raw.modules.is_some()),
            ("tokenizer", raw.tokenizer.is_some()),
            ("chat_template", raw.chat_template.is_some()),
        ] {
            if present {
                return Err(err(format!(
                    "`{key}:` is a mergekit key that smelt does not support yet; remove it \
                     (for tokenizers use `tokenizer_source: base` or a model path)"
                )));
            }
        }

        let method = methods::find(&raw.merge_method).ok_or_else(|| {
            let valid: Vec<&str> = methods::all().iter().map(|m| m.name).collect();
            let hint = methods::suggest(&raw.merge_method)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            err(format!(
                "unknown merge_method `{}`{hint}; valid methods: {}",
                raw.merge_method,
                valid.join(", ")
            ))
        })?;

        // A model or adapter name: an absolute path as given; a relative one from the
        // recipe's folder, the current folder or the Hub (cache, then download).
        let locate = |s: &str| crate::hub::locate(s, Some(&dir), env);
        let fetch = |f: Found, what: &str| -> Result<PathBuf> {
            crate::hub::materialize(f, env).map_err(|e| err(format!("{what}: {e}")))
        };
        // `adapters:`: a list of adapter folders, each a path or {path, scale}.
        let adapter_list = |v: &Value, what: &str| -> Result<Vec<AdapterRef>> {
            let what = format!("{what}.adapters");
            let Value::Sequence(items) = v else {
                return Err(err(format!(
                    "{what}: expected a list of LoRA adapter folders (each a path or {{path: PATH, scale: NUMBER}}), got {}",
                    params::describe(v)
                )));
            };
            if items.is_empty() {
                return Err(err(format!(
                    "{what} is empty; list adapter folders or remove the key"
                )));
            }
            let mut out = Vec::new();
            for (k, item) in items.iter().enumerate() {
                let w = format!("{what}[{k}]");
                let (raw, scale) = match item {
                    Value::String(s) => (s.clone(), 1.0),
                    Value::Mapping(m) => {
                        let (mut path, mut scale) = (None, 1.0);
                        for (key, val) in m {
                            match key.as_str() {
                                Some("path") => {
                                    path = Some(val.as_str().map(str::to_string).ok_or_else(
                                        || {
                                            err(format!(
                                                "{w}.path: expected the adapter folder's path, got {}",
                                                params::describe(val)
                                            ))
                                        },
                                    )?)
                                }
                                Some("scale") => {
                                    scale = val.as_f64().filter(|x| x.is_finite()).ok_or_else(
                                        || {
                                            err(format!(
                                                "{w}.scale: expected a finite number (it multiplies the adapter's ΔW), got {}",
                                                params::describe(val)
                                            ))
                                        },
                                    )?
                                }
                                _ => {
                                    return Err(err(format!(
                                        "{w}: unknown key `{}`; an adapter entry takes `path` and `scale`",
                                        params::key_name(key)
                                    )))
                                }
                            }
                        }
                        let path = path.ok_or_else(|| {
                            err(format!("{w}: no `path` (the adapter folder)"))
                        })?;
                        (path, scale)
                    }
                    other => {
                        return Err(err(format!(
                            "{w}: expected an adapter folder's path or {{path: PATH, scale: NUMBER}}, got {}",
                            params::describe(other)
                        )))
                    }
                };
                if raw.trim().is_empty() {
                    return Err(err(format!("{w}: empty adapter path")));
                }
                let found = locate(&raw).map_err(|nf| err(format!("{w}: {}", nf.msg)))?;
                if !found.present() {
                    return Err(err(format!("{w}: the adapter folder {raw} does not exist")));
                }
                let path = fetch(found, &w)?;
                out.push(AdapterRef { raw, path, scale });
            }
            Ok(out)
        };
        let mref = |raw: &str, adapters: Option<&Value>, what: &str| -> Result<ModelRef> {
            if raw.trim().is_empty() {
                return Err(err(format!("{what}: empty model path")));
            }
            let listed = adapters
                .map(|v| adapter_list(v, what))
                .transpose()?
                .unwrap_or_default();
            let whole = locate(raw);
            if let Err(nf) = &whole {
                if nf.ambiguous {
                    return Err(err(format!("{what}: {}", nf.msg)));
                }
            }
            let here = whole.as_ref().is_ok_and(|f| match f {
                Found::Local(p) => p.exists(),
                // `org/name@rev+adapter` parses as one id with a '+' in the revision
                Found::Hub(_, cached, _) => cached.is_some() || !raw.contains('+'),
            });
            if !here && raw.contains('+') {
                // `model+adapter`: the split where both sides exist (paths may hold '+').
                let splits: Vec<(_, _, usize)> = raw
                    .match_indices('+')
                    .map(|(i, _)| (locate(&raw[..i]), locate(&raw[i + 1..]), i))
                    .collect();
                for (m, a, _) in &splits {
                    for side in [m, a] {
                        if let Err(nf) = side {
                            if nf.ambiguous {
                                return Err(err(format!("{what}: {}", nf.msg)));
                            }
                        }
                    }
                }
                let both = splits.iter().find(|(m, a, _)| {
                    m.as_ref().is_ok_and(Found::present) && a.as_ref().is_ok_and(Found::present)
                });
                if let Some((Ok(m), Ok(a), i)) = both {
                    let mut adapters = vec![AdapterRef {
                        raw: raw[i + 1..].to_string(),
                        path: fetch(a.clone(), what)?,
                        scale: 1.0,
                    }];
                    adapters.extend(listed);
                    return Ok(ModelRef {
                        raw: raw.to_string(),
                        path: fetch(m.clone(), what)?,
                        adapters,
                        in_raw: 1,
                    });
                }
                let (m, a, _) = &splits[0];
                let missing = |side: &std::result::Result<Found, crate::hub::NotFound>| match side {
                    Ok(Found::Local(p)) => format!("{} does not exist", p.display()),
                    Ok(Found::Hub(id, ..)) => format!("{id} is not in the Hub cache"),
                    Err(nf) => nf.msg.clone(),
                };
                return Err(err(format!(
                    "{what}: `{raw}` reads as MODEL+LORA_ADAPTER, but {}",
                    if !m.as_ref().is_ok_and(Found::present) {
                        format!("the model {}", missing(m))
                    } else {
                        format!("the adapter folder {}", missing(a))
                    }
                )));
            }
            let found = whole.map_err(|nf| err(format!("{what}: {}", nf.msg)))?;
            Ok(ModelRef {
                raw: raw.to_string(),
                path: fetch(found, what)?,
                adapters: listed,
                in_raw: 0,
            })
        };
        // `base_model:` is a path, or {model: PATH, adapters: [...]} for an adapted base.
        let base_ref = |v: &Value, what: &str| -> Result<ModelRef> {
            match v {
                Value::String(s) => mref(s, None, what),
                Value::Mapping(m) => {
                    let (mut model, mut adapters) = (None, None);
                    for (key, val) in m {
                        match key.as_str() {
                            Some("model") => {
                                model = Some(val.as_str().ok_or_else(|| {
                                    err(format!(
                                        "{what}.model: expected a model path, got {}",
                                        params::describe(val)
                                    ))
                                })?)
                            }
                            Some("adapters") => adapters = Some(val),
                            _ => {
                                return Err(err(format!(
                                    "{what}: unknown key `{}`; a base_model mapping takes `model` and `adapters`",
                                    params::key_name(key)
                                )))
                            }
                        }
                    }
                    let model =
                        model.ok_or_else(|| err(format!("{what}: no `model` (the model path)")))?;
                    mref(model, adapters, what)
                }
                other => Err(err(format!(
                    "{what}: expected a model path or {{model: PATH, adapters: [...]}}, got {}",
                    params::describe(other)
                ))),
            }
        };
        let pmap = |m: &Option<BTreeMap<String, Value>>, what: &str| -> Result<ParamMap> {
            let mut out = ParamMap::new();
            if let Some(m) = m {
                for (k, v) in m {
                    let Some(spec) = method.param(k) else {
                        let valid: Vec<&str> = method.params.iter().map(|p| p.name).collect();
                        let valid = if valid.is_empty() {
                            "none".to_string()
                        } else {
                            valid.join(", ")
                        };
                        let hint = param_hint(method, k);
                        if known_param(k) {
                            // mergekit reads only the parameters its method declares
                            warnings.borrow_mut().push(format!(
                                "{what}.{k}: {} does not use `{k}`{hint}; ignored, as mergekit ignores it ({} takes: {valid})",
                                method.name, method.name
                            ));
                            continue;
                        }
                        return Err(err(format!(
                            "{what}: `{k}` is not a parameter of {} or of any other method{hint}; valid parameters: {valid}",
                            method.name
                        )));
                    };
                    let setting =
                        Setting::from_yaml(v).map_err(|e| err(format!("{what}.{k}: {e}")))?;
                    if let Some(s) = setting {
                        check_setting_kind(&s, k, spec.kind)
                            .map_err(|e| err(format!("{what}.{k}: {e}")))?;
                        out.insert(k.clone(), s);
                    }
                }
            }
            Ok(out)
        };

        let base_model = raw
            .base_model
            .as_ref()
            .map(|b| base_ref(b, "base_model"))
            .transpose()?;
        let parameters = pmap(&raw.parameters, "parameters")?;
        let (slices, from_models) = match (&raw.models, &raw.slices) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(err(
                    "exactly one of `models:` or `slices:` must be given".into()
                ))
            }
            (Some(models), None) => {
                if models.is_empty() {
                    return Err(err("`models:` is empty".into()));
                }
                let mut sources = Vec::new();
                for (i, m) in models.iter().enumerate() {
                    sources.push(SourceDef {
                        model: mref(&m.model, m.adapters.as_ref(), &format!("models[{i}]"))?,
                        layer_range: None,
                        parameters: pmap(&m.parameters, &format!("models[{i}].parameters"))?,
                    });
                }
                (
                    vec![SliceDef {
                        sources,
                        base_model: None,
                        parameters: ParamMap::new(),
                    }],
                    true,
                )
            }
            (None, Some(slices)) => {
                if slices.is_empty() {
                    return Err(err("`slices:` is empty".into()));
                }
                let mut out = Vec::new();
                for (si, s) in slices.iter().enumerate() {
                    if s.residual_weight.is_some() {
                        return Err(err(format!(
                            "slices[{si}].residual_weight is not supported by smelt"
                        )));
                    }
                    if s.sources.is_empty() {
                        return Err(err(format!("slices[{si}].sources is empty")));
                    }
                    let mut sources = Vec::new();
                    let mut len = None;
                    for (j, src) in s.sources.iter().enumerate() {
                        let what = format!("slices[{si}].sources[{j}]");
                        let [a, b] = src.layer_range;
                        if a < 0 || b < a {
                            return Err(err(format!(
                                "{what}.layer_range [{a}, {b}] is not a half-open range of layers"
                            )));
                        }
                        let n = (b - a) as usize;
                        if *len.get_or_insert(n) != n {
                            return Err(err(format!(
                                "slices[{si}]: every source of a slice must span the same number of layers ({what} spans {n}, the first spans {})",
                                len.unwrap()
                            )));
                        }
                        sources.push(SourceDef {
                            model: mref(&src.model, src.adapters.as_ref(), &what)?,
                            layer_range: Some((a as usize, b as usize)),
                            parameters: pmap(&src.parameters, &format!("{what}.parameters"))?,
                        });
                    }
                    out.push(SliceDef {
                        sources,
                        base_model: s
                            .base_model
                            .as_ref()
                            .map(|b| base_ref(b, &format!("slices[{si}].base_model")))
                            .transpose()?,
                        parameters: pmap(&s.parameters, &format!("slices[{si}].parameters"))?,
                    });
                }
                (out, false)
            }
        };
        let dt = |s: &Option<String>, key: &str| -> Result<Option<DType>> {
            s.as_deref()
                .map(|d| {
                    DType::from_recipe_name(d).ok_or_else(|| {
                        err(format!(
                            "{key}: unknown dtype `{d}`; valid: bfloat16, float16, float32"
                        ))
                    })
                })
                .transpose()
        };
        let tokenizer_source = match raw.tokenizer_source.as_deref() {
            None => None,
            Some("base") => Some(TokenizerSource::Base),
            Some("union") => {
                return Err(err(
                    "tokenizer_source: `union` (vocabulary merging) is not supported yet; use `base` or a model path".into(),
                ))
            }
            Some(m) => Some(TokenizerSource::Model(mref(m, None, "tokenizer_source")?)),
        };
        Ok(Recipe {
            path: path.to_path_buf(),
            text: text.to_string(),
            method,
            base_model,
            slices,
            from_models,
            parameters,
            dtype: dt(&raw.dtype, "dtype")?,
            out_dtype: dt(&raw.out_dtype, "out_dtype")?,
            tokenizer_source,
            seed: raw.seed,
            warnings: warnings.into_inner(),
        })
    }
}

/// Rejects settings whose plain values can never evaluate to the parameter's kind, so a
/// typo such as `density: high` fails at load time rather than at the first tensor.
fn check_setting_kind(s: &Setting, name: &str, kind: Kind) -> std::result::Result<(), String> {
    match s {
        Setting::Scalar(v) => {
            if let Value1::Float(x) = params::validate(v, kind)? {
                check_range(name, x)?;
            }
            Ok(())
        }
        Setting::List(items) => {
            // every value a gradient can take lies between its list entries: check those,
            // each once (evaluating the gradient at each entry re-validated every entry,
            // quadratic in the list's length)
            for v in items {
                if let Value1::Float(x) = params::validate(v, kind)? {
                    check_range(name, x)?;
                }
            }
            Ok(())
        }
        Setting::Cond(cs) => cs
            .iter()
            .try_for_each(|c| check_setting_kind(&c.value, name, kind)),
    }
}

/// The values a parameter may take (the same names mean the same thing in every method).
pub fn check_range(name: &str, x: f64) -> std::result::Result<(), String> {
    if !x.is_finite() {
        return Err(format!("{x} is not a finite number"));
    }
    let ok = match name {
        "density" | "gamma" | "select_topk" | "epsilon" => (0.0..=1.0).contains(&x),
        "tol" | "eps" => x > 0.0,
        "max_iter" => x >= 0.0 && x.fract() == 0.0 && x <= 1e6,
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(match name {
            "tol" | "eps" => format!("{x} must be positive"),
            "max_iter" => format!("{x} must be a whole number of iterations"),
            _ => format!("{x} is not a fraction between 0 and 1"),
        })
    }
}

/// serde's messages are good; only the Rust-flavoured type names need plain words.
fn yaml_msg(m: &str) -> String {
    m.replace("invalid type: ", "wrong type: ")
        .replace("a sequence", "a list")
        .replace("struct RawRecipe", "a recipe mapping")
        .replace("struct RawModel", "a {model, adapters, parameters} mapping")
        .replace(
            "struct RawSlice",
            "a {sources, base_model, parameters} mapping",
        )
        .replace(
            "struct RawSource",
            "a {model, layer_range, adapters, parameters} mapping",
        )
}

#[cfg(test)]
mod tests {
    use super::check_shape;

    #[test]
    fn nesting_is_counted_outside_strings_and_comments() {
        let deep = |n: usize| format!("a: {}1{}\n", "[".repeat(n), "]".repeat(n));
        assert!(check_shape(&deep(64)).is_ok());
        let e = check_shape(&format!("x: 1\n{}", deep(65))).unwrap_err();
        assert!(e.contains("line 2") && e.contains("64 deep"), "{e}");
        let quoted = format!("a: '{}'\nb: \"{}\"\n", "[".repeat(100), "{".repeat(100));
        assert!(check_shape(&quoted).is_ok());
        let commented = format!("a: 1 # {}\nb: [2]\n", "[".repeat(100));
        assert!(check_shape(&commented).is_ok());
        // an apostrophe inside a word does not open a string
        assert!(check_shape(&format!("name: it's\nc: {}", deep(65))).is_err());
        assert!(check_shape(&" ".repeat((1 << 20) + 1))
            .unwrap_err()
            .contains("at most"));
    }
}
