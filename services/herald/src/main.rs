//! `herald`: every Herald service behind one binary. `herald dev` runs them
//! all in one process with an in-memory broker; `herald edge`, `herald router`
//! and `herald presence` are the processes of a cluster joined by NATS;
//! `herald token` mints development tokens.
#![forbid(unsafe_code)]

mod cli;
mod config;
mod run;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    run::main(cli)
}
