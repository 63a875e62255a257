// flora/detail/compat.h: the few spellings that differ between LibTorch 1.13 and 2.x.
#pragma once

#include <torch/version.h>

#include <variant>

namespace flora {
namespace detail {

/// Option variants (conv padding, padding mode) are c10::variant before LibTorch 2.1 and
/// std::variant from 2.1 on.
template <typename T, typename Variant>
const T* variant_get_if(const Variant& v) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
  return std::get_if<T>(&v);
#else
  return c10::get_if<T>(&v);
#endif
}

}  // namespace detail
}  // namespace flora
