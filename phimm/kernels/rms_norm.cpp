// RMSNorm of transformers' Llama / Phi-3 / Phi-4-multimodal decoders in one pass over each row:
//
//   y = weight * to_dtype(x * rsqrt(mean(x^2) + eps))      (x widened to fp32; for bf16 the normalized row is
//                                                          rounded to bf16, then multiplied by the bf16 weight
//                                                          in fp32 and rounded again, as the module's two ops do)
//
// transformers' module makes five passes over an fp32 copy of the input (widen, square, mean, scale, narrow) and
// one more for the weight; here each row is read twice from L1 (sum of squares, then scale) and written once.
// The sum of squares is a 16-lane fp32 sum (its order differs from torch's reduction: the result can differ in
// the last bit of fp32, and rarely by one bf16 rounding). Rows are shared out over threads.
//
// Built on first use by phimm.kernels (g++ -O3 -march=native -fopenmp -shared); `phimm_norm_isa()` is 1 where
// this build has AVX-512 (F and BW), else 0 and the Python side keeps the module's own forward.

#include <stdint.h>
#include <math.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define PHIMM_AVX512 1
#include "bf16.h"
#else
#define PHIMM_AVX512 0
#endif

extern "C" int phimm_norm_isa(void) { return PHIMM_AVX512; }

#if PHIMM_AVX512

template <int BF16>
static inline __m512 load16(const void* p, __mmask16 m) {
    if (BF16) return phimm_widen_bf16(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_maskz_loadu_ps(m, p);
}

template <int BF16>
static void row(const char* x, const char* w, int64_t n, float eps, char* out) {
    const int64_t esz = BF16 ? 2 : 4;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 a = load16<BF16>(x + i * esz, 0xFFFF), b = load16<BF16>(x + (i + 16) * esz, 0xFFFF);
        acc0 = _mm512_fmadd_ps(a, a, acc0);
        acc1 = _mm512_fmadd_ps(b, b, acc1);
    }
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 a = load16<BF16>(x + i * esz, m);
        acc0 = _mm512_fmadd_ps(a, a, acc0);
    }
    const float var = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) / (float)n;
    const __m512 r = _mm512_set1_ps(1.0f / sqrtf(var + eps));
    for (i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 y = _mm512_mul_ps(load16<BF16>(x + i * esz, m), r);
        if (BF16) {
            __m512 yb = _mm512_castsi512_ps(_mm512_slli_epi32(phimm_round_bf16(y), 16));  // the module's .to(bf16)
            __m512 z = _mm512_mul_ps(load16<1>(w + i * 2, m), yb);
            _mm256_mask_storeu_epi16(out + i * 2, m, phimm_to_bf16(z));
        } else {
            _mm512_mask_storeu_ps(out + i * 4, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i * 4), y));
        }
    }
}

#endif  // PHIMM_AVX512

// x [rows, n] (row stride x_stride elements, unit stride along n), weight [n], out [rows, n] contiguous; dtype
// 0 fp32, 1 bf16 (x, weight and out alike). Returns 0, or 1 where this build lacks AVX-512.
extern "C" int phimm_rms_norm(const void* x, int64_t rows, int64_t n, int64_t x_stride, const void* w, float eps,
                              void* out, int dtype, int nthreads) {
#if PHIMM_AVX512
    const int64_t esz = dtype ? 2 : 4;
    const int nt = nthreads > 1 && rows > 1 ? nthreads : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t i = 0; i < rows; ++i) {
        const char* xi = (const char*)x + i * x_stride * esz;
        char* oi = (char*)out + i * n * esz;
        if (dtype)
            row<1>(xi, (const char*)w, n, eps, oi);
        else
            row<0>(xi, (const char*)w, n, eps, oi);
    }
    return 0;
#else
    (void)x; (void)rows; (void)n; (void)x_stride; (void)w; (void)eps; (void)out; (void)dtype; (void)nthreads;
    return 1;
#endif
}
