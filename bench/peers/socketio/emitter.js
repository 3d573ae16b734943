// The publisher of the comparison peer: emits event `msg` to a room through
// the Redis emitter (@socket.io/redis-emitter) at a fixed rate for a given
// time, like a backend service publishing through Herald's gRPC API.
//
//   node emitter.js --room bench --rate 1000 --duration 5 [--size 64]
//
// Options (or environment variables):
//   --room R        room to emit to (ROOM, default "bench")
//   --rate N        messages per second (RATE, default 100)
//   --duration S    seconds, fractions allowed (DURATION, default 1)
//   --size B        bytes of padding in each payload (SIZE, default 0)
//   --event E       event name (EVENT, default "msg")
//   REDIS_URL       default redis://127.0.0.1:6379
//   SIO_KEY         channel prefix, the same as the servers' (default "socket.io")
//
// Each payload is {"seq": n, "ts_us": <send time, µs since the Unix epoch>,
// "pad": "xxx..."}; seq counts from 0. The schedule is absolute (message n is
// due at start + n/rate), so a late tick catches up instead of lowering the
// rate. When done, prints one JSON line:
//   {"sent": N, "elapsed_s": ..., "rate": ..., "cpu_user_s": ..., "cpu_system_s": ...}

"use strict";

const { Emitter } = require("@socket.io/redis-emitter");
const { createClient } = require("redis");

function option(name, envName, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  if (i >= 0 && i + 1 < process.argv.length) return process.argv[i + 1];
  if (process.env[envName] !== undefined) return process.env[envName];
  return fallback;
}

const room = option("room", "ROOM", "bench");
const rate = Number(option("rate", "RATE", "100"));
const duration = Number(option("duration", "DURATION", "1"));
const size = Number(option("size", "SIZE", "0"));
const event = option("event", "EVENT", "msg");
const redisUrl = process.env.REDIS_URL || "redis://127.0.0.1:6379";
const key = process.env.SIO_KEY || "socket.io";

if (!(rate > 0) || !(duration >= 0) || !(size >= 0)) {
  console.error("--rate must be > 0, --duration and --size >= 0");
  process.exit(2);
}

// Wall-clock microseconds with sub-millisecond resolution.
function nowUs() {
  return Math.round((performance.timeOrigin + performance.now()) * 1000);
}

async function main() {
  const redis = createClient({ url: redisUrl });
  redis.on("error", (err) => console.error(`redis: ${err.message}`));
  await redis.connect();
  const emitter = new Emitter(redis, { key }).to(room);
  const pad = "x".repeat(size);
  const total = Math.floor(rate * duration);

  const cpu0 = process.cpuUsage();
  const start = performance.now();
  let sent = 0;
  await new Promise((resolve) => {
    function tick() {
      const due = Math.min(total, Math.floor(((performance.now() - start) / 1000) * rate) + 1);
      while (sent < due) {
        emitter.emit(event, { seq: sent, ts_us: nowUs(), pad });
        sent += 1;
      }
      if (sent >= total) return resolve();
      // The next message's due time; setTimeout has ~1 ms granularity, the
      // catch-up above absorbs the rest.
      const next = start + (sent / rate) * 1000;
      setTimeout(tick, Math.max(0, next - performance.now()));
    }
    tick();
  });
  // The run lasts `duration`, not until the last message (due at
  // (total - 1) / rate), so that sent / elapsed is the rate.
  const end = start + duration * 1000;
  if (performance.now() < end) await new Promise((r) => setTimeout(r, end - performance.now()));
  const elapsed = (performance.now() - start) / 1000;
  // Every PUBLISH has been written once QUIT is answered.
  await redis.quit();
  const cpu = process.cpuUsage(cpu0);
  console.log(
    JSON.stringify({
      sent,
      elapsed_s: elapsed,
      rate: elapsed > 0 ? sent / elapsed : null,
      cpu_user_s: cpu.user / 1e6,
      cpu_system_s: cpu.system / 1e6,
    }),
  );
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
