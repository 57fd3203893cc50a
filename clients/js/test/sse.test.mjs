import test from "node:test";
import assert from "node:assert/strict";
import { setup, flush, isPending, message } from "./fakes.mjs";

/** A client on the SSE transport, welcomed with session `s-1`. */
async function onSse(options = {}) {
  const t = setup({ transports: ["sse"], ...options });
  t.client.connect();
  await flush();
  t.es.last().welcome("s-1");
  await flush();
  return t;
}

const types = (frames) => frames.map((f) => f.type + (f.message ? ":" + f.message : ""));

test("falls back to SSE after the WebSocket handshake fails twice", async () => {
  const t = setup({ room: "news", name: "bob" });
  t.client.connect();
  await flush();
  t.ws.last().fail();
  await t.clock.advance(500);
  assert.equal(t.ws.sockets.length, 2);
  t.ws.last().fail();
  await t.clock.advance(1000);
  assert.equal(t.ws.sockets.length, 2, "no third WebSocket attempt");
  assert.equal(t.es.streams.length, 1);
  const url = new URL(t.es.last().url);
  assert.equal(url.origin + url.pathname, "http://chat.test:8080/sse");
  assert.deepEqual(t.es.last().query, { room: "news", name: "bob" });

  t.es.last().welcome("sess-9");
  assert.equal(t.client.state, "connected");
  assert.equal(t.client.transport, "sse");
  assert.equal(t.events.welcome[0].transport, "sse");
  const sending = t.client.send("news", "over sse");
  await flush();
  const post = t.http.calls[0];
  assert.equal(post.url, "http://chat.test:8080/sse/send");
  assert.equal(post.init.method, "POST");
  assert.equal(post.init.headers["Content-Type"], "application/json");
  assert.equal(post.body.session, "sess-9");
  assert.deepEqual(types(post.frames), ["message:over sse"]);
  post.respond(202, { accepted: 1 });
  await flush();
  const f = post.frames[0];
  t.es.last().receive({ type: "ack", room: "news", id: "i1", offset: "1-0", epoch: "e", cid: f.cid, ref: f.ref });
  assert.equal((await sending).id, "i1");
});

test("a WebSocket cut before its welcome frame counts as a failed handshake", async () => {
  const t = setup();
  t.client.connect();
  await flush();
  t.ws.last().onopen?.({});
  t.ws.last().serverClose(1006);
  await t.clock.advance(500);
  t.ws.last().onopen?.({});
  t.ws.last().serverClose(1001);
  await t.clock.advance(1000);
  assert.equal(t.es.streams.length, 1);
});

test("the fallback is remembered; the WebSocket is tried again every N-th reconnect", async () => {
  const t = setup({ retryPreferredEvery: 3, fallbackAfter: 1 });
  t.client.connect();
  await flush();
  t.ws.last().fail();
  await t.clock.advance(500);
  assert.equal(t.es.streams.length, 1, "fallbackAfter: 1 falls back after one failure");
  t.es.last().welcome();
  await t.clock.advance(10000); // stable: the backoff starts over

  const next = async () => {
    const before = { ws: t.ws.sockets.length, es: t.es.streams.length };
    await t.clock.advance(t.events.state.at(-1).delay);
    return t.ws.sockets.length > before.ws ? "websocket" : t.es.streams.length > before.es ? "sse" : "none";
  };
  t.es.last().error();
  assert.equal(await next(), "sse");
  t.es.last().welcome();
  t.es.last().error();
  assert.equal(await next(), "sse");
  t.es.last().welcome();
  t.es.last().error();
  assert.equal(await next(), "websocket", "third reconnect probes the WebSocket");
  t.ws.last().fail();
  assert.equal(await next(), "sse", "a failed probe goes straight back to SSE");
  t.es.last().welcome();
  t.es.last().error();
  assert.equal(await next(), "sse");
  t.es.last().welcome();
  t.es.last().error();
  assert.equal(await next(), "websocket");
  t.ws.last().welcome();
  assert.equal(t.client.transport, "websocket");
  t.ws.last().serverClose(1001);
  assert.equal(await next(), "websocket", "a probe that worked makes the WebSocket the transport again");
});

