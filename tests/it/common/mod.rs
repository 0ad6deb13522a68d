//! Shared helpers of the integration tests: the one tolerance helper, the list of backends
//! every math test runs on, safetensors reading/writing, and running recipes in-process or
//! through the `smelt` binary.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use smelt::backend::Backend;
use smelt::dtype::{self, DType};
use smelt::exec::{self, ExecOptions, Report};
use smelt::io::safetensors::SafetensorsFile;
use smelt::plan::Plan;
use smelt::recipe::Recipe;

// ---- backends ----------------------------------------------------------------------------

/// The backends every math test runs on: the CPU, and when an adapter exists (lavapipe in CI)
/// the GPU twice: whole tensors resident, and 1024-element tiles streamed through two slots,
/// so every tensor of the fixtures spans several tiles. [`backend_test!`] makes one `#[test]`
/// of each, so a failure on one does not hide the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum On {
    Cpu,
    Gpu,
    GpuStreamed,
}

impl On {
    pub const ALL: [On; 3] = [On::Cpu, On::Gpu, On::GpuStreamed];

    /// The name messages use for this backend.
    pub fn name(self) -> &'static str {
        match self {
            On::Cpu => "cpu",
            On::Gpu => "gpu",
            On::GpuStreamed => "gpu-streamed",
        }
    }

    /// The backend, or None for a GPU one when no adapter works (see [`gpu_context`]: it
    /// prints a note, or panics when SMELT_REQUIRE_GPU is set).
    pub fn backend(self) -> Option<Box<dyn Backend>> {
        match self {
            On::Cpu => Some(Box::new(smelt::backend::cpu::Cpu::new())),
            On::Gpu | On::GpuStreamed => Some(self.on_gpu(gpu_context()?)),
        }
    }

    fn on_gpu(self, ctx: std::sync::Arc<smelt::backend::gpu::GpuContext>) -> Box<dyn Backend> {
        use smelt::backend::gpu::{Gpu, GpuOptions};
        let options = match self {
            On::GpuStreamed => GpuOptions {
                tile_elems: Some(1024),
                vram_budget: Some(1),
                ..Default::default()
            },
            _ => GpuOptions::default(),
        };
        Box::new(Gpu::with_context(ctx, &options))
    }
}

/// Every backend of [`On::ALL`] that is available, with its name, for the tests that compare
/// backends with each other (a test of one backend at a time uses [`backend_test!`]).
pub fn backends() -> Vec<(String, Box<dyn Backend>)> {
    let mut v: Vec<(String, Box<dyn Backend>)> = vec![(
        On::Cpu.name().to_string(),
        On::Cpu.backend().expect("the CPU is always there"),
    )];
    if let Some(ctx) = gpu_context() {
        for on in [On::Gpu, On::GpuStreamed] {
            v.push((on.name().to_string(), on.on_gpu(ctx.clone())));
        }
    }
    v
}

/// Runs one backend's instance of a test body; a GPU backend without an adapter skips it
/// (or fails it under SMELT_REQUIRE_GPU), as [`gpu_context`] decides.
pub fn run_on(on: On, test: fn(&str, &dyn Backend)) {
    if let Some(backend) = on.backend() {
        test(on.name(), backend.as_ref());
    }
}

/// `backend_test!(name, ...)` turns each `fn name(bname: &str, backend: &dyn Backend)` of
/// the calling module into three tests, `name::cpu`, `name::gpu` and `name::gpu_streamed`,
/// one per [`On`] backend, so each backend passes or fails on its own (in the manner of
/// candle's `test_device!`).
macro_rules! backend_test {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[test]
            fn cpu() {
                $crate::common::run_on($crate::common::On::Cpu, super::$name)
            }
            #[test]
            fn gpu() {
                $crate::common::run_on($crate::common::On::Gpu, super::$name)
            }
            #[test]
            fn gpu_streamed() {
                $crate::common::run_on($crate::common::On::GpuStreamed, super::$name)
            }
        }
    )+};
}

// ---- tolerance ---------------------------------------------------------------------------

/// How close a value must be to its expectation.
///
/// An element passes when it is within `abs + rel * |expected|`, or within `ulps` units in
/// the last place of the compared dtype (f32, f16 or bf16). NaN matches only NaN; an
/// infinity matches only the same infinity. `Tol::EXACT` demands equal values (+0 == -0).
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub abs: f64,
    pub rel: f64,
    pub ulps: u32,
}

