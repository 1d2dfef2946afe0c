// Decode attention for x86 CPUs with AVX-512: one query position per row against a long KV cache, grouped-query
// attention, keys and values read once, in place.
//
// out[b, h, :] = softmax(scale * q[b, h] . K[b, h / G, s_b:T]) V[b, h / G, s_b:T]   (G = H / Hkv)
//
// Row b sees the cache columns s_b .. T-1 (the right-aligned rows of a decode step over the batch cache; s_b = 0
// for a lone row); a row that sees nothing gets zeros. Work items are (row, KV head) pairs, shared out over
// threads. For each, the G query heads that read the KV head go through it together, at most 4 at a time:
//   1. scores: each key is loaded once (bf16 widened to fp32, or fp32) and dotted with the heads' queries, held
//      in fp32 in L1; fp32 sums, times `scale`;
//   2. softmax in fp32 over the scores (max, exp, sum), the probabilities stored in place;
//   3. values: 64 output channels at a time, each value row loaded once per chunk and accumulated into the
//      heads' fp32 registers with its probability; the sums times 1 / total, rounded to the output dtype
//      (round to nearest even for bf16).
// Keys and values stream from memory once per work item (the second and later 64-channel chunks of a value row
// come from L2). fp32 throughout, as PyTorch's CPU flash kernel computes bf16 attention.
//
// Built on first use by phimm.kernels (g++ -O3 -march=native -fopenmp -shared); `phimm_attn_isa()` is 1 where
// this build has AVX-512 (F and BW), else 0 and the Python side keeps PyTorch's kernel.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define PHIMM_AVX512 1
#include "bf16.h"
#else
#define PHIMM_AVX512 0
#endif

extern "C" int phimm_attn_isa(void) { return PHIMM_AVX512; }

#if PHIMM_AVX512

// software prefetch distance, in keys / value rows ahead (0: none)
#ifndef PHIMM_PF
#define PHIMM_PF 8
#endif

#ifndef PHIMM_PFV
#define PHIMM_PFV 8
#endif

#if defined(__AVX512BF16__)
#define PHIMM_DPBF16 1
#else
#define PHIMM_DPBF16 0
#endif

// DT, the element type: 0 fp32; 1 bf16 (widened to fp32 for every product); 2 bf16 with the query-key products
// through vdpbf16ps (pairs of bf16 products, exact in fp32, summed in fp32; needs AVX512_BF16 and D % 32 == 0)
constexpr int64_t elem(int DT) { return DT ? 2 : 4; }

// 16 values as fp32
template <int DT>
static inline __m512 load16(const void* p) {
    if (DT) return phimm_widen_bf16(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_loadu_ps((const float*)p);
}

template <int DT>
static inline void store16(void* p, __m512 v) {
    if (DT)
        _mm256_storeu_si256((__m256i*)p, phimm_to_bf16(v));
    else
        _mm512_storeu_ps((float*)p, v);
}

// e^x for x <= 0 (scores minus their maximum), to about 1 ulp: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7
// polynomial, 2^n by the exponent bits; below -87.3 the result is 0
static inline __m512 exp_neg(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.33654f);
    __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
    return _mm512_mask_mov_ps(y, under, _mm512_setzero_ps());
}

// acc[g][j] (16-lane partial sums) of q_g . k_j for the 4 keys k_j = k + j * kst_bytes; q: [GQ][D], as `heads`
// holds it (bf16 for DT 2, else fp32)
template <int DT, int GQ>
static inline void dot4(const void* qraw, const char* k, int64_t kst_bytes, int64_t D, __m512 acc[GQ][4]) {
    for (int g = 0; g < GQ; ++g)
        for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_setzero_ps();
#if PHIMM_DPBF16
    if (DT == 2) {
        const uint16_t* q = (const uint16_t*)qraw;
        for (int64_t d = 0; d < D; d += 32) {
            __m512bh x[4];
            for (int j = 0; j < 4; ++j) x[j] = (__m512bh)_mm512_loadu_si512(k + j * kst_bytes + d * 2);
            for (int g = 0; g < GQ; ++g) {
                __m512bh qv = (__m512bh)_mm512_loadu_si512(q + g * D + d);
                for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_dpbf16_ps(acc[g][j], qv, x[j]);
            }
        }
        return;
    }
#endif
    const float* q = (const float*)qraw;
    for (int64_t d = 0; d < D; d += 16) {
        __m512 x[4];
        for (int j = 0; j < 4; ++j) x[j] = load16<DT>(k + j * kst_bytes + d * elem(DT));
        for (int g = 0; g < GQ; ++g) {
            __m512 qv = _mm512_loadu_ps(q + g * D + d);
            for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_fmadd_ps(qv, x[j], acc[g][j]);
        }
    }
}

