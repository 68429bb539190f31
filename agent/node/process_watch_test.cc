// Process identities and exits, with real processes: forked children that wait for a byte, a
// signal or nothing, reaped with waitpid.
#include "agent/node/process_watch.h"

#include <dirent.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/errno_status.h"
#include "common/mutex.h"
#include "common/unique_fd.h"
#include "gtest/gtest.h"
#include "testing/open_fds.h"

namespace dmapin::agent {
namespace {

// Generous: the machine may be busy; nothing here asserts speed.
constexpr auto kPatience = std::chrono::seconds(30);

// A child that pauses until killed. Only async-signal-safe calls after fork: the test process
// may have threads.
pid_t ForkPaused() {
  const pid_t pid = ::fork();
  if (pid == 0) {
    for (;;) ::pause();
  }
  return pid;
}

// A child that exits by itself once `*go` gets a byte.
pid_t ForkWaiting(UniqueFd* go) {
  int fds[2];
  if (::pipe(fds) != 0) return -1;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[1]);
    char byte;
    while (::read(fds[0], &byte, 1) < 0 && errno == EINTR) {
    }
    ::_exit(0);
  }
  ::close(fds[0]);
  *go = UniqueFd(fds[1]);
  return pid;
}

void Release(const UniqueFd& go) { ASSERT_EQ(::write(go.get(), "x", 1), 1); }

// A child named `name` (PR_SET_NAME) that pauses until killed; returns once the name is set.
pid_t ForkNamed(const char* name) {
  int fds[2];
  if (::pipe(fds) != 0) return -1;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    ::prctl(PR_SET_NAME, name);
    (void)!::write(fds[1], "x", 1);
    for (;;) ::pause();
  }
  ::close(fds[1]);
  char byte;
  while (::read(fds[0], &byte, 1) < 0 && errno == EINTR) {
  }
  ::close(fds[0]);
  return pid;
}

void Reap(pid_t pid) {
  int status;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
}

void KillAndReap(pid_t pid) {
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  Reap(pid);
}

// Waits until `pid` has exited, leaving it a zombie (not reaped).
void WaitForZombie(pid_t pid) {
  siginfo_t info;
  ASSERT_EQ(::waitid(P_PID, pid, &info, WEXITED | WNOWAIT), 0) << std::strerror(errno);
}

// Whether `status` carries ESRCH. By its payload's name: ErrnoOf knows only the errnos of
// common/errno_status's table, which has no ESRCH yet (its name is "E3" until it does).
bool CarriesEsrch(const absl::Status& status) {
  auto name = status.GetPayload(kErrnoPayloadUrl);
  return name.has_value() && std::string(*name) == ErrnoName(ESRCH);
}

ProcessIdentity Identify(pid_t pid) {
  absl::StatusOr<ProcessIdentity> identity = IdentifyProcess(pid);
  EXPECT_TRUE(identity.ok()) << identity.status();
  return identity.ok() ? *identity : ProcessIdentity{};
}

// A one-shot event (dmapin::Mutex rather than absl's: TSan sees its ordering).
class Latch {
 public:
  void Notify() {
    {
      MutexLock lock(&mu_);
      done_ = true;
    }
    cv_.notify_all();
  }
  bool Wait() {
    MutexLock lock(&mu_);
    const auto deadline = std::chrono::steady_clock::now() + kPatience;
    while (!done_) {
      if (cv_.wait_until(mu_, deadline) == std::cv_status::timeout) break;
    }
    return done_;
  }
  bool notified() {
    MutexLock lock(&mu_);
    return done_;
  }

 private:
  Mutex mu_;
  std::condition_variable_any cv_;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
};

// The keys on_exit reported, in order.
class ExitRecorder {
 public:
  void Record(const std::string& key) {
    {
      MutexLock lock(&mu_);
      keys_.push_back(key);
    }
    cv_.notify_all();
  }
  // Whether `n` exits were recorded before the patience ran out.
  bool WaitFor(size_t n) {
    MutexLock lock(&mu_);
    const auto deadline = std::chrono::steady_clock::now() + kPatience;
    while (keys_.size() < n) {
      if (cv_.wait_until(mu_, deadline) == std::cv_status::timeout) break;
    }
    return keys_.size() >= n;
  }
  std::vector<std::string> keys() {
    MutexLock lock(&mu_);
    return keys_;
  }
  std::function<void(const std::string&)> Callback() {
    return [this](const std::string& key) { Record(key); };
  }

 private:
  Mutex mu_;
  std::condition_variable_any cv_;
  std::vector<std::string> keys_ ABSL_GUARDED_BY(mu_);
};

