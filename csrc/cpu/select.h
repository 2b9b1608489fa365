// Exact top-k threshold of |x| on the CPU, by radix selection over magnitude keys.
//
// Pass 1 histograms the top digit of every key (all 15 bits for 16-bit types, 11 bits
// otherwise), per chunk, and finds the digit holding the k-th largest key. If that
// bucket is small, pass 2 copies its elements (key, flat index) in index order into
// slots known from the per-chunk counts, and the remaining digits are resolved on that
// copy alone; the equal keys left at the end are in index order, so the tie rule (lower
// index first) is a lookup. If the bucket is large (heavy ties), the remaining digits
// are resolved by further passes over the data, and the tie cut from the last pass's
// per-chunk counts plus a scan of the one chunk where the cut falls. No sort, and no
// allocation the size of the input beyond the bounded bucket copy.
//
// This is the host side of the selection: it chooses chunks, threads and digits, and
// resolves candidates; the passes over the data are the capability level's kernels
// (kernel_api.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>

#include "../common/keys.h"
#include "kernel_api.h"

namespace lorax_merge {
namespace cpu {

constexpr int64_t kSelectChunk = 1 << 16;

template <typename scalar_t>
constexpr ElementType element_type_of() {
  if constexpr (std::is_same_v<scalar_t, double>) return ElementType::kDouble;
  if constexpr (std::is_same_v<scalar_t, c10::Half>) return ElementType::kHalf;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return ElementType::kBFloat16;
  return ElementType::kFloat;
}

// [0, n) in chunks; each chunk is histogrammed privately (deterministic, no atomics).
// Chunks hold fewer than 2^31 elements: the bracket scan stores 32-bit offsets.
struct Chunking {
  int64_t size;
  int64_t count;

  Chunking(int64_t n, bool parallel) {
    constexpr int64_t kMaxChunk = int64_t(1) << 31;
    const int64_t threads = parallel ? std::max<int64_t>(1, at::get_num_threads()) : 1;
    const int64_t chunks = std::max<int64_t>(
        {1, std::min<int64_t>(4 * threads, n / kSelectChunk), (n + kMaxChunk - 1) / kMaxChunk});
    size = std::max<int64_t>(1, (n + chunks - 1) / chunks);
    count = (n + size - 1) / size;
  }
  int64_t begin(int64_t chunk) const { return chunk * size; }
  int64_t end(int64_t chunk, int64_t n) const { return std::min(n, (chunk + 1) * size); }

  template <typename Fn>
  void for_each(int64_t n, const Fn& fn) const {
    at::parallel_for(0, count, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) fn(c, begin(c), end(c, n));
    });
  }
};

struct DigitHistogram {
  int64_t bins = 0;
  std::vector<uint32_t> per_chunk;  // [chunk][bin]
  std::vector<int64_t> total;       // [bin]

  uint32_t chunk_count(int64_t chunk, int64_t bin) const { return per_chunk[chunk * bins + bin]; }
};

// Histogram of digit (key >> shift) & (bins - 1) over the keys matching `prefix` under
// `prefix_mask`, per chunk.
template <typename scalar_t>
DigitHistogram digit_histogram(const LevelKernels& kernels, const scalar_t* x, int64_t n,
                               const Chunking& chunks, int shift, int bits, uint64_t prefix,
                               uint64_t prefix_mask) {
  DigitHistogram h;
  h.bins = int64_t(1) << bits;
  h.per_chunk.assign(static_cast<size_t>(chunks.count * h.bins), 0);
  chunks.for_each(n, [&](int64_t chunk, int64_t begin, int64_t end) {
    kernels.digit_histogram(element_type_of<scalar_t>(), x, begin, end, shift, bits, prefix,
                            prefix_mask, h.per_chunk.data() + chunk * h.bins);
  });
  h.total.assign(static_cast<size_t>(h.bins), 0);
  for (int64_t c = 0; c < chunks.count; ++c) {
    for (int64_t b = 0; b < h.bins; ++b) h.total[b] += h.chunk_count(c, b);
  }
  return h;
}

// Index just past the `rank`-th (1-based) element whose key equals `key`, given how many
// such elements each chunk holds: only the chunk where the rank is reached is scanned.
template <typename scalar_t>
int64_t cut_after_equal_rank(const LevelKernels& kernels, const scalar_t* x, int64_t n,
                             const Chunking& chunks, const DigitHistogram& last, int64_t digit,
                             uint64_t key, int64_t rank) {
  int64_t seen = 0;
  for (int64_t c = 0; c < chunks.count; ++c) {
    const int64_t here = last.chunk_count(c, digit);
    if (seen + here >= rank) {
      const int64_t cut = kernels.find_equal_rank(element_type_of<scalar_t>(), x, chunks.begin(c),
                                                  chunks.end(c, n), key, rank - seen);
      if (cut >= 0) return cut;
    }
    seen += here;
  }
  return n;
}

