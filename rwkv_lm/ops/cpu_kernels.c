/* The CPU kernels (loaded by rwkv_lm/cpu_kernels.py): matrix-vector products for decoding (rwkv_lm.fast),
 * the WKV-7 recurrence for inference (rwkv_lm/ops/wkv7/cpu.py) and whole decode steps of a block.
 *
 * Decoding one token is bound by streaming the weights from memory, once per token: each kernel reads a
 * weight in one sequential pass, split between threads by rows: row-major ([out, in], as nn.Linear stores it),
 * fp32 and bf16 in panels (gemv_f32_panels, gemv_bf16_panels) and int8 and int4 in quads at the x86 levels from avx2
 * (tile_quads).
 * One source for every CPU: the arithmetic is written on GCC's vector types, which the compiler maps
 * to the registers of the instruction set it is built for (AVX-512: 16 floats, AVX2: 8, SSE2 and NEON: 4);
 * a few helpers use an instruction set's own intrinsics where the portable form is slower. Weights are fp32,
 * bf16 (widened to fp32 in registers, or fed to the avx512_bf16 dot product or AMX's tiles where the CPU has them), int8
 * with one fp32 scale per output row, or int4 with one fp32 scale per INT4_GROUP inputs of a row (dequantized
 * in registers); activations are fp32, but bf16 products round them to bf16 (round_to_bf16), and the int4 and
 * int8 products at the x86 levels from avx2 (gemv_qx) to int8 per ACT_GROUP inputs. */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/syscall.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

/* rows of x per pass over the weights: more rows run in even passes of up to this many. 64, not 16: a 33-token
 * prompt's rows in one pass instead of three, the prompt 1.11x as fast in fp32 and 1.06-1.11x in int8 (int4, bf16:
 * level; bench/RESULTS.md, issue 20's eighth pass) */
#define ROWS_PER_PASS 64
const int rows_per_pass = ROWS_PER_PASS;
#define MAX_BATCH 16 /* sequences of a decode step per slice of block_step (its workspace's rows) */

/* the parameters of a block in the order the Python side passes their pointers (rwkv_lm/cpu_kernels.py reads
 * the names from here and checks its own list against them) */
#define BLOCK_STEP_PARAMS(X) \
    X(LN0_W, "ln0.weight") X(LN0_B, "ln0.bias") X(LN1_W, "ln1.weight") X(LN1_B, "ln1.bias") \
    X(LN2_W, "ln2.weight") X(LN2_B, "ln2.bias") X(X_R, "att.x_r") X(X_W, "att.x_w") X(X_K, "att.x_k") \
    X(X_V, "att.x_v") X(X_A, "att.x_a") X(X_G, "att.x_g") X(W0, "att.w0") X(W1, "att.w1") X(W2, "att.w2") \
    X(A0, "att.a0") X(A1, "att.a1") X(A2, "att.a2") X(V0, "att.v0") X(V1, "att.v1") X(V2, "att.v2") \
    X(G1, "att.g1") X(G2, "att.g2") X(K_K, "att.k_k") X(K_A, "att.k_a") X(R_K, "att.r_k") \
    X(RECEPTANCE, "att.receptance.weight") X(KEY, "att.key.weight") X(VALUE, "att.value.weight") \
    X(OUTPUT, "att.output.weight") X(LN_X_W, "att.ln_x.weight") X(LN_X_B, "att.ln_x.bias") X(FFN_X_K, "ffn.x_k") \
    X(FFN_KEY, "ffn.key.weight") X(FFN_VALUE, "ffn.value.weight") X(RECEPTANCE_S, "att.receptance.scale") \
    X(KEY_S, "att.key.scale") X(VALUE_S, "att.value.scale") X(OUTPUT_S, "att.output.scale") \
    X(FFN_KEY_S, "ffn.key.scale") X(FFN_VALUE_S, "ffn.value.scale") X(W1_S, "att.w1_scale") X(W2_S, "att.w2_scale") \
    X(A1_S, "att.a1_scale") X(A2_S, "att.a2_scale") X(V1_S, "att.v1_scale") X(V2_S, "att.v2_scale") \
    X(G1_S, "att.g1_scale") X(G2_S, "att.g2_scale")
#define AS_ENUM(name, key) name,
#define AS_NAME(name, key) key " "
enum { BLOCK_STEP_PARAMS(AS_ENUM) N_BLOCK_STEP_PARAMS };
const char block_step_params[] = BLOCK_STEP_PARAMS(AS_NAME);

/* weight types, as the Python side numbers them (F32_PANELS and BF16_PANELS: fp32 and bf16 in panels,
 * gemv_panels_part; I8_QUADS and I4_QUADS: int8 and int4 in blocks of quads, gemv_qx). The LoRAs ([in, out]: gemv_cols) are F32, or for a
 * bf16 and a quantized model BF16 and I8 copies (rwkv_lm.runtime.cpu's StepPlan), against fp32 activations at
 * every level, as model.py's `x @ w1` multiplies them. In fp32 they were a fifth of what a 0.1B int4 step reads
 * (21 of 97 MB), in int8 5 of 82; in a bf16 step 21 of 292 MB, in bf16 11 of 282. */
enum { F32, BF16, I8, I4, F32_PANELS, I8_QUADS, I4_QUADS, BF16_PANELS };
/* (checked against the Python side's WEIGHT_TYPES) */
const int f32_panels_type = F32_PANELS, i8_quads_type = I8_QUADS, i4_quads_type = I4_QUADS, bf16_panels_type = BF16_PANELS;
#define QUAD_ROWS 16 /* rows of an int8 or int4 weight a block of quads holds (tile_quads) */
const int quad_rows = QUAD_ROWS;
/* int4 weights: each run of 32 inputs of a row is 16 bytes, byte j holding input j in its low nibble and input
 * j + 16 in its high one (so a vector of any width up to 16 is one load of consecutive bytes and a mask or a
 * shift); a nibble n stands for (n - 8) * the scale of its group of INT4_GROUP inputs. Rows a multiple of 32 long. */
#define INT4_BLOCK 32
#define INT4_GROUP 64
const int int4_group = INT4_GROUP;
/* inputs that share one scale where activations are quantized to int8 (gemv_qx's products); the int4 kernel
 * reads one weight group per activation group */
#define ACT_GROUP INT4_GROUP
#ifdef __AVX2__
const int int8_activations = 1; /* int4 and int8 products quantize their activations (see gemv_qx) */
#else
const int int8_activations = 0;
#endif

#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
/* a batch tile: ROWS rows of W against BATCH_BLOCK rows of x; with 32 vector registers (AVX-512, aarch64)
 * 24 accumulators, 6 rows of x and a row of W fill 31 of them: 10 loads per 24 FMAs (B=16 products 7-15%
 * faster than 4 rows of x); with 16 (AVX2, SSE2) 4x2 */
#define ROWS 4
#if defined(__AVX512F__) || defined(__aarch64__)
#define BATCH_BLOCK 6
#else
#define BATCH_BLOCK 2
#endif
/* rows of x a tile of this weight type takes: int4 keeps each row's group scale in a register too, which 6 rows of
 * x would leave no room for (AVX-512: spills, int4 products at a third of int8's speed) */
#define batch_block(type) ((type) == I4 && BATCH_BLOCK > 4 ? 4 : BATCH_BLOCK)

const int vector_width = VW; /* floats per register at the level this was built for */

typedef float vf __attribute__((vector_size(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW)));
typedef uint32_t vu __attribute__((vector_size(4 * VW)));
typedef float vf_any __attribute__((vector_size(4 * VW), aligned(4))); /* unaligned loads and stores */
typedef uint16_t vh __attribute__((vector_size(2 * VW)));
typedef int16_t vs __attribute__((vector_size(2 * VW)));
typedef int8_t vb __attribute__((vector_size(VW)));

#define INLINE static inline __attribute__((always_inline))
INLINE vf load(const float *p) { return *(const vf_any *)p; }
INLINE void store(float *p, vf v) { *(vf_any *)p = v; }
/* x in every lane: x - 0 is x for every x, so this compiles to a broadcast alone (x + 0 is not x for -0: an addition) */
INLINE vf splat(float x) { return x - (vf){0}; }
INLINE vf vmax(vf a, vf b) { vi m = a > b; return (vf)(((vi)a & m) | ((vi)b & ~m)); }
INLINE vf vmin(vf a, vf b) { vi m = a < b; return (vf)(((vi)a & m) | ((vi)b & ~m)); }
INLINE float hsum(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
#endif
}

/* a weight's VW elements from index i, widened to fp32: bf16 is the top half of an fp32 (a shift), int8 a
 * conversion (its row's scale is applied to the row's sum). GCC 12 widens a narrow vector type
 * (__builtin_convertvector) through scalar inserts (int8 products on one AVX-512 core: 7 GFLOP/s, 58-69 with
 * vpmovsxbd), so each instruction set loads with its own widening instruction; the portable form is the rest's */
INLINE vf widen_bf16(const uint16_t *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#elif defined(__AVX2__)
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#elif defined(__ARM_NEON)
    return (vf)vshll_n_u16(vld1_u16(p), 16);
#elif defined(__SSE2__) /* x86-64's baseline: each bf16 below a zero half */
    return (vf)_mm_unpacklo_epi16(_mm_setzero_si128(), _mm_loadl_epi64((const __m128i *)p));
#else
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}
INLINE vf widen_i8(const int8_t *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#elif defined(__ARM_NEON)
    int32_t bits;
    memcpy(&bits, p, 4);
    return (vf)vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(bits))))));
#elif defined(__SSE2__) /* each byte to the top of its 32-bit lane, then an arithmetic shift back */
    int32_t bits;
    memcpy(&bits, p, 4);
    const __m128i zero = _mm_setzero_si128(), b = _mm_unpacklo_epi8(zero, _mm_cvtsi32_si128(bits));
    return (vf)_mm_cvtepi32_ps(_mm_srai_epi32(_mm_unpacklo_epi16(zero, b), 24));
#else
    vb b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(__builtin_convertvector(__builtin_convertvector(b, vs), vi), vf); /* via int16: fewer inserts */
#endif
}
/* VW nibbles (the low ones of VW bytes, or the high ones) as fp32 values 0 .. 15 */
INLINE vf widen_u4(const uint8_t *p, int high) {
#if defined(__AVX512F__)
    __m512i n = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    n = high ? _mm512_srli_epi32(n, 4) : _mm512_and_si512(n, _mm512_set1_epi32(15));
    return (vf)_mm512_cvtepi32_ps(n);
#elif defined(__AVX2__)
    __m256i n = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    n = high ? _mm256_srli_epi32(n, 4) : _mm256_and_si256(n, _mm256_set1_epi32(15));
    return (vf)_mm256_cvtepi32_ps(n);
#elif defined(__ARM_NEON)
    uint32_t bits;
    memcpy(&bits, p, 4);
    uint32x4_t n = vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(bits)))));
    n = high ? vshrq_n_u32(n, 4) : vandq_u32(n, vdupq_n_u32(15));
    return (vf)vcvtq_f32_u32(n);
#elif defined(__SSE2__)
    int32_t bits;
    memcpy(&bits, p, 4);
    const __m128i zero = _mm_setzero_si128();
    __m128i n = _mm_unpacklo_epi16(_mm_unpacklo_epi8(_mm_cvtsi32_si128(bits), zero), zero);
    n = high ? _mm_srli_epi32(n, 4) : _mm_and_si128(n, _mm_set1_epi32(15));
    return (vf)_mm_cvtepi32_ps(n);
#else
    uint8_t b[VW];
    memcpy(b, p, sizeof b);
    vu n;
    for (int j = 0; j < VW; j++) n[j] = b[j];
    return __builtin_convertvector(high ? n >> 4 : n & 15, vf);
#endif
}
/* the bytes of n weights of a type (int4: n even) */
INLINE size_t weight_bytes(int64_t n, int type) { return type == F32 ? 4 * n : type == BF16 ? 2 * n : type == I8 ? n : n / 2; }
/* the elements a row is read in at a time: a whole int4 block, else a vector */
INLINE int64_t load_block(int type) { return type == I4 ? INT4_BLOCK : VW; }
/* VW weights of a row w from element i + k VW, as fp32, where i is a multiple of load_block(type) and k below
 * load_block(type) / VW (constant, so an int4 vector's byte offset and nibble are known when compiled); int8
 * without its row's scale, int4 times its group's from the row's scales ((n - 8) scale, exact in fp32 but for
 * its one rounding: the dequantized weight itself) */
INLINE vf load_w(const void *w, int64_t i, int k, int type, const float *group_scale) {
    if (type == F32) return load((const float *)w + i + k * VW);
    if (type == BF16) return widen_bf16((const uint16_t *)w + i + k * VW);
    if (type == I8) return widen_i8((const int8_t *)w + i + k * VW);
    const uint8_t *p = (const uint8_t *)w + i / 2 + k * VW % (INT4_BLOCK / 2);
    return (widen_u4(p, k * VW >= INT4_BLOCK / 2) - 8.0f) * group_scale[i / INT4_GROUP];
}
/* element i of a row (int4 rows have no tail, being whole blocks) */
INLINE float scalar_w(const void *w, int64_t i, int type) {
    if (type == F32) return ((const float *)w)[i];
    if (type == BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)w)[i] << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    return ((const int8_t *)w)[i];
}

/* y[0..3] = the sums of a0 .. a3: on AVX-512 a shuffle tree, a quarter of four full reductions' instructions
 * (at width 768 those cost a sixth of the tile's time) */
INLINE void store_sum4(vf a0, vf a1, vf a2, vf a3, float *y) {
#if defined(__AVX512F__)
    __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps((__m512)a0, (__m512)a1), _mm512_unpackhi_ps((__m512)a0, (__m512)a1));
    __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps((__m512)a2, (__m512)a3), _mm512_unpackhi_ps((__m512)a2, (__m512)a3));
    __m512d d0 = _mm512_castps_pd(t0), d1 = _mm512_castps_pd(t1);
    __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d0, d1)), _mm512_castpd_ps(_mm512_unpackhi_pd(d0, d1)));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1)));
    _mm_storeu_ps(y, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
    y[0] = hsum(a0), y[1] = hsum(a1), y[2] = hsum(a2), y[3] = hsum(a3);
#endif
}

/* the sums of a0 .. a3 into y[0 .. rows - 1] (rows up to ROWS = 4): a whole tile's straight from store_sum4, as a loop
 * copying a count known only at run time compiles to a libc memcpy call, one a tile (1.5% of the samples of a
 * one-thread 0.1B bf16 step) */
INLINE void store_rows(vf a0, vf a1, vf a2, vf a3, float *y, int rows) {
    if (rows == ROWS) {
        store_sum4(a0, a1, a2, a3, y);
        return;
    }
    float sums[ROWS];
    store_sum4(a0, a1, a2, a3, sums);
    for (int r = 0; r < rows; r++) y[r] = sums[r];
}

/* the weights of a product (or the state of a recurrence) from which it is split between threads: a LoRA's too
 * (64 x 768 on the 0.1B shape), which one thread alone read while the other waited (from 1 << 16: 0.1B decode
 * with 2 threads, int4 1.14x faster at B=1 and 1.28x at B=16, fp32 1.11x at B=1, 5 rounds) */
#define PARALLEL_MIN (1 << 13)

/* Loops split between threads run on OpenMP's threads in the process's main thread (where the compiler has
 * OpenMP; Apple's clang has not, and then the kernels' own threads run every loop), the ones torch runs its own
 * ops on (and spins them on after each op: a second set of threads there competed with those for the cores, a
 * 0.1B prompt of 128 tokens about 1.4x slower in a one-off test), and on the kernels' own worker threads in any other thread. There
 * OpenMP's threads are the wrong ones: libgomp cuts its workers' wait for the next loop from ~300,000 spins to
 * 100 once the process holds more OpenMP threads than CPUs, which the main thread's and a second Python
 * thread's running torch (the serving engine's) are. Every loop then waited for a sleeping worker: 0.1B decode
 * with 2 threads in such a thread, OpenMP's against the kernels' own, 1.37x as long at B=1 in fp32, 2.25x in int8,
 * 3.0x in int4 (bench/compare_kernels.py --thread; bench/RESULTS.md, issue 20's fourth pass). The kernels' workers wait SPIN_NS for the next loop before they sleep. One caller at a time has them; a loop
 * called meanwhile (from a third thread) runs in its caller alone. */
