//! Webhook delivery (PROTOCOL.md §11; docs/webhooks.md): HOW presence
//! events reach the backend. Which events happen, and when, is the presence
//! service's business (`services`); it calls [`Webhooks::emit`].
//!
//! - `emit` never blocks and never allocates: the event goes into one bounded
//!   queue per node (`--webhook-queue` events); when it is full the event is
//!   dropped and counted (`corecast_webhook_dropped_total{reason="queue_full"}`).
//! - One sender thread per node (never a shard thread: the request blocks)
//!   takes the events in order, up to [`MAX_BATCH`] a request, lingering
//!   [`LINGER`] after the first so that a burst leaves in one request, and
//!   POSTs `{"events":[…]}` (`sender`), signed with `--webhook-secret`
//!   (`sign`). A 2xx acknowledges the batch; anything else is retried with
//!   backoff until the give-up age (`config::WEBHOOK_GIVE_UP`), then the
//!   batch is dropped and counted (`reason="expired"`). Batches go one at a
//!   time, in order: while one is retried, new events wait in the queue.
//! - [`Webhooks::flush_and_stop`] lets a draining node send what it holds,
//!   within a bounded wait.
//!
//! Delivery is at least once: a batch whose 2xx was lost on the way back is
//! sent again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::config::WebhookConfig;
use crate::metrics::Metrics;

mod sender;
mod sign;

pub use sign::{SIGNATURE_HEADER, signature};

/// Events in one request, at most (PROTOCOL.md §11).
pub const MAX_BATCH: usize = 100;

/// How long the sender waits for more events after the first of a batch.
pub const LINGER: Duration = Duration::from_millis(20);

/// One request's time limit (connect, send, answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The first retry's backoff; it doubles with each failure, up to `MAX_BACKOFF`.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// The longest backoff between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the sender is given to finish when the last handle is dropped
/// without [`Webhooks::flush_and_stop`].
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// The four presence transitions (PROTOCOL.md §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WebhookKind {
    /// A user's first connection anywhere.
    UserOnline,
    /// The user has had no connection anywhere for the debounce.
    UserOffline,
    /// A room of a presence namespace got its first connection.
    RoomOccupied,
    /// The room has had none for the debounce.
    RoomVacated,
}

impl WebhookKind {
    /// The wire name (`"event"`).
    pub fn name(self) -> &'static str {
        match self {
            WebhookKind::UserOnline => "user_online",
            WebhookKind::UserOffline => "user_offline",
            WebhookKind::RoomOccupied => "room_occupied",
            WebhookKind::RoomVacated => "room_vacated",
        }
    }

    /// The key that carries the subject: `"user"` or `"room"`.
    pub fn subject_key(self) -> &'static str {
        match self {
            WebhookKind::UserOnline | WebhookKind::UserOffline => "user",
            WebhookKind::RoomOccupied | WebhookKind::RoomVacated => "room",
        }
    }
}

/// One event: `{"event":E,"user":U | "room":R,"at_ms":T}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    pub kind: WebhookKind,
    /// The user id (user events) or the room (room events).
    pub subject: Box<str>,
    /// When the transition happened, Unix milliseconds.
    pub at_ms: u64,
}

impl WebhookEvent {
    pub fn new(kind: WebhookKind, subject: &str, at_ms: u64) -> WebhookEvent {
        WebhookEvent { kind, subject: subject.into(), at_ms }
    }

    /// The event stamped with the wall clock now.
    pub fn now(kind: WebhookKind, subject: &str) -> WebhookEvent {
        WebhookEvent::new(kind, subject, unix_ms())
    }
}

impl Serialize for WebhookEvent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("event", self.kind.name())?;
        m.serialize_entry(self.kind.subject_key(), &*self.subject)?;
        m.serialize_entry("at_ms", &self.at_ms)?;
        m.end()
    }
}

/// The request body for `events` (at most [`MAX_BATCH`] of them):
/// `{"events":[…]}`, escaped by `serde_json`.
pub fn body(events: &[WebhookEvent]) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        events: &'a [WebhookEvent],
    }
    // Cannot fail: strings and integers only.
    serde_json::to_vec(&Body { events }).expect("a webhook body serializes")
}

