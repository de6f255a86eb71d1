/* The CPU kernels (loaded by rwkv_lm/cpu_kernels.py): matrix-vector products for decoding (rwkv_lm.fast)
 * and the WKV-7 recurrence for inference (rwkv_lm/ops/wkv7/cpu.py).
 *
 * Decoding one token is bound by streaming the weights from memory, once per token: each kernel reads a
 * weight row-major ([out, in], as nn.Linear stores it) in one sequential pass, split between threads by
 * rows. Compiled with the ISA the CPU reports; the bf16 kernel only where it has avx512_bf16. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BATCH 16

/* fp32: y[b, o] = sum_i W[o, i] * x[b, i]; `in` a multiple of 16, `out` of ROWS when batch > 1.
 * One row: a single stream per thread keeps the hardware prefetcher at full speed (interleaving rows
 * of W cost up to a third of the bandwidth). A batch: ROWS rows of W against BATCH_BLOCK rows of x at
 * once, so each weight load feeds several FMAs and the step becomes compute-bound. */
#define ROWS 4 /* sum4 reduces one tile column */
/* 24 accumulators, 6 rows of x and a row of W fill 31 of the 32 registers: 10 loads per 24 FMAs where 4 rows
 * of x took 8 per 16 (B=16 products 7-15% faster) */
#define BATCH_BLOCK 6

static float dot_f32(const float *w, const float *x, int64_t in) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(); /* two chains hide FMA latency */
    int64_t i = 0;
    for (; i + 32 <= in; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), acc1);
    }
    if (i < in) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), acc0);
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/* the sums of four vectors as the four lanes of one: a shuffle tree, a quarter of four full reductions'
 * instructions (at width 768 those cost a sixth of the tile's time) */
static inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512d d0 = _mm512_castps_pd(t0), d1 = _mm512_castps_pd(t1);
    __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d0, d1)), _mm512_castpd_ps(_mm512_unpackhi_pd(d0, d1)));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* a tile is compute-bound: the hardware prefetcher alone falls behind on its four rows, so it prefetches the
 * next tile's rows into L1 and those L2_AHEAD tiles on into L2 itself (B=16 products from memory 56 -> ~80
 * GFLOP/s on one core, 111 when the weight is in cache) */
#define L2_AHEAD 8
static inline __attribute__((always_inline)) void tile_f32(const float *w, const float *x, float *y,
                                                           int64_t in, int64_t out, int batch) {
    const float *next = w + ROWS * in, *later = w + L2_AHEAD * ROWS * in;
    __m512 acc[ROWS][BATCH_BLOCK];
    for (int r = 0; r < ROWS; r++)
        for (int b = 0; b < batch; b++) acc[r][b] = _mm512_setzero_ps();
    for (int64_t i = 0; i < in; i += 16) {
        for (int r = 0; r < ROWS; r++) {
            _mm_prefetch((const char *)(next + r * in + i), _MM_HINT_T0);
            _mm_prefetch((const char *)(later + r * in + i), _MM_HINT_T1);
        }
        __m512 xv[BATCH_BLOCK];
        for (int b = 0; b < batch; b++) xv[b] = _mm512_loadu_ps(x + b * in + i);
        for (int r = 0; r < ROWS; r++) {
            __m512 wv = _mm512_loadu_ps(w + r * in + i);
            for (int b = 0; b < batch; b++) acc[r][b] = _mm512_fmadd_ps(wv, xv[b], acc[r][b]);
        }
    }
    for (int b = 0; b < batch; b++) _mm_storeu_ps(y + b * out, sum4(acc[0][b], acc[1][b], acc[2][b], acc[3][b]));
}

int gemv_f32(const float *W, const float *x, float *y, int64_t out, int64_t in, int64_t batch, int threads) {
    if (in % 16 || (batch > 1 && out % ROWS) || batch > MAX_BATCH) return 1;
    if (batch == 1) {
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t o = 0; o < out; o++) y[o] = dot_f32(W + o * in, x, in);
        return 0;
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out; o += ROWS) {
        const float *w = W + o * in;
        int64_t b = 0;
        for (; b + BATCH_BLOCK <= batch; b += BATCH_BLOCK) tile_f32(w, x + b * in, y + b * out + o, in, out, BATCH_BLOCK);
        switch (batch - b) { /* constant block sizes, so the tile's loops unroll into registers */
            case 5: tile_f32(w, x + b * in, y + b * out + o, in, out, 5); break;
            case 4: tile_f32(w, x + b * in, y + b * out + o, in, out, 4); break;
            case 3: tile_f32(w, x + b * in, y + b * out + o, in, out, 3); break;
            case 2: tile_f32(w, x + b * in, y + b * out + o, in, out, 2); break;
            case 1: tile_f32(w, x + b * in, y + b * out + o, in, out, 1); break;
        }
    }
    return 0;
}

