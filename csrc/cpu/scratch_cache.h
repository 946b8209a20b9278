// Large scratch buffers of the CPU kernels (packed K/V, transposed V), reused across calls.
//
// A forward call packs K/V into fresh buffers of up to a few hundred MiB; freshly mapped memory
// costs a page fault and the kernel's zeroing of every page on first touch, which measured ~10%
// of an int8 forward. Freed buffers of at least kMinCachedBytes are kept (up to
// HYBRID_KERNELS_CPU_CACHE_MB in all, default 1024; 0 disables) and handed out again for requests
// of the same size class. Thread-safe; contents are uninitialized.
#pragma once
#include <cstddef>

namespace hk {
namespace cpu {

constexpr size_t kMinCachedBytes = size_t(1) << 20;

// `bytes` (> 0) of uninitialized memory, 64-byte aligned (2 MiB aligned, with transparent huge
// pages requested, from kMinCachedBytes on). Throws std::bad_alloc.
void* scratch_alloc(size_t bytes);
// Returns a buffer from scratch_alloc (nullptr: no-op); `bytes` as requested.
void scratch_free(void* p, size_t bytes);
// Frees every cached buffer (tests, memory pressure).
void scratch_cache_clear();
// Bytes held by the cache now.
size_t scratch_cache_bytes();
// The cap, read from HYBRID_KERNELS_CPU_CACHE_MB on every call (unset: 1024 MiB; 0, negative or
// not a number: 0, nothing is kept).
size_t scratch_cache_limit();

}  // namespace cpu
}  // namespace hk
