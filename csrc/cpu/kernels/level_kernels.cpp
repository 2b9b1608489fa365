// The CPU kernels of one capability level (capability.h). setup.py compiles this file once
// per level, with -DCPU_CAPABILITY=<level> (DEFAULT, AVX2, AVX512) and that level's
// instruction-set flags, and links the DEFAULT object before the others. Every function
// here and in the kernels it includes lives in lorax_merge::cpu::<level>, most with internal
// linkage; the level's table below is the only way in.
//
// A kernel is one template over the element type (and accumulation type), written once;
// a new kernel is a template in one of the headers plus an entry in LevelKernels.
#ifndef CPU_CAPABILITY
#error "setup.py compiles this file once per capability level, with -DCPU_CAPABILITY=<level>"
#endif

#include "../kernel_api.h"
#include "element_dispatch.h"
#include "merge_tiles.h"
#include "selection.h"
#include "stacked.h"

namespace lorax_merge {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

void merge_tiles(const TileMerge& m, int64_t tile_begin, int64_t tile_end) {
  with_element_type(m.task_type, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (m.wide) {
      merge_tiles_elected<scalar_t, double>(m, tile_begin, tile_end);
    } else if constexpr (!std::is_same_v<scalar_t, double>) {
      merge_tiles_elected<scalar_t, float>(m, tile_begin, tile_end);
    }
  });
}

int64_t scan_bracket(ElementType type, const void* x, int64_t begin, int64_t end, uint64_t lo,
                     uint64_t hi, void* keys, uint32_t* offsets, int64_t capacity, int64_t* above) {
  return with_element_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    return scan_bracket_typed(static_cast<const scalar_t*>(x), begin, end, lo, hi, keys, offsets,
                              capacity, above);
  });
}

void digit_histogram(ElementType type, const void* x, int64_t begin, int64_t end, int shift,
                     int bits, uint64_t prefix, uint64_t prefix_mask, uint32_t* counts) {
  with_element_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    digit_histogram_typed(static_cast<const scalar_t*>(x), begin, end, shift, bits, prefix,
                          prefix_mask, counts);
  });
}

int64_t copy_matching(ElementType type, const void* x, int64_t begin, int64_t end, uint64_t prefix,
                      uint64_t prefix_mask, Candidate* out) {
  return with_element_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    return copy_matching_typed(static_cast<const scalar_t*>(x), begin, end, prefix, prefix_mask,
                               out);
  });
}

int64_t find_equal_rank(ElementType type, const void* x, int64_t begin, int64_t end, uint64_t key,
                        int64_t rank) {
  return with_element_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    return find_equal_rank_typed(static_cast<const scalar_t*>(x), begin, end, key, rank);
  });
}

void majority_sign_mask(ElementType type, SignElection election, const void* stacked, int64_t n,
                        int64_t positions, int64_t begin, int64_t end, bool* mask) {
  with_element_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename OpMath<scalar_t>::type;
    const scalar_t* x = static_cast<const scalar_t*>(stacked);
    if (election == SignElection::kTotal) {
      majority_sign_mask_typed<scalar_t, acc_t, SignElection::kTotal>(x, n, positions, begin, end,
                                                                      mask);
    } else {
      majority_sign_mask_typed<scalar_t, acc_t, SignElection::kFrequency>(x, n, positions, begin,
                                                                          end, mask);
    }
  });
}

void disjoint_merge(ElementType type, const void* stacked, const bool* mask, int64_t n,
                    int64_t positions, int64_t begin, int64_t end, void* out) {
  with_element_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename OpMath<scalar_t>::type;
    disjoint_merge_typed(static_cast<const scalar_t*>(stacked), mask, n, positions, begin, end,
                         static_cast<acc_t*>(out));
  });
}

}  // namespace

extern const LevelKernels kLevelKernels = {
    /*merge_tiles=*/merge_tiles,
    /*scan_bracket=*/scan_bracket,
    /*digit_histogram=*/digit_histogram,
    /*copy_matching=*/copy_matching,
    /*find_equal_rank=*/find_equal_rank,
    /*majority_sign_mask=*/majority_sign_mask,
    /*disjoint_merge=*/disjoint_merge,
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lorax_merge
