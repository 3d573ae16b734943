// Herald's client for browsers and Node: one WebSocket to an edge at a time,
// requests as promises with timeouts, and rooms that outlive the socket. When
// the connection drops, the client reconnects (backoff with full jitter, the
// next URL of its list), rejoins every room (durable ones from the last offset
// it delivered, dropping repeats), re-sends what was in flight and what was
// published offline, so an application sees each durable message once and in
// order. The wire protocol is docs/protocol.md; README.md says what the
// client promises.

import { reconnectDelay, DEFAULT_BACKOFF, type BackoffOptions } from "./backoff.js";
import { newKey } from "./keys.js";
import { closeDecision, errorParts, isRetryable, type DisconnectFrame } from "./policy.js";
import { admit, afterJoin } from "./positions.js";
import { BoundedQueue } from "./queue.js";

/** The WebSocket subprotocol Herald speaks. */
export const SUBPROTOCOL = "herald.v1";

export type State = "idle" | "connecting" | "connected" | "reconnecting" | "closed";

/** The server's `connected` frame. */
export interface Connected {
  conn: string;
  user: string;
  node: string;
  heartbeat_ms: number;
  /** Seconds since the epoch: when the session ends unless the token is refreshed. */
  expires_at: number;
  /** Unread counts: the personal room, and every durable room the user has a read marker in. */
  unread: Record<string, number>;
}

/** A room message. Durable rooms add `epoch`, `offset` and `prev`. */
export interface Message {
  room: string;
  data: unknown;
  /** The publishing user, or `"server"` for the backend API. */
  from: string;
  /** Milliseconds since the epoch. */
  ts: number;
  epoch?: string;
  offset?: number;
  prev?: number;
  traceparent?: string;
}

export interface Member {
  user: string;
  conns: number;
  meta: unknown;
  connections: { conn: string; node: string; meta: unknown }[];
}

export interface JoinResult {
  /** `""` in ephemeral rooms. */
  epoch: string;
  /** The room's latest offset when the join took effect (0 in ephemeral rooms). */
  offset: number;
  /** False when `since` could not be honoured in full: history trimmed, or a new epoch. */
  recovered: boolean;
  /** Messages replayed from `since`. */
  missed: number;
}

export interface PresenceEvent {
  room: string;
  event: "join" | "leave" | "update";
  user: string;
  conn: string;
  meta?: unknown;
}

export interface ReadEvent {
  room: string;
  offset: number;
  unread: number;
}

/** A watched user came online or went offline (see `Herald.watch`). */
export interface StatusEvent {
  user: string;
  online: boolean;
}

export interface Disconnected {
  code: number;
  reason: string;
  willReconnect: boolean;
}

export interface ReconnectOptions {
  initialDelayMs?: number;
  maxDelayMs?: number;
}

export interface HeraldOptions {
  /** A fixed token. Without `getToken` the session ends at its `exp`. */
  token?: string;
  /** Called before every connect and before `exp` (to `refresh`). */
  getToken?: () => string | Promise<string>;
  /** Sent as `connect.client` (name, version: anything JSON). */
  client?: unknown;
  /** How long a request waits for its answer (default 10000). */
  requestTimeoutMs?: number;
  /** Default on: 500 ms doubling up to 15 s, full jitter. */
  reconnect?: boolean | ReconnectOptions;
  /** Publishes kept while offline (default 100); more fail with `queue_full`. */
  offlineQueueSize?: number;
  /** A WebSocket constructor, where `globalThis.WebSocket` is missing. */
  WebSocket?: typeof WebSocket;
}

/**
 * A request that failed. `code` is the protocol's error code
 * (`forbidden`, `rate_limited`, ...) or one of the client's own:
 * `timeout` (no answer in time), `closed` (the client is closed, or the
 * server ended the session for good), `queue_full` (offline queue full).
 */
export class HeraldError extends Error {
  readonly code: string;
  /** When the server said how long to wait (`rate_limited`). */
  readonly retryAfterMs?: number;

  constructor(code: string, message: string, retryAfterMs?: number) {
    super(message);
    this.name = "HeraldError";
    this.code = code;
    if (retryAfterMs !== undefined) this.retryAfterMs = retryAfterMs;
  }
}

