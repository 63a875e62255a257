#include "flora/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <set>

#include "flora/spec.h"

namespace flora {
namespace io {
namespace {

constexpr uint64_t kMaxHeader = 100000000;  // the reference reader's limit

struct DtypeRow {
  const char* name;
  size_t size;
  bool in_torch;
  torch::ScalarType type;
};
// Every dtype of the format; the ones LibTorch lacks can be listed but not loaded.
const DtypeRow kDtypes[] = {
    {"BOOL", 1, true, torch::kBool},      {"U8", 1, true, torch::kUInt8},       {"I8", 1, true, torch::kInt8},
    {"F8_E5M2", 1, false, torch::kUInt8}, {"F8_E4M3", 1, false, torch::kUInt8}, {"I16", 2, true, torch::kInt16},
    {"U16", 2, false, torch::kInt16},     {"F16", 2, true, torch::kHalf},       {"BF16", 2, true, torch::kBFloat16},
    {"I32", 4, true, torch::kInt32},      {"U32", 4, false, torch::kInt32},     {"F32", 4, true, torch::kFloat},
    {"F64", 8, true, torch::kDouble},     {"I64", 8, true, torch::kLong},       {"U64", 8, false, torch::kLong},
    {"C64", 8, true, torch::kComplexFloat},
};

const DtypeRow* find_dtype(const std::string& name) {
  for (const auto& row : kDtypes)
    if (name == row.name) return &row;
  return nullptr;
}

[[noreturn]] void fail(const std::string& label, const std::string& what, const std::string& hint = "") {
  throw Error("safetensors '" + label + "': " + what + (hint.empty() ? "" : " (hint: " + hint + ")"));
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

size_t dtype_size(const std::string& dtype) {
  auto* row = find_dtype(dtype);
  if (!row) throw Error("unknown safetensors dtype '" + dtype + "'");
  return row->size;
}

torch::ScalarType to_scalar_type(const std::string& dtype) {
  auto* row = find_dtype(dtype);
  if (!row) throw Error("unknown safetensors dtype '" + dtype + "'");
  if (!row->in_torch) throw Error("safetensors dtype " + dtype + " has no LibTorch equivalent");
  return row->type;
}

std::string to_dtype_name(torch::ScalarType type) {
  for (const auto& row : kDtypes)
    if (row.in_torch && row.type == type) return row.name;
  throw Error(std::string("LibTorch dtype ") + c10::toString(type) + " cannot be stored in safetensors");
}

SafetensorsFile::SafetensorsFile(const std::string& path) : label_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, std::string("cannot open: ") + std::strerror(errno), "check the path");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  mapping_size_ = static_cast<size_t>(st.st_size);
  if (mapping_size_ > 0) {
    mapping_ = ::mmap(nullptr, mapping_size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (mapping_ == MAP_FAILED) {
      mapping_ = nullptr;
      ::close(fd);
      fail(path, std::string("cannot map: ") + std::strerror(errno));
    }
  }
  ::close(fd);
  try {
    parse(static_cast<const uint8_t*>(mapping_), mapping_size_);
  } catch (...) {
    if (mapping_) ::munmap(mapping_, mapping_size_);
    mapping_ = nullptr;
    throw;
  }
}

SafetensorsFile::SafetensorsFile(const uint8_t* data, size_t size, std::string label) : label_(std::move(label)) {
  parse(data, size);
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_) ::munmap(mapping_, mapping_size_);
}

void SafetensorsFile::parse(const uint8_t* bytes, size_t size) {
  if (size < 8) fail(label_, "file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length", "truncated file?");
  const uint64_t n = read_u64_le(bytes);
  if (n > kMaxHeader)
    fail(label_, "header length " + std::to_string(n) + " exceeds the limit of " + std::to_string(kMaxHeader) + " bytes",
         "not a safetensors file, or a corrupted one");
  if (n > size - 8)
    fail(label_, "header length " + std::to_string(n) + " runs past the end of the " + std::to_string(size) + "-byte file",
         "truncated file?");
  const char* header = reinterpret_cast<const char*>(bytes + 8);
  if (n == 0 || header[0] != '{') fail(label_, "header does not start with '{'");

  std::set<std::string> seen;
  std::string duplicate;
  nlohmann::json::parser_callback_t on_key = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& v) {
    if (depth == 1 && event == nlohmann::json::parse_event_t::key && !seen.insert(v.get<std::string>()).second &&
        duplicate.empty())
      duplicate = v.get<std::string>();
    return true;
  };
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(header, header + n, on_key);
  } catch (const nlohmann::json::exception& e) {
    fail(label_, std::string("header is not valid UTF-8 JSON: ") + e.what());
  }
  if (!duplicate.empty()) fail(label_, "tensor '" + duplicate + "' appears twice in the header");
  if (!j.is_object()) fail(label_, "header is not a JSON object");

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const auto& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail(label_, "__metadata__ is not an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) fail(label_, "__metadata__ value '" + m.key() + "' is not a string");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
      fail(label_, "tensor '" + name + "' needs dtype, shape and data_offsets");
    TensorInfo t;
    t.name = name;
    if (!v["dtype"].is_string()) fail(label_, "tensor '" + name + "' has a non-string dtype");
    t.dtype = v["dtype"].get<std::string>();
    const DtypeRow* row = find_dtype(t.dtype);
    if (!row) fail(label_, "tensor '" + name + "' has unknown dtype '" + t.dtype + "'");
    if (!v["shape"].is_array()) fail(label_, "tensor '" + name + "' has a shape that is not a list");
    // numel * itemsize, checked for overflow on every step.
    unsigned __int128 bytes_needed = row->size;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) fail(label_, "tensor '" + name + "' has a shape entry " + d.dump() + ", expected a non-negative integer");
      const uint64_t dim = d.get<uint64_t>();
      if (dim > static_cast<uint64_t>(INT64_MAX)) fail(label_, "tensor '" + name + "' has a dimension too large");
      t.shape.push_back(static_cast<int64_t>(dim));
      bytes_needed *= dim;
      if (bytes_needed > (static_cast<unsigned __int128>(1) << 64)) fail(label_, "tensor '" + name + "' is too large");
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail(label_, "tensor '" + name + "' data_offsets must be [begin, end] with non-negative integers");
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    if (t.end < t.begin) fail(label_, "tensor '" + name + "' has data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] ending before they begin");
    if (static_cast<unsigned __int128>(t.end - t.begin) != bytes_needed)
      fail(label_, "tensor '" + name + "' spans " + std::to_string(t.end - t.begin) + " bytes, expected " +
                       std::to_string(static_cast<uint64_t>(bytes_needed)) + " for " + t.dtype + " " + format_shape(t.shape));
    tensors_.push_back(std::move(t));
  }

  // Byte ranges must tile [0, last end) exactly: sorted by (begin, end), each starts where the
  // previous ended.
  std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  for (const auto& t : tensors_) {
    if (t.begin != expected)
      fail(label_, "tensor '" + t.name + "' starts at byte " + std::to_string(t.begin) + ", expected " +
                       std::to_string(expected) + (t.begin < expected ? " (it overlaps the previous tensor)" : " (a hole before it)"));
    expected = t.end;
  }
  const uint64_t data_size = size - 8 - n;
  if (expected != data_size)
    fail(label_, "data buffer is " + std::to_string(data_size) + " bytes but the tensors cover " + std::to_string(expected),
         expected > data_size ? "truncated file?" : "trailing bytes after the last tensor");
  data_ = bytes + 8 + n;
  for (size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
}

