// Unit tests of the client's pure logic (no sockets): backoff bounds and
// jitter, repeat detection by offset, the offline queue's bound, and how
// error frames and closes are read. They import build/, tsc's per-module
// output of src/ (`npm run build` makes it).

import { test } from "node:test";
import assert from "node:assert/strict";

import { backoffDelay, reconnectDelay, DEFAULT_BACKOFF } from "../build/backoff.js";
import { admit, afterJoin } from "../build/positions.js";
import { BoundedQueue } from "../build/queue.js";
import { closeDecision, errorParts, isRetryable } from "../build/policy.js";
import { newKey } from "../build/keys.js";
import { HeraldError } from "../dist/herald.js";

test("backoff: each attempt's delay lies in [0, min(max, initial * 2^attempt))", () => {
  const opts = { initialDelayMs: 500, maxDelayMs: 15_000 };
  for (let attempt = 0; attempt < 12; attempt++) {
    const cap = Math.min(15_000, 500 * 2 ** attempt);
    assert.equal(backoffDelay(attempt, opts, () => 0), 0);
    // The largest random() can return is just under 1.
    assert.equal(backoffDelay(attempt, opts, () => 0.999999), Math.floor(0.999999 * cap));
    for (let i = 0; i < 200; i++) {
      const d = backoffDelay(attempt, opts);
      assert.ok(d >= 0 && d < cap, `attempt ${attempt}: ${d} outside [0, ${cap})`);
    }
  }
  // No overflow to Infinity or NaN for absurd attempt counts.
  assert.equal(backoffDelay(10_000, opts, () => 0.5), 7500);
  assert.deepEqual(DEFAULT_BACKOFF, { initialDelayMs: 500, maxDelayMs: 15_000 });
});

test("backoff: full jitter spreads clients over the whole window", () => {
  const opts = { initialDelayMs: 1000, maxDelayMs: 1000 };
  const buckets = new Array(10).fill(0);
  for (let i = 0; i < 5000; i++) buckets[Math.floor(backoffDelay(3, opts) / 100)]++;
  // Uniform: every tenth of the window gets about 500; none is empty or crowded.
  for (const n of buckets) assert.ok(n > 350 && n < 650, `buckets ${buckets}`);
});

test("backoff: the server's reconnect_after_ms is a floor, not replaced by a shorter jitter", () => {
  const opts = { initialDelayMs: 500, maxDelayMs: 15_000 };
  assert.equal(reconnectDelay(0, 3000, opts, () => 0.5), 3000);
  assert.equal(reconnectDelay(5, 3000, opts, () => 0.5), 7500); // capped at 15 s
  assert.equal(reconnectDelay(0, undefined, opts, () => 0.5), 250);
});

test("positions: repeats and older offsets are dropped, later ones pass, in order", () => {
  let pos;
  const delivered = [];
  // A replay overlapping what was seen, then live messages.
  for (const off of [3, 5, 5, 4, 8, 3, 9, 9, 12]) {
    const r = admit(pos, "e1", off);
    if (r.deliver) delivered.push(off);
    pos = r.next;
  }
  assert.deepEqual(delivered, [3, 5, 8, 9, 12]);
  assert.deepEqual(pos, { epoch: "e1", offset: 12 });
});

test("positions: a new epoch starts over (its offsets are unrelated)", () => {
  const r = admit({ epoch: "old", offset: 100 }, "new", 2);
  assert.equal(r.deliver, true);
  assert.deepEqual(r.next, { epoch: "new", offset: 2 });
});

test("positions: a join answer moves the position forward only, and resets it on a new epoch", () => {
  assert.deepEqual(afterJoin(undefined, "e", 7), { epoch: "e", offset: 7 });
  assert.deepEqual(afterJoin({ epoch: "e", offset: 9 }, "e", 7), { epoch: "e", offset: 9 });
  assert.deepEqual(afterJoin({ epoch: "e", offset: 3 }, "e", 7), { epoch: "e", offset: 7 });
  assert.deepEqual(afterJoin({ epoch: "e", offset: 30 }, "f", 7), { epoch: "f", offset: 7 });
  // Ephemeral rooms have no positions.
  assert.equal(afterJoin(undefined, "", 0), undefined);
});

