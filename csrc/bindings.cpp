// torch binding of the KV copy kernels (module kvpool.connector._kvcopy).
//
// Python hands over every layer's cache, layer 0's cache as a 5-D uint8 block view
// [blocks, kv (1|2), block_tokens, heads, bytes] (whatever its physical stride order; all layers
// share it) and the chunk as [layers, kv, tokens, heads, bytes]. Every argument is checked here, before any byte
// moves, so a bad call raises ValueError and leaves the destination untouched, even when this
// module is called directly rather than through kvpool.connector.kvcopy.
#include <torch/extension.h>
#include <torch/version.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <vector>

#include "kvcopy.h"

#ifdef KVPOOL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace kvpool {
namespace {

struct Dim {
  int64_t size, page, chunk;
};

// The box of one (layer, block) holding `tokens` tokens: dims sorted so the chunk side runs
// innermost, then merged into one contiguous run and at most kMaxDims strided dims.
KVCopyPlan make_plan(const at::Tensor& page, const at::Tensor& chunk, int64_t tokens, int64_t first,
                     int64_t count) {
  std::vector<Dim> dims;
  for (int d = 1; d < 5; ++d) {
    const int64_t size = d == 2 ? tokens : page.size(d);
    if (size != 1) dims.push_back({size, page.stride(d), chunk.stride(d)});
  }
  std::stable_sort(dims.begin(), dims.end(), [](const Dim& a, const Dim& b) {
    return a.chunk != b.chunk ? a.chunk < b.chunk : a.page < b.page;
  });
  int64_t run = 1;
  auto it = dims.begin();
  for (; it != dims.end() && it->page == run && it->chunk == run; ++it) run *= it->size;
  std::vector<Dim> outer;
  for (; it != dims.end(); ++it) {
    if (!outer.empty() && it->page == outer.back().page * outer.back().size &&
        it->chunk == outer.back().chunk * outer.back().size) {
      outer.back().size *= it->size;
    } else {
      outer.push_back(*it);
    }
  }
  TORCH_CHECK(outer.size() <= static_cast<size_t>(kMaxDims), "kvcopy: unexpected box of ", outer.size(),
              " strided dims");
  KVCopyPlan p;
  p.num_blocks = count;
  p.first_block = first;
  p.run_bytes = run;
  for (size_t i = 0; i < outer.size(); ++i) {
    p.size[i] = outer[i].size;
    p.page_stride[i] = outer[i].page;
    p.chunk_stride[i] = outer[i].chunk;
  }
  p.page_block_stride = page.stride(0);
  p.chunk_block_stride = page.size(2) * chunk.stride(2);
  p.chunk_layer_stride = chunk.stride(0);
  return p;
}

// layers: every layer's cache as vLLM hands it over (any dtype, all alike); pages: layer 0's 5-D
// uint8 block view [B, S, N, H, Db]. The same view is applied to every layer at its own address,
// so it is checked to stay inside every layer's storage.
void check_args(const std::vector<at::Tensor>& layers, const at::Tensor& pages, const at::Tensor& ids,
                const at::Tensor& chunk, bool to_chunk) {
  TORCH_CHECK_VALUE(!layers.empty(), "kvcopy: no KV cache layers given");
  const at::Tensor& first = layers[0];
  for (size_t l = 1; l < layers.size(); ++l) {
    const at::Tensor& t = layers[l];
    TORCH_CHECK_VALUE(t.scalar_type() == first.scalar_type() && t.sizes() == first.sizes() &&
                          t.strides() == first.strides() && t.device() == first.device(),
                      "kvcopy: layer ", l, " is ", t.sizes(), " ", t.scalar_type(), " with strides ", t.strides(),
                      " on ", t.device(), "; layer 0 is ", first.sizes(), " ", first.scalar_type(), " with strides ",
                      first.strides(), " on ", first.device());
  }
  TORCH_CHECK_VALUE(pages.dim() == 5 && pages.scalar_type() == at::kByte,
                    "kvcopy: the block view must be 5-D uint8, got ", pages.sizes(), " ", pages.scalar_type());
  TORCH_CHECK_VALUE(pages.device() == first.device() && pages.data_ptr() == first.data_ptr(),
                    "kvcopy: the block view must be a view of layer 0");
  int64_t extent = 1;  // bytes from a layer's address to one past the last byte the view reaches
  for (int d = 0; d < 5; ++d) {
    TORCH_CHECK_VALUE(pages.size(d) > 0, "kvcopy: empty KV cache dim ", d);
    TORCH_CHECK_VALUE(pages.size(d) == 1 || pages.stride(d) > 0, "kvcopy: KV cache dim ", d, " has stride 0");
    TORCH_CHECK_VALUE(chunk.dim() != 5 || chunk.size(d) == 1 || chunk.stride(d) > 0, "kvcopy: chunk dim ", d,
                      " has stride 0");
    extent += (pages.size(d) - 1) * pages.stride(d);
  }
  for (size_t l = 0; l < layers.size(); ++l) {
    const at::Tensor& t = layers[l];
    const int64_t offset = static_cast<const uint8_t*>(t.data_ptr()) - static_cast<const uint8_t*>(t.storage().data());
    TORCH_CHECK_VALUE(offset >= 0 && offset + extent <= static_cast<int64_t>(t.storage().nbytes()),
                      "kvcopy: the block view reaches past the storage of layer ", l);
  }
  TORCH_CHECK_VALUE(chunk.dim() == 5 && chunk.scalar_type() == at::kByte,
                    "kvcopy: the chunk must be a 5-D uint8 view, got ", chunk.sizes(), " ", chunk.scalar_type());
  const int64_t num_layers = static_cast<int64_t>(layers.size());
  TORCH_CHECK_VALUE(chunk.size(0) == num_layers && chunk.size(1) == pages.size(1) && chunk.size(3) == pages.size(3) &&
                        chunk.size(4) == pages.size(4),
                    "kvcopy: chunk ", chunk.sizes(), " does not match ", num_layers, " layers of blocks ",
                    pages.sizes());
  TORCH_CHECK_VALUE(pages.stride(4) == 1 && chunk.stride(4) == 1, "kvcopy: the innermost dim must be contiguous");
  TORCH_CHECK_VALUE(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.is_contiguous(),
                    "kvcopy: block ids must be a contiguous 1-D int64 CPU tensor");
  const int64_t count = ids.numel();
  const int64_t block_tokens = pages.size(2);
  const int64_t tokens = chunk.size(2);
  TORCH_CHECK_VALUE(count > 0 && tokens > (count - 1) * block_tokens && tokens <= count * block_tokens,
                    "kvcopy: ", tokens, " tokens do not fit ", count, " blocks of ", block_tokens,
                    " (the last block may be partial)");
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t num_blocks = pages.size(0);
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_VALUE(id[i] >= 0 && id[i] < num_blocks, "kvcopy: block id ", id[i], " at position ", i,
                      " is out of range: the cache has ", num_blocks, " blocks");
  }
  if (!to_chunk) {
    std::vector<int64_t> sorted(id, id + count);
    std::sort(sorted.begin(), sorted.end());
    const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    TORCH_CHECK_VALUE(dup == sorted.end(), "kvcopy: block id ", dup == sorted.end() ? 0 : *dup,
                      " appears twice in a scatter");
  }
  if (first.is_cpu()) {
    TORCH_CHECK_VALUE(chunk.is_cpu(), "kvcopy: a CPU KV cache needs a CPU chunk, got ", chunk.device());
  } else {
    TORCH_CHECK_VALUE(first.is_cuda(), "kvcopy: unsupported device ", first.device());
    TORCH_CHECK_VALUE(chunk.device() == first.device() || (chunk.is_cpu() && chunk.is_pinned()),
                      "kvcopy: a KV cache on ", first.device(),
                      " needs the chunk on the same device or in pinned host memory, got ", chunk.device(),
                      chunk.is_cpu() ? " (not pinned)" : "");
  }
}

