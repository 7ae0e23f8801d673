// Autograd (dispatch key Autograd) of the cross-entropy family, in C++ so that a training step's
// backward runs without the Python interpreter (the per-call cost decides small batches):
//   ce_forward, ce_forward_reduce: backward = one ce_backward call, (softmax - onehot) times the
//     row's upstream gradient (grad_out / count for the mean); the node keeps logits, targets and
//     lse alive, copying nothing.
//   ce_backward: its own derivative, so double backward (gradient penalties) is exact; written with
//     ATen ops on the logits, so it is differentiable again.
//   ce_forward_grad_ and ce_forward_grad_options_ (overwrite_logits=True): the forward writes the
//     gradient over the logits and bumps their version counter; the backward hands that memory
//     back, scaled by scale_unless_one_. It refuses a second backward (the gradient exists once)
//     and a double backward (it is stored, not a function of the logits).
//   ce_forward_reduce_options (the loss options): backward = one ce_backward_options call with each
//     row's coefficients (csrc/cross_entropy_options.h); double backward through ATen ops.
// Fake kernels for torch.compile: memcore/_ops/cross_entropy.py. More: docs/kernels.md.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../common.h"
#include "../cross_entropy_options.h"
#include "../ops.h"

namespace memcore {
namespace {

at::Tensor call_ce_backward_kernel(const at::Tensor& grad_loss, const at::Tensor& logits,
                                   const at::Tensor& targets, const at::Tensor& lse, int64_t ignore_index) {
  static const auto op = MEMCORE_OP(ce_backward);
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(grad_loss, logits, targets, lse, ignore_index);
}

class CEBackward : public torch::autograd::Function<CEBackward> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& grad_loss, const at::Tensor& logits,
                                                const at::Tensor& targets, const at::Tensor& lse,
                                                int64_t ignore_index) {
    at::Tensor grad = call_ce_backward_kernel(grad_loss, logits, targets, lse, ignore_index);
    ctx->save_for_backward({grad_loss, logits, targets});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["opmath"] = static_cast<int64_t>(lse.scalar_type());
    return {grad};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& g_in = saved[0];
    const at::Tensor& logits = saved[1];
    const at::Tensor& targets = saved[2];
    const auto opmath = static_cast<at::ScalarType>(ctx->saved_data["opmath"].toInt());
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};

    const int64_t c = logits.size(1);
    at::Tensor keep = targets.ne(ignore_index);                                   // [N]
    at::Tensor safe_t = at::where(keep, targets, at::zeros_like(targets));
    at::Tensor z = at::where(keep.unsqueeze(1), logits.to(opmath), at::zeros({}, logits.options().dtype(opmath)));
    at::Tensor p = at::softmax(z, 1);
    at::Tensor y = at::arange(c, targets.options()).unsqueeze(0).eq(safe_t.unsqueeze(1)).to(opmath);
    at::Tensor v = grads[0].to(opmath);
    at::Tensor zero = at::zeros({}, p.options());
    at::Tensor g = g_in.to(opmath);

