// Types for corecast.js, the JavaScript client of corecast (PROTOCOL.md v1.2).

/** Any JSON value: what `data` may be. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A room's stream position (§7): messages are numbered within an epoch. */
export interface Position {
  epoch: string;
  offset: number;
}

/** Server error codes, plus the client's own. */
export type ErrorCode =
  | "bad_request"
  | "bad_room"
  | "forbidden"
  | "rate_limited"
  | "too_large"
  | "unavailable"
  | "token_expired"
  /** a request made with no open connection (nothing is queued) */
  | "not_connected"
  /** the connection dropped before the reply (the op may or may not have taken effect) */
  | "disconnected"
  /** no reply within `requestTimeoutMs` */
  | "timeout"
  /** `close()` was called */
  | "closed"
  /** the server sent a frame that is not JSON */
  | "bad_frame"
  | (string & {});

export class CorecastError extends Error {
  readonly code: ErrorCode;
  /** The server's `error` event, when it came from one. */
  event?: { ev: "error"; code: string; message?: string; id?: number | string };
  constructor(code: ErrorCode, message?: string);
}

/** What the client needs of a WebSocket (the WHATWG API: browsers, node's
 * global, the `ws` package). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
}

export type State = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export interface StateChange {
  state: State;
  /** connecting, open: the node's address. */
  url?: string;
  /** open: true from the second connect on. */
  reconnect?: boolean;
  /** connecting, reconnecting: failed attempts in a row so far. */
  attempt?: number;
  /** reconnecting: how long until the next attempt. */
  delayMs?: number;
  /** reconnecting: "closed" (lost or refused), "maintenance" (the node asked
   * for the delay), "token" (getToken failed), "error". */
  reason?: string;
  /** reconnecting: the close code of the connection that ended. */
  code?: number;
}

export interface CorecastOptions {
  /** A fixed JWT (auth on), sent as `?token=`. */
  token?: string;
  /** Asked for a token before every connect, and before the current token's
   * `exp` to send a `refresh` op. Takes precedence over `token`. */
  getToken?: () => string | Promise<string>;
  /** `?user=` for nodes with auth off. */
  user?: string;
  /** WebSocket class (WHATWG API), e.g. from the `ws` package in node 20;
   * defaults to `globalThis.WebSocket`. */
  WebSocket?: new (url: string) => WebSocketLike;
  /** Full-jitter exponential backoff between attempts: a uniform draw from
   * [0, min(maxMs, minMs * 2^attempt)]. Defaults 250 ms and 15 s. */
  backoff?: { minMs?: number; maxMs?: number };
  /** Time allowed for a reply to any request, and for a handshake. Default 10 s. */
  requestTimeoutMs?: number;
  /** A `ping` op this often detects half-open connections; 0 turns it off. Default 25 s. */
  pingIntervalMs?: number;
  /** Refresh the token this long before `exp` (at most half its remaining
   * life). Default 30 s. */
  refreshMarginMs?: number;
  /** Source of randomness for the backoff (tests). */
  random?: () => number;
  onState?: (change: StateChange, client: Corecast) => void;
  onDirect?: (message: DirectMessage, client: Corecast) => void;
  onError?: (error: CorecastError | Error, client: Corecast) => void;
  /** Same as `on("subscription", fn)`: a subscription the server made. */
  onSubscription?: (sub: Subscription, client: Corecast) => void;
}

export interface Message {
  room: string;
  /** The sender's user id as the server knows it ("server" for POST /api/publish). */
  from: string;
  data: Json;
  /** Present when the room keeps history (§7). */
  epoch?: string;
  offset?: number;
}

export interface DirectMessage {
  from: string;
  data: Json;
}

export interface Subscribed {
  room: string;
  /** false on the first `subscribed`, true after every reconnect. */
  resubscribed: boolean;
  /** This `subscribed` came from the server, not from a `subscribe` op of
   * the client: the first one of a subscription the server made (§12
   * `POST /api/subscribe`, §13 `subs` claim). Resubscribes after a
   * reconnect are the client's own (false). */
  server: boolean;
  /** The room keeps history: epoch and offset are set. */
  history: boolean;
  epoch?: string;
  /** The room's latest offset when the subscription took effect. */
  offset?: number;
  recovered?: boolean;
}

/** The outcome of a subscribe with `since` (every resubscribe of a room with history). */
export interface Recovery extends Position {
  room: string;
  /** true: every message after `since` follows, then live ones. false: none
   * is replayed; fetch state from your backend. */
  recovered: boolean;
  since: Position;
}

