// The standard headers the attention core needs, included before any instruction-set pragma
// so that nothing they define is compiled for a wider instruction set than the baseline.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
