// The "cpu" backend of sppo_kernels: fused lm-head sequence log-probs and their gradients, ATen + OpenMP + BLAS.
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
// Precision. Logits, log-sum-exp, da and every sum are float32 (float64 for float64 inputs); logits are never
// rounded to a 16-bit type. GEMM operands: float32 and float64 inputs as they are; bfloat16 inputs as they are, in
// GEMMs with float32 accumulation and output (gemm.h), da entering the gradient GEMMs as two bfloat16 parts hi + lo
// (hi = bf16(da), lo = bf16(da - hi): da to ~16 bits, far below the rounding of the bf16 gradients returned) or,
// when asked, as hi alone; float16 inputs upcast to float32 per tile (no float16 GEMM is faster here).
//
// Two schedules, both parallel over vocabulary tiles on torch's intra-op threads with single-threaded GEMMs (one
// thread owns a tile from its GEMM through its elementwise work to its gradient GEMMs, while it is in cache):
//  * Two passes (8NHV FLOPs), any upstream gradient and any dtype. Forward: each thread takes a part of the
//    vocabulary and sweeps all kept rows over each of its tiles (the [cols, H] weight tile stays in cache, W is read
//    once), keeping per-part running log-sum-exps, merged in part order (deterministic for any thread count).
//    Gradient: the same sweep, recomputing each [rows, cols] logits tile; a tile's dW rows are summed over all rows
//    by one thread in a [cols, H] float32 accumulator and written once (bfloat16/float16 weights: one rounding).
//    Workspace: the kept hidden rows in the operand dtype [M, H], a [M, H] float32 dH partial per thread, and per
//    thread a logits tile, its bf16 parts and the dW tile accumulator.
//  * Seeded block (6NHV), for the SPPO loss (g_s = slope_s logp_s + offset_s) with float32/float64 weights: a chunk
//    packs whole sequences, its [n, V] logits stay in a block until its lse and so its seeds are known, and dW
//    (accumulated in place in the float32 output), dH and db are formed from them without a recompute. Workspace:
//    the block, block_rows x V. A sequence longer than block_rows cannot be held: its rows take the two passes.
//    Low-precision weights always take the two passes: accumulating dW across chunks would need a float32 [V, H]
//    buffer, twice the bf16 gradient itself.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "gemm.h"
#include "row_math.h"

#ifndef SPPO_SOURCE_HASH
#define SPPO_SOURCE_HASH unknown
#endif
#define SPPO_STRINGIFY2(x) #x
#define SPPO_STRINGIFY(x) SPPO_STRINGIFY2(x)

namespace {

using at::Tensor;
using sppo::Gemm;
using BF16 = c10::BFloat16;

// Parts of the vocabulary in the forward sweep: fixed (not the thread count), so log-probs are bit-identical for
// any thread count; enough for dynamic load balance on a few threads.
constexpr int64_t kForwardParts = 32;

// ---------------------------------------------------------------------------------------------------------------
// The problem, its tiling and the gradient outputs.
// ---------------------------------------------------------------------------------------------------------------

struct Head {
  Tensor hidden;   // [N, H], caller dtype, any strides
  Tensor weight;   // [V, H], caller dtype, any strides
  Tensor bias;     // [V] in the compute dtype, contiguous, or undefined
  Tensor rows;     // [M] int64: the rows of hidden that score a target
  Tensor targets;  // [M] int64 in [0, V)
  Tensor seq;      // [M] int64 in [0, B)
  double softcap;  // <= 0: no cap
  double temperature;
  Gemm gemm;
  bool split_grad = false;  // bfloat16 operands: da as hi + lo (else hi and the sparse correction)

