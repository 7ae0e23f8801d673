// Autograd of memcore::ce_backward, so that a second backward (a gradient penalty:
// torch.autograd.grad(loss, params, create_graph=True), then backward through the penalty) is exact.
//
// ce_backward computes G = (p - y) * g[:, None] with p = softmax(logits), y = onehot(targets),
// g = the rows' upstream gradient; ignored rows give 0. For an upstream V of G:
//   dG/dg:      grad_g[r]      = sum_c V[r, c] * (p - y)[r, c]
//   dG/dlogits: grad_logits[r] = g[r] * p[r] * (V[r] - sum_c p[r, c] * V[r, c])
// The lse argument is the logsumexp of the logits the forward computed (a non-differentiable
// output of ce_forward); the formula above is the whole derivative through softmax, so lse gets
// no gradient. The double backward is written with ATen ops on the logits themselves (softmax
// recomputed), so it is differentiable again: third and higher derivatives are exact as well.
//
// A first-order backward (create_graph=False: grad mode off) goes straight to the kernel below the
// autograd key: the common training step pays one branch for this file.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

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

}  // namespace

TORCH_LIBRARY_IMPL(memcore, Autograd, m) { MEMCORE_IMPL(m, ce_backward, ce_backward_autograd); }

}  // namespace memcore