#define MAX_THREADS 256
#define SPIN_NS 1000000 /* past a decode step's Python between two steps (~0.5 ms) */
typedef void (*part_fn)(const void *job, int64_t begin, int64_t end);
static struct {
    pthread_mutex_t caller, sleep; /* caller: held while the workers run one caller's loop */
    pthread_cond_t wake;
    int started; /* workers running, parts 1 .. started */
    atomic_uint_fast64_t generation; /* one more for each loop */
    atomic_int pending, sleepers; /* workers yet to finish this loop; workers asleep */
    part_fn fn;
    const void *job;
    int64_t count;
    int parts;
} pool = {.caller = PTHREAD_MUTEX_INITIALIZER, .sleep = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};
static uint_fast64_t first_seen[MAX_THREADS]; /* the generation before a worker's first loop */

INLINE void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

INLINE void run_part(part_fn fn, const void *job, int64_t count, int parts, int p) {
    fn(job, count * p / parts, count * (p + 1) / parts); /* contiguous, as even as they go */
}

static void *worker(void *arg) {
    const int p = (int)(intptr_t)arg;
    uint_fast64_t seen = first_seen[p], now;
    for (;;) {
        int64_t until = 0;
        for (unsigned spins = 1; (now = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen; spins++) {
            if (spins % 256 == 0) {
                if (!until) until = now_ns() + SPIN_NS;
                else if (now_ns() > until) {
                    pthread_mutex_lock(&pool.sleep);
                    atomic_fetch_add(&pool.sleepers, 1);
                    while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.sleep);
                    atomic_fetch_sub(&pool.sleepers, 1);
                    pthread_mutex_unlock(&pool.sleep);
                    until = 0;
                }
            }
            relax();
        }
        seen = now;
        if (p < pool.parts) run_part(pool.fn, pool.job, pool.count, pool.parts, p);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release); /* every worker, so none lags a loop */
    }
    return NULL;
}

static void forget_workers(void) { /* in a forked child, which has none of them */
    pthread_mutex_init(&pool.caller, NULL), pthread_mutex_init(&pool.sleep, NULL), pthread_cond_init(&pool.wake, NULL);
    pool.started = 0, atomic_store(&pool.pending, 0), atomic_store(&pool.sleepers, 0);
}

static void watch_forks(void) { pthread_atfork(NULL, NULL, forget_workers); }

#ifdef _OPENMP
static int in_main_thread(void) { /* asked once a thread: a step makes ~90 loops */
    static _Thread_local int known = -1;
    if (known < 0) {
#if defined(__APPLE__)
        known = pthread_main_np();
#elif defined(__linux__)
        known = getpid() == (pid_t)syscall(SYS_gettid);
#else
        known = 0;
#endif
    }
    return known;
}
#endif

/* fn(job, begin, end) over [0, count) in up to `threads` contiguous parts at once, the caller running the first;
 * in the caller alone where `work` (weights, state values) is below PARALLEL_MIN or another caller has the workers */
static void parallel(int64_t count, int threads, int64_t work, part_fn fn, const void *job) {
    int parts = threads < count ? threads : (int)count;
    parts = parts < MAX_THREADS ? parts : MAX_THREADS;
    if (parts < 2 || work < PARALLEL_MIN) {
        fn(job, 0, count);
        return;
    }
#ifdef _OPENMP
    if (in_main_thread()) {
        #pragma omp parallel num_threads(parts)
        run_part(fn, job, count, omp_get_num_threads(), omp_get_thread_num());
        return;
    }
#endif
    if (pthread_mutex_trylock(&pool.caller)) {
        fn(job, 0, count);
        return;
    }
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, watch_forks);
    while (pool.started < parts - 1) {
        pthread_t thread;
        const int p = pool.started + 1;
        first_seen[p] = atomic_load(&pool.generation);
        if (pthread_create(&thread, NULL, worker, (void *)(intptr_t)p)) break;
        pthread_detach(thread);
        pool.started = p;
    }
    parts = parts < pool.started + 1 ? parts : pool.started + 1;
    pool.fn = fn, pool.job = job, pool.count = count, pool.parts = parts;
    atomic_store(&pool.pending, pool.started);
    atomic_fetch_add(&pool.generation, 1);
    if (atomic_load(&pool.sleepers)) {
        pthread_mutex_lock(&pool.sleep);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep);
    }
    run_part(fn, job, count, parts, 0);
    while (atomic_load_explicit(&pool.pending, memory_order_acquire)) relax();
    pthread_mutex_unlock(&pool.caller);
}

/* Every output y[b, o] is computed by the same operations in the same order, whatever the batch, the slice of
 * it and the tile's place: a tile's one chain per (row of W, row of x) over the vectors of the input, its lanes
 * summed by store_sum4, then the scalar tail and the row's scale. So a row of a batch gets the bits it gets
 * alone (a seeded request samples the same text among any others), and a prompt read in pieces the bits of
 * one read (the serving engine splits prompts where its budget and cache say).
 *
 * Since only that order counts, the order of the rows is free. Against one row of x (a decode step), fp32, bf16
 * and int8 tiles read their rows in turn with AVX-512 (ROWS_IN_TURN): one sequential stream, which the hardware
 * prefetcher follows with no help (0.1B decode B=1, one thread, bench/compare_kernels.py against four interleaved
 * rows: fp32 1.24x, bf16 1.09x, int8 1.18x faster; int4, compute-bound, was 0.80x as fast in turn and keeps its four
 * rows); with narrower vectors a row's one chain is slower than memory, so they keep four rows too (AVX2 on Zen 2,
 * bf16 B=1 from cache 2.4-2.9x as fast, from memory 1.03-1.06x). Four rows at a time (several rows of x, and
 * int4) outrun the hardware prefetcher, so such a tile prefetches the rows L2_AHEAD tiles on into L2 itself.
 * Into L1 it prefetches the next tile's rows only where it is compute-bound (int4: 3-6% faster with it); for
 * the others that extra traffic costs more than it hides (one core, from memory: fp32 17-43% slower with it at
 * B=16). `rows` (up to ROWS) of W are used: the last tile of a W whose rows are no multiple of ROWS repeats its
 * last row in the others (rows in turn: skips them) and stores only its own. */
#define L2_AHEAD 8
#define LINE 64 /* bytes: one prefetch per row and cache line */
/* a row in turn is one chain of FMAs, a multiply-add per vector, each waiting on the last: with AVX-512's 64-byte
 * vectors the memory is slower than the chain; with AVX2's (and NEON's) 32 and 16 bytes the chain is the slower
 * (5 cycles a vector on Zen 2: 3.2 bytes of bf16 a cycle), so four rows' chains interleave there */
#if defined(__AVX512F__)
#define ROWS_IN_TURN 1
#else
#define ROWS_IN_TURN 0
#endif
/* rows first .. first + nr - 1 of a tile (wr, gr: their weights and int4 scales) against `batch` rows of x into
 * acc, in the order every output keeps: one chain per (row of W, row of x) over the vectors of the input */
INLINE void tile_pass(const char *const *wr, const float *const *gr, int first, int nr, const float *x, int64_t in,
                      int batch, int type, size_t row_bytes, const char *next, const char *later, int prefetch,
                      vf acc[ROWS][BATCH_BLOCK]) {
    vf a[ROWS][BATCH_BLOCK]; /* (local, so they stay in registers whatever `first` is) */
    for (int r = 0; r < nr; r++)
        for (int b = 0; b < batch; b++) a[r][b] = splat(0);
    /* a line of each row at a time, then the blocks left: the same sequence of vectors either way */
    const int64_t block = load_block(type), per_line = LINE / weight_bytes(block, type) * block;
    int64_t i = 0;
    for (; i + per_line <= in; i += per_line) {
        for (int r = 0; prefetch && r < nr; r++) {
            if (type == I4) __builtin_prefetch(next + r * row_bytes + weight_bytes(i, type), 0, 3);
            __builtin_prefetch(later + r * row_bytes + weight_bytes(i, type), 0, 2);
        }
        for (int64_t j = 0; j < per_line; j += block)
            for (int k = 0; k < block / VW; k++) {
                vf xv[BATCH_BLOCK];
                for (int b = 0; b < batch; b++) xv[b] = load(x + b * in + i + j + k * VW);
                for (int r = 0; r < nr; r++) {
                    vf wv = load_w(wr[first + r], i + j, k, type, gr[first + r]);
                    for (int b = 0; b < batch; b++) a[r][b] += wv * xv[b];
                }
            }
    }
    for (; i + block <= in; i += block)
        for (int k = 0; k < block / VW; k++) {
            vf xv[BATCH_BLOCK];
            for (int b = 0; b < batch; b++) xv[b] = load(x + b * in + i + k * VW);
            for (int r = 0; r < nr; r++) {
                vf wv = load_w(wr[first + r], i, k, type, gr[first + r]);
                for (int b = 0; b < batch; b++) a[r][b] += wv * xv[b];
            }
        }
    for (int r = 0; r < nr; r++)
        for (int b = 0; b < batch; b++) acc[first + r][b] = a[r][b];
}

INLINE void tile(const void *w, const float *x, float *y, const float *scale, const float *gs, int64_t in, int64_t out,
                 int batch, int rows, int type) {
    const size_t row_bytes = weight_bytes(in, type);
    const char *wr[ROWS]; /* each row's weights and int4 scales (the last row repeated past `rows`) */
    const float *gr[ROWS];
    for (int r = 0; r < ROWS; r++) {
        const int64_t row = r < rows ? r : rows - 1;
        wr[r] = (const char *)w + row * row_bytes, gr[r] = gs ? gs + row * (in / INT4_GROUP) : NULL;
    }
    const char *next = (const char *)w + ROWS * row_bytes, *later = (const char *)w + L2_AHEAD * ROWS * row_bytes;
    vf acc[ROWS][BATCH_BLOCK];
    if (batch == 1 && ROWS_IN_TURN && type != I4) { /* the rows in turn: one stream to the hardware prefetcher */
        for (int r = 0; r < rows; r++) tile_pass(wr, gr, r, 1, x, in, 1, type, row_bytes, next, later, 0, acc);
        for (int r = rows; r < ROWS; r++) acc[r][0] = splat(0);
    } else
        tile_pass(wr, gr, 0, ROWS, x, in, batch, type, row_bytes, next, later, 1, acc);
    const int64_t i = in / load_block(type) * load_block(type);
    float sums[BATCH_BLOCK][ROWS];
    for (int b = 0; b < batch; b++) store_sum4(acc[0][b], acc[1][b], acc[2][b], acc[3][b], sums[b]);
    for (int b = 0; b < batch; b++)
        for (int r = 0; r < rows; r++) {
            float *yr = y + b * out + r;
            *yr = sums[b][r];
            for (int64_t j = i; j < in; j++) *yr += scalar_w(wr[r], j, type) * x[b * in + j]; /* the tail */
            if (scale) *yr *= scale[r];
        }
}

/* rows o .. o + ROWS - 1 (those below out) of y[b, o] = sum_i W[o, i] x[b, i], for up to ROWS_PER_PASS rows of x;
 * int8: times its row's scale[o], int4: each weight times its group's scale[o, i / INT4_GROUP] */
INLINE void gemv_rows(const void *W, const float *scale, const float *x, float *y, int64_t out, int64_t in,
                      int64_t batch, int64_t o, int type) {
    const char *w = (const char *)W + o * weight_bytes(in, type);
    const float *s = type == I8 ? scale + o : NULL, *gs = type == I4 ? scale + o * (in / INT4_GROUP) : NULL;
    const int rows = out - o < ROWS ? (int)(out - o) : ROWS;
    int64_t b = 0;
    for (; b + batch_block(type) <= batch; b += batch_block(type))
        tile(w, x + b * in, y + b * out + o, s, gs, in, out, batch_block(type), rows, type);
    switch (batch - b) { /* constant block sizes, so the tile's loops unroll into registers */
#if BATCH_BLOCK == 6
        case 5: tile(w, x + b * in, y + b * out + o, s, gs, in, out, 5, rows, type); break;
        case 4: tile(w, x + b * in, y + b * out + o, s, gs, in, out, 4, rows, type); break;
        case 3: tile(w, x + b * in, y + b * out + o, s, gs, in, out, 3, rows, type); break;
        case 2: tile(w, x + b * in, y + b * out + o, s, gs, in, out, 2, rows, type); break;
#endif
        case 1: tile(w, x + b * in, y + b * out + o, s, gs, in, out, 1, rows, type); break;
    }
}

/* the product for each weight type in its own function, so each thread's loop is compiled for one type; split
 * between threads by tiles of rows where the weight is large enough to repay waking them */
struct gemv_job {
    const void *W;
    const float *scale, *x;
    float *y;
    int64_t out, in, batch;
};
INLINE int64_t tiles(int64_t out) { return (out + ROWS - 1) / ROWS; }
/* rows of x for the next pass over the weights, of `left`: at most ROWS_PER_PASS, the passes as even as they can
 * be (the head's 65 rows: 33 + 32, not 64 + 1, whose last pass reads every weight for one row) */
