// The diagonal linear recurrence of recurrence.py as native code: the ``native`` path.
//
// Per channel d and state n (q, c complex; b, x, y real):
//     h_t = q h_{t-1} + b x_t,    y_t = skip x_t + Re sum_n c h_t,    out_t = SiLU(y_t) when asked.
//
// The literal loop over t, vectorised across channels: a block holds W channels (one 64-byte
// vector), and its states stay in registers while the loop runs over a segment of SEGMENT steps,
// a few states at a time (a group), their readouts summed into a per-segment buffer. Segments run in
// order; within one, the (batch row, block) pairs are split over the threads, each thread the same
// pairs in every segment, so that a pair's states and sums are its thread's alone and no thread
// waits for the others between segments (the forward's OpenMP static schedule gives a thread the
// same pairs each time: same iteration count, no chunk size, same parallel region; the adjoint
// splits them itself). Each forward thread fetches the rows it reads in the next segment a line at
// a time between its steps. While autograd records, the forward keeps the state every CHECKPOINT
// steps, and the adjoint runs over those shorter segments, whose recomputed states and rows fit the
// core's L1 cache. The adjoint works through a thread's pairs a tile at a time: it copies the
// tile's rows of a segment into a buffer, reading each row's vectors of the tile side by side, runs
// the tile's pairs there, and writes their gradients back row by row, while it fetches the next
// tile's rows into L2 a line at a time between its steps. Read down a column instead, one line per
// row 1 KiB apart (D = 256), the adjoint waited on its rows: with them in cache it ran 1.4-2.2x
// faster (L = 16384, one thread). Over a whole segment or more the forward carries the states
// divided by b, which saves a multiply per state and step (forward_segments).
//
// Layouts: x, y, slope, gx (B, L, D) row-major (slope: SiLU' of the sums, which the forward writes
// while autograd records and the adjoint multiplies the incoming gradient by); g, the incoming
// gradient, rows of D values at the strides given; coefficients and their gradients (N, P); states and
// per-row sums (B, N, P), the skip's (B, P); P = D padded to a multiple of W and N to a multiple
// of GROUP (the padding holds zeros, so it adds nothing); checkpoints (B, ceil(L / CHECKPOINT), N, P).
// Imaginary parts are null for a real recurrence. Built by seqmix.native with the compiler's
// vector extensions, so the same source vectorises for whatever the build machine's CPU offers.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "native_simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using namespace seqmix_simd;

constexpr int64_t SEGMENT = 128;
// Half a segment: with 128 the adjoint's buffers outgrew L1 (forward + backward 5-15% slower at
// L = 16384), while forward segments of 64 were up to 5% slower on two threads.
constexpr int64_t CHECKPOINT = 64;
static_assert(SEGMENT % CHECKPOINT == 0, "segments hold whole checkpoint intervals");
constexpr int GROUP = 4;
// The real forward's group where N is a multiple of it: its loop keeps three vectors per state (q,
// the state, c b), 24 of AVX-512's 32 registers at eight, and eight independent states hide the
// latency of a multiply-add (four steps of the loop, each one of them per state) where four only
// just did: the EMA's forward about 7% faster (D = 256, N = 16, L = 4096 and 16384, one thread). The
// complex loop spills at eight (its forward 17% slower), as does the real adjoint's.
constexpr int WIDE_GROUP = 8;
// The adjoint's group, which divides GROUP. Its complex loop keeps twelve vectors per state
// (five coefficients, two adjoint parts, five gradient sums): at four states they outgrow AVX-512's 32
// vector registers and spill, and at two the CEMA's adjoint took 28.7 ms instead of 40 (D = 256,
// L = 16384, one thread; at one state, 38 ms). The real loop keeps seven per state; at two states
// it was 5-10% slower than at four.
template <bool Complex> constexpr int adjoint_group() { return Complex ? 2 : GROUP; }
static_assert(GROUP % adjoint_group<true>() == 0 && GROUP % adjoint_group<false>() == 0, "groups divide GROUP");