  int64_t kept() const { return rows.size(0); }
  int64_t vocab() const { return weight.size(0); }
  int64_t width() const { return weight.size(1); }
  at::ScalarType compute() const { return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }
  at::TensorOptions compute_options() const { return hidden.options().dtype(compute()); }
  // The weight is in the compute dtype: dW accumulates in place in the output.
  bool weight_in_compute() const { return weight.scalar_type() == compute(); }
  // [n, H] kept rows [begin, begin + n) in the operand dtype, contiguous.
  Tensor hidden_rows(int64_t begin, int64_t n, at::ScalarType operand) const {
    return hidden.index_select(0, rows.narrow(0, begin, n)).to(operand).contiguous();
  }
  // [vt, H] weight rows [v0, v0 + vt) in the operand dtype with unit column stride (a view when possible).
  Tensor weight_tile(int64_t v0, int64_t vt, at::ScalarType operand) const {
    Tensor t = weight.narrow(0, v0, vt).to(operand);
    return t.stride(1) == 1 ? t : t.contiguous();
  }
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

template <typename Op>
constexpr at::ScalarType scalar_type_of() {
  if constexpr (std::is_same_v<Op, double>) return at::kDouble;
  if constexpr (std::is_same_v<Op, BF16>) return at::kBFloat16;
  return at::kFloat;
}

// How a pass cuts its rows (chunks of at most `rows`) and the vocabulary (`count` tiles of `width` columns).
struct Tiles {
  int64_t rows, width, count;
  Tiles(int64_t rows_, int64_t width_, int64_t vocab)
      : rows(rows_), width(std::min(width_, vocab)), count(vocab == 0 ? 0 : (vocab + width - 1) / width) {}
  int64_t cols(int64_t t, int64_t vocab) const { return std::min(width, vocab - t * width); }
};

struct Grads {
  Tensor dh;             // [N, H] in hidden's dtype, the output: each kept row written once, others 0
  Tensor dw;             // [V, H] in weight's dtype, the output
  Tensor db;             // [V] in bias's dtype, the output
  bool started = false;  // dw / db hold a contribution (in-place accumulation); before that GEMMs overwrite them
};

// Runs fn(item, thread) for item in [0, count) on torch's intra-op thread count (dynamic schedule), BLAS
// single-threaded in each worker. Workers get the caller's grad and inference modes and nothing else of its
// thread-local state: copying all of it (saved-tensor hooks are Python objects) would need the GIL, which the
// caller may hold -- a deadlock under ZeRO-3 or activation checkpointing. ATen calls inside run single-threaded
// (nested parallelism is off); the first exception is rethrown after the loop.
template <typename F>
void parallel_items(const Gemm& gemm, int64_t count, const F& fn) {
  const bool grad_mode = at::GradMode::is_enabled();
  const bool inference_mode = c10::InferenceMode::is_enabled();
  const int threads = at::get_num_threads();
  std::exception_ptr error;
  std::atomic<bool> failed{false};
#pragma omp parallel num_threads(threads)
  {
    const sppo::WorkerBlas blas(gemm);
#pragma omp for schedule(dynamic, 1)
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
  }
  if (error) std::rethrow_exception(error);
}

// da[row, col] - bf16(da[row, col]) of a logits tile, added to dW and dH after the rounded GEMMs.
struct Correction {
  int64_t row, col;
  float lo;
};

// Per-thread buffers, allocated on first use (flat, grown when a larger one is asked for).
struct ThreadScratch {
  Tensor z;       // logits tile [rows, cols] (compute dtype)
  Tensor hi, lo;  // bf16 parts of da [rows, cols]
  Tensor dw, db;  // dW / db tile accumulators [cols, H] / [cols] (compute dtype), for low-precision weights
  Tensor dh;      // dH partial of the thread (compute dtype), rows as the pass says
  bool dh_started = false;
  std::vector<Correction> corrections;  // exact parts of the current vocabulary tile's largest da entries (bf16)
};

template <typename E>
E* buffer(Tensor& t, int64_t numel, at::ScalarType type) {
  if (!t.defined() || t.numel() < numel) t = at::empty({numel}, at::TensorOptions().dtype(type));
  return t.data_ptr<E>();
}

// The sum of the threads' dH partials, [rows, H] (their first rows x H elements).
inline Tensor sum_partials(std::vector<ThreadScratch>& scratch, int64_t rows, int64_t H) {
  Tensor dh;
  for (ThreadScratch& sc : scratch) {
    if (!sc.dh_started) continue;
    Tensor part = sc.dh.narrow(0, 0, rows * H).view({rows, H});
    dh = dh.defined() ? dh.add_(part) : part;
  }
  return dh;
}

// Logits tile z[n, vt] (row stride ldz) = transform(h w_t^T + b[v0:]); h: [n, H] (row stride ldh), w_t: [vt, H].
template <typename T, typename Op>
void logits_tile(const Head& p, const Op* h, int64_t ldh, int64_t n, const Tensor& w_t, int64_t v0, T* z,
                 int64_t ldz) {
  const int64_t H = p.width(), vt = w_t.size(0);
  sppo::gemm(p.gemm, false, true, n, vt, H, h, ldh, w_t.data_ptr<Op>(), w_t.stride(0), T(0), z, ldz);
  const T* b = p.bias.defined() ? p.bias.data_ptr<T>() + v0 : nullptr;
  if (b == nullptr && p.softcap <= 0 && p.temperature == 1.0) return;
  for (int64_t r = 0; r < n; ++r) {
    sppo::transform(z + r * ldz, b, vt, static_cast<T>(p.softcap), static_cast<T>(p.temperature));
  }
}

// db (+)= the column sums of the da tile z [n, vt] (row stride ldz); beta 0 overwrites.
template <typename T>
void add_column_sums(const T* z, int64_t n, int64_t vt, int64_t ldz, T* db, T beta) {
  if (beta == T(0)) std::fill(db, db + vt, T(0));
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = 0; j < vt; ++j) db[j] += z[r * ldz + j];
  }
}

// With bfloat16 operands and hi alone (no lo), the entries of da with |da| >= kExactShare |g| / tau are made exact
// by a sparse correction: non-target entries are |g| p_v dz/da <= |g| p_v / tau, so at most 1 / kExactShare of them
// per row (plus the target) qualify, and the rounding error left on the others has a squared sum below
// kExactShare (|g| / tau)^2 per row: about kExactShare times the error of rounding dH and dW to bfloat16 at the end.
constexpr double kExactShare = 1.0 / 64;

