//! `herald.v1.Router`: the send API.

use bytes::Bytes;
use herald_broker::SharedBroker;
use herald_ops::Metrics;
use herald_proto::v1::router_server::{Router, RouterServer};
use herald_proto::v1::*;
use herald_wire::{RoomName, frames, subjects};
use prometheus_client::metrics::counter::Counter;
use serde_json::value::RawValue;
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct RouterApi {
    broker: SharedBroker,
    published: Counter,
}

impl RouterApi {
    pub fn new(broker: SharedBroker, metrics: &Metrics) -> RouterApi {
        let published = Counter::default();
        metrics.lock().expect("metrics registry").register(
            "router_published",
            "Messages published through Router.Publish and Router.SendToUser",
            published.clone(),
        );
        RouterApi { broker, published }
    }

    pub fn into_server(self) -> RouterServer<RouterApi> {
        RouterServer::new(self)
    }

    async fn publish_to(&self, room: RoomName, data: &str) -> Result<PublishReply, Status> {
        let data = RawValue::from_string(data.to_string())
            .map_err(|e| Status::invalid_argument(format!("data is not valid JSON: {e}")))?;
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let frame: Bytes = frames::message_frame(&room, &data, "server", ts);
        self.broker
            .publish(subjects::room(&room), frame)
            .await
            .map_err(|e| Status::unavailable(format!("message not sent: {e}")))?;
        self.published.inc();
        // Ephemeral rooms have no offsets; durable rooms will fill these in.
        Ok(PublishReply {
            epoch: String::new(),
            offset: 0,
        })
    }
}

fn room_arg(room: &str) -> Result<RoomName, Status> {
    RoomName::parse(room).map_err(|e| Status::invalid_argument(format!("room: {e}")))
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
        let req = request.into_inner();
        let room = room_arg(&req.room)?;
        self.publish_to(room, &req.data).await.map(Response::new)
    }

    async fn send_to_user(
        &self,
        request: Request<SendToUserRequest>,
    ) -> Result<Response<PublishReply>, Status> {
        let req = request.into_inner();
        let room = user_arg(&req.user)?;
        self.publish_to(room, &req.data).await.map(Response::new)
    }

    async fn join(&self, _: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        Err(Status::unimplemented(
            "Router.Join is not available in this version of Herald",
        ))
    }

    async fn leave(&self, _: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        Err(Status::unimplemented(
            "Router.Leave is not available in this version of Herald",
        ))
    }

    async fn disconnect(
        &self,
        _: Request<DisconnectRequest>,
    ) -> Result<Response<DisconnectReply>, Status> {
        Err(Status::unimplemented(
            "Router.Disconnect is not available in this version of Herald",
        ))
    }

    async fn history(&self, _: Request<HistoryRequest>) -> Result<Response<HistoryReply>, Status> {
        Err(Status::unimplemented(
            "Router.History needs durable rooms, which this version of Herald does not keep",
        ))
    }
}
