import test from "node:test";
import assert from "node:assert/strict";
import { setup, flush, message } from "./fakes.mjs";

async function connected(options) {
  const t = setup(options);
  t.client.connect();
  await flush();
  t.ws.last().welcome();
  return t;
}

/** Fails every new socket until `count` attempts were made; returns the delays announced. */
async function failAttempts(t, count) {
  const delays = [];
  for (let i = 0; i < count; i++) {
    const before = t.ws.sockets.length;
    t.ws.last().fail();
    const state = t.events.state.at(-1);
    assert.equal(state.state, "reconnecting");
    delays.push(state.delay);
    await t.clock.advance(state.delay);
    assert.equal(t.ws.sockets.length, before + 1, "a new attempt after the announced delay");
  }
  return delays;
}

test("backoff doubles from 500 ms up to 20 s, with full jitter", async () => {
  let r = 0.999999;
  const t = await connected({ random: () => r, transports: ["websocket"] });
  t.ws.last().serverClose(1001, "going away");
  await t.clock.advance(t.events.state.at(-1).delay);
  const delays = await failAttempts(t, 7);
  assert.deepEqual([t.events.state.at(-8).delay, ...delays].map(Math.round), [500, 1000, 2000, 4000, 8000, 16000, 20000, 20000]);

  r = 0.25; // full jitter: anywhere from 0 up to the cap
  t.ws.last().fail();
  assert.equal(t.events.state.at(-1).delay, 5000);
  r = 0;
  await t.clock.advance(5000);
  t.ws.last().fail();
  assert.equal(t.events.state.at(-1).delay, 0);
});

test("backoff resets only after a connection stayed up for stableAfter", async () => {
  const t = await connected({ stableAfter: 10000, transports: ["websocket"] });
  t.ws.last().serverClose(1011);
  await t.clock.advance(500);
  await failAttempts(t, 3); // 1000, 2000, 4000
  t.ws.last().welcome();
  await t.clock.advance(9000);
  t.ws.last().serverClose(4000, "slow consumer"); // not stable yet: keeps growing
  assert.equal(Math.round(t.events.state.at(-1).delay), 8000);
  await t.clock.advance(8000);
  t.ws.last().welcome();
  await t.clock.advance(10000);
  t.ws.last().serverClose(4000, "slow consumer");
  assert.equal(Math.round(t.events.state.at(-1).delay), 500);
  assert.equal(t.events.state.at(-1).attempt, 1);
});

test("terminal close codes end in disconnected without another attempt", async () => {
  for (const code of [1000, 1002, 1007, 1009, 4004]) {
    const t = await connected();
    const pendingSend = t.client.send("lobby", "hello");
    t.ws.last().serverClose(code, "bye");
    assert.equal(t.client.state, "disconnected", String(code));
    assert.deepEqual(
      { state: t.events.state.at(-1).state, code: t.events.state.at(-1).code },
      { state: "disconnected", code },
    );
    await assert.rejects(pendingSend, (e) => e.code === "closed" && e.closeCode === code);
    await t.clock.advance(120000);
    assert.equal(t.ws.sockets.length, 1, `no reconnect after ${code}`);
  }
});

test("reconnect-class close codes reconnect", async () => {
  for (const code of [1001, 1006, 1011, 1012, 1013, 4000, 4001, 4002]) {
    const t = await connected();
    t.ws.last().serverClose(code);
    assert.equal(t.client.state, "reconnecting", String(code));
    assert.equal(t.events.state.at(-1).code, code);
    await t.clock.advance(500);
    assert.equal(t.ws.sockets.length, 2, `reconnected after ${code}`);
  }
});

test("1008 (rate limits) waits at least 5 s before reconnecting", async () => {
  const t = await connected({ random: () => 0 });
  t.ws.last().serverClose(1008, "policy violation");
  assert.equal(t.events.state.at(-1).delay, 5000);
  await t.clock.advance(4999);
  assert.equal(t.ws.sockets.length, 1);
  await t.clock.advance(1);
  assert.equal(t.ws.sockets.length, 2);
});

