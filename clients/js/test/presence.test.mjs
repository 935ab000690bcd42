// Presence (PROTOCOL.md §11) in the JS client, against real corecast nodes
// with namespaces from a TOML file (`--config`): `presence()` paging through
// 2500 members, `stats()`, join/leave handlers across two nodes on a real
// redis-server, the live member set (`subscribe(room, {presence: true})`)
// re-fetched after a reconnect and equal to the truth, the re-check after a
// leave grace, and rooms without `presence: true` never sending the op.
// The last test drives the join/leave-during-fetch race frame by frame with
// a scripted socket (a real server cannot be made to order it on demand).
// Run: node --experimental-websocket --test test/presence.test.mjs (from clients/js).

import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { Corecast } from "../corecast.js";
import { FAST, room, ScriptedSocket, startCorecast, startProxy, startRedis, waitFor } from "./helpers.mjs";

const NAMESPACES = `
[[namespace]]
prefix = "who:"
presence = true

[[namespace]]
prefix = "chat:"
presence = true
join_leave = true
presence_grace_ms = 400

[[namespace]]
prefix = "blip:"
presence = true
join_leave = true
presence_grace_ms = 3000
`;

const dir = mkdtempSync(join(tmpdir(), "corecast-js-presence-"));
const CONFIG = join(dir, "namespaces.toml");
writeFileSync(CONFIG, NAMESPACES);
const ARGS = ["--config", CONFIG, "--max-ops-per-sec", "0"];

/** A WebSocket that records every op the client sends. */
function spying(sent) {
  return class extends WebSocket {
    send(text) {
      sent.push(JSON.parse(text));
      super.send(text);
    }
  };
}

