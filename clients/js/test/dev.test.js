// The SDK against a real `herald dev`: round trips of every request, typed
// errors, timeouts, token refresh, the personal room, how closes are obeyed,
// and (through a TCP proxy that cuts, refuses or freezes connections)
// reconnects that rejoin from the last offset, the offline queue, and a dead
// connection noticed by the client's own pings.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";

import { Herald, HeraldError } from "../dist/herald.js";
import { startDev, eventually } from "./support/servers.js";
import { Proxy } from "./support/proxy.js";
import { token, tokenWith } from "./support/tokens.js";
import * as grpc from "./support/grpc.js";
import { collect, nextEvent } from "./support/events.js";

let dev;
const clients = [];
const proxies = [];

/** A connected client for `user` (closed after the tests). */
async function client(user, opts = {}, url = dev.url) {
  const h = new Herald(url, { token: token(user), ...opts });
  clients.push(h);
  await h.connect();
  return h;
}

async function proxy() {
  const p = await Proxy.start(dev.http);
  proxies.push(p);
  return p;
}

/** Rejects with a HeraldError of `code`; returns it. */
async function refused(promise, code) {
  const err = await promise.then(
    (v) => assert.fail(`expected ${code}, got ${JSON.stringify(v)}`),
    (e) => e,
  );
  assert.ok(err instanceof HeraldError, `not a HeraldError: ${err}`);
  assert.equal(err.code, code, err.message);
  assert.ok(err.message.length > 0);
  return err;
}

before(async () => {
  dev = await startDev({ args: ["--heartbeat", "2s"] });
});

after(async (t) => {
  for (const h of clients) h.close();
  for (const p of proxies) await p.stop();
  await dev?.stop();
});

test("join, publish, receive, presence, setMeta, history: round trips between two users", async () => {
  const alice = await client("alice");
  const bob = await client("bob");
  assert.equal(alice.state, "connected");
  assert.equal(alice.user, "alice");
  assert.ok(alice.conn && alice.node);
  const ra = alice.room("doc:round");
  assert.equal(alice.room("doc:round"), ra, "one Room object per name");
  const rb = bob.room("doc:round");
  const gotA = collect(ra);
  const presenceA = [];
  ra.on("presence", (p) => presenceA.push(p));

  const joined = await ra.join({ meta: { name: "Alice" } });
  assert.ok(joined.epoch.length > 0);
  assert.equal(ra.joined, true);
  const bobJoin = nextEvent(ra, "presence", (p) => p.user === "bob" && p.event === "join");
  await rb.join({ meta: { name: "Bob" } });
  assert.deepEqual((await bobJoin).meta, { name: "Bob" });

  const p1 = await rb.publish({ text: "one" });
  const p2 = await rb.publish({ text: "two" });
  assert.equal(p1.epoch, joined.epoch);
  assert.ok(p2.offset > p1.offset);
  await gotA.count(2);
  assert.deepEqual(gotA.map((m) => m.data.text), ["one", "two"]);
  assert.deepEqual(gotA.map((m) => m.offset), [p1.offset, p2.offset]);
  assert.equal(gotA[0].from, "bob");
  assert.equal(gotA[0].room, "doc:round");
  assert.equal(gotA[1].prev, p1.offset);
  assert.equal(typeof gotA[0].ts, "number");
  assert.deepEqual(ra.position, { epoch: p2.epoch, offset: p2.offset });

  const members = await ra.presence();
  assert.deepEqual(members.map((m) => m.user).sort(), ["alice", "bob"]);
  assert.deepEqual(members.find((m) => m.user === "bob").meta, { name: "Bob" });

  const update = nextEvent(ra, "presence", (p) => p.event === "update" && p.user === "bob");
  await rb.setMeta({ name: "Robert" });
  assert.deepEqual((await update).meta, { name: "Robert" });

  const h = await ra.history({ since: { epoch: p1.epoch, offset: 0 } });
  assert.equal(h.epoch, p1.epoch);
  assert.deepEqual(h.messages.map((m) => m.data.text), ["one", "two"]);
  assert.equal(h.messages[0].op, undefined);
  const later = await ra.history({ since: { epoch: p1.epoch, offset: p1.offset }, limit: 10 });
  assert.deepEqual(later.messages.map((m) => m.offset), [p2.offset]);

  const left = nextEvent(ra, "presence", (p) => p.event === "leave" && p.user === "bob");
  await rb.leave();
  assert.equal(rb.joined, false);
  await left;
  await rb.publish("after leaving");
  await gotA.count(3);
  assert.equal(gotA[2].data, "after leaving");
  assert.ok(presenceA.some((p) => p.user === "alice" && p.event === "join"), "a member sees its own join");
});

