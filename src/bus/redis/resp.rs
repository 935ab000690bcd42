//! ⑦ RESP2 going to Redis: commands written straight into a connection's
//! output buffer (no intermediate frame values), and the log-in handshake
//! both Redis connections of a shard open with.
//!
//! Replies are decoded by `redis_protocol::resp2::decode` where they are read
//! (`reader.rs`, `publisher.rs`); this file only says which handshake reply
//! is fatal.

use bytes::{Buf, BufMut, BytesMut};
use redis_protocol::resp2::decode::decode_range;
use redis_protocol::resp2::types::RangeFrame;

use super::LinkError;
use super::subs::Kind;
use super::url::RedisUrl;
use crate::bus::Target;

/// `PING` as RESP, for the heartbeats.
pub const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// Appends `*<n>\r\n` or `$<n>\r\n`.
fn put_len(buf: &mut BytesMut, tag: u8, n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.put_u8(tag);
    buf.put_slice(&digits[i..]);
    buf.put_slice(b"\r\n");
}

/// Appends one bulk string made of `parts` laid end to end.
fn put_bulk(buf: &mut BytesMut, parts: &[&[u8]]) {
    put_len(buf, b'$', parts.iter().map(|p| p.len()).sum());
    for p in parts {
        buf.put_slice(p);
    }
    buf.put_slice(b"\r\n");
}

/// Appends a command: an array of bulk strings.
pub fn put_command(buf: &mut BytesMut, args: &[&[u8]]) {
    put_len(buf, b'*', args.len());
    for a in args {
        put_bulk(buf, &[a]);
    }
}

/// Appends `cmd ch1 ch2 ...` (SUBSCRIBE / UNSUBSCRIBE) in one command.
pub fn put_channels(buf: &mut BytesMut, cmd: &[u8], channels: &[Box<[u8]>]) {
    put_len(buf, b'*', channels.len() + 1);
    put_bulk(buf, &[cmd]);
    for c in channels {
        put_bulk(buf, &[c]);
    }
}

/// Appends `PUBLISH <prefix>room:R json` (or `user:U`), building the channel
/// name in place.
pub fn put_publish(buf: &mut BytesMut, prefix: &str, target: Target<'_>, json: &[u8]) {
    let (kind, name) = match target {
        Target::Room(r) => (Kind::Room, r),
        Target::User(u) => (Kind::User, u),
    };
    let infix: &[u8] = match kind {
        Kind::Room => b"room:",
        Kind::User => b"user:",
    };
    buf.reserve(40 + prefix.len() + name.len() + json.len());
    buf.put_slice(b"*3\r\n$7\r\nPUBLISH\r\n");
    put_bulk(buf, &[prefix.as_bytes(), infix, name.as_bytes()]);
    put_bulk(buf, &[json]);
}

/// One command of the handshake, in the order of its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Auth,
    Select,
    SetName,
}

/// The commands a new connection sends before anything else, pipelined.
pub fn handshake(url: &RedisUrl, client_name: &str) -> (BytesMut, Vec<Step>) {
    let mut buf = BytesMut::with_capacity(128);
    let mut steps = Vec::with_capacity(3);
    match (&url.user, &url.password) {
        (Some(user), Some(pass)) => put_command(&mut buf, &[b"AUTH", user.as_bytes(), pass.as_bytes()]),
        (None, Some(pass)) => put_command(&mut buf, &[b"AUTH", pass.as_bytes()]),
        _ => {}
    }
    if url.password.is_some() {
        steps.push(Step::Auth);
    }
    if url.db != 0 {
        put_command(&mut buf, &[b"SELECT", url.db.to_string().as_bytes()]);
        steps.push(Step::Select);
    }
    // Shows up in CLIENT LIST; a user whose ACL forbids it still works.
    put_command(&mut buf, &[b"CLIENT", b"SETNAME", client_name.as_bytes()]);
    steps.push(Step::SetName);
    (buf, steps)
}

