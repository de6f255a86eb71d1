// WKV-7 recurrence kernels, per head with the state S [N value x N key] in fp32:
//
//     sa_t = S_{t-1} a_t;   S_t = S_{t-1} diag(exp(log_w_t)) + sa_t b_t^T + v_t k_t^T;   o_t = S_t r_t
//
// Sequence tensors are [B, T, H, N] in the storage type F (float, bf16_t or fp16_t); states are
// [B, H, N, N] fp32, row = value index. All arithmetic is fp32. One source serves NVRTC (through
// CuPy) and g++ (the CPU emulation in tests/cuda_emu), so it includes no CUDA header.
//
// forward/backward: one block of N threads per (batch, head); in the forward thread i owns row i of
// S, so the recurrence needs no reduction across threads. The forward can save the state every
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

// A thread's row of a state, moved as float4: rows start at multiples of N floats, and N % 4 == 0.
template <int N> __device__ __forceinline__ void load_row(float (&S)[N], const float* src) {
#pragma unroll
    for (int q = 0; q < N / 4; q++) {
        const float4 f = reinterpret_cast<const float4*>(src)[q];
        S[4 * q] = f.x, S[4 * q + 1] = f.y, S[4 * q + 2] = f.z, S[4 * q + 3] = f.w;
    }
}
template <int N> __device__ __forceinline__ void store_row(float* dst, const float (&S)[N]) {
#pragma unroll
    for (int q = 0; q < N / 4; q++)
        reinterpret_cast<float4*>(dst)[q] = make_float4(S[4 * q], S[4 * q + 1], S[4 * q + 2], S[4 * q + 3]);
}

// One thread's inputs for one token, loaded a step ahead so the loads overlap the step before.
struct Token {
    float r, log_w, k, v, a, b;
};

template <typename F>
__device__ __forceinline__ Token load_token(long long x, const F* r, const F* log_w, const F* k, const F* v, const F* a,
                                            const F* b) {
    return Token{to_float(r[x]), to_float(log_w[x]), to_float(k[x]), to_float(v[x]), to_float(a[x]), to_float(b[x])};
}

// Inputs [B, T, H, N]; h0 [B, H, N, N] or null (zeros). Writes o, the final state hT, and, when ck is
// not null, ck [B, H, ceil(T / ck_every), N, N] (the state after every ck_every-th step and after the
// last) and sa [B, T, H, N] fp32 for the backward.
template <typename F, int N>
__global__ void __launch_bounds__(N) wkv7_forward(
    int len, int ck_every, const F* __restrict__ r, const F* __restrict__ log_w, const F* __restrict__ k,
    const F* __restrict__ v, const F* __restrict__ a, const F* __restrict__ b, const float* __restrict__ h0,
    F* __restrict__ o, float* __restrict__ hT, float* __restrict__ ck, float* __restrict__ sa_out) {
    const int i = threadIdx.x;
    const long long head = (long long)blockIdx.y * gridDim.x + blockIdx.x;
    // Double-buffered by step parity: step t fills buffer t & 1 while no thread can still be reading
    // it (its readers were at step t - 2, behind the barrier of step t - 1), so one barrier per step.
    // Packed so that the update reads one float4 per key channel.
    __shared__ float4 s_wkbr[2][N];  // (decay, k, b, r)
    __shared__ float4 s_a[2][N / 4];  // a, four channels at a time

    float S[N] = {};
    if (h0) load_row<N>(S, h0 + (head * N + i) * N);

    Token next = len > 0 ? load_token(token_index<N>(len, 0, i), r, log_w, k, v, a, b) : Token{};
    for (int t = 0; t < len; t++) {
        const int p = t & 1;
        const long long x = token_index<N>(len, t, i);
        const Token in = next;
        s_wkbr[p][i] = make_float4(expf(in.log_w), in.k, in.b, in.r);
        reinterpret_cast<float*>(s_a[p])[i] = in.a;
        if (t + 1 < len) next = load_token(token_index<N>(len, t + 1, i), r, log_w, k, v, a, b);
        __syncthreads();

        float s_a_i = 0.f;
#pragma unroll
        for (int q = 0; q < N / 4; q++) {
            const float4 a4 = s_a[p][q];
            s_a_i += S[4 * q] * a4.x + S[4 * q + 1] * a4.y + S[4 * q + 2] * a4.z + S[4 * q + 3] * a4.w;
        }
        float y[4] = {};  // four partial sums: a chain of N dependent adds would be the step's latency
#pragma unroll
        for (int j = 0; j < N; j++) {
            const float4 c = s_wkbr[p][j];
            S[j] = S[j] * c.x + s_a_i * c.z + in.v * c.y;
            y[j % 4] += S[j] * c.w;
        }
        o[x] = from_float<F>((y[0] + y[1]) + (y[2] + y[3]));
        if (ck) {
            sa_out[x] = s_a_i;
            if ((t + 1) % ck_every == 0 || t == len - 1)
                store_row<N>(ck + ((head * ((len + ck_every - 1) / ck_every) + t / ck_every) * N + i) * N, S);
        }
    }
    store_row<N>(hT + (head * N + i) * N, S);
}

