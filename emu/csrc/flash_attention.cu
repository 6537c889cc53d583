// Fused attention, forward pass: softmax(Q K^T * scale, masked) V without the N x N score matrix.
//
// The flash-attention idea (Dao et al. 2022) in its plainest form. Each thread block takes
// BLOCK_M query rows of one (batch, head); each thread owns one query row, its running maximum m,
// its running sum of exponentials l and its output accumulator. The keys and values stream through
// shared memory BLOCK_N rows at a time. For each tile, a row's scores s_j = q . k_j * scale are
// folded in with the "online softmax":
//
//     m_new = max(m, max_j s_j)
//     l     = l * exp(m - m_new) + sum_j exp(s_j - m_new)
//     acc   = acc * exp(m - m_new) + sum_j exp(s_j - m_new) v_j
//
// and at the end out = acc / l, and lse = m + log(l), the log-sum-exp the backward pass needs to
// recompute the probabilities. Masked keys (a text batch's padding) are skipped; a row whose keys
// are all masked gets out = 0 and lse = -inf.
//
// Inputs are float32, float16 or bfloat16; all arithmetic is float32. This version uses no tensor
// cores: it is the readable baseline that the measured kernels are checked against.
//
// Layout: q (B, H, Nq, D), k and v (B, H, Nk, D), out (B, H, Nq, D), all contiguous; lse (B, H, Nq)
// float32; key_mask (B, Nk) bytes, nonzero = keep, or null for no mask. D is 64 or 128.
//
// Standalone, with a CPU reference (in the manner of llm.c's dev/cuda):
//     nvcc -O3 -std=c++17 -arch=sm_90 -DEMU_ATTENTION_STANDALONE emu/csrc/flash_attention.cu -o attention
//     ./attention
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace {

constexpr int BLOCK_M = 64;  // query rows per block: one per thread
constexpr int BLOCK_N = 32;  // key/value rows per shared-memory tile

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

#ifdef EMU_ATTENTION_STANDALONE
// ------------------------------------------------------------------------------------------------
// The kernel alone against a CPU reference, in float32, with odd lengths and a padding mask.
#include <stdio.h>
#include <stdlib.h>
#include <vector>

static void reference(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                      const std::vector<uint8_t>& mask, std::vector<float>& out, std::vector<float>& lse, int B, int H,
                      int Nq, int Nk, int D, float scale) {
    std::vector<float> s(Nk);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int i = 0; i < Nq; ++i) {
                const size_t bh = (size_t)b * H + h;
                float m = -INFINITY;
                for (int j = 0; j < Nk; ++j) {
                    float dot = 0.f;
                    for (int d = 0; d < D; ++d) dot += q[(bh * Nq + i) * D + d] * k[(bh * Nk + j) * D + d];
                    s[j] = mask[(size_t)b * Nk + j] ? dot * scale : -INFINITY;
                    m = fmaxf(m, s[j]);
                }
                double l = 0.0;
                for (int j = 0; j < Nk; ++j) l += s[j] > -INFINITY ? exp(s[j] - m) : 0.0;
                for (int d = 0; d < D; ++d) {
                    double o = 0.0;
                    for (int j = 0; j < Nk; ++j)
                        if (s[j] > -INFINITY) o += exp(s[j] - m) / l * v[(bh * Nk + j) * D + d];
                    out[(bh * Nq + i) * D + d] = l > 0 ? (float)o : 0.f;
                }
                lse[bh * Nq + i] = l > 0 ? m + (float)log(l) : -INFINITY;
            }
}

int main() {
    const int B = 2, H = 3, Nq = 77, Nk = 45, D = 64;  // lengths that are not multiples of the tiles
    const float scale = 1.0f / sqrtf((float)D);
    std::vector<float> q((size_t)B * H * Nq * D), k((size_t)B * H * Nk * D), v((size_t)B * H * Nk * D);
    srand(0);
    for (auto* t : {&q, &k, &v})
        for (auto& x : *t) x = (float)rand() / RAND_MAX * 2.f - 1.f;
    std::vector<uint8_t> mask((size_t)B * Nk, 1);
    for (int j = 30; j < Nk; ++j) mask[j] = 0;  // the first batch's last 15 keys are padding
    std::vector<float> out(q.size()), lse((size_t)B * H * Nq), ref_out(q.size()), ref_lse(lse.size());
    reference(q, k, v, mask, ref_out, ref_lse, B, H, Nq, Nk, D, scale);

    float *dq, *dk, *dv, *dout, *dlse;
    uint8_t* dmask;
    cudaMalloc(&dq, q.size() * 4); cudaMalloc(&dk, k.size() * 4); cudaMalloc(&dv, v.size() * 4);
    cudaMalloc(&dout, out.size() * 4); cudaMalloc(&dlse, lse.size() * 4); cudaMalloc(&dmask, mask.size());
    cudaMemcpy(dq, q.data(), q.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dk, k.data(), k.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dv, v.data(), v.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dmask, mask.data(), mask.size(), cudaMemcpyHostToDevice);
    cudaError_t err = emu_flash_attention_forward(dq, dk, dv, dmask, dout, dlse, B, H, Nq, Nk, D, scale, 0, 0);
    if (err == cudaSuccess) err = cudaDeviceSynchronize();
    if (err != cudaSuccess) {
        printf("CUDA error: %s\n", cudaGetErrorString(err));
        return 1;
    }
    cudaMemcpy(out.data(), dout, out.size() * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(lse.data(), dlse, lse.size() * 4, cudaMemcpyDeviceToHost);
    float max_err = 0.f;
    for (size_t i = 0; i < out.size(); ++i) max_err = fmaxf(max_err, fabsf(out[i] - ref_out[i]));
    for (size_t i = 0; i < lse.size(); ++i) max_err = fmaxf(max_err, fabsf(lse[i] - ref_lse[i]));
    printf("max abs error against the CPU reference: %g\n%s\n", max_err, max_err < 1e-4f ? "OK" : "MISMATCH");
    return max_err < 1e-4f ? 0 : 1;
}
#endif
