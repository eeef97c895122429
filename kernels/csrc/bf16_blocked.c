/* bfloat16 weights in a blocked layout, for decode steps of one to eight rows: y[m, n] = sum_k x[m, k] * w[n, k].
 *
 * The row-major kernel of gemv.c takes one weight row at a time and sums its products with every activation row:
 * each product needs its own activation load, and each output ends in a horizontal sum. From four rows on that
 * costs more than the weights' reads. Here the weight is reordered once into blocks of BLOCK output rows,
 * [ceil(N / BLOCK), K / 2, BLOCK, 2]: pair p of a block holds w[n, 2p] and w[n, 2p + 1] for its BLOCK rows, so one
 * `vdpbf16ps` multiplies one broadcast activation pair into BLOCK output sums at once. Sums stay in registers as
 * whole output vectors (no horizontal sums), and an activation pair loaded once serves every block of a pass.
 * Rows past N in the last block are zeros. K must be even.
 *
 * `multimodal bench glm --vs transformers --dtype bfloat16 --threads 1 --clock cpu` (198M parameters, one Zen 5
 * core): batch 8 decodes 382.8 tok/s in one C step on this layout, where the eager step on oneDNN's matmuls gave
 * 211.6 (the row-major kernel lost to oneDNN from four rows); batch 1 stays at the read floor. The portable loop at
 * the end serves builds without AVX512_BF16 (the tests check it; decode does not reorder weights there).
 */
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BLOCK 16     /* output rows per block: one 512-bit vector of float32 sums */
#define PASS_ROWS 8  /* activation rows per pass over the weights; more rows take another pass */
#define CHUNK 4      /* blocks per thread task: 64 output rows */

int gemv_bf16_block(void) { return BLOCK; }

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define INLINE static inline __attribute__((always_inline))

/* `blocks` consecutive blocks from block `first` for `rows` activation rows (bfloat16 bits [rows, K]). */
INLINE void blocks_rows(const uint16_t *x, const uint16_t *w, float *y, int rows, int blocks, int64_t first,
                        int64_t N, int64_t K) {
    __m512 acc[PASS_ROWS][CHUNK];
    for (int r = 0; r < rows; r++)
        for (int b = 0; b < blocks; b++) acc[r][b] = _mm512_setzero_ps();
    const uint16_t *block = w + first * BLOCK * K;
    for (int64_t p = 0; p < K / 2; p++) {
        __m512bh weights[CHUNK];
        for (int b = 0; b < blocks; b++)
            weights[b] = (__m512bh)_mm512_loadu_si512(block + b * BLOCK * K + p * 2 * BLOCK);
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            int32_t pair;
            memcpy(&pair, x + r * K + 2 * p, sizeof pair);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            for (int b = 0; b < blocks; b++) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], weights[b], xv);
        }
    }
    for (int b = 0; b < blocks; b++) {
        const int64_t n = (first + b) * BLOCK, left = N - n;
        const __mmask16 keep = left >= BLOCK ? 0xffff : (__mmask16)((1u << left) - 1);
        for (int r = 0; r < rows; r++) _mm512_mask_storeu_ps(y + r * N + n, keep, acc[r][b]);
    }
}

/* One thread task: up to CHUNK blocks for up to PASS_ROWS rows, with the row and block counts as constants so
 * that the sums stay in registers (at most 16 of the 32). One row runs a block at a time, one stream of weights:
 * four blocks side by side read slower there in a stand-alone timing. */
static void chunk_rows(const uint16_t *x, const uint16_t *w, float *y, int64_t rows, int64_t first, int64_t blocks,
                       int64_t N, int64_t K) {
    if (blocks < CHUNK || rows == 1) {
        for (int64_t b = 0; b < blocks; b++) {
            switch (rows) {
                case 1: blocks_rows(x, w, y, 1, 1, first + b, N, K); break;
                case 2: blocks_rows(x, w, y, 2, 1, first + b, N, K); break;
                case 3: blocks_rows(x, w, y, 3, 1, first + b, N, K); break;
                case 4: blocks_rows(x, w, y, 4, 1, first + b, N, K); break;
                case 5: blocks_rows(x, w, y, 5, 1, first + b, N, K); break;
                case 6: blocks_rows(x, w, y, 6, 1, first + b, N, K); break;
                case 7: blocks_rows(x, w, y, 7, 1, first + b, N, K); break;
                default: blocks_rows(x, w, y, 8, 1, first + b, N, K); break;
            }
        }
        return;
    }
    switch (rows) { /* four blocks at once up to four rows; two at a time from five */
        case 2: blocks_rows(x, w, y, 2, 4, first, N, K); break;
        case 3: blocks_rows(x, w, y, 3, 4, first, N, K); break;
        case 4: blocks_rows(x, w, y, 4, 4, first, N, K); break;
        case 5: for (int h = 0; h < 2; h++) blocks_rows(x, w, y, 5, 2, first + 2 * h, N, K); break;
        case 6: for (int h = 0; h < 2; h++) blocks_rows(x, w, y, 6, 2, first + 2 * h, N, K); break;
        case 7: for (int h = 0; h < 2; h++) blocks_rows(x, w, y, 7, 2, first + 2 * h, N, K); break;
        default: for (int h = 0; h < 2; h++) blocks_rows(x, w, y, 8, 2, first + 2 * h, N, K); break;
    }
}

/* x float32 [M, K] (rounded to bfloat16 here, as a bfloat16 model's activations are); w the blocked layout. */
int gemv_bf16_blocked(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    uint16_t *xb = malloc((size_t)(M * K) * sizeof *xb);
    if (!xb) return -1;
    for (int64_t i = 0; i < M * K; i++) xb[i] = float_to_bf16(x[i]);
    const int64_t blocks = (N + BLOCK - 1) / BLOCK, tasks = (blocks + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t first = t * CHUNK, count = blocks - first < CHUNK ? blocks - first : CHUNK;
        for (int64_t m0 = 0; m0 < M; m0 += PASS_ROWS)
            chunk_rows(xb + m0 * K, w, y + m0 * N, M - m0 < PASS_ROWS ? M - m0 : PASS_ROWS, first, count, N, K);
    }
    free(xb);
    return 0;
}

#else
/* The same layout and the same bfloat16 rounding of the activations, one product at a time. */
int gemv_bf16_blocked(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    (void)threads;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            const uint16_t *block = w + (n / BLOCK) * BLOCK * K;
            float sum = 0.0f;
            for (int64_t k = 0; k < K; k++)
                sum += bf16_to_float(float_to_bf16(x[m * K + k])) *
                       bf16_to_float(block[(k / 2) * 2 * BLOCK + (n % BLOCK) * 2 + k % 2]);
            y[m * N + n] = sum;
        }
    return 0;
}
#endif
