// Reference chat node built the Socket.IO way: Socket.IO 4 with `@socket.io/redis-adapter`
// (ioredis clients) to broadcast between nodes. Frames carry the gateway's JSON shapes
// (docs/protocol.md, version 1); only the envelope differs: every frame is a Socket.IO event
// named after its `type`.
//
// Handshake: `GET /socket.io/?EIO=4&transport=websocket&room=R&name=N` (polling works too).
// The room may also come from the CONNECT packet's auth payload (`40{"room":"R"}`).
// After the namespace connect the server emits `userId` with
//   {"type":"userId","userId":"u-…","node":"…","room":"R","protocol":1}
// and the socket is in room R (`socket.join(room)`).
//
// Client events (the payload is the gateway's client frame, `type` optional):
//   message {"message":TEXT} or {"type":"message","room":R,"message":TEXT,"ref":…}
//   join {"room":R}, leave {"room":R}, ping {}
// Replies go back as an acknowledgement when the client asked for one, else as an event named
// after the reply type (`ack`, `joined`, `left`, `pong`, `error`).
// Broadcast: event `message` with {"type":"message","room","id","userId","name"?,"message","ts"}
// to every member of the room on every node, the sender included (`io.to(room).emit`).
//
// Environment: PORT (8080), HOST (0.0.0.0), REDIS_URL (redis://127.0.0.1:6379), NODE_ID (random),
// PING_INTERVAL_MS (20000).

import { createServer } from "node:http";
import { randomBytes } from "node:crypto";
import { Redis } from "ioredis";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/redis-adapter";

const PORT = Number(process.env.PORT ?? 8080);
const HOST = process.env.HOST ?? "0.0.0.0";
const REDIS_URL = process.env.REDIS_URL ?? "redis://127.0.0.1:6379";
const NODE_ID = process.env.NODE_ID ?? `node-${randomBytes(3).toString("hex")}`;
const PING_INTERVAL_MS = Number(process.env.PING_INTERVAL_MS ?? 20_000);
const MAX_FRAME_BYTES = 64 * 1024;
const MAX_CHAT_BYTES = 4096;
const MAX_ROOMS_PER_CONNECTION = 16;
const ROOM_RE = /^[A-Za-z0-9_.:-]{1,64}$/;
const CONTROL_RE = /[\u0000-\u001f\u007f]/;
const INVALID_ROOM = "room name must be 1-64 characters of A-Z a-z 0-9 _ - . :";

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
  const n = [...name].length;
  return n >= 1 && n <= 64 && !CONTROL_RE.test(name);
}

const pubClient = new Redis(REDIS_URL, { maxRetriesPerRequest: 1 });
const subClient = pubClient.duplicate();
for (const [label, client] of [["publisher", pubClient], ["subscriber", subClient]]) {
  client.on("error", (err) => console.error(`[${NODE_ID}] redis ${label}: ${err.message}`));
}

const httpServer = createServer((req, res) => {
  const path = (req.url ?? "/").split("?")[0];
  if (path === "/healthz") {
    res.writeHead(200, { "content-type": "text/plain" }).end("ok");
  } else if (path === "/readyz") {
    const ready = pubClient.status === "ready" && subClient.status === "ready";
    res.writeHead(ready ? 200 : 503, { "content-type": "text/plain" }).end(ready ? "ready" : "redis not ready");
  } else {
    // Socket.IO answers /socket.io/ itself before this handler runs.
    res.writeHead(404, { "content-type": "text/plain" }).end("not found");
  }
});

const io = new Server(httpServer, {
  adapter: createAdapter(pubClient, subClient),
  serveClient: false,
  maxHttpBufferSize: MAX_FRAME_BYTES,
  pingInterval: PING_INTERVAL_MS,
  pingTimeout: 20_000,
});

// Validate the handshake before the namespace connect is accepted: a refusal reaches the client
// as a CONNECT_ERROR packet (`44{"message":"invalid_room: …"}`).
io.use((socket, next) => {
  const q = socket.handshake.query;
  const auth = socket.handshake.auth ?? {};
  const room = auth.room ?? q.room ?? "lobby";
  const name = auth.name ?? q.name;
  if (typeof room !== "string" || !ROOM_RE.test(room)) {
    next(new Error(`invalid_room: ${INVALID_ROOM}`));
    return;
  }
  if (name !== undefined && (typeof name !== "string" || !validName(name))) {
    next(new Error("invalid_name: name must be 1-64 characters without control characters"));
    return;
  }
  socket.data.defaultRoom = room;
  socket.data.name = name;
  socket.data.userId = `u-${uuidv7()}`;
  next();
});

