#!/usr/bin/env node
// A backend driving corecast through its server API (PROTOCOL.md §12):
// kick a user, broadcast to a list of users, and publish with an
// idempotency key that makes a retry after an unknown outcome safe.
// Node 20+, no dependencies (global fetch). See docs/backend.md.
//
//   CORECAST_API=http://127.0.0.1:8080 CORECAST_API_KEY=secret node docs/examples/backend.mjs
//   node docs/examples/backend.mjs kick            # only some steps: kick, broadcast, idempotent
//
// Environment:
//   CORECAST_API      base URL of any node's API listener (the public port, or
//                     --admin-listen when set); default http://127.0.0.1:8080
//   CORECAST_API_KEY  the node's --api-key, if it has one
//   CORECAST_KICK     the user to kick (default "mallory")
//   CORECAST_USERS    comma-separated users to broadcast to (default "alice,bob,carol")
//   CORECAST_ROOM     the room of the idempotent publish (default "billing")
//
// Each step prints one JSON line of what it did; any failure exits non-zero.

import { pathToFileURL } from "node:url";

const API = (process.env.CORECAST_API || "http://127.0.0.1:8080").replace(/\/+$/, "");
const KEY = process.env.CORECAST_API_KEY || "";

/** One server API call. Resolves to the JSON reply; throws on a non-2xx
 * answer (with the status and the body's error) or a network failure. */
async function call(path, body, { fetchImpl = fetch } = {}) {
  const headers = { "content-type": "application/json" };
  if (KEY) headers.authorization = `Bearer ${KEY}`;
  const r = await fetchImpl(`${API}${path}`, { method: "POST", headers, body: JSON.stringify(body) });
  const reply = await r.json().catch(() => null);
  if (!r.ok) {
    const err = new Error(`${path}: HTTP ${r.status} ${JSON.stringify(reply)}`);
    err.status = r.status;
    throw err;
  }
  return reply;
}

/** Kicks `user` off every node. 4500-4999 is terminal: the user's clients
 * must not reconnect on their own (banned, logged out); 4000-4499 lets them
 * reconnect (e.g. "your session moved, reconnect"). */
export function kick(user, { code = 4501, reason = "banned" } = {}) {
  return call("/api/disconnect", { user, code, reason });
}

/** One direct message to each user in `users` (at most 1000 per call),
 * arriving as {"ev":"direct","from":"server","data":...}. */
export function broadcast(users, data) {
  return call("/api/publish", { users, data });
}

/**
 * Publishes with an idempotency key, retrying on network errors and 5xx
 * (the outcome of such a call is unknown: it may have been delivered).
 * The key is made once and sent with every attempt, so whichever attempts
 * reached corecast, the message is delivered once; a repeat within 5
 * minutes, on any node, gets the first one's reply. 4xx is not retried.
 */
export async function publishOnce(target, data, { attempts = 5, key = crypto.randomUUID(), fetchImpl = fetch } = {}) {
  const body = { ...target, data, idempotency_key: key };
  for (let attempt = 1; ; attempt++) {
    try {
      return { key, attempt, reply: await call("/api/publish", body, { fetchImpl }) };
    } catch (e) {
      const unknownOutcome = e.status === undefined || e.status >= 500;
      if (!unknownOutcome || attempt >= attempts) throw e;
      // Exponential backoff with full jitter: 100 ms, 200 ms, 400 ms, ... caps.
      await new Promise((r) => setTimeout(r, Math.random() * Math.min(2000, 100 * 2 ** attempt)));
    }
  }
}

/** A fetch whose first call reaches the server but whose reply is "lost"
 * (as a connection reset after the request went out would do): the caller
 * cannot tell whether the publish happened. */
function replyLostOnce(realFetch = fetch) {
  let failed = false;
  const lost = [];
  const f = async (...args) => {
    const r = await realFetch(...args);
    if (failed) return r;
    failed = true;
    lost.push(await r.json().catch(() => null));
    throw new TypeError("simulated: connection reset before the reply arrived");
  };
  f.lost = lost;
  return f;
}

async function main(steps) {
  const all = ["kick", "broadcast", "idempotent"];
  steps = steps.length ? steps : all;
  for (const s of steps) if (!all.includes(s)) throw new Error(`unknown step ${s} (${all.join(", ")})`);
  const out = (o) => console.log(JSON.stringify(o));

  if (steps.includes("kick")) {
    const user = process.env.CORECAST_KICK || "mallory";
    out({ step: "kick", user, reply: await kick(user, { code: 4501, reason: "banned for spam" }) });
  }
  if (steps.includes("broadcast")) {
    const users = (process.env.CORECAST_USERS || "alice,bob,carol").split(",").filter(Boolean);
    const reply = await broadcast(users, { kind: "notice", text: "maintenance tonight at 22:00" });
    out({ step: "broadcast", users, reply });
  }
  if (steps.includes("idempotent")) {
    const room = process.env.CORECAST_ROOM || "billing";
    const flaky = replyLostOnce();
    const r = await publishOnce({ room }, { kind: "invoice_paid", invoice: 42 }, { fetchImpl: flaky });
    // r.attempt is 2: the first attempt was delivered but its reply was
    // lost; the retry with the same key was answered like the first and
    // delivered nothing.
    out({ step: "idempotent", room, key: r.key, attempts: r.attempt, first_reply_lost: flaky.lost[0], reply: r.reply });
  }
}

// Run as a script (not when imported for its functions).
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).catch((e) => {
    console.error(e.message || e);
    process.exit(1);
  });
}
