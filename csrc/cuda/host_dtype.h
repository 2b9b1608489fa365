// An ATen dtype as the kernels' Dtype (launch.h), for the host side of the CUDA ops.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "launch.h"

namespace lorax_merge {
namespace cuda {

inline Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return Dtype::kHalf;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    case at::kDouble:
      return Dtype::kDouble;
    default:
      TORCH_CHECK_TYPE(t == at::kFloat, "lorax_merge: unsupported dtype ", t);
      return Dtype::kFloat;
  }
}

}  // namespace cuda
}  // namespace lorax_merge
