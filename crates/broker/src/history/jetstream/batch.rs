//! Batched direct gets (nats-server 2.11 and later): one request that reads
//! the last message of several subjects of a stream, so that a connect reads
//! the inbox's last message and the user's read markers together.
//!
//! The server answers a batch with one message per subject that has one,
//! then an end-of-batch status (`204 EOB`), or only `404` when none has.
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
        self.routed().await?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.waiting.lock().expect("batches").insert(id, tx);
        // Forgets the batch however this returns, a timeout included.
        let _forget = Forget {
            waiting: &self.waiting,
            id,
        };
        let request = serde_json::json!({ "multi_last": subjects, "batch": subjects.len() });
        self.client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{stream}"),
                format!("{}.{id}", self.prefix),
                request.to_string().into(),
            )
            .await
            .map_err(BatchError::Publish)?;
        let mut found = Vec::with_capacity(subjects.len());
        while let Some(answer) = rx.recv().await {
            match answer.status.map(|s| s.as_u16()) {
                None => found.push(StreamMessage::try_from(answer).map_err(BatchError::Parse)?),
                // End of batch.
                Some(204) => return Ok(found),
                // No subject has a message.
                Some(404) if found.is_empty() => return Ok(found),
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
