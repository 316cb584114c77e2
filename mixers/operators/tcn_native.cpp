// The TCN's layers (tcn.py) as native code: the ``native`` path, one call per layer.
//
// Per batch row b, step t and channel d, with taps k < K, dilation f and off_k = (K-1-k) f:
//     z_t = bias + sum_k w[k] src_{t - off_k},    src_s = h_s for s >= 0, prev_{window + s} before
//     next_t = (residual ? h_t : 0) + act(z_t)    act: none, SiLU or GELU; none on the last layer
// A layer writes next_t, zeroed where the row is padded (the next layer's input is masked), or,
// the last layer, the mixer's output SiLU(next_t + omega x_t).
//
// Rows are independent, so the threads split the B·T rows into contiguous ranges, and a row is
// one pass over its D channels in 64-byte vectors. The taps read rows at most a window back,
// which a thread has just read and are still in cache: each layer reads its input and writes its
// output once, with the activation, the residual sum and the mask in the same pass.
//
// The backward of a layer is one pass too. With g the gradient of the layer's output:
//     dz_t = g_t act'(z_t)   (z recomputed from the input), or on the last layer
//     dz_t = g_t SiLU'(next_t + omega x_t), whose residual passes dz_t itself;
//     grad_w[k] = sum_t dz_t src_{t - off_k},  grad_bias = sum_t dz_t,  grad_omega = sum_t dz_t x_t;
//     grad_s = keep_s ((residual ? g_s : 0) + sum_k w[k] dz_{s + off_k}) + extra_scale extra_s
//         for 0 <= s < T (keep_s = 0 where padded; `extra` adds the omega x term's gradient on the
//         first layer): the correlation's adjoint, a correlation looking ahead;
//     grad_prev_{window + s} = sum_k w[k] dz_{s + off_k}  for -window <= s < 0.
// Each thread walks its range of rows in order, keeping dz of the next window + 1 rows (T + 1 when
// the sequence is shorter) in a ring buffer: dz_t is computed once, as row t - window's gradient
// needs it, and read from the ring by the rows' gradients that need it. A range recomputes the window of
// rows past its end, so a layer reads its input and g and writes its input's gradient once.
//
// Outputs are plain stores: streaming stores (native_simd.h), which speed up the EMA's strided
// writes, made these layers slower (the forward at L = 16384 took 30-60% longer), as the next layer
// reads each output at once.
//
// Layouts: h, x, out, dz, extra, grad (B, T, D) row-major; g rows of D values g_batch apart between
// batch rows and g_step apart between steps (the caller passes one expanded row with strides 0 as
// it is) (dz: the last layer's, kept for
// the first layer's `extra`; grad null when only the parameters' gradients are wanted); prev and
// grad_prev (B, window, D), prev null for a zero past; the forward also takes prev as the
// streaming state's own (B, D, window) (`past_channel_major`), which a decoding step would
// otherwise transpose in full to read K - 1 of its rows; weight and grad_weight (K, D); bias, omega
// and their gradients (D,); mask (B, T) bytes, nonzero where padded, or null. Built by
// seqmix.native (see recurrence_native.cpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>

#include "native_simd.h"

