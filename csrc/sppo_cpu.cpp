// The "cpu" backend of sppo_kernels: fused lm-head sequence log-probs and their gradients, ATen + OpenMP.
//
// Problem. Kept token rows r = 0..M-1 (the rows of hidden whose target scores; masked rows never reach a GEMM),
// each with h_r = hidden[rows[r]] ([H]), target y_r in [0, V) and sequence seq_r in [0, B):
//     a_r = h_r W^T + b                          raw logits [V]
//     z_r = softcap(a_r) / tau                   softcap(a) = c tanh(a / c); c <= 0: no cap
//     logp_s = sum over rows r of s of  z_r[y_r] - lse(z_r)
// For an upstream gradient g_s = dL/dlogp_s:
//     da_r = g_s (onehot(y_r) - softmax(z_r)) dz/da,   dz/da = (1 - (z tau / c)^2) / tau   (1 / tau without cap)
//     dH_r = da_r W,   dW = sum_r da_r^T h_r,   db = sum_r da_r.
//
// Tiling. Rows go in chunks, the vocabulary in tiles (sizes per schedule, below, set from Python). Within a chunk
// the intra-op threads (torch.get_num_threads()) take vocabulary tiles one at a time; a thread computes its tile's
// raw logits with one single-threaded at::mm ([n, H] x [H, vt]), does the elementwise work row by row while the
// tile is in its cache, and later turns the tile into da and runs the gradient GEMMs (at::addmm_) on it. All
// arithmetic is in the compute dtype: float32 for float32/bfloat16/float16 inputs (low-precision tiles are upcast,
// so GEMMs and sums accumulate in float32), float64 for float64 inputs.
//
// Two schedules.
//  * forward + backward (any upstream gradient): the forward keeps the per-row lse ([M]); the backward recomputes
//    each tile's logits. 8NHV FLOPs. Workspace: a [chunk_rows, chunk_cols] tile per thread.
//  * forward with gradient seeds, g_s = slope_s * logp_s + offset_s (the SPPO loss has this form): a chunk packs
//    whole sequences, its [n, V] logits stay in a block until its lse and so its seeds are known, and the gradient
//    is formed from them without a recompute (6NHV FLOPs). Workspace: the block, block_rows x V. A sequence longer
//    than block_rows cannot be held: its rows take the first schedule, with the seeds known after their forward.
// Both: a [rows, H] upcast copy of the chunk's hidden rows and a [rows, H] dH partial per thread; for non-float32
// weights an upcast [cols, H] weight tile per thread.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <optional>
#include <vector>

#ifndef SPPO_SOURCE_HASH
#define SPPO_SOURCE_HASH unknown
#endif
#define SPPO_STRINGIFY2(x) #x
#define SPPO_STRINGIFY(x) SPPO_STRINGIFY2(x)

// Hot float loops are compiled for AVX-512, AVX2 and baseline x86-64, picked at load time (GCC/Clang ifunc).
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define SPPO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPPO_CLONES
#endif

namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------------------------
// Elementwise math. float: exp and tanh as polynomials (<= 1.5 ulp) that the compiler vectorises; double: libm.
// NaN in gives NaN out.
// ---------------------------------------------------------------------------------------------------------------

