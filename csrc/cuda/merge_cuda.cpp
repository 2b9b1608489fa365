// Host side of the CUDA kernels: turns validated merge requests into descriptor tables and
// launches the selection and fused-merge kernels on the current stream of the tasks'
// device. Nothing here waits for the device or reads device memory: weights given on the
// CPU travel as kernel arguments, weights on the GPU are converted to double on the GPU
// and read by the kernel, thresholds are produced and consumed on the device.
#include <algorithm>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/counter_rng.h"
#include "../device_ops.h"
#include "host_tables.h"
#include "launch.h"

namespace lorax_merge {
namespace cuda {
namespace {

bool aligned_to(const void* p, int alignment) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(alignment) == 0;
}

std::string group_name(size_t g, size_t count) {
  return count == 1 ? std::string("tasks") : "groups[" + std::to_string(g) + "]";
}

// Every tensor of the batch must live on one CUDA device.
at::Device batch_device(const std::vector<const MergeRequest*>& requests) {
  const at::Device device = requests[0]->tasks[0].device();
  for (size_t g = 0; g < requests.size(); ++g) {
    const MergeRequest& r = *requests[g];
    for (size_t i = 0; i < r.tasks.size(); ++i) {
      TORCH_CHECK_VALUE(r.tasks[i].device() == device,
                        "lorax_merge: ", group_name(g, requests.size()), "[", i, "] is on ",
                        r.tasks[i].device(), " but ", group_name(0, requests.size()), "[0] is on ",
                        device);
    }
    TORCH_CHECK_VALUE(r.out.device() == device, "lorax_merge: out is on ", r.out.device(),
                      " but the task tensors are on ", device);
    TORCH_CHECK_VALUE(r.weights.device().is_cpu() || r.weights.device() == device,
                      "lorax_merge: weights is on ", r.weights.device(),
                      " but the task tensors are on ", device);
  }
  return device;
}

// Weights that live on the GPU, as one double tensor on the GPU (converted there, no sync),
// and each request's offset into it (-1 for weights on the CPU).
struct DeviceWeights {
  at::Tensor values;
  std::vector<int64_t> offsets;
};

// True when the weights of requests[first..] lie back to back in one strided-1 storage
// (merge_many slices one weights tensor per group), so one conversion covers them all.
bool weights_back_to_back(const std::vector<const MergeRequest*>& requests) {
  const at::Tensor& w0 = requests[0]->weights;
  const char* next = static_cast<const char*>(w0.const_data_ptr());
  for (const MergeRequest* r : requests) {
    const at::Tensor& w = r->weights;
    if (w.device() != w0.device() || w.scalar_type() != w0.scalar_type() ||
        !w.storage().is_alias_of(w0.storage()) || (w.numel() > 1 && w.stride(0) != 1) ||
        static_cast<const char*>(w.const_data_ptr()) != next) {
      return false;
    }
    next += w.numel() * w.element_size();
  }
  return true;
}

DeviceWeights gather_device_weights(const std::vector<const MergeRequest*>& requests) {
  DeviceWeights dw;
  dw.offsets.assign(requests.size(), -1);
  std::vector<at::Tensor> parts;
  int64_t offset = 0;
  for (size_t g = 0; g < requests.size(); ++g) {
    const at::Tensor& w = requests[g]->weights;
    if (w.device().is_cpu()) continue;
    dw.offsets[g] = offset;
    offset += w.numel();
    parts.push_back(w);
  }
  if (parts.empty()) return dw;
  if (parts.size() == requests.size() && weights_back_to_back(requests)) {
    // One view over all groups' weights: a single conversion kernel.
    const at::Tensor& w0 = requests[0]->weights;
    dw.values = w0.as_strided({offset}, {1}).to(at::kDouble).contiguous();
  } else if (parts.size() == 1) {
    dw.values = parts[0].to(at::kDouble).contiguous();
  } else {
    dw.values = at::cat(parts).to(at::kDouble);
  }
  return dw;
}

// Requests that share one kernel instantiation and one set of strategy parameters.
using BucketKey = std::tuple<int, bool, int, int, double, bool, const void*>;

bool selects_thresholds(const MergeRequest& r) {
  return r.prunes() && r.pruning == Pruning::kMagnitude && !r.thresholds.defined();
}

// Refuses a batch with a table too large to be captured: the sizes of the tables run_bucket
// builds for each bucket (threshold jobs; groups and tasks).
void refuse_uploaded_tables(const std::vector<const MergeRequest*>& requests,
                            const std::map<BucketKey, std::vector<size_t>>& buckets) {
  for (const auto& entry : buckets) {
    TableSize jobs, merge;
    size_t groups = 0, tasks = 0;
    for (size_t member : entry.second) {
      const MergeRequest& r = *requests[member];
      if (r.numel() == 0) continue;
      ++groups;
      tasks += r.tasks.size();
      if (selects_thresholds(r)) jobs.add<ThresholdJob>(r.tasks.size());
    }
    merge.add<MergeGroup>(groups);
    merge.add<MergeTask>(tasks);
    refuse_uploaded_table(jobs.bytes());
    refuse_uploaded_table(merge.bytes());
  }
}

void run_bucket(const std::vector<const MergeRequest*>& requests,
                const std::vector<size_t>& members, const DeviceWeights& dw,
                const at::Device& device, cudaStream_t stream) {
  const MergeRequest& first = *requests[members[0]];
  const at::ScalarType task_type = first.tasks[0].scalar_type();
  const ElementType task_dtype = element_type(task_type);
  const bool wide = accumulate_type(task_type, first.out.scalar_type()) == at::kDouble;
  const Pruning pruning = first.prunes() ? first.pruning : Pruning::kNone;
  const int64_t block_elems = merge_block_elems(wide);
  const int load_align = merge_vector_align(task_dtype, wide);
  const double* device_weights =
      dw.values.defined() ? static_cast<const double*>(dw.values.const_data_ptr()) : nullptr;

  std::vector<MergeGroup> groups;
  std::vector<MergeTask> tasks;
  ThresholdJobTable select_table(task_dtype);
  int64_t blocks = 0;
  for (size_t member : members) {
    const MergeRequest& r = *requests[member];
    const int64_t numel = r.numel();
    if (numel == 0) continue;
    MergeGroup group{};
    group.out = r.out.data_ptr();
    group.numel = numel;
    group.seed = static_cast<uint64_t>(r.seed);
    group.first_stream = r.first_stream;
    group.index_offset = r.index_offset;
    group.block_begin = blocks;
    group.first_task = static_cast<int32_t>(tasks.size());
    group.num_tasks = static_cast<int32_t>(r.tasks.size());
    const ElementType out_dtype = element_type(r.out.scalar_type());
    group.out_dtype = static_cast<int32_t>(out_dtype);
    bool loads_aligned = true;
    for (const at::Tensor& t : r.tasks)
      loads_aligned = loads_aligned && aligned_to(t.const_data_ptr(), load_align);
    group.flags = (loads_aligned ? kVectorLoads : 0) |
                  (aligned_to(group.out, merge_vector_align(out_dtype, wide)) ? kVectorStores : 0);
    blocks += (numel + block_elems - 1) / block_elems;
    const std::vector<double> host =
        r.weights.device().is_cpu() ? host_weights(r.weights) : std::vector<double>();
    const int64_t k = magnitude_keep_count(r.density, numel);
    for (size_t i = 0; i < r.tasks.size(); ++i) {
      MergeTask task{};
      task.data = r.tasks[i].const_data_ptr();
      if (host.empty()) {
        task.weight_device = device_weights + dw.offsets[member] + static_cast<int64_t>(i);
      } else {
        task.weight = host[i];
      }
      tasks.push_back(task);
      if (selects_thresholds(r)) select_table.add(task.data, numel, k);
    }
    groups.push_back(group);
  }
  if (groups.empty()) return;
  constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(blocks <= kMaxGrid && select_table.blocks() <= kMaxGrid,
                    "lorax_merge: the batch is too large for one launch (", blocks, " blocks)");
  TORCH_CHECK_VALUE(tasks.size() <= static_cast<size_t>(kMaxGrid), "lorax_merge: too many tensors");

  std::vector<at::Tensor> keep;
  SelectLaunch select;
  MergeLaunch merge;
  if (!select_table.jobs().empty()) {
    TableBuilder table;
    table.append(select_table.jobs());
    select.jobs_device = reinterpret_cast<const ThresholdJob*>(
        place_table(table.bytes(), select.jobs_inline, device, stream, keep));
  }
  {
    TableBuilder table;
    merge.groups_offset = table.append(groups);
    merge.tasks_offset = table.append(tasks);
    merge.table_device = place_table(table.bytes(), merge.table_inline, device, stream, keep);
  }

  MagnitudeThreshold* thresholds = nullptr;
  if (!select_table.jobs().empty()) {
    const int64_t num_jobs = static_cast<int64_t>(select_table.jobs().size());
    const int64_t threshold_bytes = num_jobs * static_cast<int64_t>(sizeof(MagnitudeThreshold));
    const int64_t threshold_space = (threshold_bytes + 255) / 256 * 256;
    const int64_t ws_bytes = static_cast<int64_t>(
        select_workspace_bytes(task_dtype, select_table.split_jobs(), select_table.blocks()));
    at::Tensor ws = at::empty({threshold_space + ws_bytes},
                              at::TensorOptions().dtype(at::kByte).device(device));
    keep.push_back(ws);
    unsigned char* base = static_cast<unsigned char*>(ws.data_ptr());
    thresholds = reinterpret_cast<MagnitudeThreshold*>(base);
    select.dtype = task_dtype;
    select.num_jobs = static_cast<int32_t>(num_jobs);
    select.num_split_jobs = select_table.split_jobs();
    select.num_blocks = select_table.blocks();
    select.workspace = base + threshold_space;
    select.thresholds = thresholds;
    launch_select(select, stream);
  }

  merge.task_dtype = task_dtype;
  merge.wide_acc = wide;
  merge.election = first.election;
  merge.pruning = pruning;
  merge.rescale = first.rescale ? 1 : 0;
  merge.density = first.density;
  merge.keep_bound = dare_keep_bound(first.density);
  merge.thresholds = thresholds;
  if (pruning == Pruning::kMagnitude && first.thresholds.defined()) {
    // Precomputed for the tensors this request slices (one request per bucket).
    merge.thresholds =
        reinterpret_cast<const MagnitudeThreshold*>(first.thresholds.const_data_ptr<int64_t>());
  }
  merge.num_groups = static_cast<int32_t>(groups.size());
  merge.num_blocks = blocks;
  launch_merge(merge, stream);
}

void run_batch(const std::vector<const MergeRequest*>& requests) {
  if (requests.empty()) return;
  const at::Device device = batch_device(requests);
  TORCH_CHECK_VALUE(device.is_cuda(), "lorax_merge: expected CUDA tensors, got ", device);
  c10::cuda::CUDAGuard guard(device);
  // Allocating pinned or device memory is an "unsafe" call while another thread captures a
  // graph in the global mode (PyTorch's default), and would invalidate that capture. In the
  // thread-local mode, this thread's calls ignore other threads' captures (a capture of its
  // own still forbids them).
  c10::cuda::CUDAStreamCaptureModeGuard capture_mode(cudaStreamCaptureModeThreadLocal);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  std::map<BucketKey, std::vector<size_t>> buckets;
  for (size_t g = 0; g < requests.size(); ++g) {
    const MergeRequest& r = *requests[g];
    const at::ScalarType task_type = r.tasks[0].scalar_type();
    const bool wide = accumulate_type(task_type, r.out.scalar_type()) == at::kDouble;
    const Pruning pruning = r.prunes() ? r.pruning : Pruning::kNone;
    // A request with precomputed thresholds gets a bucket of its own.
    const void* given = r.thresholds.defined() ? static_cast<const void*>(&r) : nullptr;
    buckets[BucketKey{static_cast<int>(task_type), wide, static_cast<int>(pruning),
                      static_cast<int>(r.election), r.density, r.rescale, given}]
        .push_back(g);
  }
  // A batch that cannot be captured fails before any of its kernels is enqueued.
  if (stream_is_capturing(stream)) refuse_uploaded_tables(requests, buckets);
  const DeviceWeights dw = gather_device_weights(requests);
  for (const auto& entry : buckets) run_bucket(requests, entry.second, dw, device, stream);
}

// Exact magnitude thresholds of tasks of one shape and dtype, written into `out` (int64
// [N, 2] on the device) by the selection kernels.
void select_into(const std::vector<at::Tensor>& tasks, double density, at::Tensor& out) {
  const at::Device device = tasks[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), "lorax_merge: expected CUDA tensors, got ", device);
  c10::cuda::CUDAGuard guard(device);
  c10::cuda::CUDAStreamCaptureModeGuard capture_mode(
      cudaStreamCaptureModeThreadLocal);  // see run_batch
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int64_t numel = tasks[0].numel();
  const int64_t k = magnitude_keep_count(density, numel);
  const ElementType dtype = element_type(tasks[0].scalar_type());
  ThresholdJobTable select_table(dtype);
  for (const at::Tensor& t : tasks) select_table.add(t.const_data_ptr(), numel, k);
  constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(select_table.blocks() <= kMaxGrid,
                    "lorax_merge: too many elements for one selection launch");
  std::vector<at::Tensor> keep;
  SelectLaunch select;
  TableBuilder table;
  table.append(select_table.jobs());
  select.jobs_device = reinterpret_cast<const ThresholdJob*>(
      place_table(table.bytes(), select.jobs_inline, device, stream, keep));
  const int64_t ws_bytes = static_cast<int64_t>(
      select_workspace_bytes(dtype, select_table.split_jobs(), select_table.blocks()));
  at::Tensor ws = at::empty({ws_bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  select.dtype = dtype;
  select.num_jobs = static_cast<int32_t>(select_table.jobs().size());
  select.num_split_jobs = select_table.split_jobs();
  select.num_blocks = select_table.blocks();
  select.workspace = ws.data_ptr();
  select.thresholds = reinterpret_cast<MagnitudeThreshold*>(out.data_ptr<int64_t>());
  launch_select(select, stream);
}

int64_t stacked_rows(const at::Tensor& stacked) {
  return stacked.dim() == 0 ? 1 : stacked.size(0);
}

}  // namespace

struct CudaKernels {
  static void fused_merge(const MergeRequest& request) { run_batch({&request}); }