impl Tol {
    pub const EXACT: Tol = Tol {
        abs: 0.0,
        rel: 0.0,
        ulps: 0,
    };
    /// The fixture README's bound for f32 outputs: 1e-7 absolute + 1e-6 relative.
    pub const FIXTURE: Tol = Tol {
        abs: 1e-7,
        rel: 1e-6,
        ulps: 0,
    };
    pub const fn abs_rel(abs: f64, rel: f64) -> Tol {
        Tol { abs, rel, ulps: 0 }
    }
    /// `n` ulps of the compared dtype.
    pub const fn ulps(n: u32) -> Tol {
        Tol {
            abs: 0.0,
            rel: 0.0,
            ulps: n,
        }
    }
}

/// Bits of `x` in `dt` (f32, f16 or bf16), mapped so that integer order is float order
/// (+0 and -0 both map to 0). `x` must be representable in `dt`.
fn ordered_bits(x: f32, dt: DType) -> i64 {
    let (bits, sign_bit) = match dt {
        DType::BF16 => (half::bf16::from_f32(x).to_bits() as i64, 1i64 << 15),
        DType::F16 => (half::f16::from_f32(x).to_bits() as i64, 1i64 << 15),
        _ => (x.to_bits() as i64, 1i64 << 31),
    };
    if bits & sign_bit != 0 {
        -(bits & (sign_bit - 1))
    } else {
        bits
    }
}

/// Distance in ulps of `dt` between two finite values of that dtype.
pub fn ulp_distance(a: f32, b: f32, dt: DType) -> u64 {
    (ordered_bits(a, dt) - ordered_bits(b, dt)).unsigned_abs()
}

/// Whether one element passes; see [`Tol`].
pub fn element_ok(got: f32, exp: f32, dt: DType, tol: Tol) -> bool {
    if exp.is_nan() || got.is_nan() {
        return exp.is_nan() && got.is_nan();
    }
    if exp.is_infinite() || got.is_infinite() {
        return exp == got;
    }
    let diff = (got as f64 - exp as f64).abs();
    if diff <= tol.abs + tol.rel * (exp as f64).abs() {
        return true;
    }
    tol.ulps > 0 && ulp_distance(got, exp, dt) <= tol.ulps as u64
}

/// The outcome of comparing two tensors elementwise.
#[derive(Debug, Default)]
pub struct Comparison {
    pub n: usize,
    pub failed: usize,
    /// (flat index, expected, actual) of the first failures.
    pub first: Vec<(usize, f32, f32)>,
    pub max_abs_diff: f64,
}

pub fn compare(got: &[f32], exp: &[f32], dt: DType, tol: Tol) -> Comparison {
    assert_eq!(
        got.len(),
        exp.len(),
        "compare: {} values against {} expected",
        got.len(),
        exp.len()
    );
    let mut c = Comparison {
        n: exp.len(),
        ..Default::default()
    };
    for (i, (&g, &e)) in got.iter().zip(exp).enumerate() {
        if g.is_finite() && e.is_finite() {
            c.max_abs_diff = c.max_abs_diff.max((g as f64 - e as f64).abs());
        }
        if !element_ok(g, e, dt, tol) {
            c.failed += 1;
            if c.first.len() < 8 {
                c.first.push((i, e, g));
            }
        }
    }
    c
}

/// The one assertion every value comparison goes through. On failure it names the tensor
/// and reports, for the first failing elements, the flat index, expected and actual value,
/// plus how many of how many elements failed.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], exp: &[f32], dt: DType, tol: Tol) {
    let c = compare(got, exp, dt, tol);
    if c.failed > 0 {
        let mut msg = format!(
            "{what}: {} of {} elements ({dt}) outside tolerance {tol:?} (max |diff| {:e})",
            c.failed, c.n, c.max_abs_diff
        );
        for (i, e, g) in &c.first {
            let _ = write!(
                msg,
                "\n  [{i}] expected {e:e} ({:#010x}), actual {g:e} ({:#010x})",
                e.to_bits(),
                g.to_bits()
            );
        }
        panic!("{msg}");
    }
}

// ---- safetensors in and out -------------------------------------------------------------

