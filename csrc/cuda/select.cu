// Exact magnitude thresholds on the GPU: radix select over magnitude keys, segmented over
// every task tensor of a batch.
//
// Each pass histograms one digit of the keys that match the prefix chosen so far, in shared
// memory, with warp-aggregated atomics (lanes that share a bin add their count once, so
// all-zero or heavily tied tensors do not serialise on one address).
//
// A small job (a tensor of a few tiles) is selected by one block in the first launch: the
// block runs every digit pass over the whole tensor in shared memory, finds the tie cut by
// scanning the tensor in flat order, and needs no scratch in global memory.
//
// A larger job is spread over one block per tile and pass. Every block builds its tile's
// histogram in shared memory and adds it to the job's histogram in global memory. The last
// block of a job to finish (a ticket counter) picks the digit that holds the wanted rank with
// a block-wide scan and writes the job's new prefix and rank for the next pass. In the final
// pass every block also keeps its tile's histogram, so the last block knows how many keys
// equal to the threshold each tile holds: a scan over those counts finds the tile holding the
// rank-th equal key, and a scan inside that tile finds its index, which gives the tie cut
// (the lower flat index wins) without a sort and without another pass over the data.
// Thresholds stay on the device; nothing is read back by the host.
#include <cub/block/block_scan.cuh>

#include <c10/cuda/CUDAException.h>

#include "device_utils.cuh"

namespace lorax_merge {
namespace cuda {
namespace {

struct SelectParams {
  const ThresholdJob* jobs_device;
  int32_t num_jobs;
  int32_t pass;
  SelectPlan plan;
  unsigned long long* hist;  // [jobs spread over blocks, plan.hist_bins]
  SelectState* states;       // [jobs spread over blocks]
  uint32_t* tile_counts;     // [blocks, plan.last_bins], written in the final pass
  MagnitudeThreshold* thresholds;
  alignas(16) unsigned char jobs_inline[kInlineTableBytes];
};
static_assert(sizeof(SelectParams) <= kMaxKernelParamBytes,
              "the selection parameters fit in a launch");

constexpr int kScanItems = 2;  // counts per thread and step of a block-wide rank search
constexpr int kScanStep = kScanItems * kSelectThreads;
constexpr int kTileItems = static_cast<int>(kSelectTile / kSelectThreads);  // 64
static_assert(kTileItems * kSelectThreads == kSelectTile, "tile is a whole number of items");
static_assert(kSelectThreads % 32 == 0, "whole warps: the histogram aggregates per warp");

using BlockScan = cub::BlockScan<unsigned long long, kSelectThreads>;

// Found position of a rank among consecutive counts: the entry holding it and the total of
// the entries before it.
struct RankHit {
  long long entry;
  unsigned long long before;
  unsigned long long count;
};

struct SharedStorage {
  unsigned int hist[kSelectMaxBins];
  typename BlockScan::TempStorage scan;
  RankHit hit;
  unsigned long long carry;
  int found;
  int last;
};

// Finds, over `total` entries read by `load(i)` (in order), the entry whose running count
// range holds `rank` (1-based): before < rank <= before + count. Uniform across the block;
// returns {-1, total_sum, 0} when the counts add up to less than rank.
template <typename Load>
__device__ RankHit block_find_rank(SharedStorage& s, long long total, unsigned long long rank,
                                   Load load) {
  __syncthreads();  // earlier readers of the shared results are done
  if (threadIdx.x == 0) {
    s.carry = 0;
    s.found = 0;
  }
  __syncthreads();
  for (long long base = 0; base < total; base += kScanStep) {
    unsigned long long counts[kScanItems];
    unsigned long long incl[kScanItems];
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const long long e = base + threadIdx.x * kScanItems + i;
      counts[i] = e < total ? load(e) : 0ull;
    }
    unsigned long long aggregate;
    BlockScan(s.scan).InclusiveSum(counts, incl, aggregate);
    const unsigned long long carry = s.carry;
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const unsigned long long hi = carry + incl[i];
      const unsigned long long lo = hi - counts[i];
      if (counts[i] != 0 && lo < rank && rank <= hi) {
        s.hit = RankHit{base + threadIdx.x * kScanItems + i, lo, counts[i]};
        s.found = 1;
      }
    }
    __syncthreads();
    const int found = s.found;
    if (threadIdx.x == 0) s.carry = carry + aggregate;
    __syncthreads();
    if (found) return s.hit;
  }
  return RankHit{-1, s.carry, 0};
}

constexpr unsigned int kFullWarp = 0xFFFFFFFFu;
constexpr unsigned int kNoBin = 0xFFFFFFFFu;

// The keys one pass counts (those whose bits above the digit equal the prefix chosen so
// far) and the bin of each: the digit's value.
struct DigitFilter {
  uint64_t want_high;
  int high;  // <= 63: the key's width
  int shift;
  unsigned int digit_mask;

