#!/usr/bin/env node
// Stream greedy tokens from a seqmix ONNX export's decoder graph (step.onnx) with onnxruntime-node.
//
//   node tools/js/stream.mjs <export dir> [--prompt TEXT | --ids 1,2,3] [--tokens N] [--json] [--raw]
//
// The prompt goes through the graph in one call (prefill), then one token per call, the state
// outputs (present.*) fed back as the state inputs (past_*). Tokens are printed as they come: as
// UTF-8 text for a byte-level export, as ids for one that carries a tokenizer.json (pass --ids
// there). With --json, the tokens stream to stderr and stdout gets one line, {"ids": [...]}.
// A bad argument, manifest or graph file ends the run with one line, "stream: error: ...", exit 2.
// An export can come from someone else: the text its model produces and the error line show control
// characters that a terminal would act on (escape sequences, carriage returns, bidirectional
// overrides) escaped, as \x1b; --raw writes the text exactly as decoded.
import { createHash } from "node:crypto";
import { lstatSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import ort from "onnxruntime-node";

const USAGE = "usage: node tools/js/stream.mjs <export dir> [--prompt TEXT | --ids 1,2,3] [--tokens N] [--json] [--raw]";
// C0 controls but tab and line feed, DEL, C1 controls, the bidirectional embeddings, overrides and isolates.
const CONTROLS = /[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]/g;
// Manifest dtype -> how one state tensor is built: its typed array and how a fill value is stored in it.
const STATE_ARRAYS = {
  float32: [Float32Array, Number], float64: [Float64Array, Number], int32: [Int32Array, Number],
  int64: [BigInt64Array, BigInt], bool: [Uint8Array, Number],
};

// Each control character as Python's repr writes it: \r, \x1b, \u202e.
function escapeControls(text) {
  return text.replace(CONTROLS, (character) => {
    const code = character.charCodeAt(0);
    if (code === 0x0d) return "\\r";
    return code < 0x100 ? `\\x${code.toString(16).padStart(2, "0")}` : `\\u${code.toString(16).padStart(4, "0")}`;
  });
}

function fail(message) {
  console.error(`stream: error: ${escapeControls(message)}`);
  process.exit(2);
}

function parseCommandLine(argv) {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, allowPositionals: true, options: {
      prompt: { type: "string" }, ids: { type: "string" }, tokens: { type: "string", default: "32" },
      json: { type: "boolean", default: false }, raw: { type: "boolean", default: false },
    } });
  } catch (error) {
    fail(`${error.message} (${USAGE})`);
  }
  const { positionals, values } = parsed;
  if (positionals.length !== 1) fail(`expected one export directory, got ${positionals.length} (${USAGE})`);
  if (values.prompt !== undefined && values.ids !== undefined) fail("--prompt and --ids are exclusive; give one");
  if (!/^[1-9]\d*$/.test(values.tokens)) fail(`--tokens=${values.tokens} is not valid; expected a count >= 1`);
  if (values.ids !== undefined && !/^\d+(,\d+)*$/.test(values.ids)) {
    fail(`--ids=${values.ids} is not valid; expected comma-separated token ids, e.g. 100,101,102`);
  }
  return { directory: positionals[0], ...values, tokens: Number(values.tokens) };
}

// The most numbers one state tensor may hold: a typed array's limit, far above any real state.
const MAX_STATE_NUMBERS = 2 ** 30;

