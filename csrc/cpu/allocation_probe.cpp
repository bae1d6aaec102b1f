// Test instrument, not part of the cem API: cem_testing::cpu_allocation_probe("start") wraps
// the CPU allocator so that every CPU tensor allocation is counted, and ("stop") restores it
// and returns the peak of the bytes allocated since "start" and still alive. Tests use it to
// measure the scratch memory of the CPU kernels and check that it grows linearly in N.
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <string>

namespace cem::cpu {
namespace {

std::atomic<int64_t> live_bytes{0};
std::atomic<int64_t> peak_bytes{0};

struct CountedBlock {
  c10::DataPtr inner;
  int64_t bytes;
};

void delete_counted(void* context) {
  auto* block = static_cast<CountedBlock*>(context);
  live_bytes.fetch_sub(block->bytes);
  delete block;  // frees the memory through the wrapped allocator's own deleter
}

class CountingAllocator final : public c10::Allocator {
 public:
  c10::Allocator* inner = nullptr;

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr data = inner->allocate(n);
    void* raw = data.get();
    const c10::Device device = data.device();
    auto* block = new CountedBlock{std::move(data), static_cast<int64_t>(n)};
    const int64_t now = live_bytes.fetch_add(block->bytes) + block->bytes;
    int64_t peak = peak_bytes.load();
    while (now > peak && !peak_bytes.compare_exchange_weak(peak, now)) {
    }
    return {raw, block, &delete_counted, device};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

CountingAllocator counting_allocator;  // lives as long as the library: blocks may outlive "stop"
std::mutex probe_mutex;

int64_t cpu_allocation_probe(c10::string_view action) {
  std::lock_guard<std::mutex> lock(probe_mutex);
  const std::string what(action);
  if (what == "start") {
    TORCH_CHECK(counting_allocator.inner == nullptr, "cpu_allocation_probe: already started");
    counting_allocator.inner = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&counting_allocator, /*priority=*/255);
    TORCH_CHECK(c10::GetCPUAllocator() == &counting_allocator, "cpu_allocation_probe: could not install");
    live_bytes = 0;
    peak_bytes = 0;
    return 0;
  }
  TORCH_CHECK_VALUE(what == "stop", "cpu_allocation_probe: action must be 'start' or 'stop', got '", what, "'");
  TORCH_CHECK(counting_allocator.inner != nullptr, "cpu_allocation_probe: not started");
  c10::SetCPUAllocator(counting_allocator.inner, /*priority=*/255);
  counting_allocator.inner = nullptr;
  return peak_bytes.load();
}

}  // namespace

TORCH_LIBRARY(cem_testing, m) { m.def("cpu_allocation_probe(str action) -> int", &cpu_allocation_probe); }

}  // namespace cem::cpu
