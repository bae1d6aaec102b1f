// The emulator's state: per host thread a Worker that runs one block at a time (its threads as
// fibers, its shared memory arena and that arena's shadow), the settings, and the report of the
// current launch. Part of implementation.h.
#pragma once

#include <dlfcn.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "fiber.h"
#include "runtime.h"

namespace cem::emu::detail {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kArenaBytes = size_t{256} << 10;  // more than any device lets a block ask for
constexpr size_t kRedzone = size_t{64} << 10;      // around the arena: accesses there are reported
constexpr uint16_t kNoThread = 0xffff;
constexpr uint32_t kNever = 0xffffffffu;

enum class ThreadState : uint8_t { kRunnable, kAtBarrier, kInCollective, kDone };

struct AsyncCopyOp {
  unsigned char* dst;
  unsigned char data[16];
  int bytes;
};

struct Worker;

struct Thread {
  FiberContext context;
  FiberStack stack;
  Worker* worker = nullptr;
  uintptr_t stack_lo = 0, stack_hi = 0;  // its locals live here: accesses there need no check
  uint3 idx{};
  int tid = 0, warp = 0, lane = 0;
  ThreadState state = ThreadState::kDone;
  Site site{};  // where it waits

  // The warp-wide operation it waits in.
  const char* collective = nullptr;
  unsigned mask = 0;
  void* arg = nullptr;
  Combine combine = nullptr;
  const void* context_arg = nullptr;

  // cp.async: the open group and the committed ones, oldest first.
  std::vector<AsyncCopyOp> async_open;
  std::vector<std::vector<AsyncCopyOp>> async_committed;
};

// Ordering within a warp: accesses by two lanes are ordered when a __syncwarp naming both
// completed between them. seq counts completed __syncwarp calls in this block.
struct WarpSync {
  unsigned lanes = 0;    // lanes that exist and have not exited
  unsigned arrived = 0;  // lanes waiting in a warp-wide operation
  uint32_t seq = 0, full_seq = 0;
  uint32_t pair_seq[kWarp][kWarp];
};

// The last writer and up to two readers of a 2-byte granule of shared memory, in this block.
struct Granule {
  uint32_t stamp;  // the block it describes; any other value means untouched in this block
  uint32_t w_epoch, w_seq;
  uint16_t w_tid;
  uint8_t w_atomic, async_pending;
  uint32_t r_epoch;
  uint16_t r_tid[2];
  uint32_t r_seq[2];
};

struct Report {
  std::string kernel;
  std::vector<std::string> lines;
  int problems = 0;
  bool uninitialized_reported = false;
  std::set<std::tuple<int, size_t, int>> hazards_seen;  // (kind, shared offset, thread): one line each
  cudaError_t code = cudaSuccess;

  std::string ended;  // the error that ended a block, reported first

  void add(const std::string& line, cudaError_t error, bool ends_block = false) {
    ++problems;
    if (code == cudaSuccess || ends_block) code = error;
    if (ends_block && ended.empty()) {
      ended = line;
      return;
    }
    constexpr size_t kMaxLines = 12;
    if (lines.size() < kMaxLines) lines.push_back(line);
  }
  std::string text() const {
    std::string out;
    if (!ended.empty()) out += "\n  " + ended;
    for (const auto& line : lines) out += "\n  " + line;
    const int shown = static_cast<int>(lines.size()) + (ended.empty() ? 0 : 1);
    if (problems > shown) out += "\n  ... and " + std::to_string(problems - shown) + " more";
    return out;
  }
};

struct Launch {
  const char* kernel;
  dim3 grid, block;
  size_t smem;
  KernelBody body;
  void* closure;
};

struct Worker {
  // Read on every access: first, together.
  uintptr_t arena_begin = 0, arena_end = 0;  // kRedzone | kArenaBytes | kRedzone
  unsigned char* smem = nullptr;             // the block's dynamic shared memory
  uint64_t accesses = 0, switches = 0;       // added to the global counters after each launch
  const void* pc = nullptr;                  // the instrumented code making the current access
  unsigned char* arena = nullptr;

  FiberContext scheduler;
  std::vector<Granule> shadow;
  uint32_t stamp = 0;

