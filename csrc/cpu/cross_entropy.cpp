// CPU kernels of the cross-entropy family (schemas in csrc/memcore.cpp): ce_forward,
// ce_forward_reduce, ce_backward, ce_forward_grad_, scale_unless_one_, ce_input_sqnorm, and the
// options ops ce_forward_options / ce_backward_options (the same kernels with the options compiled
// in: cross_entropy_block.h's Opt) and ce_forward_reduce_options / ce_forward_grad_options_ on them. Rows are split across threads and each is read once per pass:
// rows of up to kChunk elements in blocks of 64 by the vector kernels of cross_entropy_block.h
// (half / bf16 widened to float in L1-sized scratch), longer rows streamed in kChunk pieces with an
// online (max, sum) rescale; float64 logits take a plain double path. Memory: O(N) outputs, the
// N x C gradient of ce_backward / ce_backward_options (none for ce_forward_grad_ and
// ce_forward_grad_options_, which write over the logits), per-thread scratch of at most 32 KiB. Reductions over rows are serial in double, so
// results do not depend on the thread count. More: docs/kernels.md.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../common.h"
#include "../cross_entropy_options.h"
#include "../ops.h"
#include "cross_entropy_block.h"
#include "vec_math.h"
#include "widen.h"

namespace memcore {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1024;
constexpr float kInf = std::numeric_limits<float>::infinity();

struct RowResult {
  double lse, loss, prob, margin, correct;
};

// The row as float: the pointer itself for float input, else a copy widened into buf.
template <typename scalar_t>
const float* z_as_float(const scalar_t* z, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return z;
  } else {
    widen(z, buf, n);
    return buf;
  }
}

// Length of the next piece of a streamed row with `left` classes left: kChunk, or all of them when
// fewer than 16 would remain for the last piece (the piece kernel needs 16).
int64_t piece_len(int64_t left) { return left - kChunk < 16 ? left : kChunk; }

// Host side of one call's options: the softcap (0: none), the class weights (opmath [C], nullptr:
// all 1) and their sum (C without weights), for the float kernels and the float64 rows
struct HostOpts {
  double cap = 0.0;
  const void* weight = nullptr;
  double usum = 0.0;
  OptArgs args() const {
    const float c = static_cast<float>(cap);
    return OptArgs{c, c > 0.f ? 1.f / c : 0.f, static_cast<const float*>(weight), static_cast<float>(usum),
                   nullptr, nullptr, nullptr, nullptr};
  }
};

