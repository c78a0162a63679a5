/* A lookup batch's entries on either side of the wire (the numpy code they replace computes the
 * same, and is what runs without a C compiler):
 *
 *  - um_split_rows (client, ../../client/router.py split_arrays): group a batch by owning row
 *    shard, ids narrowed to int32.
 *  - um_check_entries (shard, ../../serving/validate.py decode_request): check every value of a
 *    decoded request and convert it to the kernel's int64 local rows in one pass.
 *
 * On a 2-core VM each numpy call between model blocks is a cold-cache Python round trip; these
 * replace a few dozen of them per request with one C call each.
 */
#include <stdint.h>
#include <string.h>

#define UM_SPLIT_MAX_SHARDS 256

/* um_split_rows: entry l (of the token whose CSR range holds it) goes to the shard owning row
 * ids[l]: the last k with row_lo[k] <= ids[l] (ids below 0 go to shard 0, ids past the table to
 * the last shard: the owner refuses them, the client never drops them). A stable counting sort
 * by owner puts every shard's entries side by side, in token order, in one output array per
 * field, so each shard's request is a contiguous slice:
 *
 *   ids_out / blk_out   int32   [nnz]        (narrowed; -1 is returned if a value does not fit)
 *   w_out               float32 [nnz, hc]
 *   starts              int64   [S + 1]      shard k owns entries starts[k] .. starts[k + 1]
 *   offs_out            int32   [S, T + 1]   CSR offsets of shard k's entries per token
 */

static inline int64_t um_owner(int64_t id, const int64_t *row_lo, int64_t S) {
    int64_t k = 0; /* branch-free: ids are random, a data-dependent branch mispredicts */
    for (int64_t j = 1; j < S; j++) k += row_lo[j] <= id;
    return k;
}

/* Returns 0; -1 when an id or block id does not fit int32 (send int64 instead); -2 bad
 * arguments (S outside [1, UM_SPLIT_MAX_SHARDS], offsets not ascending from 0). */
int32_t um_split_rows(const int64_t *ids, const int64_t *blk, const float *w, int64_t hc,
                      const int64_t *tok_off, int64_t T, const int64_t *row_lo, int64_t S,
                      int32_t *ids_out, int32_t *blk_out, float *w_out, int64_t *starts,
                      int32_t *offs_out) {
    if (S < 1 || S > UM_SPLIT_MAX_SHARDS || T < 0 || tok_off[0] != 0) return -2;
    const int64_t nnz = tok_off[T];
    if (nnz > INT32_MAX) return -2;
    int64_t count[UM_SPLIT_MAX_SHARDS];
    memset(count, 0, sizeof(int64_t) * (size_t)S);
    /* pass 1: range checks, per-shard totals and per-token CSR counts */
    for (int64_t t = 0; t < T; t++) {
        const int64_t l0 = tok_off[t], l1 = tok_off[t + 1];
        if (l1 < l0 || l1 > nnz) return -2;
        for (int64_t l = l0; l < l1; l++) {
            if (ids[l] < INT32_MIN || ids[l] > INT32_MAX) return -1;
            if (blk[l] < INT32_MIN || blk[l] > INT32_MAX) return -1;
            count[um_owner(ids[l], row_lo, S)]++;
        }
        for (int64_t k = 0; k < S; k++) offs_out[k * (T + 1) + t + 1] = (int32_t)count[k];
    }
    int64_t pos[UM_SPLIT_MAX_SHARDS];
    starts[0] = 0;
    for (int64_t k = 0; k < S; k++) {
        offs_out[k * (T + 1)] = 0;
        pos[k] = starts[k];
        starts[k + 1] = starts[k] + count[k];
    }
    if (S == 1) { /* one shard: a narrowing copy */
        for (int64_t l = 0; l < nnz; l++) {
            ids_out[l] = (int32_t)ids[l];
            blk_out[l] = (int32_t)blk[l];
        }
        memcpy(w_out, w, sizeof(float) * (size_t)(nnz * hc));
        return 0;
    }
    /* pass 2: scatter, keeping token order within every shard */
    for (int64_t l = 0; l < nnz; l++) {
        const int64_t p = pos[um_owner(ids[l], row_lo, S)]++;
        ids_out[p] = (int32_t)ids[l];
        blk_out[p] = (int32_t)blk[l];
        for (int64_t c = 0; c < hc; c++) w_out[p * hc + c] = w[l * hc + c];
    }
    return 0;
}

/* um_check_entries: the value checks of a decoded request, in the order the numpy validation
 * makes them (weights finite, block ids in [0, E), row ids in [row_lo, row_hi)), and the
 * kernel's inputs: local_out[l] = ids[l] - row_lo, blk_out[l] = blk[l]; for a merged table
 * (merged_rows > 0: one physical row per (block, row) pair) local_out[l] = ids[l] - row_lo +
 * blk[l] * merged_rows and blk_out[l] = 0. ids and blk are int32 (*_64 = 0) or int64.
 * Returns 0, or which check failed first: 1 a non-finite weight, 2 a block id, 3 a row id
 * (the caller words the error; outputs are then unspecified). */
int32_t um_check_entries(const void *ids, int32_t ids_64, const void *blk, int32_t blk_64,
                         const float *w, int64_t nnz, int64_t ncores, int64_t row_lo,
                         int64_t row_hi, int64_t E, int64_t merged_rows, int64_t *local_out,
                         int64_t *blk_out) {
    uint32_t inf_bits = 0; /* any weight with an all-ones exponent (Inf or NaN) */
    for (int64_t i = 0; i < nnz * ncores; i++) {
        uint32_t u;
        memcpy(&u, w + i, sizeof u);
        inf_bits |= (u & 0x7f800000u) == 0x7f800000u;
    }
    if (inf_bits) return 1;
    uint64_t bad_blk = 0, bad_row = 0;
    const uint64_t span = (uint64_t)(row_hi - row_lo);
    for (int64_t l = 0; l < nnz; l++) {
        /* unsigned: a bad value wraps (defined) instead of overflowing; negatives become huge */
        const uint64_t b = (uint64_t)(blk_64 ? ((const int64_t *)blk)[l] : ((const int32_t *)blk)[l]);
        const uint64_t r =
            (uint64_t)(ids_64 ? ((const int64_t *)ids)[l] : ((const int32_t *)ids)[l]) - (uint64_t)row_lo;
        bad_blk |= b >= (uint64_t)E;
        bad_row |= r >= span;
        local_out[l] = (int64_t)(merged_rows ? r + b * (uint64_t)merged_rows : r);
        blk_out[l] = merged_rows ? 0 : (int64_t)b;
    }
    return bad_blk ? 2 : bad_row ? 3 : 0;
}
