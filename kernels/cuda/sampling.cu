// Batched sampling preparation for chat decode: one launch turns the logits of S sequences into the
// processed fp32 logits that softmax + multinomial (or top-p, in torch) consume, plus the greedy token.
//
// Per row s (one thread block per row, THREADS threads), in transformers' processor order, exactly as
// blip3o_engine/sampling/text.py and its twin `prepare_logits_ref` (blip3o_engine.ops.sampling_ops):
//   1. y = float(logits[s])                                        (fp32 / bf16 / fp16 in; exact upcast)
//   2. repetition penalty over the unique ids of seen[s] in [0, V): y[id] = x < 0 ? x * p : x / p, where x
//      is the *original* logit, so an id listed twice is penalized once (torch's gather/scatter does the
//      same); ids outside [0, V) (the -1 padding) are ignored;
//   3. argmax[s] = first index of the maximum of y (NaN counts as the maximum, as torch.argmax) -- the
//      greedy token; then y = y / temperature[s] when temperature[s] > 0 (0 marks a greedy row: unscaled);
//   4. top-k when 0 < top_k[s] < V: v = the k-th largest y (with multiplicity, as torch.topk(...)[-1]),
//      and every y < v becomes -inf (ties with v are all kept, as HF's TopKLogitsWarper).
// The k-th value is found by an MSB-first radix select over an order-preserving uint32 key of the fp32
// value (11 + 11 + 10 bits: three histogram passes over the row, the first fused with step 3), so no sort
// and no extra memory. Top-p is left to torch: it needs the softmax mass in sorted order (a full sort).
//
// Arithmetic is IEEE round-to-nearest (__fmul_rn / __fdiv_rn: never contracted, never approximated),
// which is what torch does for these ops, so the result equals the reference bit for bit.
// The row of `out` is the working buffer: a row (up to ~152k fp32) does not fit in shared memory, and
// blocks touch only their own row, so __syncthreads() orders every pass.
//
// No headers (NVRTC has no CUDA include path here): bf16/fp16 arrive as raw 16-bit words.

#define THREADS 1024
#define NBINS 2048  // 11-bit digits for the first two radix passes; the last uses 10 bits (1024 bins)
#define WARPS (THREADS / 32)

struct LoadF32 {
    typedef float T;
    static __device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
};

struct LoadBF16 {  // bf16 is the high half of an fp32: the upcast is a shift
    typedef unsigned short T;
    static __device__ __forceinline__ float load(const unsigned short* p, long long i) {
        return __uint_as_float(((unsigned int)p[i]) << 16);
    }
};

// Exact half -> float in plain C++ (no PTX, so tests/kernels/test_cuda_host_emulation.py compiles this
// file for the host too): the half's exponent and mantissa bits placed as an fp32 are the value times
// 2^-112, and the product by 2^112 is exact, subnormal halves included (denormals kept: --ftz=false);
// an all-ones exponent (inf, NaN) maps to fp32's, the mantissa moved up and a NaN made quiet (as IEEE
// conversion, the hardware's cvt and torch do).
__device__ __forceinline__ float half_bits_to_float(unsigned short h) {
    const unsigned int sign = ((unsigned int)h & 0x8000u) << 16;
    const unsigned int bits = (unsigned int)h & 0x7fffu;
    if (bits >= 0x7c00u) {
        const unsigned int quiet = bits > 0x7c00u ? 0x00400000u : 0u;
        return __uint_as_float(sign | 0x7f800000u | ((bits & 0x3ffu) << 13) | quiet);
    }
    return __fmul_rn(__uint_as_float(sign | (bits << 13)), 5.192296858534828e33f);  // 2^112, exact in fp32
}

