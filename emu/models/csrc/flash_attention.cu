// Fused attention: softmax(Q K^T * scale, masked) V and its gradients, without the N x N score matrix.
//
// The flash-attention idea (Dao et al. 2022) in its plainest form.
//
// Forward. Each thread block takes BLOCK_M query rows of one (batch, head); each thread owns one
// query row, its running maximum m, its running sum of exponentials l and its output accumulator.
// The keys and values stream through shared memory BLOCK_N rows at a time. For each tile, a row's
// scores s_j = q . k_j * scale are folded in with the "online softmax":
//
//     m_new = max(m, max_j s_j)
//     l     = l * exp(m - m_new) + sum_j exp(s_j - m_new)
//     acc   = acc * exp(m - m_new) + sum_j exp(s_j - m_new) v_j
//
// and at the end out = acc / l, and lse = m + log(l), the log-sum-exp the backward pass needs to
// recompute the probabilities. Masked keys (a text batch's padding) are skipped; a row whose keys
// are all masked gets out = 0 and lse = -inf.
//
// Backward (FlashAttention-2, Dao 2023). With S = Q K^T * scale, P = softmax(S) and O = P V, the
// gradients for an upstream dO are
//
//     dV = P^T dO
//     dP = dO V^T
//     dS = P * (dP - D)          where D_i = rowsum(dO * O)_i
//     dQ = dS K * scale,  dK = dS^T Q * scale
//
// The dS line is the softmax's Jacobian: for one row p = softmax(s), dp_j/ds_k = p_j (delta_jk - p_k),
// so ds_k = p_k (dp_k - sum_j p_j dp_j), and sum_j p_j dp_j = sum_j p_j (dO . v_j) = dO . o: one dot
// product per query row, computed up front by a small kernel. P is never stored: each tile of it is
// recomputed from Q, K and the saved lse as P_ij = exp(S_ij - lse_i), already normalised.
//
// Inputs are float32, float16 or bfloat16; all arithmetic is float32. This version uses no tensor
// cores: it is the readable baseline that the measured kernels are checked against.
//
// Layout: q, out, dout, dq (B, H, Nq, D); k, v, dk, dv (B, H, Nk, D), all contiguous; lse (B, H, Nq)
// float32; key_mask (B, Nk) bytes, nonzero = keep, or null for no mask. D is 64 or 128.
//
// Standalone, with a CPU reference (in the manner of llm.c's dev/cuda):
//     nvcc -O3 -std=c++17 -arch=sm_90 -DEMU_ATTENTION_STANDALONE emu/models/csrc/flash_attention.cu -o attention
//     ./attention
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace {

constexpr int BLOCK_M = 64;  // query rows per block: one per thread
constexpr int BLOCK_N = 32;  // key/value rows per shared-memory tile
constexpr int MAX_GRID_Y = 65535;  // (batch, head) pairs index gridDim.y, which is at most this

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

template <typename T, int D>
__global__ void flash_attention_forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                               const uint8_t* __restrict__ key_mask, T* __restrict__ out,
                                               float* __restrict__ lse, int H, int Nq, int Nk, float scale) {
    __shared__ float k_tile[BLOCK_N][D];
    __shared__ float v_tile[BLOCK_N][D];
    __shared__ bool keep[BLOCK_N];

    const int bh = blockIdx.y;                      // which (batch, head)
    const int b = bh / H;
    const int row = blockIdx.x * BLOCK_M + threadIdx.x;  // this thread's query row
    const bool active = row < Nq;
    const T* q_row = q + ((size_t)bh * Nq + row) * D;
    const T* k_head = k + (size_t)bh * Nk * D;
    const T* v_head = v + (size_t)bh * Nk * D;

    float q_reg[D], acc[D];
    for (int d = 0; d < D; ++d) {
        q_reg[d] = active ? to_float(q_row[d]) * scale : 0.f;  // the scale folded into q once
        acc[d] = 0.f;
    }
    float m = -INFINITY, l = 0.f;

    for (int start = 0; start < Nk; start += BLOCK_N) {
        // every thread of the block helps load the tile
        for (int i = threadIdx.x; i < BLOCK_N * D; i += blockDim.x) {
            const int j = i / D, d = i % D, key = start + j;
            const bool in_range = key < Nk;
            k_tile[j][d] = in_range ? to_float(k_head[(size_t)key * D + d]) : 0.f;
            v_tile[j][d] = in_range ? to_float(v_head[(size_t)key * D + d]) : 0.f;
        }
        for (int j = threadIdx.x; j < BLOCK_N; j += blockDim.x) {
            const int key = start + j;
            keep[j] = key < Nk && (key_mask == nullptr || key_mask[(size_t)b * Nk + key] != 0);
        }
        __syncthreads();

        if (active) {
            float s[BLOCK_N];
            float tile_max = -INFINITY;
            for (int j = 0; j < BLOCK_N; ++j) {
                float dot = 0.f;
                for (int d = 0; d < D; ++d) dot += q_reg[d] * k_tile[j][d];
                s[j] = keep[j] ? dot : -INFINITY;
                tile_max = fmaxf(tile_max, s[j]);
            }
            if (tile_max > -INFINITY) {  // a tile of only masked keys changes nothing
                const float m_new = fmaxf(m, tile_max);
                const float correction = expf(m - m_new);  // 0 on the first tile (m = -inf)
                l *= correction;
                for (int d = 0; d < D; ++d) acc[d] *= correction;
                for (int j = 0; j < BLOCK_N; ++j) {
                    const float p = expf(s[j] - m_new);  // 0 for a masked key
                    l += p;
                    for (int d = 0; d < D; ++d) acc[d] += p * v_tile[j][d];
                }
                m = m_new;
            }
        }
        __syncthreads();  // the tile is not overwritten before every thread is done with it
    }

    if (active) {
        T* out_row = out + ((size_t)bh * Nq + row) * D;
        const float inv = l > 0.f ? 1.f / l : 0.f;
        for (int d = 0; d < D; ++d) out_row[d] = from_float<T>(acc[d] * inv);
        lse[(size_t)bh * Nq + row] = l > 0.f ? m + logf(l) : -INFINITY;
    }
}

