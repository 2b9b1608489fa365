// Host side of the CUDA gradient ops: turns validated backward requests into descriptor tables
// and launches the kernels of merge_grad.cu on the current stream of the tasks' device. As in
// the forward, nothing here waits for the device: weights on the CPU travel as kernel arguments,
// weights on the GPU are read by the kernel, thresholds are read on the device.
#include <limits>
#include <map>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/counter_rng.h"
#include "../grad_ops.h"
#include "grad_launch.h"
#include "host_tables.h"

namespace lorax_merge {
namespace cuda {
namespace {

// One launch for requests of one task dtype and accumulation type (every request of a
// merge_backward call shares the strategy parameters).
void run_grad_bucket(const std::vector<MergeGradRequest>& requests,
                     const std::vector<size_t>& members, const at::Device& device,
                     cudaStream_t stream) {
  const MergeRequest& first = requests[members[0]].merge;
  const at::ScalarType task_type = first.tasks[0].scalar_type();
  const bool want_weights = requests[members[0]].weight_grads.defined();
  GradLaunch launch;
  launch.task_dtype = element_type(task_type);
  launch.wide_acc = accumulate_type(task_type, first.out.scalar_type()) == at::kDouble;
  launch.election = first.election;
  launch.pruning = first.prunes() ? first.pruning : Pruning::kNone;
  launch.rescale = first.rescale ? 1 : 0;
  launch.density = first.density;
  launch.keep_bound = dare_keep_bound(first.density);
  launch.index_offset = first.index_offset;

  std::vector<GradGroup> groups;
  std::vector<GradTask> tasks;
  int64_t blocks = 0;
  int64_t slots = 0;
  for (size_t member : members) {
    const MergeGradRequest& request = requests[member];
    const MergeRequest& r = request.merge;
    const int64_t numel = r.numel();
    if (numel == 0) continue;  // its weight gradients are the zeros already there
    GradGroup group{};
    group.grad = r.out.const_data_ptr();
    group.numel = numel;
    group.seed = static_cast<uint64_t>(r.seed);
    group.block_begin = blocks;
    group.sums_begin = slots;
    group.first_task = static_cast<int32_t>(tasks.size());
    group.num_tasks = static_cast<int32_t>(r.tasks.size());
    group.grad_dtype = static_cast<int32_t>(element_type(r.out.scalar_type()));
    blocks += grad_chunks(numel);
    slots += grad_chunks(numel) * r.num_tasks();
    const bool host = r.weights.device().is_cpu();
    const std::vector<double> values = host ? host_weights(r.weights) : std::vector<double>();
    const auto* thresholds =
        r.thresholds.defined()
            ? reinterpret_cast<const MagnitudeThreshold*>(r.thresholds.const_data_ptr<int64_t>())
            : nullptr;
    for (int64_t i = 0; i < r.num_tasks(); ++i) {
      GradTask task{};
      task.data = r.tasks[i].const_data_ptr();
      task.grad = request.task_grads.empty() ? nullptr : request.task_grads[i].data_ptr();
      task.threshold = launch.pruning == Pruning::kMagnitude ? thresholds + i : nullptr;
      if (host) {
        task.weight = values[i];
      } else {
        task.weight_device = r.weights.const_data_ptr<double>() + i;
      }
      task.weight_grad = want_weights ? request.weight_grads.data_ptr<double>() + i : nullptr;
      tasks.push_back(task);
    }
    groups.push_back(group);
  }
  if (groups.empty()) return;
  constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(blocks <= kMaxGrid, "lorax_merge: the batch is too large for one launch (",
                    blocks, " blocks)");
  std::vector<at::Tensor> keep;
  TableBuilder table;
  launch.groups_offset = table.append(groups);
  launch.tasks_offset = table.append(tasks);
  launch.table_device = place_table(table.bytes(), launch.table_inline, device, stream, keep);
  if (want_weights) {
    at::Tensor sums = at::empty({2 * slots}, at::TensorOptions().dtype(at::kDouble).device(device));
    keep.push_back(sums);
    launch.chunk_sums = sums.data_ptr<double>();
    launch.total_chunk_slots = slots;
  }
  launch.num_groups = static_cast<int32_t>(groups.size());
  launch.num_blocks = blocks;
  launch_merge_backward(launch, stream);
}

}  // namespace

struct CudaGradKernels {
  static void merge_backward(const std::vector<MergeGradRequest>& requests) {
    const at::Device device = requests[0].merge.tasks[0].device();
    TORCH_CHECK_VALUE(device.is_cuda(), "lorax_merge: expected CUDA tensors, got ", device);
    c10::cuda::CUDAGuard guard(device);
    // As in the forward (merge_cuda.cpp's run_batch): allocations here must not invalidate
    // another thread's global-mode capture.
    c10::cuda::CUDAStreamCaptureModeGuard capture_mode(cudaStreamCaptureModeThreadLocal);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
    std::map<std::pair<int, bool>, std::vector<size_t>> buckets;
    for (size_t g = 0; g < requests.size(); ++g) {
      const MergeRequest& r = requests[g].merge;
      TORCH_CHECK_VALUE(r.tasks[0].device() == device, "lorax_merge: groups[", g, "] is on ",
                        r.tasks[0].device(), " but groups[0] is on ", device);
      const at::ScalarType task_type = r.tasks[0].scalar_type();
      const bool wide = accumulate_type(task_type, r.out.scalar_type()) == at::kDouble;
      buckets[{static_cast<int>(task_type), wide}].push_back(g);
    }
    // A batch whose table cannot be captured fails before any of its kernels is enqueued.
    if (stream_is_capturing(stream)) {
      for (const auto& entry : buckets) {
        TableSize table;
        size_t groups = 0, tasks = 0;
        for (size_t member : entry.second) {
          const MergeRequest& r = requests[member].merge;
          if (r.numel() == 0) continue;
          ++groups;
          tasks += r.tasks.size();
        }
        table.add<GradGroup>(groups);
        table.add<GradTask>(tasks);
        refuse_uploaded_table(table.bytes());
      }
    }
    for (const auto& entry : buckets) run_grad_bucket(requests, entry.second, device, stream);
  }

  static void disjoint_merge_backward(const at::Tensor& grad, const at::Tensor& mask,
                                      at::Tensor& out) {
    if (out.numel() == 0) return;
    c10::cuda::CUDAGuard guard(grad.device());
    const int64_t rows = mask.size(0);
    launch_disjoint_merge_backward(element_type(out.scalar_type()), grad.const_data_ptr(),
                                   mask.const_data_ptr<bool>(), out.data_ptr(), rows,
                                   out.numel() / rows,
                                   c10::cuda::getCurrentCUDAStream(grad.device().index()).stream());
  }
};

}  // namespace cuda

TORCH_LIBRARY_IMPL(lorax_merge, CUDA, m) {
  register_grad_ops<cuda::CudaGradKernels>(m);
}

}  // namespace lorax_merge
