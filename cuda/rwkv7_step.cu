// One token of an RWKV-7 block for a batch of rows (RNN decoding): the work between the matrix products,
// one kernel per gap, as model.py computes it. The products run through cuBLAS (rwkv_lm/cuda_step.py):
//
//   step_mix        [ln0], ln1, the six token-shift mixes            -> r, k, v and the LoRA downs
//   step_lora       tanh of the decay LoRA's down, sigmoid of the gate's -> the LoRA ups
//   step_time_mix   decay, a, kk, k, value residual, the WKV-7 step, ln_x, bonus, gate -> output (+ residual)
//   step_ffn_mix    ln2 and the channel mix's token shift            -> key
//   step_relu_sq    the squared ReLU                                 -> value (+ residual)
//
// Activations are [B, C] (rows contiguous) in the model's dtype F, parameters in F too; every sum, norm
// and nonlinearity is computed in fp32 and each output rounded once. The WKV state is fp32, [B, H, N, N].
// Like wkv7.cu (whose 16-bit helpers it uses), the source serves NVRTC and the CPU emulation alike.
#include "wkv7.cu"

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// Sum over all threads of the block (blockDim.x a multiple of 32); every thread must call it, and gets the
// total. scratch: 32 floats of shared memory, reused by the next call (hence the first barrier).
__device__ __forceinline__ float block_sum(float x, float* scratch) {
#pragma unroll
    for (int m = 16; m > 0; m /= 2) x += __shfl_xor_sync(0xffffffffu, x, m);
    __syncthreads();
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < (int)blockDim.x / 32; w++) total += scratch[w];
    return total;
}

// Layer norm of one row x [n] into out [n] (torch's: biased variance, eps inside the root); the block's
// threads share the row, each thread the columns tid + blockDim.x * j, so it rereads only what it wrote.
template <typename F>
__device__ void layer_norm(const F* x, F* out, const F* weight, const F* bias, int n, float eps, float* scratch) {
    float s = 0.f;
    for (int c = threadIdx.x; c < n; c += blockDim.x) s += to_float(x[c]);
    const float mean = block_sum(s, scratch) / n;
    float q = 0.f;
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        const float d = to_float(x[c]) - mean;
        q += d * d;
    }
    const float rstd = 1.f / sqrtf(block_sum(q, scratch) / n + eps);
    for (int c = threadIdx.x; c < n; c += blockDim.x)
        out[c] = from_float<F>((to_float(x[c]) - mean) * rstd * to_float(weight[c]) + to_float(bias[c]));
}

// One block per row. x [B, C]: the block's input; with ln0 (layer 0) x_ln0 [B, C] receives ln0(x), the
// residual stream from here on. shift_out [B, C] receives ln1 of that (the time mix's input, its next token
// shift); mixed [6, B, C] the mixes x + (shift - x) * x_m for m = r, w, k, v, a, g.
template <typename F>
__global__ void step_mix(int C, float eps, const F* __restrict__ x, const F* __restrict__ ln0_w,
                         const F* __restrict__ ln0_b, const F* __restrict__ ln1_w, const F* __restrict__ ln1_b,
                         const F* __restrict__ shift, const F* __restrict__ x_r, const F* __restrict__ x_w,
                         const F* __restrict__ x_k, const F* __restrict__ x_v, const F* __restrict__ x_a,
                         const F* __restrict__ x_g, F* __restrict__ x_ln0, F* __restrict__ shift_out,
                         F* __restrict__ mixed) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x, B = gridDim.x;
    const F* stream = x + row * C;
    if (ln0_w) {
        layer_norm(stream, x_ln0 + row * C, ln0_w, ln0_b, C, eps, scratch);
        stream = x_ln0 + row * C;
    }
    layer_norm(stream, shift_out + row * C, ln1_w, ln1_b, C, eps, scratch);
    const F* mixes[6] = {x_r, x_w, x_k, x_v, x_a, x_g};
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const float xi = to_float(shift_out[row * C + c]), d = to_float(shift[row * C + c]) - xi;
#pragma unroll
        for (int m = 0; m < 6; m++) mixed[(m * B + row) * C + c] = from_float<F>(xi + d * to_float(mixes[m][c]));
    }
}

// In place: decay [n_decay] = tanh(decay), gate [n_gate] = sigmoid(gate) (the LoRA downs' nonlinearities).
template <typename F>
__global__ void step_lora(int n_decay, F* __restrict__ decay, int n_gate, F* __restrict__ gate) {
    const int stride = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_decay; i += stride)
        decay[i] = from_float<F>(tanhf(to_float(decay[i])));
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_gate; i += stride)
        gate[i] = from_float<F>(sigmoid(to_float(gate[i])));
}

