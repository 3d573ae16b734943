//! The gRPC face of the presence service (`herald.v1.Presence`): checks the
//! request, classifies failures as gRPC statuses, and otherwise hands the
//! query to the same actor that answers the edges over the broker. `Watch`
//! turns the actor's per-watcher event queue into a server stream.

use futures::stream::BoxStream;
use herald_presence_client::{check_room_members, check_user_status};
use herald_proto::v1::presence_server;
use herald_proto::v1::{
    PresenceEvent, RoomMembersReply, RoomMembersRequest, UserStatusReply, UserStatusRequest,
    WatchRequest,
};
use herald_wire::RoomName;
use tonic::{Request, Response, Status};

use crate::service::{Presence, Stopped};
use crate::watch::{WatchEnd, WatchError};

/// Users one `UserStatus` call may ask about.
pub const MAX_USERS_PER_CALL: usize = 1000;
/// Rooms, and users, one `Watch` call may name (each).
pub const MAX_WATCHED: usize = 1000;

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
        check_room_members(&req)?;
        let reply = self.presence.try_room_members(req).await.map_err(stopped)?;
        Ok(Response::new(reply))
    }

    async fn user_status(
        &self,
        request: Request<UserStatusRequest>,
    ) -> Result<Response<UserStatusReply>, Status> {
        let req = request.into_inner();
        check_user_status(&req)?;
        if req.users.len() > MAX_USERS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} users asked at once; the limit is {MAX_USERS_PER_CALL}",
                req.users.len()
            )));
        }
        let reply = self.presence.try_user_status(req).await.map_err(stopped)?;
        Ok(Response::new(reply))
    }

    type WatchStream = BoxStream<'static, Result<PresenceEvent, Status>>;

    /// Room events (`join`, `leave`, `update`) of `rooms` and user events
    /// (`online`, `offline`) of `users`, in the order this replica applies
    /// them. A watcher that reads too slowly has its stream ended with
    /// `RESOURCE_EXHAUSTED`; a stopping replica ends it with `UNAVAILABLE`.
    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        if req.rooms.is_empty() && req.users.is_empty() {
            return Err(Status::invalid_argument(
                "rooms and users are both empty: name at least one room or user to watch",
            ));
        }
        for (what, n) in [("rooms", req.rooms.len()), ("users", req.users.len())] {
            if n > MAX_WATCHED {
                return Err(Status::invalid_argument(format!(
                    "{n} {what} watched at once; the limit is {MAX_WATCHED}"
                )));
            }
        }
        for room in &req.rooms {
            RoomName::parse(room).map_err(|e| Status::invalid_argument(format!("rooms: {e}")))?;
        }
        if req.users.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("users: a user id is empty"));
        }
        let watch = self
            .presence
            .watch(req.rooms, req.users)
            .await
            .map_err(|e| match e {
                WatchError::TooManyWatchers => Status::resource_exhausted(e.to_string()),
                WatchError::Stopped => Status::unavailable(e.to_string()),
            })?;
        let stream = futures::stream::unfold(Some(watch), |watch| async move {
            let mut watch = watch?;
            match watch.next().await {
                Ok(ev) => Some((Ok(ev), Some(watch))),
                Err(WatchEnd::Lagged) => Some((
                    Err(Status::resource_exhausted(
                        "this watcher read presence events too slowly and fell behind; watch again, and read RoomMembers or UserStatus to catch up",
                    )),
                    None,
                )),
                Err(WatchEnd::Stopped) => Some((
                    Err(Status::unavailable("the presence service is shutting down")),
                    None,
                )),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
