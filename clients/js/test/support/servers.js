// Real servers for the SDK's tests (and the demo's browser tests): `herald
// dev`, or a cluster of a nats-server with JetStream, a presence service, a
// router and edges, each a child process on free ports with its output in a
// temp dir, waited for until /readyz says ready. When this process exits
// with a failure their logs are printed. Children are killed when stopped,
// when this process exits, and (through setpriv's parent-death
// signal, where it exists) when this process is killed outright.

import { spawn } from "node:child_process";
import { mkdtempSync, openSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createConnection } from "node:net";
import { tmpdir } from "node:os";
import { delimiter, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import http from "node:http";
import { freePort } from "./ports.js";

export const SECRET = "sdk-test-secret";

const here = dirname(fileURLToPath(import.meta.url));
/** The repository root (clients/js/test/support → ../../../..). */
export const REPO = resolve(here, "..", "..", "..", "..");

/** `$HERALD_BIN`, else `<repo>/target/debug/herald`. */
export function heraldBin() {
  const bin = process.env.HERALD_BIN || join(REPO, "target", "debug", "herald");
  if (!isFile(bin)) {
    throw new Error(
      `the herald binary is not at ${bin}: build it with \`cargo build --bin herald\` in ${REPO}, or set HERALD_BIN`,
    );
  }
  return bin;
}

/** `$NATS_SERVER`, else nats-server on PATH, else Debian's /usr/sbin/nats-server. */
export function natsServerBin() {
  if (process.env.NATS_SERVER) return process.env.NATS_SERVER;
  for (const dir of (process.env.PATH || "").split(delimiter)) {
    if (dir && isFile(join(dir, "nats-server"))) return join(dir, "nats-server");
  }
  if (isFile("/usr/sbin/nats-server")) return "/usr/sbin/nats-server";
  throw new Error("nats-server is not on PATH nor at /usr/sbin/nats-server: install NATS 2.9+ (Debian: nats-server)");
}

function isFile(p) {
  try {
    return statSync(p).isFile();
  } catch {
    return false;
  }
}

/** Polls `check` (sync or async) until it returns a truthy value; fails with `what` after `timeoutMs`. */
export async function eventually(what, check, timeoutMs = 20_000, everyMs = 25) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`not true within ${timeoutMs} ms: ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** GET `path` on 127.0.0.1:`port`: { status, body }. */
export function httpGet(port, path) {
  return new Promise((res, rej) => {
    const req = http.get({ host: "127.0.0.1", port, path, timeout: 2000 }, (r) => {
      let body = "";
      r.setEncoding("utf8");
      r.on("data", (c) => (body += c));
      r.on("end", () => res({ status: r.statusCode, body }));
    });
    req.on("timeout", () => req.destroy(new Error("timeout")));
    req.on("error", rej);
  });
}

const running = new Set();
/** Every process started, and the temp dirs holding their logs. */
const started = [];
const dirs = new Set();
function killAll() {
  for (const p of running) {
    try {
      process.kill(p.pid, "SIGKILL");
    } catch {
      // gone already
    }
  }
}
// On a failure (a non-zero exit) the servers' logs are shown and kept;
// otherwise the temp dirs go.
process.on("exit", (code) => {
  killAll();
  if (code !== 0 && started.length > 0) {
    for (const p of started) console.error(`----- last lines of ${p.name} (${p.log}) -----\n${p.tail(60)}`);
    return;
  }
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.once(sig, () => {
    killAll();
    process.exit(128 + (sig === "SIGINT" ? 2 : sig === "SIGTERM" ? 15 : 1));
  });
}

const SETPRIV = ["/usr/bin/setpriv", "/bin/setpriv"].find(isFile);

/** A child process whose output goes to `<dir>/<name>.log`. */
export class Proc {
  constructor(name, cmd, args, dir, env = {}) {
    this.name = name;
    this.log = join(dir, `${name}.log`);
    writeFileSync(this.log, "");
    const out = openSync(this.log, "a");
    const [file, argv] = SETPRIV ? [SETPRIV, ["--pdeathsig", "KILL", "--", cmd, ...args]] : [cmd, args];
    this.child = spawn(file, argv, {
      stdio: ["ignore", out, out],
      env: withoutConfig({ ...process.env, RUST_LOG: "info,herald=debug", ...env }),
    });
    this.pid = this.child.pid;
    this.exit = null;
    this.exited = new Promise((res) =>
      this.child.on("exit", (code, signal) => {
        this.exit = { code, signal };
        running.delete(this);
        res(this.exit);
      }),
    );
    running.add(this);
    started.push(this);
  }

  output() {
    try {
      return readFileSync(this.log, "utf8");
    } catch {
      return "";
    }
  }

  tail(lines = 40) {
    return this.output().split("\n").slice(-lines).join("\n");
  }

  /** Waits until `check` holds; fails with the end of the output if the process exits first. */
  async waitUntil(what, check, timeoutMs = 30_000) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.exit) throw new Error(`${this.name} exited (${JSON.stringify(this.exit)}) before ${what}:\n${this.tail()}`);
      if (await check().catch(() => false)) return;
      if (Date.now() > deadline) throw new Error(`${this.name}: ${timeoutMs} ms passed before ${what}:\n${this.tail()}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** Sends `signal` (SIGKILL by default) and waits for the exit. */
  async kill(signal = "SIGKILL") {
    if (this.exit) return this.exit;
    try {
      process.kill(this.pid, signal);
    } catch {
      // gone already
    }
    return this.exited;
  }

  /** SIGTERM, then SIGKILL after `graceMs`. */
  async stop(graceMs = 5000) {
    if (this.exit) return this.exit;
    try {
      process.kill(this.pid, "SIGTERM");
    } catch {
      return this.exited;
    }
    const timer = setTimeout(() => this.kill("SIGKILL"), graceMs);
    const e = await this.exited;
    clearTimeout(timer);
    return e;
  }

  /** SIGSTOP / SIGCONT: a process that is there but answers nothing. */
  signal(sig) {
    process.kill(this.pid, sig);
  }
}

