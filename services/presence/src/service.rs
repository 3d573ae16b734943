//! The presence service at run time: one task (the actor) owns the [`View`],
//! reads every edge's reports and the other replicas' heartbeats, answers
//! queries sent to it over a channel, parks read-your-writes queries until
//! the view has caught up, ends grace periods on time, hands events to
//! watchers, and, while it leads, publishes the cluster-wide events. Because
//! only the actor touches the view there are no locks; [`Presence`] is the
//! cheap handle every caller (broker queries, gRPC) talks to it through.
//!
//! Everything the actor publishes goes through one queue to one publishing
//! task, so a slow broker never stalls the view and messages leave in the
//! order the view produced them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use herald_broker::feed::Event;
use herald_broker::{BrokerError, Headers, Message, SharedBroker, Subscription, chain};
use herald_proto::v1::{
    PresenceEvent, RoomMembersReply, RoomMembersRequest, UserStatus, UserStatusReply,
    UserStatusRequest,
};
use herald_wire::RoomName;
use herald_wire::frames::{self, PresenceEvent as RoomEventKind};
use herald_wire::presence::{EdgeReport, UserEvent, UserTransition};
use herald_wire::subjects;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prost::Message as _;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Config;
use crate::cluster::{Election, Published, Recent, ReplicaHeartbeat, Role};
use crate::view::{Effect, RoomEvent, UserChange, View};
use crate::watch::{Watch, WatchError, Watchers};

/// Commands waiting for the actor; senders wait when it is full.
const COMMAND_QUEUE: usize = 1024;
/// Read-your-writes queries waiting for the view at once; beyond this a query
/// is answered at once with what the view has.
const MAX_PARKED: usize = 10_000;
/// Broker queries being answered at once; beyond this the query loop stops
/// reading, and the broker holds (or, for a slow consumer, drops) the rest.
const MAX_QUERIES_IN_FLIGHT: usize = 4096;
/// Messages waiting for the publishing task; beyond this new ones are dropped
/// (and counted), so a stalled broker cannot grow the replica's memory.
const PUBLISH_QUEUE: usize = 65_536;
/// The longest pause between two rounds of periodic work (reaping silent
/// edges, repeating sync requests): an edge is reaped at most this late.
const MAX_TICK: Duration = Duration::from_millis(250);

/// A started presence service: a handle to its actor. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::sync::Arc;
/// use herald_presence::{Config, Presence, UserStatusRequest};
/// use tokio_util::sync::CancellationToken;
///
/// let broker = Arc::new(herald_broker::MemoryBroker::new());
/// let shutdown = CancellationToken::new();
/// let presence = Presence::start(Config::default(), broker, shutdown.clone()).await.unwrap();
/// let status = presence
///     .user_status(UserStatusRequest { users: vec!["ada".into()] })
///     .await;
/// assert!(!status.users[0].online);
/// shutdown.cancel();
/// # }
/// ```
#[derive(Clone)]
pub struct Presence {
    commands: mpsc::Sender<Command>,
    metrics: ViewMetrics,
    replica_id: Arc<str>,
}

enum Command {
    RoomMembers {
        req: RoomMembersRequest,
        reply: oneshot::Sender<RoomMembersReply>,
    },
    UserStatus {
        req: UserStatusRequest,
        reply: oneshot::Sender<UserStatusReply>,
    },
    Reap {
        node: String,
        reply: oneshot::Sender<usize>,
    },
    Watch {
        rooms: Vec<String>,
        users: Vec<String>,
        reply: oneshot::Sender<Result<Watch, WatchError>>,
    },
}

/// The actor has stopped (shutdown).
#[derive(Debug)]
pub(crate) struct Stopped;

