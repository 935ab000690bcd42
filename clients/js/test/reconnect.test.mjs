// The JS client's long-lived connection against real corecast processes:
// reconnect by itself after the node is killed and started again on the
// same port (every room resubscribed), the `maintenance` delay of a draining
// node honoured (§5), and JWT refresh before `exp` plus a fresh token on
// reconnect (docs/auth.md, "Expiry and refresh").
// Run: node --experimental-websocket --test test/reconnect.test.mjs (from clients/js).

import assert from "node:assert/strict";
import { test } from "node:test";

import { Corecast, jwtExp } from "../corecast.js";
import { FAST, hs256, room, startCorecast, startProxy, waitFor } from "./helpers.mjs";

test("reconnects by itself after the node restarts and resubscribes every room", { timeout: 60000 }, async (t) => {
  let server = await startCorecast();
  t.after(() => server.stop());
  const port = server.port;
  const cc = new Corecast(server.url, { ...FAST, user: "carol" });
  t.after(() => cc.close());
  const states = [];
  cc.on("state", (s) => states.push({ ...s, at: Date.now() }));
  await cc.connect();

  const rooms = [room("a"), room("b"), room("c")];
  const got = new Map(rooms.map((r) => [r, []]));
  const resubscribed = new Map(rooms.map((r) => [r, 0]));
  const subs = rooms.map((r) =>
    cc.subscribe(r, {
      onMessage: (m) => got.get(r).push(m.data),
      onSubscribed: (s) => s.resubscribed && resubscribed.set(r, resubscribed.get(r) + 1),
    }),
  );
  await Promise.all(subs.map((s) => s.ready));

  await server.stop("SIGKILL");
  await waitFor("the client to notice", () => cc.state === "reconnecting" || cc.state === "connecting");
  // While the node is down the client keeps trying with backoff (each
  // failed attempt is a `reconnecting` with a delay within the cap).
  await waitFor("two failed attempts", () => states.filter((s) => s.state === "reconnecting").length >= 2);
  for (const s of states.filter((s) => s.state === "reconnecting")) {
    assert.ok(s.delayMs >= 0 && s.delayMs <= FAST.backoff.maxMs, `delay ${s.delayMs}`);
  }
  assert.equal(cc.state === "open", false);
  await assert.rejects(cc.publish(rooms[0], "while down"), { code: "not_connected" });

  server = await startCorecast([], { port });
  await waitFor("reconnected", () => cc.state === "open");
  await waitFor("every room resubscribed", () => rooms.every((r) => resubscribed.get(r) === 1));
  assert.equal(cc.connects, 2);
  assert.ok(subs.every((s) => s.state === "subscribed"));

  // Messages published on the new process reach every room.
  const other = new Corecast(server.url, { ...FAST, user: "dave" });
  t.after(() => other.close());
  await other.connect();
  for (const r of rooms) await other.publish(r, `after restart to ${r}`);
  await waitFor("a message in every room", () => rooms.every((r) => got.get(r).length === 1));
  for (const r of rooms) assert.deepEqual(got.get(r), [`after restart to ${r}`]);
});

test("waits out the maintenance delay of a draining node before reconnecting", { timeout: 60000 }, async (t) => {
  let server = await startCorecast(["--drain-secs", "2"]);
  t.after(() => server.stop());
  const port = server.port;
  const cc = new Corecast(server.url, FAST);
  t.after(() => cc.close());
  const events = [];
  cc.on("maintenance", (m) => events.push({ ev: "maintenance", ...m, at: Date.now() }));
  cc.on("close", (c) => events.push({ ev: "close", ...c, at: Date.now() }));
  cc.on("state", (s) => events.push({ ev: s.state, ...s, at: Date.now() }));
  await cc.connect();
  const r = room("drain");
  const got = [];
  await cc.subscribe(r, { onMessage: (m) => got.push(m.data) }).ready;

  server.proc.kill("SIGTERM");
  const m = await waitFor("maintenance", () => events.find((e) => e.ev === "maintenance"));
  // PROTOCOL §5 / docs/operations.md (drain): a delay from the first 80% of the 2 s window.
  assert.ok(m.reconnectInMs >= 0 && m.reconnectInMs <= 1600, `reconnect_in_ms ${m.reconnectInMs} beyond 80% of 2000`);
  const closed = await waitFor("the server's 1001", () => events.find((e) => e.ev === "close"));
  assert.equal(closed.code, 1001);
  const firstTry = await waitFor("a reconnect attempt", () =>
    events.find((e) => e.ev === "connecting" && e.at > m.at),
  );
  const waited = firstTry.at - m.at;
  // Timers may fire a millisecond early by rounding.
  assert.ok(waited >= m.reconnectInMs - 2, `reconnected after ${waited} ms, asked to wait ${m.reconnectInMs} ms`);
  const planned = events.find((e) => e.ev === "reconnecting" && e.at > m.at);
  assert.equal(planned.reason, "maintenance");

  await server.exited;
  server = await startCorecast([], { port });
  await waitFor("reconnected to the new process", () => cc.state === "open" && cc.connects === 2);
  await waitFor("resubscribed", () => cc.subscription(r).state === "subscribed");
  await cc.publish(r, "back");
  await waitFor("message after the drain", () => got.length === 1);
  assert.deepEqual(got, ["back"]);
});

