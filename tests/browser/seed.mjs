// The seed's React client, ChatApp, exactly as the primer prints it, built with esbuild and
// served from a page of its own. Only the address it connects to is changed: the primer's
// `ws://localhost:8080` becomes the cluster's nginx.

import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import { build } from "esbuild";
import { root } from "./cluster.mjs";

const PRIMER_URL = "ws://localhost:8080";

/** The primer sits in shared/seed beside the repository (override: SEED_PRIMER). */
export function primerPath() {
  return process.env.SEED_PRIMER || resolve(root, "../shared/seed/websocket-primer.txt");
}

/** The ChatApp component's source: from its `import React` line to `export default ChatApp;`. */
export async function chatAppSource() {
  const file = primerPath();
  if (!existsSync(file)) throw new Error(`the seed primer is not at ${file} (set SEED_PRIMER)`);
  const text = await readFile(file, "utf8");
  const start = text.indexOf("import React");
  const endMarker = "export default ChatApp;";
  const end = text.indexOf(endMarker, start);
  if (start < 0 || end < 0) throw new Error(`no ChatApp component in ${file}`);
  const source = text.slice(start, end + endMarker.length);
  if (source.split(PRIMER_URL).length !== 2) throw new Error(`ChatApp does not connect to ${PRIMER_URL} exactly once`);
  return source;
}

/** Serves the built ChatApp, connecting to `wsUrl`; resolves to {url, close()}. */
export async function serveChatApp(wsUrl) {
  const component = (await chatAppSource()).replace(PRIMER_URL, wsUrl);
  const nodeModules = join(import.meta.dirname, "node_modules");
  const result = await build({
    stdin: {
      contents: [
        'import React from "react";',
        'import { createRoot } from "react-dom/client";',
        'import ChatApp from "chat-app";',
        'createRoot(document.getElementById("root")).render(<ChatApp />);',
      ].join("\n"),
      loader: "jsx",
      resolveDir: import.meta.dirname,
    },
    plugins: [{
      name: "chat-app",
      setup(b) {
        b.onResolve({ filter: /^chat-app$/ }, () => ({ path: "ChatApp.tsx", namespace: "seed" }));
        b.onLoad({ filter: /.*/, namespace: "seed" }, () => ({ contents: component, loader: "tsx", resolveDir: import.meta.dirname }));
      },
    }],
    nodePaths: [nodeModules],
    bundle: true,
    format: "esm",
    write: false,
    logLevel: "silent",
    define: { "process.env.NODE_ENV": "\"production\"" },
  });
  const bundle = result.outputFiles[0].contents;
  const page = '<!doctype html><html><head><meta charset="utf-8"><title>ChatApp</title>' +
    '<link rel="icon" href="data:,"></head><body><div id="root"></div>' +
    '<script type="module" src="/app.js"></script></body></html>';
  const server = createServer((req, res) => {
    if (req.url === "/app.js") {
      res.writeHead(200, { "content-type": "text/javascript" });
      res.end(bundle);
    } else if (req.url === "/") {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
      res.end(page);
    } else {
      res.writeHead(404);
      res.end();
    }
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}/`,
    close: () => new Promise((r) => { server.closeAllConnections(); server.close(r); }),
  };
}
