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
// The backward of a layer is two passes:
//   1. dz_t = g_t act'(z_t) (z recomputed from the input), or on the last layer
//      dz_t = g_t SiLU'(next_t + omega x_t); the parameter gradients sum over rows:
//      grad_w[k] += dz_t src_{t - off_k}, grad_bias += dz_t, grad_omega += dz_t x_t.
//   2. the input's gradient, the adjoint of the correlation, a correlation looking ahead:
//      grad_s = keep_s ((residual ? g_s : 0) + sum_k w[k] dz_{s + off_k}) + extra_scale extra_s
//      for 0 <= s < T (keep_s = 0 where padded; `extra` adds the omega x term's gradient on the
//      first layer), and grad_prev_{window + s} = sum_k w[k] dz_{s + off_k} for -window <= s < 0.
//
// Layouts: h, x, out, g, dz, extra, grad (B, T, D) row-major; prev, grad_prev (B, window, D), null
// for a zero past; weight and grad_weight (K, D); bias, omega, their gradients (D,); mask (B, T)
// bytes, nonzero where padded, or null. Built by seqmix.native (see recurrence_native.cpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "native_simd.h"

namespace {

using namespace seqmix_simd;

enum Activation { NONE = 0, SILU = 1, GELU = 2 };

// Rows per unit of work in the parameter gradients' sums: each unit sums its rows on its own
// before adding to the thread's total, which keeps float32 sums accurate over long sequences.
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

template <typename T> inline typename Vec<T>::type activate(typename Vec<T>::type z, int activation) {
  return activation == SILU ? silu<T>(z) : activation == GELU ? gelu<T>(z) : z;
}
template <typename T> inline typename Vec<T>::type activation_derivative(typename Vec<T>::type z, int activation) {
  return activation == SILU ? silu_derivative<T>(z) : activation == GELU ? gelu_derivative<T>(z) : typename Vec<T>::type{} + T(1);
}

// The row of the layer's input s steps into the sequence of batch row b: h_s, or the past window's
// row before it; null for a zero past.
template <typename T>
inline const T* source(const T* h, const T* prev, int64_t b, int64_t s, int64_t length, int64_t window, int64_t width) {
  if (s >= 0) return h + (b * length + s) * width;
  return prev ? prev + (b * window + window + s) * width : nullptr;
}

template <typename T> struct Layer {
  const T* weight;
  const T* bias;
  int64_t batch, length, width, taps, dilation, window;
  int activation;
  // z at row (b, t), channels [d0, d0 + live).
  inline typename Vec<T>::type preactivation(const T* h, const T* prev, int64_t b, int64_t t, int64_t d0, int64_t live) const {
    typename Vec<T>::type z = load<T>(bias + d0, live);
    for (int64_t k = 0; k < taps; ++k) {
      const T* row = source(h, prev, b, t - (taps - 1 - k) * dilation, length, window, width);
      if (row) z += load<T>(weight + k * width + d0, live) * load<T>(row + d0, live);
    }
    return z;
  }
};

// Channels [d0, d0 + live) are one vector; full vectors take the fixed-size loads.
#define SEQMIX_FOR_BLOCKS(width, body)                                          \
  for (int64_t d0 = 0; d0 < (width); d0 += lanes<T>()) {                        \
    const int64_t live = std::min<int64_t>(lanes<T>(), (width) - d0);           \
    if (live == lanes<T>()) {                                                   \
      constexpr int64_t block = lanes<T>();                                     \
      body                                                                      \
    } else {                                                                    \
      const int64_t block = live;                                               \
      body                                                                      \
    }                                                                           \
  }

template <typename T>
void layer_forward(const T* h, const T* prev, T* out, const Layer<T>& layer, const uint8_t* mask, const T* x,
                   const T* omega, int residual, int threads) {
  typedef typename Vec<T>::type V;
  const int64_t rows = layer.batch * layer.length, width = layer.width;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / layer.length, t = r % layer.length;
    const bool padded = mask && mask[r];
    SEQMIX_FOR_BLOCKS(width, {
      const V z = layer.preactivation(h, prev, b, t, d0, block);
      const V a = x ? z : activate<T>(z, layer.activation);
      V next = residual ? load<T>(h + r * width + d0, block) + a : a;
      if (x) {
        next = silu<T>(next + load<T>(omega + d0, block) * load<T>(x + r * width + d0, block));
      } else if (padded) {
        next = V{};
      }
      store<T>(out + r * width + d0, next, block);
    })
  }
}

