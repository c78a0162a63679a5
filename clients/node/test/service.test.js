'use strict';
// Lookups against live servers: through the router and directly to the shards (row and dim
// layouts read from Info), compared with values computed in Python by the shared kernel.
//
// Endpoints and expected outputs come from the environment when set (the pytest harness,
// tests/runtimes/test_node_client.py, sets them):
//   ULTRAMEM_ROUTER    HOST:PORT of `ultramem-dist serve-router`
//   ULTRAMEM_SHARDS    HOST:PORT,... of the shard servers
//   ULTRAMEM_EXPECTED  JSON file: version, queries and expected outputs per table
// Otherwise (plain `npm test`) this file starts them itself: test/fixture.py exports a store,
// starts two shard servers and a router on free loopback ports and computes the expected
// outputs with the shared kernel; it stops everything when these tests end. Python: env
// ULTRAMEM_PYTHON, else the repository's .venv/bin/python, else python3 (ultramem-dist must be
// importable by it).

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const readline = require('node:readline');
const { spawn } = require('node:child_process');
const { GatherPoolClient, status } = require('..');

let ROUTER; let SHARDS; let expected; let fixture = null;

function python() {
  if (process.env.ULTRAMEM_PYTHON) return process.env.ULTRAMEM_PYTHON;
  const venv = path.resolve(__dirname, '..', '..', '..', '.venv', 'bin', 'python');
  return fs.existsSync(venv) ? venv : 'python3';
}

function startFixture() {
  return new Promise((resolve, reject) => {
    fixture = spawn(python(), [path.join(__dirname, 'fixture.py')], {
      stdio: ['pipe', 'pipe', 'inherit'],
    });
    fixture.on('error', reject);
    fixture.on('exit', (code) => reject(new Error(`test/fixture.py exited with ${code}`)));
    readline.createInterface({ input: fixture.stdout }).once('line', (line) => resolve(JSON.parse(line)));
  });
}

test.before(async () => {
  let env = process.env;
  if (!(env.ULTRAMEM_ROUTER && env.ULTRAMEM_SHARDS && env.ULTRAMEM_EXPECTED)) env = await startFixture();
  ROUTER = env.ULTRAMEM_ROUTER;
  SHARDS = env.ULTRAMEM_SHARDS;
  expected = JSON.parse(fs.readFileSync(env.ULTRAMEM_EXPECTED, 'utf8'));
});

test.after(() => {
  if (fixture) {
    fixture.removeAllListeners('exit');
    fixture.stdin.end(); // the fixture stops its servers and removes its files
  }
});

test('an unreachable target is UNAVAILABLE (14), with the whole reason', async () => {
  await assert.rejects(
    GatherPoolClient.connect('127.0.0.1:1', { connectTimeoutMs: 3000 }),
    (err) => {
      assert.equal(err.code, status.UNAVAILABLE);
      assert.match(err.message, /^no target answered Info: 127\.0\.0\.1:1: Info failed: UNAVAILABLE: .+/);
      assert.ok(err.details.length > 0);
      return true;
    },
  );
});

function assertClose(actual, want, what) {
  assert.deepEqual(actual.shape, want.shape, `${what}: shape`);
  assert.equal(actual.data.length, want.values.length, `${what}: size`);
  for (let i = 0; i < want.values.length; i += 1) {
    const tol = 1e-5 + 1e-4 * Math.abs(want.values[i]);
    if (Math.abs(actual.data[i] - want.values[i]) > tol) {
      assert.fail(`${what}: element ${i} is ${actual.data[i]}, expected ${want.values[i]}`);
    }
  }
}

function query(q) {
  // pre_input: UltraMemV2 tables only (flat, or [T][pre_vdim] rows); undefined for v1 tables
  return {
    indices: q.indices, blocks: q.blocks, weights: q.weights, numTokens: q.num_tokens, preInput: q.pre_input,
  };
}