/// A tensor read back: dtype, shape and values widened to f32.
#[derive(Clone, Debug, PartialEq)]
pub struct T {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl T {
    pub fn f32(shape: &[usize], data: Vec<f32>) -> T {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        T {
            dtype: DType::F32,
            shape: shape.to_vec(),
            data,
        }
    }
}

/// Reads one safetensors file with the crate's own reader.
pub fn load_st(path: &Path) -> BTreeMap<String, T> {
    let f = SafetensorsFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = BTreeMap::new();
    for info in f.tensors() {
        let mut data = vec![0f32; info.numel()];
        dtype::decode(info.dtype, f.data(info), &mut data);
        out.insert(
            info.name.clone(),
            T {
                dtype: info.dtype,
                shape: info.shape.clone(),
                data,
            },
        );
    }
    out
}

/// Reads every tensor of a model folder: `model.safetensors`, or the shards an index lists.
pub fn load_dir(dir: &Path) -> BTreeMap<String, T> {
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return load_st(&dir.join("model.safetensors"));
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).expect("index is JSON");
    let mut files: Vec<String> = v["weight_map"]
        .as_object()
        .expect("weight_map")
        .values()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    files.sort();
    files.dedup();
    let mut out = BTreeMap::new();
    for f in files {
        for (k, t) in load_st(&dir.join(&f)) {
            assert!(out.insert(k.clone(), t).is_none(), "{k} in two shards");
        }
    }
    out
}

/// f32 values as little-endian bytes of `dt` (round to nearest even for the half types).
pub fn encode(dt: DType, v: &[f32]) -> Vec<u8> {
    match dt {
        DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        DType::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        other => panic!("encode: {other}"),
    }
}

/// Writes a safetensors file by hand (8-byte header length, JSON header, data), tensors in
/// the given order. Independent of the crate's writer on purpose.
pub fn write_st(path: &Path, tensors: &[(&str, &T)]) {
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut data = Vec::new();
    for (name, t) in tensors {
        let bytes = encode(t.dtype, &t.data);
        let begin = data.len();
        data.extend_from_slice(&bytes);
        let _ = write!(
            header,
            ",{}:{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{},{}]}}",
            serde_json::to_string(name).unwrap(),
            t.dtype.st_name(),
            serde_json::to_string(&t.shape).unwrap(),
            begin,
            data.len()
        );
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(&data);
    std::fs::write(path, file).unwrap();
}

/// Writes a model folder: model.safetensors with `tensors` plus a small config.json.
pub fn write_model(dir: &Path, layers: usize, tensors: &[(&str, &T)]) {
    std::fs::create_dir_all(dir).unwrap();
    write_st(&dir.join("model.safetensors"), tensors);
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": layers,
        "tie_word_embeddings": false,
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
}

/// A one-tensor model (tensor `w`, no layers) holding `values` as F32 of shape [len].
pub fn write_vec_model(dir: &Path, values: &[f32]) {
    let t = T::f32(&[values.len()], values.to_vec());
    write_model(dir, 0, &[("w", &t)]);
}

/// A deterministic stream of pseudo-random numbers for test data (not the crate's RNG).
pub struct Lcg(pub u64);

impl Lcg {
    /// 31 random bits.
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Uniform in [-1, 1).
    pub fn sym(&mut self) -> f32 {
        (self.next_u32() as f64 / (1u64 << 30) as f64 - 1.0) as f32
    }
}

// ---- fixtures ----------------------------------------------------------------------------

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures/mergekit")
}

pub fn case_dir(name: &str) -> PathBuf {
    fixtures().join("cases").join(name)
}

pub fn fixture_model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// Copies a folder's plain files (no recursion needed for model folders).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Copies the four fixture models into `dir/models/{base,ft1,ft2,ft3}`.
pub fn copy_fixture_models(dir: &Path) -> PathBuf {
    let models = dir.join("models");
    for m in ["base", "ft1", "ft2", "ft3"] {
        copy_dir(&fixture_model(m), &models.join(m));
    }
    models
}

// ---- a sandbox of fixture models --------------------------------------------------------

/// A temporary folder holding copies of the mergekit fixture models (`models/`), where a test
/// writes recipes and merges into `out`.
pub struct Setup {
    pub tmp: tempfile::TempDir,
    pub models: PathBuf,
}

