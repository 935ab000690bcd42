// Test helpers for the JS client: real corecast processes (CORECAST_BIN,
// default ../../target/debug/corecast relative to clients/js), real
// redis-server processes on free ports, a TCP proxy that can cut a client
// off, HS256 tokens made with node's crypto, and polling waits with
// deadlines. Everything started here is killed when the test process exits.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync } from "node:fs";
import net from "node:net";
import { dirname, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const CORECAST_BIN = process.env.CORECAST_BIN
  ? resolve(process.env.CORECAST_BIN)
  : resolve(here, "../../../target/debug/corecast");

/** Longest any single wait may take before the test fails. */
export const DEADLINE_MS = 15000;

if (typeof globalThis.WebSocket !== "function") {
  throw new Error("no global WebSocket: run the tests with node --experimental-websocket (node 20) or node >= 22");
}

const children = new Set();
process.on("exit", () => {
  for (const c of children) {
    try {
      c.kill("SIGKILL");
    } catch {
      // gone
    }
  }
});

/** Polls `cond` (sync or async) every 20 ms until it is truthy; throws after `ms`. */
export async function waitFor(what, cond, ms = DEADLINE_MS) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A corecast process. `addr` is host:port; `url` is ws://addr/ws. */
export class Server {
  constructor(proc, addr, logs) {
    this.proc = proc;
    this.addr = addr;
    this.port = Number(addr.split(":").pop());
    this.http = `http://${addr}`;
    this.url = `ws://${addr}/ws`;
    this.logs = logs;
    this.exited = new Promise((r) => proc.once("exit", (code, signal) => r({ code, signal })));
  }

  /** Sends `signal` and waits for the process to exit. */
  async stop(signal = "SIGKILL") {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill(signal);
    return this.exited;
  }

  /** Every backplane link of the node is up: /readyz is 200 and says
   * `ready` (a degraded node still answers 200 within its grace). */
  async linksUp() {
    try {
      const r = await fetch(`${this.http}/readyz`);
      return r.status === 200 && (await r.text()) === "ready\n";
    } catch {
      return false;
    }
  }

  /** POST /api/publish. */
  async apiPublish(body) {
    const r = await fetch(`${this.http}/api/publish`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    return { status: r.status, body: await r.json().catch(() => null) };
  }
}

/** Starts corecast with `--listen 127.0.0.1:PORT --shards 1 ARGS` (PORT 0
 * picks one) and waits for `corecast listening on ADDR` and /readyz 200. */
export async function startCorecast(args = [], { port = 0 } = {}) {
  if (!existsSync(CORECAST_BIN)) {
    throw new Error(`no corecast binary at ${CORECAST_BIN}: run cargo build, or set CORECAST_BIN`);
  }
  const proc = spawn(CORECAST_BIN, ["--listen", `127.0.0.1:${port}`, "--shards", "1", ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_LOG: process.env.CORECAST_TEST_LOG || "info" },
  });
  children.add(proc);
  proc.once("exit", () => children.delete(proc));
  const logs = [];
  createInterface({ input: proc.stderr }).on("line", (l) => logs.push(l));
  const addr = await new Promise((resolveAddr, reject) => {
    const timer = setTimeout(() => reject(new Error(`corecast did not start:\n${logs.join("\n")}`)), DEADLINE_MS);
    proc.once("exit", (code) => {
      clearTimeout(timer);
      // Give stderr a moment to be read so the message says why.
      setTimeout(() => reject(new Error(`corecast exited (${code}) at start:\n${logs.join("\n")}`)), 50);
    });
    createInterface({ input: proc.stdout }).on("line", (l) => {
      const m = /^corecast listening on (\S+)/.exec(l);
      if (m) {
        clearTimeout(timer);
        resolveAddr(m[1]);
      }
    });
  });
  const server = new Server(proc, addr, logs);
  await waitFor(`/readyz 200 on ${addr}`, async () => {
    try {
      return (await fetch(`${server.http}/readyz`)).status === 200;
    } catch {
      return false;
    }
  });
  return server;
}

/** A free TCP port on 127.0.0.1 (bound, then released). */
export async function freePort() {
  const srv = net.createServer();
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  const { port } = srv.address();
  await new Promise((r) => srv.close(r));
  return port;
}

/** A private redis-server on a free port, without persistence. */
export async function startRedis({ port } = {}) {
  port = port || (await freePort());
  const proc = spawn(
    "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  children.add(proc);
  proc.once("exit", () => children.delete(proc));
  const exited = new Promise((r) => proc.once("exit", r));
  await waitFor(`redis-server on ${port}`, () => redisPing(port));
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
      await exited;
    },
  };
}

