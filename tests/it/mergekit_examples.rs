//! mergekit's own example configs (tests/fixtures/mergekit-examples, copied verbatim with
//! attribution) run through `smelt merge EXAMPLE.yml OUT` unchanged: the recipe file is the
//! fixture itself, its Hub ids are found in a Hugging Face cache the test builds in the real
//! layout (`models--org--name/{refs,snapshots,blobs}`), offline (`HF_HUB_OFFLINE=1`, dead
//! endpoint). Each run must exit 0 and write an output `smelt verify` accepts; each output
//! equals, byte for byte, the same recipe with the Hub ids replaced by the local folders the
//! snapshots were made from; and a few facts of each merge are checked against the inputs.
//!
//! Which test model stands for which Hub id (`HUB_MODELS`):
//!
//! - the Mistral-7B family of `bio-merge.yml` (a TIES merge, no slices): the bundled 4-layer
//!   tiny llama models of assets/models. `mistralai/Mistral-7B-v0.1` = `base`,
//!   `mistralai/Mistral-7B-Instruct-v0.2` = `chat`, `BioMistral/BioMistral-7B` = `code`
//!   (sharded: two shards and an index, so a sharded snapshot is covered).
//! - the Llama-2-13B family of `gradient-slerp.yml`, `linear.yml`, `ties.yml` and
//!   `orcamini-platy-44layer.yml`: the slices name `layer_range: [0, 40]` and `[20, 40]`, so
//!   the 4-layer assets cannot stand in for them. The test generates tiny llama-shaped models
//!   with 40 layers like Llama-2-13B (hidden 16, 4 heads, 2 KV heads, intermediate 32,
//!   vocabulary 256 to fit the bundled tokenizer, float16 like the originals), each from its
//!   own seed, with config.json, generation_config.json and the tokenizer files of
//!   assets/models/base.
//!
//! `arcee_fusion.yml` names a method smelt lacks; it is listed in `UNSUPPORTED` with the
//! reason, and the test asserts it fails as it should. Any other example in the folder that
//! no test runs fails `every_example_is_run_or_listed_as_unsupported`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common::*;
use crate::hub::{assets, commit, ok, same, weights_and_side_files, Hub};
use crate::mergekit_cli::mergekit_examples;
use smelt::dtype::DType;

/// Examples smelt cannot run unchanged, with the reason.
const UNSUPPORTED: &[(&str, &str)] = &[(
    "arcee_fusion.yml",
    "merge_method arcee_fusion is not implemented in smelt (and its models, model_a and \
     model_b, are placeholders rather than Hub ids)",
)];

/// The examples each test below runs.
const RUN: &[&str] = &[
    "bio-merge.yml",
    "gradient-slerp.yml",
    "linear.yml",
    "orcamini-platy-44layer.yml",
    "ties.yml",
];

/// Where each Hub id the examples name comes from.
enum Src {
    /// A bundled model of assets/models.
    Asset(&'static str),
    /// A generated 40-layer llama-shaped float16 model from this seed.
    Llama40(u64),
}

const HUB_MODELS: &[(&str, Src)] = &[
    ("mistralai/Mistral-7B-v0.1", Src::Asset("base")),
    ("mistralai/Mistral-7B-Instruct-v0.2", Src::Asset("chat")),
    ("BioMistral/BioMistral-7B", Src::Asset("code")),
    ("TheBloke/Llama-2-13B-fp16", Src::Llama40(1)),
    ("psmathur/orca_mini_v3_13b", Src::Llama40(2)),
    ("garage-bAInd/Platypus2-13B", Src::Llama40(3)),
    ("WizardLM/WizardLM-13B-V1.2", Src::Llama40(4)),
    ("WizardLM/WizardMath-13B-V1.0", Src::Llama40(5)),
];

const LAYERS: usize = 40;
const HIDDEN: usize = 16;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const INTER: usize = 32;
const VOCAB: usize = 256;

/// Every tensor of a llama model with `LAYERS` layers, values from `seed`.
fn llama_tensors(seed: u64) -> Vec<(String, T)> {
    let mut rng = Lcg(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed);
    let mut t = |name: String, shape: &[usize], norm: bool| {
        let n: usize = shape.iter().product();
        let data = (0..n)
            .map(|_| {
                let x = rng.sym();
                if norm {
                    1.0 + 0.1 * x
                } else {
                    0.05 * x
                }
            })
            .collect();
        let mut v = T::f32(shape, data);
        v.dtype = DType::F16;
        // the values as float16 holds them, so that reading back gives them exactly
        v.data = v
            .data
            .iter()
            .map(|x| half::f16::from_f32(*x).to_f32())
            .collect();
        (name, v)
    };
    let head = HIDDEN / HEADS;
    let mut out = vec![t(
        "model.embed_tokens.weight".into(),
        &[VOCAB, HIDDEN],
        false,
    )];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        out.push(t(format!("{p}.input_layernorm.weight"), &[HIDDEN], true));
        out.push(t(
            format!("{p}.self_attn.q_proj.weight"),
            &[HIDDEN, HIDDEN],
            false,
        ));
        out.push(t(
            format!("{p}.self_attn.k_proj.weight"),
            &[KV_HEADS * head, HIDDEN],
            false,
        ));
        out.push(t(
            format!("{p}.self_attn.v_proj.weight"),
            &[KV_HEADS * head, HIDDEN],
            false,
        ));
        out.push(t(
            format!("{p}.self_attn.o_proj.weight"),
            &[HIDDEN, HIDDEN],
            false,
        ));
        out.push(t(
            format!("{p}.post_attention_layernorm.weight"),
            &[HIDDEN],
            true,
        ));
        out.push(t(
            format!("{p}.mlp.gate_proj.weight"),
            &[INTER, HIDDEN],
            false,
        ));
        out.push(t(
            format!("{p}.mlp.up_proj.weight"),
            &[INTER, HIDDEN],
            false,
        ));
        out.push(t(
            format!("{p}.mlp.down_proj.weight"),
            &[HIDDEN, INTER],
            false,
        ));
    }
    out.push(t("model.norm.weight".into(), &[HIDDEN], true));
    out.push(t("lm_head.weight".into(), &[VOCAB, HIDDEN], false));
    out
}

