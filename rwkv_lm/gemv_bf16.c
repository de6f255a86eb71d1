/* y[b, o] = sum_i W[o, i] * x[b, i] for a bf16 weight W [out, in] (row-major, as nn.Linear stores it).
 *
 * Decoding one token is bound by streaming the weights from memory, so W stays bf16 (half of fp32's
 * bytes) and is fed straight to the avx512_bf16 dot-product instruction. To keep fp32 accuracy in x,
 * x is split as x_hi + x_lo, both bf16 (x_lo holds the bits x_hi drops), and both halves are applied:
 * the result matches an fp32 product with the bf16 weight to about 2^-16 of x's magnitude.
 * `in` must be a multiple of 32. */
#include <immintrin.h>
#include <stdint.h>

#define ROWS 8 /* weight rows per pass: independent accumulators hide the instruction latency */

void gemv_bf16(const uint16_t *W, const uint16_t *x_hi, const uint16_t *x_lo, float *y,
               int64_t out, int64_t in, int64_t batch, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out; o += ROWS) {
        int64_t n = out - o < ROWS ? out - o : ROWS;
        for (int64_t b = 0; b < batch; b++) {
            const uint16_t *hi = x_hi + b * in, *lo = x_lo + b * in;
            __m512 acc[ROWS];
            for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
            for (int64_t i = 0; i < in; i += 32) {
                __m512bh h = (__m512bh)_mm512_loadu_si512(hi + i), l = (__m512bh)_mm512_loadu_si512(lo + i);
                for (int64_t r = 0; r < n; r++) {
                    __m512bh w = (__m512bh)_mm512_loadu_si512(W + (o + r) * in + i);
                    acc[r] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[r], w, l), w, h);
                }
            }
            for (int64_t r = 0; r < n; r++) y[b * out + o + r] = _mm512_reduce_add_ps(acc[r]);
        }
    }
}
