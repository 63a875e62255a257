#include "flora/data.h"

#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <thread>

#include "flora/procedural.h"
#include "flora/runtime.h"
#include "flora/spec.h"
#include "stb_image_c.h"

namespace flora {
namespace data {
namespace {

namespace fs = std::filesystem;
namespace F = torch::nn::functional;

[[noreturn]] void fail(const std::string& where, const std::string& what, const std::string& hint = "") {
  throw Error("data '" + where + "': " + what + (hint.empty() ? "" : " (hint: " + hint + ")"));
}

std::string read_file(const fs::path& p, const std::string& where) {
  std::ifstream in(p, std::ios::binary);
  if (!in) fail(where, "cannot open " + p.string());
  return std::string(std::istreambuf_iterator<char>(in), {});
}

torch::Tensor resize(const torch::Tensor& u8, int64_t size) {  // [N, C, H, W] uint8
  if (size <= 0 || (u8.size(2) == size && u8.size(3) == size)) return u8;
  auto f = F::interpolate(u8.to(torch::kFloat32), F::InterpolateFuncOptions()
                                                      .size(std::vector<int64_t>{size, size})
                                                      .mode(torch::kBilinear)
                                                      .align_corners(false)
                                                      .antialias(true));
  return f.round().clamp(0, 255).to(torch::kUInt8);
}

uint32_t big_endian(const std::string& s, size_t at) {
  const auto* b = reinterpret_cast<const unsigned char*>(s.data() + at);
  return (uint32_t(b[0]) << 24) | (uint32_t(b[1]) << 16) | (uint32_t(b[2]) << 8) | uint32_t(b[3]);
}

Dataset load_mnist(const std::string& dir, Split split, int64_t size) {
  const std::string prefix = split == Split::Train ? "train" : "t10k";
  const fs::path images = fs::path(dir) / (prefix + "-images-idx3-ubyte"), labels = fs::path(dir) / (prefix + "-labels-idx1-ubyte");
  for (const auto& p : {images, labels}) {
    if (!fs::exists(p)) {
      fs::path gz = p;
      gz += ".gz";
      fail("mnist:" + dir, "missing " + p.filename().string(),
           fs::exists(gz) ? "gunzip " + gz.string() + " first" : "MNIST's files are train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-...");
    }
  }
  const std::string img = read_file(images, "mnist:" + dir), lab = read_file(labels, "mnist:" + dir);
  if (img.size() < 16 || big_endian(img, 0) != 2051) fail("mnist:" + dir, images.filename().string() + " is not an IDX image file (magic 2051)");
  if (lab.size() < 8 || big_endian(lab, 0) != 2049) fail("mnist:" + dir, labels.filename().string() + " is not an IDX label file (magic 2049)");
  const int64_t n = big_endian(img, 4), h = big_endian(img, 8), w = big_endian(img, 12);
  if (static_cast<int64_t>(big_endian(lab, 4)) != n)
    fail("mnist:" + dir, "images hold " + std::to_string(n) + " samples but labels " + std::to_string(big_endian(lab, 4)));
  if (h < 1 || w < 1 || img.size() != static_cast<size_t>(16 + n * h * w) || lab.size() != static_cast<size_t>(8 + n))
    fail("mnist:" + dir, "file sizes do not match their headers", "truncated download?");
  if (n == 0) fail("mnist:" + dir, "no samples");
  Dataset d;
  d.images = torch::from_blob(const_cast<char*>(img.data() + 16), {n, 1, h, w}, torch::kUInt8).clone();
  d.labels = torch::from_blob(const_cast<char*>(lab.data() + 8), {n}, torch::kUInt8).to(torch::kInt64);
  for (int i = 0; i < 10; ++i) d.classes.push_back(std::to_string(i));
  if (d.labels.max().item<int64_t>() > 9) fail("mnist:" + dir, "a label is above 9");
  d.images = resize(d.images, size);
  return d;
}

Dataset load_cifar10(const std::string& dir_in, Split split, int64_t size) {
  fs::path dir = dir_in;
  if (!fs::exists(dir / "data_batch_1.bin") && fs::exists(dir / "cifar-10-batches-bin")) dir /= "cifar-10-batches-bin";
  std::vector<std::string> files;
  if (split == Split::Train)
    for (int i = 1; i <= 5; ++i) files.push_back("data_batch_" + std::to_string(i) + ".bin");
  else
    files.push_back("test_batch.bin");
  constexpr int64_t record = 1 + 3 * 32 * 32;
  std::vector<torch::Tensor> imgs, labs;
  for (const auto& f : files) {
    const fs::path p = dir / f;
    if (!fs::exists(p)) fail("cifar10:" + dir_in, "missing " + f, "CIFAR-10's binary version has data_batch_1..5.bin and test_batch.bin");
    const std::string raw = read_file(p, "cifar10:" + dir_in);
    if (raw.empty() || raw.size() % record != 0)
      fail("cifar10:" + dir_in, f + " is " + std::to_string(raw.size()) + " bytes, not a multiple of " + std::to_string(record), "truncated file?");
    const int64_t n = static_cast<int64_t>(raw.size()) / record;
    auto t = torch::from_blob(const_cast<char*>(raw.data()), {n, record}, torch::kUInt8).clone();
    labs.push_back(t.select(1, 0).to(torch::kInt64));
    imgs.push_back(t.slice(1, 1).reshape({n, 3, 32, 32}));
  }
  Dataset d;
  d.images = resize(torch::cat(imgs), size);
  d.labels = torch::cat(labs);
  if (d.labels.max().item<int64_t>() > 9) fail("cifar10:" + dir_in, "a label is above 9", "not the binary version of CIFAR-10?");
  d.classes = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"};
  return d;
}

bool is_image(const fs::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), ::tolower);
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg" || ext == ".bmp";
}

Dataset load_image_folder(const std::string& dir, int64_t size, int threads) {
  const std::string where = "imagefolder:" + dir;
  if (!fs::is_directory(dir)) fail(where, "not a directory", "ImageFolder expects DIR/<class>/<image>.png|jpg");
  if (size <= 0) fail(where, "image size " + std::to_string(size) + " is invalid", "pass --image-size, e.g. 64");
  Dataset d;
  std::vector<std::pair<fs::path, int64_t>> files;
  std::vector<fs::path> class_dirs;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_directory()) class_dirs.push_back(e.path());
  std::sort(class_dirs.begin(), class_dirs.end());
  for (const auto& c : class_dirs) {
    std::vector<fs::path> images;
    for (const auto& e : fs::recursive_directory_iterator(c))
      if (e.is_regular_file() && is_image(e.path())) images.push_back(e.path());
    if (images.empty()) continue;
    std::sort(images.begin(), images.end());
    const int64_t label = static_cast<int64_t>(d.classes.size());
    d.classes.push_back(c.filename().string());
    for (auto& p : images) files.emplace_back(p, label);
  }
  if (files.empty()) fail(where, "no images (.png, .jpg, .jpeg, .bmp) in any class folder", "ImageFolder expects DIR/<class>/<image>.png|jpg");
  const int64_t n = static_cast<int64_t>(files.size());
  d.images = torch::empty({n, 3, size, size}, torch::kUInt8);
  d.labels = torch::empty({n}, torch::kInt64);
  std::atomic<int64_t> next{0};
  std::string error;
  std::mutex error_mutex;
  auto work = [&] {
    for (int64_t i; (i = next.fetch_add(1)) < n;) {
      int w = 0, h = 0, c = 0;
      unsigned char* px = stbi_load(files[i].first.c_str(), &w, &h, &c, 3);
      if (!px || w < 1 || h < 1) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (error.empty()) error = "cannot decode " + files[i].first.string() + ": " + (px ? "empty image" : stbi_failure_reason());
        if (px) stbi_image_free(px);
        continue;
      }
      auto hwc = torch::from_blob(px, {1, h, w, 3}, torch::kUInt8).permute({0, 3, 1, 2});
      d.images[i].copy_(resize(hwc.contiguous(), size)[0]);
      d.labels[i] = files[i].second;
      stbi_image_free(px);
    }
  };
  const int t = threads > 0 ? threads : usable_cpus();
  std::vector<std::thread> pool;
  for (int i = 0; i < t; ++i) pool.emplace_back(work);
  for (auto& th : pool) th.join();
  if (!error.empty()) fail(where, error, "remove or re-save the file");
  return d;
}

