// A libFuzzer target for the region registry (spec: shared/spec/registry-semantics.md).
//
// The input is decoded into a bounded sequence of registry operations over 2 memory contexts,
// 3 containers and a 64-page address space (so collisions are frequent) on a SimBackend with
// 4 KiB or 64 KiB pages, one hole, one read-only page and one huge-page range. After every
// operation the harness checks:
//  - Registry::CheckInvariants();
//  - the invariants of spec §10 again, recomputed from the public API (ListRegions, ListContexts,
//    ListContainers and the backend's pin counts), so a bug in the checker itself shows too;
//  - that a failed operation changed nothing visible (regions, contexts, containers);
//  - the answer against an oracle for the cases the spec decides unambiguously (errno of
//    register/unregister/map/unmap, translate/lookup/find against a brute-force search);
//  - post-conditions of successful operations (a registered region is found, a released container
//    is gone, a torn-down context has nothing pinned).
// Any violation prints the reason, the configuration and the operations so far, then traps.
//
// Sizes, addresses and DMA windows also come from the whole 64-bit range ("wide" operands: raw
// values, powers of two, values just below 2^64 or 2^63, small multiples of the page), so the
// registry's limits (RegistryLimits: 16 pages per region; 40 or 128 pages per node) and the
// huge-range paths are exercised next to the normal ones in the small space.
//
// Input format: byte 0 configures the run; then records of 5 bytes, one operation each:
// [opcode, a, b, c, d], where a record with wide operands is followed by their bytes (see Wide()).
// Missing bytes read as 0. tests/fuzz/make_seeds.py writes the seed corpus.
//
// REGISTRY_FUZZ_VERBOSE=1 prints every operation and its answer (to check what a seed does).
#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "agent/registry/registry.h"
#include "agent/registry/sim_backend.h"
#include "common/errno_status.h"

namespace dmapin::agent {
namespace {

// The simulated address space: kSpacePages pages of PS from kBase. kBase is 256 MiB aligned so
// every IOMMU page size used here divides it.
constexpr uint64_t kBase = uint64_t{1} << 28;
constexpr uint64_t kSpacePages = 64;
constexpr uint64_t kHolePage = 13;
constexpr uint64_t kReadOnlyPage = 37;
// Pages [48, 64) are backed by huge pages of 16 * PS.
constexpr uint64_t kHugeFirstPage = 48;
constexpr uint64_t kHugePages = 16;
constexpr uint64_t kHugeFactor = 16;

constexpr int kMaxOps = 200;
// RegistryLimits::max_region_bytes in pages: the largest register the small space decodes.
constexpr uint64_t kMaxRegionPages = 16;
constexpr size_t kRecordSize = 5;

constexpr ContextId kContexts[] = {1, 2};
constexpr ContextId kUnknownContext = 5;
constexpr ContainerId kContainers[] = {1, 2, 3};
constexpr ContainerId kUnknownContainer = 7;

// Expected outcome of an operation: an errno (0 = OK), or one of these.
constexpr int kAnyResult = -2;
constexpr int kAnyFailure = -1;

class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool done() const { return pos_ >= size_; }
  uint8_t Byte() { return pos_ < size_ ? data_[pos_++] : 0; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

enum class Op {
  kRegister,
  kUnregister,
  kMap,
  kUnmap,
  kCreateContainer,
  kReleaseContainer,
  kTeardownContext,
  kCreateContext,
  kTranslate,
  kLookup,
  kFind,
  kReadSession,
};

// Opcode byte % 20 -> operation; the mutating hot operations get more weight.
constexpr Op kOpTable[20] = {
    Op::kRegister,
    Op::kRegister,
    Op::kRegister,
    Op::kRegister,
    Op::kUnregister,
    Op::kUnregister,
    Op::kUnregister,
    Op::kMap,
    Op::kMap,
    Op::kMap,
    Op::kMap,
    Op::kUnmap,
    Op::kUnmap,
    Op::kCreateContainer,
    Op::kReleaseContainer,
    Op::kTeardownContext,
    Op::kCreateContext,
    Op::kTranslate,
    Op::kLookup,
    Op::kFind,
};

// The last byte of a record selects a read-session check instead of a translate when odd.

struct Snapshot {
  std::vector<RegionInfo> regions;
  std::vector<ContextInfo> contexts;
  std::vector<ContainerInfo> containers;
};

bool SameRegion(const RegionInfo& a, const RegionInfo& b) {
  return a.context == b.context && a.ua == b.ua && a.size == b.size && a.entries == b.entries &&
         a.used == b.used && a.mapped == b.mapped &&
         a.max_iommu_page_size == b.max_iommu_page_size && a.pending_release == b.pending_release &&
         a.holders == b.holders;
}

bool SameContext(const ContextInfo& a, const ContextInfo& b) {
  return a.id == b.id && a.options.memlock_limit_bytes == b.options.memlock_limit_bytes &&
         a.options.cap_ipc_lock == b.options.cap_ipc_lock && a.locked_bytes == b.locked_bytes &&
         a.regions == b.regions && a.containers == b.containers;
}

bool SameContainer(const ContainerInfo& a, const ContainerInfo& b) {
  return a.id == b.id && a.options.iommu_page_size == b.options.iommu_page_size &&
         a.options.window_start == b.options.window_start &&
         a.options.window_size == b.options.window_size && a.context == b.context &&
         a.held_regions == b.held_regions && a.installed_entries == b.installed_entries;
}

template <typename T, typename Eq>
bool SameVector(const std::vector<T>& a, const std::vector<T>& b, Eq eq) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!eq(a[i], b[i])) return false;
  }
  return true;
}

std::string FormatRegion(const RegionInfo& r) {
  return absl::StrFormat(
      "{ctx=%u ua=0x%x size=0x%x entries=%u used=%u mapped=%u max_iommu=0x%x pending=%d "
      "holders=[%s]}",
      r.context, r.ua, r.size, r.entries, r.used, r.mapped, r.max_iommu_page_size,
      r.pending_release ? 1 : 0, absl::StrJoin(r.holders, ","));
}

