// Fused masked attention for XLA CPU (float32), forward and backward, as XLA FFI handlers.
//
// Why: XLA CPU runs attention as separate ops that each write the (B, N, T, S) scores to memory; a fused
// kernel keeps a tile of scores in cache (flash attention), saves only the output and the row log-sum-exp for
// the backward pass, and skips tiles the mask removes entirely (the causal upper triangle, other documents of
// a packed row, keys outside a sliding window). Built and loaded by cpu_attention.py.
//
// Layouts (row-major): q (B,T,N,H), k and v (B,S,K,H) with N a multiple of K (grouped-query attention: query
// head n reads kv head n / (N/K)), segment ids (B,T) and (B,S) int32, out (B,T,N,H), lse (B,N,T).
// Query i sees key j iff seg_q[i] == seg_k[j], and (causal) i >= j, and (window > 0) |i - j| < window, with
// query and key positions counted from the start of the row (self-attention: T == S).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 64;  // query and key tile: a 64 x 64 score tile and its operands stay in L1/L2

typedef float v8 __attribute__((vector_size(32), aligned(4)));  // unaligned 8-float vector

typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));

inline v8 load8(const float* p) { return *reinterpret_cast<const v8*>(p); }
inline void store8(float* p, v8 x) { *reinterpret_cast<v8*>(p) = x; }

// exp on 8 floats (Cephes' expf: range reduction by ln 2, degree-6 polynomial; about 1 ulp), inputs clamped
// to [-87, 88] so that the result is finite: callers zero what the mask hides instead of passing -inf.
inline v8 exp8(v8 x) {
  const v8 lo = v8{} - 87.f, hi = v8{} + 88.f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const v8 magic = v8{} + 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const v8 n = (x * 1.44269504088896341f + magic) - magic;
  const v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v8 p = v8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
  return p * reinterpret_cast<const v8&>(e);
}

// max(init, x[0], ..., x[n-1]), in 8 lanes (a scalar loop is one long chain of dependent compares).
inline float row_max(const float* x, int64_t n, float init) {
  v8 m = v8{} + init;
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const v8 y = load8(x + c);
    m = y > m ? y : m;
  }
  float out = init;
  for (int i = 0; i < 8; ++i) out = std::max(out, m[i]);
  for (; c < n; ++c) out = std::max(out, x[c]);
  return out;
}

// x[c] = exp(x[c] - sub) for c < n; returns the sum.
inline float exp_row(float* x, int64_t n, float sub) {
  v8 acc{};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const v8 e = exp8(load8(x + c) - sub);
    store8(x + c, e);
    acc += e;
  }
  float sum = 0.f;
  for (int i = 0; i < 8; ++i) sum += acc[i];
  for (; c < n; ++c) sum += (x[c] = std::exp(std::max(x[c] - sub, -87.f)));
  return sum;
}

// C (m x n, ldc) = or += op(A) . B (kk x n, ldb), row-major, where op(A) is A (m x kk, lda) or, with TA, the
// transpose of A (kk x m, lda). A register tile of R rows x 16 columns accumulates over kk; columns past the
// last multiple of 16 take a scalar loop.
template <int R, bool TA>
inline void tile_rows(int n16, int kk, const float* a, int lda, const float* b, int ldb, float* c, int ldc,
                      bool acc) {
  for (int j = 0; j < n16; j += 16) {
    v8 s[R][2];
    for (int r = 0; r < R; ++r) {
      if (acc) {
        s[r][0] = load8(c + r * ldc + j);
        s[r][1] = load8(c + r * ldc + j + 8);
      } else {
        s[r][0] = v8{};
        s[r][1] = v8{};
      }
    }
    for (int p = 0; p < kk; ++p) {
      const v8 b0 = load8(b + p * ldb + j), b1 = load8(b + p * ldb + j + 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float x = TA ? a[p * lda + r] : a[r * lda + p];
        s[r][0] += x * b0;
        s[r][1] += x * b1;
      }
    }
    for (int r = 0; r < R; ++r) {
      store8(c + r * ldc + j, s[r][0]);
      store8(c + r * ldc + j + 8, s[r][1]);
    }
  }
}

