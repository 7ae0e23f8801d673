// The linear_cross_entropy family: memcore::linear_ce_forward / linear_ce_backward (schemas in
// csrc/memcore.cpp), cross-entropy of F.linear(hidden, weight, bias) with per-row statistics,
// composed of ATen GEMMs and the cross_entropy ops, so one implementation is registered for CPU and
// CUDA. Rows go in chunks of chunk_size: per chunk one GEMM makes the logits (hidden's dtype, as
// F.linear), ce_forward_grad_ (mean / sum) or ce_forward (none) reads them, and the gradient GEMMs
// follow; with a loss option (class weights, label smoothing, soft-capping, z-loss) the chunk goes
// through ce_forward_options and, for the gradient, ce_backward_options instead. Memory: one [chunk_size, V] logits chunk, the opmath weight / bias gradient accumulators
// and hidden's gradient [N, H]; never the [N, V] logits. Autograd: memcore/_ops/linear_cross_entropy.py.
// More (fp32 accumulation of 16-bit gradients, the GEMM probe): docs/kernels.md.
#include <torch/extension.h>

#include <array>
#include <atomic>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#ifdef MEMCORE_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include "../checks.h"
#include "../common.h"
#include "../cross_entropy_options.h"
#include "../ops.h"

namespace memcore {
namespace {

bool is_16bit(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// Shapes, dtypes and devices, for direct torch.ops calls (memcore.linear_accumulate checks first and
// names the argument in a Python exception).
void check_linear(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& targets, int64_t chunk_size, const char* op) {
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be 2-D [N, H], got ", hidden.sizes());
  TORCH_CHECK(hidden.is_floating_point(), op, ": hidden must be floating point, got ", hidden.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.size(0) >= 1, op,
              ": weight must be [V, H=", hidden.size(1), "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type() && weight.device() == hidden.device(), op,
              ": weight must have hidden's dtype and device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [V=",
                weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type() && bias->device() == hidden.device(), op,
                ": bias must have hidden's dtype and device");
  }
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) && targets.scalar_type() == at::kLong &&
                  targets.device() == hidden.device() && targets.is_contiguous(),
              op, ": targets must be contiguous int64 [N=", hidden.size(0), "] on hidden's device");
  TORCH_CHECK(chunk_size >= 1, op, ": chunk_size must be >= 1, got ", chunk_size);
}

// Accumulators of the weight and bias gradients: opmath (fp32 for fp16 / bf16). The weight's is
// left unfilled where a chunk will run (N > 0): the first chunk's GEMM writes it (chunk_grads), which
// saves a fill and a read of a [V, H] buffer (1 GiB at V = 128k, H = 2k in fp32); zeros otherwise.
at::Tensor weight_acc(const at::Tensor& weight, const at::Tensor& hidden, bool wanted) {
  const auto opts = weight.options().dtype(opmath_dtype(hidden));
  if (!wanted) return at::empty({0}, opts);
  return hidden.size(0) > 0 ? at::empty(weight.sizes(), opts) : at::zeros(weight.sizes(), opts);
}

at::Tensor bias_acc(const std::optional<at::Tensor>& bias, const at::Tensor& weight, const at::Tensor& hidden,
                    bool wanted) {
  const auto opts = weight.options().dtype(opmath_dtype(hidden));
  return wanted && bias.has_value() ? at::zeros({weight.size(0)}, opts) : at::empty({0}, opts);
}

// c += a @ b with 16-bit a, b and an fp32 c: aten::addmm.dtype_out with self == out, found by name
// at run time so that a torch without that overload still builds (the probe below then says no).
void addmm_fp32_(at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("aten::addmm", "dtype_out")
                       .typed<at::Tensor&(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ScalarType,
                                          const at::Scalar&, const at::Scalar&, at::Tensor&)>();
  op.call(c, a, b, at::kFloat, 1, 1, c);
}

