/* Native CPU path of ultramem-dist's gather-pool (see ../gather_pool.py for the math).
 *
 *   out[t, e, ocol(s) + j] = sum_{l of token t, block(l) = e} w[l, core(s)] * table[idx[l], lo(s) + j]
 *
 * for every column segment s = [lo, hi) scored by MCS core core(s), where ocol(s) = lo (segments
 * side by side) or 0 (sum_segments: merged tables, segments added).
 *
 * Per token, the entries are bucketed by IVE block (a counting sort that keeps request order);
 * per (token, block) bag and 64-column chunk, eight 8-float accumulators stay in registers while
 * the bag's rows stream through, so the loop body is loads + FMAs only.  For half tables, while a
 * token is pooled the rows of the next token are software-prefetched (spread over the token's
 * bags): widening costs 2-3 instructions per 8 values, which otherwise fill the out-of-order
 * window and cap the row misses in flight (fp32 rows: measured slower with it, so off).  Tokens are split over torch's OpenMP
 * threads (or pthreads in a build without OpenMP) by entry count.
 *
 * Built by ultramem_dist/kernels/native.py with the system C compiler on the machine that runs
 * it.  No ISA is assumed at build time: the portable code uses GCC/Clang vector extensions (any
 * target, any -march, also none), and on x86-64 a second copy of the kernel is compiled for
 * AVX2 + FMA + F16C through target attributes and chosen at run time with
 * __builtin_cpu_supports (bf16 -> fp32: zero-extend + shift 16; fp16 -> fp32: vcvtph2ps).
 * ULTRAMEM_NATIVE_ISA=generic forces the portable copy (tests compare both).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define UM_X86 1
#define UM_AVX2_ATTR __attribute__((target("avx2,fma,f16c")))
#else
#define UM_X86 0
#endif

#define UM_F32 0
#define UM_BF16 1
#define UM_F16 2
#define UM_MAX_THREADS 64
#define UM_ISA_GENERIC 0
#define UM_ISA_AVX2 1

typedef float v8f __attribute__((vector_size(32), aligned(4)));
typedef uint16_t v8u16 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));

typedef struct {
    const char *table;
    int32_t dtype;
    int64_t row_stride; /* elements */
    const int64_t *idx;
    const int64_t *blk;
    const float *w;
    int64_t ncores;
    const int64_t *tok_off;
    int64_t E;
    const int32_t *seg; /* nseg x (lo, hi, core) */
    int64_t nseg;
    int32_t sum_segments;
    float *out;
    int64_t out_cols;
    int64_t t0, t1; /* this job's tokens */
    int32_t failed;
    int64_t pf_lo, pf_bytes; /* byte range of a row the segments read (prefetched) */
    /* UltraMemV2 pre-values (pre == NULL: none): entry l of token t has its weights scaled by
     * act = GELU(pre[idx[l]] . pre_in[t]) (or the plain dot product with pre_gelu = 0) */
    const char *pre;
    int64_t pre_stride, pre_dim; /* elements; pre has the table's dtype */
    const float *pre_in;         /* [T, pre_dim] */
    int32_t pre_gelu;
} um_job;

/* Portable loaders: vector extensions only (what the compiler makes of them depends on the
 * build's -march; correct everywhere). */
static inline v8f um_load_f32(const float *p) { return *(const v8f *)p; }
static inline float um_scalar_f32(const float *p) { return *p; }

