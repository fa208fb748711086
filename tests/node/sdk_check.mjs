// The official OpenAI Node SDK, unchanged, against a live ozwell_asgi server.
//
//   OZWELL_BASE_URL=http://127.0.0.1:8000/v1 OZWELL_API_KEY=ozw_... node sdk_check.mjs
//
// Prints a JSON summary on stdout and exits 0; on the first failed check, prints what failed on stderr and exits 1.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import OpenAI, { toFile } from 'openai';
import { VERSION } from 'openai/version';

const baseURL = process.env.OZWELL_BASE_URL;
const apiKey = process.env.OZWELL_API_KEY;
if (!baseURL || !apiKey) {
  console.error('sdk_check: set OZWELL_BASE_URL (e.g. http://127.0.0.1:8000/v1) and OZWELL_API_KEY');
  process.exit(2);
}

const client = new OpenAI({ apiKey, baseURL, maxRetries: 0, timeout: 20_000 });
const summary = { sdk_version: VERSION, node_version: process.version, checks: [] };

async function check(name, fn) {
  try {
    const detail = await fn();
    summary.checks.push({ name, ok: true, detail: detail ?? {} });
  } catch (err) {
    console.error(`sdk_check: FAILED check "${name}": ${err?.stack ?? err}`);
    console.error(`sdk_check: checks passed before the failure: ${JSON.stringify(summary.checks.map((c) => c.name))}`);
    process.exit(1);
  }
}

async function rejection(promise) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  assert.fail('the request succeeded but was expected to be rejected');
}

await check('chat.completions.create', async () => {
  const text = 'hello from the node sdk';
  const completion = await client.chat.completions.create({
    model: 'echo',
    messages: [
      { role: 'system', content: 'be brief' },
      { role: 'user', content: 'an earlier message' },
      { role: 'user', content: text },
    ],
  });
  assert.equal(completion.object, 'chat.completion');
  assert.equal(completion.choices.length, 1);
  assert.equal(completion.choices[0].message.role, 'assistant');
  assert.equal(completion.choices[0].message.content, text);
  assert.equal(completion.choices[0].finish_reason, 'stop');
  assert.ok(completion.usage, 'usage is missing');
  assert.ok(completion.usage.total_tokens > 0, `usage.total_tokens = ${completion.usage.total_tokens}`);
  assert.equal(completion.usage.total_tokens, completion.usage.prompt_tokens + completion.usage.completion_tokens);
  return { id: completion.id, usage: completion.usage };
});

