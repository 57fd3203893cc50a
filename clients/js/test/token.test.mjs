import test from "node:test";
import assert from "node:assert/strict";
import { setup, flush, jwt } from "./fakes.mjs";

/** A client whose token callback hands out numbered tokens living `life` seconds from "now". */
async function withIssuer(life, options = {}) {
  const issued = [];
  const t = setup(({ clock }) => ({
    token: async () => {
      const token = jwt({ sub: "alice", n: issued.length + 1, exp: Math.floor(clock.now() / 1000) + life });
      issued.push(token);
      return token;
    },
    ...options,
  }));
  t.client.connect();
  await flush();
  return { ...t, issued };
}

test("the token is refreshed refreshBefore seconds before exp and sent in an auth frame", async () => {
  const t = await withIssuer(3600, { refreshBefore: 60 });
  assert.equal(t.issued.length, 1);
  assert.deepEqual(t.ws.last().protocols, ["chat.v1", `token.${t.issued[0]}`]);
  t.ws.last().welcome({ userId: "alice" });

  await t.clock.advance(3539_000);
  assert.deepEqual(t.ws.last().frames("auth"), []);
  await t.clock.advance(1_000);
  assert.equal(t.issued.length, 2);
  const auth = t.ws.last().frames("auth");
  assert.equal(auth.length, 1);
  assert.equal(auth[0].token, t.issued[1]);

  const exp = Math.floor(t.clock.now() / 1000) + 3600;
  t.ws.last().receive({ type: "authenticated", userId: "alice", exp, ref: auth[0].ref });
  assert.deepEqual(t.events.authenticated, [{ userId: "alice", exp }]);
  // The next refresh follows the new expiry, not the old one.
  await t.clock.advance(3539_000);
  assert.equal(t.ws.last().frames("auth").length, 1);
  await t.clock.advance(1_000);
  assert.equal(t.ws.last().frames("auth").length, 2);
  assert.equal(t.ws.sockets.length, 1, "refreshing never reconnects");
});

test("4003 fetches a fresh token from the callback before reconnecting", async () => {
  const t = await withIssuer(30);
  t.ws.last().welcome();
  t.ws.last().serverClose(4003, "token expired");
  assert.equal(t.client.state, "reconnecting");
  await t.clock.advance(500);
  assert.equal(t.ws.sockets.length, 2);
  const fresh = t.issued.at(-1);
  assert.notEqual(fresh, t.issued[0]);
  assert.deepEqual(t.ws.last().protocols, ["chat.v1", `token.${fresh}`]);
});

test("4003 with a fixed token string is terminal: the same token would be refused", async () => {
  const t = setup({ token: jwt({ sub: "alice", exp: 1 }) });
  t.client.connect();
  await flush();
  t.ws.last().welcome();
  t.ws.last().serverClose(4003, "token expired");
  assert.equal(t.client.state, "disconnected");
  assert.equal(t.events.state.at(-1).code, 4003);
  await t.clock.advance(60000);
  assert.equal(t.ws.sockets.length, 1);
});

test("a refused auth frame is reported and the connection carries on", async () => {
  const t = await withIssuer(120, { refreshBefore: 60 });
  t.ws.last().welcome();
  await t.clock.advance(60_000);
  const auth = t.ws.last().frames("auth")[0];
  assert.ok(auth, "refreshed 60 s before exp");
  t.ws.last().receive({ type: "error", code: "unauthorized", reason: "sub differs", ref: auth.ref });
  assert.deepEqual(t.events.error.map((e) => e.code), ["unauthorized"]);
  assert.equal(t.client.state, "connected");
});

test("a token that lives shorter than refreshBefore is refreshed halfway", async () => {
  const t = await withIssuer(40, { refreshBefore: 60 });
  t.ws.last().welcome();
  await t.clock.advance(19_999);
  assert.equal(t.ws.last().frames("auth").length, 0);
  await t.clock.advance(1);
  assert.equal(t.ws.last().frames("auth").length, 1);
});

test("a failing token callback is reported and retried with backoff", async () => {
  let calls = 0;
  const t = setup({
    token: async () => {
      if (++calls === 1) throw new Error("login server down");
      return jwt({ sub: "a", exp: 4102444800 });
    },
  });
  t.client.connect();
  await flush();
  assert.equal(t.ws.sockets.length, 0);
  assert.equal(t.events.error[0].code, "token_unavailable");
  assert.equal(t.client.state, "reconnecting");
  await t.clock.advance(500);
  assert.equal(t.ws.sockets.length, 1);
});

test("over SSE the token travels in the query", async () => {
  const token = jwt({ sub: "a", exp: 4102444800 });
  const t = setup({ token, transports: ["sse"] });
  t.client.connect();
  await flush();
  assert.equal(t.es.last().query.token, token);
});