static inline v8f um_load_bf16(const uint16_t *p) {
    v8u32 u = __builtin_convertvector(*(const v8u16 *)p, v8u32) << 16;
    v8f f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline float um_scalar_bf16(const uint16_t *p) {
    uint32_t u = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#if defined(__FLT16_MAX__)
#define UM_HAS_F16 1
typedef _Float16 v8h __attribute__((vector_size(16), aligned(2)));
static inline v8f um_load_f16(const _Float16 *p) { return __builtin_convertvector(*(const v8h *)p, v8f); }
static inline float um_scalar_f16(const _Float16 *p) { return (float)*p; }
#else
#define UM_HAS_F16 0
#endif

#if UM_X86
/* AVX2 loaders, compiled for that target whatever the build flags; only called after
 * __builtin_cpu_supports says the CPU has it. */
static inline __attribute__((always_inline)) UM_AVX2_ATTR v8f um_load_avx2_f32(const float *p) {
    __m256 f = _mm256_loadu_ps(p);
    v8f out;
    memcpy(&out, &f, sizeof out);
    return out;
}
static inline __attribute__((always_inline)) UM_AVX2_ATTR v8f um_load_avx2_bf16(const uint16_t *p) {
    __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
    v8f f;
    memcpy(&f, &u, sizeof f);
    return f;
}
#if UM_HAS_F16
static inline __attribute__((always_inline)) UM_AVX2_ATTR v8f um_load_avx2_f16(const _Float16 *p) {
    __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    v8f out;
    memcpy(&out, &f, sizeof out);
    return out;
}
#endif
#endif

static int32_t um_prefetch_on = 1;

/* Software prefetch of the next token's rows (half tables) on (1, the default) or off (0);
 * returns the old setting.  For benchmarks/kernel_limit.py, which times both in one run. */
int32_t um_set_prefetch(int32_t on) {
    return __atomic_exchange_n(&um_prefetch_on, on ? 1 : 0, __ATOMIC_RELAXED);
}

/* Prefetch the rows of entries [a, b) (the byte range the segments read). */
static inline __attribute__((always_inline)) void um_prefetch(const um_job *j, size_t item,
                                                              int64_t a, int64_t b) {
    for (int64_t l = a; l < b; l++) {
        const char *r = j->table + (size_t)(j->idx[l] * j->row_stride) * item + j->pf_lo;
        const char *e = r + j->pf_bytes;
        for (r -= (uintptr_t)r & 63; r < e; r += 64) __builtin_prefetch(r, 0, 3);
        if (j->pre) __builtin_prefetch(j->pre + (size_t)(j->idx[l] * j->pre_stride) * item, 0, 3);
    }
}

/* One bag (n entries, rows rows[k] with weights wts[k]) over columns [c0, c0 + width) of the
 * table, written (add = 0) or added (add = 1) to o[0 .. width). */
#define UM_DEFINE_BAG(NAME, T, LOAD, SCALAR, ATTR)                                            \
    /* act = GELU(p . q) over n columns (pre_gelu = 0: the dot product itself) */              \
    static inline __attribute__((always_inline)) ATTR float um_pre_act_##NAME(                \
        const T *p, const float *q, int64_t n, int32_t use_gelu) {                            \
        v8f a = {0};                                                                          \
        int64_t c = 0;                                                                        \
        for (; c + 8 <= n; c += 8) a += LOAD(p + c) * um_load_f32(q + c);                     \
        float d = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));          \
        for (; c < n; c++) d += SCALAR(p + c) * q[c];                                         \
        return use_gelu ? 0.5f * d * (1.0f + erff(d * 0.70710678118654752f)) : d;            \
    }                                                                                         \
    static inline __attribute__((always_inline)) ATTR void um_bag_##NAME(                     \
        const T *const *rows, const float *wts, int64_t n, int64_t c0, int64_t width,         \
        float *o, int add) {                                                                  \
        int64_t c = 0;                                                                        \
        for (; c + 64 <= width; c += 64) {                                                    \
            v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0}; \
            for (int64_t k = 0; k < n; k++) {                                                 \
                const T *x = rows[k] + c0 + c;                                                \
                const float s = wts[k];                                                       \
                a0 += s * LOAD(x);                                                            \
                a1 += s * LOAD(x + 8);                                                        \
                a2 += s * LOAD(x + 16);                                                       \
                a3 += s * LOAD(x + 24);                                                       \
                a4 += s * LOAD(x + 32);                                                       \
                a5 += s * LOAD(x + 40);                                                       \
                a6 += s * LOAD(x + 48);                                                       \
                a7 += s * LOAD(x + 56);                                                       \
            }                                                                                 \
            v8f *ov = (v8f *)(o + c);                                                         \
            if (add) {                                                                        \
                ov[0] += a0; ov[1] += a1; ov[2] += a2; ov[3] += a3;                           \
                ov[4] += a4; ov[5] += a5; ov[6] += a6; ov[7] += a7;                           \
            } else {                                                                          \
                ov[0] = a0; ov[1] = a1; ov[2] = a2; ov[3] = a3;                               \
                ov[4] = a4; ov[5] = a5; ov[6] = a6; ov[7] = a7;                               \
            }                                                                                 \
        }                                                                                     \
        for (; c + 8 <= width; c += 8) {                                                      \
            v8f a = {0};                                                                      \
            for (int64_t k = 0; k < n; k++) a += wts[k] * LOAD(rows[k] + c0 + c);            \
            v8f *ov = (v8f *)(o + c);                                                         \
            *ov = add ? *ov + a : a;                                                          \
        }                                                                                     \
        for (; c < width; c++) {                                                              \
            float a = 0;                                                                      \
            for (int64_t k = 0; k < n; k++) a += wts[k] * SCALAR(rows[k] + c0 + c);          \
            o[c] = add ? o[c] + a : a;                                                        \
        }                                                                                     \
    }

