/* Fused ONNX Runtime ops for the int8 graphs (domain ai.parley, CPU): the decoder step's
 * attention, norms, embeddings and top-k, and both graphs' integer GEMMs (Int8MatMul, below).
 *
 * A step runs at a few rows, where ONNX Runtime's dispatch of each node (0.2-0.3 us on a fast
 * CPU) weighs as much as the node's small kernel. Each layer's self-attention over its cache
 * and its cross-attention over its source were some fifteen nodes each (the split of the
 * projections, products, mask, softmax, slices, reshapes, the query grid's gathers), and each
 * post-norm block ended in three (the residual add, LayerNormalization, the next projection's
 * QuantizeLinear), the token and position embeddings took ten, and the top-k over the vocabulary
 * sixteen: one op each here, computing the same values in one pass over each row
 * (export.optimize.fuse_attention, fuse_add_norm_quantize, fuse_embedding and fuse_top_k put
 * them in).
 *
 * The ops' names, inputs and outputs are part of the package format (export.package's
 * FORMAT_VERSION): exported packages hold them, so a change to one is a new op (or version).
 *
 * DecoderSelfAttention(qkv, cache_k, cache_v, cache_mask) -> (attention, new_k, new_v)
 *   qkv (R, 1, 3 * H * dk): each row's query, new key and new value, projected together;
 *   cache_k (R, H, dk, C), keys transposed; cache_v (R, H, C, dk); cache_mask (R, C) bool,
 *   true at the slots a row has filled. Each row attends to its filled slots and to its own
 *   new key/value (not yet in the cache). attention (R, 1, H * dk); new_k (R, H, dk, 1) and
 *   new_v (R, H, 1, dk), the new key and value split into heads for the engine's cache.
 * DecoderCrossAttention(q, cross_k, cross_v, src_mask, slot_row, row_slot) -> q's shape
 *   q (R, ..., H * dk); cross_k (N, H, dk, S); cross_v (N, H, S, dk); src_mask (N, S) bool,
 *   true at real tokens; slot_row (N * W) and row_slot (R) int64, decoding.grid's layout:
 *   row r reads source row_slot[r] / W.
 * The queries carry the 1/sqrt(dk) scale already (export.optimize.fold_output_scales).
 * AddLayerNormQuantize, TokenEmbedding, RowTopK and Int8MatMul: below, with their kernels.
 *
 * This is a custom-op library: ONNX Runtime loads it (SessionOptions.register_custom_ops_library,
 * server.engine.session) and calls RegisterCustomOps; Python never imports it.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "onnxruntime_c_api.h"

/* Scores of one row and head live on the stack; export.optimize.FUSED_ATTENTION_POSITIONS is the same. */
#define MAX_POSITIONS 4096

static const OrtApi *ort;

typedef struct {
    const void *data;
    int64_t dims[4];
    size_t rank;
    ONNXTensorElementDataType type;
} Tensor;

static OrtStatus *error(const char *op, const char *message) {
    char text[256];
    snprintf(text, sizeof text, "%s: %s", op, message);
    return ort->CreateStatus(ORT_INVALID_ARGUMENT, text);
}

static OrtStatus *get_input(OrtKernelContext *context, size_t index, size_t rank, const char *op, Tensor *tensor) {
    const OrtValue *value;
    OrtTensorTypeAndShapeInfo *info;
    OrtStatus *status = ort->KernelContext_GetInput(context, index, &value);
    if (status || (status = ort->GetTensorTypeAndShape(value, &info)))
        return status;
    status = ort->GetTensorElementType(info, &tensor->type);
    if (!status)
        status = ort->GetDimensionsCount(info, &tensor->rank);
    if (!status && tensor->rank == rank)
        status = ort->GetDimensions(info, tensor->dims, rank);
    ort->ReleaseTensorTypeAndShapeInfo(info);
    if (status)
        return status;
    if (tensor->rank != rank) {
        char message[64];
        snprintf(message, sizeof message, "input %zu has rank %zu, expected %zu", index, tensor->rank, rank);
        return error(op, message);
    }
    return ort->GetTensorData(value, &tensor->data);
}

/* The inputs of an op over rows of its first input's last axis: each input's data and element
 * count, and the first input's shape. */
typedef struct {
    const void *data[8];
    size_t counts[8]; /* 0 for an optional input the node leaves out */
    int64_t dims[8], rows, d;
    size_t rank;
} RowInputs;

static OrtStatus *get_row_inputs(OrtKernelContext *context, size_t count, const char *op, RowInputs *in) {
    OrtStatus *status;
    for (size_t i = 0; i < count; i++) {
        const OrtValue *value;
        OrtTensorTypeAndShapeInfo *info;
        if ((status = ort->KernelContext_GetInput(context, i, &value)))
            return status;
        if (!value) { /* an optional input left out */
            in->data[i] = NULL;
            in->counts[i] = 0;
            continue;
        }
        if ((status = ort->GetTensorTypeAndShape(value, &info)))
            return status;
        status = ort->GetTensorShapeElementCount(info, &in->counts[i]);
        if (!status && i == 0)
            status = ort->GetDimensionsCount(info, &in->rank);
        if (!status && i == 0 && (in->rank < 1 || in->rank > 8))
            status = error(op, "the first input must have rank 1 to 8");
        if (!status && i == 0)
            status = ort->GetDimensions(info, in->dims, in->rank);
        ort->ReleaseTensorTypeAndShapeInfo(info);
        if (status || (status = ort->GetTensorData(value, &in->data[i])))
            return status;
    }
    in->d = in->dims[in->rank - 1];
    in->rows = in->d ? (int64_t)in->counts[0] / in->d : 0;
    return NULL;
}

/* Output `index`, of these dims, and where its data goes. */
static OrtStatus *get_output(OrtKernelContext *context, size_t index, const int64_t *dims, size_t rank, void **data) {
    OrtValue *value;
    OrtStatus *status = ort->KernelContext_GetOutput(context, index, dims, rank, &value);
    return status ? status : ort->GetTensorMutableData(value, data);
}

/* An attention's two products, over one query's positions: scores (n) = query (dk) . keys
 * (dk, stride), keys transposed, n <= stride; and out (dk) = first + the sum over valid positions
 * of weights[c] * scale * values[c] (n, dk), where first is own_weight * own_value, or zeros
 * without one. Each sum runs in one order whatever the block a position or dimension falls in,
 * so a row's result does not depend on the batch's widths. Two builds: portable C loops, and
 * AVX2 with FMA where the processor has them, unless the node's optional `kernels` attribute
 * says "portable" (to compare the two; exported graphs leave it out). */