INLINE int64_t pass_rows(int64_t left) {
    const int64_t passes = (left + ROWS_PER_PASS - 1) / ROWS_PER_PASS;
    return (left + passes - 1) / passes;
}
#define GEMV(name, type)                                                                                          \
    static void name##_part(const void *job, int64_t begin, int64_t end) {                                      \
        const struct gemv_job *j = job;                                                                          \
        for (int64_t t = begin; t < end; t++) gemv_rows(j->W, j->scale, j->x, j->y, j->out, j->in, j->batch, t * ROWS, type); \
    }                                                                                                            \
    static void name(const void *W, const float *scale, const float *x, float *y, int64_t out, int64_t in,     \
                     int64_t batch, int threads) { /* up to ROWS_PER_PASS rows */                              \
        const struct gemv_job job = {W, scale, x, y, out, in, batch};                                            \
        parallel(tiles(out), threads, out * in, name##_part, &job);                                              \
    }
GEMV(gemv_f32_rows, F32)
GEMV(gemv_bf16_rows, BF16)
GEMV(gemv_i8_rows, I8)
GEMV(gemv_i4_rows, I4)

/* fp32 and bf16 weights in panels (F32_PANELS, BF16_PANELS): W [out, in] stored as [ceil(out / PANEL), in, PANEL]
 * (rwkv_lm.runtime.cpu's `to_panels`; the last panel's missing rows zero), so a panel's PANEL outputs at input i are
 * one run of memory and the whole weight one sequential stream. bf16 panels widen each vector of W in registers and
 * multiply x rounded to bf16 (see bf16_rounded): the same blocks and chains as fp32. A register block takes
 * PANEL_VECS vectors of a panel's outputs against PANEL_ROWS rows of x, each x[b, i] broadcast: with AVX-512 24
 * FMAs per 4 loads and 6 broadcasts, and no sums across lanes, where the row tiles above (a dot product per row: a
 * chain per lane, the lanes summed at the end) spend 10 loads and their lane sums. Each output is the sum, in order, of its PANEL_K-input blocks, each block one
 * multiply-add chain over its inputs in order (fused where the level has FMA),
 *   y[b, o] = c_0 + c_1 + ...,   c_k = (((0 + W[o, 16k] x[b, 16k]) + W[o, 16k + 1] x[b, 16k + 1]) + ...),
 * whatever the batch or the register block it falls in: batch-invariant by construction, and rounding like the
 * AVX-512 row tiles' 16 lanes (chains of 16 and in / 16 sums; one chain over all 768 inputs was 4-6x further from
 * fp64).
 * A block of a panel (4 KB) serves every row block of x from L1, and from PANEL_PREFETCH_BATCH rows of x the row
 * blocks share the prefetches of the stream PANEL_AHEAD bytes on into L2 (AVX-512 and NEON; AVX2's below; all of them
 * in the first block's pass: 1.03-1.15x as long at B=16-64). Fewer rows leave the stream to the hardware prefetcher,
 * which follows one sequential read unaided and which a prefetch of every line only slows where there is little
 * compute per line (AMD EPYC, 600 MB of weights: without them 1.04-1.5x as fast at B=1-8 on one thread, level at B=6,
 * 0.98-1.13x on two; level at B=10-12; with them 1.1-1.3x as fast from B=16; bench/RESULTS.md, issue 20's eleventh
 * pass). Against the row tiles, 3072 x 768 from memory, 2 threads: B=1 1.03x, B=16 1.28x, B=33 1.40x, B=64 1.51x as
 * fast; the 0.1B model's 16-sequence steps 1.35-1.37x, its 33-token prompts 1.44-1.56x, one sequence level
 * (bench/RESULTS.md, issue 20's tenth pass). */
#define PANEL 64
const int panel_width = PANEL;
/* whether bf16 weights are stored in panels at this level: where no bf16 dot product takes them row-major
 * (avx512_bf16 and AMX: gemv_bf16_dp, gemv_bf16_amx) */
#ifdef __AVX512BF16__
const int bf16_panels = 0;
#else
const int bf16_panels = 1;
#endif
INLINE int panel_element_bytes(int type) { return type == BF16_PANELS ? 2 : 4; }
#define PANEL_ROWS 6
#if defined(__AVX512F__) || defined(__aarch64__)
#define PANEL_VECS 4 /* 6 x 4 accumulators, 4 vectors of W and a broadcast: 29 of 32 registers */
#else
/* 6 x 2 accumulators, 2 vectors of W and a broadcast: 15 of 16 registers, 8 loads per 12 FMAs (4 x 2's 6 per 8: on
 * Zen 2 512-token prompts 1.13-1.15x as fast, fp32 and bf16, 16-sequence steps 1.03-1.07x; bench/RESULTS.md, issue
 * 20's sixteenth pass) */
#define PANEL_VECS 2
#endif
#define PANEL_K 16
#if defined(__AVX512F__) || defined(__aarch64__)
#define PANEL_AHEAD 16384
#define PANEL_PREFETCH_BATCH 10
#define PANEL_BURST_BATCH INT64_MAX
#else
/* AVX2's blocks read a quarter of each 256-byte row of a panel (PANEL_VECS 2), a stride Zen 2's prefetchers follow
 * poorly, so from two rows of x (one row reads whole rows: PANEL_WIDE_VECS) the stream is prefetched, 4 KB on. From
 * PANEL_BURST_BATCH rows, where the FMAs bound a block, its share goes out at its start: the test in the loop cost
 * 7-15% from cache, 4-7% from memory at B=16. On Zen 2, the 0.1B model: bf16 4-sequence steps 1.30x as fast,
 * 16-sequence 1.04x; fp32 16-sequence steps 1.10x, 4-sequence and 33-token prompts level (its panels on huge pages;
 * on 4 KB pages the products alone at B=2-8 1.2-1.6x; 16 KB on level with 4 KB in the model, 1-2 KB 0.8-0.9x at
 * B=16; bench/RESULTS.md, issue 20's seventeenth pass) */
#define PANEL_AHEAD 4096
#define PANEL_PREFETCH_BATCH 2
#define PANEL_BURST_BATCH 10
#endif
/* bf16 panels against one row of x prefetch each input's lines BF16_PANEL_NEAR bytes (eight inputs) on: the
 * hardware prefetcher alone left Zen 2 well short of fp32 panels' speed in bytes (0.1B bf16 decode 1.13-1.20x as
 * fast with them; 512 and 1536 bytes on were 4-9% and 6-8% slower than 1024, 2048 and 4096 12-18%), where fp32
 * panels are 12-15% slower with them (1024 or 2048 bytes on; bench/RESULTS.md, issue 20's sixteenth pass) */
#define BF16_PANEL_NEAR 1024
_Static_assert(PANEL % (PANEL_VECS * VW) == 0, "a panel is whole register blocks");
/* vectors of a register block against one row of x alone (a decode step): the panel's whole width where the
 * registers hold it (AVX-512: 4, AVX2: 8), so the weights are read in memory order, one line after the next. With
 * AVX2's 2-vector blocks a row of x read each 256-byte row of a panel in four visits a quarter apart, a stride that
 * Zen 2's prefetchers follow poorly (0.1B fp32 decode at 16 GB/s where llama.cpp streams 26: bench/RESULTS.md,
 * issue 20's fifteenth pass). Each output's chain is the same either way. */
#define PANEL_WIDE_VECS (PANEL / VW < 8 ? PANEL / VW : 8)

/* VW outputs of a panel of `type` at element `at`, in fp32 */
INLINE vf panel_load(const void *w, int type, int64_t at) {
    return type == BF16_PANELS ? widen_bf16((const uint16_t *)w + at) : load((const float *)w + at);
}

/* acc [m][PANEL] (a row block's sums; set where first) += the chain over inputs k0 .. k1 - 1 of `vecs` vectors of
 * a panel of `type` from `w` (its input 0 at the block's first output) against m rows of x; `ahead`: the panel's
 * input 0, whose stream this block prefetches `distance` bytes on for inputs ahead_from .. ahead_to - 1, all at its
 * start where `burst`, else each as the loop reaches it */
INLINE void panel_block(const void *w, int type, const char *ahead, int64_t ahead_from, int64_t ahead_to,
                        int64_t distance, const float *x, int64_t in, int64_t k0, int64_t k1, int m, int vecs,
                        float *acc, int first, int burst) {
    const int row_bytes = PANEL * panel_element_bytes(type); /* a panel's bytes at one input */
    vf a[PANEL_ROWS][PANEL_WIDE_VECS > PANEL_VECS ? PANEL_WIDE_VECS : PANEL_VECS];
    for (int r = 0; r < m; r++)
        for (int v = 0; v < vecs; v++) a[r][v] = splat(0);
    if (burst)
        for (int64_t i = ahead_from; i < ahead_to; i++)
            for (int l = 0; l < row_bytes / LINE; l++) __builtin_prefetch(ahead + i * row_bytes + distance + l * LINE, 0, 2);
    for (int64_t i = k0; i < k1; i++) {
        if (!burst && (uint64_t)(i - ahead_from) < (uint64_t)(ahead_to - ahead_from)) /* (one test, not two) */
            for (int l = 0; l < row_bytes / LINE; l++) __builtin_prefetch(ahead + i * row_bytes + distance + l * LINE, 0, 2);
        vf wv[PANEL_WIDE_VECS > PANEL_VECS ? PANEL_WIDE_VECS : PANEL_VECS];
        for (int v = 0; v < vecs; v++) wv[v] = panel_load(w, type, i * PANEL + v * VW);
        for (int r = 0; r < m; r++) {
            const vf xb = splat(x[r * in + i]);
            for (int v = 0; v < vecs; v++) a[r][v] += wv[v] * xb;
        }
    }
    for (int r = 0; r < m; r++)
        for (int v = 0; v < vecs; v++) {
            float *sum = acc + r * PANEL + v * VW;
            store(sum, first ? a[r][v] : load(sum) + a[r][v]);
        }
}

/* panels of `type` begin .. end - 1 for up to ROWS_PER_PASS rows of x (a gemv_job without scales; bf16: x rounded) */
INLINE void gemv_panels_part(const void *job, int64_t begin, int64_t end, int type) {
    const struct gemv_job *j = job;
    const int64_t in = j->in, batch = j->batch, row_blocks = (batch + PANEL_ROWS - 1) / PANEL_ROWS;
    const int wide = batch == 1, width = (wide ? PANEL_WIDE_VECS : PANEL_VECS) * VW; /* a register block's outputs */
    const int64_t blocks = row_blocks * (PANEL / width); /* register blocks per input block */
    const int prefetch = batch >= PANEL_PREFETCH_BATCH || (wide && type == BF16_PANELS);
    const int64_t distance = batch >= PANEL_PREFETCH_BATCH ? PANEL_AHEAD : BF16_PANEL_NEAR;
    const int burst = batch >= PANEL_BURST_BATCH;
    float acc[ROWS_PER_PASS * PANEL] __attribute__((aligned(64)));
    for (int64_t p = begin; p < end; p++) {
        const char *panel = (const char *)j->W + p * in * PANEL * panel_element_bytes(type), *ahead = panel;
        for (int64_t k0 = 0; k0 < in; k0 += PANEL_K) {
            const int64_t k1 = k0 + PANEL_K < in ? k0 + PANEL_K : in;
            for (int s = 0; s < PANEL; s += width)
                for (int64_t b = 0; b < batch; b += PANEL_ROWS) {
                    /* the block's share of the prefetches: spread over all of them, not in a burst in the first */
                    const int64_t nth = s / width * row_blocks + b / PANEL_ROWS;
                    const int64_t from = k0 + (k1 - k0) * nth / blocks;
                    const int64_t to = prefetch ? k0 + (k1 - k0) * (nth + 1) / blocks : from; /* (none: empty) */
                    const float *xb = j->x + b * in;
                    float *ab = acc + b * PANEL + s;
                    const void *w = panel + s * panel_element_bytes(type);
                    if (wide) {
                        panel_block(w, type, ahead, from, to, distance, xb, in, k0, k1, 1, PANEL_WIDE_VECS, ab, k0 == 0, 0);
                        continue;
                    }
/* (two calls, so that `burst` is a constant in each and the loop keeps no test of it) */
#define BLOCK(m) (burst ? panel_block(w, type, ahead, from, to, distance, xb, in, k0, k1, m, PANEL_VECS, ab, k0 == 0, 1) \
                       : panel_block(w, type, ahead, from, to, distance, xb, in, k0, k1, m, PANEL_VECS, ab, k0 == 0, 0))
                    switch (batch - b < PANEL_ROWS ? batch - b : PANEL_ROWS) { /* constant m: the block in registers */
                        case 6: BLOCK(6); break;
                        case 5: BLOCK(5); break;
                        case 4: BLOCK(4); break;
                        case 3: BLOCK(3); break;
                        case 2: BLOCK(2); break;
                        default: BLOCK(1); break;
                    }
#undef BLOCK
                }
        }
        const int64_t n = j->out - p * PANEL < PANEL ? j->out - p * PANEL : PANEL;
        for (int64_t b = 0; b < batch; b++) memcpy(j->y + b * j->out + p * PANEL, acc + b * PANEL, n * sizeof(float));
    }
}
static void gemv_f32_panels_part(const void *job, int64_t begin, int64_t end) { gemv_panels_part(job, begin, end, F32_PANELS); }
static void gemv_bf16_panels_part(const void *job, int64_t begin, int64_t end) { gemv_panels_part(job, begin, end, BF16_PANELS); }
static void gemv_panels_pass(const void *W, int type, const float *x, float *y, int64_t out, int64_t in, int64_t batch,
                             int threads) {
    const struct gemv_job job = {W, NULL, x, y, out, in, batch};
    parallel((out + PANEL - 1) / PANEL, threads, out * in, type == BF16_PANELS ? gemv_bf16_panels_part : gemv_f32_panels_part,
             &job);
}

/* bf16 weights multiply x rounded to bf16 (to nearest even), as llama.cpp's BF16 and bf16 matmuls do: the
 * products are then exact in fp32 and only the sums round. x's rounding costs about as much accuracy as the
 * weights' own (both 8 bits of mantissa); the default model's bits per byte in bench/RESULTS.md. Every level rounds
 * x the same way as avx512_bf16's conversion instruction (denormals to zero, NaN quieted), so a bf16 model gives the
 * same logits, to the sums' order, on every CPU (but for denormal weights and products, which that level's dot
 * product also flushes to zero). */
INLINE vf bf16_rounded(vf x) {
    const vu u = (vu)x, denormal = (vu)((u & 0x7F800000u) == 0), nan = (vu)((u & 0x7FFFFFFFu) > 0x7F800000u);
    const vu rounded = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u, quiet = (u | 0x00400000u) & 0xFFFF0000u;
    return (vf)((denormal & (u & 0x80000000u)) | (nan & quiet) | (~(denormal | nan) & rounded));
}
/* x rounded to bf16 into out (as fp32 values), any n (the last vector padded) */
static void round_to_bf16(const float *x, float *out, int64_t n) {
    int64_t i = 0;
    for (; i + VW <= n; i += VW) store(out + i, bf16_rounded(load(x + i)));
    if (i < n) {
        float pad[VW] = {0};
        memcpy(pad, x + i, (n - i) * sizeof(float));
        store(pad, bf16_rounded(load(pad)));
        memcpy(out + i, pad, (n - i) * sizeof(float));
    }
}

#ifdef __AVX512BF16__
/* On avx512_bf16, W and the rounded x go straight to the bf16 dot-product instruction (32 products a
 * vector: half the instructions of widening W, twice the products an FMA does). `in` a multiple of 32 (else the
 * widening kernel runs). In tiles, as `tile`: each output by the same operations whatever the batch. */
#define BF16_BATCH_BLOCK 6 /* 24 accumulators, 6 rows of x and a row of W: 31 of the 32 registers */

/* x [batch, in] fp32 -> bf16, rounded to nearest even (in a multiple of 32) */
static void to_bf16(const float *x, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i += 32)
        _mm512_storeu_si512(out + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i)));
}

/* rows first .. first + nr - 1 of a bf16 tile against `batch` rows of x (in bf16) into acc */
INLINE void tile_bf16_pass(const uint16_t *const *wr, int first, int nr, const uint16_t *x, int64_t in, int batch,
                           const uint16_t *later, __m512 acc[ROWS][BF16_BATCH_BLOCK]) {
    __m512 a[ROWS][BF16_BATCH_BLOCK];
    for (int r = 0; r < nr; r++)
        for (int b = 0; b < batch; b++) a[r][b] = _mm512_setzero_ps();
    for (int64_t i = 0; i < in; i += 32) {
        for (int r = 0; later && r < nr; r++) _mm_prefetch((const char *)(later + r * in + i), _MM_HINT_T1);
        __m512bh xv[BF16_BATCH_BLOCK];
        for (int b = 0; b < batch; b++) xv[b] = (__m512bh)_mm512_loadu_si512(x + b * in + i);
        for (int r = 0; r < nr; r++) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr[first + r] + i);
            for (int b = 0; b < batch; b++) a[r][b] = _mm512_dpbf16_ps(a[r][b], wv, xv[b]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int b = 0; b < batch; b++) acc[first + r][b] = a[r][b];
}

INLINE void tile_bf16(const uint16_t *w, const uint16_t *x, float *y, int64_t in, int64_t out, int batch, int rows) {
    const uint16_t *wr[ROWS]; /* each row's weights (the last row repeated past `rows`) */
    for (int r = 0; r < ROWS; r++) wr[r] = w + (r < rows ? r : rows - 1) * in;
    __m512 acc[ROWS][BF16_BATCH_BLOCK];
    if (batch == 1) { /* the rows in turn: one stream to the hardware prefetcher */
        for (int r = 0; r < rows; r++) tile_bf16_pass(wr, r, 1, x, in, 1, NULL, acc);
        for (int r = rows; r < ROWS; r++) acc[r][0] = _mm512_setzero_ps();
    } else
        tile_bf16_pass(wr, 0, ROWS, x, in, batch, w + L2_AHEAD * ROWS * in, acc);
    for (int b = 0; b < batch; b++) store_rows((vf)acc[0][b], (vf)acc[1][b], (vf)acc[2][b], (vf)acc[3][b], y + b * out, rows);
}

struct bf16_job {
    const uint16_t *W, *x;
    float *y;
    int64_t out, in, batch;
};
static void gemv_bf16_dp_part(const void *job, int64_t begin, int64_t end) {
    const struct bf16_job *j = job;
    const int64_t in = j->in, out = j->out, batch = j->batch;
    for (int64_t o = begin * ROWS; o < end * ROWS && o < out; o += ROWS) {
        const uint16_t *w = j->W + o * in, *x = j->x;
        float *y = j->y + o;
        const int rows = out - o < ROWS ? (int)(out - o) : ROWS;
        int64_t b = 0;
        for (; b + BF16_BATCH_BLOCK <= batch; b += BF16_BATCH_BLOCK)
            tile_bf16(w, x + b * in, y + b * out, in, out, BF16_BATCH_BLOCK, rows);
        switch (batch - b) { /* constant tile sizes, so the loops unroll into registers */
            case 5: tile_bf16(w, x + b * in, y + b * out, in, out, 5, rows); break;
            case 4: tile_bf16(w, x + b * in, y + b * out, in, out, 4, rows); break;
            case 3: tile_bf16(w, x + b * in, y + b * out, in, out, 3, rows); break;
            case 2: tile_bf16(w, x + b * in, y + b * out, in, out, 2, rows); break;
            case 1: tile_bf16(w, x + b * in, y + b * out, in, out, 1, rows); break;
        }
    }
}

/* up to ROWS_PER_PASS rows of x; returns 2 where the buffer could not be allocated */
static int gemv_bf16_dp(const uint16_t *W, const float *x, float *y, int64_t out, int64_t in, int64_t batch, int threads) {
    uint16_t *x_bf16 = malloc(batch * in * sizeof(uint16_t));
    if (!x_bf16) return 2;
    to_bf16(x, x_bf16, batch * in);
    const struct bf16_job job = {W, x_bf16, y, out, in, batch};
    parallel(tiles(out), threads, out * in, gemv_bf16_dp_part, &job);
    free(x_bf16);
    return 0;
}
#endif