/* Tokens [t0, t1) of a job: bucket each token's entries by block, then pool every bag; before
 * bag e of token t, the next 1/E of token t + 1's rows are prefetched. */
#define UM_DEFINE_TOKENS(NAME, T, LOAD, SCALAR, ATTR)                                         \
    UM_DEFINE_BAG(NAME, T, LOAD, SCALAR, ATTR)                                                \
    static ATTR void um_tokens_##NAME(um_job *j, int64_t *count, int64_t *ord,                \
                                      const T **rows, float *wts, float *act) {               \
        const T *table = (const T *)j->table;                                                 \
        const T *pre = (const T *)j->pre;                                                     \
        /* half tables only: measured slower for fp32 rows, faster for half (kernel_limit) */ \
        const int prefetch = sizeof(T) == 2 && __atomic_load_n(&um_prefetch_on, __ATOMIC_RELAXED); \
        if (prefetch && j->t0 < j->t1) um_prefetch(j, sizeof(T), j->tok_off[j->t0], j->tok_off[j->t0 + 1]); \
        for (int64_t t = j->t0; t < j->t1; t++) {                                             \
            const int64_t l0 = j->tok_off[t], n = j->tok_off[t + 1] - l0;                     \
            /* next token's entries, prefetched a share per bag */                            \
            const int64_t p0 = t + 1 < j->t1 ? j->tok_off[t + 1] : 0;                         \
            const int64_t pn = t + 1 < j->t1 ? j->tok_off[t + 2] - p0 : 0;                    \
            int64_t pdone = 0;                                                                \
            float *ot = j->out + t * j->E * j->out_cols;                                      \
            memset(count, 0, sizeof(int64_t) * (size_t)(j->E + 1));                           \
            for (int64_t k = 0; k < n; k++) count[j->blk[l0 + k] + 1]++;                      \
            for (int64_t e = 0; e < j->E; e++) count[e + 1] += count[e];                      \
            for (int64_t k = 0; k < n; k++) ord[count[j->blk[l0 + k]]++] = l0 + k;            \
            if (pre) /* the pre-value activation of every entry of the token, before pooling */ \
                for (int64_t k = 0; k < n; k++)                                               \
                    act[k] = um_pre_act_##NAME(pre + j->idx[l0 + k] * j->pre_stride,          \
                                               j->pre_in + t * j->pre_dim, j->pre_dim,        \
                                               j->pre_gelu);                                  \
            /* count[e] is now the end of bag e; bag e is ord[start .. count[e]) */           \
            int64_t start = 0;                                                                \
            for (int64_t e = 0; e < j->E; e++) {                                              \
                const int64_t end = count[e], m = end - start;                                \
                float *ob = ot + e * j->out_cols;                                             \
                const int64_t pto = pn * (e + 1) / j->E;                                      \
                if (prefetch) um_prefetch(j, sizeof(T), p0 + pdone, p0 + pto);                \
                pdone = pto;                                                                  \
                if (m == 0) {                                                                 \
                    memset(ob, 0, sizeof(float) * (size_t)j->out_cols);                       \
                    continue;                                                                 \
                }                                                                             \
                for (int64_t k = 0; k < m; k++) rows[k] = table + j->idx[ord[start + k]] * j->row_stride; \
                for (int64_t s = 0; s < j->nseg; s++) {                                       \
                    const int64_t lo = j->seg[3 * s], hi = j->seg[3 * s + 1];                 \
                    const int64_t core = j->seg[3 * s + 2];                                   \
                    for (int64_t k = 0; k < m; k++) wts[k] = j->w[ord[start + k] * j->ncores + core]; \
                    if (pre)                                                                  \
                        for (int64_t k = 0; k < m; k++) wts[k] *= act[ord[start + k] - l0];   \
                    const int add = j->sum_segments && s > 0;                                 \
                    um_bag_##NAME(rows, wts, m, lo, hi - lo, ob + (j->sum_segments ? 0 : lo), add); \
                }                                                                             \
                start = end;                                                                  \
            }                                                                                 \
        }                                                                                     \
    }

