// Subscriptions the backend makes (PROTOCOL.md §12 POST /api/subscribe and
// /api/unsubscribe) against a real node: the JS client turns the server's
// `subscribed` (`"server":true`) into a Subscription handed to the app by
// the "subscription" event, routes the room's messages to it, resubscribes
// it with recovery after the connection drops (the server does not remember
// it across a reconnect), and ends it on the server's `unsubscribed`.
// Run: node --experimental-websocket --test test/server-subscribe.test.mjs (from clients/js).

import assert from "node:assert/strict";
import { test } from "node:test";

import { Corecast } from "../corecast.js";
import { FAST, room, startCorecast, startProxy, waitFor } from "./helpers.mjs";

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