// The da tile z [n, vt] (row stride ldz) of kept rows [row0, row0 + n) as bf16 parts hi (and lo, when split)
// [n, vt]; without lo, sc.corrections gets the exact remainders of the large entries (applied once per vocabulary
// tile). g: the rows' upstream gradient. Returns {hi, lo or null}.
std::pair<BF16*, BF16*> split_tile(const Head& p, ThreadScratch& sc, const float* z, int64_t row0, int64_t n,
                                   int64_t vt, int64_t ldz, const float* g) {
  BF16* hi = buffer<BF16>(sc.hi, n * vt, at::kBFloat16);
  BF16* lo = p.split_grad ? buffer<BF16>(sc.lo, n * vt, at::kBFloat16) : nullptr;
  for (int64_t r = 0; r < n; ++r) {
    const float* da = z + r * ldz;
    uint16_t* hr = reinterpret_cast<uint16_t*>(hi + r * vt);
    sppo::split(da, vt, hr, lo ? reinterpret_cast<uint16_t*>(lo + r * vt) : nullptr);
    if (lo != nullptr) continue;
    const float exact_from = static_cast<float>(kExactShare * std::fabs(g[r]) / p.temperature);
    for (int64_t j0 = 0; j0 < vt; j0 += 64) {  // most blocks of 64 hold no large entry: skip them on their max
      const int64_t end = std::min(vt, j0 + 64);
      float block_max = 0.0f;
#pragma omp simd reduction(max : block_max)
      for (int64_t j = j0; j < end; ++j) block_max = std::max(block_max, std::fabs(da[j]));
      if (!(block_max >= exact_from)) continue;
      for (int64_t j = j0; j < end; ++j) {
        if (std::fabs(da[j]) >= exact_from) sc.corrections.push_back({row0 + r, j, da[j] - sppo::bf16_value(hr[j])});
      }
    }
  }
  return {hi, lo};
}

// For each correction (row r, column j, lo) of a vocabulary tile: dW tile row j ([vt, H]) += lo h_r and dH row r
// ([M, H]) += lo w_j; h: the kept rows (row stride ldh), w: the weight tile (row stride ldw). Clears the list.
void apply_corrections(ThreadScratch& sc, int64_t H, const BF16* h, int64_t ldh, const BF16* w, int64_t ldw,
                       float* dw, float* dh) {
  for (const Correction& c : sc.corrections) {
    const BF16* hr = h + c.row * ldh;
    const BF16* wr = w + c.col * ldw;
    if (dw != nullptr) {
      for (int64_t k = 0; k < H; ++k) dw[c.col * H + k] += c.lo * static_cast<float>(hr[k]);
    }
    if (dh != nullptr) {
      for (int64_t k = 0; k < H; ++k) dh[c.row * H + k] += c.lo * static_cast<float>(wr[k]);
    }
  }
  sc.corrections.clear();
}

// The tile src (compute dtype, contiguous, out's shape) into out (output dtype), rounded once: bfloat16 by the
// cloned rounding loop (ATen's copy_ converts a [1024, 1024] tile in 0.3 ms on one thread), others by copy_.
template <typename T>
void write_tile(const T* src, Tensor out) {
  if constexpr (std::is_same_v<T, float>) {
    if (out.scalar_type() == at::kBFloat16 && out.is_contiguous()) {
      sppo::split(src, out.numel(), reinterpret_cast<uint16_t*>(out.data_ptr<BF16>()), nullptr);
      return;
    }
  }
  out.copy_(at::from_blob(const_cast<T*>(src), out.sizes(), at::TensorOptions().dtype(scalar_type_of<T>())));
}

