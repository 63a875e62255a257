// flora/procedural.h: deterministic procedural image tasks for the demo, the study and tests:
// data that needs no download and is the same on every machine.
//
// Every sample is a pure function of (task, split, index, size): a shape or glyph drawn with a
// random rotation, scale, position and colours on a noisy background. The tasks share low-level
// structure (strokes, edges, corners), so a network pretrained on one transfers to the others:
//   shapes    10 filled and hollow shapes (the source task)
//   glyphs    10 letter-like stroke figures (a different class set)
//   outlines  the 10 shapes of `shapes` as thin outlines on striped backgrounds (a different domain)
//
// Usage:
//   std::vector<uint8_t> img(3 * 32 * 32);
//   int64_t label = flora::procedural::render("glyphs", /*split=*/0, /*index=*/17, 32, img.data());
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace flora {
namespace procedural {

struct Task {
  std::string name, description;
  std::vector<std::string> classes;
};

/// The known tasks, in the order above.
const std::vector<Task>& tasks();

/// The task called `name`; throws flora::InvalidArgument listing the known names.
const Task& task(const std::string& name);

/// Draws sample `index` of `split` (0 train, 1 validation: disjoint random streams) as a
/// channel-major RGB image (3 x size x size bytes) into `chw`; returns its class. The class of
/// sample i is i mod 10, so every prefix of a split is balanced.
int64_t render(const Task& task, int split, int64_t index, int64_t size, uint8_t* chw);

}  // namespace procedural
}  // namespace flora
