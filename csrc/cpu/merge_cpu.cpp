// CPU kernels: exact magnitude thresholds, then one fused pass that reads each task once
// and writes the output once. Work is split into tiles of kTile elements; inside a tile
// each task's values are pruned and accumulated while they are in L1.
#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/canonical_nan.h"
#include "../common/counter_rng.h"
#include "../common/keys.h"
#include "../common/merge_rule.h"
#include "../device_ops.h"
#include "radix_select.h"

namespace lorax_merge {
namespace cpu {
namespace {

constexpr int64_t kTile = 256;               // even: tiles start on a pair of random words
constexpr int64_t kStackedGrainTiles = 128;  // at::parallel_for grain of the stacked ops
constexpr int64_t kSerialSelectBelow = 1 << 18;
// Least work (task elements read) worth handing to another thread: below it, waking and
// waiting for a second thread costs more than it saves, and a busy server has other
// requests for the other cores.
constexpr int64_t kMinParallelWork = 1 << 17;

// One merge with everything resolved on the host, ready for the tile loop.
struct PreparedMerge {
  std::vector<const void*> tasks;
  std::vector<double> weights;
  std::vector<MagnitudeThreshold> thresholds;  // per task, magnitude pruning only
  Pruning pruning = Pruning::kNone;            // kNone when nothing is pruned (density >= 1)
  bool rescale = false;
  double density = 1.0;
  uint64_t seed = 0;
  int64_t first_stream = 0;
  int64_t index_offset = 0;       // flat index of element 0 in the tensors the tasks slice
  bool thresholds_given = false;  // precomputed for the whole tensors
  uint64_t keep_bound = 0;
  at::ScalarType task_dtype = at::kFloat;
  void* out = nullptr;
  at::ScalarType out_dtype = at::kFloat;
  int64_t numel = 0;
  void (*run_tiles)(const PreparedMerge&, int64_t, int64_t) = nullptr;

  int64_t num_tiles() const { return (numel + kTile - 1) / kTile; }
};

template <typename acc_t>
void store_tile(const PreparedMerge& m, int64_t base, const acc_t* values, int64_t len) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.out_dtype, "lorax_merge_store", [&] {
    scalar_t* dst = static_cast<scalar_t*>(m.out) + base;
    for (int64_t j = 0; j < len; ++j) dst[j] = output_value<scalar_t>(values[j]);
  });
}

// Per-tile accumulator state as arrays (one entry per element of the tile), so that the
// loops over a tile vectorise; the rule itself is merge_rule.h's.
template <typename acc_t, SignElection E>
struct TileState {
  alignas(64) acc_t score[kTile];
  alignas(64) acc_t pos_sum[kTile];
  alignas(64) acc_t pos_count[kTile];
  alignas(64) acc_t neg_sum[kTile];
  alignas(64) acc_t neg_count[kTile];

  void reset() {
    for (int64_t j = 0; j < kTile; ++j) {
      score[j] = pos_sum[j] = pos_count[j] = neg_sum[j] = neg_count[j] = acc_t(0);
    }
  }
  template <typename value_t>
  void add(const value_t* v, acc_t w, int64_t len) {
    for (int64_t j = 0; j < len; ++j) {
      add_elected<acc_t, E>(score[j], pos_sum[j], pos_count[j], neg_sum[j], neg_count[j],
                            static_cast<acc_t>(v[j]), w);
    }
  }
  void finish(acc_t* result, int64_t len) const {
    for (int64_t j = 0; j < len; ++j) {
      result[j] = elected_result(score[j], pos_sum[j], pos_count[j], neg_sum[j], neg_count[j]);
    }
  }
};

template <typename acc_t>
struct TileState<acc_t, SignElection::kNone> {
  alignas(64) acc_t sum[kTile];