#ifdef __AMX_TILE__
/* AMX's tiles (Sapphire Rapids and later Xeons), for bf16 and int8 products below. Linux lends a process the
 * tiles' 8 KB of state only when asked (arch_prctl); where it refuses, the process keeps the AVX-512 kernels
 * throughout. */
#include <sys/syscall.h>
#include <immintrin.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define AMX_ROWS 16 /* rows of W in a tile (and of x in its other operand) */
#define AMX_AHEAD 2 /* the tile of W AMX_AHEAD on is prefetched into L2, a line a row with each step of this one */

static int amx_granted(void) { /* asked once a process, from the caller's thread, before any worker uses a tile */
    static atomic_int granted = -1;
    int g = atomic_load(&granted);
    if (g < 0) atomic_store(&granted, g = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0);
    return g;
}

/* every tile register 16 rows: 4 holds W (64 bytes a row), the others x or sums, x_bytes a row (bf16: 64, 16 rows
 * of x in pairs; int8: 4 a row of x, in quads). bf16 uses 0-3 for sums, 5 and 7 for x; int8 0 and 5. */
static void amx_configure(int x_bytes) {
    struct { uint8_t palette, start_row, reserved[14]; uint16_t bytes_per_row[16]; uint8_t rows[16]; } config = {.palette = 1};
    for (int t = 0; t < 8; t++) config.bytes_per_row[t] = t == 4 ? 64 : x_bytes, config.rows[t] = AMX_ROWS;
    _tile_loadconfig(&config);
}

INLINE int64_t amx_row_tiles(int64_t out) { return (out + AMX_ROWS - 1) / AMX_ROWS; }

/* W's rows past its last whole tile (`out % 16` rows of row_bytes) in a tile of their own, zero below them: NULL
 * where there are none, or where it could not be allocated (out % AMX_ROWS says which) */
static void *amx_last_tile(const void *W, int64_t out, size_t row_bytes) {
    const int64_t rows = out % AMX_ROWS;
    char *last = rows ? calloc(AMX_ROWS, row_bytes) : NULL;
    if (last) memcpy(last, (const char *)W + (out - rows) * row_bytes, rows * row_bytes);
    return last;
}
#endif

/* whether this build's bf16 and int8 products run on AMX's tiles: the amx level where Linux lends them (Kernels.amx_tiles) */
int amx_tiles(void) {
#ifdef __AMX_TILE__
    return amx_granted();
#else
    return 0;
#endif
}

#ifdef __AMX_BF16__
/* On CPUs with AMX (Sapphire Rapids and later Xeons), bf16 products run on its tiles: TDPBF16PS multiplies a
 * 16 x 32 tile of W (16 rows of it, 64 bytes each, read in place: W's own layout) by a 32 x 16 tile of x and adds
 * into 16 x 16 fp32 sums, 8,192 products an instruction. A pass of 64 rows of x over the 0.1B block's 3072 x 768
 * key takes 0.74 ms on one core against 3.1 with vdpbf16ps, and one row of x (decode) reads W as fast as that
 * kernel (13-15 GB/s either; 0.1B prompts 2.6-3.2x as fast, decode level: bench/RESULTS.md, issue 20's ninth pass). Every batch takes this path, one
 * row of x too, so each output is still the same operations whatever the batch: x's columns of a tile never
 * meet, and each sum runs over the chunks of 32 inputs in order (the tile's own order of adding, which no
 * sequence of fp32 additions we tried reproduces, differs from vdpbf16ps's: bits differ from the
 * avx512_bf16 level's, as every level's do). */
_Static_assert(ROWS_PER_PASS <= 4 * AMX_ROWS, "a pass's rows of x fill at most the four tiles of sums (0-3)");
struct amx_job {
    const uint16_t *W, *last; /* last: the final 16 rows, zero past W's end where its rows are no multiple of 16 */
    const uint32_t *x;        /* x in pairs: [ceil(batch / 16)][in / 2][16] (two bf16 inputs of one row per word) */
    float *y;
    int64_t out, in, batch;
};

/* x [batch, in] fp32 -> bf16 (round to nearest even) in the layout of the tiles' second operand: for each 16 rows
 * of x, word [i / 2][r] holds inputs i and i + 1 of row r; rows past the batch are zero */
static void to_bf16_pairs(const float *x, uint16_t *bf16, uint32_t *pairs, int64_t batch, int64_t in) {
    const int64_t blocks = (batch + AMX_ROWS - 1) / AMX_ROWS;
    memset(pairs, 0, blocks * in / 2 * AMX_ROWS * sizeof(uint32_t));
    to_bf16(x, bf16, batch * in);
    for (int64_t b = 0; b < batch; b++) {
        uint32_t *to = pairs + (b / AMX_ROWS) * (in / 2) * AMX_ROWS + b % AMX_ROWS;
        for (int64_t i = 0; i < in / 2; i++) memcpy(to + i * AMX_ROWS, bf16 + b * in + 2 * i, sizeof(uint32_t));
    }
}

/* one tile's rows of W (w: 16 rows of `in`) against `blocks` x 16 rows of x into sums[0 .. blocks - 1][16][16] */
static void amx_tile(const uint16_t *w, const uint32_t *x, int64_t in, int blocks, const uint16_t *later,
                     float sums[4][AMX_ROWS][AMX_ROWS]) {
    const int64_t stride = in * sizeof(uint16_t), block = in / 2 * AMX_ROWS;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t i = 0; i < in; i += 32) {
        for (int r = 0; later && r < AMX_ROWS; r++) _mm_prefetch((const char *)(later + r * in + i), _MM_HINT_T1);
        const uint32_t *xi = x + i / 2 * AMX_ROWS;
        _tile_loadd(4, w + i, stride);
        _tile_loadd(5, xi, 64);
        _tile_dpbf16ps(0, 4, 5);
        if (blocks > 1) {
            _tile_loadd(7, xi + block, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (blocks > 2) {
            _tile_loadd(5, xi + 2 * block, 64);
            _tile_dpbf16ps(2, 4, 5);
        }
        if (blocks > 3) {
            _tile_loadd(7, xi + 3 * block, 64);
            _tile_dpbf16ps(3, 4, 7);
        }
    }
    _tile_stored(0, sums[0], 64);
    if (blocks > 1) _tile_stored(1, sums[1], 64);
    if (blocks > 2) _tile_stored(2, sums[2], 64);
    if (blocks > 3) _tile_stored(3, sums[3], 64);
}

static void gemv_bf16_amx_part(const void *job, int64_t begin, int64_t end) {
    const struct amx_job *j = job;
    const int64_t in = j->in, out = j->out, batch = j->batch, tiles = amx_row_tiles(out);
    const int blocks = (int)((batch + AMX_ROWS - 1) / AMX_ROWS);
    float sums[4][AMX_ROWS][AMX_ROWS] __attribute__((aligned(64)));
    amx_configure(64);
    for (int64_t t = begin; t < end; t++) {
        const int64_t o = t * AMX_ROWS, rows = out - o < AMX_ROWS ? out - o : AMX_ROWS;
        const uint16_t *w = rows < AMX_ROWS ? j->last : j->W + o * in;
        const uint16_t *later = t + AMX_AHEAD < tiles - 1 ? j->W + (o + AMX_AHEAD * AMX_ROWS) * in : NULL;
        amx_tile(w, j->x, in, blocks, later, sums);
        for (int64_t b = 0; b < batch; b++)
            for (int64_t r = 0; r < rows; r++) j->y[b * out + o + r] = sums[b / AMX_ROWS][r][b % AMX_ROWS];
    }
    _tile_release(); /* the thread gives its tile state back (else every context switch saves 8 KB more) */
}

/* up to ROWS_PER_PASS rows of x (4 x 16: tile registers 0-3); returns 2 where a buffer could not be allocated */
static int gemv_bf16_amx(const uint16_t *W, const float *x, float *y, int64_t out, int64_t in, int64_t batch,
                         int threads) {
    const int64_t blocks = (batch + AMX_ROWS - 1) / AMX_ROWS;
    uint32_t *pairs = malloc(blocks * in / 2 * AMX_ROWS * sizeof(uint32_t));
    uint16_t *bf16 = malloc(batch * in * sizeof(uint16_t)), *last = amx_last_tile(W, out, in * sizeof(uint16_t));
    if (!pairs || !bf16 || (out % AMX_ROWS && !last)) {
        free(pairs), free(bf16), free(last);
        return 2;
    }
    to_bf16_pairs(x, bf16, pairs, batch, in);
    const struct amx_job job = {W, last, pairs, y, out, in, batch};
    parallel(amx_row_tiles(out), threads, out * in, gemv_bf16_amx_part, &job);
    free(pairs), free(bf16), free(last);
    return 0;
}
#endif

#ifdef __AVX2__
/* int4 and int8 weights at every x86 level from avx2 (gemv_qx; at the amx level int8 goes to AMX's tiles instead):
 * the activations are quantized once per product to int8, one fp32 scale per ACT_GROUP inputs of a row (the
 * group's largest magnitude to 127, round to nearest even; `round_activations` in cpu_kernels.py is the same in
 * torch), and a weight vector's products with them are integer, exact, one float FMA per group after. With VNNI
 * one vpdpbusd sums four u8 x s8 products into each int32 lane; with AVX2 alone vpmaddubsw and vpmaddwd do it
 * in two (below). int4 instructions per 128 weights and row of x: ~5 with VNNI against ~56 dequantizing to fp32,
 * so a decode step is no longer compute-bound. Not the fp32 product: each x carries its group's rounding, at
 * most half a step of max/127. Each output by the same operations whatever the batch (a row of x is quantized
 * alone). The weights are in quads (tile_quads); int8 ones row-major (a model whose widths are no multiple of
 * ACT_GROUP) in tiles (tile_i8_rows). */
#define QX_BATCH_BLOCK 4 /* rows of x a row-major int8 tile takes */

/* int8 weights in quads (I8_QUADS): W [out, in] stored as [ceil(out / QUAD_ROWS), in / 4, QUAD_ROWS, 4] bytes of
 * w + 128 (rwkv_lm.runtime.cpu's `to_quads`; the last block's missing rows hold w = 0), so one 64-byte line is four
 * consecutive inputs of 16 rows, multiplied by four inputs of x broadcast. An activation group is then 16 of them
 * for 16 rows and a row of x, then one conversion and one FMA by the group's scale for the 16 rows together;
 * row-major (the VNNI levels' tile_i8_rows), each row's group took a vpdpbusd, a conversion and an FMA of its own,
 * and a vpdpbusd and a subtraction for w's sum: 33 rows of x by a 3072 x 768 weight 2.3x as fast on one Zen 4 core,
 * one row 2.2x from cache.
 * int4 weights in quads (I4_QUADS): W stored as [ceil(out / QUAD_ROWS), in / ACT_GROUP, 8, QUAD_ROWS, 4] bytes,
 * byte [blk, g, j, r, m] holding input 64 g + 4 j + m of row 16 blk + r in its low nibble and input
 * 64 g + 4 (j + 8) + m in its high one, each as w + 8, and the group scales as [ceil(out / QUAD_ROWS),
 * in / ACT_GROUP, QUAD_ROWS] (rwkv_lm.runtime.cpu's `to_int4_quads`; the last block's missing rows w = 0).
 * A group's integer sum starts from minus the weights' offset times its q's sum (xc, one int32 a row of x and
 * group; int8 on AVX2 alone takes w itself: no offset) and is exact (|sum| < 2^24, its conversion exact too); each
 * output is then the chain over its groups of FMAs of it, acc = fma(sum, x's scale, acc) (int4: fma(sum * x's
 * scale, the group's weight scale, acc)), times the row's scale last (int8): the same integers and float
 * operations at every level that multiplies in quads, so each output's bits are the same at all of them and
 * whatever the batch. */
typedef int32_t x_quad __attribute__((may_alias, aligned(1))); /* four int8 of x, read as one int32 */
#endif

#ifdef __AVX512VNNI__
#define QUAD_BATCH 8 /* rows of x a tile of quads takes: their 8 int32 and 8 fp32 sums are 16 of the 32 registers */
#define I8_QUADS_OFFSET 128 /* int8 quads are multiplied as stored, w + 128 */

/* one row of x (in a multiple of ACT_GROUP) as int8 q with scales s: x[i] ~= q[i] s[i / ACT_GROUP] */
INLINE void quantize_act(const float *x, int8_t *q, float *s, int64_t in) {
    for (int64_t g = 0; g < in; g += ACT_GROUP) {
        __m512 m = _mm512_setzero_ps();
        __mmask16 nan = 0; /* (max drops NaN: a NaN input makes the scale NaN, so its outputs are NaN as in fp32) */
        for (int j = 0; j < ACT_GROUP; j += 16) {
            const __m512 v = _mm512_loadu_ps(x + g + j);
            m = _mm512_max_ps(m, _mm512_abs_ps(v)), nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        }
        const float amax = nan ? NAN : _mm512_reduce_max_ps(m);
        const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
        s[g / ACT_GROUP] = amax / 127.0f;
        for (int j = 0; j < ACT_GROUP; j += 16)
            _mm_storeu_si128((__m128i *)(q + g + j), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + g + j), inv))));
    }
}
/* a quantized row of x as the row-major int8 tiles read it: q + 128, unsigned (vpdpbusd's u8 operand) */
INLINE void rows_operand(int8_t *q, int64_t in) {
    for (int64_t i = 0; i < in; i += 64)
        _mm512_storeu_si512(q + i, _mm512_xor_si512(_mm512_loadu_si512(q + i), _mm512_set1_epi8((char)128)));
}

/* rows first .. first + nr - 1 of an int8 tile against `batch` rows of x (q + 128, scales xs) into acc */
INLINE void tile_i8_pass(const int8_t *const *wr, int first, int nr, const uint8_t *xq, const float *xs, int64_t in,
                         int batch, const int8_t *later, __m512 acc[ROWS][QX_BATCH_BLOCK]) {
    const __m512i offset = _mm512_set1_epi8((char)128);
    __m512 a[ROWS][QX_BATCH_BLOCK];
    for (int r = 0; r < nr; r++)
        for (int b = 0; b < batch; b++) a[r][b] = _mm512_setzero_ps();
    for (int64_t i = 0; i < in; i += ACT_GROUP) {
        for (int r = 0; later && r < nr; r++) _mm_prefetch((const char *)(later + r * in + i), _MM_HINT_T1);
        for (int r = 0; r < nr; r++) {
            const __m512i wv = _mm512_loadu_si512(wr[first + r] + i);
            /* the dot of (q + 128) and w, less 128 times w's sum: the dot of q and w, each sum started from that */
            const __m512i minus_bias = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, wv));
            for (int b = 0; b < batch; b++) {
                const __m512i dot = _mm512_dpbusd_epi32(minus_bias, _mm512_loadu_si512(xq + b * in + i), wv);
                a[r][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xs[(b * in + i) / ACT_GROUP]), a[r][b]);
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int b = 0; b < batch; b++) acc[first + r][b] = a[r][b];
}

/* `rows` (up to ROWS) row-major int8 rows against `batch` rows of x, each output's lanes summed by store_sum4: the
 * bits differ from those of the same weights in quads */
INLINE void tile_i8_rows(const int8_t *w, const float *scale, const int8_t *xq, const float *xs, float *y, int64_t in,
                         int64_t out, int batch, int rows) {
    const int8_t *wr[ROWS];
    for (int r = 0; r < ROWS; r++) wr[r] = w + (r < rows ? r : rows - 1) * in;
    __m512 acc[ROWS][QX_BATCH_BLOCK];
    const uint8_t *xu = (const uint8_t *)xq;
    if (batch == 1) { /* the rows in turn: one stream to the hardware prefetcher */
        for (int r = 0; r < rows; r++) tile_i8_pass(wr, r, 1, xu, xs, in, 1, NULL, acc);
        for (int r = rows; r < ROWS; r++) acc[r][0] = _mm512_setzero_ps();
    } else
        tile_i8_pass(wr, 0, ROWS, xu, xs, in, batch, w + L2_AHEAD * ROWS * in, acc);
    for (int b = 0; b < batch; b++) {
        float sums[ROWS];
        store_sum4((vf)acc[0][b], (vf)acc[1][b], (vf)acc[2][b], (vf)acc[3][b], sums);
        for (int r = 0; r < rows; r++) y[b * out + r] = sums[r] * scale[r];
    }
}

