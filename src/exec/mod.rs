//! Walks the plan tensor by tensor: read (memory-mapped), check, merge on the backend, check,
//! write.
//!
//! Memory stays bounded by a few output tensors: the inputs are file-backed mappings the
//! kernel pages in on demand (with read-ahead asked for the next tensor while this one
//! computes). Each tensor is merged in place into its slot of the output shard, which is
//! allocated up front (fallocate) and memory-mapped, then handed to a writer thread through
//! a queue of two, which hashes it and drops its pages from the process (they stay in the
//! page cache on their way to disk). Where the filesystem cannot reserve blocks, tensors are
//! merged into buffers instead, written with pwrite, and the buffers come back for reuse.
//! Reading, computing and writing overlap.
//!
//! A stop request (Ctrl-C, SIGTERM) is honoured between tensors: what is written stays in the
//! partial folder with its journal, and `--resume` carries on from the finished shards.

pub mod output;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::{Backend, FiniteScan, Input, Job, Sink};
use crate::dtype::{first_nonfinite, DType};
use crate::error::{Error, Result};
use crate::inputs::input_digest;
use crate::io::fault::FileId;
use crate::io::model::INDEX_NAME;
use crate::io::safetensors::SafetensorsFile;
use crate::io::writer::{
    free_space, hex, remaining_bytes, HashAlgo, Inputs, Layout, MappedSlot, OutTensor,
    StagedOutput, Start,
};
use crate::methods::{self, Ctx, Finish};
use crate::plan::{Plan, TensorTask};

pub struct ExecOptions<'a> {
    pub out_dir: PathBuf,
    pub start: Start,
    pub max_shard_bytes: u64,
    pub progress: bool,
    /// Merge inputs that hold NaN or infinity instead of refusing them.
    pub allow_nonfinite: bool,
    /// Where to go on when the backend fails with a GPU error (`--device auto`): the tensor is
    /// merged again there, and so is every tensor after it.
    pub fallback: Option<&'a dyn Backend>,
    /// The hash the manifest records.
    pub hash: HashAlgo,
    /// fsync the output before it is renamed into place.
    pub fsync: bool,
}

#[derive(Debug)]
pub struct Report {
    pub out_dir: PathBuf,
    pub tensors: usize,
    /// Tensors taken over from an interrupted run (`--resume`).
    pub reused: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    pub shards: usize,
    pub backend: String,
    /// Time in SVDs and matrix products during this merge.
    pub linalg: crate::backend::linalg_time::Totals,
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks a running merge to stop after the tensor in hand (signal handlers call this).
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

pub fn layout(plan: &Plan, max_shard_bytes: u64) -> Layout {
    let ts: Vec<OutTensor> = plan
        .tasks
        .iter()
        .map(|t| OutTensor {
            name: &t.name,
            dtype: t.out_dtype,
            shape: &t.shape,
        })
        .collect();
    Layout::new(&ts, max_shard_bytes)
}

/// Identifies a merge for `--resume`: the smelt version, the recipe, the seed, the output
/// layout and a digest of every input. Any change makes an interrupted run unusable.
pub fn fingerprint(plan: &Plan, layout: &Layout) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(plan.recipe.text.as_bytes());
    h.update(plan.seed.to_le_bytes());
    h.update(plan.load_dtype.st_name().as_bytes());
    for s in &layout.shards {
        h.update(s.file_name.as_bytes());
        h.update(&s.header);
    }
    for m in &plan.models {
        h.update(input_digest(m).as_bytes());
    }
    // the state a continual merge goes on from is read whole: all of it counts
    if let Some(p) = &plan.prior {
        h.update(p.to_string().as_bytes());
    }
    hex(&h.finalize())
}

