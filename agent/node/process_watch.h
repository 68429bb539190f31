// Who a VMM is, and when it exits. A context belongs to the process that created it; when that
// process exits the agent tears the context down (the kernel's final cleanup when an mm goes,
// spec §4). A pid alone is not an identity: pids are reused, so a process is its pid and its
// start time.
#ifndef DMAPIN_AGENT_NODE_PROCESS_WATCH_H_
#define DMAPIN_AGENT_NODE_PROCESS_WATCH_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <thread>

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

// The identity of the live process `pid` (its real uid from /proc/<pid>/status). ESRCH if there
// is none (or it is a zombie).
absl::StatusOr<ProcessIdentity> IdentifyProcess(pid_t pid);

// Whether `identity` is still alive: its pid exists and has the same start time (not a zombie).
bool IsAlive(const ProcessIdentity& identity);

// Watches processes through pidfds (pidfd_open + poll) on one thread and calls `on_exit(key)`
// once for each watched process that exits, on that thread, with no lock of the watcher held (it
// may call Unwatch and Watch).
class ProcessWatcher {
 public:
  explicit ProcessWatcher(std::function<void(const std::string& key)> on_exit);
  ProcessWatcher(const ProcessWatcher&) = delete;
  ProcessWatcher& operator=(const ProcessWatcher&) = delete;
  ~ProcessWatcher();  // stops the thread; no on_exit after it returns

  // Starts watching `identity` under `key` (replacing what `key` watched). ESRCH when the process
  // is already gone or its pid now belongs to another process (checked after the pidfd is open,
  // so the pidfd is the process's).
  absl::Status Watch(const std::string& key, const ProcessIdentity& identity);
  // Stops watching `key` (no on_exit for it after this returns, unless it is running now).
  void Unwatch(const std::string& key);
  size_t watched() const;

 private:
  void Loop();

  const std::function<void(const std::string&)> on_exit_;
  UniqueFd wake_;  // eventfd: Watch, Unwatch and the destructor wake the loop
  std::thread thread_;
  mutable Mutex mu_;
  std::map<std::string, UniqueFd> pidfds_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_NODE_PROCESS_WATCH_H_