template <typename T, int D>
cudaError_t launch(const void* q, const void* k, const void* v, const uint8_t* key_mask, void* out, float* lse,
                   int B, int H, int Nq, int Nk, float scale, cudaStream_t stream) {
    if (B * H == 0 || Nq == 0) return cudaSuccess;  // nothing to do (and an empty grid is a launch error)
    if (B * H > MAX_GRID_Y) return cudaErrorInvalidValue;
    dim3 grid((Nq + BLOCK_M - 1) / BLOCK_M, B * H);
    flash_attention_forward_kernel<T, D><<<grid, BLOCK_M, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), key_mask, static_cast<T*>(out),
        lse, H, Nq, Nk, scale);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dim(const void* q, const void* k, const void* v, const uint8_t* key_mask, void* out, float* lse,
                       int B, int H, int Nq, int Nk, int D, float scale, cudaStream_t stream) {
    switch (D) {
        case 64: return launch<T, 64>(q, k, v, key_mask, out, lse, B, H, Nq, Nk, scale, stream);
        case 128: return launch<T, 128>(q, k, v, key_mask, out, lse, B, H, Nq, Nk, scale, stream);
        default: return cudaErrorInvalidValue;
    }
}

// ------------------------------------------------------------------------------------------------
// Backward pass.
//
// Work split (FlashAttention-2): one thread block per (batch*head, tile of BWD_BLOCK_N keys). The
// block holds its keys' K and V in shared memory and their dK and dV in registers for the whole
// kernel, and walks over the query rows BWD_BLOCK_M at a time. Each step has three phases, each a
// small matrix product spread over the block's threads:
//
//     1. P, dS   (BWD_BLOCK_M x BWD_BLOCK_N): p = exp(q.k * scale - lse), ds = p * (dO.v - D)
//     2. dV += P^T dO,  dK += dS^T Q                  (into registers)
//     3. dQ += dS K * scale                           (atomicAdd into a float32 buffer)
//
// Every key tile adds to every query row's dQ, so the blocks of one head must sum their parts: they
// do it with atomicAdd on a float32 copy of dQ, which a last kernel casts to the input dtype. (The
// order of those additions varies, so dQ's last bits can differ from run to run; dK and dV cannot.)
// Masked keys and rows past the end get p = 0, hence ds = 0 and no gradient at all.

constexpr int BWD_BLOCK_N = 64;   // keys per block
constexpr int BWD_BLOCK_M = 32;   // query rows per step
constexpr int BWD_THREADS = 256;

