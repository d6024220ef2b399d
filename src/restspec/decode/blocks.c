/* y = x @ W^T for float32 weights W that are block-encoded: every weight read back exactly from a small code.

   Built on first use by restspec.decode.blocks with the machine's C compiler (-O3 -march=native) and
   linked to the OpenMP runtime torch already loaded, so its threads are torch's.

   Three formats over blocks of consecutive inputs of one output row (the blocks of GGUF's quantized
   types, kept as the float32 weights they load as), and two of weights alone:
     q4:    affine 4-bit, blocks of 32: w = d * q + m, q in 0..15 (d has at most 17 significant bits, so
            d * q is exact and the one rounding of + m is the weight's own): Q4_1, Q4_K;
     q8:    scaled 8-bit, blocks of 32: w = d * q, q in -128..127 (rounded as the loader rounded it):
            Q8_0, Q4_0, Q5_0;
     q8x16: scaled 8-bit, blocks of 16: Q6_K, Q3_K;
     bf16:  the weight's upper 16 bits (its lower 16 are 0: a bfloat16 checkpoint loaded in float32), no
            scales; its products are summed by blocks of 32 too;
     f16:   the weight as a float16 (it is one: a float16 checkpoint loaded in float32), likewise.
   A block's products are summed over its codes first: y += d * sum(x * q) + m * sum(x), so the weights
   are never formed (a scale per block instead of a multiply-add per weight); sum(x) per row and block
   is computed once per call (block_sums).
   Layout: output rows in groups of 16 (a lane each: one vector of 16 floats with AVX-512, two of 8
   with AVX2). Per group, codes by input k:
   4-bit: byte [k/2][lane], low nibble for even k, high for odd k; 8-bit: byte [k][lane]; bf16, f16:
   uint16 [k][lane].
   Scales per group and block b: d[b][lane], m[b][lane]. x is R x K, y is R x N (row-major, contiguous). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(_OPENMP)
#include <omp.h>
#define THREAD() omp_get_thread_num()
#else
#define THREAD() 0
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* AVX512_TILES: AVX-512's vectors and tiles; RESTSPEC_WIDE_VECTORS (defined by the tests) gives them to
   any CPU through the compiler's generic vectors, so that machines without AVX-512 test their logic. */
#if defined(__AVX512F__) || defined(RESTSPEC_WIDE_VECTORS)
#define AVX512_TILES 1
#endif

#define LANES 16 /* output rows per group */
#if defined(AVX512_TILES)
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
#elif defined(__AVX2__) && !defined(AVX512_TILES)
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

/* WIDTH uint16 as WIDTH int32, zero-extended */
static inline vi widen_u16(const uint16_t *p) {
#if defined(__AVX512F__)
    return (vi)_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__AVX2__) && !defined(AVX512_TILES)
    return (vi)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
#else
    vi r;
    for (int i = 0; i < WIDTH; i++) r[i] = p[i];
    return r;
#endif
}

/* The codes of inputs k and k + 1 (k even) of one group's lanes part * WIDTH.. (part + 1) * WIDTH - 1, as
   floats. */
#define q4_CODES codes_q4
#define q4_BYTES 8 /* code bytes per input and group */
#define q4_BLOCK 32
#define q8_CODES codes_q8
#define q8_BYTES 16
#define q8_BLOCK 32
#define q8x16_CODES codes_q8
#define q8x16_BYTES 16
#define q8x16_BLOCK 16
#define bf16_CODES codes_bf16
#define bf16_BYTES 32
#define bf16_BLOCK 32
#define f16_CODES codes_f16
#define f16_BYTES 32
#define f16_BLOCK 32
/* whether a format's blocks have scales d (w = d * q [+ m]) */
#define q4_SCALED 1
#define q8_SCALED 1
#define q8x16_SCALED 1
#define bf16_SCALED 0
#define f16_SCALED 0
static inline void codes_q4(const uint8_t *q, int k, int part, vf *w0, vf *w1) {
    vi codes = widen_u8(q + (size_t)k * 8 + part * WIDTH);
    *w0 = __builtin_convertvector(codes & 15, vf);
    *w1 = __builtin_convertvector(codes >> 4, vf);
}

static inline vf bf16_floats(const uint8_t *q, size_t at) {
    vi bits = widen_u16((const uint16_t *)q + at) << 16;
    vf w;
    memcpy(&w, &bits, sizeof w);
    return w;
}

/* a float16 (bits h) as a float32, exactly */
static inline float f16_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 31, mantissa = h & 1023, bits;
    if (exponent == 31) /* infinities and NaNs */
        bits = sign | 0x7f800000u | mantissa << 13;
    else if (exponent) /* normal */
        bits = sign | (exponent + 112) << 23 | mantissa << 13;
    else if (!mantissa) /* zero */
        bits = sign;
    else { /* subnormal: normalized */
        uint32_t e = 113;
        for (; !(mantissa & 1024); e--) mantissa <<= 1;
        bits = sign | e << 23 | (mantissa & 1023) << 13;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline vf f16_floats(const uint8_t *q, size_t at) {
    const uint16_t *p = (const uint16_t *)q + at;
#if defined(__AVX512F__)
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__F16C__) && !defined(AVX512_TILES)
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    vf w;
    for (int i = 0; i < WIDTH; i++) w[i] = f16_float(p[i]);
    return w;
#endif
}