TEST(IdentifyProcessTest, Self) {
  absl::StatusOr<ProcessIdentity> self = IdentifyProcess(::getpid());
  ASSERT_TRUE(self.ok()) << self.status();
  EXPECT_EQ(self->pid, ::getpid());
  EXPECT_EQ(self->uid, ::getuid());
  EXPECT_NE(self->start_time, 0u);
  EXPECT_TRUE(IsAlive(*self));
}

TEST(IdentifyProcessTest, ChildStartsNoEarlierThanParent) {
  const ProcessIdentity self = Identify(::getpid());
  const pid_t pid = ForkPaused();
  ASSERT_GT(pid, 0);
  const ProcessIdentity child = Identify(pid);
  EXPECT_EQ(child.pid, pid);
  EXPECT_EQ(child.uid, ::getuid());
  EXPECT_GE(child.start_time, self.start_time);
  KillAndReap(pid);
}

TEST(IdentifyProcessTest, ReapedChildIsGone) {
  const pid_t pid = ForkPaused();
  ASSERT_GT(pid, 0);
  const ProcessIdentity identity = Identify(pid);
  EXPECT_TRUE(IsAlive(identity));
  KillAndReap(pid);
  absl::StatusOr<ProcessIdentity> gone = IdentifyProcess(pid);
  EXPECT_TRUE(CarriesEsrch(gone.status())) << gone.status();
  EXPECT_FALSE(IsAlive(identity));
}

TEST(IdentifyProcessTest, ZombieIsGone) {
  UniqueFd go;
  const pid_t pid = ForkWaiting(&go);
  ASSERT_GT(pid, 0);
  const ProcessIdentity identity = Identify(pid);
  Release(go);
  WaitForZombie(pid);
  absl::StatusOr<ProcessIdentity> zombie = IdentifyProcess(pid);
  EXPECT_TRUE(CarriesEsrch(zombie.status())) << zombie.status();
  EXPECT_FALSE(IsAlive(identity));
  Reap(pid);
}

TEST(IdentifyProcessTest, NonPositivePidIsInvalid) {
  EXPECT_EQ(ErrnoOf(IdentifyProcess(0).status()), EINVAL);
  EXPECT_EQ(ErrnoOf(IdentifyProcess(-1).status()), EINVAL);
  EXPECT_FALSE(IsAlive({.pid = 0}));
}

TEST(IdentifyProcessTest, ThreadIsNotAProcess) {
  std::promise<pid_t> tid;
  std::promise<void> done;
  std::thread thread([&] {
    tid.set_value(static_cast<pid_t>(::syscall(SYS_gettid)));
    done.get_future().wait();
  });
  const pid_t thread_id = tid.get_future().get();
  absl::StatusOr<ProcessIdentity> identity = IdentifyProcess(thread_id);
  EXPECT_TRUE(CarriesEsrch(identity.status())) << identity.status();
  done.set_value();
  thread.join();
}

TEST(IdentifyProcessTest, CommWithSpacesAndParentheses) {
  // The child's comm ends in ')' and holds what look like further fields.
  const pid_t pid = ForkNamed("a) b (c) 1 2 )");
  ASSERT_GT(pid, 0);
  const ProcessIdentity self = Identify(::getpid());
  absl::StatusOr<ProcessIdentity> child = IdentifyProcess(pid);
  ASSERT_TRUE(child.ok()) << child.status();
  EXPECT_EQ(child->uid, ::getuid());
  EXPECT_GE(child->start_time, self.start_time);
  EXPECT_TRUE(IsAlive(*child));
  KillAndReap(pid);

  // Renaming this process changes neither its identity nor how it reads.
  char name[17] = {};
  ASSERT_EQ(::prctl(PR_GET_NAME, name), 0);
  ASSERT_EQ(::prctl(PR_SET_NAME, ") Z 1 (x"), 0);
  absl::StatusOr<ProcessIdentity> renamed = IdentifyProcess(::getpid());
  ASSERT_EQ(::prctl(PR_SET_NAME, name), 0);
  ASSERT_TRUE(renamed.ok()) << renamed.status();
  EXPECT_EQ(renamed->start_time, self.start_time);
  EXPECT_EQ(renamed->uid, ::getuid());
}

TEST(IsAliveTest, MadeUpStartTimeIsNotAlive) {
  ProcessIdentity self = Identify(::getpid());
  ASSERT_TRUE(IsAlive(self));
  self.start_time += 1;
  EXPECT_FALSE(IsAlive(self));
}

TEST(ProcessWatcherTest, ReportsAnExit) {
  ExitRecorder recorder;
  ProcessWatcher watcher(recorder.Callback());
  UniqueFd go;
  const pid_t pid = ForkWaiting(&go);
  ASSERT_GT(pid, 0);
  ASSERT_TRUE(watcher.Watch("vmm", Identify(pid)).ok());
  EXPECT_EQ(watcher.watched(), 1u);
  Release(go);
  ASSERT_TRUE(recorder.WaitFor(1));
  EXPECT_EQ(recorder.keys(), std::vector<std::string>{"vmm"});
  EXPECT_EQ(watcher.watched(), 0u);
  Reap(pid);
}

