// kernels/cuda/sampling.cu compiled for the host through cuda_host.h; one launcher per kernel entry,
// called with ctypes by tests/kernels/test_cuda_host_emulation.py (same arguments as the CUDA launcher in
// kernels/cuda/sampling.py, plus the row count; pointers are host memory). Each returns nullptr or an
// error message from the emulator.
#include "cuda_host.h"

#include "sampling.cu"

#define HOST_LAUNCHER(NAME, T)                                                                          \
    extern "C" const char* host_##NAME(int rows, const T* logits, long long row_stride, const int* seen, \
                                       int n_seen, const float* penalty, const float* temperature,      \
                                       const int* top_k, int vocab, float* out, long long* argmax) {    \
        return cuda_host::launch(rows, THREADS, [=] {                                                   \
            NAME(logits, row_stride, seen, n_seen, penalty, temperature, top_k, vocab, out, argmax);    \
        });                                                                                             \
    }

HOST_LAUNCHER(prepare_logits_f32, float)
HOST_LAUNCHER(prepare_logits_bf16, unsigned short)
HOST_LAUNCHER(prepare_logits_f16, unsigned short)

// The fp16 load alone, for an exhaustive check of all 65536 bit patterns.
extern "C" void host_half_bits_to_float(const unsigned short* in, float* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = half_bits_to_float(in[i]);
}
