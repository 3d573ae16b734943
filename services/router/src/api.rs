//! `herald.v1.Router`: the send API.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use herald_auth::FeedKind;
use herald_auth::Policy;
use herald_broker::SharedBroker;
use herald_broker::feed::{self, FeedError, Reminder, SharedFeed};
use herald_broker::history::SharedHistory;
use herald_broker::{chain, rooms};
use herald_ops::Metrics;
use herald_ops::metrics::NamespaceCounters;
use herald_proto::v1::presence_server::Presence as _;
use herald_proto::v1::router_server::{Router, RouterServer};
use herald_proto::v1::*;
use herald_wire::presence::{Control, ControlAck};
use herald_wire::{CloseCode, RoomName, frames, subjects};

use crate::PresenceFront;
use prometheus_client::metrics::counter::Counter;
use serde_json::value::RawValue;
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct RouterApi {
    broker: SharedBroker,
    history: SharedHistory,
    policy: Policy,
    presence: PresenceFront,
    published: Counter,
    messages_in: NamespaceCounters,
    /// Messages one `PublishBatch` call may carry (`--max-publish-batch`).
    max_batch: usize,
    /// The event feed (API publishes, `notify_after` reminders); `None`:
    /// no feed.
    feed: Option<SharedFeed>,
}

/// The longest `notify_after_ms` taken: 7 days.
pub const MAX_NOTIFY_AFTER_MS: u32 = 7 * 24 * 3600 * 1000;

/// Messages one `PublishBatch` call may carry unless configured.
pub const MAX_PUBLISH_BATCH: usize = 1000;

/// How long Join/Leave/Disconnect wait for the edges to confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(4);

impl RouterApi {
    pub fn new(
        broker: SharedBroker,
        history: SharedHistory,
        policy: Policy,
        presence: PresenceFront,
        metrics: &Metrics,
    ) -> RouterApi {
        let published = Counter::default();
        let messages_in = NamespaceCounters::default();
        let mut registry = metrics.lock().expect("metrics registry");
        registry.register(
            "router_published",
            "Messages published through Router.Publish and Router.SendToUser",
            published.clone(),
        );
        messages_in.register(
            &mut registry,
            "router_messages_in",
            "Messages published to rooms through the gRPC API, by namespace",
        );
        drop(registry);
        RouterApi {
            broker,
            history,
            policy,
            presence,
            published,
            messages_in,
            max_batch: MAX_PUBLISH_BATCH,
            feed: None,
        }
    }

    /// Appends API publishes of namespaces whose `feed` names them, and
    /// takes `notify_after_ms`, with `feed`.
    pub fn with_feed(self, feed: Option<SharedFeed>) -> RouterApi {
        RouterApi { feed, ..self }
    }

    /// At most `max` messages per `PublishBatch`.
    pub fn with_max_batch(self, max: usize) -> RouterApi {
        RouterApi {
            max_batch: max,
            ..self
        }
    }

    /// Sends `control` to every edge holding a connection of `user` and waits
    /// until each has acted. Returns how many connections acted.
    async fn act_on_user(&self, user: &str, control: Control) -> Result<u32, Status> {
        let status = self
            .presence
            .user_status(Request::new(UserStatusRequest {
                users: vec![user.to_string()],
            }))
            .await?
            .into_inner();
        let nodes: HashSet<String> = status
            .users
            .iter()
            .flat_map(|u| u.conns.iter().map(|c| c.node.clone()))
            .collect();
        self.control(&control, nodes).await
    }

