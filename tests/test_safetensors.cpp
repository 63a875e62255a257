// safetensors: round trips for every dtype LibTorch has, the writer's layout rules, and the
// reference reader's validation rules, one malformed file per row.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <fstream>

#include "flora/io/safetensors.h"
#include "flora/spec.h"

namespace {

using flora::io::SafetensorsFile;

std::string temp_path(const std::string& name) { return ::testing::TempDir() + "flora_" + name; }

// A file from a header written by hand and `data_bytes` zero bytes of data.
std::string make_file(const std::string& header, size_t data_bytes, uint64_t declared_len = UINT64_MAX) {
  const uint64_t n = declared_len == UINT64_MAX ? header.size() : declared_len;
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + std::string(data_bytes, '\0');
}

std::string error_of(const std::string& bytes) {
  try {
    SafetensorsFile f(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "test.safetensors");
  } catch (const flora::Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(Safetensors, RoundTripsEveryDtypeWithMetadata) {
  std::vector<std::pair<std::string, torch::Tensor>> tensors = {
      {"f64", torch::randn({2, 3}, torch::kFloat64)},  {"f32", torch::randn({4}, torch::kFloat32)},
      {"f16", torch::randn({3, 1}).to(torch::kHalf)},  {"bf16", torch::randn({5}).to(torch::kBFloat16)},
      {"i64", torch::arange(-3, 3, torch::kLong)},     {"i32", torch::arange(7, torch::kInt)},
      {"i16", torch::arange(-2, 2, torch::kShort)},    {"i8", torch::arange(-5, 5, torch::kChar)},
      {"u8", torch::arange(250, 256).to(torch::kByte)}, {"bool", torch::tensor({true, false, true})},
      {"scalar", torch::tensor(3.5)},                  {"empty", torch::zeros({0, 4})},
      {"strided", torch::randn({4, 6}).t()},
  };
  const std::map<std::string, std::string> meta{{"format", "pt"}, {"note", "ünïcode"}};
  const auto path = temp_path("roundtrip.safetensors");
  flora::io::save_safetensors(path, tensors, meta);
  SafetensorsFile f(path);
  EXPECT_EQ(f.metadata(), meta);
  ASSERT_EQ(f.tensors().size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    auto back = f.load(name);
    EXPECT_EQ(back.scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(back.sizes(), t.sizes()) << name;
    EXPECT_TRUE(torch::equal(back, t)) << name;
  }
  std::remove(path.c_str());
}

TEST(Safetensors, WriterLayoutFollowsTheReference) {
  const auto bytes = flora::io::serialize_safetensors(
      {{"b", torch::zeros({3}, torch::kByte)}, {"a", torch::zeros({2}, torch::kFloat64)}, {"c", torch::zeros({1}, torch::kFloat32)}});
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ((8 + n) % 8, 0u) << "data must start at a multiple of 8";
  SafetensorsFile f(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "mem");
  // Descending alignment, then name: F64 a, F32 c, U8 b.
  ASSERT_EQ(f.tensors().size(), 3u);
  EXPECT_EQ(f.tensors()[0].name, "a");
  EXPECT_EQ(f.tensors()[1].name, "c");
  EXPECT_EQ(f.tensors()[2].name, "b");
  EXPECT_EQ(f.tensors()[1].begin, 16u);
}

TEST(Safetensors, RejectsMalformedFilesNamingTheProblem) {
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  struct Row {
    std::string name, bytes, expect;
  };
  const std::vector<Row> rows = {
      {"valid", make_file(ok, 8), "no error"},
      {"shorter than 8 bytes", std::string(5, '\0'), "shorter than the 8-byte"},
      {"huge header length", make_file(ok, 8, 1ull << 40), "exceeds the limit"},
      {"header past end", make_file(ok, 8, ok.size() + 100), "runs past the end"},
      {"truncated data", make_file(ok, 7), "truncated"},
      {"trailing bytes", make_file(ok, 9), "trailing bytes"},
      {"not json", make_file("{not json}", 0), "not valid UTF-8 JSON"},
      {"bad utf8", make_file("{\"\xff\xfe\":1}", 0), "not valid UTF-8 JSON"},
      {"not an object", make_file("[1, 2]", 0), "does not start with '{'"},
      {"duplicate", make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
       "'a' appears twice"},
      {"overlap", make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
       "overlaps"},
      {"hole", make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "a hole"},
      {"wrong size", make_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "expected 12"},
      {"unknown dtype", make_file(R"({"a":{"dtype":"F31","shape":[2],"data_offsets":[0,8]}})", 8), "unknown dtype 'F31'"},
      {"negative dim", make_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "non-negative integer"},
      {"missing offsets", make_file(R"({"a":{"dtype":"F32","shape":[2]}})", 8), "needs dtype, shape and data_offsets"},
      {"reversed offsets", make_file(R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[8,0]}})", 8), "ending before"},
      {"metadata not strings", make_file(R"({"__metadata__":{"k":1}})", 0), "is not a string"},
      {"overflowing shape", make_file(R"({"a":{"dtype":"F64","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})", 8), "too large"},
  };
  for (const auto& r : rows) {
    const auto m = error_of(r.bytes);
    EXPECT_NE(m.find(r.expect), std::string::npos) << r.name << ": " << m;
    if (r.expect != "no error") EXPECT_NE(m.find("test.safetensors"), std::string::npos) << r.name << ": " << m;
  }
  // A name that is not there, and dtypes LibTorch lacks, fail only when loaded.
  const auto u16 = make_file(R"({"u":{"dtype":"U16","shape":[2],"data_offsets":[0,4]}})", 4);
  SafetensorsFile f(reinterpret_cast<const uint8_t*>(u16.data()), u16.size(), "u16.safetensors");
  EXPECT_THROW(f.load("u"), flora::Error);
  EXPECT_THROW(f.load("missing"), flora::Error);
}

TEST(Safetensors, MissingFileAndUnwritableFolderFailCleanly) {
  EXPECT_THROW(SafetensorsFile("/nonexistent/x.safetensors"), flora::Error);
  EXPECT_THROW(flora::io::save_safetensors("/nonexistent/dir/x.safetensors", {{"a", torch::zeros({1})}}), flora::Error);
}

}  // namespace