/* codes_FMT of a 16-bit format: inputs k and k + 1, each of WIDTH values read by FMT_floats(q, first) */
#define DEFINE_HALF_CODES(FMT)                                                                          \
    static inline void codes_##FMT(const uint8_t *q, int k, int part, vf *w0, vf *w1) {                 \
        *w0 = FMT##_floats(q, (size_t)k * 16 + part * WIDTH);                                           \
        *w1 = FMT##_floats(q, (size_t)(k + 1) * 16 + part * WIDTH);                                     \
    }
DEFINE_HALF_CODES(bf16)
DEFINE_HALF_CODES(f16)

static inline void codes_q8(const uint8_t *q, int k, int part, vf *w0, vf *w1) {
    *w0 = __builtin_convertvector(widen_i8((const int8_t *)q + (size_t)k * 16 + part * WIDTH), vf);
    *w1 = __builtin_convertvector(widen_i8((const int8_t *)q + (size_t)(k + 1) * 16 + part * WIDTH), vf);
}

/* a * b + c, rounded once: explicit where the vector unit has it, so that the compiler's choice of where to
   fuse cannot differ between the tiles (a row's outputs must not depend on the tile that computed it) */
static inline vf fmadd(vf a, vf b, vf c) {
#if defined(__AVX512F__) && WIDTH == 16
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__) && WIDTH == 8
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#elif defined(__FP_FAST_FMAF) /* other vectors (the tests' wide ones): lane by lane, vectorized by the compiler */
    vf r;
    for (int i = 0; i < WIDTH; i++) r[i] = __builtin_fmaf(a[i], b[i], c[i]);
    return r;
#else /* no fused multiply-add in hardware: nothing to fuse */
    return a * b + c;
#endif
}

/* v in every lane */
static inline vf splat(float v) {
#if defined(__AVX512F__) && WIDTH == 16
    return (vf)_mm512_set1_ps(v);
#elif defined(__AVX2__) && WIDTH == 8
    return (vf)_mm256_set1_ps(v);
#else
    vf r;
    for (int i = 0; i < WIDTH; i++) r[i] = v;
    return r;
#endif
}

