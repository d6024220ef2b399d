/* y = x @ W^T for float32 weights W that are block-encoded: every weight read back exactly from a small code.

   Built on first use by restspec.decode.blocks with the machine's C compiler (-O3 -march=native) and
   linked to the OpenMP runtime torch already loaded, so its threads are torch's.

   Three formats over blocks of consecutive inputs of one output row (the blocks of GGUF's quantized
   types, kept as the float32 weights they load as):
     q4:    affine 4-bit, blocks of 32: w = d * q + m, q in 0..15 (d has at most 17 significant bits, so
            d * q is exact and the one rounding of + m is the weight's own): Q4_1, Q4_K;
     q8:    scaled 8-bit, blocks of 32: w = d * q, q in -128..127 (rounded as the loader rounded it):
            Q8_0, Q4_0, Q5_0;
     q8x16: scaled 8-bit, blocks of 16: Q6_K, Q3_K.
   Layout: output rows in groups of 16 (a lane each: one vector of 16 floats with AVX-512, two of 8
   with AVX2). Per group, codes by input k:
   4-bit: byte [k/2][lane], low nibble for even k, high for odd k; 8-bit: byte [k][lane].
   Scales per group and block b: d[b][lane], m[b][lane]. x is R x K, y is R x N (row-major, contiguous). */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define LANES 16 /* output rows per group */
#if defined(__AVX512F__)
#define WIDTH 16 /* floats per vector register */
#else
#define WIDTH 8
#endif
#define PARTS (LANES / WIDTH) /* vectors per group */

typedef float vf __attribute__((vector_size(WIDTH * 4)));
typedef int32_t vi __attribute__((vector_size(WIDTH * 4)));

/* WIDTH bytes as WIDTH int32: NAME(p), zero-extended (u8) or sign-extended (i8). */
#if defined(__AVX512F__)
#define DEFINE_WIDEN(NAME, TYPE, EXT)                                                                   \
    static inline vi NAME(const TYPE *p) {                                                              \
        return (vi)_mm512_cvt##EXT##_epi32(_mm_loadu_si128((const __m128i *)p));                         \
    }
#elif defined(__AVX2__)
#define DEFINE_WIDEN(NAME, TYPE, EXT)                                                                   \
    static inline vi NAME(const TYPE *p) {                                                              \
        return (vi)_mm256_cvt##EXT##_epi32(_mm_loadl_epi64((const __m128i *)p));                         \
    }
#else
#define DEFINE_WIDEN(NAME, TYPE, EXT)                                                                   \
    static inline vi NAME(const TYPE *p) {                                                              \
        vi r;                                                                                           \
        for (int i = 0; i < WIDTH; i++) r[i] = p[i];                                                    \
        return r;                                                                                       \
    }
#endif
DEFINE_WIDEN(widen_u8, uint8_t, epu8)
DEFINE_WIDEN(widen_i8, int8_t, epi8)

/* The weights of inputs k and k + 1 (k even) of one group's lanes part * WIDTH.. (part + 1) * WIDTH - 1. */
#define q4_WEIGHTS weights_q4
#define q4_BYTES 8 /* code bytes per input and group */
#define q4_BLOCK 32
#define q8_WEIGHTS weights_q8
#define q8_BYTES 16
#define q8_BLOCK 32
#define q8x16_WEIGHTS weights_q8
#define q8x16_BYTES 16
#define q8x16_BLOCK 16
static inline void weights_q4(const uint8_t *q, int k, int part, vf d, vf m, vf *w0, vf *w1) {
    vi codes = widen_u8(q + (size_t)k * 8 + part * WIDTH);
    *w0 = d * __builtin_convertvector(codes & 15, vf) + m;
    *w1 = d * __builtin_convertvector(codes >> 4, vf) + m;
}

static inline void weights_q8(const uint8_t *q, int k, int part, vf d, vf m, vf *w0, vf *w1) {
    (void)m;
    *w0 = d * __builtin_convertvector(widen_i8((const int8_t *)q + (size_t)k * 16 + part * WIDTH), vf);
    *w1 = d * __builtin_convertvector(widen_i8((const int8_t *)q + (size_t)(k + 1) * 16 + part * WIDTH), vf);
}