std::string FormatSnapshot(const Snapshot& s) {
  std::string out;
  for (const ContextInfo& c : s.contexts) {
    absl::StrAppendFormat(&out, "  context %u: locked=0x%x regions=%u containers=[%s]\n", c.id,
                          c.locked_bytes, c.regions, absl::StrJoin(c.containers, ","));
  }
  for (const ContainerInfo& c : s.containers) {
    absl::StrAppendFormat(&out,
                          "  container %u: iommu=0x%x window=[0x%x,+0x%x) context=%s held=%u "
                          "installed=%u\n",
                          c.id, c.options.iommu_page_size, c.options.window_start,
                          c.options.window_size,
                          c.context.has_value() ? absl::StrCat(*c.context) : "none", c.held_regions,
                          c.installed_entries);
  }
  for (const RegionInfo& r : s.regions) absl::StrAppend(&out, "  region ", FormatRegion(r), "\n");
  return out;
}

std::string FormatStatus(const absl::Status& status) {
  return status.ok() ? "OK" : std::string(status.message());
}

std::string FormatExpect(int expect) {
  if (expect == kAnyResult) return "anything";
  if (expect == kAnyFailure) return "a failure";
  if (expect == 0) return "OK";
  return ErrnoName(expect);
}

// Whether [a, a + a_size) and [b, b + b_size) share a byte; sizes > 0, ends may be 2^64.
bool Overlaps(uint64_t a, uint64_t a_size, uint64_t b, uint64_t b_size) {
  const uint64_t a_last = a + (a_size - 1);
  const uint64_t b_last = b + (b_size - 1);
  return a <= b_last && b <= a_last;
}

// Whether [ua, ua + size) lies inside region r (size > 0; a wrapping range lies nowhere).
bool Contains(const RegionInfo& r, uint64_t ua, uint64_t size) {
  if (size == 0 || ua + (size - 1) < ua) return false;
  const uint64_t r_last = r.ua + (r.size - 1);
  return r.ua <= ua && ua + (size - 1) <= r_last;
}

class Harness {
 public:
  explicit Harness(uint8_t config) : config_(config) {
    page_size_ = (config & 1) != 0 ? 65536 : 4096;
    ctx1_limit_pages_ = 4 + 4 * ((config >> 1) & 7);
    ctx2_cap_ = ((config >> 4) & 1) != 0;
    // Bit 5: a node limit the small space can reach (else only wide registrations reach it).
    limits_ = {.max_region_bytes = kMaxRegionPages * page_size_,
               .max_pinned_bytes = (((config >> 5) & 1) != 0 ? 40 : 128) * page_size_};
  }

  void Run(Reader* in) {
    in_ = in;
    SimBackendOptions options;
    options.page_size = page_size_;
    options.holes.push_back({PageUa(kHolePage), page_size_});
    options.readonly.push_back({PageUa(kReadOnlyPage), page_size_});
    options.huge.push_back(
        {PageUa(kHugeFirstPage), kHugePages * page_size_, kHugeFactor * page_size_});
    absl::StatusOr<std::unique_ptr<SimBackend>> backend = SimBackend::Create(options);
    if (!backend.ok()) Fail(absl::StrCat("SimBackend::Create: ", backend.status().message()));
    backend_ = std::move(*backend);
    registry_ = std::make_unique<Registry>(backend_.get(), limits_);
    if (registry_->page_size() != page_size_) Fail("registry page size differs from backend's");

    for (ContextId ctx : kContexts) {
      Expect(absl::StrFormat("setup CreateContext(%u)", ctx),
             registry_->CreateContext(ctx, OptionsFor(ctx)), 0);
    }
    // Container 1: 4 KiB IOMMU pages; 2: PS with an offset window; 3: the huge-page size.
    Expect("setup CreateContainer(1)", registry_->CreateContainer(1, MakeContainer(0, 0)), 0);
    Expect("setup CreateContainer(2)", registry_->CreateContainer(2, MakeContainer(1, 1)), 0);
    Expect("setup CreateContainer(3)", registry_->CreateContainer(3, MakeContainer(2, 2)), 0);
    for (ContainerId c : kContainers) shadow_[c];
    CheckAll();

    for (int i = 0; i < kMaxOps && !in->done(); ++i) {
      uint8_t record[kRecordSize];
      for (uint8_t& byte : record) byte = in->Byte();
      Step(record);
      CheckAll();
    }

    if (std::getenv("REGISTRY_FUZZ_VERBOSE") != nullptr) {
      std::fprintf(stderr, "config=0x%02x\n", config_);
      for (const std::string& line : log_) std::fprintf(stderr, "  %s\n", line.c_str());
    }
    registry_.reset();
    absl::StatusOr<uint64_t> left = backend_->TotalPinnedPages();
    if (!left.ok() || *left != 0) {
      Fail(absl::StrCat("pages still pinned after ~Registry: ",
                        left.ok() ? absl::StrCat(*left) : std::string(left.status().message())));
    }
  }

 private:
  uint64_t PageUa(uint64_t page) const { return kBase + page * page_size_; }

  // A 64-bit operand from the input: a mode byte, a value byte, and for some modes more bytes.
  // Most modes give multiples of `align` (the page or IOMMU page), which the registry can accept.
  uint64_t Wide(uint64_t align) {
    const uint8_t mode = in_->Byte();
    const uint8_t b = in_->Byte();
    switch (mode % 8) {
      case 0: {  // raw
        uint64_t value = b;
        for (int i = 1; i < 8; ++i) value |= uint64_t{in_->Byte()} << (8 * i);
        return value;
      }
      case 1:
        return uint64_t{1} << (b % 64);
      case 2:  // just below 2^64
        return 0 - align * (1 + b % 16);
      case 3:  // small: around the limits
        return align * b;
      case 4:  // around 2^k
        return (uint64_t{1} << (b % 64)) + align * static_cast<uint64_t>(in_->Byte() % 5) -
               2 * align;
      case 5:  // in the simulated space
        return PageUa(b % (kSpacePages + 16)) - kBase % std::max<uint64_t>(align, 1);
      case 6:  // unaligned near 2^64
        return 0 - uint64_t{b};
      default:  // around 2^63
        return (uint64_t{1} << 63) - align * (b % 4);
    }
  }