// s[g][t] = scale * q_g . k_t, t < L: four keys at a time, the last group the last four keys (overlapping the
// group before); fewer than four keys one at a time (each read as a group of four copies of itself)
template <int DT, int GQ>
static void scores(const void* q, const char* k, int64_t kst_bytes, int64_t L, int64_t D, float scale, float* s,
                   int64_t ls, const char* v, int64_t vst_bytes, int64_t Dv) {
    __m512 acc[GQ][4];
    float tmp[4];
    if (L < 4) {
        for (int64_t t = 0; t < L; ++t) {
            dot4<DT, GQ>(q, k + t * kst_bytes, 0, D, acc);
            for (int g = 0; g < GQ; ++g) {
                _mm_storeu_ps(tmp, phimm_reduce4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]));
                s[g * ls + t] = tmp[0] * scale;
            }
        }
        return;
    }
    for (int64_t t = 0; t < L; t += 4) {
        const int64_t t0 = t + 4 > L ? L - 4 : t;
        const char* k0 = k + t0 * kst_bytes;
        if (PHIMM_PF && t0 + PHIMM_PF + 4 <= L)
            for (int j = 0; j < 4; ++j)
                for (int64_t d = 0; d < D * elem(DT); d += 64)
                    _mm_prefetch(k0 + (PHIMM_PF + j) * kst_bytes + d, _MM_HINT_T0);
        if (PHIMM_PFV && t0 + PHIMM_PFV + 4 <= L)  // the values' rows too, for the pass after this one
            for (int j = 0; j < 4; ++j)
                for (int64_t d = 0; d < Dv * elem(DT); d += 64)
                    _mm_prefetch(v + (t0 + PHIMM_PFV + j) * vst_bytes + d, _MM_HINT_T1);
        dot4<DT, GQ>(q, k0, kst_bytes, D, acc);
        for (int g = 0; g < GQ; ++g) {
            _mm_storeu_ps(tmp, phimm_reduce4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]));
            for (int j = 0; j < 4; ++j) s[g * ls + t0 + j] = tmp[j] * scale;
        }
    }
}

// p = exp(s - max) in place; returns 1 / sum (0 where every score is -inf)
static float softmax_row(float* s, int64_t L) {
    __m512 vm = _mm512_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 16 <= L; t += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(s + t));
    float m = _mm512_reduce_max_ps(vm);
    for (; t < L; ++t) m = s[t] > m ? s[t] : m;
    if (m == -INFINITY) return 0.0f;
    __m512 vmax = _mm512_set1_ps(m), vs = _mm512_setzero_ps();
    for (t = 0; t + 16 <= L; t += 16) {
        __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(s + t), vmax));
        _mm512_storeu_ps(s + t, e);
        vs = _mm512_add_ps(vs, e);
    }
    if (t < L) {
        __mmask16 rest = (__mmask16)((1u << (L - t)) - 1);
        __m512 e = _mm512_maskz_mov_ps(rest, exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(rest, s + t), vmax)));
        _mm512_mask_storeu_ps(s + t, rest, e);
        vs = _mm512_add_ps(vs, e);
    }
    return 1.0f / _mm512_reduce_add_ps(vs);
}

