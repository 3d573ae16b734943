//! `herald-bench <scenario> [options]`: benchmarks of a real Herald.
//!
//! Each run starts the system under test itself (a cluster of real
//! processes joined by a nats-server, or one `herald dev`) on free ports,
//! drives it with real WebSocket clients from source addresses 127.0.0.2,
//! 127.0.0.3, ..., and prints a table of the results, optionally also JSON
//! (`--json FILE`, or `--json -` for one line on stdout). CPU time of every
//! process (and of the bench itself, which shares the machine) is read in
//! nanoseconds from `/proc/<pid>/task/*/schedstat`, RSS from
//! `/proc/<pid>/status` (`src/procfs.rs`).
//!
//! `--target socketio` runs `idle`, `fanout`, `churn` and `reconnect-storm`
//! against the comparison peer instead (Socket.IO 4 servers with the Redis
//! adapter, see `src/socketio.rs` and `peers/socketio/README.md`),
//! reporting the same keys; `chat` refuses it.
//!
//! Scenarios: `churn` (presence churn), `presence-memory` (the presence
//! view's memory per connection), `idle` (the memory per idle connection
//! of every server process), `floor` (the kernel's cost of a small write, measured with
//! the same clients), `fanout` (gRPC publish → delivered to many members,
//! latency and CPU per delivery, optionally as a ratio to the floor),
//! `chat` (many small rooms whose members publish through their own
//! connections: delivered/s, loss, latency, CPU per delivery),
//! `reconnect-storm` (one edge of many clients killed: time until all have
//! reconnected elsewhere and recovered their durable rooms). Each
//! is a module with a clap `Args` struct and a `run` that returns a
//! `report::Report`.
//!
//! The binary (`src/main.rs`) parses the command line into a [`Scenario`]
//! and calls [`run`]; the tests use the modules, e.g. the Socket.IO client.

pub mod arrivals;
mod chat;
mod churn;
mod compare;
mod delivery;
mod fanout;
mod floor;
mod idle;
mod load;
mod otlp;
mod peer;
mod presence_memory;
mod procfs;
mod report;
mod scenario;
pub mod socketio;
mod storm;
mod target;

pub use scenario::{Scenario, run};