// "procedural:TASK[:N]": N training samples (default 5000), max(500, N / 5) validation samples.
Dataset load_procedural(const std::string& rest, Split split, int64_t size, int threads) {
  const auto colon = rest.find(':');
  const auto& task = procedural::task(rest.substr(0, colon));
  int64_t n = 5000;
  if (colon != std::string::npos) {
    const std::string count = rest.substr(colon + 1);
    char* end = nullptr;
    n = std::strtoll(count.c_str(), &end, 10);
    if (count.empty() || *end != '\0' || n < 10)
      fail("procedural:" + rest, "sample count '" + count + "' is invalid (expected an integer >= 10)", "e.g. procedural:shapes:2000");
  }
  if (split == Split::Val) n = std::max<int64_t>(500, n / 5);
  if (size <= 0) size = 32;
  Dataset d;
  d.classes = task.classes;
  d.images = torch::empty({n, 3, size, size}, torch::kUInt8);
  d.labels = torch::empty({n}, torch::kInt64);
  auto* px = d.images.data_ptr<uint8_t>();
  auto* lab = d.labels.data_ptr<int64_t>();
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t i; (i = next.fetch_add(1)) < n;)
      lab[i] = procedural::render(task, split == Split::Train ? 0 : 1, i, size, px + i * 3 * size * size);
  };
  const int t = threads > 0 ? threads : usable_cpus();
  std::vector<std::thread> pool;
  for (int i = 0; i < t; ++i) pool.emplace_back(work);
  for (auto& th : pool) th.join();
  return d;
}