// Pairs in a tile of the adjoint: on one and two threads at L = 4096 and 16384 (D = 256), its time
// at two was at most 4% behind the better of four and sixteen, and up to 9% ahead of it.
constexpr int64_t TILE = 2;

// This thread's share [first, last) of `pairs`: the same in every segment of a call.
struct Share {
  int64_t first, last;
  explicit Share(int64_t pairs) {
#ifdef _OPENMP
    const int64_t team = omp_get_num_threads(), member = omp_get_thread_num();
#else
    const int64_t team = 1, member = 0;
#endif
    first = pairs * member / team;
    last = pairs * (member + 1) / team;
  }
};

// How (batch row, block) pairs map to memory: x and the tensors laid out as it, (B, L, D), and the
// incoming gradient's rows at its own strides.
struct Layout {
  int64_t blocks, lanes, length, width, grad_batch_stride, grad_step_stride;
};

// Where a tile's pairs are, from `first`: for each, the offset of its vector in the segment's first
// row (at t0) of x and of the gradient, and how many of its lanes are channels.
struct Tile {
  int64_t count = 0, at[TILE] = {}, grad_at[TILE] = {}, live[TILE] = {};
  Tile() = default;
  Tile(const Layout& layout, int64_t first, int64_t count_, int64_t t0) : count(count_) {
    for (int64_t p = 0; p < count; ++p) {
      const int64_t row = (first + p) / layout.blocks, d0 = ((first + p) % layout.blocks) * layout.lanes;
      at[p] = (row * layout.length + t0) * layout.width + d0;
      grad_at[p] = row * layout.grad_batch_stride + t0 * layout.grad_step_stride + d0;
      live[p] = std::min<int64_t>(layout.lanes, layout.width - d0);
    }
  }
};

// Fetches a tile's rows into L2 in the order its copy reads them: x, a tensor laid out as x (when
// not null) and the gradient, one row of the tile's vectors every `every` calls, so that the
// fetches spread over the loops of the tile before it.
template <typename T>
struct Fetcher {
  Tile tile;
  const T *x = nullptr, *beside = nullptr, *grad = nullptr;
  int64_t width = 0, grad_step = 0, rows = 0, every = 1, tick = 0, t = 0, p = 0;
  void operator()() {
    if (++tick < every) return;
    tick = 0;
    if (t >= rows) return;
    const int64_t at = tile.at[p] + t * width;
    __builtin_prefetch(x + at, 0, 2);
    if (beside) __builtin_prefetch(beside + at, 0, 2);
    __builtin_prefetch(grad + tile.grad_at[p] + t * grad_step, 0, 2);
    if (++p == tile.count) {
      p = 0;
      ++t;
    }
  }
};

// The Fetcher of the tile the adjoint copies after a thread's tile from `first` in `segment` (of
// CHECKPOINT steps): its next pairs in that segment, else its first ones of the segment before; an
// idle one after the first segment. Its fetches spread over `calls` calls.
template <typename T>
Fetcher<T> next_tile(const Layout& layout, const Share& share, int64_t first, int64_t segment, int64_t calls,
                     const T* x, const T* beside, const T* grad) {
  Fetcher<T> fetch;
  first += TILE;
  if (first >= share.last) {
    first = share.first;
    --segment;
  }
  if (segment < 0 || first >= share.last) return fetch;
  fetch.tile = Tile(layout, first, std::min(TILE, share.last - first), segment * CHECKPOINT);
  fetch.x = x;
  fetch.beside = beside;
  fetch.grad = grad;
  fetch.width = layout.width;
  fetch.grad_step = layout.grad_step_stride;
  fetch.rows = std::min(CHECKPOINT, layout.length - segment * CHECKPOINT);
  fetch.every = std::max<int64_t>(1, calls / (fetch.rows * fetch.tile.count));
  return fetch;
}

