//! Publishes that may wait a moment, handed to the broker together.
//!
//! Every message a process publishes costs the NATS server a wake-up to read
//! it and one to write it to each subscriber, and on a busy cluster those
//! wake-ups, not the bytes, are most of the server's work. Messages handed
//! to the client together leave in one write, which the server reads at
//! once and answers with one write per subscriber. A [`Coalescer`] does that
//! for messages that can wait, in two kinds:
//!
//! - [`Coalescer::publish`]: one a client waits on (a presence event). It
//!   goes at once if nothing went out within the last window; otherwise it
//!   waits for the window's end.
//! - [`Coalescer::publish_lazy`]: one nobody waits on (a presence report).
//!   It waits a window, or less if an urgent one goes out first and takes it
//!   along.
//!
//! Batches with an urgent message go out at most once a window, and every
//! batch in the order its messages came, so the window only delays traffic
//! that is already dense; a lazy message never holds up an urgent one. A
//! backlog (a full batch with more waiting) goes out at once, batch after
//! batch.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::{BrokerError, Headers, SharedBroker};

/// The most messages handed over in one go; the rest wait for the next.
const MAX_BATCH: usize = 256;

struct Pending {
    subject: String,
    headers: Option<Headers>,
    payload: Bytes,
    urgent: bool,
    done: oneshot::Sender<Result<(), BrokerError>>,
}

/// A publisher that gathers what is published within a window; cheap to clone.
#[derive(Clone)]
pub struct Coalescer {
    /// `None`: a window of zero, every publish goes straight to the broker.
    tx: Option<mpsc::UnboundedSender<Pending>>,
    broker: SharedBroker,
}

impl Coalescer {
    /// Starts the task that hands messages to `broker`; it ends when the last
    /// clone is dropped. A `window` of zero starts none.
    pub fn start(broker: SharedBroker, window: Duration) -> Coalescer {
        if window.is_zero() {
            return Coalescer { tx: None, broker };
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(broker.clone(), window, rx));
        Coalescer {
            tx: Some(tx),
            broker,
        }
    }

    /// Publishes `payload` on `subject`, at once unless a batch went out
    /// within the window; returns once the broker has the message (as
    /// [`crate::Broker::publish`] would), so what the caller publishes next,
    /// through any path, follows it.
    pub async fn publish(
        &self,
        subject: String,
        headers: Option<Headers>,
        payload: Bytes,
    ) -> Result<(), BrokerError> {
        self.send(subject, headers, payload, true).await
    }

    /// [`Coalescer::publish`] for a message that may wait a whole window
    /// for others to go with.
    pub async fn publish_lazy(
        &self,
        subject: String,
        headers: Option<Headers>,
        payload: Bytes,
    ) -> Result<(), BrokerError> {
        self.send(subject, headers, payload, false).await
    }

    async fn send(
        &self,
        subject: String,
        headers: Option<Headers>,
        payload: Bytes,
        urgent: bool,
    ) -> Result<(), BrokerError> {
        let Some(tx) = &self.tx else {
            return self
                .broker
                .publish_maybe_headers(subject, headers, payload)
                .await;
        };
        let (done, handed) = oneshot::channel();
        let pending = Pending {
            subject,
            headers,
            payload,
            urgent,
            done,
        };
        if let Err(mpsc::error::SendError(p)) = tx.send(pending) {
            // The task is gone (runtime shutting down): publish directly.
            return self
                .broker
                .publish_maybe_headers(p.subject, p.headers, p.payload)
                .await;
        }
        handed
            .await
            .unwrap_or_else(|_| Err(BrokerError::unavailable("the publishing task ended")))
    }
}