inline float exp_approx(float x) {
  // exp(x) = 2^k exp(r), k = round(x / ln 2), |r| <= ln 2 / 2 (Cephes expf polynomial).
  const float lo = -87.33654f, hi = 88.0f;
  const float xc = std::min(std::max(x, lo), hi);
  const float k = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = (xc - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float y = p * __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
  const float clipped = x < lo ? 0.0f : (x > hi ? std::numeric_limits<float>::infinity() : y);
  return x != x ? x : clipped;
}

inline float tanh_approx(float x) {
  // |x| < 0.625: odd polynomial (Cephes tanhf); else (1 - e) / (1 + e) with e = exp(-2|x|).
  const float a = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float e = exp_approx(-2.0f * a);
  const float t = a < 0.625f ? a + a * z * p : (1.0f - e) / (1.0f + e);
  return x != x ? x : std::copysign(t, x);
}

inline double exp_approx(double x) { return std::exp(x); }
inline double tanh_approx(double x) { return std::tanh(x); }

// ---------------------------------------------------------------------------------------------------------------
// Row kernels: one row's contiguous segment z[0, len) of a logits tile.
// ---------------------------------------------------------------------------------------------------------------

// Raw a (+ bias) -> logits z = softcap(a) / temperature, in place.
template <typename T>
inline void transform_row(T* z, const T* bias, int64_t len, T softcap, T temperature) {
  if (bias != nullptr) {
    for (int64_t j = 0; j < len; ++j) z[j] += bias[j];
  }
  if (softcap > 0) {
    const T inv_cap = T(1) / softcap, scale = softcap / temperature;
    for (int64_t j = 0; j < len; ++j) z[j] = scale * tanh_approx(z[j] * inv_cap);
  } else {
    const T inv_temp = T(1) / temperature;
    for (int64_t j = 0; j < len; ++j) z[j] *= inv_temp;
  }
}

// Online log-sum-exp: fold z[0, len) into the row's running max m and sum s = sum exp(z - m).
template <typename T>
inline void fold_row(const T* z, int64_t len, T& m, T& s) {
  T tile_max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : tile_max)
  for (int64_t j = 0; j < len; ++j) tile_max = std::max(tile_max, z[j]);
  const T new_max = std::max(m, tile_max);
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) sum += exp_approx(z[j] - new_max);
  s = s * exp_approx(m - new_max) + sum;
  m = new_max;
}

// Logits z -> da = g (onehot(y) - exp(z - lse)) dz/da, in place. y: the target's column in the segment, or -1.
template <typename T>
inline void grad_row(T* z, int64_t len, int64_t y, T lse, T g, T softcap, T temperature) {
  const T zy = y >= 0 ? z[y] : T(0);
  const T scale = g / temperature;
  if (softcap > 0) {
    const T k = temperature / softcap;  // tanh(a / c) = z tau / c
    for (int64_t j = 0; j < len; ++j) {
      const T t = z[j] * k;
      z[j] = -scale * exp_approx(z[j] - lse) * (T(1) - t * t);
    }
    if (y >= 0) z[y] += scale * (T(1) - zy * k * zy * k);
  } else {
    for (int64_t j = 0; j < len; ++j) z[j] = -scale * exp_approx(z[j] - lse);
    if (y >= 0) z[y] += scale;
  }
}

// float entry points, cloned per instruction set; double goes straight to the templates.
SPPO_CLONES void transform_f32(float* z, const float* bias, int64_t len, float softcap, float temperature) {
  transform_row(z, bias, len, softcap, temperature);
}
SPPO_CLONES void fold_f32(const float* z, int64_t len, float& m, float& s) { fold_row(z, len, m, s); }
SPPO_CLONES void grad_f32(float* z, int64_t len, int64_t y, float lse, float g, float softcap, float temperature) {
  grad_row(z, len, y, lse, g, softcap, temperature);
}

inline void transform(float* z, const float* b, int64_t len, float c, float t) { transform_f32(z, b, len, c, t); }
inline void transform(double* z, const double* b, int64_t len, double c, double t) {
  transform_row(z, b, len, c, t);
}
inline void fold(const float* z, int64_t len, float& m, float& s) { fold_f32(z, len, m, s); }
inline void fold(const double* z, int64_t len, double& m, double& s) { fold_row(z, len, m, s); }
inline void grad(float* z, int64_t len, int64_t y, float lse, float g, float c, float t) {
  grad_f32(z, len, y, lse, g, c, t);
}
inline void grad(double* z, int64_t len, int64_t y, double lse, double g, double c, double t) {
  grad_row(z, len, y, lse, g, c, t);
}

