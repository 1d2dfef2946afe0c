// bf16 matrix products for a few input rows (decode steps): y[m, n] = alpha * sum_k x[m, k] w[n, k]
// (+ y[m, n] when accumulating), x and w bf16, sums in fp32, y rounded to bf16 once (round to nearest even).
//
// For the LoRA factors of a decode step: A is [r, in] (a few long rows), B is [out, r] (many rows of 256-320):
// small matrices that oneDNN reads at 8-12 GB/s from memory on one core, against 15 GB/s for the large base
// weights. Here the weight is read once, front to back, four rows at a time (four streams for long rows, one
// for short ones), each 64-byte line of a row multiplied into the M rows' fp32 sums by vdpbf16ps (pairs of bf16
// products, exact in fp32); four rows' sums are reduced together. More than four input rows go through a block
// four at a time (its weight rows then come from L1 / L2). Blocks of rows are shared out over threads.
//
// Built on first use by phimm.kernels (g++ -O3 -march=native -fopenmp -shared); `phimm_gemv_isa()` is 1 where
// this build has AVX-512 BF16, else 0 and the Python side keeps oneDNN. `phimm_lora_bf16` runs a LoRA delta
// (A's product, then B's added into the layer's output) in one call.

#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define PHIMM_GEMV 1
#include "bf16.h"
#else
#define PHIMM_GEMV 0
#endif

extern "C" int phimm_gemv_isa(void) { return PHIMM_GEMV; }

#if PHIMM_GEMV

// prefetch the same line of the rows PHIMM_GEMV_PFN blocks of four ahead (0: none)
#ifndef PHIMM_GEMV_PFN
#define PHIMM_GEMV_PFN 2
#endif

// rows n0 .. n0 + NR (NR <= 4) of w against the M input rows; results to y (bf16, row stride ys)
template <int M, int NR>
static inline void block(const uint16_t* x, int64_t xs, const uint16_t* w, int64_t K, int64_t n0, uint16_t* y,
                         int64_t ys, float alpha, int accumulate, const uint16_t* wend) {
    __m512 acc[M][4];
    for (int m = 0; m < M; ++m)
        for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
    const uint16_t* wr[4];
    for (int j = 0; j < 4; ++j) wr[j] = w + (n0 + (j < NR ? j : 0)) * K;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh wv[NR];
        for (int j = 0; j < NR; ++j) {
            if (PHIMM_GEMV_PFN && wr[j] + k + 4 * PHIMM_GEMV_PFN * K < wend)
                _mm_prefetch((const char*)(wr[j] + k + 4 * PHIMM_GEMV_PFN * K), _MM_HINT_T0);
            wv[j] = (__m512bh)_mm512_loadu_si512(wr[j] + k);
        }
        for (int m = 0; m < M; ++m) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * xs + k);
            for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv, wv[j]);
        }
    }
    if (k < K) {
        const __mmask32 rest = (__mmask32)((1ull << (K - k)) - 1);
        __m512bh wv[NR];
        for (int j = 0; j < NR; ++j) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(rest, wr[j] + k);
        for (int m = 0; m < M; ++m) {
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(rest, x + m * xs + k);
            for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv, wv[j]);
        }
    }
    const __mmask16 out = (__mmask16)((1u << NR) - 1);
    const __m512 va = _mm512_set1_ps(alpha);
    for (int m = 0; m < M; ++m) {
        __m512 s = _mm512_castps128_ps512(phimm_reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
        s = _mm512_mul_ps(s, va);
        uint16_t* dst = y + m * ys + n0;
        if (accumulate) {
            __m256i prev = _mm256_maskz_loadu_epi16(out, dst);
            s = _mm512_add_ps(s, phimm_widen_bf16(prev));
        }
        _mm256_mask_storeu_epi16(dst, out, phimm_to_bf16(s));
    }
}

