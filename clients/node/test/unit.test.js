'use strict';
// Pure tests of the client's split/join and tensor codec (no server needed).

const test = require('node:test');
const assert = require('node:assert/strict');
const {
  splitRows, concatColumns, encodeTensor, decodeFloat32, loadContract, preInputArray,
} = require('..');

test('splitRows sends every entry to its owner, in token order, as CSR', () => {
  // T = 3 queries of L = 4 entries, 2 cores; shards own rows [0, 10), [10, 20), [20, N)
  const indices = [1, 12, 25, 3, 11, 11, 2, 30, 21, 22, 23, 24];
  const blocks = indices.map((_, i) => i % 4);
  const weights = indices.flatMap((_, i) => [i, -i]);
  const parts = splitRows(indices, blocks, weights, 3, 4, 2, [0, 10, 20]);
  assert.deepEqual(Array.from(parts[0].indices), [1, 3, 2]);
  assert.deepEqual(Array.from(parts[0].offsets), [0, 2, 3, 3]);
  assert.deepEqual(Array.from(parts[1].indices), [12, 11, 11]);
  assert.deepEqual(Array.from(parts[1].offsets), [0, 1, 3, 3]);
  assert.deepEqual(Array.from(parts[2].indices), [25, 30, 21, 22, 23, 24]);
  assert.deepEqual(Array.from(parts[2].offsets), [0, 1, 2, 6]);
  // blocks and both core weights travel with their entry
  assert.deepEqual(Array.from(parts[1].blocks), [1, 0, 1]);
  assert.deepEqual(Array.from(parts[1].weights), [1, -1, 4, -4, 5, -5]);
  // a shard owning nothing is not called
  assert.equal(splitRows([1, 2], [0, 0], [1, 1, 1, 1], 1, 2, 2, [0, 10])[1], null);
});

test('concatColumns joins column slices at their offsets', () => {
  const a = { data: Float32Array.from([1, 2, 3, 4]), width: 2, colLo: 0 }; // 2 rows x 2
  const b = { data: Float32Array.from([5, 6]), width: 1, colLo: 2 }; // 2 rows x 1
  assert.deepEqual(Array.from(concatColumns([b, a], 2, 3)), [1, 2, 5, 3, 4, 6]);
});

test('tensors round-trip through the protobuf wire format', () => {
  const { Gather } = loadContract().GatherPool.service;
  const values = Float32Array.from([0.5, -1.25, 3, 1e-7, 42, -0]);
  const reply = { table_id: 'mem0', table_version: 'v1', shard_index: 3 };
  reply.pooled = encodeTensor(values, [1, 2, 3], 'DTYPE_FLOAT32');
  const wire = Gather.responseSerialize(reply);
  // table_id 6 + table_version 4 + shard_index 2 + pooled (2 + dtype 2 + shape 5 + data 26)
  assert.equal(wire.length, 6 + 4 + 2 + 2 + 2 + 5 + 26);
  const back = Gather.responseDeserialize(wire);
  assert.equal(back.shard_index, 3);
  const decoded = decodeFloat32(back.pooled);
  assert.deepEqual(decoded.shape, [1, 2, 3]);
  assert.deepEqual(Array.from(decoded.data), Array.from(values));
  assert.throws(() => encodeTensor([1, 2, 3], [2, 2], 'DTYPE_INT32'), /do not fill/);
  const ids = encodeTensor([1, 2 ** 40], [2], 'DTYPE_INT64');
  assert.equal(ids.data.readBigInt64LE(8), 2n ** 40n);
});

test('preInputArray takes flat or [T][pre_vdim] input and checks it against the table', () => {
  const v2 = { tableId: 'shared', preVdim: 2 };
  assert.deepEqual(Array.from(preInputArray(v2, [[1, 2], [3, 4], [5, 6]], 3)), [1, 2, 3, 4, 5, 6]);
  const flat = Float32Array.from([1, 2, 3, 4]);
  assert.equal(preInputArray(v2, flat, 2), flat); // a typed array is sent as is
  assert.throws(() => preInputArray(v2, [[1, 2], [3]], 2), /2 rows of 2 values/);
  assert.throws(() => preInputArray(v2, [1, 2, 3], 2), /expected T \* pre_vdim = 4/);
  assert.throws(() => preInputArray(v2, undefined, 2), /must carry preInput \[T, 2\]/);
  const v1 = { tableId: 'mem0', preVdim: 0 };
  assert.equal(preInputArray(v1, undefined, 2), undefined);
  assert.throws(() => preInputArray(v1, [1], 1), /has no pre-values/);
  // the request field is the proto's pre_input (field 7)
  const { Gather } = loadContract().GatherPool.service;
  const req = { table_id: 'shared', pre_input: encodeTensor(flat, [2, 2], 'DTYPE_FLOAT32') };
  const back = Gather.requestDeserialize(Gather.requestSerialize(req));
  assert.deepEqual(Array.from(decodeFloat32(back.pre_input).data), [1, 2, 3, 4]);
});
