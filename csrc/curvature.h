// Argument checks and shapes shared by the CPU and CUDA kernels of the curvature ops
// (memcore::rademacher, rademacher_perturb, probe_reduce; schemas in csrc/memcore.cpp) and the
// known-answer test hook below.
// The Python layer (memcore/curvature.py) validates first with ValueError/TypeError naming the
// argument; these keep direct torch.ops calls from ever reading or writing out of bounds.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "philox.h"

namespace memcore {

inline bool is_probe_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Probe numbers are the second Philox counter word, so probe_start + n_probes must fit in 32 bits.
inline void check_probe_range(int64_t probe_start, int64_t n_probes, const char* op) {
  TORCH_CHECK(n_probes >= 0, op, ": n_probes must be >= 0, got ", n_probes);
  TORCH_CHECK(probe_start >= 0 && probe_start + n_probes <= (int64_t(1) << 32), op,
              ": probes [probe_start, probe_start + n_probes) must lie in [0, 2^32), got probe_start=",
              probe_start, ", n_probes=", n_probes);
}

inline void check_index(const at::Tensor& index, int64_t B, const at::Device& device, const char* op) {
  TORCH_CHECK(index.dim() == 1 && index.size(0) == B, op, ": index must be 1-D with B=", B,
              " entries, got ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
  TORCH_CHECK(index.device() == device, op, ": index must be on ", device, ", got ", index.device());
  TORCH_CHECK(index.is_contiguous(), op, ": index must be contiguous");
}

// Elements per sample; the element block number is the first Philox counter word (32 bits).
inline int64_t sample_numel(at::IntArrayRef sample_shape, const char* op) {
  int64_t d = 1;
  for (int64_t s : sample_shape) {
    TORCH_CHECK(s >= 0, op, ": negative size in sample shape ", sample_shape);
    d *= s;
  }
  TORCH_CHECK(d <= (int64_t(1) << 32) * kPhiloxBits, op, ": samples of ", d, " elements are too large");
  return d;
}

// x: contiguous float [B, ...]. Returns the per-sample numel D.
inline int64_t check_samples(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(x.dim() >= 1, op, ": ", name, " must be [B, ...], got a 0-d tensor");
  TORCH_CHECK(is_probe_dtype(x.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
  return sample_numel(x.sizes().slice(1), op);
}

// Checked arguments of rademacher / rademacher_perturb and their output, allocated uninitialised:
// out [P, B, ...] on the index's (x's) device; B samples of D elements each.
struct ProbeOutput {
  at::Tensor out;
  int64_t B, D;
};

inline ProbeOutput perturb_output(const at::Tensor& x, const at::Tensor& index, int64_t probe_start,
                                  int64_t n_probes) {
  const char* op = "memcore::rademacher_perturb";
  const int64_t D = check_samples(x, "x", op);
  check_index(index, x.size(0), x.device(), op);
  check_probe_range(probe_start, n_probes, op);
  std::vector<int64_t> shape{n_probes};
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
  return {at::empty(shape, x.options()), x.size(0), D};
}

inline ProbeOutput rademacher_output(const at::Tensor& index, int64_t probe_start, int64_t n_probes,
                                     at::IntArrayRef sample_shape, at::ScalarType dtype) {
  const char* op = "memcore::rademacher";
  TORCH_CHECK(is_probe_dtype(dtype), op, ": dtype must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(index.dim() == 1, op, ": index must be 1-D [B], got ", index.sizes());
  const int64_t B = index.size(0);
  check_index(index, B, index.device(), op);
  check_probe_range(probe_start, n_probes, op);
  const int64_t D = sample_numel(sample_shape, op);
  std::vector<int64_t> shape{n_probes, B};
  shape.insert(shape.end(), sample_shape.begin(), sample_shape.end());
  return {at::empty(shape, index.options().dtype(dtype)), B, D};
}

inline void check_probe_reduce(const at::Tensor& gp, const at::Tensor& gc, const at::Tensor& index,
                               int64_t probe_start) {
  const char* op = "memcore::probe_reduce";
  check_samples(gc, "grad_clean", op);
  check_samples(gp, "grad_perturbed", op);
  TORCH_CHECK(gp.dim() == gc.dim() + 1 && gp.sizes().slice(1) == gc.sizes(), op,
              ": grad_perturbed must be [P, *grad_clean.shape] = [P, ", gc.sizes(), "], got ",
              gp.sizes());
  TORCH_CHECK(gp.scalar_type() == gc.scalar_type(), op, ": grad_perturbed (", gp.scalar_type(),
              ") and grad_clean (", gc.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(gp.device() == gc.device(), op, ": grad_perturbed and grad_clean must be on one device");
  check_index(index, gc.size(0), gc.device(), op);
  check_probe_range(probe_start, gp.size(0), op);
}

inline void check_philox(const at::Tensor& counter) {
  const char* op = "_philox4x32";
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4, op, ": counter must be [N, 4], got ",
              counter.sizes());
  TORCH_CHECK(counter.scalar_type() == at::kLong, op, ": counter must be int64, got ",
              counter.scalar_type());
  TORCH_CHECK(counter.is_contiguous() && counter.device().is_cpu(), op, ": counter must be contiguous, on the CPU");
}

namespace cpu {
// Raw Philox4x32-10 words (csrc/cpu/curvature.cpp) for the known-answer tests, bound as
// memcore._C._philox4x32: counter int64 [N, 4] (low 32 bits of each entry), key = the 64 bits of
// seed; returns int64 [N, 4] words in [0, 2^32). The kernels run the same csrc/philox.h code.
at::Tensor philox4x32_words(const at::Tensor& counter, int64_t seed);
}  // namespace cpu

}  // namespace memcore
