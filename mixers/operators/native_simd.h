// Vector helpers shared by seqmix's native kernels (recurrence_native.cpp, tcn_native.cpp): a
// 64-byte vector type per dtype from the compiler's vector extensions, loads and stores of a
// partial tail vector, and an exponential and SiLU that agree with torch's.
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace seqmix_simd {

template <typename T> struct Vec;
template <> struct Vec<float> { typedef float type __attribute__((vector_size(64))); typedef int32_t bits __attribute__((vector_size(64))); };
template <> struct Vec<double> { typedef double type __attribute__((vector_size(64))); typedef int64_t bits __attribute__((vector_size(64))); };

template <typename T> constexpr int lanes() { return 64 / sizeof(T); }

// A whole vector at p, and its store: a constant size, so a single vector move.
template <typename T> inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T> inline void store(T* p, typename Vec<T>::type v) { std::memcpy(p, &v, sizeof v); }

// A vector from `width` values at p (the rest zero), and its store back: the tail block of a D
// that is not a multiple of W reads and writes only its own channels. Every other block is whole,
// and takes the vector move: a copy of a size known only at run time is a call to memcpy for every
// row, which made the EMA's and CEMA's kernels 3-10% slower (D = 256).
template <typename T> inline typename Vec<T>::type load(const T* p, int64_t width) {
  if (__builtin_expect(width == lanes<T>(), 1)) return load<T>(p);
  typename Vec<T>::type v = {};
  std::memcpy(&v, p, sizeof(T) * width);
  return v;
}
template <typename T> inline void store(T* p, typename Vec<T>::type v, int64_t width) {
  if (__builtin_expect(width == lanes<T>(), 1)) {
    store<T>(p, v);
    return;
  }
  std::memcpy(p, &v, sizeof(T) * width);
}

// Outputs of at least this many bytes (a core's L2 cache, about) are written around the caches
// (streaming stores): larger than the cache, they would be evicted unread, and a store that misses
// first reads the line it writes. On the EMA's forward (D = 256, one thread) the kernel took a
// quarter less time at L = 2048 and 16384, and the same at L = 1024.
constexpr int64_t STREAM_BYTES = int64_t(2) << 20;

// Whether a (B, L, D) output of T goes around the caches.
template <typename T> inline bool streams(int64_t batch, int64_t length, int64_t width) {
  return batch * length * width * int64_t(sizeof(T)) >= STREAM_BYTES;
}

// v into the 64 bytes at p, around the caches where the CPU has streaming stores and p is 64-byte
// aligned, else a plain store. Followed by stream_fence before another thread reads p.
template <typename T> inline void store_stream(T* p, typename Vec<T>::type v) {
  if (reinterpret_cast<uintptr_t>(p) % 64 != 0) {
    store<T>(p, v);
    return;
  }
#if defined(__AVX512F__)
  __m512i bits;
  std::memcpy(&bits, &v, 64);
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), bits);
#elif defined(__AVX__)
  __m256i halves[2];
  std::memcpy(halves, &v, 64);
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), halves[0]);
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p) + 1, halves[1]);
#elif defined(__SSE2__)
  __m128i quarters[4];
  std::memcpy(quarters, &v, 64);
  for (int i = 0; i < 4; ++i) _mm_stream_si128(reinterpret_cast<__m128i*>(p) + i, quarters[i]);
#else
  store<T>(p, v);
#endif
}

// Orders this thread's streaming stores before what follows (they are weakly ordered).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// v into the first `width` values at p: streamed when `stream` and the vector is whole.
template <typename T> inline void store_out(T* p, typename Vec<T>::type v, int64_t width, bool stream) {
  if (stream && width == lanes<T>()) {
    store_stream<T>(p, v);
  } else {
    store<T>(p, v, width);
  }
}

// Where e^v leaves the normal numbers (2^-126, 2^-1022), and where torch's SiLU, y / (1 + e^-y),
// overflows its e^-y and returns -0: below log of the largest finite number.
template <typename T> constexpr T normal_floor() { return sizeof(T) == 4 ? T(-87.0) : T(-708.0); }
template <typename T> constexpr T silu_floor() { return sizeof(T) == 4 ? T(-88.72283935546875) : T(-709.782712893384); }

// k = v log2(e) rounded to an integer by the caller, and e^(v - k ln2) with |v - k ln2| <= ln2 / 2:
// ln2 in two parts (k ln2_hi is exact), then its Taylor polynomial (degree 7 in float32, 13 in
// float64, each truncation error below its rounding). e^v is that times 2^k.
template <typename T> constexpr T log2e() { return T(1.4426950408889634); }
template <typename T> inline typename Vec<T>::type exp_reduced(typename Vec<T>::type v, typename Vec<T>::type k) {
  typedef typename Vec<T>::type V;
  const T ln2_hi = T(0.693145751953125), ln2_lo = T(1.428606820309417e-06);
  const V r = (v - k * ln2_hi) - k * ln2_lo;
  V p;
  if (sizeof(T) == 4) {
    p = T(1.0 / 5040) * r + T(1.0 / 720);
    p = p * r + T(1.0 / 120);
    p = p * r + T(1.0 / 24);
    p = p * r + T(1.0 / 6);
    p = p * r + T(0.5);
    p = p * r + T(1.0);
    p = p * r + T(1.0);
  } else {
    const T coefficients[] = {1.0 / 6227020800, 1.0 / 479001600, 1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880,
                              1.0 / 40320, 1.0 / 5040, 1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0};
    p = V{} + coefficients[0];
    for (int i = 1; i < 14; ++i) p = p * r + coefficients[i];
  }
  return p;
}

