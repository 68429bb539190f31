#include "common/flags.h"

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/flags/commandlineflag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"

namespace dmapin {
namespace {

// The usage flags (--help and its variants, --version, --only_check_args) are not registered
// Abseil flags: absl::ParseCommandLine recognizes them itself and exits 1 after the help. So they
// are taken out of the command line here, the rest goes to absl::ParseCommandLine (which still
// refuses undefined flags first), and the help is printed here with the public reflection API,
// in Abseil's format.
enum class UsageMode { kNone, kImportant, kShort, kFull, kPackage, kMatch, kVersion, kCheckArgs };

struct Usage {
  UsageMode mode = UsageMode::kNone;
  std::string match;  // kMatch: the substring to look for
};

// What a command-line argument asks for, as Abseil 20220623 reads the usage flags (the last one
// wins); nullopt when it is not a usage flag.
std::optional<Usage> UsageFlag(absl::string_view arg) {
  if (!absl::ConsumePrefix(&arg, "-")) return std::nullopt;
  absl::ConsumePrefix(&arg, "-");
  absl::string_view name = arg;
  absl::string_view value;
  if (const size_t eq = arg.find('='); eq != absl::string_view::npos) {
    name = arg.substr(0, eq);
    value = arg.substr(eq + 1);
  }
  if (absl::FindCommandLineFlag(name) != nullptr) return std::nullopt;  // a registered flag
  if (name == "help") {
    if (value.empty()) return Usage{UsageMode::kImportant, ""};
    return Usage{UsageMode::kMatch, std::string(value)};
  }
  if (name == "helpmatch") return Usage{UsageMode::kMatch, std::string(value)};
  if (name == "helpon") return Usage{UsageMode::kMatch, absl::StrCat("/", value, ".")};
  if (name == "helpfull") return Usage{UsageMode::kFull, ""};
  if (name == "helpshort") return Usage{UsageMode::kShort, ""};
  if (name == "helppackage") return Usage{UsageMode::kPackage, ""};
  if (name == "version") return Usage{UsageMode::kVersion, ""};
  if (name == "only_check_args") return Usage{UsageMode::kCheckArgs, ""};
  return std::nullopt;
}

absl::string_view Basename(absl::string_view path) {
  const size_t slash = path.find_last_of('/');
  return slash == absl::string_view::npos ? path : path.substr(slash + 1);
}

// Abseil's default for --helpshort (and --helppackage): the flags of <program>.cc,
// <program>-main.cc or <program>_main.cc.
bool InMainFile(absl::string_view program, absl::string_view filename) {
  absl::string_view suffix = Basename(filename);
  if (!absl::ConsumePrefix(&suffix, program)) return false;
  return absl::StartsWith(suffix, ".") || absl::StartsWith(suffix, "-main.") ||
         absl::StartsWith(suffix, "_main.");
}

// Writes words wrapped at 80 columns, the first line indented `indent` and the next ones
// `indent + wrapped_indent`, as Abseil's help does.
class HelpPrinter {
 public:
  HelpPrinter(std::ostream& out, size_t indent, size_t wrapped_indent)
      : out_(out), indent_(indent), wrapped_indent_(wrapped_indent) {}

  void Write(absl::string_view text, bool wrap = false) {
    if (text.empty()) return;
    std::vector<absl::string_view> tokens;
    if (wrap) {
      for (absl::string_view line : absl::StrSplit(text, absl::ByAnyChar("\n\r"))) {
        if (!tokens.empty()) tokens.push_back("\n");
        for (absl::string_view token :
             absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty())) {
          tokens.push_back(token);
        }
      }
    } else {
      tokens.push_back(text);
    }
    for (absl::string_view token : tokens) {
      bool new_line = line_len_ == 0;
      if (token == "\n") {
        EndLine();
        continue;
      }
      if (!new_line && line_len_ + token.size() >= kMaxLineLength) {
        EndLine();
        new_line = true;
      }
      if (new_line) {
        line_len_ = first_line_ ? indent_ : indent_ + wrapped_indent_;
        first_line_ = false;
        out_ << std::string(line_len_, ' ');
      } else {
        out_ << ' ';
        ++line_len_;
      }
      out_ << token;
      line_len_ += token.size();
    }
  }

  void EndLine() {
    out_ << '\n';
    line_len_ = 0;
  }