impl Presence {
    /// Subscribes to the edges' reports and the other replicas' heartbeats,
    /// asks every edge for a snapshot (so a restarted replica rebuilds its
    /// view within seconds), and starts answering queries on the broker. Runs
    /// until `shutdown` is cancelled.
    pub async fn start(
        config: Config,
        broker: SharedBroker,
        shutdown: CancellationToken,
    ) -> Result<Presence, BrokerError> {
        // Subscribe before asking, so no snapshot is missed.
        let reports = broker
            .subscribe(subjects::PRESENCE_FROM_EDGES.to_string())
            .await?;
        let replicas = broker
            .subscribe(subjects::PRESENCE_REPLICAS.to_string())
            .await?;
        broker
            .publish(subjects::PRESENCE_SYNC_ALL.to_string(), Bytes::new())
            .await?;
        let now = Instant::now();
        let mut view = View::new(&config, now);
        view.asked_all(now);
        let group = subjects::PRESENCE_QUEUE.to_string();
        let room_queries = broker
            .queue_subscribe(
                subjects::PRESENCE_QUERY_ROOM_MEMBERS.to_string(),
                group.clone(),
            )
            .await?;
        let user_queries = broker
            .queue_subscribe(subjects::PRESENCE_QUERY_USER_STATUS.to_string(), group)
            .await?;

        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let presence = Presence {
            commands: tx,
            metrics: ViewMetrics::default(),
            replica_id: config.replica_id.as_str().into(),
        };
        let (publish, outgoing) = mpsc::channel(PUBLISH_QUEUE);
        let feed = config
            .feed
            .clone()
            .map(|f| (crate::feed::start(f.feed.clone()), f));
        let user_feed = feed
            .as_ref()
            .filter(|(_, f)| f.users)
            .map(|(tx, _)| tx.clone());
        tokio::spawn(publish_in_order(broker.clone(), outgoing, user_feed));
        let actor = Actor {
            view,
            parked: Parked::default(),
            publish,
            metrics: presence.metrics.clone(),
            watchers: Watchers::default(),
            election: Election::new(config.replica_id.clone(), config.replica_timeout),
            recent: Recent::default(),
            heartbeat: ReplicaHeartbeat {
                replica_id: config.replica_id.clone(),
                started_ms: now_ms(),
                warm: false,
                leaving: false,
            },
            config: config.clone(),
            hearing: true,
            broker: broker.clone(),
            feed_leaves: feed
                .filter(|(_, f)| !f.rooms.is_empty())
                .map(|(tx, f)| (tx, f.rooms)),
        };
        let tick = config
            .sync_retry
            .min(config.edge_timeout / 4)
            .min(MAX_TICK)
            .max(Duration::from_millis(10));
        tracing::info!(
            replica = %config.replica_id,
            broker = %broker.describe(),
            "presence view started; asked every edge for a snapshot"
        );
        tokio::spawn(actor.run(reports, replicas, rx, tick, shutdown.clone()));
        tokio::spawn(serve_queries(
            futures::stream::select(room_queries, user_queries),
            presence.clone(),
            broker,
            shutdown,
        ));
        Ok(presence)
    }

    /// This replica's id among the presence replicas.
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// Whether this replica leads (publishes the cluster-wide events).
    pub fn is_leader(&self) -> bool {
        self.metrics.leader.get() == 1
    }

    /// The members of a room, grouped by user. With `after_node`/`after_seq`
    /// the answer waits (up to `query_wait`) until the view has applied that
    /// report. Empty once the service has stopped.
    pub async fn room_members(&self, req: RoomMembersRequest) -> RoomMembersReply {
        let room = req.room.clone();
        self.try_room_members(req)
            .await
            .unwrap_or_else(|Stopped| RoomMembersReply {
                room,
                members: Vec::new(),
            })
    }

    /// Whether each user is online, with its connections (none while it is
    /// within its grace period). Everyone offline once the service has
    /// stopped.
    pub async fn user_status(&self, req: UserStatusRequest) -> UserStatusReply {
        let users = req.users.clone();
        self.try_user_status(req)
            .await
            .unwrap_or_else(|Stopped| UserStatusReply {
                users: users
                    .into_iter()
                    .map(|user| UserStatus {
                        user,
                        online: false,
                        conns: Vec::new(),
                    })
                    .collect(),
            })
    }

