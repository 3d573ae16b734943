// Child processes for the browser tests: real `herald` binaries and a real
// `nats-server`, each on free ports with its own temporary directory, their
// output kept so that a failing test can show what the servers said.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, existsSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");
/** Generous: a loaded 2-core machine starts processes slowly. */
export const START_TIMEOUT_MS = 30_000;

/** Every process started since the last `stopAll` (their output is kept for failures). */
const running = new Set();

export function heraldBin() {
  const bin = process.env.HERALD_BIN || join(REPO, "target/debug/herald");
  if (!existsSync(bin)) {
    throw new Error(
      `${bin} does not exist: build it first (cargo build --bin herald), or set HERALD_BIN to a herald binary`,
    );
  }
  return bin;
}

export function natsServerBin() {
  if (process.env.NATS_SERVER) return process.env.NATS_SERVER;
  for (const dir of (process.env.PATH ?? "").split(":").concat(["/usr/sbin", "/usr/bin"])) {
    const p = join(dir, "nats-server");
    if (dir && existsSync(p)) return p;
  }
  throw new Error("nats-server is not installed: scripts/test.sh installs Debian's, or set NATS_SERVER");
}

/** Free ports come from the SDK tests' support, one sequence for both suites. */
export { freePort } from "../../test/support/ports.js";

export function tempDir(prefix = "herald-e2e-") {
  return mkdtempSync(join(tmpdir(), prefix));
}

/** Polls `check` (no event exists for "a server answers") until it holds or `timeoutMs` passes. */
export async function waitFor(what, check, timeoutMs = START_TIMEOUT_MS) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check().catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`not within ${timeoutMs} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export function listening(port) {
  return new Promise((ok) => {
    const s = connect(port, "127.0.0.1");
    s.once("connect", () => {
      s.destroy();
      ok(true);
    });
    s.once("error", () => ok(false));
  });
}

export async function httpReady(port) {
  const res = await fetch(`http://127.0.0.1:${port}/readyz`);
  return res.status === 200;
}

/** One child process. */
export class Proc {
  constructor(name, cmd, args, { env = {} } = {}) {
    this.name = name;
    this.output = "";
    const childEnv = { ...process.env, RUST_LOG: "info", ...env };
    // `undefined` removes a variable the tests' own environment may set.
    for (const k of Object.keys(childEnv)) if (childEnv[k] === undefined) delete childEnv[k];
    this.child = spawn(cmd, args, {
      env: childEnv,
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.exited = new Promise((r) => this.child.once("exit", (code, signal) => r({ code, signal })));
    const keep = (chunk) => {
      this.output += chunk;
      // Keep the last 200 KB: enough to see why something failed.
      if (this.output.length > 400_000) this.output = this.output.slice(-200_000);
    };
    this.child.stdout.setEncoding("utf8").on("data", keep);
    this.child.stderr.setEncoding("utf8").on("data", keep);
    this.gone = false;
    this.exited.then(() => (this.gone = true));
    running.add(this);
  }

  /** Waits until `ready()` holds; fails early, with the output, if the process exits. */
  async until(what, ready) {
    let died = null;
    this.exited.then((s) => (died = s));
    await waitFor(`${this.name}: ${what}`, async () => {
      if (died) throw new Error(`${this.name} exited (${JSON.stringify(died)}) before ${what}:\n${this.tail()}`);
      return ready();
    }).catch((e) => {
      if (died) throw new Error(`${this.name} exited (${JSON.stringify(died)}) before ${what}:\n${this.tail()}`);
      throw new Error(`${e.message}\n${this.tail()}`);
    });
  }

  tail(lines = 40) {
    return this.output.split("\n").slice(-lines).map((l) => `  [${this.name}] ${l}`).join("\n");
  }

  /** SIGKILL: no goodbye to anyone. */
  async kill() {
    if (!this.gone) this.child.kill("SIGKILL");
    await this.exited;
  }

  /** SIGTERM, then SIGKILL after `graceMs`. */
  async stop(graceMs = 5000) {
    if (!this.gone) this.child.kill("SIGTERM");
    const t = setTimeout(() => this.child.kill("SIGKILL"), graceMs);
    await this.exited;
    clearTimeout(t);
  }
}

export async function stopAll() {
  const all = [...running];
  running.clear();
  await Promise.all(all.map((p) => p.kill()));
}

/** The output of every process, for a failure message. */
export function allOutput() {
  return [...running].map((p) => p.tail()).join("\n");
}

/** Runs `fn`; if it throws, the processes' output is added to the error. */
export async function showingLogs(fn) {
  try {
    return await fn();
  } catch (e) {
    e.message += `\n--- server output ---\n${allOutput()}`;
    throw e;
  }
}

export function writeTemp(dir, name, text) {
  const p = join(dir, name);
  writeFileSync(p, text);
  return p;
}

export function removeDir(dir) {
  rmSync(dir, { recursive: true, force: true });
}
