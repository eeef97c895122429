/* One whole GLM decode step on the CPU in one call: embedding, every block, final norm and output layer, for a few
 * rows that each feed one new token (the math of `glm/model.py`, language path).
 *
 * At batch 1 a decode step reads every weight once, and the matmuls (`gemv.c`) read them about as fast as memory
 * delivers. What is left in an eager PyTorch step is everything else: about 50 small operators per block (norms,
 * rotary, cache writes, attention over one query, dtype conversions), each a dispatch and an allocation, which cost
 * as much as the int8 weights' reads on a 200M model. Here they are plain loops over float32 vectors.
 *
 * Numerics: activations stay float32 from the embedding to the logits (PyTorch's bfloat16 path rounds them after
 * every operator); keys and values are stored in the cache's own type (bfloat16 rounded to nearest even, or
 * float32), as the eager path stores them, so either path may continue a cache the other filled.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

int gemv_int8(const void *x, int x_bf16, const int8_t *w, const void *scale, int scale_bf16, float *y, int64_t M,
              int64_t N, int64_t K, int threads);
void gemv_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int threads);
void gemv_f32(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K, int threads);
int gemv_bf16_blocked(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int threads);
int gemv_int8_blocked(const float *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N, int64_t K,
                      int threads);
int gemv_int4_blocked(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t G,
                      int threads);
int gemv_int4_tiled(const void *x_values, int x_bf16, const uint8_t *packed, const uint16_t *scales_and_zeros,
                    float *y, int64_t N, int64_t K, int64_t G, int64_t block, int threads);

enum { KIND_INT8 = 0, KIND_BF16 = 1, KIND_F32 = 2, KIND_INT4 = 3, KIND_BF16_BLOCKED = 4, KIND_INT8_BLOCKED = 5,
       KIND_INT4_BLOCKED = 6 };

typedef struct {
    const void *weight;   /* [N, stride]: int8, bfloat16 bits or float32; int4: torch's CPU tiles [N, K / 2];
                             blocked: the layouts of bf16_blocked.c, int8_blocked.c and int4_blocked.c */
    const void *scales;   /* int8: float32 [N]; int4: bfloat16 scales and zeros [K / G, N, 2] */
    const float *bias;    /* [N] or NULL */
    int64_t kind, out_features, in_features, stride; /* stride >= in_features: int8 rows padded with zeros */
    int64_t group_size, block;                       /* int4: columns per scale, rows per tile */
} Linear;

typedef struct {
    Linear qkv, dense, gate_up, down;
    const float *attn_norm, *mlp_norm; /* [hidden] */
    void *keys, *values;               /* [B, groups, cache_len, head_dim] in the cache's type */
} Block;

typedef struct {
    int64_t hidden, heads, groups, head_dim, rotary_half, ffn, cache_len, vocab, table_len, num_blocks;
    int64_t cache_bf16, embed_bf16;
    float eps;
    const float *rope_cos, *rope_sin; /* [table_len, rotary_half] */
    const void *embed;                /* [vocab, hidden] */
    const float *final_norm;
    Linear output;
    const Block *blocks;
} Decoder;

