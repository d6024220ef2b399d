/* y = x @ W^T for float32 weights W that are block-encoded: every weight read back exactly from a small code.

   Built on first use by restspec.decode.blocks with the machine's C compiler (-O3 -march=native) and
   linked to the OpenMP runtime torch already loaded, so its threads are torch's.

   Two encodings, both over blocks of 32 consecutive inputs of one output row (the blocks of GGUF's Q4_1
   and Q8_0, kept as the float32 weights they load as):
     affine 4-bit: w = d * q + m, q in 0..15 (d has at most 11 significant bits, so d * q is exact and
                   the one rounding of + m is the weight's own);
     scaled 8-bit: w = d * q, q in -128..127 (d * q exact).
   Layout: output rows in groups of 16 (one vector lane each). Per group, codes by input k:
   4-bit: byte [k/2][lane], low nibble for even k, high for odd k; 8-bit: byte [k][lane].
   Scales per group and block: d[b][lane], m[b][lane]. x is R x K, y is R x N (row-major, contiguous). */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

#define ROWS 16 /* input rows per tile: the accumulators stay in registers */

/* 16 bytes as 16 int32: NAME(p), zero-extended (u8) or sign-extended (i8). */
#if defined(__AVX512F__)
#define DEFINE_WIDEN(NAME, TYPE, EXT)                                                                   \
    static inline v16i NAME(const TYPE *p) {                                                            \
        return (v16i)_mm512_cvt##EXT##_epi32(_mm_loadu_si128((const __m128i *)p));                       \
    }
#elif defined(__AVX2__)
#define DEFINE_WIDEN(NAME, TYPE, EXT)                                                                   \
    static inline v16i NAME(const TYPE *p) {                                                            \
        __m128i b = _mm_loadu_si128((const __m128i *)p);                                                \
        __m256i lo = _mm256_cvt##EXT##_epi32(b), hi = _mm256_cvt##EXT##_epi32(_mm_srli_si128(b, 8));    \
        v16i r;                                                                                         \
        memcpy(&r, &lo, 32);                                                                            \
        memcpy((char *)&r + 32, &hi, 32);                                                               \
        return r;                                                                                       \
    }
#else
#define DEFINE_WIDEN(NAME, TYPE, EXT)                                                                   \
    static inline v16i NAME(const TYPE *p) {                                                            \
        v16i r;                                                                                         \
        for (int i = 0; i < 16; i++) r[i] = p[i];                                                       \
        return r;                                                                                       \
    }
#endif
DEFINE_WIDEN(widen_u8, uint8_t, epu8)
DEFINE_WIDEN(widen_i8, int8_t, epi8)

/* The weights of inputs k and k + 1 (k even) of one group's 16 rows. */
static inline void weights_q4(const uint8_t *q, int k, v16f d, v16f m, v16f *w0, v16f *w1) {
    v16i codes = widen_u8(q + (size_t)k * 8);
    *w0 = d * __builtin_convertvector(codes & 15, v16f) + m;
    *w1 = d * __builtin_convertvector(codes >> 4, v16f) + m;
}

static inline void weights_q8(const uint8_t *q, int k, v16f d, v16f m, v16f *w0, v16f *w1) {
    (void)m;
    *w0 = d * __builtin_convertvector(widen_i8((const int8_t *)q + (size_t)k * 16), v16f);
    *w1 = d * __builtin_convertvector(widen_i8((const int8_t *)q + (size_t)(k + 1) * 16), v16f);
}

/* T input rows times G groups of 16 output rows: y[r][16 g + lane] for r < T, g < G. */
#define DEFINE_TILE(FMT, BYTES, T, G)                                                                   \
    static void tile_##FMT##_##T##_##G(const float *x, int K, const uint8_t *q, const float *d,           \
                                       const float *m, float *y, int N) {                               \
        v16f acc[T][G];                                                                                 \
        size_t q_group = (size_t)K * BYTES, s_group = (size_t)K / 2;                                    \
        for (int r = 0; r < T; r++)                                                                     \
            for (int g = 0; g < G; g++) acc[r][g] = (v16f){0};                                          \
        for (int b = 0; b < K / 32; b++) {                                                              \
            v16f db[G], mb[G];                                                                          \
            for (int g = 0; g < G; g++) {                                                               \
                memcpy(&db[g], d + g * s_group + b * 16, 64);                                           \
                if (m) memcpy(&mb[g], m + g * s_group + b * 16, 64);                                    \
                else mb[g] = (v16f){0};                                                                 \
            }                                                                                           \
            for (int k = b * 32; k < b * 32 + 32; k += 2)                                               \
                for (int g = 0; g < G; g++) {                                                           \
                    v16f w0, w1;                                                                        \
                    weights_##FMT(q + g * q_group, k, db[g], mb[g], &w0, &w1);                           \
                    for (int r = 0; r < T; r++)                                                         \
                        acc[r][g] += x[(size_t)r * K + k] * w0 + x[(size_t)r * K + k + 1] * w1;          \
                }                                                                                       \
        }                                                                                               \
        for (int r = 0; r < T; r++)                                                                     \
            for (int g = 0; g < G; g++) memcpy(y + (size_t)r * N + g * 16, &acc[r][g], 64);             \
    }