    /// Removes an edge and its connections at once, as if it had timed out:
    /// for an edge known to be gone (the Kubernetes pod watch saw its pod
    /// deleted or failed). Its connections leave their rooms (announced by
    /// the leader), and their users go offline after the grace period unless
    /// connected elsewhere. Returns how many connections it held (0 for an
    /// unknown edge, or once the service has stopped). Should the edge still
    /// be alive, its next report makes the view ask it for a snapshot again.
    pub async fn reap_node(&self, node: &str) -> usize {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Reap {
            node: node.to_string(),
            reply,
        };
        if self.send(cmd).await.is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// The presence events of `rooms` (join, leave, update) and of `users`
    /// (online, offline) from now on, in the order this replica applies them.
    pub async fn watch(&self, rooms: Vec<String>, users: Vec<String>) -> Result<Watch, WatchError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Watch {
            rooms,
            users,
            reply,
        })
        .await
        .map_err(|Stopped| WatchError::Stopped)?;
        rx.await.unwrap_or(Err(WatchError::Stopped))
    }

    pub(crate) async fn try_room_members(
        &self,
        req: RoomMembersRequest,
    ) -> Result<RoomMembersReply, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::RoomMembers { req, reply }).await?;
        rx.await.map_err(|_| Stopped)
    }

    pub(crate) async fn try_user_status(
        &self,
        req: UserStatusRequest,
    ) -> Result<UserStatusReply, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::UserStatus { req, reply }).await?;
        rx.await.map_err(|_| Stopped)
    }

    async fn send(&self, cmd: Command) -> Result<(), Stopped> {
        self.commands.send(cmd).await.map_err(|_| Stopped)
    }

    /// Whether the actor still runs (readiness).
    pub fn is_running(&self) -> bool {
        !self.commands.is_closed()
    }

    /// Registers the view's metrics (`herald_presence_*`) in `metrics`.
    pub fn register_metrics(&self, metrics: &herald_ops::Metrics) {
        let m = &self.metrics;
        let mut registry = metrics.lock().expect("metrics registry");
        registry.register(
            "presence_nodes",
            "Edges the presence view tracks",
            m.nodes.clone(),
        );
        registry.register(
            "presence_connections",
            "Connections in the presence view",
            m.conns.clone(),
        );
        registry.register(
            "presence_users",
            "Users online: with a connection, or within their grace period",
            m.users.clone(),
        );
        registry.register(
            "presence_rooms",
            "Rooms with at least one member",
            m.rooms.clone(),
        );
        registry.register(
            "presence_parked_queries",
            "Read-your-writes queries waiting for the view to catch up",
            m.parked.clone(),
        );
        registry.register(
            "presence_sync_requests",
            "Snapshots asked of edges after missed reports",
            m.sync_requests.clone(),
        );
        registry.register(
            "presence_online_events",
            "User online transitions this replica computed",
            m.online.clone(),
        );
        registry.register(
            "presence_offline_events",
            "User offline transitions this replica computed",
            m.offline.clone(),
        );
        registry.register(
            "presence_leader",
            "1 while this replica leads (publishes cluster-wide presence events)",
            m.leader.clone(),
        );
        registry.register(
            "presence_watchers",
            "Presence.Watch streams open on this replica",
            m.watchers.clone(),
        );
        registry.register(
            "presence_publish_dropped",
            "Messages dropped because the publishing queue was full",
            m.publish_dropped.clone(),
        );
    }
}

#[derive(Clone, Default)]
struct ViewMetrics {
    nodes: Gauge,
    conns: Gauge,
    users: Gauge,
    rooms: Gauge,
    parked: Gauge,
    sync_requests: Counter,
    online: Counter,
    offline: Counter,
    leader: Gauge,
    watchers: Gauge,
    publish_dropped: Counter,
}

