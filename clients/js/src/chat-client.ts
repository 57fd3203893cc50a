/**
 * Client for the chat gateway (protocol version 1).
 *
 * One `ChatClient` keeps one logical connection alive: it reconnects with backoff and jitter,
 * resumes every room where it left off, retries sends under a stable client id so that a retry
 * never posts twice, and falls back from WebSocket to SSE + POST where WebSockets do not get
 * through. It has no dependencies; the WebSocket, EventSource, fetch and timer implementations
 * can be injected (tests, Node).
 */

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

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
  readonly headers?: { get(name: string): string | null };
  text(): Promise<string>;
}
export type FetchLike = (
  url: string,
  init: { method: string; headers: Record<string, string>; body: string },
) => Promise<FetchResponseLike>;

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
export class ChatError extends Error {
  readonly code: string;
  readonly reason: string;
  readonly room?: string;
  readonly closeCode?: number;

  constructor(code: string, reason: string, details: { room?: string; closeCode?: number } = {}) {
    super(reason ? `${code}: ${reason}` : code);
    this.name = "ChatError";
    this.code = code;
    this.reason = reason;
    if (details.room !== undefined) this.room = details.room;
    if (details.closeCode !== undefined) this.closeCode = details.closeCode;
  }
}

// ---------------------------------------------------------------------------------------------
// Protocol rules
// ---------------------------------------------------------------------------------------------

// Codes after which reconnecting would only repeat the failure, or that the app asked for.
const TERMINAL_CODES = new Set([1000, 1002, 1007, 1009, 4004]);
const POLICY_VIOLATION = 1008;
const TOKEN_EXPIRED = 4003;
// What a connection that ended without a close frame reports, as browsers do.
const ABNORMAL = 1006;

/**
 * The class of a close code. Codes the protocol does not list reconnect: a newer server's
 * code is more likely transient than a reason to give up for good.
 */
export function closeCodeClass(code: number): CloseCodeClass {
  return TERMINAL_CODES.has(code) ? "terminal" : "reconnect";
}

const ROOM_RE = /^[A-Za-z0-9_.:-]{1,64}$/;
const CONTROL_RE = /[\u0000-\u001f\u007f-\u009f]/;
const MAX_FRAMES_PER_POST = 32;

// Server error codes after which the same request may simply be sent again. A message carries a
// cid, so even `publish_unknown` (maybe stored) cannot post it twice.
const RETRY_MESSAGE = new Set(["publish_unknown", "publish_failed", "unavailable", "internal", "rate_limited"]);
const RETRY_OTHER = new Set(["unavailable", "internal", "rate_limited"]);

/** The gateway's endpoints for a base URL. A trailing `/ws` or `/sse` is tolerated. */
export function endpointsFor(url: string): { websocket: string; sse: string; send: string } {
  const m = /^(wss?|https?):\/\/([^/?#]+)([^?#]*)/i.exec(url.trim());
  if (!m) throw new TypeError(`url must start with http://, https://, ws:// or wss://: ${url}`);
  const secure = /^(https|wss)$/i.test(m[1]);
  const path = m[3].replace(/\/+$/, "").replace(/\/(ws|sse)$/, "");
  const host = m[2];
  const http = `${secure ? "https" : "http"}://${host}${path}`;
  return {
    websocket: `${secure ? "wss" : "ws"}://${host}${path}/ws`,
    sse: `${http}/sse`,
    send: `${http}/sse/send`,
  };
}

/** A JWT's `exp` (Unix seconds), read without verifying the token: only for scheduling. */
export function tokenExpiry(jwt: string): number | undefined {
  const part = jwt.split(".")[1];
  if (!part) return undefined;
  try {
    const payload = JSON.parse(base64UrlDecode(part));
    return typeof payload?.exp === "number" ? payload.exp : undefined;
  } catch {
    return undefined;
  }
}

// Bytes as a binary string. Multi-byte UTF-8 stays mangled inside JSON strings, which keeps the
// JSON valid and leaves the numeric `exp` intact; nothing else is read from the payload.
function base64UrlDecode(text: string): string {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  const clean = text.replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_");
  let bits = 0;
  let value = 0;
  let out = "";
  for (const ch of clean) {
    const n = alphabet.indexOf(ch);
    if (n < 0) throw new Error("not base64url");
    value = (value << 6) | n;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += String.fromCharCode((value >> bits) & 0xff);
    }
  }
  return out;
}

/**
 * Compares two `"<ms>-<seq>"` offsets part by part. Offsets that do not parse compare as newer:
 * then arrival order is all there is to go by.
 */
export function compareOffsets(a: string, b: string): number {
  const pa = a.split("-").map(Number);
  const pb = b.split("-").map(Number);
  if (pa.some(Number.isNaN) || pb.some(Number.isNaN)) return 1;
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const d = (pa[i] ?? 0) - (pb[i] ?? 0);
    if (d !== 0) return d < 0 ? -1 : 1;
  }
  return 0;
}

function newCid(random: () => number): string {
  const c = (globalThis as any).crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  let s = "c-";
  for (let i = 0; i < 32; i++) s += Math.floor(random() * 16).toString(16);
  return s;
}

function utf8Length(text: string): number {
  let n = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff) { n += 4; i++; }
    else n += 3;
  }
  return n;
}

function str(v: unknown): string | undefined {
  return typeof v === "string" ? v : typeof v === "number" ? String(v) : undefined;
}

function toMessage(f: Frame, room: string): ChatMessage {
  const m: ChatMessage = {
    room,
    id: String(f.id ?? ""),
    userId: String(f.userId ?? ""),
    message: String(f.message ?? ""),
    ts: typeof f.ts === "number" ? f.ts : 0,
  };
  if (typeof f.name === "string") m.name = f.name;
  const offset = str(f.offset);
  if (offset !== undefined) m.offset = offset;
  if (typeof f.epoch === "string") m.epoch = f.epoch;
  return m;
}

function parseFrame(data: unknown): Frame | null {
  if (typeof data !== "string") return null;
  try {
    const f = JSON.parse(data);
    return f && typeof f === "object" && !Array.isArray(f) ? f : null;
  } catch {
    return null;
  }
}

// Thrown listener errors surface as uncaught errors, without breaking the client's own state.
function rethrowLater(error: unknown): void {
  const q = (globalThis as any).queueMicrotask;
  if (typeof q === "function") q(() => { throw error; });
  else Promise.reject(error);
}

