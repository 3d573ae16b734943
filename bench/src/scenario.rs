//! The scenarios as subcommands, and running one: start what it runs
//! against (Herald, the Socket.IO peer, or both one after the other), run
//! it, and emit the report.

use anyhow::Result;
use clap::Subcommand;

use crate::target::{CommonArgs, Target, TargetKind};
use crate::{chat, churn, compare, fanout, floor, idle, peer, presence_memory, report, storm};

/// What to run: the subcommands of `herald-bench`.
#[derive(Subcommand, Debug)]
pub enum Scenario {
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
    /// RSS per idle authenticated connection (after one ping each) of every
    /// server process, and what each keeps after the connections close.
    Idle {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: idle::IdleArgs,
    },
    /// The kernel's cost of one small write on this machine: a bare writer
    /// process writes a ~100-byte frame to many connections (starts no Herald).
    Floor {
        #[command(flatten)]
        args: floor::FloorCmd,
    },
    /// Router.Publish over gRPC → delivered to rooms of many members: delivered/s,
    /// loss, latency, server CPU per delivery (optionally vs the floor).
    Fanout {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: fanout::FanoutArgs,
    },
    /// Many small rooms whose members publish (client `publish` op) and receive:
    /// delivered/s, loss, latency, server CPU per delivery.
    Chat {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: chat::ChatArgs,
    },
    /// N clients on one edge (or Socket.IO server) that is killed: time until
    /// every client has reconnected elsewhere and rejoined its rooms (durable
    /// rooms recovered exactly), clients lost, server CPU per reconnect.
    ReconnectStorm {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: storm::StormArgs,
    },
    /// The writer child of `floor` (internal).
    #[command(hide = true)]
    FloorWriter {
        #[command(flatten)]
        args: floor::WriterArgs,
    },
}

/// What runs against a started target.
enum Against {
    Churn(churn::ChurnArgs),
    Idle(idle::IdleArgs),
    Fanout(fanout::FanoutArgs),
    Chat(chat::ChatArgs),
    Storm(storm::StormArgs),
}

impl Against {
    /// The Herald configuration the scenario needs (`None`: every namespace
    /// open and ephemeral).
    fn herald_config(&self) -> Option<String> {
        match self {
            Against::Storm(a) => Some(a.herald_config()),
            _ => None,
        }
    }
}

/// Runs the scenario; `Ok(false)` when the report lists failures.
pub fn run(scenario: Scenario) -> Result<bool> {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    let (common, args) = match scenario {
        Scenario::Churn { common, args } => (common, Against::Churn(args)),
        Scenario::Idle { common, args } => (common, Against::Idle(args)),
        Scenario::Fanout { common, args } => (common, Against::Fanout(args)),
        Scenario::Chat { common, args } => (common, Against::Chat(args)),
        Scenario::ReconnectStorm { common, args } => (common, Against::Storm(args)),
        Scenario::PresenceMemory { args } => return presence_memory::run(&args),
        Scenario::FloorWriter { args } => return floor::writer_main(&args).map(|()| true),
        Scenario::Floor { args } => {
            let report = runtime()?.block_on(floor::run(&args))?;
            report.emit(args.json.as_deref())?;
            return Ok(report.failures.is_empty());
        }
    };
    if let Against::Storm(a) = &args
        && a.repeat > 1
        && !common.vs_socketio
    {
        anyhow::bail!("--repeat runs rounds of the comparison with Socket.IO: add --vs-socketio");
    }
    let runtime = runtime()?;
    if common.vs_socketio {
        return run_side_by_side(&common, &args, &runtime);
    }
    let report = if common.target == TargetKind::Socketio {
        socketio_report(&common, &args, &runtime)?
    } else {
        herald_report(&common, &args, &runtime)?
    };
    report.emit(common.json.as_deref())?;
    Ok(report.failures.is_empty())
}

