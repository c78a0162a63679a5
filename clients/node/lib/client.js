'use strict';
// A GatherPool client for Node.js: works against a router (one endpoint, the whole table) and
// directly against the shards (it reads the layout from Info and splits/joins by itself).

const grpc = require('@grpc/grpc-js');
const { loadContract } = require('./proto');
const { encodeTensor, decodeFloat32, product } = require('./tensor');

const INT32_MAX = 2 ** 31 - 1;

/** A failed call, with the gRPC status code and the endpoint that answered. */
class GatherError extends Error {
  constructor(message, { code = grpc.status.UNKNOWN, details = '', target = null, shard = null } = {}) {
    super(message);
    this.name = 'GatherError';
    this.code = code;
    this.details = details;
    this.target = target;
    this.shard = shard;
  }
}

function toTargets(targets) {
  const list = (Array.isArray(targets) ? targets : [targets])
    .flatMap((t) => String(t).split(','))
    .map((t) => t.trim())
    .filter(Boolean);
  if (list.length === 0) throw new TypeError('no target given; expected HOST:PORT[,HOST:PORT...]');
  return list;
}

function unary(stub, method, request, { deadline, metadata, target, shard }) {
  return new Promise((resolve, reject) => {
    stub[method](request, metadata || new grpc.Metadata(), { deadline }, (err, reply) => {
      if (!err) return resolve(reply);
      const where = shard === null ? target : `shard ${shard} (${target})`;
      const name = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || err.code;
      reject(new GatherError(`${where}: ${method} failed: ${name}: ${err.details}`, {
        code: err.code, details: err.details, target, shard,
      }));
    });
  });
}

/**
 * Per row shard, the entries of a dense [T, L] batch it owns, as a ragged (CSR) batch in the
 * original token order; `null` for a shard owning none. Ids below 0 go to shard 0 and ids past
 * the last range to the last shard, which refuse them (INVALID_ARGUMENT) instead of the client
 * silently dropping them.
 */
function splitRows(indices, blocks, weights, numTokens, perQuery, numCores, rowLos) {
  const numShards = rowLos.length;
  const owner = (id) => {
    let k = 0;
    while (k + 1 < numShards && id >= rowLos[k + 1]) k += 1;
    return k;
  };
  const counts = new Array(numShards).fill(0);
  const owners = new Int32Array(indices.length);
  for (let i = 0; i < indices.length; i += 1) {
    owners[i] = owner(Number(indices[i]));
    counts[owners[i]] += 1;
  }
  const parts = counts.map((n) => (n === 0 ? null : {
    indices: new Int32Array(n), blocks: new Int32Array(n), weights: new Float32Array(n * numCores),
    offsets: new Int32Array(numTokens + 1), fill: 0,
  }));
  for (let t = 0; t < numTokens; t += 1) {
    for (let l = 0; l < perQuery; l += 1) {
      const i = t * perQuery + l;
      const p = parts[owners[i]];
      p.indices[p.fill] = Number(indices[i]);
      p.blocks[p.fill] = Number(blocks[i]);
      for (let c = 0; c < numCores; c += 1) p.weights[p.fill * numCores + c] = weights[i * numCores + c];
      p.fill += 1;
    }
    for (const p of parts) if (p) p.offsets[t + 1] = p.fill;
  }
  return parts;
}

/** Column slices `[{data, width, colLo}]` of `rows` rows joined into rows of `outWidth`. */
function concatColumns(slices, rows, outWidth) {
  const out = new Float32Array(rows * outWidth);
  for (const { data, width, colLo } of slices) {
    for (let r = 0; r < rows; r += 1) {
      out.set(data.subarray(r * width, (r + 1) * width), r * outWidth + colLo);
    }
  }
  return out;
}

/**
 * An UltraMemV2 lookup's `preInput` as a flat Float32Array of `numTokens * preVdim` values:
 * accepts a flat typed array / array of numbers, or an array of `numTokens` rows of `preVdim`.
 * `undefined` for a table without pre-values; throws if the table and the query disagree.
 */