/** A raw connection of `user` subscribed to `r` (resolves on `subscribed`). */
function rawMember(url, user, r) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${url}?user=${encodeURIComponent(user)}`);
    ws.onopen = () => ws.send(JSON.stringify({ op: "subscribe", room: r, id: 1 }));
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (m.ev === "subscribed" && m.id === 1) resolve(ws);
      else if (m.ev === "error") reject(new Error(`${user}: ${e.data}`));
    };
    ws.onerror = () => reject(new Error(`${user}: socket error`));
  });
}

/** One raw member "anchor" in `r` on each of `nodes`, subscribed before
 * the test's clients: a node whose first member of a room is the client
 * under test may lose that member's own join (the server race shown by the
 * todo test below), which is not what these tests are about. */
async function anchors(nodes, r) {
  const sockets = [];
  for (const n of nodes) sockets.push(await rawMember(n.url, "anchor", r));
  return sockets;
}

/** Records a subscription's join/leave/presence callbacks. */
function recorder() {
  const rec = { joins: [], leaves: [], syncs: 0, changes: [], errors: [] };
  rec.handlers = {
    onJoin: (e) => rec.joins.push(e.user),
    onLeave: (e) => rec.leaves.push(e.user),
    onPresence: (p) => {
      if (p.reason === "sync") rec.syncs++;
      rec.changes.push({ reason: p.reason, user: p.user, members: [...p.members].sort() });
    },
    onError: (e) => rec.errors.push(e.code),
  };
  return rec;
}

const sorted = (set) => [...set].sort();

after(() => rmSync(dir, { recursive: true, force: true }));

describe("one node", () => {
  let server;
  const clients = [];
  const client = (opts = {}) => {
    const c = new Corecast(server.url, { ...FAST, ...opts });
    clients.push(c);
    return c;
  };
  before(async () => {
    server = await startCorecast(ARGS);
  });
  after(async () => {
    for (const c of clients) c.close();
    await server.stop();
  });

  test("presence() pages through all 2500 members; stats() and the last page agree", async () => {
    const r = room("who:big");
    const truth = new Map(); // user -> connections
    const sockets = [];
    const users = Array.from({ length: 2500 }, (_, i) => `u${String(i).padStart(4, "0")}`);
    // The first 10 users have a second tab.
    const conns = [...users, ...users.slice(0, 10)];
    try {
      for (let i = 0; i < conns.length; i += 250) {
        const batch = conns.slice(i, i + 250);
        sockets.push(...(await Promise.all(batch.map((u) => rawMember(server.url, u, r)))));
        for (const u of batch) truth.set(u, (truth.get(u) || 0) + 1);
      }
      const sent = [];
      const cc = client({ user: "reader", WebSocket: spying(sent) });
      await cc.connect();
      // The reader is not subscribed: the ops need the grant, not a subscription.
      const p = await cc.presence(r, { limit: 97 });
      assert.equal(p.users, 2500);
      assert.equal(p.clients, 2510);
      assert.equal(p.members.length, 2500);
      assert.deepEqual(
        p.members.map((m) => m.user),
        users,
        "every member once, in ascending order",
      );
      for (const m of p.members) assert.equal(m.clients, truth.get(m.user), m.user);
      const pages = sent.filter((o) => o.op === "presence");
      assert.equal(pages.length, Math.ceil(2500 / 97), "one op per page");
      assert.equal(pages[0].after, undefined);
      for (let i = 1; i < pages.length; i++) assert.equal(pages[i].after, users[i * 97 - 1], `page ${i} after`);
      assert.ok(pages.every((o) => o.limit === 97));

      // The default page size is 1000: three pages.
      sent.length = 0;
      const d = await cc.presence(r);
      assert.deepEqual(d.members, p.members);
      assert.deepEqual(
        sent.filter((o) => o.op === "presence").map((o) => o.limit),
        [1000, 1000, 1000],
      );

      // A subscription's presence()/stats() are the same ops for its room.
      const sub = cc.subscribe(r);
      await sub.ready;
      assert.deepEqual(await sub.stats(), { room: r, clients: 2511, users: 2501 });
      assert.equal((await sub.presence({ limit: 5000 })).members.length, 2501);

      // Ten connections go: the counts follow at once (no grace for counts).
      for (const ws of sockets.splice(0, 10)) ws.close();
      await waitFor("stats after 10 closes", async () => (await cc.presenceStats(r)).clients === 2501);
      assert.deepEqual(await cc.presenceStats(r), { room: r, clients: 2501, users: 2501 });
    } finally {
      for (const ws of sockets) ws.close();
    }
  });

  test("stats() counts connections and distinct users; rooms without presence refuse both ops", async () => {
    const r = room("who:small");
    const a1 = client({ user: "ann" });
    const a2 = client({ user: "ann" });
    const b = client({ user: "ben" });
    for (const c of [a1, a2, b]) await c.connect();
    const subs = [a1, a2, b].map((c) => c.subscribe(r));
    await Promise.all(subs.map((s) => s.ready));
    assert.deepEqual(await subs[2].stats(), { room: r, clients: 3, users: 2 });
    assert.deepEqual(await subs[0].presence(), {
      room: r,
      clients: 3,
      users: 2,
      members: [
        { user: "ann", clients: 2 },
        { user: "ben", clients: 1 },
      ],
    });
    await subs[1].unsubscribe();
    assert.deepEqual(await b.presenceStats(r), { room: r, clients: 2, users: 2 });

    const plain = room("plain");
    await assert.rejects(b.presence(plain), { code: "bad_request" });
    await assert.rejects(b.presenceStats(plain), { code: "bad_request" });
  });

  test("a room without presence: true never sends the presence op, even across a reconnect", async () => {
    const proxy = await startProxy(server.addr);
    try {
      const sent = [];
      const cc = new Corecast(proxy.url, { ...FAST, user: "quiet", WebSocket: spying(sent) });
      clients.push(cc);
      await cc.connect();
      const rec = recorder();
      // A presence namespace, but the app did not ask for the live set.
      const chat = cc.subscribe(room("chat:nolive"), rec.handlers);
      const plain = cc.subscribe(room("plain"));
      await Promise.all([chat.ready, plain.ready]);
      // Its own join still reaches onJoin (the server sends it to subscribers).
      await waitFor("own join", () => rec.joins.includes("quiet"));
      proxy.cut();
      await waitFor("reconnecting", () => cc.state === "reconnecting");
      proxy.restore();
      await waitFor("resubscribed", () => cc.connects === 2 && chat.state === "subscribed" && plain.state === "subscribed");
      await cc.ping(); // every frame before the pong was read
      assert.equal(sent.filter((o) => o.op === "subscribe").length, 4);
      assert.deepEqual(
        sent.filter((o) => o.op === "presence" || o.op === "presence_stats"),
        [],
      );
      assert.equal(rec.syncs, 0);
      assert.equal(chat.members.size, 0);

      // presence: true where the namespace has no presence: one op, refused, not retried.
      const rec2 = recorder();
      const bad = cc.subscribe(room("plain"), { presence: true, ...rec2.handlers });
      await bad.ready;
      await waitFor("bad_request", () => rec2.errors.includes("bad_request"));
      await new Promise((r) => setTimeout(r, 1500)); // longer than any retry delay with FAST
      assert.equal(sent.filter((o) => o.op === "presence").length, 1);
      assert.equal(bad.state, "subscribed", "the subscription itself stands");
      assert.equal(bad.membersSynced, false);
    } finally {
      await proxy.close();
    }
  });
});

describe("two nodes on a real redis-server", () => {
  let redis;
  let a;
  let b;
  const clients = [];
  const client = (url, user, opts = {}) => {
    const c = new Corecast(url, { ...FAST, user, ...opts });
    clients.push(c);
    return c;
  };
  before(async () => {
    redis = await startRedis();
    a = await startCorecast([...ARGS, "--redis", redis.url]);
    b = await startCorecast([...ARGS, "--redis", redis.url]);
    for (const n of [a, b]) await waitFor(`every Redis link of ${n.addr} up`, () => n.linksUp());
    // A node's first presence writes wait for its first Redis lease, which
    // can take ~5 s after start (measured: joins 4.5-5 s late on fresh
    // nodes, at once later): wait until each node has written one.
    for (const n of [a, b]) {
      const r = room("who:warmup");
      const ws = await rawMember(n.url, "warmup", r);
      await waitFor(`${n.addr} writes presence`, async () => {
        const reply = await fetch(`${n.http}/api/presence_stats?room=${r}`);
        return reply.status === 200 && (await reply.json()).clients === 1;
      });
      ws.close();
    }
  });
  after(async () => {
    for (const c of clients) c.close();
    await a?.stop();
    await b?.stop();
    await redis?.stop();
  });

  test("join and leave handlers across nodes; the live set follows them", async () => {
    const r = room("chat:two");
    const anchored = await anchors([a, b], r);
    const alice = client(a.url, "alice");
    const bob = client(b.url, "bob");
    await alice.connect();
    await bob.connect();
    const ra = recorder();
    const sa = alice.subscribe(r, { presence: true, presenceGraceMs: 400, ...ra.handlers });
    await waitFor("alice synced", () => ra.syncs === 1);
    // On Redis the fetch right after `subscribed` may be read before her own
    // count is written; her own join (sent after that write) puts her in.
    await waitFor("alice's own join", () => ra.joins.includes("alice"));
    assert.deepEqual(sorted(sa.members), ["alice", "anchor"]);

    const rb = recorder();
    const sb = bob.subscribe(r, { presence: true, presenceGraceMs: 400, ...rb.handlers });
    await waitFor("alice sees bob join (node B → node A)", () => ra.joins.includes("bob"));
    await waitFor("bob synced", () => rb.syncs === 1);
    // Bob learns of alice from the fetch: her join was before his subscribe.
    await waitFor("bob's own join", () => rb.joins.includes("bob"));
    assert.deepEqual(sorted(sb.members), ["alice", "anchor", "bob"]);
    // (The anchor's join may come late enough to be seen too: not counted.)
    const others = (joins) => joins.filter((u) => u !== "anchor");
    assert.deepEqual(others(rb.joins), ["bob"]);
    assert.deepEqual(sorted(sa.members), ["alice", "anchor", "bob"]);
    assert.deepEqual(ra.changes.at(-1), { reason: "join", user: "bob", members: ["alice", "anchor", "bob"] });

    const closedAt = Date.now();
    bob.close();
    await waitFor("alice sees bob leave", () => ra.leaves.includes("bob"));
    const waited = Date.now() - closedAt;
    assert.ok(waited >= 350, `the leave waited out the 400 ms grace (came after ${waited} ms)`);
    assert.deepEqual(sorted(sa.members), ["alice", "anchor"]);
    assert.deepEqual(ra.changes.at(-1), { reason: "leave", user: "bob", members: ["alice", "anchor"] });
    assert.deepEqual(others(ra.joins), ["alice", "bob"]);
    assert.deepEqual(ra.leaves, ["bob"]);
    assert.deepEqual(await alice.presenceStats(r), { room: r, clients: 3, users: 2 });
    for (const ws of anchored) ws.close();
  });

  test("the live set is re-fetched after a reconnect and equals the truth", async () => {
    const r = room("chat:reconnect");
    const proxy = await startProxy(a.addr);
    const anchored = await anchors([a, b], r);
    try {
      const alice = client(proxy.url, "alice");
      const watcher = client(b.url, "watcher");
      await alice.connect();
      await watcher.connect();
      const rw = recorder();
      await watcher.subscribe(r, rw.handlers).ready;
      const carol = client(b.url, "carol");
      await carol.connect();
      await carol.subscribe(r).ready;

      const ra = recorder();
      const sa = alice.subscribe(r, { presence: true, presenceGraceMs: 400, ...ra.handlers });
      await waitFor("alice synced", () => ra.syncs === 1);
      await waitFor("alice's own join", () => ra.joins.includes("alice"));
      assert.deepEqual(sorted(sa.members), ["alice", "anchor", "carol", "watcher"]);

      // Alice is cut off; meanwhile carol leaves and dave comes.
      proxy.cut();
      await waitFor("alice reconnecting", () => alice.state === "reconnecting");
      assert.equal(sa.membersSynced, false);
      carol.close();
      const dave = client(b.url, "dave");
      await dave.connect();
      await dave.subscribe(r).ready;
      await waitFor("carol's leave (seen by the watcher)", () => rw.leaves.includes("carol"));
      await waitFor("dave's join (seen by the watcher)", () => rw.joins.includes("dave"));
      assert.ok(!ra.leaves.includes("carol") && !ra.joins.includes("dave"), "alice missed both events");

      proxy.restore();
      await waitFor("alice re-synced after the reconnect", () => alice.connects === 2 && ra.syncs >= 2);
      const truth = (await watcher.presence(r)).members.map((m) => m.user);
      assert.deepEqual(truth, ["alice", "anchor", "dave", "watcher"]);
      assert.deepEqual(sorted(sa.members), truth);
      assert.equal(sa.membersSynced, true);
      // The set stays current after the re-fetch.
      const erin = client(b.url, "erin");
      await erin.connect();
      await erin.subscribe(r).ready;
      await waitFor("erin in alice's set", () => sa.members.has("erin"));
      assert.deepEqual(sorted(sa.members), ["alice", "anchor", "dave", "erin", "watcher"]);
    } finally {
      for (const ws of anchored) ws.close();
      await proxy.close();
    }
  });

  test("a member back within the leave grace (no join) is found by the re-check after the grace", async () => {
    // Both alice and bob are cut off. Alice comes back first and fetches the
    // list while bob is within his 3 s grace: the list (which follows
    // connections at once) lacks him. Bob returns within the grace, so no
    // event says so; the re-check after the grace finds him.
    const r = room("blip:recheck");
    const pa = await startProxy(a.addr);
    const pb = await startProxy(b.addr);
    try {
      const alice = client(pa.url, "alice");
      const bob = client(pb.url, "bob");
      const watcher = client(b.url, "watcher");
      await watcher.connect();
      await alice.connect();
      await bob.connect();
      const ra = recorder();
      const sa = alice.subscribe(r, { presence: true, presenceGraceMs: 3000, ...ra.handlers });
      await waitFor("alice synced", () => ra.syncs === 1);
      await bob.subscribe(r).ready;
      await waitFor("bob in alice's set", () => sa.members.has("bob"));

      pa.cut();
      pb.cut();
      await waitFor("both reconnecting", () => alice.state === "reconnecting" && bob.state === "reconnecting");
      // Both connections are gone from the counts (their leaves still wait).
      await waitFor("no connection left in the room", async () => (await watcher.presenceStats(r)).clients === 0);
      pa.restore();
      await waitFor("alice re-synced", () => alice.connects === 2 && ra.syncs === 2);
      const cutAt = Date.now();
      // (Alice herself may be missing too: a fetch can be read before her
      // own count is written, and back within her grace she gets no join.)
      assert.ok(!sa.members.has("bob"), "bob, within his grace, is not listed");
      pb.restore();
      await waitFor("bob back", () => bob.connects === 2 && bob.subscription(r).state === "subscribed");
      assert.ok(Date.now() - cutAt < 2500, "bob came back within his grace (the test's premise)");
      await waitFor("the re-check finds bob", () => sa.members.has("bob"), 8000);
      assert.equal(ra.syncs, 3);
      assert.deepEqual(ra.joins.filter((u) => u === "bob").length, 1, "no second join for bob: only his first");
      assert.deepEqual(ra.leaves, []);
      assert.deepEqual(sorted(sa.members), ["alice", "bob"]);
    } finally {
      await pa.close();
      await pb.close();
    }
  });

  // PROTOCOL.md §11: "The connection that joins gets its own join after its
  // subscribed." Found lost here before (2026-12-07: 0-2 of 25 fresh rooms
  // per run, on both drivers: the join was published before the node's
  // Redis subscription to the room took effect); the server now writes a
  // room's presence only once that subscription is confirmed.
  test(
    "the first subscriber of a room on a node gets its own join (25 fresh rooms)",
    async () => {
      const lost = [];
      for (let k = 0; k < 25; k++) {
        const r = room("chat:own");
        const node = k % 2 ? a : b;
        const w = client(node.url, "self");
        await w.connect();
        const rec = recorder();
        await w.subscribe(r, rec.handlers).ready;
        try {
          await waitFor(`own join in ${r}`, () => rec.joins.includes("self"), 3000);
        } catch {
          const stats = await w.presenceStats(r);
          lost.push(`${r} on ${node.addr} (counted: ${JSON.stringify(stats)})`);
        }
        w.close();
      }
      assert.deepEqual(lost, [], "own joins never received");
    },
  );
});

// ---- the fetch/event race, frame by frame --------------------------------

test("events during the fetch are buffered and applied once, in order, on top of the snapshot", async () => {
  const cc = new Corecast("ws://scripted.invalid", { WebSocket: ScriptedSocket, pingIntervalMs: 0 });
  await cc.connect();
  const ws = ScriptedSocket.last;
  const rec = recorder();
  const sub = cc.subscribe("r", { presence: true, presenceLimit: 2, ...rec.handlers });
  ws.push({ ev: "subscribed", room: "r", id: ws.ops("subscribe")[0].id });
  const flush = () => new Promise((r) => setTimeout(r, 0));
  await flush();
  const p1 = ws.ops("presence");
  assert.equal(p1.length, 1);
  assert.equal(p1[0].limit, 2);
  // While the first page is in flight: "me" joins (in the snapshot or not,
  // either way it stays), "x" leaves (the snapshot still lists x).
  ws.push({ ev: "join", room: "r", user: "me" });
  ws.push({ ev: "leave", room: "r", user: "x" });
  ws.push({ ev: "presence", room: "r", clients: 3, users: 3, members: [{ user: "me", clients: 1 }, { user: "x", clients: 1 }], next: "x", id: p1[0].id });
  await flush();
  const p2 = ws.ops("presence");
  assert.equal(p2.length, 2);
  assert.equal(p2[1].after, "x");
  // Between the pages: "a" joins (ids before the cursor are not read again),
  // "z" joins then leaves (the snapshot's last page still lists z).
  ws.push({ ev: "join", room: "r", user: "a" });
  ws.push({ ev: "join", room: "r", user: "z" });
  ws.push({ ev: "leave", room: "r", user: "z" });
  assert.equal(rec.syncs, 0, "nothing published before the fetch is complete");
  assert.equal(sub.members.size, 0);
  ws.push({ ev: "presence", room: "r", clients: 2, users: 2, members: [{ user: "y", clients: 1 }, { user: "z", clients: 1 }], id: p2[1].id });
  await flush();
  assert.equal(rec.syncs, 1);
  assert.deepEqual(sorted(sub.members), ["a", "me", "y"]);
  assert.deepEqual(rec.changes, [{ reason: "sync", user: undefined, members: ["a", "me", "y"] }]);
  // Handlers heard every event as it came.
  assert.deepEqual(rec.joins, ["me", "a", "z"]);
  assert.deepEqual(rec.leaves, ["x", "z"]);
  // After the sync: applied live, a repeated state is no change.
  ws.push({ ev: "join", room: "r", user: "b" });
  ws.push({ ev: "leave", room: "r", user: "y" });
  ws.push({ ev: "leave", room: "r", user: "nobody" });
  assert.deepEqual(sorted(sub.members), ["a", "b", "me"]);
  assert.deepEqual(
    rec.changes.slice(1).map((c) => `${c.reason} ${c.user}`),
    ["join b", "leave y"],
  );
  cc.close();
});

test("a fetch that lacks our own user is repeated soon; a grace re-check still follows", async () => {
  const cc = new Corecast("ws://scripted.invalid", {
    WebSocket: ScriptedSocket,
    pingIntervalMs: 0,
    user: "me",
    backoff: { minMs: 1, maxMs: 5 },
  });
  await cc.connect();
  let ws = ScriptedSocket.last;
  const rec = recorder();
  const sub = cc.subscribe("r", { presence: true, presenceGraceMs: 200, ...rec.handlers });
  const settle = () => new Promise((r) => setTimeout(r, 0));
  const reply = (members) => {
    const op = ws.ops("presence").at(-1);
    ws.push({ ev: "presence", room: "r", clients: members.length, users: members.length, members: members.map((user) => ({ user, clients: 1 })), id: op.id });
  };
  ws.push({ ev: "subscribed", room: "r", id: ws.ops("subscribe")[0].id });
  await settle();
  // Read before our own count was written, and no own join comes.
  reply(["x", "y"]);
  await settle();
  assert.deepEqual(sorted(sub.members), ["x", "y"]);
  await waitFor("a second fetch", () => ws.ops("presence").length === 2, 1000);
  reply(["me", "x", "y"]);
  await settle();
  assert.deepEqual(sorted(sub.members), ["me", "x", "y"]);
  await new Promise((r) => setTimeout(r, 900));
  assert.equal(ws.ops("presence").length, 2, "listed: no more fetches");

  // A reconnect: y is within its grace (not listed) and so are we.
  ws.onclose({ code: 1006, reason: "" });
  await waitFor("reconnected", () => ScriptedSocket.last !== ws && cc.state === "open", 1000);
  ws = ScriptedSocket.last;
  await settle();
  ws.push({ ev: "subscribed", room: "r", id: ws.ops("subscribe")[0].id });
  await settle();
  const t0 = Date.now();
  reply(["x"]);
  await settle();
  assert.deepEqual(sorted(sub.members), ["x"]);
  // The quick one for ourselves first...
  await waitFor("the fetch for ourselves", () => ws.ops("presence").length === 2, 1000);
  assert.ok(Date.now() - t0 < 600, "well before the grace re-check");
  reply(["me", "x"]);
  await settle();
  assert.deepEqual(sorted(sub.members), ["me", "x"]);
  // ...and the grace re-check is still owed: y came back within its grace.
  await waitFor("the grace re-check", () => ws.ops("presence").length === 3, 2000);
  assert.ok(Date.now() - t0 >= 650, `after the grace + 500 ms (${Date.now() - t0} ms)`);
  reply(["me", "x", "y"]);
  await settle();
  assert.deepEqual(sorted(sub.members), ["me", "x", "y"]);
  await new Promise((r) => setTimeout(r, 900));
  assert.equal(ws.ops("presence").length, 3, "nothing missing: no more fetches");
  cc.close();
});
