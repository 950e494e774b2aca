// One decode step's self-attention for XLA:CPU, as an XLA FFI custom call (engine/native/__init__.py builds and
// registers it).
//
// Why: XLA:CPU runs the batched attention dots of a decode step on one thread, one after another, at 16-18 GB/s
// (bench/RESULTS.md, session 18). This kernel splits the (row, head) pairs over threads and reads only the cache
// slots written so far.
//
// Operands: q, k_new, v_new (P, Dh) f32 -- per (row, head) pair the scaled query and this step's key and value;
//           position s32[] -- the step's slot;
//           k_0..k_{n-1}, v_0..v_{n-1} -- the cache blocks, each (rows, heads, W, Dh) f32 with rows * heads = P;
//           slot b*W + j lives in block b.
// Results:  out (P, Dh) f32 = softmax(q . k[0..position]) @ v[0..position], then the cache blocks, aliased to the
//           operand blocks (the caller sets input_output_aliases) with k_new / v_new written at `position`.
// Attribute: threads (i64) -- how many threads share the pairs (1 = the calling thread only).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Cache {
  std::vector<float*> k, v;
  int64_t width = 0;
};

void attend_pairs(const float* q, const float* k_new, const float* v_new, const Cache& cache, int64_t position,
                  int64_t dh, int64_t begin, int64_t end, float* out) {
  const int64_t width = cache.width, valid = position + 1;
  std::vector<float> scores(static_cast<size_t>(valid));
  for (int64_t p = begin; p < end; ++p) {
    const int64_t row = (p * width + position % width) * dh;
    std::memcpy(cache.k[position / width] + row, k_new + p * dh, sizeof(float) * dh);
    std::memcpy(cache.v[position / width] + row, v_new + p * dh, sizeof(float) * dh);
    const float* qp = q + p * dh;
    float top = -INFINITY;
    for (int64_t slot = 0; slot < valid; ++slot) {
      const float* key = cache.k[slot / width] + (p * width + slot % width) * dh;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < dh; ++d) acc += qp[d] * key[d];
      scores[slot] = acc;
      top = std::max(top, acc);
    }
    float total = 0.0f;
    for (int64_t slot = 0; slot < valid; ++slot) {
      scores[slot] = std::exp(scores[slot] - top);
      total += scores[slot];
    }
    float* o = out + p * dh;
    std::fill(o, o + dh, 0.0f);
    for (int64_t slot = 0; slot < valid; ++slot) {
      const float w = scores[slot] / total;
      const float* value = cache.v[slot / width] + (p * width + slot % width) * dh;
#pragma omp simd
      for (int64_t d = 0; d < dh; ++d) o[d] += w * value[d];
    }
  }
}

ffi::Error DecodeAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                           ffi::Buffer<ffi::S32> position, ffi::RemainingArgs blocks_in,
                           ffi::ResultBuffer<ffi::F32> out, ffi::RemainingRets blocks_out, int64_t threads) {
  const auto dims = q.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("q must be (pairs, head_dim)");
  const int64_t pairs = dims[0], dh = dims[1];
  if (!std::equal(dims.begin(), dims.end(), k_new.dimensions().begin()) ||
      !std::equal(dims.begin(), dims.end(), v_new.dimensions().begin()))
    return ffi::Error::InvalidArgument("k_new and v_new must be shaped like q");
  if (blocks_out.size() == 0 || blocks_out.size() % 2 || blocks_out.size() != blocks_in.size())
    return ffi::Error::InvalidArgument("expected the k blocks then the v blocks, as operands and as results");
  const int64_t n = static_cast<int64_t>(blocks_out.size() / 2);
  Cache cache;
  for (int64_t i = 0; i < 2 * n; ++i) {
    auto block = blocks_out.get<ffi::Buffer<ffi::F32>>(i);
    if (block.has_error()) return ffi::Error::InvalidArgument("cache blocks must be f32 buffers");
    const auto bd = (*block)->dimensions();
    if (bd.size() != 4 || bd[0] * bd[1] != pairs || bd[3] != dh || (cache.width && bd[2] != cache.width))
      return ffi::Error::InvalidArgument("cache blocks must all be (rows, heads, width, head_dim)");
    cache.width = bd[2];
    (i < n ? cache.k : cache.v).push_back((*block)->typed_data());
  }
  const int64_t pos = static_cast<int64_t>(position.typed_data()[0]);
  if (pos < 0 || pos >= n * cache.width) return ffi::Error::InvalidArgument("position outside the cache");
  const int64_t workers = std::clamp<int64_t>(threads, 1, pairs);
  const int64_t per = (pairs + workers - 1) / workers;
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < workers; ++t) {
    const int64_t begin = t * per, end = std::min(pairs, begin + per);
    if (begin >= end) break;
    try {
      pool.emplace_back(attend_pairs, q.typed_data(), k_new.typed_data(), v_new.typed_data(), std::cref(cache), pos,
                        dh, begin, end, out->typed_data());
    } catch (const std::system_error&) {  // no more threads to be had: this thread does the rest too
      attend_pairs(q.typed_data(), k_new.typed_data(), v_new.typed_data(), cache, pos, dh, begin, pairs,
                   out->typed_data());
      break;
    }
  }
  attend_pairs(q.typed_data(), k_new.typed_data(), v_new.typed_data(), cache, pos, dh, 0, std::min(pairs, per),
               out->typed_data());
  for (auto& t : pool) t.join();
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
                                  .Attr<int64_t>("threads"));
