// Operator schemas of memcore, defined once for every backend, each with its contract, grouped by
// op family: cross_entropy, linear_cross_entropy, curvature (where each family's kernels, autograd,
// fake kernels, wrapper and tests live: DEVELOPMENT.md, "Op families"); csrc/ops.h declares their
// C++ types. The one translation unit that includes pybind11: the module's few Python-level
// functions are at the end.
#include <torch/library.h>
#include <torch/python.h>

TORCH_LIBRARY(memcore, m) {
  // ---- cross_entropy
  // One pass over each row of logits [N, C]: per-row loss and logsumexp (opmath dtype, [N]),
  // per-row statistics [N, 3] (p(target), margin, correct) and an int32 status word [1] whose bits
  // (csrc/common.h) flag bad targets, bad indices and non-finite losses. Rows whose target is
  // ignore_index get loss 0 and are never read.
  m.def(
      "ce_forward(Tensor logits, Tensor targets, Tensor index, int num_samples, int ignore_index)"
      " -> (Tensor loss, Tensor lse, Tensor row_stats, Tensor status)");
  // grad_logits = (softmax(logits) - onehot(targets)) * grad_loss[:, None], one pass, no softmax
  // tensor materialised; ignored rows get 0. lse: ce_forward's for these logits (softmax is
  // exp(logits - lse); the CUDA kernel takes fp32's target column as minus the others' sum).
  m.def(
      "ce_backward(Tensor grad_loss, Tensor logits, Tensor targets, Tensor lse, int ignore_index)"
      " -> Tensor");
  // ce_forward and the loss reduction (1 mean over non-ignored rows, 2 sum) in one call: out is
  // the 0-d reduced loss (opmath dtype), count the 0-d int64 number of non-ignored rows; the other
  // outputs are ce_forward's. Its backward is ce_backward with every row's upstream gradient
  // grad_out / count (mean) or grad_out (sum): one autograd node for loss and reduction.
  m.def(
      "ce_forward_reduce(Tensor logits, Tensor targets, Tensor index, int num_samples, int ignore_index,"
      " int reduction) -> (Tensor out, Tensor count, Tensor loss, Tensor lse, Tensor row_stats,"
      " Tensor status)");
  // ce_forward_reduce, and the gradient of out w.r.t. the logits (upstream gradient 1: softmax -
  // onehot, / count for mean) written over logits, in the forward's pass (CUDA: a second pass over
  // each row right after the first, from L2 while the rows in flight fit there).
  // accumulate(..., overwrite_logits=True): no N x C gradient buffer and no backward pass over the
  // logits. Its autograd bumps the logits' version counter and hands their memory back as the
  // gradient, scaled by scale_unless_one_; it refuses a second and a double backward.
  m.def(
      "ce_forward_grad_(Tensor(a!) logits, Tensor targets, Tensor index, int num_samples,"
      " int ignore_index, int reduction) -> (Tensor out, Tensor count, Tensor loss, Tensor lse,"
      " Tensor row_stats, Tensor status)");
  // grad *= scale (a 1-element tensor) unless scale == 1, decided on the device: no host sync,
  // and no pass over grad for the usual loss.backward().
  m.def("scale_unless_one_(Tensor(a!) grad, Tensor scale) -> ()");
  // Per-row squared input-gradient norms: float64 [N], scale[r]^2 * sum(grad[r]^2) for each row r of
  // grad [N, ...], 0 where scale[r] == 0 (the row is not read). One pass over grad. accumulate(...,
  // inputs=x) passes scale = 1 / dL/dloss_r, which turns the gradient of the reduced loss into that
  // of the row's own loss.
  m.def("ce_input_sqnorm(Tensor grad, Tensor scale) -> Tensor");
  // The loss options of accumulate / linear_accumulate (softcap, label smoothing, class weights,
  // z-loss): z' = softcap * tanh(z / softcap) where softcap > 0, else z, in opmath. loss, lse,
  // row_stats and status are ce_forward's, of z' (the model's own prediction). smooth [N] (opmath):
  // where label_smoothing > 0, the row's -sum_j u_j log p_j (u = weight when given, else 1;
  // p = softmax(z')), 0 for ignored rows; shape [0] when label_smoothing == 0. weight: [C] opmath,
  // contiguous, on the logits' device, read only for smooth. The caller combines these per-row
  // terms into the options' loss (memcore/cross_entropy.py).
  m.def(
      "ce_forward_options(Tensor logits, Tensor targets, Tensor index, int num_samples, int ignore_index,"
      " float softcap, float label_smoothing, Tensor? weight)"
      " -> (Tensor loss, Tensor lse, Tensor row_stats, Tensor status, Tensor smooth)");
  // The options' logits gradient, in the logits' dtype [N, C]:
  // grad[r, j] = (a[r] p_rj - b[r] [j == t_r] - c[r] u_j) * (softcap > 0 ? 1 - (z'_rj / softcap)^2 : 1)
  // with p = exp(z' - lse), lse ce_forward_options's; a, b opmath [N]; c opmath [N], or [0] for
  // none; u = weight ([C] opmath) or 1. Ignored rows 0. The target's entry is a (p_t - 1) + (a - b)
  // - c u_t, p_t - 1 taken as ce_backward takes it.
  m.def(
      "ce_backward_options(Tensor a, Tensor b, Tensor c, Tensor logits, Tensor targets, Tensor lse,"
      " int ignore_index, float softcap, Tensor? weight) -> Tensor");
  // The options' loss, from ce_forward_options: per row ce_r + z_loss * lse_r^2 on kept rows, with
  // ce_r = (1 - eps) w_t nll_r + (eps / C) smooth_r (w_t = weight[t_r], or 1; eps = label_smoothing),
  // F.cross_entropy's: reduction 0 (none) out [N] per row; 1 (mean) 0-d, the cross-entropy part over
  // the summed w_t of the kept rows, the z-loss part over the kept rows (Liger-Kernel's); 2 (sum)
  // 0-d. zloss: the z-loss part of out, shaped like it. loss (the model's own -log p(target)), lse,
  // row_stats and status: ce_forward_options's. Autograd (C++): ce_backward_options with each row's
  // coefficients; double backward exact.
  m.def(
      "ce_forward_reduce_options(Tensor logits, Tensor targets, Tensor index, int num_samples,"
      " int ignore_index, int reduction, Tensor? weight, float label_smoothing, float softcap, float z_loss)"
      " -> (Tensor out, Tensor zloss, Tensor loss, Tensor lse, Tensor row_stats, Tensor status)");
  // The options' overwrite_logits route: ce_forward_reduce_options (reduction 1 mean or 2 sum), and
  // the gradient of out (upstream gradient 1) written over the logits by ce_backward_options's
  // kernels in place. Outputs as ce_forward_reduce_options's. Autograd as ce_forward_grad_'s.
  m.def(
      "ce_forward_grad_options_(Tensor(a!) logits, Tensor targets, Tensor index, int num_samples,"
      " int ignore_index, int reduction, Tensor? weight, float label_smoothing, float softcap, float z_loss)"
      " -> (Tensor out, Tensor zloss, Tensor loss, Tensor lse, Tensor row_stats, Tensor status)");

  // ---- linear_cross_entropy: fused linear + cross-entropy, composed of ATen GEMMs and the
  // cross_entropy ops (one implementation serves CPU and CUDA): logits = F.linear(hidden [N, H],
  // weight [V, H], bias [V]) are made chunk_size rows at a time and never exist whole. Per-row
  // loss, lse, row_stats and the status word as ce_forward gives them; out is the mean (over
  // non-ignored rows) or the sum (reduction 1 / 2; the sum for 0) in opmath, count the 0-d int64
  // number of non-ignored rows. For reduction 1 / 2 the gradients of the SUM of the losses w.r.t.
  // hidden, weight and bias (those grad_mask selects, else empty) are made in the same pass:
  // hidden's in its dtype, weight's and bias's in opmath (fp32 accumulation across chunks for
  // fp16 / bf16); the backward only scales them. Reduction 0 makes no gradient:
  // linear_ce_backward recomputes.
  // Loss options (accumulate's, on these logits; any of them set routes every chunk through
  // ce_forward_options / ce_backward_options): ce_weight [V] opmath (class weights), label_smoothing,
  // softcap (0: none), z_loss (coefficient of lse^2). Then loss [N] is each row's loss
  // ce_r + z_loss lse_r^2 (ce_r weighted and smoothed), nll [N] the model's own -log p(target) of
  // the soft-capped logits (what the statistics record), zloss [N] the z-loss part (shape [0] when
  // z_loss is 0), out the reduced loss ("mean": the cross-entropy part over the summed class weights
  // of the non-ignored rows, the z-loss part over their number), and the gradients those of out
  // itself (not of the sum): the backward scales them by the upstream gradient only. Without
  // options nll and zloss are empty ([0]).
  m.def(
      "linear_ce_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor index,"
      " int num_samples, int ignore_index, int reduction, int chunk_size, bool[3] grad_mask,"
      " Tensor? ce_weight=None, float label_smoothing=0., float softcap=0., float z_loss=0.)"
      " -> (Tensor out, Tensor count, Tensor loss, Tensor lse, Tensor row_stats, Tensor status,"
      " Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias, Tensor nll, Tensor zloss)");
  // Gradients of sum_r grad_loss[r] * loss_r (reduction "none") w.r.t. hidden, weight and bias in
  // their dtypes, recomputing each logits chunk and its ce_backward: exact per-row upstream
  // gradients, no N x V tensor. lse [N] (opmath) from linear_ce_forward. The loss options as
  // linear_ce_forward takes them (ce_backward_options per chunk); grad_zloss: the upstream gradient
  // of the rows' z-loss parts where it differs from grad_loss (a "mean" recomputed), else None.
  m.def(
      "linear_ce_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets,"
      " Tensor lse, int ignore_index, int chunk_size, bool[3] grad_mask, Tensor? ce_weight=None,"
      " float label_smoothing=0., float softcap=0., float z_loss=0., Tensor? grad_zloss=None)"
      " -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  // ---- curvature: input-loss curvature. Probes are Rademacher vectors from Philox4x32-10
  // (csrc/philox.h): entry e of probe q of the sample with dataset index i is a pure function of
  // (seed, i, q, e), regenerated inside every kernel, never stored.
  // Probes q = probe_start .. probe_start + n_probes - 1 of the samples index [B], as a
  // [n_probes, B, *sample_shape] tensor of +-1 in dtype, on index's device.
  m.def(
      "rademacher(Tensor index, int seed, int probe_start, int n_probes, int[] sample_shape,"
      " ScalarType dtype) -> Tensor");
  // x + h * v for those probes: x contiguous float [B, ...] -> [n_probes, B, ...] in x's dtype.
  m.def(
      "rademacher_perturb(Tensor x, Tensor index, int seed, int probe_start, int n_probes, float h)"
      " -> Tensor");
  // One pass over grad_perturbed [P, B, ...] and grad_clean [B, ...] (probes probe_start ..
  // probe_start + P - 1): per (probe, sample) ||gp - gc||^2 and v . (gp - gc), float64 [P, B].
  m.def(
      "probe_reduce(Tensor grad_perturbed, Tensor grad_clean, Tensor index, int seed,"
      " int probe_start) -> (Tensor sqnorm, Tensor vdot)");
}

#include "cross_entropy_replay.h"
#include "curvature.h"

namespace memcore {
namespace cpu {
const char* block_isa();  // csrc/cpu/cross_entropy_block.cpp
}  // namespace cpu
// csrc/composite/linear_cross_entropy.cpp: the fp32-accumulate GEMM probe for like's dtype and device
// (refused while capturing), and what it found so far
bool linear_ce_gemm_probe(const at::Tensor& like, bool capturing);
std::string linear_ce_gemm_form(const at::Tensor& like);
}  // namespace memcore

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
  m.def("cpu_isa", &memcore::cpu::block_isa,
        "Vector ISA of the CPU cross-entropy kernels in use: avx512, avx2 or baseline");
  // host replays of the CUDA cross-entropy kernels' logic (csrc/cross_entropy_replay.cpp), for
  // tests/test_cross_entropy_replay.py and tests/test_cross_entropy_accuracy.py
  m.def("_ce_row_replay", &memcore::replay::ce_row_replay);
  m.def("_ce_grad_replay", &memcore::replay::ce_grad_replay);
  m.def("_ce_split_slices", &memcore::replay::ce_split_slices);
  m.def("_ce_split_forward_replay", &memcore::replay::ce_split_forward_replay);
  m.def("_ce_split_backward_replay", &memcore::replay::ce_split_backward_replay);
  m.def("_ce_reduce_replay", &memcore::replay::ce_reduce_replay);
  m.def("_ce_forward_options_replay", &memcore::replay::ce_forward_options_replay);
  m.def("_ce_backward_options_replay", &memcore::replay::ce_backward_options_replay);
  m.def("_ce_ex2_model", &memcore::replay::ce_ex2_model);
  m.def("_ce_host_ex2", &memcore::replay::ce_host_ex2);
  // linear_accumulate runs the GEMM probe before a 16-bit CUDA call, outside CUDA-graph capture
  m.def("_linear_ce_gemm_probe", &memcore::linear_ce_gemm_probe);
  m.def("_linear_ce_gemm_form", &memcore::linear_ce_gemm_form);
  // the Philox4x32-10 words every curvature kernel draws its probes from, for known-answer tests
  m.def("_philox4x32", &memcore::cpu::philox4x32_words);
}
