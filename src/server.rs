//! Start-up and supervision: bind the listeners, wire every inbox, spawn and
//! pin one `shard-NN` thread per core (and with `--redis` one `redis-NN`
//! reader thread beside each), turn SIGTERM/SIGINT into a drain, and wait.
//! If a shard stops on its own, `run` fails naming it; a panic outside a
//! connection's task ends the process (`install_panic_policy`).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::thread;

use anyhow::Context;
use crossbeam_channel::Receiver;
use monoio::{FusionDriver, IoUringDriver, LegacyDriver, RuntimeBuilder};
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::{error, info, warn};

use crate::accept;
use crate::bus::Bus;
use crate::bus::redis::{self, RedisBus, ShardLink};
use crate::config::{Config, Driver};
use crate::conn::{Listener, ShardIo};
use crate::metrics::Metrics;
use crate::services::Services;
use crate::shard::inbox::{self, Door};
use crate::shard::interest;
use crate::shard::{Inbox, InboxSender, Links, Shard, ShardMsg};
use crate::webhook::Webhooks;

/// io_uring submission queue entries per shard.
const URING_ENTRIES: u32 = 4096;

/// A running node, as seen from the thread that started it.
pub struct Node {
    pub addr: SocketAddr,
    /// The `--admin-listen` address, when set.
    pub admin_addr: Option<SocketAddr>,
    /// Each shard's control queue (drains).
    control: Arc<[InboxSender]>,
    exits: Receiver<(String, anyhow::Result<()>)>,
    shards: usize,
    metrics: Arc<Metrics>,
    webhooks: Option<Webhooks>,
}

/// Starts every shard and returns once they are accepting.
pub fn start(mut cfg: Config) -> anyhow::Result<Node> {
    let n = cfg.shards();
    let listeners = accept::bind_all(cfg.listen, n)?;
    let addr = listeners[0].local_addr()?;
    // The address bound (port 0 resolved): what `/api/info` reports.
    cfg.listen = addr;
    let cfg = Arc::new(cfg);
    // `--admin-listen`: every shard serves it too, on its own SO_REUSEPORT socket.
    let mut admin: Vec<Option<std::net::TcpListener>> = match cfg.admin_listen {
        Some(a) => accept::bind_all(a, n).context("--admin-listen")?.into_iter().map(Some).collect(),
        None => (0..n).map(|_| None).collect(),
    };
    let admin_addr = match admin.first() {
        Some(Some(l)) => Some(l.local_addr()?),
        _ => None,
    };

    // Wire every inbox before spawning any thread: a queue per ordered pair
    // of shards, one per shard for its Redis reader and one for control.
    let inbox::Wiring { inboxes, doors } = inbox::wire(n, cfg.redis.is_some());
    let control: Arc<[InboxSender]> = doors.iter().map(|d| d.control.clone()).collect();
    let readers: Vec<InboxSender> = doors.iter().map(|d| d.thread.clone()).collect();
    let table = Arc::new(interest::Table::new(n));
    let metrics = Arc::new(Metrics::new(n));
    // `--jwt-jwks-url`: the node's one `jwks` fetcher thread (`auth::jwks`).
    if let Some(auth) = &cfg.auth {
        auth.start_fetcher(&metrics)?;
    }
    let (exit_tx, exits) = crossbeam_channel::unbounded();
    // With --redis: one `redis-NN` reader thread per shard, and each shard's link to it.
    let mut links: Vec<Option<ShardLink>> = match &cfg.redis {
        Some(url) => redis::start(&cfg, url, &readers, &metrics, &exit_tx)?.into_iter().map(Some).collect(),
        None => (0..n).map(|_| None).collect(),
    };
    // `--webhook-url`: the node's one sender thread (PROTOCOL.md §11).
    let webhooks = Webhooks::start(&cfg.webhook, metrics.clone());
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<anyhow::Result<()>>(n);
    for (i, (listener, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
        let name = format!("shard-{i:02}");
        let link = links[i].take();
        let admin = admin[i].take();
        let (cfg, metrics, exit_tx, ready_tx) = (cfg.clone(), metrics.clone(), exit_tx.clone(), ready_tx.clone());
        let (doors, table, webhooks) = (doors.clone(), table.clone(), webhooks.clone());
        let thread_name = name.clone();
        thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_shard(i, cfg, metrics, (doors, table), [Some(listener), admin], inbox, link, webhooks, ready_tx)
                }));
                let r = match r {
                    Ok(r) => r,
                    Err(_) => Err(anyhow::anyhow!("{thread_name} panicked")),
                };
                let _ = exit_tx.send((thread_name, r));
            })
            .with_context(|| format!("spawn {name}"))?;
    }
    for _ in 0..n {
        ready_rx.recv().context("a shard died during start-up")??;
    }
    Ok(Node { addr, admin_addr, control, exits, shards: n, metrics, webhooks })
}