/* rows of W in quads (I8_QUADS, or I4_QUADS where `i4`, a constant where it is inlined), 16 at a time against `batch`
 * rows of x (q, scales xs, sums' starts xc) into y; `scale`: int8's per row, int4's [in / ACT_GROUP, QUAD_ROWS] of
 * this block. A group is, per row of x, 16 vpdpbusd (int4: 8 loads of 16 rows, a mask and a shift each, 16
 * vpdpbusd against x broadcast as int8's), then one conversion and one FMA by the 16 rows' scales (int4: a product
 * by x's scale, then the FMA); row-major (the kernel before these, in git history) a row's two int4 groups took two
 * vpdpbusd, a conversion, a product and an FMA, and their unpacking and scales were each row's. */
INLINE void tile_quads(const uint8_t *w, const float *scale, const int8_t *xq, const float *xs, const int32_t *xc,
                       float *y, int64_t in, int64_t out, int batch, int rows, int i4) {
    const int64_t groups = in / ACT_GROUP;
    const __m512i low = _mm512_set1_epi8(15);
    __m512 acc[QUAD_BATCH];
    for (int b = 0; b < batch; b++) acc[b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i dot[QUAD_BATCH];
        for (int b = 0; b < batch; b++) dot[b] = _mm512_set1_epi32(xc[b * groups + g]);
        const uint8_t *wg = w + g * (i4 ? ACT_GROUP / 2 : ACT_GROUP) * QUAD_ROWS;
        for (int j = 0; j < (i4 ? ACT_GROUP / 8 : ACT_GROUP / 4); j++) {
            const __m512i wv = _mm512_loadu_si512(wg + 64 * j);
            const __m512i lo = i4 ? _mm512_and_si512(wv, low) : wv, hi = _mm512_and_si512(_mm512_srli_epi32(wv, 4), low);
            for (int b = 0; b < batch; b++) {
                const int8_t *q = xq + b * in + g * ACT_GROUP + 4 * j;
                dot[b] = _mm512_dpbusd_epi32(dot[b], lo, _mm512_set1_epi32(*(const x_quad *)q));
                if (i4) dot[b] = _mm512_dpbusd_epi32(dot[b], hi, _mm512_set1_epi32(*(const x_quad *)(q + ACT_GROUP / 2)));
            }
        }
        for (int b = 0; b < batch; b++) {
            const __m512 sum = _mm512_cvtepi32_ps(dot[b]), x_scale = _mm512_set1_ps(xs[b * groups + g]);
            acc[b] = i4 ? _mm512_fmadd_ps(_mm512_mul_ps(sum, x_scale), _mm512_loadu_ps(scale + g * QUAD_ROWS), acc[b])
                        : _mm512_fmadd_ps(sum, x_scale, acc[b]);
        }
    }
    const __mmask16 valid = rows == QUAD_ROWS ? 0xFFFF : (__mmask16)((1u << rows) - 1);
    const __m512 row_scale = i4 ? _mm512_set1_ps(1.0f) : _mm512_maskz_loadu_ps(valid, scale);
    for (int b = 0; b < batch; b++) _mm512_mask_storeu_ps(y + b * out, valid, i4 ? acc[b] : _mm512_mul_ps(acc[b], row_scale));
}

#elif defined(__AVX2__)
/* AVX2 without VNNI (the avx2 level, and avx512 without avx512_vnni, as 256-bit code): vpmaddubsw multiplies 32 u8 by
 * 32 s8 and adds neighbouring pairs into int16 (saturating past 32767), vpmaddwd adds neighbouring int16 pairs into
 * int32: together one vpdpbusd, a quad's four products into each int32 lane. int4's nibbles (0 .. 15) take x's
 * signed quads as they are (a pair's sum within 2 * 15 * 128), so four loads' pair sums add up in int16 before one
 * vpmaddwd. int8's w + 128 against a signed x could saturate a pair (2 * 255 * 127), so the kernel takes w back
 * (the top bit flipped) and multiplies |w| by x with w's sign (vpsignb; pairs within 2 * 128 * 127). A 32-byte
 * vector is four inputs of 8 rows: a line of quads is two of them, the block's top and bottom halves. */
/* rows of x a tile of quads takes: 2 fp32 sums each (one a half) and an int32 sum, in 16 registers (at 33 rows
 * from cache 4 is as fast as 3 or faster, 2 slower, int8 and int4) */
#define QUAD_BATCH 4
#define I8_QUADS_OFFSET 0 /* (the kernel multiplies w itself) */
/* bytes ahead of each line that a tile prefetches into L2 as its first half reads that line: Zen 2's prefetchers
 * alone kept one core's int8 stream at ~10 GB/s (0.1B decode, bench/compare_kernels.py: a group's 16 lines 4 KB
 * ahead in a burst at its start, B=1 int8 1.12-1.15x, int4 1.27-1.37x, B=16 level; then each line 1 KB ahead as it
 * is read, B=1 int8 1.13-1.18x and int4 1.05-1.08x more, B=16 1.05-1.10x, where 512 bytes were 1-5% slower and 2 KB
 * 4-10%; bench/RESULTS.md, issue 20's fifteenth and sixteenth passes) */
#define QUADS_AHEAD 1024

INLINE float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
INLINE int32_t hsum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}
/* the sum of four u8 x s8 products in each int32 lane, added to acc (vpdpbusd's result, no pair above 32767) */
INLINE __m256i dot_quads(__m256i acc, __m256i u, __m256i s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
INLINE __m256i broadcast_quad(const int8_t *q) { return _mm256_set1_epi32(*(const x_quad *)q); }

/* one row of x (in a multiple of ACT_GROUP) as int8 q with scales s: x[i] ~= q[i] s[i / ACT_GROUP] (the VNNI
 * levels' values: the same scale, product and rounding) */
INLINE void quantize_act(const float *x, int8_t *q, float *s, int64_t in) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* the packs' lanes back in input order */
    for (int64_t g = 0; g < in; g += ACT_GROUP) {
        __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps(); /* (max drops NaN: as the VNNI levels' nan) */
        for (int j = 0; j < ACT_GROUP; j += 8) {
            const __m256 v = _mm256_loadu_ps(x + g + j);
            m = _mm256_max_ps(m, _mm256_and_ps(v, magnitude)), nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        const float amax = _mm256_movemask_ps(nan) ? NAN : hmax8(m);
        const __m256 inv = _mm256_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
        s[g / ACT_GROUP] = amax / 127.0f;
        for (int j = 0; j < ACT_GROUP; j += 32) {
            __m256i v[4];
            for (int k = 0; k < 4; k++) v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + g + j + 8 * k), inv));
            const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
            _mm256_storeu_si256((__m256i *)(q + g + j), _mm256_permutevar8x32_epi32(bytes, order));
        }
    }
}

/* `rows` (up to ROWS) row-major int8 rows against `batch` rows of x: each row's group sums exact, as in quads, then
 * the same chain of FMAs and the row's scale, so the bits are those of the same weights in quads */
INLINE void tile_i8_rows(const int8_t *w, const float *scale, const int8_t *xq, const float *xs, float *y, int64_t in,
                         int64_t out, int batch, int rows) {
    const int64_t groups = in / ACT_GROUP;
    for (int r = 0; r < rows; r++) {
        float acc[QX_BATCH_BLOCK] = {0};
        for (int64_t g = 0; g < groups; g++) {
            __m256i dot[QX_BATCH_BLOCK];
            for (int b = 0; b < batch; b++) dot[b] = _mm256_setzero_si256();
            for (int j = 0; j < ACT_GROUP; j += 32) {
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + r * in + g * ACT_GROUP + j));
                const __m256i magnitude = _mm256_abs_epi8(wv);
                for (int b = 0; b < batch; b++) {
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * in + g * ACT_GROUP + j));
                    dot[b] = dot_quads(dot[b], magnitude, _mm256_sign_epi8(xv, wv));
                }
            }
            for (int b = 0; b < batch; b++) acc[b] = fmaf((float)hsum8_epi32(dot[b]), xs[b * groups + g], acc[b]);
        }
        for (int b = 0; b < batch; b++) y[b * out + r] = acc[b] * scale[r];
    }
}

/* rows of W in quads (I8_QUADS, or I4_QUADS where `i4`, a constant where it is inlined), 16 at a time against `batch`
 * rows of x (q, scales xs, sums' starts xc) into y; `scale`: int8's per row, int4's [in / ACT_GROUP, QUAD_ROWS] of
 * this block. Each half of the block's rows takes the group in turn, its int32 sums then free for the other's. */
INLINE void tile_quads(const uint8_t *w, const float *scale, const int8_t *xq, const float *xs, const int32_t *xc,
                       float *y, int64_t in, int64_t out, int batch, int rows, int i4) {
    const int64_t groups = in / ACT_GROUP;
    const __m256i low = _mm256_set1_epi8(15), flip = _mm256_set1_epi8((char)128), ones = _mm256_set1_epi16(1);
    __m256 acc[QUAD_BATCH][2];
    for (int b = 0; b < batch; b++) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
    /* int8 against one row of x takes both halves of each line at once, on one broadcast of x (0.1B decode B=1 on
     * Zen 2 1.16-1.22x; int4 so was level; the same sums and chains) */
    const int both_halves = !i4 && batch == 1;
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *wg = w + g * (i4 ? ACT_GROUP / 2 : ACT_GROUP) * QUAD_ROWS;
        const int8_t *xg = xq + g * ACT_GROUP;
        for (int h = 0; h < (both_halves ? 1 : 2); h++) {
            __m256i dot[QUAD_BATCH];
            for (int b = 0; b < batch; b++) dot[b] = _mm256_set1_epi32(xc[b * groups + g]);
            if (i4)
                for (int c = 0; c < ACT_GROUP / 8; c += 4) { /* four loads' pair sums in int16: within 8 * 15 * 128 */
                    __m256i pairs[QUAD_BATCH];
                    for (int b = 0; b < batch; b++) pairs[b] = _mm256_setzero_si256();
                    for (int j = c; j < c + 4; j++) {
                        if (h == 0) __builtin_prefetch(wg + QUADS_AHEAD + 64 * j, 0, 2);
                        const __m256i wv = _mm256_loadu_si256((const __m256i *)(wg + 64 * j + 32 * h));
                        const __m256i lo = _mm256_and_si256(wv, low), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
                        for (int b = 0; b < batch; b++) {
                            const int8_t *q = xg + b * in + 4 * j;
                            pairs[b] = _mm256_add_epi16(pairs[b], _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast_quad(q)),
                                                                                   _mm256_maddubs_epi16(hi, broadcast_quad(q + ACT_GROUP / 2))));
                        }
                    }
                    for (int b = 0; b < batch; b++) dot[b] = _mm256_add_epi32(dot[b], _mm256_madd_epi16(pairs[b], ones));
                }
            else if (both_halves) { /* (the second half's sums and chain here, the first's below) */
                __m256i dot1 = _mm256_set1_epi32(xc[g]);
                for (int j = 0; j < ACT_GROUP / 4; j++) {
                    __builtin_prefetch(wg + QUADS_AHEAD + 64 * j, 0, 2);
                    const __m256i x4 = broadcast_quad(xg + 4 * j);
                    const __m256i w0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wg + 64 * j)), flip);
                    const __m256i w1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wg + 64 * j + 32)), flip);
                    dot[0] = dot_quads(dot[0], _mm256_abs_epi8(w0), _mm256_sign_epi8(x4, w0));
                    dot1 = dot_quads(dot1, _mm256_abs_epi8(w1), _mm256_sign_epi8(x4, w1));
                }
                const __m256 x_scale = _mm256_set1_ps(xs[g]);
                acc[0][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot1), x_scale, acc[0][1]);
            } else
                for (int j = 0; j < ACT_GROUP / 4; j++) {
                    if (h == 0) __builtin_prefetch(wg + QUADS_AHEAD + 64 * j, 0, 2);
                    const __m256i wv = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wg + 64 * j + 32 * h)), flip);
                    const __m256i magnitude = _mm256_abs_epi8(wv);
                    for (int b = 0; b < batch; b++)
                        dot[b] = dot_quads(dot[b], magnitude, _mm256_sign_epi8(broadcast_quad(xg + b * in + 4 * j), wv));
                }
            for (int b = 0; b < batch; b++) {
                const __m256 sum = _mm256_cvtepi32_ps(dot[b]), x_scale = _mm256_set1_ps(xs[b * groups + g]);
                acc[b][h] = i4 ? _mm256_fmadd_ps(_mm256_mul_ps(sum, x_scale), _mm256_loadu_ps(scale + g * QUAD_ROWS + 8 * h), acc[b][h])
                               : _mm256_fmadd_ps(sum, x_scale, acc[b][h]);
            }
        }
    }
    for (int b = 0; b < batch; b++) {
        if (rows == QUAD_ROWS) {
            for (int h = 0; h < 2; h++)
                _mm256_storeu_ps(y + b * out + 8 * h, i4 ? acc[b][h] : _mm256_mul_ps(acc[b][h], _mm256_loadu_ps(scale + 8 * h)));
            continue;
        }
        float sums[QUAD_ROWS]; /* (a partial block: int8's scale holds only its rows) */
        _mm256_storeu_ps(sums, acc[b][0]), _mm256_storeu_ps(sums + 8, acc[b][1]);
        for (int r = 0; r < rows; r++) y[b * out + r] = i4 ? sums[r] : sums[r] * scale[r];
    }
}
#endif

#ifdef __AVX2__
INLINE int64_t quad_blocks(int64_t out) { return (out + QUAD_ROWS - 1) / QUAD_ROWS; }

struct qx_job {
    const void *W;
    const float *scale, *x;
    int8_t *xq; /* x quantized (quantize_rows_part), with its scales xs */
    float *xs;
    int32_t *xc; /* weights in quads: each group's sum of q times minus the weights' offset (int8 I8_QUADS_OFFSET, int4 8) */
    float *y;
    int64_t out, in, batch; /* (a quantized row of x is `in` bytes) */
    int type;
};
/* rows begin .. end - 1 of x quantized for the product */
static void quantize_rows_part(const void *job, int64_t begin, int64_t end) {
    const struct qx_job *j = job;
    const int64_t in = j->in, groups = in / ACT_GROUP;
    for (int64_t b = begin; b < end; b++) {
        int8_t *q = j->xq + b * in;
        quantize_act(j->x + b * in, q, j->xs + b * groups, in);
        if (j->type == I8) {
#ifdef __AVX512VNNI__
            rows_operand(q, in); /* (AVX2's tile_i8_rows reads q as it is) */
#endif
            continue;
        }
        const int offset = j->type == I8_QUADS ? I8_QUADS_OFFSET : 8;
        for (int64_t g = 0; g < groups; g++) {
            int32_t sum = 0;
            if (offset) /* (AVX2's int8 has none) */
                for (int i = 0; i < ACT_GROUP; i++) sum += q[g * ACT_GROUP + i];
            j->xc[b * groups + g] = -offset * sum;
        }
    }
}
/* tiles begin .. end - 1 of row-major int8 weights against every row of x */
static void qx_rows_part(const void *job, int64_t begin, int64_t end) {
    const struct qx_job *j = job;
    const int64_t out = j->out, in = j->in, batch = j->batch;
    for (int64_t o = begin * ROWS; o < end * ROWS && o < out; o += ROWS) {
        const int rows = out - o < ROWS ? (int)(out - o) : ROWS;
        for (int64_t b = 0; b < batch; b += QX_BATCH_BLOCK) {
            const int m = batch - b < QX_BATCH_BLOCK ? (int)(batch - b) : QX_BATCH_BLOCK;
#define ROWS_TILE(m_)                                                                                              \
    tile_i8_rows((const int8_t *)j->W + o * in, j->scale + o, j->xq + b * in, j->xs + b * (in / ACT_GROUP),         \
                 j->y + b * out + o, in, out, m_, rows);
            switch (m) { /* constant tile sizes, so the loops unroll into registers */
                case 4: ROWS_TILE(4) break;
                case 3: ROWS_TILE(3) break;
                case 2: ROWS_TILE(2) break;
                default: ROWS_TILE(1) break;
            }
#undef ROWS_TILE
        }
    }
}

/* blocks begin .. end - 1 of int8 or int4 weights in quads against every row of x, in tiles of up to QUAD_BATCH
 * rows of x as even as they can be (33 by 8: 7, 7, 7, 6, 6), each block's weights read once from memory, then from
 * cache */
