// The emulator itself, for exactly one translation unit of a program or extension (compiled
// without instrumentation): fibers, the scheduler, warp operations, cp.async, launches, the checks
// and the compiler's access callbacks. Everything else includes only emulation.h.
#pragma once

#include "async_copy_impl.h"
#include "checker_impl.h"
#include "launch_impl.h"
#include "scheduler_impl.h"
#include "state_impl.h"
#include "warp_ops_impl.h"
