// Compiled (not run) by `npm test`: it fails to compile if the declarations stop accepting the
// browser's own implementations or stop describing the API as documented.
import {
  ChatClient, ChatError, type Ack, type ChatMessage, type HistoryResult, type JoinedEvent, type PresenceUser,
  type StateEvent, type Welcome,
} from "../dist/chat-client.js";

const client = new ChatClient({
  url: location.origin,
  room: "lobby",
  name: "alice",
  token: async () => "header.payload.signature",
  presence: true,
  transports: ["websocket", "sse"],
  backoff: { min: 500, max: 20000, factor: 2, policyMin: 5000 },
  refreshBefore: 60,
  ackTimeout: 10000,
  sendRetries: 3,
  WebSocket,
  EventSource,
  fetch,
  timers: { setTimeout, clearTimeout, now: Date.now },
  storage: localStorage,
});

client.on("message", (m: ChatMessage) => m.offset?.split("-"));
client.on("state", (s: StateEvent) => s.state === "reconnecting" && s.delay);
client.on("gap", (g) => client.history(g.room, { limit: 50 }));
client.on("error", (e: ChatError) => e.code);
// @ts-expect-error: no such event
client.on("nope", () => {});

async function use(): Promise<void> {
  const w: Welcome = await client.connect();
  const a: Ack = await client.send(w.room, "hi");
  const j: JoinedEvent = await client.join("news", { presence: true, last: 10 });
  const users: PresenceUser[] = await client.presence(j.room);
  const h: HistoryResult = await client.history("news", { since: a.offset, epoch: a.epoch });
  await client.leave("news");
  client.close();
  void users;
  void h;
}
void use;
