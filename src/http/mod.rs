//! ② The HTTP/1.1 side of a connection: read a request head (parsed by
//! monoio-http's `RequestHeadDecoder`), route it, answer it. `/ws` and `/echo`
//! end in a WebSocket upgrade (`upgrade.rs`); the other routes (`routes.rs`)
//! answer and keep the connection alive for the next request unless asked
//! not to.

mod batch;
mod census;
mod routes;
mod upgrade;

use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderMap, Method, Version};
use monoio_codec::{Decoded, Decoder};
use monoio_http::h1::codec::decoder::RequestHeadDecoder;

use crate::conn::{Conn, Mode, Stop};
use crate::services::Services;
use crate::shard::Shard;

/// Largest request head we wait for; a larger one gets 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Serves HTTP requests on `conn` until one is upgraded (returns the
/// WebSocket mode) or the connection is done (returns why).
pub async fn serve(svc: &Rc<Services>, conn: &Rc<Conn>, kept: &mut BytesMut) -> Result<Mode, Stop> {
    let shard = svc.shard();
    // Which routes this listener serves (§4): with `--admin-listen`,
    // `/metrics` and `/api/publish` live on the admin listener only, and the
    // admin listener serves no WebSockets and no demo page.
    let client_routes = !conn.is_admin();
    let admin_routes = conn.is_admin() || shard.cfg.admin_listen.is_none();
    let mut first = true;
    loop {
        // The deadline covers the whole head (slowloris), the idle time of a
        // kept-alive connection, and the flush of the last response.
        let deadline = Instant::now() + shard.cfg.handshake_timeout;
        if !first {
            // One request at a time: the next one is read (or taken from
            // what was read with the last) only once the last response has
            // gone out, so a client that pipelines requests and never reads
            // makes us hold one response, not thousands; and the shard's
            // other tasks get a turn between requests.
            if !conn.flush_for(shard, deadline).await {
                return Err(Stop::Timeout);
            }
            shard.yield_now().await;
        }
        first = false;
        let head = loop {
            let before = kept.len();
            match RequestHeadDecoder.decode(kept) {
                // A complete head that arrived in one read is held to the
                // same limit as one that trickles in.
                Ok(Decoded::Some(head)) if before - kept.len() <= MAX_HEAD_BYTES => break head,
                Ok(Decoded::Some(_)) => {
                    respond(shard, conn, Reply::text(431, "request head too large\n").close());
                    return Err(Stop::HttpDone);
                }
                Ok(_) if kept.len() > MAX_HEAD_BYTES => {
                    respond(shard, conn, Reply::text(431, "request head too large\n").close());
                    return Err(Stop::HttpDone);
                }
                // Read no more than the limit allows: the head limit holds as
                // bytes arrive, whatever the socket buffer holds.
                Ok(_) => {
                    conn.read_some(shard, kept, Some(deadline), MAX_HEAD_BYTES + 1 - kept.len(), |_| Ok(0)).await?
                }
                Err(_) => {
                    // Malformed HTTP: 400 and the socket is closed (§1).
                    respond(shard, conn, Reply::text(400, "malformed HTTP request\n").close());
                    return Err(Stop::HttpDone);
                }
            }
        };
        shard.m().http_requests_total.inc();
        let keep_alive = wants_keep_alive(&head);
        let path = head.uri.path();
        let reply = match (&head.method, path) {
            (&Method::GET, "/ws") if client_routes => match upgrade::accept(svc, conn, &head, Mode::Client) {
                Ok(()) => return Ok(Mode::Client),
                Err(reply) => reply,
            },
            (&Method::GET, "/echo") if client_routes && shard.cfg.echo => {
                match upgrade::accept(svc, conn, &head, Mode::Echo) {
                    Ok(()) => return Ok(Mode::Echo),
                    Err(reply) => reply,
                }
            }
            (&Method::GET, "/") if client_routes && shard.cfg.demo => routes::demo(),
            (&Method::GET, "/corecast.js") if client_routes && shard.cfg.demo => routes::client_js(),
            (&Method::GET, "/healthz") => routes::healthz(shard),
            (&Method::GET, "/debug/shard" | "/debug/stall" | "/debug/panic") if shard.cfg.debug_hooks => {
                routes::debug(shard, path, head.uri.query())
            }
            (&Method::GET, "/readyz") => routes::readyz(svc, conn.is_admin()),
            (&Method::GET, "/metrics") if admin_routes => routes::metrics(svc),
            (
                &Method::POST,
                "/api/publish" | "/api/disconnect" | "/api/subscribe" | "/api/unsubscribe" | "/api/batch",
            ) if admin_routes => {
                let body = match read_body(shard, conn, &head, kept, deadline).await? {
                    Ok(body) => body,
                    Err(reply) => {
                        respond(shard, conn, reply.close());
                        return Err(Stop::HttpDone);
                    }
                };
                match path {
                    "/api/publish" => routes::call(svc, &head, &body, routes::Call::Publish).await,
                    "/api/subscribe" => routes::call(svc, &head, &body, routes::Call::Subscribe).await,
                    "/api/unsubscribe" => routes::call(svc, &head, &body, routes::Call::Unsubscribe).await,
                    "/api/batch" => routes::batch(svc, &head, &body).await,
                    _ => routes::call(svc, &head, &body, routes::Call::Disconnect).await,
                }
            }
            (&Method::GET, "/api/history") if admin_routes => routes::history(svc, &head).await,
            (&Method::GET, "/api/rooms") if admin_routes => census::rooms(svc, &head).await,
            (&Method::GET, "/api/info") if admin_routes => census::info(svc, &head).await,
            (&Method::GET, "/api/presence") if admin_routes => routes::presence(svc, &head, false).await,
            (&Method::GET, "/api/presence_stats") if admin_routes => routes::presence(svc, &head, true).await,
            (_, "/healthz" | "/readyz") => Reply::text(405, "method not allowed\n"),
            (_, "/ws") if client_routes => Reply::text(405, "method not allowed\n"),
            (
                _,
                "/metrics"
                | "/api/publish"
                | "/api/disconnect"
                | "/api/subscribe"
                | "/api/unsubscribe"
                | "/api/batch"
                | "/api/presence"
                | "/api/presence_stats"
                | "/api/rooms"
                | "/api/info",
            ) if admin_routes => Reply::text(405, "method not allowed\n"),
            _ => Reply::text(404, "not found\n"),
        };
        let reply = if keep_alive { reply } else { reply.close() };
        let close = reply.close;
        respond(shard, conn, reply);
        if close {
            return Err(Stop::HttpDone);
        }
    }
}