  ContextOptions OptionsFor(ContextId ctx) const {
    ContextOptions options;
    if (ctx == 1) options.memlock_limit_bytes = ctx1_limit_pages_ * page_size_;
    if (ctx == 2 && ctx2_cap_) {
      options.memlock_limit_bytes = 2 * page_size_;
      options.cap_ipc_lock = true;
    }
    return options;
  }

  static ContainerId DecodeContainer(uint8_t b) {
    return b % 16 == 15 ? kUnknownContainer : kContainers[(b % 16) % 3];
  }
  static ContextId DecodeContext(uint8_t b) {
    return b % 16 == 15 ? kUnknownContext : kContexts[(b % 16) % 2];
  }

  // iommu choice: 0 = 4 KiB, 1 = 64 KiB, 2 = huge (16 * PS), 3 = 16 MiB, 4 = invalid.
  // window choice: 0 = [0, 32 pages), 1 = [8 pages, +16 pages), 2 = [0, 2^40), 3 = empty.
  ContainerOptions MakeContainer(int iommu_choice, int window_choice) const {
    ContainerOptions options;
    static constexpr uint64_t kInvalidPageSize = 12288;
    const uint64_t sizes[] = {4096, 65536, kHugeFactor * page_size_, uint64_t{16} << 20,
                              kInvalidPageSize};
    options.iommu_page_size = sizes[iommu_choice % 5];
    const uint64_t io = options.iommu_page_size;
    switch (window_choice % 4) {
      case 0:
        options.window_start = 0;
        options.window_size = 32 * io;
        break;
      case 1:
        options.window_start = 8 * io;
        options.window_size = 16 * io;
        break;
      case 2:
        options.window_start = 0;
        options.window_size = uint64_t{1} << 40;
        break;
      default:
        options.window_start = 0;
        options.window_size = 0;
        break;
    }
    return options;
  }

  // A [ua, ua + size) range in PS units from two bytes; p >= 192 selects an odd case.
  // p >= 192 with bit 6 or 7 of l: both are wide operands.
  void DecodeRange(uint8_t p, uint8_t l, uint64_t* ua, uint64_t* size) {
    const uint64_t entries = 1 + (l & 15);
    *ua = PageUa(p & 63);
    *size = entries * page_size_;
    if (p < 192) return;
    if ((l & 0xc0) != 0) {
      *ua = Wide(page_size_);
      *size = Wide(page_size_);
      return;
    }
    switch ((l >> 4) & 3) {
      case 0:
        *ua += 512;
        break;
      case 1:
        *size += 512;
        break;
      case 2:
        *ua = 0 - page_size_ * (1 + (p & 1));  // near 2^64: may wrap
        break;
      default:
        *size = 0;
        break;
    }
  }

  Snapshot Take() const {
    return Snapshot{registry_->ListRegions(), registry_->ListContexts(),
                    registry_->ListContainers()};
  }

  std::optional<ContainerInfo> ContainerOf(ContainerId id) const {
    absl::StatusOr<ContainerInfo> info = registry_->GetContainer(id);
    if (!info.ok()) return std::nullopt;
    return *info;
  }
  std::optional<ContextInfo> ContextOf(ContextId id) const {
    absl::StatusOr<ContextInfo> info = registry_->GetContext(id);
    if (!info.ok()) return std::nullopt;
    return *info;
  }

  [[noreturn]] void Fail(const std::string& why) const {
    std::string state;
    if (registry_ != nullptr) state = FormatSnapshot(Take());
    std::fprintf(stderr,
                 "\n=== registry_fuzz: FAILED ===\n%s\nconfig=0x%02x page_size=%llu "
                 "ctx1_limit_pages=%llu ctx2_cap=%d max_pinned_pages=%llu\noperations (%zu):\n",
                 why.c_str(), config_, static_cast<unsigned long long>(page_size_),
                 static_cast<unsigned long long>(ctx1_limit_pages_), ctx2_cap_ ? 1 : 0,
                 static_cast<unsigned long long>(limits_.max_pinned_bytes / page_size_),
                 log_.size());
    for (size_t i = 0; i < log_.size(); ++i) {
      std::fprintf(stderr, "  %3zu %s\n", i, log_[i].c_str());
    }
    std::fprintf(stderr, "state now:\n%s", state.c_str());
    std::fflush(stderr);
    __builtin_trap();
  }

  // Checks `status` against `expect` and the errno conventions of spec §9; logs the operation.
  void Expect(const std::string& what, const absl::Status& status, int expect) {
    log_.push_back(absl::StrCat(what, " -> ", FormatStatus(status)));
    if (!status.ok()) {
      if (!status.GetPayload(kErrnoPayloadUrl).has_value()) {
        Fail(absl::StrCat(what, ": error carries no errno payload: ", status.ToString()));
      }
      const std::string name = ErrnoName(ErrnoOf(status));
      if (!absl::StartsWith(status.message(), absl::StrCat(name, ":"))) {
        Fail(absl::StrCat(what, ": message does not start with ", name, ": ", status.message()));
      }
    }
    bool good = true;
    if (expect == kAnyFailure) {
      good = !status.ok();
    } else if (expect != kAnyResult) {
      good = ErrnoOf(status) == expect;
    }
    if (!good) {
      Fail(absl::StrCat(what, ": expected ", FormatExpect(expect), ", got ", FormatStatus(status)));
    }
  }

  // A failed operation must leave everything visible as it was.
  void CheckUnchanged(const std::string& what, const Snapshot& before) const {
    const Snapshot after = Take();
    if (!SameVector(before.regions, after.regions, SameRegion) ||
        !SameVector(before.contexts, after.contexts, SameContext) ||
        !SameVector(before.containers, after.containers, SameContainer)) {
      Fail(absl::StrCat(what, " failed but changed the state; before:\n", FormatSnapshot(before)));
    }
  }