/// Presence's transitions, as webhook events on the node's sender.
fn presence_hooks(w: Webhooks) -> crate::services::presence::Hooks {
    use crate::services::presence::Hook;
    use crate::webhook::{WebhookEvent, WebhookKind};
    Rc::new(move |hook: Hook, subject: &str| {
        let kind = match hook {
            Hook::UserOnline => WebhookKind::UserOnline,
            Hook::UserOffline => WebhookKind::UserOffline,
            Hook::RoomOccupied => WebhookKind::RoomOccupied,
            Hook::RoomVacated => WebhookKind::RoomVacated,
        };
        w.emit(WebhookEvent::now(kind, subject));
    })
}

impl Node {
    /// Asks every shard to drain (PROTOCOL.md §5).
    pub fn drain(&self) {
        start_drain(&self.metrics, &self.control);
    }

    /// Waits for every shard to finish; fails as soon as one fails. Then
    /// gives the webhook sender up to `WEBHOOK_FLUSH` to send what it holds.
    pub fn wait(self) -> anyhow::Result<()> {
        for _ in 0..self.shards {
            let (name, r) = self.exits.recv().context("shard exit channel closed")?;
            r.with_context(|| format!("{name} stopped"))?;
        }
        if let Some(w) = &self.webhooks
            && !w.flush_and_stop(WEBHOOK_FLUSH)
        {
            warn!("webhook events still undelivered at exit (counted in corecast_webhook_dropped_total)");
        }
        Ok(())
    }
}

/// How long a drained node waits for its webhook sender before exiting.
const WEBHOOK_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs a node until SIGTERM/SIGINT has drained it.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    // Before the listeners open: a SIGTERM that comes once `/readyz` says
    // 200 must drain, not find the default action (exit at once, every
    // client reset). Signals caught before the thread below reads them
    // wait for it.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).context("install signal handlers")?;
    let node = start(cfg)?;
    // Printed on stdout for scripts and tests that start us on port 0.
    println!("corecast listening on {}", node.addr);
    if let Some(a) = node.admin_addr {
        println!("corecast admin listening on {a}");
    }
    let (control, metrics) = (node.control.clone(), node.metrics.clone());
    thread::Builder::new().name("signals".into()).spawn(move || {
        let mut seen = 0;
        for sig in signals.forever() {
            seen += 1;
            if seen == 1 {
                info!(signal = sig, "draining");
                start_drain(&metrics, &control);
            } else {
                warn!("second signal: exiting now");
                // The log writer is non-blocking and exit does not wait for
                // it: say it on stderr directly too (a closed one is ignored).
                use std::io::Write as _;
                let _ = writeln!(std::io::stderr(), "corecast: second signal: exiting now");
                std::process::exit(1);
            }
        }
    })?;
    let r = node.wait();
    match &r {
        Ok(()) => info!("drained, exiting"),
        Err(e) => error!("{e:#}"),
    }
    r
}

/// The node-wide flag first (every shard's `/readyz` is 503 from now on,
/// whichever shard answers), then each shard's `Drain`.
fn start_drain(metrics: &Metrics, control: &[InboxSender]) {
    metrics.node_draining.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in control {
        let _ = p.send_wait(ShardMsg::Drain);
    }
}

