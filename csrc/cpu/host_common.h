// What the host side of the CPU ops shares: an ATen dtype as the kernels' ElementType, and how
// much work is worth a second thread.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#include "kernel_api.h"

namespace lorax_merge {
namespace cpu {

// Least work (task elements read) worth handing to another thread: 10-20 us of one thread's
// work, against 1-2 us to wake a waiting thread (torch's own element-wise ops split from 32K
// elements on). A LoRA-sized merge (3 x 64K elements) uses two threads.
constexpr int64_t kMinParallelWork = 1 << 16;

inline ElementType element_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return ElementType::kDouble;
    case at::kHalf:
      return ElementType::kHalf;
    case at::kBFloat16:
      return ElementType::kBFloat16;
    default:
      return ElementType::kFloat;
  }
}

}  // namespace cpu
}  // namespace lorax_merge
