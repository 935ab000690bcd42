// The JS client's recovery against real corecast processes with room history
// (PROTOCOL.md §7, `--history-size 100`): every message carries
// `{epoch, offset}`; after a lost connection (client cut off, node killed and
// restarted on a Redis backplane, node drained) the client resubscribes with
// `since` and gets exactly the offsets it missed, once each, in order; where
// history cannot help (a new epoch, a backplane that lost its history) the
// app is told through onRecovered({recovered:false}) / onGap.
//
// Run: node --experimental-websocket --test test/recovery.test.mjs (from clients/js).

import assert from "node:assert/strict";
import { test } from "node:test";

import { Corecast } from "../corecast.js";
import { FAST, room, startCorecast, startProxy, startRedis, waitFor } from "./helpers.mjs";

const HIST = ["--history-size", "100"];

/** A subscription that records everything the app is told. */
function recorder(cc, r, extra = {}) {
  const rec = { messages: [], recovered: [], gaps: [], errors: [], subscribed: [] };
  rec.sub = cc.subscribe(r, {
    ...extra,
    onMessage: (m) => rec.messages.push(m),
    onRecovered: (x) => rec.recovered.push(x),
    onGap: (x) => rec.gaps.push(x),
    onError: (e) => rec.errors.push(e),
    onSubscribed: (s) => rec.subscribed.push(s),
  });
  return rec;
}

/** The stream a recorder's room is in: the epoch of its messages (a room
 * subscribed before it had history is at the empty epoch, offset 0, and its
 * first publish starts a real one) and the subscribe position's offset. */
function stream(rec) {
  const s = rec.subscribed[0];
  return { epoch: s.epoch || rec.messages[0]?.epoch, offset: s.offset };
}

/** Offsets first..last, once each, in order, all in `epoch`. */
function assertContiguous(messages, epoch, first, last) {
  assert.deepEqual(
    messages.map((m) => m.offset),
    Array.from({ length: last - first + 1 }, (_, i) => first + i),
    "every offset exactly once, in order",
  );
  for (const m of messages) assert.equal(m.epoch, epoch);
}

test("messages of a room with history carry epoch and offset from the subscribe position on", { timeout: 60000 }, async (t) => {
  const server = await startCorecast(HIST);
  t.after(() => server.stop());
  const cc = new Corecast(server.url, { ...FAST, user: "hana" });
  t.after(() => cc.close());
  await cc.connect();
  const r = room("hist");
  const rec = recorder(cc, r);
  await rec.sub.ready;
  const s = rec.subscribed[0];
  assert.equal(s.history, true, "subscribed carries epoch and offset");
  // A room nobody published to has no history yet: a read creates none.
  assert.deepEqual([s.epoch, s.offset], ["", 0]);
  assert.deepEqual(rec.sub.position, { epoch: "", offset: 0 });
  const T = s.offset;

  for (let i = 0; i < 5; i++) await cc.publish(r, { i });
  await waitFor("5 messages", () => rec.messages.length === 5);
  const epoch = rec.messages[0].epoch;
  assert.ok(typeof epoch === "string" && epoch.length > 0 && epoch.length <= 64, "the first publish drew an epoch");
  assertContiguous(rec.messages, epoch, T + 1, T + 5);
  assert.deepEqual(
    rec.messages.map((m) => m.data),
    [0, 1, 2, 3, 4].map((i) => ({ i })),
  );
  assert.deepEqual(rec.sub.position, { epoch: epoch, offset: T + 5 });

  // The history op: the last K, and those after a position.
  const h = await cc.history(r, { limit: 3 });
  assert.equal(h.epoch, epoch);
  assert.equal(h.offset, T + 5);
  assert.deepEqual(
    h.messages.map((m) => [m.offset, m.from, m.data]),
    [2, 3, 4].map((i) => [T + 1 + i, "hana", { i }]),
  );
  const after = await cc.history(r, { limit: 100, since: { epoch: epoch, offset: T + 3 } });
  assert.deepEqual(
    after.messages.map((m) => m.offset),
    [T + 4, T + 5],
  );
  // Server-side publish reports the position it got (§4).
  const api = await server.apiPublish({ room: r, data: "from the backend" });
  assert.equal(api.status, 200);
  assert.deepEqual(api.body, { ok: true, epoch: epoch, offset: T + 6 });
  await waitFor("the API message", () => rec.messages.length === 6);
  assert.equal(rec.messages[5].from, "server");
  assert.deepEqual(rec.gaps, []);
});

