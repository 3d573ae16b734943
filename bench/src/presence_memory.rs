//! `presence-memory`: the memory one presence replica needs per connection
//! and per room membership. Builds the presence view in this process from the
//! same reports edges send (connections spread over edges, each in rooms
//! with a small `meta`), and reads the process's RSS before and after.

use std::time::{Duration, Instant as StdInstant};

use anyhow::Result;
use clap::Args;
use herald_presence::view::View;
use herald_wire::presence::{Change, EdgeReport};
use serde_json::json;

use crate::procfs::rss_bytes;
use crate::report::{Report, Section, round3};

#[derive(Args, Debug)]
pub struct PresenceMemoryArgs {
    /// Connections in the view.
    #[arg(long, default_value_t = 100_000)]
    pub conns: usize,
    /// Rooms they are spread over.
    #[arg(long, default_value_t = 10_000)]
    pub rooms: usize,
    /// Rooms each connection is in.
    #[arg(long, default_value_t = 1)]
    pub rooms_per_conn: usize,
    /// Edges the connections are spread over.
    #[arg(long, default_value_t = 5)]
    pub edges: usize,
    /// Connections per user (devices).
    #[arg(long, default_value_t = 2)]
    pub conns_per_user: usize,
    /// Write the results as JSON to this file (`-` for stdout).
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

pub fn run(args: &PresenceMemoryArgs) -> Result<bool> {
    let pid = std::process::id();
    let config = herald_presence::Config {
        warmup: Duration::ZERO,
        ..Default::default()
    };
    let now = tokio::time::Instant::now();
    let mut view = View::new(&config, now);
    let before = rss_bytes(pid).unwrap_or(0);
    let started = StdInstant::now();
    let mut seqs = vec![0u64; args.edges];
    let mut memberships = 0usize;
    for i in 0..args.conns {
        let edge = i % args.edges;
        let node = format!("edge-{edge}");
        let conn = format!("{node}-{i}");
        let user = format!("user-{}", i / args.conns_per_user.max(1));
        let mut send = |change: Change| {
            seqs[edge] += 1;
            view.apply(
                EdgeReport::Delta {
                    node: node.clone(),
                    seq: seqs[edge],
                    change,
                },
                now,
            );
        };
        send(Change::Connect {
            conn: conn.clone(),
            user,
            since_ms: 1_700_000_000_000 + i as u64,
        });
        for r in 0..args.rooms_per_conn {
            let room = format!("chat:room-{}", (i + r * 7919) % args.rooms.max(1));
            send(Change::Join {
                conn: conn.clone(),
                room,
                meta: Some(json!({"cursor": i % 1000, "typing": false})),
                quiet: false,
            });
            memberships += 1;
        }
    }
    let build = started.elapsed();
    let after = rss_bytes(pid).unwrap_or(0);
    let grown = after.saturating_sub(before) as f64;
    let stats = view.stats();

    let mut report = Report::new(
        "presence-memory",
        "in-process",
        "memory of one presence replica's view, built from edge reports".into(),
        json!({
            "conns": args.conns,
            "rooms": args.rooms,
            "rooms_per_conn": args.rooms_per_conn,
            "edges": args.edges,
            "conns_per_user": args.conns_per_user,
        }),
    );
    report.section(
        "view",
        Section::new()
            .put("connections", stats.conns as u64)
            .put("rooms", stats.rooms as u64)
            .put("users", stats.users as u64)
            .put("memberships", memberships as u64)
            .put("rss_growth_mib", round3(grown / (1024.0 * 1024.0)))
            .put(
                "bytes_per_connection_with_its_memberships",
                round3(grown / args.conns.max(1) as f64),
            )
            .put("build_seconds", round3(build.as_secs_f64()))
            .put(
                "updates_per_second",
                round3((args.conns + memberships) as f64 / build.as_secs_f64()),
            ),
    );
    report.emit(args.json.as_deref())?;
    Ok(true)
}
