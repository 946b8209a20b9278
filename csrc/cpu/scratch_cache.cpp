// Process-wide cache of large scratch buffers (see scratch_cache.h).
#include "cpu/scratch_cache.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>
#include <string>
#include <vector>

namespace hk {
namespace cpu {
namespace {

constexpr size_t kHuge = size_t(1) << 21;

size_t rounded(size_t bytes) {
  return bytes >= kMinCachedBytes ? (bytes + kHuge - 1) / kHuge * kHuge : (bytes + 63) / 64 * 64;
}

struct Block {
  void* p;
  size_t bytes;  // rounded size
};

class Cache {
 public:
  // A cached block of exactly this rounded size, or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < blocks_.size(); ++i) {
      if (blocks_[i].bytes != bytes) continue;
      void* p = blocks_[i].p;
      held_ -= bytes;
      blocks_.erase(blocks_.begin() + long(i));
      return p;
    }
    return nullptr;
  }
  // Keeps the block if it fits under the limit (evicting the oldest ones first), else frees it.
  void give(void* p, size_t bytes) {
    const size_t limit = scratch_cache_limit();
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (bytes > limit) {
        evicted.push_back(p);
      } else {
        while (held_ + bytes > limit && !blocks_.empty()) {
          evicted.push_back(blocks_.front().p);
          held_ -= blocks_.front().bytes;
          blocks_.erase(blocks_.begin());
        }
        blocks_.push_back({p, bytes});
        held_ += bytes;
      }
    }
    for (void* e : evicted) std::free(e);
  }
  void clear() {
    std::vector<Block> all;
    {
      std::lock_guard<std::mutex> lock(mu_);
      all.swap(blocks_);
      held_ = 0;
    }
    for (const Block& b : all) std::free(b.p);
  }
  size_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }

 private:
  std::mutex mu_;
  std::vector<Block> blocks_;  // oldest first
  size_t held_ = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: buffers may be freed during static teardown
  return *c;
}

}  // namespace

void* scratch_alloc(size_t bytes) {
  const size_t r = rounded(bytes > 0 ? bytes : 1);
  if (r < kMinCachedBytes) {
    void* p = std::aligned_alloc(64, r);
    if (!p) throw std::bad_alloc();
    return p;
  }
  if (void* p = cache().take(r)) return p;
  void* p = std::aligned_alloc(kHuge, r);
  if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  madvise(p, r, MADV_HUGEPAGE);  // advisory: on failure the pages stay 4 KiB
#endif
  return p;
}

void scratch_free(void* p, size_t bytes) {
  if (!p) return;
  const size_t r = rounded(bytes > 0 ? bytes : 1);
  if (r < kMinCachedBytes) {
    std::free(p);
    return;
  }
  cache().give(p, r);
}

void scratch_cache_clear() { cache().clear(); }

size_t scratch_cache_bytes() { return cache().held(); }

size_t scratch_cache_limit() {
  const char* env = std::getenv("HYBRID_KERNELS_CPU_CACHE_MB");
  if (!env || !*env) return size_t(1024) << 20;
  char* end = nullptr;
  const long mb = std::strtol(env, &end, 10);
  return (end && *end == '\0' && mb > 0) ? size_t(mb) << 20 : 0;
}

}  // namespace cpu
}  // namespace hk
