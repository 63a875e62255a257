#include "flora/io/export.h"

#include <torch/torch.h>

#include <filesystem>
#include <sstream>

#include "flora/functional.h"
#include "flora/io/safetensors.h"

namespace flora {
namespace io {
namespace {

using torch::Tensor;

[[noreturn]] void fail(const StoredModule& m, const std::string& what, const std::string& hint) {
  throw Error("module '" + m.name + "': " + what + (hint.empty() ? "" : " (hint: " + hint + ")"));
}

// U_n, or the identity for an identity mode (the core keeps full size there).
Tensor factor_or_eye(const StoredModule& m, int64_t n) {
  auto it = m.factors.find(n);
  return it != m.factors.end() ? it->second : torch::eye(m.core.size(n), m.core.options());
}

// core x_n U_n for every factored mode n >= from (identity modes contribute nothing).
Tensor contract_from(const StoredModule& m, int64_t from) {
  Tensor t = m.core;
  for (const auto& [n, u] : m.factors)
    if (n >= from) t = functional::mode_product(t, u, n);
  return t;
}

std::vector<int64_t> pointwise(int64_t out, int64_t r, int64_t order) {
  std::vector<int64_t> s{out, r};
  s.resize(order, 1);
  return s;
}

Tensor pad_to(const Tensor& t, const std::vector<int64_t>& shape) {
  auto out = torch::zeros(shape, t.options());
  std::vector<torch::indexing::TensorIndex> idx;
  for (int64_t d = 0; d < t.dim(); ++d) idx.emplace_back(torch::indexing::Slice(0, t.size(d)));
  out.index_put_(idx, t);
  return out;
}

std::string lycoris_name(const std::string& module) {
  std::string s = "lycoris_" + module;
  for (auto& c : s)
    if (c == '.') c = '_';
  return s;
}

}  // namespace

ExportFormat parse_export_format(const std::string& s) {
  if (s == "peft-lora") return ExportFormat::PeftLora;
  if (s == "lycoris") return ExportFormat::Lycoris;
  throw InvalidArgument("export format '" + s + "' is unknown (expected peft-lora or lycoris)");
}

LayerKind stored_kind(const StoredModule& m, Method method) {
  if (m.kind == "Linear") return LayerKind::Linear;
  if (m.kind == "Conv") return LayerKind::Conv;
  if (m.kind == "Embedding") return LayerKind::Embedding;
  if (m.kind == "Parameter") return LayerKind::Parameter;
  if (m.kind.empty())
    fail(m, "the adapter directory does not say whether this " + to_string(method) + " module is a Linear or an Embedding",
         "re-save the adapter with this flora (it records a \"layers\" entry per module)");
  fail(m, "unknown layer type '" + m.kind + "' in the \"layers\" entry", "expected Linear, Conv, Embedding or Parameter");
}

PeftLoraModule to_peft_lora(const StoredModule& m) {
  const LayerKind kind = stored_kind(m, m.lora_rank ? Method::Lora : Method::Flora);
  const double s = m.scale;
  const Tensor u0 = factor_or_eye(m, 0);
  PeftLoraModule out;
  out.name = m.name;
  out.kind = m.kind;
  out.weight_shape = m.weight_shape;
  out.groups = m.groups;
  const bool smaller_in = m.core.dim() == 2 && m.factors.count(1) && m.core.size(1) < m.core.size(0);
  switch (kind) {
    case LayerKind::Linear:  // dW = U_0 (G U_1^T): A [r, in], B [out, r]
      if (smaller_in) {
        out.a = m.factors.at(1).t().contiguous();
        out.b = functional::mode_product(m.core, u0, 0).contiguous();
      } else {
        out.a = contract_from(m, 1).contiguous();
        out.b = u0.contiguous();
      }
      out.rank = out.a.size(0);
      break;
    case LayerKind::Embedding:  // dW = (B A)^T: A^T [num, r], B^T [r, dim]
      out.embedding = true;
      if (smaller_in) {
        out.a = functional::mode_product(m.core, u0, 0).t().contiguous();
        out.b = m.factors.at(1).contiguous();
      } else {
        out.a = u0.t().contiguous();
        out.b = contract_from(m, 1).t().contiguous();
      }
      out.rank = out.a.size(0);
      break;
    case LayerKind::Conv: {
      // dW_(0) = U_0 M with M = G x_1 U_1 x_2 U_2 ...: A = M (one copy per group), B = U_0.
      const Tensor mm = contract_from(m, 1);
      std::vector<int64_t> reps(mm.dim(), 1);
      reps[0] = m.groups;
      out.a = mm.repeat(reps).contiguous();
      out.b = u0.reshape(pointwise(u0.size(0), u0.size(1), mm.dim())).contiguous();
      out.rank = out.a.size(0);
      break;
    }
    case LayerKind::Parameter:
      fail(m, "PEFT LoRA has no form for a generic parameter", "export the layers only, or merge the adapter instead");
  }
  out.alpha = s * static_cast<double>(out.rank);  // scaling = alpha / r = s
  return out;
}

LoconTensors to_locon(const StoredModule& m) {
  const LayerKind kind = stored_kind(m, m.lora_rank ? Method::Lora : Method::Flora);
  LoconTensors out;
  if (kind == LayerKind::Linear) {
    auto p = to_peft_lora(m);
    out.down = p.a;
    out.up = p.b;
    out.rank = p.rank;
  } else if (kind == LayerKind::Conv) {
    const int64_t order = m.core.dim();
    bool spatial = false;
    for (const auto& [n, u] : m.factors) spatial = spatial || n >= 2;
    const Tensor u0 = factor_or_eye(m, 0);
    if (!spatial) {  // plain LoCon: down carries the kernel
      out.down = contract_from(m, 1).contiguous();
      out.up = u0.reshape(pointwise(u0.size(0), u0.size(1), order)).contiguous();
      out.rank = out.down.size(0);
    } else {  // Tucker LoCon: 1x1 down, r x r x k mid, 1x1 up; zero-padded to a square mid
      Tensor mid = m.core;
      for (const auto& [n, u] : m.factors)
        if (n >= 2) mid = functional::mode_product(mid, u, n);
      const Tensor u1 = factor_or_eye(m, 1);
      const int64_t r = std::max(mid.size(0), mid.size(1));
      auto mid_shape = mid.sizes().vec();
      mid_shape[0] = mid_shape[1] = r;
      out.mid = pad_to(mid, mid_shape);
      out.up = pad_to(u0, {u0.size(0), r}).reshape(pointwise(u0.size(0), r, order));
      out.down = pad_to(u1.t(), {r, u1.size(0)}).reshape(pointwise(r, u1.size(0), order));
      out.rank = r;
    }
  } else {
    fail(m, "LyCORIS LoCon has no " + to_string(kind) + " form", "export it with --format peft-lora, or merge the adapter instead");
  }
  out.alpha = m.scale * static_cast<double>(out.rank);
  return out;
}

std::string ExportSummary::text() const {
  std::ostringstream os;
  for (const auto& l : lines) os << l << "\n";
  os << "wrote " << format << " (" << lines.size() << " modules, " << format_count(parameters) << " parameters) to " << out << "\n";
  return os.str();
}

ExportSummary export_adapter(const std::string& adapter_dir, const std::string& out, ExportFormat format) {
  const AdapterDirectory dir = read_adapter(adapter_dir);
  ExportSummary summary;
  summary.out = out;
  char line[512];
  auto describe = [&](const StoredModule& m, int64_t rank, int64_t params) {
    std::snprintf(line, sizeof line, "  %-40s %-9s rank %-5lld %10s params", m.name.c_str(), m.kind.c_str(),
                  static_cast<long long>(rank), format_count(params).c_str());
    summary.lines.push_back(line);
    summary.parameters += params;
  };
  if (format == ExportFormat::PeftLora) {
    summary.format = "PEFT LoRA";
    std::vector<PeftLoraModule> modules;
    for (const auto& m : dir.modules) {  // converts (and validates) every module before writing
      modules.push_back(to_peft_lora(m));
      describe(m, modules.back().rank, modules.back().a.numel() + modules.back().b.numel());
    }
    write_peft_lora(out, modules, /*use_rslora=*/false, dir.base_model_name_or_path);
  } else {
    summary.format = "LyCORIS LoCon";
    if (std::filesystem::is_directory(out))
      throw InvalidArgument("--out '" + out + "' is a directory; a LyCORIS adapter is one file (hint: name it like locon.safetensors)");
    std::vector<std::pair<std::string, Tensor>> tensors;
    for (const auto& m : dir.modules) {
      const auto t = to_locon(m);
      const std::string base = lycoris_name(m.name);
      tensors.emplace_back(base + ".lora_down.weight", t.down);
      tensors.emplace_back(base + ".lora_up.weight", t.up);
      if (t.mid.defined()) tensors.emplace_back(base + ".lora_mid.weight", t.mid);
      tensors.emplace_back(base + ".alpha", torch::tensor(t.alpha, t.down.options()));
      describe(m, t.rank, t.down.numel() + t.up.numel() + (t.mid.defined() ? t.mid.numel() : 0));
    }
    atomic_write(out, serialize_safetensors(tensors, {{"format", "pt"}, {"ss_network_module", "lycoris.kohya"},
                                                       {"ss_network_args", "{\"algo\": \"locon\"}"}}));
  }
  return summary;
}

}  // namespace io
}  // namespace flora
