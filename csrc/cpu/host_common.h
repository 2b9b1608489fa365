// What the host side of the CPU ops shares: how much work is worth a second thread.
#pragma once

#include <cstdint>

namespace lorax_merge {
namespace cpu {

// Least work (task elements read) worth handing to another thread: 10-20 us of one thread's
// work, against 1-2 us to wake a waiting thread (torch's own element-wise ops split from 32K
// elements on). A LoRA-sized merge (3 x 64K elements) uses two threads.
constexpr int64_t kMinParallelWork = 1 << 16;

}  // namespace cpu
}  // namespace lorax_merge