// One row: exact double math for double logits (gradcheck), with or without options; otherwise a
// row longer than kChunk, streamed (shorter rows take the block kernels of cross_entropy_block.h).
// With smoothing (O), *smooth = -sum_j u_j log p_j.
template <typename scalar_t, class O>
RowResult forward_row(const scalar_t* z, int64_t C, int64_t t, float* buf, [[maybe_unused]] const HostOpts& h,
                      [[maybe_unused]] double* smooth) {
  double zt, m_before, m_after, lse, loss;
  if constexpr (std::is_same_v<scalar_t, double>) {
    // exact double math (std::tanh, std::exp: gradcheck); without a softcap the maxima and the exp
    // sum come from forward_row_f64 from C = 8, so the options' statistics are the default route's
    // bit for bit, and the smoothing sum takes one more pass
    const double inf = std::numeric_limits<double>::infinity();
    auto f = [&](double v) -> double {
      if constexpr (O::kCap) return h.cap * std::tanh(v / h.cap);
      return v;
    };
    zt = f(z[t]);
    double m, s = 0.0;
    if (!O::kCap && C >= 8) {
      double res[4];
      forward_row_f64(z, C, t, res);
      m_before = res[0];
      m_after = res[1];
      m = res[2];
      s = res[3];
    } else {
      m_before = -inf;
      m_after = -inf;
      for (int64_t j = 0; j < t; ++j) m_before = f(z[j]) > m_before ? f(z[j]) : m_before;
      for (int64_t j = t + 1; j < C; ++j) m_after = f(z[j]) > m_after ? f(z[j]) : m_after;
      m = std::max(zt, std::max(m_before, m_after));
      for (int64_t j = 0; j < C; ++j) s += std::exp(f(z[j]) - m);
    }
    [[maybe_unused]] double d = 0.0;  // sum_j u_j (m - z'_j): -sum_j u_j log p_j = U log s + d
    if constexpr (O::kSmooth) {
      const double* u = static_cast<const double*>(h.weight);
      for (int64_t j = 0; j < C; ++j) d += (O::kWeight ? u[j] : 1.0) * (m - f(z[j]));
    }
    if (m == -inf) s = std::numeric_limits<double>::quiet_NaN();  // no finite max: NaN flags the row
    const double log_s = std::log(s);
    if constexpr (O::kSmooth) *smooth = h.usum * log_s + d;
    lse = m + log_s;
    loss = (m - zt) + log_s;
  } else {
    RowAcc a{-kInf, 0.f, -kInf, -kInf};
    [[maybe_unused]] OptAcc oa{0.f, 0.0, 0.0};
    [[maybe_unused]] const OptArgs args = O::kOpt ? h.args() : OptArgs{};
    for (int64_t off = 0; off < C;) {
      const int64_t len = piece_len(C - off);
      forward_piece_f32<O>(z_as_float(z + off, len, buf), len, off, t, &a, O::kOpt ? &oa : nullptr,
                           O::kOpt ? &args : nullptr);
      off += len;
    }
    m_before = a.before;
    m_after = a.after;
    zt = O::kCap ? oa.zt : static_cast<float>(z[t]);
    // a row of -inf (m stays -inf) has no finite max: NaN flags it, as it does NaN entries
    const double log_s = a.m == -kInf ? std::numeric_limits<double>::quiet_NaN() : std::log(static_cast<double>(a.s));
    lse = static_cast<float>(a.m + log_s);
    // (m - zt) + log s, not lse - zt: no rounding of lse to float in the loss
    loss = (static_cast<double>(a.m) - zt) + log_s;
    if constexpr (O::kSmooth) *smooth = h.usum * log_s + oa.d;
  }
  RowResult r;
  r.lse = lse;
  r.loss = loss;
  r.prob = static_cast<double>(exp_approx(static_cast<float>(-r.loss)));
  if constexpr (std::is_same_v<scalar_t, double>) r.prob = std::exp(-r.loss);
  const double other = std::max(m_before, m_after);
  r.margin = zt - other;
  // argmax returns the first maximal index, so the target wins ties only against later classes
  r.correct = (zt > m_before && zt >= m_after) ? 1.0 : 0.0;
  return r;
}

// Per-row factors of ce_backward_options beside a (= g): b, the target's, and c, the smoothing
// term's (nullptr without smoothing), both opmath [N]
template <typename acc_t>
struct RowFactors {
  const acc_t* b;
  const acc_t* c;
};

