// The CPU gradient kernels of one capability level (capability.h): compiled by setup.py once
// per level, as level_kernels.cpp is, with -DCPU_CAPABILITY=<level> and that level's
// instruction-set flags, but in a translation unit of its own, so that the merges' kernels
// are compiled (and inlined) exactly as without it. The level's GradLevelKernels table below
// is the only way in.
#ifndef CPU_CAPABILITY
#error "setup.py compiles this file once per capability level, with -DCPU_CAPABILITY=<level>"
#endif

#include <type_traits>

#include "../kernel_api.h"
#include "element_dispatch.h"
#include "merge_grad_tiles.h"

namespace lorax_merge {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

void merge_grad_blocks(const TileGrad& m, int64_t block_begin, int64_t block_end, void* scratch) {
  with_element_type(m.task_type, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (m.wide) {
      merge_grad_blocks_elected<scalar_t, double>(m, block_begin, block_end, scratch);
    } else if constexpr (!std::is_same_v<scalar_t, double>) {
      merge_grad_blocks_elected<scalar_t, float>(m, block_begin, block_end, scratch);
    }
  });
}

void disjoint_merge_grad(ElementType type, const void* grad, const bool* mask, int64_t n,
                         int64_t positions, int64_t begin, int64_t end, void* out) {
  with_element_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename OpMath<scalar_t>::type;
    disjoint_merge_grad_typed(static_cast<const acc_t*>(grad), mask, n, positions, begin, end,
                              static_cast<scalar_t*>(out));
  });
}

}  // namespace

extern const GradLevelKernels kGradLevelKernels = {
    /*merge_grad_blocks=*/merge_grad_blocks,
    /*disjoint_merge_grad=*/disjoint_merge_grad,
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lorax_merge
