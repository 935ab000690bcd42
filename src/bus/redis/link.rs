//! What every Redis link of a shard shares: the timeouts, why a link
//! failed (`LinkError`), which kind it is (`Link`) and its reconnect
//! bookkeeping (`Retry`: backoff, a failure logged once, reconnects counted).

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use tracing::warn;

use super::url::RedisUrl;
use crate::metrics::ShardMetrics;

/// A TCP connect to Redis that takes longer fails (and is retried).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// AUTH/SELECT answered within this, or the attempt fails.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// A subscriber connection silent this long is sent a PING.
pub(crate) const PING_IDLE: Duration = Duration::from_secs(1);
/// A PING (subscriber) or the oldest PUBLISH (publisher) unanswered this long
/// means Redis is gone or stopped: drop the connection and reconnect.
pub(crate) const DEAD_AFTER: Duration = Duration::from_secs(3);
/// Reconnect delays double from `BACKOFF_MIN` up to `BACKOFF_MAX`, each
/// jittered down by up to half so that nodes do not reconnect in step.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why a Redis connection failed or was dropped. Redis's (or the network's)
/// doing, never a bug here: logged at warn, then retried.
#[derive(Debug)]
pub enum LinkError {
    /// Name resolution, connect, read or write failed.
    Io(io::Error),
    /// Redis closed the connection.
    Closed,
    /// Redis did not answer in time; says what we waited for.
    Timeout(&'static str),
    /// Redis answered a command with an error (wrong password, bad db, ACL).
    Refused { step: &'static str, reply: String },
    /// Bytes that are not RESP2.
    Protocol,
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Io(e) => write!(f, "{e}"),
            LinkError::Closed => f.write_str("connection closed by Redis"),
            LinkError::Timeout(what) => write!(f, "no answer from Redis: {what}"),
            LinkError::Refused { step, reply } => write!(f, "{step} refused: {reply}"),
            LinkError::Protocol => f.write_str("not RESP2 from Redis"),
        }
    }
}

impl From<io::Error> for LinkError {
    fn from(e: io::Error) -> LinkError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => LinkError::Timeout("read or write timed out"),
            _ => LinkError::Io(e),
        }
    }
}

/// Capped exponential backoff with jitter.
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub fn new() -> Backoff {
        Backoff(BACKOFF_MIN)
    }
    pub fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
    /// The next delay: somewhere in [d/2, d], then d doubles (capped).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (d * 2).min(BACKOFF_MAX);
        let half = d.as_micros() as u64 / 2;
        Duration::from_micros(half + fastrand::u64(0..=half))
    }
}

/// Logs a link failure at warn the first time, when the reason changes, and
/// once a minute while it lasts, so a Redis that stays down (or a wrong
/// password) does not flood the log every two seconds.
pub(crate) struct FailureLog(Option<(String, Instant)>);

/// How often an unchanged failure is logged again at warn.
const FAILURE_REPEAT: Duration = Duration::from_secs(60);

impl FailureLog {
    pub fn new() -> FailureLog {
        FailureLog(None)
    }
    pub fn failed(&mut self, shard: usize, link: Link, url: &RedisUrl, e: &LinkError) {
        let text = e.to_string();
        let now = Instant::now();
        match &self.0 {
            Some((last, at)) if *last == text && now - *at < FAILURE_REPEAT => {
                tracing::debug!(shard, link = link.name(), error = %text, "redis link still failing");
            }
            _ => {
                warn!(shard, link = link.name(), redis = %url, error = %text, "redis link failed; retrying with backoff");
                self.0 = Some((text, now));
            }
        }
    }
    pub fn recovered(&mut self) {
        self.0 = None;
    }
}

/// The reconnect bookkeeping of one Redis link: backoff, failure log, and
/// whether a connect is a first one or a reconnect (counted).
pub(crate) struct Retry {
    shard: usize,
    link: Link,
    backoff: Backoff,
    failures: FailureLog,
    was_up: bool,
}

impl Retry {
    pub fn new(shard: usize, link: Link) -> Retry {
        Retry { shard, link, backoff: Backoff::new(), failures: FailureLog::new(), was_up: false }
    }
    /// The link is up: reset the backoff, end the failure, count a reconnect.
    pub fn connected(&mut self, m: &ShardMetrics) {
        self.backoff.reset();
        self.failures.recovered();
        if self.was_up {
            m.redis_reconnects_total.add_shared(1);
        }
        self.was_up = true;
    }
    pub fn failed(&mut self, url: &RedisUrl, e: &LinkError) {
        // (`url` names the server; the password is never shown.)
        self.failures.failed(self.shard, self.link, url, e);
    }
    pub fn next_delay(&mut self) -> Duration {
        self.backoff.next_delay()
    }
}

/// Which kind of a shard's Redis connections: one of each per primary. (Room
/// history has none of its own: `history::redis` uses the publisher's.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Subscriber = 0,
    Publisher = 1,
}

impl Link {
    pub fn name(self) -> &'static str {
        match self {
            Link::Subscriber => "subscriber",
            Link::Publisher => "publisher",
        }
    }
}
