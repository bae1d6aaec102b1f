// Running a block: its threads as fibers that switch only at barriers and warp-wide
// operations; a barrier or warp operation some thread can never reach ends the block with a
// report instead of hanging. Also the built-in variables and __syncthreads. Part of
// implementation.h.
#pragma once

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "checker_impl.h"

namespace cem::emu::detail {

inline void resume(Worker& w, Thread& t) {
  ++w.switches;
  switch_context(w.scheduler, t.context);
}

// Back to the scheduler until another thread completes what this one waits for.
inline void wait_until_runnable(Worker& w, Thread& t) {
  while (t.state != ThreadState::kRunnable) switch_context(t.context, w.scheduler);
}

inline void note_site(Worker& w, const char* kind, const Site& site) {
  static thread_local std::set<std::tuple<const char*, const char*, const char*, int>> seen;
  if (!seen.insert({w.launch->kernel, kind, site.file, site.line}).second) return;
  std::lock_guard<std::mutex> lock(globals().mutex);
  globals().sync_sites.insert({w.launch->kernel, kind, site.file, site.line});
}

inline bool fault_applies(const Worker& w, Fault fault, const Site& site) {
  const FaultPlan& plan = w.fault;
  if (plan.fault != fault || plan.line != site.line) return false;
  const size_t n = std::strlen(site.file), m = plan.file_suffix.size();
  return n >= m && plan.file_suffix.compare(0, m, site.file + (n - m)) == 0;
}

// "threads 0-63 wait at __syncthreads (file:line); threads 64-127 exited": who blocks the block.
inline std::string describe_waiters(const Worker& w) {
  auto what = [&](const Thread& t) -> std::string {
    switch (t.state) {
      case ThreadState::kDone: return "exited";
      case ThreadState::kAtBarrier: return "wait at __syncthreads (" + site_text(t.site) + ")";
      case ThreadState::kInCollective: {
        char mask[16];
        std::snprintf(mask, sizeof mask, "0x%08x", t.mask);
        return std::string("wait in ") + t.collective + " (" + site_text(t.site) + ") with mask " + mask;
      }
      default: return "can run";
    }
  };
  std::string out;
  for (int begin = 0; begin < w.nthreads;) {
    const std::string state = what(w.threads[begin]);
    int end = begin + 1;
    while (end < w.nthreads && what(w.threads[end]) == state) ++end;
    if (!out.empty()) out += "; ";
    out += end - begin > 1 ? "threads " : "thread ";
    out += std::to_string(begin);
    if (end - begin > 1) {
      out += '-';
      out += std::to_string(end - 1);
    }
    out += ' ';
    out += state;
    begin = end;
  }
  return out;
}

[[noreturn]] inline void divergent(const std::string& problem) {
  fatal(problem + ": " + describe_waiters(worker()) +
            " (a barrier or warp operation that not every thread reaches; compute-sanitizer --tool synccheck "
            "reports divergent barriers)",
        cudaErrorLaunchFailure);
}

inline bool copies_in_flight(const Thread& t) {
  if (!t.async_open.empty()) return true;
  for (const auto& group : t.async_committed) {
    if (!group.empty()) return true;  // an empty group in flight is harmless
  }
  return false;
}

inline void thread_exit(Worker& w, Thread& t) {
  if (copies_in_flight(t)) {
    w.report.add(describe_thread(w, t) + " exited with cp.async copies it never waited for (cp.async.wait_group) [" +
                     describe_block(w) + "]",
                 cudaErrorLaunchFailure);
  }
  t.state = ThreadState::kDone;
  ++w.done;
  WarpSync& sync = w.warps[t.warp];
  sync.lanes &= ~(1u << t.lane);
  if (w.arrived > 0) divergent(describe_thread(w, t) + " exited while others wait at a barrier");
  for (int lane = 0; lane < kWarp; ++lane) {
    const int tid = t.warp * kWarp + lane;
    if (tid < w.nthreads && w.threads[tid].state == ThreadState::kInCollective && (w.threads[tid].mask >> t.lane & 1u)) {
      divergent(describe_thread(w, t) + " exited while a warp operation naming it waits");
    }
  }
}

inline void fiber_main(void* arg) {
  auto& t = *static_cast<Thread*>(arg);
  Worker& w = *t.worker;
  w.launch->body(w.launch->closure);
  thread_exit(w, t);
  switch_context(t.context, w.scheduler);  // never resumed
  __builtin_unreachable();
}

inline void run_block(Worker& w, uint3 block_idx, std::vector<int>& order, std::mt19937_64& rng) {
  const dim3& b = w.launch->block;
  w.block_idx = block_idx;
  w.nthreads = static_cast<int>(b.x * b.y * b.z);
  w.nwarps = (w.nthreads + kWarp - 1) / kWarp;
  w.arrived = w.done = 0;
  w.epoch = 0;
  w.aborted = false;
  if (++w.stamp == 0) {  // wrapped: forget every granule
    for (auto& g : w.shadow) g.stamp = 0;
    w.stamp = 1;
  }
  std::memset(w.smem, 0xff, w.launch->smem);  // NaN in float, half and bfloat16 alike (and so is the rest)
  for (int k = 0; k < w.nwarps; ++k) {
    WarpSync& sync = w.warps[k];
    const int lanes = std::min(kWarp, w.nthreads - k * kWarp);
    sync.lanes = lanes == kWarp ? 0xffffffffu : (1u << lanes) - 1;
    sync.arrived = 0;
    sync.seq = sync.full_seq = 0;
    std::memset(sync.pair_seq, 0, sizeof sync.pair_seq);
  }
  for (int i = 0; i < w.nthreads; ++i) {
    Thread& t = w.threads[i];
    if (t.stack.base == nullptr) {
      t.stack.allocate(&t);
      t.worker = &w;
      t.stack_lo = reinterpret_cast<uintptr_t>(t.stack.lo());
      t.stack_hi = reinterpret_cast<uintptr_t>(t.stack.hi());
    }
    t.tid = i;
    t.idx = uint3{i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
    t.warp = i / kWarp;
    t.lane = i % kWarp;
    t.state = ThreadState::kRunnable;
    t.async_open.clear();
    t.async_committed.clear();
    t.context.prepare(t.stack, &fiber_main, &t);
  }
  order.resize(w.nthreads);
  std::iota(order.begin(), order.end(), 0);
  if (w.config.block_order == BlockOrder::kShuffled) std::shuffle(order.begin(), order.end(), rng);

  while (w.done < w.nthreads && !w.aborted) {
    bool ran = false;
    for (int i : order) {
      if (w.threads[i].state != ThreadState::kRunnable) continue;
      resume(w, w.threads[i]);
      ran = true;
      if (w.aborted) break;
    }
    if (!ran && !w.aborted) {
      w.report.add("deadlock: no thread can continue: " + describe_waiters(w) +
                       " (a barrier or warp operation that not every thread reaches; compute-sanitizer --tool "
                       "synccheck reports divergent barriers) [" + describe_block(w) + "]",
                   cudaErrorLaunchFailure, true);
      w.aborted = true;
    }
  }
}

uint3 thread_idx() { return current_thread("threadIdx").idx; }
uint3 block_idx() { return current_thread("blockIdx").worker->block_idx; }
dim3 block_dim() { return current_thread("blockDim").worker->launch->block; }
dim3 grid_dim() { return current_thread("gridDim").worker->launch->grid; }
unsigned char* dynamic_smem() { return current_thread("dynamic shared memory").worker->smem; }
int lane_id() { return current_thread("the lane id").lane; }

void syncthreads(Site site) {
  Thread& t = current_thread("__syncthreads");
  Worker& w = *t.worker;
  note_site(w, "__syncthreads", site);
  if (fault_applies(w, Fault::kDropBarrier, site)) return;
  if (fault_applies(w, Fault::kDivergentBarrier, site) && t.tid >= w.nthreads / 2) return;
  t.state = ThreadState::kAtBarrier;
  t.site = site;
  ++w.arrived;
  if (w.done > 0) divergent(describe_thread(w, t) + " reached __syncthreads (" + site_text(site) + ") after other threads exited");
  if (w.arrived < w.nthreads) {
    wait_until_runnable(w, t);
    return;
  }
  for (int i = 0; i < w.nthreads; ++i) {
    const Site& other = w.threads[i].site;
    if (other.line != site.line || std::strcmp(other.file, site.file) != 0) {
      divergent("threads of the block met at different __syncthreads calls");
    }
  }
  ++w.epoch;
  w.arrived = 0;
  for (int i = 0; i < w.nthreads; ++i) w.threads[i].state = ThreadState::kRunnable;
}

}  // namespace cem::emu::detail
