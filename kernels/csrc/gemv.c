/* Matrix-vector products for decode on the CPU: y[m, n] = sum_k x[m, k] * w[n, k] (times scale[n] for int8), for a
 * few activation rows and weights stored int8, bfloat16 or float32 row-major [N, K].
 *
 * At batch 1 a decode step is a stream of weight bytes: the kernel is fast when it widens and multiplies weights as
 * fast as memory delivers them. Each output row keeps UNROLL independent accumulators (a fused multiply-add waits
 * ~4 cycles for its previous result), and up to MAX_ROWS activation rows share one read of a weight row.
 *
 * int8 weights multiply in integers where the CPU has AVX2: each activation row is first rounded to
 * int16 under one scale (x = scale * q, |q| <= 32767; the error, max|x_row| / 65534 per element, is 128x finer than
 * bfloat16's rounding), then `vpmaddwd` multiplies 16 weight-activation pairs per instruction into int32 sums,
 * which move into float sums every FLUSH_STEPS steps, long before they could overflow. Widening int8 to float
 * instead costs three instructions per 8 weights and cannot keep up with memory on one core. int4 weights (one row,
 * torch's CPU tile layout) multiply in integers too, against activations rounded to int8 per group (see below).
 * bfloat16 weights multiply in bfloat16 where the CPU has AVX512_BF16 (`vdpbf16ps`, 32 pairs per instruction,
 * activations rounded to bfloat16 as a bfloat16 model holds them), for up to BF16_ROWS rows per pass.
 *
 * The rest is GCC vector extensions, so one source builds for any target, and `-march=native` picks the code for
 * the CPU at hand (`kernels/cpu_gemv.py` builds it; the tests also build it for AVX2 alone and for plain x86-64, the
 * paths this CPU does not take). Vectors are 256 bits wide even where AVX-512 exists, but for `vdpbf16ps`: on Zen 5
 * the 512-bit versions of the widening loops measured slower. Threads split the output rows (OpenMP).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define LANES 8   /* floats per vector */
#define UNROLL 4  /* vectors per step, and accumulators per activation row */
#define STEP (LANES * UNROLL)
#define MAX_ROWS 4 /* activation rows per pass over a weight row; more rows take another pass, from cache */

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
typedef uint32_t vu __attribute__((vector_size(LANES * 4)));
typedef int8_t v8 __attribute__((vector_size(LANES)));
typedef uint16_t v16 __attribute__((vector_size(LANES * 2)));

enum { INT8 = 0, BF16 = 1, F32 = 2 };

#define INLINE static inline __attribute__((always_inline))

INLINE vf load_floats(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE vf widen_int8(const int8_t *p) {
#if defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    v8 b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(__builtin_convertvector(b, vi), vf);
#endif
}

INLINE vf widen_bf16(const uint16_t *p) { /* a bfloat16 is the top half of a float32 */
#if defined(__AVX2__)
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#else
    v16 h;
    memcpy(&h, p, sizeof h);
    vu wide = __builtin_convertvector(h, vu) << 16;
    vf f;
    memcpy(&f, &wide, sizeof f);
    return f;
#endif
}

/* LANES weights from element k of a weight row, as floats. */
INLINE vf load_weights(const void *row, int64_t k, int kind) {
    if (kind == INT8) return widen_int8((const int8_t *)row + k);
    if (kind == BF16) return widen_bf16((const uint16_t *)row + k);
    return load_floats((const float *)row + k);
}

INLINE float weight_at(const void *row, int64_t k, int kind) {
    if (kind == INT8) return (float)((const int8_t *)row)[k];
    if (kind == BF16) return bf16_to_float(((const uint16_t *)row)[k]);
    return ((const float *)row)[k];
}

INLINE float horizontal_sum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
}

/* `count` values as float32: `values` itself, or a converted copy in *buffer (the caller frees it) when they are
 * bfloat16 bits; NULL when that copy cannot be allocated. */
static const float *as_floats(const void *values, int64_t count, int is_bf16, float **buffer) {
    *buffer = 0;
    if (!is_bf16) return values;
    *buffer = malloc((size_t)count * sizeof **buffer);
    if (*buffer)
        for (int64_t i = 0; i < count; i++) (*buffer)[i] = weight_at(values, i, BF16);
    return *buffer;
}