// double rows, and half / bf16 rows longer than kChunk (the others take the block kernels). out may
// be z (in place): the target logit is read first, every chunk is read before it is written. With
// options (O) the row is (a p_j - b [j = t] - c u_j) (1 - tanh^2), a = g, the target's entry
// a (p_t - 1) + (a - b) - c u_t; float64 rows in plain double math (exact std::tanh).
template <typename scalar_t, class O>
void backward_row(const scalar_t* z, scalar_t* out, int64_t C, int64_t t, double lse, double g,
                  [[maybe_unused]] double b, [[maybe_unused]] double c, [[maybe_unused]] const HostOpts& h,
                  float* buf, float* obuf) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    if constexpr (O::kOpt) {
      const double* u = static_cast<const double*>(h.weight);
      for (int64_t j = 0; j < C; ++j) {  // each element read before it is written
        const double th = O::kCap ? std::tanh(z[j] / h.cap) : 0.0, v = O::kCap ? h.cap * th : z[j];
        const double p = std::exp(v - lse);
        // the target's a p_t - b as a (p_t - 1) + (a - b)
        double e = j == t ? (p - 1.0) * g + (g - b) : p * g;
        if constexpr (O::kSmooth) e -= c * (O::kWeight ? u[j] : 1.0);
        if constexpr (O::kCap) e *= 1.0 - th * th;
        out[j] = static_cast<scalar_t>(e);
      }
      return;
    }
    if (C >= 8) {
      backward_row_f64(z, out, C, t, lse, g);
      return;
    }
    const double ot = (std::exp(z[t] - lse) - 1.0) * g;
    for (int64_t j = 0; j < C; ++j) out[j] = std::exp(z[j] - lse) * g;
    out[t] = ot;
  } else {
    const float lsef = static_cast<float>(lse), gf = static_cast<float>(g);
    [[maybe_unused]] const OptArgs args = O::kOpt ? h.args() : OptArgs{};
    [[maybe_unused]] float dt = 1.f;
    const float zt = O::kCap ? softcap_f32(static_cast<float>(z[t]), &args, &dt) : static_cast<float>(z[t]);
    scalar_t ot;
    if constexpr (!O::kOpt) {
      ot = static_cast<scalar_t>((exp_approx(zt - lsef) - 1.f) * gf);
    } else {
      double v = static_cast<double>(exp_approx(zt - lsef) - 1.f) * g + (g - b);
      if constexpr (O::kSmooth) v -= c * (O::kWeight ? static_cast<const float*>(h.weight)[t] : 1.f);
      ot = static_cast<scalar_t>(v * dt);
    }
    for (int64_t off = 0; off < C;) {
      const int64_t len = piece_len(C - off);
      widen(z + off, buf, len);
      softmax_scale_f32<O>(buf, obuf, len, lsef, gf, off, static_cast<float>(c), O::kOpt ? &args : nullptr);
      narrow(obuf, out + off, len);
      off += len;
    }
    out[t] = ot;
  }
}

// Outputs of a row the kernels skip (ignored, or rejected through the status word): zeros, the
// output tensors being allocated uninitialised.
template <typename acc_t>
inline void zero_row(int64_t i, acc_t* loss_p, acc_t* lse_p, acc_t* rs) {
  loss_p[i] = lse_p[i] = 0;
  rs[i * kNumRowStats + kRowProb] = rs[i * kNumRowStats + kRowMargin] = rs[i * kNumRowStats + kRowCorrect] = 0;
}

// Rows of C classes per block when half / bf16 rows are widened into float scratch: at most
// 8 * kChunk floats (32 KiB), so the block stays in L1.
int64_t widened_rows(int64_t C) {
  return std::max<int64_t>(1, std::min<int64_t>(kBlock, 8 * kChunk / std::max<int64_t>(C, 1)));
}

int64_t grain_rows(int64_t C) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(C, 1)); }