// The forward's segments. Scaled: every state is carried divided by its input weight b (real),
// s_t = h_t / b = q s_{t-1} + x_t, read out with c b: one multiply per state and step fewer (three
// vector instructions to two in the real recurrence, seven to six in the complex one), the
// checkpoints kept as b s. The caller divides the states in h_re, h_im by b before and multiplies
// them back after.
template <typename T, bool Complex, bool Scaled, int G>
void forward_segments(const T* x, T* y, T* slope, const T* q_re, const T* q_im, const T* b, const T* c_re, const T* c_im,
                      const T* skip, T* h_re, T* h_im, T* ck_re, T* ck_im, int64_t batch, int64_t length,
                      int64_t width, int64_t padded, int64_t order, int apply_silu, int threads) {
  typedef typename Vec<T>::type V;
  constexpr int W = lanes<T>();
  const int64_t blocks = padded / W, segments = (length + SEGMENT - 1) / SEGMENT, groups = order / G;
  const int64_t checkpoints = (length + CHECKPOINT - 1) / CHECKPOINT;
  const bool stream = streams<T>(batch, length, width);
#pragma omp parallel num_threads(threads)
  {
  for (int64_t segment = 0; segment < segments; ++segment) {
    const int64_t t0 = segment * SEGMENT, steps = std::min(SEGMENT, length - t0);
    // Rows of the next segment that are in x: a thread fetches the lines it reads next (the same
    // static schedule gives it the same (row, block) pairs), spread over the steps of its loops.
    const int64_t ahead = std::max<int64_t>(0, std::min(SEGMENT, length - t0 - SEGMENT));
#pragma omp for collapse(2) schedule(static) nowait
    for (int64_t row = 0; row < batch; ++row) {
      for (int64_t block = 0; block < blocks; ++block) {
        const int64_t d0 = block * W, live = std::min<int64_t>(W, width - d0);
        const T* next = x + ((row * length) + t0 + SEGMENT) * width + d0;
        V xs[SEGMENT], acc[SEGMENT];
        const V sk = skip ? load<T>(skip + d0) : V{};
        for (int64_t t = 0; t < steps; ++t) {
          xs[t] = load<T>(x + ((row * length) + t0 + t) * width + d0, live);
          acc[t] = sk * xs[t];
        }
        for (int64_t n0 = 0; n0 < order; n0 += G) {
          V hr[G], hi[G], qr[G], qi[G], bw[G], cr[G], ci[G];
          for (int g = 0; g < G; ++g) {
            const int64_t at = (n0 + g) * padded + d0, state = row * order * padded + at;
            hr[g] = load<T>(h_re + state);
            qr[g] = load<T>(q_re + at);
            bw[g] = load<T>(b + at);
            cr[g] = load<T>(c_re + at);
            if (Complex) {
              hi[g] = load<T>(h_im + state);
              qi[g] = load<T>(q_im + at);
              ci[g] = load<T>(c_im + at);
            }
            if (Scaled) {
              cr[g] = cr[g] * bw[g];
              if (Complex) ci[g] = ci[g] * bw[g];
            }
          }
          // This group fetches rows n0 / G, n0 / G + groups, ... of the next segment: one
          // line every `groups` steps, so that the fetches overlap the arithmetic. Issued at once,
          // they stalled the core until they were served, a fifth of the forward at L = 16384.
          int64_t fetch = n0 / G;
          for (int64_t t = 0; t < steps; ++t) {
            if (t == fetch) {
              if (t < ahead) __builtin_prefetch(next + t * width, 0, 2);
              fetch += groups;
            }
            if (ck_re && t % CHECKPOINT == 0) {
              for (int g = 0; g < G; ++g) {
                const int64_t kept = ((row * checkpoints + (t0 + t) / CHECKPOINT) * order + n0 + g) * padded + d0;
                store<T>(ck_re + kept, Scaled ? bw[g] * hr[g] : hr[g]);
                if (Complex) store<T>(ck_im + kept, Scaled ? bw[g] * hi[g] : hi[g]);
              }
            }
            V a = acc[t];
            const V xv = xs[t];
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) {
              const V fed = Scaled ? xv : bw[g] * xv;
              if (Complex) {
                const V re = qr[g] * hr[g] - qi[g] * hi[g] + fed;
                hi[g] = qr[g] * hi[g] + qi[g] * hr[g];
                hr[g] = re;
                a += cr[g] * hr[g] - ci[g] * hi[g];
              } else {
                hr[g] = qr[g] * hr[g] + fed;
                a += cr[g] * hr[g];
              }
            }
            acc[t] = a;
            // The complex recurrence writes each step's output as its last group completes it, so
            // that the stores spread over that loop instead of queueing behind one another after
            // it (its forward about 10-13% faster, D = 256); the real one keeps them after the
            // loop: its loop is shorter, and the SiLU inside it made its forward a tenth slower.
            if (Complex && n0 + G == order) {
              const int64_t at = ((row * length) + t0 + t) * width + d0;
              V slope_t;
              const V out = apply_silu ? silu<T>(a, slope ? &slope_t : nullptr) : a;
              if (slope) store_out<T>(slope + at, slope_t, live, stream);
              store_out<T>(y + at, out, live, stream);
            }
          }
          for (int g = 0; g < G; ++g) {
            const int64_t state = row * order * padded + (n0 + g) * padded + d0;
            store<T>(h_re + state, hr[g]);
            if (Complex) store<T>(h_im + state, hi[g]);
          }
        }
        for (int64_t t = 0; t < steps && !Complex; ++t) {
          const int64_t at = ((row * length) + t0 + t) * width + d0;
          V slope_t;
          const V out = apply_silu ? silu<T>(acc[t], slope ? &slope_t : nullptr) : acc[t];
          if (slope) store_out<T>(slope + at, slope_t, live, stream);
          store_out<T>(y + at, out, live, stream);
        }
      }
    }
  }
  stream_fence();
  }
}

