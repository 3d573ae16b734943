//! Batched direct gets (nats-server 2.11 and later): one request that reads
//! the last message of several subjects of a stream (so that a connect reads
//! the inbox's last message and the user's read markers together), or the
//! next messages of one subject (a replay, or an unread count: each message
//! says how many of the subject's follow it).
//!
//! The server answers a batch with its messages, then an end-of-batch status
//! (`204 EOB`, saying how many messages are left), or only `404` when there
//! are none.
//! async-nats 0.51 has no API for it, and its request helper takes a single
//! answer, so the answers come to one subscription per process, on a reply
//! prefix of its own, and go to the waiting request by the reply subject's
//! last token: a batch costs the server no subscription of its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::message::StreamMessage;
use futures::StreamExt;
use tokio::sync::{OnceCell, mpsc};

/// Whether a server of this version (`2.11.0`, `v2.15.1-beta`) takes
/// per-message TTLs and batched direct gets.
pub fn supported(version: &str) -> bool {
    let mut parts = version.trim_start_matches('v').split(['.', '-']);
    let mut next = || parts.next().and_then(|p| p.parse::<u64>().ok());
    match (next(), next()) {
        (Some(major), Some(minor)) => (major, minor) >= (2, 11),
        _ => false,
    }
}

/// Why a batch got no complete answer.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("could not listen for the answers: {0}")]
    Subscribe(#[source] async_nats::SubscribeError),
    #[error("could not send the request: {0}")]
    Publish(#[source] async_nats::PublishError),
    #[error("the server answered {status}: {description}")]
    Refused { status: u16, description: String },
    #[error("an answer does not parse: {0}")]
    Parse(#[source] async_nats::jetstream::message::StreamMessageError),
    #[error("the answers stopped before the end of the batch")]
    Cut,
}

/// Bytes of messages a batch of the next messages asks for at most.
const MAX_BATCH_BYTES: usize = 1 << 20;

type Waiting = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<async_nats::Message>>>>;

/// Sends batched direct gets and routes their answers.
pub struct BatchGets {
    client: async_nats::Client,
    /// Replies go to `<prefix>.<id>`.
    prefix: String,
    waiting: Waiting,
    next: AtomicU64,
    /// The task routing answers, started with the first batch.
    router: OnceCell<tokio::task::JoinHandle<()>>,
}

impl BatchGets {
    pub fn new(client: async_nats::Client) -> BatchGets {
        let prefix = client.new_inbox();
        BatchGets {
            client,
            prefix,
            waiting: Arc::default(),
            next: AtomicU64::new(0),
            router: OnceCell::new(),
        }
    }

    async fn routed(&self) -> Result<(), BatchError> {
        self.router
            .get_or_try_init(|| async {
                let mut answers = self
                    .client
                    .subscribe(format!("{}.*", self.prefix))
                    .await
                    .map_err(BatchError::Subscribe)?;
                let waiting = self.waiting.clone();
                Ok(tokio::spawn(async move {
                    while let Some(answer) = answers.next().await {
                        let id = answer
                            .subject
                            .rsplit('.')
                            .next()
                            .and_then(|t| t.parse().ok());
                        let to =
                            id.and_then(|id| waiting.lock().expect("batches").get(&id).cloned());
                        // A batch given up on (timed out) has no one waiting.
                        if let Some(to) = to {
                            let _ = to.send(answer);
                        }
                    }
                    // The client is closed: the waiting batches end now.
                    waiting.lock().expect("batches").clear();
                }))
            })
            .await
            .map(|_| ())
    }

    /// The last message of each of `subjects` in `stream` that has one,
    /// in the server's order. Not bounded in time: the caller bounds it.
    pub async fn last_of(
        &self,
        stream: &str,
        subjects: &[&str],
    ) -> Result<Vec<StreamMessage>, BatchError> {
        let request = serde_json::json!({ "multi_last": subjects, "batch": subjects.len() });
        Ok(self.get(stream, request).await?.messages)
    }

    /// Up to `n` messages of `subject` in `stream` from sequence `from` on,
    /// oldest first, and how many of the subject's come after them.
    pub async fn next(
        &self,
        stream: &str,
        subject: &str,
        from: u64,
        n: usize,
    ) -> Result<Batch, BatchError> {
        let request = serde_json::json!({
            "seq": from,
            "next_by_subj": subject,
            "batch": n,
            // A long read comes in several batches rather than one large
            // one (the server sends at least one message whatever its size).
            "max_bytes": MAX_BATCH_BYTES,
        });
        self.get(stream, request).await
    }

    async fn get(&self, stream: &str, request: serde_json::Value) -> Result<Batch, BatchError> {
        self.routed().await?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.waiting.lock().expect("batches").insert(id, tx);
        // Forgets the batch however this returns, a timeout included.
        let _forget = Forget {
            waiting: &self.waiting,
            id,
        };
        self.client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{stream}"),
                format!("{}.{id}", self.prefix),
                request.to_string().into(),
            )
            .await
            .map_err(BatchError::Publish)?;
        let mut messages = Vec::new();
        while let Some(answer) = rx.recv().await {
            match answer.status.map(|s| s.as_u16()) {
                // A server before 2.11 answers with one plain message (it
                // takes the request for a single get), without the pending
                // count every message of a batch carries.
                None if answer.headers.as_ref().and_then(pending).is_none() => {
                    return Err(BatchError::Refused {
                        status: 200,
                        description: "a single message, not a batch (a server before 2.11)".into(),
                    });
                }
                None => messages.push(StreamMessage::try_from(answer).map_err(BatchError::Parse)?),
                Some(204) => {
                    let left = answer.headers.as_ref().and_then(pending).unwrap_or(0);
                    return Ok(Batch { messages, left });
                }
                // Nothing to send.
                Some(404) if messages.is_empty() => return Ok(Batch { messages, left: 0 }),
                Some(status) => {
                    return Err(BatchError::Refused {
                        status,
                        description: answer.description.unwrap_or_default(),
                    });
                }
            }
        }
        Err(BatchError::Cut)
    }
}

/// A batch's messages, and how many more the request would have matched
/// (from the end-of-batch status: the messages' own pending counts differ
/// between server versions, counting themselves on 2.11).
pub struct Batch {
    pub messages: Vec<StreamMessage>,
    pub left: u64,
}

/// The `Nats-Num-Pending` of a batch's message or of its end.
fn pending(headers: &async_nats::HeaderMap) -> Option<u64> {
    headers
        .get("Nats-Num-Pending")?
        .as_str()
        .trim()
        .parse()
        .ok()
}

impl Drop for BatchGets {
    fn drop(&mut self) {
        if let Some(router) = self.router.get() {
            router.abort();
        }
    }
}

struct Forget<'a> {
    waiting: &'a Waiting,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.waiting.lock().expect("batches").remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_servers_batch() {
        for old in ["2.9.10", "2.10.24", "v2.10.0-beta.1", "", "two"] {
            assert!(!supported(old), "{old}");
        }
        for new in ["2.11.0", "2.15.1", "v2.12.0-RC.2", "3.0.0"] {
            assert!(supported(new), "{new}");
        }
    }
}
