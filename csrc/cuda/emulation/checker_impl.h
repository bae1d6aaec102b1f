// The checks on every memory access of emulated device code. Kernel translation units are
// compiled with -fsanitize=thread (function entry/exit hooks off), so the compiler calls
// __tsan_{read,write}N before every load and store, each one, reads and writes told apart; the
// emulator defines those callbacks (no ThreadSanitizer runtime is involved) and decides:
//   shared memory: out of bounds of the launch's dynamic allocation, misaligned, or a race;
//   global memory: misaligned, or (with AddressSanitizer's runtime preloaded) out of bounds;
//   the thread's own stack: nothing to check.
// Part of implementation.h.
#pragma once

#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "state_impl.h"

namespace cem::emu::detail {

// AddressSanitizer's runtime, when the process was started with it preloaded: it knows the exact
// size of every heap allocation, so reads past a tensor's end are caught.
struct AsanRuntime {
  using IsPoisoned = void* (*)(void*, size_t);
  using Describe = void (*)(void*);
  IsPoisoned region_is_poisoned = nullptr;
  Describe describe_address = nullptr;

  AsanRuntime() {
    region_is_poisoned = reinterpret_cast<IsPoisoned>(dlsym(RTLD_DEFAULT, "__asan_region_is_poisoned"));
    describe_address = reinterpret_cast<Describe>(dlsym(RTLD_DEFAULT, "__asan_describe_address"));
  }
};

inline const AsanRuntime& asan() {
  static const AsanRuntime runtime;
  return runtime;
}

inline const char* access_verb(Access access) {
  return access == Access::kRead ? "read" : (access == Access::kWrite ? "write" : "atomic");
}

inline bool misaligned(uintptr_t address, size_t bytes) {
  return (bytes == 2 || bytes == 4 || bytes == 8 || bytes == 16) && address % bytes != 0;
}

// Whether accesses by threads a (at warp sequence a_seq) and b of one block epoch are ordered.
inline bool ordered(const Worker& w, uint16_t a, uint32_t a_seq, int b) {
  if (a == b) return true;
  if (a / kWarp != b / kWarp) return false;
  const WarpSync& sync = w.warps[a / kWarp];
  const uint32_t last = std::max(sync.full_seq, sync.pair_seq[a % kWarp][b % kWarp]);
  return last > a_seq;
}

enum class Hazard { kReadAfterWrite, kWriteAfterRead, kWriteAfterWrite, kReadInFlight, kWriteInFlight };

// One line per (kind, access, thread): an access spanning several granules reports once.
inline void report_hazard(Worker& w, Hazard kind, const Thread& who, int other, size_t offset, size_t bytes,
                          Access access) {
  if (!w.report.hazards_seen.insert({static_cast<int>(kind), offset, who.tid}).second) return;
  static const char* names[] = {"read-after-write (RAW)", "write-after-read (WAR)", "write-after-write (WAW)",
                                "read of a cp.async destination in flight", "write to a cp.async destination in flight"};
  std::string line = std::string("shared-memory ") + names[static_cast<int>(kind)] + " hazard: " +
                     describe_thread(w, who) + " " + access_verb(access) + "s " + std::to_string(bytes) +
                     " bytes at shared offset " + std::to_string(offset);
  if (kind == Hazard::kReadInFlight || kind == Hazard::kWriteInFlight) {
    line += " before a cp.async.wait_group that completes the copy";
  } else {
    line += (kind == Hazard::kWriteAfterRead ? " that " : " last written by ") + describe_thread(w, w.threads[other]) +
            (kind == Hazard::kWriteAfterRead ? " read" : "") +
            " in the same barrier interval, with no __syncthreads (or __syncwarp naming both lanes) between";
  }
  line += " (compute-sanitizer --tool racecheck reports such hazards)" + describe_code(w.pc) + " [" +
          describe_block(w) + "]";
  w.report.add(line, cudaErrorLaunchFailure);
}

enum class AsyncStep { kNone, kIssue, kComplete };

inline void check_races(Worker& w, const Thread& who, size_t offset, size_t bytes, Access access, AsyncStep async) {
  const int tid = who.tid;
  const uint32_t seq = w.warps[who.warp].seq;
  const size_t first = offset / 2, last = (offset + bytes - 1) / 2;
  for (size_t g = first; g <= last; ++g) {
    Granule& x = w.shadow[g];
    if (x.stamp != w.stamp) {
      x.stamp = w.stamp;
      x.w_tid = kNoThread;
      x.w_atomic = x.async_pending = 0;
      x.r_epoch = kNever;
    }
    if (access == Access::kRead) {
      if (x.async_pending) report_hazard(w, Hazard::kReadInFlight, who, -1, offset, bytes, access);
      if (x.w_tid == kNoThread) {
        if (!w.report.uninitialized_reported) {
          w.report.uninitialized_reported = true;
          w.report.add(describe_thread(w, who) + " reads " + std::to_string(bytes) + " bytes at shared offset " +
                           std::to_string(offset) + " that no thread of the block has written (the NaN fill)" +
                           describe_code(w.pc) + " [" + describe_block(w) + "]",
                       cudaErrorLaunchFailure);
        }
      } else if (x.w_tid != tid && x.w_epoch == w.epoch && !ordered(w, x.w_tid, x.w_seq, tid)) {
        report_hazard(w, Hazard::kReadAfterWrite, who, x.w_tid, offset, bytes, access);
      }
      if (x.r_epoch != w.epoch) {
        x.r_epoch = w.epoch;
        x.r_tid[0] = static_cast<uint16_t>(tid);
        x.r_seq[0] = seq;
        x.r_tid[1] = kNoThread;
      } else if (x.r_tid[0] == tid) {
        x.r_seq[0] = seq;
      } else {
        x.r_tid[1] = static_cast<uint16_t>(tid);  // keeps the latest other reader
        x.r_seq[1] = seq;
      }
      continue;
    }
    if (async == AsyncStep::kComplete) {  // the copy lands: its issuing thread is the writer
      x.async_pending = 0;
    } else {
      if (x.async_pending) report_hazard(w, Hazard::kWriteInFlight, who, -1, offset, bytes, access);
      const bool both_atomic = access == Access::kAtomic && x.w_atomic;
      if (x.w_tid != kNoThread && x.w_tid != tid && x.w_epoch == w.epoch && !both_atomic &&
          !ordered(w, x.w_tid, x.w_seq, tid)) {
        report_hazard(w, Hazard::kWriteAfterWrite, who, x.w_tid, offset, bytes, access);
      }
      if (x.r_epoch == w.epoch) {
        for (int i = 0; i < 2; ++i) {
          if (x.r_tid[i] != kNoThread && x.r_tid[i] != tid && !ordered(w, x.r_tid[i], x.r_seq[i], tid)) {
            report_hazard(w, Hazard::kWriteAfterRead, who, x.r_tid[i], offset, bytes, access);
          }
        }
      }
      if (async == AsyncStep::kIssue) x.async_pending = 1;
    }
    x.w_tid = static_cast<uint16_t>(tid);
    x.w_epoch = w.epoch;
    x.w_seq = seq;
    x.w_atomic = access == Access::kAtomic;
    x.r_epoch = kNever;
  }
}

inline void check_shared(Worker& w, const Thread& who, uintptr_t address, size_t bytes, Access access,
                         AsyncStep async) {
  const auto base = reinterpret_cast<uintptr_t>(w.smem);
  const size_t limit = w.launch->smem;
  if (address < base || address + bytes > base + limit) {
    const long long offset = static_cast<long long>(address - base);
    fatal(describe_thread(w, who) + " " + access_verb(access) + "s " + std::to_string(bytes) +
              " bytes at shared offset " + std::to_string(offset) + ", outside the " + std::to_string(limit) +
              " bytes of dynamic shared memory the launch asked for (compute-sanitizer memcheck: Invalid __shared__ " +
              access_verb(access) + ")" + describe_code(w.pc),
          cudaErrorIllegalAddress);
  }
  if (misaligned(address, bytes)) {
    fatal(describe_thread(w, who) + " " + access_verb(access) + "s " + std::to_string(bytes) + " bytes at shared offset " +
              std::to_string(address - base) + ", not " + std::to_string(bytes) +
              "-byte aligned (compute-sanitizer memcheck: misaligned shared address)" + describe_code(w.pc),
          cudaErrorMisalignedAddress);
  }
  if (w.config.check_hazards) check_races(w, who, address - base, bytes, access, async);
}

inline void check_global(Worker& w, const Thread& who, uintptr_t address, size_t bytes, Access access) {
  if (misaligned(address, bytes)) {
    char where[32];
    std::snprintf(where, sizeof where, "0x%zx", static_cast<size_t>(address));
    fatal(describe_thread(w, who) + " " + access_verb(access) + "s " + std::to_string(bytes) +
              " bytes of global memory at " + where + ", not " + std::to_string(bytes) +
              "-byte aligned (a misaligned vector access; compute-sanitizer memcheck: Invalid __global__ " +
              access_verb(access) + ", misaligned address)" + describe_code(w.pc),
          cudaErrorMisalignedAddress);
  }
  const auto& runtime = asan();
  if (runtime.region_is_poisoned != nullptr) {
    void* bad = runtime.region_is_poisoned(reinterpret_cast<void*>(address), bytes);
    if (bad != nullptr) {
      char where[32];
      std::snprintf(where, sizeof where, "0x%zx", reinterpret_cast<size_t>(bad));
      std::fprintf(stderr, "cem emulation: out-of-bounds global access by %s; AddressSanitizer describes it:\n",
                   describe_thread(w, who).c_str());
      if (runtime.describe_address != nullptr) runtime.describe_address(bad);
      fatal(describe_thread(w, who) + " " + access_verb(access) + "s " + std::to_string(bytes) +
                " bytes of global memory at " + where +
                ", outside any live allocation (AddressSanitizer; compute-sanitizer memcheck: Invalid __global__ " +
                access_verb(access) + ")" + describe_code(w.pc),
            cudaErrorIllegalAddress);
    }
  }
}

inline void check_access_as(const Thread& who, uintptr_t address, size_t bytes, Access access, Space space,
                            AsyncStep async) {
  Worker& w = *who.worker;
  ++w.accesses;
  if (address + bytes > w.arena_begin && address < w.arena_end) {
    if (space == Space::kGlobal) {
      fatal(describe_thread(w, who) + ": a global-memory instruction was given a shared-memory address",
            cudaErrorIllegalAddress);
    }
    check_shared(w, who, address, bytes, access, async);
    return;
  }
  if (space == Space::kShared) {
    fatal(describe_thread(w, who) + ": a shared-memory instruction (ldmatrix, cp.async) was given an address outside "
              "shared memory" + describe_code(w.pc),
          cudaErrorIllegalAddress);
  }
  const Thread& self = *current_fiber();
  if (address >= self.stack_lo && address < self.stack_hi) {
    return;  // a local variable
  }
  check_global(w, who, address, bytes, access);
}

}  // namespace cem::emu::detail