// One argument per thing the shard thread takes ownership of.
#[allow(clippy::too_many_arguments)]
fn run_shard(
    id: usize,
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    // Every shard's inbox queues and the node's interest table.
    (doors, table): (Arc<[Door]>, Arc<interest::Table>),
    // The client listener, then the admin one (`--admin-listen`), if any.
    listeners: [Option<std::net::TcpListener>; 2],
    inbox: Inbox,
    link: Option<ShardLink>,
    // The node's webhook sender (`--webhook-url`), for presence's hooks.
    webhooks: Option<Webhooks>,
    ready: crossbeam_channel::Sender<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let core = cfg.cores[id];
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        warn!(shard = id, core, "could not pin to core");
    }
    let driver_choice = cfg.driver;
    let body = move |driver: &'static str| {
        let cfg2 = cfg.clone();
        async move {
            let mut bound = Vec::with_capacity(2);
            for (l, kind) in listeners.into_iter().zip([Listener::Client, Listener::Admin]) {
                let Some(l) = l else { continue };
                match monoio::net::TcpListener::from_std(l) {
                    Ok(l) => bound.push((l, kind)),
                    Err(e) => {
                        let _ = ready.send(Err(anyhow::anyhow!("shard {id}: listener: {e}")));
                        return;
                    }
                }
            }
            let health = link.as_ref().filter(|_| id == 0).map(ShardLink::health);
            let bus = match link {
                Some(link) => Bus::Redis(RedisBus::start(link)),
                None => Bus::Local,
            };
            // Bottom first: the connection runtime, then the fan-out core on it.
            let io = match ShardIo::new(id, cfg2, metrics, driver) {
                Ok(io) => Rc::new(io),
                Err(e) => {
                    let _ = ready.send(Err(anyhow::anyhow!("shard {id}: epoll: {e}")));
                    return;
                }
            };
            monoio::spawn(io.clone().run_flusher());
            monoio::spawn(io.clone().run_held());
            monoio::spawn(io.clone().run_yields());
            monoio::spawn(io.clone().run_liveness());
            // Shard 0 also times Redis degradations (`/readyz` grace) to
            // the tick, whether anyone asks or not.
            if let Some(health) = health {
                monoio::spawn(async move {
                    loop {
                        monoio::time::sleep(crate::metrics::LIVENESS_TICK).await;
                        health.observe();
                    }
                });
            }
            // The fan-out core on the runtime, then the services over it.
            let shard = Shard::new(io, Links::new(id, doors, table), inbox);
            monoio::spawn(shard.clone().run_peer_wakes());
            monoio::spawn(shard.clone().run_close_reaper());
            monoio::spawn(crate::shard::heartbeat::run(shard.clone()));
            let hooks = webhooks.clone().map(|w| (presence_hooks(w), shard.cfg.webhook.debounce));
            let svc = Services::new(shard.clone(), bus, hooks);
            if let Some(h) = svc.history()
                && shard.cfg.redis.is_none()
            {
                monoio::spawn(h.clone().run_sweep(shard.clone()));
            }
            monoio::spawn(svc.clone().run_inbox());
            monoio::spawn(crate::session::run_poller(svc.clone()));
            for (l, kind) in bound {
                monoio::spawn(accept::run(svc.clone(), l, kind));
            }
            info!(shard = id, core, driver, "shard running");
            let _ = ready.send(Ok(()));
            shard.drained().await;
            svc.settle().await;
        }
    };
    match driver_choice {
        Driver::Auto => {
            let mut rt = RuntimeBuilder::<FusionDriver>::new()
                .with_entries(URING_ENTRIES)
                .enable_timer()
                .build()
                .context("build runtime")?;
            let driver = match &rt {
                monoio::FusionRuntime::Uring(_) => "io_uring",
                monoio::FusionRuntime::Legacy(_) => "epoll",
            };
            rt.block_on(body(driver));
        }
        Driver::Uring => {
            let mut rt = RuntimeBuilder::<IoUringDriver>::new()
                .with_entries(URING_ENTRIES)
                .enable_timer()
                .build()
                .context("io_uring runtime (is io_uring allowed here? try --driver legacy)")?;
            rt.block_on(body("io_uring"));
        }
        Driver::Legacy => {
            let mut rt = RuntimeBuilder::<LegacyDriver>::new().enable_timer().build().context("epoll runtime")?;
            rt.block_on(body("epoll"));
        }
    }
    Ok(())
}

/// The panic policy (docs/operations.md, Panic policy), as the process's
/// panic hook. A panic inside one connection's step (`session`) is that
/// connection's: the hook notes where it happened and `session` catches it,
/// logs it at error, counts it and closes the connection. Any other panic (a
/// shard's own loop or tasks, a Redis reader, the topology thread, any
/// thread, supervised or not) is the node's: the hook logs it at error,
/// calls `flush` (the log writer's guard) and exits the process with status
/// 70 at once: no half-alive node, no silent hang. Installed by `main`.
pub fn install_panic_policy(flush: impl Fn() + Send + Sync + 'static) {
    std::panic::set_hook(Box::new(move |info| {
        if crate::session::in_connection_step() {
            crate::session::note_connection_panic(info.to_string());
            return;
        }
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let text = info.to_string().replace('\n', " ");
        error!(thread = name, panic = %text, "panic outside a connection's task: exiting");
        flush();
        // Also straight to stderr, in case the log writer is gone; a closed
        // stderr is ignored.
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "corecast: fatal: thread '{name}' {text}; exiting");
        std::process::exit(70);
    }));
}
