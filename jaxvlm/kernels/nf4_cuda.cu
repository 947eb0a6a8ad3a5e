// EXPERIMENT (issue 19): a native CUDA one-row NF4 product behind XLA's FFI, to measure what a kernel outside
// Pallas buys for batch-1 decode. y[n] = sum_k x[k] * NF4[code(n, k)] * absmax(n, k / 64), bitsandbytes' layout
// (row-major codes, the even element in a byte's high nibble, double-quantized absmax).
//
// Per weight pair (one code byte): one shared-memory load of both values from a 256-entry pair table (16 copies,
// one per lane of a half-warp, so the loads are free of bank conflicts), two FMAs with x (float32, read through
// L1). The block's absmax is applied once per 32 weights. A team of T lanes shares each row's K range (chunks of
// 16 bytes), each team takes R rows, and each lane has U chunks a row in flight. Persistent grid.
#include <cstdint>
#include <cuda_bf16.h>
#ifndef NF4_DEVICE_ONLY
#include <cuda_runtime.h>
#endif

namespace nf4g {

__constant__ float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

constexpr int kThreads = 256;

// Both values of a code byte from the pair table: a 32-bit shared-memory address, one 64-bit load.
__device__ __forceinline__ float2 lds2(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(addr));
  return v;
}

// Block: 8 warps = (8 / S) row groups x S slices of K. A team of T lanes shares a row's K slice (16-byte chunks of
// 32 codes, lane tl takes chunks tl, tl + T, ...; U chunks a row in flight), a team takes R rows and reads x once for
// them. x is staged in shared memory as float4 quads transposed, xs4[q * chunks + c] = x[32 c + 4 q, +4), so that the
// lanes of a team read consecutive addresses. The slices' sums meet in shared memory. Persistent over row tiles, the
// next step's codes loaded before this step's arithmetic (the first step's before the tables are built).
template <int T, int R, int U, int S, int MINB>
__global__ void __launch_bounds__(kThreads, MINB) gemv(const __nv_bfloat16* __restrict__ x,
                                                       const uint4* __restrict__ codes,
                                                       const uint8_t* __restrict__ acode,
                                                       const float* __restrict__ nested,
                                                       const float* __restrict__ table8,
                                                       const float* __restrict__ offset,
                                                       __nv_bfloat16* __restrict__ y, int n, int k) {
  extern __shared__ float4 xs4[];
  __shared__ float2 lut[256 * 16];
  __shared__ float t8[256];
  constexpr int kWarps = kThreads / 32, kRowsPerWarp = (32 / T) * R, kRowsPerTile = (kWarps / S) * kRowsPerWarp;
  __shared__ float part[S > 1 ? kWarps * kRowsPerWarp : 1];
  const int chunks = k >> 5;       // 16-byte chunks (32 codes) a row
  const int blocks_row = k >> 6;   // 64-blocks a row
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tl = lane % T, slice = warp % S, group = warp / S;
  const int per_slice = (chunks + S - 1) / S;
  const int c_begin = slice * per_slice, c_end = min(chunks, c_begin + per_slice);
  const int iters = (per_slice + T * U - 1) / (T * U);  // the same for every lane of the block
  const int tiles = (n + kRowsPerTile - 1) / kRowsPerTile;
  const int rowoff = group * kRowsPerWarp + (lane / T) * R;

  uint4 q[U][R], qn[U][R];
  uint32_t a[U][R], an[U][R];
  float g[U][R], gn[U][R];  // the block's nested absmax
  auto load = [&](uint4(&qq)[U][R], uint32_t(&aa)[U][R], float(&gg)[U][R], int tile, int it) {
    const int row0 = tile * kRowsPerTile + rowoff, c0 = c_begin + tl + it * T * U;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * T;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = row0 + r;
        const bool ok = tile < tiles && c < c_end && row < n;
        const size_t blk = (size_t)row * blocks_row + (c >> 1);
        qq[u][r] = ok ? __ldg(codes + (size_t)row * chunks + c) : make_uint4(0u, 0u, 0u, 0u);
        aa[u][r] = ok ? acode[blk] : 0u;
        gg[u][r] = ok ? __ldg(nested + (blk >> 8)) : 0.f;
      }
    }
  };
  int tile = blockIdx.x, it = 0;
  load(q, a, g, tile, 0);  // in flight while the tables are built
  const float off = __ldg(offset);
  const float t8v = table8[threadIdx.x];  // kThreads == 256
  const int xstride = chunks + 1;  // padded: the transposing stores spread over the banks

  for (int i = threadIdx.x; i < 256 * 16; i += kThreads) {
    const int e = i >> 4;
    lut[i] = make_float2(kNF4[e >> 4], kNF4[e & 15]);
  }
  t8[threadIdx.x] = t8v;