  __device__ __forceinline__ DigitFilter(uint64_t prefix, DigitPass d)
      : want_high(prefix >> (d.shift + d.bits)),
        high(d.shift + d.bits),
        shift(d.shift),
        digit_mask((1u << d.bits) - 1u) {}

  template <typename scalar_t>
  __device__ __forceinline__ unsigned int bin_of(scalar_t v) const {
    const uint64_t key = static_cast<uint64_t>(magnitude_key(v));
    return (key >> high) == want_high ? static_cast<unsigned int>(key >> shift) & digit_mask
                                      : kNoBin;
  }
};

// Counts one bin per lane (kNoBin: none) into a shared-memory histogram. The lanes holding
// one bin add their number with a single atomic from their lowest lane, so a warp never
// issues same-address atomics: an all-zero tile costs one atomic per warp and step, not 32.
// Every lane of the warp must call it together.
__device__ __forceinline__ void warp_count(unsigned int* hist, unsigned int bin) {
  if (!__any_sync(kFullWarp, bin != kNoBin)) return;
  const unsigned int peers = __match_any_sync(kFullWarp, bin);
  const unsigned int lane = threadIdx.x % 32u;
  if (bin != kNoBin && lane == static_cast<unsigned int>(__ffs(peers) - 1)) {
    atomicAdd(&hist[bin], static_cast<unsigned int>(__popc(peers)));
  }
}

// Adds the digits of x[begin, end) (at most one tile) to the shared histogram. Whole block;
// the loops have the same trip count in every lane of a warp, as warp_count needs.
template <typename scalar_t>
__device__ __forceinline__ void histogram_tile(unsigned int* hist, const scalar_t* x, int64_t begin,
                                               int64_t end, const DigitFilter& filter) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool aligned = (reinterpret_cast<uintptr_t>(x + begin) % 16) == 0;
  if (aligned && end - begin == kSelectTile) {
    constexpr int kSteps = static_cast<int>(kSelectTile / (kSelectThreads * kVec));
    constexpr int kUnroll = kSteps < 4 ? kSteps : 4;
    static_assert(kSteps % kUnroll == 0, "unroll divides the steps");
    for (int step = 0; step < kSteps; step += kUnroll) {
      scalar_t v[kUnroll][kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i =
            begin + (static_cast<int64_t>(step + u) * kSelectThreads + threadIdx.x) * kVec;
        load_vector<scalar_t, kVec>(x + i, v[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) warp_count(hist, filter.bin_of(v[u][e]));
      }
    }
  } else {
    for (int64_t base = begin; base < end; base += kSelectThreads) {
      const int64_t i = base + threadIdx.x;
      warp_count(hist, i < end ? filter.bin_of(x[i]) : kNoBin);
    }
  }
}

// How many keys of x[begin, end) (at most one tile) equal `key`, and the flat index of the
// want-th of them (1-based, in flat order), or -1 when there are fewer. Whole block; each
// thread owns kTileItems consecutive elements. Uniform across the block.
struct EqualKeySearch {
  int64_t index;
  unsigned long long count;
};

template <typename scalar_t>
__device__ EqualKeySearch find_equal_key(SharedStorage& s, const scalar_t* x, int64_t begin,
                                         int64_t end, uint64_t key, unsigned long long want) {
  const int64_t mine = begin + static_cast<int64_t>(threadIdx.x) * kTileItems;
  unsigned long long equal = 0;
  for (int i = 0; i < kTileItems; ++i) {
    const int64_t idx = mine + i;
    if (idx < end && static_cast<uint64_t>(magnitude_key(x[idx])) == key) ++equal;
  }
  __syncthreads();  // earlier users of the scan storage and of s.hit are done
  unsigned long long before, total;
  BlockScan(s.scan).ExclusiveSum(equal, before, total);
  if (before < want && want <= before + equal) {
    unsigned long long seen = before;
    for (int i = 0; i < kTileItems; ++i) {
      const int64_t idx = mine + i;
      if (idx < end && static_cast<uint64_t>(magnitude_key(x[idx])) == key && ++seen == want) {
        s.hit.entry = idx;
        break;
      }
    }
  }
  __syncthreads();
  // want >= 1, so some thread's range holds it exactly when want <= total.
  return EqualKeySearch{want <= total ? static_cast<int64_t>(s.hit.entry) : -1, total};
}

// The whole selection of a small job, in one block: every digit pass over the whole tensor,
// then the tie cut by a scan in flat order.
template <typename scalar_t>
__device__ void select_in_one_block(SharedStorage& s, const SelectPlan& plan,
                                    const ThresholdJob& job, MagnitudeThreshold* threshold) {
  const scalar_t* x = static_cast<const scalar_t*>(job.data);
  const int64_t n = job.numel;
  uint64_t prefix = 0;
  int64_t rank = job.k;  // of the wanted key among the keys matching the prefix
  int64_t count_in_digit = 0;
  for (int pass = 0; pass < plan.num_passes; ++pass) {
    const DigitPass d = plan.passes[pass];
    const int bins = 1 << d.bits;
    for (int b = threadIdx.x; b < bins; b += kSelectThreads) s.hist[b] = 0;
    __syncthreads();
    const DigitFilter filter(prefix, d);
    for (int64_t begin = 0; begin < n; begin += kSelectTile) {
      histogram_tile<scalar_t>(s.hist, x, begin, begin + kSelectTile < n ? begin + kSelectTile : n,
                               filter);
    }
    __syncthreads();
    const RankHit hit = block_find_rank(
        s, bins, static_cast<unsigned long long>(rank),
        [&](long long e) { return static_cast<unsigned long long>(s.hist[bins - 1 - e]); });
    const int64_t digit = hit.entry < 0 ? 0 : bins - 1 - hit.entry;
    rank -= static_cast<int64_t>(hit.before);
    count_in_digit = static_cast<int64_t>(hit.count);
    prefix |= static_cast<uint64_t>(digit) << d.shift;
  }
  // `prefix` is the k-th largest key. If every key equal to it is kept the cut is past the
  // end; otherwise it is one past the rank-th equal key in flat order.
  int64_t cut = n;
  if (rank < count_in_digit) {
    unsigned long long want = static_cast<unsigned long long>(rank);
    for (int64_t begin = 0; begin < n; begin += kSelectTile) {
      const EqualKeySearch found = find_equal_key<scalar_t>(
          s, x, begin, begin + kSelectTile < n ? begin + kSelectTile : n, prefix, want);
      if (found.index >= 0) {
        cut = found.index + 1;
        break;
      }
      want -= found.count;
    }
  }
  if (threadIdx.x == 0) *threshold = MagnitudeThreshold{prefix, cut};
}

// One pass of a job spread over one block per tile: this block's tile is `tile`.
template <typename scalar_t>
__device__ void select_split_pass(SharedStorage& s, const SelectParams& p, const ThresholdJob& job,
                                  int j, int64_t tile) {
  const int64_t n = job.numel;
  const scalar_t* x = static_cast<const scalar_t*>(job.data);
  SelectState* state = &p.states[job.slot];
  uint64_t prefix = 0;
  int64_t rank = job.k;
  if (p.pass > 0) {
    // Written by the previous pass's last block; every job runs every pass.
    const SelectState st = *state;
    prefix = st.prefix;
    rank = st.rank;
  }
  const DigitPass d = p.plan.passes[p.pass];
  const int bins = 1 << d.bits;
  const bool final_pass = p.pass + 1 == p.plan.num_passes;
  for (int b = threadIdx.x; b < bins; b += kSelectThreads) s.hist[b] = 0;
  __syncthreads();

  // Histogram of this tile.
  const int64_t begin = tile * kSelectTile;
  const int64_t end = begin + kSelectTile < n ? begin + kSelectTile : n;
  histogram_tile<scalar_t>(s.hist, x, begin, end, DigitFilter(prefix, d));
  __syncthreads();

  // Publish: job histogram (atomics), and in the final pass this tile's own histogram.
  unsigned long long* job_hist = p.hist + static_cast<int64_t>(job.slot) * p.plan.hist_bins;
  const int64_t block = job.block_begin + tile;
  for (int b = threadIdx.x; b < bins; b += kSelectThreads) {
    const unsigned int c = s.hist[b];
    if (c != 0) atomicAdd(&job_hist[b], static_cast<unsigned long long>(c));
    if (final_pass) p.tile_counts[block * p.plan.last_bins + b] = c;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int ticket = atomicAdd(&state->done, 1u);
    s.last = ticket + 1 == static_cast<unsigned int>(select_tiles(n));
  }
  __syncthreads();
  if (!s.last) return;
  __threadfence();

  // Last block of the job: pick the digit holding the rank, scanning from the top digit.
  const RankHit digit_hit =
      block_find_rank(s, bins, static_cast<unsigned long long>(rank),
                      [&](long long e) { return __ldcg(&job_hist[bins - 1 - e]); });
  const int64_t digit = digit_hit.entry < 0 ? 0 : bins - 1 - digit_hit.entry;
  const int64_t rank_in_digit = rank - static_cast<int64_t>(digit_hit.before);
  const int64_t count_in_digit = static_cast<int64_t>(digit_hit.count);
  // Leave the job histogram zeroed for the next pass.
  for (int b = threadIdx.x; b < bins; b += kSelectThreads) job_hist[b] = 0;
  const uint64_t chosen = prefix | (static_cast<uint64_t>(digit) << d.shift);

  if (!final_pass) {
    if (threadIdx.x == 0) *state = SelectState{chosen, rank_in_digit, 0u};
    return;
  }

  // Final pass: `chosen` is the k-th largest key. If every key equal to it is kept, the cut
  // is past the end; otherwise it is one past the rank_in_digit-th equal key in flat order.
  int64_t cut = n;
  if (rank_in_digit < count_in_digit) {
    const RankHit tile_hit = block_find_rank(
        s, select_tiles(n), static_cast<unsigned long long>(rank_in_digit), [&](long long t) {
          return static_cast<unsigned long long>(
              __ldcg(&p.tile_counts[(job.block_begin + t) * p.plan.last_bins + digit]));
        });
    // (The tile counts add up to count_in_digit, so the rank is always found.)
    const int64_t t_begin = (tile_hit.entry < 0 ? 0 : tile_hit.entry) * kSelectTile;
    const int64_t t_end = t_begin + kSelectTile < n ? t_begin + kSelectTile : n;
    const EqualKeySearch found =
        find_equal_key<scalar_t>(s, x, t_begin, t_end, chosen,
                                 static_cast<unsigned long long>(rank_in_digit) - tile_hit.before);
    cut = found.index + 1;
  }
  if (threadIdx.x == 0) p.thresholds[j] = MagnitudeThreshold{chosen, cut};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kSelectThreads, 2)
    select_pass_kernel(const __grid_constant__ SelectParams p) {
  __shared__ SharedStorage s;

  const ThresholdJob* jobs = p.jobs_device != nullptr
                                 ? p.jobs_device
                                 : reinterpret_cast<const ThresholdJob*>(p.jobs_inline);
  const int64_t block = blockIdx.x;
  const int j = find_segment(jobs, p.num_jobs, block, [](const ThresholdJob& job) {
    return static_cast<int64_t>(job.block_begin);
  });
  const ThresholdJob job = jobs[j];
  if (p.pass == 0 && (job.k <= 0 || job.k >= job.numel)) {
    // Keeping nothing or everything needs no pass; such a job has one block.
    if (threadIdx.x == 0) {
      p.thresholds[j] =
          job.k <= 0 ? keep_nothing_threshold() : keep_everything_threshold(job.numel);
    }
    return;
  }
  if (job.slot < 0) {
    if (p.pass == 0) select_in_one_block<scalar_t>(s, p.plan, job, &p.thresholds[j]);
    return;
  }
  select_split_pass<scalar_t>(s, p, job, j, block - job.block_begin);
}

size_t align_up(size_t v) {
  return (v + 255) / 256 * 256;
}

// Scratch of the jobs spread over several blocks: their histograms and states (zeroed before
// the first pass) and every block's last-digit histogram (written in the final pass).
struct WorkspaceLayout {
  size_t hist = 0, states = 0, tile_counts = 0, zeroed = 0, total = 0;
};

WorkspaceLayout layout_of(ElementType dtype, int64_t num_split_jobs, int64_t num_blocks) {
  WorkspaceLayout l;
  if (num_split_jobs == 0) return l;
  const SelectPlan plan = make_select_plan(key_bits_of(dtype));
  const size_t jobs = static_cast<size_t>(num_split_jobs);
  l.states = align_up(jobs * plan.hist_bins * sizeof(unsigned long long));
  l.zeroed = l.states + align_up(jobs * sizeof(SelectState));
  l.tile_counts = l.zeroed;
  l.total =
      l.tile_counts + align_up(static_cast<size_t>(num_blocks) * plan.last_bins * sizeof(uint32_t));
  return l;
}

}  // namespace