// Whether this torch's addmm takes 16-bit mat1 / mat2 (dtype t) with an fp32 self and out
// (aten::addmm.dtype_out with self == out: C += A @ B on tensor cores, accumulated into fp32 C).
// torch 2.14 accepts it on CUDA; other builds may lack the overload or reject the call. Probed with
// a 2x2 product whose result is checked: 1/1024 + 7 kept only by an fp32 C (a 16-bit C would round
// it to 7), so a torch that took the call but did not accumulate in fp32 falls back too. The
// comparison syncs the host: the family's one sync, once per process and dtype.
//
// The answer is kept per device type and dtype once the probe has one: the overload missing, or the
// product's check. The probe never runs inside CUDA-graph capture (capturing: the caller's stream
// captures), where its sync would invalidate the capture: it raises there, naming the warm-up step,
// unless an earlier call settled the answer. An exception from the probe's GEMM is not an answer
// (an out-of-memory error, a device fault): this call takes the widened GEMM and the next call
// probes again.
enum GemmForm : int { kUnprobed = 0, kFp32Accumulate = 1, kWidened = 2 };
std::array<std::atomic<int>, 4> gemm_forms{};  // [cuda bf16, cuda f16, other bf16, other f16]

std::atomic<int>& gemm_form(at::ScalarType t, const at::Device& device) {
  return gemm_forms[(device.is_cuda() ? 0 : 2) + (t == at::kBFloat16 ? 0 : 1)];
}

bool fp32_accumulate_gemm(at::ScalarType t, const at::Device& device, bool capturing) {
  std::atomic<int>& form = gemm_form(t, device);
  if (const int known = form.load(); known != kUnprobed) return known == kFp32Accumulate;
  TORCH_CHECK(!capturing, "memcore::linear_ce_forward: the first ", t, " call on ", device.type(),
              " probes which weight-gradient GEMM this torch supports, which syncs the host and cannot "
              "run inside CUDA-graph capture; run one step (forward and backward) before capturing: "
              "the warm-up step torch.cuda.graph asks for");
  if (!c10::Dispatcher::singleton().findSchema({"aten::addmm", "dtype_out"}).has_value()) {
    form.store(kWidened);
    return false;
  }
  try {
    const auto f32 = at::TensorOptions().device(device).dtype(at::kFloat);  // the GEMM's own device
    const at::Tensor a = at::arange(1, 5, f32).view({2, 2}).to(t);
    at::Tensor c = at::full({2, 2}, 1.0 / 1024, f32);
    addmm_fp32_(c, a, a);
    const at::Tensor want = at::arange(1, 5, f32).view({2, 2}).matmul(at::arange(1, 5, f32).view({2, 2}));
    const bool ok = at::equal(c, want + 1.0 / 1024);
    form.store(ok ? kFp32Accumulate : kWidened);
    return ok;
  } catch (const c10::Error& e) {
    TORCH_WARN_ONCE("memcore::linear_ce_forward: the probe for an fp32-accumulating ", t,
                    " GEMM raised (", e.what_without_backtrace(), "); this call widens the gradient "
                    "to fp32 for the weight-gradient GEMM, and the next call probes again");
    return false;
  }
}

// Whether the current stream of device captures a CUDA graph.
bool stream_capturing(const at::Device& device) {
#ifdef MEMCORE_WITH_CUDA
  if (!device.is_cuda()) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()).stream(), &status));
  return status != cudaStreamCaptureStatusNone;
#else
  (void)device;
  return false;
#endif
}

// The [chunk_size, V] logits buffer every chunk of a forward reuses (hidden's dtype): one allocation
// per call, so a large chunk is not mapped, faulted in page by page and unmapped again per chunk.
at::Tensor chunk_buffer(const at::Tensor& hidden, const at::Tensor& weight, int64_t chunk_size) {
  return at::empty({std::min(chunk_size, hidden.size(0)), weight.size(0)}, hidden.options());
}