typedef struct {
    void (*score)(const float *restrict query, const float *restrict keys, int64_t stride, int64_t n, int64_t dk,
                  float *restrict scores);
    void (*weigh)(const float *restrict weights, float scale, const unsigned char *restrict valid, int64_t n,
                  const float *restrict values, int64_t dk, const float *restrict own_value, float own_weight,
                  float *restrict out);
} Products;

static void score_portable(const float *restrict query, const float *restrict keys, int64_t stride, int64_t n,
                           int64_t dk, float *restrict scores) {
    for (int64_t c = 0; c < n; c++)
        scores[c] = 0.0f;
    for (int64_t d = 0; d < dk; d++) { /* keys transposed: each dimension's scores are contiguous */
        const float x = query[d], *restrict row = keys + d * stride;
        for (int64_t c = 0; c < n; c++)
            scores[c] += x * row[c];
    }
}

static void weigh_portable(const float *restrict weights, float scale, const unsigned char *restrict valid, int64_t n,
                           const float *restrict values, int64_t dk, const float *restrict own_value, float own_weight,
                           float *restrict out) {
    for (int64_t d = 0; d < dk; d++)
        out[d] = own_value ? own_weight * own_value[d] : 0.0f;
    for (int64_t c = 0; c < n; c++) {
        if (!valid[c])
            continue;
        const float p = weights[c] * scale, *restrict row = values + c * dk;
        for (int64_t d = 0; d < dk; d++)
            out[d] += p * row[d];
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma")))

/* The first `count` of 8 lanes (none when count <= 0), for the loads of a partial block. */
AVX2 static __m256i first_lanes(int64_t count) {
    const int32_t lanes = count < 0 ? 0 : count > 8 ? 8 : (int32_t)count;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* 16 positions at a time, their sums in two registers while the query's dimensions stream past.
 * A last block may read positions after n (their scores go unread), but masks its loads where it
 * would pass the keys' rows (the same FMAs, so the same sums). scores has room for a whole
 * last block. */
AVX2 static void score_avx2(const float *restrict query, const float *restrict keys, int64_t stride, int64_t n,
                            int64_t dk, float *restrict scores) {
    for (int64_t first = 0; first < n; first += 16) {
        const float *restrict block = keys + first;
        __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps();
        if (first + 16 <= stride) {
            for (int64_t d = 0; d < dk; d++) {
                const __m256 x = _mm256_broadcast_ss(query + d);
                low = _mm256_fmadd_ps(x, _mm256_loadu_ps(block + d * stride), low);
                high = _mm256_fmadd_ps(x, _mm256_loadu_ps(block + d * stride + 8), high);
            }
        } else {
            const __m256i low_lanes = first_lanes(stride - first), high_lanes = first_lanes(stride - first - 8);
            for (int64_t d = 0; d < dk; d++) {
                const __m256 x = _mm256_broadcast_ss(query + d);
                low = _mm256_fmadd_ps(x, _mm256_maskload_ps(block + d * stride, low_lanes), low);
                high = _mm256_fmadd_ps(x, _mm256_maskload_ps(block + d * stride + 8, high_lanes), high);
            }
        }
        _mm256_storeu_ps(scores + first, low);
        _mm256_storeu_ps(scores + first + 8, high);
    }
}

/* 32 dimensions at a time, their sums in four registers while the positions stream past. */
AVX2 static void weigh_avx2(const float *restrict weights, float scale, const unsigned char *restrict valid, int64_t n,
                            const float *restrict values, int64_t dk, const float *restrict own_value,
                            float own_weight, float *restrict out) {
    for (int64_t first = 0; first < dk; first += 32) {
        const int64_t left = dk - first;
        __m256i lanes[4];
        __m256 sums[4];
        for (int i = 0; i < 4; i++) {
            lanes[i] = first_lanes(left - 8 * i);
            sums[i] = own_value ? _mm256_mul_ps(_mm256_set1_ps(own_weight),
                                                _mm256_maskload_ps(own_value + first + 8 * i, lanes[i]))
                                : _mm256_setzero_ps();
        }
        for (int64_t c = 0; c < n; c++) {
            if (!valid[c])
                continue;
            const __m256 p = _mm256_set1_ps(weights[c] * scale);
            const float *restrict row = values + c * dk + first;
            if (left >= 32)
                for (int i = 0; i < 4; i++)
                    sums[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(row + 8 * i), sums[i]);
            else
                for (int i = 0; i < 4; i++)
                    sums[i] = _mm256_fmadd_ps(p, _mm256_maskload_ps(row + 8 * i, lanes[i]), sums[i]);
        }
        for (int i = 0; i < 4; i++)
            _mm256_maskstore_ps(out + first + 8 * i, lanes[i], sums[i]);
    }
}
#endif

/* The processor's best products. */
static Products best_products(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return (Products){score_avx2, weigh_avx2};
#endif
    return (Products){score_portable, weigh_portable};
}

/* What a node's kernel keeps: the products it runs (the AVX2 ones tell Int8MatMul too to run its
 * AVX2 kernel), and its epsilon attribute where it has one. */
typedef struct {
    Products products;
    float epsilon;
} KernelState;

/* One query against n positions: keys (dk, n) transposed, values (n, dk), valid (n); own_key and
 * own_value, when given, are one more position (the row's newest, always valid). The softmax
 * skips invalid positions, which the graph gave -inf scores, so their weight is 0 either way,
 * and positions after the last valid one (a source's padding, a cache's free slots) cost
 * nothing. */
static void attend(const Products *products, const float *restrict query, const float *restrict keys,
                   const float *restrict values, const unsigned char *restrict valid, int64_t n, int64_t dk,
                   const float *restrict own_key, const float *restrict own_value, float *restrict out) {
    float scores[MAX_POSITIONS + 16];
    const int64_t stride = n;
    while (n > 0 && !valid[n - 1])
        n--;
    products->score(query, keys, stride, n, dk, scores);
    float own = 0.0f;
    if (own_key)
        for (int64_t d = 0; d < dk; d++)
            own += query[d] * own_key[d];
    float top = own_key ? own : -INFINITY;
    for (int64_t c = 0; c < n; c++)
        if (valid[c] && scores[c] > top)
            top = scores[c];
    float sum = 0.0f;
    if (own_key)
        sum = own = expf(own - top);
    for (int64_t c = 0; c < n; c++) {
        scores[c] = valid[c] ? expf(scores[c] - top) : 0.0f;
        sum += scores[c];
    }
    const float scale = sum > 0.0f ? 1.0f / sum : 0.0f; /* a source of no tokens: zeros */
    products->weigh(scores, scale, valid, n, values, dk, own_value, own * scale, out);
}

typedef struct {
    const Products *products;
    const float *q, *keys, *values; /* self: q is qkv */
    const unsigned char *valid;
    const int64_t *row_slot;
    int64_t heads, dk, positions, width; /* width: the grid's cells per source (cross only) */
    float *out, *new_k, *new_v;
} Job;

static void self_row(void *data, size_t r) {
    const Job *job = data;
    const int64_t H = job->heads, dk = job->dk, C = job->positions, d = H * dk;
    const float *q = job->q + (int64_t)r * 3 * d, *k = q + d, *v = k + d;
    memcpy(job->new_k + r * d, k, d * sizeof *k); /* (H, dk, 1) and (H, 1, dk): the rows as they lie */
    memcpy(job->new_v + r * d, v, d * sizeof *v);
    for (int64_t h = 0; h < H; h++) {
        const int64_t rh = (int64_t)r * H + h;
        attend(job->products, q + h * dk, job->keys + rh * dk * C, job->values + rh * C * dk, job->valid + r * C, C, dk,
               k + h * dk, v + h * dk, job->out + rh * dk);
    }
}

static void cross_row(void *data, size_t r) {
    const Job *job = data;
    const int64_t H = job->heads, dk = job->dk, S = job->positions, n = job->row_slot[r] / job->width;
    for (int64_t h = 0; h < H; h++) {
        const int64_t nh = n * H + h, rh = (int64_t)r * H + h;
        attend(job->products, job->q + rh * dk, job->keys + nh * dk * S, job->values + nh * S * dk,
               job->valid + n * S, S, dk, NULL, NULL, job->out + rh * dk);
    }
}

static OrtStatus *run_rows(OrtKernelContext *context, void (*row)(void *, size_t), Job *job, int64_t rows) {
    if (rows == 0)
        return NULL;
    /* ONNX Runtime's intra-op threads share the rows (inline when the session has one thread). */
    return ort->KernelContext_ParallelFor(context, row, (size_t)rows, 0, job);
}

static OrtStatus *self_compute(void *kernel, OrtKernelContext *context) {
    const char *op = "DecoderSelfAttention";
    Tensor qkv, keys, values, mask;
    OrtStatus *status;
    if ((status = get_input(context, 0, 3, op, &qkv)) || (status = get_input(context, 1, 4, op, &keys)) ||
        (status = get_input(context, 2, 4, op, &values)) || (status = get_input(context, 3, 2, op, &mask)))
        return status;
    const int64_t R = qkv.dims[0], H = keys.dims[1], dk = keys.dims[2], C = keys.dims[3];
    const int64_t vv[4] = {R, H, C, dk};
    if (qkv.dims[1] != 1 || qkv.dims[2] != 3 * H * dk || keys.dims[0] != R || memcmp(values.dims, vv, sizeof vv) ||
        mask.dims[0] != R || mask.dims[1] != C)
        return error(op, "shapes disagree (qkv (R,1,3*H*dk); cache_k (R,H,dk,C); cache_v (R,H,C,dk); "
                         "cache_mask (R,C))");
    if (C > MAX_POSITIONS)
        return error(op, "more than 4096 cache slots");
    const int64_t attention[3] = {R, 1, H * dk}, one_k[4] = {R, H, dk, 1}, one_v[4] = {R, H, 1, dk};
    const KernelState *state = kernel;
    Job job = {&state->products, qkv.data, keys.data, values.data, mask.data, NULL, H, dk, C, 1, NULL, NULL, NULL};
    if ((status = get_output(context, 0, attention, 3, (void **)&job.out)) ||
        (status = get_output(context, 1, one_k, 4, (void **)&job.new_k)) ||
        (status = get_output(context, 2, one_v, 4, (void **)&job.new_v)))
        return status;
    return run_rows(context, self_row, &job, R);
}

static OrtStatus *cross_compute(void *kernel, OrtKernelContext *context) {
    const char *op = "DecoderCrossAttention";
    RowInputs q; /* its rows, of H * dk values each, in any shape (R, ..., H * dk) */
    Tensor keys, values, mask, slot_row, row_slot;
    OrtStatus *status;
    if ((status = get_row_inputs(context, 1, op, &q)) || (status = get_input(context, 1, 4, op, &keys)) ||
        (status = get_input(context, 2, 4, op, &values)) || (status = get_input(context, 3, 2, op, &mask)) ||
        (status = get_input(context, 4, 1, op, &slot_row)) || (status = get_input(context, 5, 1, op, &row_slot)))
        return status;
    const int64_t R = q.rows, N = keys.dims[0], H = keys.dims[1], dk = keys.dims[2], S = keys.dims[3];
    const int64_t vv[4] = {N, H, S, dk};
    if (q.d != H * dk || memcmp(values.dims, vv, sizeof vv) || mask.dims[0] != N || mask.dims[1] != S ||
        row_slot.dims[0] != R || (N > 0 && slot_row.dims[0] % N))
        return error(op, "shapes disagree (q (R,...,H*dk); cross_k (N,H,dk,S); cross_v (N,H,S,dk); "
                         "src_mask (N,S); slot_row (N*W); row_slot (R))");
    if (S > MAX_POSITIONS)
        return error(op, "more than 4096 source positions");
    const int64_t W = N > 0 ? slot_row.dims[0] / N : 1;
    const int64_t *cells = row_slot.data;
    for (int64_t r = 0; r < R; r++)
        if (W == 0 || cells[r] < 0 || cells[r] >= N * W)
            return error(op, "row_slot points outside the grid");
    const KernelState *state = kernel;
    Job job = {&state->products, q.data[0], keys.data, values.data, mask.data, cells, H, dk, S, W, NULL, NULL, NULL};
    if ((status = get_output(context, 0, q.dims, q.rank, (void **)&job.out)))
        return status;
    return run_rows(context, cross_row, &job, R);
}

/* AddLayerNormQuantize(x, residual, gamma, beta, scale, zero_point) -> (normalized, quantized)
 *   x, residual (..., d) float; gamma, beta (d); scale () float; zero_point () uint8; attribute
 *   epsilon. normalized = LayerNorm(x + residual) over the last axis, as ONNX Runtime computes
 *   it (float sums of the values and their squares); quantized = QuantizeLinear(normalized,
 *   scale, zero_point) as MLAS computes it (divide, clamp to the zero point's range, round
 *   half to even): a post-norm block's end, and the next projection's int8 input, in one op. */
typedef struct {
    const float *x, *residual, *gamma, *beta;
    float scale, epsilon;
    int zero_point;
    int64_t d;
    float *normalized;
    unsigned char *quantized;
} NormJob;

/* QuantizeLinear of n values to uint8 as MLAS computes it: divide by the scale, clamp to the
 * range the zero point leaves, convert rounding half to even, add the zero point. */
static void quantize(const float *restrict y, int64_t n, float scale, int zero_point, unsigned char *restrict q) {
    const float lowest = (float)-zero_point, highest = (float)(255 - zero_point);
    int64_t i = 0;
#if defined(__SSE2__)
    /* four at a time: the compiler leaves the scalar loop's clamps unvectorized */
    const __m128 scale4 = _mm_set1_ps(scale), lowest4 = _mm_set1_ps(lowest), highest4 = _mm_set1_ps(highest);
    const __m128i zero_point4 = _mm_set1_epi32(zero_point);
    for (; i + 4 <= n; i += 4) {
        const __m128 level = _mm_min_ps(_mm_max_ps(_mm_div_ps(_mm_loadu_ps(y + i), scale4), lowest4), highest4);
        const __m128i levels = _mm_add_epi32(_mm_cvtps_epi32(level), zero_point4);
        const __m128i halves = _mm_packs_epi32(levels, levels); /* 0..255 survive both packs */
        const int packed = _mm_cvtsi128_si32(_mm_packus_epi16(halves, halves));
        memcpy(q + i, &packed, 4);
    }
#endif
    for (; i < n; i++) {
        float level = y[i] / scale;
        level = level > lowest ? level : lowest;
        level = level < highest ? level : highest;
        /* round half to even, as the processor's conversion does: adding and taking away 1.5 x 2^23
         * leaves the nearest integer of any |level| < 2^22 */
        level = (level + 12582912.0f) - 12582912.0f;
        q[i] = (unsigned char)((int)level + zero_point);
    }
}

static void norm_row(void *data, size_t r) {
    const NormJob *job = data;
    const int64_t d = job->d;
    const float *restrict x = job->x + r * d, *restrict residual = job->residual + r * d;
    const float *restrict gamma = job->gamma, *restrict beta = job->beta;
    float *restrict y = job->normalized + r * d;
    float sum = 0.0f, squares = 0.0f;
    for (int64_t i = 0; i < d; i++) {
        y[i] = x[i] + residual[i];
        sum += y[i];
        squares += y[i] * y[i];
    }
    const float mean = sum / d, deviation = sqrtf(squares / d - mean * mean + job->epsilon);
    for (int64_t i = 0; i < d; i++)
        y[i] = (y[i] - mean) / deviation * gamma[i] + beta[i];
    quantize(y, d, job->scale, job->zero_point, job->quantized + r * d);
}

static OrtStatus *norm_compute(void *kernel, OrtKernelContext *context) {
    const char *op = "AddLayerNormQuantize";
    RowInputs in;
    OrtStatus *status = get_row_inputs(context, 6, op, &in);
    if (status)
        return status;
    if (in.counts[1] != in.counts[0] || (int64_t)in.counts[2] != in.d || (int64_t)in.counts[3] != in.d ||
        in.counts[4] != 1 || in.counts[5] != 1)
        return error(op, "shapes disagree (x, residual (..., d); gamma, beta (d); scale, zero_point scalars)");
    const KernelState *state = kernel;
    NormJob job = {in.data[0], in.data[1], in.data[2], in.data[3], *(const float *)in.data[4], state->epsilon,
                   *(const unsigned char *)in.data[5], in.d, NULL, NULL};
    if (!(job.scale > 0.0f))
        return error(op, "the scale must be positive");
    if ((status = get_output(context, 0, in.dims, in.rank, (void **)&job.normalized)) ||
        (status = get_output(context, 1, in.dims, in.rank, (void **)&job.quantized)))
        return status;
    return in.rows ? ort->KernelContext_ParallelFor(context, norm_row, (size_t)in.rows, 0, &job) : NULL;
}

/* TokenEmbedding(tokens (R) int64, positions (R) int64, table (V, d) int8 or float, row_scale (V, 1)
 *                float (int8 tables; absent for float ones), embed_scale () float,
 *                position_table (P, d) float, scale () float, zero_point () uint8)
 *   -> (embedded (R, 1, d) float, quantized (R, 1, d) uint8)
 *   embedded = table[token] (* row_scale[token]) * embed_scale + position_table[position], in
 *   that order, as the int8 export's (dequantizing) Gather, its Mul by sqrt(d) and the Add of the
 *   sinusoidal positions computed it; quantized = QuantizeLinear(embedded, scale, zero_point),
 *   the first projection's int8 input. A token or position out of range is an error, as
 *   ONNX Runtime's Gather makes it. */
typedef struct {
    const int64_t *tokens, *positions;
    const void *table;
    const float *row_scale, *position_table;
    float embed_scale, scale;
    int zero_point;
    int64_t d;
    float *embedded;
    unsigned char *quantized;
} EmbedJob;

static void embed_row(void *data, size_t r) {
    const EmbedJob *job = data;
    const int64_t d = job->d, token = job->tokens[r];
    const float *restrict position = job->position_table + job->positions[r] * d;
    const float embed_scale = job->embed_scale;
    float *restrict y = job->embedded + r * d;
    if (job->row_scale) {
        const signed char *restrict row = (const signed char *)job->table + token * d;
        const float row_scale = job->row_scale[token];
        for (int64_t i = 0; i < d; i++)
            y[i] = (float)row[i] * row_scale * embed_scale + position[i];
    } else {
        const float *restrict row = (const float *)job->table + token * d;
        for (int64_t i = 0; i < d; i++)
            y[i] = row[i] * embed_scale + position[i];
    }
    quantize(y, d, job->scale, job->zero_point, job->quantized + r * d);
}

static OrtStatus *embed_compute(void *kernel, OrtKernelContext *context) {
    (void)kernel;
    const char *op = "TokenEmbedding";
    Tensor tokens, positions, table, row_scale = {0}, embed_scale, position_table, scale, zero_point;
    const OrtValue *scales;
    OrtStatus *status;
    if ((status = get_input(context, 0, 1, op, &tokens)) || (status = get_input(context, 1, 1, op, &positions)) ||
        (status = get_input(context, 2, 2, op, &table)) ||
        (status = ort->KernelContext_GetInput(context, 3, &scales)) ||
        (scales && (status = get_input(context, 3, 2, op, &row_scale))) ||
        (status = get_input(context, 4, 0, op, &embed_scale)) ||
        (status = get_input(context, 5, 2, op, &position_table)) || (status = get_input(context, 6, 0, op, &scale)) ||
        (status = get_input(context, 7, 0, op, &zero_point)))
        return status;
    if (table.type != (scales ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT))
        return error(op, "the table must be int8 with row scales, or float without");
    const int64_t R = tokens.dims[0], V = table.dims[0], d = table.dims[1], P = position_table.dims[0];
    if (positions.dims[0] != R || (scales && (row_scale.dims[0] != V || row_scale.dims[1] != 1)) ||
        position_table.dims[1] != d)
        return error(op, "shapes disagree (tokens, positions (R); table (V, d); row_scale (V, 1); "
                         "position_table (P, d))");
    const int64_t *token = tokens.data, *position = positions.data;
    for (int64_t r = 0; r < R; r++)
        if (token[r] < 0 || token[r] >= V || position[r] < 0 || position[r] >= P) {
            char message[160];
            snprintf(message, sizeof message, "row %lld has token %lld at position %lld; the model has %lld tokens "
                     "and %lld positions", (long long)r, (long long)token[r], (long long)position[r],
                     (long long)V, (long long)P);
            return error(op, message);
        }
    EmbedJob job = {token, position, table.data, row_scale.data, position_table.data,
                    *(const float *)embed_scale.data, *(const float *)scale.data,
                    *(const unsigned char *)zero_point.data, d, NULL, NULL};
    if (!(job.scale > 0.0f))
        return error(op, "the scale must be positive");
    const int64_t dims[3] = {R, 1, d};
    if ((status = get_output(context, 0, dims, 3, (void **)&job.embedded)) ||
        (status = get_output(context, 1, dims, 3, (void **)&job.quantized)))
        return status;
    return R ? ort->KernelContext_ParallelFor(context, embed_row, (size_t)R, 0, &job) : NULL;
}

/* RowTopK(x (R, V) float, k (1) or () int64) -> (values (R, K) float, indices (R, K) int64)
 *   K = min(k, V): each row's K largest entries, largest first, equal ones in index order
 *   (ONNX TopK's order), found in two stages: the maxima of blocks of 64 entries, the K blocks
 *   with the largest (equal maxima: the lower block first), then the K largest of their
 *   entries. Every entry of the top K lies in one of those blocks (each holds an entry at
 *   least as large and, on a tie, of a lower index). */
#define TOP_K_BLOCK 64

typedef struct {
    const float *x;
    int64_t V, K, blocks;
    float *maxima; /* blocks per row, scratch */
    int64_t *chosen; /* min(K, blocks) per row, scratch */
    float *values;
    int64_t *indices;
} TopKJob;

/* Insert (value, index) into the n best so far (largest first; the list holds at most size),
 * after those of an equal value: indices arrive in ascending order. Returns the new n. */
static int64_t keep_best(float *values, int64_t *indices, int64_t n, int64_t size, float value, int64_t index) {
    if (n == size && !(value > values[n - 1]))
        return n;
    int64_t at = n < size ? n : n - 1;
    while (at > 0 && value > values[at - 1]) {
        values[at] = values[at - 1];
        indices[at] = indices[at - 1];
        at--;
    }
    values[at] = value;
    indices[at] = index;
    return n < size ? n + 1 : n;
}

static float block_max(const float *restrict x, int64_t n) {
    float top = x[0];
    int64_t i = 1;
#if defined(__SSE2__)
    if (n >= 8) {
        __m128 top4 = _mm_loadu_ps(x);
        for (i = 4; i + 4 <= n; i += 4)
            top4 = _mm_max_ps(top4, _mm_loadu_ps(x + i));
        float lanes[4];
        _mm_storeu_ps(lanes, top4);
        top = lanes[0];
        for (int j = 1; j < 4; j++)
            top = lanes[j] > top ? lanes[j] : top;
    }
#endif
    for (; i < n; i++)
        top = x[i] > top ? x[i] : top;
    return top;
}

static void top_k_row(void *data, size_t r) {
    const TopKJob *job = data;
    const int64_t V = job->V, K = job->K, blocks = job->blocks, picked = K < blocks ? K : blocks;
    const float *x = job->x + r * V;
    float *maxima = job->maxima + r * blocks, *values = job->values + r * K;
    int64_t *chosen = job->chosen + r * picked, *indices = job->indices + r * K;
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t first = b * TOP_K_BLOCK, size = V - first < TOP_K_BLOCK ? V - first : TOP_K_BLOCK;
        maxima[b] = block_max(x + first, size);
    }
    /* the K best blocks, then in index order, so that their entries arrive in index order */
    float *best = values; /* values' room is free until the entries' pass, and K >= picked */
    int64_t n = 0;
    for (int64_t b = 0; b < blocks; b++)
        n = keep_best(best, chosen, n, picked, maxima[b], b);
    for (int64_t i = 1; i < picked; i++) {
        const int64_t block = chosen[i];
        int64_t j = i;
        for (; j > 0 && chosen[j - 1] > block; j--)
            chosen[j] = chosen[j - 1];
        chosen[j] = block;
    }
    n = 0;
    for (int64_t c = 0; c < picked; c++) {
        const int64_t first = chosen[c] * TOP_K_BLOCK, last = first + TOP_K_BLOCK < V ? first + TOP_K_BLOCK : V;
        for (int64_t i = first; i < last; i++)
            n = keep_best(values, indices, n, K, x[i], i);
    }
}

static OrtStatus *top_k_compute(void *kernel, OrtKernelContext *context) {
    (void)kernel;
    const char *op = "RowTopK";
    RowInputs in;
    OrtStatus *status = get_row_inputs(context, 2, op, &in);
    if (status)
        return status;
    if (in.rank != 2)
        return error(op, "x must be (rows, entries)");
    if (in.counts[1] != 1 || *(const int64_t *)in.data[1] < 0)
        return error(op, "k must be one integer >= 0");
    const int64_t R = in.rows, V = in.d, k = *(const int64_t *)in.data[1], K = k < V ? k : V;
    const int64_t blocks = (V + TOP_K_BLOCK - 1) / TOP_K_BLOCK, out_dims[2] = {R, K};
    TopKJob job = {in.data[0], V, K, blocks, NULL, NULL, NULL, NULL};
    if ((status = get_output(context, 0, out_dims, 2, (void **)&job.values)) ||
        (status = get_output(context, 1, out_dims, 2, (void **)&job.indices)))
        return status;
    if (R == 0 || K == 0)
        return NULL;
    job.maxima = malloc((size_t)(R * blocks) * sizeof *job.maxima);
    job.chosen = malloc((size_t)(R * (K < blocks ? K : blocks)) * sizeof *job.chosen);
    if (job.maxima && job.chosen)
        status = ort->KernelContext_ParallelFor(context, top_k_row, (size_t)R, 0, &job);
    else
        status = ort->CreateStatus(ORT_FAIL, "RowTopK: out of memory");
    free(job.maxima);
    free(job.chosen);
    return status;
}

/* Int8MatMul(a, b, a_scale, b_scale, a_zero_point, b_column_sums, bias) -> y
 *   A projection's integer GEMM for weights of 7 bits, MatMulIntegerToFloat's inputs in its
 *   order (b's column sums where it takes b's zero point): a (..., K) uint8; b the (K, N) int8
 *   weight packed by export.optimize.pack_int8_matmuls as (N / 16, K / 4, 64), each block of 16
 *   columns a run of K / 4 steps of 4 inputs x 16 columns (columns 0-7, then 8-15, 4 inputs
 *   each), zero-padded to whole blocks and steps, |b| <= 63; a_scale (float) and a_zero_point
 *   (uint8), one value or one per row of a; b_scale (N); b_column_sums (N) int32, the sums of
 *   b's columns; bias (N), optional.
 *   y (..., N) = (a . b - a_zero_point x b_column_sums) x a_scale x b_scale + bias.
 *   ONNX Runtime's MLAS ran these GEMMs at 8-47 GMAC/s on 1-4 rows (its packing and per-block
 *   costs) and ~60-65 on 32; this kernel holds 4 rows x 16 columns of sums in eight registers
 *   while the inputs stream past, and in a decoding step runs at MLAS's speed at 32 rows and
 *   faster at a few (bench/PERFORMANCE.md). VPMADDUBSW sums pairs of u8 x s8 products in int16,
 *   which 7-bit weights keep from saturating (2 x 255 x 63 < 32768): the sums are exact, and so
 *   the same as the portable loops', as is the scaling (one FMA a value in both). The portable
 *   loops, for processors without AVX2, are much slower than ONNX Runtime's GEMM there. */
#define GEMM_ROWS 4 /* rows a block of sums holds */
#define GEMM_COLUMNS 16 /* columns a packed block holds */
#define GEMM_PREFETCH 1024 /* bytes of weights ahead: a hint, so reads past the last block do no harm */
#define GEMM_BLOCKS_PER_TASK 4 /* a task's columns: 64, 16 KB of weights at K = 256, shared by its rows */

typedef struct {
    const unsigned char *a;
    const signed char *b;
    const float *a_scale, *b_scale, *bias;
    const unsigned char *a_zero_point;
    const int32_t *column_sums;
    int64_t rows, K, N, steps, blocks; /* steps: K / 4 rounded up; blocks: N / 16 rounded up */
    int per_row_scale, per_row_zero_point, vector;
    float *y;
} GemmJob;

/* Inputs k .. k + 3 of a row as one int32, zeros past K. */
static int32_t four_inputs(const unsigned char *row, int64_t k, int64_t K) {
    unsigned char bytes[4] = {0, 0, 0, 0};
    memcpy(bytes, row + k, (size_t)(K - k < 4 ? K - k : 4));
    int32_t word;
    memcpy(&word, bytes, 4);
    return word;
}

/* y[m, n .. n + width) from row m's integer sums of those columns, one FMA a value. */
static void gemm_scale(const GemmJob *job, int64_t m, int64_t n, int64_t width, const int32_t *sums) {
    const float a_scale = job->a_scale[job->per_row_scale ? m : 0];
    const int32_t zero_point = job->a_zero_point[job->per_row_zero_point ? m : 0];
    float *y = job->y + m * job->N + n;
    for (int64_t c = 0; c < width; c++) {
        const float product = (float)(sums[c] - zero_point * job->column_sums[n + c]);
        y[c] = fmaf(product, a_scale * job->b_scale[n + c], job->bias ? job->bias[n + c] : 0.0f);
    }
}

static void gemm_block_portable(const GemmJob *job, int64_t row, int64_t count, int64_t j) {
    const signed char *block = job->b + j * job->steps * 64;
    const int64_t n = j * GEMM_COLUMNS, width = job->N - n < GEMM_COLUMNS ? job->N - n : GEMM_COLUMNS;
    for (int64_t r = 0; r < count; r++) {
        const unsigned char *a = job->a + (row + r) * job->K;
        int32_t sums[GEMM_COLUMNS] = {0};
        for (int64_t step = 0; step < job->steps; step++)
            for (int c = 0; c < GEMM_COLUMNS; c++)
                for (int i = 0; i < 4 && step * 4 + i < job->K; i++)
                    sums[c] += a[step * 4 + i] * block[step * 64 + c * 4 + i];
        gemm_scale(job, row + r, n, width, sums);
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
/* One step of four inputs for row r: word holds its four inputs. */
#define GEMM_STEP(r, word)                                                                                      \
    do {                                                                                                      \
        const __m256i x = _mm256_set1_epi32(word);                                                            \
        low[r] = _mm256_add_epi32(low[r], _mm256_madd_epi16(_mm256_maddubs_epi16(x, b_low), ones));          \
        high[r] = _mm256_add_epi32(high[r], _mm256_madd_epi16(_mm256_maddubs_epi16(x, b_high), ones));       \
    } while (0)

/* gemm_scale's arithmetic on eight columns' sums held in a register. */
AVX2 static inline __attribute__((always_inline)) void gemm_scale_avx2(const GemmJob *job, int64_t m, int64_t n,
                                                                       __m256i sums) {
    const __m256i zero_point = _mm256_set1_epi32(job->a_zero_point[job->per_row_zero_point ? m : 0]);
    const __m256 a_scale = _mm256_set1_ps(job->a_scale[job->per_row_scale ? m : 0]);
    const __m256i product =
        _mm256_sub_epi32(sums, _mm256_mullo_epi32(zero_point, _mm256_loadu_si256((const __m256i *)(job->column_sums + n))));
    const __m256 bias = job->bias ? _mm256_loadu_ps(job->bias + n) : _mm256_setzero_ps();
    _mm256_storeu_ps(job->y + m * job->N + n, _mm256_fmadd_ps(_mm256_cvtepi32_ps(product),
                                                             _mm256_mul_ps(a_scale, _mm256_loadu_ps(job->b_scale + n)), bias));
}

/* `count` rows (a constant where this is inlined, so the sums stay in registers) by block j's
 * 16 columns. */
AVX2 static inline __attribute__((always_inline)) void gemm_rows_avx2(const GemmJob *job, int64_t row, int count,
                                                                      int64_t j) {
    const int64_t K = job->K, whole = K / 4; /* steps whose four inputs all lie in the row */
    const signed char *block = job->b + j * job->steps * 64;
    const unsigned char *a = job->a + row * K;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i low[GEMM_ROWS], high[GEMM_ROWS];
    for (int r = 0; r < count; r++)
        low[r] = high[r] = _mm256_setzero_si256();
    for (int64_t step = 0; step < whole; step++) {
        _mm_prefetch((const char *)(block + step * 64 + GEMM_PREFETCH), _MM_HINT_T0);
        const __m256i b_low = _mm256_loadu_si256((const __m256i *)(block + step * 64));
        const __m256i b_high = _mm256_loadu_si256((const __m256i *)(block + step * 64 + 32));
        for (int r = 0; r < count; r++) {
            int32_t word;
            memcpy(&word, a + r * K + step * 4, 4);
            GEMM_STEP(r, word);
        }
    }
    if (whole < job->steps) { /* the last inputs, fewer than four */
        const __m256i b_low = _mm256_loadu_si256((const __m256i *)(block + whole * 64));
        const __m256i b_high = _mm256_loadu_si256((const __m256i *)(block + whole * 64 + 32));
        for (int r = 0; r < count; r++)
            GEMM_STEP(r, four_inputs(a + r * K, whole * 4, K));
    }
    const int64_t n = j * GEMM_COLUMNS;
    for (int r = 0; r < count; r++) {
        if (n + GEMM_COLUMNS <= job->N) {
            gemm_scale_avx2(job, row + r, n, low[r]);
            gemm_scale_avx2(job, row + r, n + 8, high[r]);
        } else { /* the last block, part padding */
            int32_t sums[GEMM_COLUMNS];
            _mm256_storeu_si256((__m256i *)sums, low[r]);
            _mm256_storeu_si256((__m256i *)(sums + 8), high[r]);
            gemm_scale(job, row + r, n, job->N - n, sums);
        }
    }
}

AVX2 static void gemm_block_avx2(const GemmJob *job, int64_t row, int64_t count, int64_t j) {
    switch (count) {
    case 1: gemm_rows_avx2(job, row, 1, j); break;
    case 2: gemm_rows_avx2(job, row, 2, j); break;
    case 3: gemm_rows_avx2(job, row, 3, j); break;
    default: gemm_rows_avx2(job, row, 4, j); break;
    }
}
#endif

/* A task: GEMM_BLOCKS_PER_TASK blocks of columns, for every row. */
static void gemm_task(void *data, size_t task) {
    const GemmJob *job = data;
    const int64_t first = (int64_t)task * GEMM_BLOCKS_PER_TASK;
    const int64_t last = first + GEMM_BLOCKS_PER_TASK < job->blocks ? first + GEMM_BLOCKS_PER_TASK : job->blocks;
    for (int64_t row = 0; row < job->rows; row += GEMM_ROWS) {
        const int64_t count = job->rows - row < GEMM_ROWS ? job->rows - row : GEMM_ROWS;
        for (int64_t j = first; j < last; j++) {
#if defined(__x86_64__) && defined(__GNUC__)
            if (job->vector) {
                gemm_block_avx2(job, row, count, j);
                continue;
            }
#endif
            gemm_block_portable(job, row, count, j);
        }
    }
}

static OrtStatus *gemm_compute(void *kernel, OrtKernelContext *context) {
    const char *op = "Int8MatMul";
    RowInputs in;
    OrtStatus *status = get_row_inputs(context, 7, op, &in);
    if (status)
        return status;
    const int64_t rows = in.rows, K = in.d, N = (int64_t)in.counts[3];
    const int64_t steps = (K + 3) / 4, blocks = (N + GEMM_COLUMNS - 1) / GEMM_COLUMNS;
    if ((int64_t)in.counts[1] != blocks * steps * 64 || (int64_t)in.counts[5] != N || (in.data[6] && (int64_t)in.counts[6] != N))
        return error(op, "shapes disagree (a (..., K); b packed (N/16, K/4, 64); b_scale, b_column_sums, bias (N))");
    if ((in.counts[2] != 1 && (int64_t)in.counts[2] != rows) || (in.counts[4] != 1 && (int64_t)in.counts[4] != rows))
        return error(op, "a_scale and a_zero_point take one value or one per row of a");
    int64_t dims[8];
    memcpy(dims, in.dims, in.rank * sizeof *dims);
    dims[in.rank - 1] = N;
    const KernelState *state = kernel;
    GemmJob job = {in.data[0], in.data[1], in.data[2], in.data[3], in.data[6], in.data[4], in.data[5],
                   rows, K, N, steps, blocks, in.counts[2] != 1, in.counts[4] != 1,
                   state->products.score != score_portable, NULL};
    if ((status = get_output(context, 0, dims, in.rank, (void **)&job.y)))
        return status;
    const int64_t tasks = (blocks + GEMM_BLOCKS_PER_TASK - 1) / GEMM_BLOCKS_PER_TASK;
    return rows && tasks ? ort->KernelContext_ParallelFor(context, gemm_task, (size_t)tasks, 0, &job) : NULL;
}

/* What ONNX Runtime asks of each op, as data: one set of callbacks reads it for every op. */
#define FLOAT ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
#define BOOL ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL
#define INT64 ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
#define UINT8 ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
#define INT8 ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8
#define INT32 ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32
#define ANY ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED /* the kernel checks the type it gets */

typedef struct {
    OrtCustomOp op; /* first: the callbacks get a pointer to it, and so to the whole spec */
    const char *name;
    size_t inputs, outputs;
    ONNXTensorElementDataType input_types[8], output_types[3];
    OrtStatus *(*compute)(void *, OrtKernelContext *);
    int has_epsilon; /* the node has an epsilon attribute, which its kernel keeps */
    unsigned optional_inputs; /* bit i: input i may be absent ("" in the node) */
} OpSpec;

static OpSpec specs[] = {
    {.name = "DecoderSelfAttention", .inputs = 4, .outputs = 3, .input_types = {FLOAT, FLOAT, FLOAT, BOOL},
     .output_types = {FLOAT, FLOAT, FLOAT}, .compute = self_compute},
    {.name = "DecoderCrossAttention", .inputs = 6, .outputs = 1,
     .input_types = {FLOAT, FLOAT, FLOAT, BOOL, INT64, INT64}, .output_types = {FLOAT}, .compute = cross_compute},
    {.name = "AddLayerNormQuantize", .inputs = 6, .outputs = 2,
     .input_types = {FLOAT, FLOAT, FLOAT, FLOAT, FLOAT, UINT8}, .output_types = {FLOAT, UINT8},
     .compute = norm_compute, .has_epsilon = 1},
    {.name = "TokenEmbedding", .inputs = 8, .outputs = 2,
     .input_types = {INT64, INT64, ANY, FLOAT, FLOAT, FLOAT, FLOAT, UINT8}, .output_types = {FLOAT, UINT8},
     .compute = embed_compute, .optional_inputs = 1 << 3},
    {.name = "RowTopK", .inputs = 2, .outputs = 2, .input_types = {FLOAT, INT64}, .output_types = {FLOAT, INT64},
     .compute = top_k_compute},
    {.name = "Int8MatMul", .inputs = 7, .outputs = 1, .input_types = {UINT8, INT8, FLOAT, FLOAT, UINT8, INT32, FLOAT},
     .output_types = {FLOAT}, .compute = gemm_compute, .optional_inputs = 1 << 6},
};

static const OpSpec *spec_of(const OrtCustomOp *op) { return (const OpSpec *)op; }
static const char *op_name(const OrtCustomOp *op) { return spec_of(op)->name; }
static const char *cpu(const OrtCustomOp *op) {
    (void)op;
    return "CPUExecutionProvider";
}
static size_t input_count(const OrtCustomOp *op) { return spec_of(op)->inputs; }
static size_t output_count(const OrtCustomOp *op) { return spec_of(op)->outputs; }
static ONNXTensorElementDataType input_type(const OrtCustomOp *op, size_t index) {
    return spec_of(op)->input_types[index];
}
static ONNXTensorElementDataType output_type(const OrtCustomOp *op, size_t index) {
    return spec_of(op)->output_types[index];
}
static OrtCustomOpInputOutputCharacteristic input_characteristic(const OrtCustomOp *op, size_t index) {
    return spec_of(op)->optional_inputs >> index & 1 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
static OrtCustomOpInputOutputCharacteristic required(const OrtCustomOp *op, size_t index) {
    (void)op, (void)index;
    return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType default_memory(const OrtCustomOp *op, size_t index) {
    (void)op, (void)index;
    return OrtMemTypeDefault;
}
/* The products a node asked for: its `kernels` attribute, "portable", or none (the best). */
static OrtStatus *chosen_products(const OrtApi *api, const OrtKernelInfo *info, Products *products) {
    char kernels[16];
    size_t size = sizeof kernels;
    OrtStatus *missing = api->KernelInfoGetAttribute_string(info, "kernels", kernels, &size);
    *products = best_products();
    if (missing)
        api->ReleaseStatus(missing);
    else if (!strcmp(kernels, "portable"))
        *products = (Products){score_portable, weigh_portable};
    else
        return api->CreateStatus(ORT_INVALID_ARGUMENT, "the kernels attribute must be \"portable\" or absent");
    return NULL;
}

static OrtStatus *create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
    KernelState *state = calloc(1, sizeof *state);
    if (!state)
        return api->CreateStatus(ORT_FAIL, "out of memory");
    OrtStatus *status = chosen_products(api, info, &state->products);
    if (!status && spec_of(op)->has_epsilon)
        status = api->KernelInfoGetAttribute_float(info, "epsilon", &state->epsilon);
    if (status)
        free(state);
    else
        *kernel = state;
    return status;
}
static void destroy_kernel(void *kernel) { free(kernel); }

/* One domain for every session: it must outlive them all. Sessions are opened (and libraries
 * registered) on one thread at a time in Parley: an engine's start, a lane's start. */
static OrtCustomOpDomain *domain;

static void describe(OpSpec *spec) {
    OrtCustomOp *op = &spec->op;
    memset(op, 0, sizeof *op);
    op->version = 16; /* the struct's members up to KernelComputeV2; ONNX Runtime reads no further */
    op->GetName = op_name;
    op->GetExecutionProviderType = cpu;
    op->GetInputType = input_type;
    op->GetInputTypeCount = input_count;
    op->GetOutputType = output_type;
    op->GetOutputTypeCount = output_count;
    op->KernelDestroy = destroy_kernel;
    op->GetInputCharacteristic = input_characteristic;
    op->GetOutputCharacteristic = required;
    op->GetInputMemoryType = default_memory;
    op->CreateKernelV2 = create_kernel;
    op->KernelComputeV2 = spec->compute;
}

OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *api_base) {
    if (!domain) {
        const OrtApi *api = api_base->GetApi(ORT_API_VERSION);
        if (!api) {
            fprintf(stderr, "Parley's fused ops need ONNX Runtime API version %d (onnxruntime 1.%d or newer); "
                            "this one is %s\n", ORT_API_VERSION, ORT_API_VERSION, api_base->GetVersionString());
            return NULL; /* no status without an API: sessions of graphs that use the ops fail to load */
        }
        ort = api;
        OrtCustomOpDomain *created;
        OrtStatus *status = ort->CreateCustomOpDomain("ai.parley", &created);
        for (size_t i = 0; !status && i < sizeof specs / sizeof *specs; i++) {
            describe(&specs[i]);
            status = ort->CustomOpDomain_Add(created, &specs[i].op);
        }
        if (status)
            return status;
        domain = created;
    }
    return ort->AddCustomOpDomain(options, domain);
}
