//! Walks the plan tensor by tensor: read (memory-mapped), merge on the backend, write.
//!
//! Memory stays bounded by a few output tensors: the inputs are file-backed mappings the
//! kernel pages in on demand (with read-ahead asked for the next tensor while this one
//! computes), and finished tensors go to a writer thread through a queue of two, whose
//! buffers come back for reuse. Reading, computing and writing overlap.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::{Backend, Input, Job};
use crate::error::{Error, Result};
use crate::io::output;
use crate::io::writer::{free_space, Layout, OutTensor, StagedOutput};
use crate::methods::{self, Ctx};
use crate::plan::{Plan, TensorTask};

pub struct ExecOptions {
    pub out_dir: PathBuf,
    pub force: bool,
    pub max_shard_bytes: u64,
    pub progress: bool,
}

#[derive(Debug)]
pub struct Report {
    pub out_dir: PathBuf,
    pub tensors: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    pub shards: usize,
    pub backend: String,
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

/// Merges one planned tensor into `out` (its output bytes).
pub fn merge_tensor(
    plan: &Plan,
    backend: &dyn Backend,
    t: &TensorTask,
    out: &mut [u8],
) -> Result<()> {
    let (base, models) = inputs_of(plan, t);
    if t.copy_only {
        out.copy_from_slice(models[0].bytes);
        return Ok(());
    }
    let job = Job::new(&t.name, base, models, plan.load_dtype, t.out_dtype)
        .with_align(methods::job_align(plan.method, &t.params, &t.shape));
    let cx = Ctx {
        job: &job,
        shape: &t.shape,
        params: &t.params,
        seed: plan.seed,
    };
    let r = methods::run(plan.method, backend, &cx, out);
    backend.end_job(&job);
    r
}

pub fn execute(plan: &Plan, backend: &dyn Backend, opts: &ExecOptions) -> Result<Report> {
    let start = Instant::now();
    let layout = layout(plan, opts.max_shard_bytes);
    let need = layout.file_bytes();
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
                    "needs {:.2} GB but only {:.2} GB are free on its filesystem",
                    need as f64 / 1e9,
                    free as f64 / 1e9
                ),
            });
        }
    }
    let shards = layout.shards.len();
    let staged = StagedOutput::create(&opts.out_dir, opts.force, layout)?;

    let total: u64 = plan.out_bytes();
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
    // Finished tensors travel to the writer; their buffers come back for reuse.
    let (to_writer, from_exec) = mpsc::sync_channel::<(usize, Vec<u8>)>(2);
    let (recycle, recycled) = mpsc::channel::<Vec<u8>>();
    let result: Result<()> = std::thread::scope(|scope| {
        let staged = &staged;
        let writer = scope.spawn(move || -> Result<()> {
            for (i, buf) in from_exec {
                staged.write_tensor(i, &buf)?;
                let _ = recycle.send(buf);
            }
            Ok(())
        });
        let mut run = || -> Result<()> {
            for (i, t) in plan.tasks.iter().enumerate() {
                if let Some(next) = plan.tasks.get(i + 1) {
                    advise(plan, next, true);
                }
                let mut buf = recycled.try_recv().unwrap_or_default();
                buf.clear();
                buf.resize(t.out_bytes() as usize, 0);
                merge_tensor(plan, backend, t, &mut buf)?;
                advise(plan, t, false);
                bytes_read += t
                    .base
                    .iter()
                    .chain(&t.models)
                    .map(|ti| plan.models[ti.model].get(&ti.tensor).unwrap().bytes().len() as u64)
                    .sum::<u64>();
                pb.set_message(format!("{}/{} {}", i + 1, plan.tasks.len(), t.name));
                pb.inc(buf.len() as u64);
                if to_writer.send((i, buf)).is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            Ok(())
        };
        let r = run();
        drop(to_writer);
        let w = writer.join().expect("writer thread panicked");
        r.and(w)
    });
    result?;
    pb.finish_and_clear();
    let name = opts
        .out_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "merged".into());
    output::write_side_files(plan, &staged, &name)?;
    let out_dir = staged.commit()?;
    Ok(Report {
        out_dir,
        tensors: plan.tasks.len(),
        bytes_read,
        bytes_written: total,
        seconds: start.elapsed().as_secs_f64(),
        shards,
        backend: backend.name(),
    })
}
