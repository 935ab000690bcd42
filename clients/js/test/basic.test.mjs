// The JS client against a real corecast (no history): connect, subscribe,
// publish and ack, errors with their codes, direct messages, ping.
// Run: node --experimental-websocket --test test/basic.test.mjs (from clients/js).

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Corecast, CorecastError, backoffDelay, jwtExp } from "../corecast.js";
import { FAST, hs256, room, startCorecast, waitFor } from "./helpers.mjs";

describe("against one node", () => {
  let server;
  const clients = [];
  const client = (opts = {}) => {
    const c = new Corecast(server.url, { ...FAST, ...opts });
    clients.push(c);
    return c;
  };
  before(async () => {
    server = await startCorecast();
  });
  after(async () => {
    for (const c of clients) c.close();
    await server.stop();
  });

  test("connects, subscribes and gets its own publish back after the ack", async () => {
    const cc = client({ user: "alice" });
    const states = [];
    cc.on("state", (s) => states.push(s.state));
    await cc.connect();
    assert.equal(cc.state, "open");
    assert.deepEqual(states, ["connecting", "open"]);

    const r = room("lobby");
    const got = [];
    const subscribed = [];
    const sub = cc.subscribe(r, { onMessage: (m) => got.push(m), onSubscribed: (s) => subscribed.push(s) });
    assert.equal(await sub.ready, sub);
    assert.equal(sub.state, "subscribed");
    assert.equal(subscribed.length, 1);
    assert.equal(subscribed[0].resubscribed, false);
    assert.equal(subscribed[0].history, false, "no history on this node");
    assert.equal(sub.position, null);

    const data = { text: "hi", n: [1, 2.5, null], nested: { ok: true } };
    assert.equal(await cc.publish(r, data), undefined);
    await waitFor("own message", () => got.length === 1);
    assert.deepEqual(got[0], { room: r, from: "alice", data, epoch: undefined, offset: undefined });
  });

  test("delivers to other subscribers in publish order", async () => {
    const [a, b] = [client({ user: "pub" }), client({ user: "sub" })];
    await Promise.all([a.connect(), b.connect()]);
    const r = room("order");
    const got = [];
    await b.subscribe(r, { onMessage: (m) => got.push(m.data) }).ready;
    for (let i = 0; i < 20; i++) await a.publish(r, i);
    await waitFor("20 messages", () => got.length === 20);
    assert.deepEqual(
      got,
      Array.from({ length: 20 }, (_, i) => i),
    );
  });

  test("refusals reject with the server's error code", async () => {
    const cc = client();
    await cc.connect();
    await assert.rejects(cc.publish("bad room!", 1), (e) => e instanceof CorecastError && e.code === "bad_room");
    await assert.rejects(cc.send("no spaces allowed", 1), { code: "bad_request" });
    // §7: the history op is a bad_request on a node without history.
    await assert.rejects(cc.history(room("h"), { limit: 5 }), { code: "bad_request" });

    const errors = [];
    const sub = cc.subscribe("also bad", { onError: (e) => errors.push(e.code) });
    await assert.rejects(sub.ready, { code: "bad_room" });
    assert.deepEqual(errors, ["bad_room"]);
    assert.equal(sub.state, "closed");
    assert.equal(cc.subscription("also bad"), undefined, "a refused room is not resubscribed");
    assert.throws(() => {
      cc.subscribe("x", {});
      cc.subscribe("x", {});
    }, /already subscribed/);
    // The connection survived every refusal.
    assert.equal(typeof (await cc.ping()), "number");
  });

  test("requests without a connection reject with not_connected", async () => {
    const cc = client();
    await assert.rejects(cc.publish(room(), 1), { code: "not_connected" });
    // A subscription made before connecting is sent once the socket opens.
    const r = room("early");
    const sub = cc.subscribe(r, {});
    await cc.connect();
    await sub.ready;
    assert.equal(sub.state, "subscribed");
    cc.close();
    assert.equal(cc.state, "closed");
    await assert.rejects(cc.publish(r, 1), { code: "not_connected" });
    await assert.rejects(cc.connect(), { code: "closed" });
  });

  test("direct messages reach every connection of the user", async () => {
    const alice = client({ user: "alice-d" });
    const bob1 = client({ user: "bob-d" });
    const bob2 = client({ user: "bob-d" });
    const got = [];
    bob1.on("direct", (m) => got.push(["1", m]));
    bob2.on("direct", (m) => got.push(["2", m]));
    await Promise.all([alice.connect(), bob1.connect(), bob2.connect()]);
    // docs/cluster.md: a send in the first moments after a connect may miss the user
    // (no `subscribed` for user channels), so send until both have one.
    await waitFor("both of bob's connections got a direct", async () => {
      await alice.send("bob-d", { hello: "bob" });
      await new Promise((r) => setTimeout(r, 50));
      return got.some(([w]) => w === "1") && got.some(([w]) => w === "2");
    });
    for (const [, m] of got) assert.deepEqual(m, { from: "alice-d", data: { hello: "bob" } });
  });

  test("unsubscribe stops delivery", async () => {
    const cc = client({ user: "u" });
    await cc.connect();
    const r = room("unsub");
    const got = [];
    const sub = cc.subscribe(r, { onMessage: (m) => got.push(m.data) });
    await sub.ready;
    await cc.publish(r, 1);
    await waitFor("first message", () => got.length === 1);
    await sub.unsubscribe();
    assert.equal(sub.state, "closed");
    await cc.publish(r, 2);
    // A ping after the publish: its pong comes after anything the publish delivered.
    await cc.ping();
    assert.deepEqual(got, [1]);
    // The room can be joined again.
    await cc.subscribe(r, { onMessage: (m) => got.push(m.data) }).ready;
    await cc.publish(r, 3);
    await waitFor("message after rejoining", () => got.length === 2);
    assert.deepEqual(got, [1, 3]);
  });
});

test("backoff is full jitter, capped, and grows with the attempt", () => {
  assert.equal(backoffDelay(0, 100, 1000, () => 1), 100);
  assert.equal(backoffDelay(3, 100, 1000, () => 1), 800);
  assert.equal(backoffDelay(10, 100, 1000, () => 1), 1000);
  assert.equal(backoffDelay(10, 100, 1000, () => 0), 0);
  assert.equal(backoffDelay(2, 100, 1000, () => 0.5), 200);
});

test("jwtExp reads exp without verifying and tolerates junk", () => {
  assert.equal(jwtExp(hs256("k", { sub: "a", exp: 1234567890 })), 1234567890);
  assert.equal(jwtExp(hs256("k", { sub: "ü-ß", exp: 5 })), 5);
  assert.equal(jwtExp("not a jwt"), null);
  assert.equal(jwtExp("a.%%%.c"), null);
  assert.equal(jwtExp(null), null);
});
