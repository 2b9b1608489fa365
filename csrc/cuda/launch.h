// Interface between the host side of the CUDA path (merge_cuda.cpp, which speaks ATen) and
// the kernels (*.cu, which do not): plain descriptor structs, the launch shapes both sides
// must agree on, and the launchers.
//
// A batch of merges of one task dtype is described by tables:
//   - threshold jobs, one per task tensor pruned by magnitude: data pointer, size, k, the
//     job's first block and its scratch slot;
//   - merge groups, one per output tensor: output pointer, size, seed, first block and the
//     group's slice of the task table;
//   - merge tasks: data pointer and weight.
// A table travels inside the kernel parameters when it fits in kInlineTableBytes (the
// launch is then self-contained and can be captured in a CUDA graph); otherwise it is
// uploaded to the device and the parameters carry its address.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <cuda_runtime_api.h>

#include "../common/element_type.h"
#include "../common/keys.h"
#include "../common/merge_rule.h"

namespace lorax_merge {
namespace cuda {

inline int dtype_size(ElementType d) {
  switch (d) {
    case ElementType::kHalf:
    case ElementType::kBFloat16:
      return 2;
    case ElementType::kDouble:
      return 8;
    default:
      return 4;
  }
}

// Bytes of parameters one kernel launch may carry: 32,764 since CUDA 12.1 (toolkit and
// driver), 4,096 before. Each kernel's parameter struct is checked against it with a
// static_assert next to the kernel.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr size_t kMaxKernelParamBytes = 32764;
#else
constexpr size_t kMaxKernelParamBytes = 4096;
#endif

// Bytes of a descriptor table that travel inside the kernel parameters: 128 threshold jobs
// (a merge of up to 128 tensors), or a merge_many batch of about 32 groups of 3 tensors.
// Larger tables are uploaded from pinned memory and cannot be captured in a CUDA graph.
// Older toolkits get a table that leaves room for the other parameters within 4 KB.
constexpr int kInlineTableBytes = kMaxKernelParamBytes >= 8192 ? 4096 : 3840;

// ---------------------------------------------------------------------------------------
// Magnitude threshold selection (radix select over magnitude keys).

constexpr int kSelectThreads = 512;
constexpr int64_t kSelectTile = 32768;  // elements per block and pass
constexpr int kSelectMaxPasses = 6;
constexpr int kSelectMaxBins = 4096;  // widest digit: 12 bits
// A job whose tiles times digit passes stay within this is selected by one block, every
// pass in shared memory, during the first launch: it needs no scratch in global memory
// (16-bit tensors up to 12 tiles, float32 up to 8, float64 up to 4). Larger jobs spread
// each pass over one block per tile and combine the tiles' histograms in global memory.
constexpr int64_t kSelectOneBlockTilePasses = 24;

// One tensor's threshold selection in a batch (kept at 32 bytes: 128 fit inline).
struct ThresholdJob {
  const void* data;
  int64_t numel;
  int64_t k;            // keep count, int(density * numel)
  int32_t block_begin;  // first block of this job in every pass's launch
  int32_t slot;         // its histogram and state in the scratch; -1: selected in one block
};
static_assert(sizeof(ThresholdJob) == 32, "128 threshold jobs fill an inline table");

// Per-job progress between passes (jobs selected across blocks); zeroed before the first pass.
struct SelectState {
  uint64_t prefix;  // key bits chosen so far
  int64_t rank;     // 1-based rank of the wanted key among keys with that prefix
  uint32_t done;    // blocks of the current pass that have finished
};

struct DigitPass {
  int32_t shift;
  int32_t bits;
};

// Digit widths from the top: wide digits keep the passes (reads of the data) few; the first
// digit spreads the histogram over many bins (the top bits hold the exponent, where values
// cluster); the last digit is narrow because every block of a job spread over several
// blocks keeps its last-digit histogram for the tie cut.
struct SelectPlan {
  int32_t num_passes;
  int32_t hist_bins;  // widest digit's bins: the per-job histogram stride
  int32_t last_bins;
  DigitPass passes[kSelectMaxPasses];
};

inline SelectPlan make_select_plan(int key_bits) {
  SelectPlan plan{};
  int widths[kSelectMaxPasses] = {};
  int n = 0;
  if (key_bits == 15) {
    widths[n++] = 11;
    widths[n++] = 4;
  } else if (key_bits == 31) {
    widths[n++] = 11;
    widths[n++] = 12;
    widths[n++] = 8;
  } else {  // 63
    for (int i = 0; i < 5; ++i) widths[n++] = 11;
    widths[n++] = 8;
  }
  int shift = key_bits;
  int widest = 0;
  for (int i = 0; i < n; ++i) {
    shift -= widths[i];
    plan.passes[i] = DigitPass{shift, widths[i]};
    widest = widths[i] > widest ? widths[i] : widest;
  }
  plan.num_passes = n;
  plan.hist_bins = 1 << widest;
  plan.last_bins = 1 << widths[n - 1];
  return plan;
}

inline int key_bits_of(ElementType d) {
  return d == ElementType::kDouble ? 63 : (d == ElementType::kFloat ? 31 : 15);
}

LM_HOST_DEVICE int64_t select_tiles(int64_t numel) {
  return numel == 0 ? 1 : (numel + kSelectTile - 1) / kSelectTile;
}

// Builds the job table of one selection launch: blocks and scratch slots are handed out in
// job order.
class ThresholdJobTable {
 public:
  explicit ThresholdJobTable(ElementType dtype)
      : passes_(make_select_plan(key_bits_of(dtype)).num_passes) {}

