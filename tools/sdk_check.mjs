// The vendors' official JavaScript SDKs (@elevenlabs/elevenlabs-js, @cartesia/cartesia-js) against a running
// server: tools/sdk_check.py's calls, in Node. Cartesia's SDK always connects with wss://, so the server must
// serve TLS itself (TLS_CERT, TLS_KEY); trust a self-signed certificate with NODE_EXTRA_CA_CERTS.
//
//   npm install --prefix .cache/sdk-node @elevenlabs/elevenlabs-js@2.73.0 @cartesia/cartesia-js@4.2.0
//   NODE_PATH=.cache/sdk-node/node_modules NODE_EXTRA_CA_CERTS=cert.pem \
//     node tools/sdk_check.mjs https://127.0.0.1:8443 KEY OUT_DIR
//
// Writes each call's audio into OUT_DIR and one JSON object on stdout (sdk_test.py decodes and checks).

import { createRequire } from "node:module";
import { mkdirSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";

const require = createRequire(resolve(process.env.NODE_PATH ?? "node_modules", "x.js"));
const { ElevenLabsClient } = require("@elevenlabs/elevenlabs-js");
const Cartesia = require("@cartesia/cartesia-js").default;

const [url, key, out] = process.argv.slice(2);
mkdirSync(out, { recursive: true });
const TEXT = "Hello there. The library opens at nine in the morning, and closes at six.";
const RAW = { container: "raw", encoding: "pcm_s16le", sample_rate: 24000 };

async function bytesOf(stream) {
  const parts = [];
  for await (const part of stream) parts.push(Buffer.from(part));
  return Buffer.concat(parts);
}

const found = { elevenlabs: {}, cartesia: {} };

const eleven = new ElevenLabsClient({ apiKey: key, baseUrl: url, timeoutInSeconds: 300 });
writeFileSync(join(out, "js_el_convert.mp3"), await bytesOf(await eleven.textToSpeech.convert("alloy", { text: TEXT })));
found.elevenlabs.convert = { file: "js_el_convert.mp3" };
const timed = await eleven.textToSpeech.convertWithTimestamps("alloy", { text: TEXT });
writeFileSync(join(out, "js_el_timestamps.mp3"), Buffer.from(timed.audioBase64, "base64"));
found.elevenlabs.convertWithTimestamps = { file: "js_el_timestamps.mp3", characters: timed.alignment.characters.join("") };
const all = await eleven.voices.getAll();
const searched = await eleven.voices.search({ pageSize: 5 });
found.elevenlabs.voices = {
  getAll: all.voices.map((v) => v.voiceId),
  search: { ids: searched.voices.map((v) => v.voiceId), hasMore: searched.hasMore, total: searched.totalCount },
};

const cartesia = new Cartesia({ apiKey: key, baseURL: url, timeout: 300_000 });
const wav = { container: "wav", encoding: "pcm_s16le", sample_rate: 24000 };
const response = await cartesia.tts.generate({ model_id: "sonic-2", transcript: TEXT, voice: { mode: "id", id: "alloy" }, output_format: wav });
writeFileSync(join(out, "js_ca_bytes.wav"), Buffer.from(await response.arrayBuffer()));
found.cartesia.generate = { file: "js_ca_bytes.wav" };
const listed = [];
for await (const voice of cartesia.voices.list({ limit: 5 })) listed.push(voice.id);
found.cartesia.voices = listed;

const ws = await cartesia.tts.websocket();
const context = ws.context({ model_id: "sonic-2", voice: { mode: "id", id: "alloy" }, output_format: RAW });
await context.push({ transcript: "Hello there. " });
await context.push({ transcript: "The library opens at nine in the morning, and closes at six." });
await context.no_more_inputs();
const chunks = [];
const types = [];
for await (const event of context.receive()) {
  types.push(event.type);
  if (event.type === "chunk" && event.data) chunks.push(Buffer.from(event.data, "base64"));
}
writeFileSync(join(out, "js_ca_ws.pcm"), Buffer.concat(chunks));
found.cartesia.websocket = { file: "js_ca_ws.pcm", types, url: ws.url.toString() };
ws.close();

process.stdout.write(JSON.stringify(found));
process.exit(0);