test("after a reconnect every room resumes from its own offset and epoch; presence is kept", async () => {
  const t = await connected({ presence: true });
  const s1 = t.ws.last();
  const news = t.client.join("news", { presence: true });
  const sport = t.client.join("sport");
  assert.deepEqual(s1.frames("join").map(({ ref, ...f }) => f), [
    { type: "join", room: "news", presence: true },
    { type: "join", room: "sport" },
  ]);
  for (const f of s1.frames("join")) s1.receive({ type: "joined", room: f.room, ref: f.ref });
  await news;
  await sport;
  s1.receive(message("lobby", "100-0", { epoch: "eL" }));
  s1.receive(message("news", "200-3", { epoch: "eN" }));
  s1.receive(message("sport", "300-1", { epoch: "eS" }));
  s1.receive(message("news", "200-4", { epoch: "eN" }));

  s1.serverClose(1012, "service restart");
  await t.clock.advance(500);
  const s2 = t.ws.last();
  assert.deepEqual(s2.query, { room: "lobby", presence: "true", since: "100-0", epoch: "eL" });
  assert.deepEqual(s2.sent, [], "nothing is sent before the welcome frame");
  s2.welcome();
  assert.deepEqual(s2.frames("join").map(({ ref, ...f }) => f), [
    { type: "join", room: "news", since: "200-4", epoch: "eN", presence: true },
    { type: "join", room: "sport", since: "300-1", epoch: "eS" },
  ]);
  for (const f of s2.frames("join")) s2.receive({ type: "joined", room: f.room, epoch: f.epoch, recovered: true, ref: f.ref });
  s2.receive({ type: "joined", room: "lobby", epoch: "eL", recovered: true });
  assert.deepEqual(t.events.joined.filter((e) => e.rejoin).map((e) => e.room), ["news", "sport", "lobby"]);
  assert.deepEqual(t.events.gap, []);
});

test("a left room is not rejoined", async () => {
  const t = await connected();
  const s1 = t.ws.last();
  t.client.join("news");
  s1.receive({ type: "joined", room: "news", ref: s1.frames("join")[0].ref });
  const leaving = t.client.leave("news");
  const leave = s1.frames("leave")[0];
  assert.equal(leave.room, "news");
  s1.receive({ type: "left", room: "news", ref: leave.ref });
  await leaving;
  s1.receive(message("news", "5-0")); // in flight before the leave took effect
  assert.equal(t.events.message.length, 0);
  s1.serverClose(1001);
  await t.clock.advance(500);
  t.ws.last().welcome();
  assert.deepEqual(t.ws.last().frames("join"), []);
  assert.deepEqual(t.events.left.map((e) => e.room), ["news"]);
});

test("duplicate offsets are dropped; a new epoch starts over", async () => {
  const t = await connected();
  const s = t.ws.last();
  s.receive(message("lobby", "10-0"));
  s.receive(message("lobby", "10-1"));
  s.receive(message("lobby", "10-1")); // the same again
  s.receive(message("lobby", "9-5")); // older
  s.receive(message("lobby", "11-0"));
  s.receive(message("lobby", "3-0", { epoch: "e2" })); // the history was lost and restarted
  s.receive(message("lobby", "3-0", { epoch: "e2" }));
  s.receive(message("lobby", "4-0", { epoch: "e2" }));
  assert.deepEqual(t.events.message.map((m) => `${m.epoch}/${m.offset}`), ["e1/10-0", "e1/10-1", "e1/11-0", "e2/3-0", "e2/4-0"]);
  assert.deepEqual(t.client.position("lobby"), { offset: "4-0", epoch: "e2" });
});

