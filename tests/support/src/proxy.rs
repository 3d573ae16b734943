//! A TCP proxy in front of a server, for faults that a real network has and
//! loopback does not: a server slow to read one client, answers that never
//! arrive, connections cut with bytes still in flight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A proxy to one upstream. Every connection made to [`Proxy::addr`] gets
/// its own connection to the upstream.
pub struct Proxy {
    addr: SocketAddr,
    faults: Arc<Faults>,
}

#[derive(Default)]
struct Faults {
    /// Drops what each client still sends, and what it sent that the proxy
    /// holds: as with a process that exits before its last bytes left.
    cut: AtomicBool,
    /// Drops the upstream's answers while set (the connections stay open):
    /// a link that only works one way, or a server that stopped answering.
    mute: AtomicBool,
}

impl Proxy {
    /// Starts a proxy to `upstream` that holds what each client sends for
    /// `delay` before passing it on; answers pass at once. Runs on the
    /// current tokio runtime.
    pub async fn start(upstream: SocketAddr, delay: Duration) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a proxy port");
        let addr = listener.local_addr().expect("proxy address");
        let faults = Arc::new(Faults::default());
        let shared = faults.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                relay(client, server, delay, shared.clone());
            }
        });
        Proxy { addr, faults }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `nats://` and the proxy's address.
    pub fn nats_url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// See [`Faults::cut`]. For good: nothing passes from clients after it.
    pub fn cut(&self) {
        self.faults.cut.store(true, Ordering::SeqCst);
    }

    /// See [`Faults::mute`].
    pub fn mute(&self, on: bool) {
        self.faults.mute.store(on, Ordering::SeqCst);
    }
}

fn relay(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    delay: Duration,
    faults: Arc<Faults>,
) {
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let answers = faults.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = server_rd.read(&mut buf).await {
            if answers.mute.load(Ordering::SeqCst) {
                continue;
            }
            if client_wr.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let sending = faults.clone();
    tokio::spawn(async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if sending.cut.load(Ordering::SeqCst) {
                return;
            }
            if server_wr.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = client_rd.read(&mut buf).await {
            let due = tokio::time::Instant::now() + delay;
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    });
}
