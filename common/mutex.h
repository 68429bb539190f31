// dmapin::Mutex: a std::mutex with Abseil's thread-safety annotations.
//
// Debian's Abseil is built without ThreadSanitizer hooks, so TSan cannot see the ordering that
// absl::Mutex provides and reports false races. std::mutex goes through pthread, which TSan
// intercepts; this wrapper keeps ABSL_GUARDED_BY checking on top of it.
#ifndef DMAPIN_COMMON_MUTEX_H_
#define DMAPIN_COMMON_MUTEX_H_

#include <mutex>

#include "absl/base/thread_annotations.h"

namespace dmapin {

class ABSL_LOCKABLE Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }
  bool TryLock() ABSL_EXCLUSIVE_TRYLOCK_FUNCTION(true) { return mu_.try_lock(); }
  // For std::condition_variable_any and friends.
  void lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }

 private:
  std::mutex mu_;
};

class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) { mu_->Lock(); }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mu_;
};

}  // namespace dmapin

#endif  // DMAPIN_COMMON_MUTEX_H_