/// Every file the merge reads (model shards and indexes, adapters, compressed task vectors,
/// side files such as Fisher's), each with its identity as it was opened, and which of them
/// each output shard is merged from; and the mapped ones, to ask whether a read of one
/// faulted.
fn input_files<'p>(plan: &'p Plan, layout: &Layout) -> (Inputs, Vec<&'p SafetensorsFile>) {
    let mut files: Vec<FileId> = Vec::new();
    let mut mapped: Vec<&SafetensorsFile> = Vec::new();
    let mut at = std::collections::HashMap::<*const SafetensorsFile, usize>::new();
    let mut add = |f: &'p SafetensorsFile, files: &mut Vec<FileId>| -> usize {
        *at.entry(f as *const _).or_insert_with(|| {
            files.push(f.id.clone());
            mapped.push(f);
            files.len() - 1
        })
    };
    // per model: the files every tensor of it depends on (index, adapters, compressed
    // vector), then its own safetensors files
    let mut always: Vec<Vec<usize>> = Vec::with_capacity(plan.models.len());
    for m in &plan.models {
        let mut v = Vec::new();
        let index = m.folder.path.join(INDEX_NAME);
        if m.folder.path.is_dir() && index.is_file() {
            if let Ok(id) = FileId::of_path(&index) {
                files.push(id);
                v.push(files.len() - 1);
            }
        }
        for a in &m.adapters {
            v.push(add(&a.adapter.file, &mut files));
        }
        if let Some(c) = &m.compeft {
            v.push(add(&c.file, &mut files));
        }
        for f in m.files() {
            add(f, &mut files);
        }
        always.push(v);
    }
    // a method with whole-model statistics merges every tensor from every input
    let global = plan
        .tasks
        .iter()
        .any(|t| !t.copy_only && plan.method.imp.wants_globals(&t.params));
    let reads = layout
        .shards
        .iter()
        .map(|sh| {
            if global {
                return (0..files.len()).collect();
            }
            let mut r = std::collections::BTreeSet::new();
            for &i in &sh.tensors {
                let t = &plan.tasks[i];
                for ti in t.base.iter().chain(&t.models) {
                    let m = &plan.models[ti.model];
                    r.extend(&always[ti.model]);
                    if let Some(tr) = m.get(&ti.tensor) {
                        if let Some(&k) = at.get(&(tr.file as *const _)) {
                            r.insert(k);
                        }
                    }
                }
            }
            r.into_iter().collect()
        })
        .collect();
    (Inputs { files, reads }, mapped)
}

/// The error for an input whose mapping faulted (it was truncated while being read), naming
/// it; None while every read found its bytes.
fn changed_under_map(mapped: &[&SafetensorsFile]) -> Option<Error> {
    let f = mapped.iter().find(|f| f.changed_under_map())?;
    // the zeros read in place of the lost bytes are said too: they are why nothing merged
    // since is kept
    let what = match f.id.change_now() {
        Some(w) => format!(
            "{}; a read met a page past its end)",
            w.trim_end_matches(')')
        ),
        None => "(a read met a page past its end)".into(),
    };
    Some(Error::InputChanged {
        path: f.id.path.clone(),
        msg: format!("changed or was truncated while smelt was reading it {what}"),
    })
}

/// The task's inputs with the tensors that `lora_inputs` rebuilt (W + ΔW) in their place.
fn adapted_inputs<'p>(
    plan: &'p Plan,
    t: &TensorTask,
    owned: &'p [Option<Vec<u8>>],
) -> (Option<Input<'p>>, Vec<Input<'p>>) {
    let (mut base, mut models) = inputs_of(plan, t);
    let nb = base.is_some() as usize;
    for (k, bytes) in owned.iter().enumerate() {
        if let Some(bytes) = bytes {
            let slot = if k < nb {
                base.as_mut().unwrap()
            } else {
                &mut models[k - nb]
            };
            slot.bytes = bytes;
        }
    }
    (base, models)
}

fn inputs_of<'p>(plan: &'p Plan, t: &TensorTask) -> (Option<Input<'p>>, Vec<Input<'p>>) {
    let get = |ti: &crate::plan::TaskInput| {
        let r = plan.models[ti.model]
            .get(&ti.tensor)
            .expect("planned tensor exists");
        Input {
            bytes: r.bytes(),
            dtype: r.dtype(),
        }
    };
    (t.base.as_ref().map(get), t.models.iter().map(get).collect())
}

fn advise(plan: &Plan, t: &TensorTask, will_need: bool) {
    for ti in t.base.iter().chain(&t.models) {
        if let Some(r) = plan.models[ti.model].get(&ti.tensor) {
            r.file.advise(r.info, will_need);
        }
    }
}

/// Refuses inputs holding NaN or infinity, naming the model and tensor.
fn check_inputs(plan: &Plan, t: &TensorTask) -> Result<()> {
    for ti in t.base.iter().chain(&t.models) {
        let r = plan.models[ti.model].get(&ti.tensor).expect("planned");
        if let Some((index, value)) = first_nonfinite(r.dtype(), r.bytes()) {
            return Err(Error::NonFinite {
                model: plan.models[ti.model].label.clone(),
                tensor: ti.tensor.clone(),
                index,
                value: value.to_string(),
            });
        }
    }
    Ok(())
}