#pragma unroll 4
  for (int i = threadIdx.x; i < 8 * chunks; i += kThreads) {  // x[4i, +4): chunk i / 8, quad i % 8
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(x) + i);
    xs4[(i & 7) * xstride + (i >> 3)] = make_float4(__uint_as_float(raw.x << 16), __uint_as_float(raw.x & 0xFFFF0000u),
                                                   __uint_as_float(raw.y << 16), __uint_as_float(raw.y & 0xFFFF0000u));
  }
  __syncthreads();
  const uint32_t lut_l = (uint32_t)__cvta_generic_to_shared(lut) + (lane & 15) * 8;  // entry e at + e << 7
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;

  while (tile < tiles) {  // block-uniform
    int ntile = tile, nit = it + 1;
    if (nit == iters) {
      nit = 0;
      ntile += gridDim.x;
    }
    load(qn, an, gn, ntile, nit);
    const int row0 = tile * kRowsPerTile + rowoff, c0 = c_begin + tl + it * T * U;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * T;
      if (c < c_end) {
        float xv[32];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float4 t = xs4[j * xstride + c];
          xv[4 * j] = t.x;
          xv[4 * j + 1] = t.y;
          xv[4 * j + 2] = t.z;
          xv[4 * j + 3] = t.w;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int row = row0 + r;
          if (row < n) {
            // bitsandbytes' absmax: table8[code] * nested, rounded, + offset (no fused multiply-add)
            const float scale = __fadd_rn(__fmul_rn(t8[a[u][r]], g[u][r]), off);
            const uint32_t words[4] = {q[u][r].x, q[u][r].y, q[u][r].z, q[u][r].w};
            float s = 0.f;
#pragma unroll
            for (int wd = 0; wd < 4; ++wd) {
#pragma unroll
              for (int b = 0; b < 4; ++b) {
                const uint32_t w = words[wd];
                const uint32_t at = (b == 0 ? w << 7 : w >> (8 * b - 7)) & 0x7F80u;  // byte b, times 128
                const float2 v = lds2(lut_l + at);
                const int e = wd * 8 + b * 2;
                s = fmaf(v.x, xv[e], s);
                s = fmaf(v.y, xv[e + 1], s);
              }
            }
            acc[r] = fmaf(s, scale, acc[r]);
          }
        }
      }
    }
    if (nit == 0) {  // the tile is done
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int o = T / 2; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
      }
      if constexpr (S == 1) {
        if (tl == 0) {
#pragma unroll
          for (int r = 0; r < R; ++r)
            if (row0 + r < n) y[row0 + r] = __float2bfloat16(acc[r]);
        }
      } else {
        if (tl == 0) {
#pragma unroll
          for (int r = 0; r < R; ++r) part[warp * kRowsPerWarp + (lane / T) * R + r] = acc[r];
        }
        __syncthreads();
        if (slice == 0 && tl == 0) {
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float t = 0.f;
            for (int sl = 0; sl < S; ++sl) t += part[(warp + sl) * kRowsPerWarp + (lane / T) * R + r];
            if (row0 + r < n) y[row0 + r] = __float2bfloat16(t);
          }
        }
        __syncthreads();
      }
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = 0.f;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        q[u][r] = qn[u][r];
        a[u][r] = an[u][r];
        g[u][r] = gn[u][r];
      }
    }
    tile = ntile;
    it = nit;
  }
}

}  // namespace nf4g

#ifndef NF4_DEVICE_ONLY
#include "xla/ffi/api/ffi.h"