// Whether the states can be carried divided by b: every b is finite (an infinite one would turn
// the plain recurrence's inf * 0 = NaN into an infinity), and each state is zero (whatever b), or b
// is nonzero and the quotient is finite, or the state is not finite (it stays so either way). The
// padding's states are zero. Vectors of W; a value v is finite where v - v == 0.
template <typename T>
bool divisible_states(const T* b, const T* h_re, const T* h_im, int64_t batch, int64_t order, int64_t padded) {
  typedef typename Vec<T>::type V;
  constexpr int W = lanes<T>();
  const int64_t size = order * padded;
  for (int64_t i = 0; i < size; i += W) {
    const V bv = load<T>(b + i);
    const auto infinite = (bv - bv) != 0;
    for (int lane = 0; lane < W; ++lane) {
      if (infinite[lane]) return false;
    }
  }
  for (const T* h : {h_re, h_im}) {
    if (!h) continue;
    for (int64_t row = 0; row < batch; ++row) {
      for (int64_t i = 0; i < size; i += W) {
        const V v = load<T>(h + row * size + i), bv = load<T>(b + i), quotient = v / bv;
        const auto refused = (v != 0) & ((bv == 0) | (((v - v) == 0) & ((quotient - quotient) != 0)));
        for (int lane = 0; lane < W; ++lane) {
          if (refused[lane]) return false;
        }
      }
    }
  }
  return true;
}

// h / b (zero where h is) when `divide`, else h b, for every state of each batch row.
template <typename T>
void rescale_states(T* h, const T* b, int64_t batch, int64_t order, int64_t padded, bool divide) {
  typedef typename Vec<T>::type V;
  constexpr int W = lanes<T>();
  const int64_t size = order * padded;
  for (int64_t row = 0; row < batch; ++row) {
    for (int64_t i = 0; i < size; i += W) {
      const V v = load<T>(h + row * size + i), bv = load<T>(b + i);
      store<T>(h + row * size + i, divide ? (v != 0 ? v / bv : V{}) : v * bv);
    }
  }
}

// forward_segments with the group of states the loop can hold: WIDE_GROUP for the real recurrence
// where N' is a multiple of it, else GROUP.
template <typename T, bool Complex, bool Scaled>
void grouped_segments(const T* x, T* y, T* slope, const T* q_re, const T* q_im, const T* b, const T* c_re, const T* c_im,
                      const T* skip, T* h_re, T* h_im, T* ck_re, T* ck_im, int64_t batch, int64_t length,
                      int64_t width, int64_t padded, int64_t order, int apply_silu, int threads) {
  if (!Complex && order % WIDE_GROUP == 0) {
    forward_segments<T, Complex, Scaled, WIDE_GROUP>(x, y, slope, q_re, q_im, b, c_re, c_im, skip, h_re, h_im, ck_re, ck_im,
                                                     batch, length, width, padded, order, apply_silu, threads);
  } else {
    forward_segments<T, Complex, Scaled, GROUP>(x, y, slope, q_re, q_im, b, c_re, c_im, skip, h_re, h_im, ck_re, ck_im,
                                                batch, length, width, padded, order, apply_silu, threads);
  }
}

