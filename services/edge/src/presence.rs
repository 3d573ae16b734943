//! This edge's side of presence. The edge owns the presence of its own
//! connections: every change is numbered and reported on the edge's presence
//! subject, a heartbeat repeats the latest number so a replica that missed a
//! report notices, and a snapshot of the whole state answers a replica that
//! asks (after a gap, or after it restarted).
//!
//! Member lists are read from the presence service (through the shared
//! presence client), asking it to include this edge's own changes up to now
//! (read-your-writes for the asking client).

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use herald_broker::coalesce::Coalescer;
use herald_broker::{BrokerError, Headers, Mark, SharedBroker, chain};
use herald_presence_client::{PresenceQuery, QueryError};
use herald_proto::v1::{RoomMembersReply, RoomMembersRequest};
use herald_wire::presence::{Change, EdgeReport, Reported};
use herald_wire::subjects;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Changes reported in one message, at most.
const MAX_BATCH: usize = 256;
/// A batch larger than this once serialized goes as two (the broker's
/// default largest message is 1 MiB; metadata makes changes large).
const MAX_REPORT_BYTES: usize = 256 * 1024;

/// How long an exiting edge waits for the broker to confirm its last reports.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(3);

/// Where member lists are read from.
pub use herald_presence_client::Source as PresenceSource;

/// A numbered change, with the trace context of the command or control
/// action that made it (when traces are exported), so the presence
/// replica's update joins that trace.
type Numbered = (u64, Change, Option<Headers>);

struct Seq {
    last: u64,
    tx: mpsc::UnboundedSender<Numbered>,
}

/// Handle used by sessions to report changes and to read member lists.
#[derive(Clone)]
pub struct Reporter {
    node: Arc<str>,
    seq: Arc<Mutex<Seq>>,
    query: PresenceQuery,
}

impl Reporter {
    /// Starts the reporting task; it runs until `shutdown`, then says goodbye.
    pub async fn start(
        node: &str,
        broker: SharedBroker,
        publisher: Coalescer,
        source: PresenceSource,
        interval: Duration,
        query_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Result<(Reporter, tokio::task::JoinHandle<()>), BrokerError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut sync_all = broker.subscribe(subjects::PRESENCE_SYNC_ALL.into()).await?;
        let mut sync_me = broker.subscribe(subjects::presence_sync_node(node)).await?;
        let reporter = Reporter {
            node: node.into(),
            seq: Arc::new(Mutex::new(Seq { last: 0, tx })),
            query: PresenceQuery::new(broker.clone(), source, query_timeout),
        };
        let mut task = ReportTask {
            node: node.to_string(),
            subject: subjects::presence_from_edge(node),
            broker,
            publisher,
            outgoing: Default::default(),
            started_ms: crate::now_ms(),
            seq: 0,
            reported: Reported::default(),
        };
        let handle = tokio::spawn(async move {
            let mut rx = rx;
            // Tell replicas this edge exists right away.
            task.send_snapshot();
            task.flush(Pace::Window).await;
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    change = rx.recv() => match change {
                        Some(first) => {
                            // Whatever queued up meanwhile goes out with it;
                            // one yield first lets sessions already running
                            // on other workers add theirs. Under load the
                            // publisher holds each report for its window, and
                            // the changes made meanwhile go in the next.
                            tokio::task::yield_now().await;
                            let mut batch = vec![first];
                            while batch.len() < MAX_BATCH {
                                match rx.try_recv() {
                                    Ok(next) => batch.push(next),
                                    Err(_) => break,
                                }
                            }
                            // A full batch means more are waiting: a backlog,
                            // which waiting for windows would only grow.
                            let pace = if batch.len() < MAX_BATCH { Pace::Window } else { Pace::Now };
                            task.apply_all(batch);
                            task.flush(pace).await;
                        }
                        None => break,
                    },
                    Some(_) = sync_all.next() => {
                        task.send_snapshot();
                        task.flush(Pace::Window).await;
                    }
                    Some(_) = sync_me.next() => {
                        task.send_snapshot();
                        task.flush(Pace::Window).await;
                    }
                    _ = tick.tick() => {
                        task.send_heartbeat();
                        task.flush(Pace::Window).await;
                    }
                    _ = shutdown.cancelled() => {
                        // Sessions report their leaves while closing; take them all, then say goodbye.
                        let mark = task.broker.mark();
                        let mut rest = Vec::new();
                        while let Ok(next) = rx.try_recv() {
                            rest.push(next);
                        }
                        task.apply_all(rest);
                        task.send(&EdgeReport::Goodbye { node: task.node.clone(), seq: task.seq }, None);
                        task.flush(Pace::Now).await;
                        task.confirm_sent(mark).await;
                        break;
                    }
                }
            }
        });
        Ok((reporter, handle))
    }

    /// Reports a change; returns its number.
    pub fn report(&self, change: Change) -> u64 {
        let trace = herald_broker::trace_headers(&tracing::Span::current());
        let mut s = self.seq.lock().expect("presence seq");
        s.last += 1;
        // Numbered and queued under one lock, so numbers go out in order.
        let _ = s.tx.send((s.last, change, trace));
        s.last
    }

    fn last_seq(&self) -> u64 {
        self.seq.lock().expect("presence seq").last
    }

    /// The room's members cluster-wide, including every change this edge
    /// reported before the call.
    pub async fn room_members(&self, room: &str) -> Result<RoomMembersReply, QueryError> {
        let req = RoomMembersRequest {
            room: room.to_string(),
            after_node: self.node.to_string(),
            after_seq: self.last_seq(),
        };
        self.query.room_members(req).await
    }
}

