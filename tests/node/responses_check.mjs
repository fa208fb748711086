// The official OpenAI Node SDK's Responses API, unchanged, against a live ozwell_asgi server.
//
//   OZWELL_BASE_URL=http://127.0.0.1:8000/v1 OZWELL_API_KEY=ozw_... node responses_check.mjs
//
// Prints a JSON summary on stdout and exits 0; on the first failed check, prints what failed on stderr and exits 1.
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { VERSION } from 'openai/version';

const baseURL = process.env.OZWELL_BASE_URL;
const apiKey = process.env.OZWELL_API_KEY;
if (!baseURL || !apiKey) {
  console.error('responses_check: set OZWELL_BASE_URL and OZWELL_API_KEY');
  process.exit(2);
}

const client = new OpenAI({ apiKey, baseURL, maxRetries: 0, timeout: 20_000 });
const summary = { sdk_version: VERSION, checks: [] };

async function check(name, fn) {
  try {
    const detail = await fn();
    summary.checks.push({ name, ok: true, detail: detail ?? {} });
  } catch (err) {
    console.error(`responses_check: FAILED check "${name}": ${err?.stack ?? err}`);
    process.exit(1);
  }
}

let first;
await check('responses.create', async () => {
  first = await client.responses.create({ model: 'echo', input: 'hello from node', instructions: 'be brief' });
  assert.equal(first.object, 'response');
  assert.equal(first.status, 'completed');
  assert.equal(first.output_text, 'hello from node');
  assert.ok(first.id.startsWith('resp_'));
  assert.equal(first.usage.total_tokens, first.usage.input_tokens + first.usage.output_tokens);
  return { id: first.id, text: first.output_text };
});

let streamed;
await check('responses.stream', async () => {
  const deltas = [];
  const kinds = [];
  const stream = client.responses
    .stream({ model: 'echo', input: 'streamed through node', previous_response_id: first.id })
    .on('response.output_text.delta', (event) => deltas.push(event.delta));
  for await (const event of stream) kinds.push(event.type);
  streamed = await stream.finalResponse();
  assert.equal(deltas.join(''), streamed.output_text);
  assert.equal(kinds[0], 'response.created');
  assert.equal(kinds.at(-1), 'response.completed');
  return { text: streamed.output_text, previous: streamed.previous_response_id, events: kinds.length };
});

await check('responses.create stream: true', async () => {
  const stream = await client.responses.create({ model: 'echo', input: 'raw events', stream: true });
  const sequence = [];
  let text = '';
  for await (const event of stream) {
    sequence.push(event.sequence_number);
    if (event.type === 'response.output_text.delta') text += event.delta;
  }
  assert.deepEqual(sequence, sequence.map((_, i) => i));
  return { text };
});

await check('responses.retrieve and inputItems.list', async () => {
  const again = await client.responses.retrieve(streamed.id);
  assert.equal(again.output_text, streamed.output_text);
  const items = [];
  for await (const item of client.responses.inputItems.list(streamed.id)) items.push(item);
  assert.equal(items.length, 1);
  return { text: items[0].content[0].text };
});

await check('background and cancel', async () => {
  const queued = await client.responses.create({ model: 'echo', input: 'in the background', background: true });
  assert.equal(queued.status, 'queued');
  let done = queued;
  for (let i = 0; i < 1000 && !['completed', 'failed', 'cancelled', 'incomplete'].includes(done.status); i++) {
    done = await client.responses.retrieve(queued.id);
  }
  const cancelled = await client.responses.cancel(queued.id);
  return { status: done.status, text: done.output_text, after_cancel: cancelled.status };
});

await check('responses.delete', async () => {
  await client.responses.delete(first.id);
  try {
    await client.responses.retrieve(first.id);
  } catch (err) {
    assert.ok(err instanceof OpenAI.NotFoundError);
    return { status: err.status, code: err.code };
  }
  assert.fail('a deleted response was retrieved');
});

console.log(JSON.stringify({ ok: true, ...summary }));