  // --- Operations ----------------------------------------------------------------------------

  void Step(const uint8_t* r) {
    switch (kOpTable[r[0] % 20]) {
      case Op::kRegister:
        DoRegister(DecodeContainer(r[1]), DecodeContext(r[2]), r[3], r[4]);
        break;
      case Op::kUnregister:
        DoUnregister(DecodeContainer(r[1]), r[2], r[3]);
        break;
      case Op::kMap:
        DoMap(DecodeContainer(r[1]), r[2], r[3], r[4]);
        break;
      case Op::kUnmap:
        DoUnmap(DecodeContainer(r[1]), r[2], r[3], r[4]);
        break;
      case Op::kCreateContainer:
        DoCreateContainer(DecodeContainer(r[1]), r[2], r[3]);
        break;
      case Op::kReleaseContainer:
        DoReleaseContainer(DecodeContainer(r[1]));
        break;
      case Op::kTeardownContext:
        DoTeardownContext(DecodeContext(r[1]));
        break;
      case Op::kCreateContext:
        DoCreateContext(DecodeContext(r[1]));
        break;
      case Op::kTranslate:
        if ((r[4] & 1) != 0) {
          DoReadSession(DecodeContext(r[1]), r[2], r[3]);
        } else {
          DoTranslate(DecodeContext(r[1]), r[2], r[3]);
        }
        break;
      case Op::kLookup:
        DoLookup(DecodeContext(r[1]), r[2], r[3]);
        break;
      case Op::kFind:
        DoFind(DecodeContext(r[1]), r[2], r[3]);
        break;
      case Op::kReadSession:
        DoReadSession(DecodeContext(r[1]), r[2], r[3]);
        break;
    }
  }

  // The errno spec §2 gives for a register, or kAnyResult where it does not decide.
  int PredictRegister(ContainerId c, ContextId ctx, uint64_t ua, uint64_t size) const {
    const std::optional<ContainerInfo> container = ContainerOf(c);
    const std::optional<ContextInfo> context = ContextOf(ctx);
    if (!container.has_value() || !context.has_value()) return kAnyFailure;
    const bool aligned = size > 0 && ua % page_size_ == 0 && size % page_size_ == 0;
    // ua + size == 2^64 is not decided by "does not pass 2^64".
    const bool wraps = size > 0 && ua + size <= ua;
    const bool ends_at_top = size > 0 && ua + size == 0;
    if (container->context.has_value() && *container->context != ctx) {
      // EPERM; its order against the alignment check is not specified.
      return aligned && !wraps ? EPERM : kAnyFailure;
    }
    if (!aligned || (wraps && !ends_at_top)) return EINVAL;
    if (ends_at_top) return kAnyResult;
    const uint64_t entries = size / page_size_;
    const std::vector<RegionInfo> regions = registry_->ListRegions(ctx);
    for (const RegionInfo& region : regions) {
      if (region.ua == ua && region.entries == entries) {
        for (ContainerId holder : region.holders) {
          if (holder == c) return EBUSY;
        }
        return 0;
      }
    }
    for (const RegionInfo& region : regions) {
      if (Overlaps(region.ua, region.size, ua, size)) return EINVAL;
    }
    const uint64_t locked_pages = context->locked_bytes / page_size_;
    if (context->options.memlock_limit_bytes.has_value() && !context->options.cap_ipc_lock &&
        locked_pages + entries > *context->options.memlock_limit_bytes / page_size_) {
      return ENOMEM;
    }
    // The node's limits; beyond here entries <= kMaxRegionPages.
    if (size > limits_.max_region_bytes) return ENOMEM;
    uint64_t pinned_pages = 0;
    for (const ContextInfo& info : registry_->ListContexts()) {
      pinned_pages += info.locked_bytes / page_size_;
    }
    if (pinned_pages + entries > limits_.max_pinned_bytes / page_size_) return ENOMEM;
    for (uint64_t i = 0; i < entries; ++i) {
      const uint64_t page = ua + i * page_size_;
      if (page == PageUa(kHolePage) || page == PageUa(kReadOnlyPage)) return EFAULT;
    }
    return 0;
  }

  void DoRegister(ContainerId c, ContextId ctx, uint8_t p, uint8_t l) {
    uint64_t ua = 0;
    uint64_t size = 0;
    DecodeRange(p, l, &ua, &size);
    const std::string what =
        absl::StrFormat("Register(c=%u, ctx=%u, ua=0x%x, size=0x%x)", c, ctx, ua, size);
    const int expect = PredictRegister(c, ctx, ua, size);
    const Snapshot before = Take();
    const absl::Status status = registry_->Register(c, ctx, ua, size);
    Expect(what, status, expect);
    if (!status.ok()) {
      CheckUnchanged(what, before);
      return;
    }
    const uint64_t entries = size / page_size_;
    absl::StatusOr<std::optional<RegionInfo>> found = registry_->Find(ctx, ua, entries);
    if (!found.ok() || !found->has_value()) Fail(what + " succeeded but Find does not see it");
    bool held = false;
    for (ContainerId holder : (*found)->holders) held |= holder == c;
    if (!held) Fail(what + " succeeded but the container does not hold the region");
    absl::StatusOr<std::optional<RegionInfo>> looked = registry_->Lookup(ctx, ua, size);
    if (!looked.ok() || !looked->has_value() || (*looked)->ua != ua) {
      Fail(what + " succeeded but Lookup does not see it");
    }
    const std::optional<ContainerInfo> container = ContainerOf(c);
    if (!container.has_value() || container->context != ctx) {
      Fail(what + " succeeded but the container is not bound to the context");
    }
  }

