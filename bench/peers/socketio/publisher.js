// The publisher of `herald-bench reconnect-storm --target socketio`: emits
// event `msg` through the Redis emitter (@socket.io/redis-emitter, one Redis
// PUBLISH per message) to several rooms in turn, at a fixed total rate,
// until its standard input closes, like a backend that goes on publishing
// while a server dies. emitter.js runs for a fixed time instead; the storm
// does not know in advance how long it will last.
//
//   node publisher.js --rooms doc:storm-0,doc:storm-1 --rate 50
//
// Options:
//   --rooms R1,R2,...  rooms, taken in turn
//   --rate N           messages per second over all the rooms (default 50)
//   REDIS_URL          default redis://127.0.0.1:6379
//   SIO_KEY            channel prefix, the same as the servers' (default "socket.io")
//
// Each payload is {"room": R, "seq": n, "ts_us": <send time, µs since the
// Unix epoch>}, seq counting from 0 in each room, so that a receiver can tell
// which of its room's messages it missed. The schedule is absolute (message
// n is due at start + n/rate). Prints "publishing" once connected to Redis,
// and when stdin closes one JSON line:
//   {"sent": {"R1": n1, ...}, "elapsed_s": ..., "cpu_user_s": ..., "cpu_system_s": ...}

"use strict";

const { Emitter } = require("@socket.io/redis-emitter");
const { createClient } = require("redis");

function option(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const rooms = option("rooms", "").split(",").filter(Boolean);
const rate = Number(option("rate", "50"));
const redisUrl = process.env.REDIS_URL || "redis://127.0.0.1:6379";
const key = process.env.SIO_KEY || "socket.io";

if (rooms.length === 0 || !(rate > 0)) {
  console.error("--rooms must name at least one room and --rate must be > 0");
  process.exit(2);
}

function nowUs() {
  return Math.round((performance.timeOrigin + performance.now()) * 1000);
}

async function main() {
  const redis = createClient({ url: redisUrl });
  redis.on("error", (err) => console.error(`redis: ${err.message}`));
  await redis.connect();
  const emitter = new Emitter(redis, { key });
  const sent = Object.fromEntries(rooms.map((r) => [r, 0]));

  let stopped = false;
  process.stdin.on("end", () => {
    stopped = true;
  });
  process.stdin.resume();
  console.log("publishing");

  const cpu0 = process.cpuUsage();
  const start = performance.now();
  let n = 0;
  await new Promise((resolve) => {
    function tick() {
      if (stopped) return resolve();
      const due = Math.floor(((performance.now() - start) / 1000) * rate) + 1;
      while (n < due) {
        const room = rooms[n % rooms.length];
        emitter.to(room).emit("msg", { room, seq: sent[room], ts_us: nowUs() });
        sent[room] += 1;
        n += 1;
      }
      const next = start + (n / rate) * 1000;
      setTimeout(tick, Math.max(0, next - performance.now()));
    }
    tick();
  });
  const elapsed = (performance.now() - start) / 1000;
  // Every PUBLISH has been written once QUIT is answered.
  await redis.quit();
  const cpu = process.cpuUsage(cpu0);
  console.log(
    JSON.stringify({
      sent,
      elapsed_s: elapsed,
      cpu_user_s: cpu.user / 1e6,
      cpu_system_s: cpu.system / 1e6,
    }),
  );
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