test('through the router: one endpoint, the whole table', async (t) => {
  const client = await GatherPoolClient.connect(ROUTER);
  t.after(() => client.close());
  const [info] = client.infos();
  assert.equal(info.shard_index, 0);
  assert.equal(info.num_shards, 1);
  assert.equal(client.version, expected.version);
  for (const [tableId, q] of Object.entries(expected.tables)) {
    const layout = client.table(tableId);
    assert.deepEqual(layout.rows, [[0, layout.nRows]]);
    assert.deepEqual(layout.cols, [[0, layout.outWidth]]);
    const out = await client.gather(tableId, query(q));
    assertClose(out, q.expected, `router ${tableId}`);
  }
});

test('direct to the shards: layout from Info, split and join in Node', async (t) => {
  const client = await GatherPoolClient.connect(SHARDS);
  t.after(() => client.close());
  assert.equal(client.numShards, expected.num_shards);
  assert.equal(client.version, expected.version);
  for (const [tableId, q] of Object.entries(expected.tables)) {
    const layout = client.table(tableId);
    assert.equal(layout.sharding, q.sharding, `${tableId}: sharding read from Info`);
    const out = await client.gather(tableId, query(q));
    assertClose(out, q.expected, `direct ${tableId}`);
  }
});

test('refusals carry the gRPC status codes', async (t) => {
  const router = await GatherPoolClient.connect(ROUTER);
  const direct = await GatherPoolClient.connect(SHARDS);
  t.after(() => { router.close(); direct.close(); });
  const [tableId, q] = Object.entries(expected.tables)[0];
  // a version the servers do not serve
  for (const client of [router, direct]) {
    client.version = 'not-a-version';
    await assert.rejects(client.gather(tableId, query(q)), (err) => err.code === status.FAILED_PRECONDITION);
    client.version = expected.version;
  }
  // an unknown table, asked of the router with a hand-made request
  router.tables.nope = { ...router.table(tableId), tableId: 'nope' };
  await assert.rejects(router.gather('nope', query(q)), (err) => err.code === status.NOT_FOUND);
  // a row id past the end of the table
  const bad = { ...query(q), indices: Int32Array.from(q.indices, (v, i) => (i === 0 ? 1e9 : v)) };
  await assert.rejects(router.gather(tableId, bad), (err) => err.code === status.INVALID_ARGUMENT);
  await assert.rejects(direct.gather(tableId, bad), (err) => err.code === status.INVALID_ARGUMENT);
  // a deadline that has already passed
  await assert.rejects(
    router.gather(tableId, query(q), { deadlineMs: -1 }),
    (err) => err.code === status.DEADLINE_EXCEEDED,
  );
});

test('UltraMemV2 tables: pre_vdim from Info, preInput to every shard, refusals', async (t) => {
  const router = await GatherPoolClient.connect(ROUTER);
  const direct = await GatherPoolClient.connect(SHARDS);
  t.after(() => { router.close(); direct.close(); });
  const v2 = Object.entries(expected.tables).filter(([, q]) => q.pre_vdim > 0);
  assert.deepEqual(v2.map(([, q]) => q.sharding).sort(), ['dim', 'row']);
  for (const [name, client] of [['router', router], ['direct', direct]]) {
    for (const [tableId, q] of v2) {
      assert.equal(client.table(tableId).preVdim, q.pre_vdim, `${name} ${tableId}: preVdim`);
      const raw = client.infos()[0].tables.find((x) => x.table_id === tableId);
      assert.equal(raw.pre_vdim, q.pre_vdim);
      assertClose(await client.gather(tableId, query(q)), q.expected, `${name} ${tableId}`);
      // no preInput: refused by the client before any call
      await assert.rejects(
        client.gather(tableId, { ...query(q), preInput: undefined }),
        /must carry preInput \[T, 8\]/,
      );
      // a NaN: refused by the shard (INVALID_ARGUMENT), passed on by the router
      const nan = Float32Array.from(q.pre_input.flat(), (v, i) => (i === 3 ? NaN : v));
      await assert.rejects(client.gather(tableId, { ...query(q), preInput: nan }), (err) => {
        assert.equal(err.code, status.INVALID_ARGUMENT);
        assert.match(err.message, /pre_input: contains NaN or Inf/);
        return true;
      });
    }
    // v1 tables are unchanged and refuse a preInput
    const q1 = expected.tables.row;
    assert.equal(client.table('row').preVdim, 0);
    await assert.rejects(client.gather('row', { ...query(q1), preInput: [1, 2] }), /has no pre-values/);
  }
});
