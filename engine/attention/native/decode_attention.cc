// The attention of one decode step for XLA:CPU, as XLA FFI custom calls (engine/attention/native/kernels.py
// builds and registers them).
//
// Why: XLA:CPU runs the batched attention dots of a decode step on one thread, one after another, at 13-18 GB/s
// (bench/RESULTS.md). These kernels split the (row, head) pairs over threads, and the
// self-attention reads only the cache slots written so far.
//
// DalleBotDecodeAttention, the self-attention:
//   Operands: q, k_new, v_new (P, Dh) f32 -- per (row, head) pair the scaled query and this step's key and value;
//             position s32[] -- the step's slot;
//             k_0..k_{n-1}, v_0..v_{n-1} -- the cache blocks, each (rows, heads, W, Dh) f32 with rows * heads = P;
//             slot b*W + j lives in block b.
//   Results:  out (P, Dh) f32 = softmax(q . k[0..position]) @ v[0..position], then the cache blocks, aliased to the
//             operand blocks (the caller sets input_output_aliases) with k_new / v_new written at `position`.
// DalleBotCrossAttention, the cross-attention over the text:
//   Operands: q (P, Dh) f32; k, v (P, T, Dh) f32 -- each pair's text keys and values; bias (rows, T) f32 -- the
//             additive mask of each row's text (pair p is row p / (P / rows)).
//   Result:   out (P, Dh) f32 = softmax(q . k + bias) @ v.
// Attribute of both: threads (i64) -- how many runs the pairs are split into, shared by the calling thread and
//   XLA's intra-op thread pool (1 = the calling thread only).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One SIMD register of floats, as wide as the CPU this is built for (-march=native): GCC's vector extensions
// compile to AVX-512, AVX or SSE instructions alike.
#if defined(__AVX512F__)
#define DALLE_LANES 16
#elif defined(__AVX__)
#define DALLE_LANES 8
#else
#define DALLE_LANES 4
#endif
constexpr int kLanes = DALLE_LANES;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float Half __attribute__((vector_size(kLanes * sizeof(float) / 2)));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

// The sum of a register's lanes, halving it each time (log2(kLanes) adds instead of kLanes - 1 in a chain).
inline float lane_sum(Vec v) {
#if DALLE_LANES == 16
  const Half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#elif DALLE_LANES == 8
  const Half h = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
#else
  const Half h = __builtin_shufflevector(v, v, 0, 1) + __builtin_shufflevector(v, v, 2, 3);
#endif
  float total = 0.0f;
  for (int i = 0; i < kLanes / 2; ++i) total += h[i];
  return total;
}

// a . b over n floats: whole registers, then the rest one by one.
inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) acc += load(a + d) * load(b + d);
  float total = lane_sum(acc);
  for (; d < n; ++d) total += a[d] * b[d];
  return total;
}

// y += w * x over n floats.
inline void add_scaled(float w, const float* x, float* y, int64_t n) {
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) store(y + d, load(y + d) + w * load(x + d));
  for (; d < n; ++d) y[d] += w * x[d];
}

// softmax(q . key(j) + bias[j], j < n) @ value(j) into o (dh floats); scores holds n floats of scratch. bias
// may be null (none).
template <typename Key, typename Value>
void attend(const float* q, Key key, Value value, const float* bias, int64_t n, int64_t dh, float* scores, float* o) {
  float top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const float score = dot(q, key(j), dh) + (bias ? bias[j] : 0.0f);
    scores[j] = score;
    top = std::max(top, score);
  }
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = std::exp(scores[j] - top);
    total += scores[j];
  }
  std::fill(o, o + dh, 0.0f);
  for (int64_t j = 0; j < n; ++j) add_scaled(scores[j] / total, value(j), o, dh);
}

