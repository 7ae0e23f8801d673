// The C++ signature of every memcore operator, declared once, grouped by op family. Schemas and
// contracts: csrc/memcore.cpp; these are the C++ types the dispatcher calls them with (Tensor in a
// schema is const at::Tensor&, Tensor(a!) is at::Tensor&, Tensor? is const std::optional<at::Tensor>&,
// int is int64_t, float is double, bool[3] is std::array<bool, 3>).
//
// The functions are declared, never defined: the dispatcher is their definition. Two uses:
//   MEMCORE_OP(ce_forward)          a typed handle to call memcore::ce_forward through the
//                                   dispatcher from C++ (.call(...)), type from the declaration
//   MEMCORE_IMPL(m, ce_forward, fn) registers kernel fn for the op inside TORCH_LIBRARY_IMPL,
//                                   after checking at compile time that fn has the declared type
// so a kernel or a C++ caller whose types drift from this page fails to compile, and torch checks
// the declarations against the schemas when the handle is made (OperatorHandle::typed).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

namespace memcore {

using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor11 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// cross_entropy (csrc/cpu/cross_entropy.cpp, csrc/cuda/cross_entropy.cu, csrc/autograd/cross_entropy.cpp)
// -> (loss, lse, row_stats, status)
Tensor4 ce_forward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                   int64_t num_samples, int64_t ignore_index);
at::Tensor ce_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                       const at::Tensor& lse, int64_t ignore_index);
// -> (out, count, loss, lse, row_stats, status)
Tensor6 ce_forward_reduce(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                          int64_t num_samples, int64_t ignore_index, int64_t reduction);
Tensor6 ce_forward_grad_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                         int64_t num_samples, int64_t ignore_index, int64_t reduction);
void scale_unless_one_(at::Tensor& grad, const at::Tensor& scale);
// -> float64 [N]
at::Tensor ce_input_sqnorm(const at::Tensor& grad, const at::Tensor& scale);
// options route (CPU: csrc/cpu/cross_entropy.cpp; CUDA: csrc/cuda/cross_entropy_options.cu)
// -> (loss, lse, row_stats, status, smooth)
Tensor5 ce_forward_options(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                           int64_t num_samples, int64_t ignore_index, double softcap, double label_smoothing,
                           const std::optional<at::Tensor>& weight);
at::Tensor ce_backward_options(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                               const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                               int64_t ignore_index, double softcap, const std::optional<at::Tensor>& weight);
// -> (out, zloss, loss, lse, row_stats, status)
Tensor6 ce_forward_reduce_options(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                                  int64_t num_samples, int64_t ignore_index, int64_t reduction,
                                  const std::optional<at::Tensor>& weight, double label_smoothing, double softcap,
                                  double z_loss);
Tensor6 ce_forward_grad_options_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                                 int64_t num_samples, int64_t ignore_index, int64_t reduction,
                                 const std::optional<at::Tensor>& weight, double label_smoothing, double softcap,
                                 double z_loss);

// linear_cross_entropy (csrc/composite/linear_cross_entropy.cpp, one implementation for CPU and CUDA)
// -> (out, count, loss, lse, row_stats, status, grad_hidden, grad_weight, grad_bias, nll, zloss)
Tensor11 linear_ce_forward(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& targets, const at::Tensor& index, int64_t num_samples,
                           int64_t ignore_index, int64_t reduction, int64_t chunk_size, std::array<bool, 3> grad_mask,
                           const std::optional<at::Tensor>& ce_weight, double label_smoothing, double softcap,
                           double z_loss);
// -> (grad_hidden, grad_weight, grad_bias)
Tensor3 linear_ce_backward(const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse,
                           int64_t ignore_index, int64_t chunk_size, std::array<bool, 3> grad_mask,
                           const std::optional<at::Tensor>& ce_weight, double label_smoothing, double softcap,
                           double z_loss, const std::optional<at::Tensor>& grad_zloss);

// curvature (csrc/cpu/curvature.cpp, csrc/cuda/curvature.cu)
at::Tensor rademacher(const at::Tensor& index, int64_t seed, int64_t probe_start, int64_t n_probes,
                      at::IntArrayRef sample_shape, at::ScalarType dtype);
at::Tensor rademacher_perturb(const at::Tensor& x, const at::Tensor& index, int64_t seed, int64_t probe_start,
                              int64_t n_probes, double h);
// -> (sqnorm, vdot)
Tensor2 probe_reduce(const at::Tensor& grad_perturbed, const at::Tensor& grad_clean, const at::Tensor& index,
                     int64_t seed, int64_t probe_start);

// The dispatcher's typed handle of operator `name` with C++ type Fn (a declaration above).
template <typename Fn>
c10::TypedOperatorHandle<Fn> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

}  // namespace memcore

// The op's name is written once: it gives both the schema name and the declaration's type.
// Handles are cheap to copy; keep one in a function-local static (the lookup takes a lock).
#define MEMCORE_OP(name) ::memcore::typed_op<decltype(::memcore::name)>("memcore::" #name)

#define MEMCORE_IMPL(m, name, fn)                                                                  \
  do {                                                                                             \
    static_assert(std::is_same_v<decltype(fn), decltype(::memcore::name)>,                         \
                  #fn " does not have the C++ type of memcore::" #name " declared in csrc/ops.h"); \
    (m).impl(#name, &fn);                                                                          \
  } while (0)