static void qx_quads_part(const void *job, int64_t begin, int64_t end) {
    const struct qx_job *j = job;
    const int64_t out = j->out, in = j->in, batch = j->batch, groups = in / ACT_GROUP;
    const int64_t n_tiles = (batch + QUAD_BATCH - 1) / QUAD_BATCH;
    const int i4 = j->type == I4_QUADS;
    for (int64_t blk = begin; blk < end; blk++) {
        const int64_t o = blk * QUAD_ROWS;
        const int rows = out - o < QUAD_ROWS ? (int)(out - o) : QUAD_ROWS;
        const uint8_t *w = (const uint8_t *)j->W + (i4 ? o * in / 2 : o * in);
        const float *scale = j->scale + (i4 ? o * groups : o);
        for (int64_t t = 0; t < n_tiles; t++) {
            const int64_t b = t * batch / n_tiles, m = (t + 1) * batch / n_tiles - b;
            const int8_t *xq = j->xq + b * in;
            const float *xs = j->xs + b * groups;
            const int32_t *xc = j->xc + b * groups;
#define QUAD_TILE(m_)                                                                                              \
    case m_:                                                                                                       \
        if (i4) tile_quads(w, scale, xq, xs, xc, j->y + b * out + o, in, out, m_, rows, 1);                        \
        else tile_quads(w, scale, xq, xs, xc, j->y + b * out + o, in, out, m_, rows, 0);                           \
        break;
            switch (m) { /* constant tile sizes, so the loops unroll into registers */
#if QUAD_BATCH == 8
                QUAD_TILE(8) QUAD_TILE(7) QUAD_TILE(6) QUAD_TILE(5)
#endif
                QUAD_TILE(4) QUAD_TILE(3) QUAD_TILE(2) QUAD_TILE(1)
            }
#undef QUAD_TILE
        }
    }
}

/* y [batch, out] = x [batch, in] W^T for int8 (type I8) or int8 and int4 in quads (I8_QUADS, I4_QUADS) weights
 * on int8 activations, in a multiple of ACT_GROUP; up to ROWS_PER_PASS rows of x. Returns 2 where the buffer could
 * not be allocated. */
static int gemv_qx(const void *W, const float *scale, int type, const float *x, float *y, int64_t out, int64_t in,
                   int64_t batch, int threads) {
    const int64_t groups = in / ACT_GROUP;
    int8_t *xq = malloc(batch * in + batch * groups * (sizeof(float) + sizeof(int32_t)));
    if (!xq) return 2;
    float *xs = (float *)(xq + batch * in);
    const struct qx_job job = {W, scale, x, xq, xs, (int32_t *)(xs + batch * groups), y, out, in, batch, type};
    parallel(batch, threads, batch * in, quantize_rows_part, &job);
    if (type == I8_QUADS || type == I4_QUADS) parallel(quad_blocks(out), threads, out * in, qx_quads_part, &job);
    else parallel(tiles(out), threads, out * in, qx_rows_part, &job);
    free(xq);
    return 0;
}
#endif

#ifdef __AMX_INT8__
/* int8 weights on AMX: TDPBSSD multiplies 16 rows of W (64 inputs, one activation group, read in place) by the
 * quantized x of up to 16 rows into the group's exact int32 sums, 16,384 products an instruction. Each output then
 * takes its groups in order, acc = fma(sum, the row of x's group scale, acc), and its weight row's scale last. Every
 * batch takes this path at the amx level (decode too), so each output is the same operations whatever the batch;
 * the VNNI levels' row-major float sums run per lane of 4 products instead, so the bits differ between them. */
struct amx_i8_job {
    const int8_t *W, *last; /* last: the final 16 rows, zero past W's end (as struct amx_job) */
    const float *scale;
    const int8_t *xq; /* x quantized, in quads: [16-row blocks][groups][16 quads][cols][4] */
    const float *xs;  /* its scales: [16-row blocks][groups][16] (zero past the batch) */
    float *y;
    int64_t out, in, batch;
    int cols; /* columns of x a tile holds: the batch, up to 16 */
};

/* x [batch, in] quantized as quantize_act does (a row at a time into q [in] and s [in / ACT_GROUP]), into the quads
 * and scales of struct amx_i8_job */
static void quantize_act_quads(const float *x, int8_t *q, float *s, int8_t *xq, float *xs, int64_t batch, int64_t in,
                               int cols) {
    const int64_t groups = in / ACT_GROUP, blocks = (batch + AMX_ROWS - 1) / AMX_ROWS;
    memset(xq, 0, blocks * groups * AMX_ROWS * cols * 4), memset(xs, 0, blocks * groups * AMX_ROWS * sizeof(float));
    for (int64_t b = 0; b < batch; b++) {
        quantize_act(x + b * in, q, s, in);
        const int64_t block = b / AMX_ROWS, n = b % AMX_ROWS;
        for (int64_t g = 0; g < groups; g++) {
            xs[(block * groups + g) * AMX_ROWS + n] = s[g];
            int8_t *to = xq + ((block * groups + g) * AMX_ROWS * cols + n) * 4;
            for (int k = 0; k < ACT_GROUP / 4; k++) memcpy(to + k * cols * 4, q + g * ACT_GROUP + 4 * k, 4);
        }
    }
}

static void gemv_i8_amx_part(const void *job, int64_t begin, int64_t end) {
    const struct amx_i8_job *j = job;
    const int64_t in = j->in, out = j->out, batch = j->batch, groups = in / ACT_GROUP, tiles = amx_row_tiles(out);
    const int cols = j->cols, x_bytes = 4 * cols;
    const __mmask16 valid = (__mmask16)((1u << cols) - 1);
    int32_t sums[AMX_ROWS][AMX_ROWS] __attribute__((aligned(64)));
    amx_configure(x_bytes);
    for (int64_t t = begin; t < end; t++) {
        const int64_t o = t * AMX_ROWS, rows = out - o < AMX_ROWS ? out - o : AMX_ROWS;
        const int8_t *w = rows < AMX_ROWS ? j->last : j->W + o * in;
        const int8_t *later = t + AMX_AHEAD < tiles - 1 ? j->W + (o + AMX_AHEAD * AMX_ROWS) * in : NULL;
        for (int64_t block = 0; block * AMX_ROWS < batch; block++) {
            __m512 acc[AMX_ROWS]; /* cols == 1: acc[0] holds the 16 outputs; else acc[m]: output m, one lane per column */
            for (int m = 0; m < AMX_ROWS; m++) acc[m] = _mm512_setzero_ps();
            for (int64_t g = 0; g < groups; g++) {
                for (int r = 0; later && block == 0 && r < AMX_ROWS; r++)
                    _mm_prefetch((const char *)(later + r * in + g * ACT_GROUP), _MM_HINT_T1);
                const int64_t at = block * groups + g;
                _tile_loadd(4, w + g * ACT_GROUP, in);
                _tile_loadd(5, j->xq + at * AMX_ROWS * x_bytes, x_bytes);
                _tile_zero(0);
                _tile_dpbssd(0, 4, 5);
                _tile_stored(0, sums, x_bytes);
                if (cols == 1) /* the 16 outputs' sums lie in a row */
                    acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums)), _mm512_set1_ps(j->xs[at * AMX_ROWS]), acc[0]);
                else {
                    const __m512 xs = _mm512_loadu_ps(j->xs + at * AMX_ROWS);
                    for (int m = 0; m < AMX_ROWS; m++)
                        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(valid, (const int32_t *)sums + m * cols)), xs, acc[m]);
                }
            }
            float done[AMX_ROWS][AMX_ROWS] __attribute__((aligned(64)));
            for (int m = 0; m < AMX_ROWS; m++) _mm512_store_ps(done[m], acc[m]);
            const int64_t here = batch - block * AMX_ROWS < cols ? batch - block * AMX_ROWS : cols;
            for (int64_t n = 0; n < here; n++)
                for (int64_t m = 0; m < rows; m++)
                    j->y[(block * AMX_ROWS + n) * out + o + m] = (cols == 1 ? done[0][m] : done[m][n]) * j->scale[o + m];
        }
    }
    _tile_release();
}

/* up to ROWS_PER_PASS rows of x; returns 2 where a buffer could not be allocated */
static int gemv_i8_amx(const int8_t *W, const float *scale, const float *x, float *y, int64_t out, int64_t in,
                       int64_t batch, int threads) {
    const int64_t groups = in / ACT_GROUP, blocks = (batch + AMX_ROWS - 1) / AMX_ROWS;
    const int cols = batch < AMX_ROWS ? (int)batch : AMX_ROWS;
    const int64_t quads = blocks * groups * AMX_ROWS * cols * 4, scales = blocks * groups * AMX_ROWS;
    /* the quads, their scales, and one row's q and s as quantize_act_quads makes them */
    int8_t *xq = malloc(quads + scales * sizeof(float) + groups * sizeof(float) + in), *last = amx_last_tile(W, out, in);
    if (!xq || (out % AMX_ROWS && !last)) {
        free(xq), free(last);
        return 2;
    }
    float *xs = (float *)(xq + quads), *s = xs + scales;
    quantize_act_quads(x, (int8_t *)(s + groups), s, xq, xs, batch, in, cols);
    const struct amx_i8_job job = {W, last, scale, xq, xs, y, out, in, batch, cols};
    parallel(amx_row_tiles(out), threads, out * in, gemv_i8_amx_part, &job);
    free(xq), free(last);
    return 0;
}
#endif

/* one pass over W: up to ROWS_PER_PASS rows of x (see linear) */
static int linear_pass(const void *W, const float *scale, int type, const float *x, float *y, int64_t out, int64_t in,
                       int64_t batch, int threads) {
    if (type == BF16 || type == BF16_PANELS) {
#ifdef __AMX_BF16__
        if (type == BF16 && in % 32 == 0 && amx_granted()) return gemv_bf16_amx(W, x, y, out, in, batch, threads);
#endif
#ifdef __AVX512BF16__
        if (type == BF16 && in % 32 == 0) return gemv_bf16_dp(W, x, y, out, in, batch, threads);
#endif
        float *rounded = malloc(batch * in * sizeof(float));
        if (!rounded) return 2;
        round_to_bf16(x, rounded, batch * in);
        if (type == BF16) gemv_bf16_rows(W, NULL, rounded, y, out, in, batch, threads);
        else gemv_panels_pass(W, type, rounded, y, out, in, batch, threads);
        free(rounded);
        return 0;
    }
#ifdef __AMX_INT8__
    if (type == I8 && in % ACT_GROUP == 0 && amx_granted()) return gemv_i8_amx(W, scale, x, y, out, in, batch, threads);
#endif
#ifdef __AVX2__
    if ((type == I8 || type == I8_QUADS || type == I4_QUADS) && in % ACT_GROUP == 0)
        return gemv_qx(W, scale, type, x, y, out, in, batch, threads);
#endif
    if (type == I8_QUADS || type == I4_QUADS) return 4; /* (only the levels from avx2 multiply them) */
    if (type == F32_PANELS) gemv_panels_pass(W, type, x, y, out, in, batch, threads);
    else if (type == F32) gemv_f32_rows(W, NULL, x, y, out, in, batch, threads);
    else if (type == I8) gemv_i8_rows(W, scale, x, y, out, in, batch, threads);
    else gemv_i4_rows(W, scale, x, y, out, in, batch, threads);
    return 0;
}

/* x [batch, in] fp32 times W [out, in] of the given type, transposed: y [batch, out]; int8 rows times scale[o],
 * int4 weights times scale[o, i / INT4_GROUP] (in quads: scale[o / QUAD_ROWS, i / INT4_GROUP, o % QUAD_ROWS]).
 * Returns 0, 1 for int4 rows no multiple of INT4_GROUP long, 2
 * where a buffer could not be allocated, or 4 for weights in quads where this level has no integer products (below avx2; or rows no multiple
 * of ACT_GROUP long). */
static int linear(const void *W, const float *scale, int type, const float *x, float *y, int64_t out, int64_t in,
                  int64_t batch, int threads) {
    if (type == I4 && in % INT4_GROUP) return 1;
    for (int64_t b = 0, rows; b < batch; b += rows) {
        rows = pass_rows(batch - b);
        const int err = linear_pass(W, scale, type, x + b * in, y + b * out, out, in, rows, threads);
        if (err) return err;
    }
    return 0;
}

/* The LoRAs' products, y[b, o] = sum_i x[b, i] W[i, o] (int8: times scale[o]), with W [in, out] row-major as the
 * model holds its LoRA matrices (w1 [C, rank], w2 [rank, C]): COL_VECTORS vectors of outputs against up to
 * BATCH_BLOCK rows of x at a time, every x[b, i] broadcast against a row of W, each output lane one chain over the
 * inputs in order, so any batch gets the same bits; the outputs past the last whole vector one scalar chain each.
 * [out, in] tiles gave each output of a second matrix (in = rank, 32-128) a chain of in / VW vectors, then a
 * reduction across its lanes and a scalar tail, which took as long as the products. W is F32, BF16 or I8. */
#define COL_VECTORS 4
INLINE void cols_tile(const void *W, const float *scale, const float *x, float *y, int64_t out, int64_t in, int batch,
                      int64_t o, int vectors, int type) {
    vf acc[BATCH_BLOCK][COL_VECTORS];
    for (int b = 0; b < batch; b++)
        for (int u = 0; u < vectors; u++) acc[b][u] = splat(0);
    for (int64_t i = 0; i < in; i++) {
        const char *row = (const char *)W + weight_bytes(i * out, type);
        vf wv[COL_VECTORS];
        for (int u = 0; u < vectors; u++) wv[u] = load_w(row, o, u, type, NULL);
        for (int b = 0; b < batch; b++) {
            const vf xv = splat(x[b * in + i]);
            for (int u = 0; u < vectors; u++) acc[b][u] += xv * wv[u];
        }
    }
    for (int b = 0; b < batch; b++)
        for (int u = 0; u < vectors; u++)
            store(y + b * out + o + u * VW, scale ? acc[b][u] * load(scale + o + u * VW) : acc[b][u]);
}
/* outputs o .. o + vectors VW - 1 of `batch` (at most BATCH_BLOCK) rows (constant sizes: registers) */
INLINE void cols_rows(const void *W, const float *scale, const float *x, float *y, int64_t out, int64_t in, int batch,
                      int64_t o, int vectors, int type) {
    switch (batch) {
#if BATCH_BLOCK == 6
        case 6: cols_tile(W, scale, x, y, out, in, 6, o, vectors, type); break;
        case 5: cols_tile(W, scale, x, y, out, in, 5, o, vectors, type); break;
        case 4: cols_tile(W, scale, x, y, out, in, 4, o, vectors, type); break;
        case 3: cols_tile(W, scale, x, y, out, in, 3, o, vectors, type); break;
#endif
        case 2: cols_tile(W, scale, x, y, out, in, 2, o, vectors, type); break;
        case 1: cols_tile(W, scale, x, y, out, in, 1, o, vectors, type); break;
    }
}
struct cols_job {
    const void *W;
    const float *scale, *x;
    float *y;
    int64_t out, in, batch, blocks; /* blocks: of COL_VECTORS vectors of outputs (the last one also the scalar ones) */
};
/* one block of outputs against one BATCH_BLOCK of rows of x, for a W of this type */
INLINE void cols_job_run(const struct cols_job *j, int64_t n, int type) {
    const int64_t c = n % j->blocks, b = n / j->blocks * BATCH_BLOCK, vectors = j->out / VW;
    const int rows = j->batch - b < BATCH_BLOCK ? (int)(j->batch - b) : BATCH_BLOCK;
    const float *x = j->x + b * j->in;
    float *y = j->y + b * j->out;
    int64_t v = c * COL_VECTORS;
    if (v + COL_VECTORS <= vectors) cols_rows(j->W, j->scale, x, y, j->out, j->in, rows, v * VW, COL_VECTORS, type);
    else
        for (; v < vectors; v++) cols_rows(j->W, j->scale, x, y, j->out, j->in, rows, v * VW, 1, type);
    if (c < j->blocks - 1) return;
    for (int64_t o = vectors * VW; o < j->out; o++) /* the outputs past the last whole vector */
        for (int r = 0; r < rows; r++) {
            float acc = 0;
            for (int64_t i = 0; i < j->in; i++) acc += x[r * j->in + i] * scalar_w((const char *)j->W + weight_bytes(i * j->out, type), o, type);
            y[r * j->out + o] = j->scale ? acc * j->scale[o] : acc;
        }
}
#define GEMV_COLS(name, type)                                                                                   \
    static void name(const void *job, int64_t begin, int64_t end) {                                            \
        for (int64_t n = begin; n < end; n++) cols_job_run(job, n, type);                                       \
    }
GEMV_COLS(gemv_cols_f32_part, F32)
GEMV_COLS(gemv_cols_bf16_part, BF16)
GEMV_COLS(gemv_cols_i8_part, I8)
/* an [in, out] W of type F32, BF16 or I8 (with scale[out]) against `batch` rows of x, split between threads by
 * blocks of outputs and rows of x (a first matrix has one or two blocks of outputs); 1 for another type */
