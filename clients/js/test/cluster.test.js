// The SDK against a real cluster (nats-server with JetStream, presence,
// router, edges): clients whose edge is killed outright or stalls move to
// another edge of their list, rejoin their durable room from the last offset
// they delivered, and end with every message exactly once and in order,
// including the publishes that were in flight or made while they were away.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";

import { Herald } from "../dist/herald.js";
import { startCluster, eventually } from "./support/servers.js";
import { token } from "./support/tokens.js";
import { collect, nextEvent } from "./support/events.js";

let cluster;
const clients = [];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

before(async () => {
  cluster = await startCluster({ edges: 2 });
});

after(async () => {
  for (const h of clients) h.close();
  await cluster?.stop();
});

function herald(urls, user, opts = {}) {
  const h = new Herald(urls, { token: token(user), reconnect: { initialDelayMs: 200, maxDelayMs: 2000 }, ...opts });
  clients.push(h);
  return h;
}

/**
 * A WebSocket class for one client that notes, for each socket it makes, when
 * it was made and closed and the `disconnect` frame it carried.
 */
function spySockets() {
  const sockets = [];
  class Spy extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      const s = { createdAt: performance.now(), closedAt: undefined, disconnect: undefined };
      sockets.push(s);
      // Added before the client's own handlers, so these run first.
      this.addEventListener("message", (e) => {
        if (typeof e.data !== "string") return;
        const f = JSON.parse(e.data);
        if (f.op === "disconnect") s.disconnect = f;
      });
      this.addEventListener("close", () => {
        s.closedAt = performance.now();
      });
    }
  }
  return { WebSocket: Spy, sockets };
}

/** Every stored message of `room`, oldest first, read page by page. */
async function allHistory(h, room) {
  const out = [];
  let since;
  for (;;) {
    const page = await h.room(room).history({ since, limit: 500 });
    if (page.messages.length === 0) return out;
    out.push(...page.messages);
    since = { epoch: page.epoch, offset: page.messages[page.messages.length - 1].offset };
  }
}

/** Publishes `{p: tag, n}` one after the other until `stop()` says so; returns how many were acknowledged. */
function publisher(h, room, tag, paceMs) {
  let stopped = false;
  let n = 0;
  let last = 0;
  const done = (async () => {
    while (!stopped) {
      const ack = await h.room(room).publish({ p: tag, n });
      last = Math.max(last, ack.offset);
      n++;
      await sleep(paceMs);
    }
    return { count: n, last };
  })();
  return {
    get count() {
      return n;
    },
    stop() {
      stopped = true;
      return done;
    },
  };
}

test("50 clients on an edge killed with SIGKILL end with every message exactly once and in order", async (t) => {
  const doomed = await cluster.addEdge("edge-doomed");
  const [e0, e1] = cluster.edges;
  const urls = [doomed.url, e0.url, e1.url];
  const room = `doc:storm-${Date.now()}`;

  const receivers = Array.from({ length: 50 }, (_, i) => herald(urls, `r${i}`));
  await Promise.all(receivers.map((h) => h.connect()));
  assert.ok(receivers.every((h) => h.node === "edge-doomed"), "every receiver starts on the doomed edge");
  const got = receivers.map((h) => collect(h.room(room)));
  const rejoins = receivers.map(() => []);
  receivers.forEach((h, i) => h.room(room).on("rejoined", (r) => rejoins[i].push(r)));
  await Promise.all(receivers.map((h) => h.room(room).join()));

  // One publisher on a surviving edge; one on the doomed edge, whose publish
  // in flight at the kill must be sent again (same key) and stored once.
  const steadyClient = herald([e1.url], "steady");
  const doomedClient = herald(urls, "doomed-pub");
  await Promise.all([steadyClient.connect(), doomedClient.connect()]);
  assert.equal(doomedClient.node, "edge-doomed");
  const steady = publisher(steadyClient, room, "steady", 5);
  const fromDoomed = publisher(doomedClient, room, "doomed", 5);

  await eventually("both publishers under way", () => steady.count >= 50 && fromDoomed.count >= 50, 30_000);
  await doomed.proc.kill("SIGKILL");

  await eventually(
    "every receiver rejoined on a surviving edge",
    () => receivers.every((h, i) => h.state === "connected" && h.node !== "edge-doomed" && rejoins[i].length > 0),
    60_000,
  );
  const atKill = { steady: steady.count, doomed: fromDoomed.count };
  const afterRejoin = steady.count;
  await eventually("more published after the rejoins", () => steady.count >= afterRejoin + 100 && fromDoomed.count >= atKill.doomed + 50, 30_000);
  const [s, d] = await Promise.all([steady.stop(), fromDoomed.stop()]);
  const last = Math.max(s.last, d.last);

  await eventually(
    "every receiver reached the last offset",
    () => receivers.every((h) => h.room(room).position?.offset === last),
    60_000,
  );
  const stored = await allHistory(steadyClient, room);
  t.diagnostic(
    `published ${s.count} through a surviving edge and ${d.count} through the killed one's client ` +
      `(${atKill.steady} and ${atKill.doomed} before the kill); ${stored.length} stored; ` +
      `rejoins replayed ${Math.min(...rejoins.map((r) => r[0].missed))}-${Math.max(...rejoins.map((r) => r[0].missed))} missed messages`,
  );
  const storedOffsets = stored.map((m) => m.offset);
  assert.equal(stored.length, s.count + d.count, "each acknowledged publish stored exactly once");
  for (const tag of ["steady", "doomed"]) {
    const ns = stored.filter((m) => m.data.p === tag).map((m) => m.data.n);
    assert.deepEqual(ns, [...Array(tag === "steady" ? s.count : d.count).keys()], `${tag}'s publishes in the store`);
  }
  receivers.forEach((h, i) => {
    const offsets = got[i].map((m) => m.offset);
    assert.deepEqual(offsets, storedOffsets, `receiver ${i} saw what was stored, once each, in order`);
    assert.ok(rejoins[i].every((r) => r.recovered), `receiver ${i} recovered fully`);
  });
});