test("ephemeral rooms: messages without positions, publish answered without an offset", async () => {
  const a = await client("eph-a");
  const b = await client("eph-b");
  const got = collect(a.room("chat:eph"));
  const r = await a.room("chat:eph").join();
  assert.deepEqual(r, { epoch: "", offset: 0, recovered: false, missed: 0 });
  assert.deepEqual(await b.room("chat:eph").publish("hello"), { epoch: "", offset: 0 });
  await got.count(1);
  assert.equal(got[0].data, "hello");
  assert.equal(got[0].offset, undefined);
  assert.equal(a.room("chat:eph").position, undefined);
});

test("typed errors: forbidden, not_found, bad_request, rate_limited with retryAfterMs", async () => {
  const h = await client("carol");
  // Clients may not publish in `news`.
  await refused(h.room("news:today").publish("x"), "forbidden");
  // Another user's personal room.
  await refused(h.room("user:dave").join(), "forbidden");
  // The own personal room cannot be left.
  await refused(h.personal.leave(), "forbidden");
  // A namespace the configuration does not list.
  await refused(h.room("nope:x").join(), "not_found");
  // History belongs to durable rooms.
  await refused(h.room("chat:x").history(), "not_found");
  // Not a room name.
  await refused(h.room("no namespace").presence(), "bad_request");
  // `tight` allows a burst of 2 publishes per connection.
  const room = h.room("tight:x");
  const results = await Promise.allSettled([1, 2, 3, 4].map((n) => room.publish(n)));
  const limited = results.filter((r) => r.status === "rejected").map((r) => r.reason);
  assert.ok(limited.length >= 1, "the burst was not limited");
  for (const e of limited) {
    assert.ok(e instanceof HeraldError);
    assert.equal(e.code, "rate_limited");
    assert.ok(e.retryAfterMs > 0, `retryAfterMs ${e.retryAfterMs}`);
  }
  // A refused join leaves the room unjoined, and the connection is fine.
  assert.equal(h.room("nope:x").joined, false);
  assert.equal(h.state, "connected");
});

test("a request with no answer fails with timeout after requestTimeoutMs", async () => {
  const p = await proxy();
  const h = await client("slow", { requestTimeoutMs: 400 }, p.url);
  await h.room("doc:t").join();
  p.refuse();
  p.freeze();
  // Both sent at once, on a connection that answers nothing (and is not
  // declared dead before 0.8 s of silence at a 2 s heartbeat).
  const started = Date.now();
  const presence = refused(h.room("doc:t").presence(), "timeout");
  const publish = refused(h.room("doc:t").publish("lost?"), "timeout");
  await presence;
  const took = Date.now() - started;
  assert.ok(took >= 390 && took < 3000, `timed out after ${took} ms`);
  await publish;
});

test("a dead connection is noticed by the client's pings within about one heartbeat, then it reconnects", async () => {
  const p = await proxy();
  const h = await client("frozen", {}, p.url);
  assert.equal(h.state, "connected");
  const first = h.conn;
  const gone = nextEvent(h, "disconnected");
  const back = nextEvent(h, "connected");
  const frozenAt = Date.now();
  p.freeze();
  const d = await gone;
  const took = Date.now() - frozenAt;
  // Heartbeat 2 s: a ping after 0.8 s of silence, given up 1 s later; the
  // liveness check runs every 0.2 s, so at worst 2.2 s after the last frame.
  // The promise is "within the heartbeat": at most 1.5 of it, the rest is
  // slack for a loaded machine.
  assert.ok(took <= 3000, `noticed after ${took} ms`);
  assert.equal(d.willReconnect, true);
  const c = await back;
  assert.notEqual(c.conn, first);
  assert.equal(h.state, "connected");
});