// K and V tiles are padded to D + 1 floats a row: in phase 1 the 32 threads of a warp read the same
// column d of 32 different key rows, and with a row stride of D (a multiple of 32) those would all
// fall in one shared-memory bank. With D + 1 they fall in 32 different banks.
template <int D>
constexpr int backward_shared_bytes() {
    return (2 * BWD_BLOCK_N * (D + 1) + 2 * BWD_BLOCK_M * D) * (int)sizeof(float);  // K, V, then Q, dO
}

// D_i = rowsum(dO * O)_i for every query row: one warp per row.
template <typename T>
__global__ void attention_backward_delta_kernel(const T* __restrict__ out, const T* __restrict__ dout,
                                                float* __restrict__ delta, size_t rows, int D) {
    const size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;  // the whole warp leaves together
    float sum = 0.f;
    for (int d = lane; d < D; d += 32) sum += to_float(out[row * D + d]) * to_float(dout[row * D + d]);
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) delta[row] = sum;
}

template <typename T, int D>
__global__ void __launch_bounds__(BWD_THREADS)
flash_attention_backward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                const uint8_t* __restrict__ key_mask, const T* __restrict__ dout,
                                const float* __restrict__ lse, const float* __restrict__ delta,
                                float* __restrict__ dq_accum, T* __restrict__ dk, T* __restrict__ dv, int H, int Nq,
                                int Nk, float scale) {
    extern __shared__ float shared[];  // the D-sized tiles: over 48 KiB, so dynamic (see the launcher)
    float(*k_tile)[D + 1] = reinterpret_cast<float(*)[D + 1]>(shared);                       // (BWD_BLOCK_N, D)
    float(*v_tile)[D + 1] = reinterpret_cast<float(*)[D + 1]>(shared + BWD_BLOCK_N * (D + 1));  // (BWD_BLOCK_N, D)
    float(*q_tile)[D] = reinterpret_cast<float(*)[D]>(shared + 2 * BWD_BLOCK_N * (D + 1));      // (BWD_BLOCK_M, D)
    float(*do_tile)[D] = q_tile + BWD_BLOCK_M;                                                  // (BWD_BLOCK_M, D)
    __shared__ float p_tile[BWD_BLOCK_M][BWD_BLOCK_N];
    __shared__ float ds_tile[BWD_BLOCK_M][BWD_BLOCK_N];
    __shared__ float lse_tile[BWD_BLOCK_M], delta_tile[BWD_BLOCK_M];
    __shared__ bool keep[BWD_BLOCK_N];

    const int key_start = blockIdx.x * BWD_BLOCK_N;
    const int bh = blockIdx.y;  // which (batch, head)
    const int b = bh / H;
    const T* q_head = q + (size_t)bh * Nq * D;
    const T* do_head = dout + (size_t)bh * Nq * D;
    const float* lse_head = lse + (size_t)bh * Nq;
    const float* delta_head = delta + (size_t)bh * Nq;
    float* dq_head = dq_accum + (size_t)bh * Nq * D;

    // this block's keys and values, loaded once
    for (int i = threadIdx.x; i < BWD_BLOCK_N * D; i += BWD_THREADS) {
        const int j = i / D, d = i % D, key = key_start + j;
        const size_t at = ((size_t)bh * Nk + key) * D + d;
        k_tile[j][d] = key < Nk ? to_float(k[at]) : 0.f;
        v_tile[j][d] = key < Nk ? to_float(v[at]) : 0.f;
    }
    for (int j = threadIdx.x; j < BWD_BLOCK_N; j += BWD_THREADS) {
        const int key = key_start + j;
        keep[j] = key < Nk && (key_mask == nullptr || key_mask[(size_t)b * Nk + key] != 0);
    }

    // Each thread owns the same ELEMS entries of the block's dK and dV throughout: entry
    // e = threadIdx.x + x * BWD_THREADS is key row e / D, column e % D.
    constexpr int ELEMS = BWD_BLOCK_N * D / BWD_THREADS;
    static_assert(BWD_BLOCK_N * D % BWD_THREADS == 0 && D % 32 == 0, "a warp's entries share one key row");
    float dk_acc[ELEMS], dv_acc[ELEMS];
#pragma unroll
    for (int x = 0; x < ELEMS; ++x) dk_acc[x] = dv_acc[x] = 0.f;

    for (int q_start = 0; q_start < Nq; q_start += BWD_BLOCK_M) {
        __syncthreads();  // the previous step is done with the tiles about to be overwritten
        for (int i = threadIdx.x; i < BWD_BLOCK_M * D; i += BWD_THREADS) {
            const int r = i / D, d = i % D, row = q_start + r;
            q_tile[r][d] = row < Nq ? to_float(q_head[(size_t)row * D + d]) : 0.f;
            do_tile[r][d] = row < Nq ? to_float(do_head[(size_t)row * D + d]) : 0.f;
        }
        for (int r = threadIdx.x; r < BWD_BLOCK_M; r += BWD_THREADS) {
            const int row = q_start + r;
            lse_tile[r] = row < Nq ? lse_head[row] : -INFINITY;  // -inf: a row with no probability mass
            delta_tile[r] = row < Nq ? delta_head[row] : 0.f;
        }
        __syncthreads();

        // 1. this tile of P and dS, one entry per thread at a time
        for (int i = threadIdx.x; i < BWD_BLOCK_M * BWD_BLOCK_N; i += BWD_THREADS) {
            const int r = i / BWD_BLOCK_N, j = i % BWD_BLOCK_N;
            float p = 0.f, ds = 0.f;
            if (keep[j] && lse_tile[r] > -INFINITY) {  // else p = 0: a masked key, or a row of only masked keys
                float s = 0.f, dp = 0.f;
                for (int d = 0; d < D; ++d) {
                    s += q_tile[r][d] * k_tile[j][d];
                    dp += do_tile[r][d] * v_tile[j][d];
                }
                p = expf(s * scale - lse_tile[r]);  // softmax probability, normalised by the saved lse
                ds = p * (dp - delta_tile[r]);
            }
            p_tile[r][j] = p;
            ds_tile[r][j] = ds;
        }
        __syncthreads();

        // 2. dV += P^T dO and dK += dS^T Q for this block's keys (the scale goes on dK at the end)
        for (int r = 0; r < BWD_BLOCK_M; ++r) {
#pragma unroll  // fully: the accumulators stay in registers only if every index is a constant
            for (int x = 0; x < ELEMS; ++x) {
                const int e = threadIdx.x + x * BWD_THREADS, j = e / D, d = e % D;
                dv_acc[x] += p_tile[r][j] * do_tile[r][d];
                dk_acc[x] += ds_tile[r][j] * q_tile[r][d];
            }
        }

        // 3. dQ += dS K * scale: this key tile's share of these rows' gradient
        for (int i = threadIdx.x; i < BWD_BLOCK_M * D; i += BWD_THREADS) {
            const int r = i / D, d = i % D, row = q_start + r;
            if (row < Nq) {
                float sum = 0.f;
                for (int j = 0; j < BWD_BLOCK_N; ++j) sum += ds_tile[r][j] * k_tile[j][d];
                atomicAdd(&dq_head[(size_t)row * D + d], sum * scale);
            }
        }
    }

#pragma unroll
    for (int x = 0; x < ELEMS; ++x) {
        const int e = threadIdx.x + x * BWD_THREADS, j = e / D, d = e % D, key = key_start + j;
        if (key < Nk) {
            const size_t at = ((size_t)bh * Nk + key) * D + d;
            dk[at] = from_float<T>(dk_acc[x] * scale);
            dv[at] = from_float<T>(dv_acc[x]);
        }
    }
}