type Frame = Record<string, any>;

class MemoryStorage implements StorageLike {
  private readonly items = new Map<string, string>();
  getItem(key: string): string | null { return this.items.get(key) ?? null; }
  setItem(key: string, value: string): void { this.items.set(key, value); }
  removeItem(key: string): void { this.items.delete(key); }
}

// ---------------------------------------------------------------------------------------------
// Transports
// ---------------------------------------------------------------------------------------------

/** What a transport tells the client. Every call is for the connection that made it. */
interface ConnHooks {
  frame(frame: Frame): void;
  /** The connection is gone; not called after the client's own `close()`. */
  ended(code: number, reason: string): void;
  /** These frames reached the server (a WebSocket send, or a POST answered 202). */
  delivered(frames: Frame[]): void;
  /** The server refused these frames for good (SSE POST 400 or 413). */
  refused(frame: Frame, code: string, reason: string): void;
}

interface Conn {
  readonly transport: TransportName;
  send(frame: Frame): void;
  close(): void;
}

class WebSocketConn implements Conn {
  readonly transport = "websocket";
  private ws: WebSocketLike | null;

  constructor(Ctor: WebSocketConstructor, url: string, protocols: string[], private readonly hooks: ConnHooks) {
    const ws = new Ctor(url, protocols);
    this.ws = ws;
    ws.onmessage = (event) => {
      const f = parseFrame(event?.data);
      if (f) hooks.frame(f);
    };
    ws.onclose = (event) => {
      this.detach();
      hooks.ended(typeof event?.code === "number" ? event.code : ABNORMAL, String(event?.reason ?? ""));
    };
    // An error is always followed by a close event, which carries what the client acts on.
    ws.onerror = () => {};
  }

  send(frame: Frame): void {
    if (!this.ws) return;
    try {
      this.ws.send(JSON.stringify(frame));
    } catch {
      return; // not open any more: the close event follows and the request is retried
    }
    this.hooks.delivered([frame]);
  }

  close(): void {
    const ws = this.detach();
    try { ws?.close(1000); } catch { /* already closed */ }
  }

  private detach(): WebSocketLike | null {
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    return ws;
  }
}

interface SseEnv {
  fetch: FetchLike;
  timers: Timers;
  sendUrl: string;
  maxPostBytes: number;
  delay(attempt: number): number;
}

/**
 * Server frames arrive on an EventSource, client frames leave in POSTs: one POST at a time so
 * the server sees them in order, each carrying whatever queued up meanwhile.
 */
class SseConn implements Conn {
  readonly transport = "sse";
  private es: EventSourceLike | null;
  private session: string | null = null;
  private queue: Frame[] = [];
  private posting = false;
  private retryTimer: unknown = undefined;
  private failures = 0;
  private batchLimit = MAX_FRAMES_PER_POST;
  private done = false;

  constructor(Ctor: EventSourceConstructor, url: string, private readonly env: SseEnv, private readonly hooks: ConnHooks) {
    const es = new Ctor(url);
    this.es = es;
    es.onmessage = (event) => {
      const f = parseFrame(event?.data);
      if (!f) return;
      if (f.type === "close") {
        this.end(typeof f.code === "number" ? f.code : ABNORMAL, String(f.reason ?? ""));
        return;
      }
      if (f.type === "userId" && typeof f.session === "string") this.session = f.session;
      hooks.frame(f);
      this.pump();
    };
    // EventSource would reconnect on its own, as a new session that only resumes the default
    // room. The client reconnects itself instead, so that every room is resumed.
    es.onerror = () => this.end(ABNORMAL, "event stream failed");
  }

  send(frame: Frame): void {
    if (this.done) return;
    this.queue.push(frame);
    this.pump();
  }

  close(): void {
    this.done = true;
    this.queue = [];
    if (this.retryTimer !== undefined) this.env.timers.clearTimeout(this.retryTimer);
    const es = this.es;
    this.es = null;
    if (es) {
      es.onmessage = es.onerror = null;
      try { es.close(); } catch { /* already closed */ }
    }
  }

  private end(code: number, reason: string): void {
    if (this.done) return;
    this.close();
    this.hooks.ended(code, reason);
  }

  private pump(): void {
    if (this.done || this.posting || this.retryTimer !== undefined || !this.session || !this.queue.length) return;
    const batch = this.takeBatch(this.session);
    this.posting = true;
    void this.post(batch);
  }

  private takeBatch(session: string): Frame[] {
    let size = utf8Length(JSON.stringify({ session, frames: [] }));
    let n = 0;
    while (n < this.queue.length && n < this.batchLimit) {
      const add = utf8Length(JSON.stringify(this.queue[n])) + 1;
      if (n > 0 && size + add > this.env.maxPostBytes) break;
      size += add;
      n++;
    }
    return this.queue.splice(0, n);
  }

  private async post(batch: Frame[]): Promise<void> {
    let status = 0;
    let body = "";
    let retryAfter: string | null = null;
    try {
      const res = await this.env.fetch(this.env.sendUrl, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ session: this.session, frames: batch }),
      });
      status = res.status;
      retryAfter = res.headers?.get("retry-after") ?? null;
      body = await res.text().catch(() => "");
    } catch {
      status = 0; // network failure: the frames may or may not have arrived
    }
    this.posting = false;
    if (this.done) return;
    const error = (parseFrame(body)?.error ?? {}) as Frame;
    const code = typeof error.code === "string" ? error.code : "";
    const reason = typeof error.reason === "string" ? error.reason : "";

    if (status >= 200 && status < 300) {
      this.failures = 0;
      this.batchLimit = MAX_FRAMES_PER_POST;
      this.hooks.delivered(batch);
    } else if (status === 404 || status === 403) {
      // The session is gone (or was never ours): the stream is as good as closed.
      this.end(ABNORMAL, code || (status === 404 ? "unknown_session" : "forbidden"));
      return;
    } else if (status === 400) {
      for (const f of batch) this.hooks.refused(f, code || "invalid_frame", reason);
    } else if (status === 413) {
      if (batch.length === 1) {
        this.hooks.refused(batch[0], "message_too_large", reason || "request body too large");
      } else {
        this.batchLimit = Math.max(1, Math.floor(batch.length / 2));
        this.queue.unshift(...batch);
      }
    } else {
      // 429, 503, another 5xx or no answer: the same frames again later, still in front.
      this.queue.unshift(...batch);
      this.failures++;
      if (status !== 429 && this.failures > 3) {
        this.end(ABNORMAL, code || `send failed (${status || "network"})`);
        return;
      }
      const seconds = Number(retryAfter);
      const wait = retryAfter !== null && Number.isFinite(seconds) && seconds >= 0
        ? seconds * 1000
        : this.env.delay(this.failures);
      this.retryTimer = this.env.timers.setTimeout(() => {
        this.retryTimer = undefined;
        this.pump();
      }, wait);
      return;
    }
    this.pump();
  }
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

