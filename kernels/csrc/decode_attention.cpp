// Decode attention straight from the paged, head-major KV cache ([K, N, S, Dh] per layer): the query
// and key rows are read where they lie, widened to float32 in registers, and nothing is gathered or
// converted into temporaries. The two passes leave the soft-cap, mask and softmax to the caller.
//
// Numerics are those of services/model/paged_attention.py: logits and the probabilities-times-values
// sums accumulate in float32 (in another order than a BLAS would, so results agree to float32
// rounding, not bit for bit), a bfloat16 output is rounded once, to nearest even.
//
// Legend: B decode sequences, K kv heads, G q heads per kv head, Dh head size, N blocks, S block
// size, M block-table width, W logits width (>= the longest context).
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kLanes = 16;  // one AVX-512 register of float32; two AVX2 registers
constexpr int64_t kMaxRow = 8 * 256;  // G * Dh held in float32 on the stack

inline float load(const float* p, int64_t i) { return p[i]; }

inline float load(const uint16_t* p, int64_t i) {
  uint32_t bits = uint32_t(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline void store(float* p, int64_t i, float v) { p[i] = v; }

inline void store(uint16_t* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN (quiet)
    p[i] = uint16_t((bits >> 16) | 0x40u);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  p[i] = uint16_t(bits >> 16);
}

template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = load(src, i);
}

inline float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {0};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += a[d + j] * b[d + j];
  float sum = 0;
  for (; d < n; ++d) sum += a[d] * b[d];
  for (int64_t j = 0; j < kLanes; ++j) sum += acc[j];
  return sum;
}

// logits [B, K, G, W] float32 <- multiplier * q . k for the first ctx[b] positions, 0 after them.
template <typename T>
void logits(const T* q, const T* k_cache, const int64_t* tables, const int64_t* ctx, float* out,
            int64_t B, int64_t K, int64_t G, int64_t Dh, int64_t N, int64_t S, int64_t M, int64_t W,
            float multiplier) {
  float qf[kMaxRow];
  float kf[kMaxRow];
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = ctx[b];
    for (int64_t h = 0; h < K; ++h) {
      widen(q + (b * K + h) * G * Dh, qf, G * Dh);
      float* o = out + (b * K + h) * G * W;
      // Block by block: no division per position, and each block's rows are contiguous.
      for (int64_t t0 = 0; t0 < L; t0 += S) {
        const T* rows = k_cache + (h * N + tables[b * M + t0 / S]) * S * Dh;
        const int64_t n = L - t0 < S ? L - t0 : S;
        for (int64_t r = 0; r < n; ++r) {
          widen(rows + r * Dh, kf, Dh);
          for (int64_t g = 0; g < G; ++g) o[g * W + t0 + r] = dot(qf + g * Dh, kf, Dh) * multiplier;
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t = L; t < W; ++t) o[g * W + t] = 0.0f;
    }
  }
}

// out [B, K, G, Dh] <- probs [B, K, G, W] (the activation dtype) times the first ctx[b] value rows.
template <typename T>
void weighted_values(const T* probs, const T* v_cache, const int64_t* tables, const int64_t* ctx, T* out,
                     int64_t B, int64_t K, int64_t G, int64_t Dh, int64_t N, int64_t S, int64_t M, int64_t W) {
  float acc[kMaxRow];
  float vf[kMaxRow];
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = ctx[b];
    for (int64_t h = 0; h < K; ++h) {
      const T* p = probs + (b * K + h) * G * W;
      for (int64_t i = 0; i < G * Dh; ++i) acc[i] = 0.0f;
      for (int64_t t0 = 0; t0 < L; t0 += S) {
        const T* rows = v_cache + (h * N + tables[b * M + t0 / S]) * S * Dh;
        const int64_t n = L - t0 < S ? L - t0 : S;
        for (int64_t r = 0; r < n; ++r) {
          widen(rows + r * Dh, vf, Dh);
          for (int64_t g = 0; g < G; ++g) {
            const float w = load(p, g * W + t0 + r);
            float* a = acc + g * Dh;
            for (int64_t d = 0; d < Dh; ++d) a[d] += w * vf[d];
          }
        }
      }
      T* o = out + (b * K + h) * G * Dh;
      for (int64_t i = 0; i < G * Dh; ++i) store(o, i, acc[i]);
    }
  }
}


// Head sizes that are a multiple of 16 (Grok-1's 128, cpu-bench's 64) take these: whole rows in
// vector registers (GCC vector extensions: one AVX-512 register, or two AVX2 ones), the values'
// accumulators held in registers across the context rather than in memory.
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, 64);
  return v;
}

inline f32x16 load16(const uint16_t* p) {
  u16x16 h;
  std::memcpy(&h, p, 32);
  u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &bits, 64);
  return v;
}

typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

