// CUDA kernel: one thread block per (layer, block) box; its threads move the box's runs in words of
// vec_bytes (16 where alignment allows). The chunk side may be pinned host memory, read or written
// straight over UVA (no staging copy): consecutive threads touch consecutive chunk bytes, so each
// warp issues whole 512-byte requests, and every thread keeps kUnroll loads in flight to hide the
// latency of the bus. Plain CUDA runtime, no torch headers (see kvcopy.h).
#include <cuda_runtime.h>

#include <cstdint>

#include "kvcopy.h"

namespace kvpool {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

// Byte offsets of word t of a box: the run index decomposed over the plan's dims, innermost first.
__device__ __forceinline__ void word_offsets(const KVCopyPlan& p, int words_per_run, int t,
                                             int vec, int64_t* page_off, int64_t* chunk_off) {
  const int col = t % words_per_run;
  int run = t / words_per_run;
  const int c = run % static_cast<int>(p.size[0]);
  run /= static_cast<int>(p.size[0]);
  const int b = run % static_cast<int>(p.size[1]);
  const int a = run / static_cast<int>(p.size[1]);
  const int64_t within = static_cast<int64_t>(col) * vec;
  *page_off = a * p.page_stride[2] + b * p.page_stride[1] + c * p.page_stride[0] + within;
  *chunk_off = a * p.chunk_stride[2] + b * p.chunk_stride[1] + c * p.chunk_stride[0] + within;
}

template <typename V>
__global__ void __launch_bounds__(kThreads)
    kvcopy_kernel(KVCopyPlan p, const uint64_t* __restrict__ layers, const int64_t* __restrict__ ids,
                  uint8_t* __restrict__ chunk, bool to_chunk) {
  const int64_t w = blockIdx.x;
  const int64_t layer = w / p.num_blocks;
  const int64_t i = p.first_block + w % p.num_blocks;
  uint8_t* page = reinterpret_cast<uint8_t*>(layers[layer]) + ids[i] * p.page_block_stride;
  uint8_t* part = chunk + layer * p.chunk_layer_stride + i * p.chunk_block_stride;
  uint8_t* src = to_chunk ? page : part;
  uint8_t* dst = to_chunk ? part : page;
  constexpr int vec = sizeof(V);
  const int words_per_run = static_cast<int>(p.run_bytes / vec);
  const int total = static_cast<int>(p.runs_per_box()) * words_per_run;
  for (int base = threadIdx.x; base < total; base += kThreads * kUnroll) {
    V buf[kUnroll];
    int64_t dst_off[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * kThreads;
      if (t < total) {
        int64_t page_off, chunk_off;
        word_offsets(p, words_per_run, t, vec, &page_off, &chunk_off);
        const int64_t src_off = to_chunk ? page_off : chunk_off;
        dst_off[u] = to_chunk ? chunk_off : page_off;
        buf[u] = *reinterpret_cast<const V*>(src + src_off);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * kThreads < total) {
        *reinterpret_cast<V*>(dst + dst_off[u]) = buf[u];
      }
    }
  }
}

template <typename V>
cudaError_t launch(const KVCopyPlan& p, const uint64_t* layers, const int64_t* ids, uint8_t* chunk,
                   bool to_chunk, cudaStream_t stream) {
  const int64_t boxes = p.num_layers * p.num_blocks;
  if (boxes == 0) return cudaSuccess;
  kvcopy_kernel<V><<<static_cast<unsigned int>(boxes), kThreads, 0, stream>>>(p, layers, ids, chunk,
                                                                              to_chunk);
  return cudaGetLastError();
}

}  // namespace

int kvcopy_cuda_launch(const KVCopyPlan& plan, const uint64_t* layers, const int64_t* ids, uint8_t* chunk,
                       bool to_chunk, int vec_bytes, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (vec_bytes) {
    case 16: return launch<uint4>(plan, layers, ids, chunk, to_chunk, s);
    case 8: return launch<uint2>(plan, layers, ids, chunk, to_chunk, s);
    case 4: return launch<uint32_t>(plan, layers, ids, chunk, to_chunk, s);
    case 2: return launch<uint16_t>(plan, layers, ids, chunk, to_chunk, s);
    case 1: return launch<uint8_t>(plan, layers, ids, chunk, to_chunk, s);
    default: return cudaErrorInvalidValue;
  }
}

const char* kvcopy_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

}  // namespace kvpool
