// One Socket.IO 4 server process of the comparison peer: WebSocket transport
// only (so no sticky sessions are needed), no compression, fan-out across
// processes through the Redis adapter. Every connection authenticates with
// an HS256 JWT, as every Herald connection does.
//
//   PORT=3001 REDIS_URL=redis://127.0.0.1:6379 JWT_SECRET=s node server.js
//
// Environment:
//   PORT        port to listen on (default 3000)
//   HOST        address to listen on (default 127.0.0.1)
//   REDIS_URL   Redis for the adapter (default redis://127.0.0.1:6379)
//   PING_INTERVAL_MS, PING_TIMEOUT_MS
//               Engine.IO heartbeat (defaults 25000 and 20000, Socket.IO's)
//   SIO_KEY     prefix of the adapter's Redis channels (default "socket.io");
//               emitter.js must use the same. herald-bench gives each run its
//               own, so that runs sharing a Redis do not see each other.
//   JWT_SECRET  the HS256 secret tokens are signed with (required)
//
// A client's CONNECT carries `auth.token`, a JWT signed with JWT_SECRET
// (HS256 only, `exp` checked, `sub` non-empty): the connection's user is its
// `sub`; anything else is refused with a connect error. A client joins the rooms listed in `auth.rooms` (comma-separated) when it
// connects, and more with the event `join` (a room name or an array of
// them), which is acknowledged with {ok: true, rooms: [...]}; `leave` is the
// reverse. Prints "listening on PORT" once it accepts connections, and
// "stats {...}" on SIGUSR2 (connections, RSS).

"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");
const jwt = require("jsonwebtoken");

const port = Number(process.env.PORT || 3000);
const host = process.env.HOST || "127.0.0.1";
const redisUrl = process.env.REDIS_URL || "redis://127.0.0.1:6379";
const key = process.env.SIO_KEY || "socket.io";
const secret = process.env.JWT_SECRET;

function roomsOf(value) {
  if (Array.isArray(value)) return value.map(String).filter(Boolean);
  if (typeof value === "string") return value.split(",").filter(Boolean);
  return [];
}

// The user of a CONNECT's `auth.token`; throws, saying why, when the token
// is missing, forged, expired or names no user.
function userOf(auth) {
  const token = auth && auth.token;
  if (typeof token !== "string" || token === "") throw new Error("no token in auth.token");
  const claims = jwt.verify(token, secret, { algorithms: ["HS256"] });
  if (typeof claims.sub !== "string" || claims.sub === "") throw new Error("the token has no sub");
  return claims.sub;
}

async function main() {
  if (!secret) throw new Error("JWT_SECRET is not set: the server needs the secret tokens are signed with");
  const pubClient = createClient({ url: redisUrl });
  const subClient = pubClient.duplicate();
  for (const [name, c] of [["pub", pubClient], ["sub", subClient]]) {
    c.on("error", (err) => console.error(`redis ${name} client: ${err.message}`));
  }
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const httpServer = http.createServer((req, res) => {
    res.writeHead(404).end();
  });
  const io = new Server(httpServer, {
    transports: ["websocket"],
    perMessageDeflate: false,
    serveClient: false,
    pingInterval: Number(process.env.PING_INTERVAL_MS || 25000),
    pingTimeout: Number(process.env.PING_TIMEOUT_MS || 20000),
    adapter: createAdapter(pubClient, subClient, { key }),
  });

  // Runs before the CONNECT is answered, like the edge's check of the
  // `connect` op's token: a refused client gets `44{"message":...}`.
  io.use((socket, next) => {
    try {
      socket.data.user = userOf(socket.handshake.auth);
      next();
    } catch (err) {
      next(new Error(`unauthorized: ${err.message}`));
    }
  });

  io.on("connection", (socket) => {
    const auth = socket.handshake.auth || {};
    const rooms = roomsOf(auth.rooms);
    if (rooms.length > 0) socket.join(rooms);

    socket.on("join", (value, ack) => {
      const rooms = roomsOf(value);
      socket.join(rooms);
      if (typeof ack === "function") ack({ ok: true, rooms });
    });
    socket.on("leave", (value, ack) => {
      const rooms = roomsOf(value);
      for (const room of rooms) socket.leave(room);
      if (typeof ack === "function") ack({ ok: true, rooms });
    });
  });

  process.on("SIGUSR2", () => {
    const stats = { connections: io.engine.clientsCount, rss: process.memoryUsage().rss };
    console.log(`stats ${JSON.stringify(stats)}`);
  });
  for (const signal of ["SIGINT", "SIGTERM"]) {
    process.on(signal, () => process.exit(0));
  }

  httpServer.listen({ port, host, backlog: 4096 }, () => {
    console.log(`listening on ${port}`);
  });
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
