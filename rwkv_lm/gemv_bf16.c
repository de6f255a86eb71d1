/* y[b, o] = sum_i W[o, i] * x[b, i] for a bf16 weight W [out, in] (row-major, as nn.Linear stores it).
 *
 * Decoding one token is bound by streaming the weights from memory, so W stays bf16 (half of fp32's
 * bytes) and is fed straight to the avx512_bf16 dot-product instruction. To keep fp32 accuracy in x,
 * each row of x is split here as x_hi + x_lo, both bf16 (x_lo holds the bits x_hi drops), and both halves
 * are applied: the result matches an fp32 product with the bf16 weight to about 2^-16 of x's magnitude.
 * W is read as one sequential stream, row after row (several rows at once halved the bandwidth), with a
 * prefetch 2 KiB ahead; the other rows of a batch reuse each row from L1. `in` must be a multiple of 64, at most MAX_IN. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define PREFETCH 1024 /* elements ahead */
#define MAX_IN 16384
#define MAX_BATCH 16

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

int gemv_bf16(const uint16_t *W, const float *x, float *y, int64_t out, int64_t in, int64_t batch, int threads) {
    if (in % 64 || in > MAX_IN || batch > MAX_BATCH) return 1;
    uint16_t *x_hi = malloc(2 * batch * in * sizeof(uint16_t)), *x_lo = x_hi + batch * in;
    if (!x_hi) return 2;
    split(x, x_hi, x_lo, batch * in);
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