namespace {

using namespace seqmix_simd;

// OUTPUT: the last layer, no activation, writing the mixer's output SiLU(next + omega x).
enum Activation { NONE = 0, SILU = 1, GELU = 2, OUTPUT = 3 };

// Rows summed on their own into the parameter gradients before the sum joins the thread's total,
// which keeps float32 sums accurate over long sequences.
constexpr int64_t TILE = 256;

// GELU, exact (the error function's form, as torch's default), and its derivative, lane by lane:
// the error function has no vector form here.
template <typename T> inline typename Vec<T>::type gelu(typename Vec<T>::type z) {
  typename Vec<T>::type out;
  for (int i = 0; i < lanes<T>(); ++i) out[i] = T(0.5) * z[i] * (T(1) + std::erf(z[i] * T(0.7071067811865476)));
  return out;
}
template <typename T> inline typename Vec<T>::type gelu_derivative(typename Vec<T>::type z) {
  typename Vec<T>::type out;
  for (int i = 0; i < lanes<T>(); ++i) {
    out[i] = T(0.5) * (T(1) + std::erf(z[i] * T(0.7071067811865476))) +
             z[i] * std::exp(T(-0.5) * z[i] * z[i]) * T(0.3989422804014327);
  }
  return out;
}

// The activation (and whether the layer is the last) is a template argument: chosen per vector at
// run time, its branches cost the SiLU's backward a third more time.
template <typename T, int Act> inline typename Vec<T>::type activate(typename Vec<T>::type z) {
  if constexpr (Act == SILU) return silu<T>(z);
  if constexpr (Act == GELU) return gelu<T>(z);
  return z;
}
template <typename T, int Act> inline typename Vec<T>::type activation_derivative(typename Vec<T>::type z) {
  if constexpr (Act == SILU) return silu_derivative<T>(z);
  if constexpr (Act == GELU) return gelu_derivative<T>(z);
  return typename Vec<T>::type{} + T(1);
}

// The row of the layer's input s steps into the sequence of batch row b: h_s, or the past window's
// row before it (its channel 0; channels `past_stride` apart); null for a zero past.
template <typename T>
inline const T* source(const T* h, const T* prev, int64_t b, int64_t s, int64_t length, int64_t window, int64_t width,
                       int64_t past_stride) {
  if (s >= 0) return h + (b * length + s) * width;
  if (!prev) return nullptr;
  return past_stride == 1 ? prev + (b * window + window + s) * width : prev + b * width * window + window + s;
}

// `width` values `stride` apart from p, the rest zero: a row of a channel-major past.
template <typename T> inline typename Vec<T>::type load_strided(const T* p, int64_t stride, int64_t width) {
  typename Vec<T>::type v = {};
  for (int64_t i = 0; i < width; ++i) v[i] = p[i * stride];
  return v;
}

template <typename T> struct Layer {
  const T* weight;
  const T* bias;
  int64_t batch, length, width, taps, dilation, window;
  int activation;
  int64_t past_stride;  // 1: prev (B, window, D); window: prev (B, D, window)
  // rows[k] = src_{t - off_k} of batch row b, null for a zero past: found once per row, not per
  // vector. Returns how many leading taps (the farthest back) read a channel-major past, whose
  // rows are gathered: 0 unless prev is (B, D, window).
  inline int64_t tap_rows(const T** rows, const T* h, const T* prev, int64_t b, int64_t t) const {
    int64_t gathered = 0;
    for (int64_t k = 0; k < taps; ++k) {
      const int64_t s = t - (taps - 1 - k) * dilation;
      rows[k] = source(h, prev, b, s, length, window, width, past_stride);
      if (s < 0 && prev && past_stride != 1) gathered = k + 1;
    }
    return gathered;
  }
  // z at channels [d0, d0 + live) of the row whose tap rows are `rows`, the first `gathered` of
  // them in a channel-major past.
  inline typename Vec<T>::type preactivation(const T* const* rows, int64_t d0, int64_t live, int64_t gathered = 0) const {
    typename Vec<T>::type z = load<T>(bias + d0, live);
    for (int64_t k = 0; k < taps; ++k) {
      if (!rows[k]) continue;
      const typename Vec<T>::type input =
          k < gathered ? load_strided<T>(rows[k] + d0 * past_stride, past_stride, live) : load<T>(rows[k] + d0, live);
      z += load<T>(weight + k * width + d0, live) * input;
    }
    return z;
  }
};

// `count` values from the heap, or null when they cannot be had. Each thread allocates its own
// scratch inside the parallel region (from its own arena, so the memory stays in its core's cache
// from one call to the next: allocated by one thread for all, the two-thread backward took 10%
// longer); a failed allocation there must not throw, which would end the process: the threads
// agree on it (`failed`) and the kernel returns an error for the caller to raise.
template <typename X> std::unique_ptr<X[]> try_allocate(int64_t count) {
  return std::unique_ptr<X[]>(new (std::nothrow) X[std::max<int64_t>(count, 1)]);
}

// Whether any thread's allocation failed, after every thread has tried: call it on all of them.
inline bool any_failed(int& failed, bool mine) {
  if (mine) {
#pragma omp atomic write
    failed = 1;
  }
#pragma omp barrier
  int seen;
#pragma omp atomic read
  seen = failed;
  return seen != 0;
}

// Channels [d0, d0 + live) are one vector; full vectors take the fixed-size loads.
#define SEQMIX_FOR_BLOCKS(width, ...)                                           \
  for (int64_t d0 = 0; d0 < (width); d0 += lanes<T>()) {                        \
    const int64_t live = std::min<int64_t>(lanes<T>(), (width) - d0);           \
    if (live == lanes<T>()) {                                                   \
      constexpr int64_t block = lanes<T>();                                     \
      __VA_ARGS__                                                               \
    } else {                                                                    \
      const int64_t block = live;                                               \
      __VA_ARGS__                                                               \
    }                                                                           \
  }

// 0, or 1 when its scratch could not be allocated.
template <typename T, int Act>
int layer_forward(const T* h, const T* prev, T* out, const Layer<T>& layer, const uint8_t* mask, const T* x,
                  const T* omega, int residual, int threads) {
  typedef typename Vec<T>::type V;
  const int64_t rows = layer.batch * layer.length, width = layer.width;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
  const std::unique_ptr<const T*[]> tap_rows = try_allocate<const T*>(layer.taps);
  const T** taps = tap_rows.get();
  if (!any_failed(failed, !taps)) {
#pragma omp for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / layer.length, t = r % layer.length;
    const bool padded = mask && mask[r];
    const int64_t gathered = layer.tap_rows(taps, h, prev, b, t);
    SEQMIX_FOR_BLOCKS(width, {
      const V z = layer.preactivation(taps, d0, block, gathered);
      const V a = activate<T, Act>(z);
      V next = residual ? load<T>(h + r * width + d0, block) + a : a;
      if constexpr (Act == OUTPUT) {
        next = silu<T>(next + load<T>(omega + d0, block) * load<T>(x + r * width + d0, block));
      } else if (padded) {
        next = V{};
      }
      store<T>(out + r * width + d0, next, block);
    })
  }
  }
  }
  return failed;
}