test("reconnect: rooms are rejoined from the last offset; every message once, in order; meta kept", async () => {
  const p = await proxy();
  const alice = await client("rejoin-a", { reconnect: { initialDelayMs: 50, maxDelayMs: 200 } }, p.url);
  const bob = await client("rejoin-b");
  const room = alice.room("doc:rejoin");
  const got = collect(room);
  await room.join({ meta: { color: "red" } });
  const pub = bob.room("doc:rejoin");
  for (let i = 0; i < 5; i++) await pub.publish(i);
  await got.count(5);

  const rejoined = nextEvent(room, "rejoined");
  const disconnected = nextEvent(alice, "disconnected");
  p.refuse();
  p.cut();
  assert.equal((await disconnected).willReconnect, true);
  assert.equal(alice.state, "reconnecting");
  // Published while alice is away.
  for (let i = 5; i < 15; i++) await pub.publish(i);
  p.allow();
  const r = await rejoined;
  assert.equal(r.recovered, true);
  assert.equal(r.missed, 10);
  for (let i = 15; i < 20; i++) await pub.publish(i);
  await got.count(20);
  await new Promise((res) => setTimeout(res, 200)); // nothing more may come
  assert.deepEqual(got.map((m) => m.data), [...Array(20).keys()]);
  const offsets = got.map((m) => m.offset);
  assert.deepEqual(offsets, [...offsets].sort((a, b) => a - b));
  assert.equal(new Set(offsets).size, 20);
  // The presence meta came back with the rejoin.
  const members = await pub.presence();
  assert.deepEqual(members.find((m) => m.user === "rejoin-a")?.meta, { color: "red" });
});

test("recovered: false is reported when history no longer reaches back", async () => {
  const h = await client("recover");
  const room = h.room("doc:recover");
  await room.publish("x");
  const r = await room.join({ since: { epoch: "an-old-epoch", offset: 3 } });
  assert.equal(r.recovered, false);
  assert.equal(r.missed, 0);
  assert.notEqual(r.epoch, "an-old-epoch");
  assert.deepEqual(room.position, { epoch: r.epoch, offset: r.offset });
});

test("offline queue: publishes made offline go out once after reconnect; beyond its size, queue_full", async () => {
  const p = await proxy();
  const watcher = await client("queue-w");
  const seen = collect(watcher.room("doc:queue"));
  await watcher.room("doc:queue").join();

  // Never connected yet: the queue fills, the overflow fails at once.
  const h = new Herald(p.url, { token: token("queue-p"), offlineQueueSize: 3, reconnect: { initialDelayMs: 50, maxDelayMs: 200 } });
  clients.push(h);
  const room = h.room("doc:queue");
  const queued = [0, 1, 2].map((n) => room.publish({ n }));
  await refused(room.publish({ n: 3 }), "queue_full");
  await h.connect();
  const acks = await Promise.all(queued);
  await seen.count(3);
  assert.deepEqual(seen.map((m) => m.data.n), [0, 1, 2]);
  assert.deepEqual(acks.map((a) => a.offset), seen.map((m) => m.offset));

  // Connected, then cut off: publishes made while offline wait for the next connection.
  p.refuse();
  const gone = nextEvent(h, "disconnected");
  p.cut();
  await gone;
  const later = [3, 4].map((n) => room.publish({ n }));
  await new Promise((res) => setTimeout(res, 300));
  assert.equal(seen.length, 3, "nothing went out while offline");
  p.allow();
  await Promise.all(later);
  await seen.count(5);
  await new Promise((res) => setTimeout(res, 200));
  assert.deepEqual(seen.map((m) => m.data.n), [0, 1, 2, 3, 4]);
});

test("watch: status now, then transitions; after a reconnect, watched again and told what changed meanwhile", async () => {
  const p = await proxy();
  const watching = { token: tokenWith({ sub: "watch-a", watch: ["watch-*"] }), reconnect: { initialDelayMs: 50, maxDelayMs: 200 } };
  const alice = new Herald(p.url, watching);
  clients.push(alice);
  await alice.connect();
  await refused((await client("watch-nobody")).watch(["watch-b"]), "forbidden");
  assert.deepEqual(await alice.watch(["watch-b", "watch-c"]), { "watch-b": false, "watch-c": false });
  const statuses = [];
  alice.on("status", (s) => statuses.push(s));
  const bOnline = nextEvent(alice, "status");
  await client("watch-b");
  assert.deepEqual(await bOnline, { user: "watch-b", online: true });

  // An observer on a connection that stays up sees c come online while alice is away.
  const observer = new Herald(dev.url, { token: tokenWith({ sub: "watch-o", watch: ["watch-c"] }) });
  clients.push(observer);
  await observer.connect();
  await observer.watch(["watch-c"]);
  p.refuse();
  const gone = nextEvent(alice, "disconnected");
  p.cut();
  await gone;
  const cOnline = nextEvent(observer, "status");
  await client("watch-c");
  await cOnline;
  const told = nextEvent(alice, "status");
  p.allow();
  assert.deepEqual(await told, { user: "watch-c", online: true });
  await new Promise((res) => setTimeout(res, 200)); // nothing more may come
  assert.deepEqual(statuses, [{ user: "watch-b", online: true }, { user: "watch-c", online: true }]);
});

