/* Single-core fp32 FMA peak of the CPU, the hardware floor certify_throughput.py --peak compares with.
 * Ten independent FMA chains hide the FMA latency, so the loop runs at the core's FMA throughput. Built with
 * -march=native it uses 16-wide AVX-512 FMAs where the CPU has them (oneDNN uses them too), else 8-wide AVX2.
 * Usage: cc -O2 -march=native fma_peak.c -o fma_peak && ./fma_peak [seconds]
 *        -> "<GFLOP/s> GFLOP/s (avx512|avx2, checksum ...)" */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifdef __AVX512F__
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMADD _mm512_fmadd_ps
#define STORE _mm512_storeu_ps
#define ISA "avx512"
#else
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMADD _mm256_fmadd_ps
#define STORE _mm256_storeu_ps
#define ISA "avx2"
#endif

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char **argv) {
  double seconds = argc > 1 ? atof(argv[1]) : 1.0;
  vec acc[10];
  const vec b = SET1(0.999999f), c = SET1(1e-7f);
  for (int i = 0; i < 10; i++) acc[i] = SET1((float)i);
  long iters = 0, chunk = 1000000;
  double t0 = now(), t1;
  do {
    for (long k = 0; k < chunk; k++) {
#pragma GCC unroll 10
      for (int i = 0; i < 10; i++) acc[i] = FMADD(acc[i], b, c);
    }
    iters += chunk;
    t1 = now();
  } while (t1 - t0 < seconds);
  float sum = 0, out[LANES];
  for (int i = 0; i < 10; i++) {
    STORE(out, acc[i]);
    sum += out[0];
  }
  /* 10 chains x LANES lanes x 2 flops (multiply + add) per iteration */
  printf("%.2f GFLOP/s (%s, checksum %g)\n", iters * 10.0 * LANES * 2 / (t1 - t0) / 1e9, ISA, sum);
  return 0;
}