// Rows of one thread's range that are valid and not ignored, gathered in blocks of up to kBlock and
// handed to the block kernels of cross_entropy_block.h (half/bf16 rows widened into a float buffer
// first). Float and 16-bit logits only (float64 rows take forward_row).
template <typename scalar_t, typename acc_t, class O>
int32_t forward_rows_small(const scalar_t* z, int64_t C, const int64_t* tg, const int64_t* ix,
                           int64_t num_samples, int64_t ignore_index, int64_t begin, int64_t end,
                           acc_t* loss_p, acc_t* lse_p, acc_t* rs, [[maybe_unused]] acc_t* smooth_p,
                           [[maybe_unused]] const HostOpts& h) {
  int64_t row[kBlock], tb[kBlock], local_row[kBlock];
  alignas(64) float tmp[5 * kBlock] = {};
  alignas(64) float lse[kBlock], loss[kBlock], prob[kBlock], margin[kBlock], correct[kBlock];
  [[maybe_unused]] alignas(64) float dsum[kBlock], smooth[kBlock];
  [[maybe_unused]] OptArgs args{};
  if constexpr (O::kOpt) {
    args = h.args();
    args.d = dsum;
    args.smooth = smooth;
  }
  // half/bf16: the block's rows widened to float (widened_rows)
  const int64_t rows_per_block = std::is_same_v<scalar_t, float> ? kBlock : widened_rows(C);
  std::vector<float> wide(std::is_same_v<scalar_t, float> ? 0 : rows_per_block * C);
  for (int64_t k = 0; k < kBlock; ++k) local_row[k] = k;
  int32_t flags = 0;
  int64_t nb = 0;
  auto flush = [&]() {
    if (nb == 0) return;
    const float* base;
    const int64_t* rows;
    if constexpr (std::is_same_v<scalar_t, float>) {
      base = z;
      rows = row;
    } else {
      for (int64_t r = 0; r < nb; ++r)
        widen(z + row[r] * C, wide.data() + r * C, C);
      base = wide.data();
      rows = local_row;
    }
    const BlockOut out{lse, loss, prob, margin, correct};
    const OptArgs* opt = O::kOpt ? &args : nullptr;
    if (C < 16) {
      forward_block_narrow_f32<O>(base, C, rows, tb, nb, out, opt);
    } else {
      forward_block_f32<O>(base, C, rows, tb, nb,
                           BlockTmp{tmp, tmp + kBlock, tmp + 2 * kBlock, tmp + 3 * kBlock, tmp + 4 * kBlock}, out,
                           opt);
    }
    for (int64_t r = 0; r < nb; ++r) {
      const int64_t i = row[r];
      if (!std::isfinite(loss[r])) flags |= kNonFinite;
      loss_p[i] = loss[r];
      lse_p[i] = lse[r];
      rs[i * kNumRowStats + kRowProb] = prob[r];
      rs[i * kNumRowStats + kRowMargin] = margin[r];
      rs[i * kNumRowStats + kRowCorrect] = correct[r];
      if constexpr (O::kSmooth) smooth_p[i] = smooth[r];
    }
    nb = 0;
  };
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = tg[i];
    if (t == ignore_index || t < 0 || t >= C) {
      if (t != ignore_index) flags |= kBadTarget;
      zero_row(i, loss_p, lse_p, rs);
      if constexpr (O::kSmooth) smooth_p[i] = 0;
      continue;
    }
    if (ix[i] < 0 || ix[i] >= num_samples) flags |= kBadIndex;
    row[nb] = i;
    tb[nb] = t;
    if (++nb == rows_per_block) flush();
  }
  flush();
  return flags;
}

// ce_forward, and with options (O) ce_forward_options' forward: the softcapped rows' outputs, and
// the smoothing sums into smooth (opmath [N]) where O smooths.
template <class O>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index, int64_t num_samples,
    int64_t ignore_index, const HostOpts& h, [[maybe_unused]] at::Tensor* smooth) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto acc = logits.options().dtype(opmath_dtype(logits));
  // every row is written (skipped rows with zeros): no fill passes
  at::Tensor loss = at::empty({N}, acc), lse = at::empty({N}, acc);
  at::Tensor row_stats = at::empty({N, kNumRowStats}, acc);
  at::Tensor status = at::empty({1}, logits.options().dtype(at::kInt));
  if constexpr (O::kSmooth) *smooth = at::empty({N}, acc);
  std::atomic<int32_t> flags{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    const int64_t* tg = targets.data_ptr<int64_t>();
    const int64_t* ix = index.data_ptr<int64_t>();
    acc_t* loss_p = loss.data_ptr<acc_t>();
    acc_t* lse_p = lse.data_ptr<acc_t>();
    acc_t* rs = row_stats.data_ptr<acc_t>();
    [[maybe_unused]] acc_t* sm_p = nullptr;
    if constexpr (O::kSmooth) sm_p = smooth->data_ptr<acc_t>();
    at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (C <= kChunk) {
          const int32_t local = forward_rows_small<scalar_t, acc_t, O>(
              z, C, tg, ix, num_samples, ignore_index, begin, end, loss_p, lse_p, rs, sm_p, h);
          if (local) flags.fetch_or(local);
          return;
        }
      }
      std::vector<float> buf(kChunk + 16);
      int32_t local = 0;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = tg[i];
        if (t == ignore_index || t < 0 || t >= C) {
          if (t != ignore_index) local |= kBadTarget;
          zero_row(i, loss_p, lse_p, rs);
          if constexpr (O::kSmooth) sm_p[i] = 0;
          continue;
        }
        if (ix[i] < 0 || ix[i] >= num_samples) local |= kBadIndex;
        [[maybe_unused]] double sm = 0.0;
        const RowResult r = forward_row<scalar_t, O>(z + i * C, C, t, buf.data(), h, &sm);
        if (!std::isfinite(r.loss)) local |= kNonFinite;
        loss_p[i] = static_cast<acc_t>(r.loss);
        lse_p[i] = static_cast<acc_t>(r.lse);
        rs[i * kNumRowStats + kRowProb] = static_cast<acc_t>(r.prob);
        rs[i * kNumRowStats + kRowMargin] = static_cast<acc_t>(r.margin);
        rs[i * kNumRowStats + kRowCorrect] = static_cast<acc_t>(r.correct);
        if constexpr (O::kSmooth) sm_p[i] = static_cast<acc_t>(sm);
      }
      if (local) flags.fetch_or(local);
    });
  });
  status.data_ptr<int32_t>()[0] = flags.load();
  return {loss, lse, row_stats, status};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_forward_cpu(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
    int64_t num_samples, int64_t ignore_index) {
  check_rows(logits, targets, "memcore::ce_forward");
  check_vector(index, logits, at::kLong, "index", "memcore::ce_forward");
  return forward_impl<Plain>(logits, targets, index, num_samples, ignore_index, HostOpts{}, nullptr);
}