TEST(ProcessWatcherTest, UnwatchBeforeExitReportsNothing) {
  ExitRecorder recorder;
  ProcessWatcher watcher(recorder.Callback());
  const pid_t unwatched = ForkPaused();
  const pid_t sentinel = ForkPaused();
  ASSERT_GT(unwatched, 0);
  ASSERT_GT(sentinel, 0);
  ASSERT_TRUE(watcher.Watch("unwatched", Identify(unwatched)).ok());
  ASSERT_TRUE(watcher.Watch("sentinel", Identify(sentinel)).ok());
  watcher.Unwatch("unwatched");
  watcher.Unwatch("unknown");  // nothing to do
  EXPECT_EQ(watcher.watched(), 1u);
  KillAndReap(unwatched);
  // The sentinel exits after the unwatched process; once it is reported, the other would have
  // been too.
  KillAndReap(sentinel);
  ASSERT_TRUE(recorder.WaitFor(1));
  EXPECT_EQ(recorder.keys(), std::vector<std::string>{"sentinel"});
}

TEST(ProcessWatcherTest, WatchReplacesWhatTheKeyWatched) {
  ExitRecorder recorder;
  ProcessWatcher watcher(recorder.Callback());
  const pid_t first = ForkPaused();
  const pid_t second = ForkPaused();
  ASSERT_GT(first, 0);
  ASSERT_GT(second, 0);
  ASSERT_TRUE(watcher.Watch("vmm", Identify(first)).ok());
  ASSERT_TRUE(watcher.Watch("vmm", Identify(second)).ok());
  EXPECT_EQ(watcher.watched(), 1u);
  KillAndReap(first);
  KillAndReap(second);
  ASSERT_TRUE(recorder.WaitFor(1));
  // Give a wrong second report the time to arrive: a sentinel exiting after both.
  const pid_t sentinel = ForkPaused();
  ASSERT_TRUE(watcher.Watch("sentinel", Identify(sentinel)).ok());
  KillAndReap(sentinel);
  ASSERT_TRUE(recorder.WaitFor(2));
  EXPECT_EQ(recorder.keys(), (std::vector<std::string>{"vmm", "sentinel"}));
}

TEST(ProcessWatcherTest, WatchOfAGoneOrWrongProcessFails) {
  ExitRecorder recorder;
  ProcessWatcher watcher(recorder.Callback());

  const pid_t reaped = ForkPaused();
  ASSERT_GT(reaped, 0);
  const ProcessIdentity reaped_identity = Identify(reaped);
  KillAndReap(reaped);
  EXPECT_TRUE(CarriesEsrch(watcher.Watch("reaped", reaped_identity)));

  UniqueFd go;
  const pid_t zombie = ForkWaiting(&go);
  ASSERT_GT(zombie, 0);
  const ProcessIdentity zombie_identity = Identify(zombie);
  Release(go);
  WaitForZombie(zombie);
  EXPECT_TRUE(CarriesEsrch(watcher.Watch("zombie", zombie_identity)));
  Reap(zombie);

  ProcessIdentity wrong = Identify(::getpid());
  wrong.start_time += 1;
  absl::Status status = watcher.Watch("wrong", wrong);
  EXPECT_TRUE(CarriesEsrch(status)) << status;

  EXPECT_EQ(ErrnoOf(watcher.Watch("zero", {.pid = 0})), EINVAL);
  EXPECT_EQ(ErrnoOf(watcher.Watch("negative", {.pid = -1})), EINVAL);
  EXPECT_EQ(watcher.watched(), 0u);
  EXPECT_TRUE(recorder.keys().empty());
}

TEST(ProcessWatcherTest, ManyExitsAreEachReportedOnce) {
  constexpr int kChildren = 50;
  ExitRecorder recorder;
  ProcessWatcher watcher(recorder.Callback());
  std::vector<pid_t> pids;
  for (int i = 0; i < kChildren; ++i) {
    const pid_t pid = ForkPaused();
    ASSERT_GT(pid, 0);
    pids.push_back(pid);
    ASSERT_TRUE(watcher.Watch(absl::StrCat("vmm-", i), Identify(pid)).ok());
  }
  EXPECT_EQ(watcher.watched(), static_cast<size_t>(kChildren));
  for (pid_t pid : pids) ASSERT_EQ(::kill(pid, SIGKILL), 0);
  for (pid_t pid : pids) Reap(pid);
  ASSERT_TRUE(recorder.WaitFor(kChildren));
  std::map<std::string, int> reported;
  for (const std::string& key : recorder.keys()) ++reported[key];
  ASSERT_EQ(reported.size(), static_cast<size_t>(kChildren));
  for (int i = 0; i < kChildren; ++i) EXPECT_EQ(reported[absl::StrCat("vmm-", i)], 1);
  EXPECT_EQ(watcher.watched(), 0u);
}