  // Appends the job of one tensor; k = magnitude_keep_count(density, numel).
  void add(const void* data, int64_t numel, int64_t k) {
    // Keeping nothing or everything needs no pass; such jobs get one block, which writes
    // the threshold in the first launch.
    const bool trivial = k <= 0 || k >= numel;
    const int64_t tiles = select_tiles(numel);
    const bool one_block = trivial || tiles * passes_ <= kSelectOneBlockTilePasses;
    jobs_.push_back(
        ThresholdJob{data, numel, k, static_cast<int32_t>(blocks_), one_block ? -1 : split_jobs_});
    blocks_ += one_block ? 1 : tiles;
    split_jobs_ += one_block ? 0 : 1;
  }
  const std::vector<ThresholdJob>& jobs() const { return jobs_; }
  int64_t blocks() const { return blocks_; }
  int32_t split_jobs() const { return split_jobs_; }  // jobs spread over several blocks

 private:
  int passes_;
  std::vector<ThresholdJob> jobs_;
  int64_t blocks_ = 0;
  int32_t split_jobs_ = 0;
};

struct SelectLaunch {
  ElementType dtype = ElementType::kFloat;
  int32_t num_jobs = 0;
  int32_t num_split_jobs = 0;                 // jobs with a scratch slot
  int64_t num_blocks = 0;                     // blocks of each launch
  const ThresholdJob* jobs_device = nullptr;  // nullptr: the jobs are in jobs_inline
  alignas(16) unsigned char jobs_inline[kInlineTableBytes];
  void* workspace = nullptr;                 // select_workspace_bytes(...) bytes on the device
  MagnitudeThreshold* thresholds = nullptr;  // num_jobs entries on the device (output)
};

// Scratch of the jobs spread over several blocks: nothing when every job fits in one block.
size_t select_workspace_bytes(ElementType dtype, int64_t num_split_jobs, int64_t num_blocks);

// Zeroes what the workspace needs zeroed and runs one launch per digit pass (one launch
// when every job fits in one block); leaves the thresholds on the device.
void launch_select(const SelectLaunch& launch, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Fused merge.

constexpr int kMergeThreads = 256;

// Elements per thread: 8, or 4 when accumulating in double (register budget).
inline int merge_elems_per_thread(bool wide_acc) {
  return wide_acc ? 4 : 8;
}
inline int64_t merge_block_elems(bool wide_acc) {
  return static_cast<int64_t>(kMergeThreads) * merge_elems_per_thread(wide_acc);
}
// Alignment (bytes) a pointer needs for the vector access of one thread's elements.
inline int merge_vector_align(ElementType d, bool wide_acc) {
  const int bytes = merge_elems_per_thread(wide_acc) * dtype_size(d);
  return bytes >= 16 ? 16 : bytes;
}

enum MergeGroupFlags : int32_t { kVectorLoads = 1, kVectorStores = 2 };

struct MergeGroup {
  void* out;
  int64_t numel;
  uint64_t seed;
  int64_t first_stream;  // task i of the group draws from stream first_stream + i
  int64_t block_begin;   // first global block of this group
  int64_t index_offset;  // flat index of element 0 in the tensors the tasks slice
  int32_t first_task;    // index of the group's first task in the task table
  int32_t num_tasks;
  int32_t out_dtype;  // ElementType
  int32_t flags;      // MergeGroupFlags
};

struct MergeTask {
  const void* data;
  const double* weight_device;  // the weight as a double on the device, or nullptr
  double weight;                // the weight when weight_device is nullptr
};

struct MergeLaunch {
  ElementType task_dtype = ElementType::kFloat;
  bool wide_acc = false;  // accumulate in double
  SignElection election = SignElection::kNone;
  Pruning pruning = Pruning::kNone;  // kNone when nothing is pruned
  int32_t rescale = 0;
  double density = 1.0;
  uint64_t keep_bound = 0;                         // random pruning: keep iff word < keep_bound
  const MagnitudeThreshold* thresholds = nullptr;  // per task, magnitude pruning
  int32_t num_groups = 0;
  int64_t num_blocks = 0;
  const unsigned char* table_device = nullptr;  // nullptr: the table is in table_inline
  int64_t groups_offset = 0;  // byte offsets of the group and task arrays in the table
  int64_t tasks_offset = 0;
  alignas(16) unsigned char table_inline[kInlineTableBytes];
};

void launch_merge(const MergeLaunch& launch, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Stacked primitives on an [rows, positions] contiguous tensor.

void launch_sign_mask(ElementType dtype, SignElection election, const void* stacked, bool* mask,
                      int64_t rows, int64_t positions, cudaStream_t stream);
// out has the accumulate dtype (float, double for double input).
void launch_disjoint_merge(ElementType dtype, const void* stacked, const bool* mask, void* out,
                           int64_t rows, int64_t positions, cudaStream_t stream);

}  // namespace cuda
}  // namespace lorax_merge