// The bucket copy may hold at most this many entries (16 bytes each).
inline int64_t candidate_budget(int64_t n) {
  return std::max<int64_t>(n / 8, 16384);
}

// Threshold from the elements that can hold it, given in index order, when `rank`
// (1-based, from the top) is the threshold's rank among them and their keys agree on
// all bits at or above `shift`.
inline MagnitudeThreshold threshold_from_candidates(Candidate* first, Candidate* last, int64_t rank,
                                                    int shift, int64_t n, uint64_t base = 0) {
  // Digits of (key - base): with a bracket's lower end as the base, only the bits that
  // vary inside the bracket are resolved.
  constexpr int kDigitBits = 11;
  std::vector<int64_t> counts;
  while (shift > 0) {
    const int bits = std::min(kDigitBits, shift);
    shift -= bits;
    const int64_t bins = int64_t(1) << bits;
    counts.assign(static_cast<size_t>(bins), 0);
    for (const Candidate* c = first; c != last; ++c) {
      ++counts[((c->key - base) >> shift) & (bins - 1)];
    }
    const DigitPick pick = pick_digit_from_top(counts.data(), bins, rank);
    rank = pick.rank_in_digit;
    const uint64_t digit = static_cast<uint64_t>(pick.digit);
    // Keep only the chosen bucket; the order, and so index order, is preserved.
    last = std::remove_if(first, last, [&](const Candidate& c) {
      return (((c.key - base) >> shift) & (bins - 1)) != digit;
    });
  }
  // Every candidate left has the threshold key, in index order.
  const int64_t cut = rank == last - first ? n : first[rank - 1].index + 1;
  return MagnitudeThreshold{first->key, cut};
}

// Keys of the bracket's candidates as the scan stores them: 32 bits, 64 for double.
template <typename scalar_t>
using StoredKey =
    std::conditional_t<sizeof(typename KeyTraits<scalar_t>::key_t) <= 4, uint32_t, uint64_t>;

// Scratch space for the bracket's candidates (keys and offsets), kept per thread when small
// so that repeated small selections neither allocate nor fault in fresh pages.
template <typename stored_key_t>
class CandidateBuffer {
 public:
  explicit CandidateBuffer(int64_t size) {
    constexpr int64_t kKeepBelow = int64_t(1) << 17;
    if (size <= kKeepBelow) {
      thread_local std::vector<stored_key_t> kept_keys;
      thread_local std::vector<uint32_t> kept_offsets;
      if (static_cast<int64_t>(kept_keys.size()) < size) {
        kept_keys.resize(static_cast<size_t>(size));
        kept_offsets.resize(static_cast<size_t>(size));
      }
      keys_ = kept_keys.data();
      offsets_ = kept_offsets.data();
    } else {
      owned_keys_.reset(new stored_key_t[static_cast<size_t>(size)]);
      owned_offsets_.reset(new uint32_t[static_cast<size_t>(size)]);
      keys_ = owned_keys_.get();
      offsets_ = owned_offsets_.get();
    }
  }
  stored_key_t* keys() const { return keys_; }
  uint32_t* offsets() const { return offsets_; }

 private:
  std::unique_ptr<stored_key_t[]> owned_keys_;
  std::unique_ptr<uint32_t[]> owned_offsets_;
  stored_key_t* keys_ = nullptr;
  uint32_t* offsets_ = nullptr;
};

