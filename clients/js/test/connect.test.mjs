import test from "node:test";
import assert from "node:assert/strict";
import { ChatClient, endpointsFor, closeCodeClass, compareOffsets, tokenExpiry } from "../dist/chat-client.js";
import { setup, flush, jwt } from "./fakes.mjs";

test("endpoints are derived from an http or ws base URL", () => {
  assert.deepEqual(endpointsFor("http://h:8080"), {
    websocket: "ws://h:8080/ws", sse: "http://h:8080/sse", send: "http://h:8080/sse/send",
  });
  assert.deepEqual(endpointsFor("wss://chat.example/app/"), {
    websocket: "wss://chat.example/app/ws", sse: "https://chat.example/app/sse", send: "https://chat.example/app/sse/send",
  });
  assert.equal(endpointsFor("https://h/ws").websocket, "wss://h/ws");
  assert.equal(endpointsFor("ws://h/ws").sse, "http://h/sse");
  assert.throws(() => endpointsFor("h:8080"), TypeError);
});

test("close codes: the protocol's terminal codes stop, everything else reconnects", () => {
  for (const code of [1000, 1002, 1007, 1009, 4004]) assert.equal(closeCodeClass(code), "terminal", String(code));
  for (const code of [1001, 1006, 1008, 1011, 1012, 1013, 4000, 4001, 4002, 4003, 4999]) {
    assert.equal(closeCodeClass(code), "reconnect", String(code));
  }
});

test("offsets compare numerically part by part", () => {
  assert.equal(compareOffsets("9-0", "10-0"), -1);
  assert.equal(compareOffsets("10-2", "10-10"), -1);
  assert.equal(compareOffsets("10-2", "10-2"), 0);
  assert.equal(compareOffsets("1732532000125-1", "1732532000125-0"), 1);
});

test("a JWT's exp is read without verifying it", () => {
  assert.equal(tokenExpiry(jwt({ sub: "u", exp: 1700000123, name: "Zoë ✓" })), 1700000123);
  assert.equal(tokenExpiry("not-a-jwt"), undefined);
  assert.equal(tokenExpiry(jwt({ sub: "u" })), undefined);
});

test("options are checked when the client is made", () => {
  assert.throws(() => new ChatClient({ url: "http://h", room: "bad room" }), TypeError);
  assert.throws(() => new ChatClient({ url: "http://h", name: "a\nb" }), TypeError);
  assert.throws(() => new ChatClient({ url: "ftp://h" }), TypeError);
});

test("handshake: ws URL with room, name and presence; chat.v1 and the token as subprotocols", async () => {
  const token = jwt({ sub: "alice", exp: 4102444800 });
  const { client, ws, events } = setup({ room: "news", name: "Alice B", presence: true, token });
  const connected = client.connect();
  await flush();
  const s = ws.last();
  assert.equal(new URL(s.url).origin + new URL(s.url).pathname, "ws://chat.test:8080/ws");
  assert.deepEqual(s.query, { room: "news", name: "Alice B", presence: "true" });
  assert.deepEqual(s.protocols, ["chat.v1", `token.${token}`]);
  assert.equal(client.state, "connecting");

  s.welcome({ userId: "alice", room: "news" });
  const welcome = await connected;
  assert.deepEqual(welcome, { userId: "alice", node: "node-a", room: "news", transport: "websocket", protocol: 1 });
  assert.equal(client.state, "connected");
  assert.equal(client.userId, "alice");
  assert.equal(client.transport, "websocket");
  assert.deepEqual(events.state.map((e) => e.state), ["connecting", "connected"]);
  assert.deepEqual(events.welcome, [welcome]);
});

test("without a token only chat.v1 is offered and the default room is lobby", async () => {
  const { client, ws } = setup();
  client.connect();
  await flush();
  assert.deepEqual(ws.last().protocols, ["chat.v1"]);
  assert.deepEqual(ws.last().query, { room: "lobby" });
});

test("the anonymous reconnect token is stored and sent back on every connection", async () => {
  const { client, ws, storage, clock } = setup();
  storage.setItem("chat.reconnectToken", "rt-from-last-visit");
  client.connect();
  await flush();
  assert.equal(ws.last().query.reconnect, "rt-from-last-visit");
  ws.last().welcome({ reconnectToken: "rt-2" });
  assert.equal(storage.getItem("chat.reconnectToken"), "rt-2");

  ws.last().serverClose(1012, "service restart");
  await clock.advance(1000);
  assert.equal(ws.sockets.length, 2);
  assert.equal(ws.last().query.reconnect, "rt-2");
});

test("the reconnect token is kept per client in memory when no storage is given", async () => {
  const { fakeWebSocket, FakeClock } = await import("./fakes.mjs");
  const ws = fakeWebSocket();
  const clock = new FakeClock();
  const make = () => new ChatClient({ url: "http://h", WebSocket: ws.WebSocket, timers: clock, random: () => 0.5, pingInterval: 0 });
  const a = make();
  a.connect();
  await flush();
  ws.last().welcome({ reconnectToken: "rt-a" });
  ws.last().serverClose(4000);
  await clock.advance(1000);
  assert.equal(ws.last().query.reconnect, "rt-a");
  const b = make();
  b.connect();
  await flush();
  assert.equal(ws.last().query.reconnect, undefined);
});

test("a connection that never gets its welcome frame times out and is retried", async () => {
  const { client, ws, clock } = setup({ connectTimeout: 3000 });
  client.connect();
  await flush();
  ws.last().onopen?.({});
  await clock.advance(2999);
  assert.equal(ws.sockets.length, 1);
  await clock.advance(1);
  assert.deepEqual(ws.sockets[0].closedWith?.code, 1000);
  assert.equal(client.state, "reconnecting");
  await clock.advance(500);
  assert.equal(ws.sockets.length, 2);
});

test("close() disconnects for good and rejects what is outstanding", async () => {
  const { client, ws, clock, events } = setup();
  client.connect();
  await flush();
  ws.last().welcome();
  const sending = client.send("lobby", "hi");
  client.close();
  await assert.rejects(sending, (e) => e.code === "closed");
  assert.equal(client.state, "disconnected");
  assert.ok(ws.last().closedWith);
  await clock.advance(60000);
  assert.equal(ws.sockets.length, 1);
  assert.equal(events.state.at(-1).state, "disconnected");
  await assert.rejects(client.send("lobby", "after close"), (e) => e.code === "closed");
});

test("a silent connection is dropped after a ping goes unanswered", async () => {
  const { client, ws, clock } = setup({ pingInterval: 1000 });
  client.connect();
  await flush();
  ws.last().welcome();
  await clock.advance(1000);
  assert.deepEqual(ws.last().sent.filter((f) => f.type === "ping").length, 1);
  ws.last().receive({ type: "pong" });
  await clock.advance(1000);
  assert.equal(client.state, "connected");
  await clock.advance(1000); // the second ping got nothing back
  assert.equal(client.state, "reconnecting");
  assert.ok(ws.sockets[0].closedWith);
});

test("listeners can be removed", async () => {
  const { client, ws } = setup();
  const seen = [];
  const off = client.on("message", (m) => seen.push(m.id));
  client.connect();
  await flush();
  ws.last().welcome();
  ws.last().receive({ type: "message", room: "lobby", id: "a", userId: "u", message: "x", ts: 1, offset: "1-0", epoch: "e" });
  off();
  ws.last().receive({ type: "message", room: "lobby", id: "b", userId: "u", message: "y", ts: 1, offset: "2-0", epoch: "e" });
  assert.deepEqual(seen, ["a"]);
});
