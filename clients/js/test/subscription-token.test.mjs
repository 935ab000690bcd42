// §13 subscription tokens in the JS client, against a real corecast
// process: `subscribe(room, {token})` is granted a room the connection's
// `rooms` claim does not list; `getToken(room)` refreshes it before its
// `exp`, so the room outlives the first token; without `getToken` the room
// is left at expiry (`token_expired` to onError).
// Run: node --experimental-websocket --test test/subscription-token.test.mjs (from clients/js).

import assert from "node:assert/strict";
import { test } from "node:test";

import { Corecast } from "../corecast.js";
import { FAST, hs256, room, startCorecast, waitFor } from "./helpers.mjs";

const SECRET = "js-subscription-token-secret";
const now = () => Math.floor(Date.now() / 1000);
const connToken = (sub) => hs256(SECRET, { sub, exp: now() + 600, rooms: ["lobby"] });
const subToken = (sub, r, secs) => hs256(SECRET, { sub, room: r, exp: now() + secs });

test("a subscription token grants the room; getToken(room) keeps it past exp", { timeout: 60000 }, async (t) => {
  const server = await startCorecast(["--jwt-secret", SECRET]);
  t.after(() => server.stop());
  const host = new Corecast(server.url, { ...FAST, token: hs256(SECRET, { sub: "host", exp: now() + 600 }) });
  t.after(() => host.close());
  const cc = new Corecast(server.url, { ...FAST, token: connToken("viewer") });
  t.after(() => cc.close());
  await Promise.all([host.connect(), cc.connect()]);
  const r = room("vip");

  // Without a token the connection's `rooms` claim refuses the room.
  await assert.rejects(cc.subscribe(r).ready, (e) => e.code === "forbidden");

  const asked = [];
  const refreshed = [];
  const errors = [];
  const got = [];
  const first = subToken("viewer", r, 3);
  const sub = cc.subscribe(r, {
    token: first,
    getToken: async (name) => {
      asked.push(name);
      return subToken("viewer", name, 3);
    },
    onMessage: (m) => got.push(m.data),
    onRefreshed: (x) => refreshed.push(x.exp),
    onError: (e) => errors.push(e.code),
  });
  await sub.ready;
  assert.deepEqual(asked, [], "the given token was fresh: subscribed with it");
  assert.equal(sub.token, first);
  const firstExp = sub.tokenExp;
  await waitFor("past the first token's exp", () => now() > firstExp + 1 && refreshed.length >= 2, 20000);
  assert.deepEqual(errors, []);
  assert.ok(asked.every((n) => n === r), `${asked}`);
  assert.ok(asked.length >= 2, `${asked.length} refreshes`);
  assert.ok(refreshed.at(-1) > firstExp);
  assert.equal(sub.state, "subscribed");
  await host.publish(r, "still in");
  await waitFor("the message after the first exp", () => got.includes("still in"));
});

test("without getToken the room is left at the token's exp", { timeout: 30000 }, async (t) => {
  const server = await startCorecast(["--jwt-secret", SECRET]);
  t.after(() => server.stop());
  const cc = new Corecast(server.url, { ...FAST, token: connToken("viewer2") });
  t.after(() => cc.close());
  await cc.connect();
  const r = room("short");
  const errors = [];
  const sub = cc.subscribe(r, { token: subToken("viewer2", r, 2), onError: (e) => errors.push(e.code) });
  await sub.ready;
  await waitFor("left at expiry", () => sub.state === "closed", 10000);
  assert.deepEqual(errors, ["token_expired"]);
  assert.equal(cc.subscription(r), undefined);
  assert.equal(cc.state, "open", "the connection stays");
});

test("with getToken and no token, the token is asked for before the subscribe", { timeout: 30000 }, async (t) => {
  const server = await startCorecast(["--jwt-secret", SECRET]);
  t.after(() => server.stop());
  const cc = new Corecast(server.url, { ...FAST, token: connToken("viewer3") });
  t.after(() => cc.close());
  await cc.connect();
  const r = room("lazy");
  const asked = [];
  const sub = cc.subscribe(r, {
    getToken: (name) => {
      asked.push(name);
      return subToken("viewer3", name, 600);
    },
  });
  await sub.ready;
  assert.deepEqual(asked, [r]);
  assert.equal(sub.state, "subscribed");
  assert.ok(sub.tokenExp > now() + 500);
});
