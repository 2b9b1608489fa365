// lora_delta_out: rows [row_begin, row_begin + out.size(0)) of the delta scale * B @ A of one
// LoRA module (common/lora_delta_rule.h), written into `out`. The argument checks are shared
// by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace lorax_merge {

// Checks the factors (2-D, float32 or float64, one dtype and device, B's columns = A's rows),
// the row range and `out` ([rows, k], contiguous, the factors' dtype and device, sharing no
// memory with either factor).
void check_lora_delta(const at::Tensor& lora_a, const at::Tensor& lora_b, int64_t row_begin,
                      const at::Tensor& out);

}  // namespace lorax_merge