// Bounds on two keys of a sample, given by their ranks hi_rank <= lo_rank (1-based, from
// the top): *hi at or above the hi_rank-th largest key, *lo at or below the lo_rank-th.
// Two radix digits of 11 bits resolve them (a histogram, then one of the digit's keys),
// so the bounds are exact but for the last kBits - 22 bits, rounded outwards; cheaper than
// ordering the sample.
template <typename key_t, int kBits>
void sample_bounds(const std::vector<key_t>& sample, int64_t hi_rank, int64_t lo_rank,
                   key_t nan_key, key_t* lo, key_t* hi) {
  constexpr int kDigitBits = 11;
  constexpr int kShift1 = kBits - kDigitBits;
  constexpr int kShift2 = kShift1 > kDigitBits ? kShift1 - kDigitBits : 0;
  constexpr int64_t kBins = int64_t(1) << kDigitBits;
  constexpr int64_t kBins2 = int64_t(1) << (kShift1 - kShift2);
  const int64_t size = static_cast<int64_t>(sample.size());
  const bool has_hi = hi_rank >= 1, has_lo = lo_rank <= size;
  uint32_t counts[kBins] = {};
  key_t largest = 0;
  for (const key_t key : sample) {
    ++counts[key >> kShift1];
    largest = key > largest ? key : largest;
  }
  // The first digits of the two keys (the search starts at the largest key's digit, as the
  // bins above it are empty), then the second digits, in one more pass.
  const int64_t used_bins = static_cast<int64_t>(largest >> kShift1) + 1;
  const DigitPick first_hi = pick_digit_from_top(counts, used_bins, has_hi ? hi_rank : 1);
  const DigitPick first_lo = pick_digit_from_top(counts, used_bins, has_lo ? lo_rank : size);
  uint32_t second_hi[kBins2] = {}, second_lo[kBins2] = {};
  for (const key_t key : sample) {
    const int64_t digit = static_cast<int64_t>(key >> kShift1);
    if (digit != first_hi.digit && digit != first_lo.digit) continue;  // most keys
    const uint32_t next = static_cast<uint32_t>((key >> kShift2) & (kBins2 - 1));
    second_hi[next] += digit == first_hi.digit;
    second_lo[next] += digit == first_lo.digit;
  }
  // The lower edge of the second-digit bin that holds a key.
  auto bin_edge = [&](const DigitPick& first, const uint32_t* second) {
    const DigitPick pick = pick_digit_from_top(second, kBins2, first.rank_in_digit);
    return static_cast<key_t>((static_cast<uint64_t>(first.digit) << kShift1) |
                              (static_cast<uint64_t>(pick.digit) << kShift2));
  };
  *hi = has_hi ? static_cast<key_t>(bin_edge(first_hi, second_hi) | ((key_t(1) << kShift2) - 1))
               : nan_key;
  *lo = has_lo ? bin_edge(first_lo, second_lo) : key_t(0);
}

// One pass instead of several for the common case: the keys of a strided sample give
// a bracket [lo, hi] that holds the k-th largest key with high probability; one pass
// counts the keys above hi and copies those inside the bracket (in index order). If
// the counts show the k-th largest key is inside, it is resolved on the copy; if not
// (an unlucky sample, or a heavily tied bucket), the caller falls back to radix passes.
template <typename scalar_t>
bool select_in_sampled_bracket(const LevelKernels& kernels, const scalar_t* x, int64_t n, int64_t k,
                               const Chunking& chunks, MagnitudeThreshold* result) {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  using stored_key_t = StoredKey<scalar_t>;
  // A sample of one element in 32 or so, up to 65536 elements: the bracket narrows with
  // the square root of its size, which saves work in the copy and the resolution of the
  // candidates, until ordering the sample costs more than that. The stride is odd, so that
  // the sample visits every column of a matrix whose row length is a power of two (a LoRA
  // factor's rank columns, or a model's hidden-size columns, may differ in scale).
  const int64_t wanted = std::clamp<int64_t>(n / 32, 1024, 65536);
  if (n < 16 * wanted) return false;
  const int64_t step = (n / wanted) | 1;
  const int64_t samples = n / step;
  std::vector<key_t> sample(static_cast<size_t>(samples));
  for (int64_t j = 0; j < samples; ++j) sample[j] = magnitude_key(x[j * step]);
  // Rank of the threshold within the sample, and a margin of 3.5 standard deviations (a
  // sample outside it, one in two thousand, costs a fallback to radix passes).
  const double p = static_cast<double>(k) / static_cast<double>(n);
  const double center = p * static_cast<double>(samples);
  const double margin = 3.5 * std::sqrt(static_cast<double>(samples) * p * (1.0 - p)) + 4.0;
  const int64_t hi_rank = static_cast<int64_t>(std::floor(center - margin));  // 1-based from top
  const int64_t lo_rank = static_cast<int64_t>(std::ceil(center + margin));
  key_t lo, hi;
  sample_bounds<key_t, KeyTraits<scalar_t>::kBits>(sample, hi_rank, lo_rank,
                                                   KeyTraits<scalar_t>::kNaN, &lo, &hi);

  // Each chunk copies into its own slice of one buffer and gives up when it is full.
  const int64_t slice = candidate_budget(n) / chunks.count + 1;
  const int64_t stride = slice + kCandidateSlack;
  CandidateBuffer<stored_key_t> buffer(stride * chunks.count);
  std::vector<int64_t> above(static_cast<size_t>(chunks.count), 0);
  std::vector<int64_t> inside(static_cast<size_t>(chunks.count), -1);  // -1: slice overflowed
  chunks.for_each(n, [&, lo, hi](int64_t chunk, int64_t begin, int64_t end) {
    int64_t count_above = 0;
    inside[chunk] = kernels.scan_bracket(element_type_of<scalar_t>(), x, begin, end, lo, hi,
                                         buffer.keys() + chunk * stride,
                                         buffer.offsets() + chunk * stride, slice, &count_above);
    above[chunk] = count_above;
  });
  int64_t total_above = 0, total_in = 0;
  for (int64_t c = 0; c < chunks.count; ++c) {
    if (inside[c] < 0) return false;
    total_above += above[c];
    total_in += inside[c];
  }
  if (!(total_above < k && k <= total_above + total_in)) return false;

  // Resolve the top digit of (key - lo) over every candidate, then the few candidates in
  // that digit's bin (with their flat indices, in index order) digit by digit.
  int span_bits = 0;  // bits of hi - lo: the only ones that vary among the candidates
  while (span_bits < KeyTraits<scalar_t>::kBits && (uint64_t(hi - lo) >> span_bits) != 0) {
    ++span_bits;
  }
  constexpr int kDigitBits = 11;
  const int bits = std::min(kDigitBits, span_bits);
  const int shift = span_bits - bits;
  uint32_t counts[int64_t(1) << kDigitBits] = {};
  for (int64_t c = 0; c < chunks.count; ++c) {
    const stored_key_t* keys = buffer.keys() + c * stride;
    for (int64_t j = 0; j < inside[c]; ++j) ++counts[(keys[j] - lo) >> shift];
  }
  const DigitPick pick = pick_digit_from_top(counts, int64_t(1) << bits, k - total_above);
  std::vector<Candidate> chosen;
  chosen.reserve(static_cast<size_t>(pick.count_in_digit));
  for (int64_t c = 0; c < chunks.count; ++c) {
    const stored_key_t* keys = buffer.keys() + c * stride;
    const uint32_t* offsets = buffer.offsets() + c * stride;
    for (int64_t j = 0; j < inside[c]; ++j) {
      if (static_cast<int64_t>((keys[j] - lo) >> shift) == pick.digit) {
        chosen.push_back(Candidate{keys[j], chunks.begin(c) + offsets[j]});
      }
    }
  }
  *result = threshold_from_candidates(chosen.data(), chosen.data() + chosen.size(),
                                      pick.rank_in_digit, shift, n, lo);
  return true;
}

