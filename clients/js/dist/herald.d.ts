// @herald/client 0.1.0: Herald's client for browsers and Node (ES module, no dependencies).
// Built from clients/js/src by `npm run build`; do not edit by hand.

/** The WebSocket subprotocol Herald speaks. */
export declare const SUBPROTOCOL = "herald.v1";
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
    connections: {
        conn: string;
        node: string;
        meta: unknown;
    }[];
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
export declare class HeraldError extends Error {
    readonly code: string;
    /** When the server said how long to wait (`rate_limited`). */
    readonly retryAfterMs?: number;
    constructor(code: string, message: string, retryAfterMs?: number);
}
/**
 * A room as this client sees it: membership that survives reconnects, the
 * last durable offset delivered, the presence `meta` re-sent on rejoin.
 * Get one with `herald.room(name)`.
 */
export declare class Room {
    readonly name: string;
    private readonly client;
    private readonly listeners;
    /** Joined, as far as the application is concerned: true from the first `ok` until `leave`, through reconnects. */
    get joined(): boolean;
    /** The last durable offset delivered (or the room's offset at join time). */
    get position(): {
        epoch: string;
        offset: number;
    } | undefined;
    /**
     * Joins, and stays joined across reconnects until `leave`. `since` resumes
     * a durable room from a position the application kept (say in storage);
     * without it, a room already seen resumes from `position`.
     */
    join(opts?: {
        meta?: object;
        since?: {
            epoch: string;
            offset: number;
        };
    }): Promise<JoinResult>;
    /** Leaves the room (no rejoin afterwards). The personal room cannot be left. */
    leave(): Promise<void>;
    /**
     * Publishes `data`. Offline, it waits in the offline queue (bounded:
     * `queue_full` beyond) and goes out after the rooms are rejoined. Every
     * publish carries an idempotency `key` (generated when not given), so one
     * in flight when the connection died is sent again with the same key and a
     * durable room stores it once. Resolves with its position in durable rooms
     * (`epoch` `""` and `offset` 0 in ephemeral ones).
     */
    publish(data: unknown, opts?: {
        key?: string;
        echo?: boolean;
    }): Promise<{
        epoch: string;
        offset: number;
    }>;
    /** The room's members, one entry per user. */
    presence(): Promise<Member[]>;
    /** Stored messages after `since` (all kept ones without it), oldest first. */
    history(opts?: {
        since?: {
            epoch: string;
            offset: number;
        };
        limit?: number;
    }): Promise<{
        epoch: string;
        messages: Message[];
    }>;
    /** Sets this connection's presence data; remembered and sent again with every rejoin. */
    setMeta(meta: object): Promise<void>;
    /** Moves the user's read marker (only forward); every device of the user gets a `read` event. */
    markRead(offset: number): Promise<{
        offset: number;
        unread: number;
    }>;
    on(ev: "message", fn: (m: Message) => void): () => void;
    on(ev: "presence", fn: (p: PresenceEvent) => void): () => void;
    on(ev: "read", fn: (r: ReadEvent) => void): () => void;
    /** After each automatic rejoin: `recovered: false` means messages were lost for good (history trimmed or a new epoch). */
    on(ev: "rejoined", fn: (r: JoinResult) => void): () => void;
}
/** The client. `url` may list several edges: each reconnect tries the next. */
export declare class Herald {
    private readonly urls;
    private urlIndex;
    private readonly token;
    private readonly getToken;
    private readonly clientInfo;
    private readonly requestTimeoutMs;
    private readonly reconnectOn;
    private readonly backoff;
    private readonly WS;
    private readonly listeners;
    private _state;
    private ws;
    /** Bumped by every attempt and by close(): an older attempt's callbacks do nothing. */
    private generation;
    /** `connected` arrived on the current socket. */
    private session;
    private connectId;
    private handshakeError;
    private disconnectFrame;
    private nextId;
    private nextSeq;
    private readonly inflight;
    /** Requests (not publishes) waiting for a connection. */
    private waiting;
    private readonly queue;
    private readonly rooms;
    private personalRoom;
    private readonly unreadCounts;
    /** Users watched, with what the client last knew of them: watched again on every new connection. */
    private readonly watched;
    /** Rooms whose counts `connected` gave and whose replay has not ended yet: not counted again. */
    private readonly countPaused;
    private attempt;
    private authFailures;
    private everConnected;
    private last;
    private expiresAtMs;
    private heartbeatMs;
    private lastRx;
    private pingSentAt;
    private connectWaiters;
    private reconnectTimer;
    private connectTimer;
    private refreshTimer;
    private heartbeatTimer;
    constructor(url: string | string[], options: HeraldOptions);
    get state(): State;
    get user(): string | undefined;
    get conn(): string | undefined;
    get node(): string | undefined;
    /** Seconds since the epoch when the session ends unless refreshed (moves with each `refresh`). */
    get expiresAt(): number | undefined;
    /** The personal room `user:<sub>` (known after the first connect). */
    get personal(): Room;
    /** Resolves on `connected`; keeps retrying (when reconnect is on) until then or until close(). */
    connect(): Promise<Connected>;
    /** Closes for good: no reconnect; whatever waits fails with `closed`. */
    close(): void;
    on(ev: "connected", fn: (c: Connected) => void): () => void;
    on(ev: "disconnected", fn: (d: Disconnected) => void): () => void;
    on(ev: "error", fn: (e: HeraldError) => void): () => void;
    on(ev: "status", fn: (s: StatusEvent) => void): () => void;
    /**
     * Watches `users` (the token's `watch` claim must allow them): resolves
     * with whether each is online now, and from then on emits `status` at
     * each of their transitions. After a reconnect the client watches them
     * again and emits `status` for every change it missed meanwhile.
     */
    watch(users: string[]): Promise<Record<string, boolean>>;
    /** Stops the `status` events of `users`. */
    unwatch(users: string[]): Promise<void>;
    /** The room `name`; the same object every time. */
    room(name: string): Room;
    /**
     * Unread messages in `room`: from `connected.unread`, moved by `read` events and new messages.
     * A room without a read marker (absent from `connected.unread`) keeps the client's own count
     * across reconnects, plus what the rejoin recovers.
     */
    unread(room: string): number;
    private open;
    /** Stops listening to the current socket. */
    private detach;
    /** Gives up on a socket that went silent (no answer to a ping, no `connected`): as if it closed. */
    private dropSocket;
    private onClose;
    /** Schedules the next attempt, on the next URL. */
    private attemptFailed;
    /** The end: everything waiting fails with `err` (requests with `closed`). */
    private shutdown;
    /** What was on the wire when the socket died goes out again on the next one. */
    private takeBackInflight;
    private onData;
    private onReply;
    private onConnected;
    private sendJoin;
    private onJoinReply;
    private onMessage;
    private onStatus;
    /** The answer of a reconnect's `watch`: what changed while offline is told as `status`. */
    private onRewatch;
    private onRead;
    /** Puts `out` on the wire (the session is up). */
    private transmit;
    /** A request of the client's own; dropped (not re-sent) if the socket dies. */
    private internal;
    private timeOut;
    /**
     * Browsers hide WebSocket pings, so the client watches frames instead:
     * after 40% of the heartbeat without one it sends `ping`, and half a
     * heartbeat without an answer means the connection is dead. A dead
     * connection is thus noticed within about one heartbeat of its last frame.
     */
    private startHeartbeat;
    private checkLiveness;
    /** With getToken: `refresh` a quarter of the way before expiry (at least 1 s, at most 60 s before). */
    private scheduleRefresh;
    private retryRefresh;
    private refresh;
}
