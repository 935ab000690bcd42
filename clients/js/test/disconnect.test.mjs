// POST /api/disconnect (PROTOCOL.md §12) against a real node: a terminal
// code (4500-4999) ends the client for good and tells the app why; a
// 4000-4499 code lets it reconnect. Then the same across three nodes on one
// redis-server, one client of the user on each: every connection gets the
// disconnect event and the close code, wherever the call landed.

import assert from "node:assert/strict";
import { after, test } from "node:test";

import { Corecast } from "../corecast.js";
import { FAST, startCorecast, startRedis, waitFor } from "./helpers.mjs";

const server = await startCorecast();
after(() => server.stop?.());

async function kick(user, code, reason) {
  const r = await fetch(`${server.http}/api/disconnect`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user, code, reason }),
  });
  assert.equal(r.status, 200);
}

test("a terminal code stops the client and says why", async () => {
  const c = new Corecast(`${server.url}?user=banned`, FAST);
  const seen = [];
  c.on("disconnect", (e) => seen.push(["disconnect", e.code, e.reason, e.terminal]));
  c.on("terminated", (e) => seen.push(["terminated", e.code, e.reason]));
  c.on("close", (e) => seen.push(["close", e.code, e.reason, e.terminal]));
  await c.connect();
  await kick("banned", 4501, "banned for spam");
  await waitFor("terminated", () => seen.some((s) => s[0] === "terminated"));
  assert.deepEqual(seen, [
    ["disconnect", 4501, "banned for spam", true],
    ["close", 4501, "banned for spam", true],
    ["terminated", 4501, "banned for spam"],
  ]);
  assert.equal(c.state, "closed");
  await new Promise((r) => setTimeout(r, 1000));
  assert.equal(c.connects, 1, "no reconnect after a terminal code");
});

test("a 4000-4499 code reconnects", async () => {
  const c = new Corecast(`${server.url}?user=nudged`, FAST);
  let disconnects = 0;
  c.on("disconnect", (e) => {
    assert.equal(e.terminal, false);
    disconnects++;
  });
  await c.connect();
  await kick("nudged", 4001, "move along");
  await waitFor("a reconnect", () => c.connects === 2 && c.state === "open");
  assert.equal(disconnects, 1);
  c.close();
});

// Three nodes on one real redis-server, one client of the same user on
// each: POST /api/disconnect to one node reaches every connection of the
// user, wherever it is.
async function threeNodes(t) {
  const redis = await startRedis();
  t.after(() => redis.stop());
  const nodes = [];
  for (let i = 0; i < 3; i++) nodes.push(await startCorecast(["--redis", redis.url]));
  t.after(() => Promise.all(nodes.map((n) => n.stop())));
  return nodes;
}

/** One client of `user` per node, each recording its events. */
async function clientsOf(t, nodes, user) {
  const clients = [];
  for (const n of nodes) {
    const c = new Corecast(`${n.url}?user=${user}`, FAST);
    t.after(() => c.close());
    c.log = [];
    c.probes = new Set();
    c.on("disconnect", (e) => c.log.push(["disconnect", e.code, e.reason, e.terminal]));
    c.on("close", (e) => c.log.push(["close", e.code, e.reason, e.terminal]));
    c.on("terminated", (e) => c.log.push(["terminated", e.code, e.reason]));
    c.on("state", (s) => s.state === "connecting" && c.log.push(["connecting"]));
    c.on("direct", (d) => c.probes.add(d.data));
    await c.connect();
    clients.push(c);
  }
  return clients;
}

/** Publishes direct messages to `user` until every client got one since
 * this call: then each connection is reachable through Redis (its node's
 * subscription to the user's channel is confirmed). */
async function reachable(node, user, clients) {
  const tag = `probe-${Date.now()}-${Math.random()}`;
  let i = 0;
  const seen = () => clients.every((c) => [...c.probes].some((p) => String(p).startsWith(tag)));
  await waitFor(`every connection of ${user} reachable`, async () => {
    const r = await node.apiPublish({ user, data: `${tag}-${i++}` });
    assert.equal(r.status, 200);
    await new Promise((res) => setTimeout(res, 50));
    return seen();
  });
}

test("3 nodes: a 4501 kick reaches every connection of the user, none reconnects", { timeout: 60000 }, async (t) => {
  const nodes = await threeNodes(t);
  const user = `kicked-${process.pid}`;
  const clients = await clientsOf(t, nodes, user);
  await reachable(nodes[1], user, clients);

  const r = await fetch(`${nodes[1].http}/api/disconnect`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user, code: 4501, reason: "banned" }),
  });
  assert.equal(r.status, 200);
  await waitFor("every client terminated", () => clients.every((c) => c.log.some((e) => e[0] === "terminated")));
  // No new connection attempt for a few seconds (FAST backoff would retry
  // within 400 ms): the counters and the event logs say so, not the clock.
  await new Promise((res) => setTimeout(res, 3000));
  clients.forEach((c, i) => {
    assert.deepEqual(
      c.log,
      [["connecting"], ["disconnect", 4501, "banned", true], ["close", 4501, "banned", true], ["terminated", 4501, "banned"]],
      `client on node ${i}`,
    );
    assert.equal(c.state, "closed", `client on node ${i}`);
    assert.equal(c.connects, 1, `client on node ${i} did not reconnect`);
  });
});

test("3 nodes: a 4001 kick reaches every connection of the user, each reconnects", { timeout: 60000 }, async (t) => {
  const nodes = await threeNodes(t);
  const user = `nudged3-${process.pid}`;
  const clients = await clientsOf(t, nodes, user);
  await reachable(nodes[2], user, clients);

  const r = await fetch(`${nodes[0].http}/api/disconnect`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user, code: 4001, reason: "move along" }),
  });
  assert.equal(r.status, 200);
  await waitFor("every client reconnected", () => clients.every((c) => c.connects === 2 && c.state === "open"));
  clients.forEach((c, i) => {
    assert.deepEqual(
      c.log,
      [["connecting"], ["disconnect", 4001, "move along", false], ["close", 4001, "move along", false], ["connecting"]],
      `client on node ${i}`,
    );
  });
  // And each is reachable again on its new connection.
  await reachable(nodes[0], user, clients);
});