/** The caller's HERALD_CONFIG must not leak into a test's servers. */
function withoutConfig(env) {
  delete env.HERALD_CONFIG;
  return env;
}

function tempDir(prefix) {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  dirs.add(dir);
  return dir;
}

/** A configuration file (TOML) in `dir`; returns its path. */
export function writeConfig(dir, text) {
  const path = join(dir, "herald.toml");
  writeFileSync(path, text);
  return path;
}

/** A configuration with an ephemeral `chat`, a durable `doc`, and tight limits in `tight`. */
export const TEST_CONFIG = `
[namespaces.chat]
presence = true
presence_events = true
publish = true
join = ["chat:*"]

[namespaces.doc]
presence = true
publish = true
join = ["doc:*"]
durable = { history_size = 10000, history_ttl = "1h" }

[namespaces.news]
presence = false
publish = false
join = ["news:*"]

[namespaces.tight]
presence = true
publish = true
join = ["tight:*"]

[namespaces.tight.limits]
publish_per_second = 1
publish_burst = 2

[limits]
publish_per_second = 1000
publish_burst = 2000
user_publish_per_second = 5000
join_per_second = 200
join_burst = 400

[inbox]
history_size = 1000
history_ttl = "1d"
`;

async function waitReady(proc, port, timeoutMs = 30_000) {
  await proc.waitUntil(`it was ready on 127.0.0.1:${port}`, async () => {
    const r = await httpGet(port, "/readyz");
    return r.status === 200;
  }, timeoutMs);
}

/**
 * `herald dev` on free ports. `config`: TOML text (default TEST_CONFIG; null
 * for none); `args`: more arguments. Returns { url, http, grpc, proc, dir, stop() }.
 */
