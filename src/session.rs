//! A connection's task, on top of the stages it drives: the HTTP phase
//! (`http::serve`), then, once upgraded, the hand-off to the shard's poller
//! (`conn::start`); for plain HTTP, the close. The accept loop spawns one
//! per accepted socket.

use std::os::fd::IntoRawFd;
use std::rc::Rc;

use bytes::BytesMut;
use monoio::net::TcpStream;

use crate::conn::{self, Listener};
use crate::http;
use crate::shard::Shard;

/// The connection task: from the first byte of HTTP to the upgrade, after
/// which the connection has no task (the shard's poller reads it, see
/// `conn::start`) until its frame loop ends and `conn::end` closes it; or, for
/// plain HTTP, to the closed socket.
pub async fn run(shard: Rc<Shard>, stream: TcpStream, listener: Listener) {
    // Nothing waits on the accepted stream yet: its descriptor is ours.
    let conn = shard.add_conn(stream.into_raw_fd(), listener);
    let mut kept = BytesMut::new();
    // Boxed so that its larger state (request head, timers) is on the heap
    // only while it runs.
    let stop = match Box::pin(http::serve(&shard, &conn, &mut kept)).await {
        Ok(mode) => match conn::start(&shard, &conn, mode, kept) {
            Ok(()) => return,
            Err(stop) => stop,
        },
        Err(stop) => stop,
    };
    conn::end(shard, conn, stop).await
}
