// cp.async: each thread queues its copies per commit group; cp.async.wait_group writes them into
// shared memory (as writes by the issuing thread), so reading a destination early is a hazard the
// checker sees. Part of implementation.h.
#pragma once

#include <cstring>
#include <string>

#include "scheduler_impl.h"

namespace cem::emu::detail {

void async_copy(Site site, void* shared_dst, const void* global_src, int bytes, int src_bytes) {
  Thread& t = current_thread("cp.async");
  Worker& w = *t.worker;
  if (bytes != 4 && bytes != 8 && bytes != 16) fatal(describe_thread(w, t) + ": cp.async copies 4, 8 or 16 bytes, not " + std::to_string(bytes) + " (" + site_text(site) + ")", cudaErrorLaunchFailure);
  if (src_bytes < 0 || src_bytes > bytes) fatal(describe_thread(w, t) + ": cp.async source size " + std::to_string(src_bytes) + " is not within 0.." + std::to_string(bytes) + " (" + site_text(site) + ")", cudaErrorLaunchFailure);
  check_access_as(t, reinterpret_cast<uintptr_t>(shared_dst), bytes, Access::kWrite, Space::kShared, AsyncStep::kIssue);
  AsyncCopyOp op{static_cast<unsigned char*>(shared_dst), {}, bytes};
  if (src_bytes > 0) {
    const auto src = reinterpret_cast<uintptr_t>(global_src);
    if (src % bytes != 0) fatal(describe_thread(w, t) + ": cp.async source is not " + std::to_string(bytes) + "-byte aligned (" + site_text(site) + "; compute-sanitizer memcheck: misaligned address)", cudaErrorMisalignedAddress);
    check_access_as(t, src, static_cast<size_t>(src_bytes), Access::kRead, Space::kGlobal, AsyncStep::kNone);
    std::memcpy(op.data, global_src, static_cast<size_t>(src_bytes));  // the rest stays zero: the zero-fill form
  }
  t.async_open.push_back(op);
}

void async_commit() {
  Thread& t = current_thread("cp.async.commit_group");
  t.async_committed.push_back(std::move(t.async_open));
  t.async_open.clear();
}

void async_wait(Site, int groups_left) {
  Thread& t = current_thread("cp.async.wait_group");
  while (static_cast<int>(t.async_committed.size()) > groups_left) {
    for (const AsyncCopyOp& op : t.async_committed.front()) {
      check_access_as(t, reinterpret_cast<uintptr_t>(op.dst), op.bytes, Access::kWrite, Space::kShared, AsyncStep::kComplete);
      std::memcpy(op.dst, op.data, op.bytes);
    }
    t.async_committed.erase(t.async_committed.begin());
  }
}

}  // namespace cem::emu::detail
