// Free ports for the servers the tests start, shared by the SDK's tests and
// the browser tests.
//
// A port from listen(0) is a bad pick twice over. It lies in the kernel's
// ephemeral range, so between its release and the server's bind any
// outgoing connection may take it (or a client retrying a dead server's
// port may connect to itself on it). And the kernel may hand the same port
// to the next listen(0), so two servers of one cluster can be given one
// port: the second fails with "Address already in use" while the first
// answers its readiness check in its place. Ports are therefore taken below
// the ephemeral range, in a sequence that differs per process, and never
// handed out twice by one process.

import { readFileSync } from "node:fs";
import { createServer } from "node:net";

const LOW = 10_000;
const given = new Set();
let next = (process.pid * 7919) >>> 0;

function ephemeralStart() {
  try {
    const first = Number(readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/)[0]);
    return Number.isInteger(first) ? first : 32768;
  } catch {
    return 32768;
  }
}

/** Resolves true if `port` could be bound on 127.0.0.1 just now. */
function bindable(port) {
  return new Promise((ok) => {
    const s = createServer();
    s.unref();
    s.once("error", () => ok(false));
    s.listen(port, "127.0.0.1", () => s.close(() => ok(true)));
  });
}

/** listen(0)'s pick, for systems whose ephemeral range leaves no room below it. */
function kernelPick() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.unref();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

/** A port that was free a moment ago on 127.0.0.1, never one this process handed out before. */
export async function freePort() {
  const start = ephemeralStart();
  if (start > LOW + 2000) {
    const span = start - LOW;
    for (let tries = 0; tries < Math.min(span, 2000); tries++) {
      next = (next + 104_729) >>> 0;
      const port = LOW + (next % span);
      if (given.has(port)) continue;
      // Claimed before the await: calls made at once (Promise.all) must not pick it too.
      given.add(port);
      if (await bindable(port)) return port;
    }
  }
  for (let tries = 0; tries < 100; tries++) {
    const port = await kernelPick();
    if (!given.has(port)) {
      given.add(port);
      return port;
    }
  }
  throw new Error("no free port on 127.0.0.1 that this process has not handed out already");
}
