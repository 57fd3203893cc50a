// Connection ramp: VUs grow from 0 to VUS over RAMP, stay for HOLD, then drop over RAMP_DOWN.
// Each VU opens one connection in its room (rooms spread over every TARGET), waits for the
// `userId` frame (Trend `connect_to_ready`), pings every PING_EVERY (Trend `ping_rtt`) and keeps
// the connection for CONN_HOLD before closing it and connecting again. Thresholds fail the run
// on failed connections, slow handshakes, slow pings and server-side disconnects.
//
//   k6 run -e TARGET=ws://127.0.0.1:8080/ws -e VUS=2000 -e RAMP=60s loadtest/k6/ramp.js
//
// Environment: TARGET (comma-separated list allowed), PROTOCOL (gateway | ws-peer | socketio),
// VUS (1000), ROOMS (100), RAMP (60s), HOLD (30s), RAMP_DOWN (10s), CONN_HOLD (60s),
// PING_EVERY (10s), READY_P95_MS (1000), PING_P95_MS (250), MIN_CONNECT_OK (0.99),
// MAX_UNEXPECTED_CLOSES (0).

import { check } from "k6";
import exec from "k6/execution";
import { Counter, Rate, Trend } from "k6/metrics";
import { clearInterval, setInterval, setTimeout } from "k6/timers";

import {
  clientUrl,
  decodeFrame,
  encodePing,
  envDurationMs,
  envFloat,
  envInt,
  k6Duration,
  layout,
  targets,
} from "./lib.js";
import { WebSocket } from "./websockets.js";

const VUS = envInt("VUS", 1000);
const ROOMS = envInt("ROOMS", 100);
const RAMP_MS = envDurationMs("RAMP", "60s");
const HOLD_MS = envDurationMs("HOLD", "30s");
const RAMP_DOWN_MS = envDurationMs("RAMP_DOWN", "10s");
const CONN_HOLD_MS = envDurationMs("CONN_HOLD", "60s");
const PING_EVERY_MS = envDurationMs("PING_EVERY", "10s");
const TARGETS = targets();

const connectToReady = new Trend("connect_to_ready", true);
const pingRtt = new Trend("ping_rtt", true);
const connectOk = new Rate("ws_connect_ok");
const unexpectedCloses = new Counter("ws_unexpected_closes");
const serverErrors = new Counter("server_errors");

export const options = {
  scenarios: {
    ramp: {
      executor: "ramping-vus",
      startVUs: 0,
      stages: [
        { duration: k6Duration(RAMP_MS), target: VUS },
        { duration: k6Duration(HOLD_MS), target: VUS },
        { duration: k6Duration(RAMP_DOWN_MS), target: 0 },
      ],
      // Connections still open when their VU is retired are simply dropped.
      gracefulRampDown: "0s",
    },
  },
  summaryTrendStats: ["avg", "min", "med", "max", "p(90)", "p(95)", "p(99)"],
  thresholds: {
    ws_connect_ok: [`rate>=${envFloat("MIN_CONNECT_OK", 0.99)}`],
    connect_to_ready: [`p(95)<${envInt("READY_P95_MS", 1000)}`],
    ping_rtt: [`p(95)<${envInt("PING_P95_MS", 250)}`],
    ws_unexpected_closes: [`count<=${envInt("MAX_UNEXPECTED_CLOSES", 0)}`],
  },
};

export default function () {
  // Layout by VU id: VUs are reused across iterations, so the room stays the same.
  const me = layout(exec.vu.idInTest, ROOMS, 0, TARGETS.length);
  const room = `k6-${me.roomIndex}`;
  const started = Date.now();
  const pings = new Map();
  let ready = false;
  let closing = false;
  let counted = false;
  let pingTimer = null;

  const ws = new WebSocket(clientUrl(TARGETS[me.targetIndex], room));

  function countConnect(ok) {
    if (counted) return;
    counted = true;
    connectOk.add(ok);
    check(null, { "connected and got userId": () => ok });
  }

  ws.onmessage = (e) => {
    const f = decodeFrame(e.data);
    if (f.kind === "reply") {
      ws.send(f.text);
    } else if (f.kind === "ready") {
      ready = true;
      connectToReady.add(Date.now() - started);
      countConnect(true);
      let ref = 0;
      pingTimer = setInterval(() => {
        ref += 1;
        pings.set(ref, Date.now());
        ws.send(encodePing(ref));
      }, PING_EVERY_MS);
    } else if (f.kind === "pong") {
      const sent = pings.get(f.ref);
      if (sent !== undefined) {
        pings.delete(f.ref);
        pingRtt.add(Date.now() - sent);
      }
    } else if (f.kind === "error") {
      serverErrors.add(1, { code: String(f.code) });
    } else if (f.kind === "closed") {
      ws.close();
    }
  };

  ws.onerror = () => countConnect(false);

  ws.onclose = () => {
    if (pingTimer !== null) clearInterval(pingTimer);
    countConnect(false);
    if (ready && !closing) unexpectedCloses.add(1);
  };

  setTimeout(() => {
    closing = true;
    ws.close();
  }, CONN_HOLD_MS);
}
