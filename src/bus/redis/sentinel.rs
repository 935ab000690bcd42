//! ⑦ Redis Sentinel: which server is the primary named MASTER right now.
//!
//! In: the sentinel list and MASTER from `--redis redis+sentinel://...`.
//! Out: the primary's address (`find_primary`), checked with `ROLE` at the
//! primary itself, since a sentinel that has not yet seen a failover still
//! names the old one; and wake-ups of the `topology` thread (`Watch`)
//! when a sentinel announces `+switch-master`, so that a failover is
//! followed as soon as it is decided, not at the next periodic question.
//!
//! The sentinels are asked without logging in (the URL's user and password
//! are the primary's).

use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use crossbeam_channel::{Receiver, TryRecvError};
use redis_protocol::resp2::types::BytesFrame;
use tracing::{debug, info};

use super::cluster::{NodeAddr, text};
use super::link::LinkError;
use super::net::{connect, oneshot, read_frame};
use super::resp;
use super::url::HostPort;
use super::url::RedisUrl;

/// How often the watch looks at the refresh requests while it waits for
/// `+switch-master`.
const TICK: Duration = Duration::from_millis(100);

/// Asks each sentinel in turn for MASTER's address until one names a server
/// whose `ROLE` is `master`.
pub fn find_primary(sentinels: &[HostPort], master: &str, login: &RedisUrl) -> Result<NodeAddr, String> {
    let mut errors = Vec::new();
    for s in sentinels {
        let at = RedisUrl { host: s.host.clone(), port: s.port, user: None, password: None, db: 0 };
        let reply = match oneshot(&at, false, &[b"SENTINEL", b"get-master-addr-by-name", master.as_bytes()]) {
            Ok(r) => r,
            Err(e) => {
                errors.push(format!("sentinel {s}: {e}"));
                continue;
            }
        };
        let addr = match &reply {
            BytesFrame::Array(parts) => match (parts.first().and_then(text), parts.get(1).and_then(text)) {
                (Some(h), Some(p)) => p.parse().ok().map(|port| NodeAddr { host: h.to_string(), port }),
                _ => None,
            },
            BytesFrame::Null => {
                errors.push(format!("sentinel {s} knows no primary named {master:?}"));
                continue;
            }
            BytesFrame::Error(e) => {
                errors.push(format!("sentinel {s}: {e}"));
                continue;
            }
            _ => None,
        };
        let Some(addr) = addr else {
            errors.push(format!("sentinel {s}: an unexpected reply to SENTINEL get-master-addr-by-name"));
            continue;
        };
        match oneshot(&login.at(&addr.host, addr.port), true, &[b"ROLE"]) {
            Ok(role) => match resp::check(resp::Step::Role, &role) {
                Ok(()) => return Ok(addr),
                Err(e) => errors.push(format!("sentinel {s} names {}:{}, but {e}", addr.host, addr.port)),
            },
            Err(e) => errors.push(format!("sentinel {s} names {}:{}, which fails: {e}", addr.host, addr.port)),
        }
    }
    Err(format!("no sentinel named a reachable primary {master:?} ({})", errors.join("; ")))
}

/// A subscription to `+switch-master` on one sentinel, kept across waits.
#[derive(Default)]
pub struct Watch {
    conn: Option<(TcpStream, BytesMut)>,
    /// The sentinel to try next.
    next: usize,
    /// When the last attempt to subscribe failed.
    failed_at: Option<Instant>,
}

impl Watch {
    /// Returns when MASTER switched, a refresh was requested, or `period`
    /// passed; `None` once refresh requests can no longer come.
    pub fn wait(
        &mut self,
        sentinels: &[HostPort],
        master: &str,
        requests: &Receiver<()>,
        period: Duration,
    ) -> Option<()> {
        let end = Instant::now() + period;
        loop {
            match requests.try_recv() {
                Ok(()) => return Some(()),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            if Instant::now() >= end {
                return Some(());
            }
            if self.conn.is_none() && self.failed_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                self.subscribe(sentinels);
            }
            let Some((sock, buf)) = &mut self.conn else {
                std::thread::sleep(TICK);
                continue;
            };
            let _ = sock.set_read_timeout(Some(TICK));
            match read_frame(sock, buf) {
                Ok(frame) => {
                    if switched(&frame, master) {
                        info!(master, "a sentinel announced +switch-master");
                        return Some(());
                    }
                }
                Err(LinkError::Timeout(_)) => {}
                Err(e) => {
                    debug!(error = %e, "sentinel subscription lost");
                    self.conn = None;
                    // A sentinel gone may mean a failover under way: ask again.
                    return Some(());
                }
            }
        }
    }

    fn subscribe(&mut self, sentinels: &[HostPort]) {
        for _ in 0..sentinels.len() {
            let s = &sentinels[self.next % sentinels.len()];
            self.next += 1;
            let at = RedisUrl { host: s.host.clone(), port: s.port, user: None, password: None, db: 0 };
            let Ok(mut sock) = connect(&at) else { continue };
            let mut out = BytesMut::new();
            resp::put_command(&mut out, &[b"SUBSCRIBE", b"+switch-master"]);
            let mut buf = BytesMut::new();
            if std::io::Write::write_all(&mut sock, &out).is_ok() && read_frame(&mut sock, &mut buf).is_ok() {
                self.conn = Some((sock, buf));
                self.failed_at = None;
                return;
            }
        }
        self.failed_at = Some(Instant::now());
    }
}

/// `["message", "+switch-master", "<name> <old ip> <old port> <new ip> <new port>"]` for MASTER.
fn switched(frame: &BytesFrame, master: &str) -> bool {
    let BytesFrame::Array(parts) = frame else { return false };
    match parts.as_slice() {
        [kind, chan, payload] => {
            text(kind) == Some("message")
                && text(chan) == Some("+switch-master")
                && text(payload).and_then(|p| p.split_ascii_whitespace().next()) == Some(master)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> BytesFrame {
        BytesFrame::BulkString(bytes::Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn only_a_switch_of_our_master_counts() {
        let msg = |p: &str| BytesFrame::Array(vec![bulk("message"), bulk("+switch-master"), bulk(p)]);
        assert!(switched(&msg("mymaster 127.0.0.1 6379 127.0.0.1 6380"), "mymaster"));
        assert!(!switched(&msg("other 127.0.0.1 6379 127.0.0.1 6380"), "mymaster"));
        assert!(!switched(
            &BytesFrame::Array(vec![bulk("subscribe"), bulk("+switch-master"), BytesFrame::Integer(1)]),
            "mymaster"
        ));
    }
}