TEST(ProcessWatcherTest, OnExitMayWatchAndUnwatch) {
  const pid_t a = ForkPaused();
  const pid_t b = ForkPaused();
  const pid_t c = ForkPaused();
  ASSERT_GT(a, 0);
  ASSERT_GT(b, 0);
  ASSERT_GT(c, 0);
  const ProcessIdentity c_identity = Identify(c);
  ExitRecorder recorder;
  ProcessWatcher* watcher = nullptr;
  absl::Status watch_c;
  auto owned = std::make_unique<ProcessWatcher>([&](const std::string& key) {
    if (key == "a") {
      watcher->Unwatch("a");  // the key being reported: must not wait for itself
      watcher->Unwatch("b");
      watch_c = watcher->Watch("c", c_identity);
    }
    recorder.Record(key);
  });
  watcher = owned.get();
  ASSERT_TRUE(watcher->Watch("a", Identify(a)).ok());
  ASSERT_TRUE(watcher->Watch("b", Identify(b)).ok());
  KillAndReap(a);
  ASSERT_TRUE(recorder.WaitFor(1));
  EXPECT_TRUE(watch_c.ok()) << watch_c;
  EXPECT_EQ(watcher->watched(), 1u);
  KillAndReap(b);
  KillAndReap(c);
  ASSERT_TRUE(recorder.WaitFor(2));
  owned.reset();
  EXPECT_EQ(recorder.keys(), (std::vector<std::string>{"a", "c"}));
}

TEST(ProcessWatcherTest, UnwatchWaitsForARunningOnExit) {
  Latch entered;
  Latch release;
  ProcessWatcher watcher([&](const std::string&) {
    entered.Notify();
    release.Wait();
  });
  const pid_t pid = ForkPaused();
  ASSERT_GT(pid, 0);
  ASSERT_TRUE(watcher.Watch("vmm", Identify(pid)).ok());
  KillAndReap(pid);
  ASSERT_TRUE(entered.Wait());
  Latch unwatched;
  std::thread unwatcher([&] {
    watcher.Unwatch("vmm");
    unwatched.Notify();
  });
  // Only a wrong Unwatch could return here; a slow machine cannot make this fail.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(unwatched.notified());
  release.Notify();
  unwatcher.join();
  EXPECT_TRUE(unwatched.notified());
}

TEST(ProcessWatcherTest, DestructionWithLiveProcessesIsClean) {
  ExitRecorder recorder;
  std::vector<pid_t> pids;
  {
    ProcessWatcher watcher(recorder.Callback());
    for (int i = 0; i < 3; ++i) {
      const pid_t pid = ForkPaused();
      ASSERT_GT(pid, 0);
      pids.push_back(pid);
      ASSERT_TRUE(watcher.Watch(absl::StrCat("vmm-", i), Identify(pid)).ok());
    }
  }
  for (pid_t pid : pids) KillAndReap(pid);
  EXPECT_TRUE(recorder.keys().empty());
}

TEST(ProcessWatcherTest, LeaksNoFileDescriptors) {
  const int before = harness::CountOpenFds();
  ASSERT_GT(before, 0);
  {
    ExitRecorder recorder;
    ProcessWatcher watcher(recorder.Callback());
    std::vector<pid_t> pids;
    for (int i = 0; i < 6; ++i) {
      const pid_t pid = ForkPaused();
      ASSERT_GT(pid, 0);
      pids.push_back(pid);
      ASSERT_TRUE(watcher.Watch(absl::StrCat("vmm-", i), Identify(pid)).ok());
    }
    watcher.Unwatch("vmm-0");
    ASSERT_TRUE(watcher.Watch("vmm-1", Identify(pids[2])).ok());  // replaces
    KillAndReap(pids[3]);
    ASSERT_TRUE(recorder.WaitFor(1));
    ProcessIdentity wrong = Identify(pids[4]);
    wrong.start_time += 1;
    EXPECT_TRUE(CarriesEsrch(watcher.Watch("wrong", wrong)));
    for (pid_t pid : pids) {
      if (pid != pids[3]) KillAndReap(pid);
    }
    // vmm-1, vmm-2 (the same process), vmm-4, vmm-5; vmm-3 already reported.
    ASSERT_TRUE(recorder.WaitFor(5));
    EXPECT_EQ(watcher.watched(), 0u);
  }
  EXPECT_EQ(harness::CountOpenFds(), before);
}

}  // namespace
}  // namespace dmapin::agent