// ---------------------------------------------------------------------------------------------------------------
// The problem, its tiling and the gradient accumulators.
// ---------------------------------------------------------------------------------------------------------------

struct Head {
  Tensor hidden;   // [N, H], caller dtype, any strides
  Tensor weight;   // [V, H], caller dtype, any strides
  Tensor bias;     // [V] in the compute dtype, or undefined
  Tensor rows;     // [M] int64: the rows of hidden that score a target
  Tensor targets;  // [M] int64 in [0, V)
  Tensor seq;      // [M] int64 in [0, B)
  double softcap;  // <= 0: no cap
  double temperature;

  int64_t kept() const { return rows.size(0); }
  int64_t vocab() const { return weight.size(0); }
  at::ScalarType compute() const { return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }
  at::TensorOptions compute_options() const { return hidden.options().dtype(compute()); }
  // [n, H] compute-dtype copy of kept rows [begin, begin + n).
  Tensor hidden_rows(int64_t begin, int64_t n) const {
    return hidden.index_select(0, rows.narrow(0, begin, n)).to(compute()).contiguous();
  }
  // [vt, H] weight rows [v0, v0 + vt) in the compute dtype (a view for float32/float64 weights).
  Tensor weight_tile(int64_t v0, int64_t vt) const { return weight.narrow(0, v0, vt).to(compute()); }
  // The same problem restricted to the kept rows listed in index.
  Head subset(const std::vector<int64_t>& index) const {
    const Tensor i = at::tensor(index, rows.options());
    Head sub = *this;
    sub.rows = rows.index_select(0, i);
    sub.targets = targets.index_select(0, i);
    sub.seq = seq.index_select(0, i);
    return sub;
  }
};

// How a pass cuts its rows (chunks of at most `rows`) and the vocabulary (`count` tiles of `width` columns).
struct Tiles {
  int64_t rows, width, count;
  Tiles(int64_t rows_, int64_t width_, int64_t vocab)
      : rows(rows_), width(std::min(width_, vocab)), count((vocab + width - 1) / width) {}
};

struct Grads {
  Tensor dh;             // [N, H] in hidden's dtype, the output: each kept row written by its chunk, others 0
  Tensor dw;             // [V, H] compute-dtype accumulator, or undefined
  Tensor db;             // [V] compute-dtype accumulator, or undefined
  bool started = false;  // dw/db hold a contribution; before that GEMMs overwrite them (beta = 0)
};

// ---------------------------------------------------------------------------------------------------------------
// Chunks. Within a chunk the vocabulary tiles are handed out to the intra-op threads one at a time; a thread owns
// its tile from GEMM to gradient, so the GEMMs run single-threaded side by side (the FLOP rate of one two-thread
// GEMM here) and a chunk costs two parallel regions, not several per tile: a descheduled thread then delays only
// its current tile. h: [n, H] chunk rows (compute dtype); z: an [n, vt] view, unit column stride; w_t: [vt, H].
// ---------------------------------------------------------------------------------------------------------------