/// The whole-model statistics the plan's method needs ([`methods::Method::whole_model`]),
/// computed on the backend the first time they are asked for (passes that read the inputs
/// again), then kept in the plan.
pub fn whole_model_sums(plan: &Plan, backend: &dyn Backend) -> Result<Vec<f64>> {
    let mut cached = plan.globals.lock().unwrap();
    if let Some(v) = &*cached {
        return Ok(v.clone());
    }
    let each = |f: &mut methods::JobVisitor| -> Result<()> {
        let wanted = |t: &&TensorTask| !t.copy_only && plan.method.imp.wants_globals(&t.params);
        for t in plan.tasks.iter().filter(wanted) {
            // statistics of what will be merged: adapted models with their ΔW added
            let owned = lora_inputs(plan, backend, t)?;
            let (base, models) = adapted_inputs(plan, t, &owned);
            let job = Job::new(&t.name, base, models, plan.load_dtype, DType::F32);
            let r = f(&job, &t.params, &t.shape);
            backend.end_job(&job);
            r?;
        }
        Ok(())
    };
    if !plan
        .tasks
        .iter()
        .any(|t| !t.copy_only && plan.method.imp.wants_globals(&t.params))
    {
        *cached = Some(Vec::new());
        return Ok(Vec::new());
    }
    let v = plan
        .method
        .imp
        .whole_model(backend, &each, plan.seed, plan.prior.as_ref())?;
    *cached = Some(v.clone());
    Ok(v)
}

/// For each input of a task (base first, then the models): the tensor with its LoRA ΔWs
/// added, when the input is a model with adapters (`MODEL+ADAPTER`, `adapters:`) that target
/// that tensor, or with its compressed task vector added (`smelt compress`). This is PEFT's `merge_and_unload`, one adapter after another: W + Σ ΔW_k in
/// W's dtype, each ΔW_k = scale_k·s_k·B_k·A_k formed on the backend and added before the
/// next is formed, so only one ΔW exists at any time.
fn lora_inputs(plan: &Plan, backend: &dyn Backend, t: &TensorTask) -> Result<Vec<Option<Vec<u8>>>> {
    t.base
        .iter()
        .chain(&t.models)
        .map(|ti| {
            let m = &plan.models[ti.model];
            // a model carries adapters or a compressed task vector, never both
            let compeft = m.compeft.as_ref().filter(|c| c.has(&ti.tensor));
            let deltas = m.deltas_for(&ti.tensor);
            if compeft.is_none() && deltas.is_empty() {
                return Ok(None);
            }
            let r = m.get(&ti.tensor).expect("planned tensor exists");
            let mut w = vec![0f32; r.numel()];
            crate::dtype::decode(r.dtype(), r.bytes(), &mut w);
            if let Some(c) = compeft {
                c.add_to(&ti.tensor, &mut w);
            }
            for (applied, module) in deltas {
                let ad = &applied.adapter;
                let d = ad.delta_scaled(module, applied.scale, backend)?;
                if d.data.len() != w.len() {
                    return Err(Error::Param {
                        tensor: ti.tensor.clone(),
                        msg: format!(
                            "the ΔW of adapter {} is {}x{} but the tensor has {} elements",
                            ad.label,
                            d.rows,
                            d.cols,
                            w.len()
                        ),
                    });
                }
                w.iter_mut().zip(&d.data).for_each(|(x, dx)| *x += dx);
            }
            let mut bytes = vec![0u8; w.len() * r.dtype().size()];
            crate::dtype::encode(r.dtype(), &w, &mut bytes);
            Ok(Some(bytes))
        })
        .collect()
}

/// Merges one planned tensor into `out` (its output bytes).
pub fn merge_tensor(
    plan: &Plan,
    backend: &dyn Backend,
    t: &TensorTask,
    out: &mut [u8],
) -> Result<()> {
    merge_tensor_scanned(plan, backend, t, out, None, None)
}

