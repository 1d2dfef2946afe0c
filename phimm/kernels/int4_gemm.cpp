// Group-wise int4 weight x dynamically quantized int8 activation matmul for x86 CPUs with AVX-512 VNNI.
//
// y[M, N] = x[M, K] W^T, W ~= s * q + c per group of G input channels (q in 0..15; s and c per group and output
// channel). Each input row is quantized per group to int8 (absmax / 127); a group's dot product is an exact
// int32 sum of u8 (weight) x s8 (activation) products (vpdpbusd), scaled into an fp32 accumulator:
//   y[m, n] = sum_g  s[n, g] * sx[m, g] * sum_k q[n, k] xq[m, k]  +  c[n, g] * sum_k x[m, k]
// (the second term with the float row sums, so the zero points see the unquantized input).
//
// Weight layout (see phimm/kernels/__init__.py `pack_int4`): blocks of 16 output rows; within a block, 64 bytes
// per 8 input channels, byte 4 r + j holding q[r, k + j] in its low and q[r, k + 4 + j] in its high nibble, so
// one 64-byte load unpacks (and, shift) into two vectors of 16 x 4 u8 whose 32-bit lanes are the block's 16
// rows. Scales and offsets: bf16 [N / 16, K / G, 2, 16] (s then c of the block's 16 rows, one 64-byte line per
// group), widened to fp32 in registers. The weights are read once, front to back; blocks of
// rows are shared out over threads.
//
// Built on first use by phimm.kernels (g++ -O3 -march=native -fopenmp -shared); `phimm_int4_isa()` says
// whether this build has the instructions (the Python side uses torch's own int4 kernel otherwise).

#include <stdint.h>
#include <stdlib.h>
#include <math.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define PHIMM_VNNI 1
#include <immintrin.h>
#else
#define PHIMM_VNNI 0
#endif

extern "C" int phimm_int4_isa(void) { return PHIMM_VNNI; }

#if PHIMM_VNNI

// per row and group of x: scale (absmax / 127), the int8 values, and the float sum
static void quantize_rows(const float* x, int64_t M, int64_t K, int64_t G, int8_t* xq, float* sx, float* xsum) {
    const int64_t ng = K / G;
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t g = 0; g < ng; ++g) {
            const float* src = x + m * K + g * G;
            int8_t* dst = xq + m * K + g * G;
            __m512 vmax = _mm512_setzero_ps(), vsum = _mm512_setzero_ps();
            for (int64_t k = 0; k < G; k += 16) {
                __m512 v = _mm512_loadu_ps(src + k);
                vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
                vsum = _mm512_add_ps(vsum, v);
            }
            const float amax = _mm512_reduce_max_ps(vmax);
            const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
            const __m512 inv = _mm512_set1_ps(1.0f / scale);
            for (int64_t k = 0; k < G; k += 16) {
                __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + k), inv));  // round to nearest
                q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
                _mm_storeu_si128((__m128i*)(dst + k), _mm512_cvtepi32_epi8(q));
            }
            sx[m * ng + g] = scale;
            xsum[m * ng + g] = _mm512_reduce_add_ps(vsum);
        }
    }
}

#ifndef PHIMM_PREFETCH
#define PHIMM_PREFETCH 4096
#endif