/// Writes a 40-layer llama-shaped model folder (weights, config, tokenizer) into `dir`.
fn write_llama40(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let tensors = llama_tensors(seed);
    let refs: Vec<(&str, &T)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_st(&dir.join("model.safetensors"), &refs);
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float16"
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    for f in [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(assets("base").join(f), dir.join(f)).unwrap();
    }
}

/// A test cache holding every model of `HUB_MODELS` as the `main` snapshot of its id, and
/// the local folder each was made from.
struct Cache {
    hub: Hub,
    local: BTreeMap<&'static str, PathBuf>,
}

impl Cache {
    /// Only the ids `text` names go into the cache (the others would be unused work).
    fn for_recipe(text: &str) -> Cache {
        let hub = Hub::new();
        let mut local = BTreeMap::new();
        for (i, (id, src)) in HUB_MODELS.iter().enumerate() {
            if !text.contains(id) {
                continue;
            }
            let dir = match src {
                Src::Asset(m) => assets(m),
                Src::Llama40(seed) => {
                    let d = hub.tmp.path().join("local").join(id.replace('/', "--"));
                    write_llama40(&d, *seed);
                    d
                }
            };
            let sha = commit(100 + i as u32);
            hub.add_snapshot(id, &sha, &dir);
            hub.set_ref(id, "main", &sha);
            local.insert(*id, dir);
        }
        Cache { hub, local }
    }

    /// `smelt merge RECIPE OUT --device cpu` in the sandbox's work folder, offline.
    fn merge(&self, recipe: &Path, out: &Path) -> Output {
        self.hub
            .smelt(&["merge"])
            .arg(recipe)
            .arg(out)
            .args(cpu_args())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    }

    fn out(&self, name: &str) -> PathBuf {
        self.hub.tmp.path().join(name)
    }

    fn local(&self, id: &str) -> &Path {
        &self.local[id]
    }
}

/// A test cache holding every model of `HUB_MODELS`, and the Hub settings that read it
/// alone (offline, a dead endpoint): for parsing the examples in-process
/// (`mergekit_cli::mergekit_examples_parse_where_smelt_has_the_method`).
pub fn all_models_cache() -> (Hub, smelt::hub::HubEnv) {
    let all: Vec<&str> = HUB_MODELS.iter().map(|(id, _)| *id).collect();
    let cache = Cache::for_recipe(&all.join("\n"));
    let env = smelt::hub::HubEnv {
        cache: cache.hub.cache(),
        offline: true,
        endpoint: "http://127.0.0.1:9".into(),
        token: None,
    };
    (cache.hub, env)
}