template <typename scalar_t>
MagnitudeThreshold select_magnitude_threshold(const LevelKernels& kernels, const scalar_t* x,
                                              int64_t n, int64_t k, bool parallel) {
  constexpr int kKeyBits = KeyTraits<scalar_t>::kBits;
  constexpr int kDigitBits = 11;
  if (k <= 0) return keep_nothing_threshold();
  if (k >= n) return keep_everything_threshold(n);

  const Chunking chunks(n, parallel);
  MagnitudeThreshold sampled;
  if (select_in_sampled_bracket(kernels, x, n, k, chunks, &sampled)) return sampled;
  const int first_bits = kKeyBits <= 16 ? kKeyBits : kDigitBits;
  int shift = kKeyBits - first_bits;
  DigitHistogram hist = digit_histogram(kernels, x, n, chunks, shift, first_bits, 0, 0);
  DigitPick pick = pick_digit_from_top(hist.total.data(), hist.bins, k);
  uint64_t prefix = static_cast<uint64_t>(pick.digit) << shift;
  uint64_t prefix_mask = ((uint64_t(1) << first_bits) - 1) << shift;
  int64_t rank = pick.rank_in_digit;

  if (shift > 0 && pick.count_in_digit <= candidate_budget(n)) {
    // Copy the bucket in index order: chunk c writes after the buckets of chunks < c.
    std::vector<int64_t> offsets(static_cast<size_t>(chunks.count + 1), 0);
    for (int64_t c = 0; c < chunks.count; ++c) {
      offsets[c + 1] = offsets[c] + hist.chunk_count(c, pick.digit);
    }
    std::vector<Candidate> cands(static_cast<size_t>(offsets.back()));
    chunks.for_each(n, [&](int64_t chunk, int64_t begin, int64_t end) {
      kernels.copy_matching(element_type_of<scalar_t>(), x, begin, end, prefix, prefix_mask,
                            cands.data() + offsets[chunk]);
    });
    return threshold_from_candidates(cands.data(), cands.data() + cands.size(), rank, shift, n);
  }

  while (shift > 0) {
    const int bits = std::min(kDigitBits, shift);
    shift -= bits;
    hist = digit_histogram(kernels, x, n, chunks, shift, bits, prefix, prefix_mask);
    pick = pick_digit_from_top(hist.total.data(), hist.bins, rank);
    rank = pick.rank_in_digit;
    prefix |= static_cast<uint64_t>(pick.digit) << shift;
    prefix_mask |= ((uint64_t(1) << bits) - 1) << shift;
  }
  const int64_t cut =
      rank == pick.count_in_digit
          ? n
          : cut_after_equal_rank(kernels, x, n, chunks, hist, pick.digit, prefix, rank);
  return MagnitudeThreshold{prefix, cut};
}

}  // namespace cpu
}  // namespace lorax_merge