/// Unix milliseconds now (0 before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The node's webhook sender: a cheap handle (`Clone + Send + Sync`) every
/// shard may hold. Dropping the last handle asks the sender to finish within
/// [`STOP_GRACE`] without waiting for it; [`Webhooks::flush_and_stop`] waits.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    events: Sender<WebhookEvent>,
    /// The deadline of a stop (capacity 1: the first one counts).
    stop: Sender<Instant>,
    /// Disconnected when the sender thread has finished.
    done: Receiver<()>,
    metrics: Arc<Metrics>,
}

impl Webhooks {
    /// Starts the sender thread; `None` when `cfg` has no URL.
    pub fn start(cfg: &WebhookConfig, metrics: Arc<Metrics>) -> Option<Webhooks> {
        let url = cfg.url.clone()?;
        let (events, events_rx) = crossbeam_channel::bounded(cfg.queue.max(1));
        let (stop, stop_rx) = crossbeam_channel::bounded(1);
        let (done_tx, done) = crossbeam_channel::bounded(0);
        let sender = sender::Sender::new(
            url,
            cfg.secret.clone(),
            cfg.give_up_after,
            events_rx,
            stop_rx,
            done_tx,
            metrics.clone(),
        );
        std::thread::Builder::new()
            .name("webhook".into())
            .spawn(move || sender.run())
            .expect("spawn the webhook sender thread");
        Some(Webhooks { inner: Arc::new(Inner { events, stop, done, metrics }) })
    }

    /// Queues `ev` for delivery. Never blocks: with the queue full (the
    /// receiver slow or down), the event is dropped and counted.
    pub fn emit(&self, ev: WebhookEvent) {
        let w = &self.inner.metrics.webhook;
        match self.inner.events.try_send(ev) {
            Ok(()) => w.events_total.add_shared(1),
            Err(TrySendError::Full(_)) => w.dropped_queue_full.add_shared(1),
            // The sender has stopped (the node is going away).
            Err(TrySendError::Disconnected(_)) => w.dropped_stopped.add_shared(1),
        }
    }

    /// Asks the sender to deliver what it holds and stop, and waits for it at
    /// most `wait`. Failed requests are retried (backoff) until then; what is
    /// still undelivered at the deadline is dropped and counted
    /// (`reason="stopped"`). A request already under way when this is called
    /// keeps its own time limit ([`REQUEST_TIMEOUT`]), so against a receiver
    /// that hangs the thread may outlive this call: the wait stays bounded.
    /// True when the sender finished in time. Events emitted afterwards are
    /// counted as dropped.
    pub fn flush_and_stop(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        // Full: a stop with an earlier deadline was asked for already.
        let _ = self.inner.stop.try_send(deadline);
        // A little past the deadline: the sender's own accounting at it.
        matches!(
            self.inner.done.recv_deadline(deadline + Duration::from_millis(200)),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        )
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.stop.try_send(Instant::now() + STOP_GRACE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_exactly_the_protocols_and_escaped() {
        let evs = [
            WebhookEvent::new(WebhookKind::UserOnline, "u1", 1),
            WebhookEvent::new(WebhookKind::UserOffline, "u\"2\\\n", 2),
            WebhookEvent::new(WebhookKind::RoomOccupied, "chat:é", 3),
            WebhookEvent::new(WebhookKind::RoomVacated, "r", u64::MAX),
        ];
        let text = String::from_utf8(body(&evs)).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"events":[{"event":"user_online","user":"u1","at_ms":1},"#,
                r#"{"event":"user_offline","user":"u\"2\\\n","at_ms":2},"#,
                r#"{"event":"room_occupied","room":"chat:é","at_ms":3},"#,
                r#"{"event":"room_vacated","room":"r","at_ms":18446744073709551615}]}"#
            )
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["events"][1]["user"], "u\"2\\\n");
    }

    #[test]
    fn the_handle_is_cheap_to_share_across_threads() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        shareable::<Webhooks>();
        assert_eq!(std::mem::size_of::<Webhooks>(), std::mem::size_of::<usize>(), "one Arc");
    }

    #[test]
    fn no_url_no_sender() {
        let m = Arc::new(Metrics::new(1));
        assert!(Webhooks::start(&WebhookConfig::default(), m).is_none());
    }
}
