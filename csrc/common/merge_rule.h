// The per-element merge rule shared by the CPU and CUDA kernels.
//
// Every strategy is a point in (pruning x sign election):
//   pruning:        none | magnitude (top-k of |x|) | random (DARE, optionally rescaled)
//   sign election:  none | total (sum of values) | frequency (sum of signs)
// A kernel computes, for every element, the pruned value v_i of each task in the
// task dtype, then either the weighted sum of v_i * w_i (no election) or the
// disjoint merge of the values whose sign agrees with the elected majority.
// Dropped values are x * 0 rather than 0: that is what the reference expression
// (tensor * mask) gives, and it keeps Inf/NaN inputs visible as NaN.
#pragma once

#include <cstdint>

#include "macros.h"

namespace lorax_merge {

enum class Pruning : int32_t { kNone = 0, kMagnitude = 1, kRandom = 2 };
enum class SignElection : int32_t { kNone = 0, kTotal = 1, kFrequency = 2 };

// Value of an element after pruning, in the accumulation type. `rescaled` is
// x / density rounded to the task dtype (the pruned tensor has the task dtype).
template <typename scalar_t, typename acc_t>
LM_HOST_DEVICE acc_t dropped_value(acc_t x) {
  return x * acc_t(0);
}

template <typename scalar_t, typename acc_t>
LM_HOST_DEVICE acc_t rescaled_value(acc_t x, acc_t density) {
  return static_cast<acc_t>(static_cast<scalar_t>(x / density));
}

template <typename scalar_t, typename acc_t>
LM_HOST_DEVICE acc_t pruned_value(acc_t x, bool kept, bool rescale, acc_t density) {
  const acc_t kept_value = rescale ? rescaled_value<scalar_t, acc_t>(x, density) : x;
  return kept ? kept_value : dropped_value<scalar_t, acc_t>(x);
}

// The density as the reference `tensor / density` sees it: a Python float is
// converted to the op-math type of the tensor (float for half/bfloat16/float, double
// for double) before the division.
template <typename scalar_t>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};

// Term a value contributes to the election score.
template <typename acc_t, SignElection E>
LM_HOST_DEVICE acc_t election_term(acc_t v) {
  if (E == SignElection::kTotal) return v;
  // sign(v): NaN for NaN (v * 0), so a NaN anywhere makes the score NaN.
  return v > acc_t(0) ? acc_t(1) : (v < acc_t(0) ? acc_t(-1) : v * acc_t(0));
}

// Majority sign is +1 where the score is >= 0, else -1 (a NaN score elects -1).
template <typename acc_t>
LM_HOST_DEVICE bool majority_is_positive(acc_t score) {
  return score >= acc_t(0);
}

// sign(v) == majority; zeros and NaN never match.
template <typename acc_t>
LM_HOST_DEVICE bool agrees_with_majority(acc_t v, bool majority_positive) {
  return majority_positive ? v > acc_t(0) : v < acc_t(0);
}

// Disjoint merge of one element: sum(mask ? p : p * 0) / max(sum(mask), 1). The count is a
// small integer, held as acc_t or as an integer type (the CPU's vectors count in int32 lanes,
// one instruction a step); the mean converts it exactly.
template <typename acc_t, typename count_t>
LM_HOST_DEVICE void add_masked(acc_t& sum, count_t& count, acc_t p, bool selected) {
  sum += selected ? p : p * acc_t(0);
  count += selected ? count_t(1) : count_t(0);
}

template <typename acc_t, typename count_t>
LM_HOST_DEVICE acc_t masked_mean(acc_t sum, count_t count) {
  const acc_t c = static_cast<acc_t>(count);
  return sum / (c > acc_t(1) ? c : acc_t(1));
}

template <typename acc_t>
struct MaskedMean {
  acc_t sum = acc_t(0);
  acc_t count = acc_t(0);

  LM_HOST_DEVICE void add(acc_t p, bool selected) { add_masked(sum, count, p, selected); }
  LM_HOST_DEVICE acc_t result() const { return masked_mean(sum, count); }
};

// State of one element's merge under sign election. Both signs' masked sums are kept
// so that one pass over the tasks suffices: the majority is known after the last task.
// Written as free functions over the fields so the CPU can keep them as arrays (SIMD)
// and the GPU in registers (MergeAccumulator below), with one definition of the rule.
// The score is summed in vote_t, the op-math type of the task dtype, as the reference sums the
// unweighted stack (`stack.sum(dim=0)`) in the tasks' dtype: float64 weights or a float64
// result widen the weighted sums (acc_t) but must not change which sign wins. A pruned value
// is a task-dtype value, so its conversion to vote_t is exact.
template <typename acc_t, typename vote_t, SignElection E>
LM_HOST_DEVICE void add_vote(vote_t& score, acc_t v) {
  score += election_term<vote_t, E>(static_cast<vote_t>(v));
}