test("publish with echo: false does not come back to its connection; the user's other device gets it", async () => {
  const phone = await client("echo-a");
  const laptop = await client("echo-a");
  const phoneGot = collect(phone.room("chat:echo"));
  const laptopGot = collect(laptop.room("chat:echo"));
  await phone.room("chat:echo").join();
  await laptop.room("chat:echo").join();
  await phone.room("chat:echo").publish("quiet", { echo: false });
  await phone.room("chat:echo").publish("loud");
  await laptopGot.count(2);
  await phoneGot.count(1);
  await new Promise((res) => setTimeout(res, 200)); // nothing more may come
  assert.deepEqual(laptopGot.map((m) => m.data), ["quiet", "loud"]);
  assert.deepEqual(phoneGot.map((m) => m.data), ["loud"]);
});

test("a publish in flight when the connection dies is sent again with its key and stored once", async () => {
  const p = await proxy();
  const watcher = await client("inflight-w");
  const seen = collect(watcher.room("doc:inflight"));
  await watcher.room("doc:inflight").join();
  const h = await client("inflight-p", { reconnect: { initialDelayMs: 50, maxDelayMs: 200 } }, p.url);
  const room = h.room("doc:inflight");
  // Sent and stored, but its answer is lost with the connection: the retry
  // carries the same key, so the room does not store it twice.
  p.mute();
  const pending = room.publish({ n: "once" }, { key: "fixed-key-1" });
  await seen.count(1);
  p.cut();
  const ack = await pending;
  assert.equal(ack.offset, seen[0].offset);
  await room.publish({ n: "after" });
  await seen.count(2);
  await new Promise((res) => setTimeout(res, 200));
  assert.deepEqual(seen.map((m) => m.data.n), ["once", "after"]);
});

test("markRead: read events reach the user's other devices; unread counts follow messages and markers", async () => {
  const pub = await client("reader-pub");
  const a1 = await client("reader");
  const a2 = await client("reader");
  const room = "doc:unread";
  await a1.room(room).join();
  await a2.room(room).join();
  const acks = [];
  for (let i = 0; i < 3; i++) acks.push(await pub.room(room).publish(i));
  const readOn2 = nextEvent(a2.room(room), "read");
  const personalRead = nextEvent(a2.personal, "read");
  const r = await a1.room(room).markRead(acks[1].offset);
  assert.deepEqual(r, { offset: acks[1].offset, unread: 1 });
  assert.equal(a1.unread(room), 1);
  assert.deepEqual(await readOn2, { room, offset: acks[1].offset, unread: 1 });
  assert.equal((await personalRead).room, room);
  assert.equal(a2.unread(room), 1);

  // A new device learns the count from `connected`, and new messages add to it.
  const a3 = await client("reader");
  assert.equal(a3.unread(room), 1);
  const got = collect(a3.room(room));
  await a3.room(room).join();
  await pub.room(room).publish(3);
  await got.count(1);
  assert.equal(a3.unread(room), 2);
  // Markers only move forward.
  const back = await a3.room(room).markRead(acks[0].offset);
  assert.equal(back.offset, acks[1].offset);
});