int gemv_cols(const void *W, const float *scale, int type, const float *x, float *y, int64_t out, int64_t in,
              int64_t batch, int threads) {
    if (type != F32 && type != BF16 && type != I8) return 1;
    const int64_t blocks = (out / VW + COL_VECTORS - 1) / COL_VECTORS + (out / VW == 0);
    const struct cols_job job = {W, scale, x, y, out, in, batch, blocks};
    const int64_t jobs = blocks * ((batch + BATCH_BLOCK - 1) / BATCH_BLOCK);
    parallel(jobs, threads, out * in, type == I8 ? gemv_cols_i8_part : type == BF16 ? gemv_cols_bf16_part : gemv_cols_f32_part, &job);
    return 0;
}

int gemv_f32(const float *W, const float *x, float *y, int64_t out, int64_t in, int64_t batch, int threads) {
    return linear(W, NULL, F32, x, y, out, in, batch, threads);
}

/* W in whole panels ([ceil(out / PANEL), in, PANEL], the last one's missing rows zero; see gemv_panels_part) */
int gemv_f32_panels(const float *W, const float *x, float *y, int64_t out, int64_t in, int64_t batch, int threads) {
    return linear(W, NULL, F32_PANELS, x, y, out, in, batch, threads);
}

int gemv_bf16(const uint16_t *W, const float *x, float *y, int64_t out, int64_t in, int64_t batch, int threads) {
    return linear(W, NULL, BF16, x, y, out, in, batch, threads);
}

/* bf16 W in whole panels, as gemv_f32_panels; at every level, but only those without a bf16 dot product store bf16
 * weights so (`bf16_panels`): avx512_bf16 and AMX take row-major rows */
int gemv_bf16_panels(const uint16_t *W, const float *x, float *y, int64_t out, int64_t in, int64_t batch, int threads) {
    return linear(W, NULL, BF16_PANELS, x, y, out, in, batch, threads);
}

int gemv_i8(const int8_t *W, const float *scale, const float *x, float *y, int64_t out, int64_t in, int64_t batch,
            int threads) {
    return linear(W, scale, I8, x, y, out, in, batch, threads);
}

#ifdef __AVX2__
/* W in quads ([ceil(out / QUAD_ROWS), in / 4, QUAD_ROWS, 4], w + 128; see tile_quads): the levels from avx2 only */
int gemv_i8_quads(const uint8_t *W, const float *scale, const float *x, float *y, int64_t out, int64_t in,
                  int64_t batch, int threads) {
    return linear(W, scale, I8_QUADS, x, y, out, in, batch, threads);
}

/* W and its group scales in quads (see tile_quads): the levels from avx2 only */
int gemv_i4_quads(const uint8_t *W, const float *scale, const float *x, float *y, int64_t out, int64_t in,
                  int64_t batch, int threads) {
    return linear(W, scale, I4_QUADS, x, y, out, in, batch, threads);
}
#endif

int gemv_i4(const uint8_t *W, const float *scale, const float *x, float *y, int64_t out, int64_t in, int64_t batch,
            int threads) {
    return linear(W, scale, I4, x, y, out, in, batch, threads);
}

/* a store the caller will not read soon: straight to memory, without reading the line into the cache first */
INLINE void store_stream(float *p, vf v, int stream) {
#if defined(__AVX512F__)
    if (stream) { _mm512_stream_ps(p, (__m512)v); return; }
#elif defined(__AVX__)
    if (stream) { _mm256_stream_ps(p, (__m256)v); return; }
#endif
    (void)stream;
    store(p, v);
}

/* The WKV-7 recurrence (ops/wkv7/naive.py) token by token, for inference: per head and token,
 *   sa = S a;  S = S diag(w) + sa b^T + v k^T;  y = S r
 * with S [n, n] (value x key) updated in place, row by row, so a head's state stays in L1 for the whole
 * sequence (the first token reads S, the rest S_new): at prompt lengths this beats the chunked torch op
 * several times over, and a decode step is the same call with len = 1. S, S_new [batch, heads, n, n] (S_new
 * may be S); r, w (the decay itself, not its log), k, v, a, b, y [batch, len, heads, n]; n a multiple of 16.
 * Heads are split between threads. */
#define RWKV7_HEAD_SIZE 64 /* every RWKV-7 model's */
/* one token of a head of n: the token's r, w, k, a, b loaded once for all the rows (the stores into S_new might alias
 * them as far as the compiler knows: it would load them again for every row), which with n a constant
 * (RWKV7_HEAD_SIZE) stay in registers where there are enough (AVX-512: 20 of its 32; narrower levels spill some);
 * four rows at a time, their sums across lanes in one store_sum4 each (0.1B-shaped heads, a 33-token prompt on one
 * AVX-512 core: 1.4x as fast as a row at a time with those loads in the loop) */
INLINE void wkv7_token(const float *S, float *S_new, const float *r, const float *w, const float *k, const float *v,
                       const float *a, const float *b, float *y, int64_t n, int stream) {
    vf rv[n / VW], wv[n / VW], kv[n / VW], av[n / VW], bv[n / VW];
    for (int64_t j = 0; j < n / VW; j++)
        rv[j] = load(r + j * VW), wv[j] = load(w + j * VW), kv[j] = load(k + j * VW), av[j] = load(a + j * VW), bv[j] = load(b + j * VW);
    for (int64_t i = 0; i < n; i += 4) {
        const float *s = S + i * n;
        float *s_new = S_new + i * n;
        vf d[4], acc[4];
        float sa[4];
        for (int q = 0; q < 4; q++) {
            d[q] = splat(0);
            for (int64_t j = 0; j < n / VW; j++) d[q] += load(s + q * n + j * VW) * av[j];
        }
        store_sum4(d[0], d[1], d[2], d[3], sa);
        for (int q = 0; q < 4; q++) {
            const vf sa_ = splat(sa[q]), vi_ = splat(v[i + q]);
            acc[q] = splat(0);
            for (int64_t j = 0; j < n / VW; j++) {
                vf sj = load(s + q * n + j * VW) * wv[j] + sa_ * bv[j] + vi_ * kv[j];
                store_stream(s_new + q * n + j * VW, sj, stream);
                acc[q] += sj * rv[j];
            }
        }
        store_sum4(acc[0], acc[1], acc[2], acc[3], y + i);
    }
}

struct wkv_job {
    const float *S;
    float *S_new;
    const float *r, *w, *k, *v, *a, *b;
    float *y;
    int64_t heads, len, n;
    int stream;
};
static void wkv7_part(const void *job, int64_t begin, int64_t end) {
    const struct wkv_job *j = job;
    const int64_t n = j->n, heads = j->heads, len = j->len;
    for (int64_t bh = begin; bh < end; bh++) {
        float *s = j->S_new + bh * n * n;
        const int64_t bi = bh / heads, h = bh % heads;
        for (int64_t t = 0; t < len; t++) {
            const int64_t x = ((bi * len + t) * heads + h) * n;
            const float *from = t ? s : j->S + bh * n * n;
            if (n == RWKV7_HEAD_SIZE)
                wkv7_token(from, s, j->r + x, j->w + x, j->k + x, j->v + x, j->a + x, j->b + x, j->y + x, RWKV7_HEAD_SIZE, j->stream);
            else wkv7_token(from, s, j->r + x, j->w + x, j->k + x, j->v + x, j->a + x, j->b + x, j->y + x, n, j->stream);
        }
    }
#if defined(__x86_64__) || defined(__i386__)
    if (j->stream) _mm_sfence(); /* the streamed lines in memory before another thread or the caller reads them */
#endif
}

int wkv7_f32(const float *S, float *S_new, const float *r, const float *w, const float *k, const float *v,
             const float *a, const float *b, float *y, int64_t batch, int64_t len, int64_t heads, int64_t n,
             int threads) {
    if (n % 16) return 1;
    /* a decode step (len 1) writes a new state that nothing reads before the next step, by when a batch's
     * states (3 MiB a layer at B=16) have left the cache: streaming stores skip reading its lines first */
    const int stream = len == 1 && S != S_new && (uintptr_t)S_new % 64 == 0;
    const struct wkv_job job = {S, S_new, r, w, k, v, a, b, y, heads, len, n, stream};
    parallel(batch * heads, threads, batch * heads * len * n * n, wkv7_part, &job);
    return 0;
}

/* exp to about 1 ulp (Cephes' polynomial after the range reduction); inputs clamped to +-88, so no inf or NaN */
INLINE vf exp_v(vf x) {
    x = vmin(vmax(x, splat(-88.0f)), splat(88.0f));
    const vf round = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf n = (x * 1.44269504088896341f + round) - round;
    vf r = x - n * 0.693359375f; /* ln 2 in two parts: r stays exact */
    r = r - n * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    return p * (vf)((__builtin_convertvector(n, vi) + 127) << 23); /* times 2^n (0 at n = -127) */
}

INLINE vf sigmoid_v(vf x) { return 1.0f / (1.0f + exp_v(-x)); }

enum { TANH, SIGMOID, RELU_SQUARED };
INLINE vf apply(vf v, int f) {
    if (f == TANH) return 2.0f * sigmoid_v(v + v) - 1.0f; /* tanh(h) = 2 sigmoid(2h) - 1 */
    if (f == SIGMOID) return sigmoid_v(v);
    return vmax(v, splat(0)) * vmax(v, splat(0));
}
/* f(x) in place over n values, any n (the last vector padded) */
static void map(float *x, int64_t n, int f) {
    int64_t i = 0;
    for (; i + VW <= n; i += VW) store(x + i, apply(load(x + i), f));
    if (i < n) {
        float pad[VW] = {0};
        memcpy(pad, x + i, (n - i) * sizeof(float));
        store(pad, apply(load(pad), f));
        memcpy(x + i, pad, (n - i) * sizeof(float));
    }
}

/* out = (x - mean) / sqrt(var + eps) * weight + bias over n values (n a multiple of 16; out may be x): a LayerNorm
 * row or a GroupNorm group */
static void normalize(const float *x, float *out, const float *weight, const float *bias, int64_t n, float eps) {
    vf sum = splat(0), sq = splat(0);
    for (int64_t i = 0; i < n; i += VW) sum += load(x + i);
    const vf mean = splat(hsum(sum) / n);
    for (int64_t i = 0; i < n; i += VW) {
        vf d = load(x + i) - mean;
        sq += d * d;
    }
    const vf inv_std = splat(1.0f / sqrtf(hsum(sq) / n + eps));
    for (int64_t i = 0; i < n; i += VW) store(out + i, (load(x + i) - mean) * inv_std * load(weight + i) + load(bias + i));
}

/* the token shift's previous input for row i of `len`-token sequences: the row before it in its sequence, or,
 * for a sequence's first token, the state's */
INLINE const float *previous(const float *xn, const float *shift, int64_t i, int64_t len, int64_t C) {
    return i % len ? xn + (i - 1) * C : shift + i / len * C;
}

/* the token shift's new state: each sequence's last normalized input */
static void last_tokens(float *shift_out, const float *xn, int64_t batch, int64_t len, int64_t C) {
    for (int64_t b = 0; b < batch; b++) memcpy(shift_out + b * C, xn + ((b + 1) * len - 1) * C, C * sizeof(float));
}

/* A whole block (rwkv_lm.fast.StepBlock) for `batch` sequences of `len` tokens (a decode step: len 1, up to
 * MAX_BATCH rows; a short prompt: the tokens of each): model.py's Block in one call, so a B=16 step is its
 * matrix products and the recurrence, not ~130 small torch ops and their Python per layer (those cost as much
 * as a third of the step). Every token is a row of the products and the elementwise work; the token shifts
 * and the recurrence follow each sequence. Activations fp32; the six Linear weights of type `type` (int8 and
 * int4 with their scales); the LoRA matrices stored as their kernel reads them ([out, in] row-major): int8 with
 * their scales where those are given (int8 and int4 blocks), bf16 in a bf16 block, else fp32.
 * The elementwise work between the products runs in phases over rows (`slice_part`), split between threads as
 * the products are: a prompt's rows of it in the caller alone left the other threads idle. `channel_rows` says
 * which rows the channel mix runs for: all (CHANNEL_ALL), each sequence's last token (CHANNEL_LAST: the last block
 * of a prompt whose logits alone are wanted) or none (CHANNEL_NONE: the last block of a prompt's piece before its
 * last). Its state, the shift, comes from before it; the rows left out of x_out are then not read on. */
enum { CHANNEL_ALL, CHANNEL_LAST, CHANNEL_NONE };
struct slice {
    const void *const *params;
    const float *x, *att_shift, *ffn_shift;
    float *x_out, *v_first, *mix, *r, *k, *v, *w, *a, *g, *minus_kk, *kk_a, *y, *up, *xn, *key;
    int64_t len, C, n, ffn, BC;
    float ln_eps, ln_x_eps, decay_scale;
};
enum { NORM_IN, ATT_MIX, ATT_INPUTS, ATT_OUT, NORM_FFN, FFN_MIX, RELU_SQ, RESIDUAL };
struct slice_phase {
    const struct slice *s;
    int phase;
};

/* row i's token-shift mixes: `count` of them, with the mix vectors params[first ..], into mix, BC apart; one mix
 * at a time, one stream of stores (six streams at once stalled on their stores: perf put half of slice_part there) */
INLINE void shift_mixes(const struct slice *j, int64_t i, const float *shift, int first, int count) {
    const int64_t C = j->C, row = i * C;
    const float *prev = previous(j->xn, shift, i, j->len, C);
    for (int m = 0; m < count; m++) {
        const float *mv = (const float *)j->params[first + m];
        float *out = j->mix + m * j->BC + row;
        for (int64_t c = 0; c < C; c += VW) {
            vf xi = load(j->xn + row + c);
            store(out + c, (load(prev + c) - xi) * load(mv + c) + xi);
        }
    }
}

/* one phase of block_step_slice for rows begin .. end - 1 */
static void slice_part(const void *job, int64_t begin, int64_t end) {
    const struct slice *j = ((const struct slice_phase *)job)->s;
    const int phase = ((const struct slice_phase *)job)->phase;
    const int64_t C = j->C, n = j->n;
#define P(name) ((const float *)j->params[name])
    for (int64_t i = begin; i < end; i++) {
        const int64_t row = i * C;
        switch (phase) {
        case NORM_IN: /* the block's input (through ln0 in the first block) to x_out, ln1 of it to xn */
            if (j->params[LN0_W]) normalize(j->x + row, j->x_out + row, P(LN0_W), P(LN0_B), C, j->ln_eps);
            else memcpy(j->x_out + row, j->x + row, C * sizeof(float));
            normalize(j->x_out + row, j->xn + row, P(LN1_W), P(LN1_B), C, j->ln_eps);
            break;
        case ATT_MIX: /* xr, xw, xk, xv, xa, xg */
            shift_mixes(j, i, j->att_shift, X_R, 6);
            break;
        case ATT_INPUTS: /* the recurrence's inputs from the products and the LoRAs' outputs (w, a, up: the value's) */
            for (int64_t c = 0, e = row; c < C; c += VW, e += VW) {
                store(j->w + e, exp_v(-j->decay_scale * sigmoid_v(load(P(W0) + c) + load(j->w + e)))); /* the decay */
                store(j->a + e, sigmoid_v(load(P(A0) + c) + load(j->a + e)));
                if (j->params[V0]) {
                    vf vi_ = load(j->v + e);
                    store(j->v + e, (load(j->v_first + e) - vi_) * sigmoid_v(load(P(V0) + c) + load(j->up + e)) + vi_);
                }
            }
            if (!j->params[V0]) memcpy(j->v_first + row, j->v + row, C * sizeof(float));
            /* kk = normalize(k * k_k) per head (F.normalize's eps 1e-12); the recurrence's a = -kk, b = kk * a; then
             * k's scaling */
            for (int64_t h = row; h < row + C; h += n) {
                const int64_t c0 = h - row;
                vf sq = splat(0);
                for (int64_t q = 0; q < n; q += VW) {
                    vf kk = load(j->k + h + q) * load(P(K_K) + c0 + q);
                    sq += kk * kk;
                }
                const vf inv_norm = splat(1.0f / fmaxf(sqrtf(hsum(sq)), 1e-12f));
                for (int64_t q = 0; q < n; q += VW) {
                    vf ki = load(j->k + h + q), ai = load(j->a + h + q);
                    vf kk = ki * load(P(K_K) + c0 + q) * inv_norm;
                    store(j->minus_kk + h + q, -kk);
                    store(j->kk_a + h + q, kk * ai);
                    store(j->k + h + q, ki * ((ai - 1.0f) * load(P(K_A) + c0 + q) + 1.0f));
                }
            }
            break;
        case ATT_OUT: /* ln_x per head, the bonus for the current token, the gate */
            for (int64_t h = row; h < row + C; h += n) {
                const int64_t c0 = h - row;
                normalize(j->y + h, j->y + h, P(LN_X_W) + c0, P(LN_X_B) + c0, n, j->ln_x_eps);
                vf dot_ = splat(0);
                for (int64_t q = 0; q < n; q += VW) dot_ += load(j->r + h + q) * load(j->k + h + q) * load(P(R_K) + c0 + q);
                const vf bonus = splat(hsum(dot_));
                for (int64_t q = 0; q < n; q += VW)
                    store(j->y + h + q, (bonus * load(j->v + h + q) + load(j->y + h + q)) * load(j->g + h + q));
            }
            break;
        case NORM_FFN: /* the time mix's output added (then ln2 of the sum), or the channel mix's */
        case RESIDUAL:
            for (int64_t c = 0; c < C; c += VW) store(j->x_out + row + c, load(j->x_out + row + c) + load(j->up + row + c));
            if (phase == NORM_FFN) normalize(j->x_out + row, j->xn + row, P(LN2_W), P(LN2_B), C, j->ln_eps);
            break;
        case FFN_MIX: /* the channel mix's, into the first mix buffer */
            shift_mixes(j, i, j->ffn_shift, FFN_X_K, 1);
            break;
        case RELU_SQ:
            map(j->key + i * j->ffn, j->ffn, RELU_SQUARED);
            break;
        }
    }
#undef P
}

