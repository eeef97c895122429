/* int4 weights in a blocked layout, for a few activation rows: y[m, n] = sum_k x[m, k] * w[n, k], where a weight of
 * group g = k / G is w = (q - 8) * scale[g, n] + zero[g, n] with q in [0, 15] (`kernels/int4.py`).
 *
 * torch's CPU tile layout, which gemv.c's int4 kernel reads, gives 128-bit and 256-bit `pmaddubsw` steps that need
 * an unpack per two lines and end in 16-bit sums; on Zen 5 that reads int4 weights at two thirds to three quarters of
 * the rate the blocked int8 and bfloat16 kernels reach. Here the weight is reordered once into blocks of BLOCK output
 * rows, each a run of records, one per group: G / 8 chunks of 64 bytes, then the group's BLOCK bfloat16 scales and
 * BLOCK bfloat16 zeros (64 bytes). Byte 4i + t of chunk j holds row i's q at column 8j + t in its low nibble and at
 * 8j + 4 + t in its high one, so one mask and one shift give two 512-bit vectors of 16 rows x 4 columns, and one
 * `vpdpbusd` (AVX512_VNNI) each multiplies them by four broadcast int8 activations into 16 int32 sums. A block of
 * every group is one stream of bytes, scales included; rows past N are zeros (scale and zero too).
 *
 * The activation is rounded to int8 per group (x = xs_g * xq, as gemv.c's int4 kernel and llama.cpp's Q8 blocks
 * do), and a row gains s xs_g sum(q xq) + (z - 8 s) sum(x) per group, as there. An int32 lane gains at most
 * G * 15 * 128 per group, far from overflow. Builds without AVX512_VNNI take the portable loop at the end.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BLOCK 16    /* output rows per block */
#define PASS_ROWS 4 /* activation rows per pass over a block */

int gemv_int4_block(void) { return BLOCK; }

/* Round each group of G columns of each row to int8: x = scales[m, g] * q; sums[m, g] = the group's sum of x. Groups
 * of a multiple of 16 go 16 columns at a time with AVX-512 (the same rounding as lrintf: nearest even). */
static void quantize_groups(const float *x, int64_t M, int64_t K, int64_t G, int8_t *q, float *scales, float *sums) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < K / G; g++) {
            const float *part = x + m * K + g * G;
            int8_t *out = q + m * K + g * G;
            float largest = 0.0f, sum = 0.0f;
#if defined(__AVX512F__)
            if (G % 16 == 0) {
                __m512 widest = _mm512_setzero_ps(), total = _mm512_setzero_ps();
                for (int64_t k = 0; k < G; k += 16) {
                    const __m512 v = _mm512_loadu_ps(part + k);
                    widest = _mm512_max_ps(widest, _mm512_abs_ps(v));
                    total = _mm512_add_ps(total, v);
                }
                largest = _mm512_reduce_max_ps(widest);
                sum = _mm512_reduce_add_ps(total);
                const float scale = largest > 0.0f ? largest / 127.0f : 1.0f;
                const __m512 divisor = _mm512_set1_ps(scale);
                for (int64_t k = 0; k < G; k += 16)
                    _mm_storeu_si128((__m128i *)(out + k),
                                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(part + k),
                                                                                          divisor))));
                scales[m * (K / G) + g] = scale;
                sums[m * (K / G) + g] = sum;
                continue;
            }
#endif
            for (int64_t k = 0; k < G; k++) {
                largest = fmaxf(largest, fabsf(part[k]));
                sum += part[k];
            }
            const float scale = largest > 0.0f ? largest / 127.0f : 1.0f;
            for (int64_t k = 0; k < G; k++) out[k] = (int8_t)lrintf(part[k] / scale);
            scales[m * (K / G) + g] = scale;
            sums[m * (K / G) + g] = sum;
        }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define INLINE static inline __attribute__((always_inline))

INLINE __m512i quad_of(const int8_t *q) {
    int32_t quad;
    memcpy(&quad, q, sizeof quad);
    return _mm512_set1_epi32(quad);
}