  void reset() {
    for (int64_t j = 0; j < kTile; ++j) sum[j] = negative_zero<acc_t>();
  }
  template <typename value_t>
  void add(const value_t* v, acc_t w, int64_t len) {
    for (int64_t j = 0; j < len; ++j) sum[j] += static_cast<acc_t>(v[j]) * w;
  }
  void finish(acc_t* result, int64_t len) const {
    for (int64_t j = 0; j < len; ++j) result[j] = sum[j];
  }
};

// Pruned values of one task over one tile (magnitude or random), in the accumulation type.
template <typename scalar_t, typename acc_t>
void load_pruned_tile(const PreparedMerge& m, int64_t task, const scalar_t* x, int64_t base,
                      int64_t len, acc_t density, acc_t* v) {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  if (m.pruning == Pruning::kMagnitude) {
    // The threshold in the key's own width (keep-nothing becomes {max key, cut 0}) and
    // the tie cut relative to the tile, so the comparisons stay narrow and vectorise.
    const MagnitudeThreshold threshold = m.thresholds[task];
    const key_t key = threshold.key > KeyTraits<scalar_t>::kNaN ? KeyTraits<scalar_t>::kNaN
                                                                : static_cast<key_t>(threshold.key);
    const int32_t cut =
        static_cast<int32_t>(std::clamp<int64_t>(threshold.cut - (m.index_offset + base), 0, len));
    for (int32_t j = 0; j < static_cast<int32_t>(len); ++j) {
      const key_t k = magnitude_key(x[j]);
      const bool kept = (k > key) | ((k == key) & (j < cut));
      v[j] = pruned_value<scalar_t, acc_t>(static_cast<acc_t>(x[j]), kept, false, density);
    }
    return;
  }
  // Random words in pairs from the pair holding the tile's first flat index; a slice at
  // an odd offset starts on the pair's high word.
  alignas(64) uint32_t words[kTile + 2];
  const uint64_t key = dare_stream_key(m.seed, static_cast<uint64_t>(m.first_stream + task));
  const int64_t first = m.index_offset + base;
  const int64_t skip = first & 1;
  for (int64_t p = 0; 2 * p < len + skip; ++p) {
    const uint64_t bits = dare_pair_bits(key, static_cast<uint64_t>(first / 2 + p));
    words[2 * p] = static_cast<uint32_t>(bits);
    words[2 * p + 1] = static_cast<uint32_t>(bits >> 32);
  }
  const uint32_t bound = static_cast<uint32_t>(m.keep_bound);
  const uint32_t* word = words + skip;
  for (int64_t j = 0; j < len; ++j) {
    v[j] = pruned_value<scalar_t, acc_t>(static_cast<acc_t>(x[j]), word[j] < bound, m.rescale,
                                         density);
  }
}

template <typename scalar_t, typename acc_t, SignElection E>
void run_tiles(const PreparedMerge& m, int64_t tile_begin, int64_t tile_end) {
  const acc_t density = static_cast<acc_t>(static_cast<typename OpMath<scalar_t>::type>(m.density));
  TileState<acc_t, E> state;
  alignas(64) acc_t values[kTile];
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t base = tile * kTile;
    const int64_t len = std::min(kTile, m.numel - base);
    state.reset();
    for (int64_t t = 0; t < static_cast<int64_t>(m.tasks.size()); ++t) {
      const scalar_t* x = static_cast<const scalar_t*>(m.tasks[t]) + base;
      const acc_t w = static_cast<acc_t>(m.weights[t]);
      if (m.pruning == Pruning::kNone) {
        state.add(x, w, len);  // nothing to prune: straight from the input
      } else {
        load_pruned_tile<scalar_t, acc_t>(m, t, x, base, len, density, values);
        state.add(values, w, len);
      }
    }
    state.finish(values, len);
    store_tile(m, base, values, len);
  }
}

template <typename scalar_t, typename acc_t>
auto pick_tile_runner(SignElection election) {
  switch (election) {
    case SignElection::kTotal:
      return &run_tiles<scalar_t, acc_t, SignElection::kTotal>;
    case SignElection::kFrequency:
      return &run_tiles<scalar_t, acc_t, SignElection::kFrequency>;
    default:
      return &run_tiles<scalar_t, acc_t, SignElection::kNone>;
  }
}

// The magnitude threshold of one task of one merge, still to be selected.
struct PendingThreshold {
  PreparedMerge* merge;
  int64_t task;
};