/** Messages may be missing: from after `since` up to `offset` in `epoch`. */
export interface Gap extends Position {
  room: string;
  /** "not_recovered": a resubscribe got recovered:false; "gap": the server's
   * `gap` event (backplane outage); "skipped": an offset was jumped over;
   * "epoch_changed": a message of a new epoch without either of those. */
  reason: "not_recovered" | "gap" | "skipped" | "epoch_changed";
  since: Position | null;
}

/** A member of a room (§11): a user id and its connections subscribed there. */
export interface PresenceMember {
  user: string;
  clients: number;
}

/** §11 counts: `clients` connections of `users` distinct user ids, cluster-wide. */
export interface PresenceStats {
  room: string;
  clients: number;
  users: number;
}

/** Every member of a room, all pages read (counts of the last page). */
export interface Presence extends PresenceStats {
  /** Ascending by user id (byte order). */
  members: PresenceMember[];
}

/** A `join` or `leave` event (§11; needs `join_leave` in the room's namespace). */
export interface PresenceEvent {
  room: string;
  user: string;
}

/** The live member set changed (`subscribe(room, {presence: true})`). */
export interface PresenceChange {
  room: string;
  /** `sub.members` itself (the same Set object for the subscription's life). */
  members: ReadonlySet<string>;
  /** "sync": fetched after a (re)subscribe or a re-check; "join"/"leave": one event applied. */
  reason: "sync" | "join" | "leave";
  /** join, leave: the user. */
  user?: string;
}

/** The server ended a subscription. */
export interface Unsubscribed {
  room: string;
  reason: "server" | "token_expired" | "forbidden";
}

export interface SubscribeOptions {
  onMessage?: (message: Message, sub: Subscription) => void;
  onSubscribed?: (info: Subscribed, sub: Subscription) => void;
  onRecovered?: (recovery: Recovery, sub: Subscription) => void;
  onGap?: (gap: Gap, sub: Subscription) => void;
  /** Refusals (`forbidden`, `bad_room`, `too_large` end the subscription;
   * `rate_limited`, `unavailable`, `timeout` are retried). */
  onError?: (error: CorecastError, sub: Subscription) => void;
  /** §13: the subscription token was refreshed (`getToken`); `exp` in Unix seconds. */
  onRefreshed?: (info: { room: string; exp: number }, sub: Subscription) => void;
  /** §13 subscription token (a JWT with `sub`, `room`, `exp`) sent with the subscribe. */
  token?: string;
  /** §13: asked for a fresh subscription token for `room` before the current
   * one expires (sent as `refresh` with the room) and before a resubscribe
   * whose token is missing or about to expire. */
  getToken?: (room: string) => string | Promise<string>;
  /** Start from a position stored earlier: the first subscribe recovers from it. */
  since?: Position;
  /** `{"ev":"join"}`: `user` now has a connection in the room (anywhere in
   * the cluster). The subscriber's own join comes after its `subscribed`. */
  onJoin?: (event: PresenceEvent, sub: Subscription) => void;
  /** `{"ev":"leave"}`: `user` has had no connection in the room for the
   * namespace's `presence_grace_ms`. */
  onLeave?: (event: PresenceEvent, sub: Subscription) => void;
  /** The server left the room: `reason` "server" (`POST /api/unsubscribe`,
   * §12), "token_expired" (§13 subscription token) or "forbidden" (a
   * refreshed token no longer grants it; `onError` is called too for these
   * two). The subscription is over (`state` "closed"). */
  onUnsubscribed?: (info: Unsubscribed, sub: Subscription) => void;
  /** Keep `sub.members` current (§11; the room's namespace needs `presence`,
   * and `join_leave` for updates between fetches): every (re)subscribe
   * fetches the member list (all pages) and join/leave events keep it
   * current. Without it the client never sends the `presence` op itself. */
  presence?: boolean;
  /** `presence: true`: page size of the fetches (default 1000). */
  presenceLimit?: number;
  /** `presence: true`: the namespace's `presence_grace_ms` (default 5000).
   * A fetch that no longer lists a user the set had is repeated this long
   * (+500 ms) later: a user within the leave grace is not listed, and one
   * back within it causes no join. (A fetch that lacks the client's own user,
   * the token's `sub` or `user`, is repeated after 250, 500, 750 ms.) */
  presenceGraceMs?: number;
  /** `presence: true`: the set was (re)fetched, or a join/leave changed it. */
  onPresence?: (change: PresenceChange, sub: Subscription) => void;
}

