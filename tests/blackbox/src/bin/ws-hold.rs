//! A WebSocket client in a process of its own, for black-box tests that
//! freeze it (SIGSTOP) or kill it as a network fault would: connects to URL
//! with TOKEN, joins each ROOM, prints `ready <conn id>`, then holds the
//! connection, its client answering the edge's pings, until it is killed.
//!
//! `ws-hold URL TOKEN [ROOM...]`

use std::io::Write as _;
use std::process::ExitCode;

use herald_client::Client;
use serde_json::json;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(token)) = (args.next(), args.next()) else {
        eprintln!("usage: ws-hold URL TOKEN [ROOM...]");
        return ExitCode::from(2);
    };
    let (client, connected) = match Client::connect(&url, &token).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ws-hold: could not connect to {url}: {e}");
            return ExitCode::FAILURE;
        }
    };
    for room in args {
        if let Err(e) = client.request(json!({"op": "join", "room": room})).await {
            eprintln!("ws-hold: could not join {room}: {e}");
            return ExitCode::FAILURE;
        }
    }
    println!("ready {}", connected["conn"].as_str().unwrap_or_default());
    let _ = std::io::stdout().flush();
    // The client's reader task answers pings; this task only keeps it.
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    }
}