// The time mix from its products to the input of its output product, for one head (blockIdx.x) of one
// row (blockIdx.y); blockDim.x: a multiple of 32 dividing N * 32 (whole warps, the same rows per warp).
// r, k, v [B, C]: the products; w_up, a_up, v_up [B, C]: the LoRA ups (v_up and v_first_in null in layer 0,
// which writes v_first_out instead); gate [B, C]: the gate. S_in, S_out [B, H, N, N] fp32 (value x key).
// out [B, C] = (ln_x(wkv) + bonus) * gate.
template <typename F, int N>
__global__ void step_time_mix(
    float decay_scale, float ln_x_eps, const F* __restrict__ r_, const F* __restrict__ k_, const F* __restrict__ v_,
    const F* __restrict__ w_up, const F* __restrict__ a_up, const F* __restrict__ v_up, const F* __restrict__ gate,
    const F* __restrict__ v_first_in, F* __restrict__ v_first_out, const F* __restrict__ w0, const F* __restrict__ a0,
    const F* __restrict__ v0, const F* __restrict__ k_k, const F* __restrict__ k_a, const F* __restrict__ r_k,
    const F* __restrict__ ln_x_w, const F* __restrict__ ln_x_b, const float* __restrict__ S_in,
    float* __restrict__ S_out, F* __restrict__ out) {
    static_assert(N % 32 == 0, "a state row splits across one warp");
    constexpr int L = N / 32;  // state columns per lane
    __shared__ float scratch[32];
    // per key channel: receptance, decay, key, value; the removal key (a = -kk) and its scaled copy (b = kk * a)
    __shared__ float s_r[N], s_w[N], s_k[N], s_v[N], s_a[N], s_b[N], s_y[N];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = blockDim.x / 32;
    const int h = blockIdx.x, C = gridDim.x * N;
    const long long base = (long long)blockIdx.y * C + h * N, head = (long long)blockIdx.y * gridDim.x + h;

    float kk_sq = 0.f, bonus = 0.f;
    for (int j = tid; j < N; j += blockDim.x) {
        const int c = h * N + j;
        const long long x = base + j;
        const float r = to_float(r_[x]), kk = to_float(k_[x]) * to_float(k_k[c]);
        const float a = sigmoid(to_float(a0[c]) + to_float(a_up[x]));
        const float k = to_float(k_[x]) * (1.f + (a - 1.f) * to_float(k_a[c]));
        float v = to_float(v_[x]);
        if (v_first_out) v_first_out[x] = v_[x];
        else v += (to_float(v_first_in[x]) - v) * sigmoid(to_float(v0[c]) + to_float(v_up[x]));
        s_r[j] = r;
        s_w[j] = expf(-decay_scale * sigmoid(to_float(w0[c]) + to_float(w_up[x])));
        s_k[j] = k;
        s_v[j] = v;
        s_a[j] = kk;
        s_b[j] = a;
        kk_sq += kk * kk;
        bonus += r * k * to_float(r_k[c]);
    }
    const float inv_norm = 1.f / fmaxf(sqrtf(block_sum(kk_sq, scratch)), 1e-12f);  // F.normalize's eps
    bonus = block_sum(bonus, scratch);
    for (int j = tid; j < N; j += blockDim.x) {
        const float kk = s_a[j] * inv_norm;
        s_a[j] = -kk;
        s_b[j] *= kk;
    }
    __syncthreads();

    // the recurrence as wkv7_decode runs it (decode_row): a warp per state row, each row read and written once
    float rr[L], ww[L], kk[L], aa[L], bb[L];
#pragma unroll
    for (int l = 0; l < L; l++) {
        const int j = lane + 32 * l;
        rr[l] = s_r[j], ww[l] = s_w[j], kk[l] = s_k[j], aa[l] = s_a[j], bb[l] = s_b[j];
    }
    for (int i = warp; i < N; i += warps) {
        const long long offset = (head * N + i) * N + lane;
        const float y = decode_row(S_in + offset, S_out + offset, rr, ww, kk, aa, bb, s_v[i]);
        if (lane == 0) s_y[i] = y;
    }
    __syncthreads();

    // ln_x: a group norm with one group per head
    float s = 0.f;
    for (int j = tid; j < N; j += blockDim.x) s += s_y[j];
    const float mean = block_sum(s, scratch) / N;
    float q = 0.f;
    for (int j = tid; j < N; j += blockDim.x) q += (s_y[j] - mean) * (s_y[j] - mean);
    const float rstd = 1.f / sqrtf(block_sum(q, scratch) / N + ln_x_eps);
    for (int j = tid; j < N; j += blockDim.x) {
        const int c = h * N + j;
        const float y = (s_y[j] - mean) * rstd * to_float(ln_x_w[c]) + to_float(ln_x_b[c]);
        out[base + j] = from_float<F>((y + bonus * s_v[j]) * to_float(gate[base + j]));
    }
}

// One block per row: shift_out [B, C] = ln2(x), the channel mix's input and next token shift;
// mixed [B, C] = that + (shift - that) * x_k.
template <typename F>
__global__ void step_ffn_mix(int C, float eps, const F* __restrict__ x, const F* __restrict__ ln2_w,
                             const F* __restrict__ ln2_b, const F* __restrict__ shift, const F* __restrict__ x_k,
                             F* __restrict__ shift_out, F* __restrict__ mixed) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    layer_norm(x + row * C, shift_out + row * C, ln2_w, ln2_b, C, eps, scratch);
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const long long i = row * C + c;
        const float xi = to_float(shift_out[i]);
        mixed[i] = from_float<F>(xi + (to_float(shift[i]) - xi) * to_float(x_k[c]));
    }
}

// In place: h [n] = relu(h)^2.
template <typename F>
__global__ void step_relu_sq(int n, F* __restrict__ h) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float x = fmaxf(to_float(h[i]), 0.f);
        h[i] = from_float<F>(x * x);
    }
}
