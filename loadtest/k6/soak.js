// Soak: the fan-out scenario at a gentle rate for a long time. Every VU keeps one connection
// for the whole run, pings the server (`{"type":"ping"}` → `pong`, Trend `ping_rtt`) every
// PING_EVERY, and counts deliveries against the deterministic schedule. Leaks and stalls show
// up as rising latency, unexpected closes (slow-consumer or idle-timeout disconnects) or missing
// deliveries, each of which fails a threshold.
//
//   k6 run -e TARGET=ws://127.0.0.1:8080/ws -e VUS=500 -e DURATION=30m loadtest/k6/soak.js
//
// Environment: as fanout.js (TARGET, PROTOCOL, VUS 500, ROOMS 50, SENDERS 1, RATE 1, SIZE,
// DURATION 30m, WARMUP 10s, DRAIN 5s, P95_MS 250, P99_MS 1000, MAX_MISSING,
// MAX_CONNECT_FAILURES, MAX_UNEXPECTED_CLOSES) plus PING_EVERY (15s), PING_P99_MS (500).

import { envInt } from "./lib.js";
import { roomClient, roomConfig, roomOptions, roomSetup } from "./room.js";

const defaults = {
  vus: 500,
  rooms: 50,
  senders: 1,
  rate: 1,
  duration: "30m",
  warmup: "10s",
  drain: "5s",
  pingEvery: "15s",
  p95: 250,
  p99: 1000,
};
const cfg = roomConfig(defaults);

export const options = roomOptions(cfg, "soak", defaults);
options.thresholds.ping_rtt = [`p(99)<${envInt("PING_P99_MS", 500)}`];

export function setup() {
  return roomSetup(cfg);
}

export default function (data) {
  roomClient(cfg, data);
}
