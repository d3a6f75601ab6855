// bfloat16 GEMMs with float32 accumulation through oneDNN's brgemm ukernel (torch's at::native::cpublas::brgemm),
// on CPUs with AMX: C[M, N] (+)= A[M, K] B[K, N], A row-major, B packed once in the ukernel's VNNI layout.
//
// VNNI layout of B: blocks of 64 columns; block b holds B[k][64 b + j] at element (k / 2) * 128 + 2 j + k % 2 (pairs
// of rows interleaved), zero where k >= K or 64 b + j >= N. K is padded to even (the ukernel has no odd tail): an
// A operand must then carry a zero column at k = K. The packers below write that layout straight from either
// orientation of the source; vnni_layout_matches() checks them once against torch's own packer (oneDNN's transform),
// and the engine is not used if they disagree.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace sppo::amx {

using BF16 = c10::BFloat16;
constexpr int64_t kCols = 64;

inline int64_t even(int64_t k) { return k + (k & 1); }
inline int64_t packed_elements(int64_t K, int64_t N) { return (N + kCols - 1) / kCols * even(K) * kCols; }

// 16 x 16 block of 4-byte elements: dst[c][r] = src[r][c] (leading dimensions in elements). AVX-512F: the engine
// only runs on AMX CPUs, which all have it.
__attribute__((target("avx512f"))) inline void transpose16x16(const char* src, int64_t ld_src, char* dst,
                                                                int64_t ld_dst) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + 4 * i * ld_src);
  for (int i = 0; i < 16; i += 2) {  // interleave 32-bit pairs of rows
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // then 64-bit pairs: 4 x 4 transposes within each 128-bit lane
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4 g + q] holds, in lane L, column 4 L + q of rows 4 g .. 4 g + 3: gather the lanes across groups.
  for (int q = 0; q < 4; ++q) {
    const __m512i a = _mm512_shuffle_i32x4(r[q], r[4 + q], 0x88), b = _mm512_shuffle_i32x4(r[q], r[4 + q], 0xdd);
    const __m512i c = _mm512_shuffle_i32x4(r[8 + q], r[12 + q], 0x88), d = _mm512_shuffle_i32x4(r[8 + q], r[12 + q], 0xdd);
    t[q] = _mm512_shuffle_i32x4(a, c, 0x88);       // lanes 0 of the four groups: column q
    t[8 + q] = _mm512_shuffle_i32x4(a, c, 0xdd);   // lanes 2: column 8 + q
    t[4 + q] = _mm512_shuffle_i32x4(b, d, 0x88);   // lanes 1: column 4 + q
    t[12 + q] = _mm512_shuffle_i32x4(b, d, 0xdd);  // lanes 3: column 12 + q
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + 4 * i * ld_dst, t[i]);
}

// dst[c][r] = src[r][c] for r < rows, c < cols, of 4-byte elements (leading dimensions ld_src, ld_dst, in
// elements): 16 x 16 blocks, element by element at the edges.
inline void transpose4(const void* src_bytes, int64_t rows, int64_t cols, int64_t ld_src, void* dst_bytes,
                       int64_t ld_dst) {
  const char* src = static_cast<const char*>(src_bytes);
  char* dst = static_cast<char*>(dst_bytes);
  constexpr int64_t step = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    for (int64_t c0 = 0; c0 < cols; c0 += step) {
      if (r0 + step <= rows && c0 + step <= cols) {
        transpose16x16(src + 4 * (r0 * ld_src + c0), ld_src, dst + 4 * (c0 * ld_dst + r0), ld_dst);
        continue;
      }
      for (int64_t c = c0; c < std::min(cols, c0 + step); ++c) {
        for (int64_t r = r0; r < std::min(rows, r0 + step); ++r) {
          std::memcpy(dst + 4 * (c * ld_dst + r), src + 4 * (r * ld_src + c), 4);
        }
      }
    }
  }
}

