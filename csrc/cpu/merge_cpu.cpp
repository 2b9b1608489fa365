// CPU ops: the host side of the kernels. It checks nothing (device_ops.h and
// merge_request.h have), resolves each merge into a TileMerge, selects the magnitude
// thresholds, and spreads tiles and chunks over threads; the loops over the data are the
// kernels of the capability level in use (capability.h, kernels/).
#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/counter_rng.h"
#include "../common/keys.h"
#include "../device_ops.h"
#include "capability.h"
#include "host_common.h"
#include "kernel_api.h"
#include "select.h"

namespace lorax_merge {
namespace cpu {
namespace {

constexpr int64_t kStackedGrainTiles = 128;  // at::parallel_for grain of the stacked ops
// A tensor's selection is split into chunks over the threads from this size on; smaller ones
// take a thread each. (Splitting a LoRA-sized tensor is slower: the halves' cache lines move
// between the cores' caches, as the sample has touched them all on one.)
constexpr int64_t kParallelSelectFrom = 1 << 18;

// One merge with everything resolved on the host; `tiles` points into the vectors.
struct PreparedMerge {
  std::vector<const void*> tasks;
  std::vector<double> weights;
  std::vector<MagnitudeThreshold> thresholds;  // per task, magnitude pruning only
  bool thresholds_given = false;               // precomputed for the whole tensors
  at::ScalarType task_dtype = at::kFloat;
  TileMerge tiles;
};

PreparedMerge prepare(const MergeRequest& req) {
  PreparedMerge m;
  for (const at::Tensor& t : req.tasks) m.tasks.push_back(t.const_data_ptr());
  m.weights = host_weights(req.weights);
  m.task_dtype = req.tasks[0].scalar_type();
  TileMerge& tiles = m.tiles;
  tiles.num_tasks = req.num_tasks();
  tiles.numel = req.numel();
  tiles.task_type = element_type(m.task_dtype);
  tiles.out_type = element_type(req.out.scalar_type());
  tiles.wide = accumulate_type(m.task_dtype, req.out.scalar_type()) == at::kDouble;
  tiles.election = req.election;
  tiles.pruning = req.prunes() ? req.pruning : Pruning::kNone;
  tiles.rescale = req.rescale;
  tiles.density = req.density;
  tiles.seed = static_cast<uint64_t>(req.seed);
  tiles.first_stream = req.first_stream;
  tiles.keep_bound =
      tiles.pruning == Pruning::kRandom ? static_cast<uint32_t>(dare_keep_bound(req.density)) : 0;
  tiles.index_offset = req.index_offset;
  tiles.out = req.out.data_ptr();
  if (tiles.pruning == Pruning::kMagnitude && req.thresholds.defined()) {
    const int64_t* t = req.thresholds.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < req.num_tasks(); ++i) {
      m.thresholds.push_back(MagnitudeThreshold{static_cast<uint64_t>(t[2 * i]), t[2 * i + 1]});
    }
    m.thresholds_given = true;
  }
  return m;
}

// One tensor's magnitude threshold, still to be selected.
struct SelectionJob {
  const void* x;
  int64_t numel;
  at::ScalarType dtype;
  double density;
  MagnitudeThreshold* result;
};

// Large tensors one after the other, each split over the threads; smaller ones a thread each.
void run_selections(const LevelKernels& kernels, const std::vector<SelectionJob>& jobs) {
  auto run = [&](const SelectionJob& job, bool parallel) {
    const int64_t k = magnitude_keep_count(job.density, job.numel);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, job.dtype, "lorax_merge_select", [&] {
      *job.result = select_magnitude_threshold(kernels, static_cast<const scalar_t*>(job.x),
                                               job.numel, k, parallel);
    });
  };
  std::vector<const SelectionJob*> small;
  int64_t small_work = 0;
  for (const SelectionJob& job : jobs) {
    if (job.numel >= kParallelSelectFrom) {
      run(job, true);
    } else {
      small.push_back(&job);
      small_work += job.numel;
    }
  }
  const int64_t count = static_cast<int64_t>(small.size());
  const int64_t grain =
      std::max<int64_t>(1, kMinParallelWork * count / std::max<int64_t>(small_work, 1));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) run(*small[i], false);
  });
}

void select_thresholds(const LevelKernels& kernels, std::vector<PreparedMerge>& merges) {
  std::vector<SelectionJob> jobs;
  for (auto& m : merges) {
    if (m.tiles.pruning != Pruning::kMagnitude || m.thresholds_given) continue;
    m.thresholds.resize(m.tasks.size());
    for (size_t t = 0; t < m.tasks.size(); ++t) {
      jobs.push_back(
          SelectionJob{m.tasks[t], m.tiles.numel, m.task_dtype, m.tiles.density, &m.thresholds[t]});
    }
  }
  run_selections(kernels, jobs);
}

