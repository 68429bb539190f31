// The key of a region on a node, (context, ua, size): how the agent's control stream, the
// server's fleet state and admission name a registered region. One registration of a region by
// a second container is the same region, so the key has no container.
#ifndef DMAPIN_COMMON_REGION_KEY_H_
#define DMAPIN_COMMON_REGION_KEY_H_

#include <cstdint>
#include <string>
#include <tuple>
#include <utility>

namespace dmapin {

struct RegionKey {
  std::string context;
  uint64_t ua = 0;
  uint64_t size = 0;

  template <typename H>
  friend H AbslHashValue(H h, const RegionKey& key) {
    return H::combine(std::move(h), key.context, key.ua, key.size);
  }
};

// Ordered by context, then ua, then size.
inline bool operator<(const RegionKey& a, const RegionKey& b) {
  return std::tie(a.context, a.ua, a.size) < std::tie(b.context, b.ua, b.size);
}
inline bool operator==(const RegionKey& a, const RegionKey& b) {
  return std::tie(a.context, a.ua, a.size) == std::tie(b.context, b.ua, b.size);
}
inline bool operator!=(const RegionKey& a, const RegionKey& b) { return !(a == b); }

}  // namespace dmapin

#endif  // DMAPIN_COMMON_REGION_KEY_H_
