// The layout the dcs_group kernels see: w (contiguous) as [outer, groups,
// inner] around the grouped dimension, shared by the CPU and CUDA kernels.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace symfast {

// Every element p of w belongs to group (p / inner) % groups.
struct GroupView {
  int64_t outer, groups, inner;
  int64_t numel() const { return outer * groups * inner; }
};

// dim must already be normalized to [0, sizes.size()) (check_group_dim).
inline GroupView group_view(c10::IntArrayRef sizes, int64_t dim) {
  GroupView v{1, sizes[dim], 1};
  for (int64_t d = 0; d < dim; ++d) v.outer *= sizes[d];
  for (int64_t d = dim + 1; d < static_cast<int64_t>(sizes.size()); ++d) v.inner *= sizes[d];
  return v;
}

}  // namespace symfast
