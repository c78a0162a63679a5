#!/usr/bin/env node
'use strict';
// A lookup from Node.js: node examples/lookup.js HOST:PORT[,HOST:PORT...] [TABLE]
//
// Connects to a router or to the shards (layout read from Info), sends two random queries to
// TABLE (default: the first table) and prints the pooled output's shape and first values.
// Start a server first, e.g. `ultramem-dist serve-shard STORE --shard 0 --port 7000`.

const { GatherPoolClient, GatherError } = require('..');

async function main() {
  const [targets, tableArg] = process.argv.slice(2);
  if (!targets) {
    console.error('usage: node examples/lookup.js HOST:PORT[,HOST:PORT...] [TABLE]');
    process.exit(2);
  }
  const client = await GatherPoolClient.connect(targets, { connectTimeoutMs: 5000 });
  try {
    const tableId = tableArg || Object.keys(client.tables)[0];
    const t = client.table(tableId);
    const T = 2;
    const L = t.heads * t.topm;
    const { shape, data } = await client.gather(tableId, {
      indices: Int32Array.from({ length: T * L }, () => Math.floor(Math.random() * t.nRows)),
      blocks: Int32Array.from({ length: T * L }, () => Math.floor(Math.random() * t.expansion)),
      weights: Float32Array.from({ length: T * L * t.numCores }, () => Math.random()),
      numTokens: T,
    }, { deadlineMs: 2000 });
    console.log(`version ${client.version}, table ${tableId} (${t.sharding}): shape [${shape}]`);
    console.log(`first values: ${Array.from(data.slice(0, 4), (v) => v.toFixed(4)).join(' ')}`);
  } finally {
    client.close();
  }
}

main().catch((err) => {
  console.error(`error: ${err.message}${err instanceof GatherError ? ` (gRPC code ${err.code})` : ''}`);
  process.exit(1);
});
