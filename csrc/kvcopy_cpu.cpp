// CPU kernel: one memcpy per contiguous run; the caller splits the (layer, block) boxes over
// threads. Runs are a head's K or V row (head_dim bytes) for the K|V layouts, a whole block for
// MLA: the binding merged every dim it could into the run.
#include <cstring>

#include "kvcopy.h"

namespace kvpool {

void kvcopy_cpu_range(const KVCopyPlan& p, const uint64_t* layers, const int64_t* ids, uint8_t* chunk,
                      bool to_chunk, int64_t begin, int64_t end) {
  const int64_t run = p.run_bytes;
  for (int64_t w = begin; w < end; ++w) {
    const int64_t layer = w / p.num_blocks;
    const int64_t i = p.first_block + w % p.num_blocks;
    uint8_t* page = reinterpret_cast<uint8_t*>(layers[layer]) + ids[i] * p.page_block_stride;
    uint8_t* part = chunk + layer * p.chunk_layer_stride + i * p.chunk_block_stride;
    for (int64_t a = 0; a < p.size[2]; ++a) {
      for (int64_t b = 0; b < p.size[1]; ++b) {
        uint8_t* pg = page + a * p.page_stride[2] + b * p.page_stride[1];
        uint8_t* ch = part + a * p.chunk_stride[2] + b * p.chunk_stride[1];
        if (to_chunk) {
          for (int64_t c = 0; c < p.size[0]; ++c) {
            std::memcpy(ch + c * p.chunk_stride[0], pg + c * p.page_stride[0], run);
          }
        } else {
          for (int64_t c = 0; c < p.size[0]; ++c) {
            std::memcpy(pg + c * p.page_stride[0], ch + c * p.chunk_stride[0], run);
          }
        }
      }
    }
  }
}

}  // namespace kvpool