// exp(v) for normal_floor <= v <= 0, lower v clamped: exp_reduced times 2^k built from its bits.
// The SiLU built on it agrees with torch's to 4e-7 relative in float32 and 1e-14 in float64
// (tests/test_native.py).
template <typename T> inline typename Vec<T>::type exp_normal(typename Vec<T>::type v) {
  typedef typename Vec<T>::type V;
  typedef typename Vec<T>::bits I;
  v = v < normal_floor<T>() ? V{} + normal_floor<T>() : v;
  V k = v * log2e<T>();
  // Round to nearest by adding and removing 1.5 * 2^mantissa bits.
  const T shifter = sizeof(T) == 4 ? T(12582912.0) : T(6755399441055744.0);
  k = (k + shifter) - shifter;
  const V p = exp_reduced<T>(v, k);
  const int mantissa = sizeof(T) == 4 ? 23 : 52;
  const int bias = sizeof(T) == 4 ? 127 : 1023;
  I scale = (__builtin_convertvector(k, I) + bias) << mantissa;
  V two_k;
  std::memcpy(&two_k, &scale, sizeof two_k);
  return p * two_k;
}

// exp(v) for v <= 0, subnormal results included down to silu_floor: below normal_floor, e^(v + 64 ln2)
// scaled by 2^-64, whose product rounds into the subnormals as it should. With AVX-512 the same
// polynomial on the same reduced argument, its 2^k applied by one scaling instruction that rounds
// into the subnormals itself: a quarter fewer instructions per SiLU.
template <typename T> inline typename Vec<T>::type exp_nonpositive(typename Vec<T>::type v) {
  typedef typename Vec<T>::type V;
#if defined(__AVX512F__)
  // Below these e^v rounds to zero (under half the smallest subnormal).
  const T floor = sizeof(T) == 4 ? T(-104.0) : T(-746.0);
  // NaN compares false and stays NaN.
  v = v < floor ? V{} + floor : v;
  V k = v * log2e<T>();
  if (sizeof(T) == 4) {
    __m512 rounded;
    std::memcpy(&rounded, &k, 64);
    rounded = _mm512_roundscale_ps(rounded, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    std::memcpy(&k, &rounded, 64);
  } else {
    __m512d rounded;
    std::memcpy(&rounded, &k, 64);
    rounded = _mm512_roundscale_pd(rounded, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    std::memcpy(&k, &rounded, 64);
  }
  const V p = exp_reduced<T>(v, k);
  V e;
  if (sizeof(T) == 4) {
    __m512 a, b;
    std::memcpy(&a, &p, 64);
    std::memcpy(&b, &k, 64);
    a = _mm512_scalef_ps(a, b);
    std::memcpy(&e, &a, 64);
  } else {
    __m512d a, b;
    std::memcpy(&a, &p, 64);
    std::memcpy(&b, &k, 64);
    a = _mm512_scalef_pd(a, b);
    std::memcpy(&e, &a, 64);
  }
  return e;
#else
  const T shift = T(44.3614195558365);  // 64 ln 2
  const auto low = v < normal_floor<T>();
  const V e = exp_normal<T>(low ? v + shift : v);
  return low ? e * T(5.421010862427522e-20) : e;  // 2^-64
#endif
}

// SiLU(y) = y / (1 + e^-y), through e = e^-|y| so that the exponential never overflows:
// y >= 0: y / (1 + e), y < 0: y e / (1 + e). As torch's SiLU: NaN stays NaN, +inf gives +inf,
// and y below silu_floor gives y * 0: -0, or NaN for -inf. With `slope`, SiLU'(y) there too, from
// the same e: s (1 + y (1 - s)) with s = sigmoid(y) = 1 / (1 + e^-y), as torch's SiLU backward.
template <typename T> inline typename Vec<T>::type silu(typename Vec<T>::type y, typename Vec<T>::type* slope = nullptr) {
  typedef typename Vec<T>::type V;
  const V magnitude = y < T(0) ? -y : y;
  const V e = exp_nonpositive<T>(-magnitude);
  if (slope) {
    const V sigmoid = (y < T(0) ? e : V{} + T(1)) / (T(1) + e);
    // Below silu_floor torch's sigmoid is exactly 0 (its e^-y overflows): its slope 0 (1 + y) is
    // -0, or NaN at -inf, where this sigmoid would still give a tiny number.
    *slope = y < silu_floor<T>() ? T(0) * (T(1) + y) : sigmoid * (T(1) + y * (T(1) - sigmoid));
  }
  const V numerator = y < T(0) ? y * e : y;
  V out = numerator / (T(1) + e);
  out = y < silu_floor<T>() ? y * T(0) : out;
  return y != y ? y : out;
}

// SiLU'(y), as silu gives it.
template <typename T> inline typename Vec<T>::type silu_derivative(typename Vec<T>::type y) {
  typename Vec<T>::type slope;
  silu<T>(y, &slope);
  return slope;
}

}  // namespace seqmix_simd
