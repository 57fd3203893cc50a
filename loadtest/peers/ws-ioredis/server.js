// Reference chat node built the way most Node.js chat servers are: `ws` for WebSockets and
// `ioredis` pub/sub between nodes. It speaks the gateway's JSON frames (docs/protocol.md,
// version 1) so the same load generator and k6 scripts can drive either.
//
// One Redis channel per room (`chat:room:<room>`); a node subscribes while it holds at least one
// member of the room (reference counted) and publishes the finished outgoing frame, so the
// receiving node forwards the bytes without re-encoding them.
//
// Environment: PORT (8080), HOST (0.0.0.0), REDIS_URL (redis://127.0.0.1:6379), NODE_ID
// (random), MAX_BUFFERED_BYTES (1 MiB: a client whose send buffer grows past it is closed with
// 4000, as the gateway does with slow consumers), PING_INTERVAL_MS (20000).

import { createServer } from "node:http";
import { randomBytes } from "node:crypto";
import { Redis } from "ioredis";
import { WebSocketServer, WebSocket } from "ws";

const PORT = Number(process.env.PORT ?? 8080);
const HOST = process.env.HOST ?? "0.0.0.0";
const REDIS_URL = process.env.REDIS_URL ?? "redis://127.0.0.1:6379";
const NODE_ID = process.env.NODE_ID ?? `node-${randomBytes(3).toString("hex")}`;
const MAX_BUFFERED_BYTES = Number(process.env.MAX_BUFFERED_BYTES ?? 1 << 20);
const PING_INTERVAL_MS = Number(process.env.PING_INTERVAL_MS ?? 20_000);
const MAX_FRAME_BYTES = 64 * 1024;
const MAX_CHAT_BYTES = 4096;
const MAX_ROOMS_PER_CONNECTION = 16;
const CHANNEL_PREFIX = "chat:room:";
const ROOM_RE = /^[A-Za-z0-9_.:-]{1,64}$/;
const CONTROL_RE = /[\u0000-\u001f\u007f]/;

// --- protocol helpers -------------------------------------------------------------------------