/// The scenario against Herald (`--target cluster` or `dev`); everything it
/// started is stopped when this returns.
fn herald_report(
    common: &CommonArgs,
    args: &Against,
    runtime: &tokio::runtime::Runtime,
) -> Result<report::Report> {
    let mut target = Target::start_with(common, args.herald_config().as_deref())?;
    let mut report = runtime.block_on(async {
        match args {
            Against::Churn(a) => churn::run(a, common, &target).await,
            Against::Idle(a) => idle::run(a, common, &target).await,
            Against::Fanout(a) => fanout::run(a, common, &target).await,
            Against::Chat(a) => chat::run(a, common, &target).await,
            Against::Storm(a) => storm::run(a, common, &mut target).await,
        }
    })?;
    finish(&mut report, &mut target);
    Ok(report)
}

fn socketio_only(args: &Against) -> Result<()> {
    match args {
        Against::Chat(_) => anyhow::bail!(
            "chat runs against Herald only (--target cluster or --target dev); \
             Socket.IO runs `idle`, `fanout`, `churn` and `reconnect-storm`"
        ),
        Against::Idle(_) | Against::Fanout(_) | Against::Churn(_) | Against::Storm(_) => Ok(()),
    }
}

/// `idle`, `fanout`, `churn` and `reconnect-storm` against the Socket.IO peer.
fn socketio_report(
    common: &CommonArgs,
    args: &Against,
    runtime: &tokio::runtime::Runtime,
) -> Result<report::Report> {
    socketio_only(args)?;
    let mut peer = peer::Peer::start(common)?;
    let mut report = runtime.block_on(async {
        match args {
            Against::Idle(a) => idle::run_socketio(a, common, &peer).await,
            Against::Fanout(a) => fanout::run_socketio(a, common, &peer).await,
            Against::Churn(a) => churn::run_socketio(a, common, &peer).await,
            Against::Storm(a) => storm::run_socketio(a, common, &mut peer).await,
            Against::Chat(_) => unreachable!("refused above"),
        }
    })?;
    finish_peer(&mut report, &mut peer);
    Ok(report)
}

/// What a report of the peer gets at the end, as [`finish`] for Herald.
fn finish_peer(report: &mut report::Report, peer: &mut peer::Peer) {
    report.failures.extend(peer.exited());
    report.notes.extend(peer.sio.log_problems());
    report.versions = peer.versions();
}

/// The Socket.IO side of `--vs-socketio`: the same options, `--target
/// socketio`.
fn socketio_common(common: &CommonArgs) -> CommonArgs {
    CommonArgs {
        target: TargetKind::Socketio,
        ..common.clone()
    }
}

/// `fanout --vs-socketio`: both systems started at once and alternated
/// round by round ([`fanout::run_alternating`] says why); everything is
/// stopped when this returns.
fn fanout_side_by_side(
    common: &CommonArgs,
    args: &fanout::FanoutArgs,
    runtime: &tokio::runtime::Runtime,
) -> Result<(report::Report, report::Report)> {
    // Fan-out rooms are open and ephemeral: no configuration.
    let mut target = Target::start_with(common, None)?;
    let sio_common = socketio_common(common);
    let mut peer = peer::Peer::start(&sio_common)?;
    let (mut herald, mut socketio) =
        runtime.block_on(fanout::run_alternating(args, common, &target, &peer))?;
    finish(&mut herald, &mut target);
    finish_peer(&mut socketio, &mut peer);
    Ok((herald, socketio))
}