    at::Tensor grad_g = at::where(keep, ((p - y) * v).sum(1), zero).to(g_in.scalar_type());
    at::Tensor pv = (p * v).sum(1, /*keepdim=*/true);
    at::Tensor grad_logits =
        at::where(keep.unsqueeze(1), g.unsqueeze(1) * p * (v - pv), zero).to(logits.scalar_type());
    return {grad_g, grad_logits, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor ce_backward_autograd(const at::Tensor& grad_loss, const at::Tensor& logits,
                                const at::Tensor& targets, const at::Tensor& lse, int64_t ignore_index) {
  if (!at::GradMode::is_enabled() || !(grad_loss.requires_grad() || logits.requires_grad())) {
    return call_ce_backward_kernel(grad_loss, logits, targets, lse, ignore_index);
  }
  return CEBackward::apply(grad_loss, logits, targets, lse, ignore_index)[0];
}

// ce_backward through the dispatcher, its autograd included: differentiable when the backward
// builds a graph (create_graph=True)
at::Tensor call_ce_backward_op(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                               const at::Tensor& lse, int64_t ignore_index) {
  static const auto op = MEMCORE_OP(ce_backward);
  return op.call(grad_loss, logits, targets, lse, ignore_index);
}

class CEForward : public torch::autograd::Function<CEForward> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& logits, const at::Tensor& targets,
                                                const at::Tensor& index, int64_t num_samples,
                                                int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = MEMCORE_OP(ce_forward);
    auto [loss, lse, row_stats, status] = op.call(logits, targets, index, num_samples, ignore_index);
    ctx->set_materialize_grads(false);  // no zero tensors for the outputs without a gradient
    ctx->save_for_backward({logits, targets, lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({lse, row_stats, status});
    return {loss, lse, row_stats, status};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad = call_ce_backward_op(grads[0], saved[0], saved[1], saved[2],
                                          ctx->saved_data["ignore_index"].toInt());
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// out = mean / sum of the per-row losses; its gradient reaches every row as grad_out / count or
// grad_out, so loss and reduction are one node and the backward one ce_backward call.
class CEForwardReduce : public torch::autograd::Function<CEForwardReduce> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& logits, const at::Tensor& targets,
                                                const at::Tensor& index, int64_t num_samples,
                                                int64_t ignore_index, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = MEMCORE_OP(ce_forward_reduce);
    auto [out, count, loss, lse, row_stats, status] =
        op.call(logits, targets, index, num_samples, ignore_index, reduction);
    ctx->set_materialize_grads(false);  // no zero tensors for the outputs without a gradient
    ctx->save_for_backward({logits, targets, lse, count});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({count, loss, lse, row_stats, status});
    return {out, count, loss, lse, row_stats, status};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    at::Tensor g = grads[0].to(saved[2].scalar_type());
    if (ctx->saved_data["reduction"].toInt() == kMean) g = g / saved[3];
    at::Tensor grad = call_ce_backward_op(g.expand({logits.size(0)}), logits, saved[1], saved[2],
                                          ctx->saved_data["ignore_index"].toInt());
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The options' loss (accumulate with weight / label_smoothing / softcap / z_loss): out's gradient
// is ce_backward_options with each row's a, b, c (cross_entropy_options.h) for the upstream gradient
// of out (0-d for mean / sum, [N] for none; the z-loss part shares it, zloss is reported without a
// gradient). Under create_graph=True the same gradient is built from differentiable ATen ops of
// the logits instead, so its own derivative is exact.
class CEForwardReduceOptions : public torch::autograd::Function<CEForwardReduceOptions> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                                                const at::Tensor& targets, const at::Tensor& index,
                                                int64_t num_samples, int64_t ignore_index, int64_t reduction,
                                                const std::optional<at::Tensor>& weight, double label_smoothing,
                                                double softcap, double z_loss) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = MEMCORE_OP(ce_forward_reduce_options);
    auto [out, zloss, loss, lse, row_stats, status] = op.call(logits, targets, index, num_samples, ignore_index,
                                                              reduction, weight, label_smoothing, softcap, z_loss);
    ctx->set_materialize_grads(false);  // no zero tensors for the outputs without a gradient
    ctx->save_for_backward({logits, targets, lse, weight.has_value() ? *weight : at::Tensor()});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["z_loss"] = z_loss;
    ctx->mark_non_differentiable({zloss, loss, lse, row_stats, status});
    return {out, zloss, loss, lse, row_stats, status};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(10);
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const at::Tensor& targets = saved[1];
    const at::Tensor& lse = saved[2];
    const std::optional<at::Tensor> w = saved[3].defined() ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const double eps = ctx->saved_data["label_smoothing"].toDouble(), cap = ctx->saved_data["softcap"].toDouble();
    const LossOptions o{w, eps, cap, ctx->saved_data["z_loss"].toDouble()};
    const int64_t N = logits.size(0), C = logits.size(1);
    const RowFactors f = row_factors(targets, ignore_index, C, o, lse.scalar_type());
    // the upstream gradients of each row's cross-entropy part and z-loss part
    at::Tensor g = grads[0].to(lse.scalar_type()), gz = g;
    if (ctx->saved_data["reduction"].toInt() == kMean) {
      gz = g / f.count;
      g = g / f.wsum;
    }
    if (!at::GradMode::is_enabled()) {
      static const auto backward = MEMCORE_OP(ce_backward_options);
      const auto [a, b, c] = option_coefficients(f, o, g, gz, lse, 0, N, C);
      out[0] = backward.call(a, b, c, logits, targets, lse, ignore_index, cap, w);
      return out;
    }
    // double backward: (a p - b onehot - c u) (1 - tanh^2) in differentiable ops of the logits. The
    // rows the kernel skips (ignored, target out of range) take a zero scale, as there: with every
    // row ignored "mean"'s 1 / 0 would make 0 * inf = NaN of them (F.cross_entropy gives zeros)
    const at::Tensor rows = targets.ne(ignore_index).logical_and(targets.ge(0)).logical_and(targets.lt(C));
    const at::Tensor zero = at::zeros({}, g.options());
    g = at::where(rows, g, zero);
    gz = at::where(rows, gz, zero);
    at::Tensor z = logits.to(lse.scalar_type());
    if (cap != 0.0) z = at::tanh(z / cap) * cap;
    const at::Tensor lse_z = at::logsumexp(z, {1});
    at::Tensor a = g * f.A;
    if (o.zc != 0.0) a = a + gz * lse_z * f.keep * (2.0 * o.zc);
    const at::Tensor safe_t = at::where(rows, targets, at::zeros_like(targets));  // skipped rows: g = 0
    const at::Tensor onehot = at::arange(C, targets.options()).unsqueeze(0).eq(safe_t.unsqueeze(1)).to(z.scalar_type());
    at::Tensor grad = a.unsqueeze(1) * at::exp(z - lse_z.unsqueeze(1)) - (g * f.B).unsqueeze(1) * onehot;
    if (eps != 0.0) {
      const at::Tensor c = (g * f.keep * (eps / static_cast<double>(C))).unsqueeze(1);
      grad = grad - (w.has_value() ? c * w->unsqueeze(0) : c);
    }
    if (cap != 0.0) grad = grad * (1.0 - (z / cap).square());
    out[0] = grad.to(logits.scalar_type());
    return out;
  }
};

Tensor6 ce_forward_reduce_options_autograd(const at::Tensor& logits, const at::Tensor& targets,
                                           const at::Tensor& index, int64_t num_samples, int64_t ignore_index,
                                           int64_t reduction, const std::optional<at::Tensor>& weight,
                                           double label_smoothing, double softcap, double z_loss) {
  auto out = CEForwardReduceOptions::apply(logits, targets, index, num_samples, ignore_index, reduction, weight,
                                           label_smoothing, softcap, z_loss);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

// f() (ce_forward_grad_ or ce_forward_grad_options_ on z, a detached alias of the logits: same
// memory, same version counter) below autograd; then the version bump that a C++ op does not make
// itself, so that autograd catches any other node that saved the logits ("modified by an inplace
// operation").
template <class F>
Tensor6 overwrite_below_autograd(const at::Tensor& z, F&& f) {
  Tensor6 res;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    res = f();
  }
  if (!z.is_inference()) torch::autograd::impl::bump_version(z);  // inference tensors have none
  return res;
}

Tensor6 forward_grad_below_autograd(at::Tensor z, const at::Tensor& targets, const at::Tensor& index,
                                    int64_t num_samples, int64_t ignore_index, int64_t reduction) {
  static const auto op = MEMCORE_OP(ce_forward_grad_);
  return overwrite_below_autograd(z, [&] { return op.call(z, targets, index, num_samples, ignore_index, reduction); });
}

Tensor6 forward_grad_options_below_autograd(at::Tensor z, const at::Tensor& targets, const at::Tensor& index,
                                            int64_t num_samples, int64_t ignore_index, int64_t reduction,
                                            const std::optional<at::Tensor>& weight, double label_smoothing,
                                            double softcap, double z_loss) {
  static const auto op = MEMCORE_OP(ce_forward_grad_options_);
  return overwrite_below_autograd(z, [&] {
    return op.call(z, targets, index, num_samples, ignore_index, reduction, weight, label_smoothing, softcap, z_loss);
  });
}

// The backward of an overwrite node: the gradient of out w.r.t. the logits is the logits' own
// memory after the forward (saved_data "grad"), handed out once, scaled by the upstream gradient;
// n_inputs: the forward's argument count (the logits first).
torch::autograd::variable_list hand_back_grad(torch::autograd::AutogradContext* ctx,
                                              const torch::autograd::variable_list& grads, size_t n_inputs) {
  // grad mode is on inside a backward exactly when it builds a graph (create_graph=True)
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "memcore.accumulate(..., overwrite_logits=True) does not support double backward "
              "(create_graph=True, e.g. a gradient penalty): its gradient was written in the forward pass "
              "and is not a function of the logits. Use overwrite_logits=False, whose double backward is exact.");
  const auto it = ctx->saved_data.find("grad");
  TORCH_CHECK(it != ctx->saved_data.end(),
              "memcore.accumulate(..., overwrite_logits=True) keeps the logits gradient once, in the logits' "
              "own memory; a second backward through the same loss (retain_graph=True) cannot recompute it. "
              "Use overwrite_logits=False for that.");
  at::Tensor grad = it->second.toTensor();
  ctx->saved_data.erase(it);
  torch::autograd::variable_list out(n_inputs);
  if (!grads[0].defined()) return out;
  static const auto scale = MEMCORE_OP(scale_unless_one_);
  scale.call(grad, grads[0]);
  out[0] = grad;
  return out;
}