impl Setup {
    pub fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let models = copy_fixture_models(tmp.path());
        Setup { tmp, models }
    }
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }
    pub fn recipe(&self, text: &str) -> PathBuf {
        self.recipe_named("recipe.yml", text)
    }
    pub fn recipe_named(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
    pub fn out(&self) -> PathBuf {
        self.dir().join("out")
    }
    pub fn model(&self, m: &str) -> PathBuf {
        self.models.join(m)
    }
    pub fn st(&self, m: &str) -> PathBuf {
        self.model(m).join("model.safetensors")
    }
}

// ---- running recipes ---------------------------------------------------------------------

pub fn plan_file(recipe: &Path, seed: Option<u64>) -> Plan {
    let r = Recipe::load(recipe).unwrap_or_else(|e| panic!("{}: {e}", recipe.display()));
    Plan::build(r, seed).unwrap_or_else(|e| panic!("{}: {e}", recipe.display()))
}

/// Writes `text` as `dir/recipe.yml` and plans it.
pub fn plan_text(dir: &Path, text: &str, seed: Option<u64>) -> Plan {
    let p = dir.join("recipe.yml");
    std::fs::write(&p, text).unwrap();
    plan_file(&p, seed)
}

/// Merges every planned tensor in memory with `merge_tensor` (no output folder).
pub fn merge_plan(plan: &Plan, backend: &dyn Backend) -> BTreeMap<String, T> {
    let mut out = BTreeMap::new();
    for task in &plan.tasks {
        let mut bytes = vec![0u8; task.out_bytes() as usize];
        exec::merge_tensor(plan, backend, task, &mut bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", task.name));
        let mut data = vec![0f32; task.numel()];
        dtype::decode(task.out_dtype, &bytes, &mut data);
        out.insert(
            task.name.clone(),
            T {
                dtype: task.out_dtype,
                shape: task.shape.clone(),
                data,
            },
        );
    }
    out
}

/// The raw output bytes of every planned tensor, merged in memory.
pub fn merge_plan_bytes(plan: &Plan, backend: &dyn Backend) -> BTreeMap<String, Vec<u8>> {
    plan.tasks
        .iter()
        .map(|task| {
            let mut bytes = vec![0u8; task.out_bytes() as usize];
            exec::merge_tensor(plan, backend, task, &mut bytes)
                .unwrap_or_else(|e| panic!("{}: {e}", task.name));
            (task.name.clone(), bytes)
        })
        .collect()
}

/// Runs the whole pipeline (plan, execute, writer) into `out_dir`.
pub fn execute_to(plan: &Plan, backend: &dyn Backend, out_dir: &Path, shard: u64) -> Report {
    exec::execute(
        plan,
        backend,
        &ExecOptions {
            out_dir: out_dir.to_path_buf(),
            start: smelt::io::writer::Start::Fresh { force: false },
            max_shard_bytes: shard,
            progress: false,
            allow_nonfinite: false,
            fallback: None,
            hash: Default::default(),
            fsync: false,
        },
    )
    .unwrap_or_else(|e| panic!("execute into {}: {e}", out_dir.display()))
}

/// Writes a recipe and merges it in memory on `backend`.
pub fn merge_text(dir: &Path, text: &str, backend: &dyn Backend) -> BTreeMap<String, T> {
    merge_plan(&plan_text(dir, text, None), backend)
}

// ---- the binary --------------------------------------------------------------------------

pub fn smelt() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_smelt"));
    c.env("RUST_LOG", "smelt=warn");
    c
}

/// `merge` arguments that keep the binary on the CPU (the math tests compare against
/// in-process CPU results; the GPU binary path has its own test).
pub fn cpu_args() -> Vec<&'static str> {
    vec!["--device", "cpu"]
}

/// `smelt merge RECIPE -o OUT --device cpu EXTRA...` with environment variables, not run.
pub fn merge_cmd(recipe: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = smelt();
    c.arg("merge").arg(recipe).arg("-o").arg(out);
    c.args(cpu_args()).args(extra);
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// `smelt merge RECIPE -o OUT EXTRA...`
pub fn run_merge(recipe: &Path, out: &Path, extra: &[&str]) -> Output {
    merge_cmd(recipe, out, extra, &[])
        .output()
        .expect("run smelt")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Every file of a folder (names and bytes), for byte-identity checks.
pub fn dir_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.insert(
            e.file_name().to_string_lossy().to_string(),
            std::fs::read(e.path()).unwrap(),
        );
    }
    out
}

pub mod gpu;
#[allow(unused_imports)]
pub use gpu::{fresh_gpu_context, gpu_context};