// BLAS (MKL / ATen): da tile (in z, [n, vt], row stride ldz; kept rows [row0, row0 + n)) -> dW tile [vt, H] (+)=
// da^T h, dH rows [n, H] (+)= da w_t, db (+)= column sums. h: [n, H] (row stride ldh), w: [vt, H] (row stride
// ldw). beta 0 overwrites, 1 adds; dw / db / dh may be null (not asked for). g: the rows' upstream gradient.
template <typename T, typename Op>
void blas_gradient(const Head& p, ThreadScratch& sc, const T* z, int64_t row0, int64_t n, int64_t vt, int64_t ldz,
                   const T* g, const Op* h, int64_t ldh, const Op* w, int64_t ldw, T* dw, T* db, T beta_w, T* dh,
                   T beta_h) {
  const int64_t H = p.width();
  if (db != nullptr) add_column_sums(z, n, vt, ldz, db, beta_w);
  if constexpr (std::is_same_v<Op, BF16>) {
    const auto [hi, lo] = split_tile(p, sc, z, row0, n, vt, ldz, g);
    for (const BF16* part : {static_cast<const BF16*>(hi), static_cast<const BF16*>(lo)}) {
      if (part == nullptr) continue;
      if (dw != nullptr) sppo::gemm(p.gemm, true, false, vt, H, n, part, vt, h, ldh, beta_w, dw, H);
      if (dh != nullptr) sppo::gemm(p.gemm, false, false, n, H, vt, part, vt, w, ldw, beta_h, dh, H);
      beta_w = beta_h = T(1);
    }
  } else {
    if (dw != nullptr) sppo::gemm(p.gemm, true, false, vt, H, n, z, ldz, h, ldh, beta_w, dw, H);
    if (dh != nullptr) sppo::gemm(p.gemm, false, false, n, H, vt, z, ldz, w, ldw, beta_h, dh, H);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Two passes (8NHV).
// ---------------------------------------------------------------------------------------------------------------

// The kept hidden rows [M, H] in the operand dtype, the A operand of the two passes.
template <typename Op>
struct RowOperands {
  Tensor hk;
  int64_t ld;

  RowOperands(const Head& p) : hk(p.hidden_rows(0, p.kept(), scalar_type_of<Op>())), ld(p.width()) {}
  const Op* rows(int64_t r0) const { return hk.data_ptr<Op>() + r0 * ld; }
};

// Forward: lse [M] (written) and logp [B] (added to).
template <typename T, typename Op>
void forward_pass(const Head& p, const RowOperands<Op>& rows, const Tiles& tiles, T* lse, std::vector<double>& logp) {
  const int64_t M = p.kept(), V = p.vocab();
  const int64_t parts = std::min(tiles.count, kForwardParts);
  const int64_t* y = p.targets.data_ptr<int64_t>();
  std::vector<T> m(parts * M, -std::numeric_limits<T>::infinity()), s(parts * M, T(0)), picked(M, T(0));
  std::vector<ThreadScratch> scratch(at::get_num_threads());
  parallel_items(p.gemm, parts, [&](int64_t part, int thread) {
    ThreadScratch& sc = scratch[thread];
    T* z = buffer<T>(sc.z, std::min(tiles.rows, M) * tiles.width, p.compute());
    for (int64_t t = part * tiles.count / parts; t < (part + 1) * tiles.count / parts; ++t) {
      const int64_t v0 = t * tiles.width, vt = tiles.cols(t, V);
      const Tensor w_t = p.weight_tile(v0, vt, scalar_type_of<Op>());
      for (int64_t r0 = 0; r0 < M; r0 += tiles.rows) {
        const int64_t n = std::min(tiles.rows, M - r0);
        logits_tile<T, Op>(p, rows.rows(r0), rows.ld, n, w_t, v0, z, vt);
        for (int64_t r = 0; r < n; ++r) {
          sppo::fold(z + r * vt, vt, m[part * M + r0 + r], s[part * M + r0 + r]);
          const int64_t col = y[r0 + r] - v0;
          if (col >= 0 && col < vt) picked[r0 + r] = z[r * vt + col];  // exactly one tile holds a row's target
        }
      }
    }
  });
  const int64_t* seq = p.seq.data_ptr<int64_t>();
  for (int64_t r = 0; r < M; ++r) {  // merge the parts' log-sum-exp, in part order
    T top = -std::numeric_limits<T>::infinity(), sum = 0;
    for (int64_t q = 0; q < parts; ++q) top = std::max(top, m[q * M + r]);
    for (int64_t q = 0; q < parts; ++q) sum += s[q * M + r] * sppo::exp_approx(m[q * M + r] - top);
    lse[r] = top + std::log(sum);
    logp[seq[r]] += double(picked[r]) - double(lse[r]);
  }
}

// Gradient for the upstream gradient g[r] of each kept row, recomputing the logits: writes the kept rows of gr.dh
// and the tiles of gr.dw / gr.db (adds to them when they are in the compute dtype and already started).
template <typename T, typename Op>
void grad_pass(const Head& p, const RowOperands<Op>& rows, const Tiles& tiles, const T* lse, const T* g, Grads& gr) {
  const int64_t M = p.kept(), H = p.width(), V = p.vocab();
  const int64_t* y = p.targets.data_ptr<int64_t>();
  const T softcap = static_cast<T>(p.softcap), temperature = static_cast<T>(p.temperature);
  const bool in_place = p.weight_in_compute();  // else a per-tile accumulator, written once
  const T beta_out = in_place && gr.started ? T(1) : T(0);
  std::vector<ThreadScratch> scratch(at::get_num_threads());
  parallel_items(p.gemm, tiles.count, [&](int64_t t, int thread) {
    ThreadScratch& sc = scratch[thread];
    const int64_t v0 = t * tiles.width, vt = tiles.cols(t, V);
    const Tensor w_t = p.weight_tile(v0, vt, scalar_type_of<Op>());
    T* z = buffer<T>(sc.z, std::min(tiles.rows, M) * tiles.width, p.compute());
    T* dw = !gr.dw.defined() ? nullptr
            : in_place       ? gr.dw.data_ptr<T>() + v0 * H
                             : buffer<T>(sc.dw, vt * H, p.compute());
    T* db = !gr.db.defined() ? nullptr : in_place ? gr.db.data_ptr<T>() + v0 : buffer<T>(sc.db, vt, p.compute());
    T* dh = gr.dh.defined() ? buffer<T>(sc.dh, M * H, p.compute()) : nullptr;
    const T beta_h = sc.dh_started ? T(1) : T(0);
    T beta_w = beta_out;
    for (int64_t r0 = 0; r0 < M; r0 += tiles.rows) {
      const int64_t n = std::min(tiles.rows, M - r0);
      logits_tile<T, Op>(p, rows.rows(r0), rows.ld, n, w_t, v0, z, vt);
      for (int64_t r = 0; r < n; ++r) {  // logits -> da, in place
        const int64_t col = y[r0 + r] - v0;
        sppo::grad(z + r * vt, vt, col >= 0 && col < vt ? col : -1, lse[r0 + r], g[r0 + r], softcap, temperature);
      }
      blas_gradient<T, Op>(p, sc, z, r0, n, vt, vt, g + r0, rows.rows(r0), rows.ld, w_t.data_ptr<Op>(),
                           w_t.stride(0), dw, db, beta_w, dh ? dh + r0 * H : nullptr, beta_h);
      beta_w = T(1);
    }
    if constexpr (std::is_same_v<Op, BF16>) {
      apply_corrections(sc, H, rows.rows(0), rows.ld, w_t.data_ptr<BF16>(), w_t.stride(0), dw, dh);
    }
    sc.dh_started = sc.dh_started || dh != nullptr;
    if (!in_place && dw != nullptr) write_tile(dw, gr.dw.narrow(0, v0, vt));
    if (!in_place && db != nullptr) gr.db.narrow(0, v0, vt).copy_(sc.db.narrow(0, 0, vt));
  });
  gr.started = true;
  if (!gr.dh.defined()) return;
  gr.dh.index_copy_(0, p.rows, sum_partials(scratch, M, H).to(gr.dh.scalar_type()));
}

// ---------------------------------------------------------------------------------------------------------------
// Seeded block (6NHV), compute-dtype weights only: chunks of whole sequences whose logits stay in the block.
// ---------------------------------------------------------------------------------------------------------------

// The block [count, rows, width] keeps a chunk's logits tile-major (a tile is one dense matrix).
template <typename T>
struct Block {
  Tiles tiles;
  Tensor logits;
  std::vector<T> m, s;  // per tile and row: max and sum of exp(z - max) (merged in tile order: deterministic)

  Block(const Head& p, const Tiles& t, int64_t rows)
      : tiles(t), logits(at::empty({t.count, rows, t.width}, p.compute_options())), m(t.count * rows), s(m.size()) {}
  // Tile t of the current chunk (n rows): its [n, vt] logits, row stride width.
  T* z(int64_t t, int64_t n) { return logits.data_ptr<T>() + t * logits.stride(0); }
};

// Forward and gradient of the chunk of kept rows [begin, begin + n) (whole sequences): lse, logp, and the gradient
// for the seeds g_s = slope_s logp_s + offset_s.
template <typename T>
void seeded_chunk(const Head& p, Block<T>& bl, int64_t begin, int64_t n, T* lse, std::vector<double>& logp,
                  const double* slope, const double* offset, Grads& gr) {
  const int64_t H = p.width(), V = p.vocab(), width = bl.tiles.width, count = bl.tiles.count;
  const int64_t* y = p.targets.data_ptr<int64_t>() + begin;
  const int64_t* seq = p.seq.data_ptr<int64_t>() + begin;
  const Tensor hc = p.hidden_rows(begin, n, p.compute());
  const T* h = hc.data_ptr<T>();
  std::vector<T> picked(n), g(n);
  parallel_items(p.gemm, count, [&](int64_t t, int) {
    const int64_t v0 = t * width, vt = bl.tiles.cols(t, V);
    const Tensor w_t = p.weight_tile(v0, vt, p.compute());
    T* z = bl.z(t, n);
    logits_tile<T, T>(p, h, H, n, w_t, v0, z, width);
    for (int64_t r = 0; r < n; ++r) {
      T mr = -std::numeric_limits<T>::infinity(), sr = 0;
      sppo::fold(z + r * width, vt, mr, sr);
      bl.m[t * n + r] = mr;
      bl.s[t * n + r] = sr;
      const int64_t col = y[r] - v0;
      if (col >= 0 && col < vt) picked[r] = z[r * width + col];
    }
  });
  for (int64_t r = 0; r < n; ++r) {  // merge the tiles' log-sum-exp, in tile order
    T top = -std::numeric_limits<T>::infinity(), sum = 0;
    for (int64_t t = 0; t < count; ++t) top = std::max(top, bl.m[t * n + r]);
    for (int64_t t = 0; t < count; ++t) sum += bl.s[t * n + r] * sppo::exp_approx(bl.m[t * n + r] - top);
    lse[r] = top + std::log(sum);
    logp[seq[r]] += double(picked[r]) - double(lse[r]);
  }
  for (int64_t r = 0; r < n; ++r) g[r] = static_cast<T>(slope[seq[r]] * logp[seq[r]] + offset[seq[r]]);

  const T softcap = static_cast<T>(p.softcap), temperature = static_cast<T>(p.temperature);
  const T beta_w = gr.started ? T(1) : T(0);
  std::vector<ThreadScratch> scratch(at::get_num_threads());
  parallel_items(p.gemm, count, [&](int64_t t, int thread) {
    ThreadScratch& sc = scratch[thread];
    const int64_t v0 = t * width, vt = bl.tiles.cols(t, V);
    const Tensor w_t = p.weight_tile(v0, vt, p.compute());
    T* z = bl.z(t, n);
    for (int64_t r = 0; r < n; ++r) {  // logits -> da, in place
      const int64_t col = y[r] - v0;
      sppo::grad(z + r * width, vt, col >= 0 && col < vt ? col : -1, lse[r], g[r], softcap, temperature);
    }
    T* dh = gr.dh.defined() ? buffer<T>(sc.dh, n * H, p.compute()) : nullptr;
    blas_gradient<T, T>(p, sc, z, 0, n, vt, width, g.data(), h, H, w_t.data_ptr<T>(), w_t.stride(0),
                         gr.dw.defined() ? gr.dw.data_ptr<T>() + v0 * H : nullptr,
                         gr.db.defined() ? gr.db.data_ptr<T>() + v0 : nullptr, beta_w, dh,
                         sc.dh_started ? T(1) : T(0));
    sc.dh_started = sc.dh_started || dh != nullptr;
  });
  gr.started = true;
  if (!gr.dh.defined()) return;
  gr.dh.index_copy_(0, p.rows.narrow(0, begin, n), sum_partials(scratch, n, H).to(gr.dh.scalar_type()));
}

// Rows sorted by sequence, every sequence at most block.rows rows long: chunks pack whole sequences.
template <typename T>
void seeded_pass(const Head& p, const Tiles& block, T* lse, std::vector<double>& logp, const double* slope,
                 const double* offset, Grads& gr) {
  const int64_t M = p.kept();
  const int64_t* seq = p.seq.data_ptr<int64_t>();
  // A chunk holds at most half the kept rows (or the longest sequence, when longer), so the block never holds all
  // N x V logits -- what an implementation that materialises them keeps at its peak -- besides dW.
  int64_t longest_sequence = 0;
  for (int64_t r = 0, start = 0; r < M; ++r) {
    if (r + 1 == M || seq[r + 1] != seq[r]) {
      longest_sequence = std::max(longest_sequence, r + 1 - start);
      start = r + 1;
    }
  }
  const int64_t rows = std::min(block.rows, std::max(longest_sequence, (M + 1) / 2));
  std::vector<std::pair<int64_t, int64_t>> chunks;  // [begin, end)
  int64_t longest = 0;
  for (int64_t begin = 0; begin < M;) {
    int64_t end = begin;  // take whole sequences while they fit
    while (end < M) {
      int64_t next = end;
      while (next < M && seq[next] == seq[end]) ++next;
      if (next - begin > rows) break;
      end = next;
    }
    chunks.emplace_back(begin, end);
    longest = std::max(longest, end - begin);
    begin = end;
  }
  Block<T> bl(p, block, longest);  // no larger than the largest chunk
  for (const auto& [begin, end] : chunks) {
    seeded_chunk<T>(p, bl, begin, end - begin, lse + begin, logp, slope, offset, gr);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Passes over all kept rows of a Head.
// ---------------------------------------------------------------------------------------------------------------

// Forward; with seeds also the gradient for g_s = slope_s logp_s + offset_s. With compute-dtype weights the
// sequences that fit the block take the seeded block (6NHV); the others, and all rows of low-precision weights,
// take the two passes with the seeds known after their forward (8NHV). Returns logp [B]; writes lse [M].
template <typename T, typename Op>
std::vector<double> forward_rows(const Head& p, int64_t num_seqs, const Tiles& block, const Tiles& chunk, Tensor& lse,
                                 const double* slope, const double* offset, Grads* gr) {
  std::vector<double> logp(num_seqs, 0.0);
  if (gr == nullptr) {
    forward_pass<T, Op>(p, RowOperands<Op>(p), chunk, lse.data_ptr<T>(), logp);
    return logp;
  }
  const bool blockable = std::is_same_v<T, Op> && p.weight_in_compute();
  const int64_t* seq = p.seq.data_ptr<int64_t>();
  std::vector<int64_t> length(num_seqs, 0), fits, longer;
  for (int64_t r = 0; r < p.kept(); ++r) ++length[seq[r]];
  for (int64_t r = 0; r < p.kept(); ++r) (blockable && length[seq[r]] <= block.rows ? fits : longer).push_back(r);
  std::stable_sort(fits.begin(), fits.end(), [&](int64_t a, int64_t b) { return seq[a] < seq[b]; });

  if (!fits.empty()) {
    if constexpr (std::is_same_v<T, Op>) {
      const Head sub = p.subset(fits);
      Tensor sub_lse = at::empty({sub.kept()}, p.compute_options());
      seeded_pass<T>(sub, block, sub_lse.data_ptr<T>(), logp, slope, offset, *gr);
      lse.index_copy_(0, at::tensor(fits, p.rows.options()), sub_lse);
    }
  }
  if (!longer.empty()) {
    const Head sub = longer.size() == size_t(p.kept()) ? p : p.subset(longer);
    const RowOperands<Op> rows(sub);
    Tensor sub_lse = at::empty({sub.kept()}, p.compute_options());
    forward_pass<T, Op>(sub, rows, chunk, sub_lse.data_ptr<T>(), logp);
    std::vector<T> g(sub.kept());
    const int64_t* sub_seq = sub.seq.data_ptr<int64_t>();
    for (int64_t r = 0; r < sub.kept(); ++r) {
      g[r] = static_cast<T>(slope[sub_seq[r]] * logp[sub_seq[r]] + offset[sub_seq[r]]);
    }
    grad_pass<T, Op>(sub, rows, chunk, sub_lse.data_ptr<T>(), g.data(), *gr);
    lse.index_copy_(0, at::tensor(longer, p.rows.options()), sub_lse);
  }
  return logp;
}

// Calls fn<T, Op>() for the compute and operand types of the head's dtype.
template <typename F>
auto dispatch(const Head& p, const F& fn) {
  switch (p.hidden.scalar_type()) {
    case at::kDouble:
      return fn.template operator()<double, double>();
    case at::kBFloat16:
      return fn.template operator()<float, BF16>();
    default:  // float32, and float16 upcast to float32
      return fn.template operator()<float, float>();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Entry points. Tiling: block_rows x block_cols tiles for the seeded block (it holds block_rows x V logits),
// chunk_rows x chunk_cols tiles for the two passes.
// ---------------------------------------------------------------------------------------------------------------

struct Options {
  double softcap, temperature;
  std::string blas;
  bool split_grad, poison;
};

Head make_head(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& rows,
               const Tensor& targets, const Tensor& seq, const Options& o) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "the cpu backend needs CPU tensors");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden must be [N, H] and weight [V, H]");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "hidden and weight dtypes differ");
  TORCH_CHECK(rows.scalar_type() == at::kLong && targets.scalar_type() == at::kLong && seq.scalar_type() == at::kLong,
              "rows, targets and seq must be int64");
  TORCH_CHECK(rows.dim() == 1 && targets.sizes() == rows.sizes() && seq.sizes() == rows.sizes(),
              "rows, targets and seq must be [M]");
  TORCH_CHECK(o.temperature > 0, "temperature must be > 0");
  Head p;
  p.hidden = hidden.detach();
  p.weight = weight.detach();
  p.bias = bias.has_value() ? bias->detach().to(p.compute()).contiguous() : Tensor();
  TORCH_CHECK(!p.bias.defined() || p.bias.sizes() == at::IntArrayRef{weight.size(0)}, "bias must be [V]");
  p.rows = rows.contiguous();
  p.targets = targets.contiguous();
  p.seq = seq.contiguous();
  p.softcap = o.softcap;
  p.temperature = o.temperature;
  p.gemm = Gemm(o.blas);
  p.split_grad = o.split_grad;
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

// Outputs in the callers' dtypes; masked rows of dH are zero. No kept row: dW and db are zero too.
Grads make_grads(const Head& p, const std::optional<Tensor>& bias, bool need_h, bool need_w, bool need_b,
                 bool poison) {
  Grads gr;
  if (need_h) {
    gr.dh = new_output(p.hidden.sizes(), p.hidden.options(), poison);
    Tensor masked = at::ones({p.hidden.size(0)}, p.rows.options().dtype(at::kBool)).index_fill_(0, p.rows, false);
    gr.dh.index_fill_(0, masked.nonzero().squeeze(1), 0);
  }
  if (need_w) gr.dw = new_output(p.weight.sizes(), p.weight.options(), poison);
  if (need_b && p.bias.defined()) gr.db = new_output({p.vocab()}, bias->options(), poison);
  if (p.kept() == 0) {
    for (Tensor* t : {&gr.dw, &gr.db}) {
      if (t->defined()) t->zero_();
    }
  }
  return gr;
}

// Forward. Returns [logps [B] (float32; float64 for float64 inputs), lse [M] (compute dtype), dh, dw, db]; the
// gradients are formed only when slope and offset ([B] float64) are given, for g_s = slope_s logp_s + offset_s.
std::vector<Tensor> forward(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                            const Tensor& rows, const Tensor& targets, const Tensor& seq, int64_t num_seqs,
                            double softcap, double temperature, const std::optional<Tensor>& slope,
                            const std::optional<Tensor>& offset, bool need_h, bool need_w, bool need_b,
                            int64_t block_rows, int64_t block_cols, int64_t chunk_rows, int64_t chunk_cols,
                            const std::string& blas, bool split_grad, bool poison) {
  const Head p = make_head(hidden, weight, bias, rows, targets, seq, {softcap, temperature, blas, split_grad, poison});
  const Tiles block = make_tiles(block_rows, block_cols, p.vocab());
  const Tiles chunk = make_tiles(chunk_rows, chunk_cols, p.vocab());
  const bool seeded = slope.has_value() && offset.has_value();
  Tensor slope64, offset64;
  if (seeded) {
    slope64 = slope->to(at::kDouble).contiguous();
    offset64 = offset->to(at::kDouble).contiguous();
    TORCH_CHECK(slope64.numel() == num_seqs && offset64.numel() == num_seqs, "slope and offset must be [B]");
  }
  Grads gr = seeded ? make_grads(p, bias, need_h, need_w, need_b, poison) : Grads();
  Tensor lse = new_output({p.kept()}, p.compute_options(), poison);
  const double* sl = seeded ? slope64.data_ptr<double>() : nullptr;
  const double* of = seeded ? offset64.data_ptr<double>() : nullptr;
  const std::vector<double> logp = dispatch(p, [&]<typename T, typename Op>() {
    return forward_rows<T, Op>(p, num_seqs, block, chunk, lse, sl, of, seeded ? &gr : nullptr);
  });
  Tensor logps = new_output({num_seqs}, hidden.options().dtype(at::kDouble), poison);
  std::copy(logp.begin(), logp.end(), logps.data_ptr<double>());
  return {logps.to(p.compute()), lse, gr.dh, gr.dw, gr.db};
}

// Backward for any upstream gradient grad [B]: recomputes the logits from lse [M]. Returns [dh, dw, db].
std::vector<Tensor> backward(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                             const Tensor& rows, const Tensor& targets, const Tensor& seq, const Tensor& lse,
                             const Tensor& grad, double softcap, double temperature, bool need_h, bool need_w,
                             bool need_b, int64_t chunk_rows, int64_t chunk_cols, const std::string& blas,
                             bool split_grad, bool poison) {
  const Head p = make_head(hidden, weight, bias, rows, targets, seq, {softcap, temperature, blas, split_grad, poison});
  const Tiles chunk = make_tiles(chunk_rows, chunk_cols, p.vocab());
  TORCH_CHECK(lse.numel() == p.kept() && lse.scalar_type() == p.compute(), "lse must be [M] in the compute dtype");
  Grads gr = make_grads(p, bias, need_h, need_w, need_b, poison);
  if (p.kept() == 0) return {gr.dh, gr.dw, gr.db};
  const Tensor g = grad.detach().to(p.compute()).index_select(0, p.seq).contiguous();  // per kept row
  const Tensor l = lse.contiguous();
  dispatch(p, [&]<typename T, typename Op>() {
    grad_pass<T, Op>(p, RowOperands<Op>(p), chunk, l.data_ptr<T>(), g.data_ptr<T>(), gr);
  });
  return {gr.dh, gr.dw, gr.db};
}

// GFLOP/s of the backend's own single-threaded GEMM z[m, n] = a[m, k] b[n, k]^T (float32 output) in `dtype`
// (float32 or bfloat16 operands), run by `workers` OpenMP threads at once, each with `blas_threads` BLAS threads:
// workers = threads, blas_threads = 1 is the schedule the kernels use; workers = 1, blas_threads = threads is one
// intra-op-threaded GEMM at a time. Best of `repeats` rounds of `calls` GEMMs per worker.
double gemm_rate(at::ScalarType dtype, int64_t m, int64_t n, int64_t k, int64_t workers, int64_t blas_threads,
                 int64_t calls, int64_t repeats, const std::string& blas) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "gemm_rate takes float32 or bfloat16");
  const Gemm g(blas);
  TORCH_CHECK(blas_threads == 1 || g.mkl != nullptr, "blas_threads > 1 needs MKL");
  std::vector<Tensor> a, b, c;
  for (int64_t w = 0; w < workers; ++w) {
    a.push_back(at::randn({m, k}).to(dtype));
    b.push_back(at::randn({n, k}).to(dtype));
    c.push_back(at::empty({m, n}));
  }
  double best = 0;
  for (int64_t round = 0; round < repeats; ++round) {
    const auto start = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(int(workers))
    {
      const int w = omp_get_thread_num();
      const int before = g.mkl ? g.mkl->local_threads(int(blas_threads)) : 0;
      for (int64_t i = 0; i < calls; ++i) {
        if (dtype == at::kFloat) {
          sppo::gemm(g, false, true, m, n, k, a[w].data_ptr<float>(), k, b[w].data_ptr<float>(), k, 0.0f,
                     c[w].data_ptr<float>(), n);
        } else {
          sppo::gemm(g, false, true, m, n, k, a[w].data_ptr<BF16>(), k, b[w].data_ptr<BF16>(), k, 0.0f,
                     c[w].data_ptr<float>(), n);
        }
      }
      if (g.mkl) g.mkl->local_threads(before);
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, 2.0 * m * n * k * calls * workers / seconds / 1e9);
  }
  return best;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sppo_kernels' fused lm-head log-prob kernels for the CPU (csrc/sppo_cpu.cpp)";
  // The GIL is released while the kernels run: other Python threads go on, and nothing here needs Python.
  m.def("forward", &forward, "logps, lse (and the seeded gradient) of the kept token rows",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "dh, dw, db for a per-sequence upstream gradient, by recomputation",
        py::call_guard<py::gil_scoped_release>());
  m.def("gemm_rate", &gemm_rate, "GFLOP/s of the backend's GEMM (benchmarks)", py::call_guard<py::gil_scoped_release>());
  m.def("blas", [](const std::string& choice) { return Gemm(choice).name(); },
        "the GEMM library a blas choice (auto, aten) uses here: mkl or aten");
  m.def("num_threads", [] { return at::get_num_threads(); }, "the intra-op thread count the kernels use");
  m.def("source_hash", [] { return std::string(SPPO_STRINGIFY(SPPO_SOURCE_HASH)); }, "hash of the built source");
}