// Halves added in vector registers: no round trip through memory, four dependent adds.
inline float hsum(f32x16 v) {
  f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
            __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

constexpr int64_t kMaxGroups = 8;

template <typename T, int64_t DH>
void logits_fixed(const T* q, const T* k_cache, const int64_t* tables, const int64_t* ctx, float* out,
                  int64_t B, int64_t K, int64_t G, int64_t N, int64_t S, int64_t M, int64_t W, float multiplier) {
  constexpr int64_t V = DH / 16;
  f32x16 qv[kMaxGroups][V];
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = ctx[b];
    for (int64_t h = 0; h < K; ++h) {
      const T* qh = q + (b * K + h) * G * DH;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < V; ++i) qv[g][i] = load16(qh + g * DH + 16 * i);
      float* o = out + (b * K + h) * G * W;
      for (int64_t t0 = 0; t0 < L; t0 += S) {
        const T* rows = k_cache + (h * N + tables[b * M + t0 / S]) * S * DH;
        const int64_t n = L - t0 < S ? L - t0 : S;
        for (int64_t r = 0; r < n; ++r) {
          f32x16 kv[V];
          for (int64_t i = 0; i < V; ++i) kv[i] = load16(rows + r * DH + 16 * i);
          for (int64_t g = 0; g < G; ++g) {
            f32x16 acc = qv[g][0] * kv[0];
            for (int64_t i = 1; i < V; ++i) acc += qv[g][i] * kv[i];
            o[g * W + t0 + r] = hsum(acc) * multiplier;
          }
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t = L; t < W; ++t) o[g * W + t] = 0.0f;
    }
  }
}

template <typename T, int64_t DH>
void values_fixed(const T* probs, const T* v_cache, const int64_t* tables, const int64_t* ctx, T* out,
                  int64_t B, int64_t K, int64_t G, int64_t N, int64_t S, int64_t M, int64_t W) {
  constexpr int64_t V = DH / 16;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = ctx[b];
    for (int64_t h = 0; h < K; ++h) {
      for (int64_t g = 0; g < G; ++g) {
        const T* p = probs + ((b * K + h) * G + g) * W;
        f32x16 acc[V] = {};
        for (int64_t t0 = 0; t0 < L; t0 += S) {
          const T* rows = v_cache + (h * N + tables[b * M + t0 / S]) * S * DH;
          const int64_t n = L - t0 < S ? L - t0 : S;
          for (int64_t r = 0; r < n; ++r) {
            const float w = load(p, t0 + r);
            for (int64_t i = 0; i < V; ++i) acc[i] += w * load16(rows + r * DH + 16 * i);
          }
        }
        T* o = out + ((b * K + h) * G + g) * DH;
        for (int64_t i = 0; i < V; ++i) {
          float a[16];
          std::memcpy(a, &acc[i], 64);
          for (int64_t j = 0; j < 16; ++j) store(o, 16 * i + j, a[j]);
        }
      }
    }
  }
}

template <typename T>
void logits_any(const T* q, const T* k_cache, const int64_t* tables, const int64_t* ctx, float* out,
                int64_t B, int64_t K, int64_t G, int64_t Dh, int64_t N, int64_t S, int64_t M, int64_t W,
                float multiplier) {
  if (G <= kMaxGroups && Dh == 128)
    logits_fixed<T, 128>(q, k_cache, tables, ctx, out, B, K, G, N, S, M, W, multiplier);
  else if (G <= kMaxGroups && Dh == 64)
    logits_fixed<T, 64>(q, k_cache, tables, ctx, out, B, K, G, N, S, M, W, multiplier);
  else
    logits(q, k_cache, tables, ctx, out, B, K, G, Dh, N, S, M, W, multiplier);
}

template <typename T>
void values_any(const T* probs, const T* v_cache, const int64_t* tables, const int64_t* ctx, T* out,
                int64_t B, int64_t K, int64_t G, int64_t Dh, int64_t N, int64_t S, int64_t M, int64_t W) {
  if (Dh == 128)
    values_fixed<T, 128>(probs, v_cache, tables, ctx, out, B, K, G, N, S, M, W);
  else if (Dh == 64)
    values_fixed<T, 64>(probs, v_cache, tables, ctx, out, B, K, G, N, S, M, W);
  else
    weighted_values(probs, v_cache, tables, ctx, out, B, K, G, Dh, N, S, M, W);
}

}  // namespace

extern "C" {

int64_t decode_attention_max_row() { return kMaxRow; }

// dtype: 0 float32, 1 bfloat16 (q, caches, probs and out share it).
void decode_attention_logits(int dtype, const void* q, const void* k_cache, const int64_t* tables,
                             const int64_t* ctx, float* out, int64_t B, int64_t K, int64_t G, int64_t Dh,
                             int64_t N, int64_t S, int64_t M, int64_t W, float multiplier) {
  if (dtype == 0)
    logits_any(static_cast<const float*>(q), static_cast<const float*>(k_cache), tables, ctx, out, B, K, G, Dh,
           N, S, M, W, multiplier);
  else
    logits_any(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k_cache), tables, ctx, out, B, K,
           G, Dh, N, S, M, W, multiplier);
}

void decode_attention_values(int dtype, const void* probs, const void* v_cache, const int64_t* tables,
                             const int64_t* ctx, void* out, int64_t B, int64_t K, int64_t G, int64_t Dh,
                             int64_t N, int64_t S, int64_t M, int64_t W) {
  if (dtype == 0)
    values_any(static_cast<const float*>(probs), static_cast<const float*>(v_cache), tables, ctx,
                    static_cast<float*>(out), B, K, G, Dh, N, S, M, W);
  else
    values_any(static_cast<const uint16_t*>(probs), static_cast<const uint16_t*>(v_cache), tables, ctx,
                    static_cast<uint16_t*>(out), B, K, G, Dh, N, S, M, W);
}

}  // extern "C"
