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

// Bits needed to write v: 0 for 0, 64 for values from 2^63.
inline int bit_width(uint64_t v) {
  int bits = 0;
  while (bits < 64 && (v >> bits) != 0) ++bits;
  return bits;
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
  // A short list (the usual case): ordered by key, largest first, by insertion, which keeps
  // index order among equal keys. The equal keys around the rank-th are then in index order.
  constexpr int64_t kShortList = 32;
  if (last - first <= kShortList) {
    for (Candidate* c = first + 1; c < last; ++c) {
      const Candidate moving = *c;
      Candidate* to = c;
      for (; to > first && (to - 1)->key < moving.key; --to) *to = *(to - 1);
      *to = moving;
    }
    const Candidate& at = first[rank - 1];
    const bool last_equal = rank == last - first || first[rank].key != at.key;
    return MagnitudeThreshold{at.key, last_equal ? n : at.index + 1};
  }
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

// Scratch that a thread keeps between calls: repeated small selections then neither
// allocate nor fault in fresh pages. Contents are not initialised. Each use that is alive at
// the same time as another has its own tag.
enum ScratchTag { kCandidateKeys, kCandidateOffsets, kNarrowKeys, kNarrowOffsets };

template <typename T, ScratchTag Tag>
T* thread_scratch(int64_t size) {
  thread_local std::unique_ptr<T[]> kept;
  thread_local int64_t kept_size = 0;
  if (kept_size < size) {
    kept.reset(new T[static_cast<size_t>(size)]);
    kept_size = size;
  }
  return kept.get();
}

// Scratch space for a list of candidates (keys and offsets): a thread's kept scratch when
// small, else its own, freed with it (a thread keeps nothing the size of a large tensor).
template <typename stored_key_t, ScratchTag kKeysTag, ScratchTag kOffsetsTag>
class CandidateBuffer {
 public:
  CandidateBuffer() = default;
  explicit CandidateBuffer(int64_t size) { allocate(size); }

  void allocate(int64_t size) {
    constexpr int64_t kKeepBelow = int64_t(1) << 17;
    if (size <= kKeepBelow) {
      keys_ = thread_scratch<stored_key_t, kKeysTag>(size);
      offsets_ = thread_scratch<uint32_t, kOffsetsTag>(size);
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

// A sample of keys, with its least and greatest (gathered in the same loop, where the loads
// dominate).
template <typename key_t>
struct KeySample {
  std::vector<key_t> keys;
  key_t min = 0;
  key_t max = 0;

  template <typename KeyAt>
  KeySample(int64_t size, const KeyAt& key_at) : keys(static_cast<size_t>(size)) {
    key_t least = ~key_t(0), greatest = 0;
    for (int64_t j = 0; j < size; ++j) {
      const key_t key = key_at(j);
      keys[j] = key;
      least = key < least ? key : least;
      greatest = key > greatest ? key : greatest;
    }
    min = least;
    max = greatest;
  }
  int64_t size() const { return static_cast<int64_t>(keys.size()); }
};

// Bounds on two keys of a sample, given by their ranks hi_rank <= lo_rank (1-based, from
// the top): *hi at or above the hi_rank-th largest key, *lo at or below the lo_rank-th.
// A histogram of 2^11 bins spans the sample's range [min, max]; where the bin of a bound holds
// more than a few keys, a second digit of up to 9 bits over the keys of that bin narrows it.
// The bounds are rounded outwards to the edges of the bins; cheaper than ordering the sample.
template <typename key_t>
void sample_bounds(const KeySample<key_t>& sample, int64_t hi_rank, int64_t lo_rank, key_t nan_key,
                   key_t* lo, key_t* hi) {
  constexpr int kDigitBits = 11;
  constexpr int64_t kFewInBin = 8;  // a bin this full is narrow enough as it is
  const int span_bits = std::max(1, bit_width(static_cast<uint64_t>(sample.max - sample.min)));
  const int shift1 = std::max(0, span_bits - kDigitBits);
  const int bits2 = std::min(9, shift1);
  const int shift2 = shift1 - bits2;
  const int64_t size = sample.size();
  const bool has_hi = hi_rank >= 1, has_lo = lo_rank <= size;
  const key_t base = sample.min;
  auto offset = [&](key_t key) { return static_cast<uint64_t>(static_cast<key_t>(key - base)); };
  uint32_t counts[int64_t(1) << kDigitBits] = {};
  for (const key_t key : sample.keys) ++counts[offset(key) >> shift1];
  const int64_t bins = int64_t(1) << (span_bits - shift1);
  const DigitPick first_hi = pick_digit_from_top(counts, bins, has_hi ? hi_rank : 1);
  const DigitPick first_lo = pick_digit_from_top(counts, bins, has_lo ? lo_rank : size);
  // The lower edge of the bin of a bound, or of the second-digit bin inside it.
  auto edge = [&](const DigitPick& first) {
    uint64_t at = static_cast<uint64_t>(first.digit) << shift1;
    int below = shift1;
    if (first.count_in_digit > kFewInBin && bits2 > 0) {
      uint32_t second[int64_t(1) << 9] = {};
      for (const key_t key : sample.keys) {
        if (static_cast<int64_t>(offset(key) >> shift1) == first.digit) {  // few keys: predicted
          ++second[(offset(key) >> shift2) & ((uint64_t(1) << bits2) - 1)];
        }
      }
      const DigitPick pick = pick_digit_from_top(second, int64_t(1) << bits2, first.rank_in_digit);
      at |= static_cast<uint64_t>(pick.digit) << shift2;
      below = shift2;
    }
    return std::pair<key_t, key_t>{static_cast<key_t>(base + at),
                                   static_cast<key_t>(base + at + ((uint64_t(1) << below) - 1))};
  };
  *hi = has_hi ? edge(first_hi).second : nan_key;
  *lo = has_lo ? edge(first_lo).first : key_t(0);
}

// The candidates a bracket scan kept: per chunk, their keys and offsets from the chunk's first
// element, in index order (slice c starts at c * stride).
template <typename stored_key_t>
struct BracketCandidates {
  stored_key_t* keys;
  uint32_t* offsets;
  int64_t stride;
  std::vector<int64_t> count;  // per chunk

  int64_t total() const {
    int64_t sum = 0;
    for (const int64_t c : count) sum += c;
    return sum;
  }
};

// The element types whose bits the stored keys are: a scan over stored keys read as these
// elements gives the keys back (they are magnitude keys already, below 2^(bits - 1)).
template <typename stored_key_t>
constexpr ElementType stored_key_element_type() {
  return sizeof(stored_key_t) == 4 ? ElementType::kFloat : ElementType::kDouble;
}

// Threshold of the `rank`-th largest (1-based) of the candidates, whose keys lie in [lo, hi]:
// a histogram of the top digit of (key - lo) over the candidates, then the few in that digit's
// bin, with their flat indices, digit by digit.
template <typename stored_key_t>
MagnitudeThreshold resolve_candidates(const BracketCandidates<stored_key_t>& found,
                                      const Chunking& chunks, int64_t n, uint64_t lo, uint64_t hi,
                                      int64_t rank) {
  const int span_bits = bit_width(hi - lo);  // the only bits that vary among the candidates
  // About two candidates a bin: fewer bins to clear and to search than 2^11 for a short list.
  constexpr int kDigitBits = 11;
  int list_bits = 1;
  while (list_bits < kDigitBits && (int64_t(1) << list_bits) < found.total()) ++list_bits;
  const int bits = std::min(list_bits, span_bits);
  const int shift = span_bits - bits;
  uint32_t counts[int64_t(1) << kDigitBits];
  std::fill_n(counts, int64_t(1) << bits, 0u);
  for (int64_t c = 0; c < chunks.count; ++c) {
    const stored_key_t* keys = found.keys + c * found.stride;
    for (int64_t j = 0; j < found.count[c]; ++j) ++counts[(keys[j] - lo) >> shift];
  }
  const DigitPick pick = pick_digit_from_top(counts, int64_t(1) << bits, rank);
  // The chosen bin's keys, as a range: one comparison each, no division into digits.
  const uint64_t bin_lo = lo + (static_cast<uint64_t>(pick.digit) << shift);
  const uint64_t bin_hi = bin_lo + ((uint64_t(1) << shift) - 1);
  std::vector<Candidate> chosen(static_cast<size_t>(pick.count_in_digit));
  int64_t taken = 0;
  for (int64_t c = 0; c < chunks.count; ++c) {
    const stored_key_t* keys = found.keys + c * found.stride;
    const uint32_t* offsets = found.offsets + c * found.stride;
    for (int64_t j = 0; j < found.count[c]; ++j) {
      if (keys[j] >= bin_lo && keys[j] <= bin_hi) {
        chosen[taken++] = Candidate{keys[j], chunks.begin(c) + offsets[j]};
      }
    }
  }
  return threshold_from_candidates(chosen.data(), chosen.data() + taken, pick.rank_in_digit, shift,
                                   n, lo);
}

// Bracket [*lo, *hi] of keys that holds the `rank`-th largest (1-based) of a population of
// `population` keys, with high probability, from a sample of them: the sample's ranks a margin of
// 3.5 standard deviations either side (a sample outside it, one in two thousand, costs the
// caller's fallback). False if the sample is too small for a bracket narrower than the whole.
template <typename key_t>
bool bracket_from_sample(const KeySample<key_t>& sample, int64_t population, int64_t rank,
                         key_t nan_key, key_t* lo, key_t* hi) {
  const int64_t samples = sample.size();
  const double p = static_cast<double>(rank) / static_cast<double>(population);
  const double center = p * static_cast<double>(samples);
  const double margin = 3.5 * std::sqrt(static_cast<double>(samples) * p * (1.0 - p)) + 4.0;
  const int64_t hi_rank = static_cast<int64_t>(std::floor(center - margin));  // 1-based from top
  const int64_t lo_rank = static_cast<int64_t>(std::ceil(center + margin));
  if (hi_rank < 1 && lo_rank > samples) return false;
  sample_bounds(sample, hi_rank, lo_rank, nan_key, lo, hi);
  return true;
}

// Many candidates: a second, narrower bracket from a sample of the candidates' keys, scanned
// with the same kernel over the stored keys (read as elements whose bits they are). Returns
// false, leaving `found` as it was, where the sample misses the rank; on success `found` holds
// the candidates inside [*lo, *hi] (offsets still from their chunk's first element) and `rank`
// is their rank among them.
template <typename scalar_t, typename stored_key_t>
bool narrow_candidates(const LevelKernels& kernels, const Chunking& chunks,
                       BracketCandidates<stored_key_t>& found,
                       CandidateBuffer<stored_key_t, kNarrowKeys, kNarrowOffsets>& storage,
                       uint64_t* lo, uint64_t* hi, int64_t* rank) {
  const int64_t total = found.total();
  // About total / 10 sampled keys (the sample's cost against the candidates' that it saves),
  // at an odd stride through the candidates of every chunk in turn.
  const int64_t step = std::max<int64_t>(3, total / std::max<int64_t>(256, total / 10)) | 1;
  int64_t chunk = 0, chunk_start = 0;  // the chunk of the last sampled position
  const KeySample<stored_key_t> sample(total / step, [&](int64_t j) {
    const int64_t position = j * step;
    while (position - chunk_start >= found.count[chunk]) chunk_start += found.count[chunk++];
    return found.keys[chunk * found.stride + (position - chunk_start)];
  });
  stored_key_t sub_lo, sub_hi;
  if (!bracket_from_sample(sample, total, *rank,
                           static_cast<stored_key_t>(KeyTraits<scalar_t>::kNaN), &sub_lo,
                           &sub_hi)) {
    return false;
  }
  sub_lo = std::max<stored_key_t>(sub_lo, static_cast<stored_key_t>(*lo));
  sub_hi = std::min<stored_key_t>(sub_hi, static_cast<stored_key_t>(*hi));
  if (sub_lo > sub_hi) return false;
  // The narrower list has the wider one's layout: each chunk's slice has room for all of its
  // slice of the wider one.
  const int64_t stride = found.stride;
  const int64_t slice = stride - kCandidateSlack;
  storage.allocate(stride * chunks.count);
  std::vector<int64_t> count(static_cast<size_t>(chunks.count));
  int64_t above = 0, inside = 0;
  for (int64_t c = 0; c < chunks.count; ++c) {
    uint32_t* offsets = storage.offsets() + c * stride;
    count[c] = kernels.scan_bracket(stored_key_element_type<stored_key_t>(),
                                    found.keys + c * found.stride, 0, found.count[c], sub_lo,
                                    sub_hi, storage.keys() + c * stride, offsets, slice, &above);
    // Positions in the wider list become offsets from the chunk's first element.
    const uint32_t* wider = found.offsets + c * found.stride;
    for (int64_t j = 0; j < count[c]; ++j) offsets[j] = wider[offsets[j]];
    inside += count[c];
  }
  if (!(above < *rank && *rank <= above + inside)) return false;
  found =
      BracketCandidates<stored_key_t>{storage.keys(), storage.offsets(), stride, std::move(count)};
  *lo = sub_lo;
  *hi = sub_hi;
  *rank -= above;
  return true;
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
  const KeySample<key_t> sample(n / step, [&](int64_t j) { return magnitude_key(x[j * step]); });
  key_t lo, hi;
  if (!bracket_from_sample(sample, n, k, KeyTraits<scalar_t>::kNaN, &lo, &hi)) {
    return false;
  }

  // Each chunk copies into its own slice of one buffer and gives up when it is full.
  const int64_t slice = candidate_budget(n) / chunks.count + 1;
  const int64_t stride = slice + kCandidateSlack;
  CandidateBuffer<stored_key_t, kCandidateKeys, kCandidateOffsets> buffer(stride * chunks.count);
  BracketCandidates<stored_key_t> found{buffer.keys(), buffer.offsets(), stride,
                                        std::vector<int64_t>(static_cast<size_t>(chunks.count))};
  std::vector<int64_t> above(static_cast<size_t>(chunks.count), 0);
  chunks.for_each(n, [&, lo, hi](int64_t chunk, int64_t begin, int64_t end) {
    int64_t count_above = 0;
    found.count[chunk] = kernels.scan_bracket(element_type_of<scalar_t>(), x, begin, end, lo, hi,
                                              buffer.keys() + chunk * stride,
                                              buffer.offsets() + chunk * stride, slice,
                                              &count_above);  // -1: the slice overflowed
    above[chunk] = count_above;
  });
  int64_t total_above = 0, total_in = 0;
  for (int64_t c = 0; c < chunks.count; ++c) {
    if (found.count[c] < 0) return false;
    total_above += above[c];
    total_in += found.count[c];
  }
  if (!(total_above < k && k <= total_above + total_in)) return false;

  uint64_t bracket_lo = lo, bracket_hi = hi;
  int64_t rank = k - total_above;
  // A second bracket pays for its sample and scan from a few thousand candidates on.
  constexpr int64_t kNarrowFrom = 2048;
  CandidateBuffer<stored_key_t, kNarrowKeys, kNarrowOffsets> narrow_buffer;
  if (total_in >= kNarrowFrom) {
    narrow_candidates<scalar_t>(kernels, chunks, found, narrow_buffer, &bracket_lo, &bracket_hi,
                                &rank);
  }
  *result = resolve_candidates(found, chunks, n, bracket_lo, bracket_hi, rank);
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