typedef void (*tile_fn)(const float *, int, const uint8_t *, const float *, const float *, float *, int);

/* Tiles of 1..ROWS input rows: 4 groups at a time up to 4 rows, 2 up to 8, 1 beyond (registers:
   rows x groups accumulators); tiles of one group serve the groups left over. */
#define GROUPS(rows) ((rows) <= 4 ? 4 : (rows) <= 8 ? 2 : 1)
#define DEFINE_FORMAT(FMT, BYTES)                                                                       \
    DEFINE_TILE(FMT, BYTES, 1, 4) DEFINE_TILE(FMT, BYTES, 2, 4) DEFINE_TILE(FMT, BYTES, 3, 4)           \
    DEFINE_TILE(FMT, BYTES, 4, 4) DEFINE_TILE(FMT, BYTES, 5, 2) DEFINE_TILE(FMT, BYTES, 6, 2)           \
    DEFINE_TILE(FMT, BYTES, 7, 2) DEFINE_TILE(FMT, BYTES, 8, 2)                                         \
    DEFINE_TILE(FMT, BYTES, 1, 1) DEFINE_TILE(FMT, BYTES, 2, 1) DEFINE_TILE(FMT, BYTES, 3, 1)           \
    DEFINE_TILE(FMT, BYTES, 4, 1) DEFINE_TILE(FMT, BYTES, 5, 1) DEFINE_TILE(FMT, BYTES, 6, 1)           \
    DEFINE_TILE(FMT, BYTES, 7, 1) DEFINE_TILE(FMT, BYTES, 8, 1) DEFINE_TILE(FMT, BYTES, 9, 1)           \
    DEFINE_TILE(FMT, BYTES, 10, 1) DEFINE_TILE(FMT, BYTES, 11, 1) DEFINE_TILE(FMT, BYTES, 12, 1)        \
    DEFINE_TILE(FMT, BYTES, 13, 1) DEFINE_TILE(FMT, BYTES, 14, 1) DEFINE_TILE(FMT, BYTES, 15, 1)        \
    DEFINE_TILE(FMT, BYTES, 16, 1)                                                                      \
    static const tile_fn wide_##FMT[ROWS + 1] = {0,                                                    \
        tile_##FMT##_1_4, tile_##FMT##_2_4, tile_##FMT##_3_4, tile_##FMT##_4_4,                         \
        tile_##FMT##_5_2, tile_##FMT##_6_2, tile_##FMT##_7_2, tile_##FMT##_8_2,                         \
        tile_##FMT##_9_1, tile_##FMT##_10_1, tile_##FMT##_11_1, tile_##FMT##_12_1,                      \
        tile_##FMT##_13_1, tile_##FMT##_14_1, tile_##FMT##_15_1, tile_##FMT##_16_1};                    \
    static const tile_fn one_##FMT[ROWS + 1] = {0,                                                     \
        tile_##FMT##_1_1, tile_##FMT##_2_1, tile_##FMT##_3_1, tile_##FMT##_4_1,                         \
        tile_##FMT##_5_1, tile_##FMT##_6_1, tile_##FMT##_7_1, tile_##FMT##_8_1,                         \
        tile_##FMT##_9_1, tile_##FMT##_10_1, tile_##FMT##_11_1, tile_##FMT##_12_1,                      \
        tile_##FMT##_13_1, tile_##FMT##_14_1, tile_##FMT##_15_1, tile_##FMT##_16_1};

DEFINE_FORMAT(q4, 8)
DEFINE_FORMAT(q8, 16)

static void linear(const tile_fn *wide, const tile_fn *one, size_t bytes, const float *x, int R, int K,
                   const uint8_t *q, const float *d, const float *m, float *y, int N, int threads) {
    /* work items: runs of G groups (G of the first row tile's width), then the single groups left */
    int groups = N / 16, G = GROUPS(R < ROWS ? R : ROWS), runs = groups / G, items = runs + groups % G;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int i = 0; i < items; i++) {
        int first = i < runs ? i * G : runs * G + (i - runs), count = i < runs ? G : 1;
        for (int r0 = 0; r0 < R; r0 += ROWS) {
            int rows = R - r0 < ROWS ? R - r0 : ROWS;
            int fits = GROUPS(rows) == count; /* one tile over the item's groups, else one group at a time */
            for (int g = first; g < first + count; g += fits ? count : 1)
                (fits ? wide : one)[rows](x + (size_t)r0 * K, K, q + (size_t)g * K * bytes,
                                                   d + (size_t)g * (K / 2), m ? m + (size_t)g * (K / 2) : 0,
                                                   y + (size_t)r0 * N + (size_t)g * 16, N);
        }
    }
}

void restspec_q4_linear(const float *x, int R, int K, const uint8_t *q, const float *d, const float *m,
                        float *y, int N, int threads) {
    linear(wide_q4, one_q4, 8, x, R, K, q, d, m, y, N, threads);
}

void restspec_q8_linear(const float *x, int R, int K, const uint8_t *q, const float *d, float *y, int N,
                        int threads) {
    linear(wide_q8, one_q8, 16, x, R, K, q, d, 0, y, N, threads);
}
