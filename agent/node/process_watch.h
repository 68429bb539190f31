// Who a VMM is, and when it exits. A context belongs to the process that created it; when that
// process exits the agent tears the context down (the kernel's final cleanup when an mm goes,
// spec §4). A pid alone is not an identity: pids are reused, so a process is its pid and its
// start time.
#ifndef DMAPIN_AGENT_NODE_PROCESS_WATCH_H_
#define DMAPIN_AGENT_NODE_PROCESS_WATCH_H_

#include <sys/types.h>

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/mutex.h"
#include "common/unique_fd.h"

namespace dmapin::agent {

struct ProcessIdentity {
  pid_t pid = 0;
  uid_t uid = 0;
  uint64_t start_time = 0;  // /proc/<pid>/stat field 22, clock ticks after boot
  bool operator==(const ProcessIdentity& other) const {
    return pid == other.pid && start_time == other.start_time;
  }
};

// The identity of the live process `pid` (its real uid from /proc/<pid>/status). EINVAL for
// pid <= 0; ESRCH if there is none, it is a zombie, or `pid` is a thread that is not its thread
// group's leader (a pid names a process here, as pidfd_open wants).
absl::StatusOr<ProcessIdentity> IdentifyProcess(pid_t pid);

// Whether `identity` is still alive: its pid exists and has the same start time (not a zombie).
bool IsAlive(const ProcessIdentity& identity);

// Watches processes through pidfds (pidfd_open + poll) on one thread and calls `on_exit(key)`
// once for each watched process that exits, on that thread, with no lock of the watcher held (it
// may call Unwatch and Watch; it must not destroy the watcher). Each watched process holds one
// file descriptor (its pidfd) until it exits or is unwatched.
class ProcessWatcher {
 public:
  // At most this many keys are watched at once (one pidfd and one pollfd each); Watch of a new key
  // beyond it is ENOSPC. The process's RLIMIT_NOFILE may stop it sooner (EMFILE from pidfd_open).
  static constexpr size_t kMaxWatched = 65536;

  explicit ProcessWatcher(std::function<void(const std::string& key)> on_exit);
  ProcessWatcher(const ProcessWatcher&) = delete;
  ProcessWatcher& operator=(const ProcessWatcher&) = delete;
  ~ProcessWatcher();  // stops the thread; no on_exit after it returns

  // Starts watching `identity` under `key` (replacing what `key` watched). EINVAL for pid <= 0;
  // ESRCH when the process is already gone (or a zombie) or its pid now belongs to another process
  // (checked after the pidfd is open, so the pidfd is the process's); ENOSPC beyond kMaxWatched;
  // pidfd_open's errno otherwise (EMFILE).
  absl::Status Watch(const std::string& key, const ProcessIdentity& identity);
  // Stops watching `key` (no on_exit for it after this returns, unless it is running now). Called
  // from another thread while on_exit(key) runs, Watch and Unwatch of that key wait for it to end;
  // called from on_exit itself they do not.
  void Unwatch(const std::string& key);
  size_t watched() const;

 private:
  void Loop();
  // Reports the exit seen on `fd` if `key` still watches that same pidfd.
  void HandleExit(const std::string& key, int fd);
  void WaitForCallbackLocked(const std::string& key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Wake();

  const std::function<void(const std::string&)> on_exit_;
  UniqueFd wake_;  // eventfd: Watch, Unwatch and the destructor wake the loop
  std::thread thread_;
  mutable Mutex mu_;
  std::map<std::string, UniqueFd> pidfds_ ABSL_GUARDED_BY(mu_);
  // Pidfds no longer watched, closed by the loop before it next polls: the poll running now may
  // hold their numbers, which must not be reused by another open until it returns.
  std::vector<UniqueFd> retired_ ABSL_GUARDED_BY(mu_);
  // The key whose on_exit runs now, and its end (for Watch and Unwatch on other threads).
  std::optional<std::string> calling_ ABSL_GUARDED_BY(mu_);
  std::condition_variable_any callback_done_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_NODE_PROCESS_WATCH_H_
