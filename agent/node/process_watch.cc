#include "agent/node/process_watch.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "common/errno_status.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434  // the same number on every architecture (Linux 5.3)
#endif

namespace dmapin::agent {
namespace {

absl::Status NoProcess(pid_t pid) { return ErrnoStatus(ESRCH, absl::StrCat("no process ", pid)); }

// The whole of /proc/<pid>/<name>, read relative to `dir` (the process's /proc directory).
absl::StatusOr<std::string> ReadProcFile(int dir, const char* name, pid_t pid) {
  UniqueFd fd(::openat(dir, name, O_RDONLY | O_CLOEXEC));
  // A /proc/<pid> directory whose process is gone answers ENOENT or ESRCH.
  if (!fd.valid()) {
    if (errno == ENOENT || errno == ESRCH) return NoProcess(pid);
    return ErrnoStatus(errno, absl::StrCat("open /proc/", pid, "/", name));
  }
  std::string content;
  char buffer[4096];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buffer, sizeof(buffer));
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == ESRCH) return NoProcess(pid);
      return ErrnoStatus(errno, absl::StrCat("read /proc/", pid, "/", name));
    }
    content.append(buffer, static_cast<size_t>(n));
  }
  return content;
}

absl::Status Malformed(pid_t pid, const char* name) {
  return ErrnoStatus(EIO, absl::StrCat("malformed /proc/", pid, "/", name));
}

// The first number of the "<field>:" line of /proc/<pid>/status.
absl::StatusOr<uint64_t> StatusField(absl::string_view status, absl::string_view field, pid_t pid) {
  for (absl::string_view line : absl::StrSplit(status, '\n')) {
    if (!absl::ConsumePrefix(&line, field) || !absl::ConsumePrefix(&line, ":")) continue;
    std::vector<absl::string_view> numbers =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    uint64_t value = 0;
    if (numbers.empty() || !absl::SimpleAtoi(numbers[0], &value)) break;
    return value;
  }
  return Malformed(pid, "status");
}

}  // namespace

absl::StatusOr<ProcessIdentity> IdentifyProcess(pid_t pid) {
  if (pid <= 0) return ErrnoStatus(EINVAL, absl::StrCat("no process has pid ", pid));
  // Both files are read through one directory fd: it stays bound to this process, so a pid reused
  // between the two reads answers ESRCH rather than mixing two processes.
  const std::string dir_path = absl::StrCat("/proc/", pid);
  UniqueFd dir(::open(dir_path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir.valid()) {
    if (errno == ENOENT || errno == ESRCH) return NoProcess(pid);
    return ErrnoStatus(errno, absl::StrCat("open ", dir_path));
  }
  absl::StatusOr<std::string> stat = ReadProcFile(dir.get(), "stat", pid);
  if (!stat.ok()) return stat.status();
  // "pid (comm) state ...": comm may hold spaces and parentheses, so fields count from the last
  // ')'.
  const size_t last_paren = stat->rfind(')');
  if (last_paren == std::string::npos) return Malformed(pid, "stat");
  std::vector<absl::string_view> fields =
      absl::StrSplit(absl::string_view(*stat).substr(last_paren + 1), ' ', absl::SkipEmpty());
  // fields[0] is field 3 (state), fields[19] field 22 (starttime).
  if (fields.size() < 20 || fields[0].size() != 1) return Malformed(pid, "stat");
  const char state = fields[0][0];
  if (state == 'Z' || state == 'X' || state == 'x') return NoProcess(pid);
  ProcessIdentity identity;
  identity.pid = pid;
  if (!absl::SimpleAtoi(fields[19], &identity.start_time)) return Malformed(pid, "stat");

  absl::StatusOr<std::string> status = ReadProcFile(dir.get(), "status", pid);
  if (!status.ok()) return status.status();
  // /proc also answers for a thread's id; a thread is not a process (nor can pidfd_open take it).
  absl::StatusOr<uint64_t> tgid = StatusField(*status, "Tgid", pid);
  if (!tgid.ok()) return tgid.status();
  if (*tgid != static_cast<uint64_t>(pid)) {
    return ErrnoStatus(ESRCH, absl::StrCat("no process ", pid, " (a thread of ", *tgid, ")"));
  }
  absl::StatusOr<uint64_t> uid = StatusField(*status, "Uid", pid);  // real, effective, saved, fs
  if (!uid.ok()) return uid.status();
  identity.uid = static_cast<uid_t>(*uid);
  return identity;
}

bool IsAlive(const ProcessIdentity& identity) {
  absl::StatusOr<ProcessIdentity> now = IdentifyProcess(identity.pid);
  return now.ok() && now->start_time == identity.start_time;
}

ProcessWatcher::ProcessWatcher(std::function<void(const std::string& key)> on_exit)
    : on_exit_(std::move(on_exit)), wake_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  // Started here, not in the initializer list: the loop uses mu_ and pidfds_, declared after it.
  thread_ = std::thread([this] { Loop(); });
}