PreparedMerge prepare(const MergeRequest& req) {
  PreparedMerge m;
  m.numel = req.numel();
  m.out = req.out.data_ptr();
  m.out_dtype = req.out.scalar_type();
  m.weights = host_weights(req.weights);
  m.pruning = req.prunes() ? req.pruning : Pruning::kNone;
  m.rescale = req.rescale;
  m.density = req.density;
  m.seed = static_cast<uint64_t>(req.seed);
  m.first_stream = req.first_stream;
  m.index_offset = req.index_offset;
  m.keep_bound = dare_keep_bound(req.density);
  if (m.pruning == Pruning::kMagnitude && req.thresholds.defined()) {
    const int64_t* t = req.thresholds.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < req.num_tasks(); ++i) {
      m.thresholds.push_back(MagnitudeThreshold{static_cast<uint64_t>(t[2 * i]), t[2 * i + 1]});
    }
    m.thresholds_given = true;
  }
  for (const at::Tensor& t : req.tasks) m.tasks.push_back(t.const_data_ptr());
  m.task_dtype = req.tasks[0].scalar_type();
  const bool wide = accumulate_type(m.task_dtype, m.out_dtype) == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, m.task_dtype, "lorax_merge_prepare", [&] {
        m.run_tiles = wide ? pick_tile_runner<scalar_t, double>(req.election)
                           : pick_tile_runner<scalar_t, float>(req.election);
      });
  return m;
}

void select_thresholds(std::vector<PreparedMerge>& merges) {
  std::vector<PendingThreshold> large, small;
  for (auto& m : merges) {
    if (m.pruning != Pruning::kMagnitude || m.thresholds_given) continue;
    m.thresholds.resize(m.tasks.size());
    for (int64_t t = 0; t < static_cast<int64_t>(m.tasks.size()); ++t) {
      (m.numel >= kSerialSelectBelow ? large : small).push_back(PendingThreshold{&m, t});
    }
  }
  auto run = [&](const PendingThreshold& job, bool parallel) {
    PreparedMerge& m = *job.merge;
    const int64_t k = magnitude_keep_count(m.density, m.numel);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, m.task_dtype, "lorax_merge_select", [&] {
          m.thresholds[job.task] = select_magnitude_threshold(
              static_cast<const scalar_t*>(m.tasks[job.task]), m.numel, k, parallel);
        });
  };
  for (const PendingThreshold& job : large) run(job, true);
  int64_t small_work = 0;
  for (const PendingThreshold& job : small) small_work += job.merge->numel;
  const int64_t jobs = static_cast<int64_t>(small.size());
  const int64_t job_grain =
      std::max<int64_t>(1, kMinParallelWork * jobs / std::max<int64_t>(small_work, 1));
  at::parallel_for(0, jobs, job_grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) run(small[i], false);
  });
}

void run_prepared(std::vector<PreparedMerge>& merges) {
  // One parallel loop over the tiles of every merge, so small merges share the threads.
  std::vector<int64_t> tile_offsets(merges.size() + 1, 0);
  for (size_t i = 0; i < merges.size(); ++i) {
    tile_offsets[i + 1] = tile_offsets[i] + merges[i].num_tiles();
  }
  int64_t work = 0;  // task elements read by the whole batch
  for (const PreparedMerge& m : merges) work += m.numel * static_cast<int64_t>(m.tasks.size());
  const int64_t tiles = tile_offsets.back();
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork * tiles / std::max<int64_t>(work, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    size_t i =
        static_cast<size_t>(std::upper_bound(tile_offsets.begin(), tile_offsets.end(), begin) -
                            tile_offsets.begin() - 1);
    for (int64_t tile = begin; tile < end; ++i) {
      const int64_t stop = std::min(end, tile_offsets[i + 1]);
      if (stop > tile)
        merges[i].run_tiles(merges[i], tile - tile_offsets[i], stop - tile_offsets[i]);
      tile = std::max(tile, stop);
    }
  });
}

void fused_merge_batch(const std::vector<MergeRequest>& requests) {
  std::vector<PreparedMerge> merges;
  merges.reserve(requests.size());
  for (const MergeRequest& r : requests) merges.push_back(prepare(r));
  select_thresholds(merges);
  run_prepared(merges);
}

// Stacked primitives: element (i, j) of an [N, M] view is task i, position j.
template <typename Fn>
void for_each_position_tile(int64_t positions, const Fn& fn) {
  at::parallel_for(0, (positions + kTile - 1) / kTile, kStackedGrainTiles,
                   [&](int64_t begin, int64_t end) {
                     for (int64_t tile = begin; tile < end; ++tile) {
                       fn(tile * kTile, std::min(kTile, positions - tile * kTile));
                     }
                   });
}