/* out[r] = dot(activation row r, weight row) for `rows` activation rows (a constant once inlined). */
INLINE void dot_rows(const float *x, int64_t K, int rows, const void *row, int kind, float *out) {
    vf acc[MAX_ROWS][UNROLL];
    for (int r = 0; r < rows; r++)
        for (int u = 0; u < UNROLL; u++) acc[r][u] = (vf){0};
    int64_t k = 0;
    for (; k + STEP <= K; k += STEP) {
        vf w[UNROLL];
#pragma GCC unroll 4
        for (int u = 0; u < UNROLL; u++) w[u] = load_weights(row, k + u * LANES, kind);
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
            for (int u = 0; u < UNROLL; u++) acc[r][u] += w[u] * load_floats(x + r * K + k + u * LANES);
    }
    for (; k + LANES <= K; k += LANES) {
        vf w = load_weights(row, k, kind);
        for (int r = 0; r < rows; r++) acc[r][0] += w * load_floats(x + r * K + k);
    }
    for (int r = 0; r < rows; r++) {
        vf total = acc[r][0];
        for (int u = 1; u < UNROLL; u++) total += acc[r][u];
        float s = horizontal_sum(total);
        for (int64_t t = k; t < K; t++) s += weight_at(row, t, kind) * x[r * K + t];
        out[r] = s;
    }
}

/* Output n of every activation row. `kind` is a literal at each call site, so each weight type gets its own code. */
INLINE void output_column(const float *x, const void *w, const float *scale, float *y, int64_t M, int64_t N,
                          int64_t K, int64_t n, int kind) {
    const int64_t row_bytes = K * (kind == INT8 ? 1 : kind == BF16 ? 2 : 4);
    const void *row = (const char *)w + n * row_bytes;
    float out[MAX_ROWS];
    for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
        const int64_t rows = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;
        const float *xr = x + m0 * K;
        switch (rows) { /* constant row counts, so the accumulators stay in registers */
            case 1: dot_rows(xr, K, 1, row, kind, out); break;
            case 2: dot_rows(xr, K, 2, row, kind, out); break;
            case 3: dot_rows(xr, K, 3, row, kind, out); break;
            default: dot_rows(xr, K, 4, row, kind, out); break;
        }
        for (int64_t r = 0; r < rows; r++) y[(m0 + r) * N + n] = scale ? out[r] * scale[n] : out[r];
    }
}

#if defined(__AVX2__)
typedef __m256i vint;
#define PAIRS 16 /* int16 pairs per register */
#define LOAD_WIDEN(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p)))
#define LOAD_Q(p) _mm256_loadu_si256((const __m256i *)(p))
#define MADD_ADD(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#define ZERO() _mm256_setzero_si256()
#define TO_FLOATS(v, out) _mm256_storeu_ps(out, _mm256_cvtepi32_ps(v))
#define Q_MAX 32767.0f
#define FLUSH_STEPS 64 /* an int32 lane gains <= 2 * 127 * 32767 per step: 64 steps stay below 2^31 / 4 */

/* Round each activation row to int16: x[m, :] = scales[m] * q[m, :]. */
static void quantize_rows(const float *x, int64_t M, int64_t K, int16_t *q, float *scales) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        __m256 widest = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) widest = _mm256_max_ps(widest, _mm256_and_ps(_mm256_loadu_ps(row + k), magnitude));
        float lanes[8], largest = 0.0f;
        _mm256_storeu_ps(lanes, widest);
        for (int i = 0; i < 8; i++) largest = fmaxf(largest, lanes[i]);
        for (; k < K; k++) largest = fmaxf(largest, fabsf(row[k]));
        const float scale = largest > 0.0f ? largest / Q_MAX : 1.0f;
        const __m256 divisor = _mm256_set1_ps(scale);
        for (k = 0; k + 16 <= K; k += 16) { /* x / scale, rounded to nearest even as lrintf, then to int16 */
            const __m256i a = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(row + k), divisor));
            const __m256i b = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(row + k + 8), divisor));
            const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8); /* lanes back in order */
            _mm256_storeu_si256((__m256i *)(q + m * K + k), packed);
        }
        for (; k < K; k++) q[m * K + k] = (int16_t)lrintf(row[k] / scale);
        scales[m] = scale;
    }
}