/// The task that owns the view.
struct Actor {
    view: View,
    parked: Parked,
    /// Messages for [`publish_in_order`].
    publish: mpsc::Sender<Outgoing>,
    metrics: ViewMetrics,
    watchers: Watchers,
    election: Election,
    /// User events computed lately, for re-publishing when taking over.
    recent: Recent,
    heartbeat: ReplicaHeartbeat,
    config: Config,
    /// Whether the broker connection is up, and so whether the replica can
    /// hear the edges; it was down at the last tick when `false`.
    hearing: bool,
    broker: SharedBroker,
    /// The feed's queue, and the namespaces whose leaves go to it.
    feed_leaves: Option<(mpsc::Sender<Event>, Arc<HashSet<String>>)>,
}

impl Actor {
    async fn run(
        mut self,
        mut reports: Subscription,
        mut replicas: Subscription,
        mut commands: mpsc::Receiver<Command>,
        tick_every: Duration,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval(self.config.replica_heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let warm_at = self.view.warm_until();
        let mut warming = true;
        loop {
            let parked = self.parked.next_deadline();
            let grace = self.view.next_deadline();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                msg = reports.next() => match msg {
                    Some(msg) => self.on_report(msg),
                    None => {
                        tracing::error!("the broker closed the presence report subscription; the presence view stops");
                        break;
                    }
                },
                Some(msg) = replicas.next() => self.on_replica(msg),
                Some(cmd) = commands.recv() => self.on_command(cmd),
                _ = sleep_until(grace) => {
                    let fx = self.view.expire(Instant::now());
                    self.carry_out_in_span("presence.expire", fx);
                    self.update_metrics();
                }
                _ = tick.tick() => self.on_tick(),
                _ = heartbeat.tick() => self.on_heartbeat(),
                _ = tokio::time::sleep_until(warm_at), if warming => {
                    warming = false;
                    tracing::info!(replica = %self.heartbeat.replica_id, "presence warm-up over; this replica may lead");
                    self.on_heartbeat();
                }
                _ = sleep_until(parked) => self.on_deadline(),
            }
        }
        // Let the others take over at once rather than after the timeout.
        self.heartbeat.leaving = true;
        self.send_heartbeat();
        self.metrics.leader.set(0);
        tracing::info!(replica = %self.heartbeat.replica_id, "presence view stopped");
    }

