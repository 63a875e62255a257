// flora/data.h: image classification data for the trainer: ImageFolder, CIFAR-10 binary batches
// and MNIST IDX files, decoded once into memory, then served in batches (shuffle, random crop and
// flip, normalization) by worker threads ahead of the training loop.
//
// Usage:
//   auto train = flora::data::load_dataset("imagefolder:/data/pets", flora::data::Split::Train, 64);
//   flora::data::LoaderOptions o;  o.batch_size = 32;  o.augment = true;  o.seed = 0;
//   flora::data::Loader loader(train, o, /*epoch=*/0);
//   torch::Tensor x, y;
//   while (loader.next(x, y)) { ... }          // x float [B, C, S, S] normalized, y int64 [B]
//
// Everything random is a function of (seed, epoch, sample index): the order of an epoch and
// each sample's crop and flip do not depend on threads, so a resumed run sees the same batches.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <deque>
#include <future>
#include <memory>
#include <string>
#include <vector>

namespace flora {
namespace data {

struct Dataset {
  torch::Tensor images;  ///< uint8 [N, C, H, W]
  torch::Tensor labels;  ///< int64 [N]
  std::vector<std::string> classes;
  std::string source;    ///< the spec it was loaded from
  int64_t size() const { return images.defined() ? images.size(0) : 0; }
  int64_t channels() const { return images.size(1); }
};

enum class Split { Train, Val };

/// "imagefolder:DIR" (DIR/<class>/*.png|jpg|jpeg|bmp, classes sorted by name, decoded in
/// `threads` threads (0: one per usable CPU) and resized to image_size), "cifar10:DIR" (data_batch_1..5.bin for Train,
/// test_batch.bin for Val) or "mnist:DIR" (train-* / t10k-* IDX files). CIFAR and MNIST keep
/// their size unless image_size differs; "procedural:TASK[:N]" (flora/procedural.h: N training
/// samples, default 5000, and max(500, N / 5) validation samples, 32 px unless image_size says
/// otherwise). Errors name the file and what is wrong.
Dataset load_dataset(const std::string& spec, Split split, int64_t image_size, int threads = 0);

/// Per-channel mean and std: ImageNet's for 3 channels, MNIST's for 1.
struct Normalization {
  std::vector<double> mean, std;
};
Normalization default_normalization(int64_t channels);

struct LoaderOptions {
  int64_t batch_size = 32;
  bool shuffle = true;
  bool augment = false;   ///< random crop (pad 1/8 of the size, zero fill) and horizontal flip
  bool drop_last = false;
  uint64_t seed = 0;
  int workers = 2;        ///< batches prepared ahead, one thread each
  /// Only these sample positions of the epoch's order (data-parallel shards); empty: all.
  int64_t shard_index = 0, shard_count = 1;
  /// Pad the order by wrapping around to a multiple of shard_count, so every shard has the same
  /// number of samples (torch's DistributedSampler); training ranks need equal step counts.
  bool pad_shards = false;
  Normalization norm;     ///< empty: default_normalization(channels)
};

/// The sample order of one epoch: a permutation when shuffling, a function of (seed, epoch).
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch, bool shuffle);

/// One epoch's batches in order, from `start_batch` (to resume mid-epoch).
class Loader {
 public:
  Loader(const Dataset& dataset, LoaderOptions options, int64_t epoch, int64_t start_batch = 0);
  ~Loader();
  /// The next batch; false at the end of the epoch.
  bool next(torch::Tensor& x, torch::Tensor& y);
  int64_t batches() const { return static_cast<int64_t>(batches_.size()); }
  /// Seconds the caller waited in next() for a batch that was not ready (loader-bound time).
  double wait_seconds() const { return wait_; }

 private:
  struct Batch {
    torch::Tensor x, y;
  };
  Batch make(int64_t b) const;
  const Dataset& data_;
  LoaderOptions o_;
  int64_t epoch_;
  std::vector<std::vector<int64_t>> batches_;
  int64_t next_ = 0, queued_ = 0;
  std::deque<std::future<Batch>> window_;
  double wait_ = 0;
  torch::Tensor mean_, std_;
};

}  // namespace data
}  // namespace flora
