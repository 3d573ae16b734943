//! Herald's client wire protocol (protocol v1): the JSON frames clients and
//! edges exchange, room names and their broker subjects, and the catalogue of
//! error and close codes. Everything here is pure data handling so that edges,
//! the router, SDK tests and fuzzers share one definition of the contract.
#![forbid(unsafe_code)]

pub mod codes;
pub mod frames;
pub mod presence;
pub mod quota;
pub mod reply;
pub mod room;
pub mod subjects;

pub use codes::{CloseCode, ErrorCode};
pub use frames::{ClientFrame, FrameError, Request, Since};
pub use reply::Reply;
pub use room::{RoomError, RoomName};
