// Launching a kernel: the configuration checks a device makes, the block order, and the host
// threads that share a launch's blocks; plus the emulator's settings and counters. Part of
// implementation.h.
#pragma once

#include <algorithm>
#include <atomic>
#include <climits>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "scheduler_impl.h"

namespace cem::emu {

const DeviceProperties& device_properties() {
  static const DeviceProperties properties;
  return properties;
}

void set_config(const Config& config) { detail::tls_config = config; }

Config config() { return detail::tls_config; }

void set_fault(const FaultPlan& plan) {
  std::lock_guard<std::mutex> lock(detail::globals().mutex);
  detail::globals().fault = plan;
}

std::vector<SyncSite> observed_sync_sites() {
  std::lock_guard<std::mutex> lock(detail::globals().mutex);
  std::vector<SyncSite> sites;
  for (const auto& [kernel, kind, file, line] : detail::globals().sync_sites) sites.push_back({kernel, kind, file, line});
  return sites;
}

Stats stats() {
  auto& g = detail::globals();
  return {g.launches.load(), g.blocks.load(), g.threads.load(), g.switches.load(), g.accesses.load()};
}

void reset_stats() {
  auto& g = detail::globals();
  g.launches = g.blocks = g.threads = g.switches = g.accesses = 0;
}

const std::string& last_launch_report() { return detail::tls_last_report; }

const char* error_string(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}

}  // namespace cem::emu

namespace cem::emu::detail {

cudaError_t set_max_dynamic_smem(const void* kernel_id, int bytes) {
  const int limit = device_properties().max_dynamic_smem_optin;
  if (bytes < 0 || bytes > limit) {
    tls_last_report = "cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize, " + std::to_string(bytes) +
                      "): the device allows at most " + std::to_string(limit) + " bytes per block (" +
                      device_properties().name + ")";
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(globals().mutex);
  globals().max_dynamic_smem[kernel_id] = bytes;
  return cudaSuccess;
}

// The blocks of one launch, shared by the host threads that run them.
struct LaunchJob {
  const Launch* launch;
  Config config;
  FaultPlan fault;
  std::vector<long long> order;
  std::atomic<size_t> next{0};
  std::atomic<bool> aborted{false};
  std::mutex mutex;
  std::vector<Report> reports;
};

// One host thread's share of a launch: blocks taken from the job until none are left or one fails.
inline void run_blocks(LaunchJob& job) {
  Worker& w = worker();
  w.launch = job.launch;
  w.config = job.config;
  w.fault = job.fault;
  w.report = Report{};
  const dim3& grid = job.launch->grid;
  std::vector<int> thread_order;
  for (size_t i = job.next++; i < job.order.size() && !job.aborted; i = job.next++) {
    const long long b = job.order[i];
    const uint3 idx{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                    static_cast<unsigned>(b / (static_cast<long long>(grid.x) * grid.y))};
    std::mt19937_64 rng(job.config.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(b));  // per block: any worker
    run_block(w, idx, thread_order, rng);
    globals().blocks.fetch_add(1, std::memory_order_relaxed);
    globals().threads.fetch_add(static_cast<uint64_t>(w.nthreads), std::memory_order_relaxed);
    if (w.aborted) job.aborted = true;
  }
  w.launch = nullptr;
  globals().accesses.fetch_add(w.accesses, std::memory_order_relaxed);
  globals().switches.fetch_add(w.switches, std::memory_order_relaxed);
  w.accesses = w.switches = 0;
  std::lock_guard<std::mutex> lock(job.mutex);
  job.reports.push_back(std::move(w.report));
}

// The host threads that run blocks, started on first use and kept for the process's life. Only
// they run blocks, and one launch at a time: however many host threads launch, the fiber stacks
// and shared-memory arenas stay those of at most kMaxWorkers threads.
class WorkerPool {
 public:
  static constexpr int kMaxWorkers = 16;

  // Runs task on `count` pool threads; returns when all are done. Launches from several host
  // threads queue here.
  void run(int count, const std::function<void()>& task) {
    std::lock_guard<std::mutex> serial(launch_mutex_);
    std::unique_lock<std::mutex> lock(mutex_);
    while (static_cast<int>(threads_.size()) < count) {
      const int index = static_cast<int>(threads_.size());
      threads_.emplace_back([this, index] { loop(index); });
      threads_.back().detach();
    }
    task_ = &task;
    wanted_ = count;
    pending_ = count;
    ++generation_;
    wake_.notify_all();
    done_.wait(lock, [this] { return pending_ == 0; });
    task_ = nullptr;
  }

 private:
  void loop(int index) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (index >= wanted_) continue;
      const auto* task = task_;
      lock.unlock();
      (*task)();
      lock.lock();
      if (--pending_ == 0) done_.notify_all();
    }
  }