type Frame = Record<string, unknown>;
type Listener = (value: never) => void;

/** Listeners by event name; one that throws is reported, not allowed to break the client. */
class Listeners {
  private byEvent = new Map<string, Set<Listener>>();

  on(event: string, fn: Listener): () => void {
    let set = this.byEvent.get(event);
    if (!set) this.byEvent.set(event, (set = new Set()));
    set.add(fn);
    return () => {
      set.delete(fn);
    };
  }

  emit(event: string, value: unknown): void {
    const set = this.byEvent.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        (fn as (v: unknown) => void)(value);
      } catch (e) {
        // Rethrown outside the client's own call stack so the app sees its bug.
        setTimeout(() => {
          throw e;
        }, 0);
      }
    }
  }
}

/** A request of the application or of the client itself, until it is answered. */
interface Outgoing {
  frame: Frame;
  kind: "publish" | "request" | "internal";
  /** Creation order: what waited for a connection goes out in this order. */
  seq: number;
  /** Set while on the wire. */
  id?: number;
  timer?: ReturnType<typeof setTimeout>;
  resolve?: (reply: Frame) => void;
  reject?: (e: HeraldError) => void;
  /** Internal requests: sees `ok` and `error` alike. */
  onReply?: (reply: Frame) => void;
}

interface JoinWaiter {
  resolve: (r: JoinResult) => void;
  reject: (e: HeraldError) => void;
  timer: ReturnType<typeof setTimeout>;
}

const num = (v: unknown, fallback = 0): number => (typeof v === "number" ? v : fallback);
const str = (v: unknown, fallback = ""): string => (typeof v === "string" ? v : fallback);

function toMessage(f: Frame): Message {
  const m = { ...f } as Frame;
  delete m.op;
  return m as unknown as Message;
}

function toJoinResult(f: Frame): JoinResult {
  return {
    epoch: str(f.epoch),
    offset: num(f.offset),
    recovered: f.recovered === true,
    missed: num(f.missed),
  };
}

/**
 * A room as this client sees it: membership that survives reconnects, the
 * last durable offset delivered, the presence `meta` re-sent on rejoin.
 * Get one with `herald.room(name)`.
 */
export class Room {
  readonly name: string;
  private readonly client: Herald;
  private readonly listeners = new Listeners();
  /** @internal The application wants to be a member (rejoined after reconnects). */
  wanted = false;
  /** @internal A join was answered `ok` since the last leave. */
  isJoined = false;
  /** @internal Last durable position delivered to the application. */
  pos: { epoch: string; offset: number } | undefined;
  /** @internal Presence data, re-sent with every rejoin. */
  meta: object | undefined;
  /** @internal */
  joinWaiters: JoinWaiter[] = [];
  /** @internal */
  rejoinTimer: ReturnType<typeof setTimeout> | undefined;

  /** @internal Use `herald.room(name)`. */
  constructor(client: Herald, name: string) {
    this.client = client;
    this.name = name;
  }

  /** Joined, as far as the application is concerned: true from the first `ok` until `leave`, through reconnects. */
  get joined(): boolean {
    return this.isJoined;
  }

  /** The last durable offset delivered (or the room's offset at join time). */
  get position(): { epoch: string; offset: number } | undefined {
    return this.pos === undefined ? undefined : { ...this.pos };
  }

  /**
   * Joins, and stays joined across reconnects until `leave`. `since` resumes
   * a durable room from a position the application kept (say in storage);
   * without it, a room already seen resumes from `position`.
   */
  join(opts: { meta?: object; since?: { epoch: string; offset: number } } = {}): Promise<JoinResult> {
    return this.client.joinRoom(this, opts);
  }

