// Drives headless Chromium against two corecast nodes sharing a Redis
// backplane: the demo page (`GET /`, built on the JS client served at
// `/corecast.js`) on node A and on node B join the same room; A's message
// shows on B's page and B's on A's; each page shows its node's connection
// count from /metrics. Also checks the WebSocket handshake: the nodes run
// with `--compression on`, Chromium offers permessage-deflate and the 101
// accepts it with server_ and client_no_context_takeover (RFC 7692, PROTOCOL.md §9); a
// message long enough to be compressed (past --compression-min-bytes) goes
// each way intact.
//
// Alice's page reaches node A through a TCP proxy run here. The proxy cuts
// her off (every socket dropped, new ones refused) while Bob publishes, then
// lets her back: the page must reconnect by itself, resubscribe, and show the
// outcome for the room: with room history on the nodes (PROTOCOL.md §7) the
// missed message is replayed and the room shows "recovered"; without, the
// room shows "history off" and the missed message is not there.
//
// Presence (PROTOCOL.md §11): browser.rs gives the rooms `browser-…` a
// namespace with presence, join/leave and a 1 s leave grace. Each page lists
// who is here; alice's page (first in the room) sees bob join from the other
// node; after her reconnect her list is fetched again; bob's page closing
// makes alice's page show him leave, no sooner than the grace.
//
// Usage: node tests/browser/two_nodes.mjs http://127.0.0.1:PORT_A http://127.0.0.1:PORT_B
// Exit 0 and a last line `browser test passed` on success.
// Env: CORECAST_CHROMIUM (default /usr/bin/chromium).

import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [urlA, urlB] = process.argv.slice(2);
if (!urlA || !urlB) {
  console.error("usage: two_nodes.mjs URL_A URL_B");
  process.exit(2);
}
const STEP_MS = 8000;
const ROOM = "browser-" + Date.now().toString(36);
const GRACE_MS = 1000; // presence_grace_ms of the namespace in browser.rs
let proxy = null; // in front of node A, for alice's page (startProxy below)

// The whole run is bounded: a hang must not hang the Rust test.
const watchdog = setTimeout(() => {
  console.error("two_nodes.mjs: gave up after 40 s");
  process.exit(3);
}, 40000);

const userDataDir = mkdtempSync(join(tmpdir(), "corecast-chromium-"));
let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CORECAST_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-proxy-server",
    ],
    timeout: 15000,
  });
  await run(context);
  console.log("browser test passed");
} catch (e) {
  console.error("browser test FAILED:", e && e.stack ? e.stack : e);
  process.exitCode = 1;
} finally {
  clearTimeout(watchdog);
  proxy?.close();
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}

// A TCP proxy in front of a node; `cut()` drops every connection and
// refuses new ones until `restore()`.
async function startProxy(target) {
  const u = new URL(target);
  const live = new Set();
  let down = false;
  const srv = net.createServer((c) => {
    if (down) return c.destroy();
    const up = net.connect(Number(u.port), u.hostname);
    live.add(c).add(up);
    const end = () => {
      c.destroy();
      up.destroy();
      live.delete(c);
      live.delete(up);
    };
    c.on("error", end).on("close", end);
    up.on("error", end).on("close", end);
    c.pipe(up);
    up.pipe(c);
  });
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${srv.address().port}`,
    cut() {
      down = true;
      for (const s of live) s.destroy();
      live.clear();
    },
    restore() {
      down = false;
    },
    close() {
      this.cut();
      srv.close();
    },
  };
}

async function openPage(ctx, base, user) {
  const page = await ctx.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on("pageerror", (e) => console.error(`[${user}] page error:`, e.message));
  page.on("console", (m) => {
    if (m.type() === "error") console.error(`[${user}] console:`, m.text());
  });
  // Watch the WebSocket handshake through CDP: what the browser offered and
  // what the server answered.
  const hs = { request: null, response: null };
  const cdp = await ctx.newCDPSession(page);
  await cdp.send("Network.enable");
  cdp.on("Network.webSocketWillSendHandshakeRequest", (e) => (hs.request = lower(e.request.headers)));
  cdp.on("Network.webSocketHandshakeResponseReceived", (e) => {
    hs.response = { status: e.response.status, headers: lower(e.response.headers) };
  });
  const resp = await page.goto(`${base}/?user=${user}&room=${ROOM}`);
  if (resp.status() !== 200) throw new Error(`GET / on ${base}: ${resp.status()}`);
  // The query string prefilled the form.
  const prefilled = await page.evaluate(() => [
    document.querySelector("#join [name=user]").value,
    document.querySelector("#join [name=room]").value,
  ]);
  if (prefilled[0] !== user || prefilled[1] !== ROOM) throw new Error(`form not prefilled: ${prefilled}`);
  await page.click("#join-btn");
  await page.waitForSelector("body[data-state=joined]");
  return { page, hs, user, base };
}

function lower(headers) {
  const out = {};
  for (const [k, v] of Object.entries(headers || {})) out[k.toLowerCase()] = v;
  return out;
}

async function say(from, text) {
  await from.page.fill("#send [name=text]", text);
  await from.page.click("#send-btn");
}

async function expectMessage(to, line) {
  await to.page.waitForFunction(
    (want) => [...document.querySelectorAll("#messages li")].some((li) => li.textContent === want),
    line,
    { timeout: STEP_MS },
  ).catch(async (e) => {
    const got = await to.page.$$eval("#messages li", (lis) => lis.map((li) => li.textContent));
    throw new Error(`${to.user}'s page (${to.base}) never showed ${JSON.stringify(line)}; it shows ${JSON.stringify(got)}: ${e.message}`);
  });
}

