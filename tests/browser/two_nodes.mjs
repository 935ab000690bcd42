// Drives headless Chromium against two corecast nodes sharing a Redis
// backplane: the demo page (`GET /`) on node A and on node B join the same
// room; A's message shows on B's page and B's on A's; each page shows its
// node's connection count from /metrics. Also checks the WebSocket handshake:
// Chromium offers permessage-deflate and corecast declines it by leaving
// Sec-WebSocket-Extensions out of the 101 (RFC 7692 §5.1).
//
// Usage: node tests/browser/two_nodes.mjs http://127.0.0.1:PORT_A http://127.0.0.1:PORT_B
// Exit 0 and a last line `browser test passed` on success.
// Env: CORECAST_CHROMIUM (default /usr/bin/chromium).

import { mkdtempSync, rmSync } from "node:fs";
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

// The whole run is bounded: a hang must not hang the Rust test.
const watchdog = setTimeout(() => {
  console.error("two_nodes.mjs: gave up after 25 s");
  process.exit(3);
}, 25000);

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
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
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
  const a = await openPage(ctx, urlA, "alice");
  const b = await openPage(ctx, urlB, "bob");

  for (const p of [a, b]) {
    const { request, response } = p.hs;
    if (!request || !response) throw new Error(`${p.user}: no WebSocket handshake seen via CDP`);
    if (response.status !== 101) throw new Error(`${p.user}: handshake status ${response.status}`);
    const offered = request["sec-websocket-extensions"] || "";
    const accepted = response.headers["sec-websocket-extensions"];
    if (accepted !== undefined) throw new Error(`${p.user}: server accepted extensions ${accepted}`);
    console.log(`${p.user}: browser offered [${offered}]; 101 carries no Sec-WebSocket-Extensions (declined); joined ${ROOM}`);
  }

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
}