static float load_element(const void *base, int64_t i, int is_bf16) {
    return is_bf16 ? bf16_to_float(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static void store_element(void *base, int64_t i, int is_bf16, float value) {
    if (is_bf16)
        ((uint16_t *)base)[i] = float_to_bf16(value);
    else
        ((float *)base)[i] = value;
}

typedef float vf __attribute__((vector_size(32)));

/* sum_i a[i] * b[i] with eight independent lanes (a scalar loop would wait on one running sum). */
static float dot(const float *a, const float *b, int64_t n) {
    vf acc = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        vf x, y;
        memcpy(&x, a + i, sizeof x);
        memcpy(&y, b + i, sizeof y);
        acc += x * y;
    }
    float total = 0.0f;
    for (int j = 0; j < 8; j++) total += acc[j];
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* y [M, N] = x [M, K] @ W.T (+ bias); `padded` is scratch of M * stride floats for int8 rows wider than K. */
static int linear(const Linear *l, const float *x, float *y, int64_t M, float *padded, int threads) {
    const int64_t N = l->out_features, K = l->in_features;
    if (l->kind == KIND_INT8) {
        const float *rows = x;
        if (l->stride != K) {
            for (int64_t m = 0; m < M; m++) {
                memcpy(padded + m * l->stride, x + m * K, (size_t)K * sizeof *x);
                memset(padded + m * l->stride + K, 0, (size_t)(l->stride - K) * sizeof *x);
            }
            rows = padded;
        }
        if (gemv_int8(rows, 0, l->weight, l->scales, 0, y, M, N, l->stride, threads) != 0) return -1;
    } else if (l->kind == KIND_INT4) {
        for (int64_t m = 0; m < M; m++)
            if (gemv_int4_tiled(x + m * K, 0, l->weight, l->scales, y + m * N, N, K, l->group_size, l->block, threads))
                return -1;
    } else if (l->kind == KIND_INT4_BLOCKED) {
        if (gemv_int4_blocked(x, l->weight, y, M, N, K, l->group_size, threads) != 0) return -1;
    } else if (l->kind == KIND_INT8_BLOCKED) {
        if (gemv_int8_blocked(x, l->weight, l->scales, y, M, N, K, threads) != 0) return -1;
    } else if (l->kind == KIND_BF16_BLOCKED) {
        if (gemv_bf16_blocked(x, l->weight, y, M, N, K, threads) != 0) return -1;
    } else if (l->kind == KIND_BF16) {
        gemv_bf16(x, l->weight, y, M, N, K, threads);
    } else {
        gemv_f32(x, l->weight, y, M, N, K, threads);
    }
    if (l->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) y[m * N + n] += l->bias[n];
    return 0;
}

/* out = x / rms(x) * weight over `size` values (statistics in float32, as the eager path). */
static void rms_norm(const float *x, const float *weight, float *out, int64_t size, float eps) {
    const float inverse = 1.0f / sqrtf(dot(x, x, size) / (float)size + eps);
    for (int64_t i = 0; i < size; i++) out[i] = x[i] * inverse * weight[i];
}

/* Rotate the first 2 * half dims of one head in adjacent pairs (x[2i], x[2i+1]) by the angles of one position. */
static void rotate(float *head, const float *cos_row, const float *sin_row, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        const float x0 = head[2 * i], x1 = head[2 * i + 1];
        head[2 * i] = x0 * cos_row[i] - x1 * sin_row[i];
        head[2 * i + 1] = x1 * cos_row[i] + x0 * sin_row[i];
    }
}

/* `count` cache values from element `start` as float32 into `out` (a copy only when the cache holds bfloat16). */
static const float *cache_floats(const void *cache, int64_t start, int64_t count, int is_bf16, float *out) {
    if (!is_bf16) return (const float *)cache + start;
    for (int64_t i = 0; i < count; i++) out[i] = bf16_to_float(((const uint16_t *)cache)[start + i]);
    return out;
}

/* One row's attention: each query head over the cache slots [0, slot] it may see, its group's keys and values.
 * A group's keys and values are read as float once; its heads then run in parallel (long contexts make this the
 * step's largest work outside the matmuls). `scratch` holds ATTENTION_SCRATCH floats. */
#define ATTENTION_SCRATCH(d, S) ((2 * (d)->head_dim + (d)->heads / (d)->groups) * (S))
static void attend(const Decoder *d, const Block *b, int64_t row, const float *q, int64_t slot, const uint8_t *valid,
                   float *scratch, float *out, int threads) {
    const int64_t D = d->head_dim, per_group = d->heads / d->groups, S = slot + 1;
    const float scale = 1.0f / sqrtf((float)D);
    float *key_buffer = scratch, *value_buffer = key_buffer + S * D, *score_rows = value_buffer + S * D;
    for (int64_t g = 0; g < d->groups; g++) {
        const int64_t first = (row * d->groups + g) * d->cache_len * D; /* slot 0 of this row and group */
        const float *keys = cache_floats(b->keys, first, S * D, (int)d->cache_bf16, key_buffer);
        const float *values = cache_floats(b->values, first, S * D, (int)d->cache_bf16, value_buffer);
#pragma omp parallel for num_threads(threads) schedule(static) if (S * per_group >= 4096)
        for (int64_t j = 0; j < per_group; j++) {
            const int64_t h = g * per_group + j;
            const float *query = q + h * D;
            float *scores = score_rows + j * S, largest = -INFINITY, total = 0.0f;
            for (int64_t s = 0; s < S; s++) {
                scores[s] = valid && !valid[s] && s != slot ? -INFINITY : dot(query, keys + s * D, D) * scale;
                largest = fmaxf(largest, scores[s]);
            }
            for (int64_t s = 0; s < S; s++) total += scores[s] = expf(scores[s] - largest);
            float *head_out = out + h * D;
            memset(head_out, 0, (size_t)D * sizeof *head_out);
            for (int64_t s = 0; s < S; s++) {
                const float p = scores[s] / total;
                if (p != 0.0f)
                    for (int64_t i = 0; i < D; i++) head_out[i] += p * values[s * D + i];
            }
        }
    }
}

/* x [M, hidden] += attention(norm(x)), then += mlp(norm(x)), for rows at rotary positions[m] written to `slot`. */
static int block_step(const Decoder *d, const Block *b, float *x, int64_t M, const int64_t *positions, int64_t slot,
                      const uint8_t *valid, int64_t valid_stride, float *work, int threads) {
    const int64_t C = d->hidden, D = d->head_dim, H = d->heads, G = d->groups, F = d->ffn;
    const int64_t qkv_size = (H + 2 * G) * D, wide = 2 * F > qkv_size ? 2 * F : qkv_size;
    const int64_t inner = F > H * D ? F : H * D; /* attention output, then the MLP's gated values */
    float *normed = work, *projected = normed + M * C, *mixed = projected + M * wide, *delta = mixed + M * inner;
    float *scratch = delta + M * C, *padded = scratch + ATTENTION_SCRATCH(d, slot + 1);
    for (int64_t m = 0; m < M; m++) rms_norm(x + m * C, b->attn_norm, normed + m * C, C, d->eps);
    if (linear(&b->qkv, normed, projected, M, padded, threads)) return -1;
    for (int64_t m = 0; m < M; m++) {
        float *q = projected + m * qkv_size, *k = q + H * D, *v = k + G * D;
        const float *cos_row = d->rope_cos + positions[m] * d->rotary_half;
        const float *sin_row = d->rope_sin + positions[m] * d->rotary_half;
        for (int64_t h = 0; h < H; h++) rotate(q + h * D, cos_row, sin_row, d->rotary_half);
        for (int64_t g = 0; g < G; g++) {
            rotate(k + g * D, cos_row, sin_row, d->rotary_half);
            const int64_t at = ((m * G + g) * d->cache_len + slot) * D;
            for (int64_t i = 0; i < D; i++) {
                store_element(b->keys, at + i, d->cache_bf16, k[g * D + i]);
                store_element(b->values, at + i, d->cache_bf16, v[g * D + i]);
            }
        }
        attend(d, b, m, q, slot, valid ? valid + m * valid_stride : 0, scratch, mixed + m * H * D, threads);
    }
    if (linear(&b->dense, mixed, delta, M, padded, threads)) return -1;
    for (int64_t i = 0; i < M * C; i++) x[i] += delta[i];
    for (int64_t m = 0; m < M; m++) rms_norm(x + m * C, b->mlp_norm, normed + m * C, C, d->eps);
    if (linear(&b->gate_up, normed, projected, M, padded, threads)) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < F; i++) {
            const float gate = projected[m * 2 * F + i], up = projected[m * 2 * F + F + i];
            mixed[m * F + i] = gate / (1.0f + expf(-gate)) * up;
        }
    if (linear(&b->down, mixed, delta, M, padded, threads)) return -1;
    for (int64_t i = 0; i < M * C; i++) x[i] += delta[i];
    return 0;
}

