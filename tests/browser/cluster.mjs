// The native cluster (deploy/local/cluster.sh: redis-server, gateway nodes, nginx) on free
// loopback ports, plus a second nginx in front of the same nodes that refuses WebSocket
// upgrades, as some corporate proxies do. Real processes, stopped however the tests end.

import https from "node:https";
import { execFile, spawn } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile, mkdir } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";

const run = promisify(execFile);
export const root = resolve(import.meta.dirname, "../..");
const clusterSh = join(root, "deploy/local/cluster.sh");
const HOST = "127.0.0.1";

/** Free loopback ports, from the same finder the other cluster tests use. */
export async function freePorts(n) {
  const { stdout } = await run("python3", [join(root, "scripts/free-ports.py"), String(n)]);
  return stdout.trim().split(/\s+/).map(Number);
}

/** Polls `check` until it returns something truthy; fails after `ms`. */
export async function until(what, check, ms = 10_000, every = 50) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, every));
  }
}

export class Cluster {
  /** @param {{nodes?: number, env?: Record<string,string>}} options */
  static async start({ nodes = 3, env = {} } = {}) {
    const c = new Cluster();
    c.dir = await mkdtemp(join(tmpdir(), "browser-cluster-"));
    const [http, https, internal, redis, noUpgrade, ...ports] = await freePorts(5 + 2 * nodes);
    const nodePorts = ports.slice(0, nodes);
    c.httpPort = http;
    c.httpsPort = https;
    c.noUpgradePort = noUpgrade;
    c.nodePorts = nodePorts;
    c.env = {
      ...process.env,
      ...env,
      GATEWAY_BIN: process.env.GATEWAY_BIN || join(root, "target/debug/chat-gateway"),
      CLUSTER_DIR: c.dir,
      CLUSTER_HTTP_PORT: String(http),
      CLUSTER_HTTPS_PORT: String(https),
      CLUSTER_INTERNAL_PORT: String(internal),
      CLUSTER_NODE_INTERNAL_PORTS: ports.slice(nodes).join(" "),
      CLUSTER_REDIS_EXPORTER: "0",
      CLUSTER_REDIS_PORT: String(redis),
      CLUSTER_NODE_PORTS: nodePorts.join(" "),
      CLUSTER_PROMETHEUS: "0",
      CLUSTER_TIMEOUT: "30",
      PATH: `${process.env.PATH}:/usr/sbin`,
    };
    try {
      await c.sh("up");
      await c.startNoUpgradeProxy();
    } catch (e) {
      await c.stop();
      throw e;
    }
    return c;
  }

  // The public entry is TLS with the cluster's self-signed certificate: browser contexts are
  // told to accept it (ignoreHTTPSErrors).
  get url() { return `https://${HOST}:${this.httpsPort}`; }
  get noUpgradeUrl() { return `https://${HOST}:${this.noUpgradePort}`; }

  /** The 1-based index of the node a page names ("node-2" -> 2). */
  nodeIndex(nodeId) {
    const i = Number(/^node-(\d+)$/.exec(nodeId)?.[1]);
    if (!(i >= 1 && i <= this.nodePorts.length)) throw new Error(`not a node of this cluster: ${nodeId}`);
    return i;
  }

  nodeAddress(nodeId) { return `${HOST}:${this.nodePorts[this.nodeIndex(nodeId) - 1]}`; }

  async sh(...args) {
    try {
      return (await run(clusterSh, args, { env: this.env, timeout: 90_000 })).stdout;
    } catch (e) {
      throw new Error(`cluster.sh ${args.join(" ")} failed: ${e.stderr || e.message}`);
    }
  }

  /** SIGKILL a node, as in a crash. */
  killNode(nodeId) { return this.sh("kill-node", String(this.nodeIndex(nodeId))); }

  startNode(nodeId) { return this.sh("start-node", String(this.nodeIndex(nodeId))); }

  async nodeLog(nodeId) {
    return readFile(join(this.dir, "logs", `node-${this.nodeIndex(nodeId)}.log`), "utf8");
  }