template <typename T, bool Complex>
void forward(const T* x, T* y, T* slope, const T* q_re, const T* q_im, const T* b, const T* c_re, const T* c_im,
             const T* skip, T* h_re, T* h_im, T* ck_re, T* ck_im, int64_t batch, int64_t length, int64_t width,
             int64_t padded, int64_t order, int apply_silu, int threads) {
  // Dividing the states and multiplying them back costs about two steps: worth it over a segment.
  if (length < SEGMENT || !divisible_states<T>(b, h_re, h_im, batch, order, padded)) {
    grouped_segments<T, Complex, false>(x, y, slope, q_re, q_im, b, c_re, c_im, skip, h_re, h_im, ck_re, ck_im, batch,
                                        length, width, padded, order, apply_silu, threads);
    return;
  }
  for (T* h : {h_re, h_im}) {
    if (h) rescale_states<T>(h, b, batch, order, padded, true);
  }
  grouped_segments<T, Complex, true>(x, y, slope, q_re, q_im, b, c_re, c_im, skip, h_re, h_im, ck_re, ck_im, batch, length,
                                     width, padded, order, apply_silu, threads);
  for (T* h : {h_re, h_im}) {
    if (h) rescale_states<T>(h, b, batch, order, padded, false);
  }
}

// The adjoint, segment by segment (of CHECKPOINT steps) from the last: each segment's states are
// recomputed from its checkpoint into a buffer, then walked backwards. With mu_t = dl/dh_t (a complex number as its
// real and imaginary gradients) and g_t = dl/dy_t:
//     mu_t = g_t conj(c) + conj(q) mu_{t+1},   mu_{L-1} = g_{L-1} conj(c) + dl/dh_{L-1}
//     dl/dx_t = skip g_t + sum_n b Re mu_t,    dl/db = sum_t Re(mu_t) x_t
//     dl/dc = sum_t g_t conj(h_t),    dl/dq = sum_t conj(h_{t-1}) mu_t,    dl/dh_{-1} = conj(q) mu_0
// `carry` holds conj(q) mu_{t+1} between segments: dl/dh_{L-1} in, dl/dh_{-1} out. The coefficient
// gradients are summed over time per batch row, into (B, N, P) buffers the caller sums over B, and
// the skip's, sum_t g_t x_t, into (B, P), from the rows the adjoint loads anyway.
template <typename T, bool Complex>
void backward(const T* x, const T* grad_y, const T* slope, T* grad_x, const T* q_re, const T* q_im, const T* b, const T* c_re,
              const T* c_im, const T* skip, const T* ck_re, const T* ck_im, T* carry_re, T* carry_im, T* grad_q_re,
              T* grad_q_im, T* grad_b, T* grad_c_re, T* grad_c_im, T* grad_skip, int64_t batch, int64_t length,
              int64_t width, int64_t padded, int64_t order, int64_t grad_batch_stride, int64_t grad_step_stride,
              int threads) {
  typedef typename Vec<T>::type V;
  constexpr int W = lanes<T>(), G = adjoint_group<Complex>();
  const int64_t blocks = padded / W, segments = (length + CHECKPOINT - 1) / CHECKPOINT, groups = order / G;
  const bool stream = streams<T>(batch, length, width);
  const Layout layout{blocks, W, length, width, grad_batch_stride, grad_step_stride};
#pragma omp parallel num_threads(threads)
  {
  const Share share(batch * blocks);
  // The tile's rows of x, of the incoming gradient times the SiLU's slope, and of gx.
  alignas(64) V xs_all[TILE][CHECKPOINT], gs_all[TILE][CHECKPOINT], gx_all[TILE][CHECKPOINT];
  for (int64_t segment = segments - 1; segment >= 0; --segment) {
    const int64_t t0 = segment * CHECKPOINT, steps = std::min(CHECKPOINT, length - t0);
    for (int64_t first = share.first; first < share.last; first += TILE) {
      const Tile tile(layout, first, std::min(TILE, share.last - first), t0);
      for (int64_t t = 0; t < steps; ++t) {
        for (int64_t p = 0; p < tile.count; ++p) {
          const int64_t at = tile.at[p] + t * width, live = tile.live[p];
          xs_all[p][t] = load<T>(x + at, live);
          gs_all[p][t] = load<T>(grad_y + tile.grad_at[p] + t * grad_step_stride, live);
          if (slope) gs_all[p][t] = gs_all[p][t] * load<T>(slope + at, live);
        }
      }
      Fetcher<T> fetch = next_tile<T>(layout, share, first, segment, tile.count * groups * steps, x, slope, grad_y);
      for (int64_t p = 0; p < tile.count; ++p) {
        const int64_t row = (first + p) / blocks, d0 = ((first + p) % blocks) * W;
        const V* xs = xs_all[p];
        const V* gs = gs_all[p];
        V* gx = gx_all[p];
        V kept_re[CHECKPOINT][G], kept_im[Complex ? CHECKPOINT : 1][G];
        const V sk = skip ? load<T>(skip + d0) : V{};
        V skip_sum = {};
        for (int64_t t = 0; t < steps; ++t) {
          gx[t] = sk * gs[t];
          skip_sum += gs[t] * xs[t];
        }
        if (grad_skip) store<T>(grad_skip + row * padded + d0, load<T>(grad_skip + row * padded + d0) + skip_sum);
        for (int64_t n0 = 0; n0 < order; n0 += G) {
          V qr[G], qi[G], bw[G], cr[G], ci[G], hr[G], hi[G], mr[G], mi[G];
          V dqr[G], dqi[G], db[G], dcr[G], dci[G];
          for (int g = 0; g < G; ++g) {
            const int64_t at = (n0 + g) * padded + d0;
            const int64_t kept = ((row * segments + segment) * order) * padded + at;
            const int64_t state = row * order * padded + at;
            qr[g] = load<T>(q_re + at);
            bw[g] = load<T>(b + at);
            cr[g] = load<T>(c_re + at);
            hr[g] = load<T>(ck_re + kept);
            mr[g] = load<T>(carry_re + state);
            if (Complex) {
              qi[g] = load<T>(q_im + at);
              ci[g] = load<T>(c_im + at);
              hi[g] = load<T>(ck_im + kept);
              mi[g] = load<T>(carry_im + state);
            }
            dqr[g] = dqi[g] = db[g] = dcr[g] = dci[g] = V{};
          }
          // The states of this segment, h_{t0} .. h_{t0+steps-1}, again.
          for (int64_t t = 0; t < steps; ++t) {
            fetch();
            for (int g = 0; g < G; ++g) {
              if (Complex) {
                const V re = qr[g] * hr[g] - qi[g] * hi[g] + bw[g] * xs[t];
                hi[g] = qr[g] * hi[g] + qi[g] * hr[g];
                hr[g] = re;
                kept_im[t][g] = hi[g];
              } else {
                hr[g] = qr[g] * hr[g] + bw[g] * xs[t];
              }
              kept_re[t][g] = hr[g];
            }
          }
          for (int64_t t = steps - 1; t >= 0; --t) {
            const V gt = gs[t], xt = xs[t];
            V dx = gx[t];
            for (int g = 0; g < G; ++g) {
              // mu_t = g_t conj(c) + (conj(q) mu_{t+1}, already in m).
              const V ur = mr[g] + gt * cr[g];
              dx += bw[g] * ur;
              db[g] += ur * xt;
              dcr[g] += gt * kept_re[t][g];
              V pr, pi = V{};
              if (t > 0) {
                pr = kept_re[t - 1][g];
                if (Complex) pi = kept_im[t - 1][g];
              } else {
                const int64_t kept = ((row * segments + segment) * order) * padded + (n0 + g) * padded + d0;
                pr = load<T>(ck_re + kept);
                if (Complex) pi = load<T>(ck_im + kept);
              }
              if (Complex) {
                const V ui = mi[g] - gt * ci[g];
                dci[g] -= gt * kept_im[t][g];
                dqr[g] += ur * pr + ui * pi;
                dqi[g] += ui * pr - ur * pi;
                mr[g] = qr[g] * ur + qi[g] * ui;
                mi[g] = qr[g] * ui - qi[g] * ur;
              } else {
                dqr[g] += ur * pr;
                mr[g] = qr[g] * ur;
              }
            }
            gx[t] = dx;
          }
          for (int g = 0; g < G; ++g) {
            const int64_t state = row * order * padded + (n0 + g) * padded + d0;
            store<T>(carry_re + state, mr[g]);
            store<T>(grad_q_re + state, load<T>(grad_q_re + state) + dqr[g]);
            store<T>(grad_b + state, load<T>(grad_b + state) + db[g]);
            store<T>(grad_c_re + state, load<T>(grad_c_re + state) + dcr[g]);
            if (Complex) {
              store<T>(carry_im + state, mi[g]);
              store<T>(grad_q_im + state, load<T>(grad_q_im + state) + dqi[g]);
              store<T>(grad_c_im + state, load<T>(grad_c_im + state) + dci[g]);
            }
          }
        }
      }
      for (int64_t t = 0; t < steps; ++t) {
        for (int64_t p = 0; p < tile.count; ++p) store_out<T>(grad_x + tile.at[p] + t * width, gx_all[p][t], tile.live[p], stream);
      }
    }
  }
  stream_fence();
  }
}

}  // namespace