test("a replay that overlaps what was delivered live is deduplicated across a reconnect", async () => {
  const t = await connected();
  t.ws.last().receive(message("lobby", "10-0"));
  t.ws.last().receive(message("lobby", "11-0"));
  t.ws.last().serverClose(1006);
  await t.clock.advance(500);
  const s2 = t.ws.last();
  assert.equal(s2.query.since, "11-0");
  s2.welcome();
  s2.receive({ type: "joined", room: "lobby", epoch: "e1", recovered: true });
  s2.receive(message("lobby", "11-0"));
  s2.receive(message("lobby", "12-0"));
  assert.deepEqual(t.events.message.map((m) => m.offset), ["10-0", "11-0", "12-0"]);
  const m = t.events.message[2];
  assert.deepEqual(m, { room: "lobby", id: "id-12-0", userId: "u-9", message: "m 12-0", ts: 1, offset: "12-0", epoch: "e1" });
});

test("recovered:false is surfaced as a gap event for the room", async () => {
  const t = await connected();
  const s1 = t.ws.last();
  t.client.join("news");
  s1.receive({ type: "joined", room: "news", ref: s1.frames("join")[0].ref });
  s1.receive(message("news", "7-0"));
  s1.receive(message("lobby", "8-0"));
  s1.serverClose(4002, "resync");
  await t.clock.advance(500);
  const s2 = t.ws.last();
  s2.welcome();
  s2.receive({ type: "joined", room: "lobby", epoch: "e9", recovered: false });
  const join = s2.frames("join")[0];
  s2.receive({ type: "joined", room: "news", epoch: "e1", recovered: false, ref: join.ref });
  assert.deepEqual(t.events.gap, [
    { room: "lobby", epoch: "e9", reason: "not_recovered" },
    { room: "news", epoch: "e1", reason: "not_recovered" },
  ]);
  // The new epoch's messages are delivered even though their offsets are lower.
  s2.receive(message("lobby", "1-0", { epoch: "e9" }));
  assert.equal(t.events.message.at(-1).offset, "1-0");
});

test("a room without a known offset reports a possible gap after a reconnect", async () => {
  const t = await connected();
  t.client.join("quiet");
  t.ws.last().receive({ type: "joined", room: "quiet", ref: t.ws.last().frames("join")[0].ref });
  t.ws.last().serverClose(1001);
  await t.clock.advance(500);
  const s2 = t.ws.last();
  assert.equal(s2.query.since, undefined);
  s2.welcome();
  const join = s2.frames("join")[0];
  assert.deepEqual({ ...join, ref: 0 }, { type: "join", room: "quiet", ref: 0 });
  s2.receive({ type: "joined", room: "quiet", ref: join.ref });
  assert.deepEqual(t.events.gap, [
    { room: "lobby", reason: "no_position" },
    { room: "quiet", reason: "no_position" },
  ]);
});

test("messages queued while disconnected go out after the reconnect, in order per room", async () => {
  const t = await connected();
  const s1 = t.ws.last();
  t.client.join("news");
  s1.receive({ type: "joined", room: "news", ref: s1.frames("join")[0].ref });
  s1.serverClose(1001);
  const a = t.client.send("news", "one");
  const b = t.client.send("lobby", "two");
  const c = t.client.send("news", "three");
  await flush();
  assert.deepEqual(s1.frames("message"), []);
  await t.clock.advance(500);
  const s2 = t.ws.last();
  s2.welcome();
  const sent = () => s2.frames().map((f) => f.type + ":" + (f.message ?? f.room));
  // The default room is joined by the handshake itself; news waits for its rejoin.
  assert.deepEqual(sent(), ["join:news", "message:two"]);
  s2.receive({ type: "joined", room: "news", ref: s2.frames("join")[0].ref });
  assert.deepEqual(sent(), ["join:news", "message:two", "message:one", "message:three"]);
  for (const f of s2.frames("message")) s2.receive({ type: "ack", room: f.room, id: "i-" + f.message, cid: f.cid, ref: f.ref });
  assert.deepEqual((await Promise.all([a, b, c])).map((x) => x.id), ["i-one", "i-two", "i-three"]);
});