  // Round robin (not least_conn) over the nodes, so that successive POSTs of one SSE session
  // land on different nodes; every request with an Upgrade header is refused.
  async startNoUpgradeProxy() {
    const dir = join(this.dir, "no-upgrade");
    await mkdir(join(dir, "temp"), { recursive: true });
    this.noUpgradeLog = join(dir, "access.log");
    const temp = (name) => `${name}_temp_path ${join(dir, "temp", name)};`;
    const conf = `
worker_processes 1;
daemon off;
pid ${join(dir, "nginx.pid")};
error_log stderr warn;
events { worker_connections 1024; }
http {
  log_format upstreams '$request_method $uri $status $upstream_addr';
  access_log ${this.noUpgradeLog} upstreams;
  ${temp("client_body")} ${temp("proxy")} ${temp("fastcgi")} ${temp("uwsgi")} ${temp("scgi")}
  upstream nodes {
    ${this.nodePorts.map((p) => `server ${HOST}:${p} max_fails=1 fail_timeout=3s;`).join("\n    ")}
  }
  server {
    # TLS like the real entry (the cluster's own self-signed certificate), so the fallback is
    # exercised over https as a browser behind such a proxy would use it.
    listen ${HOST}:${this.noUpgradePort} ssl;
    ssl_certificate ${join(this.dir, "tls", "tls.crt")};
    ssl_certificate_key ${join(this.dir, "tls", "tls.key")};
    location / {
      # A proxy that does not let WebSockets through.
      if ($http_upgrade) { return 403; }
      proxy_pass http://nodes;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      # Server-sent events: stream every event at once, keep idle streams (20 s heartbeats).
      proxy_buffering off;
      proxy_read_timeout 75s;
    }
  }
}
`;
    const file = join(dir, "nginx.conf");
    await writeFile(file, conf);
    let output = "";
    this.proxy = spawn("nginx", ["-p", dir, "-c", file, "-e", "stderr"], {
      env: this.env,
      stdio: ["ignore", "pipe", "pipe"],
      // Its own process group: stopping it also stops its workers.
      detached: true,
    });
    this.proxy.stdout.on("data", (d) => { output += d; });
    this.proxy.stderr.on("data", (d) => { output += d; });
    const exited = new Promise((r) => this.proxy.once("exit", r));
    this.proxyExited = exited;
    await until("the no-upgrade nginx to answer", async () => {
      if (this.proxy.exitCode !== null) throw new Error(`nginx exited: ${output}`);
      return (await httpsStatus(this.noUpgradePort, "/healthz", join(this.dir, "tls", "tls.crt"))) === 200;
    }, 15_000);
  }

  /** [{method, uri, status, upstream}] of the no-upgrade proxy's finished requests. */
  async noUpgradeRequests() {
    let text = "";
    try { text = await readFile(this.noUpgradeLog, "utf8"); } catch { return []; }
    return text.trim().split("\n").filter(Boolean).map((line) => {
      const [method, uri, status, ...upstream] = line.split(" ");
      return { method, uri, status: Number(status), upstream: upstream.join(" ") };
    });
  }

  async stop() {
    if (this.proxy && this.proxy.exitCode === null) {
      const group = (sig) => { try { process.kill(-this.proxy.pid, sig); } catch { /* gone */ } };
      group("SIGTERM");
      const killer = setTimeout(() => group("SIGKILL"), 5000);
      await this.proxyExited;
      clearTimeout(killer);
    }
    try { await this.sh("down"); } catch (e) { console.error(String(e)); }
    await rm(this.dir, { recursive: true, force: true });
  }
}

/** The status of an https GET to HOST:port, trusting only the certificate in `caFile`; 0 if
 * nothing answered. */
async function httpsStatus(port, path, caFile) {
  const ca = await readFile(caFile);
  return new Promise((resolve) => {
    const request = https.get({ host: HOST, port, path, ca, timeout: 2_000 }, (response) => {
      response.resume();
      resolve(response.statusCode);
    });
    request.on("timeout", () => request.destroy());
    request.on("error", () => resolve(0));
  });
}
