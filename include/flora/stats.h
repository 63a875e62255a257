// flora/stats.h: the small statistics behind `flora bench study`: mean and spread over seeds,
// accuracy curves read at a parameter count, paired differences. Pure functions, no LibTorch.
//
// Usage:
//   auto s = flora::stats::mean_std({96.1, 96.8, 95.9});           // {mean, sample std, n}
//   // LoRA's accuracy at 5,000 parameters, read off its (parameters, top-1) curve in log x:
//   double a = flora::stats::interpolate_log_x({{1800, 91.0}, {3600, 93.5}, {7200, 95.0}}, 5000);
//   auto d = flora::stats::paired_difference(flora_top1, lora_top1);  // per seed, then mean_std
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace flora {
namespace stats {

struct MeanStd {
  double mean = 0;  ///< arithmetic mean (NaN when empty)
  double std = 0;   ///< sample standard deviation (n - 1 in the denominator); 0 for n < 2
  int64_t n = 0;
};

/// Mean and sample standard deviation of `values`.
MeanStd mean_std(const std::vector<double>& values);

/// The y of the curve through `points` (x > 0, any order) at `x`, linear in log(x) between the two
/// neighbouring points; NaN outside [min x, max x] (no extrapolation) or for fewer than one point.
/// Equal x values are averaged first.
double interpolate_log_x(std::vector<std::pair<double, double>> points, double x);

/// Index of the value in `xs` (all > 0) closest to `x` by ratio, i.e. by |log(xs[i] / x)|; the
/// first on ties. Throws std::invalid_argument when `xs` is empty.
size_t nearest_by_ratio(const std::vector<double>& xs, double x);

/// a[i] - b[i] per pair (per seed), summarized. Throws std::invalid_argument on unequal sizes.
MeanStd paired_difference(const std::vector<double>& a, const std::vector<double>& b);

}  // namespace stats
}  // namespace flora
