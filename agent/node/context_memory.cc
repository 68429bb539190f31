#include "agent/node/context_memory.h"

#include <cerrno>
#include <utility>

#include "absl/strings/str_cat.h"
#include "agent/registry/memlock_backend.h"
#include "common/errno_status.h"

namespace dmapin::agent {
namespace {

class BackedContextMemory final : public ContextMemory {
 public:
  explicit BackedContextMemory(BackedMemory memory) : memory_(std::move(memory)) {}
  uint64_t ua() const override { return memory_.ua(); }
  uint64_t size() const override { return memory_.size(); }

 private:
  BackedMemory memory_;
};

class BackedMemoryProvider final : public ContextMemoryProvider {
 public:
  explicit BackedMemoryProvider(std::string hugetlbfs_dir)
      : hugetlbfs_dir_(std::move(hugetlbfs_dir)) {}

  absl::StatusOr<std::unique_ptr<ContextMemory>> Allocate(absl::string_view context,
                                                          MemoryBacking backing, uint64_t size,
                                                          uint64_t at) override {
    absl::StatusOr<BackedMemory> memory = [&]() -> absl::StatusOr<BackedMemory> {
      switch (backing) {
        case MemoryBacking::kUnspecified:
        case MemoryBacking::kAnonymous:
          return BackedMemory::Anonymous(size, at);
        case MemoryBacking::kMemfd:
          return BackedMemory::Memfd(absl::StrCat("dmapin:", context), size, at);
        case MemoryBacking::kHugetlbfs: {
          std::string dir = hugetlbfs_dir_;
          if (dir.empty()) {
            absl::StatusOr<std::string> found = BackedMemory::FindHugetlbfsMount();
            if (!found.ok()) return found.status();
            dir = *found;
          }
          return BackedMemory::HugetlbfsFile(dir, size, at);
        }
        default:
          return ErrnoStatus(EINVAL,
                             absl::StrCat("unknown memory backing ", static_cast<int>(backing)));
      }
    }();
    if (!memory.ok()) return memory.status();
    return std::unique_ptr<ContextMemory>(new BackedContextMemory(std::move(*memory)));
  }

 private:
  const std::string hugetlbfs_dir_;
};

}  // namespace

std::unique_ptr<ContextMemoryProvider> NewBackedMemoryProvider(std::string hugetlbfs_dir) {
  return std::make_unique<BackedMemoryProvider>(std::move(hugetlbfs_dir));
}

}  // namespace dmapin::agent
