// Descriptor tables on the host side of the CUDA ops (forward and backward): built as one
// byte array of 16-byte-aligned struct arrays, and placed where the kernel reads them, inside
// the kernel parameters when they fit in kInlineTableBytes, else in device memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

namespace lorax_merge {
namespace cuda {

// Offset of the next array of a table that already holds `bytes` bytes.
constexpr size_t table_array_offset(size_t bytes) {
  return (bytes + 15) / 16 * 16;
}

// Concatenation of arrays of descriptor structs, each starting on a 16-byte boundary.
class TableBuilder {
 public:
  template <typename T>
  int64_t append(const std::vector<T>& items) {
    const size_t offset = table_array_offset(bytes_.size());
    bytes_.resize(offset + items.size() * sizeof(T));
    if (!items.empty()) std::memcpy(bytes_.data() + offset, items.data(), items.size() * sizeof(T));
    return static_cast<int64_t>(offset);
  }
  const std::vector<unsigned char>& bytes() const { return bytes_; }

 private:
  std::vector<unsigned char> bytes_;
};

// The size of a table TableBuilder would build, from the arrays' lengths alone.
class TableSize {
 public:
  template <typename T>
  void add(size_t count) {
    bytes_ = table_array_offset(bytes_) + count * sizeof(T);
  }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_ = 0;
};

// Whether work enqueued on `stream` now would be captured into a CUDA graph.
bool stream_is_capturing(cudaStream_t stream);

// Refuses, with a ValueError, a descriptor table of `table_bytes` bytes that would not travel
// with the kernel, for a call made while its stream captures a CUDA graph. A call checks every
// table it will build before it enqueues any kernel, so that a refused call leaves none of
// its launches in the graph.
void refuse_uploaded_table(size_t table_bytes);

// Puts a table where the kernel reads it: inside the kernel parameters when it fits
// (returns nullptr), else in device memory filled by an asynchronous copy from pinned host
// memory (returns its address; `keep` holds the buffers until the launches are enqueued).
const unsigned char* place_table(const std::vector<unsigned char>& bytes, unsigned char* inline_dst,
                                 const at::Device& device, cudaStream_t stream,
                                 std::vector<at::Tensor>& keep);

}  // namespace cuda
}  // namespace lorax_merge