template <typename T>
__global__ void cast_kernel(const float* __restrict__ in, T* __restrict__ out, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = from_float<T>(in[i]);
}

template <typename T, int D>
cudaError_t launch_backward(const void* q, const void* k, const void* v, const uint8_t* key_mask, const void* out,
                            const void* dout, const float* lse, void* dq, void* dk, void* dv, float* dq_accum,
                            float* delta, int B, int H, int Nq, int Nk, float scale, cudaStream_t stream) {
    if (B * H > MAX_GRID_Y) return cudaErrorInvalidValue;
    const size_t rows = (size_t)B * H * Nq;
    if (rows == 0) return cudaSuccess;  // nothing to do (and an empty grid is a launch error)
    cudaError_t err = cudaMemsetAsync(dq_accum, 0, rows * D * sizeof(float), stream);
    if (err != cudaSuccess) return err;

    const int rows_per_block = 256 / 32;  // one warp per row
    attention_backward_delta_kernel<T><<<(unsigned)((rows + rows_per_block - 1) / rows_per_block), 256, 0, stream>>>(
        static_cast<const T*>(out), static_cast<const T*>(dout), delta, rows, D);

    if (Nk > 0) {  // with no keys there is nothing to attend to: dq stays 0, dk and dv are empty
        const int shared_bytes = backward_shared_bytes<D>();
        err = cudaFuncSetAttribute(flash_attention_backward_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   shared_bytes);
        if (err != cudaSuccess) return err;
        dim3 grid((Nk + BWD_BLOCK_N - 1) / BWD_BLOCK_N, B * H);
        flash_attention_backward_kernel<T, D><<<grid, BWD_THREADS, shared_bytes, stream>>>(
            static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), key_mask,
            static_cast<const T*>(dout), lse, delta, dq_accum, static_cast<T*>(dk), static_cast<T*>(dv), H, Nq, Nk,
            scale);
    }

    const size_t n = rows * D;
    const unsigned blocks = (unsigned)(n / 256 + 1 < 4096 ? n / 256 + 1 : 4096);  // grid-stride beyond that
    cast_kernel<T><<<blocks, 256, 0, stream>>>(dq_accum, static_cast<T*>(dq), n);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward_dim(const void* q, const void* k, const void* v, const uint8_t* key_mask, const void* out,
                                const void* dout, const float* lse, void* dq, void* dk, void* dv, float* dq_accum,
                                float* delta, int B, int H, int Nq, int Nk, int D, float scale, cudaStream_t stream) {
    switch (D) {
        case 64:
            return launch_backward<T, 64>(q, k, v, key_mask, out, dout, lse, dq, dk, dv, dq_accum, delta, B, H, Nq, Nk,
                                          scale, stream);
        case 128:
            return launch_backward<T, 128>(q, k, v, key_mask, out, dout, lse, dq, dk, dv, dq_accum, delta, B, H, Nq, Nk,
                                           scale, stream);
        default: return cudaErrorInvalidValue;
    }
}

}  // namespace

