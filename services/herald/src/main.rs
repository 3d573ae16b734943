//! `herald`: every Herald service behind one binary. `herald dev` runs them
//! all in one process with an in-memory broker; `herald edge`, `herald router`
//! and `herald presence` are the processes of a cluster joined by NATS;
//! `herald token` mints development tokens.
// The heap-profile build names jemalloc's options symbol (`heap`); the
// default build has no unsafe code at all.
#![cfg_attr(not(feature = "heap-profile"), forbid(unsafe_code))]
#![cfg_attr(feature = "heap-profile", deny(unsafe_code))]

mod cli;
mod config;
mod dev_routes;
mod heap;
mod keys;
mod run;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    run::main(cli)
}
