#include "flora/stats.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>

namespace flora {
namespace stats {

MeanStd mean_std(const std::vector<double>& v) {
  MeanStd s;
  s.n = static_cast<int64_t>(v.size());
  if (v.empty()) {
    s.mean = std::numeric_limits<double>::quiet_NaN();
    return s;
  }
  for (double x : v) s.mean += x;
  s.mean /= static_cast<double>(v.size());
  if (v.size() > 1) {
    double ss = 0;
    for (double x : v) ss += (x - s.mean) * (x - s.mean);
    s.std = std::sqrt(ss / static_cast<double>(v.size() - 1));
  }
  return s;
}

double interpolate_log_x(std::vector<std::pair<double, double>> points, double x) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::map<double, std::pair<double, int>> by_x;  // x -> (sum of y, count)
  for (const auto& [px, py] : points) {
    if (!(px > 0)) throw std::invalid_argument("interpolate_log_x: x must be > 0, got " + std::to_string(px));
    auto& e = by_x[px];
    e.first += py;
    e.second += 1;
  }
  if (by_x.empty() || !(x > 0)) return nan;
  std::vector<std::pair<double, double>> c;
  for (const auto& [px, e] : by_x) c.emplace_back(px, e.first / e.second);
  if (x < c.front().first || x > c.back().first) return nan;
  for (size_t i = 0; i + 1 < c.size(); ++i) {
    if (x > c[i + 1].first) continue;
    const double t = std::log(x / c[i].first) / std::log(c[i + 1].first / c[i].first);
    return c[i].second + t * (c[i + 1].second - c[i].second);
  }
  return c.back().second;  // x equals the only (or last) point
}

size_t nearest_by_ratio(const std::vector<double>& xs, double x) {
  if (xs.empty()) throw std::invalid_argument("nearest_by_ratio: no values");
  size_t best = 0;
  for (size_t i = 1; i < xs.size(); ++i)
    if (std::abs(std::log(xs[i] / x)) < std::abs(std::log(xs[best] / x))) best = i;
  return best;
}

MeanStd paired_difference(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size())
    throw std::invalid_argument("paired_difference: " + std::to_string(a.size()) + " values against " + std::to_string(b.size()));
  std::vector<double> d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return mean_std(d);
}

}  // namespace stats
}  // namespace flora
