"""The native kernels' per-row outputs (mirrors csrc/common.h): the status word's error bits and the
columns of the per-row statistics. The per-sample state the rows are committed into is
memcore/_state.py."""

# error bits of the int32 status word returned by memcore::ce_forward
BAD_TARGET, BAD_INDEX, NON_FINITE = 1, 2, 4

# per-row statistics [N, 3] of memcore::ce_forward (opmath dtype)
ROW_PROB, ROW_MARGIN, ROW_CORRECT = range(3)
