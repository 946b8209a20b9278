// The visibility pattern, shared by every native kernel (host and device).
//
// A query block covers aligned query positions [r0, r1) (r = i + Nk - Nq). The keys it can see
// split into:
//   * the window band: one contiguous key range, clipped to [0, Nk) and (if causal) to r1 - 1;
//   * landmark keys outside that band (visited by gathering, never by scanning);
//   * for landmark *query* rows: every key (up to r if causal). Kernels handle those rows apart.
// Inside a visited tile, `visible()` is the per-element truth; everything outside these sets is
// invisible by construction, so tiles outside the pattern are never visited.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define HK_HD __host__ __device__ __forceinline__
#else
#define HK_HD inline
#endif

namespace hk {

struct KeyRange {
  int64_t lo;  // first key, inclusive
  int64_t hi;  // last key, exclusive (hi <= lo: empty)
};

// Key range of the window band for aligned query rows [r0, r1), clipped to [0, Nk) and causality.
HK_HD KeyRange window_band(int64_t r0, int64_t r1, int64_t Nk, int64_t left, int64_t right,
                           bool causal) {
  int64_t lo = left < 0 ? 0 : r0 - left;
  int64_t hi = right < 0 ? Nk : r1 - 1 + right + 1;
  if (causal && hi > r1) hi = r1;  // j <= r for the last row r1 - 1
  if (lo < 0) lo = 0;
  if (hi > Nk) hi = Nk;
  return {lo, hi};
}

// Full key range of one landmark query row r (it sees every key, causally clipped).
HK_HD KeyRange landmark_row_range(int64_t r, int64_t Nk, bool causal) {
  int64_t hi = causal ? r + 1 : Nk;
  if (hi > Nk) hi = Nk;
  if (hi < 0) hi = 0;
  return {0, hi};
}

// Exact visibility of key j for aligned query row r. `key_is_landmark` / `row_is_landmark` come
// from the landmark flags; `key_real` from the padding mask (true when there is none).
HK_HD bool visible(int64_t r, int64_t j, int64_t left, int64_t right, bool causal,
                   bool key_is_landmark, bool row_is_landmark, bool key_real) {
  if (!key_real) return false;
  if (causal && j > r) return false;
  if (key_is_landmark || row_is_landmark) return true;
  bool in_left = left < 0 || j >= r - left;
  bool in_right = right < 0 || j <= r + right;
  return in_left && in_right;
}

}  // namespace hk
