//! Running a plan from the command line: the Ctrl-C handler, plans that commands build
//! themselves (continual, lora apply), and the linear-algebra line of a merge's report.

use std::path::PathBuf;

use smelt::backend::cpu::Cpu;
use smelt::backend::Backend;
use smelt::exec::{self, ExecOptions};
use smelt::io::guard::claim_output;
use smelt::io::writer::{HashAlgo, Start};
use smelt::plan::Plan;

use super::args::{make_backend, DeviceArgs};

/// Ctrl-C or SIGTERM: stop after the tensor in hand, keeping what is finished for --resume
/// (merge; the other commands remove it). A second one ends the process at once.
pub fn install_stop_handler() {
    install_stop_handler_for(true);
}

/// As [`install_stop_handler`], for a command that has `--resume` or not: only then does the
/// message of a second Ctrl-C speak of resuming.
fn install_stop_handler_for(resumable: bool) {
    let _ = ctrlc::set_handler(move || {
        if smelt::exec::stop_requested() {
            if resumable {
                eprintln!("\nstopped at once; the partial output stays hidden and is not resumable past its last finished shard");
            } else {
                eprintln!("\nstopped at once; the partial output stays hidden (this command cannot resume): run it again with --force to start over");
            }
            std::process::exit(130);
        }
        eprintln!("\nstopping after the current tensor (press Ctrl-C again to stop at once)…");
        smelt::exec::request_stop();
    });
}

/// Runs a plan built by a command (not a recipe the user resumes) into a fresh OUT: the
/// output checked against the plan's inputs and locked first, the device's backend with the
/// CPU as fallback under auto, Ctrl-C handled, BLAKE3 manifest. These commands have no
/// --resume, so a stopped run removes its partial folder.
pub fn execute_fresh(
    plan: &Plan,
    device: &DeviceArgs,
    out: PathBuf,
    force: bool,
    shard: u64,
) -> anyhow::Result<exec::Report> {
    // held until the output is in place: no other smelt writes OUT meanwhile
    let _lock = claim_output(&out, &plan.input_paths(), Start::Fresh { force }, false)?;
    let backend = make_backend(device)?;
    let cpu = Cpu::new();
    let fallback: Option<&dyn Backend> = device.cpu_fallback().then_some(&cpu);
    install_stop_handler_for(false);
    let r = exec::execute(
        plan,
        backend.as_ref(),
        &ExecOptions {
            out_dir: out,
            start: Start::Fresh { force },
            max_shard_bytes: shard,
            progress: true,
            allow_nonfinite: false,
            fallback,
            hash: HashAlgo::Blake3,
            fsync: false,
        },
    );
    match r {
        Err(smelt::Error::Stopped { path, .. }) => {
            // nothing can resume it: take away what the stopped run kept
            let _ = std::fs::remove_dir_all(&path);
            Err(smelt::Error::Cancelled { path }.into())
        }
        r => Ok(r?),
    }
}

/// The share of a merge's time in dense linear algebra (TSV-M, OPCM, LoRA ΔW), when any.
pub fn print_linalg(r: &exec::Report) {
    let l = &r.linalg;
    if l.svd_calls + l.matmul_calls == 0 {
        return;
    }
    let pct = |s: f64| 100.0 * s / r.seconds.max(1e-9);
    println!(
        "linear algebra: {} SVDs {:.2} s ({:.1}% of the merge), {} other matrix products {:.2} s ({:.1}%)",
        l.svd_calls,
        l.svd_seconds,
        pct(l.svd_seconds),
        l.matmul_calls,
        l.matmul_seconds,
        pct(l.matmul_seconds)
    );
}