template <class O>
void backward_block(const float* z, float* out, int64_t C, const int64_t* row, const int64_t* t,
                    const float* lse, const float* g, int64_t n, const OptArgs* opt) {
  if (C < 16) {
    backward_block_narrow_f32<O>(z, out, C, row, t, lse, g, n, opt);
  } else {
    backward_block_f32<O>(z, out, C, row, t, lse, g, n, opt);
  }
}

// ce_forward, then the reduction over its O(N) per-row losses: serial, in double, so the result
// does not depend on the thread count. Ignored (and rejected) rows hold loss 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_forward_reduce_cpu(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index, int64_t num_samples,
    int64_t ignore_index, int64_t reduction) {
  check_reduction(reduction, /*allow_none=*/false, "memcore::ce_forward_reduce");
  auto [loss, lse, row_stats, status] = ce_forward_cpu(logits, targets, index, num_samples, ignore_index);
  const int64_t N = loss.size(0);
  const int64_t* tg = targets.data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0; i < N; ++i) count += tg[i] != ignore_index;
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "ce_forward_reduce_cpu", [&] {
    const scalar_t* l = loss.data_ptr<scalar_t>();
    for (int64_t i = 0; i < N; ++i) total += static_cast<double>(l[i]);
  });
  // mean of no rows is NaN, like F.cross_entropy
  const double value = reduction == kSum ? total : total / static_cast<double>(count);
  at::Tensor out = at::empty({}, loss.options()), n_rows = at::empty({}, targets.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ce_forward_reduce_cpu", [&] {
    *out.data_ptr<scalar_t>() = static_cast<scalar_t>(value);
  });
  *n_rows.data_ptr<int64_t>() = count;
  return {out, n_rows, loss, lse, row_stats, status};
}