    /// Sends a control message to each of `nodes` (edges) and collects their
    /// acknowledgements.
    async fn control(&self, control: &Control, mut nodes: HashSet<String>) -> Result<u32, Status> {
        let inbox = format!("_INBOX.herald-router.{:016x}", rand::random::<u64>());
        let mut acks = self
            .broker
            .subscribe(inbox.clone())
            .await
            .map_err(|e| unavailable("subscribe to control acknowledgements", &e))?;
        let payload = Bytes::from(serde_json::to_vec(control).expect("control serializes"));
        for node in &nodes {
            self.broker
                .publish_with_reply_and_headers(
                    subjects::node_control(node),
                    inbox.clone(),
                    herald_broker::trace_headers(&tracing::Span::current()).unwrap_or_default(),
                    payload.clone(),
                )
                .await
                .map_err(|e| unavailable("send a control message", &e))?;
        }
        let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
        let mut acted = 0;
        while !nodes.is_empty() {
            match tokio::time::timeout_at(deadline, acks.next()).await {
                Ok(Some(msg)) => {
                    if let Ok(ack) = serde_json::from_slice::<ControlAck>(&msg.payload) {
                        if ack.late > 0 {
                            return Err(Status::deadline_exceeded(format!(
                                "{} connections on edge {} did not act in time",
                                ack.late, ack.node
                            )));
                        }
                        nodes.remove(&ack.node);
                        acted += ack.conns;
                    }
                }
                Ok(None) => return Err(Status::unavailable("the broker closed the reply inbox")),
                Err(_) => {
                    let mut missing: Vec<_> = nodes.into_iter().collect();
                    missing.sort();
                    return Err(Status::deadline_exceeded(format!(
                        "edges {} did not confirm within {CONFIRM_TIMEOUT:?}",
                        missing.join(", ")
                    )));
                }
            }
        }
        Ok(acted)
    }

    pub fn into_server(self) -> RouterServer<RouterApi> {
        RouterServer::new(self)
    }

    /// One `Publish`, alone or as part of a batch.
    async fn publish_request(&self, req: PublishRequest) -> Result<PublishReply, Status> {
        self.publish_to(room_arg(&req.room)?, &req.data, &req.key)
            .await
    }

    async fn publish_to(
        &self,
        room: RoomName,
        data: &str,
        key: &str,
    ) -> Result<PublishReply, Status> {
        let frame = self.frame(&room, data)?;
        let published = rooms::publish(
            &self.broker,
            &self.history,
            &room,
            self.delivery(&room),
            frame,
            Some(key),
        )
        .await;
        let reply = self.answer(&room, published)?;
        self.feed_publish(&room, data, &reply).await?;
        Ok(reply)
    }

    /// Appends an API publish to the feed when its namespace sends
    /// publishes there. Durable rooms' events are named by their offset, so
    /// a retry with the same key stores one event.
    async fn feed_publish(
        &self,
        room: &RoomName,
        data: &str,
        reply: &PublishReply,
    ) -> Result<(), Status> {
        let Some(feed) = &self.feed else {
            return Ok(());
        };
        if !self.policy.feeds(room.namespace(), FeedKind::Publish) {
            return Ok(());
        }
        let mut fields = serde_json::Map::new();
        fields.insert("room".into(), room.as_str().into());
        fields.insert("user".into(), "server".into());
        let data: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
        fields.insert("data".into(), data);
        let id = if reply.epoch.is_empty() {
            format!("publish:api:{:016x}", rand::random::<u64>())
        } else {
            fields.insert("epoch".into(), reply.epoch.clone().into());
            fields.insert("offset".into(), reply.offset.into());
            format!("publish:{room}:{}:{}", reply.epoch, reply.offset)
        };
        let event = feed::Event::new(
            feed::publish_subject(room.namespace()),
            id,
            "publish",
            feed::now_ms(),
            fields,
        );
        feed.append(event).await.map_err(feed_status)
    }

