//! The files of an output folder besides the weights: config.json, tokenizer files,
//! generation config and a model card. All deterministic: no clocks, no hostnames.

use std::collections::BTreeMap;

use crate::dtype::DType;
use crate::error::{IoContext, Result};
use crate::inputs::input_digest;
use crate::io::model::{ModelFolder, INDEX_NAME};
use crate::io::writer::{hash_file, StagedOutput};
use crate::methods::WeightFile;
use crate::plan::Plan;

/// Tokenizer files `transformers` may look for; whichever exist are copied.
pub use crate::plan::TOKENIZER_FILES;

/// config.json of the output: the reference model's, with the layer count, vocabulary size
/// and dtype made true of what was written.
pub fn output_config(plan: &Plan) -> Option<serde_json::Value> {
    let mut cfg = plan.models[plan.config_from].config.clone()?;
    let obj = cfg.as_object_mut()?;
    if let Some(l) = plan.out_layers {
        for key in ["num_hidden_layers", "n_layer", "num_layers"] {
            if obj.contains_key(key) {
                obj.insert(key.into(), l.into());
            }
        }
    }
    let embed = plan.tasks.iter().find(|t| {
        t.layer.is_none() && (t.name.contains("embed_tokens") || t.name.ends_with("wte.weight"))
    });
    if let Some(e) = embed {
        if let Some(&rows) = e.shape.first() {
            if obj.contains_key("vocab_size") {
                obj.insert("vocab_size".into(), rows.into());
            }
        }
    }
    let mut counts: BTreeMap<DType, usize> = BTreeMap::new();
    for t in &plan.tasks {
        if !t.copy_only {
            *counts.entry(t.out_dtype).or_default() += 1;
        }
    }
    if let Some((dt, _)) = counts.into_iter().max_by_key(|(_, c)| *c) {
        // transformers reads `torch_dtype` (older) and `dtype` (newer); keep whichever exists.
        let mut any = false;
        for key in ["torch_dtype", "dtype"] {
            if obj.contains_key(key) {
                obj.insert(key.into(), dt.torch_name().into());
                any = true;
            }
        }
        if !any {
            obj.insert("torch_dtype".into(), dt.torch_name().into());
        }
    }
    Some(cfg)
}

/// The weight files of a staged output whose shards are all written, as its manifest will
/// list them (name, size, hash): every shard, and the index when there are several (its
/// bytes are the layout's, written at commit). Sorted by name.
pub fn weight_files(out: &StagedOutput) -> Result<Vec<WeightFile>> {
    let layout = out.layout();
    let mut files = Vec::new();
    for (si, shard) in layout.shards.iter().enumerate() {
        let p = out.tmp_dir.join(&shard.file_name);
        let (algo, hash) = out.shard_hash(si);
        let hash = match hash {
            Some(h) => h.to_string(),
            None => hash_file(&p, algo)?,
        };
        files.push(WeightFile {
            name: shard.file_name.clone(),
            bytes: std::fs::metadata(&p).at(&p)?.len(),
            algo: algo.name().into(),
            hash,
        });
    }
    if layout.shards.len() > 1 {
        let idx = layout.index_json();
        let algo = out.shard_hash(0).0;
        let mut h = algo.hasher();
        h.update(idx.as_bytes());
        files.push(WeightFile {
            name: INDEX_NAME.into(),
            bytes: idx.len() as u64,
            algo: algo.name().into(),
            hash: h.finish(),
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Writes config.json, generation_config.json, tokenizer files and README.md.
pub fn write_side_files(plan: &Plan, out: &StagedOutput, out_name: &str) -> Result<Vec<String>> {
    let mut written = Vec::new();
    if let Some(cfg) = output_config(plan) {
        out.write_file(
            "config.json",
            (serde_json::to_string_pretty(&cfg).unwrap() + "\n").as_bytes(),
        )?;
        written.push("config.json".to_string());
    }
    let cdir = plan.config_dir();
    let gen = cdir.join("generation_config.json");
    if gen.is_file() {
        out.copy_file(&gen, "generation_config.json")?;
        written.push("generation_config.json".into());
    }
    if let Some(t) = plan.tokenizer_from {
        let dir = plan.models[t].dir();
        for f in TOKENIZER_FILES {
            let p = dir.join(f);
            if p.is_file() {
                out.copy_file(&p, f)?;
                written.push(f.to_string());
            }
        }
    }
    if plan.write_card {
        out.write_file("README.md", model_card(plan, out_name).as_bytes())?;
        written.push("README.md".into());
    }
    Ok(written)
}

pub fn model_card(plan: &Plan, out_name: &str) -> String {
    let mut s = String::new();
    s.push_str("---\n");
    // The Hub's `base_model` wants a repository id; local paths mean nothing there, so it is
    // only written when the base's config names one.
    if let Some(id) = plan.base.and_then(|b| hub_id(&plan.models[b])) {
        s.push_str(&format!("base_model: {}\n", yaml_str(&id)));
    }
    s.push_str("library_name: transformers\ntags:\n- merge\n- smelt\n");
    s.push_str(&format!("- {}\n", plan.method.name));
    s.push_str("---\n\n");
    s.push_str(&format!("# {out_name}\n\n"));
    s.push_str(&format!(
        "This model was merged with smelt {} using **{}** ({}, {}).\n\n",
        env!("CARGO_PKG_VERSION"),
        plan.method.name,
        plan.method.pretty,
        plan.method.reference
    ));
    s.push_str("## Inputs\n\n");
    s.push_str("| model | role | digest (sha256 of headers + sampled data) |\n|---|---|---|\n");
    for (i, m) in plan.models.iter().enumerate() {
        let role = match plan.role(i) {
            "" => "merged",
            r => r.trim().trim_matches(|c| c == '(' || c == ')'),
        };
        s.push_str(&format!(
            "| `{}` | {role} | `{}` |\n",
            m.label,
            input_digest(m)
        ));
    }
    if plan.models.iter().any(|m| !m.adapters.is_empty()) {
        s.push_str(
            "\n## LoRA adapters\n\nApplied to their model in this order (ΔW = scale · s · B·A, \
             s = lora_alpha/r):\n\n\
             | model | adapter | scale | LoRA modules | rank | full tensors |\n|---|---|---|---|---|---|\n",
        );
        for m in &plan.models {
            for a in &m.adapters {
                s.push_str(&format!(
                    "| `{}` | `{}` | {} | {} | {} | {} |\n",
                    m.label,
                    a.adapter.label,
                    a.scale,
                    a.adapter.modules.len(),
                    a.adapter.config.max_rank(),
                    a.adapter.replaced_tensors().count()
                ));
            }
        }
    }
    s.push_str(&format!(
        "\n## Settings\n\n- seed: {}\n- compute: f32, inputs loaded as {}\n- tensors: {}\n\n",
        plan.seed,
        plan.load_dtype.torch_name(),
        plan.tasks.len()
    ));
    s.push_str("## Recipe\n\n```yaml\n");
    s.push_str(plan.recipe.text.trim_end());
    s.push_str("\n```\n");
    s
}

/// A repository id (`org/name`) from the model's config, if it has one that is not a path.
fn hub_id(m: &ModelFolder) -> Option<String> {
    let id = m.config.as_ref()?.get("_name_or_path")?.as_str()?;
    let looks_like_id = id.split('/').count() == 2
        && !id.starts_with('.')
        && !id.starts_with('/')
        && !std::path::Path::new(id).exists();
    looks_like_id.then(|| id.to_string())
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}