#define UM_NOATTR
UM_DEFINE_TOKENS(f32, float, um_load_f32, um_scalar_f32, UM_NOATTR)
UM_DEFINE_TOKENS(bf16, uint16_t, um_load_bf16, um_scalar_bf16, UM_NOATTR)
#if UM_HAS_F16
UM_DEFINE_TOKENS(f16, _Float16, um_load_f16, um_scalar_f16, UM_NOATTR)
#endif
#if UM_X86
UM_DEFINE_TOKENS(avx2_f32, float, um_load_avx2_f32, um_scalar_f32, UM_AVX2_ATTR)
UM_DEFINE_TOKENS(avx2_bf16, uint16_t, um_load_avx2_bf16, um_scalar_bf16, UM_AVX2_ATTR)
#if UM_HAS_F16
UM_DEFINE_TOKENS(avx2_f16, _Float16, um_load_avx2_f16, um_scalar_f16, UM_AVX2_ATTR)
#endif
#endif

static int32_t um_isa_cached = -1;

/* The kernel copy this process runs: UM_ISA_AVX2 where the CPU has AVX2 + FMA + F16C (and
 * ULTRAMEM_NATIVE_ISA is not "generic"), else UM_ISA_GENERIC. */
int32_t um_isa(void) {
    int32_t isa = __atomic_load_n(&um_isa_cached, __ATOMIC_RELAXED);
    if (isa >= 0) return isa;
    isa = UM_ISA_GENERIC;
#if UM_X86
    const char *force = getenv("ULTRAMEM_NATIVE_ISA");
    __builtin_cpu_init();
    if (!(force && strcmp(force, "generic") == 0) && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        isa = UM_ISA_AVX2;
#endif
    __atomic_store_n(&um_isa_cached, isa, __ATOMIC_RELAXED);
    return isa;
}

static void *um_run(void *arg) {
    um_job *j = (um_job *)arg;
    int64_t longest = 0;
    for (int64_t t = j->t0; t < j->t1; t++) {
        int64_t n = j->tok_off[t + 1] - j->tok_off[t];
        if (n > longest) longest = n;
    }
    int64_t *count = malloc(sizeof(int64_t) * (size_t)(j->E + 1));
    int64_t *ord = malloc(sizeof(int64_t) * (size_t)(longest + 1));
    void **rows = malloc(sizeof(void *) * (size_t)(longest + 1));
    float *wts = malloc(sizeof(float) * (size_t)(longest + 1));
    float *act = malloc(sizeof(float) * (size_t)(longest + 1));
    const int avx2 = um_isa() == UM_ISA_AVX2;
    if (!count || !ord || !rows || !wts || !act) {
        j->failed = 1;
    } else {
        switch (j->dtype) {
        case UM_F32:
#if UM_X86
            if (avx2) { um_tokens_avx2_f32(j, count, ord, (const float **)rows, wts, act); break; }
#endif
            um_tokens_f32(j, count, ord, (const float **)rows, wts, act);
            break;
        case UM_BF16:
#if UM_X86
            if (avx2) { um_tokens_avx2_bf16(j, count, ord, (const uint16_t **)rows, wts, act); break; }
#endif
            um_tokens_bf16(j, count, ord, (const uint16_t **)rows, wts, act);
            break;
#if UM_HAS_F16
        case UM_F16:
#if UM_X86
            if (avx2) { um_tokens_avx2_f16(j, count, ord, (const _Float16 **)rows, wts, act); break; }
#endif
            um_tokens_f16(j, count, ord, (const _Float16 **)rows, wts, act);
            break;
#endif
        default: j->failed = 1; break;
        }
    }
    (void)avx2;
    free(count);
    free(ord);
    free(rows);
    free(wts);
    free(act);
    return NULL;
}

/* Which table dtypes this build supports (bit k = dtype k). */
int32_t um_dtypes(void) { return (1 << UM_F32) | (1 << UM_BF16) | (UM_HAS_F16 << UM_F16); }

typedef struct {
    const void *values;
    int64_t rows, stride, dim;
    const float *input;
    int32_t gelu;
} um_pre;

static int32_t um_gather_pool_impl(const void *table, int32_t dtype, int64_t rows,
                                   int64_t row_stride, int64_t cols, const int64_t *idx,
                                   const int64_t *blk, const float *w, int64_t ncores,
                                   const int64_t *tok_off, int64_t T, int64_t E,
                                   const int32_t *seg, int64_t nseg, int32_t sum_segments,
                                   float *out, int64_t out_cols, int32_t nthreads, int64_t *bad,
                                   const um_pre *pre) {
    if (dtype < 0 || dtype > 2 || !((um_dtypes() >> dtype) & 1)) return -4;
    if (pre && (pre->rows < rows || pre->dim < 1 || pre->stride < pre->dim)) return -6;
    const int64_t nnz = tok_off[T];
    for (int64_t l = 0; l < nnz; l++) {
        if (idx[l] < 0 || idx[l] >= rows) { *bad = l; return -1; }
        if (blk[l] < 0 || blk[l] >= E) { *bad = l; return -2; }
    }
    for (int64_t s = 0; s < nseg; s++) {
        int64_t lo = seg[3 * s], hi = seg[3 * s + 1], c = seg[3 * s + 2];
        int64_t olo = sum_segments ? 0 : lo, ohi = olo + (hi - lo);
        if (lo < 0 || hi > cols || lo >= hi || c < 0 || c >= ncores || ohi > out_cols) {
            *bad = s;
            return -3;
        }
    }
    int64_t clo = cols, chi = 0; /* columns any segment reads: prefetched per row */
    for (int64_t s = 0; s < nseg; s++) {
        if (seg[3 * s] < clo) clo = seg[3 * s];
        if (seg[3 * s + 1] > chi) chi = seg[3 * s + 1];
    }
    const int64_t item = dtype == UM_F32 ? 4 : 2;
    const int64_t pf_lo = nseg ? clo * item : 0;
    const int64_t pf_bytes = nseg ? (chi - clo) * item : 0;
    um_job base = {(const char *)table, dtype, row_stride, idx, blk, w, ncores, tok_off, E,
                   seg, nseg, sum_segments, out, out_cols, 0, T, 0, 0, 0, NULL, 0, 0, NULL, 0};
    base.pf_lo = pf_lo;
    base.pf_bytes = pf_bytes;
    if (pre) {
        base.pre = (const char *)pre->values;
        base.pre_stride = pre->stride;
        base.pre_dim = pre->dim;
        base.pre_in = pre->input;
        base.pre_gelu = pre->gelu;
    }
    if (nthreads > UM_MAX_THREADS) nthreads = UM_MAX_THREADS;
    if (nthreads > T) nthreads = (int32_t)T;
    if (nthreads < 1) nthreads = 1;
    um_job jobs[UM_MAX_THREADS];
    int64_t t = 0;
    for (int32_t k = 0; k < nthreads; k++) { /* contiguous token runs of ~nnz / n entries */
        jobs[k] = base;
        jobs[k].t0 = t;
        if (k == nthreads - 1) {
            t = T;
        } else {
            const int64_t target = nnz * (k + 1) / nthreads;
            while (t < T && tok_off[t + 1] <= target) t++;
        }
        jobs[k].t1 = t;
    }
#ifdef _OPENMP
    /* torch's own OpenMP pool (the library links the libgomp torch already loaded): no extra
     * threads competing with the ones torch keeps spinning between its parallel ops */
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int32_t k = 0; k < nthreads; k++)
        if (jobs[k].t0 < jobs[k].t1) um_run(&jobs[k]);
    int32_t failed = 0;
    for (int32_t k = 0; k < nthreads; k++) failed |= jobs[k].failed;
#else
    pthread_t th[UM_MAX_THREADS];
    int32_t started[UM_MAX_THREADS] = {0};
    for (int32_t k = 1; k < nthreads; k++)
        if (jobs[k].t0 < jobs[k].t1) started[k] = pthread_create(&th[k], NULL, um_run, &jobs[k]) == 0;
    um_run(&jobs[0]);
    int32_t failed = jobs[0].failed;
    for (int32_t k = 1; k < nthreads; k++) {
        if (started[k]) pthread_join(th[k], NULL);
        else if (jobs[k].t0 < jobs[k].t1) um_run(&jobs[k]); /* no thread: do it here */
        failed |= jobs[k].failed;
    }
#endif
    return failed ? -5 : 0;
}