  static void magnitude_thresholds(const std::vector<at::Tensor>& tasks, double density,
                                   at::Tensor& out) {
    select_into(tasks, density, out);
  }

  static void fused_merge_many(const std::vector<MergeRequest>& requests) {
    std::vector<const MergeRequest*> ptrs;
    ptrs.reserve(requests.size());
    for (const MergeRequest& r : requests) ptrs.push_back(&r);
    run_batch(ptrs);
  }

  static void majority_sign_mask(const at::Tensor& stacked, SignElection election,
                                 at::Tensor& mask) {
    if (stacked.numel() == 0) return;
    TORCH_CHECK_VALUE(mask.device() == stacked.device(), "lorax_merge: mask is on ", mask.device(),
                      " but tensor is on ", stacked.device());
    c10::cuda::CUDAGuard guard(stacked.device());
    const int64_t rows = stacked_rows(stacked);
    launch_sign_mask(element_type(stacked.scalar_type()), election, stacked.const_data_ptr(),
                     mask.data_ptr<bool>(), rows, stacked.numel() / rows,
                     c10::cuda::getCurrentCUDAStream(stacked.device().index()).stream());
  }

  static void disjoint_merge(const at::Tensor& stacked, const at::Tensor& mask, at::Tensor& out) {
    if (out.numel() == 0) return;
    c10::cuda::CUDAGuard guard(stacked.device());
    launch_disjoint_merge(element_type(stacked.scalar_type()), stacked.const_data_ptr(),
                          mask.const_data_ptr<bool>(), out.data_ptr(), stacked_rows(stacked),
                          out.numel(),
                          c10::cuda::getCurrentCUDAStream(stacked.device().index()).stream());
  }
};

}  // namespace cuda

TORCH_LIBRARY_IMPL(lorax_merge, CUDA, m) {
  register_device_ops<cuda::CudaKernels>(m);
}

}  // namespace lorax_merge