async function run(ctx) {
  proxy = await startProxy(urlA);
  const a = await openPage(ctx, proxy.url, "alice");
  const b = await openPage(ctx, urlB, "bob");

  for (const p of [a, b]) {
    const { request, response } = p.hs;
    if (!request || !response) throw new Error(`${p.user}: no WebSocket handshake seen via CDP`);
    if (response.status !== 101) throw new Error(`${p.user}: handshake status ${response.status}`);
    const offered = request["sec-websocket-extensions"] || "";
    const accepted = lower(response.headers)["sec-websocket-extensions"] || "";
    if (!/^permessage-deflate\b/.test(accepted) || !/server_no_context_takeover/.test(accepted) || !/client_no_context_takeover/.test(accepted)) {
      throw new Error(`${p.user}: browser offered [${offered}], 101 answered [${accepted}]: permessage-deflate not negotiated`);
    }
    console.log(`${p.user}: browser offered [${offered}]; 101 accepted [${accepted}]; joined ${ROOM}`);
  }

  // Presence: alice was in the room first; bob's join reaches her page
  // across nodes, and bob's page got alice from the member list.
  await expectMessage(a, `bob joined ${ROOM}`);
  console.log("alice's page (node A) saw bob join from node B");
  await expectWho(a, "alice, bob", "after bob joined");
  await expectWho(b, "alice, bob", "after joining");
  console.log("both pages list alice, bob as here");

  // Long enough to be compressed both ways (the default threshold is 256 bytes).
  const longA = "compressed from A: " + "the quick brown fox jumps over the lazy dog ".repeat(12);
  const longB = "compressed from B: " + "pack my box with five dozen liquor jugs ".repeat(12);
  await say(a, longA);
  await expectMessage(b, `alice: ${longA}`);
  await say(b, longB);
  await expectMessage(a, `bob: ${longB}`);
  console.log("long (compressed) messages arrive intact both ways");

  await say(a, "hello from A");
  await expectMessage(b, "alice: hello from A");
  await expectMessage(a, "alice: hello from A"); // publishers get their own messages
  console.log("bob's page (node B) shows alice's message from node A");

  await say(b, "hi back from B");
  await expectMessage(a, "bob: hi back from B");
  console.log("alice's page (node A) shows bob's message from node B");

  // Each node holds exactly one WebSocket: its page's.
  for (const p of [a, b]) {
    await p.page.waitForFunction(() => document.getElementById("connections").textContent === "1", null, {
      timeout: 5000,
    });
  }
  console.log("both pages show 1 connection on their node (from /metrics)");

  // Alice is cut off; Bob publishes while she is away; she comes back.
  const history = await roomCell(a, ".position");
  const historyOn = history !== "history off";
  proxy.cut();
  await a.page.waitForSelector("body[data-state=reconnecting]");
  await say(b, "while alice was away");
  await expectMessage(b, "bob: while alice was away");
  proxy.restore();
  await a.page.waitForSelector("body[data-state=joined]", { timeout: 15000 });
  await a.page.waitForFunction(() => document.getElementById("reconnects").textContent === "1");
  if (historyOn) {
    await expectMessage(a, "bob: while alice was away");
    await a.page.waitForFunction(
      () => document.querySelector("#rooms td.recovery").dataset.outcome === "recovered",
    );
    console.log(`alice's page reconnected by itself and recovered the missed message: ${await roomCell(a, ".recovery")}`);
  } else {
    await a.page.waitForFunction(() => /history off/.test(document.querySelector("#rooms td.recovery").textContent));
    console.log(`alice's page reconnected by itself and resubscribed (${await roomCell(a, ".recovery")})`);
  }
  await say(b, "welcome back");
  await expectMessage(a, "bob: welcome back");
  if (!historyOn) {
    const lines = await a.page.$$eval("#messages li", (lis) => lis.map((li) => li.textContent));
    if (lines.includes("bob: while alice was away")) throw new Error("without history a missed message cannot be there");
  }
  console.log("alice's page gets live messages again after the reconnect");
  await expectWho(a, "alice, bob", "after her reconnect");
  console.log("alice's page lists alice, bob again after the reconnect");

  // Bob's page closes: alice's page sees him leave once the grace is over.
  const closedAt = Date.now();
  await b.page.close();
  await expectMessage(a, `bob left ${ROOM}`);
  const waited = Date.now() - closedAt;
  if (waited < GRACE_MS * 0.9) throw new Error(`bob's leave came after ${waited} ms, before the ${GRACE_MS} ms grace`);
  await expectWho(a, "alice", "after bob left");
  console.log(`alice's page saw bob leave ${waited} ms after his page closed (grace ${GRACE_MS} ms)`);
}

async function expectWho(p, want, what) {
  await p.page
    .waitForFunction((w) => document.querySelector("#rooms tbody tr td.who")?.textContent === w, want, { timeout: STEP_MS })
    .catch(async (e) => {
      throw new Error(`${p.user}'s page: ${what}: want who-is-here ${JSON.stringify(want)}, shows ${JSON.stringify(await roomCell(p, ".who"))}: ${e.message}`);
    });
}

async function roomCell(p, cls) {
  return p.page.$eval(`#rooms tbody tr td${cls}`, (td) => td.textContent);
}
