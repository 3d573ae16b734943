// A TCP proxy in front of a real server, for network faults a test needs on
// cue: cut every connection (the client sees an abnormal close, 1006), refuse
// new ones (the client stays offline until the test says), or freeze the
// connections (bytes stop flowing both ways, nothing closes: a dead network
// path that only a heartbeat notices), or mute them (requests arrive, answers
// are lost).

import { createConnection, createServer } from "node:net";

export class Proxy {
  /** Listens on a free port of 127.0.0.1 and forwards to `upstreamPort`. */
  static async start(upstreamPort) {
    const p = new Proxy(upstreamPort);
    await new Promise((res) => p.server.listen(0, "127.0.0.1", res));
    p.port = p.server.address().port;
    return p;
  }

  constructor(upstreamPort) {
    this.upstreamPort = upstreamPort;
    this.pairs = new Set();
    this.refusing = false;
    this.accepted = 0;
    this.server = createServer((client) => this.accept(client));
  }

  /** The WebSocket URL through the proxy. */
  get url() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  accept(client) {
    if (this.refusing) {
      client.destroy();
      return;
    }
    this.accepted++;
    const upstream = createConnection({ host: "127.0.0.1", port: this.upstreamPort });
    const pair = { client, upstream, frozen: false, muted: false };
    this.pairs.add(pair);
    const end = () => {
      this.pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("error", end).on("close", end);
    upstream.on("error", end).on("close", end);
    client.on("data", (d) => pair.frozen || upstream.write(d));
    upstream.on("data", (d) => pair.frozen || pair.muted || client.write(d));
  }

  /** Drops every open connection at once (no close frames). */
  cut() {
    for (const { client, upstream } of this.pairs) {
      client.resetAndDestroy?.() ?? client.destroy();
      upstream.destroy();
    }
    this.pairs.clear();
  }

  /** New connections are closed as soon as they are accepted, until allow(). */
  refuse() {
    this.refusing = true;
  }

  allow() {
    this.refusing = false;
  }

  /** Open connections stay open but carry nothing more, either way. */
  freeze() {
    for (const pair of this.pairs) pair.frozen = true;
  }

  /** The client's bytes still reach the server, the server's answers are lost. */
  mute() {
    for (const pair of this.pairs) pair.muted = true;
  }

  /** Open connections now. */
  get open() {
    return this.pairs.size;
  }

  async stop() {
    this.cut();
    await new Promise((res) => this.server.close(res));
  }
}