/// `--vs-socketio`: Herald and Socket.IO, both tables, then the ratios.
/// `fanout` alternates the two round by round; the others run Herald, then
/// Socket.IO (one after the other, so that neither's connections weigh on
/// the other's memory figures, nor its clients on the other's churn).
fn run_side_by_side(
    common: &CommonArgs,
    args: &Against,
    runtime: &tokio::runtime::Runtime,
) -> Result<bool> {
    socketio_only(args)?;
    if common.target == TargetKind::Socketio {
        anyhow::bail!("--vs-socketio compares Herald (--target cluster or dev) with Socket.IO");
    }
    if let Against::Storm(a) = args
        && a.repeat > 1
    {
        return storm_rounds(common, args, a.repeat, runtime);
    }
    let (herald, socketio) = match args {
        Against::Fanout(a) => fanout_side_by_side(common, a, runtime)?,
        _ => (
            herald_report(common, args, runtime)?,
            socketio_report(&socketio_common(common), args, runtime)?,
        ),
    };
    let compare = compare::ratios(&herald, &socketio);
    let json = serde_json::json!({
        "scenario": herald.scenario,
        "target": compare.target,
        "failures": herald.failures.iter().map(|f| format!("herald: {f}"))
            .chain(socketio.failures.iter().map(|f| format!("socketio: {f}")))
            .collect::<Vec<_>>(),
        "herald": herald.to_json(),
        "socketio": socketio.to_json(),
        "compare": compare.to_json(),
    });
    let tables = format!("{}{}{}", herald.table(), socketio.table(), compare.table());
    report::emit(&tables, &json, common.json.as_deref())?;
    Ok(herald.failures.is_empty() && socketio.failures.is_empty())
}

/// `reconnect-storm --vs-socketio --repeat N`: N rounds of both systems,
/// each on servers of its own (a storm kills one), Herald first in odd
/// rounds and Socket.IO first in even ones; every round's three reports,
/// then the summary ([`compare::storm_rounds`]).
fn storm_rounds(
    common: &CommonArgs,
    args: &Against,
    rounds: u32,
    runtime: &tokio::runtime::Runtime,
) -> Result<bool> {
    let sio_common = socketio_common(common);
    let mut tables = String::new();
    let mut all = Vec::new();
    let mut json_rounds = Vec::new();
    let mut failures = Vec::new();
    for round in 1..=rounds {
        let herald_first = round % 2 == 1;
        let pair = if herald_first {
            herald_report(common, args, runtime)
                .and_then(|h| Ok((h, socketio_report(&sio_common, args, runtime)?)))
        } else {
            socketio_report(&sio_common, args, runtime)
                .and_then(|s| Ok((herald_report(common, args, runtime)?, s)))
        };
        // The rounds done so far are still reported.
        let (herald, socketio) = match pair {
            Ok(pair) => pair,
            Err(e) => {
                failures.push(format!("round {round} could not run: {e:#}"));
                break;
            }
        };
        let compare = compare::ratios(&herald, &socketio);
        failures.extend(
            herald
                .failures
                .iter()
                .map(|f| format!("round {round}: herald: {f}")),
        );
        failures.extend(
            socketio
                .failures
                .iter()
                .map(|f| format!("round {round}: socketio: {f}")),
        );
        tables.push_str(&format!("\n=== round {round} of {rounds} ===\n"));
        tables.push_str(&format!(
            "{}{}{}",
            herald.table(),
            socketio.table(),
            compare.table()
        ));
        json_rounds.push(serde_json::json!({
            "round": round,
            "order": if herald_first { "herald first" } else { "socketio first" },
            "herald": herald.to_json(),
            "socketio": socketio.to_json(),
            "compare": compare.to_json(),
        }));
        all.push((herald, socketio));
    }
    let summary = compare::storm_rounds(&all);
    tables.push_str(&summary.table());
    let json = serde_json::json!({
        "scenario": "reconnect-storm",
        "target": "herald vs socketio",
        "failures": failures,
        "rounds": json_rounds,
        "summary": summary.to_json(),
    });
    report::emit(&tables, &json, common.json.as_deref())?;
    Ok(failures.is_empty())
}

/// What every scenario's report gets at the end: processes that died, log
/// lines worth a look.
fn finish(report: &mut report::Report, target: &mut Target) {
    if let Some(sink) = &target.otlp_sink {
        report
            .notes
            .push(format!("the OTLP sink received {} spans", sink.spans()));
    }
    report.failures.extend(target.exited());
    report.notes.extend(target.log_problems());
    report.versions = target.versions();
    report.params.insert(
        "herald".into(),
        target.herald_bin.display().to_string().into(),
    );
}
