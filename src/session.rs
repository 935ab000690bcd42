//! A connection's life, on top of the stages it drives: the HTTP phase
//! (`http::serve`), the hand-off to the shard's poller (`conn::start`), each
//! read the poller reports (`conn::on_readable`, with the client's messages
//! going to the ops in `services::ops`), and the end: the close (`conn::finish`)
//! and leaving the shard's tables. The accept loop spawns `run` per accepted
//! socket; the shard runs `run_poller` once.
//!
//! # Panics
//!
//! One connection's panic must not cost the node its other clients. Each
//! step that runs for one connection (the HTTP phase and hand-off in `run`,
//! each read the poller hands it, its end in `end`) runs under
//! `catch_unwind`: a panic there is logged at error with the shard and the
//! connection, counted (`corecast_panics_total`), and that connection is
//! closed and leaves the shard's tables like any other (`end`). Unwinding
//! drops every `RefCell` guard the panicking code held, so no table stays
//! borrowed. A panic anywhere else (a shard's own tasks, a Redis reader, the
//! topology thread) ends the process: see `server::install_panic_policy`.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::IntoRawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use monoio::net::TcpStream;
use tracing::{debug, error};

use crate::conn::{self, Conn, Listener, Stop};
use crate::http;
use crate::metrics::ShardMetrics;
use crate::services::{Services, ops};
use crate::shard::Shard;
use crate::ws::CloseCode;

thread_local! {
    /// Set while this thread runs a connection's step (`guarded`): a panic
    /// then is that connection's, not the node's.
    static IN_CONNECTION: Cell<bool> = const { Cell::new(false) };
    /// Where the last connection panic happened (the panic hook's text).
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Is this thread running one connection's step right now? (The panic
/// hook asks: such a panic is caught, logged and survived.)
pub fn in_connection_step() -> bool {
    // `try_with`: the hook may run while this thread's locals are torn down.
    IN_CONNECTION.try_with(Cell::get).unwrap_or(false)
}

/// The panic hook's description (message and place) of a panic in a
/// connection's step, picked up where it is caught.
pub fn note_connection_panic(text: String) {
    // One log line: the place and the message on one line.
    let _ = LAST_PANIC.try_with(|p| *p.borrow_mut() = Some(text.replace('\n', " ")));
}

/// Runs `f` as one connection's step: `Err` if it panicked.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let was = IN_CONNECTION.with(|c| c.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    IN_CONNECTION.with(|c| c.set(was));
    r.map_err(|payload| {
        LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| {
            payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into())
        })
    })
}

/// A connection's future, each poll a guarded step: resolves to `Err` (and
/// is not polled again) if a poll panicked.
struct Guarded<F>(Pin<Box<F>>);

impl<F: Future> Future for Guarded<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match guarded(|| self.0.as_mut().poll(cx)) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(text) => Poll::Ready(Err(text)),
        }
    }
}

/// Logs and counts a panic caught in `conn`'s step.
fn panicked(shard: &Shard, conn: &Conn, phase: &str, text: &str) {
    shard.m().panics_total.inc();
    error!(shard = shard.id, conn = conn.id, phase, panic = %text, "a connection's task panicked: closing that connection");
}

/// One accepted client socket in its HTTP phase (`corecast_http_sockets`,
/// held to `--max-handshakes-per-shard` by the accept loop, which counts it
/// before spawning `run`); uncounted when dropped: at the upgrade, or once
/// the socket is closed.
pub struct HttpPhase(&'static ShardMetrics);

impl HttpPhase {
    /// Counts one more HTTP-phase socket on the shard whose counters `m` are.
    pub fn enter(m: &'static ShardMetrics) -> HttpPhase {
        m.http_sockets.inc();
        HttpPhase(m)
    }
}

impl Drop for HttpPhase {
    fn drop(&mut self) {
        self.0.http_sockets.sub(1);
    }
}

/// The connection task: from the first byte of HTTP to the upgrade, after
/// which the connection has no task (the shard's poller reads it, see
/// `run_poller`) until its frame loop ends and `end` closes it; or, for
/// plain HTTP, to the closed socket. `phase` counts a client-listener
/// socket until its upgrade or close.
pub async fn run(svc: Rc<Services>, stream: TcpStream, listener: Listener, phase: Option<HttpPhase>) {
    let shard = svc.shard();
    // Nothing waits on the accepted stream yet: its descriptor is ours.
    let conn = shard.add_conn(stream.into_raw_fd(), listener);
    let (s, c) = (&svc, &conn);
    // Boxed (in `Guarded`) so that its larger state (request head, timers)
    // is on the heap only while it runs.
    let http_phase = Guarded(Box::pin(async move {
        let mut kept = BytesMut::new();
        let mode = http::serve(s, c, &mut kept).await?;
        conn::start(s.shard().io(), c, mode, kept, &mut on_message(s))
    }));
    let stop = match http_phase.await {
        Ok(Ok(())) => return,
        Ok(Err(stop)) => stop,
        Err(text) => {
            panicked(shard, &conn, "http", &text);
            // Whatever it had queued is dropped (reset): its request was
            // never answered.
            Stop::Io(std::io::Error::other("panicked"))
        }
    };
    end(svc, conn, stop).await;
    drop(phase);
}

/// The shard's poller task: each connection the kernel reports readable is
/// looked up in the table (the event's key and descriptor must both match,
/// so an event never reaches a connection that reused the key) and read
/// once; one whose frame loop ends there is closed by a task of its own.
/// The table is not borrowed while the connection runs its ops. A read that
/// panics kills its connection (1011), which ends its frame loop at once.
pub async fn run_poller(svc: Rc<Services>) {
    let shard = svc.shard();
    conn::poller::run(shard, |fd, id| {
        if let Some(c) = shard.conn(id)
            && c.fd == fd
            && c.polled()
        {
            let r = match guarded(|| conn::on_readable(shard.io(), &c, &mut on_message(&svc))) {
                Ok(r) => r,
                Err(text) => {
                    panicked(shard, &c, "websocket", &text);
                    c.kill(shard, CloseCode::INTERNAL);
                    // Killed: ends the frame loop (off the poller) without a read.
                    conn::on_readable(shard.io(), &c, &mut on_message(&svc))
                }
            };
            if let Err(stop) = r {
                monoio::spawn(end(svc.clone(), c, stop));
            }
        }
    })
    .await
}

/// Where a client's messages go: the ops, which act on the shard. With
/// `--debug-hooks` (test-only), the text message `debug:panic` panics here,
/// inside the poller's read of that connection.
fn on_message(svc: &Rc<Services>) -> impl FnMut(&Rc<Conn>, bool, &mut [u8]) + '_ {
    let debug = svc.shard().cfg.debug_hooks;
    move |conn, text, payload| {
        if debug && text && payload == b"debug:panic" {
            panic!("debug hook: panic in a WebSocket read");
        }
        ops::handle(svc, conn, text, payload)
    }
}

/// The connection's frame loop (or HTTP exchange) is over: closes it and
/// forgets it.
async fn end(svc: Rc<Services>, conn: Rc<Conn>, stop: Stop) {
    let shard = svc.shard();
    debug!(shard = shard.id, conn = conn.id, ?stop, "connection ends");
    if let Err(text) = Guarded(Box::pin(conn::finish(shard, &conn, stop))).await {
        panicked(shard, &conn, "close", &text);
    }
    if let Err(text) = guarded(|| svc.remove_conn(&conn)) {
        panicked(shard, &conn, "close", &text);
    }
    conn.release();
}