interface RoomState {
  presence: boolean;
  last?: number;
  offset?: string;
  epoch?: string;
  /** Joined on some earlier connection: a rejoin without a position may have missed messages. */
  wasJoined: boolean;
}

type Kind = "message" | "join" | "leave" | "presence" | "history" | "auth";

/** Something sent that waits for a reply; kept until the reply comes, and sent again as needed. */
interface Request {
  id: number;
  kind: Kind;
  room: string;
  cid?: string;
  /** Built at every transmission, so a rejoin carries the room's latest offset. */
  build(): Frame;
  resolve(value: any): void;
  reject(error: ChatError): void;
  /** Someone awaits the promise; internal requests report failures as `error` events. */
  user: boolean;
  /** Every ref it was sent under: an ack to an earlier attempt settles it too. */
  refs: number[];
  retries: number;
  inFlight: boolean;
  timer?: unknown;
  /** join: whether this transmission resumed from an offset, and whether it was a rejoin. */
  resumed?: boolean;
  rejoin?: boolean;
}

export type Listener<T> = (event: T) => void;

export class ChatClient {
  readonly defaultRoom: string;

  private readonly opts: {
    name?: string;
    token?: string | TokenProvider;
    presence: boolean;
    min: number; max: number; factor: number; policyMin: number;
    stableAfter: number; refreshBefore: number; ackTimeout: number; sendRetries: number;
    connectTimeout: number; pingInterval: number; fallbackAfter: number; retryPreferredEvery: number;
    maxPostBytes: number; storageKey: string;
  };
  private readonly endpoints: { websocket: string; sse: string; send: string };
  private readonly transports: TransportName[];
  private readonly WebSocketImpl?: WebSocketConstructor;
  private readonly EventSourceImpl?: EventSourceConstructor;
  private readonly fetchImpl?: FetchLike;
  private readonly timers: Timers;
  private readonly random: () => number;
  private readonly storage: StorageLike;
  private readonly listeners = new Map<keyof ChatEvents, Set<Listener<any>>>();

  private _state: ConnectionState = "disconnected";
  private running = false;
  // Bumped by every attempt and by close(): a token callback that resolves late checks it.
  private generation = 0;
  private conn: Conn | null = null;
  private welcomed = false;
  private everWelcomed = false;
  private info: Welcome | null = null;
  private waiters: { resolve(w: Welcome): void; reject(e: ChatError): void }[] = [];

  private attempt = 0;
  private transportIndex = 0;
  private transportFailures = 0;
  private onFallback = false;
  private fallbackOpens = 0;
  private probing = false;

  private reconnectTimer: unknown = undefined;
  private connectTimer: unknown = undefined;
  private stableTimer: unknown = undefined;
  private pingTimer: unknown = undefined;
  private refreshTimer: unknown = undefined;
  private awaitingPong = false;

  private token: string | undefined;
  private nextToken: string | undefined;
  // Whether the handshake carried since/epoch for the default room.
  private handshakeResumed = false;

  private readonly rooms = new Map<string, RoomState>();
  private readonly pending = new Map<number, Request>();
  private readonly byRef = new Map<number, Request>();
  private readonly byCid = new Map<string, Request>();
  private nextId = 1;
  private nextRef = 1;

  constructor(options: ChatClientOptions) {
    if (!options || typeof options.url !== "string") throw new TypeError("options.url is required");
    this.endpoints = endpointsFor(options.url);
    const room = options.room ?? "lobby";
    if (!ROOM_RE.test(room)) throw new TypeError(`room must be 1-64 characters of A-Z a-z 0-9 _ - . : (got ${JSON.stringify(room)})`);
    if (options.name !== undefined && (options.name.length < 1 || [...options.name].length > 64 || CONTROL_RE.test(options.name))) {
      throw new TypeError("name must be 1-64 characters without control characters");
    }
    this.defaultRoom = room;
    const b = options.backoff ?? {};
    this.opts = {
      name: options.name,
      token: options.token,
      presence: options.presence === true,
      min: b.min ?? 500,
      max: b.max ?? 20000,
      factor: b.factor ?? 2,
      policyMin: b.policyMin ?? 5000,
      stableAfter: options.stableAfter ?? 10000,
      refreshBefore: options.refreshBefore ?? 60,
      ackTimeout: options.ackTimeout ?? 10000,
      sendRetries: options.sendRetries ?? 3,
      connectTimeout: options.connectTimeout ?? 10000,
      pingInterval: options.pingInterval ?? 25000,
      fallbackAfter: Math.max(1, options.fallbackAfter ?? 2),
      retryPreferredEvery: Math.max(1, options.retryPreferredEvery ?? 5),
      maxPostBytes: options.maxPostBytes ?? 65536,
      storageKey: options.storageKey ?? "chat.reconnectToken",
    };
    const g = globalThis as any;
    this.WebSocketImpl = options.WebSocket ?? g.WebSocket;
    this.EventSourceImpl = options.EventSource ?? g.EventSource;
    const f = options.fetch ?? g.fetch;
    // A browser's fetch must not be called as a method of another object.
    this.fetchImpl = f ? (url, init) => f.call(g, url, init) : undefined;
    this.timers = options.timers ?? {
      setTimeout: (cb, ms) => g.setTimeout(cb, ms),
      clearTimeout: (h) => g.clearTimeout(h),
      now: () => Date.now(),
    };
    this.random = options.random ?? Math.random;
    this.storage = options.storage ?? new MemoryStorage();
    this.transports = (options.transports ?? ["websocket", "sse"]).filter((t, i, all) => all.indexOf(t) === i && this.supports(t));
    this.rooms.set(room, { presence: this.opts.presence, wasJoined: false });
  }

  // -- state -----------------------------------------------------------------------------------

