// attn_sm90_lab.cu — lab for the Hopper kernel (csrc/cuda/attn_sm90.cuh):
// checks it against an fp64 CPU reference and against the sm80 kernel on the
// same inputs and mask, then times both on the benchmark shapes.
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a \
//        -Icsrc/include -Icsrc benchmarks/kernels/attn_sm90_lab.cu -o lab
//   ./lab check | ./lab time
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/attn_sm80.cuh"
#include "cuda/attn_sm90.cuh"

namespace sparge_cuda {
template cudaError_t launch_attn_sm80<__nv_bfloat16, 64>(const AttnParams &, unsigned, cudaStream_t);
template cudaError_t launch_attn_sm80<__nv_bfloat16, 128>(const AttnParams &, unsigned, cudaStream_t);
template cudaError_t launch_attn_sm80<__half, 128>(const AttnParams &, unsigned, cudaStream_t);
}  // namespace sparge_cuda

using namespace sparge_cuda;

#define CK(...)                                                                                   \
  do {                                                                                            \
    cudaError_t e_ = (__VA_ARGS__);                                                                       \
    if (e_ != cudaSuccess) {                                                                      \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #__VA_ARGS__, cudaGetErrorString(e_));          \
      exit(1);                                                                                    \
    }                                                                                             \
  } while (0)

static uint64_t g_rng = 88172645463325252ull;
static double urand() {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return (double)(g_rng >> 11) * (1.0 / 9007199254740992.0);
}
static float nrand() { return (float)(sqrt(-2.0 * log(urand() + 1e-300)) * cos(6.283185307179586 * urand())); }

template <typename T>
static float to_f(T x);
template <>
float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
float to_f(__half x) { return __half2float(x); }
template <typename T>
static T from_f(float x);
template <>
__nv_bfloat16 from_f(float x) { return __float2bfloat16(x); }
template <>
__half from_f(float x) { return __float2half(x); }

struct Problem {
  int B, Hq, Hkv, Lq, Lk, D;
  int causal;      // 0 none, 1 top-left, 2 bottom-right
  bool bshd, kpad, pv, lse;
  double density;
  int BQ, BK;
};

template <typename T>
struct Bufs {
  std::vector<T> q, k, v;
  std::vector<uint8_t> mask, kp;
  T *dq, *dk, *dv, *do80, *do90;
  uint8_t *dmask, *dkp;
  float *dpv, *dlse80, *dlse90;
  unsigned long long *dst80, *dst90;
};

static int64_t idx(const Problem &P, int H, int L, int b, int h, int l, int d) {
  return P.bshd ? (((int64_t)b * L + l) * H + h) * P.D + d : (((int64_t)b * H + h) * L + l) * P.D + d;
}

template <typename T>
static AttnParams make_params(const Problem &P, Bufs<T> &u, T *out, float *lse, unsigned long long *st) {
  AttnParams a{};
  const int nq = (P.Lq + P.BQ - 1) / P.BQ, nk = (P.Lk + P.BK - 1) / P.BK;
  a.q = u.dq, a.k = u.dk, a.v = u.dv, a.out = out;
  a.mask = u.dmask;
  a.kpad = P.kpad ? u.dkp : nullptr;
  a.pv = P.pv ? u.dpv : nullptr;
  a.lse = P.lse ? lse : nullptr;
  a.stats = st;
  auto strides = [&](int H, int L, int64_t &sb, int64_t &sh, int64_t &sl) {
    if (P.bshd) {
      sl = (int64_t)H * P.D, sh = P.D, sb = (int64_t)L * H * P.D;
    } else {
      sl = P.D, sh = (int64_t)L * P.D, sb = (int64_t)H * L * P.D;
    }
  };
  strides(P.Hq, P.Lq, a.q_sb, a.q_sh, a.q_sl);
  strides(P.Hkv, P.Lk, a.k_sb, a.k_sh, a.k_sl);
  strides(P.Hkv, P.Lk, a.v_sb, a.v_sh, a.v_sl);
  strides(P.Hq, P.Lq, a.o_sb, a.o_sh, a.o_sl);
  a.m_sj = 1, a.m_si = nk, a.m_sh = (int64_t)nq * nk, a.m_sb = (int64_t)P.Hq * nq * nk;
  a.kp_sb = P.Lk, a.kp_sl = 1;
  a.pv_s = 1;
  a.lse_sl = 1, a.lse_sh = P.Lq, a.lse_sb = (int64_t)P.Hq * P.Lq;
  a.st_si = 1, a.st_sh = 4, a.st_sb = (int64_t)P.Hq * 4;
  a.B = P.B, a.Hq = P.Hq, a.rep = P.Hq / P.Hkv, a.Lq = P.Lq, a.Lk = P.Lk;
  a.causal = P.causal != 0;
  a.causal_off = P.causal == 2 ? P.Lk - P.Lq : 0;
  a.nq = nq, a.nk = nk;
  a.scale_log2 = (float)(1.0 / sqrt((double)P.D) * 1.4426950408889634);
  return a;
}