/// Judges one handshake reply: `Ok(())` for `+OK`, `Err(text)` for an error.
pub fn check(step: Step, reply: Result<(), &str>) -> Result<(), LinkError> {
    match (step, reply) {
        (_, Ok(())) | (Step::SetName, Err(_)) => Ok(()),
        (Step::Auth, Err(e)) => Err(LinkError::Refused { step: "AUTH", reply: e.to_string() }),
        (Step::Select, Err(e)) => Err(LinkError::Refused { step: "SELECT", reply: e.to_string() }),
    }
}

/// Takes one complete reply off the front of `buf`: `Ok(())` for anything
/// but an error reply, `Err(text)` for one. Returns `Ok(None)` if the reply
/// is incomplete and does not consume anything in this case.
pub fn take_reply(buf: &mut BytesMut) -> Result<Option<Result<(), String>>, LinkError> {
    match decode_range(buf) {
        Ok(None) => Ok(None),
        Ok(Some((frame, n))) => {
            let reply = match frame {
                RangeFrame::Error((start, end)) => {
                    Err(String::from_utf8_lossy(buf.get(start..end).unwrap_or_default()).into_owned())
                }
                _ => Ok(()),
            };
            buf.advance(n);
            Ok(Some(reply))
        }
        Err(_) => Err(LinkError::Protocol),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: &BytesMut) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    #[test]
    fn commands_are_byte_exact_resp() {
        let mut b = BytesMut::new();
        put_publish(&mut b, "cc:", Target::Room("lobby"), br#"{"a":1}"#);
        assert_eq!(text(&b), "*3\r\n$7\r\nPUBLISH\r\n$13\r\ncc:room:lobby\r\n$7\r\n{\"a\":1}\r\n");
        b.clear();
        put_channels(&mut b, b"SUBSCRIBE", &[b"x:room:a".as_slice().into(), b"x:user:bb".as_slice().into()]);
        assert_eq!(text(&b), "*3\r\n$9\r\nSUBSCRIBE\r\n$8\r\nx:room:a\r\n$9\r\nx:user:bb\r\n");
        b.clear();
        put_command(&mut b, &[b"PING"]);
        assert_eq!(&b[..], PING);
        let mut long = BytesMut::new();
        put_len(&mut long, b'$', 1234567890);
        assert_eq!(text(&long), "$1234567890\r\n");
    }

    #[test]
    fn handshake_logs_in_selects_and_names_the_connection() {
        let url = RedisUrl::parse("redis://app:pw@h:1/2").unwrap();
        let (b, steps) = handshake(&url, "cc-sub-00");
        assert_eq!(steps, [Step::Auth, Step::Select, Step::SetName]);
        assert!(text(&b).starts_with("*3\r\n$4\r\nAUTH\r\n$3\r\napp\r\n$2\r\npw\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n"));
        let (b, steps) = handshake(&RedisUrl::parse("redis://:pw@h").unwrap(), "n");
        assert_eq!(steps, [Step::Auth, Step::SetName]);
        assert!(text(&b).starts_with("*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n"));
        assert_eq!(handshake(&RedisUrl::parse("redis://h").unwrap(), "n").1, [Step::SetName]);
    }

    #[test]
    fn replies_are_taken_one_at_a_time_and_incomplete_ones_wait() {
        let mut b = BytesMut::from(&b":1\r\n-WRONGPASS invalid\r\n+OK\r\n$3\r\nab"[..]);
        assert_eq!(take_reply(&mut b).unwrap(), Some(Ok(())));
        assert_eq!(take_reply(&mut b).unwrap(), Some(Err("WRONGPASS invalid".to_string())));
        assert_eq!(take_reply(&mut b).unwrap(), Some(Ok(())));
        assert_eq!(take_reply(&mut b).unwrap(), None);
        assert_eq!(&b[..], b"$3\r\nab");
        let mut bad = BytesMut::from(&b"?nonsense\r\n"[..]);
        assert!(matches!(take_reply(&mut bad), Err(LinkError::Protocol)));
    }

    #[test]
    fn only_auth_and_select_errors_are_fatal() {
        assert!(check(Step::SetName, Err("NOPERM")).is_ok());
        assert!(matches!(check(Step::Auth, Err("WRONGPASS x")), Err(LinkError::Refused { step: "AUTH", .. })));
        assert!(check(Step::Select, Ok(())).is_ok());
    }
}
