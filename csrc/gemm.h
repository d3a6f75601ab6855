// Single-threaded GEMMs of the "cpu" backend on row-major raw pointers:
//     C[m, n] = op(A) op(B) + beta C          beta is 0 (C is overwritten, NaN in C ignored) or 1
// float x float -> float, double x double -> double, and bfloat16 x bfloat16 -> float (products exact, sums in
// float32: the bf16 rate of the CPU, AMX where it has it, with float32 logits).
//
// Where: MKL, which torch's x86-64 builds link statically and export (sgemm_, dgemm_, cblas_gemm_bf16bf16f32),
// found with dlsym at load time; otherwise -- or when the caller asks -- ATen (at::mm on views; bfloat16 operands
// upcast first). A worker runs MKL with one thread (MKL_Set_Num_Threads_Local) so that the parallelism is ours.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <dlfcn.h>

#include <climits>
#include <cstdint>
#include <string>

namespace sppo {

struct Mkl {
  using Sgemm = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
  using Dgemm = void (*)(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                         const int*, const double*, const int*, const double*, double*, const int*);
  using Bf16Gemm = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                            float*, int);
  using LocalThreads = int (*)(int);

  Sgemm sgemm = nullptr;
  Dgemm dgemm = nullptr;
  Bf16Gemm bf16 = nullptr;
  LocalThreads local_threads = nullptr;

  bool complete() const { return sgemm && dgemm && bf16 && local_threads; }

  // The MKL entry points of this process (all or none), looked up once.
  static const Mkl& find() {
    static const Mkl found = [] {
      Mkl m;
      m.sgemm = reinterpret_cast<Sgemm>(dlsym(RTLD_DEFAULT, "sgemm_"));
      m.dgemm = reinterpret_cast<Dgemm>(dlsym(RTLD_DEFAULT, "dgemm_"));
      m.bf16 = reinterpret_cast<Bf16Gemm>(dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32"));
      m.local_threads = reinterpret_cast<LocalThreads>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
      return m.complete() ? m : Mkl();
    }();
    return found;
  }
};

// Which library runs the GEMMs of one call: "auto" (MKL where torch has it, else ATen) or "aten".
struct Gemm {
  const Mkl* mkl;  // null: ATen

  explicit Gemm(const std::string& choice = "auto")
      : mkl(choice == "auto" && Mkl::find().complete() ? &Mkl::find() : nullptr) {}
  std::string name() const { return mkl ? "mkl" : "aten"; }
};

// While alive, MKL calls of this thread run on one thread (restored after).
class WorkerBlas {
 public:
  explicit WorkerBlas(const Gemm& g) : gemm_(g), before_(g.mkl ? g.mkl->local_threads(1) : 0) {}
  ~WorkerBlas() {
    if (gemm_.mkl) gemm_.mkl->local_threads(before_);
  }
  WorkerBlas(const WorkerBlas&) = delete;
  WorkerBlas& operator=(const WorkerBlas&) = delete;

 private:
  const Gemm& gemm_;
  int before_;
};

namespace gemm_detail {

inline bool fits_int(std::initializer_list<int64_t> values) {
  for (int64_t v : values) {
    if (v > INT_MAX) return false;
  }
  return true;
}

// [rows, cols] row-major view with leading dimension ld.
inline at::Tensor view(const void* p, int64_t rows, int64_t cols, int64_t ld, at::ScalarType type) {
  return at::from_blob(const_cast<void*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(type));
}

// The ATen path: C = op(A) op(B) + beta C on views, operands upcast to C's dtype.
inline void aten(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda, const void* b,
                 int64_t ldb, at::ScalarType operand, double beta, void* c, int64_t ldc, at::ScalarType out) {
  const at::Tensor A = ta ? view(a, k, m, lda, operand).t() : view(a, m, k, lda, operand);
  const at::Tensor B = tb ? view(b, n, k, ldb, operand).t() : view(b, k, n, ldb, operand);
  at::Tensor C = view(c, m, n, ldc, out);
  if (beta == 0) {
    at::mm_out(C, A.to(out), B.to(out));
  } else {
    C.addmm_(A.to(out), B.to(out), beta, 1);
  }
}

}  // namespace gemm_detail

// Row-major C = op(A) op(B) + beta C through column-major BLAS: C^T = op(B)^T op(A)^T.
inline void gemm(const Gemm& g, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (g.mkl && gemm_detail::fits_int({m, n, k, lda, ldb, ldc})) {
    const int M = int(m), N = int(n), K = int(k), LDA = int(lda), LDB = int(ldb), LDC = int(ldc);
    const float one = 1.0f;
    g.mkl->sgemm(tb ? "T" : "N", ta ? "T" : "N", &N, &M, &K, &one, b, &LDB, a, &LDA, &beta, c, &LDC);
    return;
  }
  gemm_detail::aten(ta, tb, m, n, k, a, lda, b, ldb, at::kFloat, beta, c, ldc, at::kFloat);
}

inline void gemm(const Gemm& g, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda,
                 const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (g.mkl && gemm_detail::fits_int({m, n, k, lda, ldb, ldc})) {
    const int M = int(m), N = int(n), K = int(k), LDA = int(lda), LDB = int(ldb), LDC = int(ldc);
    const double one = 1.0;
    g.mkl->dgemm(tb ? "T" : "N", ta ? "T" : "N", &N, &M, &K, &one, b, &LDB, a, &LDA, &beta, c, &LDC);
    return;
  }
  gemm_detail::aten(ta, tb, m, n, k, a, lda, b, ldb, at::kDouble, beta, c, ldc, at::kDouble);
}

inline void gemm(const Gemm& g, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const c10::BFloat16* a,
                 int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (g.mkl && gemm_detail::fits_int({m, n, k, lda, ldb, ldc})) {
    constexpr int row_major = 101, no_trans = 111, trans = 112;  // CBLAS enums
    g.mkl->bf16(row_major, ta ? trans : no_trans, tb ? trans : no_trans, int(m), int(n), int(k), 1.0f,
                reinterpret_cast<const uint16_t*>(a), int(lda), reinterpret_cast<const uint16_t*>(b), int(ldb), beta,
                c, int(ldc));
    return;
  }
  gemm_detail::aten(ta, tb, m, n, k, a, lda, b, ldb, at::kBFloat16, beta, c, ldc, at::kFloat);
}

}  // namespace sppo