// Backward of rows [begin, end). Float rows, and half / bf16 rows of up to kChunk classes (widened
// block by block into float scratch), go through the block kernels; double rows and longer half /
// bf16 rows one by one. With options (O), f holds the rows' b and c (g is their a).
template <typename scalar_t, typename acc_t, class O>
void backward_rows(const scalar_t* z, scalar_t* out, int64_t C, const int64_t* tg, const acc_t* lse_p,
                   const acc_t* g_p, int64_t g_stride, int64_t ignore_index, int64_t begin, int64_t end,
                   [[maybe_unused]] RowFactors<acc_t> f, [[maybe_unused]] const HostOpts& h) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  if (std::is_same_v<scalar_t, double> || (!kFloat && C > kChunk)) {
    std::vector<float> buf(kChunk + 16), obuf(kChunk + 16);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = tg[i];
      if (t == ignore_index || t < 0 || t >= C) {
        std::fill(out + i * C, out + (i + 1) * C, scalar_t(0));
        continue;
      }
      backward_row<scalar_t, O>(z + i * C, out + i * C, C, t, lse_p[i], g_p[i * g_stride], O::kOpt ? f.b[i] : 0.0,
                                O::kSmooth ? f.c[i] : 0.0, h, buf.data(), obuf.data());
    }
    return;
  }
  const int64_t rows_per_block = kFloat ? kBlock : widened_rows(C);
  std::vector<float> in(kFloat ? 0 : rows_per_block * C), res(kFloat ? 0 : rows_per_block * C);
  int64_t row[kBlock], local_row[kBlock], tb[kBlock];
  float lb[kBlock], gb[kBlock];
  [[maybe_unused]] float bb[kBlock], cb[kBlock];
  [[maybe_unused]] OptArgs args{};
  if constexpr (O::kOpt) {
    args = h.args();
    args.b = bb;
    args.c = cb;
  }
  const OptArgs* opt = O::kOpt ? &args : nullptr;
  for (int64_t k = 0; k < kBlock; ++k) local_row[k] = k;
  int64_t nb = 0;
  auto flush = [&]() {
    if constexpr (kFloat) {
      backward_block<O>(z, out, C, row, tb, lb, gb, nb, opt);
    } else if constexpr (!std::is_same_v<scalar_t, double>) {
      for (int64_t r = 0; r < nb; ++r)
        widen(z + row[r] * C, in.data() + r * C, C);
      backward_block<O>(in.data(), res.data(), C, local_row, tb, lb, gb, nb, opt);
      for (int64_t r = 0; r < nb; ++r)
        narrow(res.data() + r * C, out + row[r] * C, C);
    }
    nb = 0;
  };
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = tg[i];
    if (t == ignore_index || t < 0 || t >= C) {
      std::fill(out + i * C, out + (i + 1) * C, scalar_t(0));
      continue;
    }
    row[nb] = i;
    tb[nb] = t;
    lb[nb] = lse_p[i];
    gb[nb] = g_p[i * g_stride];
    if constexpr (O::kOpt) bb[nb] = f.b[i];
    if constexpr (O::kSmooth) cb[nb] = f.c[i];
    if (++nb == rows_per_block) flush();
  }
  if (nb) flush();
}

// out = (softmax(logits) - onehot) * g row by row, across threads; out may be logits (in place).
// g: opmath [N], contiguous or one value broadcast (stride 0). With options (O): ce_backward_options'
// rows, a = g, b and c (opmath [N], contiguous; c undefined without smoothing).
template <class O = Plain>
void backward_into(const at::Tensor& logits, at::Tensor& out, const at::Tensor& targets, const at::Tensor& lse,
                   const at::Tensor& g, int64_t ignore_index, const at::Tensor* b = nullptr,
                   const at::Tensor* c = nullptr, const HostOpts& h = HostOpts{}) {
  const int64_t N = logits.size(0), C = logits.size(1), g_stride = g.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t* tg = targets.data_ptr<int64_t>();
    const acc_t* lse_p = lse.data_ptr<acc_t>();
    const acc_t* g_p = g.data_ptr<acc_t>();
    RowFactors<acc_t> f{nullptr, nullptr};
    if constexpr (O::kOpt) f.b = b->data_ptr<acc_t>();
    if constexpr (O::kSmooth) f.c = c->data_ptr<acc_t>();
    at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
      backward_rows<scalar_t, acc_t, O>(z, o, C, tg, lse_p, g_p, g_stride, ignore_index, begin, end, f, h);
    });
  });
}

