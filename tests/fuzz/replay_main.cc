// A standalone driver for the fuzz targets without libFuzzer (any compiler, normal build), linked
// with one harness: registry_fuzz.cc by default, or the one REPLAY_TARGET names
// (-DREPLAY_TARGET=agent_service: its corpus is tests/fuzz/corpus/agent_service).
//
// With no arguments it runs every file of the seed corpus (tests/fuzz/corpus/<target>, relative to
// the working directory, which is the workspace root under `bazel test`), then pseudo-random inputs
// from a fixed seed: fresh random bytes and mutations of the seeds. With arguments it runs each
// named file, or every file of each named directory, and nothing else (to replay a crash).
//
// On a crash (the harness traps) a signal handler prints the name and bytes of the input that
// was running and writes them to <target>_fuzz_crash.bin in $TEST_UNDECLARED_OUTPUTS_DIR (or the
// working directory), so the failure can be replayed with the libFuzzer binary too.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

#ifndef REPLAY_TARGET
#define REPLAY_TARGET registry
#endif
// Random and mutated inputs each (the slower harnesses run fewer).
#ifndef REPLAY_INPUTS
#define REPLAY_INPUTS 2000
#endif
#define REPLAY_STR(x) REPLAY_STR2(x)
#define REPLAY_STR2(x) #x

constexpr char kTarget[] = REPLAY_STR(REPLAY_TARGET);
constexpr char kCorpus[] = "tests/fuzz/corpus/" REPLAY_STR(REPLAY_TARGET);
constexpr int kRandomInputs = REPLAY_INPUTS;
constexpr int kMutatedInputs = REPLAY_INPUTS;
constexpr uint64_t kSeed = 0x5eed0f00d;

// The input being run, for the crash handler.
const char* g_name = "";
const uint8_t* g_data = nullptr;
size_t g_size = 0;
char g_crash_path[4096] = REPLAY_STR(REPLAY_TARGET) "_fuzz_crash.bin";

void WriteAll(int fd, const void* buf, size_t len) {
  const char* p = static_cast<const char*>(buf);
  while (len > 0) {
    const ssize_t n = write(fd, p, len);
    if (n <= 0) return;
    p += n;
    len -= static_cast<size_t>(n);
  }
}

void WriteString(int fd, const char* s) { WriteAll(fd, s, strlen(s)); }

// Async-signal-safe: write(2) only.
void OnCrash(int sig) {
  WriteString(2, "\n");
  WriteString(2, kTarget);
  WriteString(2, "_fuzz_replay: crashed on input ");
  WriteString(2, g_name);
  WriteString(2, "\nbytes:");
  static const char kHex[] = "0123456789abcdef";
  for (size_t i = 0; i < g_size; ++i) {
    const char byte[3] = {' ', kHex[g_data[i] >> 4], kHex[g_data[i] & 15]};
    WriteAll(2, byte, sizeof(byte));
  }
  WriteString(2, "\nwritten to ");
  WriteString(2, g_crash_path);
  WriteString(2, "\n");
  const int fd = open(g_crash_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0) {
    WriteAll(fd, g_data, g_size);
    close(fd);
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

void RunOne(const std::string& name, const std::vector<uint8_t>& input) {
  g_name = name.c_str();
  g_data = input.data();
  g_size = input.size();
  LLVMFuzzerTestOneInput(input.data(), input.size());
}

bool ReadFile(const std::filesystem::path& path, std::vector<uint8_t>* out) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return false;
  out->assign(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
  return true;
}

// Files named by `arg` (one file, or the regular files of a directory), sorted by name.
std::vector<std::filesystem::path> FilesOf(const std::string& arg) {
  std::vector<std::filesystem::path> files;
  std::error_code ec;
  if (std::filesystem::is_directory(arg, ec)) {
    for (const auto& entry : std::filesystem::directory_iterator(arg, ec)) {
      if (std::filesystem::is_regular_file(entry.path(), ec)) files.push_back(entry.path());
    }
    std::sort(files.begin(), files.end());
  } else {
    files.push_back(arg);
  }
  return files;
}

}  // namespace

int main(int argc, char** argv) {
  const char* out_dir = std::getenv("TEST_UNDECLARED_OUTPUTS_DIR");
  if (out_dir != nullptr) {
    snprintf(g_crash_path, sizeof(g_crash_path), "%s/%s_fuzz_crash.bin", out_dir, kTarget);
  }
  for (int sig : {SIGILL, SIGTRAP, SIGABRT, SIGSEGV, SIGBUS, SIGFPE}) signal(sig, OnCrash);

  std::vector<std::string> args(argv + 1, argv + argc);
  const bool explicit_inputs = !args.empty();
  if (!explicit_inputs) args.push_back(kCorpus);

  std::vector<std::vector<uint8_t>> seeds;
  for (const std::string& arg : args) {
    for (const std::filesystem::path& path : FilesOf(arg)) {
      std::vector<uint8_t> input;
      if (!ReadFile(path, &input)) {
        fprintf(stderr, "cannot read %s\n", path.c_str());
        return 2;
      }
      RunOne(path.string(), input);
      seeds.push_back(std::move(input));
    }
  }
  printf("replayed %zu files\n", seeds.size());
  if (explicit_inputs) return 0;
  if (seeds.empty()) {
    fprintf(stderr, "no seed corpus found under %s\n", kCorpus);
    return 2;
  }

  std::mt19937_64 rng(kSeed);
  std::string name;
  for (int i = 0; i < kRandomInputs; ++i) {
    std::vector<uint8_t> input(1 + rng() % 600);
    for (uint8_t& byte : input) byte = static_cast<uint8_t>(rng());
    name = "random#" + std::to_string(i);
    RunOne(name, input);
  }
  for (int i = 0; i < kMutatedInputs; ++i) {
    std::vector<uint8_t> input = seeds[rng() % seeds.size()];
    const int mutations = 1 + static_cast<int>(rng() % 8);
    for (int m = 0; m < mutations; ++m) {
      switch (rng() % 4) {
        case 0:  // flip a byte
          if (!input.empty()) input[rng() % input.size()] = static_cast<uint8_t>(rng());
          break;
        case 1: {  // splice in an operation record from another seed
          const std::vector<uint8_t>& other = seeds[rng() % seeds.size()];
          if (other.size() > 6) {
            const size_t from = 1 + (rng() % ((other.size() - 1) / 5)) * 5;
            const size_t at =
                1 + (input.size() > 1 ? (rng() % ((input.size() - 1) / 5 + 1)) * 5 : 0);
            const size_t len = std::min<size_t>(5, other.size() - from);
            input.insert(input.begin() + static_cast<long>(std::min(at, input.size())),
                         other.begin() + static_cast<long>(from),
                         other.begin() + static_cast<long>(from + len));
          }
          break;
        }
        case 2:  // drop a record
          if (input.size() > 6) {
            const size_t at = 1 + (rng() % ((input.size() - 1) / 5)) * 5;
            input.erase(input.begin() + static_cast<long>(at),
                        input.begin() + static_cast<long>(std::min(at + 5, input.size())));
          }
          break;
        default:  // change the configuration byte
          if (!input.empty()) input[0] = static_cast<uint8_t>(rng());
          break;
      }
    }
    name = "mutated#" + std::to_string(i);
    RunOne(name, input);
  }
  printf("ran %d random and %d mutated inputs (seed 0x%llx): no failure\n", kRandomInputs,
         kMutatedInputs, static_cast<unsigned long long>(kSeed));
  return 0;
}