// Raise (fail) unless one step.state entry can build its initial tensor: a name and an output name,
// a dtype this client takes (an own key: "__proto__" or "toString" are none), a shape of "batch" and
// counts, and a fill its typed array holds exactly (an integer for integer and bool states).
function checkStateEntry(path, entry, index) {
  const where = `${path}: step.state[${index}]`;
  if (entry === null || typeof entry !== "object" || Array.isArray(entry)) fail(`${where} is not an object`);
  if (typeof entry.name !== "string" || !entry.name) fail(`${where}.name=${JSON.stringify(entry.name)} is not a name`);
  if (typeof entry.output !== "string" || !entry.output) fail(`${where}.output=${JSON.stringify(entry.output)} is not a name`);
  if (typeof entry.dtype !== "string" || !Object.hasOwn(STATE_ARRAYS, entry.dtype)) {
    fail(`${where}.dtype=${JSON.stringify(entry.dtype)}; this client takes ${Object.keys(STATE_ARRAYS)}`);
  }
  const shapeValid = Array.isArray(entry.shape) && entry.shape.length > 0
    && entry.shape.every((dim, axis) => (axis === 0 && dim === "batch") || (Number.isSafeInteger(dim) && dim >= 0));
  if (!shapeValid) fail(`${where}.shape=${JSON.stringify(entry.shape)} is not ["batch", counts...]`);
  const numbers = entry.shape.slice(1).reduce((a, b) => a * b, 1);
  if (numbers > MAX_STATE_NUMBERS) fail(`${where}.shape=${JSON.stringify(entry.shape)} holds ${numbers} numbers per sequence, more than this client takes (${MAX_STATE_NUMBERS})`);
  const integral = entry.dtype !== "float32" && entry.dtype !== "float64";
  const fillValid = typeof entry.fill === "number" && Number.isFinite(entry.fill) && (!integral || Number.isSafeInteger(entry.fill))
    && (entry.dtype !== "bool" || entry.fill === 0 || entry.fill === 1);
  if (!fillValid) fail(`${where}.fill=${JSON.stringify(entry.fill)} is not a finite ${integral ? "integer" : "number"} a ${entry.dtype} state holds`);
}

// The decoder graph's manifest entry, once its file is a regular file of the recorded size and sha256.
function loadStep(directory) {
  const path = join(directory, "manifest.json");
  let manifest;
  try {
    // A regular file only: a FIFO blocked the client for ever, a link was followed anywhere.
    if (!lstatSync(path).isFile()) fail(`${path} is not a regular file (a symbolic link, a directory or a pipe)`);
    manifest = JSON.parse(readFileSync(path, "utf8"));
  } catch (error) {
    fail(`${path} cannot be read as JSON (${error.message}); export the model with seqmix export first`);
  }
  if (!Number.isSafeInteger(manifest?.vocab_size) || manifest.vocab_size < 1) {
    fail(`${path}: vocab_size=${JSON.stringify(manifest?.vocab_size)} is not a count of tokens; re-export the model`);
  }
  const step = manifest?.step;
  if (manifest?.format !== "onnx") fail(`${path} is not an ONNX export's manifest (format ${manifest?.format}); expected "onnx"`);
  if (!step) fail(`${path} has no step section: the model has no decoder graph (a bidirectional model or a classifier)`);
  if (!Array.isArray(step.inputs) || !Array.isArray(step.state) || !Array.isArray(step.outputs)) {
    fail(`${path}: the step section lacks its inputs, outputs or state lists; re-export the model`);
  }
  const file = step.file;
  if (typeof file !== "string" || /[/\\:\0]/.test(file) || file === ".." || file === ".") {
    fail(`${path}: step.file=${JSON.stringify(file)} is not a bare file name in the export directory`);
  }
  const record = manifest.files?.[file];
  if (!record) fail(`${path} does not record ${file} among its files; re-export the model`);
  const graph = join(directory, file);
  let stat;
  try {
    stat = lstatSync(graph);
  } catch {
    fail(`the manifest names ${file} for step.file, but ${graph} is missing`);
  }
  if (!stat.isFile()) fail(`${graph} is not a regular file (a symbolic link or a directory); re-export the model`);
  const bytes = readFileSync(graph);
  if (bytes.length !== record.bytes || createHash("sha256").update(bytes).digest("hex") !== record.sha256) {
    fail(`${graph} does not match the size and sha256 the manifest records: it was modified; re-export the model`);
  }
  if (step.state.length === 0) fail(`${path}: step.state is empty; a decoder graph carries its state; re-export the model`);
  step.state.forEach((entry, index) => checkStateEntry(path, entry, index));
  if (!step.outputs.length || typeof step.outputs[0]?.name !== "string") fail(`${path}: step.outputs does not name the logits first`);
  const tokenInput = step.inputs.map((spec) => spec?.name).find((name) => !step.state.some((entry) => entry.name === name));
  if (typeof tokenInput !== "string") fail(`${path}: step.inputs names no token input beside the state`);
  // "1..N": a missing, malformed or empty range was read as no limit at all.
  const range = /^1\.\.([1-9]\d*)$/.exec(String(step.dynamic_dims?.tokens));
  if (!range) fail(`${path}: step.dynamic_dims.tokens=${JSON.stringify(step.dynamic_dims?.tokens)} is not "1..N"; re-export the model`);
  return { manifest, step, graph: bytes, tokenInput, limit: Number(range[1]) };
}

