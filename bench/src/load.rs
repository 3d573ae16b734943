//! Opening client connections for load: edges and source addresses in turn.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use herald_client::{Client, ClientError, Frame, Tap};

/// How long a worker pauses after a failed connect before it tries again,
/// so that a refusing server is not hammered in a tight loop.
pub const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Opens connections to the edges of the target, each from the next of the
/// source addresses (127.0.0.2, 127.0.0.3, ...): one source address has
/// only ~28k ephemeral ports, and churn leaves sockets in TIME_WAIT.
pub struct Dialer {
    urls: Vec<String>,
    sources: Vec<IpAddr>,
    next_source: AtomicUsize,
}

impl Dialer {
    pub fn new(urls: Vec<String>, sources: Vec<IpAddr>) -> Dialer {
        assert!(!urls.is_empty() && !sources.is_empty());
        Dialer {
            urls,
            sources,
            next_source: AtomicUsize::new(0),
        }
    }

    pub fn edges(&self) -> usize {
        self.urls.len()
    }

    /// Connects to edge `edge % edges` and authenticates with `token`;
    /// returns the client and its `connected` frame.
    pub async fn connect(&self, edge: usize, token: &str) -> Result<(Client, Frame), ClientError> {
        Client::connect_from(self.url(edge), token, Some(self.source())).await
    }

    /// [`Dialer::connect`] with `tap` seeing every frame first.
    pub async fn connect_tapped(
        &self,
        edge: usize,
        token: &str,
        tap: Tap,
    ) -> Result<(Client, Frame), ClientError> {
        Client::connect_tapped(self.url(edge), token, Some(self.source()), tap).await
    }

    fn url(&self, edge: usize) -> &str {
        &self.urls[edge % self.urls.len()]
    }

    /// The next source address, in turn.
    fn source(&self) -> IpAddr {
        let i = self.next_source.fetch_add(1, Ordering::Relaxed);
        self.sources[i % self.sources.len()]
    }
}