await check('chat.completions.create stream', async () => {
  const text = 'streamed through the node sdk';
  const stream = await client.chat.completions.create({
    model: 'echo',
    messages: [{ role: 'user', content: text }],
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  assert.ok(chunks.length >= 2, `only ${chunks.length} chunk(s)`);
  for (const chunk of chunks) assert.equal(chunk.object, 'chat.completion.chunk');
  const content = chunks.map((c) => c.choices[0]?.delta?.content ?? '').join('');
  assert.equal(content, text);
  assert.ok(chunks.some((c) => c.choices[0]?.finish_reason === 'stop'), 'no chunk has finish_reason "stop"');
  const last = chunks.at(-1);
  assert.deepEqual(last.choices, [], 'the usage chunk must have empty choices');
  assert.ok(last.usage, 'the final chunk has no usage');
  assert.ok(last.usage.total_tokens > 0, `usage.total_tokens = ${last.usage.total_tokens}`);
  for (const chunk of chunks.slice(0, -1)) assert.ok(chunk.usage == null, 'usage appears before the final chunk');
  return { chunks: chunks.length, content, usage: last.usage };
});

await check('models.list', async () => {
  const ids = [];
  for await (const model of client.models.list()) {
    assert.equal(model.object, 'model');
    ids.push(model.id);
  }
  assert.ok(ids.includes('echo'), `models.list() gave ${JSON.stringify(ids)}`);
  return { ids };
});

await check('models.retrieve', async () => {
  const model = await client.models.retrieve('echo');
  assert.equal(model.id, 'echo');
  assert.equal(model.object, 'model');
  assert.equal(typeof model.owned_by, 'string');
  assert.equal(typeof model.created, 'number');
  return { id: model.id, owned_by: model.owned_by };
});

await check('unknown model → NotFoundError', async () => {
  const err = await rejection(
    client.chat.completions.create({ model: 'no-such-model', messages: [{ role: 'user', content: 'x' }] }),
  );
  assert.ok(err instanceof OpenAI.NotFoundError, `expected OpenAI.NotFoundError, got ${err?.constructor?.name}: ${err}`);
  assert.equal(err.status, 404);
  assert.equal(err.code, 'model_not_found');
  assert.equal(err.type, 'invalid_request_error');
  assert.equal(err.param, 'model');
  assert.ok(err.requestID, 'the error carries no request id');
  return { status: err.status, code: err.code, type: err.type, request_id: err.requestID };
});

await check('bad key → AuthenticationError', async () => {
  const bad = new OpenAI({ apiKey: 'ozw_' + 'x'.repeat(40), baseURL, maxRetries: 0 });
  const err = await rejection(bad.models.list());
  assert.ok(
    err instanceof OpenAI.AuthenticationError,
    `expected OpenAI.AuthenticationError, got ${err?.constructor?.name}: ${err}`,
  );
  assert.equal(err.status, 401);
  assert.equal(typeof err.message, 'string');
  return { status: err.status, code: err.code, type: err.type };
});

await check('forced tool call', async () => {
  const completion = await client.chat.completions.create({
    model: 'echo',
    messages: [{ role: 'user', content: 'Paris' }],
    tools: [
      {
        type: 'function',
        function: {
          name: 'get_weather',
          description: 'Weather for a city',
          parameters: {
            type: 'object',
            properties: { city: { type: 'string' }, days: { type: 'integer', minimum: 1 } },
            required: ['city', 'days'],
          },
        },
      },
    ],
    tool_choice: { type: 'function', function: { name: 'get_weather' } },
  });
  const choice = completion.choices[0];
  // As OpenAI does: a tool_choice naming a function ends with "stop"; only "required"/"auto" give "tool_calls".
  assert.equal(choice.finish_reason, 'stop');
  assert.equal(choice.message.tool_calls?.length, 1, 'expected exactly one tool call');
  const call = choice.message.tool_calls[0];
  assert.equal(call.type, 'function');
  assert.equal(typeof call.id, 'string');
  assert.ok(call.id.length > 0, 'the tool call has an empty id');
  assert.equal(call.function.name, 'get_weather');
  const args = JSON.parse(call.function.arguments);
  assert.equal(typeof args.city, 'string');
  assert.equal(typeof args.days, 'number');
  return { name: call.function.name, arguments: args, finish_reason: choice.finish_reason };
});

await check('streamed tool call arguments', async () => {
  const stream = await client.chat.completions.create({
    model: 'echo',
    messages: [{ role: 'user', content: 'Lyon' }],
    stream: true,
    tools: [
      {
        type: 'function',
        function: {
          name: 'get_weather',
          parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
        },
      },
    ],
    tool_choice: 'required',
  });
  const pieces = [];
  let name = null;
  let finish = null;
  for await (const chunk of stream) {
    const delta = chunk.choices[0]?.delta;
    for (const call of delta?.tool_calls ?? []) {
      if (call.function?.name) name = call.function.name;
      if (call.function?.arguments) pieces.push(call.function.arguments);
    }
    finish = chunk.choices[0]?.finish_reason ?? finish;
  }
  assert.equal(name, 'get_weather');
  assert.ok(pieces.length >= 2, `the arguments came in ${pieces.length} piece(s)`);
  const args = JSON.parse(pieces.join(''));
  assert.equal(args.city, 'Lyon');
  assert.equal(finish, 'tool_calls');
  return { pieces: pieces.length, arguments: args };
});

await check('embeddings.create', async () => {
  const result = await client.embeddings.create({ model: 'echo-embedding', input: ['one', 'two'], dimensions: 8 });
  assert.equal(result.object, 'list');
  assert.equal(result.data.length, 2);
  for (const item of result.data) {
    assert.equal(item.embedding.length, 8);
    const norm = Math.sqrt(item.embedding.reduce((sum, x) => sum + x * x, 0));
    assert.ok(Math.abs(norm - 1) < 1e-5, `norm ${norm}`);
  }
  const floats = await client.embeddings.create({ model: 'echo-embedding', input: 'one', dimensions: 8, encoding_format: 'float' });
  floats.data[0].embedding.forEach((x, i) => assert.ok(Math.abs(x - result.data[0].embedding[i]) < 1e-6));
  assert.ok(result.usage.prompt_tokens > 0);
  return { dimensions: result.data[0].embedding.length, usage: result.usage };
});

await check('x-request-id via withResponse/asResponse', async () => {
  const { data, response, request_id } = await client.chat.completions
    .create({ model: 'echo', messages: [{ role: 'user', content: 'raw' }] })
    .withResponse();
  assert.equal(data.choices[0].message.content, 'raw');
  const header = response.headers.get('x-request-id');
  assert.ok(header && header.startsWith('req_'), `x-request-id = ${header}`);
  assert.equal(request_id, header);
  assert.equal(data._request_id, header);
  const raw = await client.models.retrieve('echo').asResponse();
  assert.equal(raw.status, 200);
  assert.ok(raw.headers.get('x-request-id')?.startsWith('req_'));
  return { request_id: header };
});

// Files: the SDK puts the file part first and the fields after it (its body's key order).
const fileText = '{"prompt": "node"}\n'.repeat(2000);
let nodeFileId;

await check('files.create', async () => {
  const file = await client.files.create({
    file: await toFile(Buffer.from(fileText), 'node.jsonl', { type: 'application/jsonl' }),
    purpose: 'fine-tune',
  });
  assert.equal(file.object, 'file');
  assert.ok(file.id.startsWith('file-'), file.id);
  assert.equal(file.bytes, Buffer.byteLength(fileText));
  assert.equal(file.filename, 'node.jsonl');
  assert.equal(file.purpose, 'fine-tune');
  assert.equal(typeof file.created_at, 'number');
  nodeFileId = file.id;
  return { id: file.id, bytes: file.bytes, purpose: file.purpose };
});

await check('files.create streamed, fields after the file', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ozwell-sdk-'));
  const where = path.join(dir, 'streamed.txt');
  fs.writeFileSync(where, 'x'.repeat(300_000));
  try {
    const file = await client.files.create({
      file: fs.createReadStream(where),
      purpose: 'batch',
      expires_after: { anchor: 'created_at', seconds: 3600 },
    });
    assert.equal(file.bytes, 300_000);
    assert.equal(file.filename, 'streamed.txt');
    assert.equal(file.purpose, 'batch');
    assert.equal(file.expires_at, file.created_at + 3600);
    return { bytes: file.bytes, expires_in: file.expires_at - file.created_at };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

await check('files.list auto-pagination', async () => {
  for (let i = 0; i < 3; i++) {
    await client.files.create({ file: await toFile(Buffer.from(`file ${i}`), `${i}.txt`), purpose: 'user_data' });
  }
  const ids = [];
  for await (const file of client.files.list({ limit: 2 })) ids.push(file.id);
  assert.equal(ids.length, 5, `listed ${JSON.stringify(ids)}`);
  assert.equal(new Set(ids).size, 5);
  assert.ok(ids.includes(nodeFileId));
  const page = await client.files.list({ limit: 2 });
  assert.equal(page.data.length, 2);
  assert.equal(page.has_more, true);
  const tuned = [];
  for await (const file of client.files.list({ purpose: 'fine-tune' })) tuned.push(file.id);
  assert.deepEqual(tuned, [nodeFileId]);
  return { listed: ids.length };
});

await check('files.retrieve', async () => {
  const file = await client.files.retrieve(nodeFileId);
  assert.equal(file.id, nodeFileId);
  assert.equal(file.filename, 'node.jsonl');
  return { id: file.id };
});

await check('files.content', async () => {
  const response = await client.files.content(nodeFileId);
  assert.equal(response.status, 200);
  assert.equal(response.headers.get('content-type'), 'application/jsonl');
  assert.match(response.headers.get('content-disposition'), /^attachment; filename="node.jsonl"/);
  const text = await response.text();
  assert.equal(text, fileText);
  return { bytes: Buffer.byteLength(text) };
});

await check('files.delete', async () => {
  const deleted = await client.files.delete(nodeFileId);
  assert.deepEqual({ id: deleted.id, object: deleted.object, deleted: deleted.deleted }, {
    id: nodeFileId,
    object: 'file',
    deleted: true,
  });
  const err = await rejection(client.files.retrieve(nodeFileId));
  assert.ok(err instanceof OpenAI.NotFoundError, `expected OpenAI.NotFoundError, got ${err?.constructor?.name}: ${err}`);
  assert.equal(err.code, 'file_not_found');
  return { status: err.status, code: err.code };
});

summary.ok = true;
console.log(JSON.stringify(summary));
