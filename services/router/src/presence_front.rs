//! `herald.v1.Presence` on the router, so backend services need one address:
//! queries go to any presence replica through the broker, or to the presence
//! service named by `--presence`.

use std::time::Duration;

use bytes::Bytes;
use herald_broker::SharedBroker;
use herald_proto::v1::presence_client::PresenceClient;
use herald_proto::v1::presence_server::{Presence, PresenceServer};
use herald_proto::v1::*;
use herald_wire::subjects;
use prost::Message;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::Config;

#[derive(Clone)]
pub struct PresenceFront {
    broker: SharedBroker,
    grpc: Option<PresenceClient<Channel>>,
    timeout: Duration,
}

impl PresenceFront {
    pub fn new(broker: SharedBroker, config: &Config) -> Result<PresenceFront, String> {
        let grpc = match &config.presence {
            Some(url) => Some(PresenceClient::new(
                Channel::from_shared(url.clone())
                    .map_err(|e| format!("--presence {url}: not a valid URL: {e}"))?
                    .connect_lazy(),
            )),
            None => None,
        };
        Ok(PresenceFront {
            broker,
            grpc,
            timeout: config.presence_timeout,
        })
    }

    pub fn into_server(self) -> PresenceServer<PresenceFront> {
        PresenceServer::new(self)
    }

    async fn ask<Req: Message, Rep: Message + Default>(
        &self,
        subject: &str,
        req: Req,
    ) -> Result<Rep, Status> {
        let bytes = self
            .broker
            .request(
                subject.to_string(),
                Bytes::from(req.encode_to_vec()),
                self.timeout,
            )
            .await
            .map_err(|e| Status::unavailable(format!("no presence replica answered: {e}")))?;
        Rep::decode(bytes).map_err(|e| Status::internal(format!("unreadable presence answer: {e}")))
    }
}

#[tonic::async_trait]
impl Presence for PresenceFront {
    async fn room_members(
        &self,
        request: Request<RoomMembersRequest>,
    ) -> Result<Response<RoomMembersReply>, Status> {
        let req = request.into_inner();
        herald_wire::RoomName::parse(&req.room)
            .map_err(|e| Status::invalid_argument(format!("room: {e}")))?;
        match &self.grpc {
            Some(c) => c.clone().room_members(req).await,
            None => self
                .ask(subjects::PRESENCE_QUERY_ROOM_MEMBERS, req)
                .await
                .map(Response::new),
        }
    }

    async fn user_status(
        &self,
        request: Request<UserStatusRequest>,
    ) -> Result<Response<UserStatusReply>, Status> {
        let req = request.into_inner();
        if req.users.is_empty() {
            return Err(Status::invalid_argument("users is empty"));
        }
        match &self.grpc {
            Some(c) => c.clone().user_status(req).await,
            None => self
                .ask(subjects::PRESENCE_QUERY_USER_STATUS, req)
                .await
                .map(Response::new),
        }
    }

    type WatchStream = tonic::codec::Streaming<PresenceEvent>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        match &self.grpc {
            Some(c) => c.clone().watch(request.into_inner()).await,
            None => Err(Status::unimplemented(
                "Presence.Watch is served by the presence service; call it there",
            )),
        }
    }
}
