/* Single-core fp32 FMA peak of an AVX2 CPU, the hardware floor certify_throughput.py --peak compares with.
 * Ten independent 8-wide FMA chains hide the FMA latency, so the loop runs at the core's FMA throughput.
 * Usage: cc -O2 -mavx2 -mfma fma_peak.c -o fma_peak && ./fma_peak [seconds]   -> "<GFLOP/s> GFLOP/s" */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char **argv) {
  double seconds = argc > 1 ? atof(argv[1]) : 1.0;
  __m256 acc[10];
  const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < 10; i++) acc[i] = _mm256_set1_ps((float)i);
  long iters = 0, chunk = 1000000;
  double t0 = now(), t1;
  do {
    for (long k = 0; k < chunk; k++) {
#pragma GCC unroll 10
      for (int i = 0; i < 10; i++) acc[i] = _mm256_fmadd_ps(acc[i], b, c);
    }
    iters += chunk;
    t1 = now();
  } while (t1 - t0 < seconds);
  float sum = 0, out[8];
  for (int i = 0; i < 10; i++) {
    _mm256_storeu_ps(out, acc[i]);
    sum += out[0];
  }
  /* 10 chains x 8 lanes x 2 flops (multiply + add) per iteration */
  printf("%.2f GFLOP/s (checksum %g)\n", iters * 10.0 * 8 * 2 / (t1 - t0) / 1e9, sum);
  return 0;
}