  get state(): ConnectionState { return this._state; }
  /** The server-assigned user id of the current (or last) connection. */
  get userId(): string | undefined { return this.info?.userId; }
  /** The transport of the current connection. */
  get transport(): TransportName | undefined { return this.welcomed && this.conn ? this.conn.transport : undefined; }
  /** Rooms this client is in (or will rejoin once connected), the default room first. */
  get joinedRooms(): string[] { return [...this.rooms.keys()]; }
  /** Where a room's history was last seen: what a resume would ask for. */
  position(room: string): { offset?: string; epoch?: string } {
    const r = this.rooms.get(room);
    const p: { offset?: string; epoch?: string } = {};
    if (r?.offset !== undefined) p.offset = r.offset;
    if (r?.epoch !== undefined) p.epoch = r.epoch;
    return p;
  }

  // -- events ----------------------------------------------------------------------------------

  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof ChatEvents>(type: K, listener: Listener<ChatEvents[K]>): () => void {
    let set = this.listeners.get(type);
    if (!set) this.listeners.set(type, (set = new Set()));
    set.add(listener);
    return () => this.off(type, listener);
  }

  off<K extends keyof ChatEvents>(type: K, listener: Listener<ChatEvents[K]>): void {
    this.listeners.get(type)?.delete(listener);
  }

  private emit<K extends keyof ChatEvents>(type: K, event: ChatEvents[K]): void {
    for (const listener of [...(this.listeners.get(type) ?? [])]) {
      try { listener(event); } catch (e) { rethrowLater(e); }
    }
  }

  // -- connection ------------------------------------------------------------------------------

  /**
   * Starts connecting (and keeps reconnecting until `close()` or a terminal close). Resolves
   * with the first welcome; rejects if the client ends up disconnected before that.
   */
  connect(): Promise<Welcome> {
    if (!this.transports.length) {
      return Promise.reject(new TypeError("no transport available: pass options.WebSocket, or options.EventSource and options.fetch"));
    }
    const p = new Promise<Welcome>((resolve, reject) => {
      if (this.welcomed && this.info) resolve(this.info);
      else this.waiters.push({ resolve, reject });
    });
    if (!this.running) {
      this.running = true;
      this.attempt = 0;
      this.setState("connecting", {});
      void this.open();
    }
    return p;
  }

  /** Skips the wait before the next attempt (for example when the browser comes back online). */
  reconnectNow(): void {
    if (!this.running || this.conn || this.reconnectTimer === undefined) return;
    this.timers.clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    void this.open();
  }

  /**
   * Closes the connection for good and rejects every outstanding request with `closed`. The
   * rooms and their positions are kept: a later `connect()` resumes them.
   */
  close(): void {
    if (!this.running && this._state === "disconnected") return;
    this.generation++;
    this.running = false;
    const conn = this.conn;
    this.conn = null;
    conn?.close();
    this.afterConnection(false);
    this.timers.clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    this.stop(new ChatError("closed", "the client was closed"), { code: 1000, reason: "closed by the client" });
  }

  private supports(t: TransportName): boolean {
    if (t === "websocket") return typeof this.WebSocketImpl === "function";
    if (t === "sse") return typeof this.EventSourceImpl === "function" && typeof this.fetchImpl === "function";
    return false;
  }

  private async open(): Promise<void> {
    const gen = ++this.generation;
    this.reconnectTimer = undefined;
    let token: string | undefined;
    try {
      token = await this.currentToken();
    } catch (e) {
      if (gen !== this.generation || !this.running) return;
      this.emit("error", new ChatError("token_unavailable", errorText(e)));
      this.scheduleReconnect(ABNORMAL, "token unavailable", false);
      return;
    }
    if (gen !== this.generation || !this.running) return;
    this.token = token || undefined;

    const transport = this.pickTransport();
    const room = this.rooms.get(this.defaultRoom)!;
    const query: [string, string | undefined][] = [
      ["room", this.defaultRoom],
      ["name", this.opts.name],
      ["presence", room.presence ? "true" : undefined],
      ["since", room.offset],
      ["epoch", room.offset !== undefined ? room.epoch : undefined],
      ["reconnect", this.readReconnectToken()],
    ];
    // Browsers cannot put a token in a WebSocket header except as a subprotocol (which keeps it
    // out of access logs); an EventSource cannot set headers at all, so SSE uses the query.
    if (transport === "sse") query.push(["token", this.token]);
    const qs = query.filter(([, v]) => v !== undefined && v !== "").map(([k, v]) => `${k}=${encodeURIComponent(v!)}`).join("&");
    this.handshakeResumed = room.offset !== undefined;

    let conn: Conn | null = null;
    const hooks: ConnHooks = {
      frame: (f) => { if (conn && this.conn === conn) this.onFrame(conn, f); },
      ended: (code, reason) => { if (conn && this.conn === conn) this.lost(conn, code, reason); },
      delivered: (frames) => { if (conn && this.conn === conn) this.onDelivered(frames); },
      refused: (f, code, reason) => { if (conn && this.conn === conn) this.onRefused(f, code, reason); },
    };
    try {
      if (transport === "websocket") {
        const protocols = this.token ? ["chat.v1", `token.${this.token}`] : ["chat.v1"];
        conn = new WebSocketConn(this.WebSocketImpl!, `${this.endpoints.websocket}?${qs}`, protocols, hooks);
      } else {
        conn = new SseConn(this.EventSourceImpl!, `${this.endpoints.sse}?${qs}`, {
          fetch: this.fetchImpl!,
          timers: this.timers,
          sendUrl: this.endpoints.send,
          maxPostBytes: this.opts.maxPostBytes,
          delay: (n) => this.backoff(n - 1, this.opts.min, false),
        }, hooks);
      }
    } catch (e) {
      // A constructor throws for a URL or subprotocol it will not use: as good as a failed handshake.
      this.transportFailed();
      this.scheduleReconnect(ABNORMAL, errorText(e), false);
      return;
    }
    this.conn = conn;
    const c = conn;
    this.connectTimer = this.timers.setTimeout(() => {
      this.connectTimer = undefined;
      if (this.conn === c && !this.welcomed) this.lost(c, ABNORMAL, "connect timeout");
    }, this.opts.connectTimeout);
  }

  private async currentToken(): Promise<string | undefined> {
    const t = this.opts.token;
    return typeof t === "function" ? await t() : t;
  }

  private pickTransport(): TransportName {
    this.probing = false;
    if (this.onFallback && this.transportIndex !== 0) {
      this.fallbackOpens++;
      if (this.fallbackOpens % this.opts.retryPreferredEvery === 0) {
        this.probing = true;
        return this.transports[0];
      }
    }
    return this.transports[this.transportIndex];
  }

