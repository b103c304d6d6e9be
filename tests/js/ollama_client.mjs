// The official `ollama` JavaScript library against a served proxy: node ollama_client.mjs URL STEP
// Prints one JSON object with what the library returned, for tests/test_js_client.py to check.
import { Ollama } from "ollama";

const [host, step] = process.argv.slice(2);
const client = new Ollama({ host, headers: { "X-User-ID": "js-client" } });
const hi = [{ role: "user", content: "hi" }];

async function calls() {
  const chat = await client.chat({ model: "llama3", messages: hi });
  const parts = [];
  for await (const part of await client.chat({ model: "llama3", messages: hi, stream: true })) {
    parts.push(part);
  }
  const generated = await client.generate({ model: "qwen2:0.5b", prompt: "hi" });
  const embedded = await client.embed({ model: "nomic-embed-text", input: ["a", "b"] });
  const listed = await client.list();
  let missing = null;
  try {
    await client.chat({ model: "missing", messages: hi });
  } catch (error) {
    missing = { name: error.name, status: error.status_code, message: error.error };
  }
  return {
    chat: chat.message.content,
    streamed: parts.map((p) => p.message.content).join(""),
    last_done: parts.at(-1).done,
    eval_count: parts.at(-1).eval_count,
    generated: generated.response,
    embeddings: embedded.embeddings.length,
    models: listed.models.map((m) => m.model),
    missing,
  };
}

async function stop() {
  // A chat UI's stop button: read the first part, then abort the stream.
  const stream = await client.chat({ model: "llama3", messages: hi, stream: true });
  const seen = [];
  try {
    for await (const part of stream) {
      seen.push(part.message.content);
      stream.abort();
    }
  } catch (error) {
    return { seen, aborted: error.name };
  }
  return { seen, aborted: null };
}

const steps = { calls, stop, chat: async () => (await client.chat({ model: "llama3", messages: hi })).message.content };
process.stdout.write(JSON.stringify(await steps[step]()) + "\n");