test("a client cut off from the network resumes with every missed offset exactly once", { timeout: 60000 }, async (t) => {
  const server = await startCorecast(HIST);
  t.after(() => server.stop());
  const proxy = await startProxy(server.addr);
  t.after(() => proxy.close());
  const a = new Corecast(proxy.url, { ...FAST, user: "ines" });
  const b = new Corecast(server.url, { ...FAST, user: "jon" });
  t.after(() => a.close());
  t.after(() => b.close());
  await Promise.all([a.connect(), b.connect()]);
  const r = room("cut");
  const rec = recorder(a, r);
  await rec.sub.ready;
  const T = rec.subscribed[0].offset;

  for (let i = 0; i < 3; i++) await b.publish(r, i);
  await waitFor("3 live messages", () => rec.messages.length === 3);
  proxy.cut();
  await waitFor("a notices the cut", () => a.state !== "open");
  for (let i = 3; i < 8; i++) await b.publish(r, i); // each acked: in the history
  proxy.restore();
  await waitFor("a back", () => a.state === "open" && a.connects === 2);
  // A gap ends the wait early: the assertions below then say what went wrong.
  await waitFor("the 5 missed messages", () => rec.messages.length >= 8 || rec.gaps.length > 0);
  await b.publish(r, 8);
  await waitFor("a live one after the replay", () => rec.messages.at(-1)?.data === 8);

  const { epoch } = stream(rec);
  assertContiguous(rec.messages, epoch, T + 1, T + 9);
  assert.deepEqual(
    rec.messages.map((m) => m.data),
    [0, 1, 2, 3, 4, 5, 6, 7, 8],
  );
  assert.deepEqual(rec.recovered, [{ room: r, recovered: true, since: { epoch, offset: T + 3 }, epoch, offset: T + 8 }]);
  assert.deepEqual(rec.gaps, []);
  assert.equal(rec.sub.duplicatesDropped, 0, "the server sent no offset twice");
});

test("reconnects by itself after a node restart on Redis and resumes every room with no missing offsets", { timeout: 90000 }, async (t) => {
  const redis = await startRedis();
  t.after(() => redis.stop());
  const args = [...HIST, "--redis", redis.url];
  let node1 = await startCorecast(args);
  const node2 = await startCorecast(args);
  t.after(() => node1.stop());
  t.after(() => node2.stop());
  const a = new Corecast(node1.url, { ...FAST, user: "kim" });
  const b = new Corecast(node2.url, { ...FAST, user: "lee" });
  t.after(() => a.close());
  t.after(() => b.close());
  await Promise.all([a.connect(), b.connect()]);
  const rooms = [room("restart-x"), room("restart-y")];
  const recs = rooms.map((r) => recorder(a, r));
  await Promise.all(recs.map((x) => x.sub.ready));

  for (const r of rooms) for (let i = 0; i < 2; i++) await b.publish(r, `${r}#${i}`);
  await waitFor("live messages", () => recs.every((x) => x.messages.length === 2));

  await node1.stop("SIGKILL"); // a crash: no maintenance, no close handshake
  await waitFor("a notices", () => a.state !== "open");
  for (const r of rooms) for (let i = 2; i < 6; i++) await b.publish(r, `${r}#${i}`);
  node1 = await startCorecast(args, { port: node1.port });
  await waitFor("a back on the restarted node", () => a.state === "open" && a.connects === 2);
  await waitFor("every missed message", () => recs.every((x) => x.messages.length >= 6 || x.gaps.length > 0));
  for (const r of rooms) await b.publish(r, `${r}#6`);
  await waitFor("live again", () => recs.every((x, k) => x.messages.at(-1)?.data === `${rooms[k]}#6`));

  rooms.forEach((r, k) => {
    const x = recs[k];
    const { epoch, offset: T } = stream(x);
    assertContiguous(x.messages, epoch, T + 1, T + 7);
    assert.deepEqual(
      x.messages.map((m) => m.data),
      [0, 1, 2, 3, 4, 5, 6].map((i) => `${r}#${i}`),
    );
    assert.equal(x.recovered.length, 1);
    assert.equal(x.recovered[0].recovered, true, "the epoch lives in Redis, not in the node");
    assert.deepEqual(x.gaps, []);
    assert.equal(x.sub.duplicatesDropped, 0);
  });
});

