#include "output_cache.h"

#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <unordered_map>

namespace symfast {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
// Below this, malloc's heap reuses memory without faults; not worth caching.
constexpr size_t kMinCachedBytes = size_t(1) << 20;

// The limit in bytes is an int64_t, so the largest limit in MiB is this.
constexpr long long kMaxLimitMb = std::numeric_limits<int64_t>::max() >> 20;

int64_t default_limit() {
  if (const char* env = std::getenv("SYMFAST_CPU_CACHE_MB")) {
    char* end = nullptr;
    errno = 0;
    const long long mb = std::strtoll(env, &end, 10);
    // strtoll saturates out-of-range input (errno ERANGE); the bound keeps
    // mb << 20 from overflowing into a negative limit.
    TORCH_CHECK(end != env && *end == '\0' && errno != ERANGE && mb >= 0 && mb <= kMaxLimitMb,
                "SYMFAST_CPU_CACHE_MB must be an integer number of MiB in [0, ", kMaxLimitMb,
                "], got '", env, "'");
    return static_cast<int64_t>(mb) << 20;
  }
  return int64_t(1) << 30;
}

class BlockCache {
 public:
  static BlockCache& get() {
    // Leaked on purpose: tensors may be freed during interpreter teardown,
    // after static destructors would have run.
    static BlockCache* cache = new BlockCache();
    return *cache;
  }

  void* acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= bytes;
        --blocks_;
        ++hits_;
        return p;
      }
      ++misses_;
    }
    void* p = std::aligned_alloc(kHugePage, bytes);
    TORCH_CHECK(p != nullptr, "symfast: out of memory allocating ", bytes, " bytes");
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);  // advisory: failure just means 4 KiB pages
#endif
    return p;
  }

  void release(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + static_cast<int64_t>(bytes) <= limit_) {
        free_[bytes].push_back(p);
        cached_ += bytes;
        ++blocks_;
        return;
      }
    }
    std::free(p);
  }

  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mu_);
    return {cached_, blocks_, limit_, hits_, misses_};
  }

  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "symfast.set_cpu_cache_limit: bytes must be >= 0, got ", bytes);
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit_ = bytes;
    }
    trim();
  }

  void trim(bool all = false) {
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [size, list] : free_) {
        while (!list.empty() && (all || cached_ > limit_)) {
          to_free.push_back(list.back());
          list.pop_back();
          cached_ -= size;
          --blocks_;
        }
      }
    }
    for (void* p : to_free) std::free(p);
  }

 private:
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  int64_t cached_ = 0, blocks_ = 0, limit_ = default_limit(), hits_ = 0, misses_ = 0;
};

}  // namespace

namespace {

// The DataPtr context of a cached block: where it is and how big, for its deleter.
struct Block {
  void* p;
  size_t bytes;
};

void release_block(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  BlockCache::get().release(block->p, block->bytes);
  delete block;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) *
                       c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kMinCachedBytes || !options.device().is_cpu()) return at::empty(sizes, options);
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* p = BlockCache::get().acquire(rounded);
  // A resizable storage with the CPU allocator behind it, like at::empty's: code
  // that resizes a tensor or frees a storage with resize_(0) (FSDP-style memory
  // management) works on these outputs too. (at::from_blob's storage is not
  // resizable.) A resize allocates from the CPU allocator and hands this block
  // back to the cache through its deleter.
  c10::DataPtr data(p, new Block{p, rounded}, &release_block, c10::Device(c10::kCPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, std::move(data), c10::GetCPUAllocator(),
                       /*resizable=*/true);
  return at::empty({0}, options).set_(std::move(storage), 0, sizes, /*stride=contiguous*/ {});
}

std::vector<int64_t> cpu_cache_info() { return BlockCache::get().info(); }
void cpu_cache_set_limit(int64_t bytes) { BlockCache::get().set_limit(bytes); }
void cpu_cache_empty() { BlockCache::get().trim(/*all=*/true); }

}  // namespace symfast