// out's node (ce_forward_grad_): the logits' gradient is their own memory after the forward.
class CEForwardGrad : public torch::autograd::Function<CEForwardGrad> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                                                const at::Tensor& targets, const at::Tensor& index,
                                                int64_t num_samples, int64_t ignore_index, int64_t reduction) {
    const at::Tensor z = logits.detach();
    auto [out, count, loss, lse, row_stats, status] =
        forward_grad_below_autograd(z, targets, index, num_samples, ignore_index, reduction);
    // kept as data, not a saved variable: its version moved on purpose, and the backward hands it
    // out once
    ctx->saved_data["grad"] = z;
    ctx->mark_non_differentiable({count, loss, lse, row_stats, status});
    return {out, count, loss, lse, row_stats, status};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return hand_back_grad(ctx, grads, 6);
  }
};

// out's node of the options' overwrite route (ce_forward_grad_options_), as CEForwardGrad's; zloss,
// the z-loss part already in out, is reported without a gradient.
class CEForwardGradOptions : public torch::autograd::Function<CEForwardGradOptions> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                                                const at::Tensor& targets, const at::Tensor& index,
                                                int64_t num_samples, int64_t ignore_index, int64_t reduction,
                                                const std::optional<at::Tensor>& weight, double label_smoothing,
                                                double softcap, double z_loss) {
    const at::Tensor z = logits.detach();
    auto [out, zloss, loss, lse, row_stats, status] = forward_grad_options_below_autograd(
        z, targets, index, num_samples, ignore_index, reduction, weight, label_smoothing, softcap, z_loss);
    ctx->saved_data["grad"] = z;
    ctx->mark_non_differentiable({zloss, loss, lse, row_stats, status});
    return {out, zloss, loss, lse, row_stats, status};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return hand_back_grad(ctx, grads, 10);
  }
};