    /// After a `SendToUser` with `notify_after_ms`: unless a device of the
    /// user is connected now (it got the message live), leaves a reminder.
    async fn remind(
        &self,
        user: &str,
        room: &RoomName,
        reply: &PublishReply,
        after_ms: u32,
    ) -> Result<(), Status> {
        let Some(feed) = &self.feed else {
            return Ok(());
        };
        // Not knowing (presence unreachable) counts as not delivered: the
        // reminder asks again at the deadline.
        let status = self
            .presence
            .user_status(Request::new(UserStatusRequest {
                users: vec![user.to_string()],
            }))
            .await;
        match status {
            Ok(status) if status.get_ref().users.iter().any(|u| !u.conns.is_empty()) => {
                return Ok(());
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%user, error = %e.message(), "presence did not say whether a device got the message; leaving a reminder");
            }
        }
        let sent_ms = feed::now_ms();
        let reminder = Reminder {
            user: user.to_string(),
            room: room.to_string(),
            epoch: reply.epoch.clone(),
            offset: reply.offset,
            sent_ms,
            due_ms: sent_ms + u64::from(after_ms),
            delivered: false,
        };
        feed.remind(reminder).await.map_err(feed_status)
    }

    /// How `room`'s messages go out, by its namespace's policy.
    fn delivery(&self, room: &RoomName) -> rooms::Delivery {
        rooms::Delivery {
            durable: self.policy.is_durable(room.namespace()),
            traceparent: self.policy.sends_traceparent(room.namespace()),
        }
    }

    /// The `message` frame the API publishes: `data` from "server", now.
    fn frame(&self, room: &RoomName, data: &str) -> Result<Bytes, Status> {
        let data = RawValue::from_string(data.to_string())
            .map_err(|e| Status::invalid_argument(format!("data is not valid JSON: {e}")))?;
        frames::check_depth("data", data.get()).map_err(Status::invalid_argument)?;
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Ok(frames::message_frame(room, &data, "server", ts))
    }

    /// The reply to one publish, or its error as a status: a size error is
    /// permanent (`INVALID_ARGUMENT`), an unknown outcome is
    /// `DEADLINE_EXCEEDED` (gRPC's "may have completed"), anything else
    /// `UNAVAILABLE` (nothing was published).
    fn answer(
        &self,
        room: &RoomName,
        published: Result<rooms::Published, rooms::PublishError>,
    ) -> Result<PublishReply, Status> {
        let published = published.map_err(|e| {
            if e.is_too_large() {
                Status::invalid_argument(e.to_string())
            } else if e.is_unconfirmed() {
                tracing::warn!(error = %chain(&e), "a publish's outcome is unknown");
                Status::deadline_exceeded(e.to_string())
            } else {
                unavailable("publish", &e)
            }
        })?;
        self.published.inc();
        self.messages_in.inc_by(room.namespace(), 1);
        Ok(PublishReply {
            epoch: published.epoch,
            offset: published.offset,
        })
    }
}

/// A feed failure as the caller sees it: `DEADLINE_EXCEEDED` when the event
/// may or may not be stored (retry with the same key), `UNAVAILABLE`
/// otherwise.
fn feed_status(e: FeedError) -> Status {
    match e {
        FeedError::Unconfirmed(_) => {
            tracing::warn!(error = %chain(&e), "a feed append's outcome is unknown");
            Status::deadline_exceeded(e.to_string())
        }
        _ => unavailable("append to the event feed", &e),
    }
}