INLINE float sum_lanes(vint v) {
    float lanes[PAIRS / 2];
    TO_FLOATS(v, lanes);
    float s = 0.0f;
    for (int i = 0; i < PAIRS / 2; i++) s += lanes[i];
    return s;
}

/* out[r] = dot(q row r, weight row) for `rows` rows (a constant once inlined), exact in integers up to each flush. */
INLINE void int_dot_rows(const int16_t *q, int64_t K, int rows, const int8_t *row, float *out) {
    vint acc[MAX_ROWS][UNROLL];
    float total[MAX_ROWS] = {0};
    int64_t k = 0, steps = 0;
    for (int r = 0; r < rows; r++)
        for (int u = 0; u < UNROLL; u++) acc[r][u] = ZERO();
    for (; k + PAIRS * UNROLL <= K; k += PAIRS * UNROLL) {
        vint w[UNROLL];
#pragma GCC unroll 4
        for (int u = 0; u < UNROLL; u++) w[u] = LOAD_WIDEN(row + k + u * PAIRS);
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
            for (int u = 0; u < UNROLL; u++) acc[r][u] = MADD_ADD(acc[r][u], w[u], LOAD_Q(q + r * K + k + u * PAIRS));
        if (++steps == FLUSH_STEPS) {
            for (int r = 0; r < rows; r++)
                for (int u = 0; u < UNROLL; u++) {
                    total[r] += sum_lanes(acc[r][u]);
                    acc[r][u] = ZERO();
                }
            steps = 0;
        }
    }
    for (int r = 0; r < rows; r++) {
        float s = total[r];
        for (int u = 0; u < UNROLL; u++) s += sum_lanes(acc[r][u]);
        int64_t tail = 0;
        for (int64_t t = k; t < K; t++) tail += (int64_t)row[t] * q[r * K + t];
        out[r] = s + (float)tail;
    }
}

INLINE void int_output_column(const int16_t *q, const float *q_scales, const int8_t *w, const float *scale, float *y,
                              int64_t M, int64_t N, int64_t K, int64_t n) {
    const int8_t *row = w + n * K;
    float out[MAX_ROWS];
    for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
        const int64_t rows = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;
        const int16_t *qr = q + m0 * K;
        switch (rows) {
            case 1: int_dot_rows(qr, K, 1, row, out); break;
            case 2: int_dot_rows(qr, K, 2, row, out); break;
            case 3: int_dot_rows(qr, K, 3, row, out); break;
            default: int_dot_rows(qr, K, 4, row, out); break;
        }
        for (int64_t r = 0; r < rows; r++) y[(m0 + r) * N + n] = out[r] * q_scales[m0 + r] * scale[n];
    }
}

/* The int8 kernel on float32 activations and scales (see gemv_int8). */
static void int8_floats(const float *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N,
                        int64_t K, int threads, int16_t *q, float *q_scales) {
    quantize_rows(x, M, K, q, q_scales);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) int_output_column(q, q_scales, w, scale, y, M, N, K, n);
}
#else
static void int8_floats(const float *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N,
                        int64_t K, int threads, int16_t *q, float *q_scales) {
    (void)q, (void)q_scales;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) output_column(x, w, scale, y, M, N, K, n, INT8);
}
#endif

/* x [M, K] and scale [N] float32, or bfloat16 bits where x_bf16 / scale_bf16; w int8 [N, K] in [-127, 127];
 * y float32 [M, N]. Returns 0, or -1 when a buffer could not be allocated. */
