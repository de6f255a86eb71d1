// WKV-7 recurrence kernels, per head with the state S [N value x N key] in fp32:
//
//     sa_t = S_{t-1} a_t;   S_t = S_{t-1} diag(exp(log_w_t)) + sa_t b_t^T + v_t k_t^T;   o_t = S_t r_t
//
// Sequence tensors are [B, T, H, N] in the storage type F (float, bf16_t or fp16_t), except log_w and
// its gradient, which are fp32 always: rounded to bf16, log_w would make each step's decay off by up
// to ~0.1%, an error that compounds over a long context. States are [B, H, N, N] fp32, row = value
// index. All arithmetic is fp32. One source serves NVRTC (through CuPy) and g++ (the CPU emulation in
// tests/cuda_emu), so it includes no CUDA header.
//
// forward/backward: one block of N * P threads per (batch, head). The P neighbouring lanes
// i * P + part share value row i, each holding the C = N / P key channels j = part + P * c, and sum
// across themselves with warp shuffles: the rows of S evolve independently, so nothing else
// crosses threads but the token's inputs. (Interleaved rather than contiguous channels: the lanes
// of a row then read neighbouring shared-memory words, free of bank conflicts.) P trades
// per-thread serial work and registers against shuffles (the launcher picks it by size, see
// row_split in rwkv_lm/ops/wkv7/cuda.py). The forward can save the state every
// `ck_every` steps and each step's sa; the backward walks back from those checkpoints.

// 16-bit floats as raw bits: the kernels only load and store them.
struct bf16_t { unsigned short bits; };
struct fp16_t { unsigned short bits; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16_t x) { return __uint_as_float((unsigned)x.bits << 16); }

template <typename F> __device__ __forceinline__ F from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }

#ifdef __CUDA_ARCH__
__device__ __forceinline__ float to_float(fp16_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float x) {
    bf16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
    return h;
}
template <> __device__ __forceinline__ fp16_t from_float<fp16_t>(float x) {
    fp16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
    return h;
}
#else
// The CPU emulation has no PTX: fp16 goes through the compiler's _Float16, bf16 rounds to nearest even.
__device__ __forceinline__ float to_float(fp16_t x) { return (float)__builtin_bit_cast(_Float16, x.bits); }
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{(unsigned short)0x7fc0};
    return bf16_t{(unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
template <> __device__ __forceinline__ fp16_t from_float<fp16_t>(float x) {
    return fp16_t{__builtin_bit_cast(unsigned short, (_Float16)x)};
}
#endif

// Index of token t, channel i in a [B, T, H, N] tensor, for block (head = blockIdx.x, batch = blockIdx.y).
template <int N> __device__ __forceinline__ long long token_index(int len, int t, int i) {
    return (((long long)blockIdx.y * len + t) * gridDim.x + blockIdx.x) * N + i;
}

// Sum over the P lanes that share a row (P divides 32, so they sit in one warp).
template <int P> __device__ __forceinline__ float row_sum(float x) {
#pragma unroll
    for (int m = P / 2; m > 0; m /= 2) x += __shfl_xor_sync(0xffffffffu, x, m);
    return x;
}

// One channel's inputs for one token, loaded a step ahead so the loads overlap the step before.
struct Token {
    float r, log_w, k, v, a, b;
};

template <typename F>
__device__ __forceinline__ Token load_token(long long x, const F* r, const float* log_w, const F* k, const F* v, const F* a,
                                            const F* b) {
    return Token{to_float(r[x]), log_w[x], to_float(k[x]), to_float(v[x]), to_float(a[x]), to_float(b[x])};
}

// Inputs [B, T, H, N]; h0 [B, H, N, N] or null (zeros). Writes o, the final state hT, and, when ck is
// not null, ck [B, H, ceil(T / ck_every), N, N] (the state after every ck_every-th step and after the
// last) and sa [B, T, H, N] fp32 for the backward.
template <typename F, int N, int P>
__global__ void __launch_bounds__(N * P) wkv7_forward(
    int len, int ck_every, const F* __restrict__ r, const float* __restrict__ log_w, const F* __restrict__ k,
    const F* __restrict__ v, const F* __restrict__ a, const F* __restrict__ b, const float* __restrict__ h0,
    F* __restrict__ o, float* __restrict__ hT, float* __restrict__ ck, float* __restrict__ sa_out) {
    constexpr int C = N / P;
    static_assert(N % P == 0 && 32 % P == 0, "a row splits evenly across lanes of one warp");
    const int tid = threadIdx.x, i = tid / P, part = tid % P;
    const bool loader = tid < N;  // the first N threads fetch channel tid of every token
    const long long head = (long long)blockIdx.y * gridDim.x + blockIdx.x;
    // Double-buffered by step parity: step t fills buffer t & 1 while no thread can still be reading
    // it (its readers were at step t - 2, behind the barrier of step t - 1), so one barrier per step.
    __shared__ float4 s_wkbr[2][N];  // (decay, k, b, r) per key channel: one read per update
    __shared__ float s_a[2][N], s_v[2][N];

    float S[C];  // S[i][part + P * c]
#pragma unroll
    for (int c = 0; c < C; c++) S[c] = h0 ? h0[(head * N + i) * N + part + P * c] : 0.f;

    Token next{};
    if (loader && len > 0) next = load_token(token_index<N>(len, 0, tid), r, log_w, k, v, a, b);
    for (int t = 0; t < len; t++) {
        const int p = t & 1;
        if (loader) {
            s_wkbr[p][tid] = make_float4(expf(next.log_w), next.k, next.b, next.r);
            s_a[p][tid] = next.a;
            s_v[p][tid] = next.v;
            if (t + 1 < len) next = load_token(token_index<N>(len, t + 1, tid), r, log_w, k, v, a, b);
        }
        __syncthreads();

        // four partial sums each: one chain of C dependent adds would be the step's latency
        float sa4[4] = {}, y4[4] = {};
#pragma unroll
        for (int c = 0; c < C; c++) sa4[c % 4] += S[c] * s_a[p][part + P * c];
        const float sa = row_sum<P>((sa4[0] + sa4[1]) + (sa4[2] + sa4[3]));
        const float vi = s_v[p][i];
#pragma unroll
        for (int c = 0; c < C; c++) {
            const float4 e = s_wkbr[p][part + P * c];
            S[c] = S[c] * e.x + sa * e.z + vi * e.y;
            y4[c % 4] += S[c] * e.w;
        }
        const float y = row_sum<P>((y4[0] + y4[1]) + (y4[2] + y4[3]));
        const long long x = token_index<N>(len, t, i);
        if (part == 0) o[x] = from_float<F>(y);
        if (ck) {
            if (part == 0) sa_out[x] = sa;
            if ((t + 1) % ck_every == 0 || t == len - 1) {
                float* dst = ck + ((head * ((len + ck_every - 1) / ck_every) + t / ck_every) * N + i) * N + part;
#pragma unroll
                for (int c = 0; c < C; c++) dst[P * c] = S[c];
            }
        }
    }
#pragma unroll
    for (int c = 0; c < C; c++) hT[(head * N + i) * N + part + P * c] = S[c];
}

// Gradients of (o, hT) -> (r, log_w, k, v, a, b, h0). do_ [B, T, H, N]; dhT [B, H, N, N] or null;
// ck and sa as written by the forward with the same ck_every. Every gradient but dv sums over value
// rows, so besides its part of row i of dL/dS, a thread keeps the same part of column i of S and of
// dL/dS, and the lanes of row i then hold all that key channel i needs. S_{t-1} is recovered from
// S_t by undoing the step, S_{t-1}[:, i] = (S_t[:, i] - v k_i - sa b_i) / w_i, starting afresh from
// each checkpoint so that rounding grows over at most ck_every steps.
template <typename F, int N, int P>
__global__ void __launch_bounds__(N * P) wkv7_backward(
    int len, int ck_every, const F* __restrict__ r, const float* __restrict__ log_w, const F* __restrict__ k,
    const F* __restrict__ v, const F* __restrict__ a, const F* __restrict__ b, const F* __restrict__ do_,
    const float* __restrict__ dhT, const float* __restrict__ ck, const float* __restrict__ sa_in,
    F* __restrict__ dr, float* __restrict__ dlog_w, F* __restrict__ dk, F* __restrict__ dv, F* __restrict__ da,
    F* __restrict__ db, float* __restrict__ dh0) {
    constexpr int C = N / P;
    static_assert(N % P == 0 && 32 % P == 0, "a row splits evenly across lanes of one warp");
    const int tid = threadIdx.x, i = tid / P, part = tid % P;
    const bool loader = tid < N;
    const long long head = (long long)blockIdx.y * gridDim.x + blockIdx.x;
    // Same parity double buffering as the forward; dsa is written after the first barrier of a step
    // and read after the second, so it is double-buffered too.
    __shared__ float4 s_rdvs[2][N];  // (r, do, v, sa)
    __shared__ float4 s_kbwa[2][N];  // (k, b, decay, a)
    __shared__ float s_dsa[2][N];

    float S_col[C], dS_row[C], dS_col[C];  // S[j][i], dS[i][j], dS[j][i] for j = part + P * c
#pragma unroll
    for (int c = 0; c < C; c++) {
        dS_row[c] = dhT ? dhT[(head * N + i) * N + part + P * c] : 0.f;
        dS_col[c] = dhT ? dhT[(head * N + part + P * c) * N + i] : 0.f;
    }

    Token next{};
    float next_do = 0.f, next_sa = 0.f;
    auto prefetch = [&](int t) {
        const long long x = token_index<N>(len, t, tid);
        next = load_token(x, r, log_w, k, v, a, b);
        next_do = to_float(do_[x]);
        next_sa = sa_in[x];
    };
    if (loader && len > 0) prefetch(len - 1);
    for (int t = len - 1; t >= 0; t--) {
        const int p = t & 1;
        if (loader) {
            s_rdvs[p][tid] = make_float4(next.r, next_do, next.v, next_sa);
            s_kbwa[p][tid] = make_float4(next.k, next.b, expf(next.log_w), next.a);
            if (t > 0) prefetch(t - 1);
        }
        if ((t + 1) % ck_every == 0 || t == len - 1) {
            const float* src = ck + (head * ((len + ck_every - 1) / ck_every) + t / ck_every) * N * N + i;
#pragma unroll
            for (int c = 0; c < C; c++) S_col[c] = src[(part + P * c) * N];
        }
        __syncthreads();

        const float4 own_rdvs = s_rdvs[p][i], own_kbwa = s_kbwa[p][i];
        const float ri = own_rdvs.x, doi = own_rdvs.y, ki = own_kbwa.x, bi = own_kbwa.y, wi = own_kbwa.z;
        const float ai = own_kbwa.w, inv_wi = 1.f / wi;
        float dri = 0.f, dwi = 0.f, dki = 0.f, dbi = 0.f, dvi = 0.f, dsai = 0.f;
#pragma unroll
        for (int c = 0; c < C; c++) {
            const float4 e = s_rdvs[p][part + P * c], f = s_kbwa[p][part + P * c];
            dri += S_col[c] * e.y;
            dS_row[c] += doi * e.x;
            dS_col[c] += e.y * ri;
            S_col[c] = (S_col[c] - e.z * ki - e.w * bi) * inv_wi;  // S_t -> S_{t-1}
            dwi += dS_col[c] * S_col[c];
            dki += dS_col[c] * e.z;
            dbi += dS_col[c] * e.w;
            dvi += dS_row[c] * f.x;
            dsai += dS_row[c] * f.y;
        }
        dsai = row_sum<P>(dsai);
        if (part == 0) s_dsa[p][i] = dsai;
        dri = row_sum<P>(dri), dwi = row_sum<P>(dwi), dki = row_sum<P>(dki);
        dbi = row_sum<P>(dbi), dvi = row_sum<P>(dvi);
        __syncthreads();

        float dai = 0.f;
#pragma unroll
        for (int c = 0; c < C; c++) {
            const float4 f = s_kbwa[p][part + P * c];
            const float dsa_j = s_dsa[p][part + P * c];
            dai += dsa_j * S_col[c];
            dS_row[c] = dS_row[c] * f.z + dsai * f.w;  // dL/dS_t -> dL/dS_{t-1}
            dS_col[c] = dS_col[c] * wi + dsa_j * ai;
        }
        dai = row_sum<P>(dai);
        if (part == 0) {
            const long long x = token_index<N>(len, t, i);
            dr[x] = from_float<F>(dri);
            dlog_w[x] = dwi * wi;
            dk[x] = from_float<F>(dki);
            dv[x] = from_float<F>(dvi);
            da[x] = from_float<F>(dai);
            db[x] = from_float<F>(dbi);
        }
    }
#pragma unroll
    for (int c = 0; c < C; c++) dh0[(head * N + i) * N + part + P * c] = dS_row[c];
}

// One state row of one token: dst = src diag(w) + (src . a) b^T + v_i k^T, for a warp whose lane holds the
// columns lane + 32 * c of the row and of the vectors; returns dst . r, summed in every lane.
template <int C>
__device__ __forceinline__ float decode_row(const float* src, float* dst, const float (&r)[C], const float (&w)[C],
                                            const float (&k)[C], const float (&a)[C], const float (&b)[C], float vi) {
    float s[C];
    float s_a = 0.f;
#pragma unroll
    for (int c = 0; c < C; c++) {
        s[c] = src[32 * c];
        s_a += s[c] * a[c];
    }
#pragma unroll
    for (int m = 16; m > 0; m /= 2) s_a += __shfl_xor_sync(0xffffffffu, s_a, m);
    float y = 0.f;
#pragma unroll
    for (int c = 0; c < C; c++) {
        s[c] = s[c] * w[c] + s_a * b[c] + vi * k[c];
        dst[32 * c] = s[c];
        y += s[c] * r[c];
    }
#pragma unroll
    for (int m = 16; m > 0; m /= 2) y += __shfl_xor_sync(0xffffffffu, y, m);
    return y;
}

// One token for a batch of states (RNN decoding): S_in, S_out [B * H, N, N]; the rest [B * H, N].
// One block per head, a warp per state row at a time, each lane holding N / 32 columns, so every
// state is read and written once, in full 128-byte rows. blockDim.x: a multiple of 32.
template <typename F, int N>
__global__ void wkv7_decode(
    const float* __restrict__ S_in, const F* __restrict__ r, const float* __restrict__ log_w, const F* __restrict__ k,
    const F* __restrict__ v, const F* __restrict__ a, const F* __restrict__ b, F* __restrict__ o,
    float* __restrict__ S_out) {
    static_assert(N % 32 == 0, "the decode kernel splits a state row across one warp");
    constexpr int C = N / 32;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const long long head = blockIdx.x;
    float rr[C], ww[C], kk[C], aa[C], bb[C];
#pragma unroll
    for (int c = 0; c < C; c++) {
        const long long x = head * N + lane + 32 * c;
        rr[c] = to_float(r[x]);
        ww[c] = expf(log_w[x]);
        kk[c] = to_float(k[x]);
        aa[c] = to_float(a[x]);
        bb[c] = to_float(b[x]);
    }
    for (int row = warp; row < N; row += warps) {
        const long long offset = (head * N + row) * N + lane;
        const float y = decode_row(S_in + offset, S_out + offset, rr, ww, kk, aa, bb, to_float(v[head * N + row]));
        if (lane == 0) o[head * N + row] = from_float<F>(y);
    }
}