template <typename acc_t, typename vote_t, SignElection E, typename count_t>
LM_HOST_DEVICE void add_elected(vote_t& score, acc_t& pos_sum, count_t& pos_count, acc_t& neg_sum,
                                count_t& neg_count, acc_t v, acc_t w) {
  const acc_t p = v * w;
  add_vote<acc_t, vote_t, E>(score, v);
  add_masked(pos_sum, pos_count, p, v > acc_t(0));
  add_masked(neg_sum, neg_count, p, v < acc_t(0));
}

template <typename acc_t, typename vote_t, typename count_t>
LM_HOST_DEVICE acc_t elected_result(vote_t score, acc_t pos_sum, count_t pos_count, acc_t neg_sum,
                                    count_t neg_count) {
  // One division: pick the majority's sum and count first.
  const bool positive = majority_is_positive(score);
  return masked_mean(positive ? pos_sum : neg_sum, positive ? pos_count : neg_count);
}

// Accumulates the merge of one element over the tasks: add(v_i, w_i) for each task in
// order, then result().
template <typename acc_t, typename vote_t, SignElection E>
struct MergeAccumulator {
  vote_t score = vote_t(0);
  acc_t pos_sum = acc_t(0), pos_count = acc_t(0);
  acc_t neg_sum = acc_t(0), neg_count = acc_t(0);

  LM_HOST_DEVICE void add(acc_t v, acc_t w) {
    add_elected<acc_t, vote_t, E>(score, pos_sum, pos_count, neg_sum, neg_count, v, w);
  }
  LM_HOST_DEVICE acc_t result() const {
    return elected_result(score, pos_sum, pos_count, neg_sum, neg_count);
  }
};

// The sum starts at -0 (the identity of IEEE addition), so that one task gives exactly
// v * w, sign of zero included: pruning alone is a one-task merge with weight 1.
template <typename acc_t>
LM_HOST_DEVICE acc_t negative_zero() {
  return -acc_t(0);
}

template <typename acc_t, typename vote_t>
struct MergeAccumulator<acc_t, vote_t, SignElection::kNone> {
  acc_t sum = negative_zero<acc_t>();

  LM_HOST_DEVICE void add(acc_t v, acc_t w) { sum += v * w; }
  LM_HOST_DEVICE acc_t result() const { return sum; }
};

// ---------------------------------------------------------------------------------------
// Gradients: the upstream expression's (tensor * mask, / density, stack * weights,
// sum / count), with the keep masks and the elected signs held constant. For one element with
// incoming gradient g (the merge result's), elected count c and task i (weight w_i, keep bit k_i,
// election bit e_i, pruned value v_i):
//   share_i = (g / max(c, 1)) * e_i   the gradient of w_i * v_i (share_i = g without election)
//   q_i     = r(r(share_i * w_i) / d)  DARE with rescale,  r(share_i * w_i)  otherwise
//   d t_i   = k_i ? q_i : q_i * 0
//   d w_i  += share_i * v_i
// where r() rounds to the task dtype: autograd casts the gradient of the task-dtype pruned
// tensor to that dtype before the division by the density, as the forward rounds x / d, and
// the division comes before the mask (the gradient of (tensor * mask) / d). A dropped entry's
// gradient is q_i multiplied by 0, not replaced by 0, as tensor * mask is: an Inf from the
// division gives NaN there. The kernels round (and store, NaN canonical as every result) in
// their own way: value_gradient, r(), rescaled_gradient, r(), masked_gradient.

// The elected share of the incoming gradient (before the election bit).
template <typename acc_t>
LM_HOST_DEVICE acc_t elected_share(acc_t g, acc_t count) {
  return g / (count > acc_t(1) ? count : acc_t(1));
}

// A task's share: the elected share times its election bit.
template <typename acc_t>
LM_HOST_DEVICE acc_t task_share(acc_t share, bool selected) {
  return share * (selected ? acc_t(1) : acc_t(0));
}

// The gradient of a task's pruned value: share * w, before it is rounded to the task dtype.
template <typename acc_t>
LM_HOST_DEVICE acc_t value_gradient(acc_t share, acc_t w) {
  return share * w;
}

// DARE's rescale: the rounded value gradient divided by the density (then rounded again).
template <typename acc_t>
LM_HOST_DEVICE acc_t rescaled_gradient(acc_t rounded, acc_t density) {
  return rounded / density;
}

// A task's gradient from q (the rounded, and with DARE's rescale rescaled and rounded, value
// gradient): q where kept, q * 0 where dropped.
template <typename acc_t>
LM_HOST_DEVICE acc_t masked_gradient(acc_t q, bool kept) {
  return kept ? q : q * acc_t(0);
}

template <typename acc_t>
LM_HOST_DEVICE acc_t weight_gradient_term(acc_t share, acc_t v) {
  return share * v;
}

// The stacked disjoint merge sum(mask ? x : x * 0) / max(count, 1) has, w.r.t. one entry, the
// gradient r(elected_share(g, count)) times its mask bit (task_share), r() rounding to the
// stacked dtype.

}  // namespace lorax_merge