/** UUIDv7: 48-bit Unix milliseconds, version and variant bits, the rest random. */
function uuidv7() {
  const b = randomBytes(16);
  let ms = Date.now();
  for (let i = 5; i >= 0; i--) {
    b[i] = ms % 256;
    ms = Math.floor(ms / 256);
  }
  b[6] = (b[6] & 0x0f) | 0x70;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = b.toString("hex");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function validName(name) {
  return [...name].length >= 1 && [...name].length <= 64 && !CONTROL_RE.test(name);
}

function errorFrame(code, reason, ref) {
  const frame = { type: "error", code, reason };
  if (ref !== undefined) frame.ref = ref;
  return JSON.stringify(frame);
}

// --- Redis ------------------------------------------------------------------------------------

const pub = new Redis(REDIS_URL, { lazyConnect: false, maxRetriesPerRequest: 1 });
const sub = pub.duplicate();
for (const [label, client] of [["publisher", pub], ["subscriber", sub]]) {
  client.on("error", (err) => console.error(`[${NODE_ID}] redis ${label}: ${err.message}`));
}

/** room -> Set of local sockets in it. The set's size is the subscription's reference count. */
const rooms = new Map();

function joinRoom(ws, room) {
  let members = rooms.get(room);
  if (!members) {
    members = new Set();
    rooms.set(room, members);
    sub.subscribe(CHANNEL_PREFIX + room).catch((err) =>
      console.error(`[${NODE_ID}] subscribe ${room}: ${err.message}`),
    );
  }
  members.add(ws);
  ws.rooms.add(room);
}

function leaveRoom(ws, room) {
  ws.rooms.delete(room);
  const members = rooms.get(room);
  if (!members) return;
  members.delete(ws);
  if (members.size === 0) {
    rooms.delete(room);
    sub.unsubscribe(CHANNEL_PREFIX + room).catch((err) =>
      console.error(`[${NODE_ID}] unsubscribe ${room}: ${err.message}`),
    );
  }
}

// The published payload is the finished frame: forward the same buffer to every local member.
sub.on("messageBuffer", (channel, payload) => {
  const room = channel.toString().slice(CHANNEL_PREFIX.length);
  const members = rooms.get(room);
  if (!members) return;
  for (const ws of members) {
    if (ws.readyState !== WebSocket.OPEN) continue;
    if (ws.bufferedAmount > MAX_BUFFERED_BYTES) {
      ws.close(4000, "slow consumer");
      continue;
    }
    ws.send(payload, { binary: false });
  }
});

async function publish(ws, room, message) {
  const frame = { type: "message", room, id: uuidv7(), userId: ws.userId };
  if (ws.userName !== undefined) frame.name = ws.userName;
  frame.message = message;
  frame.ts = Date.now();
  await pub.publish(CHANNEL_PREFIX + room, JSON.stringify(frame));
  return frame.id;
}

// --- client frames ----------------------------------------------------------------------------

function send(ws, text) {
  if (ws.readyState === WebSocket.OPEN) ws.send(text);
}

function checkChat(ws, message, ref) {
  if (typeof message !== "string") {
    send(ws, errorFrame("invalid_frame", "message must be a string", ref));
    return false;
  }
  if (message.length === 0) {
    send(ws, errorFrame("empty_message", "message is empty", ref));
    return false;
  }
  if (Buffer.byteLength(message) > MAX_CHAT_BYTES) {
    send(ws, errorFrame("message_too_large", `message exceeds ${MAX_CHAT_BYTES} bytes`, ref));
    return false;
  }
  return true;
}

function handleFrame(ws, data, isBinary) {
  if (isBinary) {
    send(ws, errorFrame("binary_unsupported", "only text frames carry the protocol"));
    return;
  }
  let frame;
  try {
    frame = JSON.parse(data.toString());
  } catch {
    frame = undefined;
  }
  if (frame === null || typeof frame !== "object" || Array.isArray(frame)) {
    send(ws, errorFrame("invalid_json", "frame is not a JSON object"));
    return;
  }
  const ref = frame.ref;

  if (frame.type === undefined) {
    // Seed style: publish to the default room, no acknowledgement.
    if (!checkChat(ws, frame.message, ref)) return;
    publish(ws, ws.defaultRoom, frame.message).catch(() =>
      send(ws, errorFrame("publish_failed", "broker unavailable", ref)),
    );
    return;
  }

  switch (frame.type) {
    case "message": {
      const room = frame.room ?? ws.defaultRoom;
      if (typeof room !== "string" || !ROOM_RE.test(room)) {
        send(ws, errorFrame("invalid_room", "room name must be 1-64 characters of A-Z a-z 0-9 _ - . :", ref));
        return;
      }
      if (!ws.rooms.has(room)) {
        send(ws, errorFrame("not_in_room", `not in room ${room}`, ref));
        return;
      }
      if (!checkChat(ws, frame.message, ref)) return;
      publish(ws, room, frame.message).then(
        (id) => send(ws, JSON.stringify(ref === undefined ? { type: "ack", room, id } : { type: "ack", room, id, ref })),
        () => send(ws, errorFrame("publish_failed", "broker unavailable", ref)),
      );
      return;
    }
    case "join": {
      const room = frame.room;
      if (typeof room !== "string" || !ROOM_RE.test(room)) {
        send(ws, errorFrame("invalid_room", "room name must be 1-64 characters of A-Z a-z 0-9 _ - . :", ref));
        return;
      }
      if (!ws.rooms.has(room) && ws.rooms.size >= MAX_ROOMS_PER_CONNECTION) {
        send(ws, errorFrame("too_many_rooms", `at most ${MAX_ROOMS_PER_CONNECTION} rooms`, ref));
        return;
      }
      if (!ws.rooms.has(room)) joinRoom(ws, room);
      send(ws, JSON.stringify(ref === undefined ? { type: "joined", room } : { type: "joined", room, ref }));
      return;
    }
    case "leave": {
      const room = frame.room;
      if (typeof room !== "string" || !ws.rooms.has(room)) {
        send(ws, errorFrame("not_in_room", `not in room ${room}`, ref));
        return;
      }
      leaveRoom(ws, room);
      send(ws, JSON.stringify(ref === undefined ? { type: "left", room } : { type: "left", room, ref }));
      return;
    }
    case "ping":
      send(ws, JSON.stringify(ref === undefined ? { type: "pong" } : { type: "pong", ref }));
      return;
    default:
      send(ws, errorFrame("unknown_type", `unknown frame type ${JSON.stringify(frame.type)}`, ref));
  }
}

// --- HTTP + WebSocket server ------------------------------------------------------------------

const server = createServer((req, res) => {
  const path = (req.url ?? "/").split("?")[0];
  if (path === "/healthz") {
    res.writeHead(200, { "content-type": "text/plain" }).end("ok");
  } else if (path === "/readyz") {
    const ready = pub.status === "ready" && sub.status === "ready";
    res.writeHead(ready ? 200 : 503, { "content-type": "text/plain" }).end(ready ? "ready" : "redis not ready");
  } else {
    res.writeHead(404, { "content-type": "text/plain" }).end("not found");
  }
});

const wss = new WebSocketServer({
  noServer: true,
  maxPayload: MAX_FRAME_BYTES,
  handleProtocols: (protocols) => (protocols.has("chat.v1") ? "chat.v1" : false),
});

function refuse(socket, status, reason) {
  const body = `${reason}\n`;
  socket.end(
    `HTTP/1.1 ${status} Bad Request\r\ncontent-type: text/plain\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`,
  );
}

server.on("upgrade", (req, socket, head) => {
  const url = new URL(req.url ?? "/", "http://localhost");
  if (url.pathname !== "/" && url.pathname !== "/ws") {
    refuse(socket, 404, "not found");
    return;
  }
  const room = url.searchParams.get("room") ?? "lobby";
  const name = url.searchParams.get("name") ?? undefined;
  if (!ROOM_RE.test(room)) {
    refuse(socket, 400, "invalid_room: room name must be 1-64 characters of A-Z a-z 0-9 _ - . :");
    return;
  }
  if (name !== undefined && !validName(name)) {
    refuse(socket, 400, "invalid_name: name must be 1-64 characters without control characters");
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    ws.userId = `u-${uuidv7()}`;
    ws.userName = name;
    ws.defaultRoom = room;
    ws.rooms = new Set();
    ws.isAlive = true;
    joinRoom(ws, room);
    ws.send(JSON.stringify({ type: "userId", userId: ws.userId, node: NODE_ID, room, protocol: 1 }));
    ws.on("message", (data, isBinary) => {
      ws.isAlive = true;
      handleFrame(ws, data, isBinary);
    });
    ws.on("pong", () => {
      ws.isAlive = true;
    });
    ws.on("close", () => {
      for (const r of [...ws.rooms]) leaveRoom(ws, r);
    });
    ws.on("error", () => {});
  });
});

const heartbeat = setInterval(() => {
  for (const ws of wss.clients) {
    if (!ws.isAlive) {
      ws.close(4001, "idle timeout");
      ws.terminate();
      continue;
    }
    ws.isAlive = false;
    ws.ping();
  }
}, PING_INTERVAL_MS);

function shutdown() {
  clearInterval(heartbeat);
  server.close();
  for (const ws of wss.clients) ws.close(1001, "going away");
  setTimeout(() => {
    pub.disconnect();
    sub.disconnect();
    process.exit(0);
  }, 500).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);

server.listen(PORT, HOST, () => {
  console.log(`[${NODE_ID}] ws-ioredis peer listening on ${HOST}:${PORT}, redis ${REDIS_URL}`);
});
