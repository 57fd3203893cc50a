// The WebSocket class of k6's event-loop WebSockets API: `k6/websockets` where the k6 binary has
// it, else `k6/experimental/websockets` (k6 1.1 and older ship only the experimental name; the
// API is the same).

let mod;
try {
  mod = require("k6/websockets");
} catch (_) {
  mod = require("k6/experimental/websockets");
}

export const WebSocket = mod.WebSocket;
