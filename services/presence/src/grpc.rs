//! The gRPC face of the presence service (`herald.v1.Presence`): checks the
//! request, classifies failures as gRPC statuses, and otherwise hands the
//! query to the same actor that answers the edges over the broker.

use futures::stream::BoxStream;
use herald_proto::v1::presence_server;
use herald_proto::v1::{
    PresenceEvent, RoomMembersReply, RoomMembersRequest, UserStatusReply, UserStatusRequest,
    WatchRequest,
};
use herald_wire::RoomName;
use tonic::{Request, Response, Status};

use crate::service::{Presence, Stopped};

/// Users one `UserStatus` call may ask about.
pub const MAX_USERS_PER_CALL: usize = 1000;

/// Implements the generated service trait on top of a [`Presence`] handle.
pub(crate) struct PresenceApi {
    presence: Presence,
}

impl PresenceApi {
    pub(crate) fn new(presence: Presence) -> PresenceApi {
        PresenceApi { presence }
    }
}

fn stopped(_: Stopped) -> Status {
    Status::unavailable("the presence service is shutting down")
}

#[tonic::async_trait]
impl presence_server::Presence for PresenceApi {
    async fn room_members(
        &self,
        request: Request<RoomMembersRequest>,
    ) -> Result<Response<RoomMembersReply>, Status> {
        let req = request.into_inner();
        RoomName::parse(&req.room).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let reply = self.presence.try_room_members(req).await.map_err(stopped)?;
        Ok(Response::new(reply))
    }

    async fn user_status(
        &self,
        request: Request<UserStatusRequest>,
    ) -> Result<Response<UserStatusReply>, Status> {
        let req = request.into_inner();
        if req.users.is_empty() {
            return Err(Status::invalid_argument(
                "users is empty: name at least one user",
            ));
        }
        if req.users.len() > MAX_USERS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} users asked at once; the limit is {MAX_USERS_PER_CALL}",
                req.users.len()
            )));
        }
        let reply = self.presence.try_user_status(req).await.map_err(stopped)?;
        Ok(Response::new(reply))
    }

    // The event stream comes with presence events (online/offline after a
    // grace period, room join/leave/update); this type is its seam.
    type WatchStream = BoxStream<'static, Result<PresenceEvent, Status>>;

    async fn watch(
        &self,
        _request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented(
            "Presence.Watch arrives with the presence events work (issue 3)",
        ))
    }
}