struct LoadF16 {  // exact half -> float conversion (denormals, inf and NaN included)
    typedef unsigned short T;
    static __device__ __forceinline__ float load(const unsigned short* p, long long i) {
        return half_bits_to_float(p[i]);
    }
};

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Order-preserving map fp32 -> uint32: a < b (as floats, -0 below +0) iff key(a) < key(b).
__device__ __forceinline__ unsigned int float_key(float x) {
    unsigned int u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_float(unsigned int k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Is (a, ia) a better argmax candidate than (b, ib)? NaN beats numbers; ties go to the smaller index;
// index -1 marks "no candidate".
__device__ __forceinline__ bool better(float a, int ia, float b, int ib) {
    if (ia < 0) return false;
    if (ib < 0) return true;
    bool a_nan = a != a, b_nan = b != b;
    if (a_nan != b_nan) return a_nan;
    if (!a_nan && a != b) return a > b;
    return ia < ib;
}

// The block's best (value, index); every thread gets the result.
__device__ __forceinline__ int block_argmax(float val, int idx, float* s_val, int* s_idx) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int offset = 16; offset > 0; offset >>= 1) {
        float v = __shfl_down_sync(0xffffffffu, val, offset);
        int i = __shfl_down_sync(0xffffffffu, idx, offset);
        if (better(v, i, val, idx)) { val = v; idx = i; }
    }
    if (lane == 0) { s_val[warp] = val; s_idx[warp] = idx; }
    __syncthreads();
    if (warp == 0) {
        val = lane < WARPS ? s_val[lane] : 0.0f;
        idx = lane < WARPS ? s_idx[lane] : -1;
        for (int offset = 16; offset > 0; offset >>= 1) {
            float v = __shfl_down_sync(0xffffffffu, val, offset);
            int i = __shfl_down_sync(0xffffffffu, idx, offset);
            if (better(v, i, val, idx)) { val = v; idx = i; }
        }
        if (lane == 0) s_idx[0] = idx;
    }
    __syncthreads();
    return s_idx[0];
}

// Warp 0 finds the bin holding the `*k`-th largest candidate (bins scanned from the top) and stores
// (prefix << bits) | bin in *prefix and the rank left inside that bin in *k. Other warps return at once;
// the caller syncs before and after.
__device__ __forceinline__ void select_bin(const unsigned int* hist, int nbins, int bits,
                                           unsigned int* prefix, unsigned int* k) {
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    // Read the shared inputs before the shuffles below: the lane that writes them back has to pass those
    // shuffles, which every lane has reached only after its reads.
    const unsigned int want = *k, old_prefix = *prefix;
    const int per_lane = nbins / 32;
    const int top = nbins - 1 - lane * per_lane;  // this lane owns bins top, top-1, ..., top-per_lane+1
    unsigned int sum = 0;
#pragma unroll 8
    for (int j = 0; j < per_lane; ++j) sum += hist[top - j];
    unsigned int inclusive = sum;  // candidates in this lane's bins and every higher lane's
    for (int offset = 1; offset < 32; offset <<= 1) {
        unsigned int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += other;
    }
    const unsigned int above = inclusive - sum;
    if (above < want && want <= inclusive) {  // exactly one lane: the counts add up to >= want
        unsigned int cum = above;
#pragma unroll 1
        for (int j = 0; j < per_lane; ++j) {
            unsigned int count = hist[top - j];
            if (cum + count >= want) {
                *prefix = (old_prefix << bits) | (unsigned int)(top - j);
                *k = want - cum;
                break;
            }
            cum += count;
        }
    }
}

