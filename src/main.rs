//! The `vault` command. Thin: parses the command line and hands over to
//! `cli`, which holds one module per command family.

use std::process::ExitCode;

// mimalloc instead of glibc malloc: requests are allocated on tokio workers
// and freed on the SQLite writer thread and back, and glibc's arenas showed
// lock contention and consolidation in the profile (BENCHMARKS.md). Secrets
// are zeroized by their own types before any allocator sees them freed.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    tokenvault::telemetry::init();
    // Every command may hold a key, a KEK share or a card number: none of
    // them can dump core or be attached to (src/hardening.rs).
    if let Err(e) = tokenvault::hardening::harden_process() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let args = cli::Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(cli::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
