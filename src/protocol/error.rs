//! The `error` event's codes (PROTOCOL.md §2).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not a JSON object with a known `op`, or a field of the wrong type.
    BadRequest,
    /// A room name outside the naming rules.
    BadRoom,
    /// Auth forbids the room.
    Forbidden,
    /// Too many ops too fast.
    RateLimited,
    /// A value over a configured size limit.
    TooLarge,
    /// The backplane cannot take the publish now (Redis down or slow).
    Unavailable,
    /// The connection's JWT expired without a `refresh`; the server closes
    /// with 1008 right after (a corecast extension of §2).
    TokenExpired,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BadRoom => "bad_room",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::TokenExpired => "token_expired",
        }
    }
}

/// The backplane (Redis, or the owner shard of a standalone room history)
/// cannot take a publish or answer a read now: the `unavailable` error of
/// PROTOCOL.md §2, a 503 on the server API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;
