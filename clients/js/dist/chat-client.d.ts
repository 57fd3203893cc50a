/**
 * Client for the chat gateway (protocol version 1).
 *
 * One `ChatClient` keeps one logical connection alive: it reconnects with backoff and jitter,
 * resumes every room where it left off, retries sends under a stable client id so that a retry
 * never posts twice, and falls back from WebSocket to SSE + POST where WebSockets do not get
 * through. It has no dependencies; the WebSocket, EventSource, fetch and timer implementations
 * can be injected (tests, Node).
 */
export type TransportName = "websocket" | "sse";
export type ConnectionState = "connecting" | "connected" | "reconnecting" | "disconnected";
/** What a close code asks of a client: reconnect and resume, or stop and tell the app. */
export type CloseCodeClass = "reconnect" | "terminal";
/** The parts of a WebSocket the client uses (a browser `WebSocket` or the `ws` package fit). */
export interface WebSocketLike {
    onopen: ((event: any) => void) | null;
    onmessage: ((event: any) => void) | null;
    onclose: ((event: any) => void) | null;
    onerror: ((event: any) => void) | null;
    send(data: string): void;
    close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;
/** The parts of an EventSource the client uses. */
export interface EventSourceLike {
    onmessage: ((event: any) => void) | null;
    onerror: ((event: any) => void) | null;
    close(): void;
}
export type EventSourceConstructor = new (url: string) => EventSourceLike;
export interface FetchResponseLike {
    readonly status: number;
    readonly headers?: {
        get(name: string): string | null;
    };
    text(): Promise<string>;
}
export type FetchLike = (url: string, init: {
    method: string;
    headers: Record<string, string>;
    body: string;
}) => Promise<FetchResponseLike>;
export interface Timers {
    setTimeout(callback: () => void, ms: number): unknown;
    clearTimeout(handle: unknown): void;
    /** Wall clock in Unix milliseconds; used to schedule token refreshes. */
    now?(): number;
}
/** A `localStorage`-like store for the anonymous reconnect token. */
export interface StorageLike {
    getItem(key: string): string | null;
    setItem(key: string, value: string): void;
    removeItem?(key: string): void;
}
export type TokenProvider = () => string | Promise<string>;
export interface BackoffOptions {
    /** First reconnect delay cap, ms (default 500). */
    min?: number;
    /** Largest delay, ms (default 20000). */
    max?: number;
    /** Growth per failed attempt (default 2). */
    factor?: number;
    /** Where the delay starts after a 1008 policy close (rate limits), ms (default 5000). */
    policyMin?: number;
}
export interface ChatClientOptions {
    /** `http(s)://host[:port][/prefix]` or `ws(s)://…`; `/ws`, `/sse` and `/sse/send` are derived from it. */
    url: string;
    /** The connection's default room (default `lobby`). */
    room?: string;
    /** Display name sent with every message. */
    name?: string;
    /** A JWT, or a function returning one; the function is called at every (re)connect and to refresh. */
    token?: string | TokenProvider;
    /** Receive `presence` events for the default room. */
    presence?: boolean;
    /** Transports in order of preference (default `["websocket", "sse"]`). */
    transports?: TransportName[];
    backoff?: BackoffOptions;
    /** A connection that lasts this long (ms) resets the backoff (default 10000). */
    stableAfter?: number;
    /** Seconds before the token's `exp` to fetch a fresh token and send it in an `auth` frame (default 60). */
    refreshBefore?: number;
    /** How long a request waits for its reply before it is sent again, ms (default 10000). */
    ackTimeout?: number;
    /** How many times a request is sent again after a failure, a drop or a timeout (default 3). */
    sendRetries?: number;
    /** How long a connection attempt may take until the welcome frame, ms (default 10000). */
    connectTimeout?: number;
    /** Application ping interval, ms; no frame at all for two intervals drops the connection (default 25000, 0 = off). */
    pingInterval?: number;
    /** Consecutive failed attempts on one transport before the next one is tried (default 2). */
    fallbackAfter?: number;
    /** While on a fallback transport, every N-th reconnect tries the preferred one again (default 5). */
    retryPreferredEvery?: number;
    /** Upper bound for one SSE POST body, bytes (default 65536; the server allows twice its frame limit). */
    maxPostBytes?: number;
    WebSocket?: WebSocketConstructor;
    EventSource?: EventSourceConstructor;
    fetch?: FetchLike;
    timers?: Timers;
    /** Source of randomness for the jitter, `[0, 1)` (default `Math.random`). */
    random?: () => number;
    /** Where the anonymous reconnect token is kept (default: in memory, for this client only). */
    storage?: StorageLike;
    /** Storage key for the reconnect token (default `chat.reconnectToken`). */
    storageKey?: string;
}
export interface ChatMessage {
    room: string;
    id: string;
    userId: string;
    name?: string;
    message: string;
    ts: number;
    offset?: string;
    epoch?: string;
}
export interface Ack {
    room: string;
    id: string;
    offset?: string;
    epoch?: string;
    cid: string;
    /** The server already had this `cid`: an earlier attempt got through. */
    duplicate: boolean;
}
export interface PresenceUser {
    userId: string;
    name?: string;
}
export interface PresenceEvent {
    room: string;
    event: "join" | "leave";
    userId: string;
    name?: string;
}
export interface JoinedEvent {
    room: string;
    epoch?: string;
    /** Present when the join resumed from an offset: `false` means messages were lost (see `gap`). */
    recovered?: boolean;
    /** `true` when this is the client rejoining after a reconnect, not a `join()` call. */
    rejoin: boolean;
}
export interface LeftEvent {
    room: string;
    /** Set when the server refused to rejoin the room after a reconnect. */
    error?: ChatError;
}
export interface GapEvent {
    room: string;
    epoch?: string;
    /**
     * `not_recovered`: the server could not replay everything missed (history trimmed, expired,
     * or lost: the epoch changed). `no_position`: the room was rejoined after a drop, but no
     * message had arrived in it yet, so there was no offset to resume from.
     */
    reason: "not_recovered" | "no_position";
}
export interface Welcome {
    userId: string;
    node: string;
    room: string;
    transport: TransportName;
    protocol?: number;
}
export interface StateEvent {
    state: ConnectionState;
    previous: ConnectionState;
    /** Close code that ended the previous connection (1006 when it ended without one). */
    code?: number;
    reason?: string;
    /** Delay before the next attempt, ms (`reconnecting` only). */
    delay?: number;
    /** Consecutive attempts since the last stable connection (`reconnecting` only). */
    attempt?: number;
    transport?: TransportName;
}
export interface AuthenticatedEvent {
    userId: string;
    exp: number;
}
export interface HistoryResult {
    room: string;
    epoch: string | null;
    /** Present when `since` was given: `false` means messages after it are gone. */
    recovered?: boolean;
    messages: ChatMessage[];
}
export interface JoinOptions {
    /** Receive `presence` events for this room (kept across reconnects). */
    presence?: boolean;
    /** Replay the room's last N messages (1–1000) first. */
    last?: number;
}
export interface HistoryOptions {
    /** 1–1000 (server default 100). */
    limit?: number;
    since?: string;
    epoch?: string;
}
export interface ChatEvents {
    message: ChatMessage;
    presence: PresenceEvent;
    joined: JoinedEvent;
    left: LeftEvent;
    error: ChatError;
    state: StateEvent;
    gap: GapEvent;
    welcome: Welcome;
    authenticated: AuthenticatedEvent;
}
/**
 * A refused or failed request. `code` is the server's error code (`forbidden`, `not_in_room`,
 * `message_too_large`, …) or one of the client's own: `timeout` (no reply after every retry),
 * `connection_lost` (the connection dropped on every try), `closed` (`close()` was called or the
 * server closed the connection for good; then `closeCode` says how), `token_unavailable`
 * (the token callback failed), `default_room` (the default room cannot be left).
 */
export declare class ChatError extends Error {
    readonly code: string;
    readonly reason: string;
    readonly room?: string;
    readonly closeCode?: number;
    constructor(code: string, reason: string, details?: {
        room?: string;
        closeCode?: number;
    });
}
/**
 * The class of a close code. Codes the protocol does not list reconnect: a newer server's
 * code is more likely transient than a reason to give up for good.
 */
export declare function closeCodeClass(code: number): CloseCodeClass;
/** The gateway's endpoints for a base URL. A trailing `/ws` or `/sse` is tolerated. */
export declare function endpointsFor(url: string): {
    websocket: string;
    sse: string;
    send: string;
};
/** A JWT's `exp` (Unix seconds), read without verifying the token: only for scheduling. */
export declare function tokenExpiry(jwt: string): number | undefined;
/**
 * Compares two `"<ms>-<seq>"` offsets part by part. Offsets that do not parse compare as newer:
 * then arrival order is all there is to go by.
 */
export declare function compareOffsets(a: string, b: string): number;
export type Listener<T> = (event: T) => void;
export declare class ChatClient {
    readonly defaultRoom: string;
    private readonly opts;
    private readonly endpoints;
    private readonly transports;
    private readonly WebSocketImpl?;
    private readonly EventSourceImpl?;
    private readonly fetchImpl?;
    private readonly timers;
    private readonly random;
    private readonly storage;
    private readonly listeners;
    private _state;
    private running;
    private generation;
    private conn;
    private welcomed;
    private everWelcomed;
    private info;
    private waiters;
    private attempt;
    private transportIndex;
    private transportFailures;
    private onFallback;
    private fallbackOpens;
    private probing;
    private reconnectTimer;
    private connectTimer;
    private stableTimer;
    private pingTimer;
    private refreshTimer;
    private awaitingPong;
    private token;
    private nextToken;
    private handshakeResumed;
    private readonly rooms;
    private readonly pending;
    private readonly byRef;
    private readonly byCid;
    private nextId;
    private nextRef;
    constructor(options: ChatClientOptions);
    get state(): ConnectionState;
    /** The server-assigned user id of the current (or last) connection. */
    get userId(): string | undefined;
    /** The transport of the current connection. */
    get transport(): TransportName | undefined;
    /** Rooms this client is in (or will rejoin once connected), the default room first. */
    get joinedRooms(): string[];
    /** Where a room's history was last seen: what a resume would ask for. */
    position(room: string): {
        offset?: string;
        epoch?: string;
    };
    /** Adds a listener; returns a function that removes it. */
    on<K extends keyof ChatEvents>(type: K, listener: Listener<ChatEvents[K]>): () => void;
    off<K extends keyof ChatEvents>(type: K, listener: Listener<ChatEvents[K]>): void;
    private emit;
    /**
     * Starts connecting (and keeps reconnecting until `close()` or a terminal close). Resolves
     * with the first welcome; rejects if the client ends up disconnected before that.
     */
    connect(): Promise<Welcome>;
    /** Skips the wait before the next attempt (for example when the browser comes back online). */
    reconnectNow(): void;
    /**
     * Closes the connection for good and rejects every outstanding request with `closed`. The
     * rooms and their positions are kept: a later `connect()` resumes them.
     */
    close(): void;
    private supports;
    private open;
    private currentToken;
    private pickTransport;
    private transportFailed;
    private readReconnectToken;
    private backoff;
    private scheduleReconnect;
    private setState;
    private lost;
    private afterConnection;
    private stop;
    private onFrame;
    private onWelcome;
    private onMessage;
    private onAck;
    private onJoined;
    private onReply;
    private historyResult;
    private onPresenceEvent;
    private onAuthenticated;
    private onErrorFrame;
    private answerError;
    private onDelivered;
    private onRefused;
    private request;
    private transmit;
    private retryLater;
    private fail;
    private joining;
    private releaseMessages;
    private settle;
    private clearTimer;
    private joinRequest;
    /**
     * Sends a chat message; resolves with its ack. The message keeps one `cid` through every
     * retry, so the server stores it at most once. Queued while disconnected, in order.
     */
    send(room: string, text: string): Promise<Ack>;
    /**
     * Joins a room; it stays joined across reconnects (resumed from its last offset) until
     * `leave()`. Joining a room already joined resolves at once and changes nothing.
     */
    join(room: string, options?: JoinOptions): Promise<JoinedEvent>;
    /** Leaves a room. Its messages stop at once; a reconnect does not rejoin it. */
    leave(room: string): Promise<void>;
    /** Everyone online in a room, across the cluster, each user once. */
    presence(room: string): Promise<PresenceUser[]>;
    /**
     * A page of a room's stored history: the newest `limit` messages, or those after `since`.
     * These are not delivered as `message` events and do not move the room's resume position.
     */
    history(room: string, options?: HistoryOptions): Promise<HistoryResult>;
    private startPing;
    private now;
    private scheduleRefresh;
    private refresh;
}
