'use strict';
// Loads the ultramem.v1 wire contract straight from the repository's proto/ directory (no
// generated code): the .proto file is the single source of truth for every runtime.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const DEFAULT_PROTO_ROOT = path.resolve(__dirname, '..', '..', '..', 'proto');
const PROTO_FILE = 'ultramem/v1/gather.proto';

// keepCase: field names exactly as in the .proto (table_id, row_lo, ...)
// longs: Number  -- int64/uint64 fields (shapes, n_rows, row ranges) become JS numbers; they are
//                   all far below 2^53 for any real table.
// enums: String  -- 'DTYPE_FLOAT32', 'SHARDING_ROW', ...
// defaults: true -- unset scalars read as 0 / '' / false, like every other protobuf runtime.
const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true };

const cache = new Map();

/**
 * The `ultramem.v1` package of the contract: `{ GatherPool, Tensor, ... }`.
 * @param {string} [protoRoot] directory holding `ultramem/v1/gather.proto`
 */
function loadContract(protoRoot = process.env.ULTRAMEM_PROTO_ROOT || DEFAULT_PROTO_ROOT) {
  if (!cache.has(protoRoot)) {
    const definition = protoLoader.loadSync(PROTO_FILE, { ...LOADER_OPTIONS, includeDirs: [protoRoot] });
    cache.set(protoRoot, grpc.loadPackageDefinition(definition).ultramem.v1);
  }
  return cache.get(protoRoot);
}

module.exports = { loadContract, DEFAULT_PROTO_ROOT, PROTO_FILE };
