//! TLS on the edge (`--tls-cert`, `--tls-key`), for deployments that have
//! no ingress or load balancer terminating it. The hot path stays what it
//! is for plain connections: each TLS connection gets a socket pair, HTTP
//! and then the session run on one end exactly as on a TCP socket (the
//! delivery path still writes one file descriptor with send(2) or
//! io_uring), and a relay task of this module moves bytes between the
//! other end and rustls. The certificate is re-read when its files change
//! (cert-manager rotates them in place): new handshakes get the new one,
//! open connections keep theirs.

use std::io::{self, BufRead, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use herald_ops::tls::TlsError;
use rustls::server::{ServerConfig, ServerConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use herald_ops::tls::HANDSHAKE_TIMEOUT;

/// Once the session has said its last byte and the client was sent
/// close_notify, how long the client may take to close its side. Closing
/// a socket that still has unread data resets it, and a reset can make
/// the client lose the end of what it was sent.
const LINGER: Duration = Duration::from_secs(2);

/// Once the session has closed, how long a client that does not read may
/// take to be sent what is left; then the relay gives up on it.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);

/// The most session output read at once; rustls seals it into records.
const CHUNK: usize = 16 * 1024;

/// The edge's certificate chain and key, from PEM files re-read when they
/// change. Cheap to clone.
pub type TlsCert = herald_ops::tls::Reloadable<ServerConfig>;

/// Loads the certificate chain (the server's own first) and its key.
pub fn load_cert(cert_path: &Path, key_path: &Path) -> Result<TlsCert, TlsError> {
    // WebSockets and the health routes are HTTP/1.1 only.
    herald_ops::tls::server(cert_path, key_path, &[b"http/1.1"], None)
}

/// Terminates TLS for the HTTP server: handshakes, and relays each
/// connection through a socket pair.
#[derive(Clone)]
pub(crate) struct Terminator {
    cert: TlsCert,
    relays: TaskTracker,
    stop: CancellationToken,
}

impl Terminator {
    /// Starts watching `cert`'s files until `stop`, which also ends every
    /// relay still running.
    pub(crate) fn new(cert: &TlsCert, stop: CancellationToken) -> Terminator {
        cert.watch(stop.clone());
        Terminator {
            cert: cert.clone(),
            relays: TaskTracker::new(),
            stop,
        }
    }

    /// The relays still running.
    pub(crate) fn relays(&self) -> &TaskTracker {
        &self.relays
    }

    /// Does the TLS handshake on `tcp` and starts its relay; returns the
    /// end of the socket pair that HTTP is served on, `None` when the
    /// client did not complete a handshake.
    pub(crate) async fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> Option<UnixStream> {
        let mut first = [0u8; 1];
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
            Ok(Ok(1)) => {}
            _ => return None,
        }
        // 22 opens every TLS handshake; a letter, a plain HTTP request.
        if first[0] != 22 {
            if first[0].is_ascii_alphabetic() {
                refuse_plain(tcp).await;
            }
            return None;
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(self.cert.current());
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return None;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake took over {HANDSHAKE_TIMEOUT:?}; closed");
                return None;
            }
        };
        let (tcp, conn) = tls.into_inner();
        let (http, relayed) = match UnixStream::pair() {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors, mostly.
                tracing::warn!(%peer, error = %e, "no socket pair for a TLS connection; closed");
                return None;
            }
        };
        let relay = Relay {
            tcp,
            tls: conn,
            pair: relayed,
            client_done: false,
            session_done: false,
            pair_write_shut: false,
            tcp_write_shut: false,
            session_closed: false,
        };
        self.relays.spawn(relay.run(self.stop.clone()));
        Some(http)
    }
}

