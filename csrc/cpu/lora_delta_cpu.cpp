// CPU kernel of lora_delta_out: one row of the delta at a time, accumulated in the output
// row (in cache) over the rank in order, the inner loop over columns vectorised; no fused
// multiply-add (-ffp-contract=off), so the result is that of common/lora_delta_rule.h.
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/lora_delta_rule.h"
#include "../lora_delta.h"

namespace lorax_merge {
namespace cpu {
namespace {

constexpr int64_t kMinParallelWork = 1 << 17;  // multiply-adds worth a second thread

template <typename T>
void delta_rows(const T* a, const T* b, int64_t rank, int64_t k, int64_t row_begin, T scale, T* out,
                int64_t rows) {
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, rank * k));
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const T* b_row = b + (row_begin + i) * rank;
      T* dst = out + i * k;
      std::fill(dst, dst + k, T(0));
      for (int64_t p = 0; p < rank; ++p) {
        const T coefficient = b_row[p];
        const T* a_row = a + p * k;
        for (int64_t j = 0; j < k; ++j) dst[j] += coefficient * a_row[j];
      }
      for (int64_t j = 0; j < k; ++j) dst[j] = lora_delta_scaled(dst[j], scale);
    }
  });
}

void lora_delta_out(const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                    int64_t row_begin, const at::Tensor& out) {
  check_lora_delta(lora_a, lora_b, row_begin, out);
  if (out.numel() == 0) return;
  const at::Tensor a = lora_a.contiguous();
  const at::Tensor b = lora_b.contiguous();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "lorax_merge_lora_delta", [&] {
    delta_rows<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), a.size(0),
                         a.size(1), row_begin, static_cast<scalar_t>(scale),
                         const_cast<at::Tensor&>(out).data_ptr<scalar_t>(), out.size(0));
  });
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(lorax_merge, CPU, m) {
  m.impl("lora_delta_out", &cpu::lora_delta_out);
}

}  // namespace lorax_merge
