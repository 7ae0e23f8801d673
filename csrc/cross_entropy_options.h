// The loss options' per-row algebra, in one place for every op that forms the options' loss from
// the options kernels (ce_forward_options / ce_backward_options): ce_forward_reduce_options and
// ce_forward_grad_options_ (accumulate's two routes; CPU csrc/cpu/cross_entropy.cpp, CUDA
// csrc/cuda/cross_entropy_options.cu, autograd csrc/autograd/cross_entropy.cpp) and linear_ce_forward
// / backward (csrc/composite/linear_cross_entropy.cpp). O(N) ATen work on the rows' device, no host
// sync; the kernels do the O(N C) passes.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <utility>

#include "checks.h"
#include "common.h"
#include "ops.h"

namespace memcore {

// Class weights w ([C] opmath, or none: all 1), label smoothing eps, soft-capping (0: none) and the
// z-loss coefficient zc. any(): whether the options ops are needed at all.
struct LossOptions {
  const std::optional<at::Tensor>& weight;
  double eps, softcap, zc;
  bool any() const { return weight.has_value() || eps != 0.0 || softcap != 0.0 || zc != 0.0; }
};

// the cross_entropy options' checks, and the z-loss coefficient's; weight_name: the weights' name
// in the op's schema
inline void check_loss_options(const LossOptions& o, int64_t classes, const at::Tensor& like, const char* op,
                               const char* weight_name) {
  check_options(classes, like, o.softcap, o.eps, o.weight, op, weight_name);
  TORCH_CHECK(o.zc >= 0.0 && std::isfinite(o.zc), op, ": z_loss must be finite and >= 0, got ", o.zc);
}

// Per-row factors of the options' loss that do not depend on the logits, over all N rows (opmath):
// with w_t = w[t_r] (1 without weights) on kept rows and 0 on ignored ones, W = sum(w) (or C),
//   ce_r = B_r nll_r + (eps / C) smooth_r,    B_r = (1 - eps) w_t,
//   d ce_r / d z = A_r p - B_r onehot_t - (eps / C) u,   A_r = (1 - eps) w_t + (eps / C) W [kept],
// keep = 1 on kept rows, wsum = sum of w_t (the weighted mean's denominator, 0-d) and count = the
// number of kept rows (int64 0-d, exact at any N: the z-loss mean's denominator). Targets out of
// range read the nearest class here: ce_forward_options flags them (the batch is rejected).
struct RowFactors {
  at::Tensor keep, A, B, wsum, count;
};

inline RowFactors row_factors(const at::Tensor& targets, int64_t ignore_index, int64_t C, const LossOptions& o,
                              at::ScalarType acc_t) {
  const at::Tensor kept = targets.ne(ignore_index);
  const at::Tensor keep = kept.to(acc_t);
  at::Tensor w_t = keep;
  at::Tensor big_w = at::scalar_tensor(static_cast<double>(C), keep.options());
  if (o.weight.has_value()) {
    w_t = o.weight->index_select(0, targets.clamp(0, C - 1)) * keep;
    big_w = o.weight->sum();
  }
  at::Tensor B = w_t * (1.0 - o.eps);
  at::Tensor A = o.eps == 0.0 ? B : B + keep * (big_w * (o.eps / static_cast<double>(C)));
  return {keep, A, B, w_t.sum(), kept.sum()};
}

// ce_backward_options' a, b, c of rows [start, start + n) for upstream gradients g (the
// cross-entropy part's) and gz (the z-loss part's), each [n] or 0-d: a = g A + gz 2 zc lse,
// b = g B, c = g eps / C (an empty c without smoothing).
inline Tensor3 option_coefficients(const RowFactors& f, const LossOptions& o, const at::Tensor& g,
                                   const at::Tensor& gz, const at::Tensor& lse, int64_t start, int64_t n,
                                   int64_t C) {
  const at::Tensor keep = f.keep.narrow(0, start, n);
  at::Tensor a = g * f.A.narrow(0, start, n);
  if (o.zc != 0.0) a = a + gz * lse * keep * (2.0 * o.zc);
  at::Tensor b = (g * f.B.narrow(0, start, n)).expand({n}).contiguous();
  at::Tensor cc = o.eps == 0.0 ? at::empty({0}, keep.options())
                               : (g * keep * (o.eps / static_cast<double>(C))).expand({n}).contiguous();
  return {a.expand({n}).contiguous(), b, cc};
}

// The per-row losses of rows [start, start + n) from ce_forward_options' nll, lse and smooth: the
// cross-entropy part B nll + (eps / C) smooth and the z-loss part zc lse^2 on kept rows (an empty
// tensor when zc is 0).
inline Tensor2 option_losses(const RowFactors& f, const LossOptions& o, const at::Tensor& nll, const at::Tensor& lse,
                             const at::Tensor& smooth, int64_t start, int64_t n, int64_t C) {
  at::Tensor ce = f.B.narrow(0, start, n) * nll;
  if (o.eps != 0.0) ce = ce + smooth * (o.eps / static_cast<double>(C));
  at::Tensor zl = o.zc != 0.0 ? lse * lse * f.keep.narrow(0, start, n) * o.zc : at::empty({0}, nll.options());
  return {ce, zl};
}

// F.cross_entropy's reduction of the options' row losses (sums in double, like the default route's):
// (out, zout), out the reduced loss with its z-loss part, zout that part alone. mean: the
// cross-entropy part over the summed w_t, the z-loss part over the kept rows (Liger-Kernel's
// convention); all rows ignored gives NaN, as torch.
inline Tensor2 option_reduce(const RowFactors& f, const at::Tensor& ce, const at::Tensor& zl, int64_t reduction) {
  const at::Tensor total = ce.sum(at::kDouble);
  const at::Tensor ztotal = zl.numel() != 0 ? zl.sum(at::kDouble) : at::zeros({}, total.options());
  if (reduction == kMean) {
    const at::Tensor zout = ztotal / f.count;
    // F.cross_entropy divides its nll and smoothing parts by the summed weights one by one, so a
    // zero total weight gives NaN (0 / 0) even where the smoothing part alone would give inf
    const at::Tensor wsum = f.wsum.to(at::kDouble);
    const at::Tensor ce = at::where(wsum.ne(0), total / wsum, at::full({}, NAN, wsum.options()));
    return {ce + zout, zout};
  }
  return {total + ztotal, ztotal};
}

// The options' loss on one device, kept with its row factors: fwd is that device's
// ce_forward_options kernel; then the options' row losses and F.cross_entropy's reduction (none: per
// row, out = ce + z-loss and zloss the z-loss rows, zeros without it). op names the caller in errors.
template <class Fwd>
std::pair<Tensor6, RowFactors> options_loss(const at::Tensor& logits, const at::Tensor& targets,
                                            const at::Tensor& index, int64_t num_samples, int64_t ignore_index,
                                            int64_t reduction, const LossOptions& o, Fwd&& fwd, const char* op) {
  check_rows(logits, targets, op);
  check_reduction(reduction, /*allow_none=*/true, op);
  check_loss_options(o, logits.size(1), logits, op, "weight");
  auto [nll, lse, row_stats, status, smooth] =
      fwd(logits, targets, index, num_samples, ignore_index, o.softcap, o.eps, o.weight);
  const int64_t N = logits.size(0), C = logits.size(1);
  const at::ScalarType acc_t = opmath_dtype(logits);
  RowFactors f = row_factors(targets, ignore_index, C, o, acc_t);
  const auto [ce, zl] = option_losses(f, o, nll, lse, smooth, 0, N, C);
  if (reduction == kNone) {
    if (zl.numel() == 0) return {{ce, at::zeros_like(ce), nll, lse, row_stats, status}, f};
    return {{ce + zl, zl, nll, lse, row_stats, status}, f};
  }
  const auto [out, zout] = option_reduce(f, ce, zl, reduction);
  return {{out.to(acc_t), zout.to(acc_t), nll, lse, row_stats, status}, f};
}

// ce_forward_reduce_options, one kernel for every device (registered for CPU and CUDA): the device's
// ce_forward_options through the dispatcher, then the options' row losses and reduction in ATen ops
inline Tensor6 forward_reduce_options(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                                      int64_t num_samples, int64_t ignore_index, int64_t reduction,
                                      const std::optional<at::Tensor>& weight, double label_smoothing,
                                      double softcap, double z_loss) {
  static const auto forward = MEMCORE_OP(ce_forward_options);
  const auto fwd = [&](auto&&... args) { return forward.call(args...); };
  const LossOptions o{weight, label_smoothing, softcap, z_loss};
  return options_loss(logits, targets, index, num_samples, ignore_index, reduction, o, fwd,
                      "memcore::ce_forward_reduce_options")
      .first;
}

// ce_forward_grad_options_ on one device: options_loss, then bwd_into (a, b, c, logits, out,
// targets, lse, ignore_index, softcap, weight), its ce_backward_options kernel writing into out,
// here the logits themselves (every backward kernel reads an element before it writes it, and the
// target logit before the row's pass). The gradient is that of the reduced loss for upstream 1:
// a, b, c with g = 1 / sum w_t (mean) or 1 and the z-loss's 1 / count or 1.
template <class Fwd, class BwdInto>
Tensor6 forward_grad_options(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                             int64_t num_samples, int64_t ignore_index, int64_t reduction,
                             const std::optional<at::Tensor>& weight, double label_smoothing, double softcap,
                             double z_loss, Fwd&& fwd, BwdInto&& bwd_into) {
  const char* op = "memcore::ce_forward_grad_options_";
  check_forward_grad(logits, reduction, op);
  const LossOptions o{weight, label_smoothing, softcap, z_loss};
  auto [res, f] = options_loss(logits, targets, index, num_samples, ignore_index, reduction, o, fwd, op);
  const at::Tensor& lse = std::get<3>(res);
  const int64_t N = logits.size(0), C = logits.size(1);
  const at::Tensor one = at::ones({}, lse.options());
  const at::Tensor g = reduction == kMean ? one / f.wsum : one;
  const at::Tensor gz = reduction == kMean ? one / f.count : one;
  const auto [a, b, c] = option_coefficients(f, o, g, gz, lse, 0, N, C);
  bwd_into(a, b, c, logits, logits, targets, lse, ignore_index, softcap, weight);
  return res;
}

}  // namespace memcore