test("queue: holds at most its capacity; taken-back items go first, past the bound", () => {
  const q = new BoundedQueue(3);
  assert.ok(q.push("a") && q.push("b") && q.push("c"));
  assert.equal(q.push("d"), false);
  assert.equal(q.length, 3);
  q.requeueFront(["x", "y"]);
  assert.equal(q.length, 5);
  assert.equal(q.push("e"), false);
  assert.ok(q.remove("b"));
  assert.equal(q.remove("zz"), false);
  assert.deepEqual(q.drain(), ["x", "y", "a", "c"]);
  assert.equal(q.length, 0);
  assert.ok(q.push("f"));
});

test("errors: error frames become code, message and retryAfterMs", () => {
  assert.deepEqual(errorParts({ op: "error", id: 3, code: "rate_limited", message: "slow down", retry_after_ms: 250 }), {
    code: "rate_limited",
    message: "slow down",
    retryAfterMs: 250,
  });
  assert.deepEqual(errorParts({ op: "error", code: "forbidden", message: "no" }), { code: "forbidden", message: "no" });
  // A frame missing its parts still yields something to show.
  assert.deepEqual(errorParts({ op: "error" }), { code: "internal", message: "the server answered internal" });
  for (const c of ["rate_limited", "unavailable", "outcome_unknown", "internal", "timeout"]) assert.ok(isRetryable(c), c);
  for (const c of ["bad_request", "forbidden", "not_found", "too_large", "unauthorized", "queue_full", "closed"]) {
    assert.equal(isRetryable(c), false, c);
  }
  const e = new HeraldError("rate_limited", "slow down", 250);
  assert.ok(e instanceof Error);
  assert.equal(e.name, "HeraldError");
  assert.equal(e.code, "rate_limited");
  assert.equal(e.retryAfterMs, 250);
  assert.equal(new HeraldError("timeout", "late").retryAfterMs, undefined);
});

test("closes: the disconnect frame decides, 4001 only with getToken, network drops reconnect", () => {
  const frame = (code, reconnect, after) => ({ code, reason: "r", reconnect, reconnect_after_ms: after });
  // A killed edge or a network drop: no frame, 1006.
  assert.deepEqual(closeDecision(1006, undefined, false), { reconnect: true, auth: false });
  // Draining edge: reconnect after its hint.
  assert.deepEqual(closeDecision(1012, frame(1012, true, 1500), false), { reconnect: true, delayMs: 1500, auth: false });
  assert.deepEqual(closeDecision(4010, frame(4010, true), false), { reconnect: true, auth: false });
  // Forbidden, policy, normal close: no reconnect.
  for (const c of [4003, 1008, 1000]) {
    assert.equal(closeDecision(c, frame(c, false), true).reconnect, false, String(c));
    assert.equal(closeDecision(c, undefined, true).reconnect, false, String(c));
  }
  // Protocol errors come without a frame and are final.
  assert.equal(closeDecision(1002, undefined, true).reconnect, false);
  assert.equal(closeDecision(1009, undefined, true).reconnect, false);
  // Expired or refused token: only a client that can get a new one comes back.
  assert.deepEqual(closeDecision(4001, frame(4001, false), false), { reconnect: false, auth: true });
  assert.deepEqual(closeDecision(4001, frame(4001, false), true), { reconnect: true, auth: true });
  // A backend's own code follows its frame's reconnect.
  assert.equal(closeDecision(4403, frame(4403, false), true).reconnect, false);
  assert.equal(closeDecision(4500, frame(4500, true), true).reconnect, true);
  assert.equal(closeDecision(4403, undefined, true).reconnect, false);
  assert.equal(closeDecision(4009, undefined, false).reconnect, true);
  assert.equal(closeDecision(1011, undefined, false).reconnect, true);
});

test("keys: 32 hex digits, different every time", () => {
  const seen = new Set();
  for (let i = 0; i < 1000; i++) {
    const k = newKey();
    assert.match(k, /^[0-9a-f]{32}$/);
    seen.add(k);
  }
  assert.equal(seen.size, 1000);
});