uint64_t mix(uint64_t a, uint64_t b) {  // splitmix64 of a combination: per-sample random streams
  uint64_t z = a * 0x9E3779B97F4A7C15ULL + b + 0x632BE59BD9B4E019ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

}  // namespace

Dataset load_dataset(const std::string& spec, Split split, int64_t image_size, int threads) {
  const auto colon = spec.find(':');
  if (colon == std::string::npos || colon + 1 == spec.size())
    throw InvalidArgument("data '" + spec + "' has no KIND:DIR form (expected imagefolder:DIR, cifar10:DIR, mnist:DIR or procedural:TASK)");
  const std::string kind = spec.substr(0, colon), dir = spec.substr(colon + 1);
  if (image_size < 0 || (kind == "imagefolder" && image_size == 0))
    throw InvalidArgument("image size " + std::to_string(image_size) + " is invalid (expected a positive number of pixels)");
  if (kind == "procedural") {
    Dataset d = load_procedural(dir, split, image_size, threads);
    d.source = spec;
    return d;
  }
  if (kind != "imagefolder" && kind != "cifar10" && kind != "mnist")
    throw InvalidArgument("data kind '" + kind + "' is unknown (expected imagefolder, cifar10, mnist or procedural)");
  if (!fs::is_directory(dir)) throw Error("data '" + spec + "': directory '" + dir + "' does not exist");
  Dataset d = kind == "imagefolder" ? load_image_folder(dir, image_size, threads)
              : kind == "cifar10"   ? load_cifar10(dir, split, image_size)
                                    : load_mnist(dir, split, image_size);
  d.source = spec;
  return d;
}

Normalization default_normalization(int64_t channels) {
  if (channels == 1) return {{0.1307}, {0.3081}};
  if (channels == 3) return {{0.485, 0.456, 0.406}, {0.229, 0.224, 0.225}};
  return {std::vector<double>(channels, 0.5), std::vector<double>(channels, 0.25)};
}

std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch, bool shuffle) {
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  if (shuffle) {
    std::mt19937_64 rng(mix(seed, static_cast<uint64_t>(epoch)));
    for (int64_t i = n - 1; i > 0; --i) std::swap(order[i], order[std::uniform_int_distribution<int64_t>(0, i)(rng)]);
  }
  return order;
}

