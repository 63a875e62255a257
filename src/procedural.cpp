// Procedural image tasks (flora/procedural.h). Plain C++: no LibTorch, so it compiles in a second.
#include "flora/procedural.h"

#include <algorithm>
#include <cmath>

#include "flora/spec.h"

namespace flora {
namespace procedural {
namespace {

struct Rng {  // splitmix64: a fast, well-mixed stream per sample
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform(double lo, double hi) { return lo + (hi - lo) * static_cast<double>(next() >> 11) * 0x1.0p-53; }
};

uint64_t hash_name(const std::string& s) {  // FNV-1a
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Distance from (u, v) to the segment (ax, ay)-(bx, by).
double segment_distance(double u, double v, double ax, double ay, double bx, double by) {
  const double dx = bx - ax, dy = by - ay;
  const double t = std::clamp(((u - ax) * dx + (v - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0);
  return std::hypot(u - ax - t * dx, v - ay - t * dy);
}

struct Seg {
  double ax, ay, bx, by;
};

bool strokes(double u, double v, std::initializer_list<Seg> segs, double half_width = 0.2) {
  for (const auto& s : segs)
    if (segment_distance(u, v, s.ax, s.ay, s.bx, s.by) <= half_width) return true;
  return false;
}

// Membership of the point (u, v) (figure coordinates, [-1, 1], v down) in shape `k` of `shapes`.
bool shape(int k, double u, double v) {
  const double r = std::hypot(u, v);
  switch (k) {
    case 0: return r <= 0.9;                                                     // disk
    case 1: return std::max(std::abs(u), std::abs(v)) <= 0.75;                   // square
    case 2: return v <= 0.75 && std::abs(u) <= (v + 0.85) / 1.6 * 0.9;           // triangle
    case 3: return strokes(u, v, {{-0.9, 0, 0.9, 0}, {0, -0.9, 0, 0.9}}, 0.25);  // plus
    case 4: return r <= 0.9 && r >= 0.55;                                        // ring
    case 5: return std::abs(u) + std::abs(v) <= 0.95;                            // diamond
    case 6: return strokes(u, v, {{-0.9, 0, 0.9, 0}}, 0.3);                      // horizontal bar
    case 7: return strokes(u, v, {{0, -0.9, 0, 0.9}}, 0.3);                      // vertical bar
    case 8: return strokes(u, v, {{-0.75, -0.75, 0.75, 0.75}, {-0.75, 0.75, 0.75, -0.75}}, 0.25);  // X
    default: return r <= 0.9 && v >= -0.1;                                       // half disk
  }
}

// Membership in glyph `k` of `glyphs`: letter-like figures of strokes.
bool glyph(int k, double u, double v) {
  const double L = -0.6, R = 0.6, T = -0.8, B = 0.8;
  switch (k) {
    case 0: return strokes(u, v, {{L, T, L, B}, {L, B, R, B}});                           // L
    case 1: return strokes(u, v, {{L, T, R, T}, {0, T, 0, B}});                           // T
    case 2: return strokes(u, v, {{L, T, L, B}, {R, T, R, B}, {L, 0, R, 0}});             // H
    case 3: return strokes(u, v, {{L, T, L, B}, {R, T, R, B}, {L, B, R, B}});             // U
    case 4: return strokes(u, v, {{L, T, L, B}, {L, T, R, T}, {L, 0, R, 0}, {L, B, R, B}});  // E
    case 5: return strokes(u, v, {{L, T, R, T}, {R, T, L, B}, {L, B, R, B}});             // Z
    case 6: return strokes(u, v, {{L, T, L, B}, {R, T, R, B}, {L, T, R, T}, {L, B, R, B}});  // frame
    case 7: return strokes(u, v, {{L, T, L, B}, {R, T, R, B}, {L, T, R, B}});             // N
    case 8: return strokes(u, v, {{L, T, L, B}, {L, T, R, T}, {L, B, R, B}});             // C
    default: return strokes(u, v, {{L, -0.35, R, -0.35}, {L, 0.35, R, 0.35}});           // equals
  }
}

}  // namespace

const std::vector<Task>& tasks() {
  static const std::vector<Task> t{
      {"shapes", "10 filled and hollow shapes, random colours, rotation, scale and position (the source task)",
       {"disk", "square", "triangle", "plus", "ring", "diamond", "hbar", "vbar", "cross", "half-disk"}},
      {"glyphs", "10 letter-like stroke figures in the same style (a different class set)",
       {"L", "T", "H", "U", "E", "Z", "frame", "N", "C", "equals"}},
      {"outlines", "the 10 shapes as thin outlines on striped backgrounds (a different visual domain)",
       {"disk", "square", "triangle", "plus", "ring", "diamond", "hbar", "vbar", "cross", "half-disk"}},
  };
  return t;
}

const Task& task(const std::string& name) {
  std::string known;
  for (const auto& t : tasks()) {
    if (t.name == name) return t;
    known += (known.empty() ? "" : ", ") + t.name;
  }
  throw InvalidArgument("procedural task '" + name + "' is unknown (expected one of " + known + ")");
}

int64_t render(const Task& t, int split, int64_t index, int64_t size, uint8_t* chw) {
  const int label = static_cast<int>(index % 10);
  Rng rng{hash_name(t.name) ^ (static_cast<uint64_t>(split) * 0xA24BAED4963EE407ull) ^ (static_cast<uint64_t>(index) * 0x9FB21C651E98DF25ull)};
  rng.next();
  // colours: a background and a foreground that differ clearly
  double bg[3], fg[3], bg2[3];
  for (;;) {
    double d = 0;
    for (int c = 0; c < 3; ++c) {
      bg[c] = rng.uniform(0, 255);
      fg[c] = rng.uniform(0, 255);
      bg2[c] = rng.uniform(0, 255);
      d += std::abs(bg[c] - fg[c]);
    }
    if (d >= 220) break;
  }
  const double angle = rng.uniform(-0.45, 0.45), scale = rng.uniform(0.5, 0.72);
  const double cx = rng.uniform(-0.22, 0.22), cy = rng.uniform(-0.22, 0.22);
  const double ca = std::cos(angle), sa = std::sin(angle);
  const double stripe_angle = rng.uniform(0, 3.14159265), stripe_freq = rng.uniform(5, 9);
  const double gx = rng.uniform(-30, 30), gy = rng.uniform(-30, 30);  // background gradient
  const bool outlines = t.name == "outlines", glyphs = t.name == "glyphs";
  for (int64_t y = 0; y < size; ++y)
    for (int64_t x = 0; x < size; ++x) {
      const double px = (x + 0.5) / size * 2 - 1, py = (y + 0.5) / size * 2 - 1;
      const double dx = px - cx, dy = py - cy;
      const double u = (ca * dx + sa * dy) / scale, v = (-sa * dx + ca * dy) / scale;
      bool on;
      if (glyphs) on = glyph(label, u, v);
      else if (outlines) {  // inside, and within ~1.5 pixels of the outside
        on = shape(label, u, v);
        const double d = 3.0 / (size * scale);
        bool interior = on;
        for (int k = 0; k < 8 && interior; ++k)
          interior = shape(label, u + d * std::cos(k * 0.785398), v + d * std::sin(k * 0.785398));
        on = on && !interior;
      }
      else on = shape(label, u, v);
      double base[3];
      if (outlines) {
        const bool band = std::sin(stripe_freq * (px * std::cos(stripe_angle) + py * std::sin(stripe_angle)) * 3.14159265) > 0;
        for (int c = 0; c < 3; ++c) base[c] = band ? bg[c] : 0.5 * (bg[c] + bg2[c]);
      } else {
        for (int c = 0; c < 3; ++c) base[c] = bg[c] + gx * px + gy * py;
      }
      for (int c = 0; c < 3; ++c) {
        const double value = (on ? fg[c] : base[c]) + rng.uniform(-20, 20);
        chw[(c * size + y) * size + x] = static_cast<uint8_t>(std::clamp(value, 0.0, 255.0));
      }
    }
  return label;
}

}  // namespace procedural
}  // namespace flora
