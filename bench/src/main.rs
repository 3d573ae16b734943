//! `herald-bench <scenario> [options]`: benchmarks of a real Herald.
//!
//! Each run starts the system under test itself (a cluster of real
//! processes joined by a nats-server, or one `herald dev`) on free ports,
//! drives it with real WebSocket clients from source addresses 127.0.0.2,
//! 127.0.0.3, ..., and prints a table of the results, optionally also JSON
//! (`--json FILE`, or `--json -` for one line on stdout). CPU time of every
//! process (and of the bench itself, which shares the machine) is read from
//! `/proc/<pid>/stat`.
//!
//! Scenarios: `churn` (presence churn), `presence-memory` (the presence
//! view's memory per connection). More will follow (idle, fanout,
//! chat, floor); each is a module with a clap `Args` struct and a `run`
//! that returns a [`report::Report`].

mod churn;
mod load;
mod presence_memory;
mod report;
mod target;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::target::{CommonArgs, Target};

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

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Presence churn: connect → join → close loops per second, and join-to-visible
    /// latency of presence events on every edge.
    Churn {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: churn::ChurnArgs,
    },
    /// Memory of one presence replica's view per connection and room membership
    /// (in-process; starts nothing).
    PresenceMemory {
        #[command(flatten)]
        args: presence_memory::PresenceMemoryArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("herald-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the scenario; `Ok(false)` when the report lists failures.
fn run(cli: Cli) -> Result<bool> {
    let (common, args) = match cli.scenario {
        Scenario::Churn { common, args } => (common, args),
        Scenario::PresenceMemory { args } => return presence_memory::run(&args),
    };
    let mut target = Target::start(&common)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut report = runtime.block_on(churn::run(&args, &common, &target))?;
    finish(&mut report, &mut target, &common)
}

/// What every scenario's report gets at the end: processes that died, log
/// lines worth a look; then the report is printed.
fn finish(report: &mut report::Report, target: &mut Target, common: &CommonArgs) -> Result<bool> {
    report.failures.extend(target.exited());
    report.notes.extend(target.log_problems());
    report.params.insert(
        "herald".into(),
        target.herald_bin.display().to_string().into(),
    );
    report.emit(common.json.as_deref())?;
    Ok(report.failures.is_empty())
}
