//! A terminal chat on Herald: joins a room, prints what is said there and
//! who comes and goes, and publishes each line typed. It keeps going when
//! an edge goes away (give several URLs) and says so.
//!
//! ```sh
//! cargo run --bin herald -- dev &
//! TOKEN=$(cargo run -q --bin herald -- token --sub ann)
//! cargo run -p herald-client --example chat -- ws://127.0.0.1:8080/ws "$TOKEN" chat:lobby
//! ```
//!
//! Arguments: comma-separated URLs, a token, and a room (default
//! `chat:lobby`).

use herald_client::app::{ConnectionEvent, Herald, JoinOptions, Options, RoomEvent};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(urls), Some(token)) = (args.next(), args.next()) else {
        eprintln!("usage: chat URL[,URL...] TOKEN [ROOM]");
        std::process::exit(2);
    };
    let room_name = args.next().unwrap_or_else(|| "chat:lobby".into());

    let herald = Herald::new(Options::new(urls.split(',')).token(token))?;
    let room = herald.room(&room_name);
    // Subscribed before connecting and joining, so nothing passes unseen.
    let mut room_events = room.events();
    let mut connection = herald.events();
    let hello = herald.connect().await?;
    println!("connected as {} to {}", hello.user, hello.node);
    room.join(JoinOptions {
        meta: Some(json!({"client": "chat example"})),
        since: None,
    })
    .await?;
    println!("in {room_name}; type to talk, Ctrl-D to leave");

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => match line? {
                Some(text) if !text.trim().is_empty() => {
                    // Queued while offline; fails only after the request timeout.
                    if let Err(e) = room.publish(json!({"text": text})).await {
                        eprintln!("not sent: {e}");
                    }
                }
                Some(_) => {}
                None => break,
            },
            Some(event) = room_events.next() => match event {
                RoomEvent::Message(m) => println!("{}: {}", m.from, m.data["text"].as_str().unwrap_or(&m.data.to_string())),
                RoomEvent::Presence(p) => println!("* {} {:?}", p.user, p.event),
                RoomEvent::Read(_) => {}
            },
            Some(event) = connection.next() => match event {
                ConnectionEvent::Connected(c) => println!("* connected again, to {}", c.node),
                ConnectionEvent::Disconnected(d) if d.will_reconnect => println!("* connection lost ({}), reconnecting", d.reason),
                ConnectionEvent::Disconnected(d) => {
                    println!("* disconnected for good: {}", d.reason);
                    return Ok(());
                }
                ConnectionEvent::Error(e) => eprintln!("* {e}"),
                ConnectionEvent::Status { user, online } => {
                    println!("* {user} is {}", if online { "online" } else { "offline" })
                }
            },
        }
    }
    room.leave().await?;
    herald.close().await;
    Ok(())
}
