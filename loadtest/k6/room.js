// The room client shared by fanout.js and soak.js: one VU = one connection in one room for the
// whole test. Senders follow a deterministic schedule from a common start time, so every VU
// knows how many deliveries its room owes it and counts the missing ones when it leaves.

import { check } from "k6";
import exec from "k6/execution";
import { Counter, Rate, Trend } from "k6/metrics";
import { clearInterval, setInterval, setTimeout } from "k6/timers";

import {
  clientUrl,
  decodeFrame,
  decodeProbe,
  encodeChat,
  encodePing,
  encodeProbe,
  envDurationMs,
  envFloat,
  envInt,
  k6Duration,
  layout,
  messagesPerSender,
  sendersInRoom,
  targets,
} from "./lib.js";
import { WebSocket } from "./websockets.js";

const deliveryLatency = new Trend("delivery_latency", true);
const pingRtt = new Trend("ping_rtt", true);
const expectedDeliveries = new Counter("deliveries_expected");
const receivedDeliveries = new Counter("deliveries_received");
const missingDeliveries = new Counter("deliveries_missing");
const duplicateDeliveries = new Counter("deliveries_duplicate");
const completeClients = new Rate("delivery_complete");
const connectFailures = new Counter("ws_connect_failures");
const unexpectedCloses = new Counter("ws_unexpected_closes");
const sentMessages = new Counter("chat_sent");
const serverErrors = new Counter("server_errors");

/** Scenario parameters from the environment, with per-script defaults. */
export function roomConfig(defaults) {
  const cfg = {
    vus: envInt("VUS", defaults.vus),
    rooms: envInt("ROOMS", defaults.rooms),
    senders: envInt("SENDERS", defaults.senders),
    rate: envFloat("RATE", defaults.rate),
    size: envInt("SIZE", 64),
    sendMs: envDurationMs("DURATION", defaults.duration),
    warmupMs: envDurationMs("WARMUP", defaults.warmup),
    drainMs: envDurationMs("DRAIN", defaults.drain),
    pingEveryMs: envDurationMs("PING_EVERY", defaults.pingEvery),
    targets: targets(),
  };
  if (cfg.vus < cfg.rooms) throw new Error("VUS must be at least ROOMS");
  if (cfg.rate <= 0) throw new Error("RATE must be positive");
  cfg.perSender = messagesPerSender(cfg.rate, cfg.sendMs);
  return cfg;
}

/** k6 options: one iteration per VU lasting the whole test, and the thresholds that fail it. */
export function roomOptions(cfg, name, defaults) {
  return {
    scenarios: {
      [name]: {
        executor: "per-vu-iterations",
        vus: cfg.vus,
        iterations: 1,
        maxDuration: k6Duration(cfg.warmupMs + cfg.sendMs + cfg.drainMs + 30_000),
      },
    },
    summaryTrendStats: ["avg", "min", "med", "max", "p(90)", "p(95)", "p(99)"],
    thresholds: {
      delivery_latency: [
        `p(95)<${envInt("P95_MS", defaults.p95)}`,
        `p(99)<${envInt("P99_MS", defaults.p99)}`,
      ],
      deliveries_missing: [`count<=${envInt("MAX_MISSING", 0)}`],
      deliveries_duplicate: ["count==0"],
      ws_connect_failures: [`count<=${envInt("MAX_CONNECT_FAILURES", 0)}`],
      ws_unexpected_closes: [`count<=${envInt("MAX_UNEXPECTED_CLOSES", 0)}`],
      // A run where nothing was delivered must not pass on empty latency data.
      deliveries_received: ["count>0"],
      checks: ["rate==1"],
    },
  };
}

/** Common start of the send schedule, far enough ahead for every VU to connect and join. */
export function roomSetup(cfg) {
  return { t0: Date.now() + cfg.warmupMs };
}

/** The body of one VU. */
export function roomClient(cfg, data) {
  const me = layout(exec.vu.idInTest, cfg.rooms, cfg.senders, cfg.targets.length);
  const room = `k6-${me.roomIndex}`;
  const owed = sendersInRoom(me.roomIndex, cfg.vus, cfg.rooms, cfg.senders) * cfg.perSender;
  const seen = new Set();
  const pings = new Map();
  let received = 0;
  let ready = false;
  let closing = false;
  let connectFailed = false;
  let finished = false;
  const timers = [];

  const ws = new WebSocket(clientUrl(cfg.targets[me.targetIndex], room));

  function failConnect() {
    if (!ready && !connectFailed) {
      connectFailed = true;
      connectFailures.add(1);
    }
  }

  function finish() {
    if (finished) return;
    finished = true;
    for (const t of timers) clearInterval(t);
    const missing = Math.max(0, owed - received);
    expectedDeliveries.add(owed);
    receivedDeliveries.add(received);
    missingDeliveries.add(missing);
    completeClients.add(missing === 0);
    check(null, { "client connected and got its userId frame": () => ready });
  }

  function scheduleSends() {
    let seq = 0;
    const period = 1000 / cfg.rate;
    // Stagger senders within one period so they do not all fire at once.
    const offset = (me.index / (cfg.senders * cfg.rooms)) * period;
    setTimeout(() => {
      const t = setInterval(() => {
        if (seq >= cfg.perSender || closing) {
          clearInterval(t);
          return;
        }
        ws.send(encodeChat(room, encodeProbe(me.index, seq, Date.now(), cfg.size)));
        sentMessages.add(1);
        seq += 1;
      }, period);
      timers.push(t);
    }, Math.max(0, data.t0 + offset - Date.now()));
  }

  function schedulePings() {
    if (cfg.pingEveryMs <= 0) return;
    let ref = 0;
    timers.push(
      setInterval(() => {
        ref += 1;
        pings.set(ref, Date.now());
        ws.send(encodePing(ref));
      }, cfg.pingEveryMs),
    );
  }

  ws.onmessage = (e) => {
    const f = decodeFrame(e.data);
    switch (f.kind) {
      case "reply":
        ws.send(f.text);
        return;
      case "ready":
        ready = true;
        if (me.isSender) scheduleSends();
        schedulePings();
        return;
      case "chat": {
        const p = decodeProbe(f.message);
        if (!p) return;
        const key = `${p.sender}:${p.seq}`;
        if (seen.has(key)) {
          duplicateDeliveries.add(1);
          return;
        }
        seen.add(key);
        received += 1;
        deliveryLatency.add(Date.now() - p.sentMs);
        return;
      }
      case "pong": {
        const sent = pings.get(f.ref);
        if (sent !== undefined) {
          pings.delete(f.ref);
          pingRtt.add(Date.now() - sent);
        }
        return;
      }
      case "error":
        serverErrors.add(1, { code: String(f.code) });
        return;
      case "closed":
        ws.close();
        return;
      default:
    }
  };

  ws.onerror = () => failConnect();

  ws.onclose = () => {
    failConnect();
    if (ready && !closing) unexpectedCloses.add(1);
    finish();
  };

  // Everyone stays until the last sender is done plus the drain period.
  setTimeout(() => {
    closing = true;
    finish();
    ws.close();
  }, Math.max(0, data.t0 + cfg.sendMs + cfg.drainMs - Date.now()));
}