test("SSE POSTs go one at a time, batching what queued up meanwhile, in order", async () => {
  const t = await onSse();
  t.client.send("lobby", "a");
  await flush();
  t.client.send("lobby", "b");
  t.client.send("lobby", "c");
  t.client.send("lobby", "d");
  await flush();
  assert.equal(t.http.calls.length, 1, "one POST in flight at a time");
  assert.deepEqual(types(t.http.calls[0].frames), ["message:a"]);
  t.http.calls[0].respond(202, { accepted: 1 });
  await flush();
  assert.equal(t.http.calls.length, 2);
  assert.deepEqual(types(t.http.calls[1].frames), ["message:b", "message:c", "message:d"]);
  assert.equal(t.http.calls[1].body.session, "s-1");
});

test("an SSE POST carries at most 32 frames", async () => {
  const t = await onSse();
  t.client.send("lobby", "first");
  await flush();
  for (let i = 0; i < 40; i++) t.client.send("lobby", `n${i}`);
  t.http.calls[0].respond(202, { accepted: 1 });
  await flush();
  assert.equal(t.http.calls[1].frames.length, 32);
  t.http.calls[1].respond(202, { accepted: 32 });
  await flush();
  assert.deepEqual(types(t.http.calls[2].frames), Array.from({ length: 8 }, (_, i) => `message:n${32 + i}`));
});

test("an SSE POST stays under maxPostBytes", async () => {
  const t = await onSse({ maxPostBytes: 300 });
  t.client.send("lobby", "first");
  await flush();
  for (let i = 0; i < 4; i++) t.client.send("lobby", "x".repeat(100));
  t.http.calls[0].respond(202, {});
  await flush();
  assert.equal(t.http.calls[1].frames.length, 1);
  assert.ok(t.http.calls[1].init.body.length <= 300);
});

test("429 and 503 retry the same frames later, still first in line", async () => {
  const t = await onSse({ random: () => 0 });
  t.client.send("lobby", "a");
  await flush();
  t.client.send("lobby", "b");
  t.http.calls[0].respond(429, { error: { code: "rate_limited", reason: "slow down" } }, { "retry-after": "2" });
  await flush();
  await t.clock.advance(1999);
  assert.equal(t.http.calls.length, 1, "Retry-After is honoured");
  await t.clock.advance(1);
  assert.deepEqual(types(t.http.calls[1].frames), ["message:a", "message:b"]);
  t.http.calls[1].respond(503, { error: { code: "unavailable", reason: "broker down" } });
  await flush();
  await t.clock.advance(499);
  assert.equal(t.http.calls.length, 2);
  await t.clock.advance(1);
  assert.deepEqual(types(t.http.calls[2].frames), ["message:a", "message:b"]);
  t.http.calls[2].fail(); // no answer at all: also retried
  await flush();
  await t.clock.advance(1000);
  assert.deepEqual(types(t.http.calls[3].frames), ["message:a", "message:b"]);
  assert.equal(t.client.state, "connected");
});

test("an SSE POST that keeps failing ends the connection", async () => {
  const t = await onSse({ random: () => 0 });
  t.client.send("lobby", "a");
  await flush();
  for (let i = 0; i < 4; i++) {
    t.http.calls[i].respond(503, { error: { code: "unavailable", reason: "broker down" } });
    await flush();
    await t.clock.advance(4000);
  }
  assert.equal(t.client.state, "reconnecting");
  assert.ok(t.es.streams[0].closed);
});

test("404 unknown_session and 403 reconnect, and the send goes again with its cid", async () => {
  for (const status of [404, 403]) {
    const t = await onSse();
    const sending = t.client.send("lobby", "hello");
    await flush();
    const first = t.http.calls[0].frames[0];
    t.http.calls[0].respond(status, { error: { code: status === 404 ? "unknown_session" : "forbidden", reason: "gone" } });
    await flush();
    assert.equal(t.client.state, "reconnecting", String(status));
    assert.ok(t.es.streams[0].closed);
    await t.clock.advance(500);
    assert.equal(t.es.streams.length, 2);
    t.es.last().welcome("s-2");
    await flush();
    const again = t.http.calls[1];
    assert.equal(again.body.session, "s-2");
    assert.equal(again.frames[0].cid, first.cid);
    again.respond(202, {});
    await flush();
    t.es.last().receive({ type: "ack", room: "lobby", id: "x", cid: first.cid, ref: again.frames[0].ref, duplicate: false });
    assert.equal((await sending).cid, first.cid);
  }
});

