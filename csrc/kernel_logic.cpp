// Host replays of the CUDA cross-entropy kernels' logic (csrc/cuda/ce_row.h), compiled into every
// build (bound in csrc/memcore.cpp) so tests/test_kernel_logic.py checks it against the CPU kernels
// without a GPU:
//   _ce_row_replay:    a row's forward, thread by thread as ce_forward_kernel splits it (walk_row
//                      per lane, the warp butterfly and the cross-warp merge in the kernel's order)
//   _ce_grad_replay:   the gradient pass (grad_row per lane, then the target column's owner)
//   _seg_commit_replay: one warp of ce_commit_kernel's segmented reduction over equal indices
// Only the memory system differs: lanes run one after another, which is what the kernels' own
// ordering (barriers; each element read and written by one thread) makes equivalent.
#include "kernel_logic.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstring>
#include <vector>

#include "cuda/ce_row.h"

namespace memcore {
namespace kernel_logic {
namespace {

using cerow::OpMath;
using cerow::Part;

// the kernel's warp_merge over each warp of p (size TPR): merge(self, lane ^ off), off = 16..1
template <typename acc_t>
void butterfly(std::vector<Part<acc_t>>& p) {
  for (int off = 16; off > 0; off >>= 1) {
    const std::vector<Part<acc_t>> q = p;
    for (size_t lane = 0; lane < p.size(); ++lane) {
      Part<acc_t> o = q[lane ^ off];
      o.shift = 0;
      p[lane] = cerow::merge(q[lane], o);
    }
  }
}

template <typename scalar_t, int TPR, int VEC>
std::vector<double> forward_row(const scalar_t* z, int64_t C, int64_t t) {
  using acc_t = typename OpMath<scalar_t>::type;
  std::vector<Part<acc_t>> p(TPR);
  for (int lane = 0; lane < TPR; ++lane) p[lane] = cerow::walk_row<scalar_t, TPR, VEC>(z, C, t, lane);
  butterfly(p);
  if (TPR > 32) {  // row_merge: lane 0 of each warp to shared memory, then every warp merges them
    constexpr int kWarps = TPR / 32;
    std::vector<Part<acc_t>> sm(kWarps);
    for (int w = 0; w < kWarps; ++w) sm[w] = p[w * 32];
    for (int lane = 0; lane < TPR; ++lane) {
      const int wl = lane % 32;
      p[lane] = cerow::part_init<acc_t>();
      if (wl < kWarps) {
        p[lane].m = sm[wl].m; p[lane].s = sm[wl].s; p[lane].before = sm[wl].before; p[lane].after = sm[wl].after;
      }
    }
    butterfly(p);
  }
  // the gradient pass takes lse from every thread of the row: they must agree bit for bit
  for (int lane = 1; lane < TPR; ++lane) {
    const bool same = (p[lane].m == p[0].m || (p[lane].m != p[lane].m && p[0].m != p[0].m)) &&
                      (p[lane].s == p[0].s || (p[lane].s != p[lane].s && p[0].s != p[0].s)) &&
                      p[lane].before == p[0].before && p[lane].after == p[0].after;
    TORCH_CHECK(same, "_ce_row_replay: lane ", lane, " ends with another row state than lane 0");
  }
  const cerow::RowOut<acc_t> o = cerow::finish(p[0], static_cast<acc_t>(z[t]));
  return {double(o.lse), double(o.loss), double(o.prob), double(o.margin), double(o.correct)};
}

template <typename scalar_t, int TPR, int VEC>
void grad_row(const scalar_t* z, scalar_t* out, int64_t C, int64_t t, double lse, double g) {
  using acc_t = typename OpMath<scalar_t>::type;
  const acc_t zt = static_cast<acc_t>(z[t]);  // read before the pass (out may be z)
  const cerow::Layout L = cerow::layout<VEC>(reinterpret_cast<uintptr_t>(z), sizeof(scalar_t), C, t);
  const int own = cerow::owner<TPR, VEC>(L, t);
  // lanes run one after another here, so a wrong owner could still leave the right value last;
  // out[t] starts as a marker the pass cannot write, and must first change in the owner's pass
  // (the kernel relies on the owner's program order, not on the order of lanes)
  const bool mark = out != z;
  unsigned char marker[sizeof(scalar_t)];
  std::memset(marker, 0xA5, sizeof(marker));
  if (mark) std::memcpy(&out[t], marker, sizeof(scalar_t));
  for (int lane = 0; lane < TPR; ++lane) {
    cerow::grad_row<scalar_t, TPR, VEC>(z, out, C, L, acc_t(lse), acc_t(g), lane);
    if (mark) {
      const bool written = std::memcmp(&out[t], marker, sizeof(scalar_t)) != 0;
      TORCH_CHECK(written == (lane >= own), "_ce_grad_replay: column ", t, " is written by lane ",
                  written ? lane : -1, ", the fix-up is done by lane ", own);
    }
    if (lane == own) out[t] = static_cast<scalar_t>(cerow::target_grad(zt, acc_t(lse), acc_t(g)));
  }
}

// f(Int<TPR>, Int<VEC>) for the launch shapes the CUDA launcher can pick
template <typename scalar_t, typename F>
void by_shape(int64_t tpr, bool vec, F&& f) {
  constexpr int V = cerow::kVec<scalar_t>;
  auto with_vec = [&](auto t) {
    if (vec) f(t, std::integral_constant<int, V>{});
    else f(t, std::integral_constant<int, 1>{});
  };
  if (tpr == 32) with_vec(std::integral_constant<int, 32>{});
  else if (tpr == 256) with_vec(std::integral_constant<int, 256>{});
  else if (tpr == 512) with_vec(std::integral_constant<int, 512>{});
  else TORCH_CHECK(false, "threads per row must be 32, 256 or 512, got ", tpr);
}

void check_row(const at::Tensor& row, int64_t target, bool vec, const char* op) {
  TORCH_CHECK(row.dim() == 1 && row.is_contiguous() && row.device().is_cpu(), op, ": row must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(target >= 0 && target < row.size(0), op, ": target must lie in [0, C)");
  TORCH_CHECK(!vec || reinterpret_cast<uintptr_t>(row.data_ptr()) % row.element_size() == 0, op,
              ": packs need an element-aligned row");
}

}  // namespace

at::Tensor ce_row_replay(const at::Tensor& row, int64_t target, int64_t tpr, bool vec) {
  check_row(row, target, vec, "_ce_row_replay");
  std::vector<double> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, row.scalar_type(), "_ce_row_replay", [&] {
    by_shape<scalar_t>(tpr, vec, [&](auto T, auto V) {
      r = forward_row<scalar_t, decltype(T)::value, decltype(V)::value>(row.data_ptr<scalar_t>(), row.size(0), target);
    });
  });
  return at::tensor(r, at::kDouble);
}

void ce_grad_replay(const at::Tensor& row, at::Tensor& out, int64_t target, double lse, double g, int64_t tpr,
                    bool vec) {
  check_row(row, target, vec, "_ce_grad_replay");
  TORCH_CHECK(out.sizes() == row.sizes() && out.scalar_type() == row.scalar_type() && out.is_contiguous(),
              "_ce_grad_replay: out must be like row");
  TORCH_CHECK(!vec || (reinterpret_cast<uintptr_t>(row.data_ptr()) - reinterpret_cast<uintptr_t>(out.data_ptr())) % 16 == 0,
              "_ce_grad_replay: packs need row and out at the same offset from a 16-byte boundary");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, row.scalar_type(), "_ce_grad_replay", [&] {
    by_shape<scalar_t>(tpr, vec, [&](auto T, auto V) {
      grad_row<scalar_t, decltype(T)::value, decltype(V)::value>(row.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                                 row.size(0), target, lse, g);
    });
  });
}

// index int64 [32] (-1: a lane with nothing to add), values float64 [32, 6] -> what each lane adds
// into stats[index] (zeros for lanes that add nothing)
at::Tensor seg_commit_replay(const at::Tensor& index, const at::Tensor& values) {
  TORCH_CHECK(index.sizes() == at::IntArrayRef({32}) && index.scalar_type() == at::kLong, "_seg_commit_replay: index must be int64 [32]");
  TORCH_CHECK(values.sizes() == at::IntArrayRef({32, 6}) && values.scalar_type() == at::kDouble,
              "_seg_commit_replay: values must be float64 [32, 6]");
  const at::Tensor ix_t = index.contiguous(), v_t = values.contiguous();
  const int64_t* ix = ix_t.data_ptr<int64_t>();
  const double* v = v_t.data_ptr<double>();
  std::vector<cerow::Commit> c(32);
  uint32_t heads = 0;
  for (int l = 0; l < 32; ++l) {
    for (int k = 0; k < 6; ++k) c[l].v[k] = ix[l] < 0 ? 0.0 : v[l * 6 + k];
    if (l == 0 || ix[l - 1] != ix[l]) heads |= 1u << l;
  }
  if (heads != 0xFFFFFFFFu) {
    for (int off = 1; off < 32; off <<= 1) {
      const std::vector<cerow::Commit> q = c;
      for (int l = 0; l < 32; ++l) {
        const cerow::Commit& other = l + off < 32 ? q[l + off] : q[l];  // __shfl_down_sync past the warp: own value
        cerow::seg_step(c[l], other, l, off, cerow::seg_end(heads, l));
      }
    }
  }
  at::Tensor out = at::zeros({32, 6}, at::kDouble);
  double* o = out.data_ptr<double>();
  for (int l = 0; l < 32; ++l)
    if ((heads >> l & 1u) && ix[l] >= 0)
      for (int k = 0; k < 6; ++k) o[l * 6 + k] = c[l].v[k];
  return out;
}

}  // namespace kernel_logic
}  // namespace memcore