function redisPing(port) {
  return new Promise((r) => {
    const s = net.connect(port, "127.0.0.1");
    s.setTimeout(500);
    s.once("connect", () => s.write("PING\r\n"));
    s.once("data", (d) => {
      s.destroy();
      r(d.toString().startsWith("+PONG"));
    });
    s.once("error", () => r(false));
    s.once("timeout", () => {
      s.destroy();
      r(false);
    });
  });
}

/** A TCP proxy on 127.0.0.1 in front of `target` ("host:port"). `cut()`
 * drops every proxied connection and refuses new ones (accepts and closes at
 * once) until `restore()`: a network outage as the client sees it.
 * `freeze()` keeps every socket open but silently discards what either side
 * sends (a half-open path: a dead NAT entry, a pulled cable) until `thaw()`. */
export async function startProxy(target) {
  const [host, port] = [target.slice(0, target.lastIndexOf(":")), Number(target.slice(target.lastIndexOf(":") + 1))];
  const live = new Set();
  let down = false;
  let frozen = false;
  const srv = net.createServer((client) => {
    if (down) {
      client.destroy();
      return;
    }
    const upstream = net.connect(port, host);
    live.add(client);
    live.add(upstream);
    const end = () => {
      client.destroy();
      upstream.destroy();
      live.delete(client);
      live.delete(upstream);
    };
    client.on("error", end).on("close", end);
    upstream.on("error", end).on("close", end);
    client.on("data", (d) => frozen || upstream.write(d));
    upstream.on("data", (d) => frozen || client.write(d));
  });
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  const addr = `127.0.0.1:${srv.address().port}`;
  return {
    addr,
    url: `ws://${addr}/ws`,
    cut() {
      down = true;
      for (const s of live) s.destroy();
      live.clear();
    },
    restore() {
      down = false;
    },
    freeze() {
      frozen = true;
    },
    thaw() {
      frozen = false;
    },
    close() {
      down = true;
      for (const s of live) s.destroy();
      return new Promise((r) => srv.close(r));
    },
  };
}

/** An HS256 JWT with `claims` (exp in Unix seconds), made with node's crypto. */
export function hs256(secret, claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${head}.${createHmac("sha256", secret).update(head).digest("base64url")}`;
}

/** Unique room names per test run. */
let roomSeq = 0;
export function room(prefix = "room") {
  return `${prefix}-${process.pid}-${Date.now().toString(36)}-${roomSeq++}`;
}

/** A fast backoff for tests (the defaults are for production). */
export const FAST = { backoff: { minMs: 50, maxMs: 400 }, pingIntervalMs: 0 };

/** A WebSocket stand-in for frame-by-frame tests: records what the client
 * sends (`sent`), lets the test push frames (`push`) and end the connection
 * (`drop`); `ScriptedSocket.last` is the newest one. */
export class ScriptedSocket {
  static last = null;
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    ScriptedSocket.last = this;
    queueMicrotask(() => {
      this.readyState = 1;
      this.onopen?.({});
    });
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close() {
    this.readyState = 3;
  }
  /** A frame from the server: an object, or raw text as it is. */
  push(obj) {
    this.onmessage?.({ data: typeof obj === "string" ? obj : JSON.stringify(obj) });
  }
  /** The connection drops (as the server or the network would end it). */
  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code, reason: "" });
  }
  /** Every op `op` the client sent. */
  ops(op) {
    return this.sent.filter((o) => o.op === op);
  }
  /** The last op `op` the client sent (for `room`, when given). */
  lastOp(op, room) {
    return this.sent.filter((o) => o.op === op && (room === undefined || o.room === room)).at(-1);
  }
}