template <typename T>
static void setup(const Problem &P, Bufs<T> &u, bool host_copy) {
  const int64_t nqel = (int64_t)P.B * P.Hq * P.Lq * P.D, nkel = (int64_t)P.B * P.Hkv * P.Lk * P.D;
  const int nq = (P.Lq + P.BQ - 1) / P.BQ, nk = (P.Lk + P.BK - 1) / P.BK;
  u.q.resize(nqel), u.k.resize(nkel), u.v.resize(nkel);
  for (auto &x : u.q) x = from_f<T>(nrand());
  for (auto &x : u.k) x = from_f<T>(nrand());
  for (auto &x : u.v) x = from_f<T>(nrand());
  u.mask.resize((size_t)P.B * P.Hq * nq * nk);
  for (auto &x : u.mask) x = urand() < P.density ? 1 : 0;
  u.kp.resize((size_t)P.B * P.Lk);
  for (auto &x : u.kp) x = urand() < 0.85 ? 1 : 0;
  (void)host_copy;
  CK(cudaMalloc(&u.dq, nqel * sizeof(T)));
  CK(cudaMalloc(&u.dk, nkel * sizeof(T)));
  CK(cudaMalloc(&u.dv, nkel * sizeof(T)));
  CK(cudaMalloc(&u.do80, nqel * sizeof(T)));
  CK(cudaMalloc(&u.do90, nqel * sizeof(T)));
  CK(cudaMalloc(&u.dmask, u.mask.size()));
  CK(cudaMalloc(&u.dkp, u.kp.size()));
  CK(cudaMalloc(&u.dpv, P.Hq * sizeof(float)));
  CK(cudaMalloc(&u.dlse80, (size_t)P.B * P.Hq * P.Lq * 4));
  CK(cudaMalloc(&u.dlse90, (size_t)P.B * P.Hq * P.Lq * 4));
  CK(cudaMalloc(&u.dst80, (size_t)P.B * P.Hq * 4 * 8));
  CK(cudaMalloc(&u.dst90, (size_t)P.B * P.Hq * 4 * 8));
  CK(cudaMemcpy(u.dq, u.q.data(), nqel * sizeof(T), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(u.dk, u.k.data(), nkel * sizeof(T), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(u.dv, u.v.data(), nkel * sizeof(T), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(u.dmask, u.mask.data(), u.mask.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(u.dkp, u.kp.data(), u.kp.size(), cudaMemcpyHostToDevice));
  std::vector<float> pv(P.Hq, 6.0f);
  CK(cudaMemcpy(u.dpv, pv.data(), P.Hq * 4, cudaMemcpyHostToDevice));
  // poison outputs: every element must be written
  CK(cudaMemset(u.do80, 0x7f, nqel * sizeof(T)));
  CK(cudaMemset(u.do90, 0x7f, nqel * sizeof(T)));
  CK(cudaMemset(u.dst80, 0, (size_t)P.B * P.Hq * 32));
  CK(cudaMemset(u.dst90, 0, (size_t)P.B * P.Hq * 32));
}

template <typename T>
static void release(Bufs<T> &u) {
  cudaFree(u.dq), cudaFree(u.dk), cudaFree(u.dv), cudaFree(u.do80), cudaFree(u.do90), cudaFree(u.dmask);
  cudaFree(u.dkp), cudaFree(u.dpv), cudaFree(u.dlse80), cudaFree(u.dlse90), cudaFree(u.dst80), cudaFree(u.dst90);
}

// fp64 reference of one problem (no PV skip)
template <typename T>
static void reference(const Problem &P, const Bufs<T> &u, std::vector<float> &out, std::vector<float> &lse) {
  const int nq = (P.Lq + P.BQ - 1) / P.BQ, nk = (P.Lk + P.BK - 1) / P.BK;
  const int off = P.causal == 2 ? P.Lk - P.Lq : 0;
  const double scale = 1.0 / sqrt((double)P.D);
  out.assign((size_t)P.B * P.Hq * P.Lq * P.D, 0.f);
  lse.assign((size_t)P.B * P.Hq * P.Lq, 0.f);
  std::vector<double> s(P.Lk), o(P.D);
  for (int b = 0; b < P.B; ++b)
    for (int h = 0; h < P.Hq; ++h) {
      const int hk = h / (P.Hq / P.Hkv);
      for (int r = 0; r < P.Lq; ++r) {
        double mx = -INFINITY;
        for (int c = 0; c < P.Lk; ++c) {
          bool vis = u.mask[(((size_t)b * P.Hq + h) * nq + r / P.BQ) * nk + c / P.BK] != 0;
          if (P.causal && c > r + off) vis = false;
          if (P.kpad && !u.kp[(size_t)b * P.Lk + c]) vis = false;
          if (!vis) {
            s[c] = -INFINITY;
            continue;
          }
          double acc = 0;
          for (int d = 0; d < P.D; ++d)
            acc += (double)to_f(u.q[idx(P, P.Hq, P.Lq, b, h, r, d)]) * to_f(u.k[idx(P, P.Hkv, P.Lk, b, hk, c, d)]);
          s[c] = acc * scale;
          mx = std::max(mx, s[c]);
        }
        std::fill(o.begin(), o.end(), 0.0);
        double l = 0;
        if (mx > -INFINITY)
          for (int c = 0; c < P.Lk; ++c) {
            if (s[c] == -INFINITY) continue;
            const double pe = exp(s[c] - mx);
            l += pe;
            for (int d = 0; d < P.D; ++d) o[d] += pe * to_f(u.v[idx(P, P.Hkv, P.Lk, b, hk, c, d)]);
          }
        for (int d = 0; d < P.D; ++d) out[idx(P, P.Hq, P.Lq, b, h, r, d)] = l > 0 ? (float)(o[d] / l) : 0.f;
        lse[((size_t)b * P.Hq + h) * P.Lq + r] = l > 0 ? (float)(mx + log(l)) : -INFINITY;
      }
    }
}

template <typename T, class C>
static bool check_one(const Problem &P0, bool with_ref) {
  Problem P = P0;
  P.BQ = C::kBQ, P.BK = C::kBK;
  Bufs<T> u;
  setup(P, u, true);
  const int nq = (P.Lq + P.BQ - 1) / P.BQ;
  const unsigned grid = (unsigned)(nq * P.B * P.Hq);
  AttnParams a90 = make_params(P, u, u.do90, u.dlse90, u.dst90);
  cudaError_t e = launch_sm90_cfg<T, C>(a90, grid, 0);
  if (e != cudaSuccess) {
    printf("  launch sm90: %s\n", cudaGetErrorString(e));
    return false;
  }
  const bool cmp80 = C::kBK == 64 && (C::kD == 64 || C::kD == 128);
  if (cmp80) {
    AttnParams a80 = make_params(P, u, u.do80, u.dlse80, u.dst80);
    CK(launch_attn_sm80<T, C::kD>(a80, grid, 0));
  }
  CK(cudaDeviceSynchronize());
  const size_t n = (size_t)P.B * P.Hq * P.Lq * P.D;
  std::vector<T> o90(n), o80(n);
  std::vector<float> l90((size_t)P.B * P.Hq * P.Lq), l80(l90.size());
  std::vector<unsigned long long> st90(P.B * P.Hq * 4), st80(st90.size());
  CK(cudaMemcpy(o90.data(), u.do90, n * sizeof(T), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(l90.data(), u.dlse90, l90.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(st90.data(), u.dst90, st90.size() * 8, cudaMemcpyDeviceToHost));
  if (cmp80) {
    CK(cudaMemcpy(o80.data(), u.do80, n * sizeof(T), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(l80.data(), u.dlse80, l80.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(st80.data(), u.dst80, st80.size() * 8, cudaMemcpyDeviceToHost));
  }
  bool ok = true;
  double e80 = 0, eref = 0, eref80 = 0, lse_e = 0, mref = 0;
  int nonfinite = 0;
  std::vector<float> ro, rl;
  if (with_ref && !P.pv) reference(P, u, ro, rl);
  for (size_t i = 0; i < n; ++i) {
    const float x = to_f(o90[i]);
    if (!std::isfinite(x)) ++nonfinite;
    if (cmp80) e80 = std::max(e80, (double)fabsf(x - to_f(o80[i])));
    if (!ro.empty()) {
      eref = std::max(eref, (double)fabsf(x - ro[i]));
      if (cmp80) eref80 = std::max(eref80, (double)fabsf(to_f(o80[i]) - ro[i]));
      mref = std::max(mref, (double)fabsf(ro[i]));
    }
  }
  if (P.lse)
    for (size_t i = 0; i < l90.size(); ++i) {
      const float want = !rl.empty() ? rl[i] : (cmp80 ? l80[i] : l90[i]);
      if (std::isinf(want) && std::isinf(l90[i])) continue;
      lse_e = std::max(lse_e, (double)fabsf(l90[i] - want));
    }
  if (nonfinite) ok = false;
  // tolerance: 2x the sm80 kernel's error vs fp64 plus a bf16 rounding floor
  if (!ro.empty() && eref > 2 * std::max(eref80, 0.0) + 8e-3 * std::max(1.0, mref)) ok = false;
  if (cmp80 && !P.pv && e80 > 2e-2 * std::max(1.0, mref)) ok = false;
  if (P.lse && lse_e > 1e-2) ok = false;
  bool st_ok = true;
  if (cmp80)
    for (int i = 0; i < P.B * P.Hq; ++i) {
      if (st90[4 * i] != st80[4 * i] || st90[4 * i + 1] != st80[4 * i + 1]) st_ok = false;
    }
  if (!st_ok) ok = false;
  printf("  %s D=%d BK=%d B=%d H=%d/%d Lq=%d Lk=%d causal=%d %s kpad=%d pv=%d dens=%.2f: vs sm80 %.2e vs ref %.2e "
         "(sm80 vs ref %.2e) lse %.2e nonfinite %d stats %s skip90 %llu/%llu skip80 %llu/%llu\n",
         ok ? "ok  " : "FAIL", P.D, C::kBK, P.B, P.Hq, P.Hkv, P.Lq, P.Lk, P.causal, P.bshd ? "bshd" : "bhsd", P.kpad,
         P.pv, P.density, e80, eref, eref80, lse_e, nonfinite, st_ok ? "same" : "DIFFER", st90[3], st90[2], st80[3],
         st80[2]);
  release(u);
  return ok;
}

template <typename T, class C>
static int check_all() {
  int fails = 0;
  const int lens[][2] = {{1, 1}, {97, 200}, {128, 128}, {1000, 1025}, {130, 4097}, {513, 300}};
  for (auto &L : lens)
    for (int causal = 0; causal < 3; ++causal)
      for (int lay = 0; lay < 2; ++lay) {
        Problem P{};
        P.B = 2, P.Hq = 4, P.Hkv = lay ? 2 : 4, P.Lq = L[0], P.Lk = L[1], P.D = C::kD;
        P.causal = causal, P.bshd = lay, P.kpad = (L[0] + causal) % 2 == 0, P.pv = false, P.lse = true;
        P.density = causal == 1 ? 1.0 : 0.6;
        fails += !check_one<T, C>(P, true);
      }
  Problem P{};
  P.B = 1, P.Hq = 8, P.Hkv = 8, P.Lq = 2048, P.Lk = 2048, P.D = C::kD, P.density = 1.0, P.lse = true;
  P.pv = true;
  fails += !check_one<T, C>(P, false);
  return fails;
}

template <typename F>
static float time_ms(F f, int reps = 10) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 2; ++i) f();
  std::vector<float> ts;
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(a));
    f();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms);
  }
  std::sort(ts.begin(), ts.end());
  cudaEventDestroy(a), cudaEventDestroy(b);
  return ts[ts.size() / 2];
}

template <typename T, class C>
static void time_shape(int H, int L, double dens, int causal, bool with80) {
  Problem P{};
  P.B = 1, P.Hq = H, P.Hkv = H, P.Lq = L, P.Lk = L, P.D = C::kD, P.density = dens, P.causal = causal, P.lse = true;
  P.BQ = C::kBQ, P.BK = C::kBK;
  Bufs<T> u;
  // device-side random fill is enough for timing: host fill of 1 GB is slow
  const int64_t nel = (int64_t)H * L * C::kD;
  u.q.clear();
  const int nq = (L + P.BQ - 1) / P.BQ, nk = (L + P.BK - 1) / P.BK;
  CK(cudaMalloc(&u.dq, nel * 2));
  CK(cudaMalloc(&u.dk, nel * 2));
  CK(cudaMalloc(&u.dv, nel * 2));
  CK(cudaMalloc(&u.do90, nel * 2));
  CK(cudaMalloc(&u.do80, nel * 2));
  CK(cudaMalloc(&u.dlse90, (size_t)H * L * 4));
  CK(cudaMalloc(&u.dlse80, (size_t)H * L * 4));
  {
    std::vector<T> hbuf(std::min<int64_t>(nel, 1 << 22));
    for (auto &x : hbuf) x = from_f<T>(nrand());
    for (T *d : {(T *)u.dq, (T *)u.dk, (T *)u.dv})
      for (int64_t o = 0; o < nel; o += (int64_t)hbuf.size())
        CK(cudaMemcpy(d + o, hbuf.data() + (o / hbuf.size()) % 7, std::min<int64_t>(hbuf.size() - 7, nel - o) * 2,
                      cudaMemcpyHostToDevice));
  }
  u.mask.resize((size_t)H * nq * nk);
  for (auto &x : u.mask) x = urand() < dens ? 1 : 0;
  CK(cudaMalloc(&u.dmask, u.mask.size()));
  CK(cudaMemcpy(u.dmask, u.mask.data(), u.mask.size(), cudaMemcpyHostToDevice));
  u.dkp = nullptr, u.dpv = nullptr, u.dst80 = u.dst90 = nullptr;
  AttnParams a90 = make_params(P, u, u.do90, u.dlse90, nullptr);
  const unsigned grid = (unsigned)(nq * H);
  const double flops = 4.0 * H * (double)L * L * C::kD * (causal ? 0.5 : 1.0);
  const float t90 = time_ms([&] { CK(launch_sm90_cfg<T, C>(a90, grid, 0)); });
  float t80 = NAN;
  if (with80 && C::kBK == 64) {
    AttnParams a80 = make_params(P, u, u.do80, u.dlse80, nullptr);
    t80 = time_ms([&] { CK(launch_attn_sm80<T, C::kD>(a80, grid, 0)); });
  }
  printf("time D=%3d BK=%3d S=%d H=%2d L=%6d causal=%d dens=%.2f  sm90 %8.3f ms (%5.0f dense-eq TFLOPS)  sm80 %8.3f ms "
         "(%5.0f)\n",
         C::kD, C::kBK, C::kStages, H, L, causal, dens, t90, flops / t90 / 1e9, t80, flops / t80 / 1e9);
  fflush(stdout);
  cudaFree(u.dq), cudaFree(u.dk), cudaFree(u.dv), cudaFree(u.do90), cudaFree(u.do80), cudaFree(u.dlse90);
  cudaFree(u.dlse80), cudaFree(u.dmask);
}

using C128 = Sm90Cfg<128, 3>;
using C64 = Sm90Cfg<64, 6>;


int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "check";
  if (!strcmp(mode, "small")) {  // one small case per head dim (sanitizer runs)
    Problem P{};
    P.B = 1, P.Hq = 2, P.Hkv = 1, P.Lq = 200, P.Lk = 300, P.D = 64, P.causal = 2, P.kpad = true, P.lse = true;
    P.density = 0.7;
    int f = !check_one<__nv_bfloat16, C64>(P, true);
    P.D = 128;
    f += !check_one<__nv_bfloat16, C128>(P, true);
    return f;
  }
  if (!strcmp(mode, "check")) {
    int f = 0;
    printf("== D=128 BK=64 bf16\n");
    f += check_all<__nv_bfloat16, C128>();
    printf("== D=64 BK=64 bf16\n");
    f += check_all<__nv_bfloat16, C64>();
    printf("== D=128 BK=64 fp16\n");
    f += check_all<__half, C128>();

    printf("check: %d failures\n", f);
    return f ? 1 : 0;
  }
  for (double d : {1.0, 0.25, 0.1}) time_shape<__nv_bfloat16, C128>(16, 32768, d, 0, true);
  time_shape<__nv_bfloat16, C128>(32, 8192, 1.0, 0, false);
  for (double d : {1.0, 0.25, 0.1}) time_shape<__nv_bfloat16, C64>(32, 16384, d, 0, true);
  time_shape<__nv_bfloat16, C128>(16, 32768, 1.0, 1, false);
  return 0;
}
