//! `herald.v1.Presence` on the router, so backend services need one address:
//! queries go to any presence replica through the broker, or to the presence
//! service named by `--presence` (the shared presence client decides).

use herald_broker::SharedBroker;
use herald_presence_client::{PresenceQuery, QueryError, check_room_members, check_user_status};
use herald_proto::v1::presence_server::{Presence, PresenceServer};
use herald_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::Config;

#[derive(Clone)]
pub struct PresenceFront {
    query: PresenceQuery,
}

impl PresenceFront {
    pub fn new(broker: SharedBroker, config: &Config) -> PresenceFront {
        PresenceFront {
            query: PresenceQuery::new(broker, config.presence.clone(), config.presence_timeout),
        }
    }

    pub fn into_server(self) -> PresenceServer<PresenceFront> {
        PresenceServer::new(self)
    }
}

/// A query's answer as the front's. A presence service's own status passes
/// through unchanged; the router answers for the broker's side itself.
fn answer<T>(result: Result<T, QueryError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(|e| match e {
        QueryError::NoAnswer(_) => Status::unavailable(e.to_string()),
        QueryError::Unreadable(_) => Status::internal(e.to_string()),
        QueryError::Grpc(status) => status,
    })
}

#[tonic::async_trait]
impl Presence for PresenceFront {
    async fn room_members(
        &self,
        request: Request<RoomMembersRequest>,
    ) -> Result<Response<RoomMembersReply>, Status> {
        let req = request.into_inner();
        check_room_members(&req)?;
        answer(self.query.room_members(req).await)
    }

    async fn user_status(
        &self,
        request: Request<UserStatusRequest>,
    ) -> Result<Response<UserStatusReply>, Status> {
        let req = request.into_inner();
        check_user_status(&req)?;
        answer(self.query.user_status(req).await)
    }

    type WatchStream = tonic::codec::Streaming<PresenceEvent>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        match self.query.grpc() {
            Some(c) => c.clone().watch(request.into_inner()).await,
            None => Err(Status::unimplemented(
                "Presence.Watch is served by the presence service; call it there",
            )),
        }
    }
}
