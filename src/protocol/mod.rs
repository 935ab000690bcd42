//! The corecast wire protocol v1 (shared/PROTOCOL.md §2): client ops in,
//! server events out, error codes, and the room and user name rules.

pub mod census;
pub mod error;
pub mod event;
pub mod op;
pub mod position;
pub mod presence;
pub mod target;

pub use error::{ErrorCode, Unavailable};
pub use op::ClientOp;
pub use position::{Epoch, Position, Since};
pub use target::Target;

/// Room names (and user ids): 1 to 128 bytes of `A-Z a-z 0-9 _ - . : @ /`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@' | b'/'))
}

#[cfg(test)]
mod tests {
    #[test]
    fn room_name_rules() {
        assert!(super::is_valid_name("lobby"));
        assert!(super::is_valid_name("a-b_c.d:e@f/g9"));
        assert!(super::is_valid_name(&"x".repeat(128)));
        assert!(!super::is_valid_name(&"x".repeat(129)));
        assert!(!super::is_valid_name(""));
        assert!(!super::is_valid_name("has space"));
        assert!(!super::is_valid_name("ünï"));
        assert!(!super::is_valid_name("a\"b"));
    }
}
