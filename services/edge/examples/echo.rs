//! A WebSocket echo server made of the edge's own reader, writer and size
//! limit (`herald_edge::echo`), for the Autobahn conformance cases
//! (`scripts/autobahn.sh`):
//!
//! ```sh
//! cargo run --release -p herald-edge --example echo -- --listen 127.0.0.1:9001 [--max-message-bytes N]
//! ```
//!
//! It prints the address it serves once it listens (port 0 picks a free one).

use std::process::ExitCode;

use tokio::net::TcpListener;

/// Herald's own default for `--max-message-bytes`.
const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;

const USAGE: &str = "usage: echo --listen ADDR [--max-message-bytes N]";

#[tokio::main]
async fn main() -> ExitCode {
    let (listen, max_message_bytes) = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("echo: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("echo: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(addr) => println!(
            "echo serving ws://{addr}/ (any path), messages up to {max_message_bytes} bytes"
        ),
        Err(e) => {
            eprintln!("echo: the listening socket has no address: {e}");
            return ExitCode::FAILURE;
        }
    }
    herald_edge::echo::serve(listener, max_message_bytes).await;
    ExitCode::SUCCESS
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<(String, usize), String> {
    let mut listen = None;
    let mut max = DEFAULT_MAX_MESSAGE_BYTES;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--listen" => listen = Some(value("--listen")?),
            "--max-message-bytes" => {
                let n = value("--max-message-bytes")?;
                max = n.parse().map_err(|_| {
                    format!("--max-message-bytes takes a number of bytes, not {n:?}")
                })?;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok((listen.ok_or("--listen is required")?, max))
}
