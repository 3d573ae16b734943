// @herald/client 0.1.0: Herald's client for browsers and Node (ES module, no dependencies).
// Built from clients/js/src by `npm run build`; do not edit by hand.

// src/backoff.ts
var DEFAULT_BACKOFF = { initialDelayMs: 500, maxDelayMs: 15e3 };
function backoffDelay(attempt, opts = DEFAULT_BACKOFF, random = Math.random) {
  const initial = Math.max(1, opts.initialDelayMs);
  const max = Math.max(initial, opts.maxDelayMs);
  const cap = Math.min(max, initial * 2 ** Math.min(Math.max(0, attempt), 30));
  return Math.floor(random() * cap);
}
function reconnectDelay(attempt, serverHintMs, opts = DEFAULT_BACKOFF, random = Math.random) {
  const jittered = backoffDelay(attempt, opts, random);
  return serverHintMs !== void 0 && serverHintMs > jittered ? serverHintMs : jittered;
}

// src/keys.ts
function newKey() {
  const bytes = new Uint8Array(16);
  const c = globalThis.crypto;
  if (c?.getRandomValues) {
    c.getRandomValues(bytes);
  } else {
    for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  }
  let out = "";
  for (const b of bytes) out += b.toString(16).padStart(2, "0");
  return out;
}

// src/policy.ts
function errorParts(frame) {
  const code = typeof frame.code === "string" && frame.code !== "" ? frame.code : "internal";
  const message = typeof frame.message === "string" && frame.message !== "" ? frame.message : `the server answered ${code}`;
  const retry = frame.retry_after_ms;
  return typeof retry === "number" && retry >= 0 ? { code, message, retryAfterMs: retry } : { code, message };
}
var RETRYABLE = /* @__PURE__ */ new Set(["rate_limited", "unavailable", "outcome_unknown", "internal", "timeout"]);
function isRetryable(code) {
  return RETRYABLE.has(code);
}
var FINAL_CLOSES = /* @__PURE__ */ new Set([1e3, 1002, 1003, 1007, 1008, 1009, 1010, 4001, 4003]);
var RETRY_4XXX = /* @__PURE__ */ new Set([4008, 4009, 4010]);
function closeDecision(code, disconnect, canRenewToken) {
  const effective = disconnect?.code ?? code;
  if (effective === 4001) return { reconnect: canRenewToken, auth: true };
  if (disconnect !== void 0) {
    const delay = disconnect.reconnect_after_ms;
    return typeof delay === "number" && delay > 0 ? { reconnect: disconnect.reconnect === true, delayMs: delay, auth: false } : { reconnect: disconnect.reconnect === true, auth: false };
  }
  if (FINAL_CLOSES.has(effective)) return { reconnect: false, auth: false };
  if (effective >= 4e3 && effective <= 4999) return { reconnect: RETRY_4XXX.has(effective), auth: false };
  return { reconnect: true, auth: false };
}

// src/positions.ts
function admit(pos, epoch, offset) {
  if (pos !== void 0 && pos.epoch === epoch && offset <= pos.offset) {
    return { deliver: false, next: pos };
  }
  return { deliver: true, next: { epoch, offset } };
}
function afterJoin(pos, epoch, offset) {
  if (epoch === "") return pos;
  if (pos === void 0 || pos.epoch !== epoch || offset > pos.offset) return { epoch, offset };
  return pos;
}

// src/queue.ts
var BoundedQueue = class {
  constructor(capacity) {
    this.capacity = capacity;
    this.items = [];
  }
  get length() {
    return this.items.length;
  }
  /** Appends `item`; false when the queue is full. */
  push(item) {
    if (this.items.length >= this.capacity) return false;
    this.items.push(item);
    return true;
  }
  /** Puts `items` back at the front, in their order, whatever the bound. */
  requeueFront(items) {
    this.items = items.concat(this.items);
  }
  /** Takes everything, oldest first. */
  drain() {
    const out = this.items;
    this.items = [];
    return out;
  }
  remove(item) {
    const i = this.items.indexOf(item);
    if (i < 0) return false;
    this.items.splice(i, 1);
    return true;
  }
};