function preInputArray(table, preInput, numTokens) {
  if (!table.preVdim) {
    if (preInput !== undefined && preInput !== null) {
      throw new TypeError(`preInput: table ${table.tableId} has no pre-values (not an UltraMemV2 table); send the query without preInput`);
    }
    return undefined;
  }
  if (preInput === undefined || preInput === null) {
    throw new TypeError(`preInput: table ${table.tableId} is an UltraMemV2 table with pre-values; the query must carry preInput [T, ${table.preVdim}]`);
  }
  let flat = preInput;
  if (Array.isArray(preInput) && preInput.length > 0 && typeof preInput[0] === 'object') {
    if (preInput.length !== numTokens || preInput.some((row) => row.length !== table.preVdim)) {
      throw new RangeError(`preInput: expected ${numTokens} rows of ${table.preVdim} values (one row per query token)`);
    }
    flat = new Float32Array(numTokens * table.preVdim);
    preInput.forEach((row, t) => flat.set(row, t * table.preVdim));
  }
  if (flat.length !== numTokens * table.preVdim) {
    throw new RangeError(`preInput has ${flat.length} values; expected T * pre_vdim = ${numTokens * table.preVdim}`);
  }
  return flat;
}

function tableLayout(tableId, perShard) {
  const t0 = perShard[0];
  for (const [k, t] of perShard.entries()) {
    for (const key of ['n_rows', 'dv', 'expansion', 'num_cores', 'd_model', 'merged', 'sharding', 'pre_vdim']) {
      if (t[key] !== t0[key]) {
        throw new GatherError(`table ${tableId}: shard ${k} disagrees with shard 0 on ${key}`);
      }
    }
  }
  const layout = {
    tableId,
    nRows: t0.n_rows,
    dv: t0.dv,
    expansion: t0.expansion,
    numCores: t0.num_cores,
    dModel: t0.d_model,
    topm: t0.topm,
    heads: t0.heads,
    merged: t0.merged,
    sharding: t0.sharding === 'SHARDING_ROW' ? 'row' : 'dim',
    outWidth: t0.out_width,
    preVdim: t0.pre_vdim || 0, // UltraMemV2 pre-value width; 0: a v1 table (no preInput)
    rows: perShard.map((t) => [t.row_lo, t.row_hi]),
    cols: perShard.map((t) => [t.col_lo, t.col_hi]),
  };
  const [ranges, total] = layout.sharding === 'row'
    ? [layout.rows, layout.nRows] : [layout.cols, layout.outWidth];
  let cursor = 0;
  for (const [lo, hi] of ranges) {
    if (lo !== cursor || hi <= lo) break;
    cursor = hi;
  }
  if (cursor !== total) {
    throw new GatherError(`table ${tableId}: shard ranges ${JSON.stringify(ranges)} do not tile [0, ${total})`);
  }
  return layout;
}

class GatherPoolClient {
  /**
   * Discover the layout with Info on every target, then keep one stub per replica.
   * @param {string|string[]} targets shard replicas (any order), or one router
   * @param {object} [options]
   * @param {string} [options.version] table version (default: the only one served)
   * @param {number} [options.deadlineMs=5000] default deadline of a whole gather
   * @param {grpc.ChannelCredentials} [options.credentials] default: insecure
   * @param {string} [options.authToken] sent as `authorization: Bearer <token>`
   * @param {string} [options.protoRoot] directory holding ultramem/v1/gather.proto
   */
  static async connect(targets, options = {}) {
    const { GatherPool } = loadContract(options.protoRoot);
    const credentials = options.credentials || grpc.credentials.createInsecure();
    const channelOptions = {
      'grpc.max_receive_message_length': 64 << 20,
      'grpc.max_send_message_length': 64 << 20,
      ...(options.channelOptions || {}),
    };
    const metadata = new grpc.Metadata();
    if (options.authToken) metadata.set('authorization', `Bearer ${options.authToken}`);
    const deadline = new Date(Date.now() + (options.connectTimeoutMs || 10000));
    const endpoints = toTargets(targets).map((target) => ({
      target, stub: new GatherPool(target, credentials, channelOptions),
    }));
    const results = await Promise.allSettled(endpoints.map((e) => unary(
      e.stub, 'Info', {}, { deadline, metadata, target: e.target, shard: null },
    )));
    const byVersion = new Map();
    const failures = [];
    results.forEach((res, i) => {
      if (res.status === 'rejected') { failures.push(res.reason.message); return; }
      const info = res.value;
      if (!byVersion.has(info.table_version)) byVersion.set(info.table_version, new Map());
      const shards = byVersion.get(info.table_version);
      if (!shards.has(info.shard_index)) shards.set(info.shard_index, []);
      shards.get(info.shard_index).push({ ...endpoints[i], info });
    });
    const close = () => endpoints.forEach((e) => e.stub.close());
    try {
      if (byVersion.size === 0) {
        // the status of the failures: UNAVAILABLE when no target could be reached
        const codes = new Set(results.map((r) => r.reason.code));
        const unreachable = [...codes].every(
          (c) => c === grpc.status.UNAVAILABLE || c === grpc.status.DEADLINE_EXCEEDED,
        );
        let code = codes.size === 1 ? [...codes][0] : grpc.status.UNKNOWN;
        if (unreachable) code = grpc.status.UNAVAILABLE;
        throw new GatherError(`no target answered Info: ${failures.join('; ')}`, {
          code, details: failures.join('; '),
        });
      }
      let version = options.version;
      if (version === undefined) {
        if (byVersion.size > 1) {
          throw new GatherError(`targets serve several versions ${[...byVersion.keys()]}; pass options.version`);
        }
        [version] = byVersion.keys();
      }
      const shards = byVersion.get(version);
      if (!shards) throw new GatherError(`no target serves table version ${version}`);
      const numShards = [...shards.values()][0][0].info.num_shards;
      const missing = [];
      for (let k = 0; k < numShards; k += 1) if (!shards.has(k)) missing.push(k);
      if (missing.length) {
        throw new GatherError(`version ${version} has ${numShards} shards but no reachable replica of shard(s) ${missing}`);
      }
      const replicas = [];
      for (let k = 0; k < numShards; k += 1) replicas.push(shards.get(k));
      // close the stubs of targets serving other versions or unreachable ones
      const used = new Set(replicas.flat().map((r) => r.stub));
      endpoints.filter((e) => !used.has(e.stub)).forEach((e) => e.stub.close());
      return new GatherPoolClient(version, replicas, metadata, options.deadlineMs || 5000);
    } catch (err) {
      close();
      throw err;
    }
  }