// F.linear(h_chunk, weight, bias) written into the first rows of buf: the chunk's logits [c, V]
at::Tensor linear_into(at::Tensor& buf, const at::Tensor& h_chunk, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  at::Tensor z = buf.narrow(0, 0, h_chunk.size(0));
  if (bias.has_value()) {
    at::addmm_out(z, *bias, h_chunk, weight.t());
  } else {
    at::mm_out(z, h_chunk, weight.t());
  }
  return z;
}

// The gradient GEMMs of one chunk, g = d(sum of the chunk's weighted losses) / d(logits chunk)
// [c, V] in hidden's dtype: grad_hidden rows [start, start + c) = g @ W (complete: one GEMM over V),
// grad_w += g^T @ h_chunk (the first chunk, start 0, writes it: weight_acc leaves it unfilled) and
// grad_b += g.sum(0) in opmath.
void chunk_grads(const at::Tensor& g, const at::Tensor& h_chunk, const at::Tensor& weight, int64_t start,
                 const std::array<bool, 3>& mask, at::Tensor& grad_h, at::Tensor& grad_w, at::Tensor& grad_b) {
  const int64_t c = g.size(0);
  const bool first = start == 0;
  if (mask[0]) {
    at::Tensor rows = grad_h.narrow(0, start, c);
    at::mm_out(rows, g, weight);
  }
  if (mask[1]) {
    if (!is_16bit(g)) {
      if (first) {
        at::mm_out(grad_w, g.t(), h_chunk);
      } else {
        grad_w.addmm_(g.t(), h_chunk);
      }
    } else if (g.is_cuda() && fp32_accumulate_gemm(g.scalar_type(), g.device(), stream_capturing(g.device()))) {
      // tensor cores with an fp32 C: the same sums as below at 16-bit GEMM speed (the widened
      // GEMM below would run without tensor cores: ~15x slower on an H100, ~2 TFLOP per 8k rows)
      if (first) grad_w.zero_();  // an accumulating GEMM only: C starts at zero
      addmm_fp32_(grad_w, g.t(), h_chunk);
    } else if (first) {
      at::mm_out(grad_w, g.to(at::kFloat).t(), h_chunk.to(at::kFloat));
    } else {
      grad_w.addmm_(g.to(at::kFloat).t(), h_chunk.to(at::kFloat));
    }
  }
  if (mask[2] && grad_b.numel() > 0) grad_b.add_(at::sum(g, at::IntArrayRef{0}, /*keepdim=*/false, grad_b.scalar_type()));
}

// the loss options' checks as linear_ce_forward / backward name them (weight: the head's matrix)
void check_options(const LossOptions& o, const at::Tensor& hidden, const at::Tensor& weight, const char* op) {
  check_loss_options(o, weight.size(0), hidden, op, "ce_weight");
}

