/* cpu_common.h — element access helpers shared by the C backend files. */
#ifndef SPARGE_CPU_COMMON_H_
#define SPARGE_CPU_COMMON_H_

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../internal.h"

/* IEEE half -> float, exact (subnormals, inf, NaN included) and branch-free
 * so that loops over rows vectorize: shifting exponent and mantissa into
 * float position and multiplying by 2^112 rebiases normals and normalizes
 * subnormals in one step; inf/NaN get the all-ones exponent by a select. */
static inline float sparge_f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t em = (uint32_t)(h & 0x7fffu) << 13;
  float f;
  memcpy(&f, &em, 4);
  f *= 0x1p112f;
  uint32_t bits;
  memcpy(&bits, &f, 4);
  bits = (h & 0x7c00u) == 0x7c00u ? (em | 0x7f800000u) : bits;
  bits |= sign;
  float out;
  memcpy(&out, &bits, 4);
  return out;
}

/* float -> IEEE half, round to nearest even, overflow to inf, NaN kept. */
static inline uint16_t sparge_f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504 */
  if (ax < 0x38800000u) { /* result is subnormal or zero: value / 2^-24, RNE */
    float a;
    memcpy(&a, &ax, 4);
    float scaled = a * 16777216.0f; /* exact: power of two */
    uint32_t r = (uint32_t)nearbyintf(scaled);
    return (uint16_t)(sign | r);
  }
  uint32_t e = ((ax >> 23) - 112u) << 10;
  uint32_t m = (ax >> 13) & 0x3ffu;
  uint32_t rest = ax & 0x1fffu;
  uint32_t h = e | m;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
  return (uint16_t)(sign | h);
}

static inline float sparge_bf16_to_f32(uint16_t b) {
  uint32_t bits = (uint32_t)b << 16;
  float out;
  memcpy(&out, &bits, 4);
  return out;
}

static inline uint16_t sparge_f32_to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* quiet NaN */
  uint32_t lsb = (x >> 16) & 1u;
  x += 0x7fffu + lsb;
  return (uint16_t)(x >> 16);
}

/* Reads n contiguous elements of dtype (FLOAT32/FLOAT16/BFLOAT16) as floats,
 * multiplied by mul. */
static inline void sparge_load_row(float *dst, const void *src, int32_t dtype, int64_t n,
                                   float mul) {
  if (dtype == SPARGE_DTYPE_FLOAT32) {
    const float *s = (const float *)src;
    for (int64_t i = 0; i < n; ++i) dst[i] = s[i] * mul;
  } else if (dtype == SPARGE_DTYPE_FLOAT16) {
    const uint16_t *s = (const uint16_t *)src;
    for (int64_t i = 0; i < n; ++i) dst[i] = sparge_f16_to_f32(s[i]) * mul;
  } else {
    const uint16_t *s = (const uint16_t *)src;
    for (int64_t i = 0; i < n; ++i) dst[i] = sparge_bf16_to_f32(s[i]) * mul;
  }
}

/* Writes n floats as contiguous elements of dtype. */
static inline void sparge_store_row(void *dst, const float *src, int32_t dtype, int64_t n) {
  if (dtype == SPARGE_DTYPE_FLOAT32) {
    memcpy(dst, src, (size_t)n * sizeof(float));
  } else if (dtype == SPARGE_DTYPE_FLOAT16) {
    uint16_t *d = (uint16_t *)dst;
    for (int64_t i = 0; i < n; ++i) d[i] = sparge_f32_to_f16(src[i]);
  } else {
    uint16_t *d = (uint16_t *)dst;
    for (int64_t i = 0; i < n; ++i) d[i] = sparge_f32_to_bf16(src[i]);
  }
}

static inline size_t sparge_dtype_size(int32_t dtype) {
  switch (dtype) {
    case SPARGE_DTYPE_FLOAT32: case SPARGE_DTYPE_INT32: return 4;
    case SPARGE_DTYPE_FLOAT16: case SPARGE_DTYPE_BFLOAT16: return 2;
    case SPARGE_DTYPE_INT64: return 8;
    default: return 1;
  }
}

/* Address of element (i0, i1, i2, i3) of a tensor (unused trailing indices 0). */
static inline char *sparge_elem_ptr(const sparge_tensor_t *t, int64_t i0, int64_t i1, int64_t i2,
                                    int64_t i3) {
  int64_t off = i0 * t->strides[0];
  if (t->ndim > 1) off += i1 * t->strides[1];
  if (t->ndim > 2) off += i2 * t->strides[2];
  if (t->ndim > 3) off += i3 * t->strides[3];
  return (char *)t->data + off * (int64_t)sparge_dtype_size(t->dtype);
}

/* Reads a per-head float32 hyperparameter. */
static inline float sparge_head_param(const sparge_tensor_t *t, int64_t h) {
  return *(const float *)sparge_elem_ptr(t, h, 0, 0, 0);
}

/* Reads a bool/uint8 mask element as 0/1. */
static inline int sparge_mask_at(const sparge_tensor_t *t, int64_t i0, int64_t i1, int64_t i2,
                                 int64_t i3) {
  return *(const uint8_t *)sparge_elem_ptr(t, i0, i1, i2, i3) != 0;
}

#define SPARGE_LOG2E 1.4426950408889634f
#define SPARGE_LN2 0.6931471805599453f

#endif /* SPARGE_CPU_COMMON_H_ */
