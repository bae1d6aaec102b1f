// Cooperative fibers: one per emulated CUDA thread, switched by hand at every synchronisation
// point. On x86-64 a switch saves six callee-saved registers and the stack pointer (tens of
// nanoseconds, no system call); elsewhere it falls back to ucontext. Part of implementation.h.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cem::emu::detail {

using FiberEntry = void (*)(void* arg);

// Every fiber stack is a slot of one reserved region, kStackSlot bytes each and aligned to it:
// an inaccessible guard page, a small header naming the slot's owner, then the stack. From any
// stack pointer inside the region the owner is one mask away (current_fiber() in state_impl.h),
// which spares the per-access callbacks a thread-local lookup.
constexpr size_t kStackSlot = size_t{128} << 10;
constexpr int kMaxStackSlots = 16 * 1024;  // 16 host threads x 1024 CUDA threads
constexpr size_t kStackHeader = 64;

// Read on every access, so plain words: zero (an empty region) until the first stack exists.
inline uintptr_t stack_region_base = 0;
inline uintptr_t stack_region_bytes = 0;
inline size_t page_bytes = 0;

inline void reserve_stack_region() {
  const size_t bytes = kStackSlot * kMaxStackSlots;
  void* p = mmap(nullptr, bytes + kStackSlot, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "cem emulation: cannot reserve %zu bytes of address space for fiber stacks\n", bytes);
    std::abort();
  }
  page_bytes = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  stack_region_base = (reinterpret_cast<uintptr_t>(p) + kStackSlot - 1) & ~(kStackSlot - 1);
  stack_region_bytes = bytes;
}

struct FiberStack {
  char* base = nullptr;  // the slot: guard page, header, stack
  char* lo() const { return base + page_bytes + kStackHeader; }
  char* hi() const { return base + kStackSlot; }

  // Takes the next free slot and records `owner` in its header.
  void allocate(void* owner) {
    static std::mutex mutex;
    static int used = 0;
    std::lock_guard<std::mutex> lock(mutex);
    if (stack_region_base == 0) reserve_stack_region();
    if (used == kMaxStackSlots) {
      std::fprintf(stderr, "cem emulation: more than %d fiber stacks (16 host threads of 1024 CUDA threads)\n",
                   kMaxStackSlots);
      std::abort();
    }
    base = reinterpret_cast<char*>(stack_region_base + kStackSlot * used++);
    if (mprotect(base + page_bytes, kStackSlot - page_bytes, PROT_READ | PROT_WRITE) != 0) {
      std::fprintf(stderr, "cem emulation: cannot map a fiber stack\n");
      std::abort();
    }
    *reinterpret_cast<void**>(base + page_bytes) = owner;
  }
};

// The owner recorded for the slot holding `sp`, or null outside every slot.
inline void* stack_owner(uintptr_t sp) {
  const uintptr_t offset = sp - stack_region_base;
  if (offset >= stack_region_bytes) return nullptr;
  return *reinterpret_cast<void* const*>(stack_region_base + (offset & ~(kStackSlot - 1)) + page_bytes);
}

#if defined(__x86_64__)

extern "C" void cem_emu_switch_context(void** save_sp, void* load_sp) __attribute__((visibility("hidden")));
extern "C" void cem_emu_fiber_trampoline() __attribute__((visibility("hidden")));

// save: callee-saved registers, MXCSR and the x87 control word, then the stack pointer.
asm(R"(
  .text
  .p2align 4
  .globl cem_emu_switch_context
  .hidden cem_emu_switch_context
  .type cem_emu_switch_context,@function
cem_emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw 12(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw 12(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cem_emu_switch_context, .-cem_emu_switch_context

  .p2align 4
  .globl cem_emu_fiber_trampoline
  .hidden cem_emu_fiber_trampoline
  .type cem_emu_fiber_trampoline,@function
cem_emu_fiber_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size cem_emu_fiber_trampoline, .-cem_emu_fiber_trampoline
)");

struct FiberContext {
  void* sp = nullptr;

  // A first switch to this context calls entry(arg) on `stack`; entry must never return.
  void prepare(const FiberStack& stack, FiberEntry entry, void* arg) {
    const auto top = reinterpret_cast<uintptr_t>(stack.hi()) & ~uintptr_t{15};
    auto* frame = reinterpret_cast<uint64_t*>(top - 88);  // trampoline runs with a 16-byte aligned stack
    frame[0] = 0;
    frame[1] = 0x037F00001F80ull;  // MXCSR (round to nearest, exceptions masked), x87 control word
    frame[2] = 0;                  // r15
    frame[3] = 0;                  // r14
    frame[4] = reinterpret_cast<uint64_t>(entry);  // r13
    frame[5] = reinterpret_cast<uint64_t>(arg);    // r12
    frame[6] = 0;                                  // rbx
    frame[7] = 0;                                  // rbp
    frame[8] = reinterpret_cast<uint64_t>(&cem_emu_fiber_trampoline);
    sp = frame;
  }
};

inline void switch_context(FiberContext& from, FiberContext& to) { cem_emu_switch_context(&from.sp, to.sp); }

#else  // portable fallback: correct but slower (swapcontext saves the signal mask)

struct FiberContext {
  ucontext_t context{};

  void prepare(const FiberStack& stack, FiberEntry entry, void* arg) {
    getcontext(&context);
    context.uc_stack.ss_sp = stack.lo();
    context.uc_stack.ss_size = static_cast<size_t>(stack.hi() - stack.lo());
    context.uc_link = nullptr;
    // makecontext passes int arguments only: split the pointer.
    const auto bits = reinterpret_cast<uintptr_t>(arg);
    makecontext(&context, reinterpret_cast<void (*)()>(&start), 4, reinterpret_cast<uintptr_t>(entry) >> 32,
                reinterpret_cast<uintptr_t>(entry) & 0xffffffffu, bits >> 32, bits & 0xffffffffu);
  }

  static void start(unsigned entry_hi, unsigned entry_lo, unsigned arg_hi, unsigned arg_lo) {
    auto entry = reinterpret_cast<FiberEntry>((uintptr_t{entry_hi} << 32) | entry_lo);
    entry(reinterpret_cast<void*>((uintptr_t{arg_hi} << 32) | arg_lo));
    std::abort();
  }
};

inline void switch_context(FiberContext& from, FiberContext& to) { swapcontext(&from.context, &to.context); }

#endif

}  // namespace cem::emu::detail
