// Subscriptions the backend makes (PROTOCOL.md §12 POST /api/subscribe and
// /api/unsubscribe) against a real node: the JS client turns the server's
// `subscribed` (`"server":true`) into a Subscription handed to the app by
// the "subscription" event, routes the room's messages to it, resubscribes
// it with recovery after the connection drops (the server does not remember
// it across a reconnect), and ends it on the server's `unsubscribed`. The
// last tests play orderings a real node makes rarely (or, for a token's
// `subs` claim, not yet) with a scripted socket.
// Run: node --experimental-websocket --test test/server-subscribe.test.mjs (from clients/js).

import assert from "node:assert/strict";
import { test } from "node:test";

import { Corecast } from "../corecast.js";
import { FAST, room, ScriptedSocket, startCorecast, startProxy, waitFor } from "./helpers.mjs";

const HIST = ["--history-size", "100"];

async function post(server, path, body) {
  const r = await fetch(`${server.http}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return { status: r.status, body: await r.json().catch(() => null) };
}

/** A real WebSocket that also records every frame the server sends, so a
 * test can tell what reached the connection, not only what the client let
 * through to the app. */
function recordingSocket(frames) {
  return class extends globalThis.WebSocket {
    constructor(url) {
      super(url);
      this.addEventListener("message", (e) => frames.push(JSON.parse(e.data)));
    }
  };
}

test("a server subscription reaches the app, survives a drop with recovery, and ends on /api/unsubscribe", { timeout: 60000 }, async (t) => {
  const server = await startCorecast(HIST);
  t.after(() => server.stop());
  const proxy = await startProxy(server.addr);
  t.after(() => proxy.close());
  const user = `srv-sub-${process.pid}`;
  const frames = [];
  const cc = new Corecast(proxy.url, { ...FAST, user, WebSocket: recordingSocket(frames) });
  t.after(() => cc.close());

  const r = room("server-sub");
  const handed = [];
  const got = [];
  const subscribed = [];
  const recovered = [];
  const gaps = [];
  const ended = [];
  cc.on("subscription", (sub) => {
    handed.push(sub);
    sub.setHandlers({
      onMessage: (m) => got.push([m.data, m.offset]),
      onSubscribed: (s) => subscribed.push(s),
      onRecovered: (x) => recovered.push(x),
      onGap: (g) => gaps.push(g),
      onUnsubscribed: (u) => ended.push(["sub", u.reason]),
    });
  });
  cc.on("unsubscribed", (u) => ended.push(["client", u.room, u.reason]));
  await cc.connect();

  // The backend puts the user into the room.
  assert.deepEqual(await post(server, "/api/subscribe", { user, room: r }), { status: 200, body: { ok: true } });
  await waitFor("the subscription event", () => handed.length === 1);
  const sub = handed[0];
  assert.equal(sub.room, r);
  assert.equal(sub.server, true);
  assert.equal(cc.subscription(r), sub, "the client tracks it like its own");
  await sub.ready;
  assert.equal(sub.state, "subscribed");
  assert.equal(subscribed.length, 1);
  assert.equal(subscribed[0].server, true);
  assert.equal(subscribed[0].history, true);
  assert.equal(subscribed[0].resubscribed, false);

  // Messages published to the room reach it, with their position.
  const p1 = await post(server, "/api/publish", { room: r, data: "m1" });
  assert.equal(p1.status, 200);
  await waitFor("m1", () => got.length === 1);
  assert.deepEqual(got[0], ["m1", p1.body.offset]);
  assert.deepEqual(sub.position, { epoch: p1.body.epoch, offset: p1.body.offset });

  // The transport drops; m2 is published while the client is away.
  proxy.cut();
  await waitFor("the client to notice", () => cc.state !== "open");
  const p2 = await post(server, "/api/publish", { room: r, data: "m2" });
  assert.equal(p2.status, 200);
  proxy.restore();
  await waitFor("reconnected", () => cc.state === "open" && cc.connects === 2);
  // The client resubscribed it by itself, from its last position: m2 is
  // replayed exactly once.
  await waitFor("the resubscribe", () => subscribed.length === 2);
  assert.equal(subscribed[1].resubscribed, true);
  assert.equal(subscribed[1].server, false, "the resubscribe is the client's own op");
  assert.equal(recovered.length, 1);
  assert.equal(recovered[0].recovered, true);
  await waitFor("m2 recovered", () => got.length === 2);
  const p3 = await post(server, "/api/publish", { room: r, data: "m3" });
  await waitFor("m3", () => got.length === 3);
  assert.deepEqual(got, [
    ["m1", p1.body.offset],
    ["m2", p2.body.offset],
    ["m3", p3.body.offset],
  ]);
  assert.equal(p3.body.offset, p1.body.offset + 2);
  assert.deepEqual(gaps, []);
  assert.equal(sub.duplicatesDropped, 0);
  assert.equal(handed.length, 1, "the resubscribe is the same Subscription, not a new one");
  assert.equal(sub.state, "subscribed");

  // The backend takes the user out again.
  assert.deepEqual(await post(server, "/api/unsubscribe", { user, room: r }), { status: 200, body: { ok: true } });
  await waitFor("the end of it", () => ended.length === 2);
  assert.deepEqual(ended, [
    ["sub", "server"],
    ["client", r, "server"],
  ]);
  assert.equal(sub.state, "closed");
  assert.equal(cc.subscription(r), undefined);
  const unsub = frames.find((f) => f.ev === "unsubscribed" && f.room === r);
  assert.equal(unsub.server, true);

  // Later messages are not delivered to the connection at all: a direct
  // message sent after them is the marker that they would have arrived.
  const framesBefore = frames.length;
  assert.equal((await post(server, "/api/publish", { room: r, data: "m4" })).status, 200);
  const marker = [];
  cc.on("direct", (d) => marker.push(d.data));
  assert.equal((await post(server, "/api/publish", { user, data: "marker" })).status, 200);
  await waitFor("the marker", () => marker.length === 1);
  const after = frames.slice(framesBefore);
  assert.deepEqual(
    after.filter((f) => f.room === r),
    [],
    "nothing of the room reaches the connection after /api/unsubscribe",
  );
  assert.equal(got.length, 3);
});

test("a server subscribe to a room the app already has leaves the app's subscription intact", { timeout: 30000 }, async (t) => {
  const server = await startCorecast(HIST);
  t.after(() => server.stop());
  const user = `srv-sub-own-${process.pid}`;
  const frames = [];
  const cc = new Corecast(server.url, { ...FAST, user, WebSocket: recordingSocket(frames) });
  t.after(() => cc.close());
  const handed = [];
  cc.on("subscription", (sub) => handed.push(sub));
  await cc.connect();

  const r = room("own");
  const got = [];
  const gaps = [];
  const mine = cc.subscribe(r, { onMessage: (m) => got.push([m.data, m.offset]), onGap: (g) => gaps.push(g) });
  await mine.ready;
  const p1 = await post(server, "/api/publish", { room: r, data: "before" });
  await waitFor("before", () => got.length === 1);

  assert.equal((await post(server, "/api/subscribe", { user, room: r })).status, 200);
  await waitFor("the server's subscribed", () => frames.some((f) => f.ev === "subscribed" && f.server === true));
  assert.equal(handed.length, 0, "no second subscription for a room the app has");
  assert.equal(cc.subscription(r), mine);
  assert.equal(mine.state, "subscribed");
  assert.equal(mine.server, false);

  const p2 = await post(server, "/api/publish", { room: r, data: "after" });
  await waitFor("after", () => got.length === 2);
  // Give a duplicate a moment to show up, then check there was none.
  await new Promise((res) => setTimeout(res, 200));
  assert.deepEqual(got, [
    ["before", p1.body.offset],
    ["after", p2.body.offset],
  ]);
  assert.deepEqual(mine.position, { epoch: p2.body.epoch, offset: p2.body.offset });
  assert.deepEqual(gaps, []);
  assert.equal(mine.duplicatesDropped, 0);
});

test("the app takes over a server subscription with subscribe(room, handlers)", { timeout: 30000 }, async (t) => {
  const server = await startCorecast();
  t.after(() => server.stop());
  const user = `srv-sub-adopt-${process.pid}`;
  const cc = new Corecast(server.url, { ...FAST, user });
  t.after(() => cc.close());
  const handed = [];
  cc.on("subscription", (sub) => handed.push(sub));
  await cc.connect();

  const r = room("adopt");
  assert.equal((await post(server, "/api/subscribe", { user, room: r })).status, 200);
  await waitFor("the subscription event", () => handed.length === 1);
  const got = [];
  const sub = cc.subscribe(r, { onMessage: (m) => got.push(m.data) });
  assert.equal(sub, handed[0], "subscribe() returns the server's subscription");
  assert.equal(sub.state, "subscribed");
  assert.throws(() => cc.subscribe(r), /already subscribed/);
  assert.equal((await post(server, "/api/publish", { room: r, data: "hello" })).status, 200);
  await waitFor("hello", () => got.length === 1);
  assert.deepEqual(got, ["hello"]);

  // The app leaves it like its own: the server confirms with the op's id.
  await sub.unsubscribe();
  assert.equal(sub.state, "closed");
  assert.equal(cc.subscription(r), undefined);
});

test("a server subscribe with since replays what the user missed", { timeout: 30000 }, async (t) => {
  const server = await startCorecast(HIST);
  t.after(() => server.stop());
  const user = `srv-sub-since-${process.pid}`;
  const r = room("since");
  const p = [];
  for (const d of ["a", "b", "c"]) p.push((await post(server, "/api/publish", { room: r, data: d })).body);
  const cc = new Corecast(server.url, { ...FAST, user });
  t.after(() => cc.close());
  const got = [];
  const info = [];
  cc.on("subscription", (sub) =>
    sub.setHandlers({ onMessage: (m) => got.push([m.data, m.offset]), onSubscribed: (s) => info.push(s) }),
  );
  await cc.connect();
  const since = { epoch: p[0].epoch, offset: p[0].offset };
  assert.equal((await post(server, "/api/subscribe", { user, room: r, since })).status, 200);
  await waitFor("the replay", () => got.length === 2);
  assert.equal(info[0].recovered, true);
  assert.equal(info[0].offset, p[2].offset);
  const p4 = (await post(server, "/api/publish", { room: r, data: "d" })).body;
  await waitFor("d", () => got.length === 3);
  assert.deepEqual(got, [
    ["b", p[1].offset],
    ["c", p[2].offset],
    ["d", p4.offset],
  ]);
  const sub = cc.subscription(r);
  assert.equal(sub.duplicatesDropped, 0);
  assert.deepEqual(sub.position, { epoch: p4.epoch, offset: p4.offset });
});

// Orderings a real node makes rarely or (the `subs` claim) not yet, played
// frame by frame by a scripted socket (as in safety-net.test.mjs).

async function scripted() {
  const cc = new Corecast("ws://scripted.invalid", {
    WebSocket: ScriptedSocket,
    pingIntervalMs: 0,
    backoff: { minMs: 1, maxMs: 5 },
  });
  const rec = { handed: [], messages: [], gaps: [], recovered: [], errors: [], ended: [] };
  cc.on("subscription", (sub) => {
    rec.handed.push(sub);
    sub.setHandlers({
      onMessage: (m) => rec.messages.push(m.offset),
      onGap: (g) => rec.gaps.push([g.reason, g.epoch, g.offset]),
      onRecovered: (r) => rec.recovered.push(r.recovered),
      onError: (e) => rec.errors.push(e.code),
      onUnsubscribed: (u) => rec.ended.push(u.reason),
    });
  });
  await cc.connect();
  return { cc, rec, ws: ScriptedSocket.last };
}

async function reconnected(cc, old) {
  await waitFor("a new connection", () => ScriptedSocket.last !== old && cc.state === "open", 2000);
  return ScriptedSocket.last;
}

test("scripted: a resubscribe refused to the client stands when the server subscribed the connection itself (subs claim)", async () => {
  const { cc, rec, ws } = await scripted();
  ws.push({ ev: "subscribed", room: "r", server: true, epoch: "e", offset: 5 });
  assert.equal(rec.handed.length, 1);
  const sub = rec.handed[0];
  ws.push({ ev: "message", room: "r", from: "u", data: 6, epoch: "e", offset: 6 });
  assert.deepEqual(sub.position, { epoch: "e", offset: 6 });

  ws.drop();
  const ws2 = await reconnected(cc, ws);
  const op = ws2.lastOp("subscribe", "r");
  assert.deepEqual(op.since, { epoch: "e", offset: 6 }, "resubscribed from its last position");
  // The node subscribes the new connection from the token's `subs` claim
  // first: the client keeps its one subscription (no second event).
  ws2.push({ ev: "subscribed", room: "r", server: true, epoch: "e", offset: 8 });
  assert.equal(rec.handed.length, 1);
  // Its own subscribe is refused (the room is not in `rooms`): the server's
  // membership stands, from its position, with the gap reported.
  ws2.push({ ev: "error", code: "forbidden", message: "no", id: op.id });
  assert.equal(sub.state, "subscribed");
  assert.equal(cc.subscription("r"), sub);
  assert.deepEqual(rec.recovered, [false]);
  assert.deepEqual(rec.gaps, [["not_recovered", "e", 8]]);
  assert.deepEqual(sub.position, { epoch: "e", offset: 8 });
  ws2.push({ ev: "message", room: "r", from: "u", data: 9, epoch: "e", offset: 9 });
  assert.deepEqual(rec.messages, [6, 9]);
  assert.deepEqual(rec.errors, []);
  cc.close();
});

test("scripted: a server unsubscribe that overtakes a resubscribe is not undone by it", async () => {
  const { cc, rec, ws } = await scripted();
  ws.push({ ev: "subscribed", room: "r", server: true });
  const sub = rec.handed[0];
  ws.drop();
  const ws2 = await reconnected(cc, ws);
  const op = ws2.lastOp("subscribe", "r");
  ws2.push({ ev: "unsubscribed", room: "r", server: true });
  assert.equal(sub.state, "closed");
  assert.deepEqual(rec.ended, ["server"]);
  assert.equal(ws2.lastOp("unsubscribe", "r"), undefined);
  // The server then took our subscribe: we leave again, as the backend asked.
  ws2.push({ ev: "subscribed", room: "r", id: op.id });
  assert.ok(ws2.lastOp("unsubscribe", "r"), "an unsubscribe follows the late subscribed");
  assert.equal(cc.subscription("r"), undefined);
  ws2.push({ ev: "message", room: "r", from: "u", data: "late" });
  assert.deepEqual(rec.messages, []);
  cc.close();
});

test("scripted: a server subscribe with since replays from there without dropping it as duplicates", async () => {
  const { cc, rec, ws } = await scripted();
  // POST /api/subscribe with "since":{"epoch":"e","offset":7}: 8..10 follow.
  ws.push({ ev: "subscribed", room: "r", server: true, recovered: true, epoch: "e", offset: 10 });
  const sub = rec.handed[0];
  for (const n of [8, 9, 10, 11]) ws.push({ ev: "message", room: "r", from: "u", data: n, epoch: "e", offset: n });
  assert.deepEqual(rec.messages, [8, 9, 10, 11]);
  assert.equal(sub.duplicatesDropped, 0);
  assert.deepEqual(rec.gaps, []);
  assert.deepEqual(sub.position, { epoch: "e", offset: 11 });

  // The same before any message arrived: a resubscribe starts from the reply's position.
  ws.push({ ev: "subscribed", room: "q", server: true, recovered: true, epoch: "e", offset: 4 });
  ws.drop();
  const ws2 = await reconnected(cc, ws);
  assert.deepEqual(ws2.lastOp("subscribe", "q").since, { epoch: "e", offset: 4 });
  assert.deepEqual(ws2.lastOp("subscribe", "r").since, { epoch: "e", offset: 11 });
  cc.close();
});

test("scripted: taking over a server subscription with presence: true fetches the members", async () => {
  const { cc, rec, ws } = await scripted();
  ws.push({ ev: "subscribed", room: "p", server: true });
  const sub = cc.subscribe("p", { presence: true });
  assert.equal(sub, rec.handed[0]);
  assert.equal(sub.presenceEnabled, true);
  const op = ws.lastOp("presence", "p");
  assert.ok(op, "the presence op is sent");
  ws.push({ ev: "presence", room: "p", clients: 1, users: 1, members: [{ user: "a", clients: 1 }], id: op.id });
  await waitFor("synced", () => sub.membersSynced, 2000);
  assert.deepEqual([...sub.members], ["a"]);
  cc.close();
});