  // A handshake that failed, or a connection cut before its welcome frame.
  private transportFailed(): void {
    if (this.probing) {
      this.probing = false; // the preferred transport still does not work: stay on the fallback
      return;
    }
    this.transportFailures++;
    if (this.transportFailures >= this.opts.fallbackAfter && this.transports.length > 1) {
      this.transportIndex = (this.transportIndex + 1) % this.transports.length;
      this.transportFailures = 0;
    }
  }

  private readReconnectToken(): string | undefined {
    try { return this.storage.getItem(this.opts.storageKey) ?? undefined; } catch { return undefined; }
  }

  private backoff(attempt: number, min: number, jitterFromZero: boolean): number {
    const cap = Math.min(this.opts.max, min * Math.pow(this.opts.factor, Math.max(0, attempt)));
    const r = this.random();
    // Full jitter spreads a crowd of clients that all lost the same node at once. Where a
    // minimum wait matters (after a 1008 policy close, before a request is retried) only the
    // part above the minimum is randomised.
    return jitterFromZero ? r * cap : min + r * (cap - min);
  }

  private scheduleReconnect(code: number, reason: string, policy: boolean): void {
    const delay = policy
      ? this.backoff(this.attempt, Math.min(this.opts.policyMin, this.opts.max), false)
      : this.backoff(this.attempt, this.opts.min, true);
    this.attempt++;
    this.setState("reconnecting", { code, reason, delay, attempt: this.attempt });
    this.reconnectTimer = this.timers.setTimeout(() => void this.open(), delay);
  }

  private setState(state: ConnectionState, extra: Omit<StateEvent, "state" | "previous">): void {
    const previous = this._state;
    this._state = state;
    if (previous === state && state !== "reconnecting") return;
    this.emit("state", { state, previous, ...extra });
  }

  private lost(conn: Conn, code: number, reason: string): void {
    if (this.conn !== conn) return;
    const welcomed = this.welcomed;
    this.conn = null;
    conn.close();
    // Before the welcome every close counts as a failed handshake (a proxy that refuses
    // WebSockets looks just like that), so it is retried, on another transport if need be.
    // Reconnecting with an expired token that no callback can replace would only be refused.
    const terminal = welcomed && (closeCodeClass(code) === "terminal" || (code === TOKEN_EXPIRED && typeof this.opts.token !== "function"));
    this.afterConnection(!terminal);
    if (!this.running) return;
    if (terminal) {
      this.stop(new ChatError("closed", reason || `closed with ${code}`, { closeCode: code }), { code, reason });
      return;
    }
    if (!welcomed) this.transportFailed();
    this.scheduleReconnect(code, reason, welcomed && code === POLICY_VIOLATION);
  }

  // Everything tied to one connection ends with it; requests wait for the next one.
  private afterConnection(retrying: boolean): void {
    this.welcomed = false;
    for (const t of [this.connectTimer, this.stableTimer, this.pingTimer, this.refreshTimer]) {
      if (t !== undefined) this.timers.clearTimeout(t);
    }
    this.connectTimer = this.stableTimer = this.pingTimer = this.refreshTimer = undefined;
    this.nextToken = undefined;
    for (const req of [...this.pending.values()]) {
      this.clearTimer(req);
      const wasInFlight = req.inFlight;
      req.inFlight = false;
      if (!wasInFlight || !retrying) continue;
      if (req.kind === "leave") {
        // The room is already forgotten locally; a new connection does not rejoin it.
        this.settle(req);
        req.resolve(undefined);
      } else if (req.kind === "auth") {
        this.settle(req); // the next connection fetches a token of its own
      } else if (req.kind !== "join" && ++req.retries > this.opts.sendRetries) {
        // Joins are not counted: rejoining after a drop is the normal course of things.
        this.fail(req, new ChatError("connection_lost", "the connection dropped before the reply", { room: req.room }));
      }
    }
  }

  private stop(error: ChatError, info: { code: number; reason: string }): void {
    this.running = false;
    for (const req of [...this.pending.values()]) {
      this.settle(req);
      if (req.user) req.reject(new ChatError(error.code, error.reason, { room: req.room, closeCode: error.closeCode }));
    }
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w.reject(error);
    this.setState("disconnected", info);
  }

  // -- frames ----------------------------------------------------------------------------------

  private onFrame(conn: Conn, f: Frame): void {
    this.awaitingPong = false;
    switch (f.type) {
      case "userId": return this.onWelcome(conn, f);
      case "message": return this.onMessage(f);
      case "ack": return this.onAck(f);
      case "joined": return this.onJoined(f);
      case "left": return this.onReply(f, "leave", () => undefined);
      case "presence":
        return this.onReply(f, "presence", () => (Array.isArray(f.users) ? f.users : []).map((u: Frame) => {
          const user: PresenceUser = { userId: String(u?.userId ?? "") };
          if (typeof u?.name === "string") user.name = u.name;
          return user;
        }));
      case "history": return this.onReply(f, "history", () => this.historyResult(f));
      case "presence_event": return this.onPresenceEvent(f);
      case "authenticated": return this.onAuthenticated(f);
      case "error": return this.onErrorFrame(f);
      default: return; // pong, and frame types of newer servers
    }
  }

