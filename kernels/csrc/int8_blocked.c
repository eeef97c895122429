/* int8 weights in a blocked layout, for any number of activation rows: y[m, n] = sum_k x[m, k] * w[n, k] * scale[n].
 *
 * The row-major int8 kernel of gemv.c reads one weight row at a time and ends each in a horizontal sum; on one Zen 5
 * core it streams int8 weights at about three quarters of the rate the blocked bfloat16 kernel streams its own, so
 * INT8 decode was 1.5x bfloat16's tokens/s for half the bytes. Here the weight is reordered once, as
 * bf16_blocked.c does, into blocks of BLOCK output rows, [ceil(N / BLOCK), K2 / 2, BLOCK, 2] with K2 = K rounded up
 * to even: pair p of a block holds w[n, 2p] and w[n, 2p + 1] for its BLOCK rows (zeros past N and past K). One
 * `vpdpwssd` (AVX512_VNNI) multiplies the block's 32 weights, widened to int16, by one broadcast pair of int16
 * activations into BLOCK int32 sums: no horizontal sums, one stream of weight bytes.
 *
 * Activations are rounded per row to int16 under one scale (x = scale * q, |q| <= 32767), as gemv.c's int8 kernel
 * does, so both kernels give the same sums but for float rounding. An int32 lane gains at most 2 * 127 * 32767 per
 * step; every FLUSH_STEPS steps the sums move into float32, long before they could overflow. Rows come in passes of
 * PASS_ROWS over a thread's CHUNK blocks, which stay in cache between passes, so prefill runs here too. Builds
 * without AVX512_VNNI take the portable loop at the end (same layout, same rounding; the tests check it).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BLOCK 16        /* output rows per block: one 512-bit vector of int32 sums */
#define PASS_ROWS 8     /* activation rows per pass over a chunk of blocks */
#define CHUNK 4         /* blocks per thread task: 64 output rows */
#define FLUSH_STEPS 128 /* 128 * 2 * 127 * 32767 < 2^31 */
#define Q_MAX 32767.0f

int gemv_int8_block(void) { return BLOCK; }

/* Round each activation row to int16 into [M, K2] (K2 = K rounded up to even, the last column zero where K is odd):
 * x[m, :] = scales[m] * q[m, :], x / scale rounded to nearest even as lrintf (16 columns at a time with AVX-512: a
 * scalar loop cost as much as a small layer's weights). */
static void quantize_rows(const float *x, int64_t M, int64_t K, int64_t K2, int16_t *q, float *scales) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        float largest = 0.0f;
        int64_t k = 0;
#if defined(__AVX512F__)
        __m512 widest = _mm512_setzero_ps();
        for (; k + 16 <= K; k += 16) widest = _mm512_max_ps(widest, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
        largest = _mm512_reduce_max_ps(widest);
#endif
        for (; k < K; k++) largest = fmaxf(largest, fabsf(row[k]));
        const float scale = largest > 0.0f ? largest / Q_MAX : 1.0f;
        k = 0;
#if defined(__AVX512F__)
        const __m512 divisor = _mm512_set1_ps(scale);
        for (; k + 16 <= K; k += 16) {
            const __m512i rounded = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(row + k), divisor));
            _mm256_storeu_si256((__m256i *)(q + m * K2 + k), _mm512_cvtsepi32_epi16(rounded));
        }
#endif
        for (; k < K; k++) q[m * K2 + k] = (int16_t)lrintf(row[k] / scale);
        if (K2 > K) q[m * K2 + K] = 0;
        scales[m] = scale;
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define INLINE static inline __attribute__((always_inline))

INLINE __m512i pair_of(const int16_t *q, int64_t p) {
    int32_t pair;
    memcpy(&pair, q + 2 * p, sizeof pair);
    return _mm512_set1_epi32(pair);
}

/* Block `b` for `rows` activation rows (a constant once inlined): two int32 sums per row (even and odd pairs), so
 * consecutive `vpdpwssd`s do not wait on each other. */