static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* the lanes' sum, by folding halves (the same order in every use) */
static inline float hsum(vf v) {
#if WIDTH == 16
    v += __builtin_shuffle(v, (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v += __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    v += __builtin_shuffle(v, (vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    v += __builtin_shuffle(v, (vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
#else
    v += __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3});
    v += __builtin_shuffle(v, (vi){2, 3, 0, 1, 6, 7, 4, 5});
    v += __builtin_shuffle(v, (vi){1, 0, 3, 2, 5, 4, 7, 6});
#endif
    return v[0];
}

/* a row's sums (one part of its lanes) after a block: acc + d * s + m * sum. Every path ends each block of
   each row and lane with this, so a row's outputs do not depend on the path. */
static inline vf end_block(vf acc, vf s, vf d, const float *m, float sum) {
    acc = fmadd(d, s, acc);
    return m ? fmadd(load(m), splat(sum), acc) : acc;
}

/* T input rows times G groups of 16 output rows: y[r][16 g + lane] for r < T, g < G; sums: the rows'
   block_sums (read where m is given). */
#define DEFINE_TILE(FMT, T, G)                                                                          \
    static void tile_##FMT##_##T##_##G(const float *x, int K, const uint8_t *q, const float *d,           \
                                       const float *m, const float *sums, float *y, int N) {            \
        size_t q_group = (size_t)K * FMT##_BYTES, s_group = (size_t)K / FMT##_BLOCK * 16;               \
        int blocks = K / FMT##_BLOCK;                                                                   \
        vf acc[T][G][PARTS];                                                                            \
        for (int r = 0; r < T; r++)                                                                     \
            for (int g = 0; g < G; g++)                                                                 \
                for (int p = 0; p < PARTS; p++) acc[r][g][p] = (vf){0};                                 \
        for (int b = 0; b < blocks; b++) {                                                              \
            vf s[T][G][PARTS];                                                                          \
            for (int r = 0; r < T; r++)                                                                 \
                for (int g = 0; g < G; g++)                                                             \
                    for (int p = 0; p < PARTS; p++) s[r][g][p] = (vf){0};                               \
            for (int k = b * FMT##_BLOCK; k < (b + 1) * FMT##_BLOCK; k += 2)                            \
                if (G == 1) { /* rows outer: each row's two broadcasts serve both parts at once */      \
                    vf w0[PARTS], w1[PARTS];                                                            \
                    for (int p = 0; p < PARTS; p++) FMT##_CODES(q, k, p, &w0[p], &w1[p]);               \
                    for (int r = 0; r < T; r++) {                                                       \
                        vf x0 = splat(x[(size_t)r * K + k]), x1 = splat(x[(size_t)r * K + k + 1]);      \
                        for (int p = 0; p < PARTS; p++) {                                               \
                            s[r][0][p] = fmadd(x0, w0[p], s[r][0][p]);                                  \
                            s[r][0][p] = fmadd(x1, w1[p], s[r][0][p]);                                  \
                        }                                                                               \
                    }                                                                                   \
                } else { /* groups outer: each group's codes converted once for all rows */             \
                    for (int g = 0; g < G; g++)                                                         \
                        for (int p = 0; p < PARTS; p++) {                                               \
                            vf w0, w1;                                                                  \
                            FMT##_CODES(q + g * q_group, k, p, &w0, &w1);                               \
                            for (int r = 0; r < T; r++) {                                               \
                                s[r][g][p] = fmadd(splat(x[(size_t)r * K + k]), w0, s[r][g][p]);        \
                                s[r][g][p] = fmadd(splat(x[(size_t)r * K + k + 1]), w1, s[r][g][p]);    \
                            }                                                                           \
                        }                                                                               \
                }                                                                                       \
            for (int g = 0; g < G; g++)                                                                 \
                for (int p = 0; p < PARTS; p++) {                                                       \
                    size_t at = g * s_group + b * 16 + p * WIDTH;                                       \
                    vf db = FMT##_SCALED ? load(d + at) : (vf){0};                                      \
                    for (int r = 0; r < T; r++)                                                         \
                        acc[r][g][p] = FMT##_SCALED ? end_block(acc[r][g][p], s[r][g][p], db, m ? m + at : 0, \
                                                                m ? sums[(size_t)r * blocks + b] : 0)  \
                                                    : acc[r][g][p] + s[r][g][p];                        \
                }                                                                                       \
        }                                                                                               \
        for (int r = 0; r < T; r++)                                                                     \
            for (int g = 0; g < G; g++)                                                                 \
                for (int p = 0; p < PARTS; p++) store(y + (size_t)r * N + g * 16 + p * WIDTH, acc[r][g][p]); \
    }

/* More input rows than one tile above holds: a group's codes for CHUNK inputs k converted once into a
   buffer w[k][part], then every tile of up to WIDE_ROWS rows reads them from there (x packed as [k][row]
   per tile), block by block, its sums kept in y between chunks. Every row and lane still sums its
   products in the order of k and ends each block as the tiles above do: a row's outputs are bitwise the
   same at every width. */
#define DEFINE_WIDE_TILE(FMT, T)                                                                        \
    static void wide_tile_##FMT##_##T(const float *x, const vf (*w)[PARTS], int count, int b0, const float *d, \
                                      const float *m, const float *sums, int blocks, float *y, int N) { \
        vf acc[T][PARTS];                                                                               \
        for (int r = 0; r < T; r++)                                                                     \
            for (int p = 0; p < PARTS; p++) acc[r][p] = b0 ? load(y + (size_t)r * N + p * WIDTH) : (vf){0}; \
        for (int c = 0; c < count / FMT##_BLOCK; c++) {                                                 \
            vf s[T][PARTS];                                                                             \
            for (int r = 0; r < T; r++)                                                                 \
                for (int p = 0; p < PARTS; p++) s[r][p] = (vf){0};                                      \
            _Pragma("GCC unroll 4") /* measured faster than none, 8 or all */                           \
            for (int k = c * FMT##_BLOCK; k < (c + 1) * FMT##_BLOCK; k++)                               \
                for (int r = 0; r < T; r++) {                                                           \
                    vf xr = splat(x[k * T + r]);                                                        \
                    for (int p = 0; p < PARTS; p++) s[r][p] = fmadd(xr, w[k][p], s[r][p]);              \
                }                                                                                       \
            for (int p = 0; p < PARTS; p++) {                                                           \
                size_t at = (size_t)(b0 + c) * 16 + p * WIDTH;                                          \
                vf db = FMT##_SCALED ? load(d + at) : (vf){0};                                          \
                for (int r = 0; r < T; r++)                                                             \
                    acc[r][p] = FMT##_SCALED ? end_block(acc[r][p], s[r][p], db, m ? m + at : 0,        \
                                                         m ? sums[(size_t)r * blocks + b0 + c] : 0)     \
                                             : acc[r][p] + s[r][p];                                     \
            }                                                                                           \
        }                                                                                               \
        for (int r = 0; r < T; r++)                                                                     \
            for (int p = 0; p < PARTS; p++) store(y + (size_t)r * N + p * WIDTH, acc[r][p]);            \
    }

typedef void (*tile_fn)(const float *, int, const uint8_t *, const float *, const float *, const float *, float *,
                        int);
typedef void (*wide_tile_fn)(const float *, const vf (*)[PARTS], int, int, const float *, const float *,
                             const float *, int, float *, int);
typedef void (*decode_fn)(const uint8_t *, int, vf (*)[PARTS]);

/* Tiles of 1..ROWS input rows, GROUPS(rows) groups side by side (accumulators: rows x groups x PARTS
   vector registers of the 32 that AVX-512 has, 16 with AVX2), and tiles of one group for the groups left
   over. MULTI: the tiles of more than one group (X(format, rows, groups)); SINGLE: of one group. WIDE:
   the tiles over a decoded chunk, for calls of more than NARROW rows. */
#if defined(AVX512_TILES)
#define ROWS 16
#define GROUPS(rows) ((rows) <= 4 ? 4 : (rows) <= 8 ? 2 : 1)
#define MULTI(X, F) X(F, 1, 4) X(F, 2, 4) X(F, 3, 4) X(F, 4, 4) X(F, 5, 2) X(F, 6, 2) \
    X(F, 7, 2) X(F, 8, 2)
#define SINGLE(X, F) X(F, 1, 1) X(F, 2, 1) X(F, 3, 1) X(F, 4, 1) X(F, 5, 1) X(F, 6, 1) \
    X(F, 7, 1) X(F, 8, 1) X(F, 9, 1) X(F, 10, 1) X(F, 11, 1) X(F, 12, 1) X(F, 13, 1)   \
    X(F, 14, 1) X(F, 15, 1) X(F, 16, 1)
#define WIDE_ROWS 12
#define NARROW ROWS /* rows the tiles above take */
#define WIDE(X, F) X(F, 1) X(F, 2) X(F, 3) X(F, 4) X(F, 5) X(F, 6) X(F, 7) X(F, 8) X(F, 9) X(F, 10) X(F, 11) \
    X(F, 12)
#else
#define ROWS 6
#define GROUPS(rows) ((rows) <= 1 ? 4 : (rows) <= 2 ? 2 : 1) /* 3 rows in 2 groups: 24 sums, spilled */
#define MULTI(X, F) X(F, 1, 4) X(F, 2, 2)
#define SINGLE(X, F) X(F, 1, 1) X(F, 2, 1) X(F, 3, 1) X(F, 4, 1) X(F, 5, 1) X(F, 6, 1)
#define WIDE_ROWS 6
#define NARROW 12 /* rows the tiles above take, in two tiles if need be (measured faster than the wide tiles) */
#define WIDE(X, F) X(F, 1) X(F, 2) X(F, 3) X(F, 4) X(F, 5) X(F, 6)
#endif
#define CHUNK 256 /* inputs k decoded at a time for the wide tiles (16 KiB: 128 and 64 measured slower) */

#define ENTRY(F, T, G) [T] = tile_##F##_##T##_##G,
#define WIDE_ENTRY(F, T) [T] = wide_tile_##F##_##T,
/* decode_FMT: block b of one group's codes as floats, by input k of the block and part */
#define DEFINE_FORMAT(FMT)                                                                              \
    MULTI(DEFINE_TILE, FMT) SINGLE(DEFINE_TILE, FMT)                                                    \
    static const tile_fn multi_##FMT[ROWS + 1] = {MULTI(ENTRY, FMT)};                                   \
    static const tile_fn single_##FMT[ROWS + 1] = {SINGLE(ENTRY, FMT)};                                 \
    WIDE(DEFINE_WIDE_TILE, FMT)                                                                         \
    static const wide_tile_fn wide_##FMT[WIDE_ROWS + 1] = {WIDE(WIDE_ENTRY, FMT)};                      \
    static void decode_##FMT(const uint8_t *q, int b, vf (*w)[PARTS]) {                                 \
        for (int p = 0; p < PARTS; p++)                                                                 \
            for (int k = 0; k < FMT##_BLOCK; k += 2)                                                    \
                FMT##_CODES(q, b * FMT##_BLOCK + k, p, &w[k][p], &w[k + 1][p]);                         \
    }                                                                                                   \
    static const struct format format_##FMT = {multi_##FMT, single_##FMT, wide_##FMT, decode_##FMT,     \
                                               FMT##_BYTES, FMT##_BLOCK};

struct format {
    const tile_fn *multi, *single;
    const wide_tile_fn *wide;
    decode_fn decode;
    size_t bytes; /* code bytes per input and group */
    int block;
};

DEFINE_FORMAT(q4)
DEFINE_FORMAT(q8)
DEFINE_FORMAT(q8x16)
DEFINE_FORMAT(bf16)
DEFINE_FORMAT(f16)

/* floats of the work room linear() takes for R rows of K inputs (the packed rows and the block sums) */
static size_t linear_floats(int R, int K) { return (size_t)R * K + (size_t)R * (K / 16); }

/* sums[b]: the sum of the inputs of block b of one row x (what a block's offset m multiplies), by vectors */
static void block_sums(const float *x, int K, int block, float *sums) {
    for (int b = 0; b < K / block; b++) {
        const float *xb = x + (size_t)b * block;
        vf v = load(xb);
        for (int j = WIDTH; j < block; j += WIDTH) v += load(xb + j);
        sums[b] = hsum(v);
    }
}

/* y: rows of `stride` floats, the outputs in the first N; work: room for linear_floats(R, K) floats, or NULL:
   allocated here. 0, or -1 (nothing computed) where that allocation failed. */
static int linear(const struct format *f, const float *x, int R, int K, const uint8_t *q, const float *d,
                  const float *m, float *y, int N, int stride, int threads, float *work) {
    int groups = N / 16, blocks = K / f->block, scales = blocks * 16;
    size_t packed_floats = R > NARROW ? (size_t)R * K : 0, sum_floats = m ? (size_t)R * blocks : 0;
    float *room = work;
    if (!room && packed_floats + sum_floats && !(room = malloc((packed_floats + sum_floats) * sizeof(float))))
        return -1;
    float *sums = room ? room + packed_floats : 0; /* read only where m is given, which allocates it */
    /* more rows than the register tiles take: x packed by tile (tiles of WIDE_ROWS rows and one of the
       rest; even tiles measured slower), the tile of rows r0..r0 + T - 1 as [K][T] at r0 * K so that it
       reads its rows' inputs k side by side; each work item a group, its codes converted once per CHUNK
       inputs */
    if (R > NARROW) {
        float *packed = room;
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(static)
            for (int r0 = 0; r0 < R; r0 += WIDE_ROWS) {
                int T = R - r0 < WIDE_ROWS ? R - r0 : WIDE_ROWS;
                for (int r = 0; r < T; r++) {
                    for (int k = 0; k < K; k++)
                        packed[(size_t)r0 * K + (size_t)k * T + r] = x[(size_t)(r0 + r) * K + k];
                    if (m) block_sums(x + (size_t)(r0 + r) * K, K, f->block, sums + (size_t)(r0 + r) * blocks);
                }
            }
#pragma omp for schedule(static)
            for (int g = 0; g < groups; g++) {
                vf w[CHUNK][PARTS];
                for (int k0 = 0; k0 < K; k0 += CHUNK) {
                    int count = K - k0 < CHUNK ? K - k0 : CHUNK;
                    for (int b = k0 / f->block; b < (k0 + count) / f->block; b++)
                        f->decode(q + (size_t)g * K * f->bytes, b, w + (b * f->block - k0));
                    for (int r0 = 0; r0 < R; r0 += WIDE_ROWS) {
                        int T = R - r0 < WIDE_ROWS ? R - r0 : WIDE_ROWS;
                        f->wide[T](packed + (size_t)r0 * K + (size_t)k0 * T, (const vf(*)[PARTS])w, count,
                                   k0 / f->block, d ? d + (size_t)g * scales : 0, m ? m + (size_t)g * scales : 0,
                                   m ? sums + (size_t)r0 * blocks : 0, blocks,
                                   y + (size_t)r0 * stride + (size_t)g * 16, stride);
                    }
                }
            }
        }
    } else {
        /* up to NARROW rows: tiles of at most ROWS rows (as even as can be), converting the codes they
           read; work items runs of G groups (one where the rows take several tiles), then the single
           groups left */
        if (m)
            for (int r = 0; r < R; r++) block_sums(x + (size_t)r * K, K, f->block, sums + (size_t)r * blocks);
        int parts = (R + ROWS - 1) / ROWS, per = (R + parts - 1) / parts;
        int G = parts > 1 ? 1 : GROUPS(R), runs = groups / G, items = runs + groups % G;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int i = 0; i < items; i++) {
            int first = i < runs ? i * G : runs * G + (i - runs), count = i < runs ? G : 1;
            const tile_fn *tiles = count > 1 ? f->multi : f->single;
            for (int g = first; g < first + count; g += count)
                for (int r0 = 0; r0 < R; r0 += per) {
                    int rows = R - r0 < per ? R - r0 : per;
                    tiles[rows](x + (size_t)r0 * K, K, q + (size_t)g * K * f->bytes, d ? d + (size_t)g * scales : 0,
                                m ? m + (size_t)g * scales : 0, m ? sums + (size_t)r0 * blocks : 0,
                                y + (size_t)r0 * stride + (size_t)g * 16, stride);
                }
        }
    }
    if (room != work) free(room);
    return 0;
}