at::Tensor ce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                           const at::Tensor& targets, const at::Tensor& lse, int64_t ignore_index) {
  check_rows(logits, targets, "memcore::ce_backward");
  check_vector(lse, logits, opmath_dtype(logits), "lse", "memcore::ce_backward");
  at::Tensor g = grad_loss.to(opmath_dtype(logits));
  // one upstream gradient for every row (the reduced loss's backward expands it): read in place
  const bool broadcast = g.dim() == 1 && g.size(0) == logits.size(0) && g.stride(0) == 0;
  if (broadcast) {
    TORCH_CHECK(g.device() == logits.device(), "memcore::ce_backward: grad_loss must be on ", logits.device());
  } else {
    g = g.contiguous();
    check_vector(g, logits, opmath_dtype(logits), "grad_loss", "memcore::ce_backward");
  }
  at::Tensor grad = at::empty_like(logits);
  backward_into(logits, grad, targets, lse, g, ignore_index);
  return grad;
}

// ce_forward_reduce, then the gradient of out (upstream gradient 1) written over the logits by the
// backward kernels run in place (they read each row, or block, before writing it).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_forward_grad_cpu(
    at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index, int64_t num_samples,
    int64_t ignore_index, int64_t reduction) {
  check_forward_grad(logits, reduction);
  auto res = ce_forward_reduce_cpu(logits, targets, index, num_samples, ignore_index, reduction);
  const at::Tensor& lse = std::get<3>(res);
  const int64_t count = *std::get<1>(res).data_ptr<int64_t>();
  // all rows ignored: w is never used (every row is zero-filled)
  const double w = reduction == kSum || count == 0 ? 1.0 : 1.0 / static_cast<double>(count);
  backward_into(logits, logits, targets, lse, at::full({1}, w, lse.options()).expand({logits.size(0)}),
                ignore_index);
  return res;
}

// The Opt instance of a call's options, handed to f as a value: None where neither softcap nor
// smoothing is on (Plain in the forward; in the backward, the instance that still takes b)
template <class None, class F>
void with_options(bool cap, bool smooth, bool weighted, F&& f) {
  if (!smooth) {
    if (cap) f(Opt<true, false, false>{});
    else f(None{});
  } else if (weighted) {
    if (cap) f(Opt<true, true, true>{});
    else f(Opt<false, true, true>{});
  } else {
    if (cap) f(Opt<true, true, false>{});
    else f(Opt<false, true, false>{});
  }
}

// The host side of the options: softcap, and where smoothing reads them the weights and their sum
HostOpts host_options(const at::Tensor& logits, double softcap, bool smooth,
                      const std::optional<at::Tensor>& weight) {
  HostOpts h;
  h.cap = softcap;
  if (smooth) {
    h.weight = weight.has_value() ? weight->data_ptr() : nullptr;
    h.usum = weight.has_value() ? weight->sum(at::kDouble).item<double>() : static_cast<double>(logits.size(1));
  }
  return h;
}

// ce_forward's row kernels with the options fused in (cross_entropy_block.h's Opt): the softcap on
// each value as it is loaded, the smoothing sum in the exp pass.
Tensor5 ce_forward_options_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                               int64_t num_samples, int64_t ignore_index, double softcap, double label_smoothing,
                               const std::optional<at::Tensor>& weight) {
  check_forward_options(logits, targets, index, softcap, label_smoothing, weight);
  const bool smooth = label_smoothing > 0.0;
  const HostOpts h = host_options(logits, softcap, smooth, weight);
  at::Tensor sm = at::empty({0}, logits.options().dtype(opmath_dtype(logits)));
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> res;
  with_options<Plain>(softcap > 0.0, smooth, weight.has_value(), [&](auto o) {
    res = forward_impl<decltype(o)>(logits, targets, index, num_samples, ignore_index, h, &sm);
  });
  auto& [loss, lse, row_stats, status] = res;
  return {loss, lse, row_stats, status, sm};
}