test("a message sent right after join() waits for the joined reply", async () => {
  const t = await connected();
  t.client.join("news");
  t.client.send("news", "first!");
  assert.deepEqual(t.ws.last().frames().map((f) => f.type), ["join"]);
  t.ws.last().receive({ type: "joined", room: "news", ref: t.ws.last().frames("join")[0].ref });
  assert.deepEqual(t.ws.last().frames().map((f) => f.type), ["join", "message"]);
});

test("a rejoin refused as unavailable is retried and its room's messages wait for it", async () => {
  const t = await connected({ random: () => 0 });
  t.client.join("news");
  t.ws.last().receive({ type: "joined", room: "news", ref: t.ws.last().frames("join")[0].ref });
  t.ws.last().serverClose(1013, "try again later");
  const sending = t.client.send("news", "patience");
  await t.clock.advance(500);
  const s2 = t.ws.last();
  s2.welcome();
  s2.receive({ type: "error", code: "unavailable", reason: "broker", ref: s2.frames("join")[0].ref });
  assert.deepEqual(s2.frames("message"), [], "not sent into a room the server has not joined");
  await t.clock.advance(500);
  const again = s2.frames("join");
  assert.equal(again.length, 2);
  s2.receive({ type: "joined", room: "news", ref: again[1].ref });
  const m = s2.frames("message")[0];
  s2.receive({ type: "ack", room: "news", id: "ok", cid: m.cid, ref: m.ref });
  assert.equal((await sending).id, "ok");
  assert.deepEqual(t.events.left, []);
});

test("messages waiting for a join that is refused are rejected with it", async () => {
  const t = await connected();
  const joining = t.client.join("secret");
  const sending = t.client.send("secret", "psst");
  t.ws.last().receive({ type: "error", code: "forbidden", reason: "no", ref: t.ws.last().frames("join")[0].ref });
  await assert.rejects(joining, (e) => e.code === "forbidden");
  await assert.rejects(sending, (e) => e.code === "not_in_room" && e.room === "secret");
});

test("a room the server refuses to rejoin is dropped and reported", async () => {
  const t = await connected();
  const s1 = t.ws.last();
  t.client.join("vip");
  s1.receive({ type: "joined", room: "vip", ref: s1.frames("join")[0].ref });
  s1.serverClose(1012);
  await t.clock.advance(500);
  const s2 = t.ws.last();
  s2.welcome();
  const join = s2.frames("join")[0];
  s2.receive({ type: "error", code: "forbidden", reason: "not allowed", ref: join.ref });
  assert.deepEqual(t.client.joinedRooms, ["lobby"]);
  assert.equal(t.events.left.at(-1).room, "vip");
  assert.equal(t.events.left.at(-1).error.code, "forbidden");
  await assert.rejects(t.client.send("vip", "x"), (e) => e.code === "not_in_room");
});

test("reconnectNow skips the wait", async () => {
  const t = await connected({ transports: ["websocket"] });
  t.ws.last().serverClose(1001);
  await t.clock.advance(500);
  await failAttempts(t, 3);
  t.ws.last().fail();
  assert.equal(t.ws.sockets.length, 5);
  t.client.reconnectNow();
  await flush();
  assert.equal(t.ws.sockets.length, 6);
});

test("presence events are delivered for joined rooms only", async () => {
  const t = await connected({ presence: true });
  t.ws.last().receive({ type: "presence_event", room: "lobby", event: "join", userId: "u-2", name: "bob" });
  t.ws.last().receive({ type: "presence_event", room: "elsewhere", event: "join", userId: "u-3" });
  assert.deepEqual(t.events.presence, [{ room: "lobby", event: "join", userId: "u-2", name: "bob" }]);
});