  private onWelcome(conn: Conn, f: Frame): void {
    if (this.welcomed) return;
    this.welcomed = true;
    this.timers.clearTimeout(this.connectTimer);
    this.connectTimer = undefined;
    this.transportFailures = 0;
    this.probing = false;
    const preferred = conn.transport === this.transports[0];
    this.transportIndex = Math.max(0, this.transports.indexOf(conn.transport));
    // A fallback that worked is kept for the rest of the session (with an occasional probe).
    if (preferred) { this.onFallback = false; this.fallbackOpens = 0; } else this.onFallback = true;
    if (typeof f.reconnectToken === "string" && f.reconnectToken) {
      try { this.storage.setItem(this.opts.storageKey, f.reconnectToken); } catch { /* storage full or off */ }
    }
    const rejoin = this.everWelcomed;
    this.everWelcomed = true;
    const info: Welcome = {
      userId: String(f.userId ?? ""),
      node: String(f.node ?? ""),
      room: String(f.room ?? this.defaultRoom),
      transport: conn.transport,
    };
    if (typeof f.protocol === "number") info.protocol = f.protocol;
    this.info = info;

    // Only a connection that lasts resets the backoff: one a server accepts and then closes at
    // once must not turn into a tight reconnect loop.
    this.stableTimer = this.timers.setTimeout(() => { this.stableTimer = undefined; this.attempt = 0; }, this.opts.stableAfter);
    this.startPing(conn);
    this.scheduleRefresh(undefined);

    const def = this.rooms.get(this.defaultRoom)!;
    const gaps: GapEvent[] = [];
    if (rejoin && def.wasJoined && !this.handshakeResumed) gaps.push({ room: this.defaultRoom, reason: "no_position" });
    def.wasJoined = true;

    // Rejoin first. Queued messages for a rejoined room wait for its joined reply (see
    // transmit); everything else goes out now, in the order it was asked for.
    for (const [name] of this.rooms) {
      if (name === this.defaultRoom) continue;
      const own = [...this.pending.values()].find((r) => r.kind === "join" && r.room === name);
      this.transmit(own ?? this.joinRequest(name, false));
    }
    for (const req of [...this.pending.values()]) {
      if (!req.inFlight && this.pending.has(req.id)) this.transmit(req);
    }

    this.setState("connected", { transport: conn.transport });
    this.emit("welcome", info);
    for (const g of gaps) this.emit("gap", g);
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w.resolve(info);
  }

  private onMessage(f: Frame): void {
    const name = typeof f.room === "string" ? f.room : this.defaultRoom;
    const room = this.rooms.get(name);
    if (!room) return; // left meanwhile
    const m = toMessage(f, name);
    if (m.offset !== undefined) {
      const sameEpoch = m.epoch === undefined || room.epoch === undefined || m.epoch === room.epoch;
      // Replays overlap what was delivered live around a reconnect: never deliver an offset twice.
      if (sameEpoch && room.offset !== undefined && compareOffsets(m.offset, room.offset) <= 0) return;
      room.offset = m.offset;
      if (m.epoch !== undefined) room.epoch = m.epoch;
    }
    this.emit("message", m);
  }

  private onAck(f: Frame): void {
    const req = (typeof f.ref === "number" ? this.byRef.get(f.ref) : undefined)
      ?? (typeof f.cid === "string" ? this.byCid.get(f.cid) : undefined);
    if (!req || req.kind !== "message") return; // an ack to a request that is settled already
    this.settle(req);
    const ack: Ack = {
      room: String(f.room ?? req.room),
      id: String(f.id ?? ""),
      cid: req.cid!,
      duplicate: f.duplicate === true,
    };
    const offset = str(f.offset);
    if (offset !== undefined) ack.offset = offset;
    if (typeof f.epoch === "string") ack.epoch = f.epoch;
    req.resolve(ack);
  }

  private onJoined(f: Frame): void {
    const name = String(f.room ?? "");
    const req = typeof f.ref === "number" ? this.byRef.get(f.ref) : undefined;
    const room = this.rooms.get(name);
    if (!room) {
      // A join that was given up on (or left) while its reply was on the way.
      if (this.conn && this.welcomed) this.conn.send({ type: "leave", room: name });
      return;
    }
    let rejoin: boolean;
    let resumed: boolean;
    if (req && req.kind === "join") {
      this.settle(req);
      rejoin = req.rejoin === true;
      resumed = req.resumed === true;
    } else if (name === this.defaultRoom && !req) {
      rejoin = true; // the resume the handshake asked for
      resumed = this.handshakeResumed;
    } else {
      return;
    }
    const epoch = typeof f.epoch === "string" ? f.epoch : undefined;
    // The offset stays: if the epoch changed, the first message of the new one resets it.
    if (room.offset === undefined && epoch !== undefined) room.epoch = epoch;
    const hadBefore = room.wasJoined;
    room.wasJoined = true;
    const event: JoinedEvent = { room: name, rejoin };
    if (epoch !== undefined) event.epoch = epoch;
    if (typeof f.recovered === "boolean") event.recovered = f.recovered;
    if (req?.user) req.resolve(event);
    this.releaseMessages(name);
    this.emit("joined", event);
    if (f.recovered === false) this.emit("gap", { room: name, ...(epoch !== undefined ? { epoch } : {}), reason: "not_recovered" });
    else if (rejoin && hadBefore && !resumed && room.last === undefined) this.emit("gap", { room: name, reason: "no_position" });
  }

  private onReply(f: Frame, kind: Kind, value: () => unknown): void {
    const req = typeof f.ref === "number" ? this.byRef.get(f.ref) : undefined;
    if (!req || req.kind !== kind) return;
    this.settle(req);
    req.resolve(value());
    if (kind === "leave") this.emit("left", { room: req.room });
  }

  private historyResult(f: Frame): HistoryResult {
    const room = String(f.room ?? "");
    const result: HistoryResult = {
      room,
      epoch: typeof f.epoch === "string" ? f.epoch : null,
      messages: (Array.isArray(f.messages) ? f.messages : [])
        .filter((m: unknown) => m && typeof m === "object")
        .map((m: Frame) => toMessage(m, typeof m.room === "string" ? m.room : room)),
    };
    if (typeof f.recovered === "boolean") result.recovered = f.recovered;
    return result;
  }

  private onPresenceEvent(f: Frame): void {
    const room = String(f.room ?? "");
    if (!this.rooms.has(room) || (f.event !== "join" && f.event !== "leave")) return;
    const e: PresenceEvent = { room, event: f.event, userId: String(f.userId ?? "") };
    if (typeof f.name === "string") e.name = f.name;
    this.emit("presence", e);
  }

  private onAuthenticated(f: Frame): void {
    const req = typeof f.ref === "number" ? this.byRef.get(f.ref) : undefined;
    if (req?.kind === "auth") this.settle(req);
    if (this.nextToken !== undefined) this.token = this.nextToken;
    this.nextToken = undefined;
    const exp = typeof f.exp === "number" ? f.exp : undefined;
    this.scheduleRefresh(exp);
    this.emit("authenticated", { userId: String(f.userId ?? ""), exp: exp ?? 0 });
  }

  private onErrorFrame(f: Frame): void {
    const code = String(f.code ?? "error");
    const reason = String(f.reason ?? f.message ?? "");
    const req = typeof f.ref === "number" ? this.byRef.get(f.ref) : undefined;
    // Only the latest attempt's answer counts: an error to an attempt already retried is stale.
    if (!req || req.refs[req.refs.length - 1] !== f.ref) {
      this.emit("error", new ChatError(code, reason, typeof f.room === "string" ? { room: f.room } : {}));
      return;
    }
    this.answerError(req, code, reason);
  }

