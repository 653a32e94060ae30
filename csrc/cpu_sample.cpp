// See cpu_sample.h. Three passes over a row: the max, the fp64 weights (kept in a per-thread buffer,
// with sums per block of 64), then a walk over the block sums and inside the block where the target
// falls. SIMD: see cpu_simd.h.
#include "cpu_sample.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <vector>

namespace speedx {
namespace {

using namespace simd;

constexpr int64_t kBlock = 64;  // weights per fp64 block sum: the walk skips whole blocks

template <int N> struct VecD {  // N doubles
  typedef double d __attribute__((vector_size(N * 8), aligned(N * 8)));
};

// exp(x) on fp64 vectors for x <= 0 (the weights' exponents): x - n ln2 in two parts, a degree-12
// Taylor polynomial on |r| <= ln2 / 2 (error < 2e-16), times 2^n; exactly 0 below -708 (where 2^n
// would be subnormal), so -inf logits get zero weight.
template <typename D>
SPEEDX_INLINE D vexp_f64(const D& x) {
  using L = decltype(x < x);  // the matching int64 vector
  const D xc = x < -708.0 ? D{} - 708.0 : x;
  const D n = (xc * 1.4426950408889634 + 6755399441055744.0) - 6755399441055744.0;  // round(x / ln2)
  const D r = (xc - n * 0.6931471803691238) - n * 1.9082149292705877e-10;
  // sum r^k / k!, k <= 12, in Estrin's scheme: depth 5 instead of Horner's 12.
  const D r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
  const D s0 = (1.0 + r) + r2 * (1.0 / 2 + r * (1.0 / 6));
  const D s1 = (1.0 / 24 + r * (1.0 / 120)) + r2 * (1.0 / 720 + r * (1.0 / 5040));
  const D s2 = (1.0 / 40320 + r * (1.0 / 362880)) + r2 * (1.0 / 3628800 + r * (1.0 / 39916800));
  const D p = (s0 + r4 * s1) + r8 * (s2 + r4 * (1.0 / 479001600));
  const L e = (__builtin_convertvector(n, L) + 1023) << 52;
  return x < -708.0 ? D{} : p * (D)e;
}

// Keeps the top-p nucleus of `weights` (zeroing the rest, refreshing the block sums) and returns
// its total. `mass` = top_p x the total. The lightest kept weight is the lightest one whose heavier
// weights sum to < mass. Non-negative doubles order like their bit patterns, so it is found by
// bucketing on the top 12 bits (sign + exponent), then on the next 12 inside the bucket where the
// heavier mass crosses `mass`, then by sorting what is left of that bucket.
double keep_nucleus(std::vector<double>& weights, std::vector<double>& block_sums, double mass) {
  auto bits = [](double w) { uint64_t u; std::memcpy(&u, &w, 8); return u; };
  double heavier = 0.0;  // the mass of the weights above the current bucket
  uint64_t prefix = 0;   // the high bits the current bucket's weights share
  int shift = 64;        // how many low bits vary inside the current bucket
  std::vector<double> bucket_mass;
  for (const int width : {12, 12}) {
    const int next = shift - width;
    bucket_mass.assign(size_t(1) << width, 0.0);
    for (const double w : weights) {
      const uint64_t u = bits(w);
      if (shift == 64 || (u >> shift) == prefix) bucket_mass[(u >> next) & ((uint64_t(1) << width) - 1)] += w;
    }
    int64_t b = int64_t(bucket_mass.size()) - 1;
    while (b > 0 && heavier + bucket_mass[b] < mass) heavier += bucket_mass[b--];
    prefix = (shift == 64 ? 0 : prefix << width) | uint64_t(b);
    shift = next;
  }
  std::vector<double> rest;  // the crossing bucket's weights, heaviest first
  for (const double w : weights)
    if ((bits(w) >> shift) == prefix) rest.push_back(w);
  std::sort(rest.begin(), rest.end(), std::greater<double>());
  double lightest_kept = rest.empty() ? 0.0 : rest.front();
  for (const double w : rest) {
    if (!(heavier < mass)) break;
    lightest_kept = w;
    heavier += w;
  }
  double total = 0.0;
  for (size_t b = 0; b < block_sums.size(); ++b) {
    double sum = 0.0;
    const size_t end = std::min(weights.size(), (b + 1) * size_t(kBlock));
    for (size_t j = b * kBlock; j < end; ++j) {
      if (weights[j] < lightest_kept) weights[j] = 0.0;
      sum += weights[j];
    }
    block_sums[b] = sum;
    total += sum;
  }
  return total;
}

template <int W>
SPEEDX_INLINE int64_t sample_row(const SampleArgs& a, int64_t row, std::vector<double>& weights,
                                 std::vector<double>& block_sums) {
  using F = typename Vec<W>::f;
  // fp64 work goes W / 2 lanes at a time: one register, as wide as W floats (wider vectors
  // would be split by GCC into scalar code).
  constexpr int H = W / 2;
  using Fh = typename Vec<H>::f;
  using D = typename VecD<H>::d;
  static_assert(kBlock % W == 0);
  const float* x = a.logits + row * a.stride;
  const float t = a.temperature[row];
  const int64_t v = a.v, full = v / W * W;
  weights.resize(v);
  block_sums.assign((v + kBlock - 1) / kBlock, 0.0);

  F mx = F{} - INFINITY;
  for (int64_t j = 0; j < full; j += W) {
    F s;
    std::memcpy(&s, x + j, sizeof s);
    s = s / t;  // divided, not multiplied by 1/T: the twin's rounding
    mx = s > mx ? s : mx;
  }
  float row_max = -INFINITY;
  for (int i = 0; i < W; ++i) row_max = std::max(row_max, mx[i]);
  for (int64_t j = full; j < v; ++j) row_max = std::max(row_max, x[j] / t);
  if (!(row_max > -INFINITY)) return v - 1;  // nothing drawable (or NaN)

  // The twin's weights: exp in fp64 of the fp32-scaled logit minus the max (exact in fp64).
  double total = 0.0;
  for (int64_t b = 0; b * kBlock < v; ++b) {
    const int64_t begin = b * kBlock, end = std::min(begin + kBlock, v);
    D sums = D{};
    int64_t j = begin;
    for (; j + H <= end; j += H) {
      Fh s;
      std::memcpy(&s, x + j, sizeof s);
      const D e = vexp_f64(__builtin_convertvector(s / t, D) - double(row_max));
      std::memcpy(weights.data() + j, &e, sizeof e);
      sums += e;
    }
    double sum = 0.0;
    for (int i = 0; i < H; ++i) sum += sums[i];
    for (; j < end; ++j) sum += weights[j] = std::exp(double(x[j] / t) - double(row_max));
    block_sums[b] = sum;
    total += sum;
  }

  if (a.top_p[row] < 1.0f) total = keep_nucleus(weights, block_sums, a.top_p[row] * total);

  const double target = a.uniforms[row] * total;
  double running = 0.0;
  int64_t last_positive = v - 1;
  for (int64_t b = 0; b * kBlock < v; ++b) {
    if (running + block_sums[b] <= target) {
      running += block_sums[b];
      continue;
    }
    const int64_t begin = b * kBlock, end = std::min(begin + kBlock, v);
    for (int64_t j = begin; j < end; ++j) {
      running += weights[j];
      if (weights[j] > 0.0) last_positive = j;
      if (running > target) return j;
    }
  }
  return last_positive;  // the block sums rounded past the target: the last token with weight
}

using RowFn = int64_t (*)(const SampleArgs&, int64_t, std::vector<double>&, std::vector<double>&);
int64_t row_baseline(const SampleArgs& a, int64_t r, std::vector<double>& w, std::vector<double>& s) {
  return sample_row<4>(a, r, w, s);
}
#ifdef SPEEDX_X86_ISAS
__attribute__((target("arch=x86-64-v3"))) int64_t row_avx2(const SampleArgs& a, int64_t r, std::vector<double>& w,
                                                           std::vector<double>& s) {
  return sample_row<8>(a, r, w, s);
}
__attribute__((target("arch=x86-64-v4"))) int64_t row_avx512(const SampleArgs& a, int64_t r, std::vector<double>& w,
                                                             std::vector<double>& s) {
  return sample_row<16>(a, r, w, s);
}
#endif

RowFn pick(CpuIsa isa) {
#ifdef SPEEDX_X86_ISAS
  if (isa == CpuIsa::kAvx512) return row_avx512;
  if (isa == CpuIsa::kAvx2) return row_avx2;
#endif
  (void)isa;
  return row_baseline;
}

}  // namespace

void sample_rows(const SampleArgs& a) {
  if (a.m < 0 || a.v < 1 || a.stride < a.v) throw std::invalid_argument("sample_rows: need m >= 0, v >= 1, stride >= v");
  if (a.num_threads < 1) throw std::invalid_argument("sample_rows: num_threads must be >= 1");
  if (a.m == 0) return;
  if (!a.tokens || !a.logits || !a.temperature || !a.uniforms || !a.top_p)
    throw std::invalid_argument("sample_rows: null pointer");
  for (int64_t r = 0; r < a.m; ++r) {
    if (!(a.temperature[r] > 0.0f)) throw std::invalid_argument("sample_rows: temperatures must be > 0");
    if (!(a.top_p[r] > 0.0f && a.top_p[r] <= 1.0f)) throw std::invalid_argument("sample_rows: top_p must be in (0, 1]");
  }
  const RowFn fn = pick(best_cpu_isa());
  [[maybe_unused]] const int nt = int(std::min<int64_t>(a.num_threads, a.m));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<double> weights;
    std::vector<double> block_sums;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.m; ++r) a.tokens[r] = fn(a, r, weights, block_sums);
  }
}

}  // namespace speedx
