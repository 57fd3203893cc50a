// Chat fan-out in rooms. VUS clients join ROOMS rooms via `?room=` (each room spread over every
// TARGET); the first SENDERS clients of each room send RATE messages/s each, all starting WARMUP
// after setup, for DURATION. Every message carries its send time, so receivers record
// `delivery_latency`. The schedule is deterministic, so each VU knows how many messages its
// room owes it (senders in its room × messages per sender) and, after DRAIN, counts
// `deliveries_missing`. Thresholds fail the run on slow, missing or duplicate deliveries and on
// failed connections.
//
//   k6 run -e TARGET=ws://127.0.0.1:8080/ws -e VUS=200 -e ROOMS=10 -e RATE=5 loadtest/k6/fanout.js
//
// Environment: TARGET (comma-separated list allowed), PROTOCOL (gateway | ws-peer | socketio),
// VUS (200), ROOMS (10), SENDERS (1 per room), RATE (5 msg/s per sender), SIZE (64 bytes),
// DURATION (30s of sending), WARMUP (5s), DRAIN (3s), P95_MS (250), P99_MS (500),
// MAX_MISSING (0), MAX_CONNECT_FAILURES (0), MAX_UNEXPECTED_CLOSES (0).

import { roomClient, roomConfig, roomOptions, roomSetup } from "./room.js";

const defaults = {
  vus: 200,
  rooms: 10,
  senders: 1,
  rate: 5,
  duration: "30s",
  warmup: "5s",
  drain: "3s",
  pingEvery: "0s",
  p95: 250,
  p99: 500,
};
const cfg = roomConfig(defaults);

export const options = roomOptions(cfg, "fanout", defaults);

export function setup() {
  return roomSetup(cfg);
}

export default function (data) {
  roomClient(cfg, data);
}