// fn(begin, end) over [0, pairs) in `parts` runs, shared between the calling thread and XLA's own intra-op thread
// pool. XLA's pool threads wait for work while a custom call runs (measured: 1.9 cores busy with one thread of
// ours); threads of our own would only compete with them for the cores. Each run is claimed from a counter by
// whichever thread comes first, and the calling thread waits only for runs others have claimed: XLA may run a
// scheduled task late, or on this very thread, and then there is nothing left for it to do.
template <typename Fn>
void split_pairs(int64_t pairs, int64_t parts, ffi::ThreadPool& pool, Fn fn) {
  parts = std::clamp<int64_t>(parts, 1, std::max<int64_t>(pairs, 1));
  if (parts == 1) {
    fn(int64_t{0}, pairs);
    return;
  }
  struct Runs {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto runs = std::make_shared<Runs>();  // a task that starts after this call returned still finds its counters
  auto work = [runs, pairs, parts, &fn] {
    for (int64_t i; (i = runs->next.fetch_add(1)) < parts;) {
      fn(pairs * i / parts, pairs * (i + 1) / parts);
      runs->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < parts; ++t) pool.Schedule([work] { work(); });
  work();
  while (runs->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

ffi::Error DecodeAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                           ffi::Buffer<ffi::S32> position, ffi::RemainingArgs blocks_in,
                           ffi::ResultBuffer<ffi::F32> out, ffi::RemainingRets blocks_out, int64_t threads,
                           ffi::ThreadPool pool) {
  const auto dims = q.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("q must be (pairs, head_dim)");
  const int64_t pairs = dims[0], dh = dims[1];
  if (!std::equal(dims.begin(), dims.end(), k_new.dimensions().begin()) ||
      !std::equal(dims.begin(), dims.end(), v_new.dimensions().begin()))
    return ffi::Error::InvalidArgument("k_new and v_new must be shaped like q");
  if (blocks_out.size() == 0 || blocks_out.size() % 2 || blocks_out.size() != blocks_in.size())
    return ffi::Error::InvalidArgument("expected the k blocks then the v blocks, as operands and as results");
  const int64_t n = static_cast<int64_t>(blocks_out.size() / 2);
  std::vector<float*> k_blocks, v_blocks;
  int64_t width = 0;
  for (int64_t i = 0; i < 2 * n; ++i) {
    auto block = blocks_out.get<ffi::Buffer<ffi::F32>>(i);
    if (block.has_error()) return ffi::Error::InvalidArgument("cache blocks must be f32 buffers");
    const auto bd = (*block)->dimensions();
    if (bd.size() != 4 || bd[0] * bd[1] != pairs || bd[3] != dh || (width && bd[2] != width))
      return ffi::Error::InvalidArgument("cache blocks must all be (rows, heads, width, head_dim)");
    width = bd[2];
    (i < n ? k_blocks : v_blocks).push_back((*block)->typed_data());
  }
  const int64_t pos = static_cast<int64_t>(position.typed_data()[0]);
  if (pos < 0 || pos >= n * width) return ffi::Error::InvalidArgument("position outside the cache");
  split_pairs(pairs, threads, pool, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(pos + 1));
    for (int64_t p = begin; p < end; ++p) {
      // slot j of pair p: row p * width + j % width of block j / width
      auto slot = [&](const std::vector<float*>& blocks, int64_t j) { return blocks[j / width] + (p * width + j % width) * dh; };
      std::memcpy(slot(k_blocks, pos), k_new.typed_data() + p * dh, sizeof(float) * dh);
      std::memcpy(slot(v_blocks, pos), v_new.typed_data() + p * dh, sizeof(float) * dh);
      attend(q.typed_data() + p * dh, [&](int64_t j) { return slot(k_blocks, j); },
             [&](int64_t j) { return slot(v_blocks, j); }, nullptr, pos + 1, dh, scores.data(),
             out->typed_data() + p * dh);
    }
  });
  return ffi::Error::Success();
}

// Cross-attention of one decode step: each (row, head) pair's query over its row's T text keys and values, with
// the row's additive mask bias.
ffi::Error CrossAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                          ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out, int64_t threads,
                          ffi::ThreadPool pool) {
  const auto qd = q.dimensions(), kd = k.dimensions(), bd = bias.dimensions();
  if (qd.size() != 2 || kd.size() != 3 || bd.size() != 2)
    return ffi::Error::InvalidArgument("expected q (pairs, head_dim), k and v (pairs, texts, head_dim), bias (rows, texts)");
  const int64_t pairs = qd[0], dh = qd[1], texts = kd[1], rows = bd[0];
  if (kd[0] != pairs || kd[2] != dh || !std::equal(kd.begin(), kd.end(), v.dimensions().begin()) ||
      bd[1] != texts || rows == 0 || pairs % rows)
    return ffi::Error::InvalidArgument("q, k, v and bias do not agree in shape");
  const int64_t heads = pairs / rows;
  split_pairs(pairs, threads, pool, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(texts));
    for (int64_t p = begin; p < end; ++p) {
      const float* kp = k.typed_data() + p * texts * dh;
      const float* vp = v.typed_data() + p * texts * dh;
      attend(q.typed_data() + p * dh, [&](int64_t j) { return kp + j * dh; }, [&](int64_t j) { return vp + j * dh; },
             bias.typed_data() + (p / heads) * texts, texts, dh, scores.data(), out->typed_data() + p * dh);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DalleBotDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .RemainingRets()
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DalleBotCrossAttention, CrossAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());