template <typename scalar_t, typename acc_t, SignElection E>
void sign_mask_kernel(const at::Tensor& stacked, at::Tensor& mask) {
  const int64_t n = stacked.size(0);
  const int64_t positions = n == 0 ? 0 : stacked.numel() / n;
  const scalar_t* x = stacked.const_data_ptr<scalar_t>();
  bool* out = mask.data_ptr<bool>();
  for_each_position_tile(positions, [&](int64_t base, int64_t len) {
    acc_t score[kTile];
    for (int64_t j = 0; j < len; ++j) score[j] = acc_t(0);
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* row = x + i * positions + base;
      for (int64_t j = 0; j < len; ++j)
        score[j] += election_term<acc_t, E>(static_cast<acc_t>(row[j]));
    }
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* row = x + i * positions + base;
      bool* dst = out + i * positions + base;
      for (int64_t j = 0; j < len; ++j) {
        dst[j] = agrees_with_majority(static_cast<acc_t>(row[j]), majority_is_positive(score[j]));
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void disjoint_merge_kernel(const at::Tensor& stacked, const at::Tensor& mask, at::Tensor& out) {
  const int64_t n = stacked.size(0);
  const int64_t positions = out.numel();
  const scalar_t* x = stacked.const_data_ptr<scalar_t>();
  const bool* selected = mask.const_data_ptr<bool>();
  acc_t* dst = out.data_ptr<acc_t>();
  for_each_position_tile(positions, [&](int64_t base, int64_t len) {
    MaskedMean<acc_t> mean[kTile];
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* row = x + i * positions + base;
      const bool* m = selected + i * positions + base;
      for (int64_t j = 0; j < len; ++j) mean[j].add(static_cast<acc_t>(row[j]), m[j]);
    }
    for (int64_t j = 0; j < len; ++j) dst[base + j] = output_value<acc_t>(mean[j].result());
  });
}

}  // namespace

struct CpuKernels {
  static void fused_merge(const MergeRequest& request) { fused_merge_batch({request}); }

  static void magnitude_thresholds(const std::vector<at::Tensor>& tasks, double density,
                                   at::Tensor& out) {
    int64_t* dst = out.data_ptr<int64_t>();
    for (size_t i = 0; i < tasks.size(); ++i) {
      const int64_t n = tasks[i].numel();
      const int64_t k = magnitude_keep_count(density, n);
      MagnitudeThreshold t{};
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, tasks[i].scalar_type(), "lorax_merge_thresholds", [&] {
            t = select_magnitude_threshold(tasks[i].const_data_ptr<scalar_t>(), n, k,
                                           n >= kSerialSelectBelow);
          });
      dst[2 * i] = static_cast<int64_t>(t.key);
      dst[2 * i + 1] = t.cut;
    }
  }

  static void fused_merge_many(const std::vector<MergeRequest>& requests) {
    fused_merge_batch(requests);
  }

  static void majority_sign_mask(const at::Tensor& stacked, SignElection election,
                                 at::Tensor& mask) {
    if (stacked.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, stacked.scalar_type(), "lorax_merge_sign_mask", [&] {
          using acc_t = typename OpMath<scalar_t>::type;
          if (election == SignElection::kTotal) {
            sign_mask_kernel<scalar_t, acc_t, SignElection::kTotal>(stacked, mask);
          } else {
            sign_mask_kernel<scalar_t, acc_t, SignElection::kFrequency>(stacked, mask);
          }
        });
  }

  static void disjoint_merge(const at::Tensor& stacked, const at::Tensor& mask, at::Tensor& out) {
    if (out.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, stacked.scalar_type(), "lorax_merge_disjoint", [&] {
          disjoint_merge_kernel<scalar_t, typename OpMath<scalar_t>::type>(stacked, mask, out);
        });
  }
};

}  // namespace cpu

TORCH_LIBRARY_IMPL(lorax_merge, CPU, m) {
  register_device_ops<cpu::CpuKernels>(m);
}

}  // namespace lorax_merge
