//! The `smelt` command line: parse the arguments, set up logging, hand the command to its
//! module under `cli/`, and turn an error into a message on stderr and an exit code.

mod cli;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Cmd};

fn main() -> ExitCode {
    quiet_wayland();
    default_sigpipe();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("smelt=info"))
        .format_timestamp(None)
        .format_target(false)
        .init();
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("error: {e}");
            for cause in e.chain().skip(1) {
                msg.push_str(&format!("\n  caused by: {cause}"));
            }
            eprintln!("{msg}");
            // 130: stopped by a signal, as shells report it
            match e.downcast_ref::<smelt::Error>() {
                Some(smelt::Error::Stopped { .. } | smelt::Error::Cancelled { .. }) => {
                    ExitCode::from(130)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Merge(args) => cli::merge::run(args),
        Cmd::Lora(cmd) => cli::lora::run(cmd),
        Cmd::Continual(args) => cli::continual::run(args),
        Cmd::Compress(args) => cli::compress::run(args),
        Cmd::Devices => cli::devices::run(),
        Cmd::Bench(args) => cli::bench::run(args),
        Cmd::Verify(args) => cli::verify::run(args),
        Cmd::Methods(args) => cli::methods::run(args),
        Cmd::Inspect(args) => cli::inspect::run(args),
    }
}

/// A closed pipe ends smelt silently, the usual Unix convention (`smelt inspect … | head`
/// exits as `cat` would: killed by SIGPIPE, status 141 in shells, no message). Rust ignores
/// SIGPIPE by default, which turns the closed pipe into a "Broken pipe" error or a panic in
/// `println!`. smelt writes only to its own files and to stdout/stderr, never to sockets,
/// so the default action cannot end it anywhere else.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: done first thing, before any thread exists; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Vulkan loaders on Linux probe for a Wayland display while enumerating adapters, and
/// libwayland prints "error: XDG_RUNTIME_DIR is invalid or not set" when that variable is
/// missing (headless servers, CI). smelt never opens a window; pointing the variable at the
/// temp folder keeps that false alarm off stderr. Done first thing, before any thread exists.
fn quiet_wayland() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
}