// out = B [K, N] packed, B = src (row-major [K, N], leading dimension ld).
inline void pack_rows(const BF16* src, int64_t K, int64_t N, int64_t ld, BF16* out) {
  const int64_t Kp = even(K);
  for (int64_t n0 = 0; n0 < N; n0 += kCols) {
    const int64_t cols = std::min(kCols, N - n0);
    for (int64_t k = 0; k < Kp; k += 2) {  // one 32-bit word per column: (B[k][j], B[k + 1][j])
      uint32_t* pair = reinterpret_cast<uint32_t*>(out + n0 * Kp + k * kCols);
      const uint16_t* r0 = reinterpret_cast<const uint16_t*>(src + k * ld + n0);
      const uint16_t* r1 = k + 1 < K ? r0 + ld : nullptr;
      if (r1 != nullptr) {
        for (int64_t j = 0; j < cols; ++j) pair[j] = uint32_t(r0[j]) | (uint32_t(r1[j]) << 16);
      } else {
        for (int64_t j = 0; j < cols; ++j) pair[j] = uint32_t(r0[j]);
      }
      for (int64_t j = cols; j < kCols; ++j) pair[j] = 0;
    }
  }
}

// out = B [K, N] packed, B = src^T (src row-major [N, K], leading dimension ld): pairs (src[n][k], src[n][k + 1])
// are one 32-bit word, so this is a transpose of 32-bit words.
inline void pack_transposed(const BF16* src, int64_t K, int64_t N, int64_t ld, BF16* out) {
  const int64_t Kp = even(K), pairs = K / 2;
  for (int64_t n0 = 0; n0 < N; n0 += kCols) {
    BF16* block = out + n0 * Kp;
    const int64_t cols = std::min(kCols, N - n0);
    if (cols < kCols || K % 2 == 1) std::memset(static_cast<void*>(block), 0, sizeof(BF16) * Kp * kCols);
    if (ld % 2 == 0) {  // word-aligned rows: one transpose of [cols, pairs] words
      transpose4(src + n0 * ld, cols, pairs, ld / 2, block, kCols);
    } else {
      for (int64_t j = 0; j < cols; ++j) {
        for (int64_t k = 0; k < 2 * pairs; ++k) block[(k / 2) * 2 * kCols + 2 * j + k % 2] = src[(n0 + j) * ld + k];
      }
    }
    if (K % 2 == 1) {
      for (int64_t j = 0; j < cols; ++j) block[(K - 1) * kCols + 2 * j] = src[(n0 + j) * ld + K - 1];
    }
  }
}

// C[M, N] (+)= A[M, K] B, B packed (K padded to even; A's column K, if any, zero). Blocks of 256 x 256 keep A and B
// in cache; each ukernel call is [32, 64].
inline void multiply(int64_t M, int64_t N, int64_t K, const BF16* a, int64_t lda, const BF16* packed, bool add,
                     float* c, int64_t ldc) {
  constexpr int64_t outer = 256, rows_per_call = 64;
  const int64_t Kp = even(K);
  for (int64_t mo = 0; mo < M; mo += outer) {
    const int64_t m_end = std::min(M, mo + outer);
    for (int64_t no = 0; no < N; no += outer) {
      const int64_t n_end = std::min(N, no + outer);
      for (int64_t m0 = mo; m0 < m_end; m0 += rows_per_call) {
        const int64_t rows = std::min(rows_per_call, m_end - m0);
        for (int64_t n0 = no; n0 < n_end; n0 += kCols) {
          at::native::cpublas::brgemm(rows, std::min(kCols, n_end - n0), Kp, lda, kCols, ldc, add, a + m0 * lda,
                                      packed + n0 * Kp, c + m0 * ldc + n0, true);
        }
      }
    }
  }
}

// Whether the packers above write what torch's packer writes (checked once, on an odd-sized random matrix).
inline bool vnni_layout_matches() {
  static const bool matches = [] {
    if (!at::native::cpublas::could_pack(at::kBFloat16)) return false;
    const int64_t K = 6, N = 70;
    const at::Tensor b = at::randn({K, N}).to(at::kBFloat16);
    const at::Tensor theirs = at::zeros({packed_elements(K, N)}, b.options());
    const at::Tensor rows = at::empty_like(theirs), transposed = at::empty_like(theirs);
    for (int64_t n0 = 0; n0 < N; n0 += kCols) {
      at::native::cpublas::pack(K, std::min(kCols, N - n0), N, kCols, at::kBFloat16, at::kBFloat16,
                                b.data_ptr<BF16>() + n0, theirs.data_ptr<BF16>() + n0 * K);
    }
    pack_rows(b.data_ptr<BF16>(), K, N, N, rows.data_ptr<BF16>());
    const at::Tensor bt = b.t().contiguous();
    pack_transposed(bt.data_ptr<BF16>(), K, N, K, transposed.data_ptr<BF16>());
    return at::equal(rows, theirs) && at::equal(transposed, theirs);
  }();
  return matches;
}

}  // namespace sppo::amx
