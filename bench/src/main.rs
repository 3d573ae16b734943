//! `herald-bench <scenario> [options]`: parses the command line and runs
//! it with [`herald_bench::run`] (see the library for the scenarios).

use std::process::ExitCode;

use clap::Parser;
use herald_bench::Scenario;

/// The clients' allocations are many and small; glibc's malloc cost the load
/// a seventh of its CPU, taken from the servers on the same cores.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "herald-bench",
    version,
    about = "Benchmarks of a real Herald cluster or `herald dev`",
    long_about = "Benchmarks of a real Herald cluster or `herald dev`.\n\n\
        The bench starts what it measures (nats-server, presence, router, edges; or `herald dev`) \
        on free ports, drives it with WebSocket clients, and prints a table; `--json FILE` (or `-`) \
        also writes the results as JSON. Build both binaries in release mode first:\n\n  \
        cargo build --release --bin herald --bin herald-bench"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match herald_bench::run(cli.scenario) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("herald-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