static inline __m512 bf16_to_fp32(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// one block of 16 output rows for MT input rows (m0 .. m0 + MT)
template <int MT>
static inline void block_rows(const uint8_t* wb, const uint16_t* scb, const int8_t* xq,
                              const float* sx, const float* xsum, int64_t m0, int64_t K, int64_t G, float* y,
                              int64_t N, int64_t n0) {
    const int64_t ng = K / G, kbg = G / 8;
    const __m512i lo_mask = _mm512_set1_epi8(0x0F);
    __m512 accf[MT];
    for (int i = 0; i < MT; ++i) accf[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        // one or two rows: two chains (low and high nibbles) per row hide vpdpbusd's latency; more rows are
        // independent chains already, and the registers go to more rows per pass
        constexpr bool split = MT <= 2;
        __m512i acci[MT], accj[split ? MT : 1];
        for (int i = 0; i < MT; ++i) acci[i] = _mm512_setzero_si512();
        for (int i = 0; i < (split ? MT : 1); ++i) accj[i] = _mm512_setzero_si512();
        const uint8_t* wg = wb + g * kbg * 64;
        const int8_t* xg = xq + g * G;
        for (int64_t kb = 0; kb < kbg; ++kb) {
            _mm_prefetch((const char*)(wg + kb * 64) + PHIMM_PREFETCH, _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512((const void*)(wg + kb * 64));
            const __m512i lo = _mm512_and_si512(v, lo_mask);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo_mask);
            for (int i = 0; i < MT; ++i) {
                const int32_t* xp = (const int32_t*)(xg + (m0 + i) * K + kb * 8);
                acci[i] = _mm512_dpbusd_epi32(acci[i], lo, _mm512_set1_epi32(xp[0]));
                if (split)
                    accj[i] = _mm512_dpbusd_epi32(accj[i], hi, _mm512_set1_epi32(xp[1]));
                else
                    acci[i] = _mm512_dpbusd_epi32(acci[i], hi, _mm512_set1_epi32(xp[1]));
            }
        }
        const __m512 sv = bf16_to_fp32(scb + g * 32), cv = bf16_to_fp32(scb + g * 32 + 16);
        for (int i = 0; i < MT; ++i) {
            const int64_t m = m0 + i;
            const __m512i acc = split ? _mm512_add_epi32(acci[i], accj[split ? i : 0]) : acci[i];
            accf[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(sv, _mm512_set1_ps(sx[m * ng + g])),
                                      accf[i]);
            accf[i] = _mm512_fmadd_ps(cv, _mm512_set1_ps(xsum[m * ng + g]), accf[i]);
        }
    }
    for (int i = 0; i < MT; ++i) _mm512_storeu_ps(y + (m0 + i) * N + n0, accf[i]);
}

#ifndef PHIMM_MT
#define PHIMM_MT 12  // input rows per pass over a block: 2 x MT accumulators stay in registers
#endif
#define PHIMM_ROWS(R) case R: block_rows<R>(wb, scb, xq, sx, xsum, m0, K, G, y, N, nb * 16); break;

extern "C" int phimm_int4_gemm(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* sc,
                               int64_t N, int64_t G, float* y, int nthreads) {
    if (M <= 0 || N % 16 || G % 16 || K % G) return 1;
    const int64_t ng = K / G, nb_count = N / 16;
    int8_t* xq = (int8_t*)malloc((size_t)(M * K));
    float* sx = (float*)malloc(sizeof(float) * (size_t)(M * ng));
    float* xsum = (float*)malloc(sizeof(float) * (size_t)(M * ng));
    if (!xq || !sx || !xsum) {
        free(xq); free(sx); free(xsum);
        return 2;
    }
    quantize_rows(x, M, K, G, xq, sx, xsum);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t nb = 0; nb < nb_count; ++nb) {
        const uint8_t* wb = w + nb * (K / 8) * 64;
        const uint16_t* scb = sc + nb * ng * 32;
        int64_t m0 = 0;
        for (; m0 + PHIMM_MT <= M; m0 += PHIMM_MT)
            block_rows<PHIMM_MT>(wb, scb, xq, sx, xsum, m0, K, G, y, N, nb * 16);
        switch (M - m0) {  // the rest, fewer than PHIMM_MT rows
            PHIMM_ROWS(1) PHIMM_ROWS(2) PHIMM_ROWS(3) PHIMM_ROWS(4) PHIMM_ROWS(5) PHIMM_ROWS(6)
            PHIMM_ROWS(7) PHIMM_ROWS(8) PHIMM_ROWS(9) PHIMM_ROWS(10) PHIMM_ROWS(11)
            default: break;
        }
    }
    free(xq); free(sx); free(xsum);
    return 0;
}

#else

extern "C" int phimm_int4_gemm(const float*, int64_t, int64_t, const uint8_t*, const uint16_t*, int64_t, int64_t,
                               float*, int) {
    return 3;  // built without AVX-512 VNNI: the caller uses another kernel
}

#endif
