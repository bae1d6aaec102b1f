// The fused CPU attention core: the parameter structs its kernels see (raw pointers, sizes and
// flags; no torch), the workspace each needs, and the table of kernels built for the
// instruction set picked at run time. The glue in attention_forward.cpp / attention_backward.cpp
// turns tensors into these structs; the kernels live in attention_*_block.h.
//
// Layout (all row-major, accumulation dtype T = float or double; NB = key blocks):
//   context c, iterate x:        (B, N, D)
//   keys, queries, head outputs: (B, N, H * Dh)   (k^k_j = W_Kk c_j; the order of head_outputs)
//   key tiles:                   (B, H, NB, Dh, kKeyBlock)  k^T per key block, zero-padded
//   context tiles:               (B, NB, D, kKeyBlock)      c^T per key block, zero-padded
//   lse:                         (B, H, N)
// The transposed tiles are made once per call, so the score products read contiguous panels
// and no tile is packed inside the loops.
#pragma once

#include <cstdint>

namespace cem::cpu {

// Tile sizes: one query block is one work item; key blocks are the inner loop.
inline constexpr int64_t kQueryBlock = 64;
inline constexpr int64_t kKeyBlock = 64;

enum class DiagKind { kNone, kShared, kPerHead };

// Inputs fixed for a whole call (the context and keys never move).
template <typename T>
struct AttnCoreInputs {
  int64_t batch, seq, dim, heads, head_dim;
  DiagKind diag_kind;
  T scale;                // beta
  const T* context;       // c = x^0
  const T* keys;          // computed once per call
  const T* key_tiles;     // keys transposed per key block
  const T* context_tiles; // context transposed per key block
  const T* diag;          // lambda: (D,) shared or (H, D) per head; null without a diagonal
  const T* alibi_slopes;  // (H,) or null
};

// One forward step: attention, then the fused epilogue Delta += eta P (W_Q^T o + vbar).
template <typename T>
struct AttnFwdParams {
  AttnCoreInputs<T> in;
  const T* x;                  // iterate x^t
  const T* queries;            // beta W_Q x^t (pre-scaled)
  const T* w_q;                // (H * Dh, D)
  const T* precond_diag;       // p (D,) or null (p = 1)
  const T* precond_lowrank;    // U (D, R) or null
  const T* precond_lowrank_t;  // U^T (R, D) or null
  int64_t rank;
  T step_size;                 // eta_{t+1}
  int64_t strips;              // score strips kept from pass 1 for pass 2; 0: pass 2 recomputes
  T* delta;                    // running Delta, updated in place
  T* head_outputs;             // o^t, written when not null
  T* diag_values;              // sum_k lambda_k * obar^k, written when not null (needs a diagonal)
  T* lse;                      // written when not null
};

// One backward step: the softmax and score gradients for given dG (docs/backward.md, 3-4).
template <typename T>
struct AttnBwdParams {
  AttnCoreInputs<T> in;
  const T* x;              // iterate x^t
  const T* queries;        // beta W_Q x^t
  const T* head_outputs;   // saved o^t
  const T* lse;            // saved lse^t
  const T* grad_heads;     // do = W_Q dG
  const T* grad_neg_grad;  // dG
  int64_t strips;          // probability and y.c strips kept from pass 1; 0: pass 2 recomputes
  T* grad_queries;         // dq = beta sum_j ds k, written (owned by the query block)
  T* grad_x_scores;        // beta sum_k lambda_k * r^k, written; null without a diagonal
};

// Key-side sums of one chunk of work items. Query blocks of different chunks touch the same
// keys, so every chunk owns its own zeroed copy and the glue adds the copies up afterwards:
// race-free without atomics, at the price of one (B, N, H*Dh + D) buffer per chunk.
template <typename T>
struct AttnKeySums {
  T* grad_keys;     // sum_i (beta ds^T q + p^T do)
  T* grad_context;  // (B, N, D): lambda * (beta dSbar^T x + Pbar^T dG); null without a diagonal
  T* grad_diag;     // (D,) or (H, D): sum_j c_j * (beta dSbar^T x + Pbar^T dG)_j
};

template <typename T>
struct AttnCoreKernels {
  const char* isa;
  void (*forward_block)(const AttnFwdParams<T>&, int64_t batch_index, int64_t query_block, T* workspace);
  void (*backward_block)(
      const AttnBwdParams<T>&, const AttnKeySums<T>&, int64_t batch_index, int64_t query_block, T* workspace);
};

// Chosen once per call: AVX2 + FMA when the CPU has them, the baseline build otherwise;
// CEM_OPS_CPU_ISA=generic or =avx2 forces one (tests run both).
template <typename T>
AttnCoreKernels<T> attention_core_kernels();

// Workspace elements one work item needs (tiles and per-row statistics).
inline int64_t forward_workspace_size(int64_t dim, int64_t heads, int64_t head_dim, int64_t rank) {
  const int64_t q = kQueryBlock, k = kKeyBlock, hd = heads * head_dim;
  return 3 * heads * q         // running max, running sum, lse
         + q * hd              // o
         + 3 * q * dim         // beta lambda * x, vbar, G
         + 3 * q * k           // scores, diagonal scores, Pbar
         + k * dim             // lambda_k * c (per-head diagonal)
         + q * (rank > 0 ? rank : 1) + k;
}

inline int64_t backward_workspace_size(int64_t dim, int64_t heads, int64_t head_dim) {
  const int64_t q = kQueryBlock, k = kKeyBlock, hd = heads * head_dim;
  return heads * q             // Delta
         + q * hd              // dq
         + 4 * q * dim         // beta x, beta lambda * x, y = lambda * dG, r
         + 6 * q * k           // scores/probabilities, dP/dS, diagonal scores, y.c, Pbar, dSbar
         + 2 * k * dim         // lambda_k * c (per-head diagonal), z
         + k;
}

inline int64_t key_blocks_of(int64_t seq) { return (seq + kKeyBlock - 1) / kKeyBlock; }

// Score strips. With a diagonal both directions pass over the keys twice; the second pass can
// reuse what the first computed for its query block instead of recomputing it: each head's
// scores (forward), each head's probabilities and each group's y.c (backward). One strip is
// kQueryBlock x N (padded to key blocks), so the memory stays linear in N; the glue turns
// strips off (strips = 0, recompute) when they would pass a byte budget. Both ways give the
// same bits: the strip holds exactly the values the recomputation would produce.
inline int64_t forward_strip_count(DiagKind kind, int64_t heads) { return kind == DiagKind::kNone ? 0 : heads; }

inline int64_t backward_strip_count(DiagKind kind, int64_t heads) {
  switch (kind) {
    case DiagKind::kShared: return heads + 1;
    case DiagKind::kPerHead: return 2 * heads;
    case DiagKind::kNone: break;
  }
  return 0;
}

inline int64_t strip_elements(int64_t strips, int64_t seq) {
  return strips * kQueryBlock * key_blocks_of(seq) * kKeyBlock;
}

// Work items are (batch, query block). Causal blocks near the end cost more, so items are
// visited in folded order 0, n-1, 1, n-2, ...: any contiguous range of items then carries a
// fair share of the work, which is what a static split across threads hands out.
inline void item_of(int64_t item, int64_t blocks, int64_t* batch_index, int64_t* query_block) {
  *batch_index = item / blocks;
  const int64_t r = item % blocks;
  *query_block = (r % 2 == 0) ? r / 2 : blocks - 1 - r / 2;
}

}  // namespace cem::cpu
