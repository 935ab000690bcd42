//! Where a room's stream is (PROTOCOL.md §7): `Epoch`, `Position` and a
//! client's `since`. Value types on the wire (`message{epoch,offset}`,
//! `subscribe{since}`), so they live with the protocol, below every stage
//! that carries them.

use std::fmt;

/// Longest epoch accepted from a client (§7: at most 64 bytes).
pub const MAX_EPOCH: usize = 64;

/// A room history's epoch: an opaque string of at most 64 bytes, kept inline
/// (no allocation; `Copy`) because it travels with every message.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Epoch {
    len: u8,
    buf: [u8; MAX_EPOCH],
}

impl Epoch {
    /// The empty epoch: the position of a room that had no history when it
    /// was read (a read never creates history; the first publish does). No
    /// message carries it, and a `since` in it is never recovered.
    pub const NONE: Epoch = Epoch { len: 0, buf: [0; MAX_EPOCH] };

    pub fn is_none(&self) -> bool {
        self.len == 0
    }

    /// `None` when `s` is longer than 64 bytes.
    pub fn new(s: &str) -> Option<Epoch> {
        if s.len() > MAX_EPOCH {
            return None;
        }
        let mut buf = [0u8; MAX_EPOCH];
        buf[..s.len()].copy_from_slice(s.as_bytes());
        Some(Epoch { len: s.len() as u8, buf })
    }

    /// A fresh random epoch: 16 hex digits of `fastrand` (a new one for every
    /// standalone start, and the candidate a Redis script takes when a room's
    /// history is missing).
    pub fn random() -> Epoch {
        Epoch::new(&format!("{:016x}", fastrand::u64(..))).expect("16 bytes")
    }

    /// This process's epoch base, drawn once: every standalone room epoch
    /// starts with it, so a restarted node never reuses one.
    pub fn node() -> Epoch {
        static NODE: std::sync::OnceLock<Epoch> = std::sync::OnceLock::new();
        *NODE.get_or_init(Epoch::random)
    }

    pub fn as_str(&self) -> &str {
        // Built only from `&str` (whole, never cut), so always UTF-8.
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Where a room's stream is: its epoch and an offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub epoch: Epoch,
    pub offset: u64,
}

/// A client's `since`: the last position it saw.
pub type Since = Position;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_at_most_64_bytes_and_random_ones_differ() {
        assert!(Epoch::new(&"e".repeat(64)).is_some());
        assert!(Epoch::new(&"e".repeat(65)).is_none());
        assert_eq!(Epoch::new("abc").unwrap().as_str(), "abc");
        assert_ne!(Epoch::random(), Epoch::random());
        assert_eq!(Epoch::random().as_str().len(), 16);
    }
}