/// [`merge_tensor`] with two extras for the backend: `scan` to fill in as it decodes the
/// inputs (only when they are the files' own tensors, not rebuilt from adapters), and `sink`,
/// another way to write `out` (see [`Job::sink`]).
fn merge_tensor_scanned(
    plan: &Plan,
    backend: &dyn Backend,
    t: &TensorTask,
    out: &mut [u8],
    scan: Option<&FiniteScan>,
    sink: Option<&Sink>,
) -> Result<()> {
    let owned = if t.copy_only {
        Vec::new()
    } else {
        lora_inputs(plan, backend, t)?
    };
    let (base, models) = adapted_inputs(plan, t, &owned);
    if t.copy_only {
        out.copy_from_slice(models[0].bytes);
        return Ok(());
    }
    let globals = whole_model_sums(plan, backend)?;
    let mut job = Job::new(&t.name, base, models, plan.load_dtype, t.out_dtype)
        .with_align(plan.method.imp.align(&t.params, &t.shape));
    if let Some(scan) = scan.filter(|_| owned.iter().all(Option::is_none)) {
        job = job.with_scan(scan);
    }
    if let Some(sink) = sink {
        job = job.with_sink(sink);
    }
    let cx = Ctx {
        job: &job,
        shape: &t.shape,
        params: &t.params,
        seed: plan.seed,
        depth: t.layer.map(|l| match plan.out_layers {
            Some(n) if n > 1 => l as f64 / (n - 1) as f64,
            _ => 0.0,
        }),
        globals: &globals,
    };
    let r = plan.method.imp.run(backend, &cx, out);
    backend.end_job(&job);
    r
}

pub fn execute(plan: &Plan, backend: &dyn Backend, opts: &ExecOptions) -> Result<Report> {
    let start = Instant::now();
    let linalg0 = crate::backend::linalg_time::snapshot();
    let layout = layout(plan, opts.max_shard_bytes);
    let fp = fingerprint(plan, &layout);
    let (inputs, mapped) = input_files(plan, &layout);
    // every read of an input from here on is followed by `changed_under_map` before its
    // result is kept
    crate::io::fault::catch_faults();
    if let Some(e) = changed_under_map(&mapped) {
        return Err(e);
    }
    let resume = opts.start == Start::Resume;
    // a resumed merge needs room for its unfinished shards only
    let need = if resume {
        remaining_bytes(&opts.out_dir, &layout)
    } else {
        layout.file_bytes()
    };
    let parent = opts
        .out_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Some(free) = free_space(parent) {
        // the old folder stays until the new one is complete under --force
        if free < need + (1 << 20) {
            return Err(Error::Output {
                path: opts.out_dir.clone(),
                msg: format!(
                    "needs {}{} but only {} are free on its filesystem: free some space and run it again{}",
                    crate::units::bytes(need),
                    if resume { " more for its unfinished shards" } else { "" },
                    crate::units::bytes(free),
                    if resume { " with --resume" } else { "" }
                ),
            });
        }
    }
    let shards = layout.shards.len();
    let mut staged =
        StagedOutput::create_reading(&opts.out_dir, opts.start, layout, fp, opts.hash, inputs)?;
    staged.set_durable(opts.fsync);

    // Tensors still to merge, and how many each unfinished shard waits for.
    let todo: Vec<usize> = (0..plan.tasks.len())
        .filter(|&i| !staged.shard_done(staged.layout().slots[i].shard))
        .collect();
    let reused = plan.tasks.len() - todo.len();
    let mut waiting = vec![0usize; shards];
    for &i in &todo {
        waiting[staged.layout().slots[i].shard] += 1;
    }
    let total: u64 = todo.iter().map(|&i| plan.tasks[i].out_bytes()).sum();
    let pb = if opts.progress {
        let pb = ProgressBar::new(total);
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap(),
        );
        pb
    } else {
        ProgressBar::hidden()
    };

    let mut bytes_read = 0u64;
    let mut current: &dyn Backend = backend;
    let staged_m = Mutex::new(&mut staged);
    let result = run_tasks(
        plan,
        opts,
        &todo,
        &mut waiting,
        &staged_m,
        &pb,
        &mut current,
        &mut bytes_read,
        &mapped,
    );
    pb.finish_and_clear();
    if let Err(e) = result {
        return Err(match e {
            Error::Interrupted => {
                staged.keep();
                let done = (0..shards).filter(|&s| staged.shard_done(s)).count();
                Error::Stopped {
                    path: staged.tmp_dir.clone(),
                    done,
                    total: shards,
                }
            }
            e => kept(&mut staged, e),
        });
    }
    let name = opts
        .out_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "merged".into());
    let weights = output::weight_files(&staged)?;
    let side_files = || -> Result<()> {
        if let Some((file, bytes)) = finish(plan, current, &weights)? {
            staged.write_file(file, &bytes)?;
        }
        // the finish step may have read the inputs (whole-model statistics)
        if let Some(e) = changed_under_map(&mapped) {
            return Err(e);
        }
        output::write_side_files(plan, &staged, &name).map(drop)
    };
    if let Err(e) = side_files() {
        return Err(kept(&mut staged, e));
    }
    let out_dir = staged.commit()?;
    Ok(Report {
        out_dir,
        tensors: plan.tasks.len(),
        reused,
        bytes_read,
        bytes_written: total,
        seconds: start.elapsed().as_secs_f64(),
        shards,
        backend: current.name(),
        linalg: crate::backend::linalg_time::snapshot() - linalg0,
    })
}