// The ring's rows: the dz rows alive at once, s .. s + window within the sequence.
inline int64_t ring_slots(int64_t window, int64_t length) { return std::min(window, length) + 1; }

// One batch row's range of gradient rows [s0, s1) (s0 < 0: the past window's rows too), dz from
// the ring; the parameter gradients of rows t in [max(s0, 0), s1) added into `sums` (K + 2, D).
// behind_rows and ahead_rows: room for K row pointers each.
template <typename T, int Act>
void backward_range(const T* h, const T* prev, const T* g, int64_t g_batch, int64_t g_step, const Layer<T>& layer,
                    const uint8_t* mask, const T* x, const T* omega, int residual, const T* extra, const T* extra_scale,
                    T* grad, T* grad_prev, T* dz_kept, int64_t b, int64_t s0, int64_t s1, T* ring, T* tile_sum, T* sums,
                    const T** behind_rows, const T** ahead_rows) {
  typedef typename Vec<T>::type V;
  const int64_t length = layer.length, width = layer.width, taps = layer.taps, window = layer.window;
  const int64_t slots = ring_slots(window, length), count = (taps + 2) * width;
  int64_t next = std::max<int64_t>(s0, 0), in_tile = 0;
  auto flush = [&]() {
    for (int64_t i = 0; i < count; ++i) sums[i] += tile_sum[i];
    std::fill(tile_sum, tile_sum + count, T(0));
    in_tile = 0;
  };
  for (int64_t s = s0; s < s1; ++s) {
    // dz of rows up to s + window, each once, into the ring.
    for (; next < length && next <= s + window; ++next) {
      const int64_t r = b * length + next;
      const bool owned = next < s1;
      T* slot = ring + (next % slots) * width;
      layer.tap_rows(behind_rows, h, prev, b, next);
      SEQMIX_FOR_BLOCKS(width, {
        const V z = layer.preactivation(behind_rows, d0, block);
        const V gv = load<T>(g + b * g_batch + next * g_step + d0, block);
        V d;
        if constexpr (Act == OUTPUT) {
          const V xv = load<T>(x + r * width + d0, block);
          const V out = residual ? load<T>(h + r * width + d0, block) + z : z;
          d = gv * silu_derivative<T>(out + load<T>(omega + d0, block) * xv);
          if (owned) {
            T* omega_sum = tile_sum + (taps + 1) * width + d0;
            store<T>(omega_sum, load<T>(omega_sum, block) + d * xv, block);
          }
        } else {
          d = gv * activation_derivative<T, Act>(z);
        }
        store<T>(slot + d0, d, block);
        if (owned) {
          if (dz_kept) store<T>(dz_kept + r * width + d0, d, block);
          for (int64_t k = 0; k < taps; ++k) {
            if (!behind_rows[k]) continue;
            T* weight_sum = tile_sum + k * width + d0;
            store<T>(weight_sum, load<T>(weight_sum, block) + d * load<T>(behind_rows[k] + d0, block), block);
          }
          T* bias_sum = tile_sum + taps * width + d0;
          store<T>(bias_sum, load<T>(bias_sum, block) + d, block);
        }
      })
      if (owned && ++in_tile == TILE) flush();
    }
    if (s >= 0 && !grad) continue;  // only the parameters' gradients wanted
    const bool padded = s >= 0 && mask && mask[b * length + s];
    T* target = s >= 0 ? grad + (b * length + s) * width : grad_prev + (b * window + window + s) * width;
    // The ring rows of dz_{s + off_k} (null past the end), found once per row: a division per
    // vector would cost more than the vector's arithmetic.
    for (int64_t k = 0; k < taps; ++k) {
      const int64_t ahead = s + (taps - 1 - k) * layer.dilation;
      ahead_rows[k] = ahead >= 0 && ahead < length ? ring + (ahead % slots) * width : nullptr;
    }
    const T* passed = s >= 0 && residual ? (Act == OUTPUT ? ring + (s % slots) * width : g + b * g_batch + s * g_step) : nullptr;
    SEQMIX_FOR_BLOCKS(width, {
      V v = {};
      if (!padded) {
        for (int64_t k = 0; k < taps; ++k) {
          if (ahead_rows[k]) v += load<T>(layer.weight + k * width + d0, block) * load<T>(ahead_rows[k] + d0, block);
        }
        if (passed) v += load<T>(passed + d0, block);
      }
      if (s >= 0 && extra) v += load<T>(extra_scale + d0, block) * load<T>(extra + (b * length + s) * width + d0, block);
      store<T>(target + d0, v, block);
    })
  }
  flush();
}