  int PredictUnregister(ContainerId c, uint64_t ua, uint64_t size) const {
    const std::optional<ContainerInfo> container = ContainerOf(c);
    if (!container.has_value()) return kAnyFailure;
    if (size == 0 || ua % page_size_ != 0 || size % page_size_ != 0) return EINVAL;
    if (ua + size == 0) return kAnyResult;
    if (ua + size < ua) return EINVAL;
    if (!container->context.has_value()) return ENOENT;
    const uint64_t entries = size / page_size_;
    for (const RegionInfo& region : registry_->ListRegions(*container->context)) {
      if (region.ua != ua || region.entries != entries) continue;
      bool held = false;
      for (ContainerId holder : region.holders) held |= holder == c;
      if (!held) return ENOENT;
      if (region.used > 1) return 0;
      return region.mapped != 1 ? EBUSY : 0;
    }
    return ENOENT;
  }

  void DoUnregister(ContainerId c, uint8_t p, uint8_t l) {
    uint64_t ua = 0;
    uint64_t size = 0;
    DecodeRange(p, l, &ua, &size);
    const std::string what = absl::StrFormat("Unregister(c=%u, ua=0x%x, size=0x%x)", c, ua, size);
    const int expect = PredictUnregister(c, ua, size);
    const Snapshot before = Take();
    const absl::Status status = registry_->Unregister(c, ua, size);
    Expect(what, status, expect);
    if (!status.ok()) {
      CheckUnchanged(what, before);
      return;
    }
    const std::optional<ContainerInfo> container = ContainerOf(c);
    if (!container.has_value() || !container->context.has_value()) {
      Fail(what + " succeeded but the container is gone or unbound");
    }
    absl::StatusOr<std::optional<RegionInfo>> found =
        registry_->Find(*container->context, ua, size / page_size_);
    if (!found.ok()) Fail(what + ": Find failed: " + found.status().ToString());
    if (found->has_value()) {
      for (ContainerId holder : (*found)->holders) {
        if (holder == c) Fail(what + " succeeded but the container still holds the region");
      }
    }
  }

  uint64_t IommuPageOf(ContainerId c) const {
    const std::optional<ContainerInfo> container = ContainerOf(c);
    return container.has_value() ? container->options.iommu_page_size : page_size_;
  }

  bool ShadowHasAny(ContainerId c, uint64_t iova, uint64_t size) const {
    auto it = shadow_.find(c);
    if (it == shadow_.end() || size == 0) return false;
    auto entry = it->second.lower_bound(iova);
    return entry != it->second.end() && *entry - iova < size;
  }

  int PredictMap(ContainerId c, uint64_t iova, uint64_t ua, uint64_t size) const {
    const std::optional<ContainerInfo> container = ContainerOf(c);
    if (!container.has_value()) return kAnyFailure;
    if (!container->context.has_value()) return EPERM;
    const uint64_t io = container->options.iommu_page_size;
    const uint64_t start = container->options.window_start;
    const uint64_t window = container->options.window_size;
    const bool outside = iova < start || iova - start > window || size > window - (iova - start);
    if (size == 0 || iova % io != 0 || ua % io != 0 || size % io != 0) return EINVAL;
    // A wrapping ua fails the lookup of step 4, after the window check of step 3.
    if (outside) return ENXIO;
    if (ua + (size - 1) < ua) return EINVAL;
    const std::vector<RegionInfo> regions = registry_->ListRegions(*container->context);
    uint64_t registered = 0;
    for (const RegionInfo& region : regions) {
      // A remap inside this call may complete a pending release: not decided here.
      if (region.pending_release) return kAnyResult;
      registered += region.size;
    }
    // More than the context has registered cannot lie inside it (and bounds the loop below).
    if (size > registered) return EINVAL;
    for (uint64_t off = 0; off < size; off += io) {
      const uint64_t t = ua + off;
      bool found = false;
      for (const RegionInfo& region : regions) {
        if (Contains(region, t, io) && region.max_iommu_page_size >= io) found = true;
      }
      if (!found) return EINVAL;
    }
    return 0;
  }

  void DoMap(ContainerId c, uint8_t i, uint8_t p, uint8_t l) {
    const uint64_t io = IommuPageOf(c);
    uint64_t iova = (i % 40) * io + (i >= 240 ? 512 : 0);
    uint64_t ua = 0;
    if (io >= page_size_) {
      const uint64_t pages_per_io = io / page_size_;
      ua = PageUa((p & 63) / pages_per_io * pages_per_io);
    } else {
      ua = PageUa(p & 63) + ((l >> 4) * io) % page_size_;
    }
    uint64_t size = (1 + (l & 7)) * io;
    if (p >= 192 && (l & 0xc0) != 0) {
      iova = Wide(io);
      ua = Wide(io);
      size = Wide(io);
    } else if (p >= 192) {
      switch ((l >> 4) & 3) {
        case 0:
          ua += 512;
          break;
        case 1:
          ua = 0 - 2 * io;  // runs past 2^64 when size > 2 * io
          break;
        case 2:
          size = 0;
          break;
        default:
          iova = (uint64_t{1} << 40) - io;
          break;
      }
    }
    const std::string what =
        absl::StrFormat("Map(c=%u, iova=0x%x, ua=0x%x, size=0x%x) io=0x%x", c, iova, ua, size, io);
    const int expect = PredictMap(c, iova, ua, size);
    const bool had_entries = ShadowHasAny(c, iova, size);
    const Snapshot before = Take();
    const absl::Status status = registry_->Map(c, iova, ua, size);
    Expect(what, status, expect);
    if (status.ok()) {
      for (uint64_t off = 0; off < size; off += io) shadow_[c].insert(iova + off);
      return;
    }
    // A failed map over existing entries may have dropped them (spec §7.5 clears what it
    // installed, old mappings included); otherwise nothing may change.
    if (!had_entries) CheckUnchanged(what, before);
  }

