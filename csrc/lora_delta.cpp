#include "lora_delta.h"

#include <utility>

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

namespace lorax_merge {

void check_lora_delta(const at::Tensor& lora_a, const at::Tensor& lora_b, int64_t row_begin,
                      const at::Tensor& out) {
  TORCH_CHECK_VALUE(lora_a.dim() == 2 && lora_b.dim() == 2,
                    "lorax_merge: lora_a and lora_b must be 2-D, got shapes ", lora_a.sizes(),
                    " and ", lora_b.sizes());
  const at::ScalarType dtype = lora_a.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble,
                   "lorax_merge: lora_a must be float32 or float64, got ", dtype);
  TORCH_CHECK_TYPE(lora_b.scalar_type() == dtype && out.scalar_type() == dtype,
                   "lorax_merge: lora_b and out must have lora_a's dtype ", dtype, ", got ",
                   lora_b.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK_VALUE(lora_b.device() == lora_a.device() && out.device() == lora_a.device(),
                    "lorax_merge: lora_a, lora_b and out must be on one device, got ",
                    lora_a.device(), ", ", lora_b.device(), " and ", out.device());
  TORCH_CHECK_VALUE(lora_b.size(1) == lora_a.size(0), "lorax_merge: lora_b has ", lora_b.size(1),
                    " columns but lora_a has ", lora_a.size(0), " rows (the rank)");
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(1) == lora_a.size(1) && out.is_contiguous(),
                    "lorax_merge: out must be a contiguous [rows, ", lora_a.size(1),
                    "] tensor, got shape ", out.sizes());
  TORCH_CHECK_VALUE(row_begin >= 0 && row_begin + out.size(0) <= lora_b.size(0),
                    "lorax_merge: rows [", row_begin, ", ", row_begin + out.size(0),
                    ") are outside the delta's ", lora_b.size(0), " rows");
  // Every entry of out reads a whole row of lora_b and column of lora_a, so no part of either
  // may be written before the last entry is computed.
  const std::pair<const at::Tensor*, const char*> factors[] = {{&lora_a, "lora_a"},
                                                               {&lora_b, "lora_b"}};
  for (const auto& [factor, name] : factors) {
    const at::MemOverlapStatus status = at::get_overlap_status(out, *factor);
    TORCH_CHECK_VALUE(
        status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial,
        "lorax_merge: out shares memory with ", name,
        ", which the delta reads until its last entry is written; give out its own memory");
  }
}

}  // namespace lorax_merge