template <typename T>
void layer_backward_taps(const T* h, const T* prev, const T* g, T* dz, const Layer<T>& layer, const T* x,
                         const T* omega, int residual, T* grad_weight, T* grad_bias, T* grad_omega, int threads) {
  typedef typename Vec<T>::type V;
  const int64_t rows = layer.batch * layer.length, width = layer.width, taps = layer.taps;
  const int64_t tiles = (rows + TILE - 1) / TILE, sums = (taps + 2) * width;
#pragma omp parallel num_threads(threads)
  {
    // Per thread: the sums of its tiles, and the current tile's; each (K + 2, D): weight, bias, omega.
    std::vector<T> total(sums, T(0)), tile_sum(sums);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      std::fill(tile_sum.begin(), tile_sum.end(), T(0));
      for (int64_t r = tile * TILE; r < std::min(rows, (tile + 1) * TILE); ++r) {
        const int64_t b = r / layer.length, t = r % layer.length;
        SEQMIX_FOR_BLOCKS(width, {
          const V z = layer.preactivation(h, prev, b, t, d0, block);
          const V gv = load<T>(g + r * width + d0, block);
          V d;
          if (x) {
            const V xv = load<T>(x + r * width + d0, block);
            const V next = residual ? load<T>(h + r * width + d0, block) + z : z;
            d = gv * silu_derivative<T>(next + load<T>(omega + d0, block) * xv);
            T* omega_sum = tile_sum.data() + (taps + 1) * width + d0;
            store<T>(omega_sum, load<T>(omega_sum, block) + d * xv, block);
          } else {
            d = gv * activation_derivative<T>(z, layer.activation);
          }
          store<T>(dz + r * width + d0, d, block);
          for (int64_t k = 0; k < taps; ++k) {
            const T* row = source(h, prev, b, t - (taps - 1 - k) * layer.dilation, layer.length, layer.window, width);
            if (!row) continue;
            T* weight_sum = tile_sum.data() + k * width + d0;
            store<T>(weight_sum, load<T>(weight_sum, block) + d * load<T>(row + d0, block), block);
          }
          T* bias_sum = tile_sum.data() + taps * width + d0;
          store<T>(bias_sum, load<T>(bias_sum, block) + d, block);
        })
      }
      for (int64_t i = 0; i < sums; ++i) total[i] += tile_sum[i];
    }
#pragma omp critical
    {
      for (int64_t i = 0; i < taps * width; ++i) grad_weight[i] += total[i];
      for (int64_t i = 0; i < width; ++i) grad_bias[i] += total[taps * width + i];
      if (grad_omega) {
        for (int64_t i = 0; i < width; ++i) grad_omega[i] += total[(taps + 1) * width + i];
      }
    }
  }
}

template <typename T>
void layer_backward_input(const T* dz, const T* g, const Layer<T>& layer, const uint8_t* mask, const T* extra,
                          const T* extra_scale, T* grad, T* grad_prev, int threads) {
  typedef typename Vec<T>::type V;
  const int64_t length = layer.length, width = layer.width, taps = layer.taps;
  const int64_t before = grad_prev ? layer.window : 0, span = before + length;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < layer.batch * span; ++r) {
    const int64_t b = r / span, s = r % span - before;
    const bool padded = s >= 0 && mask && mask[b * length + s];
    T* target = s >= 0 ? grad + (b * length + s) * width : grad_prev + (b * layer.window + layer.window + s) * width;
    SEQMIX_FOR_BLOCKS(width, {
      V v = {};
      if (!padded) {
        for (int64_t k = 0; k < taps; ++k) {
          const int64_t ahead = s + (taps - 1 - k) * layer.dilation;
          if (ahead >= 0 && ahead < length) {
            v += load<T>(layer.weight + k * width + d0, block) * load<T>(dz + (b * length + ahead) * width + d0, block);
          }
        }
        if (s >= 0 && g) v += load<T>(g + (b * length + s) * width + d0, block);
      }
      if (s >= 0 && extra) {
        v += load<T>(extra_scale + d0, block) * load<T>(extra + (b * length + s) * width + d0, block);
      }
      store<T>(target + d0, v, block);
    })
  }
}

}  // namespace

#define SEQMIX_TCN(T, suffix)                                                                                        \
  extern "C" void seqmix_tcn_forward_##suffix(                                                                       \
      const T* h, const T* prev, T* out, const T* weight, const T* bias, const uint8_t* mask, const T* x,             \
      const T* omega, int64_t batch, int64_t length, int64_t width, int64_t taps, int64_t dilation, int activation,   \
      int residual, int threads) {                                                                                   \
    const Layer<T> layer{weight, bias, batch, length, width, taps, dilation, (taps - 1) * dilation, activation};     \
    layer_forward<T>(h, prev, out, layer, mask, x, omega, residual, threads);                                        \
  }                                                                                                                  \
  extern "C" void seqmix_tcn_backward_taps_##suffix(                                                                 \
      const T* h, const T* prev, const T* g, T* dz, const T* weight, const T* bias, const T* x, const T* omega,       \
      T* grad_weight, T* grad_bias, T* grad_omega, int64_t batch, int64_t length, int64_t width, int64_t taps,        \
      int64_t dilation, int activation, int residual, int threads) {                                                 \
    const Layer<T> layer{weight, bias, batch, length, width, taps, dilation, (taps - 1) * dilation, activation};     \
    layer_backward_taps<T>(h, prev, g, dz, layer, x, omega, residual, grad_weight, grad_bias, grad_omega, threads);  \
  }                                                                                                                  \
  extern "C" void seqmix_tcn_backward_input_##suffix(                                                                \
      const T* dz, const T* g, const T* weight, const uint8_t* mask, const T* extra, const T* extra_scale, T* grad,   \
      T* grad_prev, int64_t batch, int64_t length, int64_t width, int64_t taps, int64_t dilation, int threads) {      \
    const Layer<T> layer{weight, nullptr, batch, length, width, taps, dilation, (taps - 1) * dilation, NONE};        \
    layer_backward_input<T>(dz, g, layer, mask, extra, extra_scale, grad, grad_prev, threads);                       \
  }

SEQMIX_TCN(float, f32)
SEQMIX_TCN(double, f64)