test("a new epoch is surfaced as recovered:false and a gap, and its messages are not taken for duplicates", { timeout: 60000 }, async (t) => {
  // A standalone node keeps history in memory: a restart starts a new epoch.
  let server = await startCorecast(HIST);
  t.after(() => server.stop());
  const cc = new Corecast(server.url, { ...FAST, user: "mo" });
  t.after(() => cc.close());
  await cc.connect();
  const r = room("epoch");
  const rec = recorder(cc, r);
  await rec.sub.ready;
  for (let i = 0; i < 3; i++) await cc.publish(r, i);
  await waitFor("3 messages", () => rec.messages.length === 3);
  const before = { ...rec.sub.position };

  await server.stop("SIGKILL");
  server = await startCorecast(HIST, { port: server.port });
  await waitFor("reconnected", () => cc.connects === 2 && rec.recovered.length === 1);
  const x = rec.recovered[0];
  assert.equal(x.recovered, false);
  assert.deepEqual(x.since, before);
  // The restarted node has no history of the room yet: the empty epoch.
  assert.deepEqual([x.epoch, x.offset], ["", 0], "a restarted standalone node lost the history");
  assert.deepEqual(rec.gaps, [{ room: r, reason: "not_recovered", since: before, epoch: x.epoch, offset: x.offset }]);
  assert.deepEqual(rec.sub.position, { epoch: x.epoch, offset: x.offset });

  // Offsets start again at 1 in a new epoch: below the old position, yet new,
  // and no second gap (nothing was seen in the empty epoch).
  await cc.publish(r, "fresh");
  await waitFor("the new epoch's message", () => rec.messages.length === 4);
  assert.ok(rec.messages[3].epoch !== before.epoch && rec.messages[3].epoch !== "");
  assert.equal(rec.messages[3].offset, 1);
  assert.equal(rec.gaps.length, 1);
  assert.equal(rec.sub.duplicatesDropped, 0);

  // A position from elsewhere (say, stored by a page before a reload) that
  // the node does not know: told plainly, nothing replayed.
  const other = new Corecast(server.url, FAST);
  t.after(() => other.close());
  await other.connect();
  const stale = recorder(other, r, { since: { epoch: "no-such-epoch", offset: 2 } });
  await stale.sub.ready;
  assert.equal(stale.recovered.length, 1);
  assert.equal(stale.recovered[0].recovered, false);
  assert.equal(stale.gaps[0].reason, "not_recovered");
  await cc.ping();
  assert.deepEqual(stale.messages, []);
});