static int block_step_slice(const void *const *params, const float *x, float *x_out, float *v_first, const float *att_shift,
                            const float *wkv, const float *ffn_shift, float *att_shift_out, float *wkv_out,
                            float *ffn_shift_out, int64_t batch, int64_t len, int64_t C, int64_t n, int64_t ffn, int64_t rank_w,
                            int64_t rank_a, int64_t rank_v, int64_t rank_g, float ln_eps, float ln_x_eps,
                            float decay_scale, int type, int threads, int channel_rows, float *mix) {
#define LINEAR(name, x, y, out, in) LINEAR_ROWS(name, x, y, out, in, rows)
#define LINEAR_ROWS(name, x, y, out, in, n) linear(params[name], (const float *)params[name##_S], type, x, y, out, in, n, threads)
#define LORA(name, x, y, out, in) gemv_cols(params[name], params[name##_S], lora_type, x, y, out, in, rows, threads)
#define PHASE(p) parallel(rows, threads, rows * C, slice_part, &(struct slice_phase){&s, p})
    const int64_t rows = batch * len, BC = rows * C;
    const int lora_type = params[W1_S] ? I8 : type == BF16 || type == BF16_PANELS ? BF16 : F32;
    /* the six token-shift mixes xr, xw, xk, xv, xa, xg, then one buffer per vector of the step, the normalized
     * inputs of the shifts, and the LoRAs' and the channel mix's hidden vectors */
    float *r = mix + 6 * BC, *k = r + BC, *v = k + BC, *w = v + BC, *a = w + BC, *g = a + BC, *minus_kk = g + BC,
          *kk_a = minus_kk + BC, *y = kk_a + BC, *up = y + BC, *xn = up + BC, *hidden = xn + BC;
    const struct slice s = {params, x, att_shift, ffn_shift, x_out, v_first, mix, r, k, v, w, a, g, minus_kk, kk_a, y,
                            up, xn, hidden, len, C, n, ffn, BC, ln_eps, ln_x_eps, decay_scale};
    int err = 0;

    /* time mix */
    PHASE(NORM_IN);
    PHASE(ATT_MIX);
    last_tokens(att_shift_out, xn, batch, len, C);
    const float *xr = mix, *xw = mix + BC, *xk = mix + 2 * BC, *xv = mix + 3 * BC, *xa = mix + 4 * BC, *xg = mix + 5 * BC;
    err |= LINEAR(RECEPTANCE, xr, r, C, C);
    err |= LINEAR(KEY, xk, k, C, C);
    err |= LINEAR(VALUE, xv, v, C, C);
    LORA(W1, xw, hidden, rank_w, C);
    map(hidden, rows * rank_w, TANH);
    LORA(W2, hidden, w, C, rank_w);
    LORA(A1, xa, hidden, rank_a, C);
    LORA(A2, hidden, a, C, rank_a);
    LORA(G1, xg, hidden, rank_g, C);
    map(hidden, rows * rank_g, SIGMOID);
    LORA(G2, hidden, g, C, rank_g);
    if (params[V0]) {
        LORA(V1, xv, hidden, rank_v, C);
        LORA(V2, hidden, up, C, rank_v);
    }
    PHASE(ATT_INPUTS);
    err |= wkv7_f32(wkv, wkv_out, r, w, k, v, minus_kk, kk_a, y, batch, len, C / n, n, threads);
    PHASE(ATT_OUT);
    err |= LINEAR(OUTPUT, y, up, C, C);

    /* channel mix: relu(key(mix))^2 through value */
    PHASE(NORM_FFN);
    last_tokens(ffn_shift_out, xn, batch, len, C);
    if (channel_rows == CHANNEL_NONE) return err;
    if (channel_rows == CHANNEL_LAST && len > 1) {
        for (int64_t b = 0; b < batch; b++) {
            const int64_t i = (b + 1) * len - 1; /* (its mix in row i, then moved to row b: the key's input rows) */
            shift_mixes(&s, i, ffn_shift, FFN_X_K, 1);
            memmove(mix + b * C, mix + i * C, C * sizeof(float));
        }
        err |= LINEAR_ROWS(FFN_KEY, mix, hidden, ffn, C, batch);
        map(hidden, batch * ffn, RELU_SQUARED);
        err |= LINEAR_ROWS(FFN_VALUE, hidden, up, C, ffn, batch);
        for (int64_t b = 0; b < batch; b++)
            for (int64_t c = 0, i = ((b + 1) * len - 1) * C; c < C; c += VW)
                store(x_out + i + c, load(x_out + i + c) + load(up + b * C + c));
        return err;
    }
    PHASE(FFN_MIX);
    err |= LINEAR(FFN_KEY, mix, hidden, ffn, C);
    PHASE(RELU_SQ);
    err |= LINEAR(FFN_VALUE, hidden, up, C, ffn);
    PHASE(RESIDUAL);
    return err;
#undef LINEAR_ROWS
#undef LINEAR
#undef LORA
#undef PHASE
}

/* the token rows of one call of block_step_slice: a step's slice of up to MAX_BATCH sequences, or every token of a
 * prompt */
INLINE int64_t slice_rows(int64_t batch, int64_t len) { return (len == 1 && batch > MAX_BATCH ? MAX_BATCH : batch) * len; }

/* the floats block_step's workspace holds for `rows` token rows: the 17 [rows, C] vectors of block_step_slice and
 * its widest hidden vector (the LoRAs' and the channel mix's), plus VW to spare */
static int64_t workspace_floats(int64_t rows, int64_t C, int64_t ffn, const int64_t *ranks) {
    int64_t widest = ffn;
    for (int i = 0; i < 4; i++) widest = ranks[i] > widest ? ranks[i] : widest;
    return 17 * rows * C + rows * widest + VW;
}

/* block_step in a workspace of at least workspace_floats(rows of one slice) floats */
static int block_step_in(const void *const *params, const float *x, float *x_out, float *v_first, const float *att_shift,
                         const float *wkv, const float *ffn_shift, float *att_shift_out, float *wkv_out, float *ffn_shift_out,
                         int64_t batch, int64_t len, int64_t C, int64_t n, int64_t ffn, const int64_t *ranks, float ln_eps,
                         float ln_x_eps, float decay_scale, int type, int threads, int channel_rows, float *work) {
    const int64_t per_slice = len == 1 ? MAX_BATCH : batch; /* sequences per call of block_step_slice */
    int err = 0;
    for (int64_t b = 0; b < batch && !err; b += per_slice) {
        const int64_t m = batch - b < per_slice ? batch - b : per_slice, o = b * C, t = b * len * C, s = b * C * n;
        err = block_step_slice(params, x + t, x_out + t, v_first + t, att_shift + o, wkv + s, ffn_shift + o,
                               att_shift_out + o, wkv_out + s, ffn_shift_out + o, m, len, C, n, ffn, ranks[0], ranks[1],
                               ranks[2], ranks[3], ln_eps, ln_x_eps, decay_scale, type, threads, channel_rows, work);
    }
    return err;
}

/* x [batch, len, C] -> x_out; the state's three parts ([batch, ...]) in, new ones out (the old ones left as they
 * are). v_first [batch, len, C]: written by the first block (the one without V0), read by the others. C and n
 * (head size) multiples of 16, ffn and the LoRA ranks any size (rank_v 0 in the first block); LayerNorms and
 * ln_x with bias. One-token steps wider than MAX_BATCH rows run in slices of MAX_BATCH; a prompt's tokens all at
 * once. Returns 0, 1 for a head size the recurrence refuses, 2 where the buffers could not be allocated. */
int block_step(const void *const *params, const float *x, float *x_out, float *v_first, const float *att_shift,
               const float *wkv, const float *ffn_shift, float *att_shift_out, float *wkv_out, float *ffn_shift_out,
               int64_t batch, int64_t len, int64_t C, int64_t n, int64_t ffn, int64_t rank_w, int64_t rank_a,
               int64_t rank_v, int64_t rank_g, float ln_eps, float ln_x_eps, float decay_scale, int type, int threads) {
    if (C % 16 || n % 16 || C % n || len < 1) return 1;
    const int64_t ranks[] = {rank_w, rank_a, rank_v, rank_g};
    float *work = malloc(sizeof(float) * workspace_floats(slice_rows(batch, len), C, ffn, ranks));
    if (!work) return 2;
    const int err = block_step_in(params, x, x_out, v_first, att_shift, wkv, ffn_shift, att_shift_out, wkv_out,
                                  ffn_shift_out, batch, len, C, n, ffn, ranks, ln_eps, ln_x_eps, decay_scale, type,
                                  threads, CHANNEL_ALL, work);
    free(work);
    return err;
}

/* out [rows, n] = LayerNorm of each row of x (n a multiple of 16): the model's last norm (rwkv_lm.runtime.cpu.
 * KernelLayerNorm), which model_step runs by the same operations, so a token stepped and the same token at the
 * end of a prompt get the same bits. Returns 1 for n no multiple of 16. */
struct norm_job {
    const float *x, *weight, *bias;
    float *out;
    int64_t n;
    float eps;
};
static void layer_norm_part(const void *job, int64_t begin, int64_t end) {
    const struct norm_job *j = job;
    for (int64_t r = begin; r < end; r++) normalize(j->x + r * j->n, j->out + r * j->n, j->weight, j->bias, j->n, j->eps);
}
int layer_norm(const float *x, float *out, const float *weight, const float *bias, int64_t rows, int64_t n, float eps,
               int threads) {
    if (n % 16) return 1;
    const struct norm_job job = {x, weight, bias, out, n, eps};
    parallel(rows, threads, rows * n, layer_norm_part, &job);
    return 0;
}

/* `len` tokens of `batch` sequences through the model in one call (rwkv_lm.runtime.cpu.StepRWKV): a decode step
 * (len 1) or a piece of a prompt (len > 1, batch x len rows at most ROWS_PER_PASS, as StepBlock reads one). The
 * embeddings of tokens [batch, len] go through every block in order (as block_step runs them), then each
 * sequence's last token through the last norm (layer_norm's operations) and the head (of type head_type, scales
 * head_scale, as the gemv_* functions multiply) into logits [batch, vocab]; logits NULL stops after the blocks
 * (a prompt's pieces before its last). The last block's channel mix runs for the last tokens alone, or for none
 * without logits (block_step_slice's channel_rows: 0.1B 33-token prompts on Zen 2 1.05x as fast in fp32, 1.06x in
 * int8, 1,024-token ones 1.03x and 1.06x; the same bits). So a step or a short prompt pays for one call instead of a
 * Python round trip per block and module (StepRWKV's docstring has the measured gain). Block l's parameters are
 * block_params[l] (block_step's order), its sizes sizes[7 l ..] (C, head size, ffn, the ranks of w, a, v, g), its
 * Linear weights' type types[l]; its state is read from att_shift[l], wkv[l], ffn_shift[l] and written to the
 * *_out arrays' tensors. Returns block_step's codes (linear's for the head), or 3 for a token id outside the
 * embedding's emb_rows rows (checked here, where the ids are read, instead of by two torch ops a step on the Python
 * side, ~0.07 ms each with the caches cold after the weights' sweep; what that bought was below the noise,
 * bench/RESULTS.md, issue 20's twelfth pass). */
int model_step(int64_t n_layer, const void *const *const *block_params, const int64_t *sizes, const int *types,
               const float *emb, int64_t emb_rows, float ln_eps, float ln_x_eps, float decay_scale,
               const int64_t *tokens, int64_t batch,
               int64_t len, float *const *att_shift, float *const *wkv, float *const *ffn_shift,
               float *const *att_shift_out, float *const *wkv_out, float *const *ffn_shift_out,
               const float *ln_out_weight, const float *ln_out_bias, float ln_out_eps, const void *head,
               const float *head_scale, int head_type, int64_t vocab, float *logits, int threads) {
    if (len < 1) return 1;
    const int64_t C = sizes[0], tokens_in = batch * len, rows = slice_rows(batch, len);
    for (int64_t t = 0; t < tokens_in; t++)
        if (tokens[t] < 0 || tokens[t] >= emb_rows) return 3;
    int64_t floats = 0;
    for (int64_t l = 0; l < n_layer; l++) {
        const int64_t *z = sizes + 7 * l, need = workspace_floats(rows, z[0], z[2], z + 3);
        if (z[0] != C || z[0] % 16 || z[1] % 16 || z[0] % z[1]) return 1;
        floats = need > floats ? need : floats;
    }
    /* the workspace, then x in and out of a block (swapped between blocks) and v_first */
    float *work = malloc(sizeof(float) * (floats + 3 * tokens_in * C));
    if (!work) return 2;
    float *x = work + floats, *x_next = x + tokens_in * C, *v_first = x_next + tokens_in * C;
    for (int64_t t = 0; t < tokens_in; t++) memcpy(x + t * C, emb + tokens[t] * C, C * sizeof(float));
    int err = 0;
    for (int64_t l = 0; l < n_layer && !err; l++) {
        const int64_t *z = sizes + 7 * l;
        err = block_step_in(block_params[l], x, x_next, v_first, att_shift[l], wkv[l], ffn_shift[l], att_shift_out[l],
                            wkv_out[l], ffn_shift_out[l], batch, len, C, z[1], z[2], z + 3, ln_eps, ln_x_eps,
                            decay_scale, types[l], threads,
                            l < n_layer - 1 ? CHANNEL_ALL : logits ? CHANNEL_LAST : CHANNEL_NONE, work);
        float *done = x_next;
        x_next = x, x = done;
    }
    if (!err && logits) {
        float *last = x_next; /* each sequence's last token, in the buffer the blocks are done with */
        last_tokens(last, x, batch, len, C);
        err = layer_norm(last, last, ln_out_weight, ln_out_bias, batch, C, ln_out_eps, threads);
        if (!err) err = linear(head, head_scale, head_type, last, logits, vocab, C, batch, threads);
    }
    free(work);
    return err;
}

/* Constrained decoding: logits [rows, vocab] set to -inf where `allowed` [rows, words] (one bit per token: bit i
 * of word w is token 32 w + i) has a 0. A grammar's mask is nearly all ones (inside a string) or nearly all
 * zeros (between fields), so a word of ones is one test and the bits are only walked in the others. */
int mask_logits(float *logits, const uint32_t *allowed, int64_t rows, int64_t vocab, int64_t words) {
    if (words * 32 < vocab) return 1;
    for (int64_t r = 0; r < rows; r++) {
        float *row = logits + r * vocab;
        for (int64_t w = 0; w < words && w * 32 < vocab; w++) {
            uint32_t bits = allowed[r * words + w];
            if (bits == 0xffffffffu) continue;
            const int64_t end = vocab - w * 32 < 32 ? vocab - w * 32 : 32;
            for (int64_t i = 0; i < end; i++)
                if (!(bits >> i & 1)) row[w * 32 + i] = -INFINITY;
        }
    }
    return 0;
}
