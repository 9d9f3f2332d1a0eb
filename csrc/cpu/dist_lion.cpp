// dist_lion.cpp -- CPU kernels of Distributed Lion's fused passes (dist_lion.h).
//
// Work is cut into chunks of kChunkElems elements (a multiple of 4, so a chunk never
// shares a packed byte with another) and spread over the parallel hook of sign_cpu.h
// (torch's thread pool in the extension). Each chunk is one loop that reads g and m once
// and writes m and the packed bytes once (pack), or reads the fields and p once and
// writes p once (apply).
#include "dist_lion.h"

#include <cstring>
#include <type_traits>
#include <vector>

#include "../core/dist_lion_math.h"

namespace sign_kernels {
namespace cpu {
namespace {

struct Span {
  int64_t tensor, begin, end;
};

std::vector<Span> spans_of(int64_t count, const int64_t* numels) {
  std::vector<Span> spans;
  for (int64_t i = 0; i < count; ++i)
    for (int64_t b = 0; b < numels[i]; b += kChunkElems)
      spans.push_back({i, b, b + kChunkElems < numels[i] ? b + kChunkElems : numels[i]});
  return spans;
}

template <class F>
void run_spans(const std::vector<Span>& spans, F&& f) {
  auto range = [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) f(spans[k]);
  };
  const int64_t n = static_cast<int64_t>(spans.size());
  if (n <= 1 || detail::g_parallel_for == nullptr) {
    range(0, n);
  } else {
    detail::g_parallel_for(n, &range,
                           [](void* ctx, int64_t b, int64_t e) { (*static_cast<decltype(range)*>(ctx))(b, e); });
  }
}

// NOTE: [blocks of fields] Both passes go through a small stack block of one-byte fields, so
// that the float loop is a plain unit-stride loop the compiler vectorizes like Lion's, and
// the bit packing/unpacking is a separate byte loop (packing 4 fields inside the float loop
// made it a strided, scalar loop: ~2.5x slower than Lion's pass on the same bytes).
constexpr int64_t kBlock = 256;  // elements; chunks start at multiples of kChunkElems, a multiple of it

template <class Scale, class G, class S>
void pack_block(const G* __restrict g, S* __restrict m, uint8_t* __restrict out, int64_t base, int64_t len,
                const LionScalars& s, float scale, float clip) {
  uint8_t codes[kBlock];
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const int64_t i = base + k;
    float mv = to_f32(m[i]);
    float gv = to_f32(g[i]);
    if (Scale::value) gv = (gv / scale) * clip;  // x / 1 and x * 1 are x: one variant for either
    codes[k] = static_cast<uint8_t>(dist_lion_pack_one(mv, gv, s));
    store(m + i, mv, 0u, i, false);
  }
  for (int64_t k = len; k < kBlock; ++k) codes[k] = 0;  // the last, partial byte's unused fields
  const int64_t nb = (len + 3) / 4;
#pragma omp simd
  for (int64_t q = 0; q < nb; ++q)
    out[base / 4 + q] = static_cast<uint8_t>(codes[4 * q] | codes[4 * q + 1] << 2 | codes[4 * q + 2] << 4 |
                                             codes[4 * q + 3] << 6);
}

template <class G, class S>
void pack_span(const G* __restrict g, S* __restrict m, uint8_t* __restrict out, int64_t begin, int64_t end,
               const LionScalars s, bool skip, bool has_grad_scale, float grad_scale, float clip) {
  if (skip) {
    for (int64_t b = begin / 4; b < (end + 3) / 4; ++b) out[b] = 0;
    return;
  }
  for (int64_t base = begin; base < end; base += kBlock) {
    const int64_t len = end - base < kBlock ? end - base : kBlock;
    if (has_grad_scale) pack_block<std::true_type>(g, m, out, base, len, s, grad_scale, clip);
    else pack_block<std::false_type>(g, m, out, base, len, s, 1.0f, 1.0f);
  }
}

// The fields of every byte value, as int8 lanes of one word (2-bit: 4 fields in a uint32,
// 4-bit: 2 in a uint16, 8-bit: the byte itself): unpacking a byte is one table load and one
// store, where the shift-and-mask loop over the fields of a byte did not vectorize.
template <int kBits>
struct FieldTable {
  using Word = std::conditional_t<kBits == 2, uint32_t, std::conditional_t<kBits == 4, uint16_t, uint8_t>>;
  Word word[256];
  FieldTable() {
    for (uint32_t b = 0; b < 256; ++b) {
      int8_t f[sizeof(Word)];
      for (int j = 0; j < static_cast<int>(sizeof(Word)); ++j) f[j] = static_cast<int8_t>(dist_lion_field(b, j, kBits));
      std::memcpy(&word[b], f, sizeof(Word));
    }
  }
};

template <class P, int kBits>
void apply_span(P* __restrict p, const uint8_t* __restrict v, int64_t begin, int64_t end, float lr, float decay,
                float divisor) {
  constexpr int kPerByte = 8 / kBits;
  static const FieldTable<kBits> table;
  int8_t fields[kBlock];
  for (int64_t base = begin; base < end; base += kBlock) {
    const int64_t len = end - base < kBlock ? end - base : kBlock;
    const int64_t nb = (len + kPerByte - 1) / kPerByte;
    for (int64_t q = 0; q < nb; ++q) std::memcpy(fields + q * kPerByte, &table.word[v[base / kPerByte + q]], kPerByte);
#pragma omp simd
    for (int64_t k = 0; k < len; ++k)
      store(p + base + k, dist_lion_apply_one(to_f32(p[base + k]), fields[k], lr, decay, divisor), 0u, base + k, false);
  }
}

template <class F>
bool with_float_type(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: f(static_cast<float*>(nullptr)); return true;
    case DType::kBFloat16: f(static_cast<bf16_t*>(nullptr)); return true;
    case DType::kFloat16: f(static_cast<fp16_t*>(nullptr)); return true;
    default: return false;
  }
}

}  // namespace