/// Owns the reported state, so a snapshot is exactly the state as of its number.
struct ReportTask {
    node: String,
    subject: String,
    broker: SharedBroker,
    /// Reports go out with the edge's presence events, in one write under load.
    publisher: Coalescer,
    /// Reports made since the last [`ReportTask::flush`], in order.
    outgoing: Vec<(Bytes, Option<Headers>)>,
    started_ms: u64,
    seq: u64,
    reported: Reported,
}

impl ReportTask {
    /// Applies numbered changes in order and reports them: runs of changes
    /// without a trace context as one [`EdgeReport::Deltas`], a traced
    /// change alone with its context (the replica's update joins that
    /// trace).
    fn apply_all(&mut self, batch: Vec<Numbered>) {
        let mut run: Vec<Change> = Vec::new();
        for (seq, change, trace) in batch {
            if trace.is_some() {
                let last = self.seq;
                self.send_run(std::mem::take(&mut run), last);
                self.apply(seq, change, trace);
            } else {
                self.reported.apply(&change);
                self.seq = seq;
                run.push(change);
            }
        }
        self.send_run(run, self.seq);
    }

    /// Reports a run of changes already applied, the last numbered
    /// `last`: one message, or two halves of a run too large for one.
    fn send_run(&mut self, mut run: Vec<Change>, last: u64) {
        let report = match run.len() {
            0 => return,
            1 => EdgeReport::Delta {
                node: self.node.clone(),
                seq: last,
                change: run.pop().expect("one change"),
            },
            _ => EdgeReport::Deltas {
                node: self.node.clone(),
                seq: last,
                changes: run,
            },
        };
        let payload = serde_json::to_vec(&report).expect("reports serialize");
        if payload.len() > MAX_REPORT_BYTES
            && let EdgeReport::Deltas { mut changes, .. } = report
        {
            let tail = changes.split_off(changes.len() / 2);
            let head_last = last - tail.len() as u64;
            self.send_run(changes, head_last);
            self.send_run(tail, last);
            return;
        }
        self.send_payload(payload, None);
    }

    fn apply(&mut self, seq: u64, change: Change, trace: Option<Headers>) {
        self.reported.apply(&change);
        self.seq = seq;
        let report = EdgeReport::Delta {
            node: self.node.clone(),
            seq,
            change,
        };
        self.send(&report, trace);
    }

    fn send_heartbeat(&mut self) {
        let report = EdgeReport::Heartbeat {
            node: self.node.clone(),
            seq: self.seq,
            started_ms: self.started_ms,
            conns: self.reported.len() as u64,
        };
        self.send(&report, None);
    }