// Runs fn(item, thread) for item in [0, count) on torch's intra-op thread count (dynamic schedule). Workers get
// the caller's grad and inference modes and nothing else of its thread-local state: copying all of it (saved-tensor
// hooks are Python objects) would need the GIL, which the caller may hold -- a deadlock under ZeRO-3 or activation
// checkpointing. ATen calls inside run single-threaded (nested parallelism is off); the first exception is
// rethrown after the loop.
template <typename F>
void parallel_items(int64_t count, const F& fn) {
  const bool grad_mode = at::GradMode::is_enabled();
  const bool inference_mode = c10::InferenceMode::is_enabled();
  const int threads = at::get_num_threads();
  std::exception_ptr error;
  std::atomic<bool> failed{false};
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t i = 0; i < count; ++i) {
    if (failed.load()) continue;
    try {
      const c10::InferenceMode inference_guard(inference_mode);
      const at::AutoGradMode grad_guard(grad_mode);
      fn(i, omp_get_thread_num());
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

// Scratch of one pass. logits: the block [count, rows, width] that keeps a chunk's logits (tile-major, so a tile
// is one dense matrix), or undefined: then each thread works in its own [rows, width] tile.
template <typename T>
struct Scratch {
  Tiles tiles;
  Tensor logits;
  std::vector<Tensor> tile;  // per thread, allocated on first use
  std::vector<Tensor> dh;    // per thread: [n, H] partial dH of the current chunk, undefined until used
  std::vector<T> m, s;       // per tile and row: max and sum of exp(z - max) (merged in tile order: deterministic)

  Scratch(const Head& p, const Tiles& t, bool keep_logits)
      : tiles(t),
        logits(keep_logits ? at::empty({t.count, t.rows, t.width}, p.compute_options()) : Tensor()),
        tile(at::get_num_threads()),
        dh(at::get_num_threads()),
        m(t.count * t.rows),
        s(t.count * t.rows) {}
  // Where tile t of the current chunk (n rows) lives.
  Tensor z(const Head& p, int64_t t, int thread, int64_t n) {
    const int64_t vt = std::min(tiles.width, p.vocab() - t * tiles.width);
    if (logits.defined()) return logits.select(0, t).narrow(0, 0, n).narrow(1, 0, vt);
    if (!tile[thread].defined()) tile[thread] = at::empty({tiles.rows, tiles.width}, p.compute_options());
    return tile[thread].narrow(0, 0, n).narrow(1, 0, vt);
  }
};

// z = transform(h w_t^T + b[v0:]), one thread.
template <typename T>
void logits_tile(const Head& p, const Tensor& h, int64_t v0, const Tensor& w_t, Tensor z) {
  at::mm_out(z, h, w_t.t());
  const int64_t n = z.size(0), vt = z.size(1), ld = z.stride(0);
  T* base = z.data_ptr<T>();
  const T* b = p.bias.defined() ? p.bias.data_ptr<T>() + v0 : nullptr;
  for (int64_t r = 0; r < n; ++r) {
    transform(base + r * ld, b, vt, static_cast<T>(p.softcap), static_cast<T>(p.temperature));
  }
}

// Forward of the chunk of kept rows [begin, begin + n): lse[r] and the target logit picked[r] of each row
// (the logits stay in sc.logits when it is defined).
template <typename T>
void chunk_forward(const Head& p, const Tensor& h, int64_t begin, Scratch<T>& sc, T* lse, T* picked) {
  const int64_t n = h.size(0), width = sc.tiles.width, tiles = sc.tiles.count;
  const int64_t* y = p.targets.data_ptr<int64_t>() + begin;
  parallel_items(tiles, [&](int64_t t, int thread) {
    Tensor z = sc.z(p, t, thread, n);
    const int64_t v0 = t * width, vt = z.size(1);
    logits_tile<T>(p, h, v0, p.weight_tile(v0, vt), z);
    const T* base = z.data_ptr<T>();
    for (int64_t r = 0; r < n; ++r) {
      const T* row = base + r * z.stride(0);
      T m = -std::numeric_limits<T>::infinity(), s = 0;
      fold(row, vt, m, s);
      sc.m[t * n + r] = m;
      sc.s[t * n + r] = s;
      const int64_t col = y[r] - v0;
      if (col >= 0 && col < vt) picked[r] = row[col];  // exactly one tile holds a row's target
    }
  });
  for (int64_t r = 0; r < n; ++r) {  // merge the tiles' log-sum-exp
    T top = -std::numeric_limits<T>::infinity(), sum = 0;
    for (int64_t t = 0; t < tiles; ++t) top = std::max(top, sc.m[t * n + r]);
    for (int64_t t = 0; t < tiles; ++t) sum += sc.s[t * n + r] * exp_approx(sc.m[t * n + r] - top);
    lse[r] = top + std::log(sum);
  }
}

// Gradient of the chunk of kept rows [begin, begin + n) for the upstream gradient g[r] of each row, from the
// logits kept by chunk_forward in sc.logits, or else recomputed tile by tile. Adds to gr.dw / gr.db and writes
// the rows' dH into gr.dh.
template <typename T>
void chunk_grad(const Head& p, const Tensor& h, int64_t begin, Scratch<T>& sc, const T* lse, const T* g, Grads& gr) {
  const int64_t n = h.size(0), width = sc.tiles.width;
  const int64_t* y = p.targets.data_ptr<int64_t>() + begin;
  const T softcap = static_cast<T>(p.softcap), temperature = static_cast<T>(p.temperature);
  const int beta = gr.started ? 1 : 0;  // the first contribution overwrites dw / db
  std::fill(sc.dh.begin(), sc.dh.end(), Tensor());
  parallel_items(sc.tiles.count, [&](int64_t t, int thread) {
    Tensor z = sc.z(p, t, thread, n);
    const int64_t v0 = t * width, vt = z.size(1);
    const Tensor w_t = p.weight_tile(v0, vt);
    if (!sc.logits.defined()) logits_tile<T>(p, h, v0, w_t, z);
    T* base = z.data_ptr<T>();
    for (int64_t r = 0; r < n; ++r) {  // logits -> da, in place
      const int64_t col = y[r] - v0;
      grad(base + r * z.stride(0), vt, col >= 0 && col < vt ? col : -1, lse[r], g[r], softcap, temperature);
    }
    if (gr.dw.defined()) gr.dw.narrow(0, v0, vt).addmm_(z.t(), h, beta, 1);
    if (gr.db.defined()) {
      Tensor db_t = gr.db.narrow(0, v0, vt);
      if (beta) {
        db_t.add_(z.sum(0));
      } else {
        db_t.copy_(z.sum(0));
      }
    }
    if (gr.dh.defined()) {
      Tensor& dh = sc.dh[thread];
      if (dh.defined()) {
        dh.addmm_(z, w_t);
      } else {
        dh = at::mm(z, w_t);
      }
    }
  });
  gr.started = true;
  if (!gr.dh.defined()) return;
  Tensor dh_c;
  for (const Tensor& part : sc.dh) {
    if (part.defined()) dh_c = dh_c.defined() ? dh_c.add_(part) : part;
  }
  gr.dh.index_copy_(0, p.rows.narrow(0, begin, n), dh_c.to(gr.dh.scalar_type()));
}

// ---------------------------------------------------------------------------------------------------------------
// Passes over all kept rows of a Head.
// ---------------------------------------------------------------------------------------------------------------

// Forward in plain chunks of tiles.rows rows: lse [M] (written) and logp [B] (added to).
template <typename T>
void forward_pass(const Head& p, const Tiles& tiles, T* lse, std::vector<double>& logp) {
  const int64_t M = p.kept();
  const int64_t* seq = p.seq.data_ptr<int64_t>();
  Scratch<T> sc(p, tiles, false);
  std::vector<T> picked(tiles.rows);
  for (int64_t begin = 0; begin < M; begin += tiles.rows) {
    const int64_t n = std::min(tiles.rows, M - begin);
    chunk_forward<T>(p, p.hidden_rows(begin, n), begin, sc, lse + begin, picked.data());
    for (int64_t r = 0; r < n; ++r) logp[seq[begin + r]] += double(picked[r]) - double(lse[begin + r]);
  }
}

// Backward by recomputation in plain chunks of tiles.rows rows, for lse [M] and the per-row upstream g [M].
template <typename T>
void backward_pass(const Head& p, const Tiles& tiles, const T* lse, const T* g, Grads& gr) {
  const int64_t M = p.kept();
  Scratch<T> sc(p, tiles, false);
  for (int64_t begin = 0; begin < M; begin += tiles.rows) {
    const int64_t n = std::min(tiles.rows, M - begin);
    chunk_grad<T>(p, p.hidden_rows(begin, n), begin, sc, lse + begin, g + begin, gr);
  }
}

// Forward with the gradient formed from the kept logits, for rows sorted by sequence with every sequence at most
// tiles.rows rows long: chunks pack whole sequences, so each chunk's seeds g_s = slope_s logp_s + offset_s are
// known once its forward is done. Writes lse [M], adds to logp [B] and gr.
template <typename T>
void seeded_pass(const Head& p, const Tiles& tiles, T* lse, std::vector<double>& logp, const double* slope,
                 const double* offset, Grads& gr) {
  const int64_t M = p.kept();
  const int64_t* seq = p.seq.data_ptr<int64_t>();
  Scratch<T> sc(p, tiles, true);
  std::vector<T> picked(tiles.rows), g(tiles.rows);
  for (int64_t begin = 0; begin < M;) {
    int64_t end = begin;  // take whole sequences while they fit
    while (end < M) {
      int64_t next = end;
      while (next < M && seq[next] == seq[end]) ++next;
      if (next - begin > tiles.rows) break;
      end = next;
    }
    const int64_t n = end - begin;
    const Tensor h = p.hidden_rows(begin, n);
    chunk_forward<T>(p, h, begin, sc, lse + begin, picked.data());
    for (int64_t r = 0; r < n; ++r) logp[seq[begin + r]] += double(picked[r]) - double(lse[begin + r]);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t sq = seq[begin + r];
      g[r] = static_cast<T>(slope[sq] * logp[sq] + offset[sq]);
    }
    chunk_grad<T>(p, h, begin, sc, lse + begin, g.data(), gr);
    begin = end;
  }
}

// Forward; with seeds also the gradient for g_s = slope_s logp_s + offset_s. Sequences that fit the block take
// the seeded pass (6NHV); longer ones a forward pass, then a backward pass with their now-known seeds (8NHV).
// Returns logp [B] (double accumulation); writes lse [M].
template <typename T>
std::vector<double> forward_rows(const Head& p, int64_t num_seqs, const Tiles& block, const Tiles& chunk,
                                 Tensor& lse, const double* slope, const double* offset, Grads* gr) {
  std::vector<double> logp(num_seqs, 0.0);
  if (gr == nullptr) {
    forward_pass<T>(p, chunk, lse.data_ptr<T>(), logp);
    return logp;
  }
  const int64_t* seq = p.seq.data_ptr<int64_t>();
  std::vector<int64_t> length(num_seqs, 0), fits, longer;
  for (int64_t r = 0; r < p.kept(); ++r) ++length[seq[r]];
  for (int64_t r = 0; r < p.kept(); ++r) (length[seq[r]] <= block.rows ? fits : longer).push_back(r);
  std::stable_sort(fits.begin(), fits.end(), [&](int64_t a, int64_t b) { return seq[a] < seq[b]; });

  if (!fits.empty()) {
    const Head sub = p.subset(fits);
    Tensor sub_lse = at::empty({sub.kept()}, p.compute_options());
    seeded_pass<T>(sub, block, sub_lse.data_ptr<T>(), logp, slope, offset, *gr);
    lse.index_copy_(0, at::tensor(fits, p.rows.options()), sub_lse);
  }
  if (!longer.empty()) {
    const Head sub = p.subset(longer);
    Tensor sub_lse = at::empty({sub.kept()}, p.compute_options());
    forward_pass<T>(sub, chunk, sub_lse.data_ptr<T>(), logp);
    std::vector<T> g(sub.kept());
    const int64_t* sub_seq = sub.seq.data_ptr<int64_t>();
    for (int64_t r = 0; r < sub.kept(); ++r) {
      g[r] = static_cast<T>(slope[sub_seq[r]] * logp[sub_seq[r]] + offset[sub_seq[r]]);
    }
    backward_pass<T>(sub, chunk, sub_lse.data_ptr<T>(), g.data(), *gr);
    lse.index_copy_(0, at::tensor(longer, p.rows.options()), sub_lse);
  }
  return logp;
}

// ---------------------------------------------------------------------------------------------------------------
// Entry points. Tiling: block_rows x block_cols tiles for the seeded pass (its block holds block_rows x V logits),
// chunk_rows x chunk_cols tiles for the plain forward and backward passes.
// ---------------------------------------------------------------------------------------------------------------

Head make_head(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& rows,
               const Tensor& targets, const Tensor& seq, double softcap, double temperature) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "the cpu backend needs CPU tensors");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden must be [N, H] and weight [V, H]");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "hidden and weight dtypes differ");
  TORCH_CHECK(rows.scalar_type() == at::kLong && targets.scalar_type() == at::kLong && seq.scalar_type() == at::kLong,
              "rows, targets and seq must be int64");
  TORCH_CHECK(rows.dim() == 1 && targets.sizes() == rows.sizes() && seq.sizes() == rows.sizes(),
              "rows, targets and seq must be [M]");
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  Head p;
  p.hidden = hidden.detach();
  p.weight = weight.detach();
  p.bias = bias.has_value() ? bias->detach().to(p.compute()).contiguous() : Tensor();
  TORCH_CHECK(!p.bias.defined() || p.bias.sizes() == at::IntArrayRef{weight.size(0)}, "bias must be [V]");
  p.rows = rows.contiguous();
  p.targets = targets.contiguous();
  p.seq = seq.contiguous();
  p.softcap = softcap;
  p.temperature = temperature;
  return p;
}

