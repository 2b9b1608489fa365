// Small helpers shared by the kernels: dispatch on a dtype or sign election, vector loads
// and stores, segment lookup in block tables.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launch.h"

// Runs the callable __VA_ARGS__ (a lambda without parameters) with TYPE naming the C++ type of
// the ElementType value DTYPE, as AT_DISPATCH_* does for at::ScalarType. Usable in host and device
// code; every ElementType is handled.
#define LM_DISPATCH_DTYPE(DTYPE, TYPE, ...)         \
  [&] {                                             \
    switch (DTYPE) {                                \
      case ::lorax_merge::ElementType::kFloat: {    \
        using TYPE = float;                         \
        return __VA_ARGS__();                       \
      }                                             \
      case ::lorax_merge::ElementType::kHalf: {     \
        using TYPE = ::c10::Half;                   \
        return __VA_ARGS__();                       \
      }                                             \
      case ::lorax_merge::ElementType::kBFloat16: { \
        using TYPE = ::c10::BFloat16;               \
        return __VA_ARGS__();                       \
      }                                             \
      case ::lorax_merge::ElementType::kDouble: {   \
        using TYPE = double;                        \
        return __VA_ARGS__();                       \
      }                                             \
    }                                               \
  }()

// Runs __VA_ARGS__ with NAME a constexpr SignElection equal to ELECTION.
#define LM_DISPATCH_ELECTION(ELECTION, NAME, ...)                                             \
  [&] {                                                                                       \
    switch (ELECTION) {                                                                       \
      case ::lorax_merge::SignElection::kNone: {                                              \
        constexpr ::lorax_merge::SignElection NAME = ::lorax_merge::SignElection::kNone;      \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      case ::lorax_merge::SignElection::kTotal: {                                             \
        constexpr ::lorax_merge::SignElection NAME = ::lorax_merge::SignElection::kTotal;     \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      case ::lorax_merge::SignElection::kFrequency: {                                         \
        constexpr ::lorax_merge::SignElection NAME = ::lorax_merge::SignElection::kFrequency; \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
    }                                                                                         \
  }()

namespace lorax_merge {
namespace cuda {

// fn(scalar_t{}, acc_t{}) for tasks of `dtype` and their accumulation type: float64 for float64
// tasks, and for the others when `wide` (a float64 result), else float. Host code.
template <typename Fn>
void with_task_and_acc_types(ElementType dtype, bool wide, const Fn& fn) {
  LM_DISPATCH_DTYPE(dtype, scalar_t, [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      fn(double{}, double{});
    } else if (wide) {
      fn(scalar_t{}, double{});
    } else {
      fn(scalar_t{}, float{});
    }
  });
}

// The fields a forward and a backward launch's kernel parameters share: the group and task
// tables and the pruning. Host code.
template <typename Params, typename Launch>
void copy_shared_params(const Launch& launch, Params& params) {
  params.table_device = launch.table_device;
  params.groups_offset = launch.groups_offset;
  params.tasks_offset = launch.tasks_offset;
  params.density = launch.density;
  params.keep_bound = launch.keep_bound;
  params.num_groups = launch.num_groups;
  params.pruning = static_cast<int32_t>(launch.pruning);
  params.rescale = launch.rescale;
  static_assert(sizeof(params.table_inline) == sizeof(launch.table_inline), "one inline table");
  memcpy(params.table_inline, launch.table_inline, sizeof(params.table_inline));
}

// Loads N consecutive values from p, which is aligned to min(16, N * sizeof(T)) bytes,
// with the widest accesses that alignment allows (16 bytes at most). Stores likewise
// (global stores: the pointers come from descriptor tables, so the compiler cannot tell).
template <typename T, int N>
__device__ __forceinline__ void load_vector(const T* p, T (&out)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    uint4 raw[kBytes / 16];
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) raw[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
    memcpy(out, raw, kBytes);
  } else if constexpr (kBytes == 8) {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    memcpy(out, &raw, kBytes);
  } else {
    static_assert(kBytes == 4, "unsupported vector width");
    const unsigned int raw = __ldg(reinterpret_cast<const unsigned int*>(p));
    memcpy(out, &raw, kBytes);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_vector(T* p, const T (&in)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    uint4 raw[kBytes / 16];
    memcpy(raw, in, kBytes);
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) __stwb(reinterpret_cast<uint4*>(p) + i, raw[i]);
  } else if constexpr (kBytes == 8) {
    uint2 raw;
    memcpy(&raw, in, kBytes);
    __stwb(reinterpret_cast<uint2*>(p), raw);
  } else {
    static_assert(kBytes == 4, "unsupported vector width");
    unsigned int raw;
    memcpy(&raw, in, kBytes);
    __stwb(reinterpret_cast<unsigned int*>(p), raw);
  }
}

// Loads elements [j0, j0 + N) of p; the ones at or past `limit` read as zero.
template <typename T, int N>
__device__ __forceinline__ void load_chunk(const T* p, int64_t j0, int64_t limit, bool vector,
                                           T (&out)[N]) {
  if (vector) {
    load_vector<T, N>(p + j0, out);
    return;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = j0 + i < limit ? p[j0 + i] : T(0);
}

template <typename T, int N>
__device__ __forceinline__ void store_chunk(T* p, int64_t j0, int64_t limit, bool vector,
                                            const T (&in)[N]) {
  if (vector) {
    store_vector<T, N>(p + j0, in);
    return;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (j0 + i < limit) p[j0 + i] = in[i];
  }
}

// Index of the last entry whose `begin` is <= block, for entries sorted by begin (the
// first entry begins at 0).
template <typename Entry, typename Begin>
__device__ __forceinline__ int find_segment(const Entry* entries, int count, int64_t block,
                                            Begin begin) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (begin(entries[mid]) <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

}  // namespace cuda
}  // namespace lorax_merge
