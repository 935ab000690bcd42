//! ③ The WebSocket codec (RFC 6455), server side.
//!
//! `frame` parses client frame headers and formats server frames (one `Bytes`
//! holding header + payload, so a fan-out frame is built once and shared);
//! `mask` unmasks client payloads in place; `close` validates close frames;
//! `utf8` validates text messages incrementally across fragments; `deflate`
//! is permessage-deflate (RFC 7692): negotiation, shared compressed frames,
//! bounded inflate; `message` turns data frames into messages (fragments,
//! UTF-8 across them, inflate). The connection's frame loop (`conn::reader`)
//! drives them over its receive buffer.

pub mod close;
pub mod deflate;
pub mod frame;
pub mod mask;
pub mod message;
pub mod utf8;

pub use close::CloseCode;
pub use frame::{FrameHeader, OpCode, ProtocolError};
