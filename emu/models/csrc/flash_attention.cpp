// PyTorch binding of the fused attention kernels in flash_attention.cu.
//
// The kernels take raw pointers. This file checks the tensors, makes them contiguous, allocates the
// outputs and the work buffers, and launches on PyTorch's current CUDA stream. emu/models/fused_attention.py
// builds it with torch.utils.cpp_extension (it needs a CUDA build of PyTorch) and registers the
// torch.library ops around these two functions:
//
//     forward(q, k, v, key_padding_mask, scale) -> [out, lse]
//     backward(dout, q, k, v, out, lse, key_padding_mask, scale) -> [dq, dk, dv]
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream, which at::cuda:: re-exports
#include <torch/extension.h>

#include <climits>
#include <cstdint>
#include <vector>

extern "C" cudaError_t emu_flash_attention_forward(const void* q, const void* k, const void* v, const uint8_t* key_mask,
                                                   void* out, float* lse, int B, int H, int Nq, int Nk, int D, float scale,
                                                   int dtype, cudaStream_t stream);
extern "C" cudaError_t emu_flash_attention_backward(const void* q, const void* k, const void* v,
                                                    const uint8_t* key_mask, const void* out, const void* dout,
                                                    const float* lse, void* dq, void* dk, void* dv, float* dq_accum,
                                                    float* delta, int B, int H, int Nq, int Nk, int D, float scale,
                                                    int dtype, cudaStream_t stream);

namespace {

// The kernels' dtype codes.
int dtype_code(torch::ScalarType dtype) {
    if (dtype == torch::kFloat32) return 0;
    if (dtype == torch::kFloat16) return 1;
    if (dtype == torch::kBFloat16) return 2;
    TORCH_CHECK(false, "flash_attention: dtype ", dtype, " is not supported (float32, float16 or bfloat16)");
    return -1;
}

// q (B, H, Nq, D), k and v (B, H, Nk, D) on one CUDA device in one dtype, D 64 or 128; the mask (B, Nk) bool.
void check_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                  const c10::optional<torch::Tensor>& key_padding_mask) {
    TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "flash_attention: q, k and v must be CUDA tensors");
    TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "flash_attention: q, k and v must be on one device");
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "flash_attention: q, k and v must be (B, H, N, D), got ",
                q.sizes(), ", ", k.sizes(), ", ", v.sizes());
    TORCH_CHECK(k.sizes() == v.sizes(), "flash_attention: k and v must have one shape, got ", k.sizes(), " and ", v.sizes());
    TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
                "flash_attention: q (B, H, Nq, D) and k (B, H, Nk, D) disagree: ", q.sizes(), " and ", k.sizes());
    TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, "flash_attention: head dim must be 64 or 128, got ", q.size(3));
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                "flash_attention: q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                v.scalar_type());
    dtype_code(q.scalar_type());  // raises for a dtype the kernels lack
    TORCH_CHECK(q.size(0) * q.size(1) <= 65535, "flash_attention: batch * heads must be at most 65535, got ",
                q.size(0) * q.size(1));
    TORCH_CHECK(q.size(2) < INT_MAX && k.size(2) < INT_MAX, "flash_attention: sequence too long");
    if (key_padding_mask) {
        const torch::Tensor& mask = *key_padding_mask;
        TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.dim() == 2 && mask.size(0) == q.size(0) &&
                        mask.size(1) == k.size(2),
                    "flash_attention: key_padding_mask must be a (B, Nk) = (", q.size(0), ", ", k.size(2),
                    ") bool tensor, got ", mask.scalar_type(), " ", mask.sizes());
        TORCH_CHECK(mask.device() == q.device(), "flash_attention: key_padding_mask must be on q's device");
    }
}

// The mask as the kernels read it: contiguous bytes, nonzero = a real key; or an undefined tensor.
torch::Tensor mask_bytes(const c10::optional<torch::Tensor>& key_padding_mask) {
    return key_padding_mask ? key_padding_mask->to(torch::kUInt8).contiguous() : torch::Tensor();
}

