// What the host side of the CPU ops hands to the kernels of a capability level, and the
// table of those kernels.
//
// The kernels (kernels/) are compiled once per level (capability.h) and see nothing but
// these plain structs and pointers: the host side allocates, checks, chooses the threads
// and calls a table entry per range of work. That keeps the level translation units free
// of library code (containers, ATen, threads) whose inline definitions could otherwise be
// compiled with wider instructions and shared with other levels.
#pragma once

#include <cstdint>

#include "../common/element_type.h"
#include "../common/keys.h"
#include "../common/merge_rule.h"
#include "../common/weight_grad_sum.h"

namespace lorax_merge {
namespace cpu {

// Elements per tile of the fused merge: each task's values over one tile are pruned and
// accumulated while they are in L1. Even, so that a tile starts on a pair of random words.
constexpr int64_t kTile = 256;

// One merge, resolved on the host: what the tile kernel reads.
struct TileMerge {
  const void* const* tasks = nullptr;              // num_tasks contiguous tensors of task_type
  const double* weights = nullptr;                 // num_tasks
  const MagnitudeThreshold* thresholds = nullptr;  // num_tasks, for magnitude pruning
  int64_t num_tasks = 0;
  int64_t numel = 0;
  ElementType task_type = ElementType::kFloat;
  ElementType out_type = ElementType::kFloat;
  bool wide = false;  // accumulate in double (float64 tasks or output), else in float
  SignElection election = SignElection::kNone;
  Pruning pruning = Pruning::kNone;  // kNone when nothing is pruned (density >= 1)
  bool rescale = false;
  double density = 1.0;
  uint64_t seed = 0;
  int64_t first_stream = 0;  // task i draws from random stream first_stream + i
  uint32_t keep_bound = 0;   // random pruning keeps an element iff its word < keep_bound
  // Flat index of element 0 in the tensors the tasks are a slice of: random words and tie
  // cuts are those of that index.
  int64_t index_offset = 0;
  void* out = nullptr;  // numel elements of out_type

  int64_t num_tiles() const { return (numel + kTile - 1) / kTile; }
};

// Gradient blocks: runs of kGradChunksPerBlock chunks (common/weight_grad_sum.h), the unit of
// work of one call.
constexpr int64_t kGradBlock = kGradChunk * kGradChunksPerBlock;

// One merge's backward, resolved on the host: what the gradient kernel reads and writes.
struct TileGrad {
  const void* const* tasks = nullptr;              // num_tasks contiguous tensors of task_type
  void* const* task_grads = nullptr;               // num_tasks outputs of task_type, or nullptr
  const double* weights = nullptr;                 // num_tasks
  const MagnitudeThreshold* thresholds = nullptr;  // num_tasks, for magnitude pruning
  int64_t num_tasks = 0;
  int64_t numel = 0;
  ElementType task_type = ElementType::kFloat;
  ElementType grad_type = ElementType::kFloat;  // the merge result's dtype
  bool wide = false;  // accumulate in double (float64 tasks or result), else in float
  SignElection election = SignElection::kNone;
  Pruning pruning = Pruning::kNone;  // kNone when nothing is pruned (density >= 1)
  bool rescale = false;
  double density = 1.0;
  uint64_t seed = 0;           // task i draws from random stream i
  uint32_t keep_bound = 0;     // random pruning keeps an element iff its word < keep_bound
  int64_t index_offset = 0;    // flat index of element 0, as in TileMerge
  const void* grad = nullptr;  // numel elements of grad_type: the gradient of the result
  // [num_tasks][grad_chunks(numel)]: each chunk's weight-gradient sum, or nullptr
  double* chunk_sums = nullptr;

  int64_t num_blocks() const { return (numel + kGradBlock - 1) / kGradBlock; }
};

// Bytes of scratch one call of merge_grad_blocks needs for a merge of num_tasks tasks.
constexpr int64_t grad_scratch_bytes(int64_t num_tasks) {
  return num_tasks * (kTile * 8 + kGradLanes * 8 + kTile);
}

// Room the bracket scan needs beyond its capacity (the widest vector, in 32-bit lanes).
constexpr int64_t kCandidateSlack = 16;

// An element that may hold the threshold: its magnitude key and flat index.
struct Candidate {
  uint64_t key;
  int64_t index;
};

// The kernels of one capability level. Each works on a range of one tensor (`x`, of
// `type`, magnitude keys as in keys.h) or of one merge, and is called from the host's
// parallel loops.
struct LevelKernels {
  // Tiles [tile_begin, tile_end) of one merge: prune, elect, weight, accumulate, store.
  void (*merge_tiles)(const TileMerge& merge, int64_t tile_begin, int64_t tile_end);