// ce_backward's row kernels with a / b / c and the softcap's factor fused into the one pass, into
// out (a new tensor, or the logits themselves: the row kernels read each element before writing it)
void backward_options_into(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& logits,
                           at::Tensor& out, const at::Tensor& targets, const at::Tensor& lse, int64_t ignore_index,
                           double softcap, const std::optional<at::Tensor>& weight) {
  const bool smooth = c.numel() != 0;
  const HostOpts h = host_options(logits, softcap, smooth, weight);
  with_options<Opt<false, false, false, true>>(softcap > 0.0, smooth, weight.has_value(), [&](auto o) {
    backward_into<decltype(o)>(logits, out, targets, lse, a, ignore_index, &b, &c, h);
  });
}

at::Tensor ce_backward_options_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                   const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                   int64_t ignore_index, double softcap, const std::optional<at::Tensor>& weight) {
  check_backward_options(a, b, c, logits, targets, lse, softcap, weight);
  at::Tensor grad = at::empty_like(logits);
  backward_options_into(a, b, c, logits, grad, targets, lse, ignore_index, softcap, weight);
  return grad;
}

// The options' overwrite route (cross_entropy_options.h): ce_forward_options_cpu, the reduced loss,
// and its gradient written over the logits by the options' backward kernels run in place
Tensor6 ce_forward_grad_options_cpu(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& index,
                                    int64_t num_samples, int64_t ignore_index, int64_t reduction,
                                    const std::optional<at::Tensor>& weight, double label_smoothing, double softcap,
                                    double z_loss) {
  return forward_grad_options(logits, targets, index, num_samples, ignore_index, reduction, weight,
                              label_smoothing, softcap, z_loss, ce_forward_options_cpu, backward_options_into);
}

void scale_unless_one_cpu(at::Tensor& grad, const at::Tensor& scale) {
  check_scale_unless_one(grad, scale);
  if (scale.item<double>() != 1.0) grad.mul_(scale.reshape({}));
}

// Sum of squares of one row in double: float within a kChunk piece (half / bf16 widened into buf),
// double across pieces; plain double for float64 rows.
template <typename scalar_t>
double row_sumsq(const scalar_t* g, int64_t d, float* buf) {
  double s = 0.0;
  if constexpr (std::is_same_v<scalar_t, double>) {
    s = sumsq_f64(g, d);
  } else {
    for (int64_t off = 0; off < d; off += kChunk) {
      const int64_t len = std::min(kChunk, d - off);
      if constexpr (std::is_same_v<scalar_t, float>) {
        s += sumsq_f32(g + off, len);
      } else {
        widen(g + off, buf, len);
        s += sumsq_f32(buf, len);
      }
    }
  }
  return s;
}

at::Tensor ce_input_sqnorm_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  check_input_sqnorm(grad, scale);
  const int64_t N = grad.size(0);
  const int64_t D = N == 0 ? 0 : grad.numel() / N;
  at::Tensor out = at::empty({N}, scale.options());
  const double* sc = scale.data_ptr<double>();
  double* o = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ce_input_sqnorm_cpu", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
      std::vector<float> buf(std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double> ? 0 : kChunk);
      for (int64_t i = b; i < e; ++i) o[i] = sc[i] == 0.0 ? 0.0 : sc[i] * sc[i] * row_sumsq(g + i * D, D, buf.data());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(memcore, CPU, m) {
  MEMCORE_IMPL(m, ce_forward, ce_forward_cpu);
  MEMCORE_IMPL(m, ce_forward_reduce, ce_forward_reduce_cpu);
  MEMCORE_IMPL(m, ce_backward, ce_backward_cpu);
  MEMCORE_IMPL(m, ce_forward_grad_, ce_forward_grad_cpu);
  MEMCORE_IMPL(m, scale_unless_one_, scale_unless_one_cpu);
  MEMCORE_IMPL(m, ce_input_sqnorm, ce_input_sqnorm_cpu);
  MEMCORE_IMPL(m, ce_forward_options, ce_forward_options_cpu);
  MEMCORE_IMPL(m, ce_backward_options, ce_backward_options_cpu);
  MEMCORE_IMPL(m, ce_forward_reduce_options, forward_reduce_options);  // cross_entropy_options.h
  MEMCORE_IMPL(m, ce_forward_grad_options_, ce_forward_grad_options_cpu);
}

}  // namespace cpu
}  // namespace memcore