fn wants_keep_alive(head: &Parts) -> bool {
    let conn_hdr = header_has_token(&head.headers, "connection", "close");
    head.version == Version::HTTP_11 && !conn_hdr
}

/// Does a comma-separated header contain `token` (case-insensitively)?
pub fn header_has_token(headers: &HeaderMap, name: &str, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Reads a `Content-Length` body. The outer `Result` is the connection
/// ending; the inner one a request we refuse.
async fn read_body(
    shard: &Shard,
    conn: &Conn,
    head: &Parts,
    kept: &mut BytesMut,
    deadline: Instant,
) -> Result<Result<Bytes, Reply>, Stop> {
    if head.headers.contains_key("transfer-encoding") {
        return Ok(Err(Reply::text(411, "a Content-Length body is required\n")));
    }
    let len = match head
        .headers
        .get("content-length")
        .map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()))
    {
        None => 0,
        Some(Some(n)) => n,
        Some(None) => return Ok(Err(Reply::text(400, "bad Content-Length\n"))),
    };
    if len > shard.cfg.max_body_bytes {
        return Ok(Err(Reply::text(413, "request body too large\n")));
    }
    while kept.len() < len {
        // Exactly the body: what follows it is the next request's.
        conn.read_some(shard, kept, Some(deadline), len - kept.len(), |_| Ok(0)).await?;
    }
    Ok(Ok(kept.split_to(len).freeze()))
}

/// An HTTP response to be written.
pub struct Reply {
    status: u16,
    content_type: &'static str,
    headers: String,
    body: Bytes,
    close: bool,
}

impl Reply {
    pub fn text(status: u16, body: &'static str) -> Reply {
        Reply::new(status, "text/plain; charset=utf-8", Bytes::from_static(body.as_bytes()))
    }
    pub fn new(status: u16, content_type: &'static str, body: Bytes) -> Reply {
        Reply { status, content_type, headers: String::new(), body, close: false }
    }
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        let _ = write!(self.headers, "{name}: {value}\r\n");
        self
    }
    pub fn close(mut self) -> Reply {
        self.close = true;
        self
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Queues `reply` on the connection.
pub fn respond(shard: &Shard, conn: &Rc<Conn>, reply: Reply) {
    let mut out = BytesMut::with_capacity(160 + reply.headers.len() + reply.body.len());
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\n{}{}\r\n",
        reply.status,
        reason(reply.status),
        reply.content_type,
        reply.body.len(),
        reply.headers,
        if reply.close { "connection: close\r\n" } else { "" },
    );
    out.put_slice(&reply.body);
    conn.push(shard, out.freeze());
}

/// Queues the raw bytes of a response that is not a `Reply` (the 101).
pub fn respond_raw(shard: &Shard, conn: &Rc<Conn>, bytes: Bytes) {
    conn.push(shard, bytes);
}

/// The rules of §4 for every server API call: never open on an
/// authenticated node without an API key, and the key when one is set.
fn refused(svc: &Rc<Services>, head: &Parts) -> Option<Reply> {
    let shard = svc.shard();
    if shard.cfg.api_key.is_none() && shard.cfg.auth.is_some() {
        return Some(Reply::text(403, "the server API is off: client auth is on and no --api-key is set\n"));
    }
    if let Some(key) = &shard.cfg.api_key {
        let given = head
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            return Some(Reply::text(401, "bad or missing API key\n").header("www-authenticate", "Bearer"));
        }
    }
    None
}

fn json(status: u16, body: &'static str) -> Reply {
    Reply::new(status, "application/json", Bytes::from_static(body.as_bytes()))
}

/// Compares without an early exit, so the time taken does not reveal how much
/// of a guessed key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
