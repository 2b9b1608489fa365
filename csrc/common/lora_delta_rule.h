// One entry of a LoRA delta, the same IEEE operations on the CPU and the GPU:
//   delta[i][j] = (sum over p = 0 .. r-1, in order, of B[i][p] * A[p][j]) * scale
// in the factors' dtype (float32 or float64): each product rounded, then added to a sum
// that starts at +0, then one multiplication by the scaling (as PEFT's get_delta_weight
// scales the product). The order is fixed, so a row's values do not depend on which rows
// are computed with it: tiles of a delta are bit-identical to the whole delta. A NaN entry
// is the canonical NaN (canonical_nan.h), whatever NaN the factors or the arithmetic gave.
#pragma once

#include <cstdint>

#include "canonical_nan.h"
#include "macros.h"

namespace lorax_merge {

// The last step of an entry: the scaling, and one NaN pattern.
template <typename T>
LM_HOST_DEVICE T lora_delta_scaled(T sum, T scale) {
  return output_value<T>(sum * scale);
}

template <typename T>
LM_HOST_DEVICE T lora_delta_entry(const T* b_row, const T* a, int64_t rank, int64_t k, int64_t j,
                                  T scale) {
  T sum = T(0);
  for (int64_t p = 0; p < rank; ++p) sum += b_row[p] * a[p * k + j];
  return lora_delta_scaled(sum, scale);
}

}  // namespace lorax_merge
