// Operator schemas of memcore, defined once for every backend (CPU kernels in csrc/cpu, CUDA
// kernels in csrc/cuda). The Python layer (memcore/_ops.py) adds fake tensors and autograd.
#include <torch/extension.h>

TORCH_LIBRARY(memcore, m) {
  // One pass over each row of logits [N, C]: per-row loss and logsumexp (opmath dtype, [N]),
  // per-row statistics [N, 3] (p(target), margin, correct) and an int32 status word [1] whose bits
  // (csrc/common.h) flag bad targets, bad indices and non-finite losses. Rows whose target is
  // ignore_index get loss 0 and are never read.
  m.def(
      "ce_forward(Tensor logits, Tensor targets, Tensor index, int num_samples, int ignore_index)"
      " -> (Tensor loss, Tensor lse, Tensor row_stats, Tensor status)");
  // grad_logits = (softmax(logits) - onehot(targets)) * grad_loss[:, None], one pass, no softmax
  // tensor materialised; ignored rows get 0.
  m.def(
      "ce_backward(Tensor grad_loss, Tensor logits, Tensor targets, Tensor lse, int ignore_index)"
      " -> Tensor");
  // Adds each non-ignored row's statistics into stats[index[row]] (float64 [S, 6]) with atomic
  // adds; does nothing when status != 0, so a rejected batch leaves the tracker untouched.
  m.def(
      "ce_commit(Tensor(a!) stats, Tensor index, Tensor targets, Tensor loss, Tensor row_stats,"
      " Tensor status, int ignore_index) -> ()");
  // Per-sample squared input-gradient norms: for each row r of grad [N, ...] with scale[r] != 0,
  // adds (scale[r]^2 * sum(grad[r]^2), 1) into stats[index[r]] (float64 [S, 2]) in one pass.
  // scale = 1 / dL/dloss_r turns the gradient of the reduced loss into that of the row's own loss.
  m.def("sqnorm_commit(Tensor(a!) stats, Tensor grad, Tensor scale, Tensor index) -> ()");
}

namespace {
bool with_cuda() {
#ifdef MEMCORE_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "memcore native kernels; the operators live in torch.ops.memcore";
  m.def("with_cuda", &with_cuda, "True when the CUDA kernels were compiled in");
}
