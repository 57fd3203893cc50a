import test from "node:test";
import assert from "node:assert/strict";
import { ChatError } from "../dist/chat-client.js";
import { setup, flush, isPending } from "./fakes.mjs";

async function connected(options) {
  const t = setup(options);
  t.client.connect();
  await flush();
  t.ws.last().welcome();
  return t;
}

const ack = (f, extra = {}) => ({ type: "ack", room: f.room, id: "id-" + f.cid, offset: "5-0", epoch: "e1", cid: f.cid, ref: f.ref, ...extra });

test("acks are matched to their sends by ref, whatever order they come in", async () => {
  const t = await connected();
  const s = t.ws.last();
  const a = t.client.send("lobby", "first");
  const b = t.client.send("lobby", "second");
  const [fa, fb] = s.frames("message");
  assert.equal(fa.message, "first");
  assert.notEqual(fa.ref, fb.ref);
  assert.notEqual(fa.cid, fb.cid);
  s.receive({ type: "ack", room: "lobby", id: "B", offset: "2-0", epoch: "e1", ref: fb.ref });
  s.receive({ type: "ack", room: "lobby", id: "A", offset: "1-0", epoch: "e1", ref: fa.ref });
  assert.deepEqual(await a, { room: "lobby", id: "A", offset: "1-0", epoch: "e1", cid: fa.cid, duplicate: false });
  assert.equal((await b).id, "B");
});

test("every send carries a cid of the protocol's alphabet", async () => {
  const t = await connected();
  t.client.send("lobby", "x");
  assert.match(t.ws.last().frames("message")[0].cid, /^[A-Za-z0-9_.:-]{1,64}$/);
});

test("a send cut off by a drop is retried with the same cid; a duplicate ack resolves it once", async () => {
  const t = await connected();
  const s1 = t.ws.last();
  const sending = t.client.send("lobby", "hello");
  const first = s1.frames("message")[0];
  s1.serverClose(1006);
  assert.ok(await isPending(sending), "still waiting for the reconnect");
  await t.clock.advance(500);
  const s2 = t.ws.last();
  s2.welcome();
  const again = s2.frames("message");
  assert.equal(again.length, 1);
  assert.equal(again[0].cid, first.cid);
  assert.equal(again[0].message, "hello");
  s2.receive(ack(again[0], { duplicate: true }));
  s2.receive(ack(again[0], { duplicate: true })); // a stray second answer changes nothing
  const result = await sending;
  assert.equal(result.duplicate, true);
  assert.equal(result.cid, first.cid);
  assert.deepEqual(t.events.error, []);
});

test("publish_unknown and publish_failed are retried with the same cid", async () => {
  const t = await connected({ random: () => 0 });
  const s = t.ws.last();
  const sending = t.client.send("lobby", "maybe");
  const f1 = s.frames("message")[0];
  s.receive({ type: "error", code: "publish_unknown", reason: "broker did not confirm", ref: f1.ref });
  await t.clock.advance(500);
  const f2 = s.frames("message")[1];
  assert.equal(f2.cid, f1.cid);
  assert.notEqual(f2.ref, f1.ref);
  s.receive({ type: "error", code: "publish_failed", reason: "redis down", ref: f2.ref });
  await t.clock.advance(1000);
  const f3 = s.frames("message")[2];
  assert.equal(f3.cid, f1.cid);
  s.receive(ack(f3));
  assert.equal((await sending).cid, f1.cid);
});

test("an ack to an earlier attempt settles the send; the later answer is ignored", async () => {
  const t = await connected({ ackTimeout: 2000 });
  const s = t.ws.last();
  const sending = t.client.send("lobby", "slow");
  const f1 = s.frames("message")[0];
  await t.clock.advance(2000);
  const f2 = s.frames("message")[1];
  assert.equal(f2.cid, f1.cid, "a timed-out send goes again under its cid");
  s.receive(ack(f1));
  s.receive(ack(f2, { duplicate: true }));
  assert.equal((await sending).duplicate, false);
  assert.equal(s.frames("message").length, 2);
  assert.deepEqual(t.events.error, []);
});

test("retries are bounded by sendRetries", async () => {
  const t = await connected({ ackTimeout: 1000, sendRetries: 2 });
  const sending = t.client.send("lobby", "into the void");
  const rejected = assert.rejects(sending, (e) => e instanceof ChatError && e.code === "timeout");
  await t.clock.advance(1000);
  await t.clock.advance(1000);
  assert.equal(t.ws.last().frames("message").length, 3);
  assert.ok(await isPending(sending));
  await t.clock.advance(1000);
  await rejected;
  assert.equal(t.ws.last().frames("message").length, 3);
});

test("drops count against sendRetries too", async () => {
  const t = await connected({ sendRetries: 1, transports: ["websocket"] });
  const sending = t.client.send("lobby", "unlucky");
  t.ws.last().serverClose(1006);
  await t.clock.advance(500);
  t.ws.last().welcome();
  assert.equal(t.ws.last().frames("message").length, 1);
  t.ws.last().serverClose(1006);
  await assert.rejects(sending, (e) => e.code === "connection_lost");
});

test("terminal errors reject with a typed error carrying the code", async () => {
  for (const code of ["forbidden", "not_in_room", "message_too_large", "empty_message", "invalid_frame"]) {
    const t = await connected();
    const sending = t.client.send("lobby", "nope");
    const f = t.ws.last().frames("message")[0];
    t.ws.last().receive({ type: "error", code, reason: "because", message: "because", ref: f.ref });
    await assert.rejects(sending, (e) => e instanceof ChatError && e.code === code && e.reason === "because" && e.room === "lobby");
    await t.clock.advance(60000);
    assert.equal(t.ws.last().frames("message").length, 1, `${code} is not retried`);
  }
});

