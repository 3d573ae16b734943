//! Asking the presence service who is in a room and which users are online,
//! for the edge (a client's `presence` request) and the router (the
//! `Presence` API it fronts for backends). The question goes to any presence
//! replica as a broker request, or, given `--presence URL`, to that presence
//! service over gRPC: the same question and the same answer either way.
//! Every server of that API checks the requests with the same
//! [`check_room_members`] and [`check_user_status`].
#![forbid(unsafe_code)]

use std::time::Duration;

use bytes::Bytes;
use herald_broker::{BrokerError, SharedBroker};
use herald_ops::tls::{GrpcConnector, Reloadable};
use herald_proto::v1::presence_client::PresenceClient;
use herald_proto::v1::{RoomMembersReply, RoomMembersRequest, UserStatusReply, UserStatusRequest};
use herald_wire::{RoomName, subjects};
use prost::Message;
use rustls::ClientConfig;
use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Where presence queries go.
#[derive(Clone, Debug)]
pub enum Source {
    /// Any presence replica, found through the broker.
    Broker,
    /// A presence service's gRPC address (`--presence URL`). Boxed: the
    /// client is large and one per process.
    Grpc(Box<GrpcClient>),
}

/// A gRPC client of the presence service that sends the API token, when
/// there is one, with every call.
pub type GrpcClient = PresenceClient<InterceptedService<Channel, WithToken>>;

/// Adds `authorization: Bearer TOKEN` to every call, for a presence service
/// started with `--api-tokens`.
#[derive(Clone, Debug)]
pub struct WithToken(Option<MetadataValue<Ascii>>);

impl Interceptor for WithToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

impl Source {
    /// The presence service at `url` (calling it with `token`, when given),
    /// or any replica through the broker without one. An `https://` URL
    /// needs `tls` (the CA that signed the service's certificate, and a
    /// client certificate when it asks for one). Connects on the first
    /// query, so a service that starts before presence does is not refused.
    pub fn from_url(
        url: Option<&str>,
        token: Option<&str>,
        tls: Option<Reloadable<ClientConfig>>,
    ) -> Result<Source, InvalidUrl> {
        let Some(url) = url else {
            return match tls {
                Some(_) => Err(InvalidUrl::TlsWithoutUrl),
                None => Ok(Source::Broker),
            };
        };
        let endpoint = Channel::from_shared(url.to_string()).map_err(InvalidUrl::Url)?;
        let token = token
            .map(|t| format!("Bearer {t}").parse().map_err(|_| InvalidUrl::Token))
            .transpose()?;
        let https = endpoint.uri().scheme_str() == Some("https");
        let channel = match (https, tls) {
            (true, Some(tls)) => endpoint.connect_with_connector_lazy(GrpcConnector::new(tls)),
            (true, None) => return Err(InvalidUrl::HttpsWithoutCa),
            (false, Some(_)) => return Err(InvalidUrl::TlsOnPlainUrl),
            (false, None) => endpoint.connect_lazy(),
        };
        Ok(Source::Grpc(Box::new(PresenceClient::with_interceptor(
            channel,
            WithToken(token),
        ))))
    }
}

/// A presence URL, token or TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InvalidUrl {
    #[error("not a valid URL")]
    Url(#[source] tonic::codegen::http::uri::InvalidUri),
    #[error("the API token holds characters a gRPC header cannot carry")]
    Token,
    #[error(
        "an https:// presence URL needs --presence-tls-ca, the CA that signed the presence service's certificate"
    )]
    HttpsWithoutCa,
    #[error(
        "TLS settings for the presence service are given, but its URL is http://; use https://"
    )]
    TlsOnPlainUrl,
    #[error("TLS settings for the presence service are given without --presence")]
    TlsWithoutUrl,
}