/* logits [M, vocab] for tokens [M] at rotary positions [M], written to cache slot `slot` of every block. `valid`
 * [M, valid_stride] marks the cache slots each row may attend to (NULL: all up to `slot`). Returns 0, -1 when a
 * buffer could not be allocated, -2 for a token, position or slot out of range. */
int glm_decode_step(const Decoder *d, const int64_t *tokens, const int64_t *positions, int64_t slot,
                    const uint8_t *valid, int64_t valid_stride, int64_t M, float *logits, int threads) {
    if (slot < 0 || slot >= d->cache_len) return -2;
    for (int64_t m = 0; m < M; m++)
        if (tokens[m] < 0 || tokens[m] >= d->vocab || positions[m] < 0 || positions[m] >= d->table_len) return -2;
    const int64_t C = d->hidden, qkv_size = (d->heads + 2 * d->groups) * d->head_dim;
    const int64_t wide = 2 * d->ffn > qkv_size ? 2 * d->ffn : qkv_size;
    const int64_t inner = d->ffn > d->heads * d->head_dim ? d->ffn : d->heads * d->head_dim;
    int64_t widest = C; /* the padded int8 input rows */
    for (int64_t n = 0; n < d->num_blocks; n++) {
        const Linear *all[4] = {&d->blocks[n].qkv, &d->blocks[n].dense, &d->blocks[n].gate_up, &d->blocks[n].down};
        for (int i = 0; i < 4; i++) widest = all[i]->stride > widest ? all[i]->stride : widest;
    }
    widest = d->output.stride > widest ? d->output.stride : widest;
    const int64_t work_size = M * (C + wide + inner + C) + ATTENTION_SCRATCH(d, slot + 1) + M * widest;
    float *x = malloc((size_t)(M * C) * sizeof *x), *work = malloc((size_t)work_size * sizeof *work);
    int status = x && work ? 0 : -1;
    for (int64_t m = 0; !status && m < M; m++)
        for (int64_t i = 0; i < C; i++) x[m * C + i] = load_element(d->embed, tokens[m] * C + i, (int)d->embed_bf16);
    for (int64_t n = 0; !status && n < d->num_blocks; n++)
        status = block_step(d, &d->blocks[n], x, M, positions, slot, valid, valid_stride, work, threads);
    if (!status) {
        for (int64_t m = 0; m < M; m++) rms_norm(x + m * C, d->final_norm, work + m * C, C, d->eps);
        status = linear(&d->output, work, logits, M, work + M * C, threads);
    }
    free(x);
    free(work);
    return status;
}