/* 0, or -1 where no memory was to be had */
int restspec_q4_linear(const float *x, int R, int K, const uint8_t *q, const float *d, const float *m, float *y,
                       int N, int threads) {
    return linear(&format_q4, x, R, K, q, d, m, y, N, N, threads, 0);
}

/* the format of codes without scales d (bf16, or f16 where `block` is 0), with offsets m (q4) or without, in
   blocks of `block` inputs (32 or 16) */
static const struct format *format_of(const float *d, const float *m, int block) {
    if (!d) return block ? &format_bf16 : &format_f16;
    return m ? &format_q4 : block == q8x16_BLOCK ? &format_q8x16 : &format_q8;
}

/* block: 32 (q8) or 16 (q8x16); 0, or -1 where no memory was to be had */
int restspec_q8_linear(const float *x, int R, int K, const uint8_t *q, const float *d, int block, float *y, int N,
                       int threads) {
    return linear(block == q8x16_BLOCK ? &format_q8x16 : &format_q8, x, R, K, q, d, 0, y, N, N, threads, 0);
}

/* half: 1 for bfloat16 codes, 0 for float16 ones; 0, or -1 where no memory was to be had */
int restspec_half_linear(const float *x, int R, int K, const uint8_t *q, int half, float *y, int N, int threads) {
    return linear(half ? &format_bf16 : &format_f16, x, R, K, q, 0, 0, y, N, N, threads, 0);
}

