// Fails when the committed dist/ is not what the sources compile to. The gateway embeds
// dist/chat-client.js as it is, so a source change without a rebuilt dist would ship stale code.
//
// It compiles into a temporary directory (leaving dist/ alone) and compares byte for byte with
// dist/ in the working tree and, inside a git checkout, with dist/ as staged for commit, since
// `npm test` rebuilds dist/ in place and would otherwise hide a build that was never committed.

import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, existsSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join, relative, sep } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const dist = join(root, "dist");
const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");

function files(dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => relative(dir, join(e.parentPath ?? e.path, e.name)).split(sep).join("/"))
    .sort();
}

function firstDifference(a, b) {
  const la = a.toString("utf8").split("\n");
  const lb = b.toString("utf8").split("\n");
  for (let i = 0; i < Math.max(la.length, lb.length); i++) {
    if (la[i] !== lb[i]) return `line ${i + 1}:\n    built:     ${la[i] ?? "(end of file)"}\n    committed: ${lb[i] ?? "(end of file)"}`;
  }
  return "bytes differ";
}

/** The staged dist/ files, or null outside a git checkout. */
function staged() {
  let names;
  try {
    names = execFileSync("git", ["ls-files", "-z", "--", "dist"], { cwd: root, stdio: ["ignore", "pipe", "ignore"] })
      .toString("utf8").split("\0").filter(Boolean);
  } catch {
    return null;
  }
  const out = new Map();
  for (const name of names) {
    const blob = execFileSync("git", ["show", `:./${name}`], { cwd: root, maxBuffer: 64 << 20 });
    out.set(relative("dist", name).split(sep).join("/"), blob);
  }
  return out;
}

function compare(label, built, committed) {
  const problems = [];
  for (const [name, bytes] of built) {
    const other = committed.get(name);
    if (!other) problems.push(`${label}: dist/${name} is missing`);
    else if (!bytes.equals(other)) problems.push(`${label}: dist/${name} differs at ${firstDifference(bytes, other)}`);
  }
  for (const name of committed.keys()) {
    if (!built.has(name)) problems.push(`${label}: dist/${name} is not produced by the build any more`);
  }
  return problems;
}

const out = mkdtempSync(join(tmpdir(), "chat-client-dist-"));
let problems = [];
try {
  execFileSync(process.execPath, [tsc, "-p", join(root, "tsconfig.json"), "--outDir", out], { stdio: "inherit" });
  const built = new Map(files(out).map((name) => [name, readFileSync(join(out, name))]));

  // The gateway serves the bundle as one file: it must not import anything.
  const bundle = built.get("chat-client.js")?.toString("utf8") ?? "";
  if (/^\s*(import\s|export\s.*\sfrom\s)/m.test(bundle)) problems.push("dist/chat-client.js imports another module");

  const tree = new Map(files(dist).map((name) => [name, readFileSync(join(dist, name))]));
  problems = problems.concat(compare("working tree", built, tree));
  const index = staged();
  if (index) problems = problems.concat(compare("staged for commit", built, index));
  else console.log("check-dist: not a git checkout; compared with the working tree only");
} finally {
  rmSync(out, { recursive: true, force: true });
}

if (problems.length) {
  console.error("check-dist: dist/ is out of date. Run `npm run build` and commit dist/.");
  for (const p of problems) console.error("  " + p);
  process.exit(1);
}
console.log("check-dist: dist/ matches a fresh build");
