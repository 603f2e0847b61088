//! The `patchflow` command: parses the command line once into the libraries' configurations
//! (`flags`), starts logging and hands each subcommand to the library that does the work
//! (`commands`, `bench`).
//!
//! It owns no value rule and no pipeline of its own, and must not link libtorch: the trainer is
//! the separate `patchflow-train` binary, which the demo runs as a child process.

mod bench;
mod commands;
mod flags;
mod signals;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = flags::Cli::parse();
    init_tracing(args.verbose, args.quiet);
    match commands::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, coloured only when stderr is a terminal (a log file or a pipe gets plain
/// text); `RUST_LOG` overrides the level chosen by `-v` / `-q`.
fn init_tracing(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}
