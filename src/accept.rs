//! ① Each shard's listener: its own SO_REUSEPORT socket on the shared
//! address (the kernel spreads new connections over the shards), an accept
//! loop, and what to do when the process runs out of file descriptors.
//!
//! At the open-file limit accept(2) fails with EMFILE while the connection
//! stays in the backlog, so a naive loop spins or leaves clients hanging.
//! Instead the shard keeps one spare descriptor: on EMFILE it frees it,
//! accepts the waiting connection, resets it (a clear refusal for the
//! client), takes the spare back, counts the refusal, logs (at most every
//! few seconds) and backs off briefly. As soon as descriptors free up,
//! accepts succeed again.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use monoio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, warn};

use crate::conn;
use crate::services::Services;
use crate::session::HttpPhase;

/// Pending connections the kernel queues per shard. The kernel caps it at
/// net.core.somaxconn, so the host's setting decides (tuning.md).
const BACKLOG: i32 = 65535;
/// Pause after an EMFILE refusal, so a flood of them cannot spin the shard.
const EMFILE_BACKOFF: Duration = Duration::from_millis(5);
/// At most one "open-file limit" warning per this interval.
const EMFILE_LOG_EVERY: Duration = Duration::from_secs(5);

/// Binds one listener per shard to `addr`, all with SO_REUSEPORT. With port 0
/// the first bind picks the port and the others join it.
pub fn bind_all(addr: SocketAddr, shards: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(shards);
    let mut at = addr;
    for i in 0..shards {
        let sock = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))
            .with_context(|| format!("socket for {at}"))?;
        sock.set_reuse_address(true)?;
        sock.set_reuse_port(true).context("SO_REUSEPORT (needs Linux >= 3.9)")?;
        sock.set_nonblocking(true)?;
        sock.bind(&at.into()).with_context(|| format!("bind {at} (shard {i}): is another process on that port?"))?;
        sock.listen(BACKLOG).with_context(|| format!("listen on {at}"))?;
        let l: std::net::TcpListener = sock.into();
        if i == 0 {
            at = l.local_addr()?;
        }
        out.push(l);
    }
    Ok(out)
}

fn is_fd_limit(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// The accept loop of one shard; runs until the runtime stops.
pub async fn run(svc: Rc<Services>, listener: TcpListener, kind: conn::Listener) {
    let shard = svc.shard();
    let mut spare = File::open("/dev/null").ok();
    let mut refused_since_log = 0u64;
    let mut last_log: Option<Instant> = None;
    let mut pace = AcceptPace::new(shard.cfg.max_accepts_per_sec);
    // The shard's counters for the HTTP-phase guard, which outlives this
    // borrow: one `Arc` leaked per accept loop (as `ShardIo::new` does).
    let http_sockets: &'static crate::metrics::ShardMetrics = {
        let leaked: &'static std::sync::Arc<crate::metrics::Metrics> = Box::leak(Box::new(shard.metrics.clone()));
        leaked.shard(shard.id)
    };
    loop {
        if let Some(wait) = pace.wait() {
            // Over --max-accepts-per-sec: the rest wait in the kernel backlog.
            shard.m().accept_pauses_total.inc();
            monoio::time::sleep(wait).await;
        }
        match listener.accept().await {
            Ok((stream, _peer)) => {
                pace.took();
                // `--max-handshakes-per-shard`: a client socket still in its
                // HTTP phase holds a descriptor and up to a 16 KiB head;
                // past the cap a new one is closed at once (reset), before
                // it costs anything more. The admin listener is not capped.
                let phase = if kind == conn::Listener::Client {
                    if http_sockets.http_sockets.get() >= shard.cfg.max_handshakes_per_shard as u64 {
                        http_sockets.http_sockets_refused_total.inc();
                        reset(stream);
                        crate::warn_throttled!(
                            shard = shard.id,
                            max = shard.cfg.max_handshakes_per_shard,
                            "too many sockets in the HTTP phase (--max-handshakes-per-shard): refusing new connections"
                        );
                        continue;
                    }
                    Some(HttpPhase::enter(http_sockets))
                } else {
                    None
                };
                // We coalesce frames ourselves; Nagle would only add delay.
                let _ = stream.set_nodelay(true);
                monoio::spawn(crate::session::run(svc.clone(), stream, kind, phase));
            }
            Err(e) if is_fd_limit(&e) => {
                shard.m().accept_refused_total.inc();
                refused_since_log += 1;
                drop(spare.take());
                refuse_one(&listener);
                spare = File::open("/dev/null").ok();
                if last_log.is_none_or(|t| t.elapsed() >= EMFILE_LOG_EVERY) {
                    warn!(
                        shard = shard.id,
                        refused = refused_since_log,
                        "open-file limit reached ({e}): refusing new connections; raise the limit \
                         (ulimit -n / LimitNOFILE, see tuning.md)"
                    );
                    refused_since_log = 0;
                    last_log = Some(Instant::now());
                }
                monoio::time::sleep(EMFILE_BACKOFF).await;
            }
            Err(e) => {
                shard.m().accept_errors_total.inc();
                if matches!(e.raw_os_error(), Some(libc::ENOMEM) | Some(libc::ENOBUFS)) {
                    // The kernel is short of memory for sockets: the
                    // operator needs to know (review 3, L13).
                    crate::warn_throttled!(shard = shard.id, error = %e, "accept failed: out of kernel memory");
                } else {
                    debug!(shard = shard.id, "accept: {e}");
                }
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// `--max-accepts-per-sec` for one shard: a token bucket holding a tenth of a
/// second's worth of accepts, so a reconnect storm is taken in steady slices
/// while the kernel backlog (`BACKLOG`) holds the rest.
struct AcceptPace {
    /// Accepts per second; 0 = unlimited.
    rate: u32,
    tokens: f64,
    at: Instant,
}

impl AcceptPace {
    fn new(rate: u32) -> AcceptPace {
        AcceptPace { rate, tokens: Self::burst(rate), at: Instant::now() }
    }

    fn burst(rate: u32) -> f64 {
        (f64::from(rate) / 10.0).max(1.0)
    }

    /// How long to pause before the next accept, if at all.
    fn wait(&mut self) -> Option<Duration> {
        if self.rate == 0 || self.tokens >= 1.0 {
            return None;
        }
        let now = Instant::now();
        let rate = f64::from(self.rate);
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(Self::burst(self.rate));
        self.at = now;
        if self.tokens >= 1.0 { None } else { Some(Duration::from_secs_f64((1.0 - self.tokens) / rate)) }
    }

    /// One connection accepted.
    fn took(&mut self) {
        if self.rate != 0 {
            self.tokens -= 1.0;
        }
    }
}

/// Closes an accepted connection with a reset (linger 0): the client sees a
/// refusal at once, and the descriptor is free now.
fn reset(stream: monoio::net::TcpStream) {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the stream gives up its descriptor, nothing waits on it yet,
    // and `Socket` owns and closes it.
    let sock = unsafe { Socket::from_raw_fd(stream.into_raw_fd()) };
    let _ = sock.set_linger(Some(Duration::ZERO));
}

/// Accepts one waiting connection without blocking and resets it.
fn refuse_one(listener: &TcpListener) {
    // SAFETY: accept4 on our own listening socket; the returned descriptor,
    // if any, is owned by `Socket` and closed when it drops.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd >= 0 {
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let sock = unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // Linger 0: close sends RST, so the client sees a refusal at once.
        let _ = sock.set_linger(Some(Duration::ZERO));
    }
}
