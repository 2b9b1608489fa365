// Portability macros for code compiled both by the host compiler and by nvcc.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LM_HOST_DEVICE inline
#endif