Loader::Loader(const Dataset& dataset, LoaderOptions o, int64_t epoch, int64_t start_batch)
    : data_(dataset), o_(std::move(o)), epoch_(epoch) {
  if (o_.batch_size < 1) throw InvalidArgument("batch size " + std::to_string(o_.batch_size) + " is invalid (expected >= 1)");
  if (o_.norm.mean.empty()) o_.norm = default_normalization(data_.channels());
  if (static_cast<int64_t>(o_.norm.mean.size()) != data_.channels())
    throw InvalidArgument("normalization has " + std::to_string(o_.norm.mean.size()) + " channels, the data " + std::to_string(data_.channels()));
  mean_ = torch::tensor(o_.norm.mean, torch::kFloat32).view({1, -1, 1, 1}) * 255.0;
  std_ = torch::tensor(o_.norm.std, torch::kFloat32).view({1, -1, 1, 1}) * 255.0;
  auto order = epoch_order(data_.size(), o_.seed, epoch, o_.shuffle);
  if (o_.shard_count < 1 || o_.shard_index < 0 || o_.shard_index >= o_.shard_count)
    throw InvalidArgument("shard " + std::to_string(o_.shard_index) + " of " + std::to_string(o_.shard_count) +
                          " is invalid (expected 0 <= index < count)");
  if (o_.pad_shards && !order.empty())
    for (size_t i = 0; order.size() % static_cast<size_t>(o_.shard_count) != 0; ++i) order.push_back(order[i]);
  // Shard by position in the order: shard k takes positions k, k + K, ...
  std::vector<int64_t> mine;
  for (size_t i = o_.shard_index; i < order.size(); i += o_.shard_count) mine.push_back(order[i]);
  for (size_t i = 0; i < mine.size(); i += o_.batch_size) {
    const size_t end = std::min(mine.size(), i + o_.batch_size);
    if (o_.drop_last && end - i < static_cast<size_t>(o_.batch_size)) break;
    batches_.emplace_back(mine.begin() + i, mine.begin() + end);
  }
  next_ = queued_ = std::min<int64_t>(start_batch, batches());
}

Loader::~Loader() {
  for (auto& f : window_)
    if (f.valid()) f.wait();
}

Loader::Batch Loader::make(int64_t b) const {
  const auto& idx = batches_[b];
  const int64_t n = static_cast<int64_t>(idx.size()), c = data_.channels(), h = data_.images.size(2), w = data_.images.size(3);
  auto x = torch::empty({n, c, h, w}, torch::kUInt8);
  auto y = torch::empty({n}, torch::kInt64);
  const int64_t pad_h = std::max<int64_t>(1, h / 8), pad_w = std::max<int64_t>(1, w / 8);
  for (int64_t i = 0; i < n; ++i) {
    auto img = data_.images[idx[i]];
    if (o_.augment) {
      std::mt19937_64 rng(mix(mix(o_.seed, static_cast<uint64_t>(epoch_)), static_cast<uint64_t>(idx[i])));
      const int64_t dy = std::uniform_int_distribution<int64_t>(-pad_h, pad_h)(rng);
      const int64_t dx = std::uniform_int_distribution<int64_t>(-pad_w, pad_w)(rng);
      const bool flip = std::uniform_int_distribution<int>(0, 1)(rng) == 1;
      // random crop of the zero-padded image = a shift with zero fill
      auto out = torch::zeros_like(img);
      const int64_t sy0 = std::max<int64_t>(0, dy), sy1 = std::min(h, h + dy), sx0 = std::max<int64_t>(0, dx), sx1 = std::min(w, w + dx);
      out.slice(1, sy0 - dy, sy1 - dy).slice(2, sx0 - dx, sx1 - dx).copy_(img.slice(1, sy0, sy1).slice(2, sx0, sx1));
      img = flip ? out.flip({2}) : out;
    }
    x[i].copy_(img);
    y[i] = data_.labels[idx[i]];
  }
  return {(x.to(torch::kFloat32) - mean_) / std_, y};
}

bool Loader::next(torch::Tensor& x, torch::Tensor& y) {
  if (next_ >= batches()) return false;
  while (queued_ < batches() && static_cast<int>(window_.size()) < std::max(1, o_.workers)) {
    const int64_t b = queued_++;
    window_.push_back(std::async(std::launch::async, [this, b] {
      at::set_num_threads(1);  // batch assembly is per-sample work; leave the cores to the model
      return make(b);
    }));
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto batch = window_.front().get();
  wait_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  window_.pop_front();
  ++next_;
  x = batch.x;
  y = batch.y;
  return true;
}

}  // namespace data
}  // namespace flora
