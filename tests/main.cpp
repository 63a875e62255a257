// The test binary's main: GoogleTest's, plus a fresh random seed per test drawn from the test's
// own name, so that every test sees the same draws whatever ran before it (a filter, a shuffle,
// an edit to an earlier test) and on every machine. FLORA_TEST_SEED=N mixes N into every seed:
// running the battery under a few values shows which tests hold only for their usual draws.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstdlib>
#include <string>

namespace {

uint64_t fnv1a(const std::string& s, uint64_t h = 1469598103934665603ULL) {
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ULL;
  return h;
}

class SeedPerTest final : public testing::EmptyTestEventListener {
 public:
  explicit SeedPerTest(std::string salt) : salt_(std::move(salt)) {}
  void OnTestStart(const testing::TestInfo& info) override {
    const std::string name = std::string(info.test_suite_name()) + "." + info.name() + "/" + salt_;
    torch::manual_seed(fnv1a(name) >> 1);  // below 2^63: the seed is stored signed in places
  }

 private:
  std::string salt_;
};

}  // namespace

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  const char* salt = std::getenv("FLORA_TEST_SEED");
  testing::UnitTest::GetInstance()->listeners().Append(new SeedPerTest(salt ? salt : ""));
  return RUN_ALL_TESTS();
}