  // `wide` != 0: iova and size are wide operands.
  void DoUnmap(ContainerId c, uint8_t i, uint8_t l, uint8_t wide) {
    const uint64_t io = IommuPageOf(c);
    uint64_t iova = (i % 40) * io + (i >= 240 ? 512 : 0);
    uint64_t size = (l % 12) * io;
    if (wide != 0) {
      iova = Wide(io);
      size = Wide(io);
    }
    const std::string what =
        absl::StrFormat("Unmap(c=%u, iova=0x%x, size=0x%x) io=0x%x", c, iova, size, io);
    int expect = kAnyResult;
    const std::optional<ContainerInfo> container = ContainerOf(c);
    if (!container.has_value()) {
      expect = kAnyFailure;
    } else if (container->context.has_value() && size > 0) {
      const uint64_t start = container->options.window_start;
      const uint64_t window = container->options.window_size;
      if (iova % io != 0 || size % io != 0) {
        expect = EINVAL;
      } else if (iova < start || iova - start > window || size > window - (iova - start)) {
        expect = ENXIO;
      } else {
        expect = 0;
      }
    }
    const Snapshot before = Take();
    const absl::Status status = registry_->Unmap(c, iova, size);
    Expect(what, status, expect);
    if (!status.ok()) {
      CheckUnchanged(what, before);
      return;
    }
    auto it = shadow_.find(c);
    if (it != shadow_.end()) {
      // A range inside the window may end exactly at 2^64.
      const auto end = iova + size == 0 ? it->second.end() : it->second.lower_bound(iova + size);
      it->second.erase(it->second.lower_bound(iova), end);
    }
  }

  // `wide` != 0: the IOMMU page size (usually a power of two) and the window are wide operands.
  void DoCreateContainer(ContainerId c, uint8_t cfg, uint8_t wide) {
    if (wide != 0) {
      DoCreateWideContainer(c, cfg);
      return;
    }
    const int iommu_choice = cfg % 5;
    const int window_choice = (cfg / 5) % 4;
    const ContainerOptions options = MakeContainer(iommu_choice, window_choice);
    const std::string what =
        absl::StrFormat("CreateContainer(c=%u, iommu=0x%x, window=[0x%x,+0x%x))", c,
                        options.iommu_page_size, options.window_start, options.window_size);
    const bool exists = ContainerOf(c).has_value();
    int expect = kAnyResult;
    if (iommu_choice == 4) {
      expect = exists ? kAnyFailure : EINVAL;
    } else if (window_choice != 3) {
      expect = exists ? EEXIST : 0;
    } else {
      expect = exists ? kAnyFailure : kAnyResult;
    }
    const Snapshot before = Take();
    const absl::Status status = registry_->CreateContainer(c, options);
    Expect(what, status, expect);
    if (!status.ok()) {
      CheckUnchanged(what, before);
      return;
    }
    const std::optional<ContainerInfo> info = ContainerOf(c);
    if (!info.has_value() || info->context.has_value() || info->held_regions != 0 ||
        info->installed_entries != 0) {
      Fail(what + " succeeded but the new container is not empty and unbound");
    }
    shadow_[c].clear();
  }

  void DoCreateWideContainer(ContainerId c, uint8_t cfg) {
    ContainerOptions options;
    options.iommu_page_size = cfg < 240 ? uint64_t{1} << (12 + cfg % 52) : Wide(4096);
    const uint64_t io = options.iommu_page_size;
    options.window_start = Wide(io);
    options.window_size = Wide(io);
    const std::string what =
        absl::StrFormat("CreateContainer(c=%u, iommu=0x%x, window=[0x%x,+0x%x))", c, io,
                        options.window_start, options.window_size);
    const bool valid_page = io >= 4096 && (io & (io - 1)) == 0;
    const bool valid_window =
        valid_page && options.window_size != 0 && options.window_start % io == 0 &&
        options.window_size % io == 0 &&
        options.window_start + (options.window_size - 1) >= options.window_start;
    const bool exists = ContainerOf(c).has_value();
    const int expect = !valid_window ? (exists ? kAnyFailure : EINVAL) : (exists ? EEXIST : 0);
    const Snapshot before = Take();
    const absl::Status status = registry_->CreateContainer(c, options);
    Expect(what, status, expect);
    if (!status.ok()) {
      CheckUnchanged(what, before);
      return;
    }
    shadow_[c].clear();
  }

  void DoReleaseContainer(ContainerId c) {
    const std::string what = absl::StrFormat("ReleaseContainer(c=%u)", c);
    const bool exists = ContainerOf(c).has_value();
    const Snapshot before = Take();
    const absl::Status status = registry_->ReleaseContainer(c);
    Expect(what, status, exists ? 0 : kAnyFailure);
    if (!status.ok()) {
      CheckUnchanged(what, before);
      return;
    }
    if (ContainerOf(c).has_value()) Fail(what + " succeeded but the container still exists");
    for (const RegionInfo& region : registry_->ListRegions()) {
      for (ContainerId holder : region.holders) {
        if (holder == c) Fail(what + " succeeded but a region still names it as a holder");
      }
    }
    shadow_.erase(c);
  }

  void DoTeardownContext(ContextId ctx) {
    const std::string what = absl::StrFormat("TeardownContext(ctx=%u)", ctx);
    const std::optional<ContextInfo> context = ContextOf(ctx);
    const Snapshot before = Take();
    const absl::Status status = registry_->TeardownContext(ctx);
    Expect(what, status, context.has_value() ? 0 : kAnyFailure);
    if (!status.ok()) {
      CheckUnchanged(what, before);
      return;
    }
    if (ContextOf(ctx).has_value()) Fail(what + " succeeded but the context still exists");
    if (!registry_->ListRegions(ctx).empty()) Fail(what + " succeeded but regions remain");
    for (ContainerId c : context->containers) {
      if (ContainerOf(c).has_value()) Fail(what + " succeeded but a bound container remains");
      shadow_.erase(c);
    }
    for (uint64_t page = 0; page < kSpacePages; ++page) {
      absl::StatusOr<uint64_t> count = backend_->PinCount(ctx, PageUa(page));
      if (!count.ok() || *count != 0) Fail(what + " succeeded but pages are still pinned");
    }
  }

  void DoCreateContext(ContextId ctx) {
    const std::string what = absl::StrFormat("CreateContext(ctx=%u)", ctx);
    const bool exists = ContextOf(ctx).has_value();
    const Snapshot before = Take();
    const absl::Status status = registry_->CreateContext(ctx, OptionsFor(ctx));
    Expect(what, status, exists ? EEXIST : 0);
    if (!status.ok()) CheckUnchanged(what, before);
  }

