//! Shared by the presence integration tests: broker connections (the
//! in-memory broker or a real `nats-server`), a fake edge that reports,
//! heartbeats and answers sync requests as real edges do, and small helpers
//! for queries and for the messages presence publishes.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use herald_broker::{MemoryBroker, NatsBroker, SharedBroker, Subscription};
use herald_presence::{
    Config, RoomMembersReply, RoomMembersRequest, UserStatusReply, UserStatusRequest,
};
use herald_test_support::{NatsServer, eventually, http_get};
use herald_wire::presence::{Change, EdgeReport, Reported, UserEvent};
use herald_wire::subjects;
use prost::Message as _;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

pub const WAIT: Duration = Duration::from_secs(10);
pub const ROOM: &str = "chat:lobby";

/// Makes a new broker connection (a new NATS client, or the shared memory broker).
pub type Connect =
    Arc<dyn Fn(&str) -> Pin<Box<dyn Future<Output = SharedBroker> + Send>> + Send + Sync>;

pub fn memory() -> Connect {
    let broker = MemoryBroker::new();
    Arc::new(move |_| {
        let b: SharedBroker = Arc::new(broker.clone());
        Box::pin(async move { b })
    })
}

pub fn nats(server: &NatsServer) -> Connect {
    let url = server.url();
    Arc::new(move |name| {
        let (url, name) = (url.clone(), name.to_string());
        Box::pin(async move {
            let b: SharedBroker = Arc::new(NatsBroker::connect(&url, &name).await.unwrap());
            b
        })
    })
}

/// Settings for tests in real time: short enough to watch every timer run
/// out, long enough for a loaded machine.
pub fn config() -> Config {
    Config {
        query_wait: Duration::from_millis(300),
        ..Config::default()
    }
}

/// Like [`config`], with every presence timer short: grace, edge timeout,
/// replica heartbeats and warm-up.
pub fn fast_config(replica_id: &str) -> Config {
    Config {
        grace: Duration::from_millis(500),
        edge_timeout: Duration::from_millis(1500),
        replica_id: replica_id.into(),
        replica_heartbeat: Duration::from_millis(100),
        replica_timeout: Duration::from_millis(600),
        warmup: Duration::from_millis(500),
        ..config()
    }
}

/// An edge as the presence service sees it: numbered deltas on its own
/// subject, a snapshot whenever one is asked for, and (when started)
/// heartbeats.
pub struct FakeEdge {
    pub inner: Arc<EdgeInner>,
    responder: JoinHandle<()>,
    heartbeats: std::sync::Mutex<Option<JoinHandle<()>>>,
}

pub struct EdgeInner {
    pub node: String,
    started_ms: u64,
    broker: SharedBroker,
    /// Held while publishing, so reports leave in `seq` order.
    pub state: Mutex<EdgeState>,
}

#[derive(Default)]
pub struct EdgeState {
    pub seq: u64,
    reported: Reported,
}

impl EdgeInner {
    pub async fn publish(&self, report: EdgeReport) {
        self.broker
            .publish(
                subjects::presence_from_edge(&self.node),
                Bytes::from(serde_json::to_vec(&report).unwrap()),
            )
            .await
            .unwrap();
    }

    async fn snapshot(&self) {
        let st = self.state.lock().await;
        self.publish(EdgeReport::Snapshot {
            node: self.node.clone(),
            seq: st.seq,
            started_ms: self.started_ms,
            conns: st.reported.snapshot(),
        })
        .await;
    }

    async fn heartbeat(&self) {
        let st = self.state.lock().await;
        self.publish(EdgeReport::Heartbeat {
            node: self.node.clone(),
            seq: st.seq,
            started_ms: self.started_ms,
            conns: st.reported.len() as u64,
        })
        .await;
    }
}

impl FakeEdge {
    pub async fn start(node: &str, broker: SharedBroker) -> FakeEdge {
        let all = broker
            .subscribe(subjects::PRESENCE_SYNC_ALL.into())
            .await
            .unwrap();
        let mine = broker
            .subscribe(subjects::presence_sync_node(node))
            .await
            .unwrap();
        let inner = Arc::new(EdgeInner {
            node: node.into(),
            started_ms: 1_700_000_000_000,
            broker,
            state: Mutex::new(EdgeState::default()),
        });
        let edge = inner.clone();
        let responder = tokio::spawn(async move {
            let mut asks = futures::stream::select(all, mine);
            while asks.next().await.is_some() {
                edge.snapshot().await;
            }
        });
        FakeEdge {
            inner,
            responder,
            heartbeats: std::sync::Mutex::new(None),
        }
    }