int gemv_int8(const void *x, int x_bf16, const int8_t *w, const void *scale, int scale_bf16, float *y, int64_t M,
              int64_t N, int64_t K, int threads) {
    float *x_copy, *scale_copy;
    const float *xf = as_floats(x, M * K, x_bf16, &x_copy), *sf = as_floats(scale, N, scale_bf16, &scale_copy);
    int16_t *q = malloc((size_t)(M * K) * sizeof *q);
    float *q_scales = malloc((size_t)M * sizeof *q_scales);
    const int ok = xf && sf && q && q_scales;
    if (ok) int8_floats(xf, w, sf, y, M, N, K, threads, q, q_scales);
    free(x_copy);
    free(scale_copy);
    free(q);
    free(q_scales);
    return ok ? 0 : -1;
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define BF16_ROWS 8 /* activation rows per pass over a bfloat16 weight row */

/* out[r] = dot(bfloat16 activation row r, bfloat16 weight row): 32 pairs per `vdpbf16ps` into float32 sums, two
 * accumulators per row. Widening to float (above) is bound by its instruction count from two rows on; this keeps up
 * with oneDNN's matmul at two and four rows (`glm/cpu_decode.py` has the numbers). */
INLINE void bf16_dot_rows(const uint16_t *x, int64_t K, int rows, const uint16_t *row, float *out) {
    __m512 acc[BF16_ROWS][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(row + k), w1 = (__m512bh)_mm512_loadu_si512(row + k + 32);
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, (__m512bh)_mm512_loadu_si512(x + r * K + k));
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, (__m512bh)_mm512_loadu_si512(x + r * K + k + 32));
        }
    }
    for (int r = 0; r < rows; r++) {
        float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
        for (int64_t t = k; t < K; t++) s += weight_at(row, t, BF16) * weight_at(x + r * K, t, BF16);
        out[r] = s;
    }
}

/* x float32 [M, K] (rounded to bfloat16 here, as a bfloat16 model's activations are); w bfloat16 bits [N, K]. */
void gemv_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    uint16_t *xb = malloc((size_t)(M * K) * sizeof *xb);
    if (!xb) { /* no buffer: the widening kernel, which needs none */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n = 0; n < N; n++) output_column(x, w, 0, y, M, N, K, n, BF16);
        return;
    }
    for (int64_t i = 0; i < M * K; i++) xb[i] = float_to_bf16(x[i]);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float out[BF16_ROWS];
        for (int64_t m0 = 0; m0 < M; m0 += BF16_ROWS) {
            const int64_t rows = M - m0 < BF16_ROWS ? M - m0 : BF16_ROWS;
            const uint16_t *xr = xb + m0 * K, *row = w + n * K;
            switch (rows) { /* constant row counts, so the accumulators stay in registers */
                case 1: bf16_dot_rows(xr, K, 1, row, out); break;
                case 2: bf16_dot_rows(xr, K, 2, row, out); break;
                case 3: bf16_dot_rows(xr, K, 3, row, out); break;
                case 4: bf16_dot_rows(xr, K, 4, row, out); break;
                case 5: bf16_dot_rows(xr, K, 5, row, out); break;
                case 6: bf16_dot_rows(xr, K, 6, row, out); break;
                case 7: bf16_dot_rows(xr, K, 7, row, out); break;
                default: bf16_dot_rows(xr, K, 8, row, out); break;
            }
            for (int64_t r = 0; r < rows; r++) y[(m0 + r) * N + n] = out[r];
        }
    }
    free(xb);
}

int gemv_bf16_rows(void) { return BF16_ROWS; }
#else
/* x float32 [M, K]; w bfloat16 bits [N, K]; y float32 [M, N]. */
void gemv_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) output_column(x, w, 0, y, M, N, K, n, BF16);
}

/* 0: this build widens bfloat16 weights to float and keeps float32 activations (one row per pass pays; see above). */
int gemv_bf16_rows(void) { return 0; }
#endif

/* x float32 [M, K]; w float32 [N, K]; y float32 [M, N]. */
void gemv_f32(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) output_column(x, w, 0, y, M, N, K, n, F32);
}

#if defined(__AVX2__)
/* int4 weights in torch's CPU tile layout (`kernels/int4.py`), one activation row, in integers. A full tile of B
 * rows is K lines of B/2 bytes, byte i of a line holding row i in its low nibble and row B/2 + i in its high one;
 * the R rows after the last full tile (a multiple of 16) are K lines of R/2 bytes, byte i holding rows 2i and 2i + 1.
 * The activation is rounded to int8 per group of G columns (x = xs_g * xq, as llama.cpp's Q8 blocks do); two lines
 * k, k + 1 are interleaved byte by byte so that `pmaddubsw` multiplies each row's nibble pair by (xq_k, xq_k+1) in
 * one instruction. At a group's end a row with scale s and zero z (w = (q - 8) s + z) gains
 * s xs_g sum(q xq) + (z - 8 s) sum(x). */
/* Sums over one group of sum(q xq) for the `width` (8 or 16) bytes at `offset` of each line: rows of the low nibbles
 * into low[0..width), of the high nibbles into high[0..width). pairs[j] = (xq[2j], xq[2j + 1]) of the group. */