  /** Leaves the room (no rejoin afterwards). The personal room cannot be left. */
  leave(): Promise<void> {
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
  publish(data: unknown, opts: { key?: string; echo?: boolean } = {}): Promise<{ epoch: string; offset: number }> {
    const frame: Frame = { op: "publish", room: this.name, data, key: opts.key ?? newKey() };
    // `echo: false`: this connection does not receive it live (the user's other devices do).
    if (opts.echo === false) frame.echo = false;
    return this.client
      .send(frame, "publish")
      .then((f) => ({ epoch: str(f.epoch), offset: num(f.offset) }));
  }

  /** The room's members, one entry per user. */
  presence(): Promise<Member[]> {
    return this.client
      .send({ op: "presence", room: this.name }, "request")
      .then((f) => (Array.isArray(f.members) ? (f.members as Member[]) : []));
  }

  /** Stored messages after `since` (all kept ones without it), oldest first. */
  history(
    opts: { since?: { epoch: string; offset: number }; limit?: number } = {},
  ): Promise<{ epoch: string; messages: Message[] }> {
    const frame: Frame = { op: "history", room: this.name };
    if (opts.since) frame.since = { epoch: opts.since.epoch, offset: opts.since.offset };
    if (opts.limit !== undefined) frame.limit = opts.limit;
    return this.client.send(frame, "request").then((f) => ({
      epoch: str(f.epoch),
      messages: Array.isArray(f.messages) ? (f.messages as Frame[]).map(toMessage) : [],
    }));
  }

  /** Sets this connection's presence data; remembered and sent again with every rejoin. */
  setMeta(meta: object): Promise<void> {
    this.meta = meta;
    return this.client.setMeta(this, meta);
  }

  /** Moves the user's read marker (only forward); every device of the user gets a `read` event. */
  markRead(offset: number): Promise<{ offset: number; unread: number }> {
    return this.client.send({ op: "read", room: this.name, offset }, "request").then((f) => {
      const r = { offset: num(f.offset, offset), unread: num(f.unread) };
      this.client.setUnread(this.name, r.unread);
      return r;
    });
  }

  on(ev: "message", fn: (m: Message) => void): () => void;
  on(ev: "presence", fn: (p: PresenceEvent) => void): () => void;
  on(ev: "read", fn: (r: ReadEvent) => void): () => void;
  /** After each automatic rejoin: `recovered: false` means messages were lost for good (history trimmed or a new epoch). */
  on(ev: "rejoined", fn: (r: JoinResult) => void): () => void;
  on(ev: string, fn: (v: never) => void): () => void {
    return this.listeners.on(ev, fn);
  }

  /** @internal */
  emit(ev: string, value: unknown): void {
    this.listeners.emit(ev, value);
  }
}

/** The client. `url` may list several edges: each reconnect tries the next. */
export class Herald {
  private readonly urls: string[];
  private urlIndex = 0;
  private readonly token: string | undefined;
  private readonly getToken: (() => string | Promise<string>) | undefined;
  private readonly clientInfo: unknown;
  private readonly requestTimeoutMs: number;
  private readonly reconnectOn: boolean;
  private readonly backoff: BackoffOptions;
  private readonly WS: typeof WebSocket;
  private readonly listeners = new Listeners();

  private _state: State = "idle";
  private ws: WebSocket | undefined;
  /** Bumped by every attempt and by close(): an older attempt's callbacks do nothing. */
  private generation = 0;
  /** `connected` arrived on the current socket. */
  private session = false;
  private connectId = 0;
  private handshakeError: HeraldError | undefined;
  private disconnectFrame: DisconnectFrame | undefined;
  private nextId = 0;
  private nextSeq = 0;
  private readonly inflight = new Map<number, Outgoing>();
  /** Requests (not publishes) waiting for a connection. */
  private waiting: Outgoing[] = [];
  private readonly queue: BoundedQueue<Outgoing>;
  private readonly rooms = new Map<string, Room>();
  private personalRoom: Room | undefined;
  private readonly unreadCounts = new Map<string, number>();
  /** Users watched, with what the client last knew of them: watched again on every new connection. */
  private readonly watched = new Map<string, boolean | undefined>();
  /** Rooms whose counts `connected` gave and whose replay has not ended yet: not counted again. */
  private readonly countPaused = new Set<string>();
  private attempt = 0;
  private authFailures = 0;
  private everConnected = false;
  private last: Connected | undefined;
  private expiresAtMs = 0;
  private heartbeatMs = 0;
  private lastRx = 0;
  private pingSentAt = 0;
  private connectWaiters: { resolve: (c: Connected) => void; reject: (e: HeraldError) => void }[] = [];
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private connectTimer: ReturnType<typeof setTimeout> | undefined;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private heartbeatTimer: ReturnType<typeof setInterval> | undefined;