 private:
  static constexpr size_t kMaxLineLength = 80;
  std::ostream& out_;
  const size_t indent_;
  const size_t wrapped_indent_;
  size_t line_len_ = 0;
  bool first_line_ = true;
};

void PrintFlag(std::ostream& out, const absl::CommandLineFlag& flag) {
  HelpPrinter printer(out, /*indent=*/4, /*wrapped_indent=*/2);
  printer.Write(absl::StrCat("--", flag.Name()));
  printer.Write(absl::StrCat("(", flag.Help(), ");"), /*wrap=*/true);
  const bool is_string = flag.IsOfType<std::string>();
  const std::string default_value = flag.DefaultValue();
  const std::string current_value = flag.CurrentValue();
  const auto quoted = [is_string](const std::string& value) {
    return is_string ? absl::StrCat("\"", value, "\"") : value;
  };
  printer.Write(absl::StrCat("default: ", quoted(default_value), ";"));
  if (current_value != default_value) {
    printer.Write(absl::StrCat("currently: ", quoted(current_value), ";"));
  }
  printer.EndLine();
}

// The flags `filter` selects, by directory, file and name, after "<program>: <usage>".
void PrintHelp(std::ostream& out, absl::string_view program,
               const std::function<bool(const absl::CommandLineFlag&)>& filter) {
  out << program << ": " << absl::ProgramUsageMessage() << "\n\n";
  std::map<std::string, std::map<std::string, std::vector<const absl::CommandLineFlag*>>> flags;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (flag->IsRetired() || !filter(*flag)) continue;
    const std::string filename = flag->Filename();
    const size_t slash = filename.find_last_of('/');
    const std::string package = slash == std::string::npos ? "" : filename.substr(0, slash + 1);
    flags[package][filename].push_back(flag);
  }
  absl::string_view package_separator;
  for (auto& [package, files] : flags) {
    out << package_separator;
    package_separator = "\n\n";
    absl::string_view file_separator;
    for (auto& [filename, in_file] : files) {
      out << file_separator << "  Flags from " << filename << ":\n";
      file_separator = "\n";
      std::sort(in_file.begin(), in_file.end(),
                [](const absl::CommandLineFlag* a, const absl::CommandLineFlag* b) {
                  return a->Name() < b->Name();
                });
      for (const absl::CommandLineFlag* flag : in_file) PrintFlag(out, *flag);
    }
  }
  HelpPrinter printer(out, /*indent=*/0, /*wrapped_indent=*/0);
  if (flags.empty()) printer.Write("No flags matched.\n", /*wrap=*/true);
  printer.EndLine();
  printer.Write(
      "Try --helpfull to get a list of all flags or --help=substring shows help for flags which "
      "include specified substring in either in the name, or description or path.\n",
      /*wrap=*/true);
}

std::vector<char*> Parse(int argc, char** argv,
                         const std::function<bool(absl::string_view)>& help_files) {
  Usage usage;
  std::vector<char*> rest;
  rest.reserve(argc);
  bool flags_done = false;
  for (int i = 0; i < argc; ++i) {
    if (i > 0 && !flags_done) {
      if (absl::string_view(argv[i]) == "--") {
        flags_done = true;
      } else if (std::optional<Usage> asked = UsageFlag(argv[i]); asked.has_value()) {
        usage = std::move(*asked);
        continue;
      }
    }
    rest.push_back(argv[i]);
  }
  std::vector<char*> positional =
      absl::ParseCommandLine(static_cast<int>(rest.size()), rest.data());
  if (usage.mode == UsageMode::kNone) return positional;

  const std::string program(Basename(argc > 0 ? argv[0] : ""));
  const auto in_main_file = [&program](const absl::CommandLineFlag& flag) {
    return InMainFile(program, flag.Filename());
  };
  switch (usage.mode) {
    case UsageMode::kNone:
    case UsageMode::kCheckArgs:
      break;
    case UsageMode::kImportant:
      PrintHelp(std::cout, program,
                [&](const absl::CommandLineFlag& flag) { return help_files(flag.Filename()); });
      break;
    case UsageMode::kShort:
    case UsageMode::kPackage:
      PrintHelp(std::cout, program, in_main_file);
      break;
    case UsageMode::kFull:
      PrintHelp(std::cout, program, [](const absl::CommandLineFlag&) { return true; });
      break;
    case UsageMode::kMatch:
      PrintHelp(std::cout, program, [&usage](const absl::CommandLineFlag& flag) {
        return usage.match.empty() || absl::StrContains(flag.Name(), usage.match) ||
               absl::StrContains(flag.Filename(), usage.match) ||
               absl::StrContains(flag.Help(), usage.match);
      });
      break;
    case UsageMode::kVersion:
      std::cout << program << "\n";
#ifndef NDEBUG
      std::cout << "Debug build (NDEBUG not #defined)\n";
#endif
      break;
  }
  std::cout.flush();
  std::exit(0);
}

}  // namespace

std::vector<char*> ParseFlagsOrExit(int argc, char** argv) {
  const std::string program(Basename(argc > 0 ? argv[0] : ""));
  return Parse(argc, argv,
               [&program](absl::string_view filename) { return InMainFile(program, filename); });
}

std::vector<char*> InitBinary(int argc, char** argv, absl::string_view usage,
                              absl::string_view flags_file) {
  absl::SetProgramUsageMessage(usage);
  // Flags defined in common/ (e.g. the server limits) are the binaries' own too.
  const auto help_files = [file = std::string(flags_file)](absl::string_view path) {
    return absl::StrContains(path, file) || absl::StartsWith(path, "common/");
  };
  absl::FlagsUsageConfig config;
  config.contains_help_flags = help_files;
  absl::SetFlagsUsageConfig(config);
  std::vector<char*> positional = Parse(argc, argv, help_files);
  InitLogging(argv[0]);
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  return positional;
}

}  // namespace dmapin