  std::mutex launch_mutex_, mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;
  const std::function<void()>* task_ = nullptr;
  uint64_t generation_ = 0;
  int wanted_ = 0, pending_ = 0;
};

inline WorkerPool& pool() {
  static WorkerPool* instance = new WorkerPool();  // never destroyed: its threads outlive static destructors
  return *instance;
}

cudaError_t launch(const char* kernel_name, const void* kernel_id, dim3 grid, dim3 block, size_t dynamic_smem,
                   KernelBody body, void* closure) {
  tls_last_report.clear();
  char dims[96];
  std::snprintf(dims, sizeof dims, "grid (%u,%u,%u), block (%u,%u,%u)", grid.x, grid.y, grid.z, block.x, block.y, block.z);
  const auto threads = static_cast<long long>(block.x) * block.y * block.z;
  const auto& device = device_properties();
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || grid.x > INT_MAX || grid.y > 65535 ||
      grid.z > 65535 || threads > device.max_threads_per_block || block.z > 64) {
    tls_last_report = std::string(kernel_name) + ": " + dims + " is not a valid launch configuration";
    return cudaErrorInvalidConfiguration;
  }
  Launch launch{kernel_name, grid, block, dynamic_smem, body, closure};
  LaunchJob job;
  job.launch = &launch;
  job.config = tls_config;
  int limit = device.max_dynamic_smem_default;
  {
    std::lock_guard<std::mutex> lock(globals().mutex);
    const auto it = globals().max_dynamic_smem.find(kernel_id);
    if (it != globals().max_dynamic_smem.end()) limit = std::max(limit, it->second);
    job.fault = globals().fault;
  }
  if (dynamic_smem > static_cast<size_t>(limit)) {
    tls_last_report = std::string(kernel_name) + " asks for " + std::to_string(dynamic_smem) +
                      " bytes of dynamic shared memory, but the kernel may use " + std::to_string(limit) +
                      " (cudaFuncSetAttribute with cudaFuncAttributeMaxDynamicSharedMemorySize raises it, up to " +
                      std::to_string(device.max_dynamic_smem_optin) + " on " + device.name + ")";
    return cudaErrorInvalidValue;
  }
  globals().launches.fetch_add(1, std::memory_order_relaxed);

  const long long blocks = static_cast<long long>(grid.x) * grid.y * grid.z;
  job.order.resize(static_cast<size_t>(blocks));
  std::iota(job.order.begin(), job.order.end(), 0LL);
  if (job.config.block_order == BlockOrder::kReversed) std::reverse(job.order.begin(), job.order.end());
  if (job.config.block_order == BlockOrder::kShuffled) {
    std::mt19937_64 rng(job.config.seed ^ static_cast<uint64_t>(globals().launches.load()));
    std::shuffle(job.order.begin(), job.order.end(), rng);
  }
  const int workers = static_cast<int>(std::min<long long>(
      std::clamp(job.config.workers, 1, WorkerPool::kMaxWorkers), blocks));
  const std::function<void()> task = [&job] { run_blocks(job); };
  pool().run(workers, task);

  Report merged;
  for (const Report& r : job.reports) {
    if (!r.ended.empty()) merged.add(r.ended, r.code, true);
    for (const auto& line : r.lines) merged.add(line, r.code);
    merged.problems += r.problems - static_cast<int>(r.lines.size()) - (r.ended.empty() ? 0 : 1);
    if (merged.code == cudaSuccess) merged.code = r.code;
  }
  if (merged.problems == 0) return cudaSuccess;
  tls_last_report = std::string(kernel_name) + ": " + std::to_string(merged.problems) + " problem(s) found" + merged.text();
  return merged.code;
}

}  // namespace cem::emu::detail
