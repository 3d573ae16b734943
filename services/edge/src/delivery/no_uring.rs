//! The stand-in for io_uring where there is none (every system but Linux, or
//! a build with `--cfg herald_no_io_uring`): no thread ever has a ring, so
//! every write takes the plain `send(2)` path.

use std::io;
use std::ops::Range;
use std::os::fd::BorrowedFd;

use super::fanout::Sent;

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

/// A ring that is never made: [`Ring::take`] always answers `None`.
pub struct Ring(());

impl Ring {
    pub fn take() -> Option<Ring> {
        None
    }

    pub fn put_back(self) {
        unreachable!("no ring is made without io_uring")
    }

    pub fn send_all<'fd>(
        self,
        _wire: Vec<u8>,
        _sends: impl Iterator<Item = (BorrowedFd<'fd>, Range<usize>)>,
    ) -> io::Result<Sent> {
        unreachable!("no ring is made without io_uring")
    }
}
