// kvpool's KV copy kernels: paged KV blocks <-> contiguous chunk, all layers of a batch of blocks
// in one call. Plain C++/CUDA, no torch: the torch binding (bindings.cpp) validates tensors and
// builds a KVCopyPlan; the CPU kernel (kvcopy_cpu.cpp) and the CUDA kernel (kvcopy_cuda.cu) only
// move bytes. Keeping torch out of the kernels lets a CPU-only machine prove the .cu compiles.
//
// The copy of one (layer, block) is a box of up to three strided dims of contiguous byte runs,
// the same box for every layer and block: the binding derives it from a 5-D block view
// [blocks, kv (1|2), tokens, heads, bytes] of each layer, whatever the backend's stride order.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define KVPOOL_HOST_DEVICE __host__ __device__
#else
#define KVPOOL_HOST_DEVICE
#endif

namespace kvpool {

constexpr int kMaxDims = 3;

struct KVCopyPlan {
  int64_t num_layers = 0;
  int64_t num_blocks = 0;    // block-table entries this plan covers
  int64_t first_block = 0;   // index of the first of them in the block table
  int64_t run_bytes = 0;     // contiguous bytes on both sides: the unit of a copy
  int64_t size[kMaxDims] = {1, 1, 1};          // dims around a run, innermost first
  int64_t page_stride[kMaxDims] = {0, 0, 0};   // bytes, in a layer's paged cache
  int64_t chunk_stride[kMaxDims] = {0, 0, 0};  // bytes, in the chunk
  int64_t page_block_stride = 0;   // bytes between block ids in a layer's cache
  int64_t chunk_block_stride = 0;  // bytes between block-table positions in the chunk
  int64_t chunk_layer_stride = 0;  // bytes between layers in the chunk

  KVPOOL_HOST_DEVICE int64_t runs_per_box() const { return size[0] * size[1] * size[2]; }
  KVPOOL_HOST_DEVICE int64_t box_bytes() const { return runs_per_box() * run_bytes; }
};

// Copies the (layer, block) boxes w in [begin, end), w = layer * num_blocks + j, on this thread.
// layers[l] is the base address of layer l's cache; ids the whole block table.
void kvcopy_cpu_range(const KVCopyPlan& plan, const uint64_t* layers, const int64_t* ids,
                      uint8_t* chunk, bool to_chunk, int64_t begin, int64_t end);

// Launches the copy of every box of the plan on `stream` (a cudaStream_t). layers and ids are
// device arrays; chunk is device memory or pinned host memory (read/written over UVA). vec_bytes
// (1, 2, 4, 8 or 16) must divide run_bytes, every stride and every base address. Returns the
// cudaError_t of the launch as an int, so this header stays free of CUDA headers.
int kvcopy_cuda_launch(const KVCopyPlan& plan, const uint64_t* layers, const int64_t* ids,
                       uint8_t* chunk, bool to_chunk, int vec_bytes, void* stream);

// The text of a cudaError_t returned by kvcopy_cuda_launch.
const char* kvcopy_cuda_error_string(int error);

}  // namespace kvpool