// Raise (fail) unless the graph takes the inputs and gives the outputs the manifest names.
function checkGraph(session, step, tokenInput) {
  const missingInputs = [tokenInput, ...step.state.map((entry) => entry.name)].filter((name) => !session.inputNames.includes(name));
  const missingOutputs = [step.outputs[0].name, ...step.state.map((entry) => entry.output)].filter((name) => !session.outputNames.includes(name));
  if (missingInputs.length || missingOutputs.length) {
    fail(`the decoder graph does not match its manifest: inputs ${JSON.stringify(missingInputs)} and outputs `
      + `${JSON.stringify(missingOutputs)} are named there but not in the graph; re-export the model`);
  }
}

// The state before any token, as the manifest describes it ("batch" -> 1; 0, or -1 for empty cache slots).
function initialState(step) {
  return Object.fromEntries(step.state.map((entry) => {
    const shape = entry.shape.map((dim) => (dim === "batch" ? 1 : dim));
    const [TypedArray, convert] = STATE_ARRAYS[entry.dtype];
    const data = new TypedArray(shape.reduce((a, b) => a * b, 1)).fill(convert(entry.fill));
    return [entry.name, new ort.Tensor(entry.dtype, data, shape)];
  }));
}

// The id of the largest logit at the last position of logits (1, T, V); the first one on a tie, as NumPy.
function argmaxLast(logits) {
  const vocab = logits.dims.at(-1);
  const row = logits.data.subarray(logits.data.length - vocab);
  let best = 0;
  for (let id = 1; id < vocab; id++) if (row[id] > row[best]) best = id;
  return best;
}

const options = parseCommandLine(process.argv.slice(2));
const { manifest, step, graph, tokenInput, limit } = loadStep(options.directory);
const byteLevel = !("tokenizer" in manifest);
if (!byteLevel && options.ids === undefined) fail("this export carries a tokenizer.json, which this client does not read; pass the prompt as --ids");
const prompt = options.ids !== undefined ? options.ids.split(",").map(Number) : [...new TextEncoder().encode(options.prompt ?? "def ")];
if (prompt.length === 0) fail("the prompt is empty; generation needs at least one prompt token");
const tooLarge = prompt.find((id) => id >= manifest.vocab_size);
if (tooLarge !== undefined) fail(`the prompt holds token ${tooLarge}; this model's tokens lie in [0, vocab_size=${manifest.vocab_size})`);
if (prompt.length + options.tokens - 1 > limit) fail(`${prompt.length} prompt tokens + --tokens=${options.tokens} exceed the ${limit} tokens one stream can take`);

let session;
try {
  session = await ort.InferenceSession.create(graph, { executionProviders: ["cpu"] });
} catch (error) {
  fail(`ONNX Runtime cannot load the decoder graph (${error.message.split("\n")[0]})`);
}
checkGraph(session, step, tokenInput);
const out = options.json ? process.stderr : process.stdout;
const decoder = new TextDecoder("utf-8");
const shown = (text) => (options.raw ? text : escapeControls(text));
const show = (ids) => out.write(byteLevel ? shown(decoder.decode(Uint8Array.from(ids), { stream: true })) : ids.map((id) => `${id} `).join(""));
let state = initialState(step);
let feed = prompt;
const generated = [];
while (generated.length < options.tokens) {
  const ids = new ort.Tensor("int64", BigInt64Array.from(feed, BigInt), [1, feed.length]);
  let results;
  try {
    results = await session.run({ [tokenInput]: ids, ...state });
  } catch (error) {
    // Shapes or dtypes the manifest gives and the graph does not take: one line, not a stack.
    fail(`ONNX Runtime refused a call of the decoder graph (${error.message.split("\n")[0]}); does the manifest describe this graph?`);
  }
  // The prompt once the graph took it: a refused first call leaves stdout empty.
  if (!generated.length) show(prompt);
  state = Object.fromEntries(step.state.map((entry) => [entry.name, results[entry.output]]));
  feed = [argmaxLast(results[step.outputs[0].name])];
  generated.push(feed[0]);
  show(feed);
}
out.write(byteLevel ? shown(decoder.decode()) + "\n" : "\n");
if (options.json) console.log(JSON.stringify({ ids: generated }));