#define SEQMIX_RECURRENCE(T, suffix)                                                                                  \
  extern "C" void seqmix_recurrence_forward_##suffix(                                                                 \
      const T* x, T* y, T* slope, const T* q_re, const T* q_im, const T* b, const T* c_re, const T* c_im,             \
      const T* skip, T* h_re, T* h_im, T* ck_re, T* ck_im, int64_t batch, int64_t length, int64_t width,              \
      int64_t padded, int64_t order, int apply_silu, int threads) {                                                   \
    (q_im ? forward<T, true> : forward<T, false>)(x, y, slope, q_re, q_im, b, c_re, c_im, skip, h_re, h_im, ck_re,    \
                                                  ck_im, batch, length, width, padded, order, apply_silu, threads);   \
  }                                                                                                                   \
  extern "C" void seqmix_recurrence_backward_##suffix(                                                                \
      const T* x, const T* grad_y, const T* slope, T* grad_x, const T* q_re, const T* q_im, const T* b, const T* c_re, \
      const T* c_im, const T* skip, const T* ck_re, const T* ck_im, T* carry_re, T* carry_im, T* grad_q_re,           \
      T* grad_q_im, T* grad_b, T* grad_c_re, T* grad_c_im, T* grad_skip, int64_t batch, int64_t length,               \
      int64_t width, int64_t padded, int64_t order, int64_t grad_batch_stride, int64_t grad_step_stride,              \
      int threads) {                                                                                                  \
    (q_im ? backward<T, true> : backward<T, false>)(x, grad_y, slope, grad_x, q_re, q_im, b, c_re, c_im, skip, ck_re, \
                                                    ck_im, carry_re, carry_im, grad_q_re, grad_q_im, grad_b,          \
                                                    grad_c_re, grad_c_im, grad_skip, batch, length, width, padded,    \
                                                    order, grad_batch_stride, grad_step_stride, threads);             \
  }

SEQMIX_RECURRENCE(float, f32)
SEQMIX_RECURRENCE(double, f64)

extern "C" int64_t seqmix_recurrence_checkpoint() { return CHECKPOINT; }
extern "C" int64_t seqmix_recurrence_lanes_f32() { return lanes<float>(); }
extern "C" int64_t seqmix_recurrence_lanes_f64() { return lanes<double>(); }
extern "C" int64_t seqmix_recurrence_group() { return GROUP; }