const SECRET = "js-client-test-secret";

test("refreshes the token before exp and stays connected past it", { timeout: 60000 }, async (t) => {
  const server = await startCorecast(["--jwt-secret", SECRET]);
  t.after(() => server.stop());
  let made = 0;
  // 3 s tokens: the client refreshes about half-way (refreshMarginMs caps at half the time left).
  const getToken = async () => {
    made++;
    return hs256(SECRET, { sub: "erin", exp: Math.floor(Date.now() / 1000) + 3 });
  };
  const cc = new Corecast(server.url, { ...FAST, getToken });
  t.after(() => cc.close());
  const refreshed = [];
  const errors = [];
  cc.on("refreshed", (r) => refreshed.push(r.exp));
  cc.on("error", (e) => errors.push(e));
  await cc.connect();
  const firstExp = cc.tokenExp;
  assert.ok(firstExp > Date.now() / 1000, "the first token is current");

  const r = room("auth");
  const got = [];
  await cc.subscribe(r, { onMessage: (m) => got.push(m) }).ready;
  // Past the first token's exp (plus the server's once-a-second sweep).
  await waitFor("past the first exp", () => Date.now() / 1000 > firstExp + 1.5 && refreshed.length >= 2, 20000);
  assert.deepEqual(errors, []);
  assert.equal(cc.connects, 1, "never reconnected");
  assert.equal(cc.state, "open");
  assert.ok(made >= 3);
  assert.ok(refreshed[0] >= firstExp && refreshed.at(-1) > firstExp, `${refreshed} vs ${firstExp}`);
  assert.equal(cc.tokenExp, jwtExp(cc.token));
  await cc.publish(r, "still here");
  await waitFor("message after the first exp", () => got.length === 1);
  assert.equal(got[0].from, "erin", "the user is the token's sub");
});

test("after token_expired it reconnects with a fresh token from getToken", { timeout: 60000 }, async (t) => {
  const server = await startCorecast(["--jwt-secret", SECRET]);
  t.after(() => server.stop());
  let calls = 0;
  // The first token is short; when asked to refresh it, the hook fails, so
  // the server expires the connection. The reconnect asks again and gets a
  // long token.
  const getToken = async () => {
    calls++;
    if (calls === 1) return hs256(SECRET, { sub: "frank", exp: Math.floor(Date.now() / 1000) + 2 });
    if (calls === 2) throw new Error("token service down");
    return hs256(SECRET, { sub: "frank", exp: Math.floor(Date.now() / 1000) + 3600 });
  };
  const cc = new Corecast(server.url, { ...FAST, getToken });
  t.after(() => cc.close());
  const errors = [];
  const closes = [];
  cc.on("error", (e) => errors.push(e.code || e.message));
  cc.on("close", (c) => closes.push(c.code));
  await cc.connect();
  const r = room("expiry");
  const got = [];
  const sub = cc.subscribe(r, { onMessage: (m) => got.push(m.data) });
  await sub.ready;

  await waitFor("second connection", () => cc.connects === 2 && cc.state === "open", 20000);
  assert.deepEqual(errors, ["token service down", "token_expired"]);
  assert.deepEqual(closes, [1008], "closed by the server with 1008 after token_expired");
  await waitFor("resubscribed", () => sub.state === "subscribed");
  await cc.publish(r, "renewed");
  await waitFor("message on the renewed connection", () => got.length === 1);
});