/* ---- the decoder: every layer of a Llama-family model in one call ------------------------------------

   Pre-norm blocks: x += o(attention(rope(qkv(norm(x))))), x += down(silu(gate) * up)(norm(x)), the
   linears block-encoded, for the rows of one or more requests ("segments"), each attending to its own
   key/value cache (rows [kv_heads][capacity][head_dim], the new rows written at past + i). Every row is
   computed alone, in the same order whatever rows share the call: a row's attention reads its visible
   keys in cache order, sums their weights one after another and skips keys it may not see, so a tree
   row and the same token decoded alone after compaction compute bitwise the same. */

struct linear_ref { /* block-encoded weights giving outputs offset .. offset + out - 1 of a joint output */
    const uint8_t *q;
    const float *d, *m; /* d: NULL for bf16 and f16; m: NULL but for q4 */
    const float *bias;  /* NULL: none */
    int block, in, out, offset; /* block: of the scales, 32 or 16; where d is NULL 32 (bf16) or 0 (f16) */
};

struct layer_ref { /* q/k/v (gate/up): one joint encoding, or one each where their formats differ */
    struct linear_ref qkv[3], o, gate_up[2], down;
    int qkv_parts, gate_up_parts;
    const float *in_norm, *mlp_norm;
    float in_eps, mlp_eps, scaling;
};

struct model_ref {
    int layers, hidden, q_heads, kv_heads, head_dim, inter;
    const struct layer_ref *layer;
};