// dtype: 0 float32, 1 float16, 2 bfloat16. Returns cudaSuccess, or cudaErrorInvalidValue for an
// unsupported dtype or head dim (the caller then uses PyTorch's attention).
extern "C" cudaError_t emu_flash_attention_forward(const void* q, const void* k, const void* v, const uint8_t* key_mask,
                                                   void* out, float* lse, int B, int H, int Nq, int Nk, int D, float scale,
                                                   int dtype, cudaStream_t stream) {
    switch (dtype) {
        case 0: return launch_dim<float>(q, k, v, key_mask, out, lse, B, H, Nq, Nk, D, scale, stream);
        case 1: return launch_dim<__half>(q, k, v, key_mask, out, lse, B, H, Nq, Nk, D, scale, stream);
        case 2: return launch_dim<__nv_bfloat16>(q, k, v, key_mask, out, lse, B, H, Nq, Nk, D, scale, stream);
        default: return cudaErrorInvalidValue;
    }
}

// The gradients dq, dk, dv (same shapes and dtype as q, k, v) for the upstream gradient dout, from the
// forward's inputs, its out and its lse. The caller provides two float32 work buffers: dq_accum with
// B*H*Nq*D entries and delta with B*H*Nq. Same dtype codes and return values as the forward.
extern "C" cudaError_t emu_flash_attention_backward(const void* q, const void* k, const void* v,
                                                    const uint8_t* key_mask, const void* out, const void* dout,
                                                    const float* lse, void* dq, void* dk, void* dv, float* dq_accum,
                                                    float* delta, int B, int H, int Nq, int Nk, int D, float scale,
                                                    int dtype, cudaStream_t stream) {
    switch (dtype) {
        case 0:
            return launch_backward_dim<float>(q, k, v, key_mask, out, dout, lse, dq, dk, dv, dq_accum, delta, B, H, Nq,
                                              Nk, D, scale, stream);
        case 1:
            return launch_backward_dim<__half>(q, k, v, key_mask, out, dout, lse, dq, dk, dv, dq_accum, delta, B, H, Nq,
                                               Nk, D, scale, stream);
        case 2:
            return launch_backward_dim<__nv_bfloat16>(q, k, v, key_mask, out, dout, lse, dq, dk, dv, dq_accum, delta, B,
                                                      H, Nq, Nk, D, scale, stream);
        default: return cudaErrorInvalidValue;
    }
}