/// Why a query has no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No replica answered through the broker in time, or the broker is
    /// unreachable.
    #[error("no presence replica answered")]
    NoAnswer(#[source] BrokerError),
    /// A replica answered something that is not the expected reply.
    #[error("the presence answer was unreadable")]
    Unreadable(#[source] prost::DecodeError),
    /// The presence service's gRPC status, whole, so that a front can pass it
    /// on unchanged. Its message says the rest.
    #[error("the presence service did not answer: {}", .0.message())]
    Grpc(tonic::Status),
}

/// Refuses a `RoomMembers` request that names no valid room, for every
/// server of `herald.v1.Presence`, so the presence service and the router
/// that fronts it answer bad input alike.
pub fn check_room_members(req: &RoomMembersRequest) -> Result<(), Status> {
    RoomName::parse(&req.room).map_err(|e| Status::invalid_argument(format!("room: {e}")))?;
    Ok(())
}

/// Refuses a `UserStatus` request that names no user (see
/// [`check_room_members`]).
pub fn check_user_status(req: &UserStatusRequest) -> Result<(), Status> {
    if req.users.is_empty() {
        return Err(Status::invalid_argument(
            "users is empty: name at least one user",
        ));
    }
    Ok(())
}

/// How long one try of a query through the broker waits before asking again.
const QUERY_ATTEMPT: Duration = Duration::from_millis(750);

/// Asks presence; cheap to clone.
#[derive(Clone)]
pub struct PresenceQuery {
    broker: SharedBroker,
    source: Source,
    timeout: Duration,
}

impl PresenceQuery {
    /// Queries to `source`, each given up after `timeout`.
    pub fn new(broker: SharedBroker, source: Source, timeout: Duration) -> PresenceQuery {
        PresenceQuery {
            broker,
            source,
            timeout,
        }
    }

    /// The gRPC client when queries go to one presence service directly
    /// (for what only it serves, such as `Presence.Watch`).
    pub fn grpc(&self) -> Option<&GrpcClient> {
        match &self.source {
            Source::Broker => None,
            Source::Grpc(client) => Some(client),
        }
    }

    /// The room's members cluster-wide (with `after_node`/`after_seq`, as of
    /// that edge's change at least).
    pub async fn room_members(
        &self,
        req: RoomMembersRequest,
    ) -> Result<RoomMembersReply, QueryError> {
        match &self.source {
            Source::Broker => self.ask(subjects::PRESENCE_QUERY_ROOM_MEMBERS, req).await,
            Source::Grpc(client) => answer(client.clone().room_members(self.request(req)).await),
        }
    }

    /// Whether each user is online, and their connections.
    pub async fn user_status(&self, req: UserStatusRequest) -> Result<UserStatusReply, QueryError> {
        match &self.source {
            Source::Broker => self.ask(subjects::PRESENCE_QUERY_USER_STATUS, req).await,
            Source::Grpc(client) => answer(client.clone().user_status(self.request(req)).await),
        }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// Replicas answer broker queries in the gRPC API's own encoding, so one
    /// reply type serves both ways.
    async fn ask<Req: Message, Rep: Message + Default>(
        &self,
        subject: &str,
        req: Req,
    ) -> Result<Rep, QueryError> {
        let payload = Bytes::from(req.encode_to_vec());
        let deadline = tokio::time::Instant::now() + self.timeout;
        // The caller's trace (a gRPC call, a client's command) goes along.
        let headers = herald_broker::trace_headers(&tracing::Span::current());
        // A query is a read: asking again is harmless. An unanswered one
        // went to a replica that is gone or cut off (a subscription the
        // server has not yet dropped after a NATS stall, say), and the next
        // try reaches a live one, so the answer does not wait out the
        // whole timeout.
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let attempt = QUERY_ATTEMPT.min(left);
            let asked = match &headers {
                None => {
                    self.broker
                        .request(subject.to_string(), payload.clone(), attempt)
                        .await
                }
                Some(h) => {
                    self.broker
                        .request_with_headers(
                            subject.to_string(),
                            h.clone(),
                            payload.clone(),
                            attempt,
                        )
                        .await
                }
            };
            match asked {
                Ok(bytes) => return Rep::decode(bytes).map_err(QueryError::Unreadable),
                Err(BrokerError::Timeout(_)) if attempt < left => continue,
                Err(BrokerError::Timeout(_)) => {
                    return Err(QueryError::NoAnswer(BrokerError::Timeout(self.timeout)));
                }
                Err(e) => return Err(QueryError::NoAnswer(e)),
            }
        }
    }
}

/// A gRPC answer as a query's: the status is kept whole for fronts to pass on.
fn answer<T>(result: Result<tonic::Response<T>, Status>) -> Result<T, QueryError> {
    result
        .map(tonic::Response::into_inner)
        .map_err(QueryError::Grpc)
}