/** Send a reply: through the client's acknowledgement callback if it gave one, else as an event. */
function reply(socket, ack, frame) {
  if (typeof ack === "function") ack(frame);
  else socket.emit(frame.type, frame);
}

function error(socket, ack, code, reason, ref) {
  const frame = { type: "error", code, reason };
  if (ref !== undefined) frame.ref = ref;
  reply(socket, ack, frame);
}

function checkChat(socket, ack, message, ref) {
  if (typeof message !== "string") {
    error(socket, ack, "invalid_frame", "message must be a string", ref);
    return false;
  }
  if (message.length === 0) {
    error(socket, ack, "empty_message", "message is empty", ref);
    return false;
  }
  if (Buffer.byteLength(message) > MAX_CHAT_BYTES) {
    error(socket, ack, "message_too_large", `message exceeds ${MAX_CHAT_BYTES} bytes`, ref);
    return false;
  }
  return true;
}

function isObject(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

io.on("connection", (socket) => {
  const { defaultRoom, userId, name } = socket.data;
  socket.join(defaultRoom);
  socket.emit("userId", { type: "userId", userId, node: NODE_ID, room: defaultRoom, protocol: 1 });

  socket.on("message", (frame, ack) => {
    if (!isObject(frame)) {
      error(socket, ack, "invalid_json", "payload is not a JSON object");
      return;
    }
    const ref = frame.ref;
    const seed = frame.type === undefined;
    const room = seed ? defaultRoom : (frame.room ?? defaultRoom);
    if (typeof room !== "string" || !ROOM_RE.test(room)) {
      error(socket, ack, "invalid_room", INVALID_ROOM, ref);
      return;
    }
    if (!socket.rooms.has(room)) {
      error(socket, ack, "not_in_room", `not in room ${room}`, ref);
      return;
    }
    if (!checkChat(socket, ack, frame.message, ref)) return;
    const out = { type: "message", room, id: uuidv7(), userId };
    if (name !== undefined) out.name = name;
    out.message = frame.message;
    out.ts = Date.now();
    io.to(room).emit("message", out);
    if (!seed) {
      const a = { type: "ack", room, id: out.id };
      if (ref !== undefined) a.ref = ref;
      reply(socket, ack, a);
    }
  });

  socket.on("join", (frame, ack) => {
    const room = isObject(frame) ? frame.room : undefined;
    const ref = isObject(frame) ? frame.ref : undefined;
    if (typeof room !== "string" || !ROOM_RE.test(room)) {
      error(socket, ack, "invalid_room", INVALID_ROOM, ref);
      return;
    }
    // socket.rooms always holds the socket's own id room as well.
    if (!socket.rooms.has(room) && socket.rooms.size - 1 >= MAX_ROOMS_PER_CONNECTION) {
      error(socket, ack, "too_many_rooms", `at most ${MAX_ROOMS_PER_CONNECTION} rooms`, ref);
      return;
    }
    socket.join(room);
    reply(socket, ack, ref === undefined ? { type: "joined", room } : { type: "joined", room, ref });
  });

  socket.on("leave", (frame, ack) => {
    const room = isObject(frame) ? frame.room : undefined;
    const ref = isObject(frame) ? frame.ref : undefined;
    if (typeof room !== "string" || room === socket.id || !socket.rooms.has(room)) {
      error(socket, ack, "not_in_room", `not in room ${room}`, ref);
      return;
    }
    socket.leave(room);
    reply(socket, ack, ref === undefined ? { type: "left", room } : { type: "left", room, ref });
  });

  socket.on("ping", (frame, ack) => {
    const ref = isObject(frame) ? frame.ref : undefined;
    reply(socket, ack, ref === undefined ? { type: "pong" } : { type: "pong", ref });
  });
});

function shutdown() {
  io.close(() => {
    pubClient.disconnect();
    subClient.disconnect();
    process.exit(0);
  });
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);

httpServer.listen(PORT, HOST, () => {
  console.log(`[${NODE_ID}] socket.io peer listening on ${HOST}:${PORT}, redis ${REDIS_URL}`);
});