#ifdef EMU_ATTENTION_STANDALONE
// ------------------------------------------------------------------------------------------------
// The kernels alone, in float32, against a CPU reference in double precision: odd lengths that are
// not multiples of the tiles, a padding mask, and a batch whose keys are all masked.
#include <stdio.h>
#include <stdlib.h>
#include <vector>

// Forward and backward straight from the definitions, one (batch, head) at a time, with the whole
// Nq x Nk matrix P in memory.
static void reference(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                      const std::vector<uint8_t>& mask, const std::vector<float>& dout, std::vector<float>& out,
                      std::vector<float>& lse, std::vector<float>& dq, std::vector<float>& dk, std::vector<float>& dv,
                      int B, int H, int Nq, int Nk, int D, double scale) {
    std::vector<double> p((size_t)Nq * Nk), ds((size_t)Nq * Nk), delta(Nq);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h) {
            const size_t bh = (size_t)b * H + h;
            const float *Q = &q[bh * Nq * D], *K = &k[bh * Nk * D], *V = &v[bh * Nk * D], *dO = &dout[bh * Nq * D];
            // P = softmax(Q K^T * scale) row by row; masked keys get probability 0
            for (int i = 0; i < Nq; ++i) {
                double m = -INFINITY, l = 0.0;
                for (int j = 0; j < Nk; ++j) {
                    double s = 0.0;
                    for (int d = 0; d < D; ++d) s += (double)Q[i * D + d] * K[j * D + d];
                    p[i * Nk + j] = mask[(size_t)b * Nk + j] ? s * scale : -INFINITY;
                    m = fmax(m, p[i * Nk + j]);
                }
                for (int j = 0; j < Nk; ++j) l += p[i * Nk + j] > -INFINITY ? exp(p[i * Nk + j] - m) : 0.0;
                for (int j = 0; j < Nk; ++j) p[i * Nk + j] = p[i * Nk + j] > -INFINITY ? exp(p[i * Nk + j] - m) / l : 0.0;
                lse[bh * Nq + i] = l > 0 ? (float)(m + log(l)) : -INFINITY;
            }
            // O = P V and D_i = rowsum(dO * O)
            for (int i = 0; i < Nq; ++i) {
                delta[i] = 0.0;
                for (int d = 0; d < D; ++d) {
                    double o = 0.0;
                    for (int j = 0; j < Nk; ++j) o += p[i * Nk + j] * V[j * D + d];
                    out[(bh * Nq + i) * D + d] = (float)o;
                    delta[i] += dO[i * D + d] * o;
                }
            }
            // dP = dO V^T and dS = P * (dP - D)
            for (int i = 0; i < Nq; ++i)
                for (int j = 0; j < Nk; ++j) {
                    double dp = 0.0;
                    for (int d = 0; d < D; ++d) dp += (double)dO[i * D + d] * V[j * D + d];
                    ds[i * Nk + j] = p[i * Nk + j] * (dp - delta[i]);
                }
            // dQ = dS K * scale
            for (int i = 0; i < Nq; ++i)
                for (int d = 0; d < D; ++d) {
                    double g = 0.0;
                    for (int j = 0; j < Nk; ++j) g += ds[i * Nk + j] * K[j * D + d];
                    dq[(bh * Nq + i) * D + d] = (float)(g * scale);
                }
            // dK = dS^T Q * scale and dV = P^T dO
            for (int j = 0; j < Nk; ++j)
                for (int d = 0; d < D; ++d) {
                    double gk = 0.0, gv = 0.0;
                    for (int i = 0; i < Nq; ++i) {
                        gk += ds[i * Nk + j] * Q[i * D + d];
                        gv += p[i * Nk + j] * dO[i * D + d];
                    }
                    dk[(bh * Nk + j) * D + d] = (float)(gk * scale);
                    dv[(bh * Nk + j) * D + d] = (float)gv;
                }
        }
}

// The largest |got - want| over the largest |want| (at least 1). Equal values count 0, which covers
// the lse = -inf of a row whose keys are all masked; a NaN counts as infinitely wrong.
static double relative_error(const std::vector<float>& got, const std::vector<float>& want) {
    double worst = 0.0, size = 1.0;
    for (float w : want)
        if (isfinite(w)) size = fmax(size, fabs(w));
    for (size_t i = 0; i < got.size(); ++i) {
        if (got[i] == want[i]) continue;
        const double e = fabs((double)got[i] - want[i]);
        worst = isnan(e) ? INFINITY : fmax(worst, e);
    }
    return worst / size;
}