struct segment_ref {
    int start, rows, past, causal; /* causal: row i sees keys 0..past + i, mask unread */
    const float *mask;             /* rows x (past + rows), additive; <= MASKED: hidden */
    float *const *keys, *const *values; /* per layer */
    const int64_t *capacity;            /* per layer: rows of the buffers */
};

#define MASKED (-1e30f)

/* the joint output (R x stride) of `parts` linears */
static void apply(const struct linear_ref *l, int parts, const float *x, int R, float *y, int stride, int threads,
                  float *work) {
    for (; parts--; l++) {
        linear(format_of(l->d, l->m, l->block), x, R, l->in, l->q, l->d, l->m, y + l->offset, l->out, stride, threads,
               work); /* with its work room: cannot fail */
        if (l->bias)
            for (int r = 0; r < R; r++)
                for (int i = 0; i < l->out; i++) y[(size_t)r * stride + l->offset + i] += l->bias[i];
    }
}

/* a where m (all bits set), else b */
static inline vf pick(vi m, vf a, vf b) {
    vi ia, ib;
    memcpy(&ia, &a, sizeof ia);
    memcpy(&ib, &b, sizeof ib);
    ia = (ia & m) | (ib & ~m);
    memcpy(&a, &ia, sizeof a);
    return a;
}

/* exp(x) lane by lane (Cephes' polynomial, within 2 ulp); 0 below -87.3 and for -inf */
static inline vf vexp(vf x) {
    const vf high = (vf){0} + 88.3762f, low = (vf){0} - 87.3365f;
    vi small = x < low;
    x = pick(x > high, high, pick(small, low, x));
    vf t = x * 1.44269504088896341f + 0.5f;
    vi n = __builtin_convertvector(t, vi);
    n += __builtin_convertvector(n, vf) > t; /* floor for negative t (a true comparison is -1) */
    vf fn = __builtin_convertvector(n, vf);
    vf r = x - fn * 0.693359375f - fn * -2.12194440e-4f;
    vf p = (vf){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    vf y = p * r * r + r + 1.0f;
    vi bits;
    memcpy(&bits, &y, sizeof bits);
    bits = (bits + (n << 23)) & ~small;
    memcpy(&y, &bits, sizeof y);
    return y;
}

/* exp(x) of one float, by the same lane arithmetic */
static inline float sexp(float x) {
    vf v = (vf){0};
    v[0] = x;
    return vexp(v)[0];
}

/* out = w * (x * 1/sqrt(mean(x^2) + eps)) over each row of D */
static void rms_norm(const float *x, int R, int D, const float *w, float eps, float *out) {
    for (int r = 0; r < R; r++) {
        const float *xr = x + (size_t)r * D;
        float *o = out + (size_t)r * D;
        vf acc = (vf){0};
        int i = 0;
        for (; i + WIDTH <= D; i += WIDTH) {
            vf v = load(xr + i);
            acc += v * v;
        }
        float s = hsum(acc);
        for (; i < D; i++) s += xr[i] * xr[i];
        float scale = 1.0f / sqrtf(s / (float)D + eps);
        for (i = 0; i < D; i++) o[i] = w[i] * (xr[i] * scale);
    }
}

/* rotary positions on the first `heads` heads of each row (stride floats apart): x * cos + rotate_half(x) * sin */
static void rope(float *x, int R, int stride, int heads, int D, const float *cos, const float *sin) {
    int half = D / 2;
    for (int r = 0; r < R; r++)
        for (int h = 0; h < heads; h++) {
            float *v = x + (size_t)r * stride + h * D, tmp[D];
            const float *c = cos + (size_t)r * D, *s = sin + (size_t)r * D;
            memcpy(tmp, v, sizeof tmp);
            for (int i = 0; i < half; i++) v[i] = tmp[i] * c[i] + -tmp[i + half] * s[i];
            for (int i = half; i < D; i++) v[i] = tmp[i] * c[i] + tmp[i - half] * s[i];
        }
}

/* Scores of WIDTH keys at once: acc[b] sums q * key b by parts, then the WIDTH sums are folded into one
   vector (lane b: key b), pairing lanes in the order hsum() does. */
#if WIDTH == 16
#define FOLDS(X)                                                                                        \
    X(((vi){0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}),                                   \
      ((vi){8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}))                             \
    X(((vi){0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}),                                 \
      ((vi){4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}))                               \
    X(((vi){0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}),                                 \
      ((vi){2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31}))                               \
    X(((vi){0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}),                                \
      ((vi){1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}))
#else
#define FOLDS(X)                                                                                        \
    X(((vi){0, 1, 2, 3, 8, 9, 10, 11}), ((vi){4, 5, 6, 7, 12, 13, 14, 15}))                             \
    X(((vi){0, 1, 4, 5, 8, 9, 12, 13}), ((vi){2, 3, 6, 7, 10, 11, 14, 15}))                             \
    X(((vi){0, 2, 4, 6, 8, 10, 12, 14}), ((vi){1, 3, 5, 7, 9, 11, 13, 15}))
#endif

static inline vf score_block(const float *q, const float *keys, int D) {
    vf acc[WIDTH];
    for (int b = 0; b < WIDTH; b++) acc[b] = (vf){0};
    for (int p = 0; p < D / WIDTH; p++) {
        vf qp = load(q + p * WIDTH);
        for (int b = 0; b < WIDTH; b++) acc[b] += qp * load(keys + (size_t)b * D + p * WIDTH);
    }
    int count = WIDTH;
#define FOLD(LO, HI)                                                                                    \
    for (int i = 0; i < count / 2; i++)                                                                 \
        acc[i] = __builtin_shuffle(acc[2 * i], acc[2 * i + 1], LO) + __builtin_shuffle(acc[2 * i], acc[2 * i + 1], HI); \
    count /= 2;
    FOLDS(FOLD)
#undef FOLD
    return acc[0];
}

/* Values of the keys `index` (count of them) weighted by each head's e (heads x stride floats, one per
   key of the list), summed in list order: parts p0 .. p0 + C - 1 of H heads' outputs (out: H x parts). */
#define DEFINE_WEIGHTED(H, C)                                                                           \
    static void weighted_##H##_##C(const float *e, size_t stride, const int *index, int count,          \
                                   const float *values, int D, int p0, vf *out, int parts) {             \
        vf acc[H][C];                                                                                   \
        for (int h = 0; h < H; h++)                                                                     \
            for (int p = 0; p < C; p++) acc[h][p] = (vf){0};                                            \
        for (int t = 0; t < count; t++) {                                                               \
            const float *v = values + (size_t)index[t] * D + p0 * WIDTH;                                \
            for (int h = 0; h < H; h++)                                                                 \
                for (int p = 0; p < C; p++) acc[h][p] += e[h * stride + t] * load(v + p * WIDTH);       \
        }                                                                                               \
        for (int h = 0; h < H; h++)                                                                     \
            for (int p = 0; p < C; p++) out[h * parts + p0 + p] = acc[h][p];                            \
    }
