//! The sender thread: batches, POSTs, retries, gives up, stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, select};
use tracing::{error, info, warn};

use super::{
    FIRST_BACKOFF, LINGER, MAX_BACKOFF, MAX_BATCH, REQUEST_TIMEOUT, SIGNATURE_HEADER, STOP_GRACE, WebhookEvent, body,
    signature,
};
use crate::metrics::Metrics;

/// Bytes of a receiver's answer read (and discarded, so that the connection
/// can be used again); the rest closes it.
const MAX_ANSWER_BYTES: u64 = 64 * 1024;

pub(super) struct Sender {
    url: Box<str>,
    secret: Option<Box<str>>,
    give_up_after: Duration,
    agent: ureq::Agent,
    events: Receiver<WebhookEvent>,
    stop_rx: Receiver<Instant>,
    /// Set once a stop was asked for: the sender stops lingering and
    /// waiting, sends what it holds, and ends at this deadline.
    stop: Option<Instant>,
    /// Dropped when the thread ends (`Webhooks::flush_and_stop` waits for it).
    _done: crossbeam_channel::Sender<()>,
    metrics: Arc<Metrics>,
}

impl Sender {
    pub(super) fn new(
        url: Box<str>,
        secret: Option<Box<str>>,
        give_up_after: Duration,
        events: Receiver<WebhookEvent>,
        stop_rx: Receiver<Instant>,
        done: crossbeam_channel::Sender<()>,
        metrics: Arc<Metrics>,
    ) -> Sender {
        let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::PlatformVerifier).build();
        let agent = ureq::Agent::config_builder()
            // A status is an answer, not an error: anything but 2xx is retried.
            .http_status_as_error(false)
            // Never followed: a POST redirected would become a GET whose 200
            // acknowledges nothing. A 3xx is a failure, retried.
            .max_redirects(0)
            .user_agent(format!("corecast/{}", env!("CARGO_PKG_VERSION")))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .tls_config(tls)
            .build()
            .new_agent();
        Sender { url, secret, give_up_after, agent, events, stop_rx, stop: None, _done: done, metrics }
    }

    pub(super) fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while self.gather(&mut batch) {
            self.deliver(&batch);
            batch.clear();
            if self.stop.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        // What the deadline left in the queue. (An emit that races with the
        // end of the thread may still slip in, uncounted: the node is exiting.)
        let left = self.events.try_iter().count() as u64;
        self.metrics.webhook.dropped_stopped.add_shared(left);
        if left > 0 {
            warn!(events = left, "webhook: stopped with events undelivered");
        }
    }

    /// Fills `batch` with the next events in order. False when there is
    /// nothing left to do: stopping with the queue empty, or every handle
    /// gone and the queue empty.
    fn gather(&mut self, batch: &mut Vec<WebhookEvent>) -> bool {
        if self.stop.is_some() {
            // Stopping: no lingering, whatever is there.
            batch.extend(self.events.try_iter().take(MAX_BATCH));
            return !batch.is_empty();
        }
        select! {
            recv(self.events) -> ev => match ev {
                Ok(ev) => batch.push(ev),
                // Every handle is gone and the queue is empty.
                Err(_) => return false,
            },
            recv(self.stop_rx) -> d => {
                self.stop = Some(d.unwrap_or_else(|_| Instant::now() + STOP_GRACE));
                return self.gather(batch);
            }
        }
        let until = Instant::now() + LINGER;
        while batch.len() < MAX_BATCH {
            match self.events.recv_deadline(until) {
                Ok(ev) => batch.push(ev),
                Err(_) => break,
            }
        }
        true
    }

    /// Sends `batch` until it is acknowledged, it expires, or the stop
    /// deadline passes; counts the outcome.
    fn deliver(&mut self, batch: &[WebhookEvent]) {
        let w = &self.metrics.webhook;
        let n = batch.len() as u64;
        let body = body(batch);
        let first = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut failures = 0u32;
        loop {
            let timeout = match self.stop {
                Some(d) => d.saturating_duration_since(Instant::now()).min(REQUEST_TIMEOUT),
                None => REQUEST_TIMEOUT,
            };
            if timeout.is_zero() {
                w.dropped_stopped.add_shared(n);
                warn!(events = n, attempts = failures, "webhook: batch undelivered at stop, dropped");
                return;
            }
            if failures > 0 {
                w.retries_total.add_shared(1);
            }
            match self.post(&body, timeout) {
                Ok(()) => {
                    w.requests_ok.add_shared(1);
                    w.sent_total.add_shared(n);
                    if failures > 0 {
                        info!(events = n, attempts = failures + 1, "webhook: batch delivered after retries");
                    }
                    return;
                }
                Err(why) => {
                    w.requests_error.add_shared(1);
                    if failures == 0 {
                        warn!(events = n, "webhook: request failed ({why}); retrying with backoff");
                    }
                    failures += 1;
                }
            }
            let elapsed = first.elapsed();
            if elapsed >= self.give_up_after {
                w.dropped_expired.add_shared(n);
                error!(
                    events = n,
                    attempts = failures,
                    "webhook: batch not acknowledged after {:?}, dropped",
                    self.give_up_after
                );
                return;
            }
            // Full jitter over the upper half: [backoff/2, backoff].
            let wait = backoff.mul_f64(0.5 + fastrand::f64() * 0.5).min(self.give_up_after - elapsed);
            backoff = (backoff * 2).min(MAX_BACKOFF);
            match self.stop {
                // A stop ends the wait: what the node holds is tried again at once.
                None => match self.stop_rx.recv_timeout(wait) {
                    Ok(d) => self.stop = Some(d),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => self.stop = Some(Instant::now() + STOP_GRACE),
                },
                Some(d) => std::thread::sleep(wait.min(d.saturating_duration_since(Instant::now()))),
            }
        }
    }

    /// One POST of `body`; `Ok` on a 2xx answer.
    fn post(&self, body: &[u8], timeout: Duration) -> Result<(), String> {
        let mut req = self.agent.post(&*self.url).header("Content-Type", "application/json");
        if let Some(secret) = &self.secret {
            req = req.header(SIGNATURE_HEADER, signature(secret.as_bytes(), super::unix_ms() / 1000, body));
        }
        let req = req.config().timeout_global(Some(timeout)).build();
        match req.send(body) {
            Ok(mut answer) => {
                let status = answer.status();
                // Read (and discard) the answer so that the connection is kept.
                let _ = answer.body_mut().with_config().limit(MAX_ANSWER_BYTES).read_to_vec();
                if status.is_success() { Ok(()) } else { Err(format!("status {status}")) }
            }
            Err(e) => Err(e.to_string()),
        }
    }
}