/// Runs one example unchanged from the fixture folder against its cache, checks the output
/// with `smelt verify` and against the same recipe naming the local folders; returns the
/// output's tensors for the example's own checks.
fn run_example(name: &str) -> (Cache, BTreeMap<String, T>) {
    let ex = mergekit_examples()
        .into_iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no example {name}"));
    assert!(ex.supported, "{name}: method {} not in smelt", ex.method);
    let cache = Cache::for_recipe(&ex.text);
    assert!(!cache.local.is_empty(), "{name} names none of HUB_MODELS");
    let blobs_before: Vec<_> = cache
        .local
        .keys()
        .map(|id| dir_bytes(&cache.hub.repo(id).join("blobs")))
        .collect();

    let out = cache.out("out-hub");
    let o = cache.merge(&ex.path, &out);
    ok(&o);
    let v = cache.hub.smelt(&["verify"]).arg(&out).output().unwrap();
    ok(&v);

    // the same recipe with every Hub id replaced by the folder its snapshot was made from
    let mut text = ex.text.clone();
    for (id, dir) in &cache.local {
        text = text.replace(id, &dir.display().to_string());
    }
    assert_ne!(text, ex.text);
    let local_recipe = cache.hub.recipe(&format!("local-{name}"), &text);
    let out_local = cache.out("out-local");
    ok(&cache.merge(&local_recipe, &out_local));
    same(
        &weights_and_side_files(&out_local),
        &weights_and_side_files(&out),
        &format!("{name}: Hub ids vs local folders"),
    );

    // the cache is read, never written
    let blobs_after: Vec<_> = cache
        .local
        .keys()
        .map(|id| dir_bytes(&cache.hub.repo(id).join("blobs")))
        .collect();
    assert!(blobs_before == blobs_after, "{name}: the cache changed");

    let tensors = load_dir(&out);
    for (k, t) in &tensors {
        assert_eq!(
            t.dtype,
            DType::F16,
            "{name}: {k} (the example says float16)"
        );
    }
    (cache, tensors)
}

fn input(cache: &Cache, id: &str) -> BTreeMap<String, T> {
    load_dir(cache.local(id))
}

fn layer_names(tensors: &BTreeMap<String, T>) -> usize {
    let mut layers = std::collections::BTreeSet::new();
    for k in tensors.keys() {
        if let Some(rest) = k.strip_prefix("model.layers.") {
            layers.insert(rest.split('.').next().unwrap().parse::<usize>().unwrap());
        }
    }
    assert_eq!(
        layers.iter().copied().collect::<Vec<_>>(),
        (0..layers.len()).collect::<Vec<_>>()
    );
    layers.len()
}

fn config_layers(dir: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    v["num_hidden_layers"].as_u64().unwrap()
}

#[test]
fn every_example_is_run_or_listed_as_unsupported() {
    let all = mergekit_examples();
    let mut covered: Vec<&str> = RUN.to_vec();
    covered.extend(UNSUPPORTED.iter().map(|(n, _)| *n));
    covered.sort();
    let names: Vec<&str> = all.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, covered, "an example is neither run nor listed");
    for e in &all {
        let listed = UNSUPPORTED.iter().any(|(n, _)| *n == e.name);
        assert_eq!(
            listed, !e.supported,
            "{}: listed as unsupported = {listed}, but smelt has method {} = {}",
            e.name, e.method, e.supported
        );
    }
    // an unsupported example fails as it should: exit 1, the method named, nothing written
    for (name, _why) in UNSUPPORTED {
        let e = all.iter().find(|e| e.name == *name).unwrap();
        let cache = Cache::for_recipe(&e.text);
        let out = cache.out("out");
        let o = cache.merge(&e.path, &out);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains(&format!("merge_method `{}`", e.method)),
            "{name}: {err}"
        );
        assert!(!out.exists(), "{name}: wrote {}", out.display());
    }
}

/// TIES over the Mistral family with `int8_mask` (accepted, ignored) and `normalize: false`.
#[test]
fn bio_merge() {
    let (cache, out) = run_example("bio-merge.yml");
    let base = input(&cache, "mistralai/Mistral-7B-v0.1");
    assert_eq!(
        out.keys().collect::<Vec<_>>(),
        base.keys().collect::<Vec<_>>()
    );
    // the merge moved the weights away from the base (float16 of the bfloat16 inputs)
    let k = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(out[k].shape, base[k].shape);
    assert_ne!(out[k].data, base[k].data);
}