test("a refused token is retried with backoff, never opening", { timeout: 30000 }, async (t) => {
  const server = await startCorecast(["--jwt-secret", SECRET]);
  t.after(() => server.stop());
  const bad = hs256("some other secret", { sub: "mallory", exp: Math.floor(Date.now() / 1000) + 3600 });
  const cc = new Corecast(server.url, { ...FAST, token: bad });
  t.after(() => cc.close());
  const delays = [];
  cc.on("state", (s) => s.state === "reconnecting" && delays.push(s.delayMs));
  cc.connect().catch(() => {});
  await waitFor("four refused attempts", () => cc.disconnects >= 4);
  assert.equal(cc.connects, 0);
  assert.notEqual(cc.state, "open");
  // The cap grows with every attempt: 50, 100, 200, 400, 400 ...
  delays.forEach((d, i) => assert.ok(d <= Math.min(400, 50 * 2 ** i), `attempt ${i}: ${d} ms`));
});

test("after a drain it moves on to the next node in its list", { timeout: 60000 }, async (t) => {
  const node1 = await startCorecast(["--drain-secs", "2"]);
  const node2 = await startCorecast();
  t.after(() => node1.stop());
  t.after(() => node2.stop());
  const cc = new Corecast([node1.url, node2.url], FAST);
  t.after(() => cc.close());
  const opened = [];
  cc.on("open", (o) => opened.push(o.url));
  await cc.connect();
  const r = room("move");
  const got = [];
  const sub = cc.subscribe(r, { onMessage: (m) => got.push(m.data) });
  await sub.ready;

  node1.proc.kill("SIGTERM");
  await waitFor("reconnected to node 2", () => cc.connects === 2 && sub.state === "subscribed");
  assert.deepEqual(opened, [node1.url, node2.url]);
  const other = new Corecast(node2.url, FAST);
  t.after(() => other.close());
  await other.connect();
  await other.publish(r, "on node 2");
  await waitFor("message on node 2", () => got.length === 1);
  assert.deepEqual(got, ["on node 2"]);
  assert.equal((await node1.exited).code, 0, "node 1 drained and exited cleanly");
});

test("a half-open connection is found by its unanswered ping and replaced", { timeout: 60000 }, async (t) => {
  const server = await startCorecast();
  t.after(() => server.stop());
  const proxy = await startProxy(server.addr);
  t.after(() => proxy.close());
  const cc = new Corecast(proxy.url, { ...FAST, pingIntervalMs: 200, requestTimeoutMs: 1000 });
  t.after(() => cc.close());
  const closes = [];
  cc.on("close", (c) => closes.push(c));
  await cc.connect();
  const r = room("halfopen");
  const got = [];
  const sub = cc.subscribe(r, { onMessage: (m) => got.push(m.data) });
  await sub.ready;

  // Nothing gets through any more, yet no socket closes: only the client's
  // own ping can tell.
  proxy.freeze();
  await waitFor("the client gives up on the silent connection", () => closes.length === 1);
  assert.equal(closes[0].reason, "ping timeout");
  assert.equal(closes[0].wasOpen, true);
  proxy.thaw();
  await waitFor("a new connection", () => cc.connects === 2 && sub.state === "subscribed");
  const other = new Corecast(server.url, FAST);
  t.after(() => other.close());
  await other.connect();
  await other.publish(r, "through the new connection");
  await waitFor("message", () => got.length === 1);
});

test("a refreshed token that no longer grants a room ends that subscription", { timeout: 60000 }, async (t) => {
  const server = await startCorecast(["--jwt-secret", SECRET]);
  t.after(() => server.stop());
  const exp = () => Math.floor(Date.now() / 1000);
  let calls = 0;
  // First token: rooms a-* and b-*, short; the refresh drops a-*.
  const getToken = async () => {
    calls++;
    const rooms = calls === 1 ? ["a-*", "b-*"] : ["b-*"];
    return hs256(SECRET, { sub: "gail", rooms, exp: exp() + (calls === 1 ? 2 : 3600) });
  };
  const cc = new Corecast(server.url, { ...FAST, getToken });
  t.after(() => cc.close());
  await cc.connect();
  const [ra, rb] = [room("a"), room("b")];
  const errors = [];
  const sa = cc.subscribe(ra, { onError: (e) => errors.push(e.code) });
  const sb = cc.subscribe(rb, {});
  await Promise.all([sa.ready, sb.ready]);
  const refreshed = [];
  cc.on("refreshed", (x) => refreshed.push(x));

  await waitFor("the refresh", () => refreshed.length === 1);
  await waitFor("room a left", () => sa.state === "closed");
  assert.deepEqual(errors, ["forbidden"]);
  assert.equal(cc.subscription(ra), undefined, "not resubscribed on a later reconnect");
  assert.equal(sb.state, "subscribed");
  assert.equal(cc.connects, 1);
  await assert.rejects(cc.publish(ra, 1), { code: "forbidden" });
  await cc.publish(rb, 1);
});