template <bool TA = false>
void gemm(int m, int n, int kk, const float* a, int lda, const float* b, int ldb, float* c, int ldc, bool acc) {
  const int n16 = n & ~15;
  auto at = [&](int r, int p) { return TA ? a[p * lda + r] : a[r * lda + p]; };
  auto rows = [&](auto r, int i) {
    tile_rows<decltype(r)::value, TA>(n16, kk, TA ? a + i : a + i * lda, lda, b, ldb, c + i * ldc, ldc, acc);
  };
  int i = 0;
  for (; i + 6 <= m; i += 6) rows(std::integral_constant<int, 6>{}, i);
  switch (m - i) {  // the last rows in one register tile (a 64-row tile leaves 4)
    case 5: rows(std::integral_constant<int, 5>{}, i); break;
    case 4: rows(std::integral_constant<int, 4>{}, i); break;
    case 3: rows(std::integral_constant<int, 3>{}, i); break;
    case 2: rows(std::integral_constant<int, 2>{}, i); break;
    case 1: rows(std::integral_constant<int, 1>{}, i); break;
    default: break;
  }
  if (n16 == n) return;
  for (int r = 0; r < m; ++r) {
    for (int j = n16; j < n; ++j) {
      float s = acc ? c[r * ldc + j] : 0.f;
      for (int p = 0; p < kk; ++p) s += at(r, p) * b[p * ldb + j];
      c[r * ldc + j] = s;
    }
  }
}

void transpose(int rows, int cols, const float* src, int lds, float* dst, int ldd) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// The (rows, h) row-major src (stride lds) transposed tile by tile: the kTile rows from r0 become the
// (h, cols) block at dst + r0 * h with stride cols (cols = kTile, or what is left at the end). A block's rows
// sit 256 bytes apart instead of a whole sequence apart, which would alias in the L1 cache.
void transpose_tiles(int64_t rows, int64_t h, const float* src, int64_t lds, float* dst) {
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t cols = std::min<int64_t>(kTile, rows - r0);
    transpose(cols, h, src + r0 * lds, lds, dst + r0 * h, cols);
  }
}

struct Shape {
  int64_t b, t, s, n, kv, h;
  bool causal;
  int64_t window;
};

// How the mask meets one (query tile, key tile) pair: 0 nothing visible, 1 every pair visible, 2 per element.
int tile_kind(const Shape& sh, const int32_t* sq, const int32_t* sk, int64_t i0, int64_t i1, int64_t j0,
              int64_t j1) {
  if (sh.causal && j0 > i1 - 1) return 0;
  if (sh.window > 0 && (i0 - (j1 - 1) >= sh.window || j0 - (i1 - 1) >= sh.window)) return 0;
  const int32_t a = sq[i0], b = sk[j0];
  bool uniform = true;
  for (int64_t i = i0; i < i1 && uniform; ++i) uniform = sq[i] == a;
  for (int64_t j = j0; j < j1 && uniform; ++j) uniform = sk[j] == b;
  if (uniform && a != b) return 0;
  const bool full_causal = !sh.causal || j1 - 1 <= i0;
  const bool full_window = sh.window <= 0 || (i1 - 1 - j0 < sh.window && j1 - 1 - i0 < sh.window);
  return uniform && full_causal && full_window ? 1 : 2;
}

inline bool visible(const Shape& sh, const int32_t* sq, const int32_t* sk, int64_t i, int64_t j) {
  if (sq[i] != sk[j]) return false;
  if (sh.causal && j > i) return false;
  if (sh.window > 0 && (i - j >= sh.window || j - i >= sh.window)) return false;
  return true;
}