  private answerError(req: Request, code: string, reason: string): void {
    if (req.kind === "leave" && code === "not_in_room") {
      this.settle(req);
      req.resolve(undefined);
      this.emit("left", { room: req.room });
      return;
    }
    if (req.kind === "auth") {
      // The connection keeps its current token; if that expires the server closes with 4003
      // and the reconnect fetches a new one.
      this.settle(req);
      this.nextToken = undefined;
      this.emit("error", new ChatError(code, reason));
      return;
    }
    const retryable = (req.kind === "message" ? RETRY_MESSAGE : RETRY_OTHER).has(code);
    if (retryable) this.retryLater(req, code, reason);
    else this.fail(req, new ChatError(code, reason, { room: req.room }));
  }

  private onDelivered(frames: Frame[]): void {
    for (const f of frames) {
      const req = typeof f.ref === "number" ? this.byRef.get(f.ref) : undefined;
      if (!req || !req.inFlight || req.refs[req.refs.length - 1] !== f.ref) continue;
      // The reply clock starts when the frame reached the server, not while a POST queue waited.
      this.clearTimer(req);
      req.timer = this.timers.setTimeout(() => {
        req.timer = undefined;
        this.retryLater(req, "timeout", `no reply within ${this.opts.ackTimeout} ms`);
      }, this.opts.ackTimeout);
    }
  }

  private onRefused(f: Frame, code: string, reason: string): void {
    const req = typeof f.ref === "number" ? this.byRef.get(f.ref) : undefined;
    if (req && req.refs[req.refs.length - 1] === f.ref) this.answerError(req, code, reason);
    else this.emit("error", new ChatError(code, reason));
  }

  // -- requests --------------------------------------------------------------------------------

  private request<T>(kind: Kind, room: string, build: () => Frame, user: boolean, cid?: string): { req: Request; promise: Promise<T> } {
    let resolve!: (v: any) => void;
    let reject!: (e: ChatError) => void;
    const promise = new Promise<T>((res, rej) => { resolve = res; reject = rej; });
    const req: Request = { id: this.nextId++, kind, room, build, resolve, reject, user, refs: [], retries: 0, inFlight: false };
    if (cid !== undefined) {
      req.cid = cid;
      this.byCid.set(cid, req);
    }
    this.pending.set(req.id, req);
    return { req, promise };
  }

  private transmit(req: Request): void {
    this.clearTimer(req);
    if (!this.conn || !this.welcomed) return; // sent when the next connection is welcomed
    // A message waits for its room's join: if the join failed (the broker was unavailable, say)
    // the server would refuse the message with not_in_room, for good.
    if (req.kind === "message" && this.joining(req.room)) return;
    const ref = this.nextRef++;
    req.refs.push(ref);
    this.byRef.set(ref, req);
    req.inFlight = true;
    const frame = req.build();
    this.conn.send({ ...frame, ref });
  }

  private retryLater(req: Request, code: string, reason: string): void {
    this.clearTimer(req);
    req.inFlight = false;
    if (++req.retries > this.opts.sendRetries) {
      this.fail(req, new ChatError(code, reason, { room: req.room }));
      return;
    }
    const min = code === "rate_limited" ? Math.max(1000, this.opts.min) : this.opts.min;
    const delay = code === "timeout" ? 0 : this.backoff(req.retries - 1, min, false);
    req.timer = this.timers.setTimeout(() => {
      req.timer = undefined;
      if (this.pending.has(req.id)) this.transmit(req);
    }, delay);
  }

  private fail(req: Request, error: ChatError): void {
    this.settle(req);
    if (req.user) req.reject(error);
    else this.emit("error", error);
    if (req.kind !== "join") return;
    this.rooms.delete(req.room);
    if (!req.user) this.emit("left", { room: req.room, error });
    for (const held of [...this.pending.values()]) {
      if (held.kind !== "message" || held.room !== req.room) continue;
      this.settle(held);
      held.reject(new ChatError("not_in_room", `could not join ${req.room} (${error.code})`, { room: req.room }));
    }
  }

  private joining(room: string): boolean {
    for (const r of this.pending.values()) if (r.kind === "join" && r.room === room) return true;
    return false;
  }

  // Messages held back while their room's join was under way.
  private releaseMessages(room: string): void {
    for (const r of [...this.pending.values()]) {
      if (r.kind === "message" && r.room === room && !r.inFlight && r.timer === undefined) this.transmit(r);
    }
  }

  private settle(req: Request): void {
    this.clearTimer(req);
    req.inFlight = false;
    this.pending.delete(req.id);
    for (const ref of req.refs) this.byRef.delete(ref);
    if (req.cid !== undefined) this.byCid.delete(req.cid);
  }

  private clearTimer(req: Request): void {
    if (req.timer !== undefined) this.timers.clearTimeout(req.timer);
    req.timer = undefined;
  }

  private joinRequest(room: string, user: boolean): Request {
    const { req } = this.request<JoinedEvent>("join", room, () => {
      const r = this.rooms.get(room);
      const f: Frame = { type: "join", room };
      req.resumed = false;
      req.rejoin = r?.wasJoined === true;
      if (r?.offset !== undefined) {
        f.since = r.offset;
        if (r.epoch !== undefined) f.epoch = r.epoch;
        req.resumed = true;
      } else if (r?.last !== undefined) {
        f.last = r.last;
      }
      if (r?.presence) f.presence = true;
      return f;
    }, user);
    return req;
  }

  // -- public requests -------------------------------------------------------------------------

  /**
   * Sends a chat message; resolves with its ack. The message keeps one `cid` through every
   * retry, so the server stores it at most once. Queued while disconnected, in order.
   */
  send(room: string, text: string): Promise<Ack> {
    if (!this.running) return Promise.reject(new ChatError("closed", "the client is not connected; call connect() first", { room }));
    if (!this.rooms.has(room)) return Promise.reject(new ChatError("not_in_room", `join ${room} before sending to it`, { room }));
    if (typeof text !== "string" || !text.trim()) return Promise.reject(new ChatError("empty_message", "message is empty", { room }));
    const cid = newCid(this.random);
    const { req, promise } = this.request<Ack>("message", room, () => ({ type: "message", room, message: text, cid }), true, cid);
    this.transmit(req);
    return promise;
  }