bool SafetensorsFile::contains(const std::string& name) const { return index_.count(name) != 0; }

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) fail(label_, "no tensor named '" + name + "'", "flora inspect lists the names");
  return tensors_[it->second];
}

torch::Tensor SafetensorsFile::load(const std::string& name) const {
  const auto& t = info(name);
  torch::ScalarType type;
  try {
    type = to_scalar_type(t.dtype);
  } catch (const Error& e) {
    fail(label_, "tensor '" + name + "': " + e.what());
  }
  auto out = torch::empty(t.shape, torch::TensorOptions().dtype(type));
  if (t.end > t.begin) std::memcpy(out.data_ptr(), data_ + t.begin, t.end - t.begin);
  return out;
}

std::vector<std::pair<std::string, torch::Tensor>> SafetensorsFile::load_all() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& t : tensors_) out.emplace_back(t.name, load(t.name));
  return out;
}

std::string serialize_safetensors(const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  struct Entry {
    std::string name, dtype;
    torch::Tensor data;
    size_t align;
  };
  std::vector<Entry> entries;
  std::set<std::string> names;
  for (const auto& [name, tensor] : tensors) {
    if (name == "__metadata__") throw Error("safetensors: '__metadata__' cannot name a tensor");
    if (!names.insert(name).second) throw Error("safetensors: tensor '" + name + "' given twice");
    if (!tensor.defined()) throw Error("safetensors: tensor '" + name + "' is undefined");
    auto cpu = tensor.detach().to(torch::kCPU).contiguous();
    const auto dtype = to_dtype_name(cpu.scalar_type());
    entries.push_back({name, dtype, cpu, dtype_size(dtype)});
  }
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.align != b.align ? a.align > b.align : a.name < b.name; });
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& e : entries) {
    const uint64_t bytes = static_cast<uint64_t>(e.data.numel()) * e.align;
    header[e.name] = {{"dtype", e.dtype}, {"shape", e.data.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((static_cast<uint64_t>(h.size()) >> (8 * i)) & 0xff);
  out += h;
  out.reserve(out.size() + offset);
  for (const auto& e : entries)
    out.append(static_cast<const char*>(e.data.data_ptr()), static_cast<size_t>(e.data.numel()) * e.align);
  return out;
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  atomic_write(path, serialize_safetensors(tensors, metadata));
}

void atomic_write(const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw Error("cannot write '" + tmp + "': " + std::strerror(errno) + " (hint: does the folder exist?)");
  const bool ok = std::fwrite(content.data(), 1, content.size(), f) == content.size() && std::fflush(f) == 0 &&
                  ::fsync(::fileno(f)) == 0;
  std::fclose(f);
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string err = std::strerror(errno);
    std::remove(tmp.c_str());
    throw Error("cannot write '" + path + "': " + err);
  }
}

}  // namespace io
}  // namespace flora
