// Helpers shared by the k6 scenarios: environment parsing, URL building, the deterministic
// room/sender layout, the probe carried in chat messages, and a small adapter so the same
// scripts drive the gateway / ws-ioredis peer (JSON frames) or the Socket.IO peer (Engine.IO v4
// + Socket.IO v5 framing over the WebSocket transport).

/** Read an environment variable with a default. */
export function env(name, fallback) {
  const v = __ENV[name];
  return v === undefined || v === "" ? fallback : v;
}

export function envInt(name, fallback) {
  const v = parseInt(env(name, String(fallback)), 10);
  if (Number.isNaN(v)) throw new Error(`${name} must be an integer`);
  return v;
}

export function envFloat(name, fallback) {
  const v = parseFloat(env(name, String(fallback)));
  if (Number.isNaN(v)) throw new Error(`${name} must be a number`);
  return v;
}

/** "30s", "2m", "1h", "500ms" or a bare number of seconds → milliseconds. */
export function durationMs(text) {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(String(text).trim());
  if (!m) throw new Error(`invalid duration ${text}`);
  const n = parseFloat(m[1]);
  const unit = m[2] || "s";
  return Math.round(n * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[unit]);
}

export function envDurationMs(name, fallback) {
  return durationMs(env(name, fallback));
}

/** k6 duration string for a millisecond count. */
export function k6Duration(ms) {
  return `${Math.ceil(ms / 1000)}s`;
}

/** TARGET may list several nodes, comma-separated. */
export function targets() {
  return env("TARGET", "ws://127.0.0.1:8080/ws")
    .split(",")
    .map((t) => t.trim())
    .filter((t) => t.length > 0);
}

export const PROTOCOL = env("PROTOCOL", "gateway"); // gateway | ws-peer | socketio

/** WebSocket URL for a client of `room` on `base`. */
export function clientUrl(base, room, name) {
  let url = base;
  if (PROTOCOL === "socketio") {
    const m = /^(wss?:\/\/[^/?]+)(\/[^?]*)?(\?.*)?$/.exec(base);
    if (!m) throw new Error(`invalid TARGET ${base}`);
    const path = !m[2] || m[2] === "/" ? "/socket.io/" : m[2];
    url = `${m[1]}${path}${m[3] || ""}`;
    url += (url.includes("?") ? "&" : "?") + "EIO=4&transport=websocket";
  }
  url += (url.includes("?") ? "&" : "?") + `room=${encodeURIComponent(room)}`;
  if (name) url += `&name=${encodeURIComponent(name)}`;
  return url;
}

/**
 * Deterministic layout: VU v (1-based) is client i = v-1, in room i mod rooms, on target
 * floor(i / rooms) mod targets (so every room is split across nodes); the first `senders`
 * clients of each room send.
 */
export function layout(vuId, rooms, senders, targetCount) {
  const i = vuId - 1;
  return {
    index: i,
    roomIndex: i % rooms,
    targetIndex: Math.floor(i / rooms) % targetCount,
    isSender: Math.floor(i / rooms) < senders,
  };
}

/** Members of room r when `vus` clients are laid out over `rooms`. */
export function membersOfRoom(r, vus, rooms) {
  return r < vus ? Math.floor((vus - 1 - r) / rooms) + 1 : 0;
}

/** Senders in room r. */
export function sendersInRoom(r, vus, rooms, senders) {
  return Math.min(senders, membersOfRoom(r, vus, rooms));
}

/** Messages a sender sends in a window of `windowMs` at `rate`/s: one every 1000/rate ms. */
export function messagesPerSender(rate, windowMs) {
  return Math.floor((rate * windowMs) / 1000);
}

/** Chat text carrying (sender, seq, send time), padded with "." to `size` bytes. */
export function encodeProbe(sender, seq, sentMs, size) {
  let s = `k6 ${sender} ${seq} ${sentMs} `;
  if (s.length < size) s += ".".repeat(size - s.length);
  return s;
}

export function decodeProbe(text) {
  if (typeof text !== "string" || !text.startsWith("k6 ")) return null;
  const parts = text.split(" ");
  if (parts.length < 5) return null;
  const sender = parseInt(parts[1], 10);
  const seq = parseInt(parts[2], 10);
  const sentMs = parseInt(parts[3], 10);
  if ([sender, seq, sentMs].some(Number.isNaN)) return null;
  return { sender, seq, sentMs };
}

/**
 * Decode a received text frame into {kind, ...}: kind is "ready" (userId frame), "chat"
 * (message text in `.message`), "pong", "ack", "error" (`.code`), "reply" (`.text` must be sent
 * back: Socket.IO handshake and heartbeat), "closed", or "other".
 */
export function decodeFrame(data) {
  if (PROTOCOL === "socketio") return decodeSocketIo(data);
  let f;
  try {
    f = JSON.parse(data);
  } catch (_) {
    return { kind: "bad" };
  }
  return classify(f);
}

function classify(f) {
  if (f === null || typeof f !== "object") return { kind: "bad" };
  switch (f.type) {
    case "userId":
      return { kind: "ready", node: f.node };
    case "message":
      return { kind: "chat", message: f.message, room: f.room };
    case "pong":
      return { kind: "pong", ref: f.ref };
    case "ack":
      return { kind: "ack" };
    case "error":
      return { kind: "error", code: f.code };
    default:
      return { kind: "other" };
  }
}

function decodeSocketIo(data) {
  const t = data.charAt(0);
  if (t === "0") return { kind: "reply", text: "40" }; // open → connect main namespace
  if (t === "2") return { kind: "reply", text: "3" + data.slice(1) }; // ping → pong
  if (t === "1") return { kind: "closed" };
  if (t !== "4") return { kind: "other" };
  const p = data.charAt(1);
  if (p === "1") return { kind: "closed" };
  if (p === "4") return { kind: "error", code: "connect_error" };
  if (p !== "2" || data.charAt(2) === "/") return { kind: "other" }; // other namespaces ignored
  let args;
  try {
    args = JSON.parse(data.slice(2).replace(/^\d+/, ""));
  } catch (_) {
    return { kind: "bad" };
  }
  if (!Array.isArray(args) || args.length < 2) return { kind: "other" };
  const payload = args[1] || {};
  if (payload.type === undefined) payload.type = args[0];
  return classify(payload);
}

/** Frame sending a chat message to `room`. */
export function encodeChat(room, text) {
  const body = JSON.stringify({ type: "message", room, message: text });
  return PROTOCOL === "socketio" ? `42["message",${body}]` : body;
}

/** Frame for an application-level ping with `ref`. */
export function encodePing(ref) {
  const body = JSON.stringify({ type: "ping", ref });
  return PROTOCOL === "socketio" ? `42["ping",${body}]` : body;
}