/* The WKV-7 recurrence (ops/wkv7/naive.py) token by token, for inference: per head and token,
 *   sa = S a;  S = S diag(w) + sa b^T + v k^T;  y = S r
 * with S [n, n] (value x key) updated in place, row by row, so a head's state stays in L1 for the whole
 * sequence (the first token reads S, the rest S_new): at prompt lengths this beats the chunked torch op
 * several times over, and a decode step is the same call with len = 1. S, S_new [batch, heads, n, n] (S_new
 * may be S); r, w (the decay itself, not its log), k, v, a, b, y [batch, len, heads, n]; n a multiple of 16.
 * Heads are split between threads. */
static void wkv7_token(const float *S, float *S_new, const float *r, const float *w, const float *k, const float *v,
                       const float *a, const float *b, float *y, int64_t n, int stream) {
    for (int64_t i = 0; i < n; i++) {
        const float *s = S + i * n;
        float *s_new = S_new + i * n;
        __m512 sa = _mm512_set1_ps(dot_f32(s, a, n)), vi = _mm512_set1_ps(v[i]), acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            __m512 sj = _mm512_mul_ps(_mm512_loadu_ps(s + j), _mm512_loadu_ps(w + j));
            sj = _mm512_fmadd_ps(sa, _mm512_loadu_ps(b + j), sj);
            sj = _mm512_fmadd_ps(vi, _mm512_loadu_ps(k + j), sj);
            if (stream) _mm512_stream_ps(s_new + j, sj);
            else _mm512_storeu_ps(s_new + j, sj);
            acc = _mm512_fmadd_ps(sj, _mm512_loadu_ps(r + j), acc);
        }
        y[i] = _mm512_reduce_add_ps(acc);
    }
}

int wkv7_f32(const float *S, float *S_new, const float *r, const float *w, const float *k, const float *v,
             const float *a, const float *b, float *y, int64_t batch, int64_t len, int64_t heads, int64_t n,
             int threads) {
    if (n % 16) return 1;
    /* a decode step (len 1) writes a new state that nothing reads before the next step, by when a batch's
     * states (3 MiB a layer at B=16) have left the cache: streaming stores skip reading its lines first */
    const int stream = len == 1 && S != S_new && (uintptr_t)S_new % 64 == 0;
    #pragma omp parallel for schedule(static) num_threads(threads) if (batch * heads * len * n * n >= 1 << 16)
    for (int64_t bh = 0; bh < batch * heads; bh++) {
        float *s = S_new + bh * n * n;
        const int64_t bi = bh / heads, h = bh % heads;
        for (int64_t t = 0; t < len; t++) {
            const int64_t x = ((bi * len + t) * heads + h) * n;
            wkv7_token(t ? s : S + bh * n * n, s, r + x, w + x, k + x, v + x, a + x, b + x, y + x, n, stream);
        }
        if (stream) _mm_sfence(); /* the streamed lines in memory before another thread or the caller reads them */
    }
    return 0;
}

#ifdef __AVX512BF16__
/* bf16 weights: y[b, o] = sum_i W[o, i] * x[b, i] for a bf16 W and fp32 x; `in` a multiple of 64, at most MAX_IN.
 * W stays bf16 (half of fp32's bytes) and is fed straight to the avx512_bf16 dot-product instruction. To
 * keep fp32 accuracy in x, each row of x is split here as x_hi + x_lo, both bf16 (x_lo holds the bits x_hi
 * drops), and both halves are applied: the result matches an fp32 product with the bf16 weight to about
 * 2^-16 of x's magnitude. One row of x: W is read row after row with a prefetch 2 KiB ahead; a batch: in tiles,
 * as the fp32 kernel does. */