test("unread after a reconnect: rooms without a read marker keep their count and add what the rejoin recovered", async () => {
  const p = await proxy();
  const h = await client("unread-rc", { reconnect: { initialDelayMs: 50, maxDelayMs: 200 } }, p.url);
  const pub = await client("unread-rc-pub");
  // `nomark`: never marked read, so `connected.unread` does not list it.
  // `marked`: has a marker, so `connected.unread` gives its count.
  const nomark = "doc:unread-rc-nomark";
  const marked = "doc:unread-rc-marked";
  const gotNomark = collect(h.room(nomark));
  const gotMarked = collect(h.room(marked));
  await h.room(nomark).join();
  await h.room(marked).join();
  for (let i = 0; i < 3; i++) await pub.room(nomark).publish(i);
  const acks = [];
  for (let i = 0; i < 3; i++) acks.push(await pub.room(marked).publish(i));
  await Promise.all([gotNomark.count(3), gotMarked.count(3)]);
  await h.room(marked).markRead(acks[0].offset);
  assert.equal(h.unread(nomark), 3);
  assert.equal(h.unread(marked), 2);

  const rejoinedNomark = nextEvent(h.room(nomark), "rejoined");
  const rejoinedMarked = nextEvent(h.room(marked), "rejoined");
  const gone = nextEvent(h, "disconnected");
  p.refuse();
  p.cut();
  await gone;
  // Published while away: recovered by the rejoins.
  for (let i = 3; i < 5; i++) await pub.room(nomark).publish(i);
  for (let i = 3; i < 5; i++) await pub.room(marked).publish(i);
  const back = nextEvent(h, "connected");
  p.allow();
  const c = await back;
  assert.equal(c.unread[nomark], undefined, "no marker, no count from the server");
  assert.equal(c.unread[marked], 4);
  assert.equal((await rejoinedNomark).missed, 2);
  assert.equal((await rejoinedMarked).missed, 2);
  await Promise.all([gotNomark.count(5), gotMarked.count(5)]);
  await h.room(marked).presence(); // a round trip: the replays came before its answer
  // 3 before the reconnect, 2 recovered by the rejoin.
  assert.equal(h.unread(nomark), 5);
  // The server's count already holds the 2 replayed: they are not counted again.
  assert.equal(h.unread(marked), 4);
  // And new messages still add to both.
  await pub.room(nomark).publish(5);
  await pub.room(marked).publish(5);
  await Promise.all([gotNomark.count(6), gotMarked.count(6)]);
  assert.equal(h.unread(nomark), 6);
  assert.equal(h.unread(marked), 5);
});

test("personal room: inbox messages arrive, count as unread, and are not repeated after a reconnect", async () => {
  await grpc.sendToUser(dev.grpc, "inbox", { n: 1 });
  await grpc.sendToUser(dev.grpc, "inbox", { n: 2 });
  const p = await proxy();
  const h = new Herald(p.url, { token: token("inbox"), reconnect: { initialDelayMs: 50, maxDelayMs: 200 } });
  clients.push(h);
  // Listen before connecting (the personal room is `user:<sub>`): the inbox comes right after `connected`.
  const got = collect(h.room("user:inbox"));
  const c = await h.connect();
  assert.equal(c.unread["user:inbox"], 2);
  assert.equal(h.personal, h.room("user:inbox"));
  await got.count(2);
  assert.deepEqual(got.map((m) => m.data.n), [1, 2]);
  assert.equal(got[0].from, "server");
  assert.equal(h.unread("user:inbox"), 2, "the inbox replay is what `connected` counted");

  await grpc.sendToUser(dev.grpc, "inbox", { n: 3 });
  await got.count(3);
  await eventually("unread 3", () => h.unread("user:inbox") === 3);

  // After a reconnect the server replays the inbox after the read marker; none of it is new.
  const back = nextEvent(h, "connected");
  p.cut();
  await back;
  await h.personal.presence().catch(() => {}); // a round trip: the replay came before its answer
  await new Promise((res) => setTimeout(res, 200));
  assert.deepEqual(got.map((m) => m.data.n), [1, 2, 3], "repeated after the reconnect");
  assert.equal(h.unread("user:inbox"), 3);
  const r = await h.personal.markRead(h.personal.position.offset);
  assert.equal(r.unread, 0);
  assert.equal(h.unread("user:inbox"), 0);
});

test("token refresh: getToken is called before exp and the same connection lives on", async () => {
  let calls = 0;
  const h = new Herald(dev.url, {
    getToken: () => {
      calls++;
      return token("refresher", 3);
    },
  });
  clients.push(h);
  const c = await h.connect();
  const firstExp = c.expires_at;
  const lost = [];
  h.on("disconnected", (d) => lost.push(d));
  // Past the first token's expiry, with room to spare.
  await eventually("a refresh moved expiresAt", () => h.expiresAt > firstExp, 10_000);
  await new Promise((res) => setTimeout(res, (firstExp + 1) * 1000 - Date.now()));
  assert.equal(h.conn, c.conn);
  assert.equal(h.state, "connected");
  assert.deepEqual(lost, []);
  assert.ok(calls >= 2, `getToken called ${calls} times`);
  await h.room("doc:refresh").join();
});