#define WEIGHTED_SIZES(X) X(1, 1) X(1, 2) X(1, 4) X(2, 1) X(2, 2) X(2, 4) X(3, 1) X(3, 2) X(3, 4)
WEIGHTED_SIZES(DEFINE_WEIGHTED)
typedef void (*weighted_fn)(const float *, size_t, const int *, int, const float *, int, int, vf *, int);
#define WEIGHTED_ENTRY(H, C) [H][C] = weighted_##H##_##C,
static const weighted_fn weighted[4][5] = {WEIGHTED_SIZES(WEIGHTED_ENTRY)};

/* One row's attention for the heads of one key/value head: q (heads x D, stride apart) -> out (same).
   The keys are read once for all heads: scores by blocks of WIDTH keys, each head's weights, then the
   values of the keys the row may see, in cache order. scores: heads x (visible rounded up to WIDTH)
   floats; index: visible ints. */
static void attend_row(const float *q, int stride, int heads, int D, const float *keys, const float *values,
                       int visible, const float *mask, float scaling, float *scores, int *index, float *out) {
    int parts = D / WIDTH, blocks = (visible + WIDTH - 1) / WIDTH, full = visible / WIDTH;
    vf acc[heads * parts];
    size_t room = (size_t)blocks * WIDTH;
    float tail[WIDTH * D]; /* the last block's keys, zero-padded: every key goes through score_block */
    memset(tail, 0, sizeof tail);
    memcpy(tail, keys + (size_t)full * WIDTH * D, (size_t)(visible - full * WIDTH) * D * sizeof(float));
    for (int b = 0; b < blocks; b++) {
        const float *block = b < full ? keys + (size_t)b * WIDTH * D : tail;
        for (int h = 0; h < heads; h++) store(scores + h * room + b * WIDTH, score_block(q + h * stride, block, D) * scaling);
    }
    int count = 0; /* the keys the row sees */
    for (int j = 0; j < visible; j++)
        if (!mask || mask[j] > MASKED) index[count++] = j;
    for (int h = 0; h < heads; h++) {
        float *sh = scores + h * room, top = -INFINITY;
        for (int t = 0; t < count; t++) { /* the seen keys' scores, packed in list order */
            int j = index[t];
            sh[t] = sh[j] + (mask ? mask[j] : 0.0f);
            top = sh[t] > top ? sh[t] : top;
        }
        for (int t = count; t < (int)room; t++) sh[t] = -INFINITY;
        for (int b = 0; b * WIDTH < count; b++) store(sh + b * WIDTH, vexp(load(sh + b * WIDTH) - top));
    }
    int C = parts % 4 == 0 ? 4 : parts % 2 == 0 ? 2 : 1;
    for (int h0 = 0; h0 < heads; h0 += 3) {
        int H = heads - h0 < 3 ? heads - h0 : 3;
        for (int p0 = 0; p0 < parts; p0 += C)
            weighted[H][C](scores + h0 * room, room, index, count, values, D, p0, acc + (size_t)h0 * parts, parts);
    }
    for (int h = 0; h < heads; h++) {
        float total = 0;
        for (int t = 0; t < count; t++) total += scores[h * room + t];
        for (int p = 0; p < parts; p++) store(out + h * stride + p * WIDTH, acc[h * parts + p] / total);
    }
}

/* floats of scratch one thread of attention() takes, for keys up to `most` */
static size_t attention_floats(const struct model_ref *M, int most) {
    return (size_t)M->q_heads / M->kv_heads * (most + WIDTH) + most + 1;
}

