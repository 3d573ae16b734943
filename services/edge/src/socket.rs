//! A client connection's socket, as the session reads it and the delivery
//! path writes it (`send(2)`, io_uring): the client's own TCP socket, or
//! one end of a socket pair whose other end a task of this edge relays to
//! the client (a TLS connection terminated here). Either way the session
//! and the delivery path see one file descriptor and never know which.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use tokio::io::{Interest, Ready};
use tokio::net::{TcpStream, UnixStream};

/// See the module doc.
#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    /// This edge's end of a socket pair; a relay task holds the other.
    Relayed(UnixStream),
}

impl Socket {
    pub async fn ready(&self, interest: Interest) -> io::Result<Ready> {
        match self {
            Socket::Tcp(s) => s.ready(interest).await,
            Socket::Relayed(s) => s.ready(interest).await,
        }
    }

    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.readable().await,
            Socket::Relayed(s) => s.readable().await,
        }
    }

    pub async fn writable(&self) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.writable().await,
            Socket::Relayed(s) => s.writable().await,
        }
    }

    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.try_read(buf),
            Socket::Relayed(s) => s.try_read(buf),
        }
    }

    /// Runs `f` (a raw I/O call on the descriptor) and, when it says
    /// `WouldBlock`, clears the runtime's readiness for `interest`.
    pub fn try_io<R>(
        &self,
        interest: Interest,
        f: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        match self {
            Socket::Tcp(s) => s.try_io(interest, f),
            Socket::Relayed(s) => s.try_io(interest, f),
        }
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Relayed(s) => s.as_fd(),
        }
    }
}

impl From<TcpStream> for Socket {
    fn from(s: TcpStream) -> Socket {
        Socket::Tcp(s)
    }
}

impl From<UnixStream> for Socket {
    fn from(s: UnixStream) -> Socket {
        Socket::Relayed(s)
    }
}