  /**
   * Joins a room; it stays joined across reconnects (resumed from its last offset) until
   * `leave()`. Joining a room already joined resolves at once and changes nothing.
   */
  join(room: string, options: JoinOptions = {}): Promise<JoinedEvent> {
    if (!ROOM_RE.test(room)) return Promise.reject(new ChatError("invalid_room", "room name must be 1-64 characters of A-Z a-z 0-9 _ - . :", { room }));
    if (options.last !== undefined && !(Number.isInteger(options.last) && options.last >= 1 && options.last <= 1000)) {
      return Promise.reject(new ChatError("invalid_frame", "last must be an integer from 1 to 1000", { room }));
    }
    const existing = this.rooms.get(room);
    if (existing) {
      const own = [...this.pending.values()].find((r) => r.kind === "join" && r.room === room);
      if (own) {
        // Piggyback on the join under way rather than sending a second one.
        return new Promise((resolve, reject) => {
          const { resolve: r0, reject: j0 } = own;
          own.resolve = (v) => { r0(v); resolve(v); };
          own.reject = (e) => { j0(e); reject(e); };
          own.user = true;
        });
      }
      return Promise.resolve({ room, rejoin: false, ...(existing.epoch !== undefined ? { epoch: existing.epoch } : {}) });
    }
    const state: RoomState = { presence: options.presence === true, wasJoined: false };
    if (options.last !== undefined) state.last = options.last;
    this.rooms.set(room, state);
    const req = this.joinRequest(room, true);
    const promise = new Promise<JoinedEvent>((resolve, reject) => { req.resolve = resolve; req.reject = reject; });
    this.transmit(req);
    return promise;
  }

  /** Leaves a room. Its messages stop at once; a reconnect does not rejoin it. */
  leave(room: string): Promise<void> {
    if (room === this.defaultRoom) {
      return Promise.reject(new ChatError("default_room", "the default room is joined for as long as the client is connected", { room }));
    }
    if (!this.rooms.delete(room)) return Promise.resolve();
    for (const req of [...this.pending.values()]) {
      if (req.room !== room || req.kind === "history" || req.kind === "presence") continue;
      this.settle(req);
      if (req.user) req.reject(new ChatError("not_in_room", `left ${room} before this was answered`, { room }));
    }
    if (!this.conn || !this.welcomed) {
      this.emit("left", { room });
      return Promise.resolve();
    }
    const { req, promise } = this.request<void>("leave", room, () => ({ type: "leave", room }), true);
    this.transmit(req);
    return promise;
  }

  /** Everyone online in a room, across the cluster, each user once. */
  presence(room: string): Promise<PresenceUser[]> {
    if (!this.running) return Promise.reject(new ChatError("closed", "the client is not connected; call connect() first", { room }));
    const { req, promise } = this.request<PresenceUser[]>("presence", room, () => ({ type: "presence", room }), true);
    this.transmit(req);
    return promise;
  }

  /**
   * A page of a room's stored history: the newest `limit` messages, or those after `since`.
   * These are not delivered as `message` events and do not move the room's resume position.
   */
  history(room: string, options: HistoryOptions = {}): Promise<HistoryResult> {
    if (!this.running) return Promise.reject(new ChatError("closed", "the client is not connected; call connect() first", { room }));
    if (options.limit !== undefined && !(Number.isInteger(options.limit) && options.limit >= 1 && options.limit <= 1000)) {
      return Promise.reject(new ChatError("invalid_frame", "limit must be an integer from 1 to 1000", { room }));
    }
    const frame: Frame = { type: "history", room };
    if (options.limit !== undefined) frame.limit = options.limit;
    if (options.since !== undefined) frame.since = options.since;
    if (options.epoch !== undefined) frame.epoch = options.epoch;
    const { req, promise } = this.request<HistoryResult>("history", room, () => frame, true);
    this.transmit(req);
    return promise;
  }

  // -- liveness and token refresh --------------------------------------------------------------

  // A connection can die without a close (a laptop lid, a NAT timeout): a ping that gets no
  // frame back within an interval means it is gone.
  private startPing(conn: Conn): void {
    if (this.opts.pingInterval <= 0) return;
    this.awaitingPong = false;
    const tick = () => {
      this.pingTimer = undefined;
      if (this.conn !== conn) return;
      if (this.awaitingPong) {
        this.lost(conn, ABNORMAL, "no reply to ping");
        return;
      }
      this.awaitingPong = true;
      conn.send({ type: "ping" });
      this.pingTimer = this.timers.setTimeout(tick, this.opts.pingInterval);
    };
    this.pingTimer = this.timers.setTimeout(tick, this.opts.pingInterval);
  }

  private now(): number {
    return this.timers.now ? this.timers.now() : Date.now();
  }

  private scheduleRefresh(exp: number | undefined): void {
    if (this.refreshTimer !== undefined) this.timers.clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
    // Only a callback can produce a fresher token than the one in use.
    if (typeof this.opts.token !== "function" || !this.token) return;
    const expiry = exp ?? tokenExpiry(this.token);
    if (expiry === undefined) return;
    const left = expiry * 1000 - this.now();
    if (left <= 0) return; // the server closes with 4003 and the reconnect fetches a new one
    let delay = left - this.opts.refreshBefore * 1000;
    // A token that lives shorter than refreshBefore is refreshed at half its remaining life, and
    // never more than once a second, even if the callback keeps returning the same token.
    if (delay < 1000) delay = Math.max(1000, left / 2);
    const conn = this.conn;
    this.refreshTimer = this.timers.setTimeout(() => {
      this.refreshTimer = undefined;
      void this.refresh(conn);
    }, delay);
  }

  private async refresh(conn: Conn | null): Promise<void> {
    let token: string | undefined;
    try {
      token = await this.currentToken();
    } catch (e) {
      if (this.conn !== conn) return;
      this.emit("error", new ChatError("token_unavailable", errorText(e)));
      this.scheduleRefresh(undefined);
      return;
    }
    if (!conn || this.conn !== conn || !this.welcomed) return;
    if (!token || token === this.token) {
      this.scheduleRefresh(undefined);
      return;
    }
    this.nextToken = token;
    const t = token;
    const { req } = this.request<void>("auth", "", () => ({ type: "auth", token: t }), false);
    this.transmit(req);
  }
}

function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
