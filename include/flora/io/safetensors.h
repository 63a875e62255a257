// flora/io/safetensors.h: read and write the safetensors format (../shared/docs/FLORA.md, 3).
//
// Usage:
//   1. flora::io::SafetensorsFile f("model.safetensors");   // maps the file, validates the header
//   2. for (auto& info : f.tensors()) ...                     // name, dtype, shape, byte range
//      torch::Tensor w = f.load("layer1.0.conv1.weight");     // copies one tensor out of the map
//   3. flora::io::save_safetensors("out.safetensors", {{"w", w}}, {{"format", "pt"}});
//
// The reader memory-maps the file: a multi-GB checkpoint is never copied whole, only the tensors
// asked for. Validation follows the reference reader: header length <= 100,000,000, valid UTF-8
// JSON object, no duplicate names, known dtypes, byte ranges contiguous from 0 with no holes or
// overlaps, end - begin == numel * itemsize, file length == 8 + N + last end. Every error is a
// flora::Error naming the file, the tensor and the problem.
// The writer orders tensors by descending dtype alignment then name, pads the header with spaces
// so the data starts at a multiple of 8, and writes atomically (temporary file, then rename).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace flora {
namespace io {

/// One tensor's header entry.
struct TensorInfo {
  std::string name;
  std::string dtype;           ///< as spelled in the file: "F32", "BF16", "BOOL", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0; ///< byte range relative to the start of the data buffer
  int64_t numel() const;
};

/// Bytes per element of a safetensors dtype name; throws for an unknown name.
size_t dtype_size(const std::string& dtype);
/// The LibTorch scalar type of a dtype name; throws for types LibTorch lacks (U16, U32, U64, F8_*).
torch::ScalarType to_scalar_type(const std::string& dtype);
/// The safetensors name of a LibTorch scalar type; throws for types safetensors lacks.
std::string to_dtype_name(torch::ScalarType type);

class SafetensorsFile {
 public:
  /// Maps and validates `path`. Throws flora::Error on any problem.
  explicit SafetensorsFile(const std::string& path);
  /// Validates an in-memory buffer (the bytes must outlive this object).
  SafetensorsFile(const uint8_t* data, size_t size, std::string label);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  /// Tensors in file order (by offset).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;
  /// A CPU tensor holding a copy of the named tensor's bytes.
  torch::Tensor load(const std::string& name) const;
  /// Every tensor, copied.
  std::vector<std::pair<std::string, torch::Tensor>> load_all() const;
  const std::string& path() const { return label_; }

 private:
  void parse(const uint8_t* data, size_t size);
  std::string label_;
  const uint8_t* data_ = nullptr;  // start of the data buffer
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// Writes `tensors` (any device; made contiguous on CPU) with optional `__metadata__`, atomically.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

/// The bytes save_safetensors would write.
std::string serialize_safetensors(const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata = {});

/// Writes `content` to `path` through a temporary file in the same folder and a rename, so an
/// interrupted write never leaves a partial file at `path`.
void atomic_write(const std::string& path, const std::string& content);

}  // namespace io
}  // namespace flora
