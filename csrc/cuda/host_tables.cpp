#include "host_tables.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include "launch.h"

namespace lorax_merge {
namespace cuda {

// On the legacy default stream while another stream of the device captures, CUDA answers
// cudaErrorStreamCaptureImplicit: work on that stream would join or break that capture, so
// it counts as capturing.
bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const cudaError_t status = cudaStreamIsCapturing(stream, &capture);
  if (status == cudaErrorStreamCaptureImplicit) {
    (void)cudaGetLastError();  // not sticky: clear it, so no later launch check reports it
    return true;
  }
  C10_CUDA_CHECK(status);
  return capture != cudaStreamCaptureStatusNone;
}

// An uploaded table cannot be captured: the copy would replay from a host buffer that no
// longer holds it.
void refuse_uploaded_table(size_t table_bytes) {
  TORCH_CHECK_VALUE(table_bytes <= static_cast<size_t>(kInlineTableBytes),
                    "lorax_merge: this batch needs a ", table_bytes,
                    "-byte descriptor table, more than the ", kInlineTableBytes,
                    " bytes that travel with a kernel launch, so it cannot be captured in a CUDA "
                    "graph; capture smaller batches (fewer tensors) instead");
}

const unsigned char* place_table(const std::vector<unsigned char>& bytes, unsigned char* inline_dst,
                                 const at::Device& device, cudaStream_t stream,
                                 std::vector<at::Tensor>& keep) {
  if (bytes.size() <= static_cast<size_t>(kInlineTableBytes)) {
    if (!bytes.empty()) std::memcpy(inline_dst, bytes.data(), bytes.size());
    return nullptr;
  }
  if (stream_is_capturing(stream)) refuse_uploaded_table(bytes.size());
  const int64_t n = static_cast<int64_t>(bytes.size());
  at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), bytes.data(), bytes.size());
  at::Tensor dev = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(device));
  dev.copy_(host, /*non_blocking=*/true);
  keep.push_back(host);
  keep.push_back(dev);
  return static_cast<const unsigned char*>(dev.const_data_ptr());
}

}  // namespace cuda
}  // namespace lorax_merge
