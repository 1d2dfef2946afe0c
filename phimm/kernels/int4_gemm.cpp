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
// From `PHIMM_AMX_MIN_ROWS` input rows on (prefill, wide batches), where the VNNI loop is bound by vpdpbusd, CPUs
// with AMX run the same sums as tile products instead: a group's weights are unpacked once into AMX B tiles (the
// two nibble vectors of a 64-byte line are two B-tile rows as they stand), each 16 input rows are an A tile
// read from the quantized input in place, `tdpbsud` gives the group's 16 x 16 int32 sums, scaled into fp32 as
// above. Same integers, same result as the VNNI loop.
//
// Built on first use by phimm.kernels (g++ -O3 -march=native -fopenmp -shared); `phimm_int4_isa()` says
// whether this build has the instructions (1: AVX-512 VNNI, 2: and AMX; the Python side uses torch's own int4
// kernel on 0).

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define PHIMM_VNNI 1
#include "bf16.h"
#else
#define PHIMM_VNNI 0
#endif

#if PHIMM_VNNI && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define PHIMM_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define PHIMM_AMX 0
#endif

extern "C" int phimm_int4_isa(void) { return PHIMM_VNNI + PHIMM_AMX; }

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
    return phimm_widen_bf16(_mm256_loadu_si256((const __m256i*)p));
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

#if PHIMM_AMX

#ifndef PHIMM_AMX_MIN_ROWS
#define PHIMM_AMX_MIN_ROWS 16
#endif

// Linux hands out the AMX tile state on request, once per process (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
static int amx_permitted(void) {
    static int state = 0;  // 0 not asked, 1 granted, -1 refused (a racing second ask gets the same answer)
    if (state == 0) state = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
    return state == 1;
}

struct alignas(64) TileConfig {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// tiles: 0 the group's int32 sums (16 rows x 16), 1-2 input (16 rows x 64 channels), 3-4 weights (16 x 4 channels
// by 16 output rows)
static void amx_configure(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < 5; ++t) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

// xq, sx, xsum hold M16 rows (a multiple of 16; rows past M are zero). Rows go in chunks of PHIMM_AMX_CHUNK, so
// that a chunk's quantized input (chunk x K bytes) stays in the core's L2 while every block of weights passes by
#ifndef PHIMM_AMX_CHUNK
#define PHIMM_AMX_CHUNK 128
#endif
static void amx_gemm(const int8_t* xq, const float* sx, const float* xsum, int64_t M, int64_t M16, int64_t K,
                     const uint8_t* w, const uint16_t* sc, int64_t N, int64_t G, float* y, int nthreads) {
    const int64_t ng = K / G, kbg = G / 8, tiles = G / 64, nb_count = N / 16;
    const __m512i lo_mask = _mm512_set1_epi8(0x0F);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        amx_configure();
        alignas(64) uint8_t bbuf[2][16 * 64];
        alignas(64) int32_t cbuf[16 * 16];
        float* acc = (float*)aligned_alloc(64, sizeof(float) * PHIMM_AMX_CHUNK * 16);
        for (int64_t c0 = 0; c0 < M16; c0 += PHIMM_AMX_CHUNK) {
            const int64_t c1 = c0 + PHIMM_AMX_CHUNK < M16 ? c0 + PHIMM_AMX_CHUNK : M16;
#pragma omp for schedule(static)
            for (int64_t nb = 0; nb < nb_count; ++nb) {
                const uint8_t* wb = w + nb * (K / 8) * 64;
                const uint16_t* scb = sc + nb * ng * 32;
                memset(acc, 0, sizeof(float) * (size_t)((c1 - c0) * 16));
                for (int64_t g = 0; g < ng; ++g) {
                    for (int64_t t = 0; t < tiles; ++t) {
                        for (int i = 0; i < 8; ++i) {  // line i: channels 8 i .. 8 i + 7 of this tile's 64
                            const __m512i v = _mm512_loadu_si512((const void*)(wb + (g * kbg + t * 8 + i) * 64));
                            _mm512_store_si512((void*)(bbuf[t] + (2 * i) * 64), _mm512_and_si512(v, lo_mask));
                            _mm512_store_si512((void*)(bbuf[t] + (2 * i + 1) * 64),
                                               _mm512_and_si512(_mm512_srli_epi16(v, 4), lo_mask));
                        }
                    }
                    _tile_loadd(3, bbuf[0], 64);
                    if (tiles == 2) _tile_loadd(4, bbuf[1], 64);
                    const __m512 sv = bf16_to_fp32(scb + g * 32), cv = bf16_to_fp32(scb + g * 32 + 16);
                    for (int64_t m0 = c0; m0 < c1; m0 += 16) {
                        _tile_zero(0);
                        _tile_loadd(1, xq + m0 * K + g * G, K);
                        _tile_dpbsud(0, 1, 3);
                        if (tiles == 2) {
                            _tile_loadd(2, xq + m0 * K + g * G + 64, K);
                            _tile_dpbsud(0, 2, 4);
                        }
                        _tile_stored(0, cbuf, 64);
                        for (int r = 0; r < 16; ++r) {
                            const int64_t m = m0 + r;
                            float* a_row = acc + (m - c0) * 16;
                            __m512 a = _mm512_load_ps(a_row);
                            a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const void*)(cbuf + r * 16))),
                                                _mm512_mul_ps(sv, _mm512_set1_ps(sx[m * ng + g])), a);
                            a = _mm512_fmadd_ps(cv, _mm512_set1_ps(xsum[m * ng + g]), a);
                            _mm512_store_ps(a_row, a);
                        }
                    }
                }
                for (int64_t m = c0; m < c1 && m < M; ++m)
                    _mm512_storeu_ps(y + m * N + nb * 16, _mm512_load_ps(acc + (m - c0) * 16));
            }
        }
        free(acc);
        _tile_release();
    }
}

#endif

#ifndef PHIMM_MT
#define PHIMM_MT 12  // input rows per pass over a block: 2 x MT accumulators stay in registers
#endif
#define PHIMM_ROWS(R) case R: block_rows<R>(wb, scb, xq, sx, xsum, m0, K, G, y, N, nb * 16); break;

extern "C" int phimm_int4_gemm(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* sc,
                               int64_t N, int64_t G, float* y, int nthreads) {
    if (M <= 0 || N % 16 || G % 16 || K % G) return 1;
    const int64_t ng = K / G, nb_count = N / 16;
#if PHIMM_AMX
    const bool amx = M >= PHIMM_AMX_MIN_ROWS && (G == 64 || G == 128) && amx_permitted();
#else
    const bool amx = false;
#endif
    const int64_t rows = amx ? (M + 15) / 16 * 16 : M;  // AMX reads whole tiles of 16 rows: the rest are zero
    int8_t* xq = (int8_t*)calloc((size_t)(rows * K), 1);
    float* sx = (float*)calloc((size_t)(rows * ng), sizeof(float));
    float* xsum = (float*)calloc((size_t)(rows * ng), sizeof(float));
    if (!xq || !sx || !xsum) {
        free(xq); free(sx); free(xsum);
        return 2;
    }
    quantize_rows(x, M, K, G, xq, sx, xsum);
#if PHIMM_AMX
    if (amx) {
        amx_gemm(xq, sx, xsum, M, rows, K, w, sc, N, G, y, nthreads);
        free(xq); free(sx); free(xsum);
        return 0;
    }
#endif
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