INLINE void int4_chunk(const uint8_t *lines, int64_t half, int64_t offset, int width, const int16_t *pairs,
                       int64_t G, int32_t *low, int32_t *high) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i wide[8]; /* int32 sums: low rows 0-3, 4-7, 8-11, 12-15, then the high rows */
    for (int i = 0; i < 8; i++) wide[i] = _mm_setzero_si128();
    for (int64_t k0 = 0; k0 < G; k0 += 16) { /* 8 pairs: int16 sums stay below 8 * 2 * 15 * 127 = 30,480 */
        __m128i narrow[4] = {_mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128()};
        for (int64_t k = k0; k < k0 + 16 && k < G; k += 2) {
            const uint8_t *a = lines + k * half + offset, *b = a + half;
            const __m128i la = width == 16 ? _mm_loadu_si128((const __m128i *)a) : _mm_loadl_epi64((const __m128i *)a);
            const __m128i lb = width == 16 ? _mm_loadu_si128((const __m128i *)b) : _mm_loadl_epi64((const __m128i *)b);
            const __m128i x = _mm_set1_epi16(pairs[k / 2]);
            const __m128i low_a = _mm_and_si128(la, mask), low_b = _mm_and_si128(lb, mask);
            const __m128i high_a = _mm_and_si128(_mm_srli_epi16(la, 4), mask);
            const __m128i high_b = _mm_and_si128(_mm_srli_epi16(lb, 4), mask);
            narrow[0] = _mm_add_epi16(narrow[0], _mm_maddubs_epi16(_mm_unpacklo_epi8(low_a, low_b), x));
            narrow[1] = _mm_add_epi16(narrow[1], _mm_maddubs_epi16(_mm_unpackhi_epi8(low_a, low_b), x));
            narrow[2] = _mm_add_epi16(narrow[2], _mm_maddubs_epi16(_mm_unpacklo_epi8(high_a, high_b), x));
            narrow[3] = _mm_add_epi16(narrow[3], _mm_maddubs_epi16(_mm_unpackhi_epi8(high_a, high_b), x));
        }
        for (int i = 0; i < 4; i++) {
            wide[2 * i] = _mm_add_epi32(wide[2 * i], _mm_cvtepi16_epi32(narrow[i]));
            wide[2 * i + 1] = _mm_add_epi32(wide[2 * i + 1], _mm_cvtepi16_epi32(_mm_srli_si128(narrow[i], 8)));
        }
    }
    _mm_storeu_si128((__m128i *)low, wide[0]);
    _mm_storeu_si128((__m128i *)(low + 4), wide[1]);
    _mm_storeu_si128((__m128i *)(low + 8), wide[2]);
    _mm_storeu_si128((__m128i *)(low + 12), wide[3]);
    _mm_storeu_si128((__m128i *)high, wide[4]);
    _mm_storeu_si128((__m128i *)(high + 4), wide[5]);
    _mm_storeu_si128((__m128i *)(high + 8), wide[6]);
    _mm_storeu_si128((__m128i *)(high + 12), wide[7]);
}

/* As int4_chunk for 32 bytes of each line (the rows of a 64-row tile), 256 bits at a time. AVX2 unpacks within each
 * 128-bit lane, so the first sums hold bytes 0-7 and 16-23, the second bytes 8-15 and 24-31; the stores put them back
 * in byte order. */