// Threads split the boxes only past 2 MiB each: one core's memcpy already moves a few MiB in well
// under a millisecond, less than a parallel region costs on a busy machine.
void run_cpu(const KVCopyPlan& plan, const std::vector<uint64_t>& layers, const int64_t* ids, uint8_t* chunk,
             bool to_chunk) {
  const int64_t boxes = plan.num_layers * plan.num_blocks;
  const int64_t grain = std::max<int64_t>(1, (int64_t{2} << 20) / std::max<int64_t>(1, plan.box_bytes()));
  at::parallel_for(0, boxes, grain, [&](int64_t begin, int64_t end) {
    kvcopy_cpu_range(plan, layers.data(), ids, chunk, to_chunk, begin, end);
  });
}

#ifdef KVPOOL_WITH_CUDA
int vector_bytes(const std::vector<KVCopyPlan>& plans, const std::vector<uint64_t>& layers, uint64_t chunk) {
  int vec = 16;
  auto fits = [&vec](int64_t x) { return x % vec == 0; };
  for (; vec > 1; vec /= 2) {
    bool ok = fits(static_cast<int64_t>(chunk % 16));
    for (uint64_t ptr : layers) ok = ok && fits(static_cast<int64_t>(ptr % 16));
    for (const KVCopyPlan& p : plans) {
      ok = ok && fits(p.run_bytes) && fits(p.page_block_stride) && fits(p.chunk_block_stride) &&
           fits(p.chunk_layer_stride);
      for (int d = 0; d < kMaxDims; ++d) ok = ok && fits(p.page_stride[d]) && fits(p.chunk_stride[d]);
    }
    if (ok) break;
  }
  return vec;
}

