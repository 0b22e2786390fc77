// Compiles Flux queries with InfluxData's own analyser: the flux-lsp WebAssembly build,
// whose semantic check (libflux: parser, type inference, the standard library's function
// signatures) is what InfluxDB runs before it executes a query.
//
// stdin:  [{"id": "...", "flux": "..."}, ...]
// stdout: [{"id": "...", "valid": bool, "diagnostics": ["line:col: message", ...]}, ...]
//
// `valid` is Flux.is_valid() (syntax and semantics); `diagnostics` are the language
// server's messages for the same text, so a failure says what is wrong and where.
//
// The package is built for bundlers (its glue module and the .wasm import each other),
// which Node cannot load as is: the glue is loaded as its own module with the .wasm
// import replaced by a setter, and the .wasm is instantiated here with the glue as its
// imports. This is tied to the pinned version in package.json.

import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const PKG = join(dirname(fileURLToPath(import.meta.url)), "node_modules", "@influxdata",
                 "flux-lsp-browser");
const WASM_IMPORT = "import * as wasm from './flux-lsp-browser_bg.wasm';";
const MEMORY_VIEWS = /\ncachedInt32Memory0 = new Int32Array\(wasm\.memory\.buffer\);\ncachedUint8Memory0 = new Uint8Array\(wasm\.memory\.buffer\);\s*$/;

async function load() {
  let glue = readFileSync(join(PKG, "flux-lsp-browser_bg.js"), "utf8");
  if (!glue.includes(WASM_IMPORT) || !MEMORY_VIEWS.test(glue)) {
    throw new Error(`${PKG}: not the glue code this loader knows (expected 0.8.40)`);
  }
  glue = glue.replace(WASM_IMPORT, "let wasm;\nexport function __setWasm(w) {\n  wasm = w;\n" +
    "  cachedInt32Memory0 = new Int32Array(wasm.memory.buffer);\n" +
    "  cachedUint8Memory0 = new Uint8Array(wasm.memory.buffer);\n}")
    .replace(MEMORY_VIEWS, "\n");
  const dir = mkdtempSync(join(tmpdir(), "flux-check-"));
  try {
    writeFileSync(join(dir, "glue.mjs"), glue);
    const mod = await import(pathToFileURL(join(dir, "glue.mjs")).href);
    const { instance } = await WebAssembly.instantiate(
      readFileSync(join(PKG, "flux-lsp-browser_bg.wasm")),
      { "./flux-lsp-browser_bg.js": mod });
    mod.__setWasm(instance.exports);
    return mod;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function diagnostics(mod, docs) {
  const lsp = new mod.Lsp();
  const found = new Map();
  let published = 0;
  lsp.onMessage((m) => {
    const msg = JSON.parse(m);
    if (msg.method === "textDocument/publishDiagnostics") {
      published += 1;
      found.set(msg.params.uri, msg.params.diagnostics);
    }
  });
  lsp.run().catch((e) => { throw e; });
  let id = 0;
  const send = (method, params, notify = false) => lsp.send(JSON.stringify(
    notify ? { jsonrpc: "2.0", method, params } : { jsonrpc: "2.0", id: ++id, method, params }));
  await send("initialize", { processId: null, rootUri: null, capabilities: {} });
  await send("initialized", {}, true);
  for (const [uri, text] of docs) {
    await send("textDocument/didOpen",
               { textDocument: { uri, languageId: "flux", version: 1, text } }, true);
  }
  // The server publishes per document as its analysis goes, not once: wait until every
  // document has been reported and nothing new came for a while.
  for (let waited = 0, quiet = 0; waited < 10000 && (found.size < docs.length || quiet < 300);
       waited += 20) {
    const before = published;
    await new Promise((r) => setTimeout(r, 20));
    quiet = published === before ? quiet + 20 : 0;
  }
  return found;
}

const queries = JSON.parse(readFileSync(0, "utf8"));
const mod = await load();
const docs = queries.map((q, i) => [`file:///query-${i}/query.flux`, q.flux]);
const diags = await diagnostics(mod, docs);
const out = queries.map((q, i) => {
  const f = new mod.Flux(q.flux);
  let valid;
  try { valid = f.is_valid(); } catch { valid = false; } finally { f.free(); }
  const messages = (diags.get(docs[i][0]) || []).map((d) =>
    `${d.range.start.line + 1}:${d.range.start.character + 1}: ${d.message}`);
  return { id: q.id, valid, diagnostics: messages };
});
process.stdout.write(JSON.stringify(out) + "\n");
process.exit(0);
