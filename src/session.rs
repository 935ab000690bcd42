//! A connection's life, on top of the stages it drives: the HTTP phase
//! (`http::serve`), the hand-off to the shard's poller (`conn::start`), each
//! read the poller reports (`conn::on_readable`, with the client's messages
//! going to the ops in `services::ops`), and the end: the close (`conn::finish`)
//! and leaving the shard's tables. The accept loop spawns `run` per accepted
//! socket; the shard runs `run_poller` once.

use std::os::fd::IntoRawFd;
use std::rc::Rc;

use bytes::BytesMut;
use monoio::net::TcpStream;
use tracing::debug;

use crate::conn::{self, Conn, Listener, Stop};
use crate::http;
use crate::services::{Services, ops};

/// The connection task: from the first byte of HTTP to the upgrade, after
/// which the connection has no task (the shard's poller reads it, see
/// `run_poller`) until its frame loop ends and `end` closes it; or, for
/// plain HTTP, to the closed socket.
pub async fn run(svc: Rc<Services>, stream: TcpStream, listener: Listener) {
    let shard = svc.shard();
    // Nothing waits on the accepted stream yet: its descriptor is ours.
    let conn = shard.add_conn(stream.into_raw_fd(), listener);
    let mut kept = BytesMut::new();
    // Boxed so that its larger state (request head, timers) is on the heap
    // only while it runs.
    let stop = match Box::pin(http::serve(&svc, &conn, &mut kept)).await {
        Ok(mode) => match conn::start(shard.io(), &conn, mode, kept, &mut on_message(&svc)) {
            Ok(()) => return,
            Err(stop) => stop,
        },
        Err(stop) => stop,
    };
    end(svc, conn, stop).await
}

/// The shard's poller task: each connection the kernel reports readable is
/// looked up in the table (the event's key and descriptor must both match,
/// so an event never reaches a connection that reused the key) and read
/// once; one whose frame loop ends there is closed by a task of its own.
/// The table is not borrowed while the connection runs its ops.
pub async fn run_poller(svc: Rc<Services>) {
    let shard = svc.shard();
    conn::poller::run(shard, |fd, id| {
        if let Some(c) = shard.conn(id)
            && c.fd == fd
            && c.polled()
            && let Err(stop) = conn::on_readable(shard.io(), &c, &mut on_message(&svc))
        {
            monoio::spawn(end(svc.clone(), c, stop));
        }
    })
    .await
}

/// Where a client's messages go: the ops, which act on the shard.
fn on_message(svc: &Rc<Services>) -> impl FnMut(&Rc<Conn>, bool, &mut [u8]) + '_ {
    move |conn, text, payload| ops::handle(svc, conn, text, payload)
}

/// The connection's frame loop (or HTTP exchange) is over: closes it and
/// forgets it.
async fn end(svc: Rc<Services>, conn: Rc<Conn>, stop: Stop) {
    let shard = svc.shard();
    debug!(shard = shard.id, conn = conn.id, ?stop, "connection ends");
    Box::pin(conn::finish(shard, &conn, stop)).await;
    svc.remove_conn(&conn);
    conn.release();
}