export async function startDev({ config = TEST_CONFIG, args = [] } = {}) {
  const dir = tempDir("herald-js-dev-");
  const http = await freePort();
  const grpc = await freePort();
  const argv = ["dev", "--listen", `127.0.0.1:${http}`, "--grpc-listen", `127.0.0.1:${grpc}`, "--jwt-secret", SECRET];
  if (config !== null) argv.push("--config", writeConfig(dir, config));
  argv.push(...args);
  const proc = new Proc("herald-dev", heraldBin(), argv, dir);
  await waitReady(proc, http);
  return {
    url: `ws://127.0.0.1:${http}/ws`,
    http,
    grpc: `127.0.0.1:${grpc}`,
    proc,
    dir,
    /** Kills it; its log stays until this process exits (and is shown if it fails). */
    async stop() {
      await proc.kill();
    },
  };
}

/**
 * A cluster: nats-server (JetStream, temp store), one presence service, one
 * router, `edges` edges, all with `config`. `edgeArgs` go to every edge.
 * Returns { urls, edges: [{ url, http, node, proc }], router: { grpc, proc },
 * nats, dir, addEdge(), stop() }.
 */
export async function startCluster({ edges = 3, config = TEST_CONFIG, edgeArgs = [] } = {}) {
  const dir = tempDir("herald-js-cluster-");
  const procs = [];
  const cluster = { dir, edges: [], urls: [] };
  try {
    const natsPort = await freePort();
    const nats = new Proc(
      "nats-server",
      natsServerBin(),
      ["-a", "127.0.0.1", "-p", String(natsPort), "-js", "-sd", join(dir, "jetstream")],
      dir,
    );
    procs.push(nats);
    await nats.waitUntil(`it listened on ${natsPort}`, () => canConnect(natsPort), 15_000);
    const natsUrl = `nats://127.0.0.1:${natsPort}`;
    const common = config !== null ? ["--config", writeConfig(dir, config)] : [];

    const pGrpc = await freePort();
    const pHttp = await freePort();
    const presence = new Proc(
      "presence-0",
      heraldBin(),
      ["presence", "--grpc-listen", `127.0.0.1:${pGrpc}`, "--http-listen", `127.0.0.1:${pHttp}`, "--nats", natsUrl,
        "--replica-id", "presence-0", ...common],
      dir,
    );
    procs.push(presence);
    const rGrpc = await freePort();
    const rHttp = await freePort();
    const router = new Proc(
      "router",
      heraldBin(),
      ["router", "--grpc-listen", `127.0.0.1:${rGrpc}`, "--http-listen", `127.0.0.1:${rHttp}`, "--nats", natsUrl, ...common],
      dir,
    );
    procs.push(router);
    await Promise.all([waitReady(presence, pHttp), waitReady(router, rHttp)]);
    Object.assign(cluster, {
      nats: { proc: nats, url: natsUrl },
      presence: { proc: presence, grpc: `127.0.0.1:${pGrpc}` },
      router: { proc: router, grpc: `127.0.0.1:${rGrpc}` },
    });

    cluster.addEdge = async (node = `edge-${cluster.edges.length}`, extra = []) => {
      const port = await freePort();
      const proc = new Proc(
        node,
        heraldBin(),
        ["edge", "--listen", `127.0.0.1:${port}`, "--nats", natsUrl, "--node-id", node, "--jwt-secret", SECRET,
          ...common, ...edgeArgs, ...extra],
        dir,
      );
      procs.push(proc);
      await waitReady(proc, port);
      const edge = { node, url: `ws://127.0.0.1:${port}/ws`, http: port, proc };
      cluster.edges.push(edge);
      cluster.urls.push(edge.url);
      return edge;
    };
    for (let i = 0; i < edges; i++) await cluster.addEdge();
    cluster.procs = procs;
    cluster.stop = async () => {
      await Promise.all(procs.map((p) => p.kill()));
    };
    return cluster;
  } catch (e) {
    await Promise.all(procs.map((p) => p.kill()));
    throw e;
  }
}

function canConnect(port) {
  return new Promise((res) => {
    const s = createConnection({ host: "127.0.0.1", port }, () => {
      s.destroy();
      res(true);
    });
    s.on("error", () => res(false));
    s.setTimeout(500, () => {
      s.destroy();
      res(false);
    });
  });
}