// 0, or 1 when its scratch could not be allocated.
template <typename T, int Act>
int layer_backward(const T* h, const T* prev, const T* g, int64_t g_batch, int64_t g_step, const Layer<T>& layer,
                   const uint8_t* mask, const T* x, const T* omega, int residual, const T* extra, const T* extra_scale,
                   T* grad, T* grad_prev, T* dz_kept, T* grad_weight, T* grad_bias, T* grad_omega, int threads) {
  const int64_t width = layer.width, taps = layer.taps, window = layer.window;
  const int64_t before = grad_prev ? window : 0, span = before + layer.length;
  // Ranges long against the window (each recomputes the window past its end), a few per thread.
  const int64_t wanted = (span * layer.batch + 4 * threads - 1) / (4 * threads);
  const int64_t range = std::max<int64_t>({wanted, 4 * window, 64});
  const int64_t ranges = (span + range - 1) / range, count = (taps + 2) * width;
  const int64_t ring_values = ring_slots(window, layer.length) * width;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    // Per thread: the ring, the current tile's sums and the thread's total, and the row pointers.
    const std::unique_ptr<T[]> values = try_allocate<T>(ring_values + 2 * count);
    const std::unique_ptr<const T*[]> rows = try_allocate<const T*>(2 * taps);
    if (!any_failed(failed, !values || !rows)) {
    T* ring = values.get();
    T* tile_sum = ring + ring_values;
    T* sums = tile_sum + count;
    std::fill(tile_sum, sums + count, T(0));
#pragma omp for schedule(static)
    for (int64_t piece = 0; piece < layer.batch * ranges; ++piece) {
      const int64_t b = piece / ranges, s0 = (piece % ranges) * range - before;
      backward_range<T, Act>(h, prev, g, g_batch, g_step, layer, mask, x, omega, residual, extra, extra_scale, grad,
                             grad_prev, dz_kept, b, s0, std::min(s0 + range, layer.length), ring, tile_sum, sums,
                             rows.get(), rows.get() + taps);
    }
#pragma omp critical
    {
      for (int64_t i = 0; i < taps * width; ++i) grad_weight[i] += sums[i];
      for (int64_t i = 0; i < width; ++i) grad_bias[i] += sums[taps * width + i];
      if (grad_omega) {
        for (int64_t i = 0; i < width; ++i) grad_omega[i] += sums[(taps + 1) * width + i];
      }
    }
    }
  }
  return failed;
}