// out_g[c .. c + 16 NV) = inv_g * sum_t p[g][t] v_t[c ..]
template <int DT, int GQ, int NV>
static void values(const float* p, int64_t ls, const char* v, int64_t vst_bytes, int64_t L, int64_t c,
                   const float* inv, char* out, int64_t ost_bytes) {
    __m512 acc[GQ][NV];
    for (int g = 0; g < GQ; ++g)
        for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_setzero_ps();
    const char* base = v + c * elem(DT);
    for (int64_t t = 0; t < L; ++t) {
        const char* row = base + t * vst_bytes;
        if (PHIMM_PF)
            for (int j = 0; j < NV * 16 * elem(DT); j += 64) _mm_prefetch(row + PHIMM_PF * vst_bytes + j, _MM_HINT_T0);
        __m512 x[NV];
        for (int j = 0; j < NV; ++j) x[j] = load16<DT>(row + 16 * j * elem(DT));
        for (int g = 0; g < GQ; ++g) {
            __m512 pg = _mm512_set1_ps(p[g * ls + t]);
            for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_fmadd_ps(pg, x[j], acc[g][j]);
        }
    }
    for (int g = 0; g < GQ; ++g) {
        __m512 w = _mm512_set1_ps(inv[g]);
        for (int j = 0; j < NV; ++j)
            store16<DT>(out + g * ost_bytes + (c + 16 * j) * elem(DT), _mm512_mul_ps(acc[g][j], w));
    }
}

// GQ query heads (rows qrows + g * qsh_bytes) over one KV head's L keys and values; work: GQ * (D + L) floats
template <int DT, int GQ>
static void heads(const char* qrows, int64_t qsh_bytes, const char* k, int64_t kst_bytes, const char* v,
                  int64_t vst_bytes, int64_t L, int64_t D, int64_t Dv, float scale, char* out, int64_t ost_bytes,
                  float* work) {
    float* s = work + GQ * D;  // [GQ][L]
    if (L == 0) {  // nothing visible: zeros
        for (int g = 0; g < GQ; ++g)
            for (int64_t c = 0; c < Dv; c += 16) store16<DT>(out + g * ost_bytes + c * elem(DT), _mm512_setzero_ps());
        return;
    }
    if (DT == 2) {  // the queries as they are, bf16
        for (int g = 0; g < GQ; ++g) memcpy((uint16_t*)work + g * D, qrows + g * qsh_bytes, D * 2);
    } else {
        for (int g = 0; g < GQ; ++g)
            for (int64_t d = 0; d < D; d += 16)
                _mm512_storeu_ps(work + g * D + d, load16<DT>(qrows + g * qsh_bytes + d * elem(DT)));
    }
    scores<DT, GQ>(work, k, kst_bytes, L, D, scale, s, L, v, vst_bytes, Dv);
    float inv[GQ];
    for (int g = 0; g < GQ; ++g) inv[g] = softmax_row(s + g * L, L);
    int64_t c = 0;
    for (; c + 64 <= Dv; c += 64) values<DT, GQ, 4>(s, L, v, vst_bytes, L, c, inv, out, ost_bytes);
    for (; c < Dv; c += 16) values<DT, GQ, 1>(s, L, v, vst_bytes, L, c, inv, out, ost_bytes);
}

template <int DT>
static void heads_any(int gq, const char* qrows, int64_t qsh_bytes, const char* k, int64_t kst_bytes, const char* v,
                      int64_t vst_bytes, int64_t L, int64_t D, int64_t Dv, float scale, char* out,
                      int64_t ost_bytes, float* work) {
    switch (gq) {
        case 1: heads<DT, 1>(qrows, qsh_bytes, k, kst_bytes, v, vst_bytes, L, D, Dv, scale, out, ost_bytes, work); break;
        case 2: heads<DT, 2>(qrows, qsh_bytes, k, kst_bytes, v, vst_bytes, L, D, Dv, scale, out, ost_bytes, work); break;
        case 3: heads<DT, 3>(qrows, qsh_bytes, k, kst_bytes, v, vst_bytes, L, D, Dv, scale, out, ost_bytes, work); break;
        default: heads<DT, 4>(qrows, qsh_bytes, k, kst_bytes, v, vst_bytes, L, D, Dv, scale, out, ost_bytes, work); break;
    }
}