namespace cem::emu::detail {

void check_access(const void* address, size_t bytes, Access access, Space space, int by_lane) {
  Thread* t = current_fiber();
  if (t == nullptr) return;  // host code of an instrumented unit
  t->worker->pc = nullptr;
  const Thread& who = by_lane < 0 ? *t : t->worker->threads[t->warp * kWarp + by_lane];
  check_access_as(who, reinterpret_cast<uintptr_t>(address), bytes, access, space, AsyncStep::kNone);
}

}  // namespace cem::emu::detail

// The compiler's callbacks (the ThreadSanitizer instrumentation ABI). Hidden: nothing else in
// the process calls them, and they interpose on nothing.
namespace cem::emu::detail {

inline void hook(uintptr_t address, size_t bytes, Access access, const void* pc) {
  Thread* t = current_fiber();
  if (t == nullptr) return;  // host code of an instrumented unit
  t->worker->pc = pc;
  check_access_as(*t, address, bytes, access, Space::kAny, AsyncStep::kNone);
}

}  // namespace cem::emu::detail

#define CEM_EMU_HOOK(name, bytes, access)                                                        \
  extern "C" __attribute__((visibility("hidden"))) void name(void* address) {                  \
    ::cem::emu::detail::hook(reinterpret_cast<uintptr_t>(address), bytes, access, __builtin_return_address(0)); \
  }
