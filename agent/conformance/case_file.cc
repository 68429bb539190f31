#include "agent/conformance/case_file.h"

#include <cstddef>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/errno_status.h"
#include "nlohmann/json.hpp"

namespace dmapin::agent::conformance {
namespace {

using Json = nlohmann::json;

#define DMAPIN_CF_CONCAT_INNER(a, b) a##b
#define DMAPIN_CF_CONCAT(a, b) DMAPIN_CF_CONCAT_INNER(a, b)
#define DMAPIN_CF_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                    \
  if (!tmp.ok()) return tmp.status();                   \
  lhs = std::move(*tmp)
// Assigns the value of a StatusOr expression to `lhs`, or returns its error.
#define DMAPIN_CF_ASSIGN_OR_RETURN(lhs, expr) \
  DMAPIN_CF_ASSIGN_OR_RETURN_IMPL(DMAPIN_CF_CONCAT(status_or_, __LINE__), lhs, expr)
#define DMAPIN_CF_RETURN_IF_ERROR(expr) \
  do {                                  \
    absl::Status status_ = (expr);      \
    if (!status_.ok()) return status_;  \
  } while (false)

struct OpEntry {
  Op op;
  absl::string_view name;
};

constexpr OpEntry kOps[] = {
    {Op::kCreateContainer, "create_container"},
    {Op::kRegister, "register"},
    {Op::kUnregister, "unregister"},
    {Op::kMap, "map"},
    {Op::kUnmap, "unmap"},
    {Op::kReleaseContainer, "release_container"},
    {Op::kTeardownContext, "teardown_context"},
    {Op::kTranslate, "translate"},
    {Op::kLookup, "lookup"},
    {Op::kCheck, "check"},
};

// A JSON value for error messages, never throwing (invalid UTF-8 is replaced).
std::string Show(const Json& value) {
  std::string text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (text.size() > 60) text = absl::StrCat(text.substr(0, 57), "...");
  return text;
}

// Collects the parser's message for text that does not parse (no exceptions are thrown: the
// parser hands the exception object to parse_error()).
class ErrorSax : public nlohmann::json_sax<Json> {
 public:
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override { return true; }
  bool key(string_t&) override { return true; }
  bool end_object() override { return true; }
  bool start_array(std::size_t) override { return true; }
  bool end_array() override { return true; }
  bool parse_error(std::size_t, const std::string&,
                   const nlohmann::detail::exception& ex) override {
    message = ex.what();
    return false;
  }

  std::string message;
};

// Reads the fields of one JSON object; `where` prefixes every error ("f.json: case 'x' step 2
// (map)") and `prefix` qualifies field names of nested objects ("region.").
class Fields {
 public:
  Fields(const Json& object, std::string where, std::string prefix = "")
      : object_(object), where_(std::move(where)), prefix_(std::move(prefix)) {}

  absl::Status Error(absl::string_view field, absl::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(where_, ": field '", prefix_, field, "': ", what));
  }