test("a client whose edge stalls (SIGSTOP) notices within a heartbeat and moves to the next edge", async () => {
  const stalled = await cluster.addEdge("edge-stalled", ["--heartbeat", "2s"]);
  const [e0] = cluster.edges;
  const room = `doc:stall-${Date.now()}`;
  const h = herald([stalled.url, e0.url], "staller");
  const c = await h.connect();
  assert.equal(c.node, "edge-stalled");
  assert.equal(c.heartbeat_ms, 2000);
  const got = collect(h.room(room));
  await h.room(room).join();
  const pub = herald([e0.url], "stall-pub");
  await pub.connect();
  await pub.room(room).publish("before");
  await got.count(1);

  const gone = nextEvent(h, "disconnected", () => true, 20_000);
  const back = nextEvent(h, "connected", () => true, 30_000);
  const stoppedAt = Date.now();
  stalled.proc.signal("SIGSTOP");
  try {
    await gone;
    const took = Date.now() - stoppedAt;
    // Heartbeat 2 s: a ping after 0.8 s of silence, given up 1 s later; the
    // liveness check runs every 0.2 s, so at worst 2.2 s after the last frame.
    // The promise is "within the heartbeat": at most 1.5 of it, the rest is
    // slack for a loaded machine.
    assert.ok(took <= 3000, `noticed after ${took} ms`);
    await pub.room(room).publish("while moving");
    const again = await back;
    assert.equal(again.node, e0.node);
    await pub.room(room).publish("after");
    await got.count(3);
    await sleep(200);
    assert.deepEqual(got.map((m) => m.data), ["before", "while moving", "after"]);
  } finally {
    await stalled.proc.kill("SIGKILL");
  }
});

test("publishes made while the edge is gone are delivered once, in order, through another edge", async () => {
  const doomed = await cluster.addEdge("edge-doomed-2");
  const [e0, e1] = cluster.edges;
  const room = `doc:offline-${Date.now()}`;
  const watcher = herald([e0.url], "offline-w");
  await watcher.connect();
  const seen = collect(watcher.room(room));
  await watcher.room(room).join();

  const h = herald([doomed.url, e1.url], "offline-p");
  await h.connect();
  await h.room(room).publish("online");
  const queued = [];
  // Made in the disconnected handler: certainly offline.
  const off = h.on("disconnected", () => {
    off();
    for (let i = 0; i < 5; i++) queued.push(h.room(room).publish(`offline ${i}`));
  });
  await doomed.proc.kill("SIGKILL");
  const acks = await Promise.all(await eventually("queued", () => (queued.length === 5 ? queued : null)));
  assert.equal(h.node, e1.node);
  await seen.count(6);
  await sleep(300);
  assert.deepEqual(seen.map((m) => m.data), ["online", ...[0, 1, 2, 3, 4].map((i) => `offline ${i}`)]);
  assert.deepEqual(acks.map((a) => a.offset), seen.slice(1).map((m) => m.offset));
});

test("a draining edge's reconnect_after_ms is waited for before the client comes back on another edge", async () => {
  // Drain window 0: every client is told at once, each with its own random hint (0-1000 ms).
  const draining = await cluster.addEdge("edge-draining", ["--drain-window", "0s"]);
  const [e0] = cluster.edges;
  const room = `doc:drain-${Date.now()}`;
  const spies = Array.from({ length: 10 }, () => spySockets());
  // A backoff of under 1 ms: whatever wait there is comes from the server's hint.
  const hs = spies.map((s, i) =>
    herald([draining.url, e0.url], `drained${i}`, { WebSocket: s.WebSocket, reconnect: { initialDelayMs: 1, maxDelayMs: 1 } }),
  );
  await Promise.all(hs.map((h) => h.connect()));
  assert.ok(hs.every((h) => h.node === "edge-draining"), "every client starts on the draining edge");
  await Promise.all(hs.map((h) => h.room(room).join()));
  const told = hs.map((h) => nextEvent(h, "disconnected", () => true, 20_000));
  const rejoined = hs.map((h) => nextEvent(h.room(room), "rejoined", () => true, 30_000));

  await draining.proc.stop(15_000); // SIGTERM: the edge drains, then exits
  for (const d of await Promise.all(told)) {
    assert.equal(d.code, 1012);
    assert.equal(d.willReconnect, true);
  }
  await Promise.all(rejoined);
  assert.ok(hs.every((h) => h.node === e0.node), "every client moved to the edge that stays");

  const hints = spies.map(({ sockets }, i) => {
    const [first, second] = sockets;
    assert.equal(first.disconnect?.code, 1012, `client ${i}: the drain's disconnect`);
    assert.equal(first.disconnect.reconnect, true);
    const hint = first.disconnect.reconnect_after_ms;
    assert.ok(Number.isInteger(hint) && hint >= 0 && hint <= 1000, `client ${i}: reconnect_after_ms ${hint}`);
    const waited = second.createdAt - first.closedAt;
    // A few ms of slack: timers count from the event loop's cached clock.
    assert.ok(waited >= hint - 15, `client ${i} came back ${waited.toFixed(1)} ms after the close, asked to wait ${hint} ms`);
    return hint;
  });
  assert.ok(Math.max(...hints) >= 100, `hints ${hints}: too small to tell a wait from none`);
});
