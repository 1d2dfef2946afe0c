// AVX-512 helpers shared by phimm's kernels (included inside each kernel's AVX-512 section).
#pragma once
#include <immintrin.h>

// 16 bf16 values (their bits) widened to fp32
static inline __m512 phimm_widen_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// fp32 -> bf16 bits in the low 16 bits of each lane: round to nearest even, NaN kept a (quiet) NaN
static inline __m512i phimm_round_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// the 16 lanes of fp32 rounded to bf16, packed into 16 bf16 values
static inline __m256i phimm_to_bf16(__m512 v) { return _mm512_cvtepi32_epi16(phimm_round_bf16(v)); }

// the sums of a, b, c, d (16 lanes each), in lanes 0..3
static inline __m128 phimm_reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    __m512 z = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
    z = _mm512_add_ps(z, _mm512_permute_ps(z, 0xB1));
    z = _mm512_add_ps(z, _mm512_permute_ps(z, 0x4E));
    // lanes 0, 4, 8, 12 hold the four sums
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0,
                                                                          0, 0, 0, 0), z));
}