  constructor(url: string | string[], options: HeraldOptions) {
    this.urls = (Array.isArray(url) ? url : [url]).filter((u) => typeof u === "string" && u !== "");
    if (this.urls.length === 0) throw new TypeError("Herald needs at least one WebSocket URL (ws://host:port/ws)");
    if (options.token === undefined && options.getToken === undefined) {
      throw new TypeError("Herald needs a token or a getToken function");
    }
    this.token = options.token;
    this.getToken = options.getToken;
    this.clientInfo = options.client;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
    const r = options.reconnect ?? true;
    this.reconnectOn = r !== false;
    this.backoff = {
      initialDelayMs: (typeof r === "object" ? r.initialDelayMs : undefined) ?? DEFAULT_BACKOFF.initialDelayMs,
      maxDelayMs: (typeof r === "object" ? r.maxDelayMs : undefined) ?? DEFAULT_BACKOFF.maxDelayMs,
    };
    this.queue = new BoundedQueue(options.offlineQueueSize ?? 100);
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: typeof WebSocket }).WebSocket;
    if (WS === undefined) {
      throw new TypeError(
        "no WebSocket here: pass the WebSocket option (in Node 20, run with --experimental-websocket or use the ws package)",
      );
    }
    this.WS = WS;
  }

  get state(): State {
    return this._state;
  }
  get user(): string | undefined {
    return this.last?.user;
  }
  get conn(): string | undefined {
    return this.session ? this.last?.conn : undefined;
  }
  get node(): string | undefined {
    return this.session ? this.last?.node : undefined;
  }
  /** Seconds since the epoch when the session ends unless refreshed (moves with each `refresh`). */
  get expiresAt(): number | undefined {
    return this.expiresAtMs > 0 ? Math.floor(this.expiresAtMs / 1000) : undefined;
  }

  /** The personal room `user:<sub>` (known after the first connect). */
  get personal(): Room {
    if (this.personalRoom === undefined) {
      throw new HeraldError("closed", "the personal room is known once connected: await connect() first");
    }
    return this.personalRoom;
  }

  /** Resolves on `connected`; keeps retrying (when reconnect is on) until then or until close(). */
  connect(): Promise<Connected> {
    if (this._state === "closed") return Promise.reject(new HeraldError("closed", "the client was closed"));
    if (this.session && this.last) return Promise.resolve(this.last);
    const p = new Promise<Connected>((resolve, reject) => this.connectWaiters.push({ resolve, reject }));
    if (this._state === "idle") {
      this._state = "connecting";
      void this.open();
    }
    return p;
  }

  /** Closes for good: no reconnect; whatever waits fails with `closed`. */
  close(): void {
    if (this._state === "closed") return;
    const hadSession = this.session;
    const ws = this.ws;
    this.generation++;
    this.detach();
    if (ws) {
      try {
        ws.close(1000, "closed by the client");
      } catch {
        // Already closing.
      }
    }
    this.shutdown(new HeraldError("closed", "the client was closed"));
    if (hadSession) this.listeners.emit("disconnected", { code: 1000, reason: "closed by the client", willReconnect: false });
  }

  on(ev: "connected", fn: (c: Connected) => void): () => void;
  on(ev: "disconnected", fn: (d: Disconnected) => void): () => void;
  on(ev: "error", fn: (e: HeraldError) => void): () => void;
  on(ev: "status", fn: (s: StatusEvent) => void): () => void;
  on(ev: string, fn: (v: never) => void): () => void {
    return this.listeners.on(ev, fn);
  }

  /**
   * Watches `users` (the token's `watch` claim must allow them): resolves
   * with whether each is online now, and from then on emits `status` at
   * each of their transitions. After a reconnect the client watches them
   * again and emits `status` for every change it missed meanwhile.
   */
  watch(users: string[]): Promise<Record<string, boolean>> {
    const added = users.filter((u) => !this.watched.has(u));
    for (const u of added) this.watched.set(u, undefined);
    return this.send({ op: "watch", users }, "request").then(
      (f) => {
        const status = (f.status && typeof f.status === "object" ? f.status : {}) as Record<string, boolean>;
        for (const [user, online] of Object.entries(status)) {
          if (this.watched.has(user)) this.watched.set(user, online === true);
        }
        return status;
      },
      (e: unknown) => {
        for (const u of added) this.watched.delete(u);
        throw e;
      },
    );
  }

  /** Stops the `status` events of `users`. */
  unwatch(users: string[]): Promise<void> {
    for (const u of users) this.watched.delete(u);
    return this.send({ op: "unwatch", users }, "request").then(() => undefined);
  }

  /** The room `name`; the same object every time. */
  room(name: string): Room {
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
  unread(room: string): number {
    return this.unreadCounts.get(room) ?? 0;
  }

  // ---- used by Room ----

  /** @internal Sends `frame` now, or when connected; publishes wait in the bounded offline queue. */
  send(frame: Frame, kind: "publish" | "request"): Promise<Frame> {
    return new Promise<Frame>((resolve, reject) => {
      if (this._state === "closed") {
        reject(new HeraldError("closed", "the client was closed"));
        return;
      }
      const out: Outgoing = { frame, kind, seq: ++this.nextSeq, resolve, reject };
      if (kind === "request") {
        // Counts from the call: the wait for a connection is part of it.
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
            `${this.queue.capacity} publishes already wait for the connection to come back`,
          ),
        );
      }
    });
  }

  /** @internal */
  joinRoom(room: Room, opts: { meta?: object; since?: { epoch: string; offset: number } }): Promise<JoinResult> {
    if (this._state === "closed") return Promise.reject(new HeraldError("closed", "the client was closed"));
    if (opts.meta !== undefined) room.meta = opts.meta;
    if (opts.since !== undefined) room.pos = { epoch: opts.since.epoch, offset: opts.since.offset };
    room.wanted = true;
    return new Promise<JoinResult>((resolve, reject) => {
      const waiter: JoinWaiter = {
        resolve,
        reject,
        timer: setTimeout(() => {
          room.joinWaiters = room.joinWaiters.filter((w) => w !== waiter);
          reject(new HeraldError("timeout", `no answer to join ${room.name} within ${this.requestTimeoutMs} ms`));
          if (!room.isJoined && room.joinWaiters.length === 0 && room !== this.personalRoom) {
            // Given up on: undo it in case the server joined after all.
            room.wanted = false;
            if (this.session) this.internal({ op: "leave", room: room.name });
          }
        }, this.requestTimeoutMs),
      };
      room.joinWaiters.push(waiter);
      if (this.session) this.sendJoin(room, false);
    });
  }

  /** @internal */
  leaveRoom(room: Room): Promise<void> {
    if (room === this.personalRoom) {
      return Promise.reject(new HeraldError("forbidden", "the personal room is kept for the whole connection"));
    }
    room.wanted = false;
    room.isJoined = false;
    room.pos = undefined;
    clearTimeout(room.rejoinTimer);
    // Offline there is nothing to leave: the server forgot the old connection's rooms.
    if (!this.session) return Promise.resolve();
    return this.send({ op: "leave", room: room.name }, "request").then(() => undefined);
  }

  /** @internal */
  setMeta(room: Room, meta: object): Promise<void> {
    // Offline, the rejoin carries it.
    if (!this.session && room.wanted) return Promise.resolve();
    return this.send({ op: "presence_set", room: room.name, meta }, "request").then(() => undefined);
  }

  /** @internal */
  setUnread(room: string, unread: number): void {
    this.unreadCounts.set(room, unread);
  }

  // ---- connection ----

  private async open(): Promise<void> {
    const generation = ++this.generation;
    const url = this.urls[this.urlIndex % this.urls.length];
    let token: string;
    try {
      token = this.getToken ? await this.getToken() : (this.token as string);
    } catch (e) {
      if (generation !== this.generation) return;
      this.listeners.emit("error", new HeraldError("unauthorized", `getToken failed: ${String(e)}`));
      this.attemptFailed(undefined);
      return;
    }
    if (generation !== this.generation || this._state === "closed") return;
    let ws: WebSocket;
    try {
      ws = new this.WS(url, SUBPROTOCOL);
    } catch (e) {
      this.listeners.emit("error", new HeraldError("bad_request", `cannot open ${url}: ${String(e)}`));
      this.attemptFailed(undefined);
      return;
    }
    this.ws = ws;
    this.session = false;
    this.handshakeError = undefined;
    this.disconnectFrame = undefined;
    this.connectTimer = setTimeout(
      () => this.dropSocket(ws, `no connected from ${url} within ${this.requestTimeoutMs} ms`),
      this.requestTimeoutMs,
    );
    ws.onopen = () => {
      if (ws !== this.ws) return;
      this.connectId = ++this.nextId;
      const frame: Frame = { op: "connect", id: this.connectId, token };
      if (this.clientInfo !== undefined) frame.client = this.clientInfo;
      ws.send(JSON.stringify(frame));
    };
    ws.onmessage = (e: MessageEvent) => this.onData(ws, e.data);
    ws.onclose = (e: CloseEvent) => this.onClose(ws, e.code, e.reason);
    ws.onerror = () => {
      // A close event follows with the details there are.
    };
  }

  /** Stops listening to the current socket. */
  private detach(): void {
    const ws = this.ws;
    if (ws) {
      ws.onopen = null;
      ws.onmessage = null;
      ws.onclose = null;
      ws.onerror = null;
    }
    this.ws = undefined;
    clearTimeout(this.connectTimer);
    clearTimeout(this.refreshTimer);
    clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = undefined;
  }

  /** Gives up on a socket that went silent (no answer to a ping, no `connected`): as if it closed. */
  private dropSocket(ws: WebSocket, reason: string): void {
    if (ws !== this.ws) return;
    this.detach();
    try {
      ws.close(4000, "no answer");
    } catch {
      // Never opened.
    }
    this.ws = ws; // onClose checks the socket is the current one
    this.onClose(ws, 1006, reason);
  }

  private onClose(ws: WebSocket, code: number, reason: string): void {
    if (ws !== this.ws) return;
    const wasSession = this.session;
    const disconnect = this.disconnectFrame;
    this.detach();
    this.session = false;
    this.disconnectFrame = undefined;
    this.takeBackInflight();
    for (const room of this.rooms.values()) clearTimeout(room.rejoinTimer);
    if (this._state === "closed") return;
    const decision = closeDecision(code, disconnect, this.getToken !== undefined);
    let again = decision.reconnect && this.reconnectOn;
    if (decision.auth) {
      // A token fresh from getToken refused twice running: more tries will not help.
      if (!wasSession) this.authFailures++;
      if (this.authFailures >= 2) again = false;
    }
    const d: Disconnected = {
      code: disconnect?.code ?? code,
      reason: disconnect?.reason ?? reason ?? "",
      willReconnect: again,
    };
    if (!again) {
      const err =
        this.handshakeError ??
        new HeraldError("closed", `the server ended the session (${d.code}${d.reason ? `: ${d.reason}` : ""})`);
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
  private attemptFailed(serverDelayMs: number | undefined): void {
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
  private shutdown(err: HeraldError): void {
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
  private takeBackInflight(): void {
    const outs = [...this.inflight.values()].sort((a, b) => (a.id ?? 0) - (b.id ?? 0));
    this.inflight.clear();
    const publishes: Outgoing[] = [];
    const requests: Outgoing[] = [];
    for (const out of outs) {
      out.id = undefined;
      if (out.kind === "internal") continue; // rejoins, pings, refreshes are made anew
      if (out.kind === "publish") {
        // The timeout covers an answer on the wire, not the time offline.
        clearTimeout(out.timer);
        out.timer = undefined;
        publishes.push(out);
      } else {
        requests.push(out);
      }
    }
    this.queue.requeueFront(publishes);
    this.waiting = requests.concat(this.waiting);
  }

  private onData(ws: WebSocket, data: unknown): void {
    if (ws !== this.ws) return;
    this.lastRx = Date.now();
    this.pingSentAt = 0;
    if (typeof data !== "string") return;
    let f: Frame;
    try {
      f = JSON.parse(data) as Frame;
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
          ...(f.meta !== undefined ? { meta: f.meta } : {}),
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
          ...(typeof f.reconnect_after_ms === "number" ? { reconnect_after_ms: f.reconnect_after_ms } : {}),
        };
        break;
      default:
        break; // Newer servers may send more; unknown frames are ignored.
    }
  }

  private onReply(f: Frame): void {
    const id = f.id;
    if (typeof id === "number" && id === this.connectId && !this.session) {
      if (f.op === "error") {
        const p = errorParts(f);
        this.handshakeError = new HeraldError(p.code, p.message, p.retryAfterMs);
        this.listeners.emit("error", this.handshakeError);
      }
      return;
    }
    const out = typeof id === "number" ? this.inflight.get(id) : undefined;
    if (out === undefined) {
      // An error for no request (or one that timed out): still worth seeing.
      if (f.op === "error") {
        const p = errorParts(f);
        this.listeners.emit("error", new HeraldError(p.code, p.message, p.retryAfterMs));
      }
      return;
    }
    this.inflight.delete(id as number);
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

  private onConnected(f: Frame): void {
    if (this.session) return;
    clearTimeout(this.connectTimer);
    const previousUser = this.last?.user;
    const c: Connected = {
      conn: str(f.conn),
      user: str(f.user),
      node: str(f.node),
      heartbeat_ms: num(f.heartbeat_ms, 25_000),
      expires_at: num(f.expires_at),
      unread: (f.unread && typeof f.unread === "object" ? f.unread : {}) as Record<string, number>,
    };
    this.session = true;
    this.everConnected = true;
    this.attempt = 0;
    this.authFailures = 0;
    this.last = c;
    this._state = "connected";

    const personalName = `user:${c.user}`;
    if (this.personalRoom?.name !== personalName) {
      // A getToken that switched users: the old user's inbox is not ours to rejoin.
      if (this.personalRoom) this.personalRoom.wanted = this.personalRoom.isJoined = false;
      this.personalRoom = this.room(personalName);
    }
    const personal = this.personalRoom;
    personal.wanted = true;
    personal.isJoined = true;

    // Another user's counts say nothing about this one's.
    if (previousUser !== undefined && previousUser !== c.user) this.unreadCounts.clear();
    // `connected` counts what is unread now, replays included: those are not counted again.
    // A room it leaves out has no read marker, so the server knows no count for it: the
    // client's own count stands, and the rejoin's replays (new to this client) add to it.
    this.countPaused.clear();
    for (const [room, n] of Object.entries(c.unread)) {
      this.unreadCounts.set(room, num(n));
      this.countPaused.add(room);
    }
    this.countPaused.add(personal.name);
    // The inbox replay comes right after `connected`; the answer to a ping sent now follows it.
    this.internal({ op: "ping" }, () => this.countPaused.delete(personal.name));

    for (const room of this.rooms.values()) {
      if (room.wanted && room !== personal) {
        this.sendJoin(room, room.isJoined);
      }
    }
    // Watched users belong to a connection: this one watches them again.
    if (this.watched.size > 0) {
      this.internal({ op: "watch", users: [...this.watched.keys()] }, (reply) => this.onRewatch(reply));
    }
    // Requests are answered in order, so what waited can follow the joins at once.
    const pending = [...this.queue.drain(), ...this.waiting].sort((a, b) => a.seq - b.seq);
    this.waiting = [];
    for (const out of pending) this.transmit(out);

    this.startHeartbeat(c.heartbeat_ms);
    this.expiresAtMs = c.expires_at * 1000;
    this.scheduleRefresh();
    this.listeners.emit("connected", c);
    for (const w of this.connectWaiters.splice(0)) w.resolve(c);
  }

  private sendJoin(room: Room, rejoin: boolean): void {
    const frame: Frame = { op: "join", room: room.name };
    if (room.pos !== undefined) frame.since = { epoch: room.pos.epoch, offset: room.pos.offset };
    if (room.meta !== undefined) frame.meta = room.meta;
    this.internal(frame, (reply) => this.onJoinReply(room, reply, rejoin));
  }

  private onJoinReply(room: Room, f: Frame, rejoin: boolean): void {
    if (f.op === "ok") {
      const r = toJoinResult(f);
      this.countPaused.delete(room.name);
      const waiters = room.joinWaiters.splice(0);
      for (const w of waiters) {
        clearTimeout(w.timer);
        w.resolve(r);
      }
      if (!room.wanted) return; // left meanwhile
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
      // A rejoin the server could not serve now (broker away, rate limit): try again on this socket.
      const ws = this.ws;
      const delay = Math.max(p.retryAfterMs ?? 0, reconnectDelay(1, undefined, this.backoff));
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

  private onMessage(f: Frame): void {
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

  private onStatus(user: string, online: boolean): void {
    if (!this.watched.has(user) || this.watched.get(user) === online) return;
    this.watched.set(user, online);
    this.listeners.emit("status", { user, online });
  }

  /** The answer of a reconnect's `watch`: what changed while offline is told as `status`. */
  private onRewatch(f: Frame): void {
    if (f.op !== "ok") {
      const p = errorParts(f);
      this.listeners.emit("error", new HeraldError(p.code, `watch again after reconnecting: ${p.message}`, p.retryAfterMs));
      return;
    }
    const status = (f.status && typeof f.status === "object" ? f.status : {}) as Record<string, unknown>;
    for (const [user, online] of Object.entries(status)) {
      if (!this.watched.has(user)) continue;
      // A user whose own `watch` is still unanswered is told by that answer, not as a change.
      if (this.watched.get(user) === undefined) this.watched.set(user, online === true);
      else this.onStatus(user, online === true);
    }
  }

  private onRead(f: Frame): void {
    const ev: ReadEvent = { room: str(f.room), offset: num(f.offset), unread: num(f.unread) };
    this.unreadCounts.set(ev.room, ev.unread);
    const room = this.room(ev.room);
    room.emit("read", ev);
    if (this.personalRoom && this.personalRoom !== room) this.personalRoom.emit("read", ev);
  }

  /** Puts `out` on the wire (the session is up). */
  private transmit(out: Outgoing): void {
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
      // The socket is going; its close event takes `out` back for the next one.
    }
  }

  /** A request of the client's own; dropped (not re-sent) if the socket dies. */
  private internal(frame: Frame, onReply: (f: Frame) => void = () => {}): void {
    if (!this.session) return;
    this.transmit({ frame, kind: "internal", seq: ++this.nextSeq, onReply });
  }

  private timeOut(out: Outgoing): void {
    if (out.id !== undefined) this.inflight.delete(out.id);
    this.waiting = this.waiting.filter((o) => o !== out);
    this.queue.remove(out);
    out.reject?.(
      new HeraldError("timeout", `no answer to ${String(out.frame.op)} within ${this.requestTimeoutMs} ms`),
    );
  }

  // ---- liveness ----

  /**
   * Browsers hide WebSocket pings, so the client watches frames instead:
   * after 40% of the heartbeat without one it sends `ping`, and half a
   * heartbeat without an answer means the connection is dead. A dead
   * connection is thus noticed within about one heartbeat of its last frame.
   */
  private startHeartbeat(heartbeatMs: number): void {
    this.heartbeatMs = Math.max(200, heartbeatMs);
    this.lastRx = Date.now();
    this.pingSentAt = 0;
    clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = setInterval(() => this.checkLiveness(), Math.max(50, Math.floor(this.heartbeatMs / 10)));
  }

  private checkLiveness(): void {
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
  private scheduleRefresh(): void {
    clearTimeout(this.refreshTimer);
    if (this.getToken === undefined || this.expiresAtMs <= 0) return;
    const remaining = this.expiresAtMs - Date.now();
    const margin = Math.min(60_000, Math.max(1_000, remaining / 4));
    const delay = Math.min(2 ** 31 - 1, Math.max(0, remaining - margin));
    this.refreshTimer = setTimeout(() => void this.refresh(), delay);
  }

  private retryRefresh(): void {
    const remaining = this.expiresAtMs - Date.now();
    if (remaining <= 0) return; // the server ends the session; the reconnect gets a new token
    clearTimeout(this.refreshTimer);
    this.refreshTimer = setTimeout(() => void this.refresh(), Math.max(200, Math.min(5_000, remaining / 3)));
  }

  private async refresh(): Promise<void> {
    const ws = this.ws;
    if (!ws || !this.session || !this.getToken) return;
    let token: string;
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
        this.expiresAtMs = num(f.expires_at) * 1000;
        this.scheduleRefresh();
        return;
      }
      const p = errorParts(f);
      this.listeners.emit("error", new HeraldError(p.code, `refresh: ${p.message}`, p.retryAfterMs));
      this.retryRefresh();
    });
  }
}