// Runs fn(item) for item in [0, count) on the calling thread and the XLA intra-op pool's threads. Work is
// claimed from a shared counter, so the caller finishes everything itself if the pool is busy; tasks that
// start late find nothing left (the shared state outlives the call through the shared_ptr).
void parallel_for(ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> fn) {
  struct Work {
    std::atomic<int64_t> next{0}, done{0};
    int64_t count;
    std::function<void(int64_t)> fn;
  };
  auto w = std::make_shared<Work>();
  w->count = count;
  w->fn = std::move(fn);
  auto run = [w] {
    for (int64_t i; (i = w->next.fetch_add(1)) < w->count;) {
      w->fn(i);
      w->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([run] { run(); });
  run();
  while (w->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

Shape shape_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, bool causal, int64_t window) {
  auto qd = q.dimensions(), kd = k.dimensions();
  return Shape{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], causal, window};
}

ffi::Error check(const Shape& sh) {
  if (sh.n % sh.kv != 0) return ffi::Error::InvalidArgument("query heads must be a multiple of kv heads");
  if (sh.t != sh.s) return ffi::Error::InvalidArgument("self-attention only: query and key lengths differ");
  return ffi::Error::Success();
}

ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> seg_q, ffi::Buffer<ffi::S32> seg_k, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse, bool causal, int64_t window) {
  const Shape sh = shape_of(q, k, causal, window);
  if (auto e = check(sh); e.failure()) return e;
  const int64_t tiles = (sh.t + kTile - 1) / kTile, g = sh.n / sh.kv, h = sh.h;
  const float scale = 1.f / std::sqrt(static_cast<float>(h));
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  float* op = out->typed_data();
  float* lp = lse->typed_data();
  const int32_t* sqp = seg_q.typed_data();
  const int32_t* skp = seg_k.typed_data();
  const int64_t kv_row = sh.kv * h;  // stride between consecutive keys of one kv head
  // Keys transposed once per (row, kv head), tile by tile, so that a score tile is a plain product.
  std::vector<float> kt_all(sh.b * sh.kv * h * sh.s);
  parallel_for(pool, sh.b * sh.kv, [&](int64_t item) {
    const int64_t bi = item / sh.kv, kvh = item % sh.kv;
    transpose_tiles(sh.s, h, kp + (bi * sh.s * sh.kv + kvh) * h, kv_row, kt_all.data() + item * h * sh.s);
  });
  parallel_for(pool, sh.b * sh.n * tiles, [&](int64_t item) {
    const int64_t bi = item / (sh.n * tiles), n = item / tiles % sh.n, qt = item % tiles, kvh = n / g;
    const float* kt = kt_all.data() + (bi * sh.kv + kvh) * h * sh.s;
    const int64_t i0 = qt * kTile, i1 = std::min(i0 + kTile, sh.t), rows = i1 - i0;
    const int32_t* sq = sqp + bi * sh.t;
    const int32_t* sk = skp + bi * sh.s;
    std::vector<float> qs(kTile * h), sc(kTile * kTile), acc(kTile * h, 0.f);
    std::vector<float> m(kTile, -INFINITY), l(kTile, 0.f);
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = qp + ((bi * sh.t + i0 + r) * sh.n + n) * h;
      for (int64_t d = 0; d < h; ++d) qs[r * h + d] = src[d] * scale;
    }
    for (int64_t j0 = 0; j0 < sh.s; j0 += kTile) {
      const int64_t j1 = std::min(j0 + kTile, sh.s), cols = j1 - j0;
      const int kind = tile_kind(sh, sq, sk, i0, i1, j0, j1);
      if (kind == 0) continue;
      const float* vb = vp + ((bi * sh.s + j0) * sh.kv + kvh) * h;
      gemm(rows, cols, h, qs.data(), h, kt + j0 * h, cols, sc.data(), cols, false);
      for (int64_t r = 0; r < rows; ++r) {
        float* srow = sc.data() + r * cols;
        if (kind == 2)
          for (int64_t c = 0; c < cols; ++c)
            if (!visible(sh, sq, sk, i0 + r, j0 + c)) srow[c] = -INFINITY;
        const float mx = row_max(srow, cols, m[r]);
        if (mx == -INFINITY) {  // nothing visible yet in this row: it adds nothing to the output
          std::fill(srow, srow + cols, 0.f);
          continue;
        }
        const float corr = std::exp(m[r] - mx);
        l[r] = l[r] * corr + exp_row(srow, cols, mx);  // hidden keys add exp(-87), about 1e-38 each
        if (kind == 2)
          for (int64_t c = 0; c < cols; ++c)
            if (!visible(sh, sq, sk, i0 + r, j0 + c)) srow[c] = 0.f;
        m[r] = mx;
        float* arow = acc.data() + r * h;
        for (int64_t d = 0; d < h; ++d) arow[d] *= corr;
      }
      gemm(rows, h, cols, sc.data(), cols, vb, kv_row, acc.data(), h, true);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = op + ((bi * sh.t + i0 + r) * sh.n + n) * h;
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      for (int64_t d = 0; d < h; ++d) dst[d] = acc[r * h + d] * inv;
      lp[(bi * sh.n + n) * sh.t + i0 + r] = l[r] > 0.f ? m[r] + std::log(l[r]) : INFINITY;  // +inf: P = 0
    }
  });
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::S32> seg_q, ffi::Buffer<ffi::S32> seg_k, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, bool causal, int64_t window) {
  const Shape sh = shape_of(q, k, causal, window);
  if (auto e = check(sh); e.failure()) return e;
  const int64_t tiles = (sh.t + kTile - 1) / kTile, g = sh.n / sh.kv, h = sh.h, s = sh.s;
  const float scale = 1.f / std::sqrt(static_cast<float>(h));
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const float* op = out.typed_data();
  const float* lp = lse.typed_data();
  const float* dop = dout.typed_data();
  const int32_t* sqp = seg_q.typed_data();
  const int32_t* skp = seg_k.typed_data();
  float* dqp = dq->typed_data();
  float* dkp = dk->typed_data();
  float* dvp = dv->typed_data();
  // One item per (row, kv head): it owns the dK and dV of that head and the dQ of its query heads, so no
  // two threads write the same gradient.
  parallel_for(pool, sh.b * sh.kv, [&](int64_t item) {
    const int64_t bi = item / sh.kv, kvh = item % sh.kv, kv_row = sh.kv * h;
    const int32_t* sq = sqp + bi * sh.t;
    const int32_t* sk = skp + bi * s;
    const float* kb = kp + (bi * s * sh.kv + kvh) * h;  // key j at kb + j * kv_row
    const float* vb = vp + (bi * s * sh.kv + kvh) * h;
    std::vector<float> kt(h * s), vt(h * s), dk_acc(s * h, 0.f), dv_acc(s * h, 0.f);
    transpose_tiles(s, h, kb, kv_row, kt.data());
    transpose_tiles(s, h, vb, kv_row, vt.data());
    std::vector<float> qs(kTile * h), dos(kTile * h), dq_acc(kTile * h), p(kTile * kTile), dp(kTile * kTile), delta(kTile), lrow(kTile);
    for (int64_t gi = 0; gi < g; ++gi) {
      const int64_t n = kvh * g + gi;
      for (int64_t qt = 0; qt < tiles; ++qt) {
        const int64_t i0 = qt * kTile, i1 = std::min(i0 + kTile, sh.t), rows = i1 - i0;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t at = ((bi * sh.t + i0 + r) * sh.n + n) * h;
          float dsum = 0.f;
          for (int64_t d = 0; d < h; ++d) {
            qs[r * h + d] = qp[at + d] * scale;
            dos[r * h + d] = dop[at + d];
            dsum += dop[at + d] * op[at + d];
          }
          delta[r] = dsum;
          lrow[r] = lp[(bi * sh.n + n) * sh.t + i0 + r];
        }
        std::fill(dq_acc.begin(), dq_acc.end(), 0.f);
        for (int64_t j0 = 0; j0 < s; j0 += kTile) {
          const int64_t j1 = std::min(j0 + kTile, s), cols = j1 - j0;
          const int kind = tile_kind(sh, sq, sk, i0, i1, j0, j1);
          if (kind == 0) continue;
          // P = exp(S - lse), then dP = dO V^T and dS = P * (dP - delta), in place of P.
          gemm(rows, cols, h, qs.data(), h, kt.data() + j0 * h, cols, p.data(), cols, false);
          for (int64_t r = 0; r < rows; ++r) {
            float* prow = p.data() + r * cols;
            exp_row(prow, cols, lrow[r]);
            if (kind == 2)
              for (int64_t c = 0; c < cols; ++c)
                if (!visible(sh, sq, sk, i0 + r, j0 + c)) prow[c] = 0.f;
          }
          gemm<true>(cols, h, rows, p.data(), cols, dos.data(), h, dv_acc.data() + j0 * h, h, true);
          gemm(rows, cols, h, dos.data(), h, vt.data() + j0 * h, cols, dp.data(), cols, false);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < cols; ++c) p[r * cols + c] *= dp[r * cols + c] - delta[r];
          gemm(rows, h, cols, p.data(), cols, kb + j0 * kv_row, kv_row, dq_acc.data(), h, true);
          gemm<true>(cols, h, rows, p.data(), cols, qs.data(), h, dk_acc.data() + j0 * h, h, true);
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* dst = dqp + ((bi * sh.t + i0 + r) * sh.n + n) * h;
          for (int64_t d = 0; d < h; ++d) dst[d] = dq_acc[r * h + d] * scale;
        }
      }
    }
    for (int64_t j = 0; j < s; ++j) {
      float* dkd = dkp + (bi * s + j) * kv_row + kvh * h;
      float* dvd = dvp + (bi * s + j) * kv_row + kvh * h;
      std::memcpy(dkd, dk_acc.data() + j * h, h * sizeof(float));
      std::memcpy(dvd, dv_acc.data() + j * h, h * sizeof(float));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtrainAttentionForward, forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtrainAttentionBackward, backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("window"));
