/* A main() for the CPU kernels (rwkv_lm/cpu_kernels.c, linked in) so that test_cpu_kernels_aarch64.py can
 * cross-compile them for aarch64 and run them under qemu-user: the NEON and aarch64 generic paths are never
 * taken on the x86 machines the tests run on, and a cross-compiled shared library cannot be loaded there.
 *
 * Cases come on stdin, one a line; each array is a file PREFIX.NAME of raw little-endian values:
 *   gemv_f32 PREFIX out in batch threads     W x -> y
 *   gemv_f32_panels PREFIX out in batch threads   W x -> y   (W in panels: [ceil(out / 64), in, 64])
 *   gemv_bf16 PREFIX out in batch threads    W x -> y
 *   gemv_bf16_panels PREFIX out in batch threads  W x -> y   (W in panels, as gemv_f32_panels)
 *   gemv_i8 PREFIX out in batch threads      W scale x -> y
 *   gemv_i4 PREFIX out in batch threads      W scale x -> y   (W packed two to a byte, scale [out, in / 64])
 *   gemv_cols_f32, gemv_cols_bf16 PREFIX out in batch threads   W x -> y   (W [in, out])
 *   gemv_cols_i8 PREFIX out in batch threads      W scale x -> y   (W [in, out], scale [out])
 *   wkv7_f32 PREFIX batch len heads n threads    S r w k v a b -> y S_new
 * Outputs start as NaN (an element a kernel leaves unwritten fails the comparison) and are followed by guard
 * values that must come back untouched (a write past the end). Exits nonzero, saying why, at the first failure. */
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int gemv_f32(const float *W, const float *x, float *y, int64_t out, int64_t in, int64_t batch, int threads);
int gemv_f32_panels(const float *W, const float *x, float *y, int64_t out, int64_t in, int64_t batch, int threads);
int gemv_bf16(const uint16_t *W, const float *x, float *y, int64_t out, int64_t in, int64_t batch, int threads);
int gemv_bf16_panels(const uint16_t *W, const float *x, float *y, int64_t out, int64_t in, int64_t batch, int threads);
int gemv_i8(const int8_t *W, const float *scale, const float *x, float *y, int64_t out, int64_t in, int64_t batch,
            int threads);
int gemv_i4(const uint8_t *W, const float *scale, const float *x, float *y, int64_t out, int64_t in, int64_t batch,
            int threads);
int gemv_cols(const void *W, const float *scale, int type, const float *x, float *y, int64_t out, int64_t in,
              int64_t batch, int threads);
extern const int int4_group, panel_width;
int wkv7_f32(const float *S, float *S_new, const float *r, const float *w, const float *k, const float *v,
             const float *a, const float *b, float *y, int64_t batch, int64_t len, int64_t heads, int64_t n,
             int threads);

#define GUARD 64 /* floats after each output, more than a vector of any width */
static const float guard_value = 12345.0f;

static void fail(const char *prefix, const char *why) {
    fprintf(stderr, "%s: %s\n", prefix, why);
    exit(1);
}

/* the file's bytes, which must be exactly `bytes` long (the test and this driver agree on the shapes) */
static void *read_input(const char *prefix, const char *name, size_t bytes) {
    char path[4096];
    snprintf(path, sizeof path, "%s.%s", prefix, name);
    FILE *f = fopen(path, "rb");
    if (!f) fail(path, "cannot open");
    void *data = malloc(bytes);
    if (!data) fail(path, "out of memory");
    if (fread(data, 1, bytes, f) != bytes || fgetc(f) != EOF) fail(path, "size differs from the case's shape");
    fclose(f);
    return data;
}

/* 64-byte aligned, as torch allocates: the recurrence picks its store path by the output's alignment */
static float *new_output(int64_t n) {
    float *y = aligned_alloc(64, ((n + GUARD) * sizeof(float) + 63) / 64 * 64);
    if (!y) fail("output", "out of memory");
    for (int64_t i = 0; i < n; i++) y[i] = NAN;
    for (int64_t i = n; i < n + GUARD; i++) y[i] = guard_value;
    return y;
}

static void write_output(const char *prefix, const char *name, float *y, int64_t n) {
    for (int64_t i = n; i < n + GUARD; i++)
        if (y[i] != guard_value) fail(prefix, "a kernel wrote past the end of its output");
    char path[4096];
    snprintf(path, sizeof path, "%s.%s", prefix, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(y, sizeof(float), n, f) != (size_t)n || fclose(f)) fail(path, "cannot write");
    free(y);
}