  constructor(version, replicas, metadata, deadlineMs) {
    this.version = version;
    this.replicas = replicas; // [shard][replica] = { target, stub, info }
    this.numShards = replicas.length;
    this.deadlineMs = deadlineMs;
    this.metadata = metadata;
    this.next = new Array(replicas.length).fill(0);
    const first = replicas[0][0].info;
    this.limits = {
      maxBatch: Math.min(...replicas.map((r) => r[0].info.max_batch)),
      maxPerQuery: Math.min(...replicas.map((r) => r[0].info.max_per_query)),
    };
    this.tables = {};
    for (const t of first.tables) {
      const perShard = replicas.map((r, k) => {
        const mine = r[0].info.tables.find((x) => x.table_id === t.table_id);
        if (!mine) throw new GatherError(`shard ${k} does not serve table ${t.table_id}`);
        return mine;
      });
      this.tables[t.table_id] = tableLayout(t.table_id, perShard);
    }
  }

  /** The layout of one table (`sharding` is 'row' or 'dim', per-shard `rows` and `cols`). */
  table(tableId) {
    const t = this.tables[tableId];
    if (!t) {
      throw new GatherError(`table ${tableId} is not in version ${this.version}; tables: ${Object.keys(this.tables)}`,
        { code: grpc.status.NOT_FOUND });
    }
    return t;
  }

  /** Output shape of a gather of `numTokens` queries: [T, E, Dv], or [T, D] for merged tables. */
  outShape(table, numTokens, width = table.outWidth) {
    return table.merged ? [numTokens, width] : [numTokens, table.expansion, width];
  }

  // One call to shard k; on UNAVAILABLE the next replica is tried (within the deadline).
  async call(k, method, request, deadline) {
    const reps = this.replicas[k];
    let lastError;
    for (let attempt = 0; attempt < reps.length; attempt += 1) {
      const rep = reps[this.next[k] % reps.length];
      this.next[k] += 1;
      try {
        return await unary(rep.stub, method, request, {
          deadline, metadata: this.metadata, target: rep.target, shard: this.numShards > 1 ? k : null,
        });
      } catch (err) {
        lastError = err;
        if (err.code !== grpc.status.UNAVAILABLE || Date.now() >= deadline.getTime()) break;
      }
    }
    throw lastError;
  }