test("a drained node's clients move to another node and lose nothing", { timeout: 90000 }, async (t) => {
  const redis = await startRedis();
  t.after(() => redis.stop());
  const args = [...HIST, "--redis", redis.url];
  const node1 = await startCorecast([...args, "--drain-secs", "2"]);
  const node2 = await startCorecast(args);
  t.after(() => node1.stop());
  t.after(() => node2.stop());
  // Both nodes in the list: after node 1's `maintenance` the client goes on to node 2.
  const a = new Corecast([node1.url, node2.url], { ...FAST, user: "nat" });
  const b = new Corecast(node2.url, { ...FAST, user: "oz" });
  t.after(() => a.close());
  t.after(() => b.close());
  const maintenance = [];
  a.on("maintenance", (m) => maintenance.push(m));
  await Promise.all([a.connect(), b.connect()]);
  const r = room("drain");
  const rec = recorder(a, r);
  await rec.sub.ready;
  const T = rec.subscribed[0].offset;

  // B publishes steadily through the whole drain and after.
  let sent = 0;
  let stop = false;
  const pump = (async () => {
    while (!stop) {
      await b.publish(r, sent);
      sent++;
      await new Promise((res) => setTimeout(res, 20));
    }
  })();
  await waitFor("some live messages", () => rec.messages.length >= 5);
  node1.proc.kill("SIGTERM");
  await waitFor("maintenance", () => maintenance.length === 1);
  await waitFor("a on node 2", () => a.state === "open" && a.connects === 2);
  const atMove = sent;
  await waitFor("more messages after the move", () => sent >= atMove + 10);
  stop = true;
  await pump;
  await waitFor("every message", () => rec.messages.length >= sent || rec.gaps.length > 0);

  const { epoch } = stream(rec);
  assertContiguous(rec.messages, epoch, T + 1, T + sent);
  assert.deepEqual(
    rec.messages.map((m) => m.data),
    Array.from({ length: sent }, (_, i) => i),
  );
  assert.equal(rec.recovered.length, 1);
  assert.equal(rec.recovered[0].recovered, true);
  assert.deepEqual(rec.gaps, []);
  assert.equal(rec.sub.duplicatesDropped, 0);
  assert.equal((await node1.exited).code, 0, "node 1 drained and exited");
});

test("a backplane that lost its history is surfaced as a gap", { timeout: 90000 }, async (t) => {
  const redis = await startRedis();
  let redis2 = null;
  t.after(() => (redis2 || redis).stop());
  const server = await startCorecast([...HIST, "--redis", redis.url]);
  t.after(() => server.stop());
  const cc = new Corecast(server.url, { ...FAST, user: "pia" });
  t.after(() => cc.close());
  await cc.connect();
  const r = room("gap");
  const rec = recorder(cc, r);
  await rec.sub.ready;
  await cc.publish(r, "before");
  await waitFor("first message", () => rec.messages.length === 1);
  const old = { ...rec.sub.position };

  // Redis restarts empty (no persistence): §7 says the epoch changes.
  await redis.stop();
  redis2 = await startRedis({ port: redis.port });
  // The node may not even have noticed the outage yet, and an accepted
  // publish can still be lost with a dropping link (docs/cluster.md): publish again
  // until one arrives.
  await waitFor("a message after the outage", async () => {
    if (rec.messages.some((m) => m.data === "after")) return true;
    await server.apiPublish({ room: r, data: "after" }).catch(() => null);
    await new Promise((res) => setTimeout(res, 200));
    return false;
  }, 30000);

  assert.equal(cc.connects, 1, "the client itself stayed connected");
  assert.ok(rec.gaps.length >= 1, "told about the gap");
  const gap = rec.gaps[0];
  assert.equal(gap.reason, "gap", "a `gap` event from the server, before the new epoch's messages");
  assert.deepEqual(gap.since, old);
  assert.notEqual(gap.epoch, old.epoch);
  const after = rec.messages.find((m) => m.data === "after");
  assert.ok(after.epoch !== old.epoch && after.epoch !== "", "the first publish after it drew a new epoch");
  if (gap.epoch === "") {
    // The node caught up before anything was published again: the room had
    // no history (the empty epoch, offset 0); "after" then starts the new one.
    assert.equal(gap.offset, 0);
  } else {
    assert.equal(after.epoch, gap.epoch);
    assert.ok(after.offset > gap.offset);
  }
});