#define PREFETCH 1024 /* elements ahead */
#define BF16_BATCH_BLOCK 4 /* both halves of x: 6 rows of them would not fit in the registers */
#define MAX_IN 16384

/* x [batch, in] fp32 -> hi, lo [batch, in] bf16 with x ~= hi + lo */
static void split(const float *x, uint16_t *hi, uint16_t *lo, int64_t n) {
    for (int64_t i = 0; i < n; i += 32) {
        __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
        __m512bh h = _mm512_cvtne2ps_pbh(b, a);
        __m512 ha = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256((__m512i)h)), 16));
        __m512 hb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64((__m512i)h, 1)), 16));
        _mm512_storeu_si512(hi + i, (__m512i)h);
        _mm512_storeu_si512(lo + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hb), _mm512_sub_ps(a, ha)));
    }
}

/* ROWS rows of W against `batch` rows of x (both halves), as tile_f32 does for fp32 */
static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *w, const uint16_t *x_hi, const uint16_t *x_lo,
                                                            float *y, int64_t in, int64_t out, int batch) {
    const uint16_t *next = w + ROWS * in, *later = w + L2_AHEAD * ROWS * in;
    __m512 acc[ROWS][BF16_BATCH_BLOCK];
    for (int r = 0; r < ROWS; r++)
        for (int b = 0; b < batch; b++) acc[r][b] = _mm512_setzero_ps();
    for (int64_t i = 0; i < in; i += 32) {
        for (int r = 0; r < ROWS; r++) {
            _mm_prefetch((const char *)(next + r * in + i), _MM_HINT_T0);
            _mm_prefetch((const char *)(later + r * in + i), _MM_HINT_T1);
        }
        __m512bh hi[BF16_BATCH_BLOCK], lo[BF16_BATCH_BLOCK];
        for (int b = 0; b < batch; b++) {
            hi[b] = (__m512bh)_mm512_loadu_si512(x_hi + b * in + i);
            lo[b] = (__m512bh)_mm512_loadu_si512(x_lo + b * in + i);
        }
        for (int r = 0; r < ROWS; r++) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * in + i);
            for (int b = 0; b < batch; b++) acc[r][b] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[r][b], wv, lo[b]), wv, hi[b]);
        }
    }
    for (int b = 0; b < batch; b++) _mm_storeu_ps(y + b * out, sum4(acc[0][b], acc[1][b], acc[2][b], acc[3][b]));
}

int gemv_bf16(const uint16_t *W, const float *x, float *y, int64_t out, int64_t in, int64_t batch, int threads) {
    if (in % 64 || in > MAX_IN || batch > MAX_BATCH) return 1;
    uint16_t *x_hi = malloc(2 * batch * in * sizeof(uint16_t)), *x_lo = x_hi + batch * in;
    if (!x_hi) return 2;
    split(x, x_hi, x_lo, batch * in);
    if (batch > 1 && out % ROWS == 0) {
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t o = 0; o < out; o += ROWS) {
            const uint16_t *w = W + o * in;
            int64_t b = 0;
            for (; b + BF16_BATCH_BLOCK <= batch; b += BF16_BATCH_BLOCK)
                tile_bf16(w, x_hi + b * in, x_lo + b * in, y + b * out + o, in, out, BF16_BATCH_BLOCK);
            switch (batch - b) {
                case 3: tile_bf16(w, x_hi + b * in, x_lo + b * in, y + b * out + o, in, out, 3); break;
                case 2: tile_bf16(w, x_hi + b * in, x_lo + b * in, y + b * out + o, in, out, 2); break;
                case 1: tile_bf16(w, x_hi + b * in, x_lo + b * in, y + b * out + o, in, out, 1); break;
            }
        }
        free(x_hi);
        return 0;
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out; o++) {
        const uint16_t *w = W + o * in;
        for (int64_t b = 0; b < batch; b++) {
            const uint16_t *hi = x_hi + b * in, *lo = x_lo + b * in;
            __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();  /* two chains hide latency */
            for (int64_t i = 0; i < in; i += 64) {
                _mm_prefetch((const char *)(w + i + PREFETCH), _MM_HINT_T0);
                __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + i), w1 = (__m512bh)_mm512_loadu_si512(w + i + 32);
                acc0 = _mm512_dpbf16_ps(acc0, w0, (__m512bh)_mm512_loadu_si512(lo + i));
                acc1 = _mm512_dpbf16_ps(acc1, w1, (__m512bh)_mm512_loadu_si512(lo + i + 32));
                acc0 = _mm512_dpbf16_ps(acc0, w0, (__m512bh)_mm512_loadu_si512(hi + i));
                acc1 = _mm512_dpbf16_ps(acc1, w1, (__m512bh)_mm512_loadu_si512(hi + i + 32));
            }
            y[b * out + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        }
    }
    free(x_hi);
    return 0;
}
#endif