// linear_ce_forward with loss options: per chunk ce_forward_options (statistics and nll of the
// soft-capped logits, the smoothing term), the options' per-row loss, and for mean / sum the
// gradient of the REDUCED loss through ce_backward_options: both denominators (the summed w_t of the
// cross-entropy part, the kept rows of the z-loss part) are known before the loop, so the backward
// only scales by the upstream gradient. `outs`: the per-row outputs (zero-filled) and the gradient
// buffers the caller allocated (loss, lse, row_stats, status, grad_h, grad_w, grad_b; chunk_grads
// writes grad_h and grad_w's first chunk).
Tensor11 options_forward(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& targets, const at::Tensor& index, int64_t num_samples,
                         int64_t ignore_index, int64_t reduction, int64_t chunk_size, const std::array<bool, 3>& mask,
                         const LossOptions& o, std::array<at::Tensor, 7> outs) {
  auto& [loss, lse, row_stats, status, grad_h, grad_w, grad_b] = outs;
  const int64_t N = hidden.size(0), V = weight.size(0);
  const at::ScalarType acc_t = opmath_dtype(hidden);
  const bool grads = mask[0] || mask[1] || mask[2];
  static const auto forward = MEMCORE_OP(ce_forward_options);
  static const auto backward = MEMCORE_OP(ce_backward_options);

  const RowFactors f = row_factors(targets, ignore_index, V, o, acc_t);
  at::Tensor nll = at::zeros({N}, loss.options());
  at::Tensor zl = o.zc != 0.0 ? at::zeros({N}, loss.options()) : at::empty({0}, loss.options());
  // upstream gradients of the reduced loss: the cross-entropy part's and the z-loss part's
  const at::Tensor one = at::ones({}, loss.options());
  const at::Tensor g = reduction == kMean ? one / f.wsum : one;
  const at::Tensor gz = reduction == kMean ? one / f.count : one;

  at::Tensor logits = chunk_buffer(hidden, weight, chunk_size);
  for (int64_t start = 0; start < N; start += chunk_size) {
    const int64_t c = std::min(chunk_size, N - start);
    const at::Tensor h_chunk = hidden.narrow(0, start, c);
    const at::Tensor t_chunk = targets.narrow(0, start, c), i_chunk = index.narrow(0, start, c);
    const at::Tensor z = linear_into(logits, h_chunk, weight, bias);  // [c, V], hidden's dtype
    const auto [l, ls, rs, st, smooth] =
        forward.call(z, t_chunk, i_chunk, num_samples, ignore_index, o.softcap, o.eps, o.weight);
    const auto [ce, z_rows] = option_losses(f, o, l, ls, smooth, start, c, V);
    loss.narrow(0, start, c).copy_(ce);
    nll.narrow(0, start, c).copy_(l);
    lse.narrow(0, start, c).copy_(ls);
    if (o.zc != 0.0) zl.narrow(0, start, c).copy_(z_rows);
    row_stats.narrow(0, start, c).copy_(rs);
    status.bitwise_or_(st);
    if (grads) {
      const auto [a, b, cc] = option_coefficients(f, o, g, gz, ls, start, c, V);
      const at::Tensor gzc = backward.call(a, b, cc, z, t_chunk, ls, ignore_index, o.softcap, o.weight);
      chunk_grads(gzc, h_chunk, weight, start, mask, grad_h, grad_w, grad_b);
    }
  }
  // ignored and rejected rows hold 0
  const at::Tensor out = std::get<0>(option_reduce(f, loss, zl, reduction));
  if (o.zc != 0.0) loss.add_(zl);
  return {out.to(acc_t), f.count, loss, lse, row_stats, status, grad_h, grad_w, grad_b, nll, zl};
}

