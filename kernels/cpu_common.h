// What the CPU kernels share: the storage formats, float32 vectors of LANES lanes, and
// converting stored rows to and from float32 (int8 rows exactly as kernels/storage.py
// quantises them). Plain C++ (GCC vector extensions, AVX-512 intrinsics where the CPU
// has them); no PyTorch headers.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

enum Storage : int64_t { INT8 = 0, FLOAT32 = 1, BFLOAT16 = 2 };

struct Bf16 {
    uint16_t bits;
};

inline float to_float(int8_t x) { return static_cast<float>(x); }
inline float to_float(float x) { return x; }
inline float to_float(Bf16 x) {
    uint32_t u = static_cast<uint32_t>(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline void from_float(float f, float* out) { *out = f; }
inline void from_float(float f, Bf16* out) {  // round to nearest even, as torch does
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    out->bits = static_cast<uint16_t>(u >> 16);
}

constexpr int64_t LANES = 16;  // floats per vector: one AVX-512 register, two AVX2 ones
typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));

inline int64_t padded(int64_t n) { return (n + LANES - 1) / LANES * LANES; }
inline vfloat vload(const float* p) {
    vfloat v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
inline float hsum(vfloat v) {
    float s = 0.f;
    for (int64_t k = 0; k < LANES; ++k) s += v[k];
    return s;
}
inline float hmax(vfloat v) {
#if defined(__AVX512F__)
    return _mm512_reduce_max_ps((__m512)v);
#else
    float m = v[0];
    for (int64_t k = 1; k < LANES; ++k) m = std::max(m, v[k]);
    return m;
#endif
}

// LANES stored values as one float32 vector. The widening conversions are spelled out with
// intrinsics where the CPU has them: GCC vectorises them into narrow steps or scalars.
inline vfloat widen(const float* p) { return vload(p); }
inline vfloat widen(const int8_t* p) {
#if defined(__AVX512F__)
    return (vfloat)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    vfloat v;
    for (int64_t k = 0; k < LANES; ++k) v[k] = static_cast<float>(p[k]);
    return v;
#endif
}
inline vfloat widen(const Bf16* p) {
#if defined(__AVX512F__)
    __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return (vfloat)_mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
#else
    vfloat v;
    for (int64_t k = 0; k < LANES; ++k) v[k] = to_float(p[k]);
    return v;
#endif
}

// n stored values times `scale` into float32 `out`, zeros after them up to `width`.
template <typename T>
inline void load(const T* __restrict src, float scale, float* __restrict out, int64_t n, int64_t width) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) vstore(out + i, widen(src + i) * scale);
    for (; i < n; ++i) out[i] = to_float(src[i]) * scale;
    for (; i < width; ++i) out[i] = 0.f;
}

inline float float_at(const int8_t* row, int64_t byte_offset) {
    float f;
    std::memcpy(&f, row + byte_offset, sizeof f);
    return f;
}

// x (n floats) stored as T at dst. int8: absmax / 127 into *scale, and round(x / scale)
// (half to even), with true divisions (compiled without fast maths) so the bytes equal
// storage.quantize's. Whole vectors with AVX-512 (maximum, division and rounding are exact
// lane by lane, so the bytes are the same), one value at a time otherwise.
template <typename T>
__attribute__((optimize("no-fast-math"))) inline void store_row(const float* x, int64_t n, T* dst, float* scale) {
    if constexpr (std::is_same_v<T, int8_t>) {
        int64_t i = 0;
        float absmax = 0.f;
#if defined(__AVX512F__)
        __m512 top = _mm512_setzero_ps();
        for (; i + LANES <= n; i += LANES) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
        absmax = _mm512_reduce_max_ps(top);
#endif
        for (; i < n; ++i) absmax = std::max(absmax, std::fabs(x[i]));
        const float s = absmax / 127.0f, denom = std::max(s, FLT_MIN);
        i = 0;
#if defined(__AVX512F__)
        const __m512 d = _mm512_set1_ps(denom);
        for (; i + LANES <= n; i += LANES) {
            __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), d),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q)));
        }
#endif
        for (; i < n; ++i) dst[i] = static_cast<int8_t>(std::nearbyint(x[i] / denom));
        *scale = s;
    } else {
        for (int64_t i = 0; i < n; ++i) from_float(x[i], dst + i);
    }
}

}  // namespace