    fn on_report(&mut self, msg: Message) {
        let report: EdgeReport = match serde_json::from_slice(&msg.payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %chain(&e), "ignoring an unreadable presence report");
                return;
            }
        };
        let node = report.node().to_string();
        let span = update_span(&report, msg.headers.as_ref());
        let _entered = span.enter();
        let fx = self.view.apply(report, Instant::now());
        span.record("effects", fx.len());
        self.carry_out(fx);
        self.release(&node);
        self.update_metrics();
    }

    fn on_replica(&mut self, msg: Message) {
        match serde_json::from_slice::<ReplicaHeartbeat>(&msg.payload) {
            Ok(hb) => {
                let now = Instant::now();
                self.election.heard(hb, now);
                self.decide(now);
            }
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %chain(&e), "ignoring an unreadable replica heartbeat");
            }
        }
    }

    /// Announces this replica and re-evaluates who leads.
    fn on_heartbeat(&mut self) {
        let now = Instant::now();
        self.heartbeat.warm = self.view.is_warm(now);
        self.send_heartbeat();
        self.decide(now);
    }

    fn send_heartbeat(&mut self) {
        let payload = serde_json::to_vec(&self.heartbeat).expect("heartbeats serialize");
        self.publish(subjects::PRESENCE_REPLICAS.to_string(), payload.into());
    }

    fn decide(&mut self, now: Instant) {
        let warm = self.view.is_warm(now);
        match self.election.decide(warm, now) {
            Some(Role::Lead { since }) => {
                let again: Vec<Published> = self.recent.since(since).cloned().collect();
                tracing::info!(
                    replica = %self.heartbeat.replica_id,
                    republished = again.len(),
                    "this presence replica leads now; re-publishing the user events since the previous leader was last heard"
                );
                for p in again {
                    self.publish(p.subject, p.payload);
                }
                self.metrics.leader.set(1);
            }
            Some(Role::Follow) => {
                tracing::info!(replica = %self.heartbeat.replica_id, "another presence replica leads now");
                self.metrics.leader.set(0);
            }
            None => {}
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::RoomMembers { req, reply } => {
                let caught_up = req.after_node.is_empty()
                    || req.after_seq == 0
                    || self.view.has_applied(&req.after_node, req.after_seq);
                if caught_up || self.parked.len >= MAX_PARKED {
                    let _ = reply.send(self.view.room_members(&req.room));
                } else {
                    let deadline = Instant::now() + self.config.query_wait;
                    let waiting = Waiting {
                        room: req.room,
                        reply,
                    };
                    self.parked
                        .park(req.after_node, req.after_seq, waiting, deadline);
                    self.metrics.parked.set(self.parked.len as i64);
                }
            }
            Command::UserStatus { req, reply } => {
                let _ = reply.send(self.view.user_status(&req.users));
            }
            Command::Reap { node, reply } => {
                let (fx, conns) = self.view.reap(&node, Instant::now());
                tracing::info!(%node, conns, "an edge's pod is gone; removed it and its connections");
                self.carry_out_in_span("presence.reap", fx);
                self.release(&node);
                self.update_metrics();
                let _ = reply.send(conns);
            }
            Command::Watch {
                rooms,
                users,
                reply,
            } => {
                let watch = self.watchers.add(rooms, users, self.config.watch_queue);
                self.metrics.watchers.set(self.watchers.len() as i64);
                let _ = reply.send(watch);
            }
        }
    }

    fn on_tick(&mut self) {
        // A replica cut off from the broker hears no edge: their silence
        // says nothing, so the view is frozen (no edge reaped, no grace
        // ended, no event) until it hears them again.
        let hearing = self.broker.is_connected();
        if !hearing {
            if self.hearing {
                tracing::warn!(
                    replica = %self.config.replica_id,
                    "lost the broker; the presence view is frozen until it is back (no edge is reaped, no event is sent)"
                );
            }
            self.hearing = false;
            return;
        }
        if !self.hearing {
            self.hearing = true;
            let fx = self.view.heard_again(Instant::now());
            tracing::info!(
                replica = %self.config.replica_id,
                edges = fx.len(),
                "the broker is back; asked every edge for a snapshot, and only what really changed becomes an event"
            );
            self.carry_out(fx);
        }
        let (fx, reaped) = self.view.tick(Instant::now());
        for (node, conns) in &reaped {
            tracing::info!(%node, conns, "an edge sent no presence report in time; removed it and its connections");
        }
        self.carry_out_in_span("presence.reap", fx);
        for (node, _) in reaped {
            self.release(&node);
        }
        self.watchers.sweep();
        self.metrics.watchers.set(self.watchers.len() as i64);
        self.update_metrics();
        // A silent leader times out here, not only at the next heartbeat.
        self.decide(Instant::now());
    }

    /// Answers the parked queries whose wait is over, with what the view has.
    fn on_deadline(&mut self) {
        for w in self.parked.expired(Instant::now()) {
            let _ = w.reply.send(self.view.room_members(&w.room));
        }
        self.metrics.parked.set(self.parked.len as i64);
    }

    /// Answers the queries parked on `node` that the view has caught up with
    /// (all of them when the node is gone: nothing more will come).
    fn release(&mut self, node: &str) {
        if self.parked.len == 0 {
            return;
        }
        for w in self.parked.ready(node, self.view.applied_seq(node)) {
            let _ = w.reply.send(self.view.room_members(&w.room));
        }
        self.metrics.parked.set(self.parked.len as i64);
    }

    /// Carries out effects nobody's request caused (a grace period ended, an
    /// edge was reaped) in a trace of their own, when there are any: the
    /// leaves they announce then reach the edges' fan-out spans.
    fn carry_out_in_span(&mut self, name: &'static str, fx: Vec<Effect>) {
        if fx.is_empty() {
            return;
        }
        let span = tracing::info_span!(
            target: herald_telemetry::TARGET,
            "presence.view",
            otel.name = name,
            effects = fx.len(),
        );
        span.in_scope(|| self.carry_out(fx));
    }

    fn carry_out(&mut self, fx: Vec<Effect>) {
        for effect in fx {
            match effect {
                Effect::AskSync { node } => {
                    self.metrics.sync_requests.inc();
                    tracing::debug!(%node, "missed presence reports; asking the edge for a snapshot");
                    self.publish(subjects::presence_sync_node(&node), Bytes::new());
                }
                Effect::Room(ev) => self.on_room_event(ev),
                Effect::User(ch) => self.on_user_change(ch),
            }
        }
    }

    fn on_room_event(&mut self, ev: RoomEvent) {
        // Edges announce their live connections' changes to the room
        // themselves; a leave the view inferred nobody has announced.
        if ev.event == RoomEventKind::Leave && !ev.announced && self.election.is_leading() {
            match RoomName::parse(&ev.room) {
                Ok(room) => {
                    let frame = frames::presence_frame(
                        &ev.room,
                        RoomEventKind::Leave,
                        &ev.user,
                        &ev.conn,
                        None,
                    );
                    self.publish(subjects::room(&room), frame);
                    if let Some((feed, namespaces)) = &self.feed_leaves
                        && namespaces.contains(room.namespace())
                    {
                        let event = crate::feed::inferred_leave(
                            &ev.room,
                            (&ev.user, &ev.conn, &ev.node),
                            now_ms(),
                        );
                        if feed.try_send(event).is_err() {
                            tracing::warn!(room = %ev.room, "the feed's queue is full; a leave is not appended");
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(room = %ev.room, error = %chain(&e), "not announcing a leave in a room with an invalid name");
                }
            }
        }
        let proto = Arc::new(PresenceEvent {
            event: ev.event.as_str().to_string(),
            meta: ev.meta.as_ref().map(|m| m.to_string()).unwrap_or_default(),
            room: ev.room,
            user: ev.user,
            conn: ev.conn,
            node: ev.node,
            ts_ms: now_ms(),
        });
        self.watchers.room_event(&proto.room, &proto);
    }

    fn on_user_change(&mut self, ch: UserChange) {
        let ts_ms = now_ms();
        let event = match ch.event {
            UserTransition::Online => {
                self.metrics.online.inc();
                "online"
            }
            UserTransition::Offline => {
                self.metrics.offline.inc();
                "offline"
            }
        };
        tracing::debug!(user = %ch.user, conn = %ch.conn, "user {event}");
        let wire = UserEvent {
            id: ch.id(),
            user: ch.user.clone(),
            event: ch.event,
            ts_ms,
        };
        let published = Published {
            at: Instant::now(),
            subject: subjects::presence_user_event(&ch.user),
            payload: serde_json::to_vec(&wire)
                .expect("user events serialize")
                .into(),
        };
        if self.election.is_leading() {
            self.publish(published.subject.clone(), published.payload.clone());
        }
        self.recent.push(published);
        let proto = Arc::new(PresenceEvent {
            event: event.to_string(),
            room: String::new(),
            user: ch.user,
            conn: ch.conn,
            node: ch.node,
            meta: String::new(),
            ts_ms,
        });
        self.watchers.user_event(&proto.user, &proto);
    }

    /// Queues a message for the publishing task, in the current span's
    /// trace; drops it when the queue is full (the broker has been stalled
    /// for a long while).
    fn publish(&self, subject: String, payload: Bytes) {
        let trace = herald_broker::trace_headers(&tracing::Span::current());
        if let Err(e) = self.publish.try_send((subject, payload, trace)) {
            self.metrics.publish_dropped.inc();
            if let mpsc::error::TrySendError::Full((subject, _, _)) = e {
                tracing::warn!(%subject, "the presence publishing queue is full; message dropped");
            }
        }
    }

    fn update_metrics(&self) {
        let s = self.view.stats();
        let m = &self.metrics;
        m.nodes.set(s.nodes as i64);
        m.conns.set(s.conns as i64);
        m.users.set(s.users as i64);
        m.rooms.set(s.rooms as i64);
    }
}

/// Publishes the actor's messages one after another, in order; ends when the
/// actor has stopped and everything queued went out.
/// User transitions also go to `feed`, when there is one (`[feed] users`).
async fn publish_in_order(
    broker: SharedBroker,
    mut outgoing: mpsc::Receiver<Outgoing>,
    feed: Option<mpsc::Sender<Event>>,
) {
    while let Some((subject, payload, trace)) = outgoing.recv().await {
        if let Some(feed) = &feed
            && subject.starts_with(USER_EVENTS)
            && let Some(event) = crate::feed::event(&payload)
            && feed.try_send(event).is_err()
        {
            tracing::warn!(%subject, "the feed's queue is full; a user transition is not appended");
        }
        if let Err(e) = broker
            .publish_maybe_headers(subject.clone(), trace, payload)
            .await
        {
            tracing::warn!(%subject, error = %chain(&e), "presence could not publish");
        }
    }
}

/// The subjects of user transitions start so.
const USER_EVENTS: &str = "herald.presence.user.";

/// A message for [`publish_in_order`], with the trace it belongs to.
type Outgoing = (String, Bytes, Option<Headers>);

/// The exported span of applying an edge's report to the view, child of
/// the client command or control action that made the change (its trace
/// context comes in the report's headers). Heartbeats, which change
/// nothing most of the time, get none.
fn update_span(report: &EdgeReport, headers: Option<&Headers>) -> tracing::Span {
    if matches!(report, EdgeReport::Heartbeat { .. }) {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: herald_telemetry::TARGET,
        "presence.update",
        otel.name = %format_args!("presence.update {}", report.kind()),
        otel.kind = "consumer",
        node = %report.node(),
        seq = report.seq(),
        effects = tracing::field::Empty,
    );
    if let Some(headers) = headers {
        herald_telemetry::extract(&span, |key| headers.get(key).map(|v| v.as_str()));
    }
    span
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A room-members query waiting for the view to catch up with its edge.
struct Waiting {
    room: String,
    reply: oneshot::Sender<RoomMembersReply>,
}

/// Parked read-your-writes queries, by the node they wait for and in the
/// order their wait ends (every query waits equally long, so arrival order is
/// deadline order).
#[derive(Default)]
struct Parked {
    /// node → (after_seq, id) → query.
    by_node: HashMap<String, BTreeMap<(u64, u64), Waiting>>,
    deadlines: VecDeque<(Instant, String, (u64, u64))>,
    next_id: u64,
    len: usize,
}

impl Parked {
    fn park(&mut self, node: String, seq: u64, waiting: Waiting, deadline: Instant) {
        let key = (seq, self.next_id);
        self.next_id += 1;
        self.by_node
            .entry(node.clone())
            .or_default()
            .insert(key, waiting);
        self.deadlines.push_back((deadline, node, key));
        self.len += 1;
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|(d, _, _)| *d)
    }

    /// The queries on `node` satisfied by `applied` (all when `None`).
    fn ready(&mut self, node: &str, applied: Option<u64>) -> Vec<Waiting> {
        let Some(queue) = self.by_node.get_mut(node) else {
            return Vec::new();
        };
        let done = match applied {
            Some(seq) => {
                let later = queue.split_off(&(seq.saturating_add(1), 0));
                std::mem::replace(queue, later)
            }
            None => std::mem::take(queue),
        };
        if queue.is_empty() {
            self.by_node.remove(node);
        }
        self.len -= done.len();
        if self.len == 0 {
            self.deadlines.clear();
        }
        done.into_values().collect()
    }

    fn expired(&mut self, now: Instant) -> Vec<Waiting> {
        let mut out = Vec::new();
        while self.deadlines.front().is_some_and(|(d, _, _)| *d <= now) {
            let Some((_, node, key)) = self.deadlines.pop_front() else {
                break;
            };
            if let Some(queue) = self.by_node.get_mut(&node) {
                if let Some(w) = queue.remove(&key) {
                    out.push(w);
                    self.len -= 1;
                }
                if queue.is_empty() {
                    self.by_node.remove(&node);
                }
            }
        }
        out
    }
}

/// Answers the presence queries edges send over the broker: the request and
/// reply payloads are the gRPC messages, prost-encoded.
async fn serve_queries(
    mut queries: impl futures::Stream<Item = Message> + Unpin,
    presence: Presence,
    broker: SharedBroker,
    shutdown: CancellationToken,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_QUERIES_IN_FLIGHT));
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return,
            msg = queries.next() => match msg {
                Some(msg) => msg,
                None => {
                    tracing::error!("the broker closed the presence query subscriptions");
                    return;
                }
            },
        };
        let Some(reply_to) = msg.reply.clone() else {
            tracing::warn!(subject = %msg.subject, "ignoring a presence query without a reply subject");
            continue;
        };
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = in_flight.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let presence = presence.clone();
        let broker = broker.clone();
        let span = tracing::info_span!(
            target: herald_telemetry::TARGET,
            "presence.query",
            otel.name = %msg.subject,
            otel.kind = "server",
        );
        if let Some(headers) = &msg.headers {
            herald_telemetry::extract(&span, |key| headers.get(key).map(|v| v.as_str()));
        }
        tokio::spawn(async move {
            let _permit = permit;
            let Some(reply) = answer(&presence, &msg).instrument(span).await else {
                return;
            };
            if let Err(e) = broker.publish(reply_to, reply).await {
                tracing::warn!(subject = %msg.subject, error = %chain(&e), "could not send a presence reply");
            }
        });
    }
}