INLINE void block_rows(const int16_t *q, const float *q_scales, const int8_t *w, const float *scale, float *y,
                       int rows, int64_t b, int64_t N, int64_t K2) {
    const int64_t pairs = K2 / 2;
    const int8_t *block = w + b * BLOCK * K2;
    __m512i acc[PASS_ROWS][2];
    float total[PASS_ROWS][BLOCK] __attribute__((aligned(64)));
    for (int r = 0; r < rows; r++) {
        acc[r][0] = acc[r][1] = _mm512_setzero_si512();
        _mm512_store_ps(total[r], _mm512_setzero_ps());
    }
    int64_t p = 0;
    int steps = 0;
    for (; p + 2 <= pairs; p += 2) {
        const int8_t *pair = block + p * 2 * BLOCK; /* pairs p and p + 1: 64 bytes, widened as they load */
        const __m512i even = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)pair));
        const __m512i odd = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(pair + 2 * BLOCK)));
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            acc[r][0] = _mm512_dpwssd_epi32(acc[r][0], even, pair_of(q + r * K2, p));
            acc[r][1] = _mm512_dpwssd_epi32(acc[r][1], odd, pair_of(q + r * K2, p + 1));
        }
        if (++steps == FLUSH_STEPS) {
            for (int r = 0; r < rows; r++) {
                const __m512 sums = _mm512_add_ps(_mm512_cvtepi32_ps(acc[r][0]), _mm512_cvtepi32_ps(acc[r][1]));
                _mm512_store_ps(total[r], _mm512_add_ps(_mm512_load_ps(total[r]), sums));
                acc[r][0] = acc[r][1] = _mm512_setzero_si512();
            }
            steps = 0;
        }
    }
    if (p < pairs) { /* an odd number of pairs: the last one alone */
        const __m512i last = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(block + p * 2 * BLOCK)));
        for (int r = 0; r < rows; r++) acc[r][0] = _mm512_dpwssd_epi32(acc[r][0], last, pair_of(q + r * K2, p));
    }
    const int64_t n = b * BLOCK, left = N - n;
    const __mmask16 keep = left >= BLOCK ? 0xffff : (__mmask16)((1u << left) - 1);
    const __m512 channel = _mm512_maskz_loadu_ps(keep, scale + n);
    for (int r = 0; r < rows; r++) {
        const __m512 sums = _mm512_add_ps(_mm512_load_ps(total[r]), _mm512_add_ps(_mm512_cvtepi32_ps(acc[r][0]),
                                                                                   _mm512_cvtepi32_ps(acc[r][1])));
        const __m512 out = _mm512_mul_ps(_mm512_mul_ps(sums, _mm512_set1_ps(q_scales[r])), channel);
        _mm512_mask_storeu_ps(y + r * N + n, keep, out);
    }
}

static void pass_rows(const int16_t *q, const float *q_scales, const int8_t *w, const float *scale, float *y,
                      int64_t rows, int64_t b, int64_t N, int64_t K2) {
    switch (rows) {
        case 1: block_rows(q, q_scales, w, scale, y, 1, b, N, K2); break;
        case 2: block_rows(q, q_scales, w, scale, y, 2, b, N, K2); break;
        case 3: block_rows(q, q_scales, w, scale, y, 3, b, N, K2); break;
        case 4: block_rows(q, q_scales, w, scale, y, 4, b, N, K2); break;
        case 5: block_rows(q, q_scales, w, scale, y, 5, b, N, K2); break;
        case 6: block_rows(q, q_scales, w, scale, y, 6, b, N, K2); break;
        case 7: block_rows(q, q_scales, w, scale, y, 7, b, N, K2); break;
        default: block_rows(q, q_scales, w, scale, y, 8, b, N, K2); break;
    }
}

int gemv_vnni_blocks(void) { return 1; }
#else
/* The same sums one product at a time, exact in 64-bit integers. */
static void pass_rows(const int16_t *q, const float *q_scales, const int8_t *w, const float *scale, float *y,
                      int64_t rows, int64_t b, int64_t N, int64_t K2) {
    const int8_t *block = w + b * BLOCK * K2;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < BLOCK && b * BLOCK + i < N; i++) {
            int64_t sum = 0;
            for (int64_t k = 0; k < K2; k++) sum += (int64_t)q[r * K2 + k] * block[(k / 2) * 2 * BLOCK + i * 2 + k % 2];
            y[r * N + b * BLOCK + i] = (float)sum * q_scales[r] * scale[b * BLOCK + i];
        }
}

int gemv_vnni_blocks(void) { return 0; }
#endif

/* x float32 [M, K]; w int8 in the blocked layout above; scale float32 [N]; y float32 [M, N]. Returns 0, or -1 when a
 * buffer could not be allocated. */
int gemv_int8_blocked(const float *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N, int64_t K,
                      int threads) {
    const int64_t K2 = K + (K & 1);
    int16_t *q = malloc((size_t)(M * K2) * sizeof *q);
    float *q_scales = malloc((size_t)M * sizeof *q_scales);
    if (!q || !q_scales) {
        free(q);
        free(q_scales);
        return -1;
    }
    quantize_rows(x, M, K, K2, q, q_scales);
    const int64_t blocks = (N + BLOCK - 1) / BLOCK, tasks = (blocks + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t first = t * CHUNK, last = first + CHUNK < blocks ? first + CHUNK : blocks;
        for (int64_t m0 = 0; m0 < M; m0 += PASS_ROWS) {
            const int64_t rows = M - m0 < PASS_ROWS ? M - m0 : PASS_ROWS;
            for (int64_t b = first; b < last; b++)
                pass_rows(q + m0 * K2, q_scales + m0, w, scale, y + m0 * N, rows, b, N, K2);
        }
    }
    free(q);
    free(q_scales);
    return 0;
}
