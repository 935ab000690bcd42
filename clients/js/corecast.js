// corecast.js: the JavaScript client of corecast (PROTOCOL.md v1.2 plus the
// `refresh` extension in the project's docs/auth.md). A plain ES module with no
// dependencies and no build step: it runs as is in browsers and in node
// (node >= 22 has a global WebSocket; node 20 needs --experimental-websocket,
// or pass any WHATWG-style WebSocket class as `options.WebSocket`).
//
// What it owns: one WebSocket at a time to a corecast node, and everything a
// long-lived connection needs around it:
// - requests with an `id` (publish, send, history, ping, subscribe) are
//   Promises resolved by the server's reply to that id (`ack`, `pong`,
//   `history`, `subscribed`) or rejected by an `error` carrying it;
// - reconnect by itself with full-jitter exponential backoff, and after a
//   `maintenance` event (§5) no earlier than the delay the server asked for;
// - on every new connection, resubscribe every room, with `since` = the last
//   stream position seen (§7), so that a room with history replays exactly
//   what was missed; the outcome (`recovered` true/false, `gap`) goes to the
//   app's handlers;
// - a safety net on the client: a message whose offset is at or below the
//   last one seen in the same epoch is dropped, and a skipped offset is
//   reported as a gap;
// - token refresh: `getToken()` is asked for a token before every connect and
//   again before the current token's `exp` (read from the JWT, not verified),
//   sent with the `refresh` op;
// - subscription tokens (§13): `subscribe(room, {token, getToken})` sends the
//   token with the subscribe, and `getToken(room)`, when given, is asked for a
//   fresh one before that token's `exp` (sent as `refresh` with the room) and
//   before a resubscribe whose token is about to expire.
// - presence (§11): `presence()` pages through every member, `stats()` the
//   counts, `onJoin`/`onLeave` per event, and for a room subscribed with
//   `{presence: true}` a live member set (`sub.members`), fetched after every
//   (re)subscribe and then kept current by join/leave events.
// - server-side subscriptions (§12 `POST /api/subscribe`, §13 `subs` claim):
//   a `subscribed` the app did not ask for becomes a Subscription like the
//   app's own (the "subscription" event hands it over), kept across
//   reconnects and recovered from its position like any other, until the
//   server's `unsubscribed` (or the app's `unsubscribe()`) ends it.
//
// What enters: server events (JSON text frames). What leaves: client ops,
// and callbacks / Promise results to the app.

/** Error with the server's `code` (`bad_request`, `bad_room`, `forbidden`,
 * `rate_limited`, `too_large`, `unavailable`, `token_expired`) or one of the
 * client's own: `not_connected`, `disconnected`, `timeout`, `closed`. */
export class CorecastError extends Error {
  constructor(code, message) {
    super(message ? `${code}: ${message}` : code);
    this.name = "CorecastError";
    this.code = code;
  }
}

const OPEN = 1; // WebSocket.OPEN

/** Reads `exp` (Unix seconds) from a JWT without verifying it; null if absent. */
export function jwtExp(token) {
  const claims = jwtClaims(token);
  return claims && typeof claims.exp === "number" ? claims.exp : null;
}