int main(void) {
    char kernel[32], prefix[4000];
    while (scanf("%31s %3999s", kernel, prefix) == 2) {
        int64_t d[4];
        int threads;
        if (strcmp(kernel, "wkv7_f32") == 0) {
            if (scanf("%" SCNd64 " %" SCNd64 " %" SCNd64 " %" SCNd64 " %d", &d[0], &d[1], &d[2], &d[3], &threads) != 5)
                fail(prefix, "expected batch len heads n threads");
            const int64_t batch = d[0], len = d[1], heads = d[2], n = d[3];
            const int64_t states = batch * heads * n * n, values = batch * len * heads * n;
            float *S = read_input(prefix, "S", states * 4), *in[6];
            const char *names[6] = {"r", "w", "k", "v", "a", "b"};
            for (int i = 0; i < 6; i++) in[i] = read_input(prefix, names[i], values * 4);
            float *y = new_output(values), *S_new = new_output(states);
            if (wkv7_f32(S, S_new, in[0], in[1], in[2], in[3], in[4], in[5], y, batch, len, heads, n, threads))
                fail(prefix, "the kernel returned an error");
            write_output(prefix, "y", y, values);
            write_output(prefix, "S_new", S_new, states);
            free(S);
            for (int i = 0; i < 6; i++) free(in[i]);
        } else if (strncmp(kernel, "gemv_cols_", 10) == 0) {
            if (scanf("%" SCNd64 " %" SCNd64 " %" SCNd64 " %d", &d[0], &d[1], &d[2], &threads) != 4)
                fail(prefix, "expected out in batch threads");
            const int64_t out = d[0], in = d[1], batch = d[2];
            const char *type_name = kernel + 10;
            const int type = strcmp(type_name, "f32") == 0 ? 0 : strcmp(type_name, "bf16") == 0 ? 1 : strcmp(type_name, "i8") == 0 ? 2 : -1;
            if (type < 0) fail(kernel, "no such kernel");
            const size_t weight_size = type == 0 ? 4 : type == 1 ? 2 : 1; /* (the kernels' F32, BF16, I8) */
            void *W = read_input(prefix, "W", in * out * weight_size);
            float *x = read_input(prefix, "x", batch * in * 4), *y = new_output(batch * out);
            float *scale = type == 2 ? read_input(prefix, "scale", out * 4) : NULL;
            if (gemv_cols(W, scale, type, x, y, out, in, batch, threads)) fail(prefix, "the kernel returned an error");
            write_output(prefix, "y", y, batch * out);
            free(W), free(x), free(scale);
        } else {
            if (scanf("%" SCNd64 " %" SCNd64 " %" SCNd64 " %d", &d[0], &d[1], &d[2], &threads) != 4)
                fail(prefix, "expected out in batch threads");
            const int64_t out = d[0], in = d[1], batch = d[2];
            const int i4 = strcmp(kernel, "gemv_i4") == 0, bf16_panels = strcmp(kernel, "gemv_bf16_panels") == 0;
            const int panels = strcmp(kernel, "gemv_f32_panels") == 0 || bf16_panels;
            const size_t weight_size = strcmp(kernel, "gemv_f32") == 0 || (panels && !bf16_panels) ? 4
                                       : strcmp(kernel, "gemv_bf16") == 0 || bf16_panels ? 2 : 1;
            if (weight_size == 1 && strcmp(kernel, "gemv_i8") && !i4) fail(kernel, "no such kernel");
            const int64_t rows = panels ? (out + panel_width - 1) / panel_width * panel_width : out; /* (zero rows padded) */
            void *W = read_input(prefix, "W", i4 ? (size_t)(out * in / 2) : rows * in * weight_size);
            float *x = read_input(prefix, "x", batch * in * 4), *y = new_output(batch * out);
            float *scale = weight_size == 1 ? read_input(prefix, "scale", (i4 ? out * (in / int4_group) : out) * 4) : NULL;
            if (bf16_panels ? gemv_bf16_panels(W, x, y, out, in, batch, threads)
                : panels ? gemv_f32_panels(W, x, y, out, in, batch, threads)
                : weight_size == 4 ? gemv_f32(W, x, y, out, in, batch, threads)
                : weight_size == 2 ? gemv_bf16(W, x, y, out, in, batch, threads)
                : i4 ? gemv_i4(W, scale, x, y, out, in, batch, threads)
                     : gemv_i8(W, scale, x, y, out, in, batch, threads))
                fail(prefix, "the kernel returned an error");
            write_output(prefix, "y", y, batch * out);
            free(W), free(x), free(scale);
        }
    }
    return 0;
}