  /**
   * Pooled values of a batch of queries.
   * @param {string} tableId
   * @param {object} query
   * @param {ArrayLike<number>} query.indices [T * L] global row ids (row-major [T, L])
   * @param {ArrayLike<number>} query.blocks  [T * L] IVE block ids
   * @param {ArrayLike<number>} query.weights [T * L * h_c] per-core weights
   * @param {number} query.numTokens T
   * @param {ArrayLike<number>|ArrayLike<number>[]} [query.preInput] UltraMemV2 tables with
   *   pre-values only (`table(id).preVdim > 0`, required there): each token's `W_pre x`, flat
   *   [T * pre_vdim] (Float32Array or numbers) or [T][pre_vdim]; sent whole to every shard
   * @param {object} [opts]
   * @param {number} [opts.deadlineMs] deadline of the whole fan-out
   * @returns {Promise<{shape: number[], data: Float32Array}>} [T, E, Dv] (merged: [T, D])
   */
  async gather(tableId, { indices, blocks, weights, numTokens, preInput }, opts = {}) {
    const t = this.table(tableId);
    if (!Number.isInteger(numTokens) || numTokens < 0) throw new TypeError('numTokens must be an integer >= 0');
    const perQuery = numTokens === 0 ? 0 : indices.length / numTokens;
    if (!Number.isInteger(perQuery) || blocks.length !== indices.length) {
      throw new RangeError(`indices (${indices.length}) and blocks (${blocks.length}) must both be [T=${numTokens}, L]`);
    }
    if (weights.length !== indices.length * t.numCores) {
      throw new RangeError(`weights has ${weights.length} values; expected T * L * h_c = ${indices.length * t.numCores}`);
    }
    const pre = preInputArray(t, preInput, numTokens);
    const deadline = new Date(Date.now() + (opts.deadlineMs ?? this.deadlineMs));
    const idsType = t.nRows <= INT32_MAX ? 'DTYPE_INT32' : 'DTYPE_INT64';
    const base = { table_id: tableId, table_version: this.version };
    if (pre) base.pre_input = encodeTensor(pre, [numTokens, t.preVdim], 'DTYPE_FLOAT32');
    const shape = this.outShape(t, numTokens);
    const rows = t.merged ? numTokens : numTokens * t.expansion;

    if (t.sharding === 'row' && this.numShards > 1) {
      const parts = splitRows(indices, blocks, weights, numTokens, perQuery, t.numCores, t.rows.map((r) => r[0]));
      const calls = parts.map((p, k) => (p === null ? null : this.call(k, 'Gather', {
        ...base,
        indices: encodeTensor(p.indices, [p.fill], idsType),
        offsets: encodeTensor(p.offsets, [numTokens + 1], 'DTYPE_INT32'),
        blocks: encodeTensor(p.blocks, [p.fill], 'DTYPE_INT32'),
        weights: encodeTensor(p.weights, [p.fill, t.numCores], 'DTYPE_FLOAT32'),
      }, deadline).then((reply) => this.check(reply, k, t, shape))));
      const partials = await Promise.all(calls.filter(Boolean));
      const data = new Float32Array(product(shape));
      for (const p of partials) for (let i = 0; i < data.length; i += 1) data[i] += p.data[i];
      return { shape, data };
    }

    const request = {
      ...base,
      indices: encodeTensor(indices, [numTokens, perQuery], idsType),
      blocks: encodeTensor(blocks, [numTokens, perQuery], 'DTYPE_INT32'),
      weights: encodeTensor(weights, [numTokens, perQuery, t.numCores], 'DTYPE_FLOAT32'),
    };
    const slices = await Promise.all(this.replicas.map((_, k) => this.call(k, 'Gather', request, deadline)
      .then((reply) => {
        const [lo, hi] = t.cols[k];
        return { ...this.check(reply, k, t, this.outShape(t, numTokens, hi - lo)), width: hi - lo, colLo: lo };
      })));
    if (slices.length === 1) return { shape, data: slices[0].data };
    return { shape, data: concatColumns(slices, rows, t.outWidth) };
  }

  check(reply, k, t, want) {
    const where = this.numShards > 1 ? `shard ${k}` : this.replicas[k][0].target;
    if (reply.table_version !== this.version) {
      throw new GatherError(`${where} answered version ${reply.table_version}, requested ${this.version}`,
        { code: grpc.status.FAILED_PRECONDITION });
    }
    if (reply.shard_index !== k || reply.table_id !== t.tableId) {
      throw new GatherError(`${where} answered as shard ${reply.shard_index} for table ${reply.table_id}`);
    }
    const pooled = decodeFloat32(reply.pooled);
    if (pooled.shape.join(',') !== want.join(',')) {
      throw new GatherError(`${where} sent shape [${pooled.shape}], expected [${want}]`);
    }
    return pooled;
  }

  /** The Info reply of every shard (first replica), in shard order. */
  infos() {
    return this.replicas.map((r) => r[0].info);
  }

  close() {
    for (const reps of this.replicas) for (const r of reps) r.stub.close();
  }
}

module.exports = {
  GatherPoolClient, GatherError, splitRows, concatColumns, preInputArray, status: grpc.status,
};