namespace nf4g {
namespace ffi = xla::ffi;

template <int T, int R, int U, int S, int MINB>
static cudaError_t launch(cudaStream_t stream, const __nv_bfloat16* x, const uint8_t* codes, const uint8_t* acode,
                          const float* nested, const float* table8, const float* offset, __nv_bfloat16* y, int n,
                          int k) {
  static int sms = 0;
  if (!sms) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cudaFuncSetAttribute(reinterpret_cast<const void*>(&gemv<T, R, U, S, MINB>), cudaFuncAttributeMaxDynamicSharedMemorySize, 160 * 1024);
  }
  const size_t dyn = (size_t)(k / 32 + 1) * 8 * sizeof(float4);
  int per_sm = 1;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemv<T, R, U, S, MINB>, kThreads, dyn);
  if (per_sm < 1) per_sm = 1;
  constexpr int rows_per_tile = (kThreads / 32 / S) * (32 / T) * R;
  int grid = (n + rows_per_tile - 1) / rows_per_tile;
  if (grid > per_sm * sms) grid = per_sm * sms;
  gemv<T, R, U, S, MINB><<<grid, kThreads, dyn, stream>>>(x, reinterpret_cast<const uint4*>(codes), acode, nested, table8,
                                                     offset, y, n, k);
  return cudaGetLastError();
}

// config: which (T, R, U) instance; see CONFIGS in nf4_cuda.py (same order).
static ffi::Error Impl(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U8> codes,
                       ffi::Buffer<ffi::U8> absmax, ffi::Buffer<ffi::F32> nested, ffi::Buffer<ffi::F32> table8,
                       ffi::Buffer<ffi::F32> offset, ffi::ResultBuffer<ffi::BF16> y, int64_t layer, int64_t n,
                       int64_t k, int64_t config) {
  if (k % 64 != 0) return ffi::Error::InvalidArgument("nf4_gemv: K must be a multiple of 64");
  const size_t code_bytes = (size_t)n * k / 2, blocks = (size_t)n * k / 64;
  const size_t groups = nested.element_count() / (codes.element_count() / code_bytes);
  const uint8_t* c = codes.typed_data() + layer * code_bytes;
  const uint8_t* a = absmax.typed_data() + layer * blocks;
  const float* g = nested.typed_data() + layer * groups;
  const float* t = table8.typed_data() + layer * 256;
  const float* o = offset.typed_data() + layer;
  auto* out = reinterpret_cast<__nv_bfloat16*>(y->typed_data());
  const auto* xs = reinterpret_cast<const __nv_bfloat16*>(x.typed_data());
  const int ni = (int)n, ki = (int)k;
  cudaError_t err;
  switch (config) {
    case 0: err = launch<16,2,3,1,2>(stream, xs, c, a, g, t, o, out, ni, ki); break;
    case 1: err = launch<16,2,2,1,3>(stream, xs, c, a, g, t, o, out, ni, ki); break;
    case 2: err = launch<16,1,3,1,4>(stream, xs, c, a, g, t, o, out, ni, ki); break;
    case 3: err = launch<16,1,3,2,4>(stream, xs, c, a, g, t, o, out, ni, ki); break;
    case 4: err = launch<8,2,3,2,2>(stream, xs, c, a, g, t, o, out, ni, ki); break;
    case 5: err = launch<32,2,3,2,2>(stream, xs, c, a, g, t, o, out, ni, ki); break;
    case 6: err = launch<8,2,3,4,2>(stream, xs, c, a, g, t, o, out, ni, ki); break;
    case 7: err = launch<16,2,3,4,2>(stream, xs, c, a, g, t, o, out, ni, ki); break;
    case 8: err = launch<4,2,3,4,2>(stream, xs, c, a, g, t, o, out, ni, ki); break;
    case 9: err = launch<8,1,3,8,3>(stream, xs, c, a, g, t, o, out, ni, ki); break;
    case 10: err = launch<2,1,3,8,3>(stream, xs, c, a, g, t, o, out, ni, ki); break;
    case 11: err = launch<16,1,2,1,4>(stream, xs, c, a, g, t, o, out, ni, ki); break;
    default: return ffi::Error::InvalidArgument("nf4_gemv: unknown config");
  }
  if (err != cudaSuccess) return ffi::Error::Internal(cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace nf4g

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxvlmNf4Gemv, nf4g::Impl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::BF16>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::BF16>>()
                                  .Attr<int64_t>("layer")
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("config"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
#endif
