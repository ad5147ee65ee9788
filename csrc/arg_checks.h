// Argument checks shared by the layer and cell drivers, so both ops word their errors alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace fused_lstm {

// t is on input's device and has its dtype.
inline void check_same(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.device() == input.device(), "fused_lstm: ", name, " is on ", t.device(), " but input is on ",
              input.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "fused_lstm: ", name, " has dtype ", t.scalar_type(),
              " but input has dtype ", input.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "fused_lstm: expected ", name, " of shape ", expected, ", got ", t.sizes());
}

}  // namespace fused_lstm