Tensor6 ce_forward_grad_autograd(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                                 int64_t num_samples, int64_t ignore_index, int64_t reduction) {
  if (!at::GradMode::is_enabled() || !logits.requires_grad()) {
    return forward_grad_below_autograd(logits, targets, index, num_samples, ignore_index, reduction);
  }
  auto out = CEForwardGrad::apply(logits, targets, index, num_samples, ignore_index, reduction);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

Tensor6 ce_forward_grad_options_autograd(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                                         int64_t num_samples, int64_t ignore_index, int64_t reduction,
                                         const std::optional<at::Tensor>& weight, double label_smoothing,
                                         double softcap, double z_loss) {
  if (!at::GradMode::is_enabled() || !logits.requires_grad()) {
    return forward_grad_options_below_autograd(logits, targets, index, num_samples, ignore_index, reduction, weight,
                                               label_smoothing, softcap, z_loss);
  }
  auto out = CEForwardGradOptions::apply(logits, targets, index, num_samples, ignore_index, reduction, weight,
                                         label_smoothing, softcap, z_loss);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

Tensor6 ce_forward_reduce_autograd(const at::Tensor& logits, const at::Tensor& targets,
                                   const at::Tensor& index, int64_t num_samples, int64_t ignore_index,
                                   int64_t reduction) {
  auto out = CEForwardReduce::apply(logits, targets, index, num_samples, ignore_index, reduction);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

Tensor4 ce_forward_autograd(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                            int64_t num_samples, int64_t ignore_index) {
  auto out = CEForward::apply(logits, targets, index, num_samples, ignore_index);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(memcore, Autograd, m) {
  MEMCORE_IMPL(m, ce_forward, ce_forward_autograd);
  MEMCORE_IMPL(m, ce_forward_reduce, ce_forward_reduce_autograd);
  MEMCORE_IMPL(m, ce_forward_grad_, ce_forward_grad_autograd);
  MEMCORE_IMPL(m, ce_forward_reduce_options, ce_forward_reduce_options_autograd);
  MEMCORE_IMPL(m, ce_forward_grad_options_, ce_forward_grad_options_autograd);
  MEMCORE_IMPL(m, ce_backward, ce_backward_autograd);
}

}  // namespace memcore