INLINE void int4_chunk32(const uint8_t *lines, int64_t half, int64_t offset, const int16_t *pairs, int64_t G,
                         int32_t *low, int32_t *high) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    __m256i wide[8]; /* int32 sums: low bytes 0-7, 16-23, 8-15, 24-31, then the high nibbles the same way */
    for (int i = 0; i < 8; i++) wide[i] = _mm256_setzero_si256();
    for (int64_t k0 = 0; k0 < G; k0 += 16) { /* 8 pairs: int16 sums stay below 8 * 2 * 15 * 127 = 30,480 */
        __m256i narrow[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                             _mm256_setzero_si256()};
        for (int64_t k = k0; k < k0 + 16 && k < G; k += 2) {
            const uint8_t *a = lines + k * half + offset, *b = a + half;
            const __m256i la = _mm256_loadu_si256((const __m256i *)a), lb = _mm256_loadu_si256((const __m256i *)b);
            const __m256i x = _mm256_set1_epi16(pairs[k / 2]);
            const __m256i low_a = _mm256_and_si256(la, mask), low_b = _mm256_and_si256(lb, mask);
            const __m256i high_a = _mm256_and_si256(_mm256_srli_epi16(la, 4), mask);
            const __m256i high_b = _mm256_and_si256(_mm256_srli_epi16(lb, 4), mask);
            narrow[0] = _mm256_add_epi16(narrow[0], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(low_a, low_b), x));
            narrow[1] = _mm256_add_epi16(narrow[1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(low_a, low_b), x));
            narrow[2] = _mm256_add_epi16(narrow[2], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(high_a, high_b), x));
            narrow[3] = _mm256_add_epi16(narrow[3], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(high_a, high_b), x));
        }
        for (int i = 0; i < 4; i++) {
            wide[2 * i] = _mm256_add_epi32(wide[2 * i], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(narrow[i])));
            wide[2 * i + 1] = _mm256_add_epi32(wide[2 * i + 1],
                                               _mm256_cvtepi16_epi32(_mm256_extracti128_si256(narrow[i], 1)));
        }
    }
    int32_t *const out[2] = {low, high};
    for (int h = 0; h < 2; h++) {
        _mm256_storeu_si256((__m256i *)out[h], wide[4 * h]);
        _mm256_storeu_si256((__m256i *)(out[h] + 16), wide[4 * h + 1]);
        _mm256_storeu_si256((__m256i *)(out[h] + 8), wide[4 * h + 2]);
        _mm256_storeu_si256((__m256i *)(out[h] + 24), wide[4 * h + 3]);
    }
}

/* The 2 * half rows of one full tile: each group's integer sums per row, then its scales and zeros applied eight rows
 * at a time (a row's bfloat16 scale and zero are one 32-bit word: the scale in its low half, the zero in its high). */
static void int4_full_tile(const int16_t *pairs, const float *x_scales, const float *x_sums, const uint8_t *lines,
                           int64_t half, const uint16_t *scales_and_zeros, int64_t n0, int64_t N, int64_t K, int64_t G,
                           float *y) {
    typedef float v8f __attribute__((vector_size(32)));
    float total[64] = {0};
    int32_t sums[64];
    for (int64_t g = 0; g < K / G; g++) {
        const uint8_t *group = lines + g * G * half;
        for (int64_t offset = 0; offset < half;) {
            if (half - offset >= 32) {
                int4_chunk32(group, half, offset, pairs + g * G / 2, G, sums + offset, sums + half + offset);
                offset += 32;
            } else {
                const int width = half - offset >= 16 ? 16 : 8;
                int32_t low[16], high[16];
                int4_chunk(group, half, offset, width, pairs + g * G / 2, G, low, high);
                memcpy(sums + offset, low, (size_t)width * sizeof *low);
                memcpy(sums + half + offset, high, (size_t)width * sizeof *high);
                offset += width;
            }
        }
        const uint16_t *table = scales_and_zeros + (g * N + n0) * 2;
        const v8f x_scale = _mm256_set1_ps(x_scales[g]), x_sum = _mm256_set1_ps(x_sums[g]);
        for (int64_t r = 0; r < 2 * half; r += 8) {
            const __m256i words = _mm256_loadu_si256((const __m256i *)(table + 2 * r));
            const v8f scale = (v8f)_mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
            const v8f zero = (v8f)_mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32((int)0xFFFF0000u)));
            const v8f row_sums = (v8f)_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(sums + r)));
            v8f running;
            memcpy(&running, total + r, sizeof running);
            running += scale * x_scale * row_sums + (zero - 8 * scale) * x_sum;
            memcpy(total + r, &running, sizeof running);
        }
    }
    for (int64_t r = 0; r < 2 * half; r++) y[n0 + r] = total[r];
}

