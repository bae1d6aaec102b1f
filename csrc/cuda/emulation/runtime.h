// The interface between emulated device code and the emulator (implementation.h): the calling
// thread, block-wide and warp-wide synchronisation, checked memory accesses, launches and the
// emulator's settings. Device code never calls this directly; builtins.h and ptx.h do.
#pragma once

#include <driver_types.h>  // cudaError_t, cudaStream_t: plain types, usable without nvcc
#include <vector_types.h>  // dim3, uint3, uint4

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

// Functions of the emulation headers that device code instantiates must not be instrumented
// themselves: they report the accesses they make on a thread's behalf explicitly.
#define CEM_EMU_UNCHECKED __attribute__((no_sanitize("thread")))

namespace cem::emu {

// Where device code called a synchronisation or warp operation.
struct Site {
  const char* file;
  int line;
};
#define CEM_EMU_SITE (::cem::emu::Site{__FILE__, __LINE__})

enum class BlockOrder { kSequential, kReversed, kShuffled };

struct Config {
  BlockOrder block_order = BlockOrder::kSequential;
  uint64_t seed = 0;          // for kShuffled: the block order and the order threads resume in
  bool check_hazards = true;  // shared-memory race detection (bounds and alignment are always on)
  int workers = 1;            // host threads running the blocks of a launch (each block on one)
};
// The calling host thread's settings: each host thread launches with its own.
void set_config(const Config& config);
Config config();

// What the emulated device reports (an sm_80 part: A100's limits).
struct DeviceProperties {
  const char* name = "emulated sm_80";
  int major = 8, minor = 0;
  int max_threads_per_block = 1024;
  int max_dynamic_smem_default = 48 * 1024;  // without cudaFuncAttributeMaxDynamicSharedMemorySize
  int max_dynamic_smem_optin = 163 * 1024;   // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int multiprocessors = 108;
  int max_threads_per_multiprocessor = 2048;
  int smem_per_multiprocessor = 164 * 1024;
};
const DeviceProperties& device_properties();

// Fault injection, for the tests that prove the checker works: one synchronisation site (a
// source line) is dropped for every thread, or for the upper half of each block (a barrier that
// only some threads reach).
enum class Fault { kNone, kDropBarrier, kDropSyncwarp, kDivergentBarrier };
struct FaultPlan {
  Fault fault = Fault::kNone;
  std::string file_suffix;  // matched against the end of __FILE__
  int line = 0;
};
void set_fault(const FaultPlan& plan);

// Every __syncthreads / __syncwarp site reached so far, per kernel (for fault-injection tests).
struct SyncSite {
  std::string kernel, kind, file;
  int line;
};
std::vector<SyncSite> observed_sync_sites();

// Counters since the last reset, for the tests' own speed reports.
struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, context_switches = 0, checked_accesses = 0;
};
Stats stats();
void reset_stats();

// The full report of the last failed launch on this host thread ("" after a clean one).
const std::string& last_launch_report();
const char* error_string(cudaError_t error);

namespace detail {

using KernelBody = void (*)(void* closure);

cudaError_t launch(const char* kernel_name, const void* kernel_id, dim3 grid, dim3 block, size_t dynamic_smem,
                   KernelBody body, void* closure);
cudaError_t set_max_dynamic_smem(const void* kernel_id, int bytes);

// The built-in variables of the calling device thread.
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
unsigned char* dynamic_smem();
int lane_id();

void syncthreads(Site site);
void syncwarp(Site site, unsigned mask);

enum class ShuffleKind { kIdx, kUp, kDown, kXor };
uint64_t shuffle(Site site, ShuffleKind kind, unsigned mask, uint64_t value, int arg, int width);
enum class VoteKind { kBallot, kAny, kAll };
unsigned vote(Site site, VoteKind kind, unsigned mask, int predicate);

// A warp-wide operation on register fragments: every lane of `mask` calls it with the same
// `kind`; when the last one arrives, combine(lane_args, mask, context) runs once with every
// lane's `arg` (indexed by lane; null for lanes outside the mask). Lanes then continue.
using Combine = void (*)(void* const* lane_args, unsigned mask, const void* context);
void warp_collective(Site site, const char* kind, unsigned mask, void* arg, Combine combine, const void* context);
// A misuse of a warp-wide operation (mismatched or misaligned operands): a fatal error.
[[noreturn]] void warp_collective_error(const char* kind, const char* problem);

// Checks one access of `bytes` at `address` by the calling thread (shared: bounds, alignment,
// races; global: alignment, and bounds under AddressSanitizer). `by_lane` attributes it to
// another lane of the caller's warp (warp-wide operations read on behalf of a lane). A fatal
// error ends the block here and never returns. Instrumented kernel code reaches it through the
// compiler's per-access callbacks (checker_impl.h); emulated instructions call it directly.
enum class Access { kRead, kWrite, kAtomic };
enum class Space { kAny, kShared, kGlobal };  // kShared/kGlobal: an instruction of that state space
void check_access(const void* address, size_t bytes, Access access, Space space = Space::kAny, int by_lane = -1);

// cp.async: queued per thread, written into shared memory when waited for.
void async_copy(Site site, void* shared_dst, const void* global_src, int bytes, int src_bytes);
void async_commit();
void async_wait(Site site, int groups_left);

}  // namespace detail
}  // namespace cem::emu