// Gradients of (o, hT) -> (r, log_w, k, v, a, b, h0). do_ [B, T, H, N]; dhT [B, H, N, N] or null;
// ck and sa as written by the forward with the same ck_every. Thread i keeps column i of S (every
// gradient but dv sums over value rows), and both row i and column i of dL/dS. S_{t-1} is recovered
// from S_t by undoing the step, S_{t-1}[:, i] = (S_t[:, i] - v k_i - sa b_i) / w_i, starting afresh
// from each checkpoint so that rounding grows over at most ck_every steps.
template <typename F, int N>
__global__ void __launch_bounds__(N) wkv7_backward(
    int len, int ck_every, const F* __restrict__ r, const F* __restrict__ log_w, const F* __restrict__ k,
    const F* __restrict__ v, const F* __restrict__ a, const F* __restrict__ b, const F* __restrict__ do_,
    const float* __restrict__ dhT, const float* __restrict__ ck, const float* __restrict__ sa_in,
    F* __restrict__ dr, F* __restrict__ dlog_w, F* __restrict__ dk, F* __restrict__ dv, F* __restrict__ da,
    F* __restrict__ db, float* __restrict__ dh0) {
    const int i = threadIdx.x;
    const long long head = (long long)blockIdx.y * gridDim.x + blockIdx.x;
    // Same parity double buffering as the forward; dsa is written after the first barrier of a step
    // and read after the second, so it is double-buffered too.
    __shared__ float4 s_rdvs[2][N];  // (r, do, v, sa)
    __shared__ float4 s_kbwa[2][N];  // (k, b, decay, a)
    __shared__ float s_dsa[2][N];

    float S_col[N], dS_row[N], dS_col[N];  // S[j][i], dS[i][j], dS[j][i]
#pragma unroll
    for (int j = 0; j < N; j++) {
        dS_row[j] = dhT ? dhT[(head * N + i) * N + j] : 0.f;
        dS_col[j] = dhT ? dhT[(head * N + j) * N + i] : 0.f;
    }

    Token next{};
    float next_do = 0.f, next_sa = 0.f;
    auto prefetch = [&](int t) {
        const long long x = token_index<N>(len, t, i);
        next = load_token(x, r, log_w, k, v, a, b);
        next_do = to_float(do_[x]);
        next_sa = sa_in[x];
    };
    if (len > 0) prefetch(len - 1);
    for (int t = len - 1; t >= 0; t--) {
        const int p = t & 1;
        const long long x = token_index<N>(len, t, i);
        const Token in = next;
        const float doi = next_do, wi = expf(in.log_w);
        s_rdvs[p][i] = make_float4(in.r, doi, in.v, next_sa);
        s_kbwa[p][i] = make_float4(in.k, in.b, wi, in.a);
        if ((t + 1) % ck_every == 0 || t == len - 1) {
            const float* src = ck + (head * ((len + ck_every - 1) / ck_every) + t / ck_every) * N * N + i;
#pragma unroll
            for (int j = 0; j < N; j++) S_col[j] = src[j * N];
        }
        if (t > 0) prefetch(t - 1);
        __syncthreads();

        const float inv_wi = expf(-in.log_w);
        float dri = 0.f, dwi = 0.f, dki = 0.f, dbi = 0.f, dvi = 0.f, dsai = 0.f;
#pragma unroll
        for (int j = 0; j < N; j++) {
            const float4 c = s_rdvs[p][j], e = s_kbwa[p][j];
            dri += S_col[j] * c.y;
            dS_row[j] += doi * c.x;
            dS_col[j] += c.y * in.r;
            S_col[j] = (S_col[j] - c.z * in.k - c.w * in.b) * inv_wi;  // S_t -> S_{t-1}
            dwi += dS_col[j] * S_col[j];
            dki += dS_col[j] * c.z;
            dbi += dS_col[j] * c.w;
            dvi += dS_row[j] * e.x;
            dsai += dS_row[j] * e.y;
        }
        s_dsa[p][i] = dsai;
        __syncthreads();

        float dai = 0.f;
#pragma unroll
        for (int j = 0; j < N; j++) {
            const float4 e = s_kbwa[p][j];
            const float dsa_j = s_dsa[p][j];
            dai += dsa_j * S_col[j];
            dS_row[j] = dS_row[j] * e.z + dsai * e.w;  // dL/dS_t -> dL/dS_{t-1}
            dS_col[j] = dS_col[j] * wi + dsa_j * in.a;
        }
        dr[x] = from_float<F>(dri);
        dlog_w[x] = from_float<F>(dwi * wi);
        dk[x] = from_float<F>(dki);
        dv[x] = from_float<F>(dvi);
        da[x] = from_float<F>(dai);
        db[x] = from_float<F>(dbi);
    }
#pragma unroll
    for (int j = 0; j < N; j++) dh0[(head * N + i) * N + j] = dS_row[j];
}