  // The region of `ctx` containing [ua, ua + size), by brute force.
  std::optional<RegionInfo> BruteLookup(ContextId ctx, uint64_t ua, uint64_t size) const {
    for (const RegionInfo& region : registry_->ListRegions(ctx)) {
      if (Contains(region, ua, size)) return region;
    }
    return std::nullopt;
  }

  uint64_t TranslateUa(uint8_t p, uint8_t o) const {
    if (p >= 250) return p == 255 ? ~uint64_t{0} : 0;
    return PageUa(p % (kSpacePages + 2)) + o * (page_size_ / 256);
  }

  uint64_t ExpectedHpa(ContextId ctx, uint64_t ua) const {
    const uint64_t mask = page_size_ - 1;
    return backend_->FakeHpa(ctx, ua & ~mask) | (ua & mask);
  }

  void DoTranslate(ContextId ctx, uint8_t p, uint8_t o) {
    const uint64_t ua = TranslateUa(p, o);
    const std::string what = absl::StrFormat("Translate(ctx=%u, ua=0x%x)", ctx, ua);
    const bool known = ContextOf(ctx).has_value();
    const std::optional<RegionInfo> region = known ? BruteLookup(ctx, ua, 1) : std::nullopt;
    const Snapshot before = Take();
    const absl::StatusOr<uint64_t> hpa = registry_->Translate(ctx, ua);
    Expect(what, hpa.status(), !known ? kAnyFailure : region.has_value() ? 0 : EFAULT);
    if (hpa.ok() && *hpa != ExpectedHpa(ctx, ua)) {
      Fail(absl::StrFormat("%s = 0x%x, expected 0x%x", what, *hpa, ExpectedHpa(ctx, ua)));
    }
    if (!hpa.ok() && known && hpa.status().code() != absl::StatusCode::kOutOfRange) {
      Fail(what + ": EFAULT from translate must be OUT_OF_RANGE: " + hpa.status().ToString());
    }
    CheckUnchanged(what, before);
  }

  void DoReadSession(ContextId ctx, uint8_t p, uint8_t l) {
    const uint64_t first = TranslateUa(p, l);
    const uint64_t count = 1 + (l & 15);
    log_.push_back(absl::StrFormat("ReadSession(ctx=%u, ua=0x%x, pages=%u)", ctx, first, count));
    const bool known = ContextOf(ctx).has_value();
    Registry::ReadSession session(*registry_, ctx);
    if (session.valid() != known) Fail("ReadSession::valid() disagrees with GetContext");
    if (!known) return;
    for (uint64_t i = 0; i < count; ++i) {
      // Alternate directions so the cached region is left and re-entered.
      const uint64_t ua = first + ((i & 1) != 0 ? i : count - i) * (page_size_ / 2);
      uint64_t hpa = 0;
      const bool hit = session.TryTranslate(ua, &hpa);
      const absl::StatusOr<uint64_t> direct = registry_->Translate(ctx, ua);
      if (hit != direct.ok() || (hit && hpa != *direct)) {
        Fail(absl::StrFormat(
            "ReadSession::TryTranslate(0x%x) = %d/0x%x but Translate = %s", ua, hit ? 1 : 0, hpa,
            direct.ok() ? absl::StrFormat("0x%x", *direct) : direct.status().ToString()));
      }
      const absl::StatusOr<uint64_t> again = session.Translate(ua);
      if (again.ok() != hit || (hit && *again != hpa)) {
        Fail(absl::StrFormat("ReadSession::Translate(0x%x) disagrees with TryTranslate", ua));
      }
    }
  }

  void DoLookup(ContextId ctx, uint8_t p, uint8_t l) {
    uint64_t ua = PageUa(p & 63);
    if (p >= 192) ua += (l >> 6) * (page_size_ / 4);
    const uint64_t size = (1 + (l & 63)) * (page_size_ / 4);
    const std::string what = absl::StrFormat("Lookup(ctx=%u, ua=0x%x, size=0x%x)", ctx, ua, size);
    const bool known = ContextOf(ctx).has_value();
    const Snapshot before = Take();
    const absl::StatusOr<std::optional<RegionInfo>> got = registry_->Lookup(ctx, ua, size);
    Expect(what, got.status(), known ? 0 : kAnyFailure);
    if (got.ok()) {
      const std::optional<RegionInfo> want = BruteLookup(ctx, ua, size);
      if (got->has_value() != want.has_value() || (want.has_value() && !SameRegion(**got, *want))) {
        Fail(absl::StrCat(what, " = ", got->has_value() ? FormatRegion(**got) : "none",
                          ", expected ", want.has_value() ? FormatRegion(*want) : "none"));
      }
    }
    CheckUnchanged(what, before);
  }

  void DoFind(ContextId ctx, uint8_t p, uint8_t l) {
    const uint64_t ua = PageUa(p & 63);
    const uint64_t entries = l & 15;
    const std::string what = absl::StrFormat("Find(ctx=%u, ua=0x%x, entries=%u)", ctx, ua, entries);
    const bool known = ContextOf(ctx).has_value();
    const Snapshot before = Take();
    const absl::StatusOr<std::optional<RegionInfo>> got = registry_->Find(ctx, ua, entries);
    Expect(what, got.status(), known ? kAnyResult : kAnyFailure);
    if (got.ok()) {
      std::optional<RegionInfo> want;
      for (const RegionInfo& region : registry_->ListRegions(ctx)) {
        if (region.ua == ua && region.entries == entries) want = region;
      }
      if (got->has_value() != want.has_value() || (want.has_value() && !SameRegion(**got, *want))) {
        Fail(absl::StrCat(what, " = ", got->has_value() ? FormatRegion(**got) : "none",
                          ", expected ", want.has_value() ? FormatRegion(*want) : "none"));
      }
    }
    CheckUnchanged(what, before);
  }

  // --- Invariants (spec §10), from the public API ------------------------------------------------

