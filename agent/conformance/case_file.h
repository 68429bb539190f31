// Conformance case files ("dmapin-conformance/1", ../shared/spec/README.md).
//
// A case file lists cases of the registry contract (../shared/spec/registry-semantics.md); each
// case describes a simulated node (page size, memlock limit, unpinnable ranges) and a sequence of
// steps with expected answers. This parser turns any file of that format into plain structs; it
// knows nothing of the registry or of any target that runs the steps.
//
// Project extensions to the shared format (all optional):
//  - case `huge`: [{"ua", "size", "page_size"}] ranges backed by huge pages (spec §8);
//  - step `context`: the memory context a step acts in (default "default");
//  - `create_container`: `window_start`, `window_size` (DMA window), `expect`;
//    `iommu_page_size` defaults to the case's page size;
//  - op `teardown_context` {context} (spec §4);
//  - `expect` on `release_container` and `teardown_context` (default "OK").
//
// Numbers are JSON numbers or strings in C notation ("0x10000", "65536", "0200000"). Every error is
// absl::InvalidArgumentError naming the case, the step index and the field.
#ifndef DMAPIN_AGENT_CONFORMANCE_CASE_FILE_H_
#define DMAPIN_AGENT_CONFORMANCE_CASE_FILE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace dmapin::agent::conformance {

// The format tag every case file carries.
inline constexpr absl::string_view kCaseFileFormat = "dmapin-conformance/1";
// The context of steps that name none.
inline constexpr absl::string_view kDefaultContext = "default";
// Default page size PS of a case's simulated node.
inline constexpr uint64_t kDefaultPageSize = 65536;

// A byte range [ua, ua + size).
struct Range {
  uint64_t ua = 0;
  uint64_t size = 0;

  friend bool operator==(const Range& a, const Range& b) {
    return a.ua == b.ua && a.size == b.size;
  }
  friend bool operator!=(const Range& a, const Range& b) { return !(a == b); }
};

// A range backed by huge pages of `page_size` bytes (spec §8).
struct HugeRange {
  uint64_t ua = 0;
  uint64_t size = 0;
  uint64_t page_size = 0;
};

enum class Op {
  kCreateContainer,
  kRegister,
  kUnregister,
  kMap,
  kUnmap,
  kReleaseContainer,
  kTeardownContext,
  kTranslate,
  kLookup,
  kCheck,
};

// The name used in case files ("create_container", ...).
absl::string_view OpName(Op op);
// The op for a name, or nullopt.
std::optional<Op> OpFromName(absl::string_view name);

// One step. Which fields are meaningful depends on `op` (see the table in the spec README);
// fields an op does not use keep their defaults.
struct Step {
  Op op = Op::kCheck;
  // The memory context the step acts in.
  std::string context = std::string(kDefaultContext);
  // create_container, register, unregister, map, unmap, release_container.
  std::string container;

  // create_container: unset fields take the defaults for containers created on first use.
  std::optional<uint64_t> iommu_page_size;
  std::optional<uint64_t> window_start;
  std::optional<uint64_t> window_size;

  // register, unregister, map, translate, lookup: the user address.
  uint64_t ua = 0;
  // register, unregister, map, unmap, lookup.
  uint64_t size = 0;
  // map, unmap.
  uint64_t iova = 0;

  // The expected answer: 0 for "OK", else an errno (EBUSY, ...). Every op but lookup and check.
  int expect = 0;

  // translate.
  std::optional<uint64_t> page_offset;
  std::optional<uint64_t> same_page_as;
  std::optional<uint64_t> distinct_page_from;

  // lookup: the region expected to contain [ua, ua + size); nullopt means `null` (no region).
  std::optional<Range> expect_region;

  // check: a region with `used` / `mapped`, or `absent`.
  std::optional<Range> region;
  std::optional<uint64_t> used;
  std::optional<uint64_t> mapped;
  bool absent = false;
  // check: the context's locked memory and region count.
  std::optional<uint64_t> locked_bytes;
  std::optional<uint64_t> regions;
};

struct Case {
  std::string name;
  std::string spec;  // spec sections, free text ("2.1 4.1")
  // Node settings.
  uint64_t page_size = kDefaultPageSize;
  std::optional<uint64_t> memlock_limit;  // bytes; nullopt = unlimited
  bool cap_ipc_lock = false;
  std::vector<Range> holes;
  std::vector<Range> readonly;
  std::vector<HugeRange> huge;

  std::vector<Step> steps;
};

struct CaseFile {
  std::string source;  // where it was read from, for messages
  std::vector<Case> cases;
};

// Parses the text of a case file. `source` names it in error messages.
absl::StatusOr<CaseFile> ParseCaseFile(absl::string_view text, absl::string_view source);

// Reads and parses the file at `path` (NOT_FOUND if it cannot be read).
absl::StatusOr<CaseFile> LoadCaseFile(const std::string& path);

// Parses a number in C notation: decimal, 0x/0X hex or leading-zero octal, no sign, no spaces,
// at most 2^64 - 1. nullopt when `text` is not such a number.
std::optional<uint64_t> ParseCNumber(absl::string_view text);

// "OK" for 0, else the errno name ("EBUSY").
std::string ExpectName(int err);

}  // namespace dmapin::agent::conformance

#endif  // DMAPIN_AGENT_CONFORMANCE_CASE_FILE_H_
