// The element types of tasks, results and gradients, as the kernels of both devices name them
// (kernels see no ATen dtype; merge_request.h converts one).
#pragma once

#include <cstdint>

namespace lorax_merge {

enum class ElementType : int32_t { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

}  // namespace lorax_merge
