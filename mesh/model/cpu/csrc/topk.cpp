// The router's top-k as torch.topk(largest=True, sorted=True) picks it on the CPU, ties included:
// torch selects with the C++ standard library (std::partial_sort when k * 64 <= n, else
// std::nth_element and a std::sort of the first k - 1) under a comparator that puts NaN first and
// otherwise orders by value; equal values come out in whatever order those algorithms leave them.
// Calling the same algorithms with the same comparator on the same (value, index) sequence
// reproduces that order exactly, so routing here picks the experts transformers' routing picks.
// The only C++ among the kernels; extern "C" entry points.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

extern "C" int mesh_route_weights(const void *logits, int logits_bf16, int64_t T, int64_t E, const int64_t *ids,
                                  int64_t K, int normalize, void *weights, int weights_bf16);

namespace {
using elem_t = std::pair<float, int64_t>;

bool before(const elem_t &x, const elem_t &y) {
    return (std::isnan(x.first) && !std::isnan(y.first)) || (x.first > y.first);
}
}  // namespace

// logits [T, E] (float32, or bf16 when logits_bf16) -> ids [T, K], the K largest per row in
// torch.topk's order. Returns 0, -1 for K outside [1, E], -4 out of memory.
extern "C" int mesh_topk(const void *logits, int logits_bf16, int64_t T, int64_t E, int64_t K, int64_t *ids) {
    if (K < 1 || K > E) return -1;
    try {
        std::vector<elem_t> queue(static_cast<size_t>(E));
        for (int64_t t = 0; t < T; t++) {
            for (int64_t e = 0; e < E; e++) {
                float v;
                if (logits_bf16) {
                    const uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t *>(logits)[t * E + e]) << 16;
                    std::memcpy(&v, &u, 4);
                } else {
                    v = static_cast<const float *>(logits)[t * E + e];
                }
                queue[e] = elem_t(v, e);
            }
            if (K * 64 <= E) {
                std::partial_sort(queue.begin(), queue.begin() + K, queue.end(), before);
            } else {
                std::nth_element(queue.begin(), queue.begin() + K - 1, queue.end(), before);
                std::sort(queue.begin(), queue.begin() + K - 1, before);
            }
            for (int64_t j = 0; j < K; j++) ids[t * K + j] = queue[j].second;
        }
    } catch (const std::bad_alloc &) {
        return -4;
    }
    return 0;
}

// The whole routing of moe.route: ids as mesh_topk, then the weights as mesh_route_weights.
extern "C" int mesh_route(const void *logits, int logits_bf16, int64_t T, int64_t E, int64_t K, int normalize,
                          int64_t *ids, void *weights, int weights_bf16) {
    const int rc = mesh_topk(logits, logits_bf16, T, E, K, ids);
    return rc != 0 ? rc : mesh_route_weights(logits, logits_bf16, T, E, ids, K, normalize, weights, weights_bf16);
}