/* One decode step of a whole block (rwkv_lm.fast.StepBlock): model.py's Block for T == 1 in one call, so a
 * B=16 step is its matrix products and the recurrence, not ~130 small torch ops and their Python per layer
 * (those cost as much as a third of the step). Activations fp32; the six Linear weights fp32 or (bf16 != 0)
 * bf16; the LoRA matrices fp32 and stored as their kernel reads them ([out, in] row-major). */
enum { LN0_W, LN0_B, LN1_W, LN1_B, LN2_W, LN2_B, X_R, X_W, X_K, X_V, X_A, X_G, W0, W1, W2, A0, A1, A2, V0, V1, V2,
       G1, G2, K_K, K_A, R_K, RECEPTANCE, KEY, VALUE, OUTPUT, LN_X_W, LN_X_B, FFN_X_K, FFN_KEY, FFN_VALUE };

/* exp to about 1 ulp (Cephes' polynomial after the range reduction); inputs clamped to +-88, so no inf or NaN */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); /* ln 2 in two parts: r stays exact */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 sigmoid_ps(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

/* out = (x - mean) / sqrt(var + eps) * weight + bias over n values (n a multiple of 16; out may be x): a LayerNorm
 * row or a GroupNorm group */
static void normalize(const float *x, float *out, const float *weight, const float *bias, int64_t n, float eps) {
    __m512 sum = _mm512_setzero_ps(), sq = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) sum = _mm512_add_ps(sum, _mm512_loadu_ps(x + i));
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / n);
    for (int64_t i = 0; i < n; i += 16) {
        __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + i), mean);
        sq = _mm512_fmadd_ps(d, d, sq);
    }
    const __m512 inv_std = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sq) / n + eps));
    for (int64_t i = 0; i < n; i += 16) {
        __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), mean), inv_std);
        _mm512_storeu_ps(out + i, _mm512_fmadd_ps(d, _mm512_loadu_ps(weight + i), _mm512_loadu_ps(bias + i)));
    }
}

static int linear(const void *W, int bf16, const float *x, float *y, int64_t out, int64_t in, int64_t batch, int threads) {
#ifdef __AVX512BF16__
    if (bf16) return gemv_bf16(W, x, y, out, in, batch, threads);
#endif
    return bf16 ? 1 : gemv_f32(W, x, y, out, in, batch, threads);
}

/* x [batch, C] -> x_out; the state's three parts in, new ones out (the old ones left as they are). v_first
 * [batch, C]: written by the first block (the one without V0), read by the others. C, n (head size), ffn and
 * the LoRA ranks multiples of 16 (rank_v 0 in the first block); LayerNorms and ln_x with bias. */