/* scratch: attention_floats(M, most) floats for each of `threads` threads */
static void attention(const struct model_ref *M, int layer, const float *qkv, int n, int segments,
                      const struct segment_ref *seg, float *out, int most, float *scratch, int threads) {
    int D = M->head_dim, group = M->q_heads / M->kv_heads, qkv_out = (M->q_heads + 2 * M->kv_heads) * D;
#pragma omp parallel num_threads(threads)
    {
        float *scores = scratch + attention_floats(M, most) * THREAD();
        int *index = (int *)(scores + (size_t)group * (most + WIDTH));
#pragma omp for schedule(dynamic)
        for (int item = 0; item < n * M->kv_heads; item++) {
            int row = item / M->kv_heads, g = item % M->kv_heads, s = 0;
            while (row >= seg[s].start + seg[s].rows) s++;
            const struct segment_ref *S = seg + s;
            int i = row - S->start, width = S->past + S->rows;
            size_t head = (size_t)g * S->capacity[layer] * D;
            int visible = S->causal ? S->past + i + 1 : width;
            const float *mask = S->causal ? 0 : S->mask + (size_t)i * width;
            attend_row(qkv + (size_t)row * qkv_out + (size_t)g * group * D, D, group, D, S->keys[layer] + head,
                       S->values[layer] + head, visible, mask, M->layer[layer].scaling, scores, index,
                       out + (size_t)row * M->q_heads * D + (size_t)g * group * D);
        }
    }
}

/* the longest key run of the segments (past + rows) */
static int longest(int segments, const struct segment_ref *seg) {
    int most = 0;
    for (int s = 0; s < segments; s++) most = seg[s].past + seg[s].rows > most ? seg[s].past + seg[s].rows : most;
    return most;
}

/* the linears' widest input */
static size_t widest_input(const struct model_ref *M) {
    size_t q_size = (size_t)M->q_heads * M->head_dim, widest = M->inter > M->hidden ? M->inter : M->hidden;
    return q_size > widest ? q_size : widest;
}

/* floats of the workspace restspec_decoder takes for these segments (n rows in all): per row the hidden
   state, q/k/v, attention's output, gate/up, the gated product and a linear's work room (linear_floats);
   then each thread's scratch for attention */
size_t restspec_decoder_floats(const struct model_ref *M, int n, int segments, const struct segment_ref *seg,
                               int threads) {
    size_t D = M->head_dim, q_size = M->q_heads * D, qkv_out = (M->q_heads + 2 * M->kv_heads) * D;
    return (size_t)n * (M->hidden + qkv_out + q_size + 3 * (size_t)M->inter) + linear_floats(n, widest_input(M)) +
           attention_floats(M, longest(segments, seg)) * threads;
}

/* x (n x hidden) through every layer; cos, sin (n x head_dim); work: restspec_decoder_floats(...) floats */
void restspec_decoder(const struct model_ref *M, float *x, int n, const float *cos, const float *sin,
                      int segments, const struct segment_ref *seg, float *work, int threads) {
    int H = M->hidden, D = M->head_dim, q_size = M->q_heads * D, kv_size = M->kv_heads * D;
    int qkv_out = q_size + 2 * kv_size, I = M->inter;
    float *h = work, *qkv = h + (size_t)n * H, *attn = qkv + (size_t)n * qkv_out;
    float *gu = attn + (size_t)n * q_size, *act = gu + (size_t)n * 2 * I, *packed = act + (size_t)n * I;
    float *scratch = packed + linear_floats(n, widest_input(M));
    int most = longest(segments, seg);
    for (int l = 0; l < M->layers; l++) {
        const struct layer_ref *L = M->layer + l;
        rms_norm(x, n, H, L->in_norm, L->in_eps, h);
        apply(L->qkv, L->qkv_parts, h, n, qkv, qkv_out, threads, packed);
        rope(qkv, n, qkv_out, M->q_heads + M->kv_heads, D, cos, sin);
        for (int s = 0; s < segments; s++) /* the new keys and values into the cache */
            for (int i = 0; i < seg[s].rows; i++)
                for (int g = 0; g < M->kv_heads; g++) {
                    size_t at = ((size_t)g * seg[s].capacity[l] + seg[s].past + i) * D;
                    const float *row = qkv + (size_t)(seg[s].start + i) * qkv_out + q_size + g * D;
                    memcpy(seg[s].keys[l] + at, row, D * sizeof(float));
                    memcpy(seg[s].values[l] + at, row + kv_size, D * sizeof(float));
                }
        attention(M, l, qkv, n, segments, seg, attn, most, scratch, threads);
        apply(&L->o, 1, attn, n, h, H, threads, packed);
        for (size_t i = 0; i < (size_t)n * H; i++) x[i] += h[i];
        rms_norm(x, n, H, L->mlp_norm, L->mlp_eps, h);
        apply(L->gate_up, L->gate_up_parts, h, n, gu, 2 * I, threads, packed);
        for (int r = 0; r < n; r++) {
            const float *gate = gu + (size_t)r * 2 * I, *up = gate + I;
            float *a = act + (size_t)r * I;
            int i = 0;
            for (; i + WIDTH <= I; i += WIDTH) {
                vf g = load(gate + i);
                store(a + i, g / (1.0f + vexp(-g)) * load(up + i));
            }
            for (; i < I; i++) a[i] = gate[i] / (1.0f + sexp(-gate[i])) * up[i];
        }
        apply(&L->down, 1, act, n, h, H, threads, packed);
        for (size_t i = 0; i < (size_t)n * H; i++) x[i] += h[i];
    }
}
