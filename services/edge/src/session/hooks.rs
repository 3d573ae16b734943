//! A session's side of the application's hooks: what a connect, join or
//! publish becomes once the hook decided, or once it failed and the hook's
//! `on_failure` decides instead. The calls themselves are `crate::hooks`'.

use std::net::SocketAddr;

use herald_auth::{Claims, HookName, HookTarget, OnFailure};
use herald_wire::frames::FrameError;
use herald_wire::{CloseCode, ErrorCode, RoomName};
use serde_json::Value;
use serde_json::value::RawValue;

use super::Session;
use crate::Edge;
use crate::delivery::{Closing, Out, Outbox};
use crate::hooks::{Decision, Failure, Granted};
use crate::interest;

/// What the connect hook is told of the client besides its claims.
pub(crate) struct Hello {
    pub peer: SocketAddr,
    /// The `client` object of the `connect` frame.
    pub client: Option<Box<RawValue>>,
}

/// Asks the connect hook, when one is configured. `None`: refused, and the
/// outbox holds the close; otherwise the rooms the application granted.
pub(super) async fn on_connect(
    edge: &Edge,
    outbox: &Outbox,
    claims: &Claims,
    hello: &Hello,
    conn: &str,
) -> Option<Granted> {
    let Some(target) = &edge.config.connect_hook else {
        return Some(Granted::default());
    };
    let asked = edge.hooks.on_connect(
        target,
        &edge.config.policy,
        claims,
        hello.client.as_deref(),
        hello.peer,
        conn,
        &edge.config.node_id,
    );
    match Box::pin(asked).await {
        Ok(Decision::Allow(granted)) => Some(granted),
        Ok(Decision::Deny(refusal)) => {
            tracing::debug!(conn, user = %claims.sub, code = refusal.code.code(), "the connect hook refused a connection");
            outbox.push(Out::Close(Box::new(Closing::new(
                refusal.code,
                refusal.reason,
            ))));
            None
        }
        Err(Failure(why)) => match target.on_failure {
            OnFailure::Allow => {
                tracing::debug!(conn, "connect allowed without its hook: {why}");
                Some(Granted::default())
            }
            OnFailure::Deny => {
                outbox.push(Out::close(
                    CloseCode::TryAgainLater,
                    format!("{why}; reconnect later"),
                ));
                None
            }
        },
    }
}

impl Session {
    /// Joins the rooms the connect hook granted, as the server API's joins
    /// do: the token's room patterns do not apply, the namespace's presence
    /// settings do. A room that cannot be joined now does not fail the
    /// connection: the log says why.
    /// Their live messages are held until `open` releases them after
    /// `connected`.
    pub(super) async fn join_granted(&mut self, granted: Granted) {
        if granted.rooms.is_empty() {
            return;
        }
        self.rare().granting = Some(Vec::with_capacity(granted.rooms.len()));
        for room in granted.rooms {
            let policy = self.server_join_policy(&room);
            let joined = Box::pin(self.join_room(None, &room, &policy, granted.meta.clone(), None));
            if let Err(e) = joined.await {
                tracing::warn!(conn = %self.conn, %room, error = %e.message, "a room granted by the connect hook could not be joined");
            }
            if let Some(entry) = self.after_reply.take() {
                interest::release(&entry, self.outbox.id);
            }
        }
    }

    /// The join hook of `room`'s namespace, when it has one: `Ok` lets the
    /// join go on.
    pub(super) async fn join_hook(
        &self,
        id: Option<u64>,
        room: &RoomName,
        meta: Option<&Value>,
    ) -> Result<(), FrameError> {
        let Some(target) = self
            .edge
            .config
            .policy
            .hook(room.namespace(), HookName::Join)
        else {
            return Ok(());
        };
        let asked = self
            .edge
            .hooks
            .on_join(&target, &self.claims.sub, &self.conn, room, meta);
        match Box::pin(asked).await {
            Ok(Decision::Allow(())) => Ok(()),
            Ok(Decision::Deny((code, message))) => Err(FrameError::new(id, code, message)),
            Err(failure) => self.failed(id, &target, failure).map(|_| ()),
        }
    }

    /// The publish hook of `room`'s namespace, when it has one: the `data`
    /// to publish, the client's or the hook's rewrite.
    pub(super) async fn publish_hook(
        &self,
        id: Option<u64>,
        room: &RoomName,
        data: Box<RawValue>,
    ) -> Result<Box<RawValue>, FrameError> {
        let Some(target) = self
            .edge
            .config
            .policy
            .hook(room.namespace(), HookName::Publish)
        else {
            return Ok(data);
        };
        let asked = self
            .edge
            .hooks
            .on_publish(&target, &self.claims.sub, &self.conn, room, &data);
        match Box::pin(asked).await {
            Ok(Decision::Allow(rewritten)) => Ok(rewritten.unwrap_or(data)),
            Ok(Decision::Deny((code, message))) => Err(FrameError::new(id, code, message)),
            Err(failure) => self.failed(id, &target, failure).map(|_| data),
        }
    }

    /// A hook without an answer: `unavailable`, or on as if allowed.
    fn failed(
        &self,
        id: Option<u64>,
        target: &HookTarget,
        Failure(why): Failure,
    ) -> Result<(), FrameError> {
        match target.on_failure {
            OnFailure::Allow => {
                tracing::debug!(conn = %self.conn, "request allowed without its hook: {why}");
                Ok(())
            }
            OnFailure::Deny => Err(FrameError::new(
                id,
                ErrorCode::Unavailable,
                format!("{why}; try again later"),
            )),
        }
    }
}