int block_step_f32(const void *const *params, const float *x, float *x_out, float *v_first, const float *att_shift,
                   const float *wkv, const float *ffn_shift, float *att_shift_out, float *wkv_out, float *ffn_shift_out,
                   int64_t batch, int64_t C, int64_t n, int64_t ffn, int64_t rank_w, int64_t rank_a, int64_t rank_v,
                   int64_t rank_g, float ln_eps, float ln_x_eps, float decay_scale, int bf16, int threads) {
#define P(name) ((const float *)params[name])
#define EACH(i, c) for (int64_t b_ = 0; b_ < batch; b_++) for (int64_t c = 0, i = b_ * C; c < C; c += 16, i += 16)
    int64_t widest = ffn; /* of the hidden vectors: the LoRAs' and the channel mix's */
    for (int64_t i = 0, ranks[] = {rank_w, rank_a, rank_v, rank_g}; i < 4; i++) widest = ranks[i] > widest ? ranks[i] : widest;
    const int64_t BC = batch * C;
    float *mix = malloc(sizeof(float) * (16 * BC + batch * widest));
    if (!mix) return 2;
    /* the six token-shift mixes xr, xw, xk, xv, xa, xg, then one buffer per vector of the step */
    float *r = mix + 6 * BC, *k = r + BC, *v = k + BC, *w = v + BC, *a = w + BC, *g = a + BC, *minus_kk = g + BC,
          *kk_a = minus_kk + BC, *y = kk_a + BC, *up = y + BC, *hidden = up + BC;
    int err = 0;

    for (int64_t b = 0; b < batch; b++) {
        if (params[LN0_W]) normalize(x + b * C, x_out + b * C, P(LN0_W), P(LN0_B), C, ln_eps);
        else memcpy(x_out + b * C, x + b * C, C * sizeof(float));
        normalize(x_out + b * C, att_shift_out + b * C, P(LN1_W), P(LN1_B), C, ln_eps);
    }

    /* time mix */
    EACH(i, c) {
        __m512 xi = _mm512_loadu_ps(att_shift_out + i), d = _mm512_sub_ps(_mm512_loadu_ps(att_shift + i), xi);
        for (int m = 0; m < 6; m++) _mm512_storeu_ps(mix + m * BC + i, _mm512_fmadd_ps(d, _mm512_loadu_ps(P(X_R + m) + c), xi));
    }
    const float *xr = mix, *xw = mix + BC, *xk = mix + 2 * BC, *xv = mix + 3 * BC, *xa = mix + 4 * BC, *xg = mix + 5 * BC;
    err |= linear(params[RECEPTANCE], bf16, xr, r, C, C, batch, threads);
    err |= linear(params[KEY], bf16, xk, k, C, C, batch, threads);
    err |= linear(params[VALUE], bf16, xv, v, C, C, batch, threads);

    err |= gemv_f32(P(W1), xw, hidden, rank_w, C, batch, threads);
    for (int64_t i = 0; i < batch * rank_w; i += 16) { /* tanh(h) = 2 sigmoid(2h) - 1 */
        __m512 s = sigmoid_ps(_mm512_add_ps(_mm512_loadu_ps(hidden + i), _mm512_loadu_ps(hidden + i)));
        _mm512_storeu_ps(hidden + i, _mm512_sub_ps(_mm512_add_ps(s, s), _mm512_set1_ps(1.0f)));
    }
    err |= gemv_f32(P(W2), hidden, up, C, rank_w, batch, threads);
    EACH(i, c) { /* the decay itself, what the recurrence takes */
        __m512 s = sigmoid_ps(_mm512_add_ps(_mm512_loadu_ps(P(W0) + c), _mm512_loadu_ps(up + i)));
        _mm512_storeu_ps(w + i, exp_ps(_mm512_mul_ps(_mm512_set1_ps(-decay_scale), s)));
    }

    err |= gemv_f32(P(A1), xa, hidden, rank_a, C, batch, threads);
    err |= gemv_f32(P(A2), hidden, up, C, rank_a, batch, threads);
    EACH(i, c) _mm512_storeu_ps(a + i, sigmoid_ps(_mm512_add_ps(_mm512_loadu_ps(P(A0) + c), _mm512_loadu_ps(up + i))));

    err |= gemv_f32(P(G1), xg, hidden, rank_g, C, batch, threads);
    for (int64_t i = 0; i < batch * rank_g; i += 16) _mm512_storeu_ps(hidden + i, sigmoid_ps(_mm512_loadu_ps(hidden + i)));
    err |= gemv_f32(P(G2), hidden, g, C, rank_g, batch, threads);

    if (params[V0]) {
        err |= gemv_f32(P(V1), xv, hidden, rank_v, C, batch, threads);
        err |= gemv_f32(P(V2), hidden, up, C, rank_v, batch, threads);
        EACH(i, c) {
            __m512 vi = _mm512_loadu_ps(v + i);
            __m512 s = sigmoid_ps(_mm512_add_ps(_mm512_loadu_ps(P(V0) + c), _mm512_loadu_ps(up + i)));
            _mm512_storeu_ps(v + i, _mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(v_first + i), vi), s, vi));
        }
    } else {
        memcpy(v_first, v, BC * sizeof(float));
    }

    /* kk = normalize(k * k_k) per head (F.normalize's eps 1e-12); the recurrence's a = -kk, b = kk * a; then k's scaling */
    for (int64_t h = 0; h < BC; h += n) {
        const int64_t c0 = h % C;
        __m512 sq = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            __m512 kk = _mm512_mul_ps(_mm512_loadu_ps(k + h + j), _mm512_loadu_ps(P(K_K) + c0 + j));
            sq = _mm512_fmadd_ps(kk, kk, sq);
        }
        const __m512 inv_norm = _mm512_set1_ps(1.0f / fmaxf(sqrtf(_mm512_reduce_add_ps(sq)), 1e-12f));
        for (int64_t j = 0; j < n; j += 16) {
            __m512 ki = _mm512_loadu_ps(k + h + j), ai = _mm512_loadu_ps(a + h + j);
            __m512 kk = _mm512_mul_ps(_mm512_mul_ps(ki, _mm512_loadu_ps(P(K_K) + c0 + j)), inv_norm);
            _mm512_storeu_ps(minus_kk + h + j, _mm512_sub_ps(_mm512_setzero_ps(), kk));
            _mm512_storeu_ps(kk_a + h + j, _mm512_mul_ps(kk, ai));
            __m512 scale = _mm512_fmadd_ps(_mm512_sub_ps(ai, _mm512_set1_ps(1.0f)), _mm512_loadu_ps(P(K_A) + c0 + j), _mm512_set1_ps(1.0f));
            _mm512_storeu_ps(k + h + j, _mm512_mul_ps(ki, scale));
        }
    }
    err |= wkv7_f32(wkv, wkv_out, r, w, k, v, minus_kk, kk_a, y, batch, 1, C / n, n, threads);

    /* ln_x per head, the bonus for the current token, the gate */
    for (int64_t h = 0; h < BC; h += n) {
        const int64_t c0 = h % C;
        normalize(y + h, y + h, P(LN_X_W) + c0, P(LN_X_B) + c0, n, ln_x_eps);
        __m512 dot = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16)
            dot = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(r + h + j), _mm512_loadu_ps(k + h + j)), _mm512_loadu_ps(P(R_K) + c0 + j), dot);
        const __m512 bonus = _mm512_set1_ps(_mm512_reduce_add_ps(dot));
        for (int64_t j = 0; j < n; j += 16) {
            __m512 yj = _mm512_fmadd_ps(bonus, _mm512_loadu_ps(v + h + j), _mm512_loadu_ps(y + h + j));
            _mm512_storeu_ps(y + h + j, _mm512_mul_ps(yj, _mm512_loadu_ps(g + h + j)));
        }
    }
    err |= linear(params[OUTPUT], bf16, y, up, C, C, batch, threads);
    EACH(i, c) _mm512_storeu_ps(x_out + i, _mm512_add_ps(_mm512_loadu_ps(x_out + i), _mm512_loadu_ps(up + i)));

    /* channel mix: relu(key(mix))^2 through value */
    float *xk_ffn = mix, *key = hidden;
    for (int64_t b = 0; b < batch; b++) normalize(x_out + b * C, ffn_shift_out + b * C, P(LN2_W), P(LN2_B), C, ln_eps);
    EACH(i, c) {
        __m512 xi = _mm512_loadu_ps(ffn_shift_out + i);
        _mm512_storeu_ps(xk_ffn + i, _mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(ffn_shift + i), xi), _mm512_loadu_ps(P(FFN_X_K) + c), xi));
    }
    err |= linear(params[FFN_KEY], bf16, xk_ffn, key, ffn, C, batch, threads);
    for (int64_t i = 0; i < batch * ffn; i += 16) {
        __m512 h = _mm512_max_ps(_mm512_loadu_ps(key + i), _mm512_setzero_ps());
        _mm512_storeu_ps(key + i, _mm512_mul_ps(h, h));
    }
    err |= linear(params[FFN_VALUE], bf16, key, up, C, ffn, batch, threads);
    EACH(i, c) _mm512_storeu_ps(x_out + i, _mm512_add_ps(_mm512_loadu_ps(x_out + i), _mm512_loadu_ps(up + i)));
    free(mix);
    return err ? 1 : 0;
#undef P
#undef EACH
}