size_t select_workspace_bytes(ElementType dtype, int64_t num_split_jobs, int64_t num_blocks) {
  return layout_of(dtype, num_split_jobs, num_blocks).total;
}

void launch_select(const SelectLaunch& launch, cudaStream_t stream) {
  if (launch.num_jobs == 0) return;
  const SelectPlan plan = make_select_plan(key_bits_of(launch.dtype));
  const WorkspaceLayout l = layout_of(launch.dtype, launch.num_split_jobs, launch.num_blocks);
  unsigned char* ws = static_cast<unsigned char*>(launch.workspace);
  if (l.zeroed != 0) C10_CUDA_CHECK(cudaMemsetAsync(ws, 0, l.zeroed, stream));

  SelectParams params;
  params.jobs_device = launch.jobs_device;
  params.num_jobs = launch.num_jobs;
  params.pass = 0;
  params.plan = plan;
  params.hist = l.total != 0 ? reinterpret_cast<unsigned long long*>(ws + l.hist) : nullptr;
  params.states = l.total != 0 ? reinterpret_cast<SelectState*>(ws + l.states) : nullptr;
  params.tile_counts = l.total != 0 ? reinterpret_cast<uint32_t*>(ws + l.tile_counts) : nullptr;
  params.thresholds = launch.thresholds;
  memcpy(params.jobs_inline, launch.jobs_inline, sizeof(params.jobs_inline));
  // Jobs selected in one block are done after the first launch.
  const int passes = launch.num_split_jobs > 0 ? plan.num_passes : 1;
  const unsigned int blocks = static_cast<unsigned int>(launch.num_blocks);
  LM_DISPATCH_DTYPE(launch.dtype, scalar_t, [&] {
    for (int pass = 0; pass < passes; ++pass) {
      params.pass = pass;
      select_pass_kernel<scalar_t><<<blocks, kSelectThreads, 0, stream>>>(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace cuda
}  // namespace lorax_merge
