'use strict';
// ultramem.v1.Tensor <-> typed arrays. Tensors travel as raw little-endian bytes + dtype + shape.

const os = require('node:os');

if (os.endianness() !== 'LE') {
  throw new Error('ultramem-gather-client assumes a little-endian host (the wire format is LE)');
}

const ARRAY_OF = {
  DTYPE_FLOAT32: Float32Array,
  DTYPE_INT32: Int32Array,
  DTYPE_INT64: BigInt64Array,
};

function product(shape) {
  return shape.reduce((a, b) => a * b, 1);
}

/**
 * A Tensor message from a typed array (or a plain array of numbers) and its shape.
 * @param {ArrayLike<number>|ArrayBufferView} values
 * @param {number[]} shape
 * @param {'DTYPE_FLOAT32'|'DTYPE_INT32'|'DTYPE_INT64'} dtype
 */
function encodeTensor(values, shape, dtype) {
  const Ctor = ARRAY_OF[dtype];
  if (!Ctor) throw new TypeError(`cannot encode dtype ${dtype}`);
  let array = values;
  if (!(values instanceof Ctor)) {
    array = dtype === 'DTYPE_INT64' ? Ctor.from(values, (v) => BigInt(v)) : Ctor.from(values);
  }
  if (array.length !== product(shape)) {
    throw new RangeError(`${array.length} values do not fill shape [${shape}]`);
  }
  return {
    dtype,
    shape: shape.slice(),
    data: Buffer.from(array.buffer, array.byteOffset, array.byteLength),
  };
}

/** A float32 Tensor message as `{ shape, data: Float32Array }` (the bytes are copied). */
function decodeFloat32(tensor) {
  if (tensor.dtype !== 'DTYPE_FLOAT32') {
    throw new TypeError(`expected a DTYPE_FLOAT32 tensor, got ${tensor.dtype}`);
  }
  const shape = tensor.shape.map(Number);
  const n = product(shape);
  if (tensor.data.length !== n * 4) {
    throw new RangeError(`${tensor.data.length} bytes for float32 shape [${shape}]`);
  }
  const data = new Float32Array(n);
  new Uint8Array(data.buffer).set(tensor.data); // copy: the Buffer may not be 4-byte aligned
  return { shape, data };
}

module.exports = { encodeTensor, decodeFloat32, product };