Tiles make_tiles(int64_t rows, int64_t cols, int64_t vocab) {
  TORCH_CHECK(rows > 0 && cols > 0, "tile sizes must be positive");
  return Tiles(rows, cols, vocab);
}

Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options, bool poison) {
  Tensor out = at::empty(sizes, options);
  if (poison) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

Grads make_grads(const Head& p, bool need_h, bool need_w, bool need_b, bool poison) {
  Grads gr;
  if (need_h) {
    gr.dh = new_output(p.hidden.sizes(), p.hidden.options(), poison);
    Tensor masked = at::ones({p.hidden.size(0)}, p.rows.options().dtype(at::kBool)).index_fill_(0, p.rows, false);
    gr.dh.index_fill_(0, masked.nonzero().squeeze(1), 0);
  }
  if (need_w) gr.dw = new_output(p.weight.sizes(), p.compute_options(), poison);
  if (need_b && p.bias.defined()) gr.db = new_output({p.vocab()}, p.compute_options(), poison);
  return gr;
}

// [dh, dw, db] in the callers' dtypes (undefined where not asked for).
std::vector<Tensor> finish_grads(Grads& gr, const Head& p, const std::optional<Tensor>& bias) {
  if (!gr.started) {  // no kept rows: nothing was accumulated
    if (gr.dw.defined()) gr.dw.zero_();
    if (gr.db.defined()) gr.db.zero_();
  }
  Tensor dw = gr.dw.defined() ? gr.dw.to(p.weight.scalar_type()) : Tensor();
  Tensor db = gr.db.defined() ? gr.db.to(bias->scalar_type()) : Tensor();
  return {gr.dh, dw, db};
}

// Forward. Returns [logps [B] (float32; float64 for float64 inputs), lse [M] (compute dtype), dh, dw, db]; the
// gradients are formed only when slope and offset ([B] float64) are given, for g_s = slope_s logp_s + offset_s.
std::vector<Tensor> forward(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                            const Tensor& rows, const Tensor& targets, const Tensor& seq, int64_t num_seqs,
                            double softcap, double temperature, const std::optional<Tensor>& slope,
                            const std::optional<Tensor>& offset, bool need_h, bool need_w, bool need_b,
                            int64_t block_rows, int64_t block_cols, int64_t chunk_rows, int64_t chunk_cols,
                            bool poison) {
  const Head p = make_head(hidden, weight, bias, rows, targets, seq, softcap, temperature);
  const Tiles block = make_tiles(block_rows, block_cols, p.vocab());
  const Tiles chunk = make_tiles(chunk_rows, chunk_cols, p.vocab());
  const bool seeded = slope.has_value() && offset.has_value();
  Tensor slope64, offset64;
  if (seeded) {
    slope64 = slope->to(at::kDouble).contiguous();
    offset64 = offset->to(at::kDouble).contiguous();
    TORCH_CHECK(slope64.numel() == num_seqs && offset64.numel() == num_seqs, "slope and offset must be [B]");
  }
  Grads gr = seeded ? make_grads(p, need_h, need_w, need_b, poison) : Grads();
  Tensor lse = new_output({p.kept()}, p.compute_options(), poison);
  const double* sl = seeded ? slope64.data_ptr<double>() : nullptr;
  const double* of = seeded ? offset64.data_ptr<double>() : nullptr;
  Grads* grp = seeded ? &gr : nullptr;
  const std::vector<double> logp = p.compute() == at::kDouble
                                       ? forward_rows<double>(p, num_seqs, block, chunk, lse, sl, of, grp)
                                       : forward_rows<float>(p, num_seqs, block, chunk, lse, sl, of, grp);
  Tensor logps = new_output({num_seqs}, hidden.options().dtype(at::kDouble), poison);
  std::copy(logp.begin(), logp.end(), logps.data_ptr<double>());
  std::vector<Tensor> out = {logps.to(p.compute()), lse};
  if (seeded) {
    for (Tensor& t : finish_grads(gr, p, bias)) out.push_back(t);
  } else {
    out.insert(out.end(), 3, Tensor());
  }
  return out;
}

// Backward for any upstream gradient grad [B]: recomputes the logits from lse [M]. Returns [dh, dw, db].
std::vector<Tensor> backward(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                             const Tensor& rows, const Tensor& targets, const Tensor& seq, const Tensor& lse,
                             const Tensor& grad, double softcap, double temperature, bool need_h, bool need_w,
                             bool need_b, int64_t chunk_rows, int64_t chunk_cols, bool poison) {
  const Head p = make_head(hidden, weight, bias, rows, targets, seq, softcap, temperature);
  const Tiles chunk = make_tiles(chunk_rows, chunk_cols, p.vocab());
  TORCH_CHECK(lse.numel() == p.kept() && lse.scalar_type() == p.compute(), "lse must be [M] in the compute dtype");
  Grads gr = make_grads(p, need_h, need_w, need_b, poison);
  const Tensor g = grad.detach().to(p.compute()).index_select(0, p.seq).contiguous();  // per kept row
  const Tensor l = lse.contiguous();
  if (p.compute() == at::kDouble) {
    backward_pass<double>(p, chunk, l.data_ptr<double>(), g.data_ptr<double>(), gr);
  } else {
    backward_pass<float>(p, chunk, l.data_ptr<float>(), g.data_ptr<float>(), gr);
  }
  return finish_grads(gr, p, bias);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sppo_kernels' fused lm-head log-prob kernels for the CPU (csrc/sppo_cpu.cpp)";
  // The GIL is released while the kernels run: other Python threads go on, and nothing here needs Python.
  m.def("forward", &forward, "logps, lse (and the seeded gradient) of the kept token rows",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "dh, dw, db for a per-sequence upstream gradient, by recomputation",
        py::call_guard<py::gil_scoped_release>());
  m.def("num_threads", [] { return at::get_num_threads(); }, "the intra-op thread count the kernels use");
  m.def("source_hash", [] { return std::string(SPPO_STRINGIFY(SPPO_SOURCE_HASH)); }, "hash of the built source");
}