async fn run(broker: SharedBroker, window: Duration, mut rx: mpsc::UnboundedReceiver<Pending>) {
    // When the last batch with an urgent message went out: the next urgent
    // one waits until a window after it, so that everything published
    // meanwhile goes with it. Batches of lazy messages alone do not count:
    // they never hold up an urgent one.
    let mut last_urgent: Option<Instant> = None;
    // The last batch was full and more were waiting: a backlog, which goes
    // out at once, batch after batch, with nothing to wait for.
    let mut hurry = false;
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        let now = Instant::now();
        let urgent_due = |now: Instant| match last_urgent {
            Some(last) if !hurry => (last + window).max(now),
            _ => now,
        };
        let mut urgent = first.urgent;
        let mut due = if urgent {
            urgent_due(now)
        } else if hurry {
            now
        } else {
            now + window
        };
        batch.push(first);
        // Until an urgent message comes, one may bring the batch forward.
        while !urgent && batch.len() < MAX_BATCH && Instant::now() < due {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(p) => {
                        if p.urgent {
                            urgent = true;
                            due = due.min(urgent_due(Instant::now()));
                        }
                        batch.push(p);
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(due) => break,
            }
        }
        if batch.len() < MAX_BATCH && Instant::now() < due {
            tokio::time::sleep_until(due).await;
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => {
                    urgent |= next.urgent;
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        hurry = batch.len() >= MAX_BATCH;
        for p in batch.drain(..) {
            let result = broker
                .publish_maybe_headers(p.subject, p.headers, p.payload)
                .await;
            let _ = p.done.send(result);
        }
        if urgent {
            last_urgent = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::MemoryBroker;

    const WINDOW: Duration = Duration::from_millis(20);

    fn payload(i: u32) -> Bytes {
        Bytes::from(i.to_string())
    }

    #[tokio::test(start_paused = true)]
    async fn a_publish_after_a_quiet_spell_goes_at_once() {
        let broker: SharedBroker = Arc::new(MemoryBroker::new());
        let mut sub = broker.subscribe("ev.>".into()).await.unwrap();
        let coalescer = Coalescer::start(broker.clone(), WINDOW);
        let start = Instant::now();
        coalescer
            .publish("ev.a".into(), None, payload(1))
            .await
            .unwrap();
        assert_eq!(sub.next().await.unwrap().payload, payload(1));
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    /// Publishes right behind a batch are held until the window ends, go
    /// together and in order, and each caller returns only once its message
    /// is with the broker.
    #[tokio::test(start_paused = true)]
    async fn publishes_right_behind_a_batch_wait_for_the_window_and_keep_their_order() {
        let broker: SharedBroker = Arc::new(MemoryBroker::new());
        let mut sub = broker.subscribe("ev.>".into()).await.unwrap();
        let coalescer = Coalescer::start(broker.clone(), WINDOW);
        let start = Instant::now();
        coalescer
            .publish("ev.a".into(), None, payload(0))
            .await
            .unwrap();
        let mut callers = Vec::new();
        for i in 1..=5 {
            let coalescer = coalescer.clone();
            callers.push(tokio::spawn(async move {
                coalescer
                    .publish(format!("ev.{i}"), None, payload(i))
                    .await
                    .unwrap();
                start.elapsed()
            }));
            // Each caller queued before the next starts: their order is known.
            tokio::task::yield_now().await;
        }
        for caller in callers {
            assert_eq!(caller.await.unwrap(), WINDOW, "returned when handed over");
        }
        for i in 0..=5 {
            let msg = sub.next().await.unwrap();
            assert_eq!(msg.payload, payload(i));
        }
        // And quiet again after a window: at once.
        tokio::time::sleep(WINDOW).await;
        let again = Instant::now();
        coalescer
            .publish("ev.b".into(), None, payload(9))
            .await
            .unwrap();
        assert_eq!(again.elapsed(), Duration::ZERO);
        assert_eq!(sub.next().await.unwrap().payload, payload(9));
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_of_zero_publishes_directly() {
        let broker: SharedBroker = Arc::new(MemoryBroker::new());
        let mut sub = broker.subscribe("ev.>".into()).await.unwrap();
        let coalescer = Coalescer::start(broker.clone(), Duration::ZERO);
        let start = Instant::now();
        for i in 0..3 {
            coalescer
                .publish("ev.a".into(), None, payload(i))
                .await
                .unwrap();
        }
        for i in 0..3 {
            assert_eq!(sub.next().await.unwrap().payload, payload(i));
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    /// A lazy message waits a window, unless an urgent one after a quiet
    /// spell goes first and takes it along.
    #[tokio::test(start_paused = true)]
    async fn a_lazy_publish_waits_a_window_or_goes_with_an_urgent_one() {
        let broker: SharedBroker = Arc::new(MemoryBroker::new());
        let mut sub = broker.subscribe("ev.>".into()).await.unwrap();
        let coalescer = Coalescer::start(broker.clone(), WINDOW);

        let start = Instant::now();
        coalescer
            .publish_lazy("ev.report".into(), None, payload(1))
            .await
            .unwrap();
        assert_eq!(start.elapsed(), WINDOW, "alone, it waits a window");
        assert_eq!(sub.next().await.unwrap().payload, payload(1));

        tokio::time::sleep(WINDOW).await;
        let start = Instant::now();
        let lazy = {
            let coalescer = coalescer.clone();
            tokio::spawn(async move {
                coalescer
                    .publish_lazy("ev.report".into(), None, payload(2))
                    .await
                    .unwrap();
                start.elapsed()
            })
        };
        tokio::task::yield_now().await;
        coalescer
            .publish("ev.event".into(), None, payload(3))
            .await
            .unwrap();
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "the urgent one waits for nothing"
        );
        assert_eq!(
            lazy.await.unwrap(),
            Duration::ZERO,
            "and takes the lazy one along"
        );
        assert_eq!(sub.next().await.unwrap().payload, payload(2));
        assert_eq!(sub.next().await.unwrap().payload, payload(3));
    }

    /// A batch of lazy messages alone does not make the next urgent one wait.
    #[tokio::test(start_paused = true)]
    async fn a_batch_of_lazy_messages_alone_holds_up_no_urgent_one() {
        let broker: SharedBroker = Arc::new(MemoryBroker::new());
        let mut sub = broker.subscribe("ev.>".into()).await.unwrap();
        let coalescer = Coalescer::start(broker.clone(), WINDOW);
        coalescer
            .publish_lazy("ev.report".into(), None, payload(1))
            .await
            .unwrap();
        assert_eq!(sub.next().await.unwrap().payload, payload(1));
        let start = Instant::now();
        coalescer
            .publish("ev.event".into(), None, payload(2))
            .await
            .unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(sub.next().await.unwrap().payload, payload(2));
    }

    /// More than a batch waiting goes out batch after batch, in order,
    /// without a window between them.
    #[tokio::test(start_paused = true)]
    async fn a_backlog_goes_out_without_waiting_between_batches() {
        let broker: SharedBroker = Arc::new(MemoryBroker::new());
        let mut sub = broker.subscribe("ev.>".into()).await.unwrap();
        let coalescer = Coalescer::start(broker.clone(), WINDOW);
        coalescer
            .publish("ev.a".into(), None, payload(0))
            .await
            .unwrap();
        let start = Instant::now();
        let n = MAX_BATCH as u32 * 3 + 5;
        let mut callers = Vec::new();
        for i in 1..=n {
            let coalescer = coalescer.clone();
            callers.push(tokio::spawn(async move {
                coalescer
                    .publish(format!("ev.{i}"), None, payload(i))
                    .await
                    .unwrap();
                start.elapsed()
            }));
        }
        for caller in callers {
            // The first batch waits the window behind the lone one; the
            // others follow it at once.
            assert_eq!(caller.await.unwrap(), WINDOW);
        }
        for i in 0..=n {
            assert_eq!(sub.next().await.unwrap().payload, payload(i));
        }
    }
}