// all M input rows against rows n0 .. n0 + NR of w: four input rows at a time, the block's weight rows read from
// memory by the first four and from L1 / L2 by the rest
template <int NR>
static inline void rows(const uint16_t* x, int64_t M, int64_t xs, const uint16_t* w, int64_t K, int64_t n0,
                        uint16_t* y, int64_t ys, float alpha, int accumulate, const uint16_t* wend) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) block<4, NR>(x + m * xs, xs, w, K, n0, y + m * ys, ys, alpha, accumulate, wend);
    switch (M - m) {
        case 1: block<1, NR>(x + m * xs, xs, w, K, n0, y + m * ys, ys, alpha, accumulate, wend); break;
        case 2: block<2, NR>(x + m * xs, xs, w, K, n0, y + m * ys, ys, alpha, accumulate, wend); break;
        case 3: block<3, NR>(x + m * xs, xs, w, K, n0, y + m * ys, ys, alpha, accumulate, wend); break;
        default: break;
    }
}

static void gemv(const uint16_t* x, int64_t M, int64_t xs, const uint16_t* w, int64_t N, int64_t K, uint16_t* y,
                 int64_t ys, float alpha, int accumulate, int nthreads) {
    const int64_t blocks = N / 4;
    const uint16_t* wend = w + N * K;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t b = 0; b < blocks; ++b) rows<4>(x, M, xs, w, K, 4 * b, y, ys, alpha, accumulate, wend);
    const int64_t n0 = 4 * blocks;
    switch (N - n0) {
        case 1: rows<1>(x, M, xs, w, K, n0, y, ys, alpha, accumulate, wend); break;
        case 2: rows<2>(x, M, xs, w, K, n0, y, ys, alpha, accumulate, wend); break;
        case 3: rows<3>(x, M, xs, w, K, n0, y, ys, alpha, accumulate, wend); break;
        default: break;
    }
}

#endif  // PHIMM_GEMV

// x [M, K] bf16 (row stride xs elements), w [N, K] bf16 contiguous, y [M, N] bf16 (row stride ys), M >= 1.
// accumulate: y += alpha x w^T, else y = alpha x w^T. Returns 0, or 1 where this build lacks AVX-512 BF16.
extern "C" int phimm_gemv_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t xs, const uint16_t* w, int64_t N,
                               uint16_t* y, int64_t ys, float alpha, int accumulate, int nthreads) {
#if PHIMM_GEMV
    const int nt = nthreads > 1 && N >= 64 ? nthreads : 1;
    gemv(x, M, xs, w, N, K, y, ys, alpha, accumulate, nt);
    return 0;
#else
    (void)x; (void)M; (void)K; (void)xs; (void)w; (void)N; (void)y; (void)ys; (void)alpha; (void)accumulate;
    (void)nthreads;
    return 1;
#endif
}

// A LoRA delta in one call: h = x a^T rounded to bf16 ([M, R], as the two-step path rounds it), then
// y += alpha * h b^T rounded once. x [M, K] (row stride xs), a [R, K] and b [N, R] contiguous, y [M, N] (row
// stride ys). Returns 0, 1 where this build lacks AVX-512 BF16, 4 where no memory is left for h.
extern "C" int phimm_lora_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t xs, const uint16_t* a, int64_t R,
                               const uint16_t* b, int64_t N, uint16_t* y, int64_t ys, float alpha, int nthreads) {
#if PHIMM_GEMV
    uint16_t stack[4096];
    uint16_t* h = M * R <= 4096 ? stack : (uint16_t*)malloc((size_t)(M * R) * sizeof(uint16_t));
    if (!h) return 4;
    gemv(x, M, xs, a, R, K, h, R, 1.0f, 0, nthreads > 1 && R >= 64 ? nthreads : 1);
    gemv(h, M, R, b, N, R, y, ys, alpha, 1, nthreads > 1 && N >= 64 ? nthreads : 1);
    if (h != stack) free(h);
    return 0;
#else
    (void)x; (void)M; (void)K; (void)xs; (void)a; (void)R; (void)b; (void)N; (void)y; (void)ys; (void)alpha;
    (void)nthreads;
    return 1;
#endif
}
