/* The shard's fast path for GatherStream messages: read a StreamGatherRequest straight from its
 * wire bytes, check it, and pool it into the reply's data area, without building protobuf
 * objects or numpy views in Python (../../serving/wire.py drives it).
 *
 * It is only ever a shortcut. um_wire_parse accepts the plain encoding every protobuf library
 * writes (each known field once, with its declared wire type, strings in ASCII, shapes packed,
 * at most 4 dims) and um_wire_gather only a request the general path would answer; for anything
 * else they return nonzero and the caller parses the message with the generated protobuf code
 * and answers it (or words its error) the general way. So the contract stays
 * proto/ultramem/v1/gather.proto, and every refusal keeps its status and message.
 *
 * Field numbers (gather.proto):
 *   StreamGatherRequest { uint64 request_id = 1; GatherRequest gather = 2; uint64 timeout_us = 3; }
 *   GatherRequest { string table_id = 1; string table_version = 2; Tensor indices = 3;
 *                   Tensor offsets = 4; Tensor blocks = 5; Tensor weights = 6; }
 *   Tensor { DType dtype = 1; repeated int64 shape = 2; bytes data = 3; }
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* the kernel and the value checks of the same library */
int32_t um_gather_pool(const void *table, int32_t dtype, int64_t rows, int64_t row_stride,
                       int64_t cols, const int64_t *idx, const int64_t *blk, const float *w,
                       int64_t ncores, const int64_t *tok_off, int64_t T, int64_t E,
                       const int32_t *seg, int64_t nseg, int32_t sum_segments, float *out,
                       int64_t out_cols, int32_t nthreads, int64_t *bad);
int32_t um_check_entries(const void *ids, int32_t ids_64, const void *blk, int32_t blk_64,
                         const float *w, int64_t nnz, int64_t ncores, int64_t row_lo,
                         int64_t row_hi, int64_t E, int64_t merged_rows, int64_t *local_out,
                         int64_t *blk_out);

/* parse result: int64 slots */
enum {
    W_REQUEST_ID, W_TIMEOUT_US, W_GATHER_LEN,
    W_TABLE_OFF, W_TABLE_LEN, W_VERSION_OFF, W_VERSION_LEN,
    W_TENSORS, /* 4 tensors (indices, offsets, blocks, weights) x W_TENSOR slots */
};
enum { T_PRESENT, T_DTYPE, T_NDIM, T_DIMS, T_DATA_OFF = T_DIMS + 4, T_DATA_LEN, W_TENSOR };
#define W_SLOTS (W_TENSORS + 4 * W_TENSOR)
enum { TEN_INDICES, TEN_OFFSETS, TEN_BLOCKS, TEN_WEIGHTS };
enum { DT_FLOAT32 = 1, DT_INT64 = 4, DT_INT32 = 5 };

int32_t um_wire_slots(void) { return W_SLOTS; }

/* a varint at p (< end): its value, and p moved past it; 0 on a malformed one */
static int um_varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    uint64_t x = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        const uint8_t b = *(*p)++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return 1;
        }
    }
    return 0;
}

/* a length-delimited field's body: [*p, *p + n) inside [*p, end) */
static int um_body(const uint8_t **p, const uint8_t *end, uint64_t *n) {
    return um_varint(p, end, n) && *n <= (uint64_t)(end - *p);
}

static int um_ascii(const uint8_t *s, uint64_t n) {
    for (uint64_t i = 0; i < n; i++)
        if (s[i] & 0x80) return 0;
    return 1;
}

static int um_tensor(const uint8_t *base, const uint8_t *p, const uint8_t *end, int64_t *t) {
    uint32_t seen = 0;
    t[T_PRESENT] = 1;
    while (p < end) {
        uint64_t key, v, n;
        if (!um_varint(&p, end, &key) || key >> 3 > 3 || (seen >> (key >> 3) & 1)) return 0;
        seen |= 1u << (key >> 3);
        switch (key) {
        case (1 << 3) | 0: /* dtype */
            if (!um_varint(&p, end, &v) || v > 64) return 0;
            t[T_DTYPE] = (int64_t)v;
            break;
        case (2 << 3) | 2: { /* shape, packed */
            if (!um_body(&p, end, &n)) return 0;
            const uint8_t *q = p, *qe = p + n;
            int64_t nd = 0;
            while (q < qe) {
                if (nd == 4 || !um_varint(&q, qe, &v) || v > (uint64_t)INT32_MAX) return 0;
                t[T_DIMS + nd++] = (int64_t)v;
            }
            t[T_NDIM] = nd;
            p = qe;
            break;
        }
        case (3 << 3) | 2: /* data */
            if (!um_body(&p, end, &n)) return 0;
            t[T_DATA_OFF] = p - base;
            t[T_DATA_LEN] = (int64_t)n;
            p += n;
            break;
        default:
            return 0;
        }
    }
    return 1;
}

