// The study's aggregation math (flora/stats.h): spreads over seeds and curves read at a count.
#include <gtest/gtest.h>

#include <cmath>
#include <stdexcept>

#include "flora/stats.h"

namespace fs = flora::stats;

TEST(Stats, MeanStdIsTheSampleStandardDeviation) {
  const auto s = fs::mean_std({2, 4, 4, 4, 5, 5, 7, 9});
  EXPECT_DOUBLE_EQ(s.mean, 5.0);
  EXPECT_NEAR(s.std, std::sqrt(32.0 / 7.0), 1e-12);  // n - 1 = 7, not the population's 2.0
  EXPECT_EQ(s.n, 8);
}

TEST(Stats, MeanStdOfOneValueHasNoSpreadAndOfNoneIsNaN) {
  EXPECT_DOUBLE_EQ(fs::mean_std({96.5}).std, 0.0);
  EXPECT_DOUBLE_EQ(fs::mean_std({96.5}).mean, 96.5);
  EXPECT_TRUE(std::isnan(fs::mean_std({}).mean));
  EXPECT_EQ(fs::mean_std({}).n, 0);
}

TEST(Stats, InterpolationIsLinearInLogX) {
  // halfway between 1,000 and 4,000 in log x is 2,000
  EXPECT_NEAR(fs::interpolate_log_x({{4000, 94.0}, {1000, 90.0}}, 2000), 92.0, 1e-12);
  EXPECT_NEAR(fs::interpolate_log_x({{1000, 90.0}, {4000, 94.0}, {16000, 95.0}}, 8000), 94.5, 1e-12);
  EXPECT_DOUBLE_EQ(fs::interpolate_log_x({{1000, 90.0}, {4000, 94.0}}, 1000), 90.0);
  EXPECT_DOUBLE_EQ(fs::interpolate_log_x({{1000, 90.0}, {4000, 94.0}}, 4000), 94.0);
}

TEST(Stats, InterpolationDoesNotExtrapolate) {
  EXPECT_TRUE(std::isnan(fs::interpolate_log_x({{1000, 90.0}, {4000, 94.0}}, 999)));
  EXPECT_TRUE(std::isnan(fs::interpolate_log_x({{1000, 90.0}, {4000, 94.0}}, 4001)));
  EXPECT_TRUE(std::isnan(fs::interpolate_log_x({}, 10)));
  EXPECT_DOUBLE_EQ(fs::interpolate_log_x({{1000, 90.0}}, 1000), 90.0);
  EXPECT_THROW(fs::interpolate_log_x({{0, 90.0}}, 1), std::invalid_argument);
}

TEST(Stats, InterpolationAveragesEqualCounts) {
  EXPECT_DOUBLE_EQ(fs::interpolate_log_x({{1000, 90.0}, {1000, 92.0}, {4000, 95.0}}, 1000), 91.0);
}

TEST(Stats, NearestByRatioComparesInLogSpace) {
  // 20 % of 24,280 is 4,856: 3,000 is 1.62x away, 8,000 is 1.65x away
  EXPECT_EQ(fs::nearest_by_ratio({8000, 3000, 20000}, 4856), 1u);
  EXPECT_EQ(fs::nearest_by_ratio({100, 400}, 200), 0u);  // equal ratios: the first
  EXPECT_THROW(fs::nearest_by_ratio({}, 1), std::invalid_argument);
}

TEST(Stats, PairedDifferenceIsPerSeed) {
  const auto d = fs::paired_difference({96.0, 97.0, 95.0}, {95.0, 95.0, 95.0});
  EXPECT_DOUBLE_EQ(d.mean, 1.0);
  EXPECT_DOUBLE_EQ(d.std, 1.0);
  EXPECT_THROW(fs::paired_difference({1.0}, {1.0, 2.0}), std::invalid_argument);
}
