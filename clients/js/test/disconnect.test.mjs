// POST /api/disconnect (PROTOCOL.md §12) against a real node: a terminal
// code (4500-4999) ends the client for good and tells the app why; a
// 4000-4499 code lets it reconnect.

import assert from "node:assert/strict";
import { after, test } from "node:test";

import { Corecast } from "../corecast.js";
import { FAST, startCorecast, waitFor } from "./helpers.mjs";

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