// One token for a batch of states (RNN decoding): S_in, S_out [B * H, N, N]; the rest [B * H, N].
// One block per head, a warp per state row at a time, each lane holding N / 32 columns, so every
// state is read and written once, in full 128-byte rows. blockDim.x: a multiple of 32.
template <typename F, int N>
__global__ void wkv7_decode(
    const float* __restrict__ S_in, const F* __restrict__ r, const F* __restrict__ log_w, const F* __restrict__ k,
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
        ww[c] = expf(to_float(log_w[x]));
        kk[c] = to_float(k[x]);
        aa[c] = to_float(a[x]);
        bb[c] = to_float(b[x]);
    }
    for (int row = warp; row < N; row += warps) {
        const float* src = S_in + (head * N + row) * N + lane;
        float* dst = S_out + (head * N + row) * N + lane;
        float s[C];
        float s_a = 0.f;
#pragma unroll
        for (int c = 0; c < C; c++) {
            s[c] = src[32 * c];
            s_a += s[c] * aa[c];
        }
#pragma unroll
        for (int m = 16; m > 0; m /= 2) s_a += __shfl_xor_sync(0xffffffffu, s_a, m);
        const float vi = to_float(v[head * N + row]);
        float y = 0.f;
#pragma unroll
        for (int c = 0; c < C; c++) {
            s[c] = s[c] * ww[c] + s_a * bb[c] + vi * kk[c];
            dst[32 * c] = s[c];
            y += s[c] * rr[c];
        }
#pragma unroll
        for (int m = 16; m > 0; m /= 2) y += __shfl_xor_sync(0xffffffffu, y, m);
        if (lane == 0) o[head * N + row] = from_float<F>(y);
    }
}
