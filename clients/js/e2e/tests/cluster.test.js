// A browser page on a real cluster (nats-server with JetStream, presence,
// router, three edges) in a durable room: when its edge is killed
// (SIGKILL) while messages are being published, the page moves to another
// edge and shows exactly the messages it missed, each once, in order; and a
// publish made while the page has no edge at all goes out once it is back.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { launch, newPage } from "../support/browser.js";
import { startCluster, token } from "../support/herald.js";
import { showingLogs, stopAll } from "../support/processes.js";
import { servePages } from "../support/pages.js";

let cluster;
let pages;
let browser;

before(async () => {
  cluster = await startCluster({ edges: 3 });
  pages = await servePages();
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await pages?.close();
  await stopAll();
  cluster?.cleanup();
});

/** A page of the test site, connected as `user` to `edges` (tried in order), in `room`. */
async function openClient(user, edges, room) {
  const context = await browser.newContext();
  const page = await newPage(context, user);
  const q = new URLSearchParams({ edges: edges.map((e) => e.ws).join(","), token: token(user), room });
  await page.goto(`${pages.url}/cluster.html?${q}`);
  await page.waitForFunction(() => document.body.dataset.ready || document.body.dataset.failed);
  const failed = await page.evaluate(() => document.body.dataset.failed);
  assert.equal(failed, undefined, `${user} could not connect and join ${room}`);
  return page;
}

const received = (page) => page.evaluate(() => window.received.map((m) => m.data));
const offsets = (page) => page.evaluate(() => window.received.map((m) => m.offset));
const shown = (page) => page.$$eval("#messages li", (lis) => lis.map((li) => JSON.parse(li.textContent)));

async function publish(page, data) {
  return page.evaluate((d) => window.room.publish(d), data);
}

async function waitForCount(page, n) {
  try {
    await page.waitForFunction((n) => window.received.length >= n, n, { timeout: 30_000 });
  } catch (e) {
    const got = await received(page).catch(() => "(page gone)");
    throw new Error(`${e.message}\nwaited for ${n} messages, got ${JSON.stringify(got)}`);
  }
}

test("a page whose edge is killed shows the durable messages it missed, each once, in order", () => showingLogs(async () => {
  const [a, b] = cluster.edges;
  const room = "doc:failover";
  const reader = await openClient("reader", cluster.edges, room);
  assert.deepEqual(await reader.evaluate(() => window.nodes), [a.node]);
  const writer = await openClient("writer", [b], room);

  const TOTAL = 40;
  for (let n = 1; n <= 10; n++) await publish(writer, { n });
  await waitForCount(reader, 10);

  // The reader's script is paused (as a debugger would pause it) while
  // edge A dies and messages 11 to 30 are published and stored: none of
  // them can reach it live, so every one must come back through its rejoin
  // on another edge. Then it resumes, and publishing goes on.
  const cdp = await reader.context().newCDPSession(reader);
  await cdp.send("Debugger.enable");
  const paused = new Promise((r) => cdp.once("Debugger.paused", r));
  await cdp.send("Debugger.pause");
  await a.proc.kill();
  // The page pauses as soon as its script runs: at the socket's close.
  await paused;
  for (let n = 11; n <= 30; n++) await publish(writer, { n });
  await cdp.send("Debugger.resume");
  await cdp.send("Debugger.disable");
  for (let n = 31; n <= TOTAL; n++) await publish(writer, { n });
  await waitForCount(reader, TOTAL);
  // A marker published last: once it is shown, no repeat can still be on its way.
  await publish(writer, { n: "end" });
  await waitForCount(reader, TOTAL + 1);

  const expected = [...Array(TOTAL).keys()].map((i) => ({ n: i + 1 })).concat([{ n: "end" }]);
  assert.deepEqual(await received(reader), expected);
  assert.deepEqual(await shown(reader), expected);
  const offs = await offsets(reader);
  assert.ok(offs.every((o, i) => i === 0 || o > offs[i - 1]), `offsets not rising: ${offs}`);
  const nodes = await reader.evaluate(() => window.nodes);
  assert.equal(nodes[0], a.node);
  assert.ok(nodes.length >= 2 && nodes.slice(1).every((n) => n !== a.node), `reconnected to ${nodes}`);
  assert.ok((await reader.evaluate(() => window.disconnects.length)) >= 1, "the reader never saw its edge go");
  assert.deepEqual([...reader.problems, ...writer.problems], []);
}));

test("a publish made while the page has no edge goes out once it is back", () => showingLogs(async () => {
  // Edge C is the page's only edge: killed, the page has nowhere to go
  // until C comes back on the same address.
  const [, b, c] = cluster.edges;
  const room = "doc:offline";
  const page = await openClient("roamer", [c], room);
  const other = await openClient("stayer", [b], room);

  await c.proc.kill();
  await page.waitForFunction(() => window.disconnects.length >= 1);
  assert.equal(await page.evaluate(() => window.herald.state === "connected"), false);
  // Sent while offline: the SDK queues it.
  await page.evaluate(() => {
    window.offlineAck = window.room.publish({ n: "sent offline" });
  });

  await c.restart();

  const ack = await page.evaluate(() => window.offlineAck);
  assert.ok(ack.offset > 0, `the queued publish was not stored: ${JSON.stringify(ack)}`);
  await publish(other, { n: "end" });
  for (const p of [page, other]) {
    await p.waitForFunction(() => window.received.some((m) => m.data.n === "end"), null, { timeout: 30_000 });
    assert.deepEqual(await received(p), [{ n: "sent offline" }, { n: "end" }]);
  }
  assert.equal((await page.evaluate(() => window.nodes)).length, 2);
  // The page's failed attempts to reach the dead edge are expected.
  const refused = /WebSocket connection to .* failed/;
  assert.deepEqual([...page.problems, ...other.problems].filter((p) => !refused.test(p)), []);
}));
