// The tests' free ports: distinct within a process even when asked for at
// once, below the kernel's ephemeral range, and free to bind.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { createServer } from "node:net";
import { freePort } from "./support/ports.js";

test("ports asked for at once are distinct, below the ephemeral range, and bindable", async () => {
  const ports = await Promise.all(Array.from({ length: 64 }, () => freePort()));
  assert.equal(new Set(ports).size, ports.length, `a port was handed out twice: ${ports}`);
  const ephemeral = Number(readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/)[0]);
  if (ephemeral > 12_000) {
    for (const p of ports) assert.ok(p >= 10_000 && p < ephemeral, `port ${p} is not below ${ephemeral}`);
  }
  const servers = await Promise.all(ports.map((p) => new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(p, "127.0.0.1", () => ok(s));
  })));
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  // Later calls do not repeat earlier ones either, though those ports are free again.
  const more = await Promise.all(Array.from({ length: 16 }, () => freePort()));
  assert.ok(more.every((p) => !ports.includes(p)), `a port was handed out again: ${more}`);
});