    fn send_snapshot(&mut self) {
        let conns = self.reported.snapshot();
        let report = EdgeReport::Snapshot {
            node: self.node.clone(),
            seq: self.seq,
            started_ms: self.started_ms,
            conns,
        };
        self.send(&report, None);
    }

    /// Waits until NATS has every report sent so far: the process is about
    /// to exit, and reports left in the client's buffer would be lost (the
    /// presence service would then keep this edge's users online until it
    /// reaps the silent edge, instead of one grace period).
    async fn confirm_sent(&self, since: Mark) {
        match tokio::time::timeout(CONFIRM_TIMEOUT, self.broker.confirm(since)).await {
            Ok(Ok(())) => tracing::info!(
                node = %self.node,
                reports = self.seq,
                connections_left = self.reported.len(),
                "presence reports and goodbye confirmed by the broker"
            ),
            Ok(Err(e)) => tracing::warn!(
                error = %chain(&e),
                "the broker did not confirm the last presence reports; replicas will reap this edge after their edge timeout"
            ),
            Err(_) => tracing::warn!(
                "the broker did not confirm the last presence reports within {CONFIRM_TIMEOUT:?}; replicas will reap this edge after their edge timeout"
            ),
        }
    }

    fn send(&mut self, report: &EdgeReport, trace: Option<Headers>) {
        let payload = serde_json::to_vec(report).expect("reports serialize");
        self.send_payload(payload, trace);
    }

    fn send_payload(&mut self, payload: Vec<u8>, trace: Option<Headers>) {
        self.outgoing.push((Bytes::from(payload), trace));
    }

    /// Hands the reports made since the last flush to the broker, in order.
    /// All but the last go at once (back to back, so the client writes them
    /// together). The last waits for the edge's presence window when `pace`
    /// allows, and returns once it is with the client: the changes made
    /// meanwhile go in the next report, so that under load an edge sends
    /// about one report a window.
    async fn flush(&mut self, pace: Pace) {
        let outgoing = std::mem::take(&mut self.outgoing);
        let count = outgoing.len();
        for (i, (payload, trace)) in outgoing.into_iter().enumerate() {
            let subject = self.subject.clone();
            let sent = if i + 1 == count && pace == Pace::Window {
                self.publisher.publish_lazy(subject, trace, payload).await
            } else {
                self.broker
                    .publish_maybe_headers(subject, trace, payload)
                    .await
            };
            if let Err(e) = sent {
                // Replicas notice the gap from the next heartbeat and ask for a snapshot.
                tracing::warn!(error = %chain(&e), "could not report presence; replicas will resync");
            }
        }
    }
}