// src/herald.ts
var SUBPROTOCOL = "herald.v1";
var HeraldError = class extends Error {
  constructor(code, message, retryAfterMs) {
    super(message);
    this.name = "HeraldError";
    this.code = code;
    if (retryAfterMs !== void 0) this.retryAfterMs = retryAfterMs;
  }
};
var Listeners = class {
  constructor() {
    this.byEvent = /* @__PURE__ */ new Map();
  }
  on(event, fn) {
    let set = this.byEvent.get(event);
    if (!set) this.byEvent.set(event, set = /* @__PURE__ */ new Set());
    set.add(fn);
    return () => {
      set.delete(fn);
    };
  }
  emit(event, value) {
    const set = this.byEvent.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(value);
      } catch (e) {
        setTimeout(() => {
          throw e;
        }, 0);
      }
    }
  }
};
var num = (v, fallback = 0) => typeof v === "number" ? v : fallback;
var str = (v, fallback = "") => typeof v === "string" ? v : fallback;
function toMessage(f) {
  const m = { ...f };
  delete m.op;
  return m;
}
function toJoinResult(f) {
  return {
    epoch: str(f.epoch),
    offset: num(f.offset),
    recovered: f.recovered === true,
    missed: num(f.missed)
  };
}
var Room = class {
  /** @internal Use `herald.room(name)`. */
  constructor(client, name) {
    this.listeners = new Listeners();
    /** @internal The application wants to be a member (rejoined after reconnects). */
    this.wanted = false;
    /** @internal A join was answered `ok` since the last leave. */
    this.isJoined = false;
    /** @internal */
    this.joinWaiters = [];
    this.client = client;
    this.name = name;
  }
  /** Joined, as far as the application is concerned: true from the first `ok` until `leave`, through reconnects. */
  get joined() {
    return this.isJoined;
  }
  /** The last durable offset delivered (or the room's offset at join time). */
  get position() {
    return this.pos === void 0 ? void 0 : { ...this.pos };
  }
  /**
   * Joins, and stays joined across reconnects until `leave`. `since` resumes
   * a durable room from a position the application kept (say in storage);
   * without it, a room already seen resumes from `position`.
   */
  join(opts = {}) {
    return this.client.joinRoom(this, opts);
  }
  /** Leaves the room (no rejoin afterwards). The personal room cannot be left. */
  leave() {
    return this.client.leaveRoom(this);
  }
  /**
   * Publishes `data`. Offline, it waits in the offline queue (bounded:
   * `queue_full` beyond) and goes out after the rooms are rejoined. Every
   * publish carries an idempotency `key` (generated when not given), so one
   * in flight when the connection died is sent again with the same key and a
   * durable room stores it once. Resolves with its position in durable rooms
   * (`epoch` `""` and `offset` 0 in ephemeral ones).
   */
  publish(data, opts = {}) {
    const frame = { op: "publish", room: this.name, data, key: opts.key ?? newKey() };
    if (opts.echo === false) frame.echo = false;
    return this.client.send(frame, "publish").then((f) => ({ epoch: str(f.epoch), offset: num(f.offset) }));
  }
  /** The room's members, one entry per user. */
  presence() {
    return this.client.send({ op: "presence", room: this.name }, "request").then((f) => Array.isArray(f.members) ? f.members : []);
  }
  /** Stored messages after `since` (all kept ones without it), oldest first. */
  history(opts = {}) {
    const frame = { op: "history", room: this.name };
    if (opts.since) frame.since = { epoch: opts.since.epoch, offset: opts.since.offset };
    if (opts.limit !== void 0) frame.limit = opts.limit;
    return this.client.send(frame, "request").then((f) => ({
      epoch: str(f.epoch),
      messages: Array.isArray(f.messages) ? f.messages.map(toMessage) : []
    }));
  }
  /** Sets this connection's presence data; remembered and sent again with every rejoin. */
  setMeta(meta) {
    this.meta = meta;
    return this.client.setMeta(this, meta);
  }
  /** Moves the user's read marker (only forward); every device of the user gets a `read` event. */
  markRead(offset) {
    return this.client.send({ op: "read", room: this.name, offset }, "request").then((f) => {
      const r = { offset: num(f.offset, offset), unread: num(f.unread) };
      this.client.setUnread(this.name, r.unread);
      return r;
    });
  }
  on(ev, fn) {
    return this.listeners.on(ev, fn);
  }
  /** @internal */
  emit(ev, value) {
    this.listeners.emit(ev, value);
  }
};
var Herald = class {
  constructor(url, options) {
    this.urlIndex = 0;
    this.listeners = new Listeners();
    this._state = "idle";
    /** Bumped by every attempt and by close(): an older attempt's callbacks do nothing. */
    this.generation = 0;
    /** `connected` arrived on the current socket. */
    this.session = false;
    this.connectId = 0;
    this.nextId = 0;
    this.nextSeq = 0;
    this.inflight = /* @__PURE__ */ new Map();
    /** Requests (not publishes) waiting for a connection. */
    this.waiting = [];
    this.rooms = /* @__PURE__ */ new Map();
    this.unreadCounts = /* @__PURE__ */ new Map();
    /** Users watched, with what the client last knew of them: watched again on every new connection. */
    this.watched = /* @__PURE__ */ new Map();
    /** Rooms whose counts `connected` gave and whose replay has not ended yet: not counted again. */
    this.countPaused = /* @__PURE__ */ new Set();
    this.attempt = 0;
    this.authFailures = 0;
    this.everConnected = false;
    this.expiresAtMs = 0;
    this.heartbeatMs = 0;
    this.lastRx = 0;
    this.pingSentAt = 0;
    this.connectWaiters = [];
    this.urls = (Array.isArray(url) ? url : [url]).filter((u) => typeof u === "string" && u !== "");
    if (this.urls.length === 0) throw new TypeError("Herald needs at least one WebSocket URL (ws://host:port/ws)");
    if (options.token === void 0 && options.getToken === void 0) {
      throw new TypeError("Herald needs a token or a getToken function");
    }
    this.token = options.token;
    this.getToken = options.getToken;
    this.clientInfo = options.client;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 1e4;
    const r = options.reconnect ?? true;
    this.reconnectOn = r !== false;
    this.backoff = {
      initialDelayMs: (typeof r === "object" ? r.initialDelayMs : void 0) ?? DEFAULT_BACKOFF.initialDelayMs,
      maxDelayMs: (typeof r === "object" ? r.maxDelayMs : void 0) ?? DEFAULT_BACKOFF.maxDelayMs
    };
    this.queue = new BoundedQueue(options.offlineQueueSize ?? 100);
    const WS = options.WebSocket ?? globalThis.WebSocket;
    if (WS === void 0) {
      throw new TypeError(
        "no WebSocket here: pass the WebSocket option (in Node 20, run with --experimental-websocket or use the ws package)"
      );
    }
    this.WS = WS;
  }
  get state() {
    return this._state;
  }
  get user() {
    return this.last?.user;
  }
  get conn() {
    return this.session ? this.last?.conn : void 0;
  }
  get node() {
    return this.session ? this.last?.node : void 0;
  }
  /** Seconds since the epoch when the session ends unless refreshed (moves with each `refresh`). */
  get expiresAt() {
    return this.expiresAtMs > 0 ? Math.floor(this.expiresAtMs / 1e3) : void 0;
  }
  /** The personal room `user:<sub>` (known after the first connect). */
  get personal() {
    if (this.personalRoom === void 0) {
      throw new HeraldError("closed", "the personal room is known once connected: await connect() first");
    }
    return this.personalRoom;
  }
  /** Resolves on `connected`; keeps retrying (when reconnect is on) until then or until close(). */
  connect() {
    if (this._state === "closed") return Promise.reject(new HeraldError("closed", "the client was closed"));
    if (this.session && this.last) return Promise.resolve(this.last);
    const p = new Promise((resolve, reject) => this.connectWaiters.push({ resolve, reject }));
    if (this._state === "idle") {
      this._state = "connecting";
      void this.open();
    }
    return p;
  }
  /** Closes for good: no reconnect; whatever waits fails with `closed`. */
  close() {
    if (this._state === "closed") return;
    const hadSession = this.session;
    const ws = this.ws;
    this.generation++;
    this.detach();
    if (ws) {
      try {
        ws.close(1e3, "closed by the client");
      } catch {
      }
    }
    this.shutdown(new HeraldError("closed", "the client was closed"));
    if (hadSession) this.listeners.emit("disconnected", { code: 1e3, reason: "closed by the client", willReconnect: false });
  }
  on(ev, fn) {
    return this.listeners.on(ev, fn);
  }
  /**
   * Watches `users` (the token's `watch` claim must allow them): resolves
   * with whether each is online now, and from then on emits `status` at
   * each of their transitions. After a reconnect the client watches them
   * again and emits `status` for every change it missed meanwhile.
   */
  watch(users) {
    const added = users.filter((u) => !this.watched.has(u));
    for (const u of added) this.watched.set(u, void 0);
    return this.send({ op: "watch", users }, "request").then(
      (f) => {
        const status = f.status && typeof f.status === "object" ? f.status : {};
        for (const [user, online] of Object.entries(status)) {
          if (this.watched.has(user)) this.watched.set(user, online === true);
        }
        return status;
      },
      (e) => {
        for (const u of added) this.watched.delete(u);
        throw e;
      }
    );
  }
  /** Stops the `status` events of `users`. */
  unwatch(users) {
    for (const u of users) this.watched.delete(u);
    return this.send({ op: "unwatch", users }, "request").then(() => void 0);
  }
  /** The room `name`; the same object every time. */
  room(name) {
    let room = this.rooms.get(name);
    if (!room) {
      room = new Room(this, name);
      this.rooms.set(name, room);
    }
    return room;
  }
  /**
   * Unread messages in `room`: from `connected.unread`, moved by `read` events and new messages.
   * A room without a read marker (absent from `connected.unread`) keeps the client's own count
   * across reconnects, plus what the rejoin recovers.
   */
  unread(room) {
    return this.unreadCounts.get(room) ?? 0;
  }
  // ---- used by Room ----
  /** @internal Sends `frame` now, or when connected; publishes wait in the bounded offline queue. */
  send(frame, kind) {
    return new Promise((resolve, reject) => {
      if (this._state === "closed") {
        reject(new HeraldError("closed", "the client was closed"));
        return;
      }
      const out = { frame, kind, seq: ++this.nextSeq, resolve, reject };
      if (kind === "request") {
        out.timer = setTimeout(() => this.timeOut(out), this.requestTimeoutMs);
      }
      if (this.session) {
        this.transmit(out);
      } else if (kind === "request") {
        this.waiting.push(out);
      } else if (!this.queue.push(out)) {
        reject(
          new HeraldError(
            "queue_full",
            `${this.queue.capacity} publishes already wait for the connection to come back`
          )
        );
      }
    });
  }
  /** @internal */
  joinRoom(room, opts) {
    if (this._state === "closed") return Promise.reject(new HeraldError("closed", "the client was closed"));
    if (opts.meta !== void 0) room.meta = opts.meta;
    if (opts.since !== void 0) room.pos = { epoch: opts.since.epoch, offset: opts.since.offset };
    room.wanted = true;
    return new Promise((resolve, reject) => {
      const waiter = {
        resolve,
        reject,
        timer: setTimeout(() => {
          room.joinWaiters = room.joinWaiters.filter((w) => w !== waiter);
          reject(new HeraldError("timeout", `no answer to join ${room.name} within ${this.requestTimeoutMs} ms`));
          if (!room.isJoined && room.joinWaiters.length === 0 && room !== this.personalRoom) {
            room.wanted = false;
            if (this.session) this.internal({ op: "leave", room: room.name });
          }
        }, this.requestTimeoutMs)
      };
      room.joinWaiters.push(waiter);
      if (this.session) this.sendJoin(room, false);
    });
  }
  /** @internal */
  leaveRoom(room) {
    if (room === this.personalRoom) {
      return Promise.reject(new HeraldError("forbidden", "the personal room is kept for the whole connection"));
    }
    room.wanted = false;
    room.isJoined = false;
    room.pos = void 0;
    clearTimeout(room.rejoinTimer);
    if (!this.session) return Promise.resolve();
    return this.send({ op: "leave", room: room.name }, "request").then(() => void 0);
  }
  /** @internal */
  setMeta(room, meta) {
    if (!this.session && room.wanted) return Promise.resolve();
    return this.send({ op: "presence_set", room: room.name, meta }, "request").then(() => void 0);
  }
  /** @internal */
  setUnread(room, unread) {
    this.unreadCounts.set(room, unread);
  }
  // ---- connection ----
  async open() {
    const generation = ++this.generation;
    const url = this.urls[this.urlIndex % this.urls.length];
    let token;
    try {
      token = this.getToken ? await this.getToken() : this.token;
    } catch (e) {
      if (generation !== this.generation) return;
      this.listeners.emit("error", new HeraldError("unauthorized", `getToken failed: ${String(e)}`));
      this.attemptFailed(void 0);
      return;
    }
    if (generation !== this.generation || this._state === "closed") return;
    let ws;
    try {
      ws = new this.WS(url, SUBPROTOCOL);
    } catch (e) {
      this.listeners.emit("error", new HeraldError("bad_request", `cannot open ${url}: ${String(e)}`));
      this.attemptFailed(void 0);
      return;
    }
    this.ws = ws;
    this.session = false;
    this.handshakeError = void 0;
    this.disconnectFrame = void 0;
    this.connectTimer = setTimeout(
      () => this.dropSocket(ws, `no connected from ${url} within ${this.requestTimeoutMs} ms`),
      this.requestTimeoutMs
    );
    ws.onopen = () => {
      if (ws !== this.ws) return;
      this.connectId = ++this.nextId;
      const frame = { op: "connect", id: this.connectId, token };
      if (this.clientInfo !== void 0) frame.client = this.clientInfo;
      ws.send(JSON.stringify(frame));
    };
    ws.onmessage = (e) => this.onData(ws, e.data);
    ws.onclose = (e) => this.onClose(ws, e.code, e.reason);
    ws.onerror = () => {
    };
  }
  /** Stops listening to the current socket. */
  detach() {
    const ws = this.ws;
    if (ws) {
      ws.onopen = null;
      ws.onmessage = null;
      ws.onclose = null;
      ws.onerror = null;
    }
    this.ws = void 0;
    clearTimeout(this.connectTimer);
    clearTimeout(this.refreshTimer);
    clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = void 0;
  }
  /** Gives up on a socket that went silent (no answer to a ping, no `connected`): as if it closed. */
  dropSocket(ws, reason) {
    if (ws !== this.ws) return;
    this.detach();
    try {
      ws.close(4e3, "no answer");
    } catch {
    }
    this.ws = ws;
    this.onClose(ws, 1006, reason);
  }
  onClose(ws, code, reason) {
    if (ws !== this.ws) return;
    const wasSession = this.session;
    const disconnect = this.disconnectFrame;
    this.detach();
    this.session = false;
    this.disconnectFrame = void 0;
    this.takeBackInflight();
    for (const room of this.rooms.values()) clearTimeout(room.rejoinTimer);
    if (this._state === "closed") return;
    const decision = closeDecision(code, disconnect, this.getToken !== void 0);
    let again = decision.reconnect && this.reconnectOn;
    if (decision.auth) {
      if (!wasSession) this.authFailures++;
      if (this.authFailures >= 2) again = false;
    }
    const d = {
      code: disconnect?.code ?? code,
      reason: disconnect?.reason ?? reason ?? "",
      willReconnect: again
    };
    if (!again) {
      const err = this.handshakeError ?? new HeraldError("closed", `the server ended the session (${d.code}${d.reason ? `: ${d.reason}` : ""})`);
      this.shutdown(err);
      this.listeners.emit("disconnected", d);
      return;
    }
    if (wasSession) this.attempt = 0;
    this._state = this.everConnected ? "reconnecting" : "connecting";
    this.attemptFailed(decision.delayMs);
    if (wasSession) this.listeners.emit("disconnected", d);
  }
  /** Schedules the next attempt, on the next URL. */
  attemptFailed(serverDelayMs) {
    if (this._state === "closed") return;
    if (!this.reconnectOn) {
      this.shutdown(this.handshakeError ?? new HeraldError("closed", "could not connect, and reconnect is off"));
      return;
    }
    const delay = reconnectDelay(this.attempt, serverDelayMs, this.backoff);
    this.attempt++;
    this.urlIndex = (this.urlIndex + 1) % this.urls.length;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => void this.open(), delay);
  }
  /** The end: everything waiting fails with `err` (requests with `closed`). */
  shutdown(err) {
    this._state = "closed";
    this.session = false;
    this.generation++;
    this.detach();
    clearTimeout(this.reconnectTimer);
    const closed = err.code === "closed" ? err : new HeraldError("closed", err.message);
    const outs = [...this.inflight.values(), ...this.waiting, ...this.queue.drain()];
    this.inflight.clear();
    this.waiting = [];
    for (const out of outs) {
      clearTimeout(out.timer);
      out.reject?.(closed);
    }
    for (const room of this.rooms.values()) {
      clearTimeout(room.rejoinTimer);
      for (const w of room.joinWaiters.splice(0)) {
        clearTimeout(w.timer);
        w.reject(closed);
      }
    }
    for (const w of this.connectWaiters.splice(0)) w.reject(err);
  }
  /** What was on the wire when the socket died goes out again on the next one. */
  takeBackInflight() {
    const outs = [...this.inflight.values()].sort((a, b) => (a.id ?? 0) - (b.id ?? 0));
    this.inflight.clear();
    const publishes = [];
    const requests = [];
    for (const out of outs) {
      out.id = void 0;
      if (out.kind === "internal") continue;
      if (out.kind === "publish") {
        clearTimeout(out.timer);
        out.timer = void 0;
        publishes.push(out);
      } else {
        requests.push(out);
      }
    }
    this.queue.requeueFront(publishes);
    this.waiting = requests.concat(this.waiting);
  }
  onData(ws, data) {
    if (ws !== this.ws) return;
    this.lastRx = Date.now();
    this.pingSentAt = 0;
    if (typeof data !== "string") return;
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      return;
    }
    if (f === null || typeof f !== "object") return;
    switch (f.op) {
      case "connected":
        this.onConnected(f);
        break;
      case "ok":
      case "pong":
      case "error":
        this.onReply(f);
        break;
      case "message":
        this.onMessage(f);
        break;
      case "presence":
        this.room(str(f.room)).emit("presence", {
          room: str(f.room),
          event: f.event,
          user: f.user,
          conn: f.conn,
          ...f.meta !== void 0 ? { meta: f.meta } : {}
        });
        break;
      case "read":
        this.onRead(f);
        break;
      case "status":
        this.onStatus(str(f.user), f.online === true);
        break;
      case "disconnect":
        this.disconnectFrame = {
          code: num(f.code),
          reason: str(f.reason),
          reconnect: f.reconnect === true,
          ...typeof f.reconnect_after_ms === "number" ? { reconnect_after_ms: f.reconnect_after_ms } : {}
        };
        break;
      default:
        break;
    }
  }
  onReply(f) {
    const id = f.id;
    if (typeof id === "number" && id === this.connectId && !this.session) {
      if (f.op === "error") {
        const p = errorParts(f);
        this.handshakeError = new HeraldError(p.code, p.message, p.retryAfterMs);
        this.listeners.emit("error", this.handshakeError);
      }
      return;
    }
    const out = typeof id === "number" ? this.inflight.get(id) : void 0;
    if (out === void 0) {
      if (f.op === "error") {
        const p = errorParts(f);
        this.listeners.emit("error", new HeraldError(p.code, p.message, p.retryAfterMs));
      }
      return;
    }
    this.inflight.delete(id);
    clearTimeout(out.timer);
    if (out.onReply) {
      out.onReply(f);
    } else if (f.op === "error") {
      const p = errorParts(f);
      out.reject?.(new HeraldError(p.code, p.message, p.retryAfterMs));
    } else {
      out.resolve?.(f);
    }
  }
  onConnected(f) {
    if (this.session) return;
    clearTimeout(this.connectTimer);
    const previousUser = this.last?.user;
    const c = {
      conn: str(f.conn),
      user: str(f.user),
      node: str(f.node),
      heartbeat_ms: num(f.heartbeat_ms, 25e3),
      expires_at: num(f.expires_at),
      unread: f.unread && typeof f.unread === "object" ? f.unread : {}
    };
    this.session = true;
    this.everConnected = true;
    this.attempt = 0;
    this.authFailures = 0;
    this.last = c;
    this._state = "connected";
    const personalName = `user:${c.user}`;
    if (this.personalRoom?.name !== personalName) {
      if (this.personalRoom) this.personalRoom.wanted = this.personalRoom.isJoined = false;
      this.personalRoom = this.room(personalName);
    }
    const personal = this.personalRoom;
    personal.wanted = true;
    personal.isJoined = true;
    if (previousUser !== void 0 && previousUser !== c.user) this.unreadCounts.clear();
    this.countPaused.clear();
    for (const [room, n] of Object.entries(c.unread)) {
      this.unreadCounts.set(room, num(n));
      this.countPaused.add(room);
    }
    this.countPaused.add(personal.name);
    this.internal({ op: "ping" }, () => this.countPaused.delete(personal.name));
    for (const room of this.rooms.values()) {
      if (room.wanted && room !== personal) {
        this.sendJoin(room, room.isJoined);
      }
    }
    if (this.watched.size > 0) {
      this.internal({ op: "watch", users: [...this.watched.keys()] }, (reply) => this.onRewatch(reply));
    }
    const pending = [...this.queue.drain(), ...this.waiting].sort((a, b) => a.seq - b.seq);
    this.waiting = [];
    for (const out of pending) this.transmit(out);
    this.startHeartbeat(c.heartbeat_ms);
    this.expiresAtMs = c.expires_at * 1e3;
    this.scheduleRefresh();
    this.listeners.emit("connected", c);
    for (const w of this.connectWaiters.splice(0)) w.resolve(c);
  }
  sendJoin(room, rejoin) {
    const frame = { op: "join", room: room.name };
    if (room.pos !== void 0) frame.since = { epoch: room.pos.epoch, offset: room.pos.offset };
    if (room.meta !== void 0) frame.meta = room.meta;
    this.internal(frame, (reply) => this.onJoinReply(room, reply, rejoin));
  }
  onJoinReply(room, f, rejoin) {
    if (f.op === "ok") {
      const r = toJoinResult(f);
      this.countPaused.delete(room.name);
      const waiters = room.joinWaiters.splice(0);
      for (const w of waiters) {
        clearTimeout(w.timer);
        w.resolve(r);
      }
      if (!room.wanted) return;
      room.pos = afterJoin(room.pos, r.epoch, r.offset);
      room.isJoined = true;
      if (rejoin) room.emit("rejoined", r);
      return;
    }
    const p = errorParts(f);
    const err = new HeraldError(p.code, `join ${room.name}: ${p.message}`, p.retryAfterMs);
    for (const w of room.joinWaiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(err);
    }
    if (!room.isJoined) {
      room.wanted = false;
      return;
    }
    if (isRetryable(p.code) && room.wanted) {
      const ws = this.ws;
      const delay = Math.max(p.retryAfterMs ?? 0, reconnectDelay(1, void 0, this.backoff));
      clearTimeout(room.rejoinTimer);
      room.rejoinTimer = setTimeout(() => {
        if (this.ws === ws && this.session && room.wanted) this.sendJoin(room, true);
      }, delay);
      this.listeners.emit("error", err);
      return;
    }
    room.wanted = false;
    room.isJoined = false;
    this.listeners.emit("error", err);
  }
  onMessage(f) {
    const room = this.room(str(f.room));
    if (typeof f.offset === "number" && typeof f.epoch === "string") {
      const { deliver, next } = admit(room.pos, f.epoch, f.offset);
      if (!deliver) return;
      room.pos = next;
      if (!this.countPaused.has(room.name)) {
        this.unreadCounts.set(room.name, (this.unreadCounts.get(room.name) ?? 0) + 1);
      }
    }
    room.emit("message", toMessage(f));
  }
  onStatus(user, online) {
    if (!this.watched.has(user) || this.watched.get(user) === online) return;
    this.watched.set(user, online);
    this.listeners.emit("status", { user, online });
  }
  /** The answer of a reconnect's `watch`: what changed while offline is told as `status`. */
  onRewatch(f) {
    if (f.op !== "ok") {
      const p = errorParts(f);
      this.listeners.emit("error", new HeraldError(p.code, `watch again after reconnecting: ${p.message}`, p.retryAfterMs));
      return;
    }
    const status = f.status && typeof f.status === "object" ? f.status : {};
    for (const [user, online] of Object.entries(status)) {
      if (!this.watched.has(user)) continue;
      if (this.watched.get(user) === void 0) this.watched.set(user, online === true);
      else this.onStatus(user, online === true);
    }
  }
  onRead(f) {
    const ev = { room: str(f.room), offset: num(f.offset), unread: num(f.unread) };
    this.unreadCounts.set(ev.room, ev.unread);
    const room = this.room(ev.room);
    room.emit("read", ev);
    if (this.personalRoom && this.personalRoom !== room) this.personalRoom.emit("read", ev);
  }
  /** Puts `out` on the wire (the session is up). */
  transmit(out) {
    const ws = this.ws;
    if (!ws) return;
    const id = ++this.nextId;
    out.id = id;
    this.inflight.set(id, out);
    if (out.kind === "publish") {
      out.timer = setTimeout(() => this.timeOut(out), this.requestTimeoutMs);
    }
    try {
      ws.send(JSON.stringify({ ...out.frame, id }));
    } catch {
    }
  }
  /** A request of the client's own; dropped (not re-sent) if the socket dies. */
  internal(frame, onReply = () => {
  }) {
    if (!this.session) return;
    this.transmit({ frame, kind: "internal", seq: ++this.nextSeq, onReply });
  }
  timeOut(out) {
    if (out.id !== void 0) this.inflight.delete(out.id);
    this.waiting = this.waiting.filter((o) => o !== out);
    this.queue.remove(out);
    out.reject?.(
      new HeraldError("timeout", `no answer to ${String(out.frame.op)} within ${this.requestTimeoutMs} ms`)
    );
  }
  // ---- liveness ----
  /**
   * Browsers hide WebSocket pings, so the client watches frames instead:
   * after 40% of the heartbeat without one it sends `ping`, and half a
   * heartbeat without an answer means the connection is dead. A dead
   * connection is thus noticed within about one heartbeat of its last frame.
   */
  startHeartbeat(heartbeatMs) {
    this.heartbeatMs = Math.max(200, heartbeatMs);
    this.lastRx = Date.now();
    this.pingSentAt = 0;
    clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = setInterval(() => this.checkLiveness(), Math.max(50, Math.floor(this.heartbeatMs / 10)));
  }
  checkLiveness() {
    const ws = this.ws;
    if (!ws || !this.session) return;
    const now = Date.now();
    if (this.pingSentAt !== 0) {
      if (now - this.pingSentAt >= this.heartbeatMs / 2) {
        this.dropSocket(ws, `nothing from the server for ${now - this.lastRx} ms, not even an answer to ping`);
      }
      return;
    }
    if (now - this.lastRx >= this.heartbeatMs * 0.4) {
      this.pingSentAt = now;
      this.internal({ op: "ping" });
    }
  }
  // ---- token refresh ----
  /** With getToken: `refresh` a quarter of the way before expiry (at least 1 s, at most 60 s before). */
  scheduleRefresh() {
    clearTimeout(this.refreshTimer);
    if (this.getToken === void 0 || this.expiresAtMs <= 0) return;
    const remaining = this.expiresAtMs - Date.now();
    const margin = Math.min(6e4, Math.max(1e3, remaining / 4));
    const delay = Math.min(2 ** 31 - 1, Math.max(0, remaining - margin));
    this.refreshTimer = setTimeout(() => void this.refresh(), delay);
  }
  retryRefresh() {
    const remaining = this.expiresAtMs - Date.now();
    if (remaining <= 0) return;
    clearTimeout(this.refreshTimer);
    this.refreshTimer = setTimeout(() => void this.refresh(), Math.max(200, Math.min(5e3, remaining / 3)));
  }
  async refresh() {
    const ws = this.ws;
    if (!ws || !this.session || !this.getToken) return;
    let token;
    try {
      token = await this.getToken();
    } catch (e) {
      if (ws !== this.ws) return;
      this.listeners.emit("error", new HeraldError("unauthorized", `getToken failed before refresh: ${String(e)}`));
      this.retryRefresh();
      return;
    }
    if (ws !== this.ws || !this.session) return;
    this.internal({ op: "refresh", token }, (f) => {
      if (f.op === "ok") {
        if (this.last) this.last.expires_at = num(f.expires_at, this.last.expires_at);
        this.expiresAtMs = num(f.expires_at) * 1e3;
        this.scheduleRefresh();
        return;
      }
      const p = errorParts(f);
      this.listeners.emit("error", new HeraldError(p.code, `refresh: ${p.message}`, p.retryAfterMs));
      this.retryRefresh();
    });
  }
};
export {
  Herald,
  HeraldError,
  Room,
  SUBPROTOCOL
};
