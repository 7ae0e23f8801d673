// Deterministic commits in ATen ops (what and why: commit_deterministic.h).
#include "commit_deterministic.h"

#include "common.h"

namespace memcore {

static_assert(kLossSum == 0 && kRows == 1 && kCorrect == 2 && kProbSum == 3 && kProbSqSum == 4 &&
                  kMarginSum == 5 && kNumStats == 6,
              "the stack below follows the Stat layout");
static_assert(kGradSqSum == 0 && kGradRows == 1 && kNumGradStats == 2, "GradStat layout");

namespace {
// rows that keep their values; the others add zeros into row 0 (NaN losses of a rejected batch
// are replaced, not multiplied by 0)
void add_rows(at::Tensor& stats, const at::Tensor& index, const at::Tensor& keep, const at::Tensor& vals) {
  if (stats.size(0) == 0) return;  // no row 0 to park rejected rows in, and no row to keep either
  const at::Tensor k = keep.logical_and(index.ge(0)).logical_and(index.lt(stats.size(0)));
  stats.index_put_({at::where(k, index, 0)}, at::where(k.unsqueeze(1), vals, 0.0), /*accumulate=*/true);
}
}  // namespace

void ce_commit_deterministic(at::Tensor& stats, const at::Tensor& index, const at::Tensor& targets,
                             const at::Tensor& loss, const at::Tensor& row_stats, const at::Tensor& status,
                             int64_t ignore_index) {
  if (loss.size(0) == 0) return;
  const at::Tensor rs = row_stats.to(at::kDouble);
  const at::Tensor p = rs.select(1, kRowProb);
  const at::Tensor vals = at::stack(
      {loss.to(at::kDouble), at::ones_like(p), rs.select(1, kRowCorrect), p, p * p, rs.select(1, kRowMargin)}, 1);
  add_rows(stats, index, targets.ne(ignore_index).logical_and(status.eq(0)), vals);
}

void sqnorm_commit_deterministic(at::Tensor& stats, const at::Tensor& grad, const at::Tensor& scale,
                                 const at::Tensor& index) {
  const int64_t N = grad.size(0);
  if (N == 0) return;
  const at::Tensor sq = at::sum(grad.reshape({N, -1}).square(), {1}, /*keepdim=*/false, at::kDouble);
  const at::Tensor vals = at::stack({scale * scale * sq, at::ones_like(sq)}, 1);
  add_rows(stats, index, scale.ne(0), vals);
}

}  // namespace memcore