/// `UNAVAILABLE` with the error's plain message for the caller; the causes
/// under it go to the log, for the operator who can act on them.
fn unavailable(what: &str, e: &(dyn std::error::Error + 'static)) -> Status {
    tracing::warn!(error = %chain(e), "{what} failed");
    Status::unavailable(e.to_string())
}

/// The fields of a stored `message` frame that `HistoryMessage` carries.
#[derive(serde::Deserialize)]
struct StoredFrame {
    data: Box<RawValue>,
    from: String,
    ts: u64,
}

fn room_arg(room: &str) -> Result<RoomName, Status> {
    RoomName::parse(room).map_err(|e| Status::invalid_argument(format!("room: {e}")))
}

/// The close code of a `Router.Disconnect` (0 is 1000) and the reconnect
/// rule that goes with it: a catalogue code keeps its own, which clients
/// rely on; a backend's own code (4000–4999, outside the catalogue) takes
/// the caller's, `false` when unset. 1002 and 1007 are the edge's alone:
/// they say the client broke the WebSocket protocol.
fn close_code_arg(code: u32, reconnect: Option<bool>) -> Result<(CloseCode, bool), Status> {
    let number = if code == 0 { 1000 } else { code };
    let Some(close) = u16::try_from(number)
        .ok()
        .and_then(|n| CloseCode::from_code(n).or_else(|| CloseCode::application(n)))
    else {
        let catalogue: Vec<String> = CloseCode::ALL
            .iter()
            .map(|c| c.code().to_string())
            .collect();
        return Err(Status::invalid_argument(format!(
            "code {code} is neither in the close-code catalogue ({}) nor a code of your own from 4000-4999",
            catalogue.join(", ")
        )));
    };
    if !close.announced() {
        return Err(Status::invalid_argument(format!(
            "code {number} says the client broke the WebSocket protocol, which only the edge can see; \
             a backend's reasons take another code"
        )));
    }
    match (close, reconnect) {
        (CloseCode::Application(_), reconnect) => Ok((close, reconnect.unwrap_or(false))),
        (_, Some(asked)) if asked != close.reconnect() => Err(Status::invalid_argument(format!(
            "code {number} always comes with reconnect {}, the rule clients know it by; \
             for another, use a code of your own from 4000-4999",
            close.reconnect()
        ))),
        _ => Ok((close, close.reconnect())),
    }
}

fn user_arg(user: &str) -> Result<RoomName, Status> {
    if user.is_empty() {
        return Err(Status::invalid_argument("user is empty"));
    }
    RoomName::user(user).map_err(|e| Status::invalid_argument(format!("user: {e}")))
}

#[tonic::async_trait]
impl Router for RouterApi {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishReply>, Status> {
        self.publish_request(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn publish_batch(
        &self,
        request: Request<PublishBatchRequest>,
    ) -> Result<Response<PublishBatchReply>, Status> {
        let messages = request.into_inner().messages;
        if messages.len() > self.max_batch {
            return Err(Status::invalid_argument(format!(
                "a batch holds at most {} messages; this one has {}",
                self.max_batch,
                messages.len()
            )));
        }
        // Bad messages are answered in place; the others go out one after
        // the other, in the call's order, with one confirmation for them all.
        let checked: Vec<Result<(RoomName, Bytes, String), Status>> = messages
            .into_iter()
            .map(|req| {
                let room = room_arg(&req.room)?;
                let frame = self.frame(&room, &req.data)?;
                Ok((room, frame, req.key))
            })
            .collect();
        let mut outgoing = Vec::with_capacity(checked.len());
        for (room, frame, key) in checked.iter().flatten() {
            outgoing.push(rooms::Outgoing {
                room,
                delivery: self.delivery(room),
                frame: frame.clone(),
                key: Some(key),
            });
        }
        let mut published = rooms::publish_all(&self.broker, &self.history, outgoing)
            .await
            .into_iter();
        let results = checked
            .iter()
            .map(|c| {
                let outcome = match c {
                    Ok((room, ..)) => {
                        self.answer(room, published.next().expect("one outcome per message"))
                    }
                    Err(status) => Err(status.clone()),
                };
                match outcome {
                    Ok(reply) => PublishOutcome {
                        published: Some(reply),
                        code: 0,
                        error: String::new(),
                    },
                    Err(status) => PublishOutcome {
                        published: None,
                        code: status.code() as u32,
                        error: status.message().to_string(),
                    },
                }
            })
            .collect();
        Ok(Response::new(PublishBatchReply { results }))
    }

    async fn send_to_user(
        &self,
        request: Request<SendToUserRequest>,
    ) -> Result<Response<PublishReply>, Status> {
        let req = request.into_inner();
        let room = user_arg(&req.user)?;
        if req.notify_after_ms > 0 {
            if self.feed.is_none() {
                return Err(Status::failed_precondition(
                    "notify_after_ms needs the event feed: add a [feed] section to the configuration",
                ));
            }
            if req.notify_after_ms > MAX_NOTIFY_AFTER_MS {
                return Err(Status::invalid_argument(format!(
                    "notify_after_ms is {}; at most {MAX_NOTIFY_AFTER_MS} (7 days)",
                    req.notify_after_ms
                )));
            }
        }
        let reply = self.publish_to(room.clone(), &req.data, &req.key).await?;
        if req.notify_after_ms > 0 {
            self.remind(&req.user, &room, &reply, req.notify_after_ms)
                .await
                .map_err(|s| {
                    Status::new(
                        s.code(),
                        format!(
                            "the message was sent (offset {}) but its notify_after reminder was not stored: retry with the same key ({})",
                            reply.offset,
                            s.message()
                        ),
                    )
                })?;
        }
        Ok(Response::new(reply))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let req = request.into_inner();
        user_arg(&req.user)?;
        let room = room_arg(&req.room)?;
        if room.is_personal() {
            return Err(Status::invalid_argument(
                "personal rooms cannot be joined by others",
            ));
        }
        self.act_on_user(
            &req.user,
            Control::Join {
                user: req.user.clone(),
                room: room.to_string(),
            },
        )
        .await?;
        Ok(Response::new(JoinReply {}))
    }

    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        let req = request.into_inner();
        user_arg(&req.user)?;
        let room = room_arg(&req.room)?;
        self.act_on_user(
            &req.user,
            Control::Leave {
                user: req.user.clone(),
                room: room.to_string(),
            },
        )
        .await?;
        Ok(Response::new(LeaveReply {}))
    }

    async fn disconnect(
        &self,
        request: Request<DisconnectRequest>,
    ) -> Result<Response<DisconnectReply>, Status> {
        let req = request.into_inner();
        let (code, reconnect) = close_code_arg(req.code, req.reconnect)?;
        // Only a backend's own code carries its rule: a catalogue code's is
        // the edge's to apply.
        let reconnect = matches!(code, CloseCode::Application(_)).then_some(reconnect);
        match req.target {
            Some(disconnect_request::Target::User(user)) => {
                user_arg(&user)?;
                let control = Control::Disconnect {
                    user: Some(user.clone()),
                    conn: None,
                    code: code.code(),
                    reason: req.reason,
                    reconnect,
                };
                self.act_on_user(&user, control).await?;
            }
            Some(disconnect_request::Target::Conn(conn)) => {
                let Some((node, _)) = conn.rsplit_once('-') else {
                    return Err(Status::invalid_argument(format!(
                        "{conn:?} is not a connection id (<node>-<n>)"
                    )));
                };
                let control = Control::Disconnect {
                    user: None,
                    conn: Some(conn.clone()),
                    code: code.code(),
                    reason: req.reason,
                    reconnect,
                };
                let nodes = HashSet::from([node.to_string()]);
                let acted = self.control(&control, nodes).await?;
                if acted == 0 {
                    return Err(Status::not_found(format!("no open connection {conn}")));
                }
            }
            None => {
                return Err(Status::invalid_argument(
                    "give a user or a conn to disconnect",
                ));
            }
        }
        Ok(Response::new(DisconnectReply {}))
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryReply>, Status> {
        let req = request.into_inner();
        let room = room_arg(&req.room)?;
        if !self.policy.is_durable(room.namespace()) {
            return Err(Status::failed_precondition(format!(
                "{room} keeps no history: its namespace is not durable"
            )));
        }
        let since = req.since.as_ref().map(|s| (s.epoch.as_str(), s.offset));
        let (epoch, stored) = rooms::history_page(&self.history, &room, since, Some(req.limit))
            .await
            .map_err(|e| unavailable("read history", &e))?;
        let messages = stored
            .into_iter()
            .filter_map(|m| {
                let frame: StoredFrame = serde_json::from_slice(&m.payload).ok()?;
                Some(HistoryMessage {
                    offset: m.offset,
                    data: frame.data.get().to_string(),
                    from: frame.from,
                    ts: frame.ts,
                })
            })
            .collect();
        Ok(Response::new(HistoryReply { epoch, messages }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disconnect_codes_are_the_catalogue_or_the_backends_own() {
        assert_eq!(close_code_arg(0, None).unwrap(), (CloseCode::Normal, false));
        assert_eq!(
            close_code_arg(1012, None).unwrap(),
            (CloseCode::ServiceRestart, true)
        );
        assert_eq!(
            close_code_arg(1012, Some(true)).unwrap(),
            (CloseCode::ServiceRestart, true)
        );
        let banned = CloseCode::application(4403).unwrap();
        assert_eq!(close_code_arg(4403, None).unwrap(), (banned, false));
        assert_eq!(close_code_arg(4403, Some(true)).unwrap(), (banned, true));

        for edges_own in [1002, 1007] {
            let e = close_code_arg(edges_own, None).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{edges_own}");
            assert!(e.message().contains("only the edge"), "{}", e.message());
        }
        let contradicts = close_code_arg(4003, Some(true)).unwrap_err();
        assert_eq!(contradicts.code(), tonic::Code::InvalidArgument);
        assert!(
            contradicts.message().contains("reconnect false"),
            "{}",
            contradicts.message()
        );
        for outside in [1004, 2000, 3000, 5000, 70_000] {
            let e = close_code_arg(outside, None).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{outside}");
            assert!(e.message().contains("4000-4999"), "{}", e.message());
            assert!(e.message().contains("1000, 1002, 1007"), "{}", e.message());
        }
    }
}
