// The demo page (gateway/static/index.html on the client library) and the seed's React client in
// headless Chromium, against the native cluster through nginx. One browser and one cluster for
// the whole file; every test has its own browser context (storage) and its own room.
//
//   GATEWAY_BIN=target/debug/chat-gateway npm test      (in tests/browser, after npm ci)

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";
import { Cluster, until } from "./cluster.mjs";
import { serveChatApp } from "./seed.mjs";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

let cluster, browser;
let rooms = 0;
const room = (what) => `${what}-${process.pid}-${++rooms}`;

before(async () => {
  cluster = await Cluster.start({
    // Low message limits, so that the seed test's burst is cut short by rate limiting.
    env: { GATEWAY_CONN_MESSAGE_RATE: "5", GATEWAY_CONN_MESSAGE_BURST: "10" },
  });
  browser = await chromium.launch({ executablePath: CHROMIUM });
});

after(async () => {
  await browser?.close();
  await cluster?.stop();
});

/** Opens the demo page from `base` in a fresh context, in `roomName`, as `name`. */
async function openDemo(base, roomName, name) {
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  await context.addInitScript((n) => { localStorage.setItem("chat.name", n); }, name);
  const page = await context.newPage();
  page.problems = [];
  page.on("console", (m) => { if (m.type() === "error") page.problems.push(`console: ${m.text()}`); });
  page.on("pageerror", (e) => page.problems.push(`page error: ${e.message}`));
  page.on("response", (r) => { if (r.status() >= 400) page.problems.push(`${r.status()} ${r.url()}`); });
  await page.goto(`${base}/#${roomName}`);
  await connected(page);
  return page;
}

const connected = (page, timeout = 15_000) =>
  page.waitForSelector('#conn[data-s="connected"]', { timeout });

/** What the page shows: every message in order, with its sender and whether it is confirmed. */
const shown = (page) => page.evaluate(() =>
  [...document.querySelectorAll("#log li:not(.note)")].map((li) => ({
    text: li.querySelector(".txt").textContent,
    who: li.querySelector(".who").textContent,
    userId: li.querySelector(".who").title,
    pending: li.classList.contains("pending") || li.classList.contains("failed"),
  })));

async function say(page, text) {
  await page.fill("#msg", text);
  await page.press("#msg", "Enter");
}

/** Waits until the page shows `texts` (in this order, confirmed) and returns what it shows. */
async function waitFor(page, texts, ms = 10_000) {
  let last = [];
  try {
    return await until(`${texts.join(", ")} on the page`, async () => {
      last = await shown(page);
      const confirmed = last.filter((m) => !m.pending).map((m) => m.text);
      return texts.every((t) => confirmed.includes(t)) ? last : null;
    }, ms);
  } catch (e) {
    e.message += `; the page shows ${JSON.stringify(last.map((m) => m.text))}`;
    throw e;
  }
}

const texts = (messages) => messages.map((m) => m.text);