#endif  // PHIMM_AVX512

// q [B, H, D] (strides in elements: qsb, qsh; unit stride along D); k, v [B, Hkv, T, D | Dv] (strides ksb, ksh,
// kst and vsb, vsh, vst; unit stride along the last axis); start [B] (first visible column per row; NULL: 0);
// out [B, H, Dv] contiguous. dtype: 0 fp32, 1 bf16 (q, k, v and out alike). Returns 0, or a code for arguments
// this build does not take (1: no AVX-512, 2: D or Dv not a multiple of 16, 3: H not a multiple of Hkv,
// 4: no memory).
extern "C" int phimm_decode_attention(const void* q, int64_t B, int64_t H, int64_t D, int64_t qsb, int64_t qsh,
                                      const void* k, const void* v, int64_t Hkv, int64_t T, int64_t Dv,
                                      int64_t ksb, int64_t ksh, int64_t kst, int64_t vsb, int64_t vsh, int64_t vst,
                                      const int64_t* start, float scale, void* out, int dtype, int nthreads) {
#if PHIMM_AVX512
    if (D % 16 || Dv % 16 || D <= 0 || Dv <= 0) return 2;
    if (Hkv <= 0 || H % Hkv) return 3;
    const int64_t G = H / Hkv;
    const int64_t esz = dtype ? 2 : 4;
    const int dt = dtype ? (PHIMM_DPBF16 && D % 32 == 0 ? 2 : 1) : 0;
    const int64_t items = B * Hkv;
    // per thread: 4 query rows and 4 score rows of T
    const size_t per_thread = (size_t)(4 * D + 4 * (T + 16)) * sizeof(float);
    int nt = nthreads > 1 ? (int)(items < nthreads ? items : nthreads) : 1;
    float* work = (float*)aligned_alloc(64, ((per_thread + 63) / 64) * 64 * nt);
    if (!work) return 4;
    const size_t stride_f = ((per_thread + 63) / 64) * 64 / sizeof(float);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t it = 0; it < items; ++it) {
#ifdef _OPENMP
        float* w = work + stride_f * (size_t)omp_get_thread_num();
#else
        float* w = work;
#endif
        const int64_t b = it / Hkv, kh = it % Hkv;
        int64_t s0 = start ? start[b] : 0;
        if (s0 < 0) s0 = 0;
        if (s0 > T) s0 = T;
        const int64_t L = T - s0;
        const char* kp = (const char*)k + (b * ksb + kh * ksh + s0 * kst) * esz;
        const char* vp = (const char*)v + (b * vsb + kh * vsh + s0 * vst) * esz;
        for (int64_t g0 = 0; g0 < G; g0 += 4) {
            const int gq = (int)(G - g0 < 4 ? G - g0 : 4);
            const int64_t h = kh * G + g0;
            const char* qp = (const char*)q + (b * qsb + h * qsh) * esz;
            char* op = (char*)out + ((b * H + h) * Dv) * esz;
            if (dt == 2)
                heads_any<2>(gq, qp, qsh * esz, kp, kst * esz, vp, vst * esz, L, D, Dv, scale, op, Dv * esz, w);
            else if (dt == 1)
                heads_any<1>(gq, qp, qsh * esz, kp, kst * esz, vp, vst * esz, L, D, Dv, scale, op, Dv * esz, w);
            else
                heads_any<0>(gq, qp, qsh * esz, kp, kst * esz, vp, vst * esz, L, D, Dv, scale, op, Dv * esz, w);
        }
    }
    free(work);
    return 0;
#else
    (void)q; (void)B; (void)H; (void)D; (void)qsb; (void)qsh; (void)k; (void)v; (void)Hkv; (void)T; (void)Dv;
    (void)ksb; (void)ksh; (void)kst; (void)vsb; (void)vsh; (void)vst; (void)start; (void)scale; (void)out;
    (void)dtype; (void)nthreads;
    return 1;
#endif
}