/// SLERP of two 40-layer models with a gradient of `t` for attention and MLP: layer 0's
/// attention is t=0 (orca_mini unchanged), its MLP t=1 (Platypus unchanged); layer 39 the
/// other way round.
#[test]
fn gradient_slerp() {
    let (cache, out) = run_example("gradient-slerp.yml");
    let orca = input(&cache, "psmathur/orca_mini_v3_13b");
    let platy = input(&cache, "garage-bAInd/Platypus2-13B");
    assert_eq!(layer_names(&out), LAYERS);
    let attn = |l: usize| format!("model.layers.{l}.self_attn.q_proj.weight");
    let mlp = |l: usize| format!("model.layers.{l}.mlp.up_proj.weight");
    assert_eq!(out[&attn(0)].data, orca[&attn(0)].data);
    assert_eq!(out[&mlp(0)].data, platy[&mlp(0)].data);
    assert_eq!(out[&attn(39)].data, platy[&attn(39)].data);
    assert_eq!(out[&mlp(39)].data, orca[&mlp(39)].data);
    // t = 0.5 elsewhere: neither input
    let k = "model.embed_tokens.weight";
    assert_ne!(out[k].data, orca[k].data);
    assert_ne!(out[k].data, platy[k].data);
}

/// Weighted average of three models, weights 1.0, 0.3, 0.5 (mergekit normalizes them by
/// default: divided by 1.8).
#[test]
fn linear() {
    let (cache, out) = run_example("linear.yml");
    let ins: Vec<_> = [
        ("psmathur/orca_mini_v3_13b", 1.0f32),
        ("WizardLM/WizardLM-13B-V1.2", 0.3),
        ("garage-bAInd/Platypus2-13B", 0.5),
    ]
    .iter()
    .map(|(id, w)| (input(&cache, id), *w))
    .collect();
    for k in ["model.layers.17.mlp.down_proj.weight", "lm_head.weight"] {
        let got = &out[k].data;
        for (i, g) in got.iter().enumerate() {
            let want: f32 = ins.iter().map(|(m, w)| w * m[k].data[i]).sum::<f32>() / 1.8;
            assert!(
                (g - want).abs() <= 1e-3 * want.abs().max(1e-2),
                "{k}[{i}]: {g} vs {want}"
            );
        }
    }
}

/// Passthrough of orca_mini's layers 0..24 then Platypus's 20..40: 44 layers, each copied
/// bit for bit, and the config says 44. Outside the layers mergekit takes the embeddings
/// from the first slice and the norm and LM head from the last.
#[test]
fn orcamini_platy_44layer() {
    let (cache, out) = run_example("orcamini-platy-44layer.yml");
    let orca = input(&cache, "psmathur/orca_mini_v3_13b");
    let platy = input(&cache, "garage-bAInd/Platypus2-13B");
    assert_eq!(layer_names(&out), 44);
    assert_eq!(config_layers(&cache.out("out-hub")), 44);
    for (k, t) in &out {
        let want = match k.strip_prefix("model.layers.") {
            Some(rest) => {
                let (l, tail) = rest.split_once('.').unwrap();
                let l: usize = l.parse().unwrap();
                if l < 24 {
                    &orca[&format!("model.layers.{l}.{tail}")]
                } else {
                    &platy[&format!("model.layers.{}.{tail}", l - 24 + 20)]
                }
            }
            // outside the layers, as mergekit: the embeddings from the first slice's model,
            // the final norm and the LM head from the last slice's
            None if k == "model.embed_tokens.weight" => &orca[k],
            None => &platy[k],
        };
        assert!(t.data == want.data, "{k} is not the input it should copy");
    }
}

/// TIES of three fine-tunes over a base, with density and weight gradients and a filtered
/// weight. At layer 0 of an attention tensor only orca_mini counts: its density is 1 (the
/// first point of [1, 0.7, 0.1]: nothing trimmed), Platypus's weight is 0 (the first point of
/// [0, 0.3, 0.7, 1]) and WizardMath's weight is 0 outside the MLP; so the merge there is
/// base + (orca_mini - base) = orca_mini exactly. The last layer has Platypus at weight 1.
#[test]
fn ties() {
    let (cache, out) = run_example("ties.yml");
    let base = input(&cache, "TheBloke/Llama-2-13B-fp16");
    let orca = input(&cache, "psmathur/orca_mini_v3_13b");
    assert_eq!(layer_names(&out), LAYERS);
    let q = |l: usize| format!("model.layers.{l}.self_attn.q_proj.weight");
    assert!(
        out[&q(0)].data == orca[&q(0)].data,
        "layer 0 is not orca_mini's"
    );
    for k in [q(39), "model.layers.0.mlp.up_proj.weight".into()] {
        assert!(out[&k].data != orca[&k].data, "{k} is orca_mini's");
        assert!(out[&k].data != base[&k].data, "{k} is the base's");
    }
}
