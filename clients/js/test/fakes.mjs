// In-memory stand-ins for the network and the clock. Each test plays the server by hand:
// it opens sockets, sends frames, answers POSTs and moves time, then looks at what the client
// sent and emitted.

import { ChatClient } from "../dist/chat-client.js";

/** Lets promise callbacks (fetch answers, token callbacks) run. */
export async function flush() {
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
}

/** Virtual time: nothing fires until the test advances it. */
export class FakeClock {
  constructor(start = 1_700_000_000_000) {
    this.t = start;
    this.seq = 0;
    this.timers = new Map();
  }

  setTimeout(callback, ms) {
    const id = ++this.seq;
    this.timers.set(id, { at: this.t + Math.max(0, ms), callback, id });
    return id;
  }

  clearTimeout(id) {
    this.timers.delete(id);
  }

  now() {
    return this.t;
  }

  /** Delays (from now) of every pending timer, soonest first. */
  pending() {
    return [...this.timers.values()].map((t) => t.at - this.t).sort((a, b) => a - b);
  }

  /** Runs every timer due within `ms`, in order, letting promises settle after each. */
  async advance(ms) {
    const end = this.t + ms;
    for (;;) {
      let next = null;
      for (const t of this.timers.values()) {
        if (t.at <= end && (!next || t.at < next.at || (t.at === next.at && t.id < next.id))) next = t;
      }
      if (!next) break;
      this.timers.delete(next.id);
      this.t = next.at;
      next.callback();
      await flush();
    }
    this.t = end;
    await flush();
  }
}

export function fakeWebSocket() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.sent = [];
      this.closedWith = null;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      sockets.push(this);
    }
    send(data) {
      if (this.closedWith) throw new Error("socket is closed");
      this.sent.push(JSON.parse(data));
    }
    close(code, reason) {
      this.closedWith = { code, reason };
    }
    get query() {
      return Object.fromEntries(new URL(this.url).searchParams);
    }
    /** Frames the client sent, without its pings. */
    frames(type) {
      return this.sent.filter((f) => f.type !== "ping" && (type === undefined || f.type === type));
    }
    receive(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }
    welcome(extra = {}) {
      this.onopen?.({});
      this.receive({
        type: "userId", userId: "u-1", node: "node-a", room: this.query.room, protocol: 1, transport: "websocket", ...extra,
      });
    }
    serverClose(code, reason = "") {
      this.onclose?.({ code, reason, wasClean: true });
    }
    /** A refused handshake or a cut connection: browsers report 1006 and nothing else. */
    fail() {
      this.onerror?.({});
      this.onclose?.({ code: 1006, reason: "", wasClean: false });
    }
  }
  return { WebSocket: FakeWebSocket, sockets, last: () => sockets[sockets.length - 1] };
}

export function fakeEventSource() {
  const streams = [];
  class FakeEventSource {
    constructor(url) {
      this.url = url;
      this.closed = false;
      this.onmessage = this.onerror = null;
      streams.push(this);
    }
    close() {
      this.closed = true;
    }
    get query() {
      return Object.fromEntries(new URL(this.url).searchParams);
    }
    receive(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }
    welcome(session = "s-1", extra = {}) {
      this.receive({
        type: "userId", userId: "u-1", node: "node-a", room: this.query.room, protocol: 1, transport: "sse", session, ...extra,
      });
    }
    error() {
      this.onerror?.({});
    }
  }
  return { EventSource: FakeEventSource, streams, last: () => streams[streams.length - 1] };
}

/** A fetch whose every call waits until the test answers it. */
export function fakeFetch() {
  const calls = [];
  const fetch = (url, init) =>
    new Promise((resolve, reject) => {
      const body = JSON.parse(init.body);
      calls.push({
        url,
        init,
        body,
        frames: body.frames.filter((f) => f.type !== "ping"),
        answered: false,
        respond(status, json, headers = {}) {
          this.answered = true;
          resolve({
            status,
            headers: { get: (name) => headers[name.toLowerCase()] ?? null },
            text: async () => (json === undefined ? "" : JSON.stringify(json)),
          });
        },
        fail() {
          this.answered = true;
          reject(new TypeError("fetch failed"));
        },
      });
    });
  return { fetch, calls, open: () => calls.filter((c) => !c.answered) };
}

export function memoryStorage() {
  const items = new Map();
  return {
    items,
    getItem: (k) => (items.has(k) ? items.get(k) : null),
    setItem: (k, v) => void items.set(k, v),
    removeItem: (k) => void items.delete(k),
  };
}

/** A JWT with the given payload; the signature is junk (the client never verifies it). */
export function jwt(payload) {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${part({ alg: "HS256", typ: "JWT" })}.${part(payload)}.c2ln`;
}

/** Collects every event the client emits, by type. */
export function record(client) {
  const events = {};
  for (const type of ["message", "presence", "joined", "left", "error", "state", "gap", "welcome", "authenticated"]) {
    events[type] = [];
    client.on(type, (e) => events[type].push(e));
  }
  return events;
}

/**
 * A client wired to fakes. `random` defaults to 1 so delays sit at the top of their jitter
 * range and are predictable; pings are off unless a test turns them on.
 */
export function setup(options = {}) {
  const clock = new FakeClock();
  // Options that need the clock (a token callback minting tokens "now") come as a function.
  if (typeof options === "function") options = options({ clock });
  const ws = fakeWebSocket();
  const es = fakeEventSource();
  const http = fakeFetch();
  const storage = memoryStorage();
  const client = new ChatClient({
    url: "http://chat.test:8080",
    WebSocket: ws.WebSocket,
    EventSource: es.EventSource,
    fetch: http.fetch,
    timers: clock,
    storage,
    random: () => 0.999999,
    pingInterval: 0,
    ...options,
  });
  const events = record(client);
  return { client, clock, ws, es, http, storage, events };
}

/** Expects a promise to be still pending (neither resolved nor rejected) right now. */
export async function isPending(promise) {
  const marker = Symbol("pending");
  const result = await Promise.race([promise.then(() => "resolved", () => "rejected"), flush().then(() => marker)]);
  return result === marker;
}

export function message(room, offset, extra = {}) {
  return {
    type: "message", room, id: `id-${offset}`, userId: "u-9", message: `m ${offset}`, ts: 1, offset, epoch: "e1", ...extra,
  };
}