// The kernels' instance for the activation `activation` (NONE, SILU or GELU), or for the last layer.
template <typename T>
decltype(&layer_forward<T, NONE>) forward_for(int activation, bool last) {
  if (last) return layer_forward<T, OUTPUT>;
  return activation == SILU ? layer_forward<T, SILU> : activation == GELU ? layer_forward<T, GELU> : layer_forward<T, NONE>;
}
template <typename T>
decltype(&layer_backward<T, NONE>) backward_for(int activation, bool last) {
  if (last) return layer_backward<T, OUTPUT>;
  return activation == SILU ? layer_backward<T, SILU> : activation == GELU ? layer_backward<T, GELU> : layer_backward<T, NONE>;
}

}  // namespace

#define SEQMIX_TCN(T, suffix)                                                                                        \
  extern "C" int seqmix_tcn_forward_##suffix(                                                                       \
      const T* h, const T* prev, T* out, const T* weight, const T* bias, const uint8_t* mask, const T* x,             \
      const T* omega, int64_t batch, int64_t length, int64_t width, int64_t taps, int64_t dilation, int activation,   \
      int residual, int past_channel_major, int threads) {                                                           \
    const int64_t window = (taps - 1) * dilation;                                                                    \
    const Layer<T> layer{weight, bias, batch, length, width, taps, dilation, window, activation,                     \
                         past_channel_major ? window : 1};                                                           \
    return forward_for<T>(activation, x != nullptr)(h, prev, out, layer, mask, x, omega, residual, threads);       \
  }                                                                                                                  \
  extern "C" int seqmix_tcn_backward_##suffix(                                                                      \
      const T* h, const T* prev, const T* g, const T* weight, const T* bias, const uint8_t* mask, const T* x,         \
      const T* omega, const T* extra, const T* extra_scale, T* grad, T* grad_prev, T* dz_kept, T* grad_weight,        \
      T* grad_bias, T* grad_omega, int64_t batch, int64_t length, int64_t width, int64_t taps, int64_t dilation,      \
      int64_t g_batch, int64_t g_step, int activation, int residual, int threads) {                                  \
    const Layer<T> layer{weight, bias, batch, length, width, taps, dilation, (taps - 1) * dilation, activation, 1};  \
    return backward_for<T>(activation, x != nullptr)(h, prev, g, g_batch, g_step, layer, mask, x, omega, residual,   \
                                                     extra, extra_scale, grad, grad_prev, dz_kept, grad_weight,       \
                                                     grad_bias, grad_omega, threads);                                 \
  }

SEQMIX_TCN(float, f32)
SEQMIX_TCN(double, f64)