INLINE __m512 bf16_vector(const uint8_t *p) { /* 16 bfloat16 values -> float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* Block `b` for `rows` activation rows (a constant once inlined): the low and the high nibbles sum into separate
 * registers, so consecutive `vpdpbusd`s do not wait on each other. */
INLINE void block_rows(const int8_t *q, const float *scales, const float *sums, const uint8_t *w, float *y, int rows,
                       int64_t b, int64_t N, int64_t K, int64_t G) {
    const int64_t groups = K / G, record = 8 * G + 64;
    const uint8_t *block = w + b * groups * record;
    const __m512i mask = _mm512_set1_epi8(0x0F);
    __m512 total[PASS_ROWS];
    for (int r = 0; r < rows; r++) total[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *chunk = block + g * record;
        __m512i low[PASS_ROWS], high[PASS_ROWS];
        for (int r = 0; r < rows; r++) low[r] = high[r] = _mm512_setzero_si512();
        for (int64_t j = 0; j < G / 8; j++) {
            const __m512i bytes = _mm512_loadu_si512(chunk + 64 * j);
            const __m512i first = _mm512_and_si512(bytes, mask);                         /* columns 8j .. 8j + 3 */
            const __m512i second = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), mask);  /* 8j + 4 .. 8j + 7 */
#pragma GCC unroll 4
            for (int r = 0; r < rows; r++) {
                const int8_t *columns = q + r * K + g * G + 8 * j;
                low[r] = _mm512_dpbusd_epi32(low[r], first, quad_of(columns));
                high[r] = _mm512_dpbusd_epi32(high[r], second, quad_of(columns + 4));
            }
        }
        const __m512 scale = bf16_vector(chunk + 8 * G), zero = bf16_vector(chunk + 8 * G + 32);
        const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale, zero); /* z - 8 s */
        for (int r = 0; r < rows; r++) {
            const __m512 dots = _mm512_cvtepi32_ps(_mm512_add_epi32(low[r], high[r]));
            const __m512 scaled = _mm512_mul_ps(scale, _mm512_set1_ps(scales[r * groups + g]));
            total[r] = _mm512_fmadd_ps(scaled, dots, _mm512_fmadd_ps(offset, _mm512_set1_ps(sums[r * groups + g]),
                                                                     total[r]));
        }
    }
    const int64_t n = b * BLOCK, left = N - n;
    const __mmask16 keep = left >= BLOCK ? 0xffff : (__mmask16)((1u << left) - 1);
    for (int r = 0; r < rows; r++) _mm512_mask_storeu_ps(y + r * N + n, keep, total[r]);
}

static void pass_rows(const int8_t *q, const float *scales, const float *sums, const uint8_t *w, float *y,
                      int64_t rows, int64_t b, int64_t N, int64_t K, int64_t G) {
    switch (rows) {
        case 1: block_rows(q, scales, sums, w, y, 1, b, N, K, G); break;
        case 2: block_rows(q, scales, sums, w, y, 2, b, N, K, G); break;
        case 3: block_rows(q, scales, sums, w, y, 3, b, N, K, G); break;
        default: block_rows(q, scales, sums, w, y, 4, b, N, K, G); break;
    }
}
#else
/* The same sums one product at a time. */
static void pass_rows(const int8_t *q, const float *scales, const float *sums, const uint8_t *w, float *y,
                      int64_t rows, int64_t b, int64_t N, int64_t K, int64_t G) {
    const int64_t groups = K / G, record = 8 * G + 64;
    for (int64_t i = 0; i < BLOCK && b * BLOCK + i < N; i++)
        for (int64_t r = 0; r < rows; r++) {
            float total = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *chunk = w + (b * groups + g) * record;
                int32_t dot = 0;
                for (int64_t k = 0; k < G; k++) {
                    const uint8_t byte = chunk[64 * (k / 8) + 4 * i + k % 4];
                    dot += (k % 8 < 4 ? byte & 0x0F : byte >> 4) * q[r * K + g * G + k];
                }
                uint16_t scale_bits, zero_bits;
                memcpy(&scale_bits, chunk + 8 * G + 2 * i, sizeof scale_bits);
                memcpy(&zero_bits, chunk + 8 * G + 32 + 2 * i, sizeof zero_bits);
                const float scale = bf16_to_float(scale_bits), zero = bf16_to_float(zero_bits);
                total += scale * scales[r * groups + g] * (float)dot + (zero - 8 * scale) * sums[r * groups + g];
            }
            y[r * N + b * BLOCK + i] = total;
        }
}
#endif

/* x float32 [M, K]; w the blocked layout above; y float32 [M, N]. Returns 0, or -1 for a group size this layout does
 * not take (a multiple of 8 dividing K) or a failed allocation. */
int gemv_int4_blocked(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t G,
                      int threads) {
    if (G <= 0 || G % 8 != 0 || K % G != 0) return -1;
    int8_t *q = malloc((size_t)(M * K));
    float *scales = malloc((size_t)(M * (K / G)) * sizeof *scales), *sums = malloc((size_t)(M * (K / G)) * sizeof *sums);
    if (q && scales && sums) {
        quantize_groups(x, M, K, G, q, scales, sums);
        const int64_t blocks = (N + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < blocks; b++)
            for (int64_t m0 = 0; m0 < M; m0 += PASS_ROWS)
                pass_rows(q + m0 * K, scales + m0 * (K / G), sums + m0 * (K / G), w, y + m0 * N,
                          M - m0 < PASS_ROWS ? M - m0 : PASS_ROWS, b, N, K, G);
    }
    const int ok = q && scales && sums;
    free(q);
    free(scales);
    free(sums);
    return ok ? 0 : -1;
}