const char* dist_lion_pack(const DistPackList& t, const DistPackArgs& a) {
  const LionScalars s = lion_scalars(0.0f, a.beta1, a.beta2, 0.0f);
  // The scalars given by pointer are host memory here (NOTE: [executor memory]).
  const bool skip = a.found_inf != nullptr && *a.found_inf != 0.0f;
  // (g / grad_scale) * clip (NOTE: [clipping inside the step] in sign_kernels/_ops.py).
  const bool has_grad_scale = a.grad_scale != nullptr || a.clip != nullptr;
  const float grad_scale = a.grad_scale != nullptr ? *a.grad_scale : 1.0f;
  const float clip = a.clip != nullptr ? *a.clip : 1.0f;
  const std::vector<Span> spans = spans_of(t.count, t.numels);
  bool inner = true;
  const bool outer = with_float_type(t.grad_dtype, [&](auto gtag) {
    using G = std::remove_pointer_t<decltype(gtag)>;
    inner = with_float_type(t.state_dtype, [&](auto stag) {
      using S = std::remove_pointer_t<decltype(stag)>;
      run_spans(spans, [&](const Span& sp) {
        pack_span(static_cast<const G*>(t.grads[sp.tensor]), static_cast<S*>(t.exp_avgs[sp.tensor]),
                  t.packed[sp.tensor], sp.begin, sp.end, s, skip, has_grad_scale, grad_scale, clip);
      });
    });
  });
  return outer && inner ? nullptr : "dist_lion_pack: grads and momentum must be float32, bfloat16 or float16";
}