export class Subscription {
  readonly room: string;
  readonly state: "pending" | "subscribed" | "closed";
  /** Last position seen (null without history). */
  readonly position: Position | null;
  /** Messages dropped because their offset had been seen already. */
  readonly duplicatesDropped: number;
  /** Made by the server (§12 `POST /api/subscribe`, §13 `subs` claim), not
   * by `subscribe()`; handed over by the client's "subscription" event. */
  readonly server: boolean;
  /** The handlers in use (the options given to `subscribe()`). */
  readonly handlers: SubscribeOptions;
  /** Adds or replaces handlers (e.g. on a subscription the server made);
   * returns the subscription. */
  setHandlers(handlers: SubscribeOptions): Subscription;
  /** §13: the subscription token in use and its `exp` (Unix seconds), if any. */
  readonly token: string | null;
  readonly tokenExp: number | null;
  /** Resolves on the first `subscribed`; rejects if refused. */
  readonly ready: Promise<Subscription>;
  /** `presence: true` was asked for. */
  readonly presenceEnabled: boolean;
  /** The live member set (user ids); empty without `presence: true`. */
  readonly members: ReadonlySet<string>;
  /** `members` reflects a fetch made on the current connection. */
  readonly membersSynced: boolean;
  unsubscribe(): Promise<void>;
  /** `Corecast.presence` for this room. */
  presence(options?: { limit?: number }): Promise<Presence>;
  /** `Corecast.presenceStats` for this room. */
  stats(): Promise<PresenceStats>;
}

export interface History extends Position {
  room: string;
  messages: { offset: number; from: string; data: Json }[];
}

export type EventMap = {
  state: StateChange;
  direct: DirectMessage;
  error: CorecastError | Error;
  maintenance: { reconnectInMs: number };
  refreshed: { exp: number };
  open: { url: string; reconnect: boolean };
  /** `terminal`: 4500-4999 (PROTOCOL.md §12): the client does not
   * reconnect, and `terminated` follows. `reason`: the server's
   * `disconnect` reason when it sent one. */
  close: { code: number; reason: string; wasOpen: boolean; terminal: boolean };
  /** The server disconnects this client (`POST /api/disconnect`); the close follows. */
  disconnect: { code: number; reason: string; terminal: boolean };
  /** Closed for good by the server with a terminal code: no reconnect. */
  terminated: { code: number; reason: string };
  /** The server subscribed this connection to a room it had no subscription
   * for (§12 `POST /api/subscribe`, §13 `subs` claim): a Subscription like
   * `subscribe()`'s, kept across reconnects (the client resubscribes it,
   * with recovery in a history room) until the server or the app ends it.
   * Called before its `onSubscribed` and before any of its messages: set
   * handlers here (`sub.setHandlers({...})`). */
  subscription: Subscription;
  /** The server ended a subscription (`POST /api/unsubscribe`, or a grant gone). */
  unsubscribed: Unsubscribed & { subscription: Subscription };
};

export class Corecast {
  /** `url`: ws(s):// or http(s):// of a node, or several tried in turn; a
   * bare origin gets `/ws`. Does not connect until `connect()`. */
  constructor(url: string | string[], options?: CorecastOptions);
  readonly state: State;
  /** Completed connects. */
  readonly connects: number;
  /** Connections lost or refused. */
  readonly disconnects: number;
  readonly token: string | null;
  /** The current token's `exp` (Unix seconds), read without verifying. */
  readonly tokenExp: number | null;
  /** Starts connecting (and reconnecting until `close()`); resolves once open. */
  connect(): Promise<void>;
  /** No more reconnects; pending requests reject with `closed`. */
  close(): void;
  on<K extends keyof EventMap>(name: K, fn: (arg: EventMap[K], client: Corecast) => void): () => void;
  /** Kept across reconnects until `unsubscribe()`; one per room. For a room
   * the server subscribed this client to (and the app has not taken yet),
   * returns that subscription with `options` as its handlers; otherwise a
   * second `subscribe` to one room throws. */
  subscribe(room: string, options?: SubscribeOptions): Subscription;
  subscription(room: string): Subscription | undefined;
  /** Resolves on the server's `ack`. */
  publish(room: string, data: Json): Promise<void>;
  /** Direct message to every connection of `user`; resolves on `ack`. */
  send(user: string, data: Json): Promise<void>;
  /** §7 history op (rooms with history only). */
  history(room: string, options?: { limit?: number; since?: Position }): Promise<History>;
  /** Resolves to the round-trip time in ms. */
  ping(): Promise<number>;
  /** §11 `presence` op, every page (follows `next`); `limit` per page,
   * default 1000. Rooms whose namespace has presence only (else `bad_request`). */
  presence(room: string, options?: { limit?: number }): Promise<Presence>;
  /** §11 `presence_stats` op. */
  presenceStats(room: string): Promise<PresenceStats>;
}

/** `exp` of a JWT, read without verifying; null if there is none. */
export function jwtExp(token: string | null | undefined): number | null;

/** Full-jitter exponential backoff delay for `attempt` (0-based). */
export function backoffDelay(attempt: number, minMs: number, maxMs: number, random?: () => number): number;
