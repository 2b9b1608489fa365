// The element type of a run of data as a C++ type: the level kernels' entry points take an
// ElementType (kernel_api.h) and call their templates through this.
//
// Part of the level kernels: included by the level translation units only.
#pragma once

#ifndef CPU_CAPABILITY
#error "kernels/ are compiled once per capability level, by level_kernels.cpp"
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../kernel_api.h"

namespace lorax_merge {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// fn(scalar_t{}) for the element type `type`.
template <typename Fn>
inline auto with_element_type(ElementType type, const Fn& fn) {
  switch (type) {
    case ElementType::kDouble:
      return fn(double{});
    case ElementType::kHalf:
      return fn(c10::Half{});
    case ElementType::kBFloat16:
      return fn(c10::BFloat16{});
    default:
      return fn(float{});
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lorax_merge