#define CEM_EMU_HOOKS(bytes)                                                                    \
  CEM_EMU_HOOK(__tsan_read##bytes, bytes, ::cem::emu::detail::Access::kRead)                    \
  CEM_EMU_HOOK(__tsan_write##bytes, bytes, ::cem::emu::detail::Access::kWrite)                  \
  CEM_EMU_HOOK(__tsan_unaligned_read##bytes, bytes, ::cem::emu::detail::Access::kRead)          \
  CEM_EMU_HOOK(__tsan_unaligned_write##bytes, bytes, ::cem::emu::detail::Access::kWrite)
CEM_EMU_HOOK(__tsan_read1, 1, ::cem::emu::detail::Access::kRead)
CEM_EMU_HOOK(__tsan_write1, 1, ::cem::emu::detail::Access::kWrite)
CEM_EMU_HOOKS(2)
CEM_EMU_HOOKS(4)
CEM_EMU_HOOKS(8)
CEM_EMU_HOOKS(16)
#undef CEM_EMU_HOOKS
#undef CEM_EMU_HOOK

extern "C" __attribute__((visibility("hidden"))) void __tsan_read_range(void* address, size_t bytes) {
  ::cem::emu::detail::hook(reinterpret_cast<uintptr_t>(address), bytes, ::cem::emu::detail::Access::kRead,
                           __builtin_return_address(0));
}
extern "C" __attribute__((visibility("hidden"))) void __tsan_write_range(void* address, size_t bytes) {
  ::cem::emu::detail::hook(reinterpret_cast<uintptr_t>(address), bytes, ::cem::emu::detail::Access::kWrite,
                           __builtin_return_address(0));
}
// Clang routes memcpy/memmove/memset of instrumented code through these.
extern "C" __attribute__((visibility("hidden"))) void* __tsan_memcpy(void* dst, const void* src, size_t bytes) {
  __tsan_read_range(const_cast<void*>(src), bytes);
  __tsan_write_range(dst, bytes);
  return std::memcpy(dst, src, bytes);
}
extern "C" __attribute__((visibility("hidden"))) void* __tsan_memmove(void* dst, const void* src, size_t bytes) {
  __tsan_read_range(const_cast<void*>(src), bytes);
  __tsan_write_range(dst, bytes);
  return std::memmove(dst, src, bytes);
}
extern "C" __attribute__((visibility("hidden"))) void* __tsan_memset(void* dst, int value, size_t bytes) {
  __tsan_write_range(dst, bytes);
  return std::memset(dst, value, bytes);
}
// The instrumented units' constructors call this; there is no runtime to start.
extern "C" __attribute__((visibility("hidden"))) void __tsan_init() {}