template <class Load>
__device__ __forceinline__ void prepare_logits_row(
        const typename Load::T* __restrict__ logits, long long row_stride,
        const int* __restrict__ seen, int n_seen,
        const float* __restrict__ penalty, const float* __restrict__ temperature,
        const int* __restrict__ top_k, int vocab,
        float* __restrict__ out, long long* __restrict__ argmax) {
    __shared__ unsigned int hist[NBINS];
    __shared__ float s_val[WARPS];
    __shared__ int s_idx[WARPS];
    __shared__ unsigned int s_prefix, s_k;

    const int row = blockIdx.x;
    const typename Load::T* x = logits + row * row_stride;
    float* y = out + (long long)row * vocab;
    const float p = penalty[row];
    const float t = temperature[row];
    const int k = top_k[row];
    const bool do_top_k = k > 0 && k < vocab;

    // 1. upcast into the working row; clear the first histogram.
    for (int i = threadIdx.x; i < vocab; i += THREADS) y[i] = Load::load(x, i);
    for (int b = threadIdx.x; b < NBINS; b += THREADS) hist[b] = 0;
    __syncthreads();

    // 2. repetition penalty from the original logits: duplicate ids write the same value.
    const int* ids = seen + (long long)row * n_seen;
    for (int j = threadIdx.x; j < n_seen; j += THREADS) {
        const int id = ids[j];
        if (id >= 0 && id < vocab) {
            const float v = Load::load(x, id);
            y[id] = v < 0.0f ? __fmul_rn(v, p) : __fdiv_rn(v, p);
        }
    }
    __syncthreads();

    // 3. greedy argmax, temperature, first radix digit (top 11 bits of the key).
    float best = 0.0f;
    int best_idx = -1;
    for (int i = threadIdx.x; i < vocab; i += THREADS) {
        float v = y[i];
        if (better(v, i, best, best_idx)) { best = v; best_idx = i; }
        if (t > 0.0f) { v = __fdiv_rn(v, t); y[i] = v; }
        if (do_top_k) atomicAdd(&hist[float_key(v) >> 21], 1u);
    }
    const int greedy = block_argmax(best, best_idx, s_val, s_idx);  // syncs: the histogram is complete
    if (threadIdx.x == 0) argmax[row] = greedy;
    if (!do_top_k) return;

    // 4. radix select of the k-th largest key: digits of 11, 11 and 10 bits.
    if (threadIdx.x == 0) { s_prefix = 0; s_k = (unsigned int)k; }
    __syncthreads();
    select_bin(hist, NBINS, 11, &s_prefix, &s_k);
    __syncthreads();
    for (int b = threadIdx.x; b < NBINS; b += THREADS) hist[b] = 0;
    __syncthreads();
    unsigned int prefix = s_prefix;  // top 11 bits of the k-th key
    for (int i = threadIdx.x; i < vocab; i += THREADS) {
        const unsigned int key = float_key(y[i]);
        if ((key >> 21) == prefix) atomicAdd(&hist[(key >> 10) & 0x7ffu], 1u);
    }
    __syncthreads();
    select_bin(hist, NBINS, 11, &s_prefix, &s_k);
    __syncthreads();
    for (int b = threadIdx.x; b < NBINS; b += THREADS) hist[b] = 0;
    __syncthreads();
    prefix = s_prefix;  // top 22 bits
    for (int i = threadIdx.x; i < vocab; i += THREADS) {
        const unsigned int key = float_key(y[i]);
        if ((key >> 10) == prefix) atomicAdd(&hist[key & 0x3ffu], 1u);
    }
    __syncthreads();
    select_bin(hist, NBINS / 2, 10, &s_prefix, &s_k);
    __syncthreads();
    const float kth = key_float(s_prefix);  // all 32 bits

    // Mask by float comparison (as torch's `logits < kth`): -0 and +0 tie, as they must.
    for (int i = threadIdx.x; i < vocab; i += THREADS) {
        if (y[i] < kth) y[i] = neg_inf();
    }
}

// logits [S, V] with row stride `row_stride` elements (unit column stride); seen [S, n_seen] int32,
// contiguous (may be null when n_seen == 0); penalty, temperature [S] fp32; top_k [S] int32;
// out [S, V] fp32 contiguous; argmax [S] int64. Grid (S), block (THREADS), no dynamic shared memory.
#define PREPARE_LOGITS_ENTRY(NAME, LOAD)                                                                \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                        \
            const LOAD::T* logits, long long row_stride, const int* seen, int n_seen,                  \
            const float* penalty, const float* temperature, const int* top_k, int vocab, float* out,    \
            long long* argmax) {                                                                        \
        prepare_logits_row<LOAD>(logits, row_stride, seen, n_seen, penalty, temperature, top_k, vocab,  \
                                 out, argmax);                                                          \
    }

PREPARE_LOGITS_ENTRY(prepare_logits_f32, LoadF32)
PREPARE_LOGITS_ENTRY(prepare_logits_bf16, LoadBF16)
PREPARE_LOGITS_ENTRY(prepare_logits_f16, LoadF16)