test("400 rejects the frames of that POST with the server's code", async () => {
  const t = await onSse();
  const sending = t.client.send("lobby", "bad");
  await flush();
  t.http.calls[0].respond(400, { error: { code: "invalid_frame", reason: "frames must be objects" } });
  await assert.rejects(sending, (e) => e.code === "invalid_frame" && e.reason === "frames must be objects");
  assert.equal(t.client.state, "connected");
});

test("413 splits a batch; a single frame too large is rejected", async () => {
  const t = await onSse();
  const first = t.client.send("lobby", "first");
  await flush();
  const big = t.client.send("lobby", "big");
  const small = t.client.send("lobby", "small");
  t.http.calls[0].respond(202, {});
  await flush();
  assert.equal(t.http.calls[1].frames.length, 2);
  t.http.calls[1].respond(413);
  await flush();
  assert.deepEqual(types(t.http.calls[2].frames), ["message:big"]);
  t.http.calls[2].respond(413);
  await assert.rejects(big, (e) => e.code === "message_too_large");
  await flush();
  assert.deepEqual(types(t.http.calls[3].frames), ["message:small"]);
  assert.ok(await isPending(small));
  assert.ok(await isPending(first));
});

test("the ack timeout starts when a POST was accepted, not while it waits", async () => {
  const t = await onSse({ ackTimeout: 1000 });
  t.client.send("lobby", "a");
  await flush();
  await t.clock.advance(5000);
  assert.equal(t.http.calls.length, 1, "no retry while the POST is unanswered");
  t.http.calls[0].respond(202, {});
  await flush();
  await t.clock.advance(1000);
  assert.equal(t.http.calls.length, 2);
  assert.equal(t.http.calls[1].frames[0].cid, t.http.calls[0].frames[0].cid);
});

test("the SSE close event acts like a WebSocket close code", async () => {
  const terminal = await onSse();
  terminal.es.last().receive({ type: "close", code: 4004, reason: "disconnected by the application" });
  assert.equal(terminal.client.state, "disconnected");
  assert.equal(terminal.events.state.at(-1).code, 4004);
  assert.ok(terminal.es.last().closed);
  await terminal.clock.advance(60000);
  assert.equal(terminal.es.streams.length, 1);

  const again = await onSse();
  again.es.last().receive(message("lobby", "10-0"));
  again.es.last().receive({ type: "close", code: 4000, reason: "slow consumer" });
  assert.equal(again.client.state, "reconnecting");
  assert.equal(again.events.state.at(-1).code, 4000);
  assert.ok(again.es.streams[0].closed, "the stream is closed, not left to EventSource's own reconnect");
  await again.clock.advance(500);
  assert.deepEqual(again.es.last().query, { room: "lobby", since: "10-0", epoch: "e1" });
});

test("an EventSource error is a dropped connection and every room resumes", async () => {
  const t = await onSse({ storage: undefined });
  t.client.join("news", { presence: true });
  await flush();
  const join = t.http.calls[0].frames[0];
  t.http.calls[0].respond(202, {});
  t.es.last().receive({ type: "joined", room: "news", ref: join.ref });
  t.es.last().receive(message("news", "3-0"));
  t.es.last().error();
  assert.ok(t.es.streams[0].closed);
  await t.clock.advance(500);
  t.es.last().welcome("s-2");
  await flush();
  const { ref, ...rejoin } = t.http.calls[1].frames[0];
  assert.deepEqual(rejoin, { type: "join", room: "news", since: "3-0", epoch: "e1", presence: true });
  assert.equal(t.http.calls[1].body.session, "s-2");
});

test("frames arriving on the stream are handled as on a WebSocket", async () => {
  const t = await onSse();
  t.es.last().receive(message("lobby", "1-0"));
  t.es.last().receive(message("lobby", "1-0"));
  t.es.last().receive({ type: "presence_event", room: "lobby", event: "leave", userId: "u-2" });
  assert.equal(t.events.message.length, 1);
  assert.deepEqual(t.events.presence, [{ room: "lobby", event: "leave", userId: "u-2" }]);
});
