//! `chat`: many small rooms whose members publish and receive.
//!
//! `--rooms` rooms (`chat:room-<k>`) of `--members` members each; member
//! `j` of room `k` is user `chat-<g>` (`g = k * members + j`) connected to
//! edge `g % edges`, so every room spans the edges. Unlike `fanout`, the
//! messages come from the members themselves, through the client `publish`
//! op on their own connection: publish `i` of a step goes to room
//! `i % rooms`, sent by its members in turn, `--rates` publishes a second
//! across all rooms, for `--duration` per step, each call a task of its own
//! (at most `--max-in-flight` at once). The payload is
//! `{"s":<step>,"t":<ns since the epoch when the call was made>,"i":<n>}`, so
//! the latency is publish → delivered to each member (the edge, NATS or
//! the in-memory broker, the other edges).
//!
//! The publisher receives its own message too when it is a member
//! (docs/protocol.md, `publish`): every successful publish is expected at
//! all the members of its room, its sender included.
//!
//! Per step: what `fanout` reports (deliveries expected and received,
//! latency, the publish call's latency, server CPU per delivery, the bench's
//! own CPU), plus the servers' CPU per publish. Herald only: the Socket.IO
//! peer has no client publish to compare with.

use std::sync::Arc;

use anyhow::Result;
use clap::Args;
use futures::StreamExt as _;
use herald_client::Client;
use serde_json::{Value, json};

use crate::delivery::{self, Pacing, Published, StepOutcome, Steps, now_ns};
use crate::load::Dialer;
use crate::report::{Errors, Report, round3};
use crate::target::{CommonArgs, Target};

#[derive(Args, Debug, Clone)]
pub struct ChatArgs {
    /// Rooms (`chat:room-<k>`).
    #[arg(long, default_value_t = 1000)]
    pub rooms: usize,
    /// Members of each room (each its own connection and user); they take
    /// turns publishing to it.
    #[arg(long, default_value_t = 5)]
    pub members: usize,
    /// Publishes per second across all rooms (each reaches `--members`
    /// members); a comma-separated list runs one step per rate (`--rate` is
    /// the same option).
    #[arg(
        long = "rates",
        alias = "rate",
        value_delimiter = ',',
        default_value = "5000"
    )]
    pub rates: Vec<f64>,
    #[command(flatten)]
    pub pacing: Pacing,
    /// Connections being opened (and closed) at the same time.
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
}

/// The room name of room `k`.
fn room(k: usize) -> String {
    format!("chat:room-{k}")
}

pub async fn run(args: &ChatArgs, common: &CommonArgs, target: &Target) -> Result<Report> {
    let conns = delivery::check_shape(args.rooms, args.members, &args.rates, 1)?;
    let planned: Vec<f64> = args.rates.iter().map(|r| r * args.members as f64).collect();
    let mut report = Report::new(
        "chat",
        target.kind.as_str(),
        target.describe(),
        json!({
            "edges": target.edge_urls.len(),
            "rooms": args.rooms,
            "members": args.members,
            "conns": conns,
            "rates": args.rates,
            "deliveries_per_sec_planned": planned,
            "duration_s": args.pacing.duration.as_secs_f64(),
            "max_in_flight": args.pacing.max_in_flight,
            "source_addrs": common.source_addrs,
        }),
    );

    let warm = args.rates.len();
    let steps = Steps::new(warm + 1, conns);
    let dialer = Dialer::new(target.edge_urls.clone(), common.source_ips());
    let mut members = delivery::open_members(
        target,
        &dialer,
        ("chat", "chat:room"),
        (args.rooms, args.members),
        (args.concurrency, &steps),
        &mut report,
    )
    .await;

    // Members publish from several calls at once, each through `&Client`.
    let mut senders: Vec<Vec<Arc<Client>>> = vec![Vec::new(); args.rooms];
    for (g, c) in std::mem::take(&mut members.clients) {
        senders[g / args.members].push(Arc::new(c));
    }

    // Warm-up: one message per room from its first member, until every
    // member (the sender too) has it.
    let warm_ok: Vec<u64> = futures::stream::iter(0..args.rooms)
        .map(|k| {
            let sender = senders[k].first().cloned();
            async move {
                let data = json!({"s": warm, "t": now_ns(), "i": k});
                u64::from(publish(sender, k, data).await.is_ok())
            }
        })
        .buffered(args.concurrency.max(1))
        .collect()
        .await;
    let expected_warm = delivery::expected(&warm_ok, &members.members_of);
    let rooms_with_members = members.members_of.iter().filter(|m| **m > 0).count() as u64;
    let warm_failed = rooms_with_members.saturating_sub(warm_ok.iter().sum());
    if warm_failed > 0 {
        report
            .failures
            .push(format!("warm-up: {warm_failed} publishes failed"));
    }
    steps
        .warm_up(warm, expected_warm, &members, &mut report)
        .await;

    for (step, &rate) in args.rates.iter().enumerate() {
        let outcome = StepOutcome::measure(
            target,
            &steps,
            (step, rate),
            &members,
            args.pacing.drain_timeout,
            publish_step(args, &senders, step, rate),
        )
        .await;
        // A publish has a fixed cost (parse, authorise, one broker message)
        // that a small room shares among only `--members` deliveries.
        let per_publish = round3(outcome.server_s() * 1e6 / outcome.ok.max(1) as f64);
        let section = outcome.section().put("server_us_per_publish", per_publish);
        outcome.push(&mut report, section);
    }

    let clients = senders.into_iter().flatten().filter_map(Arc::into_inner);
    delivery::close_all(clients, args.concurrency).await;
    Ok(report)
}

/// Publishes at `rate` for `args.pacing.duration`: rooms in turn, each room's
/// members in turn.
async fn publish_step(
    args: &ChatArgs,
    senders: &[Vec<Arc<Client>>],
    step: usize,
    rate: f64,
) -> Published {
    let rooms = args.rooms as u64;
    delivery::paced(rate, &args.pacing, args.rooms, |i| {
        let k = (i % rooms) as usize;
        let members = &senders[k];
        let sender = members
            .get((i / rooms) as usize % members.len().max(1))
            .cloned();
        let call = async move {
            let data = json!({"s": step, "t": now_ns(), "i": i});
            publish(sender, k, data).await
        };
        (k, call)
    })
    .await
}

/// One client `publish` to room `k`, answered `ok`.
async fn publish(sender: Option<Arc<Client>>, k: usize, data: Value) -> Result<(), Errors> {
    let mut errors = Errors::default();
    let Some(client) = sender else {
        errors.add_kind("publish: room has no member", &room(k));
        return Err(errors);
    };
    match client
        .request(json!({"op": "publish", "room": room(k), "data": data}))
        .await
    {
        Ok(r) if r["op"] == "ok" => return Ok(()),
        Ok(r) => errors.add_reply("publish", &r),
        Err(e) => errors.add("publish", &e),
    }
    Err(errors)
}