/* The R rows after the last full tile: `half` = R / 2 bytes per line, byte i holding rows 2i and 2i + 1. */
static void int4_tail(const int16_t *pairs, const float *x_scales, const float *x_sums, const uint8_t *lines,
                      int64_t half, const uint16_t *scales_and_zeros, int64_t n0, int64_t N, int64_t K, int64_t G,
                      float *y) {
    float total[64] = {0};
    for (int64_t g = 0; g < K / G; g++) {
        for (int64_t offset = 0; offset < half; offset += 16) {
            const int width = half - offset >= 16 ? 16 : 8;
            int32_t low[16], high[16];
            int4_chunk(lines + g * G * half, half, offset, width, pairs + g * G / 2, G, low, high);
            for (int i = 0; i < width; i++) {
                const int64_t byte = offset + i;
                const int64_t rows[2] = {2 * byte, 2 * byte + 1};
                const int32_t sums[2] = {low[i], high[i]};
                for (int h = 0; h < 2; h++) {
                    const uint16_t *sz = scales_and_zeros + (g * N + n0 + rows[h]) * 2;
                    const float scale = bf16_to_float(sz[0]), zero = bf16_to_float(sz[1]);
                    total[rows[h]] += scale * x_scales[g] * (float)sums[h] + (zero - 8 * scale) * x_sums[g];
                }
            }
        }
    }
    for (int64_t r = 0; r < 2 * half; r++) y[n0 + r] = total[r];
}

/* x [K] float32, or bfloat16 bits where x_bf16; packed uint8 [N, K/2] in the tile layout of `block` rows (32 or 64); scales_and_zeros bfloat16
 * [K/G, N, 2]; y float32 [N]. Returns 0, or -1 for a shape or block this kernel does not take (N a multiple of 16,
 * G even and dividing K) or a failed allocation. */
int gemv_int4_tiled(const void *x_values, int x_bf16, const uint8_t *packed, const uint16_t *scales_and_zeros,
                    float *y, int64_t N, int64_t K, int64_t G, int64_t block, int threads) {
    if ((block != 32 && block != 64) || N % 16 != 0 || G % 2 != 0 || K % G != 0) return -1;
    float *x_copy;
    const float *x = as_floats(x_values, K, x_bf16, &x_copy);
    int16_t *pairs = malloc((size_t)(K / 2) * sizeof *pairs);
    float *x_scales = malloc((size_t)(K / G) * sizeof *x_scales), *x_sums = malloc((size_t)(K / G) * sizeof *x_sums);
    if (!x || !pairs || !x_scales || !x_sums) {
        free(x_copy);
        free(pairs);
        free(x_scales);
        free(x_sums);
        return -1;
    }
    for (int64_t g = 0; g < K / G; g++) { /* each group rounded to int8 under its own scale */
        float largest = 0.0f, sum = 0.0f;
        for (int64_t k = g * G; k < (g + 1) * G; k++) {
            largest = fmaxf(largest, fabsf(x[k]));
            sum += x[k];
        }
        const float scale = largest > 0.0f ? largest / 127.0f : 1.0f;
        for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
            const uint8_t first = (uint8_t)(int8_t)lrintf(x[k] / scale);
            const uint8_t second = (uint8_t)(int8_t)lrintf(x[k + 1] / scale);
            pairs[k / 2] = (int16_t)(uint16_t)(first | (uint16_t)second << 8);
        }
        x_scales[g] = scale;
        x_sums[g] = sum;
    }
    const int64_t tiles = N / block, tail = N - tiles * block;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t <= tiles; t++) {
        if (t < tiles)
            int4_full_tile(pairs, x_scales, x_sums, packed + t * block * K / 2, block / 2, scales_and_zeros,
                           t * block, N, K, G, y);
        else if (tail)
            int4_tail(pairs, x_scales, x_sums, packed + tiles * block * K / 2, tail / 2, scales_and_zeros,
                      tiles * block, N, K, G, y);
    }
    free(x_copy);
    free(pairs);
    free(x_scales);
    free(x_sums);
    return 0;
}
#else
int gemv_int4_tiled(const void *x_values, int x_bf16, const uint8_t *packed, const uint16_t *scales_and_zeros,
                    float *y, int64_t N, int64_t K, int64_t G, int64_t block, int threads) {
    (void)x_values, (void)x_bf16, (void)packed, (void)scales_and_zeros, (void)y, (void)N, (void)K, (void)G;
    (void)block, (void)threads;
    return -1; /* the caller keeps torch's fused kernel */
}
#endif

/* 1 when this build has the integer paths (AVX2): int8 weights times int16 activations, and the int4 kernel; 0 when
 * int8 weights are widened to float (portable code) and int4 layers keep torch's fused kernel. */
int gemv_integer_paths(void) {
#if defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}