static void check_cuda(cudaError_t err) {
    if (err != cudaSuccess) {
        printf("CUDA error: %s\n", cudaGetErrorString(err));
        exit(1);
    }
}

template <typename X>
static X* to_device(const std::vector<X>& host) {
    X* dev;
    check_cuda(cudaMalloc(&dev, host.size() * sizeof(X)));
    check_cuda(cudaMemcpy(dev, host.data(), host.size() * sizeof(X), cudaMemcpyHostToDevice));
    return dev;
}

static std::vector<float> to_host(const float* dev, size_t n) {
    std::vector<float> host(n);
    check_cuda(cudaMemcpy(host.data(), dev, n * sizeof(float), cudaMemcpyDeviceToHost));
    return host;
}

// Forward and backward of one shape on the GPU against the reference. With `masked`, the first batch's
// last third of keys are padding and a third batch (if any) has every key masked.
static bool check(int B, int H, int Nq, int Nk, int D, bool masked) {
    const float scale = 1.0f / sqrtf((float)D);
    const size_t nq = (size_t)B * H * Nq * D, nk = (size_t)B * H * Nk * D, rows = (size_t)B * H * Nq;
    std::vector<float> q(nq), k(nk), v(nk), dout(nq);
    for (auto* t : {&q, &k, &v, &dout})
        for (auto& x : *t) x = (float)rand() / RAND_MAX * 2.f - 1.f;
    std::vector<uint8_t> mask((size_t)B * Nk, 1);
    if (masked) {
        for (int j = 2 * Nk / 3; j < Nk; ++j) mask[j] = 0;
        if (B > 2)
            for (int j = 0; j < Nk; ++j) mask[2 * (size_t)Nk + j] = 0;
    }
    std::vector<float> out(nq), lse(rows), dq(nq), dk(nk), dv(nk);
    reference(q, k, v, mask, dout, out, lse, dq, dk, dv, B, H, Nq, Nk, D, scale);

    float *d_q = to_device(q), *d_k = to_device(k), *d_v = to_device(v), *d_dout = to_device(dout);
    uint8_t* d_mask = to_device(mask);
    float *d_out = to_device(out), *d_lse = to_device(lse), *d_dq = to_device(dq), *d_dk = to_device(dk),
          *d_dv = to_device(dv), *d_dq_accum = to_device(dq), *d_delta = to_device(lse);  // sized like these
    check_cuda(emu_flash_attention_forward(d_q, d_k, d_v, d_mask, d_out, d_lse, B, H, Nq, Nk, D, scale, 0, 0));
    check_cuda(emu_flash_attention_backward(d_q, d_k, d_v, d_mask, d_out, d_dout, d_lse, d_dq, d_dk, d_dv, d_dq_accum,
                                            d_delta, B, H, Nq, Nk, D, scale, 0, 0));
    check_cuda(cudaDeviceSynchronize());
    const double errors[5] = {relative_error(to_host(d_out, nq), out), relative_error(to_host(d_lse, rows), lse),
                              relative_error(to_host(d_dq, nq), dq), relative_error(to_host(d_dk, nk), dk),
                              relative_error(to_host(d_dv, nk), dv)};
    for (void* p : {(void*)d_q, (void*)d_k, (void*)d_v, (void*)d_dout, (void*)d_mask, (void*)d_out, (void*)d_lse,
                    (void*)d_dq, (void*)d_dk, (void*)d_dv, (void*)d_dq_accum, (void*)d_delta})
        check_cuda(cudaFree(p));

    bool ok = true;
    for (double e : errors) ok = ok && e < 1e-4;
    printf("B=%d H=%d Nq=%d Nk=%d D=%d %-9s relative error: out %.1e lse %.1e dq %.1e dk %.1e dv %.1e\n", B, H, Nq,
           Nk, D, masked ? "masked" : "unmasked", errors[0], errors[1], errors[2], errors[3], errors[4]);
    return ok;
}

int main() {
    srand(0);
    bool ok = check(2, 3, 77, 45, 64, true);   // lengths that are not multiples of the tiles
    ok = check(1, 2, 33, 77, 128, false) && ok;
    ok = check(3, 2, 50, 129, 128, true) && ok;  // a key tile of one key; a batch with every key masked
    printf("%s\n", ok ? "OK" : "MISMATCH");
    return ok ? 0 : 1;
}
#endif
