// PinRuns: how many times each page is pinned, kept as runs of consecutive pages with the same
// count (a piecewise-constant function of the page number).
//
// Backends pin and unpin whole ranges (a region, or the leading pages of a failed pin), so a run
// map costs a few nodes per registration whatever its size, where a hash entry per page cost
// ~50 bytes per page (about 1 GB for a 1 TiB region of 64 KiB pages) and, since a hash table
// never shrinks, kept most of it after the pages were unpinned.
//
// Keys are page numbers (ua >> page shift), so `first + count` never passes 2^64. Not
// thread-safe: the owning backend serializes calls.
#ifndef DMAPIN_AGENT_REGISTRY_PIN_RUNS_H_
#define DMAPIN_AGENT_REGISTRY_PIN_RUNS_H_

#include <cstdint>
#include <iterator>
#include <map>

namespace dmapin::agent {

class PinRuns {
 public:
  // Adds one pin to each page of [first, first + count).
  void Increment(uint64_t first, uint64_t count) {
    if (count == 0) return;
    const uint64_t end = first + count;
    SplitAt(first);
    SplitAt(end);
    uint64_t cursor = first;
    auto it = runs_.lower_bound(first);
    while (cursor < end) {
      if (it != runs_.end() && it->first == cursor) {
        ++it->second.value;
        cursor = it->second.end;  // <= end: SplitAt(end) above
        ++it;
        continue;
      }
      const uint64_t gap_end = it != runs_.end() && it->first < end ? it->first : end;
      runs_.emplace_hint(it, cursor, Run{gap_end, 1});
      covered_pages_ += gap_end - cursor;
      cursor = gap_end;
    }
    total_ += count;
    MergeAround(first, end);
  }

  // Removes one pin from each page of [first, first + count) that has one; pages without a pin
  // are skipped. Calls fn(run_first, run_count, new_count) for each run of pages it decremented,
  // in order (fn must not touch this object). Returns how many pages it decremented.
  template <typename Fn>
  uint64_t Decrement(uint64_t first, uint64_t count, Fn&& fn) {
    if (count == 0) return 0;
    const uint64_t end = first + count;
    SplitAt(first);
    SplitAt(end);
    uint64_t done = 0;
    auto it = runs_.lower_bound(first);
    while (it != runs_.end() && it->first < end) {
      const uint64_t run_first = it->first;
      const uint64_t run_count = it->second.end - run_first;
      const uint64_t value = --it->second.value;
      done += run_count;
      fn(run_first, run_count, value);
      if (value == 0) {
        covered_pages_ -= run_count;
        it = runs_.erase(it);
      } else {
        ++it;
      }
    }
    total_ -= done;
    MergeAround(first, end);
    return done;
  }
  uint64_t Decrement(uint64_t first, uint64_t count) {
    return Decrement(first, count, [](uint64_t, uint64_t, uint64_t) {});
  }

  // The pins of `page`.
  uint64_t Count(uint64_t page) const {
    auto it = runs_.upper_bound(page);
    if (it == runs_.begin()) return 0;
    --it;
    return page < it->second.end ? it->second.value : 0;
  }

  // Calls fn(run_first, run_count) for each run of unpinned pages in [first, first + count).
  template <typename Fn>
  void ForEachUnpinnedRun(uint64_t first, uint64_t count, Fn&& fn) const {
    const uint64_t end = first + count;
    uint64_t cursor = first;
    auto it = runs_.upper_bound(first);
    if (it != runs_.begin() && std::prev(it)->second.end > cursor) {
      cursor = std::prev(it)->second.end;
    }
    while (cursor < end) {
      const uint64_t gap_end = it != runs_.end() && it->first < end ? it->first : end;
      if (gap_end > cursor) fn(cursor, gap_end - cursor);
      if (it == runs_.end() || it->first >= end) break;
      cursor = it->second.end;
      ++it;
    }
  }

  // Calls fn(run_first, run_count, pins) for every run of pinned pages, in order.
  template <typename Fn>
  void ForEachPinnedRun(Fn&& fn) const {
    for (const auto& [run_first, run] : runs_) fn(run_first, run.end - run_first, run.value);
  }

  bool empty() const { return runs_.empty(); }
  // Pages with at least one pin.
  uint64_t covered_pages() const { return covered_pages_; }
  // Pins summed over pages.
  uint64_t total() const { return total_; }
  // Map nodes in use (for tests: the cost does not grow with the pages).
  size_t runs() const { return runs_.size(); }

 private:
  struct Run {
    uint64_t end;    // exclusive
    uint64_t value;  // > 0
  };

  // Makes a run start at `at` if one spans it.
  void SplitAt(uint64_t at) {
    auto it = runs_.upper_bound(at);
    if (it == runs_.begin()) return;
    --it;
    Run& run = it->second;
    if (it->first < at && at < run.end) {
      runs_.emplace_hint(std::next(it), at, Run{run.end, run.value});
      run.end = at;
    }
  }

  // Joins touching runs of equal count from the run before `first` to the run at `end`.
  void MergeAround(uint64_t first, uint64_t end) {
    auto it = runs_.lower_bound(first);
    if (it != runs_.begin()) --it;
    while (it != runs_.end() && it->first <= end) {
      auto next = std::next(it);
      if (next != runs_.end() && it->second.end == next->first &&
          it->second.value == next->second.value) {
        it->second.end = next->second.end;
        runs_.erase(next);
      } else {
        it = next;
      }
    }
  }

  std::map<uint64_t, Run> runs_;  // by first page; disjoint
  uint64_t covered_pages_ = 0;
  uint64_t total_ = 0;
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_REGISTRY_PIN_RUNS_H_