  // Over x[begin, end) (end - begin < 2^32): adds the number of keys above `hi` to *above
  // and copies the keys in [lo, hi] to `keys` (uint32_t, or uint64_t for double) and their
  // offsets from `begin` to `offsets`, in index order. Returns how many were copied, or -1
  // if that would be more than `capacity`. Both outputs need room for capacity +
  // kCandidateSlack entries: the copy writes whole vectors and keeps the selected lanes.
  int64_t (*scan_bracket)(ElementType type, const void* x, int64_t begin, int64_t end, uint64_t lo,
                          uint64_t hi, void* keys, uint32_t* offsets, int64_t capacity,
                          int64_t* above);

  // Over x[begin, end): for every key with (key & prefix_mask) == prefix, adds one to
  // counts[(key >> shift) & (2^bits - 1)]. `counts` holds 2^bits entries.
  void (*digit_histogram)(ElementType type, const void* x, int64_t begin, int64_t end, int shift,
                          int bits, uint64_t prefix, uint64_t prefix_mask, uint32_t* counts);

  // Over x[begin, end): copies the elements whose key has (key & prefix_mask) == prefix to
  // `out`, in index order, and returns how many.
  int64_t (*copy_matching)(ElementType type, const void* x, int64_t begin, int64_t end,
                           uint64_t prefix, uint64_t prefix_mask, Candidate* out);

  // Over x[begin, end): the index just past the `rank`-th (1-based) element whose key is
  // `key`, or -1 if there are fewer.
  int64_t (*find_equal_rank)(ElementType type, const void* x, int64_t begin, int64_t end,
                             uint64_t key, int64_t rank);

  // Stacked primitives over positions [begin, end) of an [n, positions] tensor, task i at
  // row i. majority_sign_mask: mask[i][j] = sign(x[i][j]) agrees with the elected majority
  // (election kTotal or kFrequency). disjoint_merge: out[j] = the masked mean over i, in
  // float (double for double input).
  void (*majority_sign_mask)(ElementType type, SignElection election, const void* stacked,
                             int64_t n, int64_t positions, int64_t begin, int64_t end, bool* mask);
  void (*disjoint_merge)(ElementType type, const void* stacked, const bool* mask, int64_t n,
                         int64_t positions, int64_t begin, int64_t end, void* out);
};

// The gradient kernels of one capability level (kernels/grad_level_kernels.cpp).
struct GradLevelKernels {
  // Blocks [block_begin, block_end) of one merge's backward: the task gradients, and the
  // weight-gradient sum of every chunk of those blocks (common/weight_grad_sum.h's order
  // inside a chunk). `scratch` holds grad_scratch_bytes(num_tasks) bytes, 64-byte aligned.
  void (*merge_grad_blocks)(const TileGrad& grad, int64_t block_begin, int64_t block_end,
                            void* scratch);
  // disjoint_merge's gradient over positions [begin, end): out[i][j] = grad[j] / count[j],
  // rounded to the stacked dtype `type`, times mask[i][j]; grad in float (double for double).
  void (*disjoint_merge_grad)(ElementType type, const void* grad, const bool* mask, int64_t n,
                              int64_t positions, int64_t begin, int64_t end, void* out);
};

// Each level's tables, defined in kernels/level_kernels.cpp and kernels/grad_level_kernels.cpp
// compiled for that level.
namespace DEFAULT {
extern const LevelKernels kLevelKernels;
extern const GradLevelKernels kGradLevelKernels;
}  // namespace DEFAULT
#if LM_CPU_X86_LEVELS
namespace AVX2 {
extern const LevelKernels kLevelKernels;
extern const GradLevelKernels kGradLevelKernels;
}  // namespace AVX2
namespace AVX512 {
extern const LevelKernels kLevelKernels;
extern const GradLevelKernels kGradLevelKernels;
}  // namespace AVX512
#endif

}  // namespace cpu
}  // namespace lorax_merge
