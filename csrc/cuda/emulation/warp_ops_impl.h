// Warp-wide operations: the named lanes meet, one combine step computes every lane's result
// (__syncwarp, shuffles, votes, and the tensor-core emulation of ptx.h). Lanes that
// meet in different operations, or a mask naming absent lanes, are errors. Part of
// implementation.h.
#pragma once

#include <cstdio>
#include <cstring>
#include <string>

#include "scheduler_impl.h"

namespace cem::emu::detail {

void warp_collective(Site site, const char* kind, unsigned mask, void* arg, Combine combine, const void* context) {
  Thread& t = current_thread(kind);
  Worker& w = *t.worker;
  WarpSync& sync = w.warps[t.warp];
  const unsigned bit = 1u << t.lane;
  if (!(mask & bit) || (mask & ~sync.lanes)) {
    char mask_text[16];
    std::snprintf(mask_text, sizeof mask_text, "0x%08x", mask);
    if (!(mask & bit)) {
      fatal(describe_thread(w, t) + ": " + kind + " with mask " + mask_text + ", which does not name the calling lane",
            cudaErrorLaunchFailure);
    }
    divergent(describe_thread(w, t) + ": " + kind + " (" + site_text(site) + ") with mask " + mask_text +
              " names lanes that have exited or do not exist (the block has " + std::to_string(w.nthreads) + " threads)");
  }
  t.collective = kind;
  t.mask = mask;
  t.arg = arg;
  t.combine = combine;
  t.context_arg = context;
  t.site = site;
  t.state = ThreadState::kInCollective;
  sync.arrived |= bit;
  if ((sync.arrived & mask) != mask) {
    wait_until_runnable(w, t);
    return;
  }
  void* args[kWarp] = {};
  for (int lane = 0; lane < kWarp; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    Thread& u = w.threads[t.warp * kWarp + lane];
    if (u.mask != mask || std::strcmp(u.collective, kind) != 0) {
      divergent("lanes of warp " + std::to_string(t.warp) + " met in different warp operations");
    }
    args[lane] = u.arg;
  }
  if (combine != nullptr) combine(args, mask, context);
  sync.arrived &= ~mask;
  for (int lane = 0; lane < kWarp; ++lane) {
    if (mask >> lane & 1u) w.threads[t.warp * kWarp + lane].state = ThreadState::kRunnable;
  }
}

void warp_collective_error(const char* kind, const char* problem) {
  Thread& t = current_thread(kind);
  fatal(describe_thread(*t.worker, t) + ": " + kind + ": " + problem, cudaErrorLaunchFailure);
}

inline void syncwarp_combine(void* const*, unsigned mask, const void*) {
  Thread& t = *current_fiber();
  WarpSync& sync = t.worker->warps[t.warp];
  ++sync.seq;
  if (mask == sync.lanes) {
    sync.full_seq = sync.seq;
    return;
  }
  for (int a = 0; a < kWarp; ++a) {
    if (!(mask >> a & 1u)) continue;
    for (int b = 0; b < kWarp; ++b) {
      if (mask >> b & 1u) sync.pair_seq[a][b] = sync.seq;
    }
  }
}

void syncwarp(Site site, unsigned mask) {
  Worker& w = *current_thread("__syncwarp").worker;
  note_site(w, "__syncwarp", site);
  if (fault_applies(w, Fault::kDropSyncwarp, site)) return;
  warp_collective(site, "__syncwarp", mask, nullptr, &syncwarp_combine, nullptr);
}

struct ShuffleArg {
  uint64_t in, out;
  ShuffleKind kind;
  int arg, width;
};

inline void shuffle_combine(void* const* lane_args, unsigned mask, const void* context) {
  for (int lane = 0; lane < kWarp; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    auto* a = static_cast<ShuffleArg*>(lane_args[lane]);
    const int segment = lane & ~(a->width - 1);
    int source = lane;
    switch (a->kind) {
      case ShuffleKind::kIdx: source = segment + (a->arg & (a->width - 1)); break;
      case ShuffleKind::kUp: source = lane - a->arg < segment ? lane : lane - a->arg; break;
      case ShuffleKind::kDown: source = lane + a->arg >= segment + a->width ? lane : lane + a->arg; break;
      case ShuffleKind::kXor: source = (lane ^ a->arg) >= segment + a->width ? lane : lane ^ a->arg; break;
    }
    if (source < 0 || source >= kWarp || !(mask >> source & 1u)) {
      const std::string problem = "lane " + std::to_string(lane) + " reads lane " + std::to_string(source) +
                                  ", which is not in the mask (its value is undefined)";
      warp_collective_error(static_cast<const char*>(context), problem.c_str());
    }
    a->out = static_cast<ShuffleArg*>(lane_args[source])->in;
  }
}

uint64_t shuffle(Site site, ShuffleKind kind, unsigned mask, uint64_t value, int arg, int width) {
  static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
  const char* name = names[static_cast<int>(kind)];
  if (width <= 0 || width > kWarp || (width & (width - 1)) != 0) warp_collective_error(name, "width must be a power of two up to 32");
  ShuffleArg a{value, 0, kind, arg, width};
  warp_collective(site, name, mask, &a, &shuffle_combine, name);
  return a.out;
}

struct VoteArg {
  int predicate;
  unsigned out;
  VoteKind kind;
};

inline void vote_combine(void* const* lane_args, unsigned mask, const void*) {
  unsigned ballot = 0;
  for (int lane = 0; lane < kWarp; ++lane) {
    if ((mask >> lane & 1u) && static_cast<VoteArg*>(lane_args[lane])->predicate != 0) ballot |= 1u << lane;
  }
  for (int lane = 0; lane < kWarp; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    auto* a = static_cast<VoteArg*>(lane_args[lane]);
    a->out = a->kind == VoteKind::kBallot ? ballot : (a->kind == VoteKind::kAny ? ballot != 0 : ballot == mask);
  }
}

unsigned vote(Site site, VoteKind kind, unsigned mask, int predicate) {
  static const char* names[] = {"__ballot_sync", "__any_sync", "__all_sync"};
  VoteArg a{predicate, 0, kind};
  warp_collective(site, names[static_cast<int>(kind)], mask, &a, &vote_combine, nullptr);
  return a.out;
}

}  // namespace cem::emu::detail