test("rate_limited is retried after a pause, then rejected", async () => {
  const t = await connected({ sendRetries: 2, random: () => 0 });
  const s = t.ws.last();
  const sending = t.client.send("lobby", "spam");
  const limited = () => {
    const f = s.frames("message").at(-1);
    s.receive({ type: "error", code: "rate_limited", reason: "slow down", ref: f.ref });
  };
  limited();
  await t.clock.advance(999);
  assert.equal(s.frames("message").length, 1, "waits at least a second");
  await t.clock.advance(1);
  assert.equal(s.frames("message").length, 2);
  limited();
  await t.clock.advance(2000);
  assert.equal(s.frames("message").length, 3);
  limited();
  await assert.rejects(sending, (e) => e.code === "rate_limited");
});

test("sends are checked locally first", async () => {
  const t = await connected();
  await assert.rejects(t.client.send("news", "x"), (e) => e.code === "not_in_room");
  await assert.rejects(t.client.send("lobby", "  \n"), (e) => e.code === "empty_message");
  assert.deepEqual(t.ws.last().frames("message"), []);
});

test("an error frame that answers no request becomes an error event", async () => {
  const t = await connected();
  t.ws.last().receive({ type: "error", code: "unavailable", reason: "broker", message: "broker" });
  assert.equal(t.events.error.length, 1);
  assert.equal(t.events.error[0].code, "unavailable");
});

test("presence() and history() resolve with their replies", async () => {
  const t = await connected();
  const s = t.ws.last();
  const who = t.client.presence("lobby");
  const page = t.client.history("lobby", { limit: 2, since: "1-0", epoch: "e1" });
  const [p, h] = [s.frames("presence")[0], s.frames("history")[0]];
  assert.deepEqual({ ...h, ref: 0 }, { type: "history", room: "lobby", limit: 2, since: "1-0", epoch: "e1", ref: 0 });
  s.receive({ type: "history", room: "lobby", epoch: "e1", recovered: true, ref: h.ref, messages: [
    { type: "message", room: "lobby", id: "a", userId: "u-2", name: "bob", message: "hi", ts: 5, offset: "2-0", epoch: "e1" },
  ] });
  s.receive({ type: "presence", room: "lobby", users: [{ userId: "u-2", name: "bob" }, { userId: "u-3" }], ref: p.ref });
  assert.deepEqual(await who, [{ userId: "u-2", name: "bob" }, { userId: "u-3" }]);
  assert.deepEqual(await page, {
    room: "lobby", epoch: "e1", recovered: true,
    messages: [{ room: "lobby", id: "a", userId: "u-2", name: "bob", message: "hi", ts: 5, offset: "2-0", epoch: "e1" }],
  });
  assert.deepEqual(t.events.message, [], "history is not delivered as live messages");
  assert.deepEqual(t.client.position("lobby"), {});
});

test("history() without since asks for the newest messages", async () => {
  const t = await connected();
  const page = t.client.history("news");
  const h = t.ws.last().frames("history")[0];
  assert.deepEqual(Object.keys(h).sort(), ["ref", "room", "type"]);
  t.ws.last().receive({ type: "history", room: "news", epoch: null, messages: [], ref: h.ref });
  assert.deepEqual(await page, { room: "news", epoch: null, messages: [] });
  await assert.rejects(t.client.history("news", { limit: 0 }), (e) => e.code === "invalid_frame");
});

test("join() resolves with joined, rejects on a refusal and forgets the room", async () => {
  const t = await connected();
  const s = t.ws.last();
  const ok = t.client.join("news", { last: 20 });
  const no = t.client.join("secret");
  const [fj, fs] = s.frames("join");
  assert.equal(fj.last, 20);
  s.receive({ type: "joined", room: "news", epoch: "e7", ref: fj.ref });
  s.receive({ type: "error", code: "forbidden", reason: "token does not allow secret", ref: fs.ref });
  assert.deepEqual(await ok, { room: "news", epoch: "e7", rejoin: false });
  await assert.rejects(no, (e) => e.code === "forbidden" && e.room === "secret");
  assert.deepEqual(t.client.joinedRooms, ["lobby", "news"]);
  await assert.rejects(t.client.join("bad room"), (e) => e.code === "invalid_room");
  await assert.rejects(t.client.leave("lobby"), (e) => e.code === "default_room");
});

test("joining a room twice sends one join", async () => {
  const t = await connected();
  const a = t.client.join("news");
  const b = t.client.join("news");
  const frames = t.ws.last().frames("join");
  assert.equal(frames.length, 1);
  t.ws.last().receive({ type: "joined", room: "news", ref: frames[0].ref });
  assert.equal((await a).room, "news");
  assert.equal((await b).room, "news");
  assert.equal((await t.client.join("news")).room, "news");
  assert.equal(t.ws.last().frames("join").length, 1);
});

test("unavailable is retried for joins and queries", async () => {
  const t = await connected({ random: () => 0 });
  const s = t.ws.last();
  const who = t.client.presence("lobby");
  s.receive({ type: "error", code: "unavailable", reason: "broker", ref: s.frames("presence")[0].ref });
  await t.clock.advance(500);
  const again = s.frames("presence");
  assert.equal(again.length, 2);
  s.receive({ type: "presence", room: "lobby", users: [], ref: again[1].ref });
  assert.deepEqual(await who, []);
});
