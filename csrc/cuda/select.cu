// Exact magnitude thresholds on the GPU: radix select over magnitude keys, segmented over
// every task tensor of a batch.
//
// Each pass histograms one digit of the keys that match the prefix chosen so far. Every
// (job, tile) pair is one block: it builds the tile's histogram in shared memory and adds
// it to the job's histogram in global memory. The last block of a job to finish (a ticket
// counter) picks the digit that holds the wanted rank with a block-wide scan and writes
// the job's new prefix and rank for the next pass. In the final pass every block also
// keeps its tile's histogram, so the last block knows how many keys equal to the threshold
// each tile holds: a scan over those counts finds the tile holding the rank-th equal key,
// and a scan inside that tile finds its index, which gives the tie cut (the lower flat
// index wins) without a sort and without another pass over the data. Thresholds stay on
// the device; nothing is read back by the host.
#include <cub/block/block_scan.cuh>

#include <c10/cuda/CUDAException.h>

#include "device_utils.cuh"

namespace lorax_merge {
namespace cuda {
namespace {

struct SelectParams {
  const SelectJob* jobs_device;
  int32_t num_jobs;
  int32_t pass;
  int32_t shift;
  int32_t bits;
  int32_t final_pass;
  int32_t hist_stride;
  int32_t last_bins;
  unsigned long long* hist;  // [num_jobs, hist_stride]
  SelectState* states;       // [num_jobs]
  uint32_t* tile_counts;     // [num_tiles, last_bins], written in the final pass
  MagnitudeThreshold* thresholds;
  alignas(16) unsigned char jobs_inline[kInlineTableBytes];
};

constexpr int kScanItems = 2;  // counts per thread and step of a block-wide rank search
constexpr int kScanStep = kScanItems * kSelectThreads;
constexpr int kTileItems = static_cast<int>(kSelectTile / kSelectThreads);  // 64
static_assert(kTileItems * kSelectThreads == kSelectTile, "tile is a whole number of items");

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

template <typename scalar_t>
__global__ void __launch_bounds__(kSelectThreads, 2)
    select_pass_kernel(const __grid_constant__ SelectParams p) {
  __shared__ SharedStorage s;

  const SelectJob* jobs =
      p.jobs_device != nullptr ? p.jobs_device : reinterpret_cast<const SelectJob*>(p.jobs_inline);
  const int64_t block = blockIdx.x;
  const int j = find_segment(jobs, p.num_jobs, block, [](const SelectJob& job) { return job.tile_begin; });
  const SelectJob job = jobs[j];
  const int64_t tile = block - job.tile_begin;
  const int64_t n = job.numel;
  const scalar_t* x = static_cast<const scalar_t*>(job.data);

  uint64_t prefix = 0;
  int64_t rank = job.k;
  if (p.pass == 0) {
    if (job.k <= 0 || job.k >= n) {
      if (tile == 0 && threadIdx.x == 0) {
        p.thresholds[j] = job.k <= 0 ? keep_nothing_threshold() : keep_everything_threshold(n);
      }
      return;
    }
  } else {
    const SelectState st = p.states[j];
    if (!st.active) return;
    prefix = st.prefix;
    rank = st.rank;
  }

  const int bins = 1 << p.bits;
  const int shift = p.shift;
  const int high = p.shift + p.bits;  // bits at and above `high` must equal the prefix's
  const uint64_t want_high = prefix >> high;
  for (int b = threadIdx.x; b < bins; b += kSelectThreads) s.hist[b] = 0;
  __syncthreads();

  // Histogram of this tile.
  const int64_t begin = tile * kSelectTile;
  const int64_t end = begin + kSelectTile < n ? begin + kSelectTile : n;
  auto count_key = [&](scalar_t v) {
    const uint64_t key = static_cast<uint64_t>(magnitude_key(v));
    if ((key >> high) == want_high) {
      atomicAdd(&s.hist[static_cast<int>((key >> shift) & static_cast<uint64_t>(bins - 1))], 1u);
    }
  };
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool aligned = (reinterpret_cast<uintptr_t>(x) % 16) == 0;
  if (aligned && end - begin == kSelectTile) {
    constexpr int kSteps = static_cast<int>(kSelectTile / (kSelectThreads * kVec));
    constexpr int kUnroll = kSteps < 4 ? kSteps : 4;
    static_assert(kSteps % kUnroll == 0, "unroll divides the steps");
    for (int step = 0; step < kSteps; step += kUnroll) {
      scalar_t v[kUnroll][kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = begin + (static_cast<int64_t>(step + u) * kSelectThreads + threadIdx.x) * kVec;
        load_vector<scalar_t, kVec>(x + i, v[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) count_key(v[u][e]);
      }
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kSelectThreads) count_key(x[i]);
  }
  __syncthreads();

  // Publish: job histogram (atomics), and in the final pass this tile's own histogram.
  unsigned long long* job_hist = p.hist + static_cast<int64_t>(j) * p.hist_stride;
  for (int b = threadIdx.x; b < bins; b += kSelectThreads) {
    const unsigned int c = s.hist[b];
    if (c != 0) atomicAdd(&job_hist[b], static_cast<unsigned long long>(c));
    if (p.final_pass) p.tile_counts[block * p.last_bins + b] = c;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int ticket = atomicAdd(&p.states[j].done, 1u);
    s.last = ticket + 1 == static_cast<unsigned int>(select_tiles(n));
  }
  __syncthreads();
  if (!s.last) return;
  __threadfence();

  // Last block of the job: pick the digit holding the rank, scanning from the top digit.
  const RankHit digit_hit = block_find_rank(
      s, bins, static_cast<unsigned long long>(rank),
      [&](long long e) { return __ldcg(&job_hist[bins - 1 - e]); });
  const int64_t digit = digit_hit.entry < 0 ? 0 : bins - 1 - digit_hit.entry;
  const int64_t rank_in_digit = rank - static_cast<int64_t>(digit_hit.before);
  const int64_t count_in_digit = static_cast<int64_t>(digit_hit.count);
  // Leave the job histogram zeroed for the next pass.
  for (int b = threadIdx.x; b < bins; b += kSelectThreads) job_hist[b] = 0;
  const uint64_t chosen = prefix | (static_cast<uint64_t>(digit) << shift);

  if (!p.final_pass) {
    if (threadIdx.x == 0) {
      SelectState st;
      st.prefix = chosen;
      st.rank = rank_in_digit;
      st.done = 0;
      st.active = 1;
      p.states[j] = st;
    }
    return;
  }

  // Final pass: `chosen` is the k-th largest key. If every key equal to it is kept, the cut
  // is past the end; otherwise it is one past the rank_in_digit-th equal key in flat order.
  int64_t cut = n;
  if (rank_in_digit < count_in_digit) {
    __syncthreads();  // the scan storage is free again
    const RankHit tile_hit = block_find_rank(
        s, select_tiles(n), static_cast<unsigned long long>(rank_in_digit), [&](long long t) {
          return static_cast<unsigned long long>(
              __ldcg(&p.tile_counts[(job.tile_begin + t) * p.last_bins + digit]));
        });
    // (The tile counts add up to count_in_digit, so the rank is always found.)
    const int64_t t_begin = (tile_hit.entry < 0 ? 0 : tile_hit.entry) * kSelectTile;
    const int64_t t_end = t_begin + kSelectTile < n ? t_begin + kSelectTile : n;
    const unsigned long long want = static_cast<unsigned long long>(rank_in_digit) - tile_hit.before;
    // Each thread owns kTileItems consecutive elements of the tile.
    const int64_t mine = t_begin + static_cast<int64_t>(threadIdx.x) * kTileItems;
    unsigned long long equal = 0;
    for (int i = 0; i < kTileItems; ++i) {
      const int64_t idx = mine + i;
      if (idx < t_end && static_cast<uint64_t>(magnitude_key(x[idx])) == chosen) ++equal;
    }
    unsigned long long before;
    BlockScan(s.scan).ExclusiveSum(equal, before);
    if (before < want && want <= before + equal) {
      unsigned long long seen = before;
      for (int i = 0; i < kTileItems; ++i) {
        const int64_t idx = mine + i;
        if (idx < t_end && static_cast<uint64_t>(magnitude_key(x[idx])) == chosen && ++seen == want) {
          s.hit.entry = idx;
          break;
        }
      }
    }
    __syncthreads();
    cut = s.hit.entry + 1;
  }
  if (threadIdx.x == 0) p.thresholds[j] = MagnitudeThreshold{chosen, cut};
}

template <typename scalar_t>
void run_passes(const SelectLaunch& launch, SelectParams& params, const SelectPlan& plan,
                cudaStream_t stream) {
  for (int pass = 0; pass < plan.num_passes; ++pass) {
    params.pass = pass;
    params.shift = plan.passes[pass].shift;
    params.bits = plan.passes[pass].bits;
    params.final_pass = pass + 1 == plan.num_passes;
    select_pass_kernel<scalar_t><<<static_cast<unsigned int>(launch.num_tiles), kSelectThreads, 0, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

size_t align_up(size_t v) { return (v + 255) / 256 * 256; }

struct WorkspaceLayout {
  size_t hist, states, tile_counts, total, zeroed;
};

WorkspaceLayout layout_of(Dtype dtype, int64_t num_jobs, int64_t num_tiles) {
  const SelectPlan plan = make_select_plan(key_bits_of(dtype));
  WorkspaceLayout l;
  l.hist = 0;
  l.states = align_up(static_cast<size_t>(num_jobs) * plan.hist_bins * sizeof(unsigned long long));
  l.zeroed = l.states + align_up(static_cast<size_t>(num_jobs) * sizeof(SelectState));
  l.tile_counts = l.zeroed;
  l.total = l.tile_counts + align_up(static_cast<size_t>(num_tiles) * plan.last_bins * sizeof(uint32_t));
  return l;
}

}  // namespace

size_t select_workspace_bytes(Dtype dtype, int64_t num_jobs, int64_t num_tiles) {
  return layout_of(dtype, num_jobs, num_tiles).total;
}

void launch_select(const SelectLaunch& launch, cudaStream_t stream) {
  if (launch.num_jobs == 0) return;
  const SelectPlan plan = make_select_plan(key_bits_of(launch.dtype));
  const WorkspaceLayout l = layout_of(launch.dtype, launch.num_jobs, launch.num_tiles);
  unsigned char* ws = static_cast<unsigned char*>(launch.workspace);
  C10_CUDA_CHECK(cudaMemsetAsync(ws, 0, l.zeroed, stream));

  SelectParams params;
  params.jobs_device = launch.jobs_device;
  params.num_jobs = launch.num_jobs;
  params.hist_stride = plan.hist_bins;
  params.last_bins = plan.last_bins;
  params.hist = reinterpret_cast<unsigned long long*>(ws + l.hist);
  params.states = reinterpret_cast<SelectState*>(ws + l.states);
  params.tile_counts = reinterpret_cast<uint32_t*>(ws + l.tile_counts);
  params.thresholds = launch.thresholds;
  memcpy(params.jobs_inline, launch.jobs_inline, sizeof(params.jobs_inline));
  switch (launch.dtype) {
    case Dtype::kFloat:
      run_passes<float>(launch, params, plan, stream);
      break;
    case Dtype::kHalf:
      run_passes<c10::Half>(launch, params, plan, stream);
      break;
    case Dtype::kBFloat16:
      run_passes<c10::BFloat16>(launch, params, plan, stream);
      break;
    case Dtype::kDouble:
      run_passes<double>(launch, params, plan, stream);
      break;
  }
}

}  // namespace cuda
}  // namespace lorax_merge
