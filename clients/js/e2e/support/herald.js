// Herald as the tests run it: `herald dev` (which serves the demo), or a
// cluster of real processes (nats-server with JetStream, a presence
// service, a router and several edges), plus HS256 tokens signed the way a
// customer's auth service would sign them.
import { createHmac } from "node:crypto";
import { join } from "node:path";
import {
  Proc, freePort, heraldBin, httpReady, listening, natsServerBin, removeDir, tempDir, writeTemp,
} from "./processes.js";

/** The secret the cluster's edges verify tokens with. */
export const SECRET = "herald-e2e-secret";

/** Settings from the tests' environment that would change what is tested. */
const NO_HERALD_ENV = { HERALD_JWT_SECRET: undefined, HERALD_CONFIG: undefined, HERALD_API_TOKENS: undefined };

/** A durable `doc` namespace and an open `chat`, as examples/herald.toml has them. */
export const CLUSTER_CONFIG = `
[namespaces.chat]
[namespaces.doc]
durable = { history_size = 1000, history_ttl = "1h" }
`;

export function token(sub, { secret = SECRET, ttlSecs = 3600 } = {}) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + ttlSecs })}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

/** `herald dev` on free ports, on its built-in development secret unless `args` say otherwise. */
export async function startDev(args = []) {
  const port = await freePort();
  const grpc = await freePort();
  const proc = new Proc("herald dev", heraldBin(), [
    "dev", "--listen", `127.0.0.1:${port}`, "--grpc-listen", `127.0.0.1:${grpc}`, ...args,
  ], { env: NO_HERALD_ENV });
  await proc.until("it was ready", () => httpReady(port));
  return { proc, port, url: `http://127.0.0.1:${port}`, ws: `ws://127.0.0.1:${port}/ws` };
}

/** A cluster: nats-server, one presence service, one router, `edges` edges. */
export async function startCluster({ edges = 2 } = {}) {
  const dir = tempDir("herald-e2e-cluster-");
  const config = writeTemp(dir, "herald.toml", CLUSTER_CONFIG);
  const natsPort = await freePort();
  const nats = new Proc("nats-server", natsServerBin(), [
    "-a", "127.0.0.1", "-p", String(natsPort), "-js", "-sd", join(dir, "jetstream"),
  ]);
  await nats.until("it listened", () => listening(natsPort));
  const natsUrl = `nats://127.0.0.1:${natsPort}`;
  const common = ["--nats", natsUrl, "--config", config];
  const env = NO_HERALD_ENV;

  const [pGrpc, pHttp, rGrpc, rHttp] = await Promise.all([freePort(), freePort(), freePort(), freePort()]);
  const presence = new Proc("presence-0", heraldBin(), [
    "presence", "--grpc-listen", `127.0.0.1:${pGrpc}`, "--http-listen", `127.0.0.1:${pHttp}`,
    "--replica-id", "presence-0", ...common,
  ], { env });
  const router = new Proc("router", heraldBin(), [
    "router", "--grpc-listen", `127.0.0.1:${rGrpc}`, "--http-listen", `127.0.0.1:${rHttp}`, ...common,
  ], { env });
  const edgeList = [];
  for (let i = 0; i < edges; i++) {
    const port = await freePort();
    const node = `edge-${i}`;
    const spawnEdge = (name) => new Proc(name, heraldBin(), [
      "edge", "--listen", `127.0.0.1:${port}`, "--node-id", node, "--jwt-secret", SECRET, ...common,
    ], { env });
    const edge = { proc: spawnEdge(node), port, node, ws: `ws://127.0.0.1:${port}/ws` };
    /** A new process for this edge, on the same address, once the old one is gone. */
    edge.restart = async () => {
      await edge.proc.kill();
      edge.proc = spawnEdge(`${node} (restarted)`);
      await edge.proc.until("it was ready", () => httpReady(port));
    };
    edgeList.push(edge);
  }
  await Promise.all([
    presence.until("it was ready", () => httpReady(pHttp)),
    router.until("it was ready", () => httpReady(rHttp)),
    ...edgeList.map((e) => e.proc.until("it was ready", () => httpReady(e.port))),
  ]);
  return {
    nats, presence, router, edges: edgeList,
    cleanup: () => removeDir(dir),
  };
}