  // The block being run.
  const Launch* launch = nullptr;
  Config config;
  FaultPlan fault;
  uint3 block_idx{};
  int nthreads = 0, nwarps = 0, arrived = 0, done = 0;
  uint32_t epoch = 0;  // completed __syncthreads in this block
  bool aborted = false;
  Report report;

  Thread threads[kMaxThreads];
  WarpSync warps[kMaxThreads / kWarp];

  Worker() {
    const size_t total = kArenaBytes + 2 * kRedzone;
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "cem emulation: cannot map the shared-memory arena\n");
      std::abort();
    }
    arena = static_cast<unsigned char*>(p);
    std::memset(arena, 0xff, total);
    arena_begin = reinterpret_cast<uintptr_t>(arena);
    arena_end = arena_begin + total;
    smem = arena + kRedzone;
    shadow.resize(kArenaBytes / 2);
  }
};

inline thread_local Worker* tls_worker = nullptr;  // host side: the worker of this host thread
inline thread_local std::string tls_last_report;
inline thread_local Config tls_config;  // the settings this host thread launches with

// The emulated thread whose fiber is running here, or null in host code.
inline Thread* current_fiber() {
  return static_cast<Thread*>(stack_owner(reinterpret_cast<uintptr_t>(__builtin_frame_address(0))));
}

inline Worker& worker() {
  if (tls_worker == nullptr) tls_worker = new Worker();  // one per host thread, for the process's life
  return *tls_worker;
}

struct Globals {
  std::mutex mutex;
  FaultPlan fault;
  std::map<const void*, int> max_dynamic_smem;  // cudaFuncSetAttribute, per kernel
  std::set<std::tuple<std::string, std::string, std::string, int>> sync_sites;
  std::atomic<uint64_t> launches{0}, blocks{0}, threads{0}, switches{0}, accesses{0};
};

inline Globals& globals() {
  static Globals* instance = new Globals();  // never destroyed: usable from any static destructor
  return *instance;
}

inline Thread& current_thread(const char* what) {
  Thread* t = current_fiber();
  if (t == nullptr) {
    std::fprintf(stderr, "cem emulation: %s called outside an emulated kernel\n", what);
    std::abort();
  }
  return *t;
}

inline std::string describe_thread(const Worker& w, const Thread& t) {
  char buf[128];
  const dim3& b = w.launch->block;
  if (b.y == 1 && b.z == 1) {
    std::snprintf(buf, sizeof buf, "thread %d (warp %d, lane %d)", t.tid, t.warp, t.lane);
  } else {
    std::snprintf(buf, sizeof buf, "thread %d (threadIdx (%u,%u,%u), warp %d, lane %d)", t.tid, t.idx.x, t.idx.y,
                  t.idx.z, t.warp, t.lane);
  }
  return buf;
}

inline std::string describe_block(const Worker& w) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "kernel %s, block (%u,%u,%u)", w.launch->kernel, w.block_idx.x, w.block_idx.y,
                w.block_idx.z);
  return buf;
}

// "at module+0xOFFSET" for the instrumented code that made the access (addr2line -e module).
inline std::string describe_code(const void* pc) {
  Dl_info info{};
  if (pc == nullptr || dladdr(pc, &info) == 0 || info.dli_fname == nullptr) return "";
  char buf[512];
  std::snprintf(buf, sizeof buf, "; code at %s+0x%zx", info.dli_fname,
                static_cast<size_t>(static_cast<const char*>(pc) - static_cast<const char*>(info.dli_fbase)));
  return buf;
}

inline std::string site_text(const Site& site) { return std::string(site.file) + ":" + std::to_string(site.line); }

// Ends the block at once: the thread's fiber is never resumed and the launch reports `message`.
[[noreturn]] inline void fatal(const std::string& message, cudaError_t error) {
  Thread& t = current_thread("fatal");
  Worker& w = *t.worker;
  w.report.add(message + " [" + describe_block(w) + "]", error, true);
  w.aborted = true;
  t.state = ThreadState::kDone;
  switch_context(t.context, w.scheduler);
  __builtin_unreachable();
}

}  // namespace cem::emu::detail
