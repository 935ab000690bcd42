//! The WebSocket opening handshake, server side (RFC 6455 §4.2).

use std::rc::Rc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http::request::Parts;
use tracing::debug;

use super::{Reply, header_has_token, respond_raw};
use crate::auth;
use crate::conn::{Conn, Mode};
use crate::metrics::HandshakeResult as R;
use crate::protocol::is_valid_name;
use crate::services::Services;

/// RFC 6455 §1.3: the GUID appended to the client's key.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (§4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key);
    sha.update(GUID.as_bytes());
    B64.encode(sha.digest().bytes())
}

/// Checks the upgrade request; on success queues the 101 and registers the
/// connection as a WebSocket of its user. On failure returns the reply.
pub fn accept(svc: &Rc<Services>, conn: &Rc<Conn>, head: &Parts, mode: Mode) -> Result<(), Reply> {
    let shard = svc.shard();
    let refuse = |result: R, reply: Reply| {
        shard.m().handshake(result);
        debug!(shard = shard.id, conn = conn.id, result = result.label(), status = reply.status, "handshake refused");
        Err(reply.close())
    };
    let h = &head.headers;
    // The request MUST contain an |Upgrade| header field whose value MUST
    // include the "websocket" keyword, and a |Connection| header field that
    // includes the token "Upgrade". (RFC 6455 §4.2.1)
    if !header_has_token(h, "upgrade", "websocket") || !header_has_token(h, "connection", "upgrade") {
        return refuse(R::BadRequest, Reply::text(400, "expected a WebSocket upgrade request\n"));
    }
    // If this version does not match a version understood by the server, the
    // server MUST abort the WebSocket handshake ... and send ... 426 Upgrade
    // Required ... with a |Sec-WebSocket-Version| header field. (§4.2.2, §4.4)
    if h.get("sec-websocket-version").map(|v| v.as_bytes()) != Some(b"13") {
        return refuse(
            R::Version,
            Reply::text(426, "only WebSocket version 13 is supported\n").header("sec-websocket-version", "13"),
        );
    }
    let Some(key) = h.get("sec-websocket-key").map(|v| v.as_bytes().trim_ascii()) else {
        return refuse(R::BadRequest, Reply::text(400, "missing Sec-WebSocket-Key\n"));
    };
    // A base64-encoded value that, when decoded, is 16 bytes in length. (§4.1)
    if B64.decode(key).map(|k| k.len()) != Ok(16) {
        return refuse(R::BadRequest, Reply::text(400, "bad Sec-WebSocket-Key\n"));
    }
    if !h.contains_key("host") {
        return refuse(R::BadRequest, Reply::text(400, "missing Host\n"));
    }
    if shard.is_draining() {
        return refuse(R::Draining, Reply::text(503, "draining: reconnect to another node\n"));
    }
    // Browsers always send Origin; a client without one is not a browser
    // and is let through (`auth::origin_allowed`).
    if !auth::origin_allowed(shard.cfg.allowed_origins.as_deref(), h) {
        return refuse(R::Forbidden, Reply::text(403, "origin not allowed\n"));
    }
    // With auth on, the token's `sub` is the user and `?user=` is ignored.
    let (user, grant, subs) = match shard.cfg.auth.as_deref() {
        // `--jwt-jwks-url` before its first fetch: no token can be checked.
        Some(verifier) if !verifier.ready() => {
            return refuse(R::NotReady, Reply::text(503, "not ready: the JWKS has not been fetched yet\n"));
        }
        Some(verifier) => {
            let unauthorized =
                |why| refuse(R::Unauthorized, Reply::text(401, why).header("www-authenticate", "Bearer"));
            let Some(token) = auth::token_of(h, head.uri.query()) else {
                return unauthorized("missing token: ?token=<jwt> or Authorization: Bearer <jwt>\n");
            };
            match verifier.verify(&token) {
                Ok(v) => (Rc::from(v.user.as_str()), Some(auth::Grant::new(&v)), v.subs),
                Err(why) => return unauthorized(why),
            }
        }
        None => match query_param(head.uri.query(), "user") {
            // `server` is the `from` of server-side publishes (§13).
            Some(u) if u == auth::SERVER_USER => {
                return refuse(R::BadRequest, Reply::text(400, "bad user id: \"server\" is reserved\n"));
            }
            Some(u) if is_valid_name(&u) => (Rc::from(u.as_str()), None, Vec::new()),
            Some(_) => {
                return refuse(
                    R::BadRequest,
                    Reply::text(400, "bad user id: 1-128 bytes of A-Z a-z 0-9 _ - . : @ /\n"),
                );
            }
            None => (Rc::from(format!("anon-{:016x}", fastrand::u64(..)).as_str()), None, Vec::new()),
        },
    };
    // Keep this the last check: the place it takes is given back when the
    // connection (which has a user from here on) is removed.
    if !shard.try_admit() {
        return refuse(R::Full, Reply::text(503, "connection limit reached: try another node\n"));
    }
    // permessage-deflate (RFC 7692): with `--compression off`, or when no
    // offer can be honoured, the extension is left out of the 101.
    let deflate = match shard.cfg.compression {
        true => crate::ws::deflate::negotiate(h.get_all("sec-websocket-extensions").iter().map(|v| v.as_bytes())),
        false => None,
    };
    let extensions = match &deflate {
        Some((agreed, value)) => {
            conn.set_deflate(*agreed);
            format!("sec-websocket-extensions: {value}\r\n")
        }
        None => String::new(),
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n{extensions}\r\n",
        accept_key(key)
    );
    respond_raw(shard, conn, Bytes::from(response));
    shard.m().handshake(R::Ok);
    svc.upgraded(conn, user);
    if let Some(grant) = grant {
        crate::services::expiry::attach(svc, conn, grant);
    }
    // §13 `subs`: joined now, before any op the client sent after its
    // request is handled; each `subscribed` (no `id`) as for a `subscribe`.
    if mode == Mode::Client {
        crate::services::expiry::subscribe_claimed(svc, conn, &subs);
    }
    Ok(())
}

/// The first value of `name` in a URL query string, percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_6455_sample_key() {
        // RFC 6455 §1.3's worked example.
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn query_params_are_decoded() {
        assert_eq!(query_param(Some("a=1&user=bob%40x"), "user").as_deref(), Some("bob@x"));
        assert_eq!(query_param(Some("a=1"), "user"), None);
        assert_eq!(query_param(None, "user"), None);
    }
}