/// A failure that leaves the finished shards worth keeping (a full disk, an input that
/// changed while it was read) keeps the partial folder, and says so; any other is returned
/// as it is (the partial folder goes).
fn kept(staged: &mut StagedOutput, e: Error) -> Error {
    if let Error::InputChanged { path, .. } = &e {
        staged.keep();
        if let Err(j) = staged.mark_changed(&path.clone()) {
            log::warn!("could not note the change in the journal: {j}");
        }
    } else if e.is_disk_full() {
        staged.keep();
    }
    staged.out_of_space(e)
}

/// The merge loop and the writer thread.
#[allow(clippy::too_many_arguments)]
fn run_tasks<'b>(
    plan: &Plan,
    opts: &ExecOptions<'b>,
    todo: &[usize],
    waiting: &mut [usize],
    staged_m: &Mutex<&mut StagedOutput>,
    pb: &ProgressBar,
    current: &mut &'b dyn Backend,
    bytes_read: &mut u64,
    mapped: &[&SafetensorsFile],
) -> Result<()> {
    // Finished tensors travel to the writer: written in place into the mapped shard (None),
    // or in a buffer that comes back for reuse.
    let (to_writer, from_exec) = mpsc::sync_channel::<(usize, Option<Vec<u8>>)>(2);
    let (recycle, recycled) = mpsc::channel::<Vec<u8>>();
    // every tensor's place in the mapped output, taken now: asking the staged output for
    // one per tensor would wait on the writer, which holds it while hashing
    let slots: Vec<Option<MappedSlot>> = {
        let st = staged_m.lock().unwrap();
        (0..plan.tasks.len()).map(|i| st.slot(i)).collect()
    };
    let result: Result<()> = std::thread::scope(|scope| {
        let waiting = &mut *waiting;
        let writer = scope.spawn(move || -> Result<()> {
            for (i, buf) in from_exec {
                let mut st = staged_m.lock().unwrap();
                match &buf {
                    Some(b) => st.write_tensor(i, b)?,
                    None => st.wrote_in_place(i),
                }
                let si = st.layout().slots[i].shard;
                waiting[si] -= 1;
                if waiting[si] == 0 {
                    st.finish_shard(si)?;
                }
                drop(st);
                if let Some(b) = buf {
                    let _ = recycle.send(b);
                }
            }
            Ok(())
        });
        let mut run = || -> Result<()> {
            for (n, &i) in todo.iter().enumerate() {
                if stop_requested() {
                    return Err(Error::Interrupted);
                }
                let t = &plan.tasks[i];
                if let Some(&next) = todo.get(n + 1) {
                    advise(plan, &plan.tasks[next], true);
                }
                // methods that merge through gta or weighted_sum, on a backend whose kernels
                // decode every input element, look for NaN and infinity on the way (in the
                // inputs, and in an f32 output as it is written); other merges have their
                // inputs scanned first
                let check = !opts.allow_nonfinite && !t.copy_only;
                let on_the_way =
                    check && current.scans_inputs() && plan.method.imp.checks_inputs_on_the_way();
                if check && !on_the_way {
                    check_inputs(plan, t)?;
                }
                let scan = FiniteScan::default();
                // a mapped slot can also be written with pwrite, which the CPU does from its
                // cache-hot chunks: whole pages then need no zero-filling by the kernel
                #[cfg(unix)]
                let file = slots[i].as_ref().map(|s| s.file());
                #[cfg(unix)]
                let sink_fn = file.as_ref().map(|f| {
                    // SAFETY: the staged output outlives this loop, and the kernels write
                    // disjoint chunks of this slot only
                    move |at: u64, bytes: &[u8]| unsafe { f.write_at(at, bytes) }
                });
                #[cfg(unix)]
                let sink = sink_fn.as_ref().map(|f| f as &Sink);
                #[cfg(not(unix))]
                let sink = None;
                // in place in the mapped output when there is one (no copy, no zeroing: a
                // fresh slot reads as zeros), else in a zeroed buffer
                let mut owned = None;
                let buf: &mut [u8] = match &slots[i] {
                    // SAFETY: the staged output outlives this loop, and slot i is touched by
                    // nothing else until the writer gets it below
                    Some(s) => unsafe { s.bytes() },
                    None => {
                        let mut b = recycled.try_recv().unwrap_or_default();
                        b.clear();
                        b.resize(t.out_bytes() as usize, 0);
                        owned.insert(b).as_mut_slice()
                    }
                };
                let merged =
                    merge_tensor_scanned(plan, *current, t, buf, on_the_way.then_some(&scan), sink);
                // a read that met a page an input no longer has read zeros: nothing merged
                // from it may reach the writer
                if let Some(e) = changed_under_map(mapped) {
                    return Err(e);
                }
                match merged {
                    Err(Error::Gpu(e))
                        if opts
                            .fallback
                            .is_some_and(|f| !std::ptr::addr_eq(*current, f)) =>
                    {
                        let cpu = opts.fallback.unwrap();
                        log::warn!(
                            "the GPU failed on {} ({e}); merging it and the rest on {}",
                            t.name,
                            cpu.name()
                        );
                        *current = cpu;
                        merge_tensor(plan, *current, t, buf)?;
                    }
                    r => r?,
                }
                if on_the_way && !scan.inputs_known_finite() {
                    // the scan names the model and element (or finds the inputs finite after
                    // all: a delta of finite values can overflow)
                    check_inputs(plan, t)?;
                }
                let output_vouched = on_the_way && scan.output_known_finite();
                if !t.copy_only && !output_vouched {
                    if let Some((index, value)) = first_nonfinite(t.out_dtype, buf) {
                        let inputs_finite = opts.allow_nonfinite && check_inputs(plan, t).is_ok();
                        if !opts.allow_nonfinite || inputs_finite {
                            return Err(Error::Param {
                                tensor: t.name.clone(),
                                msg: format!(
                                    "the merge produced {value} at element {index} from finite inputs{}",
                                    if t.out_dtype == DType::F16 {
                                        " (beyond ±65504 for float16: write bfloat16 or float32 instead)"
                                    } else {
                                        ""
                                    }
                                ),
                            });
                        }
                    }
                }
                advise(plan, t, false);
                *bytes_read += t
                    .base
                    .iter()
                    .chain(&t.models)
                    .map(|ti| plan.models[ti.model].get(&ti.tensor).unwrap().bytes().len() as u64)
                    .sum::<u64>();
                pb.set_message(format!("{}/{} {}", n + 1, todo.len(), t.name));
                pb.inc(buf.len() as u64);
                if let Some(e) = changed_under_map(mapped) {
                    return Err(e);
                }
                if to_writer.send((i, owned)).is_err() {
                    break; // the writer failed; its error is reported below
                }
                if let Some(ms) = throttle_ms() {
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
            }
            Ok(())
        };
        let r = run();
        drop(to_writer);
        let w = writer.join().expect("writer thread panicked");
        // A writer error is the cause of a stop in the loop; report it first.
        w.and(r)
    });
    result
}

/// Test hook: `SMELT_THROTTLE_MS` slows the merge down after each tensor, so that tests can
/// interrupt it at a known point.
fn throttle_ms() -> Option<u64> {
    std::env::var("SMELT_THROTTLE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// The method's finish step ([`methods::Method::finish`]): a file for the output, from the
/// whole-model statistics and the inputs (each as its path, label and digest).
fn finish(
    plan: &Plan,
    backend: &dyn Backend,
    weights: &[methods::WeightFile],
) -> Result<Option<(&'static str, Vec<u8>)>> {
    let globals = whole_model_sums(plan, backend)?;
    let entry = |i: usize| {
        let m = &plan.models[i];
        let path = std::fs::canonicalize(&m.path).unwrap_or_else(|_| m.path.clone());
        serde_json::json!({
            "path": path.display().to_string(),
            "label": m.label,
            "digest": input_digest(m),
        })
    };
    let inputs = || {
        let models = (0..plan.models.len())
            .filter(|&i| Some(i) != plan.base)
            .map(entry)
            .collect();
        (plan.base.map(entry), models)
    };
    let cx = Finish {
        globals: &globals,
        params: plan.tasks.iter().find(|t| !t.copy_only).map(|t| &t.params),
        inputs: &inputs,
        prior: plan.prior.as_ref(),
        weights,
    };
    plan.method.imp.finish(&cx)
}