Tensor11 linear_ce_forward_composite(const at::Tensor& hidden, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                const at::Tensor& index, int64_t num_samples, int64_t ignore_index,
                                int64_t reduction, int64_t chunk_size, std::array<bool, 3> grad_mask,
                                const std::optional<at::Tensor>& ce_weight, double label_smoothing,
                                double softcap, double z_loss) {
  const char* op = "memcore::linear_ce_forward";
  check_linear(hidden, weight, bias, targets, chunk_size, op);
  const LossOptions opts{ce_weight, label_smoothing, softcap, z_loss};
  check_options(opts, hidden, weight, op);
  check_reduction(reduction, /*allow_none=*/true, op);
  TORCH_CHECK(index.dim() == 1 && index.size(0) == hidden.size(0) && index.scalar_type() == at::kLong &&
                  index.device() == hidden.device() && index.is_contiguous(),
              op, ": index must be contiguous int64 [N] on hidden's device");
  const int64_t N = hidden.size(0), H = hidden.size(1);
  const at::ScalarType acc_t = opmath_dtype(hidden);
  const auto acc = hidden.options().dtype(acc_t);
  const bool grads = reduction != kNone && (grad_mask[0] || grad_mask[1] || grad_mask[2]);
  std::array<bool, 3> mask = grad_mask;
  if (!grads) mask = {false, false, false};
  if (!bias.has_value()) mask[2] = false;
  static const auto forward = MEMCORE_OP(ce_forward);
  static const auto forward_grad = MEMCORE_OP(ce_forward_grad_);

  at::Tensor loss = at::zeros({N}, acc), lse = at::zeros({N}, acc);
  at::Tensor row_stats = at::zeros({N, kNumRowStats}, acc);
  at::Tensor status = at::zeros({1}, hidden.options().dtype(at::kInt));
  at::Tensor grad_h = mask[0] ? at::empty({N, H}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor grad_w = weight_acc(weight, hidden, mask[1]);
  at::Tensor grad_b = bias_acc(bias, weight, hidden, mask[2]);

  if (opts.any()) {
    return options_forward(hidden, weight, bias, targets, index, num_samples, ignore_index, reduction, chunk_size,
                           mask, opts, {loss, lse, row_stats, status, grad_h, grad_w, grad_b});
  }
  at::Tensor logits = chunk_buffer(hidden, weight, chunk_size);
  for (int64_t start = 0; start < N; start += chunk_size) {
    const int64_t c = std::min(chunk_size, N - start);
    const at::Tensor h_chunk = hidden.narrow(0, start, c);
    const at::Tensor t_chunk = targets.narrow(0, start, c), i_chunk = index.narrow(0, start, c);
    at::Tensor z = linear_into(logits, h_chunk, weight, bias);  // [c, V], hidden's dtype
    at::Tensor l, ls, rs, st;
    if (grads) {
      // the gradient of the chunk's summed loss, written over z
      std::tie(std::ignore, std::ignore, l, ls, rs, st) =
          forward_grad.call(z, t_chunk, i_chunk, num_samples, ignore_index, kSum);
      chunk_grads(z, h_chunk, weight, start, mask, grad_h, grad_w, grad_b);
    } else {
      std::tie(l, ls, rs, st) = forward.call(z, t_chunk, i_chunk, num_samples, ignore_index);
    }
    loss.narrow(0, start, c).copy_(l);
    lse.narrow(0, start, c).copy_(ls);
    row_stats.narrow(0, start, c).copy_(rs);
    status.bitwise_or_(st);
  }
  // ignored and rejected rows hold loss 0; the sum in double, like ce_forward_reduce's
  at::Tensor count = targets.ne(ignore_index).sum();
  at::Tensor total = loss.sum(at::kDouble);
  at::Tensor out = (reduction == kMean ? total / count : total).to(acc_t);  // 0 / 0 = NaN, like torch
  // no options: no nll or z-loss rows (two tensors: outputs must not alias)
  return {out, count, loss, lse, row_stats, status, grad_h, grad_w, grad_b, at::empty({0}, acc), at::empty({0}, acc)};
}

Tensor3 linear_ce_backward_composite(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse,
    int64_t ignore_index, int64_t chunk_size, std::array<bool, 3> grad_mask,
    const std::optional<at::Tensor>& ce_weight, double label_smoothing, double softcap, double z_loss,
    const std::optional<at::Tensor>& grad_zloss) {
  const char* op = "memcore::linear_ce_backward";
  check_linear(hidden, weight, bias, targets, chunk_size, op);
  const LossOptions opts{ce_weight, label_smoothing, softcap, z_loss};
  check_options(opts, hidden, weight, op);
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc = opmath_dtype(hidden);
  TORCH_CHECK(grad_loss.numel() == N, op, ": grad_loss must have N=", N, " entries, got ", grad_loss.sizes());
  TORCH_CHECK(!grad_zloss.has_value() || grad_zloss->numel() == N, op, ": grad_zloss must have N=", N,
              " entries, got ", grad_zloss.has_value() ? grad_zloss->sizes() : at::IntArrayRef{});
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == N && lse.scalar_type() == acc && lse.is_contiguous(), op,
              ": lse must be contiguous ", acc, " [N=", N, "]");
  std::array<bool, 3> mask = grad_mask;
  if (!bias.has_value()) mask[2] = false;
  const at::Tensor g = grad_loss.reshape({N}).to(acc).contiguous();
  at::Tensor grad_h = mask[0] ? at::empty({N, H}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor grad_w = weight_acc(weight, hidden, mask[1]);
  at::Tensor grad_b = bias_acc(bias, weight, hidden, mask[2]);
  if ((mask[0] || mask[1] || mask[2]) && opts.any()) {
    static const auto backward = MEMCORE_OP(ce_backward_options);
    const RowFactors f = row_factors(targets, ignore_index, V, opts, acc);
    const at::Tensor gz = grad_zloss.has_value() ? grad_zloss->reshape({N}).to(acc).contiguous() : g;
    for (int64_t start = 0; start < N; start += chunk_size) {
      const int64_t c = std::min(chunk_size, N - start);
      const at::Tensor h_chunk = hidden.narrow(0, start, c), t_chunk = targets.narrow(0, start, c);
      const at::Tensor ls = lse.narrow(0, start, c);
      at::Tensor z = at::linear(h_chunk, weight, bias).contiguous();
      const auto [a, b, cc] = option_coefficients(f, opts, g.narrow(0, start, c), gz.narrow(0, start, c), ls,
                                                  start, c, V);
      const at::Tensor gzc = backward.call(a, b, cc, z, t_chunk, ls, ignore_index, opts.softcap, opts.weight);
      z.reset();
      chunk_grads(gzc, h_chunk, weight, start, mask, grad_h, grad_w, grad_b);
    }
  } else if (mask[0] || mask[1] || mask[2]) {
    static const auto backward = MEMCORE_OP(ce_backward);
    for (int64_t start = 0; start < N; start += chunk_size) {
      const int64_t c = std::min(chunk_size, N - start);
      const at::Tensor h_chunk = hidden.narrow(0, start, c);
      at::Tensor z = at::linear(h_chunk, weight, bias).contiguous();
      const at::Tensor gz = backward.call(g.narrow(0, start, c), z, targets.narrow(0, start, c),
                                             lse.narrow(0, start, c), ignore_index);
      z.reset();  // the logits chunk is done with: one [c, V] buffer less during the GEMMs
      chunk_grads(gz, h_chunk, weight, start, mask, grad_h, grad_w, grad_b);
    }
  }
  grad_w = grad_w.numel() > 0 ? grad_w.to(weight.scalar_type()) : at::empty({0}, weight.options());
  grad_b = grad_b.numel() > 0 ? grad_b.to(hidden.scalar_type()) : at::empty({0}, hidden.options());
  return {grad_h, grad_w, grad_b};
}

}  // namespace