static int um_gather_request(const uint8_t *base, const uint8_t *p, const uint8_t *end,
                             int64_t *out) {
    uint32_t seen = 0;
    while (p < end) {
        uint64_t key, n;
        if (!um_varint(&p, end, &key) || (key & 7) != 2) return 0;
        const uint64_t field = key >> 3;
        if (field < 1 || field > 6 || (seen >> field & 1) || !um_body(&p, end, &n)) return 0;
        seen |= 1u << field;
        if (field <= 2) {
            if (!um_ascii(p, n)) return 0;
            out[field == 1 ? W_TABLE_OFF : W_VERSION_OFF] = p - base;
            out[field == 1 ? W_TABLE_LEN : W_VERSION_LEN] = (int64_t)n;
        } else {
            static const int which[7] = {0, 0, 0, TEN_INDICES, TEN_OFFSETS, TEN_BLOCKS, TEN_WEIGHTS};
            if (!um_tensor(base, p, p + n, out + W_TENSORS + which[field] * W_TENSOR)) return 0;
        }
        p += n;
    }
    return 1;
}

/* 0: buf is a StreamGatherRequest in the plain encoding, its fields in out[W_SLOTS]; 1: take
 * the general path. */
int32_t um_wire_parse(const uint8_t *buf, int64_t len, int64_t *out) {
    memset(out, 0, sizeof(int64_t) * W_SLOTS);
    const uint8_t *p = buf, *end = buf + len;
    uint32_t seen = 0;
    while (p < end) {
        uint64_t key, v, n;
        if (!um_varint(&p, end, &key)) return 1;
        const uint64_t field = key >> 3;
        if (field < 1 || field > 3 || (seen >> field & 1)) return 1;
        seen |= 1u << field;
        if (key == ((1 << 3) | 0) || key == ((3 << 3) | 0)) {
            if (!um_varint(&p, end, &v)) return 1;
            out[field == 1 ? W_REQUEST_ID : W_TIMEOUT_US] = (int64_t)v; /* uint64 bits */
        } else if (key == ((2 << 3) | 2)) {
            if (!um_body(&p, end, &n) || !um_gather_request(buf, p, p + n, out)) return 1;
            out[W_GATHER_LEN] = (int64_t)n;
            p += n;
        } else {
            return 1;
        }
    }
    return (seen >> 2 & 1) ? 0 : 1; /* no gather: the general path words it */
}

/* um_wire_parse for a bare GatherRequest (a unary Gather's bytes): the same slots, no request
 * id or timeout. */
int32_t um_wire_parse_gather(const uint8_t *buf, int64_t len, int64_t *out) {
    memset(out, 0, sizeof(int64_t) * W_SLOTS);
    out[W_GATHER_LEN] = len;
    return um_gather_request(buf, buf, buf + len, out) ? 0 : 1;
}

static int64_t um_itemsize(int64_t dtype) {
    return dtype == DT_FLOAT32 || dtype == DT_INT32 ? 4 : dtype == DT_INT64 ? 8 : 0;
}

/* numel of a present tensor whose data length matches its shape; -1 otherwise */
static int64_t um_numel(const int64_t *t, int64_t limit) {
    if (!t[T_PRESENT]) return -1;
    int64_t n = 1;
    for (int64_t d = 0; d < t[T_NDIM]; d++) {
        if (t[T_DIMS + d] > limit) return -1; /* (each dim <= INT32_MAX: no overflow below) */
        n *= t[T_DIMS + d];
        if (n > limit) return -1;
    }
    const int64_t size = um_itemsize(t[T_DTYPE]);
    return size && t[T_DATA_LEN] == n * size ? n : -1;
}

static int um_int_dtype(int64_t dtype) { return dtype == DT_INT32 || dtype == DT_INT64; }

static int64_t um_int_at(const uint8_t *p, int64_t dtype, int64_t i) {
    if (dtype == DT_INT64) {
        int64_t v;
        memcpy(&v, p + 8 * i, sizeof v);
        return v;
    }
    int32_t v;
    memcpy(&v, p + 4 * i, sizeof v);
    return v;
}

/* The number of queries of a parsed request (what the caller sizes the reply with); -1 when
 * the request is not one the fast path answers. */
int64_t um_wire_tokens(const int64_t *parsed) {
    const int64_t *ind = parsed + W_TENSORS + TEN_INDICES * W_TENSOR;
    const int64_t *off = parsed + W_TENSORS + TEN_OFFSETS * W_TENSOR;
    if (off[T_PRESENT]) return off[T_NDIM] == 1 && off[T_DIMS] >= 1 ? off[T_DIMS] - 1 : -1;
    return ind[T_PRESENT] && ind[T_NDIM] == 2 ? ind[T_DIMS] : -1;
}

/* Check a parsed request against the served table and the server's limits, and pool it into
 * out ([T, out_blocks, out_cols] float32, T = um_wire_tokens) with up to nthreads threads,
 * one per `grain` bytes of rows read. Returns 0 when answered; 1 when
 * the general path must take it (a refusal, or anything unusual); -5 out of memory. *entries
 * gets the number of lookup entries. */
