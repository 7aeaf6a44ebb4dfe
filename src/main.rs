//! The `vault` command. Thin: parses the command line and hands over to
//! `cli`, which holds one module per command family.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    tokenvault::telemetry::init();
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