/// Whether the last report of a flush may wait for the presence window.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pace {
    Window,
    Now,
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_broker::MemoryBroker;

    /// The next report that is not a heartbeat (the first tick of the
    /// heartbeat interval comes at once).
    async fn next_report(sub: &mut herald_broker::Subscription) -> EdgeReport {
        loop {
            let msg = sub.next().await.expect("the reports go on");
            let report = serde_json::from_slice(&msg.payload).expect("a report");
            if !matches!(report, EdgeReport::Heartbeat { .. }) {
                return report;
            }
        }
    }

    /// Changes made faster than reports go out share messages, numbered so
    /// that a replica applies exactly the same deltas in the same order.
    #[tokio::test]
    async fn a_burst_of_changes_goes_out_in_few_reports_numbered_in_order() {
        let broker: SharedBroker = Arc::new(MemoryBroker::new());
        let mut reports = broker
            .subscribe(subjects::presence_from_edge("e1"))
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let (reporter, _task) = Reporter::start(
            "e1",
            broker.clone(),
            Coalescer::start(broker.clone(), Duration::ZERO),
            PresenceSource::Broker,
            Duration::from_secs(3600),
            Duration::from_secs(1),
            shutdown.clone(),
        )
        .await
        .unwrap();
        assert!(matches!(
            next_report(&mut reports).await,
            EdgeReport::Snapshot { seq: 0, .. }
        ));

        const N: u64 = 600;
        for i in 1..=N {
            reporter.report(Change::Connect {
                conn: format!("e1-{i}"),
                user: "ann".into(),
                since_ms: 1,
            });
        }
        let mut seen = Vec::new();
        let mut messages = 0;
        while (seen.len() as u64) < N {
            messages += 1;
            match next_report(&mut reports).await {
                EdgeReport::Delta { seq, change, .. } => seen.push((seq, change)),
                EdgeReport::Deltas { seq, changes, .. } => {
                    let first = seq + 1 - changes.len() as u64;
                    seen.extend((first..).zip(changes));
                }
                other => panic!("unexpected report {other:?}"),
            }
        }
        let expected: Vec<(u64, Change)> = (1..=N)
            .map(|i| {
                let change = Change::Connect {
                    conn: format!("e1-{i}"),
                    user: "ann".into(),
                    since_ms: 1,
                };
                (i, change)
            })
            .collect();
        assert_eq!(seen, expected);
        assert_eq!(
            messages,
            N.div_ceil(MAX_BATCH as u64),
            "{N} changes queued at once"
        );

        // The goodbye after them carries the last number.
        shutdown.cancel();
        assert!(matches!(
            next_report(&mut reports).await,
            EdgeReport::Goodbye { seq: N, .. }
        ));
    }

    fn connect(i: u64) -> Change {
        Change::Connect {
            conn: format!("e1-{i}"),
            user: "ann".into(),
            since_ms: 1,
        }
    }

    /// With a window, reports wait for it: a lone change's report goes a
    /// window later, and changes made while it waits go in the next one, at
    /// most one report a window; a backlog goes at once.
    #[tokio::test(start_paused = true)]
    async fn reports_go_at_most_once_a_window_with_every_change_made_meanwhile() {
        const WINDOW: Duration = Duration::from_millis(50);
        let broker: SharedBroker = Arc::new(MemoryBroker::new());
        let mut reports = broker
            .subscribe(subjects::presence_from_edge("e1"))
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let (reporter, _task) = Reporter::start(
            "e1",
            broker.clone(),
            Coalescer::start(broker.clone(), WINDOW),
            PresenceSource::Broker,
            Duration::from_secs(3600),
            Duration::from_secs(1),
            shutdown.clone(),
        )
        .await
        .unwrap();
        assert!(matches!(
            next_report(&mut reports).await,
            EdgeReport::Snapshot { seq: 0, .. }
        ));
        tokio::time::sleep(WINDOW * 2).await;

        let start = tokio::time::Instant::now();
        reporter.report(connect(1));
        // While its report waits for the window, two more changes come.
        tokio::time::sleep(WINDOW / 2).await;
        reporter.report(connect(2));
        reporter.report(connect(3));
        match next_report(&mut reports).await {
            EdgeReport::Delta { seq: 1, change, .. } => assert_eq!(change, connect(1)),
            other => panic!("unexpected report {other:?}"),
        }
        assert_eq!(start.elapsed(), WINDOW, "a lone change waits one window");
        match next_report(&mut reports).await {
            EdgeReport::Deltas {
                seq: 3, changes, ..
            } => {
                assert_eq!(changes, vec![connect(2), connect(3)])
            }
            other => panic!("unexpected report {other:?}"),
        }
        assert_eq!(
            start.elapsed(),
            WINDOW * 2,
            "the next report a window after"
        );

        // A backlog of full reports goes out without a window between them.
        tokio::time::sleep(WINDOW * 2).await;
        let start = tokio::time::Instant::now();
        const N: u64 = 600;
        for i in 4..4 + N {
            reporter.report(connect(i));
        }
        let mut got = 0;
        while got < N {
            match next_report(&mut reports).await {
                EdgeReport::Deltas { changes, .. } => got += changes.len() as u64,
                other => panic!("unexpected report {other:?}"),
            }
        }
        assert_eq!(got, N);
        assert!(
            start.elapsed() <= WINDOW,
            "{N} changes took {:?}, more than one window",
            start.elapsed()
        );
        shutdown.cancel();
    }
}
