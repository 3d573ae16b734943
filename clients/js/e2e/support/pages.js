// A small HTTP server for the cluster tests' page: cluster edges serve no
// pages (only `herald dev` serves the demo), so this serves e2e/pages/ and
// the SDK (clients/js/dist/herald.js) from another origin, as an
// application's own site would.
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const FILES = {
  "/sdk/herald.js": resolve(HERE, "../../dist/herald.js"),
  "/cluster.html": resolve(HERE, "../pages/cluster.html"),
};

export async function servePages() {
  const server = createServer(async (req, res) => {
    const path = new URL(req.url, "http://x").pathname;
    const file = FILES[path];
    if (!file) {
      res.writeHead(404).end("not here\n");
      return;
    }
    try {
      const body = await readFile(file);
      const type = path.endsWith(".js") ? "text/javascript" : "text/html; charset=utf-8";
      res.writeHead(200, { "content-type": type, "cache-control": "no-cache" }).end(body);
    } catch (e) {
      res.writeHead(500).end(`cannot read ${file}: ${e.message}\n`);
    }
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    close: () => new Promise((ok) => server.close(ok)),
  };
}

/** The SDK file must exist before any page can load. */
export function sdkPath() {
  return FILES["/sdk/herald.js"];
}
