//! The stand-in for io_uring where there is none (every system but Linux, or
//! a build with `--cfg herald_no_io_uring`): no thread ever has a ring, so
//! every write takes the plain `send(2)` path.

use std::io;
use std::ops::Range;
use std::os::fd::BorrowedFd;

use super::fanout::RUN;

pub fn enable(on: bool) -> io::Result<bool> {
    if on {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring exists only on Linux",
        ));
    }
    Ok(false)
}

pub fn disable() {}

/// A ring that cannot exist.
pub enum Ring {}

pub struct Sent {
    pub ring: Ring,
    pub wire: Vec<u8>,
    pub results: [i32; RUN],
}

impl Ring {
    pub fn take() -> Option<Ring> {
        None
    }

    pub fn put_back(self) {
        match self {}
    }

    pub fn send_all<'fd>(
        self,
        _wire: Vec<u8>,
        _sends: impl Iterator<Item = (BorrowedFd<'fd>, Range<usize>)>,
    ) -> io::Result<Sent> {
        match self {}
    }
}