void run_prepared(const LevelKernels& kernels, std::vector<PreparedMerge>& merges) {
  // One parallel loop over the tiles of every merge, so small merges share the threads.
  std::vector<int64_t> tile_offsets(merges.size() + 1, 0);
  int64_t work = 0;  // task elements read by the whole batch
  for (size_t i = 0; i < merges.size(); ++i) {
    TileMerge& tiles = merges[i].tiles;
    tiles.tasks = merges[i].tasks.data();
    tiles.weights = merges[i].weights.data();
    tiles.thresholds = merges[i].thresholds.data();
    tile_offsets[i + 1] = tile_offsets[i] + tiles.num_tiles();
    work += tiles.numel * tiles.num_tasks;
  }
  const int64_t num_tiles = tile_offsets.back();
  const int64_t grain =
      std::max<int64_t>(1, kMinParallelWork * num_tiles / std::max<int64_t>(work, 1));
  at::parallel_for(0, num_tiles, grain, [&](int64_t begin, int64_t end) {
    size_t i =
        static_cast<size_t>(std::upper_bound(tile_offsets.begin(), tile_offsets.end(), begin) -
                            tile_offsets.begin() - 1);
    for (int64_t tile = begin; tile < end; ++i) {
      const int64_t stop = std::min(end, tile_offsets[i + 1]);
      if (stop > tile) {
        kernels.merge_tiles(merges[i].tiles, tile - tile_offsets[i], stop - tile_offsets[i]);
      }
      tile = std::max(tile, stop);
    }
  });
}

void fused_merge_batch(const std::vector<MergeRequest>& requests) {
  const LevelKernels& kernels = active_kernels();
  std::vector<PreparedMerge> merges;
  merges.reserve(requests.size());
  for (const MergeRequest& r : requests) merges.push_back(prepare(r));
  select_thresholds(kernels, merges);
  run_prepared(kernels, merges);
}

// Stacked primitives: element (i, j) of an [N, M] view is task i, position j. fn(begin,
// end) over ranges of positions that start on a tile.
template <typename Fn>
void for_each_position_range(int64_t positions, const Fn& fn) {
  at::parallel_for(
      0, (positions + kTile - 1) / kTile, kStackedGrainTiles,
      [&](int64_t begin, int64_t end) { fn(begin * kTile, std::min(positions, end * kTile)); });
}

}  // namespace

struct CpuKernels {
  static void fused_merge(const MergeRequest& request) { fused_merge_batch({request}); }

  static void magnitude_thresholds(const std::vector<at::Tensor>& tasks, double density,
                                   at::Tensor& out) {
    std::vector<MagnitudeThreshold> thresholds(tasks.size());
    std::vector<SelectionJob> jobs;
    for (size_t i = 0; i < tasks.size(); ++i) {
      jobs.push_back(SelectionJob{tasks[i].const_data_ptr(), tasks[i].numel(),
                                  tasks[i].scalar_type(), density, &thresholds[i]});
    }
    run_selections(active_kernels(), jobs);
    int64_t* dst = out.data_ptr<int64_t>();
    for (size_t i = 0; i < tasks.size(); ++i) {
      dst[2 * i] = static_cast<int64_t>(thresholds[i].key);
      dst[2 * i + 1] = thresholds[i].cut;
    }
  }

  static void fused_merge_many(const std::vector<MergeRequest>& requests) {
    fused_merge_batch(requests);
  }

  static void majority_sign_mask(const at::Tensor& stacked, SignElection election,
                                 at::Tensor& mask) {
    if (stacked.numel() == 0) return;
    const LevelKernels& kernels = active_kernels();
    const int64_t n = stacked.size(0);
    const int64_t positions = stacked.numel() / n;
    const ElementType type = element_type(stacked.scalar_type());
    const void* x = stacked.const_data_ptr();
    bool* out = mask.data_ptr<bool>();
    for_each_position_range(positions, [&](int64_t begin, int64_t end) {
      kernels.majority_sign_mask(type, election, x, n, positions, begin, end, out);
    });
  }

  static void disjoint_merge(const at::Tensor& stacked, const at::Tensor& mask, at::Tensor& out) {
    if (out.numel() == 0) return;
    const LevelKernels& kernels = active_kernels();
    const int64_t n = stacked.size(0);
    const int64_t positions = out.numel();
    const ElementType type = element_type(stacked.scalar_type());
    const void* x = stacked.const_data_ptr();
    const bool* selected = mask.const_data_ptr<bool>();
    void* dst = out.data_ptr();
    for_each_position_range(positions, [&](int64_t begin, int64_t end) {
      kernels.disjoint_merge(type, x, selected, n, positions, begin, end, dst);
    });
  }
};

}  // namespace cpu

TORCH_LIBRARY_IMPL(lorax_merge, CPU, m) {
  register_device_ops<cpu::CpuKernels>(m);
}

}  // namespace lorax_merge