const char* dist_lion_apply(const DistApplyList& t, const DistApplyArgs& a) {
  if (a.bits != 2 && a.bits != 4 && a.bits != 8) return "dist_lion_apply: bits must be 2, 4 or 8";
  const bool skip = a.found_inf != nullptr && *a.found_inf != 0.0f;
  const float lr = a.lr_ptr != nullptr ? *a.lr_ptr : a.lr;
  const float decay = 1.0f - lr * a.weight_decay;  // as lion_scalars
  const std::vector<Span> spans = spans_of(t.count, t.numels);
  const bool ok = with_float_type(t.param_dtype, [&](auto ptag) {
    using P = std::remove_pointer_t<decltype(ptag)>;
    if (skip) return;
    run_spans(spans, [&](const Span& sp) {
      P* p = static_cast<P*>(t.params[sp.tensor]);
      const uint8_t* v = t.votes[sp.tensor];
      if (a.bits == 2) apply_span<P, 2>(p, v, sp.begin, sp.end, lr, decay, a.divisor);
      else if (a.bits == 4) apply_span<P, 4>(p, v, sp.begin, sp.end, lr, decay, a.divisor);
      else apply_span<P, 8>(p, v, sp.begin, sp.end, lr, decay, a.divisor);
    });
  });
  return ok ? nullptr : "dist_lion_apply: params must be float32, bfloat16 or float16";
}

namespace {

template <int kOutBits, bool kMajority>
void vote_range(const uint8_t* __restrict in, int64_t ranks, int64_t slice, uint8_t* __restrict out, int64_t begin,
                int64_t end) {
#pragma omp simd
  for (int64_t b = begin; b < end; ++b) {
    int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t k = 0; k < ranks; ++k) {
      const uint32_t byte = in[k * slice + b];
      s0 += dist_lion_field(byte, 0, 2);
      s1 += dist_lion_field(byte, 1, 2);
      s2 += dist_lion_field(byte, 2, 2);
      s3 += dist_lion_field(byte, 3, 2);
    }
    if (kMajority) {
      auto code = [](int32_t s) { return static_cast<uint32_t>((s > 0) - (s < 0)) & 3u; };
      out[b] = static_cast<uint8_t>(code(s0) | code(s1) << 2 | code(s2) << 4 | code(s3) << 6);
    } else if (kOutBits == 4) {
      out[2 * b] = static_cast<uint8_t>((static_cast<uint32_t>(s0) & 15u) | (static_cast<uint32_t>(s1) & 15u) << 4);
      out[2 * b + 1] = static_cast<uint8_t>((static_cast<uint32_t>(s2) & 15u) | (static_cast<uint32_t>(s3) & 15u) << 4);
    } else {
      out[4 * b] = static_cast<uint8_t>(s0);
      out[4 * b + 1] = static_cast<uint8_t>(s1);
      out[4 * b + 2] = static_cast<uint8_t>(s2);
      out[4 * b + 3] = static_cast<uint8_t>(s3);
    }
  }
}

}  // namespace

const char* dist_lion_vote(const uint8_t* received, int64_t ranks, int64_t slice_bytes, uint8_t* out, int out_bits,
                           bool majority) {
  if (majority ? out_bits != 2 : (out_bits != 2 && out_bits != 4 && out_bits != 8))
    return "dist_lion_vote: out_bits must be 2 (majority) or 2, 4, 8 (average)";
  if (ranks < 1 || ranks > 127) return "dist_lion_vote: ranks must be in [1, 127]";
  // Work items of 16K bytes (64K fields), as the passes' chunks.
  const int64_t item = kChunkElems / 4;
  std::vector<Span> spans;
  for (int64_t b = 0; b < slice_bytes; b += item) spans.push_back({0, b, b + item < slice_bytes ? b + item : slice_bytes});
  run_spans(spans, [&](const Span& sp) {
    if (majority || out_bits == 2) vote_range<2, true>(received, ranks, slice_bytes, out, sp.begin, sp.end);
    else if (out_bits == 4) vote_range<4, false>(received, ranks, slice_bytes, out, sp.begin, sp.end);
    else vote_range<8, false>(received, ranks, slice_bytes, out, sp.begin, sp.end);
  });
  return nullptr;
}

}  // namespace cpu
}  // namespace sign_kernels
