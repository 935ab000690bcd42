// The client's own safety nets, which a correct server never triggers and so
// cannot be shown against a real corecast: a repeated offset is dropped, a
// skipped offset or an unannounced new epoch is reported as a gap, frames that
// are not JSON are reported and survived. Driven by a scripted socket (the
// WebSocket option) that plays the server's side frame by frame; everything
// a real server does is tested against a real one in the other files.

import assert from "node:assert/strict";
import { test } from "node:test";

import { Corecast } from "../corecast.js";
import { ScriptedSocket } from "./helpers.mjs";

async function subscribed(room, extra = {}) {
  const cc = new Corecast("ws://scripted.invalid", { WebSocket: ScriptedSocket, pingIntervalMs: 0 });
  const rec = { messages: [], gaps: [], errors: [] };
  cc.on("error", (e) => rec.errors.push(e));
  await cc.connect();
  const ws = ScriptedSocket.last;
  rec.sub = cc.subscribe(room, {
    ...extra,
    onMessage: (m) => rec.messages.push(m.offset),
    onGap: (g) => rec.gaps.push(g),
  });
  const op = ws.lastOp("subscribe");
  return { cc, ws, rec, op };
}

test("a repeated offset is dropped and a skipped one is reported as a gap", async () => {
  const { cc, ws, rec, op } = await subscribed("r");
  ws.push({ ev: "subscribed", room: "r", id: op.id, epoch: "e1", offset: 10 });
  const msg = (offset, epoch = "e1") => ({ ev: "message", room: "r", from: "u", data: offset, epoch, offset });
  ws.push(msg(11));
  ws.push(msg(11)); // duplicate
  ws.push(msg(10)); // at the subscribe position: already covered
  ws.push(msg(12));
  ws.push(msg(14)); // 13 skipped
  assert.deepEqual(rec.messages, [11, 12, 14]);
  assert.equal(rec.sub.duplicatesDropped, 2);
  assert.deepEqual(rec.gaps, [
    { room: "r", reason: "skipped", since: { epoch: "e1", offset: 12 }, epoch: "e1", offset: 13 },
  ]);
  // A message of an epoch nobody announced: delivered, and reported.
  ws.push(msg(1, "e2"));
  assert.deepEqual(rec.messages, [11, 12, 14, 1]);
  assert.equal(rec.gaps[1].reason, "epoch_changed");
  assert.deepEqual(rec.sub.position, { epoch: "e2", offset: 1 });
  // Messages without offsets (a raw Redis PUBLISH bypasses history) pass as they are.
  ws.push({ ev: "message", room: "r", from: "backend", data: "raw" });
  assert.equal(rec.messages.length, 5);
  assert.deepEqual(rec.sub.position, { epoch: "e2", offset: 1 });
  cc.close();
});

test("a resubscribe sends since, and the frames right after `subscribed` see its outcome", async () => {
  const { cc, ws, rec, op } = await subscribed("r", { since: { epoch: "e1", offset: 5 } });
  assert.deepEqual(op.since, { epoch: "e1", offset: 5 }, "a stored position is sent on the first subscribe");
  // recovered:false, immediately followed (same task) by a live message:
  // the position must already be the reply's, so offset 8 is not a skip.
  ws.push({ ev: "subscribed", room: "r", id: op.id, epoch: "e9", offset: 7, recovered: false });
  ws.push({ ev: "message", room: "r", from: "u", data: 8, epoch: "e9", offset: 8 });
  assert.deepEqual(rec.messages, [8]);
  assert.deepEqual(
    rec.gaps.map((g) => g.reason),
    ["not_recovered"],
  );
  // The server's `gap` event moves the position on.
  ws.push({ ev: "gap", room: "r", epoch: "e9", offset: 20 });
  assert.deepEqual(rec.sub.position, { epoch: "e9", offset: 20 });
  ws.push({ ev: "message", room: "r", from: "u", data: 21, epoch: "e9", offset: 21 });
  assert.deepEqual(rec.messages, [8, 21]);
  assert.deepEqual(
    rec.gaps.map((g) => [g.reason, g.since]),
    [
      ["not_recovered", { epoch: "e1", offset: 5 }],
      ["gap", { epoch: "e9", offset: 8 }],
    ],
  );
  cc.close();
});

test("frames that are not JSON are reported and the connection goes on", async () => {
  const { cc, ws, rec, op } = await subscribed("r");
  ws.push("not json");
  ws.push({ ev: "subscribed", room: "r", id: op.id });
  await rec.sub.ready;
  assert.deepEqual(
    rec.errors.map((e) => e.code),
    ["bad_frame"],
  );
  assert.equal(cc.state, "open");
  cc.close();
});
