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
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include <ATen/Parallel.h>

#include "../common/keys.h"
#include "bracket_scan.h"

namespace lorax_merge {
namespace cpu {

constexpr int64_t kSelectChunk = 1 << 16;

// [0, n) in chunks; each chunk is histogrammed privately (deterministic, no atomics).
struct Chunking {
  int64_t size;
  int64_t count;

  Chunking(int64_t n, bool parallel) {
    const int64_t threads = parallel ? std::max<int64_t>(1, at::get_num_threads()) : 1;
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(4 * threads, n / kSelectChunk));
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
// `prefix_mask`. Small histograms use four interleaved lanes, so repeated buckets do not
// serialise on store-to-load forwarding.
template <typename scalar_t>
DigitHistogram digit_histogram(const scalar_t* x, int64_t n, const Chunking& chunks, int shift,
                               int bits, uint64_t prefix, uint64_t prefix_mask) {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  DigitHistogram h;
  h.bins = int64_t(1) << bits;
  const int64_t bins = h.bins;
  const int lanes = bins <= 2048 ? 4 : 1;
  h.per_chunk.assign(static_cast<size_t>(chunks.count * bins), 0);
  const key_t want = static_cast<key_t>(prefix);
  const key_t mask = static_cast<key_t>(prefix_mask);
  const key_t digit_mask = static_cast<key_t>(bins - 1);
  chunks.for_each(n, [&](int64_t chunk, int64_t begin, int64_t end) {
    std::vector<uint32_t> local(static_cast<size_t>(lanes * bins), 0);
    uint32_t* lane = local.data();
    int64_t i = begin;
    if (lanes == 4) {
      for (; i + 4 <= end; i += 4) {
        for (int l = 0; l < 4; ++l) {
          const key_t key = magnitude_key(x[i + l]);
          if ((key & mask) == want) ++lane[l * bins + ((key >> shift) & digit_mask)];
        }
      }
    }
    for (; i < end; ++i) {
      const key_t key = magnitude_key(x[i]);
      if ((key & mask) == want) ++lane[(key >> shift) & digit_mask];
    }
    uint32_t* dst = h.per_chunk.data() + chunk * bins;
    for (int l = 0; l < lanes; ++l) {
      for (int64_t b = 0; b < bins; ++b) dst[b] += lane[l * bins + b];
    }
  });
  h.total.assign(static_cast<size_t>(bins), 0);
  for (int64_t c = 0; c < chunks.count; ++c) {
    for (int64_t b = 0; b < bins; ++b) h.total[b] += h.chunk_count(c, b);
  }
  return h;
}

// Index just past the `rank`-th (1-based) element whose key equals `key`, given how many
// such elements each chunk holds: only the chunk where the rank is reached is scanned.
template <typename scalar_t>
int64_t cut_after_equal_rank(const scalar_t* x, int64_t n, const Chunking& chunks,
                             const DigitHistogram& last, int64_t digit, uint64_t key,
                             int64_t rank) {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  int64_t seen = 0;
  for (int64_t c = 0; c < chunks.count; ++c) {
    const int64_t here = last.chunk_count(c, digit);
    if (seen + here >= rank) {
      const key_t want = static_cast<key_t>(key);
      for (int64_t i = chunks.begin(c); i < chunks.end(c, n); ++i) {
        if (magnitude_key(x[i]) == want && ++seen == rank) return i + 1;
      }
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

// Scratch space for candidates, kept per thread when small so that repeated small
// selections do not map and fault in fresh pages on every call.
class CandidateBuffer {
 public:
  explicit CandidateBuffer(int64_t size) {
    constexpr int64_t kKeepBelow = int64_t(1) << 16;  // 1 MiB
    if (size <= kKeepBelow) {
      thread_local std::vector<Candidate> kept;
      if (static_cast<int64_t>(kept.size()) < size) kept.resize(static_cast<size_t>(size));
      data_ = kept.data();
    } else {
      owned_.reset(new Candidate[static_cast<size_t>(size)]);
      data_ = owned_.get();
    }
  }
  Candidate* data() const { return data_; }

 private:
  std::unique_ptr<Candidate[]> owned_;
  Candidate* data_ = nullptr;
};

// One pass instead of several for the common case: the keys of a strided sample give
// a bracket [lo, hi] that holds the k-th largest key with high probability; one pass
// counts the keys above hi and copies those inside the bracket (in index order). If
// the counts show the k-th largest key is inside, it is resolved on the copy; if not
// (an unlucky sample, or a heavily tied bucket), the caller falls back to radix passes.
template <typename scalar_t>
bool select_in_sampled_bracket(const scalar_t* x, int64_t n, int64_t k, const Chunking& chunks,
                               MagnitudeThreshold* result) {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  const int64_t samples = std::clamp<int64_t>(n / 256, 1024, 65536);
  if (n < 16 * samples) return false;
  std::vector<key_t> sample(static_cast<size_t>(samples));
  for (int64_t j = 0; j < samples; ++j) sample[j] = magnitude_key(x[(j * n) / samples]);
  // Rank of the threshold within the sample, and a margin of ~4 standard deviations.
  const double p = static_cast<double>(k) / static_cast<double>(n);
  const double center = p * static_cast<double>(samples);
  const double margin = 4.0 * std::sqrt(static_cast<double>(samples) * p * (1.0 - p)) + 4.0;
  const int64_t hi_rank = static_cast<int64_t>(std::floor(center - margin));  // 1-based from top
  const int64_t lo_rank = static_cast<int64_t>(std::ceil(center + margin));
  auto key_of_rank = [&](int64_t rank) {
    std::nth_element(sample.begin(), sample.begin() + (rank - 1), sample.end(),
                     [](key_t a, key_t b) { return a > b; });
    return sample[rank - 1];
  };
  const key_t hi = hi_rank >= 1 ? key_of_rank(hi_rank) : KeyTraits<scalar_t>::kNaN;
  const key_t lo = lo_rank <= samples ? key_of_rank(lo_rank) : key_t(0);

  // Each chunk copies into its own slice of one buffer and gives up when it is full.
  const int64_t slice = candidate_budget(n) / chunks.count + 1;
  CandidateBuffer buffer(slice * chunks.count);
  std::vector<int64_t> above(static_cast<size_t>(chunks.count), 0);
  std::vector<int64_t> inside(static_cast<size_t>(chunks.count), -1);  // -1: slice overflowed
  chunks.for_each(n, [&, lo, hi](int64_t chunk, int64_t begin, int64_t end) {
    int64_t count_above = 0;
    inside[chunk] =
        scan_bracket(x, begin, end, lo, hi, buffer.data() + chunk * slice, slice, &count_above);
    above[chunk] = count_above;
  });
  int64_t total_above = 0, total_in = 0;
  for (int64_t c = 0; c < chunks.count; ++c) {
    if (inside[c] < 0) return false;
    total_above += above[c];
    total_in += inside[c];
  }
  if (!(total_above < k && k <= total_above + total_in)) return false;
  // Close the gaps between the slices; index order is kept.
  Candidate* end = buffer.data() + inside[0];
  for (int64_t c = 1; c < chunks.count; ++c) {
    end = std::copy(buffer.data() + c * slice, buffer.data() + c * slice + inside[c], end);
  }
  int span_bits = 0;  // bits of hi - lo: the only ones that vary among the candidates
  while (span_bits < KeyTraits<scalar_t>::kBits && (uint64_t(hi - lo) >> span_bits) != 0) {
    ++span_bits;
  }
  *result = threshold_from_candidates(buffer.data(), end, k - total_above, span_bits, n, lo);
  return true;
}

template <typename scalar_t>
MagnitudeThreshold select_magnitude_threshold(const scalar_t* x, int64_t n, int64_t k,
                                              bool parallel) {
  using key_t = typename KeyTraits<scalar_t>::key_t;
  constexpr int kKeyBits = KeyTraits<scalar_t>::kBits;
  constexpr int kDigitBits = 11;
  if (k <= 0) return keep_nothing_threshold();
  if (k >= n) return keep_everything_threshold(n);

  const Chunking chunks(n, parallel);
  MagnitudeThreshold sampled;
  if (select_in_sampled_bracket(x, n, k, chunks, &sampled)) return sampled;
  const int first_bits = kKeyBits <= 16 ? kKeyBits : kDigitBits;
  int shift = kKeyBits - first_bits;
  DigitHistogram hist = digit_histogram(x, n, chunks, shift, first_bits, 0, 0);
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
    const key_t want = static_cast<key_t>(prefix);
    const key_t mask = static_cast<key_t>(prefix_mask);
    chunks.for_each(n, [&](int64_t chunk, int64_t begin, int64_t end) {
      Candidate* out = cands.data() + offsets[chunk];
      for (int64_t i = begin; i < end; ++i) {
        const key_t key = magnitude_key(x[i]);
        if ((key & mask) == want) *out++ = Candidate{key, i};
      }
    });
    return threshold_from_candidates(cands.data(), cands.data() + cands.size(), rank, shift, n);
  }

  while (shift > 0) {
    const int bits = std::min(kDigitBits, shift);
    shift -= bits;
    hist = digit_histogram(x, n, chunks, shift, bits, prefix, prefix_mask);
    pick = pick_digit_from_top(hist.total.data(), hist.bins, rank);
    rank = pick.rank_in_digit;
    prefix |= static_cast<uint64_t>(pick.digit) << shift;
    prefix_mask |= ((uint64_t(1) << bits) - 1) << shift;
  }
  const int64_t cut = rank == pick.count_in_digit
                          ? n
                          : cut_after_equal_rank(x, n, chunks, hist, pick.digit, prefix, rank);
  return MagnitudeThreshold{prefix, cut};
}

}  // namespace cpu
}  // namespace lorax_merge