describe("the demo page in Chromium through nginx", () => {
  test("two pages chat; a page opened later loads the room's history", async () => {
    const r = room("chat");
    const alice = await openDemo(cluster.url, r, "alice");
    const bob = await openDemo(cluster.url, r, "bob");
    try {
      await say(alice, "hello from alice");
      await waitFor(bob, ["hello from alice"]);
      await say(bob, "hi alice");
      const onAlice = await waitFor(alice, ["hello from alice", "hi alice"]);
      assert.deepEqual(onAlice.map((m) => [m.text, m.who]), [["hello from alice", "alice (you)"], ["hi alice", "bob"]]);
      const onBob = await waitFor(bob, ["hello from alice", "hi alice"]);
      assert.deepEqual(onBob.map((m) => [m.text, m.who]), [["hello from alice", "alice"], ["hi alice", "bob (you)"]]);

      // A newcomer sees what was said before it came.
      const carol = await openDemo(cluster.url, r, "carol");
      try {
        const onCarol = await waitFor(carol, ["hello from alice", "hi alice"]);
        assert.deepEqual(onCarol.map((m) => [m.text, m.who]), [["hello from alice", "alice"], ["hi alice", "bob"]]);
        assert.deepEqual(carol.problems, []);
      } finally {
        await carol.context().close();
      }

      // Anonymous mode: no token field; the icon and the library load (nothing 404s).
      for (const page of [alice, bob]) {
        assert.equal(await page.isVisible("#token"), false, "token field hidden in anonymous mode");
        assert.deepEqual(page.problems, []);
      }
    } finally {
      await alice.context().close();
      await bob.context().close();
    }
  });

  test("a page whose node is killed shows reconnecting, then resumes with no gap and no duplicate", async () => {
    const r = room("kill");
    const alice = await openDemo(cluster.url, r, "alice");
    const bob = await openDemo(cluster.url, r, "bob");
    let killed;
    try {
      const node = (page) => page.getAttribute("#node", "data-node");
      const aliceNode = await node(alice);
      // nginx balances by least connections: bob lands on another node than alice.
      assert.notEqual(await node(bob), aliceNode);
      const aliceId = await alice.getAttribute("#me", "data-user-id");

      await say(bob, "before");
      await say(alice, "alice before");
      await waitFor(alice, ["before", "alice before"]);
      await waitFor(bob, ["before", "alice before"]);

      // Record every connection state the page shows, so a short one is not missed.
      await alice.evaluate(() => {
        const conn = document.getElementById("conn");
        window.shownStates = [];
        new MutationObserver(() => window.shownStates.push(conn.dataset.s))
          .observe(conn, { attributes: true, attributeFilter: ["data-s"] });
      });
      await cluster.killNode(aliceNode);
      killed = aliceNode;
      for (const t of ["while down 1", "while down 2", "while down 3"]) await say(bob, t);
      await waitFor(bob, ["while down 3"]);

      const states = await until("alice to reconnect", async () => {
        const s = await alice.evaluate(() => window.shownStates);
        return s.includes("reconnecting") && s.at(-1) === "connected" ? s : null;
      }, 20_000);
      assert.equal(states[0], "reconnecting", `states shown: ${states}`);
      assert.notEqual(await node(alice), aliceNode, "alice is on another node now");

      await say(bob, "after");
      await say(alice, "alice after");
      const expected = ["before", "alice before", "while down 1", "while down 2", "while down 3", "after", "alice after"];
      assert.deepEqual(texts(await waitFor(alice, expected, 15_000)), expected);
      const onBob = await waitFor(bob, expected);
      assert.deepEqual(texts(onBob), expected);

      // The same person before and after, for alice and for those who read her.
      assert.equal(await alice.getAttribute("#me", "data-user-id"), aliceId);
      const hers = onBob.filter((m) => m.who === "alice").map((m) => m.userId);
      assert.deepEqual(hers, [aliceId, aliceId]);
    } finally {
      await alice.context().close();
      await bob.context().close();
      if (killed) await cluster.startNode(killed);
    }
  });

  test("behind a proxy that refuses WebSockets a page chats over SSE + POST, its POSTs served by any node", async () => {
    const r = room("sse");
    const alice = await openDemo(cluster.noUpgradeUrl, r, "alice");
    const bob = await openDemo(cluster.url, r, "bob");
    try {
      assert.equal(await alice.getAttribute("#node", "data-transport"), "sse");
      assert.equal(await bob.getAttribute("#node", "data-transport"), "websocket");
      const streamNode = cluster.nodeAddress(await alice.getAttribute("#node", "data-node"));

      const said = [];
      for (let i = 1; i <= 4; i++) {
        await say(alice, `over sse ${i}`);
        said.push(`over sse ${i}`);
        await waitFor(bob, [`over sse ${i}`]);
        await say(bob, `over websocket ${i}`);
        said.push(`over websocket ${i}`);
        await waitFor(alice, [`over websocket ${i}`]);
      }
      assert.deepEqual(texts(await waitFor(alice, said)), said);
      assert.deepEqual(texts(await waitFor(bob, said)), said);

      // The proxy's log names the node that answered each POST: not only the stream's.
      const posts = (await cluster.noUpgradeRequests()).filter((q) => q.method === "POST" && q.uri === "/sse/send");
      assert.ok(posts.length >= 4, `POSTs: ${JSON.stringify(posts)}`);
      assert.ok(posts.every((q) => q.status === 202), `POSTs: ${JSON.stringify(posts)}`);
      const elsewhere = posts.filter((q) => q.upstream !== streamNode);
      assert.ok(elsewhere.length > 0, `every POST went to the stream's node ${streamNode}: ${JSON.stringify(posts)}`);
    } finally {
      await alice.context().close();
      await bob.context().close();
    }
  });
});

describe("the seed's React client (ChatApp) in Chromium through nginx", () => {
  test("shows no blank line for a rate-limited burst or a blank message", async () => {
    const app = await serveChatApp(`wss://127.0.0.1:${cluster.httpsPort}`);
    const context = await browser.newContext({ ignoreHTTPSErrors: true });
    try {
      const page = await context.newPage();
      // The component logs "WebSocket connected" in its onopen.
      const open = page.waitForEvent("console", { predicate: (m) => m.text() === "WebSocket connected", timeout: 15_000 });
      await page.goto(app.url);
      await open;
      const input = page.locator('input[type="text"]');
      const button = page.locator("button");
      // Over the connection's burst (10) at once: the surplus is refused with rate_limited.
      const burst = 25;
      for (let i = 0; i < burst; i++) {
        await input.fill(`burst ${i}`);
        await button.click();
      }
      await input.fill("   ");
      await button.click();
      // One line per frame the server answered with: an echo or an error.
      const lines = await until(`${burst + 1} lines`, async () => {
        const l = await page.locator("h1 + div > div").allTextContents();
        return l.length >= burst + 1 ? l : null;
      }, 15_000);
      const blank = lines.filter((l) => !l.trim());
      assert.deepEqual(blank, [], `blank lines among ${JSON.stringify(lines)}`);
      assert.ok(lines.includes("burst 0"), JSON.stringify(lines));
      assert.ok(lines.some((l) => /too many messages|rate/i.test(l)), `no rate-limit text in ${JSON.stringify(lines)}`);
    } finally {
      await context.close();
      await app.close();
    }
  });
});