  // The value of `field`, or nullptr when absent. JSON null counts as absent.
  const Json* Find(absl::string_view field) const {
    auto it = object_.find(std::string(field));
    if (it == object_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  bool Has(absl::string_view field) const { return object_.contains(std::string(field)); }

  absl::StatusOr<std::optional<uint64_t>> OptNumber(absl::string_view field) const {
    const Json* value = Find(field);
    if (value == nullptr) return std::optional<uint64_t>();
    if (value->is_number_unsigned()) return std::optional<uint64_t>(value->get<uint64_t>());
    if (value->is_number_integer()) {
      const int64_t number = value->get<int64_t>();
      if (number < 0) return Error(field, absl::StrCat("bad number ", Show(*value), " (negative)"));
      return std::optional<uint64_t>(static_cast<uint64_t>(number));
    }
    if (value->is_string()) {
      std::optional<uint64_t> number = ParseCNumber(value->get_ref<const std::string&>());
      if (!number.has_value()) {
        return Error(field, absl::StrCat("bad number ", Show(*value),
                                         " (want decimal, 0x hex or 0 octal below 2^64)"));
      }
      return number;
    }
    return Error(field, absl::StrCat("bad number ", Show(*value),
                                     " (want an integer or a C-notation string)"));
  }

  absl::StatusOr<uint64_t> Number(absl::string_view field) const {
    DMAPIN_CF_ASSIGN_OR_RETURN(std::optional<uint64_t> number, OptNumber(field));
    if (!number.has_value()) return Error(field, "missing required field");
    return *number;
  }

  absl::StatusOr<std::optional<std::string>> OptString(absl::string_view field) const {
    const Json* value = Find(field);
    if (value == nullptr) return std::optional<std::string>();
    if (!value->is_string()) return Error(field, absl::StrCat("want a string, got ", Show(*value)));
    return std::optional<std::string>(value->get<std::string>());
  }

  absl::StatusOr<std::string> String(absl::string_view field) const {
    DMAPIN_CF_ASSIGN_OR_RETURN(std::optional<std::string> text, OptString(field));
    if (!text.has_value()) return Error(field, "missing required field");
    return *text;
  }

  // A non-empty name (container or context).
  absl::StatusOr<std::string> Name(absl::string_view field) const {
    DMAPIN_CF_ASSIGN_OR_RETURN(std::string name, String(field));
    if (name.empty()) return Error(field, "empty name");
    return name;
  }

  absl::StatusOr<bool> Bool(absl::string_view field, bool default_value) const {
    const Json* value = Find(field);
    if (value == nullptr) return default_value;
    if (!value->is_boolean())
      return Error(field, absl::StrCat("want true or false, got ", Show(*value)));
    return value->get<bool>();
  }

  // An expected answer: "OK" (0) or an errno name known to errno_status.h.
  absl::StatusOr<int> Expect(absl::string_view field, bool required) const {
    DMAPIN_CF_ASSIGN_OR_RETURN(std::optional<std::string> name, OptString(field));
    if (!name.has_value()) {
      if (required) return Error(field, "missing required field");
      return 0;
    }
    if (*name == "OK") return 0;
    std::optional<int> err = ErrnoFromName(*name);
    if (!err.has_value()) {
      return Error(field,
                   absl::StrCat("unknown answer \"", *name, "\" (want OK or an errno name)"));
    }
    return *err;
  }

  // {"ua", "size"}.
  absl::StatusOr<Range> RangeAt(const Json& value, absl::string_view field) const {
    if (!value.is_object())
      return Error(field, absl::StrCat("want {\"ua\", \"size\"}, got ", Show(value)));
    Fields range(value, where_, absl::StrCat(prefix_, field, "."));
    Range result;
    DMAPIN_CF_ASSIGN_OR_RETURN(result.ua, range.Number("ua"));
    DMAPIN_CF_ASSIGN_OR_RETURN(result.size, range.Number("size"));
    return result;
  }

  absl::StatusOr<std::optional<Range>> OptRange(absl::string_view field) const {
    const Json* value = Find(field);
    if (value == nullptr) return std::optional<Range>();
    DMAPIN_CF_ASSIGN_OR_RETURN(Range range, RangeAt(*value, field));
    return std::optional<Range>(range);
  }

  absl::StatusOr<std::vector<Range>> RangeList(absl::string_view field) const {
    std::vector<Range> ranges;
    const Json* value = Find(field);
    if (value == nullptr) return ranges;
    if (!value->is_array())
      return Error(field, absl::StrCat("want a list of ranges, got ", Show(*value)));
    for (size_t i = 0; i < value->size(); ++i) {
      DMAPIN_CF_ASSIGN_OR_RETURN(Range range,
                                 RangeAt((*value)[i], absl::StrCat(field, "[", i, "]")));
      ranges.push_back(range);
    }
    return ranges;
  }

  absl::StatusOr<std::vector<HugeRange>> HugeList(absl::string_view field) const {
    std::vector<HugeRange> ranges;
    const Json* value = Find(field);
    if (value == nullptr) return ranges;
    if (!value->is_array())
      return Error(field, absl::StrCat("want a list of ranges, got ", Show(*value)));
    for (size_t i = 0; i < value->size(); ++i) {
      const Json& item = (*value)[i];
      const std::string item_field = absl::StrCat(field, "[", i, "]");
      if (!item.is_object()) {
        return Error(item_field,
                     absl::StrCat("want {\"ua\", \"size\", \"page_size\"}, got ", Show(item)));
      }
      Fields range(item, where_, absl::StrCat(prefix_, item_field, "."));
      HugeRange huge;
      DMAPIN_CF_ASSIGN_OR_RETURN(huge.ua, range.Number("ua"));
      DMAPIN_CF_ASSIGN_OR_RETURN(huge.size, range.Number("size"));
      DMAPIN_CF_ASSIGN_OR_RETURN(huge.page_size, range.Number("page_size"));
      ranges.push_back(huge);
    }
    return ranges;
  }

 private:
  const Json& object_;
  const std::string where_;
  const std::string prefix_;
};

bool IsPowerOfTwo(uint64_t x) { return x != 0 && (x & (x - 1)) == 0; }

absl::StatusOr<Step> ParseStep(const Json& value, const std::string& case_where, size_t index) {
  std::string where = absl::StrCat(case_where, " step ", index);
  if (!value.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": want an object, got ", Show(value)));
  }
  Step step;
  {
    Fields fields(value, where);
    DMAPIN_CF_ASSIGN_OR_RETURN(std::string op_name, fields.String("op"));
    std::optional<Op> op = OpFromName(op_name);
    if (!op.has_value()) return fields.Error("op", absl::StrCat("unknown op \"", op_name, "\""));
    step.op = *op;
  }
  absl::StrAppend(&where, " (", OpName(step.op), ")");
  Fields fields(value, where);

