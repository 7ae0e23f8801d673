"""Column layout of the native statistics buffers; mirrors csrc/common.h."""

# float64 [num_samples, NUM_STATS] per-epoch statistics written by memcore::ce_commit
LOSS_SUM, ROWS, CORRECT, PROB_SUM, PROB_SQ_SUM, MARGIN_SUM = range(6)
NUM_STATS = 6

# error bits of the int32 status word returned by memcore::ce_forward
BAD_TARGET, BAD_INDEX, NON_FINITE = 1, 2, 4

# float64 [num_samples, NUM_GRAD_STATS] input-gradient statistics written by memcore::sqnorm_commit
GRAD_SQ_SUM, GRAD_ROWS = range(2)
NUM_GRAD_STATS = 2