/* Returns 0; -1 an index outside [0, rows); -2 a block outside [0, E); -3 a bad segment;
 * -4 an unsupported dtype; -5 out of memory.  (*bad names the entry / segment.)  The caller
 * validates requests first; these checks keep a bad call from reading outside the table. */
int32_t um_gather_pool(const void *table, int32_t dtype, int64_t rows, int64_t row_stride,
                       int64_t cols, const int64_t *idx, const int64_t *blk, const float *w,
                       int64_t ncores, const int64_t *tok_off, int64_t T, int64_t E,
                       const int32_t *seg, int64_t nseg, int32_t sum_segments, float *out,
                       int64_t out_cols, int32_t nthreads, int64_t *bad) {
    return um_gather_pool_impl(table, dtype, rows, row_stride, cols, idx, blk, w, ncores, tok_off,
                               T, E, seg, nseg, sum_segments, out, out_cols, nthreads, bad, NULL);
}

/* um_gather_pool for an UltraMemV2 table, in the same single pass: every entry's weights are
 * scaled by GELU(pre_values[idx] . pre_input[token]) (pre_gelu = 0: by the dot product) as its
 * token is pooled.  pre_values: [pre_rows >= rows, pre_stride] in the table's dtype, pre_dim
 * columns read; pre_input: float32 [T, pre_dim].  Returns as um_gather_pool, or -6 for a
 * pre-value table that does not fit. */
int32_t um_gather_pool_pre(const void *table, int32_t dtype, int64_t rows, int64_t row_stride,
                           int64_t cols, const int64_t *idx, const int64_t *blk, const float *w,
                           int64_t ncores, const int64_t *tok_off, int64_t T, int64_t E,
                           const int32_t *seg, int64_t nseg, int32_t sum_segments, float *out,
                           int64_t out_cols, int32_t nthreads, int64_t *bad,
                           const void *pre_values, int64_t pre_rows, int64_t pre_stride,
                           int64_t pre_dim, const float *pre_input, int32_t pre_gelu) {
    const um_pre pre = {pre_values, pre_rows, pre_stride, pre_dim, pre_input, pre_gelu};
    return um_gather_pool_impl(table, dtype, rows, row_stride, cols, idx, blk, w, ncores, tok_off,
                               T, E, seg, nseg, sum_segments, out, out_cols, nthreads, bad, &pre);
}
