// docs/examples/backend.mjs run as a process against a real node (with
// --api-key and room history) while JS clients are connected: the kicked
// user's client is terminated for good; each user of the broadcast list gets
// the message exactly once (and nobody else does); the publish whose first
// reply was lost and that was retried with the same idempotency key is
// delivered once. The last two need PROTOCOL.md §12's multi-target publish
// (`"users":[...]`) and `idempotency_key` in the server.
// Run: node --experimental-websocket --test test/backend-example.test.mjs (from clients/js).

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { dirname, resolve } from "node:path";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";

import { Corecast } from "../corecast.js";
import { FAST, room, startCorecast, waitFor } from "./helpers.mjs";

const EXAMPLE = resolve(dirname(fileURLToPath(import.meta.url)), "../../../docs/examples/backend.mjs");
const API_KEY = "example-key";
const server = await startCorecast(["--api-key", API_KEY, "--history-size", "100"]);
after(() => server.stop());

/** Runs the example with `steps` and `env`; resolves to its JSON lines. */
function runExample(steps, env) {
  return new Promise((res, rej) => {
    const p = spawn(process.execPath, [EXAMPLE, ...steps], {
      env: { ...process.env, CORECAST_API: server.http, CORECAST_API_KEY: API_KEY, ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    let err = "";
    p.stdout.on("data", (d) => (out += d));
    p.stderr.on("data", (d) => (err += d));
    p.once("error", rej);
    p.once("exit", (code) => {
      if (code !== 0) return rej(new Error(`backend.mjs ${steps.join(" ")} exited ${code}: ${err}${out}`));
      res(out.trim().split("\n").filter(Boolean).map((l) => JSON.parse(l)));
    });
  });
}

async function apiPublish(body) {
  const r = await fetch(`${server.http}/api/publish`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${API_KEY}` },
    body: JSON.stringify(body),
  });
  assert.equal(r.status, 200, `publish ${JSON.stringify(body)}: ${r.status}`);
  return r.json();
}

async function client(t, user) {
  const c = new Corecast(`${server.url}?user=${user}`, FAST);
  t.after(() => c.close());
  c.user = user;
  c.directs = [];
  c.log = [];
  c.on("direct", (d) => c.directs.push(d));
  c.on("terminated", (e) => c.log.push(["terminated", e.code, e.reason]));
  c.on("state", (s) => s.state === "connecting" && c.log.push(["connecting"]));
  await c.connect();
  return c;
}

/** Sends a direct marker to each user after what came before; waits until
 * each client has it (a backend's calls one after another arrive in order). */
async function markers(clients) {
  for (const c of clients) await apiPublish({ user: c.user, data: "marker" });
  await waitFor("the markers", () => clients.every((c) => c.directs.some((d) => d.data === "marker")));
}

test("kick: the kicked user's client is terminated; others stay", { timeout: 30000 }, async (t) => {
  const victim = `mallory-${process.pid}`;
  const v = await client(t, victim);
  const bystander = await client(t, `bystander-${process.pid}`);
  const lines = await runExample(["kick"], { CORECAST_KICK: victim });
  assert.deepEqual(lines, [{ step: "kick", user: victim, reply: { ok: true } }]);
  await waitFor("terminated", () => v.log.some((e) => e[0] === "terminated"));
  await new Promise((r) => setTimeout(r, 1500));
  assert.deepEqual(v.log, [["connecting"], ["terminated", 4501, "banned for spam"]]);
  assert.equal(v.state, "closed");
  assert.equal(v.connects, 1, "no reconnect after the terminal 4501");
  assert.equal(bystander.state, "open");
  assert.equal(bystander.connects, 1);
});

// Needs the multi-target publish ("users":[...], PROTOCOL.md §12).
test("broadcast: each listed user gets the message once, nobody else", { timeout: 30000 }, async (t) => {
  const names = ["alice", "bob", "carol"].map((n) => `${n}-${process.pid}`);
  const listed = [];
  for (const n of names) {
    listed.push(await client(t, n));
  }
  const outsider = await client(t, `dave-${process.pid}`);
  const lines = await runExample(["broadcast"], { CORECAST_USERS: names.join(",") });
  assert.equal(lines.length, 1);
  assert.deepEqual(lines[0].reply, { ok: true, results: names.map((user) => ({ user })) });
  await markers([...listed, outsider]);
  const notice = { kind: "notice", text: "maintenance tonight at 22:00" };
  for (const c of listed) {
    assert.deepEqual(
      c.directs.filter((d) => d.data !== "marker"),
      [{ from: "server", data: notice }],
      `${c.user} gets it exactly once`,
    );
  }
  assert.deepEqual(outsider.directs.filter((d) => d.data !== "marker"), [], "a user not listed gets nothing");
});

// Needs `idempotency_key` (PROTOCOL.md §12).
test("idempotent publish: the retry after a lost reply delivers once", { timeout: 30000 }, async (t) => {
  const r = room("billing");
  const c = await client(t, `accountant-${process.pid}`);
  const got = [];
  await c.subscribe(r, { onMessage: (m) => got.push(m) }).ready;
  const lines = await runExample(["idempotent"], { CORECAST_ROOM: r });
  assert.equal(lines.length, 1);
  const [line] = lines;
  assert.equal(line.attempts, 2, "the first attempt's reply was lost, the second answered");
  // The repeat is answered like the first: the same position.
  assert.deepEqual(line.reply, line.first_reply_lost);
  assert.equal(line.reply.ok, true);
  await apiPublish({ room: r, data: "marker" });
  await waitFor("the marker", () => got.some((m) => m.data === "marker"));
  const payload = got.filter((m) => m.data !== "marker");
  assert.equal(payload.length, 1, `delivered ${payload.length} times`);
  assert.deepEqual(payload[0].data, { kind: "invoice_paid", invoice: 42 });
  assert.equal(payload[0].from, "server");
  assert.equal(payload[0].offset, line.reply.offset);
});