    /// Heartbeats from now on, as a live edge does.
    pub fn heartbeat_every(&self, every: Duration) {
        let edge = self.inner.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                edge.heartbeat().await;
            }
        });
        if let Some(old) = self.heartbeats.lock().unwrap().replace(task) {
            old.abort();
        }
    }

    /// The edge dies at once (kill -9): no more reports, no goodbye, no
    /// answers to sync requests.
    pub fn kill(&self) {
        self.responder.abort();
        if let Some(task) = self.heartbeats.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Applies `change` to the edge's state and reports it; returns its seq.
    pub async fn change(&self, change: Change) -> u64 {
        self.record(change, true).await
    }

    /// Like `change`, but the report is lost on the way.
    pub async fn change_lost(&self, change: Change) -> u64 {
        self.record(change, false).await
    }

    async fn record(&self, change: Change, send: bool) -> u64 {
        let mut st = self.inner.state.lock().await;
        st.seq += 1;
        st.reported.apply(&change);
        if send {
            self.inner
                .publish(EdgeReport::Delta {
                    node: self.inner.node.clone(),
                    seq: st.seq,
                    change,
                })
                .await;
        }
        st.seq
    }

    pub async fn connect(&self, conn: &str, user: &str) -> u64 {
        self.change(Change::Connect {
            conn: conn.into(),
            user: user.into(),
            since_ms: 1_700_000_000_500,
        })
        .await
    }

    pub async fn join(&self, conn: &str, room: &str, meta: Option<serde_json::Value>) -> u64 {
        self.change(Change::Join {
            conn: conn.into(),
            room: room.into(),
            meta,
            quiet: false,
        })
        .await
    }

    pub async fn leave(&self, conn: &str, room: &str) -> u64 {
        self.change(Change::Leave {
            conn: conn.into(),
            room: room.into(),
        })
        .await
    }

    /// Closes a connection as a live edge does: leaves its rooms, then
    /// disconnects.
    pub async fn close(&self, conn: &str) -> u64 {
        let rooms: Vec<String> = {
            let st = self.inner.state.lock().await;
            st.reported.rooms(conn).map(str::to_owned).collect()
        };
        for room in rooms {
            self.leave(conn, &room).await;
        }
        self.change(Change::Disconnect { conn: conn.into() }).await
    }
}

impl Drop for FakeEdge {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `RoomMembers` as an edge asks it: a broker request with a prost payload.
pub async fn members_by_broker(broker: &SharedBroker, req: RoomMembersRequest) -> RoomMembersReply {
    let reply = broker
        .request(
            subjects::PRESENCE_QUERY_ROOM_MEMBERS.into(),
            Bytes::from(req.encode_to_vec()),
            WAIT,
        )
        .await
        .unwrap();
    RoomMembersReply::decode(reply).unwrap()
}

pub async fn status_by_broker(broker: &SharedBroker, users: &[&str]) -> UserStatusReply {
    let req = UserStatusRequest {
        users: users.iter().map(|u| u.to_string()).collect(),
    };
    let reply = broker
        .request(
            subjects::PRESENCE_QUERY_USER_STATUS.into(),
            Bytes::from(req.encode_to_vec()),
            WAIT,
        )
        .await
        .unwrap();
    UserStatusReply::decode(reply).unwrap()
}

pub fn room(room: &str) -> RoomMembersRequest {
    RoomMembersRequest {
        room: room.into(),
        ..Default::default()
    }
}

/// `user: [conn@node, …]` per member, for compact assertions.
pub fn shape(reply: &RoomMembersReply) -> Vec<String> {
    reply
        .members
        .iter()
        .map(|m| {
            let conns: Vec<String> = m
                .conns
                .iter()
                .map(|c| format!("{}@{}", c.conn, c.node))
                .collect();
            format!("{}: {}", m.user, conns.join(" "))
        })
        .collect()
}

/// Waits until `room` has exactly the members `want` (as `shape` writes them).
pub async fn members_become(broker: &SharedBroker, room_name: &str, want: &[&str]) {
    eventually(
        WAIT,
        &format!("{room_name} has members {want:?}"),
        || async {
            let reply = members_by_broker(broker, room(room_name)).await;
            (shape(&reply) == want).then_some(())
        },
    )
    .await
}

pub fn metrics_text(metrics: &herald_ops::Metrics) -> String {
    let mut out = String::new();
    herald_ops::prometheus_client::encoding::text::encode(&mut out, &metrics.lock().unwrap())
        .unwrap();
    out
}

pub async fn get(addr: SocketAddr, path: &'static str) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_get(addr, path).unwrap_or((0, String::new())))
        .await
        .unwrap()
}

/// Every user online/offline event published on the broker, in order.
pub struct UserEvents(Subscription);

impl UserEvents {
    pub async fn subscribe(broker: &SharedBroker) -> UserEvents {
        let sub = broker
            .subscribe(format!("{}.presence.user.>", subjects::PREFIX))
            .await
            .unwrap();
        UserEvents(sub)
    }

    /// The next event, as `online ada c1` (event, user, the connection that
    /// caused it, from the event id).
    pub async fn next(&mut self) -> String {
        let msg = tokio::time::timeout(WAIT, self.0.next())
            .await
            .expect("a user event in time")
            .expect("the subscription is open");
        let ev: UserEvent = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(msg.subject, subjects::presence_user_event(&ev.user));
        let parts: Vec<&str> = ev.id.splitn(3, ':').collect();
        assert_eq!(parts[0], ev.user, "{}", ev.id);
        format!("{} {} {}", parts[1], ev.user, parts[2])
    }

    /// Events up to and including the first that `is_marker` accepts.
    pub async fn until(&mut self, is_marker: impl Fn(&str) -> bool) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let ev = self.next().await;
            let done = is_marker(&ev);
            out.push(ev);
            if done {
                return out;
            }
        }
    }
}

/// Every message published on a room's subject (presence frames), in order.
pub struct RoomFrames(Subscription);

impl RoomFrames {
    pub async fn subscribe(broker: &SharedBroker, room: &str) -> RoomFrames {
        let name = herald_wire::RoomName::parse(room).unwrap();
        RoomFrames(broker.subscribe(subjects::room(&name)).await.unwrap())
    }

    /// The next frame, as `leave bob c2`.
    pub async fn next(&mut self) -> String {
        let msg = tokio::time::timeout(WAIT, self.0.next())
            .await
            .expect("a room frame in time")
            .expect("the subscription is open");
        let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(v["op"], "presence", "{v}");
        format!(
            "{} {} {}",
            v["event"].as_str().unwrap(),
            v["user"].as_str().unwrap(),
            v["conn"].as_str().unwrap()
        )
    }
}