void run_cuda(const std::vector<KVCopyPlan>& plans, const std::vector<uint64_t>& layers, const at::Tensor& ids,
              const at::Tensor& chunk, const at::Device& device, bool to_chunk) {
  for (const KVCopyPlan& p : plans) {
    TORCH_CHECK_VALUE(p.box_bytes() < (int64_t{1} << 31), "kvcopy: a block of one layer exceeds 2 GiB");
  }
  const c10::cuda::CUDAGuard guard(device);
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  // Layer addresses and block ids travel in one small pinned buffer, copied on the same stream
  // (the caching host allocator keeps it alive until that copy has run).
  const int64_t count = ids.numel();
  const int64_t n_layers = static_cast<int64_t>(layers.size());
  at::Tensor meta = at::empty({n_layers + count}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* m = meta.data_ptr<int64_t>();
  std::copy(layers.begin(), layers.end(), reinterpret_cast<uint64_t*>(m));
  std::copy(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + count, m + n_layers);
  const at::Tensor meta_dev = meta.to(at::TensorOptions().dtype(at::kLong).device(device), /*non_blocking=*/true);
  const auto* layers_dev = reinterpret_cast<const uint64_t*>(meta_dev.data_ptr<int64_t>());
  const int64_t* ids_dev = meta_dev.data_ptr<int64_t>() + n_layers;
  auto* chunk_ptr = static_cast<uint8_t*>(chunk.data_ptr());
  const int vec = vector_bytes(plans, layers, reinterpret_cast<uint64_t>(chunk_ptr));
  for (const KVCopyPlan& p : plans) {
    const int err = kvcopy_cuda_launch(p, layers_dev, ids_dev, chunk_ptr, to_chunk, vec, stream.stream());
    TORCH_CHECK(err == 0, "kvcopy: CUDA kernel launch failed: ", kvcopy_cuda_error_string(err));
  }
}
#endif

// layers: each layer's cache; pages: layer 0's uint8 block view [B, S, N, H, Db]; ids: int64 [K] on
// the CPU; chunk: uint8 [L, S, T, H, Db] with (K - 1) * N < T <= K * N. to_chunk: gather
// (cache -> chunk), else scatter (chunk -> cache).
void copy_blocks(const std::vector<at::Tensor>& layers, const at::Tensor& pages, const at::Tensor& ids,
                 const at::Tensor& chunk, bool to_chunk) {
  check_args(layers, pages, ids, chunk, to_chunk);
  const int64_t count = ids.numel();
  const int64_t block_tokens = pages.size(2);
  const int64_t last_tokens = chunk.size(2) - (count - 1) * block_tokens;
  std::vector<KVCopyPlan> plans;
  if (last_tokens == block_tokens) {
    plans.push_back(make_plan(pages, chunk, block_tokens, 0, count));
  } else {  // the last block is partial: its own, smaller box
    if (count > 1) plans.push_back(make_plan(pages, chunk, block_tokens, 0, count - 1));
    plans.push_back(make_plan(pages, chunk, last_tokens, count - 1, 1));
  }
  std::vector<uint64_t> addresses;
  addresses.reserve(layers.size());
  for (const at::Tensor& t : layers) addresses.push_back(reinterpret_cast<uint64_t>(t.data_ptr()));
  for (KVCopyPlan& p : plans) p.num_layers = static_cast<int64_t>(addresses.size());
  if (pages.is_cpu()) {
    auto* chunk_ptr = static_cast<uint8_t*>(chunk.data_ptr());
    for (const KVCopyPlan& p : plans) run_cpu(p, addresses, ids.data_ptr<int64_t>(), chunk_ptr, to_chunk);
    return;
  }
#ifdef KVPOOL_WITH_CUDA
  run_cuda(plans, addresses, ids, chunk, pages.device(), to_chunk);
#else
  TORCH_CHECK_VALUE(false, "kvcopy: this build has no CUDA kernels (built against a CPU-only torch)");
#endif
}

bool cuda_built() {
#ifdef KVPOOL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

}  // namespace
}  // namespace kvpool

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kvpool KV copy kernels: paged KV blocks <-> contiguous chunks, all layers in one call";
  m.def("copy_blocks", &kvpool::copy_blocks, "Gather (to_chunk) or scatter a block table, all layers",
        pybind11::arg("layers"), pybind11::arg("pages"), pybind11::arg("ids"), pybind11::arg("chunk"), pybind11::arg("to_chunk"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("cuda_built", &kvpool::cuda_built, "Whether this build has the CUDA kernels");
  m.def("torch_version", &kvpool::torch_version, "The torch version this module was built against");
}