  if (step.op == Op::kTeardownContext) {
    DMAPIN_CF_ASSIGN_OR_RETURN(step.context, fields.Name("context"));
  } else if (fields.Find("context") != nullptr) {
    DMAPIN_CF_ASSIGN_OR_RETURN(step.context, fields.Name("context"));
  }

  switch (step.op) {
    case Op::kCreateContainer: {
      DMAPIN_CF_ASSIGN_OR_RETURN(step.container, fields.Name("container"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.iommu_page_size, fields.OptNumber("iommu_page_size"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.window_start, fields.OptNumber("window_start"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.window_size, fields.OptNumber("window_size"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.expect, fields.Expect("expect", /*required=*/false));
      break;
    }
    case Op::kRegister:
    case Op::kUnregister: {
      DMAPIN_CF_ASSIGN_OR_RETURN(step.container, fields.Name("container"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.ua, fields.Number("ua"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.size, fields.Number("size"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.expect, fields.Expect("expect", /*required=*/true));
      break;
    }
    case Op::kMap: {
      DMAPIN_CF_ASSIGN_OR_RETURN(step.container, fields.Name("container"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.iova, fields.Number("iova"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.ua, fields.Number("ua"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.size, fields.Number("size"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.expect, fields.Expect("expect", /*required=*/true));
      break;
    }
    case Op::kUnmap: {
      DMAPIN_CF_ASSIGN_OR_RETURN(step.container, fields.Name("container"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.iova, fields.Number("iova"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.size, fields.Number("size"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.expect, fields.Expect("expect", /*required=*/true));
      break;
    }
    case Op::kReleaseContainer: {
      DMAPIN_CF_ASSIGN_OR_RETURN(step.container, fields.Name("container"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.expect, fields.Expect("expect", /*required=*/false));
      break;
    }
    case Op::kTeardownContext: {
      DMAPIN_CF_ASSIGN_OR_RETURN(step.expect, fields.Expect("expect", /*required=*/false));
      break;
    }
    case Op::kTranslate: {
      DMAPIN_CF_ASSIGN_OR_RETURN(step.ua, fields.Number("ua"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.expect, fields.Expect("expect", /*required=*/true));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.page_offset, fields.OptNumber("page_offset"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.same_page_as, fields.OptNumber("same_page_as"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.distinct_page_from, fields.OptNumber("distinct_page_from"));
      if (step.expect != 0 && (step.page_offset.has_value() || step.same_page_as.has_value() ||
                               step.distinct_page_from.has_value())) {
        return fields.Error("expect", "page checks need \"expect\": \"OK\"");
      }
      break;
    }
    case Op::kLookup: {
      DMAPIN_CF_ASSIGN_OR_RETURN(step.ua, fields.Number("ua"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.size, fields.Number("size"));
      if (!fields.Has("expect_region")) {
        return fields.Error("expect_region", "missing required field ({\"ua\", \"size\"} or null)");
      }
      DMAPIN_CF_ASSIGN_OR_RETURN(step.expect_region, fields.OptRange("expect_region"));
      break;
    }
    case Op::kCheck: {
      DMAPIN_CF_ASSIGN_OR_RETURN(step.region, fields.OptRange("region"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.used, fields.OptNumber("used"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.mapped, fields.OptNumber("mapped"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.absent, fields.Bool("absent", false));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.locked_bytes, fields.OptNumber("locked_bytes"));
      DMAPIN_CF_ASSIGN_OR_RETURN(step.regions, fields.OptNumber("regions"));
      if (step.region.has_value()) {
        if (step.absent && (step.used.has_value() || step.mapped.has_value())) {
          return fields.Error("absent", "an absent region has no \"used\" or \"mapped\"");
        }
        if (!step.absent && !step.used.has_value() && !step.mapped.has_value()) {
          return fields.Error("region", "needs \"used\", \"mapped\" or \"absent\"");
        }
      } else {
        if (step.used.has_value()) return fields.Error("used", "needs \"region\"");
        if (step.mapped.has_value()) return fields.Error("mapped", "needs \"region\"");
        if (fields.Has("absent")) return fields.Error("absent", "needs \"region\"");
        if (!step.locked_bytes.has_value() && !step.regions.has_value()) {
          return fields.Error("region",
                              "a check needs \"region\", \"locked_bytes\" or \"regions\"");
        }
      }
      break;
    }
  }
  return step;
}

absl::StatusOr<Case> ParseCase(const Json& value, const std::string& source, size_t index) {
  std::string where = absl::StrCat(source, ": case #", index);
  if (!value.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": want an object, got ", Show(value)));
  }
  Case result;
  {
    Fields fields(value, where);
    DMAPIN_CF_ASSIGN_OR_RETURN(result.name, fields.Name("name"));
  }
  where = absl::StrCat(source, ": case '", result.name, "'");
  Fields fields(value, where);
  DMAPIN_CF_ASSIGN_OR_RETURN(std::optional<std::string> spec, fields.OptString("spec"));
  result.spec = spec.value_or("");
  DMAPIN_CF_ASSIGN_OR_RETURN(std::optional<uint64_t> page_size, fields.OptNumber("page_size"));
  result.page_size = page_size.value_or(kDefaultPageSize);
  if (result.page_size < 4096 || !IsPowerOfTwo(result.page_size)) {
    return fields.Error("page_size", absl::StrCat("page size ", result.page_size,
                                                  " is not a power of two >= 4096"));
  }
  DMAPIN_CF_ASSIGN_OR_RETURN(result.memlock_limit, fields.OptNumber("memlock_limit"));
  DMAPIN_CF_ASSIGN_OR_RETURN(result.cap_ipc_lock, fields.Bool("cap_ipc_lock", false));
  DMAPIN_CF_ASSIGN_OR_RETURN(result.holes, fields.RangeList("holes"));
  DMAPIN_CF_ASSIGN_OR_RETURN(result.readonly, fields.RangeList("readonly"));
  DMAPIN_CF_ASSIGN_OR_RETURN(result.huge, fields.HugeList("huge"));

  const Json* steps = fields.Find("steps");
  if (steps == nullptr) return fields.Error("steps", "missing required field");
  if (!steps->is_array())
    return fields.Error("steps", absl::StrCat("want a list, got ", Show(*steps)));
  result.steps.reserve(steps->size());
  for (size_t i = 0; i < steps->size(); ++i) {
    DMAPIN_CF_ASSIGN_OR_RETURN(Step step, ParseStep((*steps)[i], where, i));
    result.steps.push_back(std::move(step));
  }
  return result;
}

}  // namespace

absl::string_view OpName(Op op) {
  for (const OpEntry& entry : kOps) {
    if (entry.op == op) return entry.name;
  }
  return "?";
}

std::optional<Op> OpFromName(absl::string_view name) {
  for (const OpEntry& entry : kOps) {
    if (entry.name == name) return entry.op;
  }
  return std::nullopt;
}

std::optional<uint64_t> ParseCNumber(absl::string_view text) {
  uint64_t base = 10;
  if (text.size() > 2 && text[0] == '0' && (text[1] == 'x' || text[1] == 'X')) {
    base = 16;
    text.remove_prefix(2);
  } else if (text.size() > 1 && text[0] == '0') {
    base = 8;
    text.remove_prefix(1);
  }
  if (text.empty()) return std::nullopt;
  uint64_t value = 0;
  for (char c : text) {
    uint64_t digit;
    if (c >= '0' && c <= '9') {
      digit = static_cast<uint64_t>(c - '0');
    } else if (c >= 'a' && c <= 'f') {
      digit = static_cast<uint64_t>(c - 'a' + 10);
    } else if (c >= 'A' && c <= 'F') {
      digit = static_cast<uint64_t>(c - 'A' + 10);
    } else {
      return std::nullopt;
    }
    if (digit >= base) return std::nullopt;
    if (value > (std::numeric_limits<uint64_t>::max() - digit) / base) return std::nullopt;
    value = value * base + digit;
  }
  return value;
}

std::string ExpectName(int err) { return err == 0 ? "OK" : ErrnoName(err); }

absl::StatusOr<CaseFile> ParseCaseFile(absl::string_view text, absl::string_view source) {
  const std::string source_name(source);
  Json root = Json::parse(text.begin(), text.end(), /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) {
    ErrorSax sax;
    Json::sax_parse(text.begin(), text.end(), &sax);
    return absl::InvalidArgumentError(absl::StrCat(source_name, ": not valid JSON: ", sax.message));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source_name, ": want a JSON object with \"format\" and \"cases\""));
  }
  Fields fields(root, source_name);
  DMAPIN_CF_ASSIGN_OR_RETURN(std::string format, fields.String("format"));
  if (format != kCaseFileFormat) {
    return fields.Error("format", absl::StrCat("unsupported format \"", format, "\" (want \"",
                                               kCaseFileFormat, "\")"));
  }
  const Json* cases = fields.Find("cases");
  if (cases == nullptr) return fields.Error("cases", "missing required field");
  if (!cases->is_array())
    return fields.Error("cases", absl::StrCat("want a list, got ", Show(*cases)));

  CaseFile file;
  file.source = source_name;
  file.cases.reserve(cases->size());
  for (size_t i = 0; i < cases->size(); ++i) {
    DMAPIN_CF_ASSIGN_OR_RETURN(Case parsed, ParseCase((*cases)[i], source_name, i));
    file.cases.push_back(std::move(parsed));
  }
  return file;
}

absl::StatusOr<CaseFile> LoadCaseFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open case file"));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::NotFoundError(absl::StrCat(path, ": cannot read case file"));
  return ParseCaseFile(text.str(), path);
}

}  // namespace dmapin::agent::conformance