const uint8_t* mask_pointer(const torch::Tensor& mask) { return mask.defined() ? mask.data_ptr<uint8_t>() : nullptr; }

void check_launch(cudaError_t err, const char* pass) {
    TORCH_CHECK(err == cudaSuccess, "flash_attention ", pass, ": ", cudaGetErrorString(err));
}

}  // namespace

std::vector<torch::Tensor> forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                   c10::optional<torch::Tensor> key_padding_mask, double scale) {
    check_inputs(q, k, v, key_padding_mask);
    const c10::cuda::CUDAGuard device_guard(q.device());
    q = q.contiguous();
    k = k.contiguous();
    v = v.contiguous();
    const torch::Tensor mask = mask_bytes(key_padding_mask);
    const int B = (int)q.size(0), H = (int)q.size(1), Nq = (int)q.size(2), Nk = (int)k.size(2), D = (int)q.size(3);

    torch::Tensor out = torch::empty(q.sizes(), q.options());                           // (B, H, Nq, D)
    torch::Tensor lse = torch::empty({B, H, Nq}, q.options().dtype(torch::kFloat32));  // (B, H, Nq)
    check_launch(emu_flash_attention_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask_pointer(mask), out.data_ptr(),
                                             lse.data_ptr<float>(), B, H, Nq, Nk, D, (float)scale,
                                             dtype_code(q.scalar_type()), c10::cuda::getCurrentCUDAStream()),
                 "forward");
    return {out, lse};
}

std::vector<torch::Tensor> backward(torch::Tensor dout, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor out, torch::Tensor lse, c10::optional<torch::Tensor> key_padding_mask,
                                    double scale) {
    check_inputs(q, k, v, key_padding_mask);
    TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "flash_attention backward: dout and out must be ",
                q.sizes(), " like q, got ", dout.sizes(), " and ", out.sizes());
    TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                "flash_attention backward: dout and out must have q's dtype ", q.scalar_type());
    TORCH_CHECK(lse.scalar_type() == torch::kFloat32 && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                    lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
                "flash_attention backward: lse must be float32 (B, H, Nq), got ", lse.scalar_type(), " ", lse.sizes());
    TORCH_CHECK(dout.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
                "flash_attention backward: dout, out and lse must be on q's device");
    const c10::cuda::CUDAGuard device_guard(q.device());
    q = q.contiguous();
    k = k.contiguous();
    v = v.contiguous();
    out = out.contiguous();
    dout = dout.contiguous();
    lse = lse.contiguous();
    const torch::Tensor mask = mask_bytes(key_padding_mask);
    const int B = (int)q.size(0), H = (int)q.size(1), Nq = (int)q.size(2), Nk = (int)k.size(2), D = (int)q.size(3);

    torch::Tensor dq = torch::empty(q.sizes(), q.options());
    torch::Tensor dk = torch::empty(k.sizes(), k.options());
    torch::Tensor dv = torch::empty(v.sizes(), v.options());
    const auto f32 = q.options().dtype(torch::kFloat32);
    torch::Tensor dq_accum = torch::empty({B, H, Nq, D}, f32);  // dQ summed over the key tiles in float32
    torch::Tensor delta = torch::empty({B, H, Nq}, f32);        // rowsum(dO * O)
    check_launch(emu_flash_attention_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask_pointer(mask),
                                              out.data_ptr(), dout.data_ptr(), lse.data_ptr<float>(), dq.data_ptr(),
                                              dk.data_ptr(), dv.data_ptr(), dq_accum.data_ptr<float>(),
                                              delta.data_ptr<float>(), B, H, Nq, Nk, D, (float)scale,
                                              dtype_code(q.scalar_type()), c10::cuda::getCurrentCUDAStream()),
                 "backward");
    return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "Fused attention (emu/models/csrc/flash_attention.cu): forward and backward on CUDA tensors";
    m.def("forward", &forward, "(q, k, v, key_padding_mask or None, scale) -> [out, lse]");
    m.def("backward", &backward, "(dout, q, k, v, out, lse, key_padding_mask or None, scale) -> [dq, dk, dv]");
}