ProcessWatcher::~ProcessWatcher() {
  {
    MutexLock lock(&mu_);
    stopping_ = true;
  }
  Wake();
  thread_.join();
}

absl::Status ProcessWatcher::Watch(const std::string& key, const ProcessIdentity& identity) {
  const pid_t pid = identity.pid;
  if (pid <= 0) return ErrnoStatus(EINVAL, absl::StrCat("no process has pid ", pid));
  UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));  // O_CLOEXEC always
  if (!pidfd.valid()) {
    if (errno == ESRCH) return NoProcess(pid);
    return ErrnoStatus(errno, absl::StrCat("pidfd_open ", pid));
  }
  // The pid may have been reused before pidfd_open: the pidfd is the intended process's only if
  // the process now under the pid started when the identity says.
  absl::StatusOr<ProcessIdentity> now = IdentifyProcess(pid);
  if (!now.ok()) return now.status();
  if (now->start_time != identity.start_time) {
    return ErrnoStatus(ESRCH, absl::StrCat("no process ", pid, " started at ", identity.start_time,
                                           " (the pid now names another)"));
  }
  {
    MutexLock lock(&mu_);
    WaitForCallbackLocked(key);
    auto it = pidfds_.find(key);
    if (it == pidfds_.end()) {
      if (pidfds_.size() >= kMaxWatched) {
        return ErrnoStatus(ENOSPC, absl::StrCat("already watching ", kMaxWatched, " processes"));
      }
      pidfds_.emplace(key, std::move(pidfd));
    } else {
      retired_.push_back(std::move(it->second));
      it->second = std::move(pidfd);
    }
  }
  Wake();
  return absl::OkStatus();
}

void ProcessWatcher::Unwatch(const std::string& key) {
  {
    MutexLock lock(&mu_);
    WaitForCallbackLocked(key);
    auto it = pidfds_.find(key);
    if (it == pidfds_.end()) return;
    retired_.push_back(std::move(it->second));
    pidfds_.erase(it);
  }
  // The loop drops the pidfd from its poll and closes it.
  Wake();
}

size_t ProcessWatcher::watched() const {
  MutexLock lock(&mu_);
  return pidfds_.size();
}

void ProcessWatcher::WaitForCallbackLocked(const std::string& key) {
  // The loop thread is the one running on_exit: waiting there would never end.
  if (std::this_thread::get_id() == thread_.get_id()) return;
  while (calling_.has_value() && *calling_ == key) callback_done_.wait(mu_);
}

void ProcessWatcher::Wake() {
  if (!wake_.valid()) return;
  const uint64_t one = 1;
  // EAGAIN means the counter is already nonzero: the loop wakes anyway.
  while (::write(wake_.get(), &one, sizeof(one)) < 0 && errno == EINTR) {
  }
}

void ProcessWatcher::Loop() {
  // Without an eventfd (its creation failed) nothing can wake the poll: it times out instead.
  const int timeout_ms = wake_.valid() ? -1 : 100;
  std::vector<pollfd> fds;
  std::vector<std::string> keys;  // keys[i] watches fds[i + 1]
  for (;;) {
    fds.clear();
    keys.clear();
    fds.push_back({wake_.get(), POLLIN, 0});  // a negative fd is ignored by poll
    {
      MutexLock lock(&mu_);
      if (stopping_) return;
      // Retired before this point, so in no poll from here on.
      retired_.clear();
      for (const auto& [key, pidfd] : pidfds_) {
        fds.push_back({pidfd.get(), POLLIN, 0});
        keys.push_back(key);
      }
    }
    const int ready = ::poll(fds.data(), fds.size(), timeout_ms);
    if (ready < 0) {
      // EINTR, or ENOMEM: try again, not in a tight loop.
      if (errno != EINTR) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    if (fds[0].revents & POLLIN) {
      uint64_t count;
      (void)!::read(wake_.get(), &count, sizeof(count));
    }
    for (size_t i = 1; i < fds.size(); ++i) {
      // A pidfd polls readable once its process has exited (POLLHUP too once it is reaped).
      if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) HandleExit(keys[i - 1], fds[i].fd);
    }
  }
}

void ProcessWatcher::HandleExit(const std::string& key, int fd) {
  {
    MutexLock lock(&mu_);
    if (stopping_) return;
    // Unwatched (or watching another process) since the poll began: nothing to report. An fd
    // number identifies the pidfd, as no pidfd of the poll is closed before the next one.
    auto it = pidfds_.find(key);
    if (it == pidfds_.end() || it->second.get() != fd) return;
    retired_.push_back(std::move(it->second));
    pidfds_.erase(it);
    calling_ = key;
  }
  on_exit_(key);
  {
    MutexLock lock(&mu_);
    calling_.reset();
  }
  callback_done_.notify_all();
}

}  // namespace dmapin::agent
