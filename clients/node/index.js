'use strict';
// ultramem-gather-client: call the ultramem.v1.GatherPool service from Node.js.
//
//   const { GatherPoolClient } = require('ultramem-gather-client');
//   const client = await GatherPoolClient.connect('127.0.0.1:7100');          // a router, or
//   const direct = await GatherPoolClient.connect('10.0.0.1:7000,10.0.0.2:7000'); // the shards
//   const { shape, data } = await client.gather('mem0', { indices, blocks, weights, numTokens });
//   // UltraMemV2 (client.table('shared').preVdim > 0): also each token's pre-value input
//   await client.gather('shared', { indices, blocks, weights, numTokens, preInput });

const {
  GatherPoolClient, GatherError, splitRows, concatColumns, preInputArray, status,
} = require('./lib/client');
const { loadContract, DEFAULT_PROTO_ROOT } = require('./lib/proto');
const { encodeTensor, decodeFloat32 } = require('./lib/tensor');

module.exports = {
  GatherPoolClient,
  GatherError,
  status,
  loadContract,
  DEFAULT_PROTO_ROOT,
  encodeTensor,
  decodeFloat32,
  splitRows,
  concatColumns,
  preInputArray,
};