/// Answers a plain HTTP request on the TLS port in plain words, rather
/// than with TLS bytes the client cannot read.
async fn refuse_plain(mut tcp: TcpStream) {
    const BODY: &str = "This server speaks TLS only: use wss:// (or https://).\n";
    let quick = Duration::from_secs(1);
    // The request is read first: closing on unread bytes would reset the
    // connection and could lose the answer.
    let mut request = [0u8; 4096];
    let _ = tokio::time::timeout(quick, tcp.read(&mut request)).await;
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(quick, async {
        tcp.write_all(answer.as_bytes()).await?;
        tcp.shutdown().await?;
        while tcp.read(&mut request).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

/// One TLS connection's relay: client ⇄ rustls ⇄ socket pair ⇄ session.
/// It holds no buffer of its own while idle (rustls keeps its record
/// buffer); session output is read in [`CHUNK`]s on the stack and sealed
/// at once, and only once all of it is on its way to the client is more
/// read, so that a slow client slows the session's writes, as a full TCP
/// socket would.
struct Relay {
    tcp: TcpStream,
    tls: ServerConnection,
    /// The relay's end of the pair.
    pair: UnixStream,
    /// The client closed (close_notify, or EOF without it).
    client_done: bool,
    /// The session closed its end (EOF) or is gone; close_notify is queued.
    session_done: bool,
    /// The session is told of the client's end, or gone: what the client
    /// still sends is dropped.
    pair_write_shut: bool,
    /// close_notify went out and the TCP write side is shut.
    tcp_write_shut: bool,
    /// The session shut its end or is gone, seen while the client was not
    /// reading: what is left gets [`CLOSE_FLUSH`] to go out.
    session_closed: bool,
}

/// What the relay waits for on each socket; `None`: nothing.
type Wait = (Option<Interest>, Option<Interest>);

/// What became of the plaintext rustls held for the session.
enum Decrypted {
    /// None held; more must be read from the client.
    Nothing,
    /// Some went to the session (or was dropped, the session being gone).
    Passed,
    /// The socket pair is full: the session is behind.
    SessionFull,
    SessionGone,
    /// The client closed.
    End,
}

impl Relay {
    async fn run(mut self, stop: CancellationToken) {
        let mut linger = None;
        // Set once the session closed while the client was not reading.
        let mut flush = None;
        loop {
            let (tcp, pair) = match self.pump() {
                Ok(Some(wait)) => wait,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "TLS connection ended");
                    return;
                }
            };
            if tcp.is_none() && pair.is_none() {
                return;
            }
            if self.tcp_write_shut && linger.is_none() {
                linger = Some(Instant::now() + LINGER);
            }
            if self.session_closed && flush.is_none() {
                flush = Some(Instant::now() + CLOSE_FLUSH);
            }
            let deadline = linger.into_iter().chain(flush).min();
            tokio::select! {
                r = ready(tcp.map(|i| self.tcp.ready(i))) => if r.is_err() { return },
                r = ready(pair.map(|i| self.pair.ready(i))) => match r {
                    Ok(ready) => self.session_closed |= ready.is_read_closed(),
                    Err(_) => return,
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => return,
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Moves whatever can move without waiting; then says what to wait
    /// for, or `None` when both sides are done.
    fn pump(&mut self) -> io::Result<Option<Wait>> {
        loop {
            let mut moved = false;
            let (mut tcp, mut pair) = (None, None);
            // Client → session: what rustls has decrypted.
            let decrypted = {
                let mut reader = self.tls.reader();
                match reader.fill_buf() {
                    Ok([]) => Decrypted::End,
                    Ok(data) => {
                        let written = if self.pair_write_shut {
                            Ok(data.len())
                        } else {
                            self.pair.try_write(data)
                        };
                        match written {
                            Ok(n) => {
                                reader.consume(n);
                                Decrypted::Passed
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                Decrypted::SessionFull
                            }
                            Err(_) => Decrypted::SessionGone,
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Decrypted::Nothing,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Decrypted::End,
                    Err(e) => return Err(e),
                }
            };
            match decrypted {
                Decrypted::End => moved |= self.client_finished(),
                Decrypted::Passed => moved = true,
                Decrypted::SessionFull => pair = add(pair, Interest::WRITABLE),
                Decrypted::SessionGone => moved |= self.session_finished(true),
                // More records from the client, only once the session took
                // everything decrypted before.
                Decrypted::Nothing => match self.tls.read_tls(&mut TcpIo(&self.tcp)) {
                    Ok(_) => {
                        moved = true;
                        if let Err(e) = self.tls.process_new_packets() {
                            // Tell the client why (an alert), as far as it goes.
                            let _ = self.tls.write_tls(&mut TcpIo(&self.tcp));
                            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        tcp = add(tcp, Interest::READABLE);
                    }
                    Err(e) => return Err(e),
                },
            }
            // Session → client, once what was sealed before has gone out.
            if !self.session_done && !self.tls.wants_write() {
                let mut chunk = [0u8; CHUNK];
                match self.pair.try_read(&mut chunk) {
                    Ok(0) => moved |= self.session_finished(false),
                    Ok(n) => {
                        self.tls.writer().write_all(&chunk[..n])?;
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        pair = add(pair, Interest::READABLE);
                    }
                    Err(_) => moved |= self.session_finished(true),
                }
            } else if !self.session_done && !self.session_closed {
                // The client is not taking what it was sent. Its session may
                // close meanwhile (a slow consumer is closed), and that must
                // be seen without reading on: tokio's readiness is cleared,
                // so the next wake-up is the session's next write or its
                // close (a close stays set).
                let _ = self.pair.try_io(Interest::READABLE, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
                pair = add(pair, Interest::READABLE);
            }
            while self.tls.wants_write() {
                match self.tls.write_tls(&mut TcpIo(&self.tcp)) {
                    Ok(_) => moved = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        tcp = add(tcp, Interest::WRITABLE);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if self.session_done && !self.tls.wants_write() && !self.tcp_write_shut {
                self.tcp_write_shut = true;
                let _ = socket2::SockRef::from(&self.tcp).shutdown(std::net::Shutdown::Write);
            }
            if moved {
                continue;
            }
            if self.client_done && self.tcp_write_shut {
                return Ok(None);
            }
            return Ok(Some((tcp, pair)));
        }
    }

    /// The client will send nothing more: the session sees EOF. `true`
    /// the first time.
    fn client_finished(&mut self) -> bool {
        if self.client_done {
            return false;
        }
        self.client_done = true;
        if !self.pair_write_shut {
            self.pair_write_shut = true;
            let _ = socket2::SockRef::from(&self.pair).shutdown(std::net::Shutdown::Write);
        }
        true
    }

    /// The session said its last byte (or, `gone`, cannot take more):
    /// the client is sent close_notify. `true` when something changed.
    fn session_finished(&mut self, gone: bool) -> bool {
        let changed = (gone && !self.pair_write_shut) || !self.session_done;
        if gone {
            self.pair_write_shut = true;
        }
        if !self.session_done {
            self.session_done = true;
            self.tls.send_close_notify();
        }
        changed
    }
}

fn add(wait: Option<Interest>, interest: Interest) -> Option<Interest> {
    Some(wait.map_or(interest, |w| w.add(interest)))
}

/// Waits for `interest` on a socket; forever for `None`.
async fn ready(
    ready: Option<impl Future<Output = io::Result<tokio::io::Ready>>>,
) -> io::Result<tokio::io::Ready> {
    match ready {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// The client's socket as rustls reads and writes it: without waiting, a
/// `WouldBlock` clearing tokio's readiness.
struct TcpIo<'a>(&'a TcpStream);

impl io::Read for TcpIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl io::Write for TcpIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use tokio::net::TcpListener;

    /// A self-signed certificate for `localhost`: (cert PEM, key PEM, cert DER).
    fn self_signed() -> (String, String, CertificateDer<'static>) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        (
            c.cert.pem(),
            c.signing_key.serialize_pem(),
            c.cert.der().clone(),
        )
    }

    struct Files {
        _dir: tempfile::TempDir,
        cert: PathBuf,
        key: PathBuf,
    }

    impl Files {
        fn new(cert: &str, key: &str) -> Files {
            let dir = tempfile::tempdir().unwrap();
            let files = Files {
                cert: dir.path().join("tls.crt"),
                key: dir.path().join("tls.key"),
                _dir: dir,
            };
            files.write(cert, key);
            files
        }

        fn write(&self, cert: &str, key: &str) {
            std::fs::write(&self.cert, cert).unwrap();
            std::fs::write(&self.key, key).unwrap();
        }
    }

    /// A listener whose every connection is handed, once its TLS handshake
    /// is done, to `session` (the socket pair's HTTP end).
    async fn edge<F, Fut>(cert: &TlsCert, session: F) -> (SocketAddr, Terminator)
    where
        F: Fn(UnixStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let terminator = Terminator::new(cert, CancellationToken::new());
        let t = terminator.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = listener.accept().await.unwrap();
                if let Some(http) = t.accept(tcp, peer).await {
                    tokio::spawn(session(http));
                }
            }
        });
        (addr, terminator)
    }

    async fn connect(
        addr: SocketAddr,
        trusted: &CertificateDer<'static>,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trusted.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    }

    /// The certificate a new handshake presents (trusting only `trusted`).
    async fn presented(addr: SocketAddr, trusted: &CertificateDer<'static>) -> bool {
        match connect(addr, trusted).await {
            Ok(tls) => tls.get_ref().1.peer_certificates().unwrap()[0] == *trusted,
            Err(_) => false,
        }
    }

    async fn echo(mut http: UnixStream) {
        let (mut r, mut w) = http.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    }

    #[tokio::test]
    async fn bytes_go_both_ways_and_the_client_close_reaches_the_session() {
        let (cert, key, der) = self_signed();
        let files = Files::new(&cert, &key);
        let cert = load_cert(&files.cert, &files.key).unwrap();
        let (addr, terminator) = edge(&cert, echo).await;
        let tls = connect(addr, &der).await.unwrap();
        let (mut r, mut w) = tokio::io::split(tls);
        // More than every buffer on the way holds: the relay must wait on
        // the slower side in both directions.
        let sent: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&to_send).await.unwrap();
            // close_notify: the session sees EOF, echoes its own close.
            w.shutdown().await.unwrap();
        });
        let mut echoed = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut echoed))
            .await
            .expect("echo within 20s")
            .expect("a clean close_notify at the end");
        writer.await.unwrap();
        assert!(
            echoed == sent,
            "echoed {} bytes of {}",
            echoed.len(),
            sent.len()
        );
        drop(r);
        terminator.relays().close();
        tokio::time::timeout(Duration::from_secs(1), terminator.relays().wait())
            .await
            .expect("the relay ends once both sides closed");
    }

    #[tokio::test]
    async fn the_session_close_reaches_the_client_and_ends_the_relay() {
        let (cert, key, der) = self_signed();
        let files = Files::new(&cert, &key);
        let cert = load_cert(&files.cert, &files.key).unwrap();
        let (addr, terminator) = edge(&cert, |mut http: UnixStream| async move {
            http.write_all(b"bye").await.unwrap();
            // The session drops its end without shutting down first.
        })
        .await;
        let mut tls = connect(addr, &der).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut got))
            .await
            .unwrap()
            .expect("close_notify, not a bare EOF");
        assert_eq!(got, b"bye");
        // The client says nothing more and does not close: the relay waits
        // out its linger and ends anyway.
        terminator.relays().close();
        tokio::time::timeout(LINGER * 2, terminator.relays().wait())
            .await
            .expect("the relay ends after its linger");
        drop(tls);
    }

    #[tokio::test]
    async fn a_client_that_reads_nothing_does_not_keep_a_closed_session_relay() {
        let (cert, key, der) = self_signed();
        let files = Files::new(&cert, &key);
        let cert = load_cert(&files.cert, &files.key).unwrap();
        let (addr, terminator) = edge(&cert, |mut http: UnixStream| async move {
            // Fill every buffer on the way, then give up, as a session does
            // with a slow consumer.
            let flood = vec![7u8; 64 << 20];
            let _ = tokio::time::timeout(Duration::from_secs(1), http.write_all(&flood)).await;
        })
        .await;
        let tls = connect(addr, &der).await.unwrap();
        // The server side may finish its handshake a moment after ours.
        while terminator.relays().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        terminator.relays().close();
        tokio::time::timeout(
            CLOSE_FLUSH + Duration::from_secs(3),
            terminator.relays().wait(),
        )
        .await
        .expect("the relay gives up on a client that does not read");
        drop(tls);
    }

    #[tokio::test]
    async fn a_client_gone_without_close_notify_ends_the_session() {
        let (cert, key, der) = self_signed();
        let files = Files::new(&cert, &key);
        let cert = load_cert(&files.cert, &files.key).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = Mutex::new(Some(tx));
        let (addr, _terminator) = edge(&cert, move |mut http: UnixStream| {
            let tx = tx.lock().unwrap().take();
            async move {
                let mut got = Vec::new();
                let _ = http.read_to_end(&mut got).await;
                let _ = tx.unwrap().send(got);
            }
        })
        .await;
        let mut tls = connect(addr, &der).await.unwrap();
        tls.write_all(b"hello").await.unwrap();
        tls.flush().await.unwrap();
        // The TCP connection closes under TLS, as when a client crashes.
        drop(tls);
        let got = tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("the session sees EOF")
            .unwrap();
        assert_eq!(got, b"hello");
    }

    #[tokio::test]
    async fn new_handshakes_get_a_reloaded_certificate_and_bad_files_change_nothing() {
        let (cert_a, key_a, der_a) = self_signed();
        let (cert_b, key_b, der_b) = self_signed();
        let files = Files::new(&cert_a, &key_a);
        let cert = load_cert(&files.cert, &files.key).unwrap();
        let (addr, _terminator) = edge(&cert, echo).await;
        assert!(presented(addr, &der_a).await);
        assert!(!cert.refresh().await.unwrap(), "nothing changed");

        // Half rotated: the new certificate with the old key.
        files.write(&cert_b, &key_a);
        let e = cert.refresh().await.unwrap_err();
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
        assert!(presented(addr, &der_a).await, "the old certificate stays");
        files.write("not a certificate", &key_b);
        assert!(matches!(
            cert.refresh().await.unwrap_err(),
            TlsError::NoCertificate(_)
        ));
        assert!(presented(addr, &der_a).await);

        files.write(&cert_b, &key_b);
        assert!(cert.refresh().await.unwrap());
        assert!(presented(addr, &der_b).await);
        assert!(!presented(addr, &der_a).await);
    }

    #[tokio::test]
    async fn plain_http_on_the_tls_port_gets_a_plain_refusal() {
        let (cert, key, _) = self_signed();
        let files = Files::new(&cert, &key);
        let cert = load_cert(&files.cert, &files.key).unwrap();
        let (addr, _terminator) = edge(&cert, echo).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        assert!(answer.contains("use wss://"), "{answer}");
    }

    #[test]
    fn bad_files_are_named() {
        let (cert, key, _) = self_signed();
        let (_, other_key, _) = self_signed();
        let files = Files::new(&cert, &other_key);
        let e = load_cert(&files.cert, &files.key).err().unwrap();
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
        assert!(e.to_string().contains("tls.key"), "{e}");
        files.write(&cert, "");
        let e = load_cert(&files.cert, &files.key).err().unwrap();
        assert!(
            e.to_string().contains("tls.key holds no PEM private key"),
            "{e}"
        );
        let missing = files.cert.with_file_name("missing.crt");
        let e = load_cert(&missing, &files.key).err().unwrap();
        assert!(e.to_string().starts_with("cannot read "), "{e}");
        assert!(e.to_string().contains("missing.crt"), "{e}");
        let _ = key;
    }
}