test("without getToken the session ends at exp: no reconnect, token_expired reported", async () => {
  const h = new Herald(dev.url, { token: token("expiring", 2) });
  clients.push(h);
  const errors = [];
  h.on("error", (e) => errors.push(e));
  await h.connect();
  const d = await nextEvent(h, "disconnected", () => true, 10_000);
  assert.equal(d.code, 4001);
  assert.equal(d.willReconnect, false);
  assert.equal(h.state, "closed");
  assert.ok(errors.some((e) => e.code === "token_expired"), JSON.stringify(errors.map((e) => e.code)));
  await refused(h.room("doc:x").presence(), "closed");
});

test("a refused token fails connect() with unauthorized and does not retry", async () => {
  const h = new Herald(dev.url, { token: tokenWith({ sub: "mallory" }, "not-the-secret") });
  clients.push(h);
  const err = await refused(h.connect(), "unauthorized");
  assert.match(err.message, /./);
  assert.equal(h.state, "closed");
});

test("closes from the server: 4003 ends the client, 1012 and a backend's 4xxx with reconnect bring it back", async () => {
  const a = await client("kicked", { reconnect: { initialDelayMs: 50, maxDelayMs: 200 } });
  const b = await client("restarted", { reconnect: { initialDelayMs: 50, maxDelayMs: 200 } });
  const c = await client("bounced", { reconnect: { initialDelayMs: 50, maxDelayMs: 200 } });

  const gone = nextEvent(a, "disconnected");
  await grpc.disconnect(dev.grpc, { user: "kicked", code: 4003, reason: "banned" });
  const d = await gone;
  assert.deepEqual(d, { code: 4003, reason: "banned", willReconnect: false });
  assert.equal(a.state, "closed");

  const backB = nextEvent(b, "connected");
  const goneB = nextEvent(b, "disconnected");
  await grpc.disconnect(dev.grpc, { user: "restarted", code: 1012, reason: "restart" });
  assert.equal((await goneB).willReconnect, true);
  await backB;
  assert.equal(b.state, "connected");

  const backC = nextEvent(c, "connected");
  await grpc.disconnect(dev.grpc, { user: "bounced", code: 4500, reason: "moved", reconnect: true });
  await backC;
  assert.equal(c.state, "connected");
});

test("4001: a client with getToken comes back with a new token; one with a fixed token stops", async () => {
  let calls = 0;
  const renewing = new Herald(dev.url, {
    getToken: () => {
      calls++;
      return token("renewing");
    },
    reconnect: { initialDelayMs: 50, maxDelayMs: 200 },
  });
  clients.push(renewing);
  await renewing.connect();
  const fixed = await client("fixed-token", { reconnect: { initialDelayMs: 50, maxDelayMs: 200 } });

  const gone = nextEvent(renewing, "disconnected");
  const back = nextEvent(renewing, "connected");
  await grpc.disconnect(dev.grpc, { user: "renewing", code: 4001, reason: "token revoked" });
  assert.deepEqual(await gone, { code: 4001, reason: "token revoked", willReconnect: true });
  await back;
  assert.equal(calls, 2);

  const stopped = nextEvent(fixed, "disconnected");
  await grpc.disconnect(dev.grpc, { user: "fixed-token", code: 4001, reason: "token revoked" });
  assert.equal((await stopped).willReconnect, false);
  assert.equal(fixed.state, "closed");
});

test("close(): no reconnect, pending work fails with closed", async () => {
  const p = await proxy();
  const h = await client("closer", {}, p.url);
  p.freeze();
  const pending = h.room("doc:c").presence();
  const events = [];
  h.on("disconnected", (d) => events.push(d));
  h.close();
  await refused(pending, "closed");
  assert.equal(h.state, "closed");
  assert.deepEqual(events, [{ code: 1000, reason: "closed by the client", willReconnect: false }]);
  await refused(h.room("doc:c").publish(1), "closed");
  await refused(h.connect(), "closed");
});