/** A JWT's claims, read without verifying; null if unreadable. */
function jwtClaims(token) {
  if (typeof token !== "string") return null;
  const part = token.split(".")[1];
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((part.length + 3) % 4);
    const bin = atob(b64);
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/** Full-jitter exponential backoff: a uniform draw from [0, min(max, min * 2^attempt)]. */
export function backoffDelay(attempt, minMs, maxMs, random = Math.random) {
  const cap = Math.min(maxMs, minMs * 2 ** Math.min(attempt, 30));
  return Math.round(random() * cap);
}

/** One room the app is subscribed to; resubscribed after every reconnect. */
export class Subscription {
  constructor(client, room, handlers) {
    this.client = client;
    this.room = room;
    this.handlers = handlers || {};
    /** "pending" until the first `subscribed`, then "subscribed"; "closed" when over. */
    this.state = "pending";
    /** Last stream position seen, `{epoch, offset}`, or null (no history).
     * `handlers.since` starts it at a position stored earlier (§7 recovery
     * from there on the first subscribe too). */
    const since = this.handlers.since;
    this.position =
      since && typeof since.epoch === "string" && Number.isInteger(since.offset)
        ? { epoch: since.epoch, offset: since.offset }
        : null;
    /** Messages dropped because their offset was already seen. */
    this.duplicatesDropped = 0;
    /** true when the server created it (§12 `POST /api/subscribe`, §13
     * `subs` claim) rather than `subscribe()`. */
    this.server = false;
    /** §13 subscription token (`handlers.token`) and its `exp` (Unix s). */
    this.token = this.handlers.token ?? null;
    this.tokenExp = jwtExp(this.token);
    this._retryTimer = null;
    this._refreshTimer = null;
    /** `{presence: true}`: keep `members` current (§11). Only such rooms send
     * the `presence` op by themselves. */
    this.presenceEnabled = this.handlers.presence === true;
    /** The room's members (user ids) as last synced: filled by a `presence`
     * fetch after every (re)subscribe, then kept current by join/leave.
     * The same Set object for the subscription's whole life. */
    this.members = new Set();
    /** true once `members` reflects a fetch made on the current connection. */
    this.membersSynced = false;
    this._presenceGen = 0; // a fetch whose generation is not current is stale
    this._presenceBuffer = null; // [kind, user] events seen while a fetch is in flight
    this._presenceTimer = null;
    this._graceRecheckAt = 0; // Date.now() after which a fetch is owed (see _syncPresence)
    this._selfRechecks = 0;
    this.ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    // An app that never looks at `ready` still hears of errors via onError.
    this.ready.catch(() => {});
  }

  /** Leaves the room. Resolves when the server confirmed (or at once if offline). */
  unsubscribe() {
    return this.client._unsubscribe(this);
  }

  /** Adds (or replaces) handlers, e.g. on a subscription the server made
   * (`client.on("subscription", (sub) => sub.setHandlers({onMessage}))`).
   * Returns the subscription. */
  setHandlers(handlers) {
    Object.assign(this.handlers, handlers || {});
    if (this.handlers.presence === true && !this.presenceEnabled && this.state !== "closed") {
      this.presenceEnabled = true;
      if (this.state === "subscribed") this.client._syncPresence(this);
    }
    return this;
  }

  /** Every member of the room (§11), all pages: see `Corecast.presence`. */
  presence(options) {
    return this.client.presence(this.room, options);
  }

  /** The room's counts `{clients, users}` (§11 `presence_stats`). */
  stats() {
    return this.client.presenceStats(this.room);
  }

  _call(name, arg) {
    const fn = this.handlers[name];
    if (typeof fn !== "function") return;
    try {
      fn.call(this, arg, this);
    } catch (e) {
      this.client._emit("error", e);
    }
  }
}

export class Corecast {
  /**
   * @param {string|string[]} url  ws(s):// or http(s):// address of a node (or
   *   several, tried in turn); a bare origin gets the path `/ws`.
   * @param {object} [options]  see corecast.d.ts
   */
  constructor(url, options = {}) {
    const urls = Array.isArray(url) ? url : [url];
    if (urls.length === 0) throw new TypeError("corecast: no url");
    this.urls = urls.map(normalizeUrl);
    this.options = options;
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    if (typeof this.WebSocket !== "function") {
      throw new TypeError(
        "corecast: no WebSocket class; pass options.WebSocket (node 20: run with --experimental-websocket)",
      );
    }
    this.backoff = {
      minMs: options.backoff?.minMs ?? 250,
      maxMs: options.backoff?.maxMs ?? 15000,
    };
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10000;
    this.pingIntervalMs = options.pingIntervalMs ?? 25000;
    this.refreshMarginMs = options.refreshMarginMs ?? 30000;
    this.random = options.random || Math.random;

    /** "idle" | "connecting" | "open" | "reconnecting" | "closed" */
    this.state = "idle";
    /** Completed connects (the first one included). */
    this.connects = 0;
    /** Failed or lost connections so far. */
    this.disconnects = 0;
    this.token = options.token ?? null;
    this.tokenExp = jwtExp(this.token);

    this._subs = new Map(); // room -> Subscription
    this._pending = new Map(); // id -> {resolve, reject, timer}
    this._nextId = 1;
    this._ws = null;
    this._urlIndex = 0;
    this._attempt = 0;
    this._openedAt = 0;
    this._maintenanceUntil = 0; // Date.now() before which we must not reconnect
    this._timers = { reconnect: null, ping: null, refresh: null };
    this._listeners = new Map();
    this._openWaiters = [];
    if (options.onState) this.on("state", options.onState);
    if (options.onDirect) this.on("direct", options.onDirect);
    if (options.onError) this.on("error", options.onError);
    if (options.onSubscription) this.on("subscription", options.onSubscription);
  }

  // ---- events --------------------------------------------------------------

  /** Adds a listener: "state", "direct", "error", "maintenance", "refreshed",
   * "open", "close", "disconnect", "terminated", "subscription" (a
   * subscription the server made), "unsubscribed" (the server ended one).
   * Returns a function that removes it. */
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this._listeners.get(name)?.delete(fn);
  }

  _emit(name, arg) {
    const set = this._listeners.get(name);
    if (!set || set.size === 0) return;
    for (const fn of [...set]) {
      try {
        fn(arg, this);
      } catch (e) {
        if (name !== "error") this._emit("error", e);
      }
    }
  }

  _setState(state, detail = {}) {
    this.state = state;
    this._emit("state", { state, ...detail });
  }

  // ---- connection lifecycle -------------------------------------------------

  /** Starts connecting (and reconnecting, until `close()`). Resolves once a
   * connection is open. */
  connect() {
    if (this.state === "closed") return Promise.reject(new CorecastError("closed", "client was closed"));
    const opened = this.state === "open" ? Promise.resolve() : new Promise((resolve, reject) => {
      this._openWaiters.push({ resolve, reject });
    });
    if (this.state === "idle") this._open("start");
    return opened;
  }

  /** Closes for good: no reconnect, pending requests reject with `closed`. */
  close() {
    if (this.state === "closed") return;
    this._clearTimers();
    for (const sub of this._subs.values()) {
      clearTimeout(sub._retryTimer);
      clearTimeout(sub._presenceTimer);
    }
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      detach(ws);
      try {
        ws.close(1000);
      } catch {
        // already closing
      }
    }
    this._failPending(new CorecastError("closed", "client was closed"));
    for (const w of this._openWaiters.splice(0)) w.reject(new CorecastError("closed", "client was closed"));
    this._setState("closed");
  }

  async _open(reason) {
    this._timers.reconnect = null;
    const url = this.urls[this._urlIndex % this.urls.length];
    this._setState("connecting", { url, attempt: this._attempt, reason });
    let token = this.token;
    if (this.options.getToken) {
      try {
        token = await this.options.getToken();
      } catch (e) {
        this._emit("error", e);
        if (this.state !== "closed") this._scheduleReconnect("token");
        return;
      }
      if (this.state === "closed") return;
      this.token = token;
      this.tokenExp = jwtExp(token);
    }
    const q = new URLSearchParams();
    if (this.options.user) q.set("user", this.options.user);
    if (token) q.set("token", token);
    const qs = q.toString();
    const full = qs ? `${url}${url.includes("?") ? "&" : "?"}${qs}` : url;
    let ws;
    try {
      ws = new this.WebSocket(full);
    } catch (e) {
      this._emit("error", e);
      this._scheduleReconnect("error");
      return;
    }
    this._ws = ws;
    let opened = false;
    // A handshake that hangs (a black-holed address) counts as a failure.
    const connectTimer = setTimeout(() => {
      if (!opened && ws === this._ws) this._drop(ws, 1006, "connect timeout");
    }, this.requestTimeoutMs);
    ws.onopen = () => {
      opened = true;
      clearTimeout(connectTimer);
      this._onOpen(ws, url);
    };
    ws.onmessage = (e) => this._onFrame(ws, e.data);
    ws.onerror = () => {
      // Browsers follow an error with a close event; node 20's WebSocket
      // does not when the handshake fails (refused, 401, 503), and leaves
      // readyState at CONNECTING. Either way, a socket that never opened is
      // done; an open one gets a moment for its close event.
      if (!opened) {
        clearTimeout(connectTimer);
        if (ws === this._ws) this._drop(ws, 1006, "connect failed");
        return;
      }
      setTimeout(() => {
        if (ws === this._ws) this._drop(ws, 1006, "socket error");
      }, 1000);
    };
    ws.onclose = (e) => {
      clearTimeout(connectTimer);
      this._onClose(ws, e.code, e.reason);
    };
  }

  _onOpen(ws, url) {
    if (ws !== this._ws) return;
    this._openedAt = Date.now();
    this._maintenanceUntil = 0;
    this.connects++;
    this._setState("open", { url, reconnect: this.connects > 1 });
    this._emit("open", { url, reconnect: this.connects > 1 });
    for (const w of this._openWaiters.splice(0)) w.resolve();
    for (const sub of this._subs.values()) this._sendSubscribe(sub);
    this._schedulePing();
    this._scheduleRefresh();
  }

  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    detach(ws);
    this._ws = null;
    clearTimeout(this._timers.ping);
    clearTimeout(this._timers.refresh);
    this._failPending(new CorecastError("disconnected", `connection closed (${code})`));
    for (const sub of this._subs.values()) {
      clearTimeout(sub._retryTimer);
      clearTimeout(sub._refreshTimer);
      clearTimeout(sub._presenceTimer);
      if (sub.state === "subscribed") sub.state = "pending";
      // Joins and leaves are missed from here on: the set is re-fetched
      // after the resubscribe.
      sub._presenceGen++;
      sub._presenceBuffer = null;
      sub._selfRechecks = 0;
      sub.membersSynced = false;
    }
    this.disconnects++;
    const wasOpen = this._openedAt > 0;
    // A connection that stayed up a while starts the backoff afresh; one that
    // keeps dying at once (an expired token, a full node) keeps backing off.
    if (wasOpen && Date.now() - this._openedAt >= Math.max(5000, this.backoff.maxMs)) this._attempt = 0;
    this._openedAt = 0;
    // PROTOCOL.md §12: 4500-4999 is terminal (banned, logged out,
    // replaced): no reconnect; the app hears why (the `disconnect` event's
    // reason when the server sent one).
    const terminal = code >= 4500 && code <= 4999;
    const said = this._disconnect && this._disconnect.code === code ? this._disconnect.reason : reason;
    this._disconnect = null;
    this._emit("close", { code, reason: said || reason, wasOpen, terminal });
    if (this.state === "closed") return;
    if (terminal) {
      this._emit("terminated", { code, reason: said || reason });
      this.close();
      return;
    }
    // Next node in the list (one node: the same again).
    this._urlIndex++;
    this._scheduleReconnect(this._maintenanceUntil > Date.now() ? "maintenance" : "closed", code);
  }

  _scheduleReconnect(reason, code) {
    if (this.state === "closed") return;
    const now = Date.now();
    let delayMs;
    if (this._maintenanceUntil > 0) {
      // §5: the server said when to come back; its delays are already spread
      // over the drain window, so no more jitter on top.
      delayMs = Math.max(0, this._maintenanceUntil - now);
      this._maintenanceUntil = 0;
      reason = "maintenance";
    } else {
      delayMs = backoffDelay(this._attempt, this.backoff.minMs, this.backoff.maxMs, this.random);
      this._attempt++;
    }
    this._setState("reconnecting", { delayMs, reason, code, attempt: this._attempt });
    this._timers.reconnect = setTimeout(() => this._open(reason), delayMs);
  }

  _clearTimers() {
    for (const k of Object.keys(this._timers)) {
      clearTimeout(this._timers[k]);
      this._timers[k] = null;
    }
  }

  _schedulePing() {
    clearTimeout(this._timers.ping);
    if (!(this.pingIntervalMs > 0)) return;
    const ws = this._ws;
    this._timers.ping = setTimeout(() => {
      if (ws !== this._ws) return;
      // A reply proves the path is alive; none within the request timeout
      // means a half-open connection: drop it and reconnect.
      this.ping().then(
        () => this._schedulePing(),
        (e) => {
          if (ws === this._ws && e.code === "timeout") this._drop(ws, 1006, "ping timeout");
        },
      );
    }, this.pingIntervalMs);
  }

  /** Gives up on a socket that is not closing by itself; `code` is what the
   * app's "close" event reports. */
  _drop(ws, code, why) {
    // Detached first: closing may fire error/close events synchronously.
    detach(ws);
    try {
      ws.close(code === 1000 ? 1000 : 4000, why);
    } catch {
      // already closing, or never opened
    }
    this._onClose(ws, code, why);
  }

  // ---- token refresh --------------------------------------------------------

  _scheduleRefresh() {
    clearTimeout(this._timers.refresh);
    if (!this.options.getToken || !this.tokenExp) return;
    const left = this.tokenExp * 1000 - Date.now();
    const margin = Math.min(this.refreshMarginMs, left / 2);
    const ws = this._ws;
    this._timers.refresh = setTimeout(() => this._refresh(ws), Math.max(0, left - margin));
  }

  async _refresh(ws) {
    if (ws !== this._ws) return;
    let token;
    try {
      token = await this.options.getToken();
    } catch (e) {
      this._emit("error", e);
      return;
    }
    if (ws !== this._ws) return;
    try {
      const reply = await this._request({ op: "refresh", token });
      this.token = token;
      this.tokenExp = typeof reply.exp === "number" ? reply.exp : jwtExp(token);
      this._emit("refreshed", { exp: this.tokenExp });
      this._scheduleRefresh();
    } catch (e) {
      // The old token still holds until its exp; at expiry the server closes
      // with token_expired and the reconnect asks getToken() again.
      this._emit("error", e);
    }
  }

  // ---- requests -------------------------------------------------------------

  /** Sends `op` with a fresh id. Without `hooks`, returns a Promise of the
   * reply; with `{ok, err}`, calls them synchronously from the frame handler
   * (subscribe needs that: the frames after `subscribed` must see its effect). */
  _request(op, hooks) {
    const ws = this._ws;
    if (!ws || ws.readyState !== OPEN) {
      const e = new CorecastError("not_connected", "no open connection");
      if (hooks) return hooks.err(e);
      return Promise.reject(e);
    }
    const id = this._nextId++;
    const register = (resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new CorecastError("timeout", `no reply to ${op.op} within ${this.requestTimeoutMs} ms`));
      }, this.requestTimeoutMs);
      this._pending.set(id, { resolve, reject, timer });
      ws.send(JSON.stringify({ ...op, id }));
    };
    if (hooks) return register(hooks.ok, hooks.err);
    return new Promise(register);
  }

  _failPending(err) {
    const all = [...this._pending.values()];
    this._pending.clear();
    for (const p of all) {
      clearTimeout(p.timer);
      p.reject(err);
    }
  }

  _settle(id, ok, value) {
    const p = this._pending.get(id);
    if (!p) return false;
    this._pending.delete(id);
    clearTimeout(p.timer);
    (ok ? p.resolve : p.reject)(value);
    return true;
  }

  /** Publishes `data` (any JSON value) to `room`. Resolves on `ack`. */
  publish(room, data) {
    return this._request({ op: "publish", room, data }).then(() => undefined);
  }

  /** Sends `data` to every connection of `user`. Resolves on `ack`. */
  send(user, data) {
    return this._request({ op: "send", user, data }).then(() => undefined);
  }

  /** §7 history op: `{room, epoch, offset, messages, more}`. A reply is
   * one page (at most half the server's outbound queue): with `more` true,
   * ask again with `since` at the last message's offset for the rest. */
  history(room, { limit, since } = {}) {
    const op = { op: "history", room };
    if (limit !== undefined) op.limit = limit;
    if (since) op.since = { epoch: since.epoch, offset: since.offset };
    return this._request(op).then((m) => ({
      room: m.room,
      epoch: m.epoch,
      offset: m.offset,
      messages: m.messages || [],
      more: m.more === true,
    }));
  }

  /** Round trip to the server; resolves to the time it took in ms. */
  ping() {
    const t0 = Date.now();
    return this._request({ op: "ping" }).then(() => Date.now() - t0);
  }

  /** §11 `presence` op, every page: follows `next` (as `after`) until the
   * server sends none; `limit` is the page size (default 1000, the server's
   * cap is 10000). Resolves to `{room, clients, users, members: [{user,
   * clients}]}` with members in the server's order (ascending ids) and the
   * counts of the last page. Pages are read one after another, so a member
   * who comes or goes meanwhile may be listed or not (join/leave say so). */
  async presence(room, { limit = 1000 } = {}) {
    const members = [];
    let after;
    let last;
    for (;;) {
      const op = { op: "presence", room, limit };
      if (after !== undefined) op.after = after;
      last = await this._request(op);
      for (const m of last.members || []) members.push({ user: m.user, clients: m.clients });
      if (typeof last.next !== "string") break;
      after = last.next;
    }
    return { room, clients: last.clients, users: last.users, members };
  }

  /** §11 `presence_stats` op: `{room, clients, users}`. */
  presenceStats(room) {
    return this._request({ op: "presence_stats", room }).then((m) => ({
      room,
      clients: m.clients,
      users: m.users,
    }));
  }

  // ---- subscriptions --------------------------------------------------------

  /** Subscribes to `room`; kept across reconnects until `unsubscribe()`. */
  subscribe(room, handlers = {}) {
    if (this.state === "closed") throw new CorecastError("closed", "client was closed");
    const have = this._subs.get(room);
    // A subscription the server made is the app's to take: same object,
    // with the app's handlers from now on (no second subscribe is sent).
    if (have && have.server && !have._adopted) {
      have._adopted = true;
      have.setHandlers(handlers);
      return have;
    }
    if (have) throw new Error(`corecast: already subscribed to ${room}`);
    const sub = new Subscription(this, room, handlers);
    this._subs.set(room, sub);
    if (this._ws && this._ws.readyState === OPEN) this._sendSubscribe(sub);
    return sub;
  }

  /** The Subscription for `room`, if any. */
  subscription(room) {
    return this._subs.get(room);
  }

  _sendSubscribe(sub) {
    clearTimeout(sub._retryTimer);
    clearTimeout(sub._refreshTimer);
    const ws = this._ws;
    // §13: a subscription token that is missing or about to expire is
    // replaced first when the app gave `getToken(room)`.
    const getToken = sub.handlers.getToken;
    if (typeof getToken === "function" && !sub._fresh && this._subTokenStale(sub)) {
      Promise.resolve()
        .then(() => getToken(sub.room))
        .then(
          (token) => {
            sub.token = token;
            sub.tokenExp = jwtExp(token);
            sub._fresh = true;
            if (this._subs.get(sub.room) === sub && ws === this._ws && ws) this._sendSubscribe(sub);
          },
          (e) => sub._call("onError", e),
        )
        .finally(() => {
          sub._fresh = false;
        });
      return;
    }
    const pos = sub.position || sub._tail;
    const since = pos ? { epoch: pos.epoch, offset: pos.offset } : null;
    const op = { op: "subscribe", room: sub.room };
    if (since) op.since = since;
    if (sub.token) op.token = sub.token;
    this._request(op, {
      ok: (reply) => {
        if (sub._endedByServer && !this._subs.has(sub.room) && ws === this._ws && ws.readyState === OPEN) {
          // The server's unsubscribe overtook this resubscribe, which then
          // made the connection a member again: leave, as the server asked.
          sub._endedByServer = false;
          this._request({ op: "unsubscribe", room: sub.room }).catch(() => {});
          return;
        }
        if (this._subs.get(sub.room) !== sub || ws !== this._ws) return;
        this._onSubscribed(sub, reply, since);
        this._scheduleSubRefresh(sub);
      },
      err: (err) => {
        if (this._subs.get(sub.room) !== sub) return;
        if (err.code === "disconnected" || err.code === "not_connected" || err.code === "closed") return; // resent on open
        if (ws !== this._ws) return;
        if (err.code === "rate_limited" || err.code === "unavailable" || err.code === "timeout") {
          // Passing trouble: try again on this connection a little later.
          sub._call("onError", err);
          const delay = backoffDelay(2, this.backoff.minMs, this.backoff.maxMs, this.random) + this.backoff.minMs;
          sub._retryTimer = setTimeout(() => {
            if (this._subs.get(sub.room) === sub && ws === this._ws) this._sendSubscribe(sub);
          }, delay);
          return;
        }
        const made = sub._serverMade;
        if (err.code === "forbidden" && made && made.ws === ws) {
          // Refused to us, but the server itself subscribed this connection
          // to the room meanwhile (a token's `subs` claim at connect, or
          // POST /api/subscribe): it is a member, from the server's position
          // (what was missed since ours is not replayed: a gap).
          sub._serverMade = null;
          this._onSubscribed(sub, made.reply, since);
          return;
        }
        // forbidden, bad_room, too_large: this subscription cannot be.
        this._subs.delete(sub.room);
        sub.state = "closed";
        sub._rejectReady(err);
        sub._call("onError", err);
      },
    });
  }

  /** Is `sub`'s subscription token missing or within the refresh margin of its exp? */
  _subTokenStale(sub) {
    if (!sub.token) return true;
    if (!sub.tokenExp) return false;
    return sub.tokenExp * 1000 - Date.now() <= Math.min(this.refreshMarginMs, 1000);
  }

  /** §13: asks `getToken(room)` for a fresh subscription token before the
   * current one's `exp` and sends it as `refresh` with the room. */
  _scheduleSubRefresh(sub) {
    clearTimeout(sub._refreshTimer);
    const getToken = sub.handlers.getToken;
    if (typeof getToken !== "function" || !sub.token || !sub.tokenExp) return;
    const left = sub.tokenExp * 1000 - Date.now();
    const margin = Math.min(this.refreshMarginMs, left / 2);
    const ws = this._ws;
    sub._refreshTimer = setTimeout(async () => {
      const live = () => this._subs.get(sub.room) === sub && ws === this._ws;
      if (!live()) return;
      try {
        const token = await getToken(sub.room);
        if (!live()) return;
        const reply = await this._request({ op: "refresh", room: sub.room, token });
        sub.token = token;
        sub.tokenExp = typeof reply.exp === "number" ? reply.exp : jwtExp(token);
        sub._call("onRefreshed", { room: sub.room, exp: sub.tokenExp });
        if (live()) this._scheduleSubRefresh(sub);
      } catch (e) {
        // The old token holds until its exp; then the server leaves the
        // room with `token_expired` (onError).
        sub._call("onError", e);
      }
    }, Math.max(0, left - margin));
  }

  _onSubscribed(sub, reply, since) {
    const resubscribed = sub._subscribedOnce === true;
    sub._subscribedOnce = true;
    sub.state = "subscribed";
    // Before anything after `subscribed` is read (our own join comes next):
    // the events from here on are buffered until the fetch is in.
    if (sub.presenceEnabled) this._syncPresence(sub);
    const hasHistory = reply.epoch !== undefined && reply.offset !== undefined;
    if (hasHistory) {
      const current = { epoch: reply.epoch, offset: reply.offset };
      if (since) {
        const recovered = reply.recovered === true && reply.epoch === since.epoch;
        if (recovered) {
          // The replay of since.offset+1 … reply.offset follows; position
          // advances as those messages arrive.
          sub._call("onRecovered", { room: sub.room, recovered: true, since, ...current });
        } else {
          sub.position = current;
          sub._call("onRecovered", { room: sub.room, recovered: false, since, ...current });
          sub._call("onGap", { room: sub.room, reason: "not_recovered", since, ...current });
        }
      } else if (reply.server === true && reply.recovered === true) {
        // A server subscribe with the backend's `since`: the replay from
        // there follows and sets the position; until a message does, a
        // resubscribe starts from the reply's position.
        sub._tail = current;
      } else {
        sub.position = current;
      }
    }
    sub._call("onSubscribed", {
      room: sub.room,
      resubscribed,
      server: reply.server === true,
      history: hasHistory,
      epoch: reply.epoch,
      offset: reply.offset,
      recovered: reply.recovered,
    });
    sub._resolveReady(sub);
  }

  _unsubscribe(sub) {
    if (this._subs.get(sub.room) !== sub) return Promise.resolve();
    this._subs.delete(sub.room);
    clearTimeout(sub._retryTimer);
    clearTimeout(sub._refreshTimer);
    clearTimeout(sub._presenceTimer);
    sub._presenceGen++;
    sub.state = "closed";
    sub._rejectReady(new CorecastError("closed", "unsubscribed"));
    if (!this._ws || this._ws.readyState !== OPEN) return Promise.resolve();
    return this._request({ op: "unsubscribe", room: sub.room }).then(
      () => undefined,
      (e) => {
        if (e.code === "disconnected" || e.code === "not_connected") return; // gone with the connection
        throw e;
      },
    );
  }

  // ---- the live member set (§11) ---------------------------------------------

  /** Fetches every member of `sub.room` and makes `sub.members` that set
   * plus the joins and leaves that arrived while the pages were read,
   * applied in order. Any event after `subscribed` is either in the buffer
   * or applied live, never both; and since for one user joins and leaves
   * alternate, the last event seen for a user decides, whether the snapshot
   * was read before or after it. */
  _syncPresence(sub) {
    clearTimeout(sub._presenceTimer);
    const gen = ++sub._presenceGen;
    if (!sub._presenceBuffer) sub._presenceBuffer = [];
    const ws = this._ws;
    const current = () => gen === sub._presenceGen && this._subs.get(sub.room) === sub && ws === this._ws;
    this.presence(sub.room, { limit: sub.handlers.presenceLimit ?? 1000 }).then(
      (p) => {
        if (!current()) return;
        const buffered = sub._presenceBuffer || [];
        sub._presenceBuffer = null;
        const next = new Set(p.members.map((m) => m.user));
        for (const [kind, user] of buffered) {
          if (kind === "join") next.add(user);
          else next.delete(user);
        }
        // Users we had who are not listed now: gone, or within their leave
        // grace (the list follows connections at once, the leave waits),
        // and such a user who comes back in time causes no join. Look again
        // once the grace is over.
        const missing = [...sub.members].some((u) => !next.has(u));
        // We are subscribed, so we are a member; a fetch read before our own
        // count was written (a Redis backplane writes it asynchronously)
        // lacks us, and our own join may not come (back within our grace,
        // or lost): look again soon, a few times.
        const me = this._ownUser();
        const selfMissing = me !== null && !next.has(me);
        sub.members.clear();
        for (const u of next) sub.members.add(u);
        sub.membersSynced = true;
        sub._call("onPresence", { room: sub.room, members: sub.members, reason: "sync" });
        sub._selfRechecks = selfMissing ? (sub._selfRechecks || 0) + 1 : 0;
        // The grace re-check is owed until a fetch completes after its time
        // (an earlier fetch, e.g. for ourselves, does not pay it).
        const now = Date.now();
        if (sub._graceRecheckAt && now >= sub._graceRecheckAt) sub._graceRecheckAt = 0;
        if (missing) {
          const at = now + (sub.handlers.presenceGraceMs ?? 5000) + 500;
          sub._graceRecheckAt = Math.max(sub._graceRecheckAt || 0, at);
        }
        let delay = sub._graceRecheckAt ? sub._graceRecheckAt - now : null;
        if (selfMissing && sub._selfRechecks <= 3) {
          delay = Math.min(delay ?? Infinity, 250 * sub._selfRechecks);
        }
        if (delay !== null) {
          sub._presenceTimer = setTimeout(() => {
            if (current()) this._syncPresence(sub);
          }, delay);
        }
      },
      (err) => {
        if (!current()) return;
        if (err.code === "disconnected" || err.code === "not_connected" || err.code === "closed") return;
        sub._call("onError", err);
        if (err.code === "rate_limited" || err.code === "unavailable" || err.code === "timeout") {
          // The buffer stays: the retry's snapshot needs the events since `subscribed`.
          const delay = backoffDelay(2, this.backoff.minMs, this.backoff.maxMs, this.random) + this.backoff.minMs;
          sub._presenceTimer = setTimeout(() => {
            if (current()) this._syncPresence(sub);
          }, delay);
          return;
        }
        // bad_request (no presence in the room's namespace), forbidden: no retry.
        sub._presenceBuffer = null;
      },
    );
  }

  /** Our user id, when the client knows it: the token's `sub`, else `user`. */
  _ownUser() {
    if (this.token) {
      const sub = jwtClaims(this.token)?.sub;
      return typeof sub === "string" ? sub : null;
    }
    return typeof this.options.user === "string" ? this.options.user : null;
  }

  _onPresenceEvent(kind, m) {
    const sub = this._subs.get(m.room);
    if (!sub || typeof m.user !== "string") return;
    let changed = false;
    if (sub.presenceEnabled) {
      if (sub._presenceBuffer) sub._presenceBuffer.push([kind, m.user]);
      else if (sub.membersSynced) {
        if (kind === "join" && !sub.members.has(m.user)) {
          sub.members.add(m.user);
          changed = true;
        } else if (kind === "leave" && sub.members.delete(m.user)) {
          changed = true;
        }
      }
    }
    sub._call(kind === "join" ? "onJoin" : "onLeave", { room: m.room, user: m.user });
    if (changed) sub._call("onPresence", { room: m.room, members: sub.members, reason: kind, user: m.user });
  }

  // ---- incoming frames ------------------------------------------------------

  _onFrame(ws, raw) {
    if (ws !== this._ws) return;
    let m;
    try {
      m = JSON.parse(typeof raw === "string" ? raw : new TextDecoder().decode(raw));
    } catch {
      this._emit("error", new CorecastError("bad_frame", "server sent a frame that is not JSON"));
      return;
    }
    if (!m || typeof m !== "object") return;
    switch (m.ev) {
      case "message":
        this._onMessage(m);
        break;
      case "gap": {
        const sub = this._subs.get(m.room);
        if (!sub) break;
        const since = sub.position;
        sub.position = { epoch: m.epoch, offset: m.offset };
        sub._call("onGap", { room: m.room, reason: "gap", since, epoch: m.epoch, offset: m.offset });
        break;
      }
      case "direct":
        this._emit("direct", { from: m.from, data: m.data });
        break;
      case "disconnect":
        // POST /api/disconnect (§12): the close with this code follows.
        this._disconnect = { code: m.code, reason: m.reason || "" };
        this._emit("disconnect", { code: m.code, reason: m.reason || "", terminal: m.code >= 4500 && m.code <= 4999 });
        break;
      case "join":
      case "leave":
        if (m.id === undefined) this._onPresenceEvent(m.ev, m);
        break;
      case "maintenance": {
        const ms = Number(m.reconnect_in_ms) || 0;
        this._maintenanceUntil = Date.now() + ms;
        this._emit("maintenance", { reconnectInMs: ms });
        // The server closes us (1001) when the delay is up; until then we
        // keep receiving. If it does not, leave on time anyway.
        const until = this._maintenanceUntil;
        setTimeout(() => {
          if (ws === this._ws && this._maintenanceUntil === until) this._drop(ws, 1000, "maintenance");
        }, ms + 2000);
        break;
      }
      case "subscribed":
        // §12 POST /api/subscribe (`server:true`) and §13's `subs` claim (no
        // `id`): a subscription the app did not ask for.
        if (m.server === true || m.id === undefined) this._onServerSubscribed(m);
        else this._settle(m.id, true, m);
        break;
      case "unsubscribed":
        if (m.id === undefined) {
          // The server left the room: POST /api/unsubscribe (`server:true`),
          // a refreshed token that no longer grants it, or (§13) an expired
          // subscription token.
          const sub = this._subs.get(m.room);
          if (sub) {
            const reason = m.server === true ? "server" : m.reason === "token_expired" ? "token_expired" : "forbidden";
            this._endByServer(sub, reason);
          }
          break;
        }
        this._settle(m.id, true, m);
        break;
      case "error": {
        const err = new CorecastError(m.code, m.message);
        err.event = m;
        if (m.id !== undefined && this._settle(m.id, false, err)) break;
        this._emit("error", err);
        break;
      }
      default:
        // subscribed, ack, pong, history, refreshed, and anything newer.
        if (m.id !== undefined) this._settle(m.id, true, m);
    }
  }

  /** A `subscribed` nobody asked for (§12 `POST /api/subscribe`, §13
   * `subs`). A room the client already has (the app's subscription, or a
   * resubscribe in flight whose own reply follows) is left as it is: the
   * connection is a member already, and the position the app's subscription
   * tracks stays right. Otherwise a new Subscription, handed to the app by
   * the "subscription" event before its `onSubscribed` and before any
   * message of the room. */
  _onServerSubscribed(m) {
    if (typeof m.room !== "string") return;
    const have = this._subs.get(m.room);
    if (have) {
      // Our own subscribe is in flight: should it be refused (a resubscribe
      // the token's grants do not cover), the server's membership stands.
      if (have.state === "pending") have._serverMade = { ws: this._ws, reply: m };
      return;
    }
    const sub = new Subscription(this, m.room, {});
    sub.server = true;
    this._subs.set(m.room, sub);
    this._emit("subscription", sub);
    if (this._subs.get(m.room) !== sub) return; // the listener unsubscribed it
    this._onSubscribed(sub, m, null);
  }

  /** The server left `sub`'s room: `reason` "server" (POST /api/unsubscribe),
   * "token_expired" or "forbidden" (§13: the room's grant is gone). */
  _endByServer(sub, reason) {
    this._subs.delete(sub.room);
    clearTimeout(sub._retryTimer);
    clearTimeout(sub._refreshTimer);
    clearTimeout(sub._presenceTimer);
    sub._presenceGen++;
    // A resubscribe of ours still in flight must not make us a member again.
    if (sub.state === "pending") sub._endedByServer = true;
    sub.state = "closed";
    sub._rejectReady(new CorecastError("closed", `unsubscribed by the server (${reason})`));
    if (reason === "token_expired") {
      sub._call("onError", new CorecastError("token_expired", "the subscription token expired"));
    } else if (reason === "forbidden") {
      sub._call("onError", new CorecastError("forbidden", "the refreshed token no longer grants this room"));
    }
    sub._call("onUnsubscribed", { room: sub.room, reason });
    this._emit("unsubscribed", { room: sub.room, reason, subscription: sub });
  }

  _onMessage(m) {
    const sub = this._subs.get(m.room);
    if (!sub) return;
    if (typeof m.offset === "number" && m.epoch !== undefined) {
      const pos = sub.position;
      if (pos && pos.epoch === m.epoch) {
        if (m.offset <= pos.offset) {
          sub.duplicatesDropped++;
          return;
        }
        if (m.offset > pos.offset + 1) {
          sub._call("onGap", {
            room: m.room,
            reason: "skipped",
            since: pos,
            epoch: m.epoch,
            offset: m.offset - 1,
          });
        }
      } else if (pos && !(pos.epoch === "" && pos.offset === 0 && m.offset === 1)) {
        // (The empty epoch at offset 0 is a room that had no history yet:
        // its first message, offset 1 of a new epoch, follows it.)
        sub._call("onGap", { room: m.room, reason: "epoch_changed", since: pos, epoch: m.epoch, offset: m.offset - 1 });
      }
      sub.position = { epoch: m.epoch, offset: m.offset };
    }
    sub._call("onMessage", {
      room: m.room,
      from: m.from,
      data: m.data,
      epoch: m.epoch,
      offset: m.offset,
    });
  }
}

function normalizeUrl(u) {
  let s = String(u);
  if (s.startsWith("http://")) s = "ws://" + s.slice(7);
  else if (s.startsWith("https://")) s = "wss://" + s.slice(8);
  const m = /^(wss?:\/\/[^/?#]+)(\/?)$/.exec(s);
  return m ? m[1] + "/ws" : s;
}

function detach(ws) {
  ws.onopen = ws.onmessage = ws.onclose = null;
  ws.onerror = () => {};
}
