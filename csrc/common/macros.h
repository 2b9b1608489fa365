// Portability macros for code compiled both by the host compiler and by nvcc.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LM_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined on the host too. The CPU kernels are compiled once per instruction-set
// level (csrc/cpu/capability.h); an out-of-line copy of a shared helper, or a clone of one
// specialised for its constant arguments, would carry one level's instructions under a name
// outside that level's namespace.
#define LM_HOST_DEVICE inline __attribute__((always_inline))
#else
#define LM_HOST_DEVICE inline
#endif