/* T input rows times G groups of 16 output rows: y[r][16 g + lane] for r < T, g < G. */
#define DEFINE_TILE(FMT, T, G)                                                                          \
    static void tile_##FMT##_##T##_##G(const float *x, int K, const uint8_t *q, const float *d,           \
                                       const float *m, float *y, int N) {                               \
        vf acc[T][G][PARTS];                                                                            \
        size_t q_group = (size_t)K * FMT##_BYTES, s_group = (size_t)K / FMT##_BLOCK * 16;               \
        for (int r = 0; r < T; r++)                                                                     \
            for (int g = 0; g < G; g++)                                                                 \
                for (int p = 0; p < PARTS; p++) acc[r][g][p] = (vf){0};                                 \
        for (int b = 0; b < K / FMT##_BLOCK; b++) {                                                     \
            vf db[G][PARTS], mb[G][PARTS];                                                              \
            for (int g = 0; g < G; g++)                                                                 \
                for (int p = 0; p < PARTS; p++) {                                                       \
                    memcpy(&db[g][p], d + g * s_group + b * 16 + p * WIDTH, sizeof(vf));                \
                    if (m) memcpy(&mb[g][p], m + g * s_group + b * 16 + p * WIDTH, sizeof(vf));         \
                    else mb[g][p] = (vf){0};                                                            \
                }                                                                                       \
            for (int k = b * FMT##_BLOCK; k < (b + 1) * FMT##_BLOCK; k += 2)                            \
                for (int g = 0; g < G; g++)                                                             \
                    for (int p = 0; p < PARTS; p++) {                                                   \
                        vf w0, w1;                                                                      \
                        FMT##_WEIGHTS(q + g * q_group, k, p, db[g][p], mb[g][p], &w0, &w1);             \
                        for (int r = 0; r < T; r++) { /* two fused multiply-adds */                     \
                            acc[r][g][p] += x[(size_t)r * K + k] * w0;                                  \
                            acc[r][g][p] += x[(size_t)r * K + k + 1] * w1;                              \
                        }                                                                               \
                    }                                                                                   \
        }                                                                                               \
        for (int r = 0; r < T; r++)                                                                     \
            for (int g = 0; g < G; g++)                                                                 \
                for (int p = 0; p < PARTS; p++)                                                         \
                    memcpy(y + (size_t)r * N + g * 16 + p * WIDTH, &acc[r][g][p], sizeof(vf));          \
    }

typedef void (*tile_fn)(const float *, int, const uint8_t *, const float *, const float *, float *, int);

/* Tiles of 1..ROWS input rows, GROUPS(rows) groups side by side (accumulators: rows x groups x PARTS
   vector registers of the 32 that AVX-512 has, 16 with AVX2), and tiles of one group for the groups left
   over. MULTI: the tiles of more than one group (X(format, rows, groups)); SINGLE: of one group. */
#if defined(__AVX512F__)
#define ROWS 16
#define GROUPS(rows) ((rows) <= 4 ? 4 : (rows) <= 8 ? 2 : 1)
#define MULTI(X, F) X(F, 1, 4) X(F, 2, 4) X(F, 3, 4) X(F, 4, 4) X(F, 5, 2) X(F, 6, 2) \
    X(F, 7, 2) X(F, 8, 2)
#define SINGLE(X, F) X(F, 1, 1) X(F, 2, 1) X(F, 3, 1) X(F, 4, 1) X(F, 5, 1) X(F, 6, 1) \
    X(F, 7, 1) X(F, 8, 1) X(F, 9, 1) X(F, 10, 1) X(F, 11, 1) X(F, 12, 1) X(F, 13, 1)   \
    X(F, 14, 1) X(F, 15, 1) X(F, 16, 1)
#else
#define ROWS 6
#define GROUPS(rows) ((rows) <= 1 ? 4 : (rows) <= 3 ? 2 : 1)
#define MULTI(X, F) X(F, 1, 4) X(F, 2, 2) X(F, 3, 2)
#define SINGLE(X, F) X(F, 1, 1) X(F, 2, 1) X(F, 3, 1) X(F, 4, 1) X(F, 5, 1) X(F, 6, 1)
#endif
#define ENTRY(F, T, G) [T] = tile_##F##_##T##_##G,
#define DEFINE_FORMAT(FMT)                                                                              \
    MULTI(DEFINE_TILE, FMT) SINGLE(DEFINE_TILE, FMT)                                                    \
    static const tile_fn multi_##FMT[ROWS + 1] = {MULTI(ENTRY, FMT)};                                   \
    static const tile_fn single_##FMT[ROWS + 1] = {SINGLE(ENTRY, FMT)};

DEFINE_FORMAT(q4)
DEFINE_FORMAT(q8)
DEFINE_FORMAT(q8x16)

static void linear(const tile_fn *multi, const tile_fn *single, size_t bytes, int block, const float *x,
                   int R, int K, const uint8_t *q, const float *d, const float *m, float *y, int N,
                   int threads) {
    /* work items: runs of G groups (G of the first row tile's width), then the single groups left */
    int groups = N / 16, G = GROUPS(R < ROWS ? R : ROWS), runs = groups / G, items = runs + groups % G;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int i = 0; i < items; i++) {
        int first = i < runs ? i * G : runs * G + (i - runs), count = i < runs ? G : 1;
        for (int r0 = 0; r0 < R; r0 += ROWS) {
            int rows = R - r0 < ROWS ? R - r0 : ROWS;
            int fits = count > 1 && GROUPS(rows) == count; /* one tile over the item's groups */
            for (int g = first; g < first + count; g += fits ? count : 1)
                (fits ? multi : single)[rows](x + (size_t)r0 * K, K, q + (size_t)g * K * bytes,
                                                d + (size_t)g * (K / block * 16),
                                                m ? m + (size_t)g * (K / block * 16) : 0,
                                                y + (size_t)r0 * N + (size_t)g * 16, N);
        }
    }
}

void restspec_q4_linear(const float *x, int R, int K, const uint8_t *q, const float *d, const float *m,
                        float *y, int N, int threads) {
    linear(multi_q4, single_q4, q4_BYTES, q4_BLOCK, x, R, K, q, d, m, y, N, threads);
}

/* block: 32 (q8) or 16 (q8x16) */
void restspec_q8_linear(const float *x, int R, int K, const uint8_t *q, const float *d, int block, float *y,
                        int N, int threads) {
    if (block == q8x16_BLOCK)
        linear(multi_q8x16, single_q8x16, q8x16_BYTES, q8x16_BLOCK, x, R, K, q, d, 0, y, N, threads);
    else
        linear(multi_q8, single_q8, q8_BYTES, q8_BLOCK, x, R, K, q, d, 0, y, N, threads);
}
