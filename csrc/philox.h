// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
// counter-based generator behind memcore's Rademacher probes. The same code runs on the host and
// on the device (MEMCORE_HD), so CPU and CUDA produce bit-identical probes. No state, no memory:
// a probe entry is a pure function of (seed, sample index, probe number, element).
//
// Layout of the probes: key = the 64-bit seed (lo, hi); counter = (element / 128, probe,
// index lo, index hi). One call gives 128 bits, the signs of 128 consecutive elements of one
// sample's probe: element e takes bit (e % 32) of word (e % 128) / 32, and v = bit ? +1 : -1.
// A sample's probes therefore depend only on (seed, index, probe), never on the batch it is in,
// its position in the batch, the chunking or the device.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MEMCORE_HD __host__ __device__ __forceinline__
#else
#define MEMCORE_HD inline
#endif

namespace memcore {

constexpr int64_t kPhiloxBits = 128;  // elements covered by one Philox call

struct Philox4x32 {
  uint32_t v[4];
};

MEMCORE_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Ten rounds with the standard multipliers and Weyl key bumps (Random123's philox4x32_R(10, ...)).
MEMCORE_HD Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                    uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, c0, hi0, lo0);
    philox_mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// The 128 sign bits of elements [128 * block, 128 * block + 128) of probe `probe` of the sample
// with dataset index `index`, under `seed`.
MEMCORE_HD Philox4x32 rademacher_bits(uint64_t seed, int64_t index, uint32_t probe, uint32_t block) {
  const uint64_t ix = static_cast<uint64_t>(index);
  return philox4x32_10(block, probe, static_cast<uint32_t>(ix), static_cast<uint32_t>(ix >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// +1 or -1 for bit j (0..127) of a Philox block.
MEMCORE_HD int rademacher_sign(const Philox4x32& bits, int j) {
  return ((bits.v[j >> 5] >> (j & 31)) & 1u) ? 1 : -1;
}

}  // namespace memcore