bool linear_ce_gemm_probe(const at::Tensor& like, bool capturing) {
  TORCH_CHECK(like.scalar_type() == at::kHalf || like.scalar_type() == at::kBFloat16,
              "_linear_ce_gemm_probe: like must be float16 or bfloat16, got ", like.scalar_type());
  return fp32_accumulate_gemm(like.scalar_type(), like.device(), capturing);
}

std::string linear_ce_gemm_form(const at::Tensor& like) {
  TORCH_CHECK(like.scalar_type() == at::kHalf || like.scalar_type() == at::kBFloat16,
              "_linear_ce_gemm_form: like must be float16 or bfloat16, got ", like.scalar_type());
  switch (gemm_form(like.scalar_type(), like.device()).load()) {
    case kFp32Accumulate: return "fp32_accumulate";
    case kWidened: return "widened";
    default: return "unprobed";
  }
}

TORCH_LIBRARY_IMPL(memcore, CPU, m) {
  MEMCORE_IMPL(m, linear_ce_forward, linear_ce_forward_composite);
  MEMCORE_IMPL(m, linear_ce_backward, linear_ce_backward_composite);
}

#ifdef MEMCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(memcore, CUDA, m) {
  MEMCORE_IMPL(m, linear_ce_forward, linear_ce_forward_composite);
  MEMCORE_IMPL(m, linear_ce_backward, linear_ce_backward_composite);
}
#endif

}  // namespace memcore