int32_t um_wire_gather(const uint8_t *buf, const int64_t *parsed, const void *table,
                       int32_t dtype, int64_t rows, int64_t row_stride, int64_t cols,
                       const int32_t *seg, int64_t nseg, int32_t sum_segments, int64_t out_cols,
                       int64_t ncores, int64_t E, int64_t row_lo, int64_t row_hi,
                       int64_t merged_rows, int64_t max_batch, int64_t max_per_query,
                       int32_t nthreads, int64_t grain, float *out, int64_t *entries) {
    const int64_t *ind = parsed + W_TENSORS + TEN_INDICES * W_TENSOR;
    const int64_t *off = parsed + W_TENSORS + TEN_OFFSETS * W_TENSOR;
    const int64_t *blk = parsed + W_TENSORS + TEN_BLOCKS * W_TENSOR;
    const int64_t *wts = parsed + W_TENSORS + TEN_WEIGHTS * W_TENSOR;
    const int64_t max_nnz = max_batch * max_per_query;
    const int64_t T = um_wire_tokens(parsed);
    const int64_t nnz = um_numel(ind, max_nnz);
    if (T < 0 || T > max_batch || nnz < 0 || !um_int_dtype(ind[T_DTYPE])) return 1;
    const int ragged = off[T_PRESENT] != 0;
    if (ragged ? ind[T_NDIM] != 1 : (ind[T_NDIM] != 2 || ind[T_DIMS + 1] > max_per_query))
        return 1;
    /* blocks shaped like indices; weights like indices plus h_c */
    if (um_numel(blk, max_nnz) != nnz || !um_int_dtype(blk[T_DTYPE]) || blk[T_NDIM] != ind[T_NDIM])
        return 1;
    if (um_numel(wts, max_nnz * ncores) != nnz * ncores || wts[T_DTYPE] != DT_FLOAT32 ||
        wts[T_NDIM] != ind[T_NDIM] + 1 || wts[T_DIMS + ind[T_NDIM]] != ncores)
        return 1;
    for (int64_t d = 0; d < ind[T_NDIM]; d++)
        if (blk[T_DIMS + d] != ind[T_DIMS + d] || wts[T_DIMS + d] != ind[T_DIMS + d]) return 1;
    if (ragged && (um_numel(off, max_batch + 1) != T + 1 || !um_int_dtype(off[T_DTYPE])))
        return 1;
    *entries = nnz;
    /* a kernel thread per `grain` bytes of rows read, as NativePlan.run decides it */
    const int64_t cap = 1 + nnz * cols * (dtype == 0 ? 4 : 2) / (grain > 0 ? grain : 1);
    if (nthreads > cap) nthreads = (int32_t)cap;

    int64_t *tok_off = malloc(sizeof(int64_t) * (size_t)(T + 1));
    int64_t *local = malloc(sizeof(int64_t) * (size_t)(nnz + 1));
    int64_t *bl = malloc(sizeof(int64_t) * (size_t)(nnz + 1));
    float *w = malloc(sizeof(float) * (size_t)(nnz * ncores + 1));
    void *ids = malloc((size_t)(ind[T_DATA_LEN] + 1)), *bk = malloc((size_t)(blk[T_DATA_LEN] + 1));
    int32_t rc = -5;
    if (!tok_off || !local || !bl || !w || !ids || !bk) goto done;
    rc = 1;
    if (ragged) { /* CSR from 0 to nnz, non-decreasing, at most max_per_query per query */
        const uint8_t *op = buf + off[T_DATA_OFF];
        for (int64_t t = 0; t <= T; t++) tok_off[t] = um_int_at(op, off[T_DTYPE], t);
        if (tok_off[0] != 0 || tok_off[T] != nnz) goto done;
        for (int64_t t = 0; t < T; t++) {
            const int64_t n = tok_off[t + 1] - tok_off[t];
            if (n < 0 || n > max_per_query) goto done;
        }
    } else {
        for (int64_t t = 0; t <= T; t++) tok_off[t] = t * ind[T_DIMS + 1];
    }
    /* the wire's bytes may sit at any alignment: copy them into aligned arrays */
    memcpy(ids, buf + ind[T_DATA_OFF], (size_t)ind[T_DATA_LEN]);
    memcpy(bk, buf + blk[T_DATA_OFF], (size_t)blk[T_DATA_LEN]);
    memcpy(w, buf + wts[T_DATA_OFF], (size_t)wts[T_DATA_LEN]);
    if (um_check_entries(ids, ind[T_DTYPE] == DT_INT64, bk, blk[T_DTYPE] == DT_INT64, w, nnz,
                         ncores, row_lo, row_hi, E, merged_rows, local, bl))
        goto done;
    int64_t bad = 0;
    rc = um_gather_pool(table, dtype, rows, row_stride, cols, local, bl, w, ncores, tok_off, T,
                        merged_rows ? 1 : E, seg, nseg, sum_segments, out, out_cols, nthreads,
                        &bad) == 0 ? 0 : 1;
done:
    free(tok_off);
    free(local);
    free(bl);
    free(w);
    free(ids);
    free(bk);
    return rc;
}