/// Decodes one broker query and answers it; `None` for unreadable requests.
async fn answer(presence: &Presence, msg: &Message) -> Option<Bytes> {
    let payload = msg.payload.clone();
    let reply = match msg.subject.as_str() {
        subjects::PRESENCE_QUERY_ROOM_MEMBERS => match RoomMembersRequest::decode(payload) {
            Ok(req) => presence.try_room_members(req).await.ok()?.encode_to_vec(),
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %chain(&e), "ignoring an unreadable presence query");
                return None;
            }
        },
        subjects::PRESENCE_QUERY_USER_STATUS => match UserStatusRequest::decode(payload) {
            Ok(req) => presence.try_user_status(req).await.ok()?.encode_to_vec(),
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %chain(&e), "ignoring an unreadable presence query");
                return None;
            }
        },
        other => {
            tracing::warn!(subject = %other, "ignoring a message on an unexpected subject");
            return None;
        }
    };
    Some(Bytes::from(reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(room: &str) -> (Waiting, oneshot::Receiver<RoomMembersReply>) {
        let (reply, rx) = oneshot::channel();
        (
            Waiting {
                room: room.into(),
                reply,
            },
            rx,
        )
    }

    #[test]
    fn parked_queries_leave_when_their_edge_catches_up_or_time_runs_out() {
        let t0 = Instant::now();
        let mut p = Parked::default();
        let (a, _ra) = waiting("chat:a");
        let (b, _rb) = waiting("chat:b");
        let (c, _rc) = waiting("chat:c");
        p.park("e1".into(), 3, a, t0 + Duration::from_secs(1));
        p.park("e1".into(), 5, b, t0 + Duration::from_secs(2));
        p.park("e2".into(), 1, c, t0 + Duration::from_secs(3));
        assert_eq!(p.len, 3);
        assert!(p.ready("e1", Some(2)).is_empty());
        let done = p.ready("e1", Some(4));
        assert_eq!(
            done.iter().map(|w| w.room.as_str()).collect::<Vec<_>>(),
            ["chat:a"]
        );
        // chat:a's deadline passes without effect; chat:b's answers it.
        assert!(p.expired(t0 + Duration::from_secs(1)).is_empty());
        let late = p.expired(t0 + Duration::from_secs(2));
        assert_eq!(
            late.iter().map(|w| w.room.as_str()).collect::<Vec<_>>(),
            ["chat:b"]
        );
        // A node that is gone releases everything parked on it.
        assert_eq!(p.ready("e2", None).len(), 1);
        assert_eq!(p.len, 0);
        assert_eq!(p.next_deadline(), None);
    }
}