  void CheckAll() const {
    const absl::Status invariants = registry_->CheckInvariants();
    if (!invariants.ok()) Fail(absl::StrCat("CheckInvariants: ", invariants.ToString()));

    const Snapshot s = Take();
    std::map<ContextId, const ContextInfo*> contexts;
    for (const ContextInfo& context : s.contexts) contexts[context.id] = &context;
    std::map<ContainerId, const ContainerInfo*> containers;
    for (const ContainerInfo& container : s.containers) containers[container.id] = &container;

    std::map<ContextId, uint64_t> locked;
    std::map<ContextId, uint64_t> count;
    std::map<ContainerId, uint64_t> held;
    uint64_t total_entries = 0;
    uint64_t total_mapped = 0;
    const RegionInfo* previous = nullptr;
    for (const RegionInfo& r : s.regions) {
      const std::string where = FormatRegion(r);
      if (contexts.count(r.context) == 0) Fail("region of an unknown context: " + where);
      if (r.entries == 0 || r.size != r.entries * page_size_ || r.ua % page_size_ != 0) {
        Fail("region with bad geometry: " + where);
      }
      if (r.used < 1 || r.mapped < 1) Fail("listed region with used or mapped < 1: " + where);
      if (r.holders.size() + (r.pending_release ? 1 : 0) != r.used) {
        Fail("used != holders (+1 if pending release): " + where);
      }
      if (r.pending_release && r.mapped == 1) {
        Fail("pending release not completed although mapped == 1: " + where);
      }
      if (r.max_iommu_page_size < page_size_ && r.max_iommu_page_size != 0) {
        // Normal memory allows IOMMU pages up to PS (spec §8).
        Fail("max_iommu_page_size below PS: " + where);
      }
      for (size_t i = 0; i < r.holders.size(); ++i) {
        if (i > 0 && r.holders[i - 1] >= r.holders[i]) Fail("holders not sorted: " + where);
        auto it = containers.find(r.holders[i]);
        if (it == containers.end()) Fail("holder is not a container: " + where);
        if (it->second->context != r.context) Fail("holder bound elsewhere: " + where);
        ++held[r.holders[i]];
      }
      if (previous != nullptr) {
        if (previous->context > r.context ||
            (previous->context == r.context && previous->ua >= r.ua)) {
          Fail("ListRegions not ordered by (context, ua)");
        }
        if (previous->context == r.context &&
            Overlaps(previous->ua, previous->size, r.ua, r.size)) {
          Fail(absl::StrCat("overlapping regions: ", FormatRegion(*previous), " and ", where));
        }
      }
      previous = &r;
      locked[r.context] += r.size;
      ++count[r.context];
      total_entries += r.entries;
      total_mapped += r.mapped - 1;
      for (uint64_t i = 0; i < r.entries; ++i) {
        absl::StatusOr<uint64_t> pins = backend_->PinCount(r.context, r.ua + i * page_size_);
        if (!pins.ok() || *pins != 1) {
          Fail(absl::StrFormat("page 0x%x of %s pinned %s times", r.ua + i * page_size_, where,
                               pins.ok() ? absl::StrCat(*pins) : "?"));
        }
      }
    }
    for (const ContextInfo& context : s.contexts) {
      if (context.locked_bytes != locked[context.id] || context.regions != count[context.id]) {
        Fail(absl::StrFormat("context %u: locked_bytes=0x%x regions=%u, regions add up to 0x%x/%u",
                             context.id, context.locked_bytes, context.regions, locked[context.id],
                             count[context.id]));
      }
      for (ContainerId c : context.containers) {
        auto it = containers.find(c);
        if (it == containers.end() || it->second->context != context.id) {
          Fail(absl::StrFormat("context %u lists container %u that is not bound to it", context.id,
                               c));
        }
      }
    }
    uint64_t total_installed = 0;
    for (const ContainerInfo& container : s.containers) {
      total_installed += container.installed_entries;
      if (container.held_regions != held[container.id]) {
        Fail(absl::StrFormat("container %u: held_regions=%u but %u regions name it", container.id,
                             container.held_regions, held[container.id]));
      }
      if (container.context.has_value()) {
        auto it = contexts.find(*container.context);
        if (it == contexts.end()) Fail("container bound to a missing context");
        bool listed = false;
        for (ContainerId c : it->second->containers) listed |= c == container.id;
        if (!listed) Fail(absl::StrFormat("container %u missing from its context", container.id));
      }
      if (container.installed_entries > 0 && !container.context.has_value()) {
        Fail(absl::StrFormat("unbound container %u has entries", container.id));
      }
      auto shadow = shadow_.find(container.id);
      const uint64_t possible = shadow == shadow_.end() ? 0 : shadow->second.size();
      if (container.installed_entries > possible) {
        Fail(absl::StrFormat("container %u has %u entries but at most %u were mapped", container.id,
                             container.installed_entries, possible));
      }
    }
    if (total_installed != total_mapped) {
      Fail(absl::StrFormat("sum of (mapped - 1) = %u but %u IOMMU entries are installed",
                           total_mapped, total_installed));
    }
    absl::StatusOr<uint64_t> pinned = backend_->TotalPinnedPages();
    if (!pinned.ok() || *pinned != total_entries) {
      Fail(absl::StrFormat("backend has %s pages pinned, regions hold %u",
                           pinned.ok() ? absl::StrCat(*pinned) : "?", total_entries));
    }
  }

  const uint8_t config_;
  uint64_t page_size_ = 4096;
  uint64_t ctx1_limit_pages_ = 0;
  bool ctx2_cap_ = false;
  RegistryLimits limits_;
  Reader* in_ = nullptr;  // for wide operands
  std::unique_ptr<SimBackend> backend_;
  std::unique_ptr<Registry> registry_;
  // Per container, every IOVA page that may hold an entry (a superset of the installed ones).
  std::map<ContainerId, std::set<uint64_t>> shadow_;
  std::vector<std::string> log_;
};

}  // namespace
}  // namespace dmapin::agent

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  dmapin::agent::Reader reader(data + 1, size - 1);
  dmapin::agent::Harness harness(data[0]);
  harness.Run(&reader);
  return 0;
}
