//! ⑦ RESP2 going to Redis: commands written straight into a connection's
//! output buffer (no intermediate frame values), and the log-in handshake
//! both Redis connections of a shard open with.
//!
//! Replies are decoded by `redis_protocol::resp2::decode` where they are read
//! (`reader.rs`, `publisher.rs`); this file only says which handshake reply
//! is fatal.

use bytes::{BufMut, BytesMut};
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;

use super::link::LinkError;
use super::subs::Kind;
use super::url::RedisUrl;
use crate::protocol::Target;

/// `PING` as RESP, for the heartbeats.
pub const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// Appends `*<n>\r\n` or `$<n>\r\n`.
pub(crate) fn put_len(buf: &mut BytesMut, tag: u8, n: usize) {
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
pub(crate) fn put_bulk(buf: &mut BytesMut, parts: &[&[u8]]) {
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

/// Writes `<prefix>room:R` (or `user:U`) into `out` (cleared first).
pub fn channel_of(out: &mut Vec<u8>, prefix: &str, target: Target<'_>) {
    let (kind, name) = match target {
        Target::Room(r) => (Kind::Room, r),
        Target::User(u) => (Kind::User, u),
    };
    let infix: &[u8] = match kind {
        Kind::Room => b"room:",
        Kind::User => b"user:",
    };
    out.clear();
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(infix);
    out.extend_from_slice(name.as_bytes());
}

/// Appends `PUBLISH channel json` (`SPUBLISH` in a cluster: `sharded`).
pub fn put_publish(buf: &mut BytesMut, sharded: bool, channel: &[u8], json: &[u8]) {
    buf.reserve(40 + channel.len() + json.len());
    buf.put_slice(if sharded { b"*3\r\n$8\r\nSPUBLISH\r\n" } else { b"*3\r\n$7\r\nPUBLISH\r\n" });
    put_bulk(buf, &[channel]);
    put_bulk(buf, &[json]);
}

/// One command of the handshake, in the order of its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Auth,
    Select,
    SetName,
    /// `ROLE` must answer `master` (Sentinel: never write to a replica).
    Role,
}

/// The commands a new connection sends before anything else, pipelined;
/// with `check_role`, ends with `ROLE`.
pub fn handshake(url: &RedisUrl, client_name: &str, check_role: bool) -> (BytesMut, Vec<Step>) {
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
    if check_role {
        put_command(&mut buf, &[b"ROLE"]);
        steps.push(Step::Role);
    }
    (buf, steps)
}

/// Judges one handshake reply.
pub fn check(step: Step, reply: &BytesFrame) -> Result<(), LinkError> {
    let refused = |step, e: &str| Err(LinkError::Refused { step, reply: e.to_string() });
    match (step, reply) {
        // A name is a nicety: a user without the CLIENT command (NOPERM) or
        // a server without it still serves. Any other error is the server
        // refusing the connection itself (e.g. `ERR max number of clients
        // reached`, sent before it closes): not a link that is up.
        (Step::SetName, BytesFrame::Error(e))
            if !(e.starts_with("NOPERM")
                || e.starts_with("ERR unknown command")
                || e.starts_with("ERR unknown subcommand")) =>
        {
            refused("CLIENT SETNAME", e)
        }
        (Step::SetName, _) => Ok(()),
        (Step::Auth, BytesFrame::Error(e)) => refused("AUTH", e),
        (Step::Select, BytesFrame::Error(e)) => refused("SELECT", e),
        (Step::Role, BytesFrame::Array(parts)) => match parts.first() {
            Some(BytesFrame::BulkString(role)) if role == "master" => Ok(()),
            Some(BytesFrame::BulkString(role)) => {
                refused("ROLE", &format!("not a primary (role {})", String::from_utf8_lossy(role)))
            }
            _ => refused("ROLE", "an unexpected reply"),
        },
        (Step::Role, BytesFrame::Error(e)) => refused("ROLE", e),
        (Step::Role, _) => refused("ROLE", "an unexpected reply"),
        _ => Ok(()),
    }
}

/// Takes one complete reply off the front of `buf`, as a frame sharing
/// `buf`'s memory; `Ok(None)` while incomplete.
pub fn take_frame(buf: &mut BytesMut) -> Result<Option<BytesFrame>, LinkError> {
    match decode_bytes_mut(buf) {
        Ok(Some((frame, _, _))) => Ok(Some(frame)),
        Ok(None) => Ok(None),
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
        let mut ch = Vec::new();
        channel_of(&mut ch, "cc:", Target::Room("lobby"));
        put_publish(&mut b, false, &ch, br#"{"a":1}"#);
        assert_eq!(text(&b), "*3\r\n$7\r\nPUBLISH\r\n$13\r\ncc:room:lobby\r\n$7\r\n{\"a\":1}\r\n");
        b.clear();
        channel_of(&mut ch, "p/", Target::User("u"));
        put_publish(&mut b, true, &ch, b"{}");
        assert_eq!(text(&b), "*3\r\n$8\r\nSPUBLISH\r\n$8\r\np/user:u\r\n$2\r\n{}\r\n");
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
        let (b, steps) = handshake(&url, "cc-sub-00", false);
        assert_eq!(steps, [Step::Auth, Step::Select, Step::SetName]);
        assert!(text(&b).starts_with("*3\r\n$4\r\nAUTH\r\n$3\r\napp\r\n$2\r\npw\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n"));
        let (b, steps) = handshake(&RedisUrl::parse("redis://:pw@h").unwrap(), "n", true);
        assert_eq!(steps, [Step::Auth, Step::SetName, Step::Role]);
        assert!(text(&b).ends_with("*1\r\n$4\r\nROLE\r\n"));
        assert!(text(&b).starts_with("*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n"));
        assert_eq!(handshake(&RedisUrl::parse("redis://h").unwrap(), "n", false).1, [Step::SetName]);
    }

    #[test]
    fn replies_are_taken_one_at_a_time_and_incomplete_ones_wait() {
        let mut b = BytesMut::from(&b":1\r\n-WRONGPASS invalid\r\n+OK\r\n$3\r\nab"[..]);
        assert_eq!(take_frame(&mut b).unwrap(), Some(BytesFrame::Integer(1)));
        assert_eq!(take_frame(&mut b).unwrap(), Some(BytesFrame::Error("WRONGPASS invalid".into())));
        assert_eq!(take_frame(&mut b).unwrap(), Some(BytesFrame::SimpleString("OK".into())));
        assert_eq!(take_frame(&mut b).unwrap(), None);
        assert_eq!(&b[..], b"$3\r\nab");
        let mut bad = BytesMut::from(&b"?nonsense\r\n"[..]);
        assert!(matches!(take_frame(&mut bad), Err(LinkError::Protocol)));
    }

    #[test]
    fn auth_select_role_and_a_refused_connection_fail_the_handshake() {
        let ok = BytesFrame::SimpleString("OK".into());
        assert!(check(Step::SetName, &BytesFrame::Error("NOPERM".into())).is_ok());
        assert!(check(Step::SetName, &BytesFrame::Error("ERR unknown command 'CLIENT'".into())).is_ok());
        let full = BytesFrame::Error("ERR max number of clients reached".into());
        assert!(check(Step::SetName, &full).is_err(), "a refused connection is not up");
        assert!(matches!(
            check(Step::Auth, &BytesFrame::Error("WRONGPASS x".into())),
            Err(LinkError::Refused { step: "AUTH", .. })
        ));
        assert!(check(Step::Select, &ok).is_ok());
        let role = |r: &'static str| BytesFrame::Array(vec![BytesFrame::BulkString(r.into()), BytesFrame::Integer(0)]);
        assert!(check(Step::Role, &role("master")).is_ok());
        let Err(LinkError::Refused { step: "ROLE", reply }) = check(Step::Role, &role("slave")) else {
            panic!("a replica must be refused")
        };
        assert!(reply.contains("not a primary"), "{reply}");
        assert!(check(Step::Role, &ok).is_err());
    }
}
