/* Native CPU twin of kernels/moments.py's fused 8-bit moment update (built and called by kernels/native.py).

   One pass per quantization block: dequantize m (signed map) and √v (the zero-free unsigned map), Adam's moment
   update with the gradient, the normalized update N = m̂/(√v̂+eps) clamped to ±bound, requantization of both
   moments in place through the format's rounding table (format.search_table), and the numerics counters.

   Bit-identical to the PyTorch twin (functional.moment_update_8bit) on the CPUs PyTorch vectorizes for (AVX2,
   AVX-512, NEON): every operation is the twin's, in the twin's order, each rounded once to fp32. The one
   fused operation is the twin's own: ATen's add(g, alpha=1-β1) is an FMA in its vectorized CPU kernel, so m is
   fmaf(g, 1-β1, m·β1) here; addcmul (v) rounds twice, as here. The build passes -ffp-contract=off so that the
   compiler fuses nothing else, and no -ffast-math (division and square root stay correctly rounded). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_BLOCK 4096 /* kernels.quant.BLOCK_SIZE_MAX: the launcher checks the block size */
#define PARALLEL_MIN 32768 /* elements: below this one thread */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t f32_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

/* The format's rounding (format.search_table) as one 32-bit word per cell (the top 16 bits of an fp32 pattern),
   built by native.py: the cell's first code in the high half, and in the low half the low 16 bits of the
   rounding threshold inside the cell (0xFFFF if there is none; inverted in cells of negative values, whose
   patterns run opposite to their values). x's code is then the first code plus one if x's low 16 bits
   (inverted for a negative x) exceed that half: the twin's first[cell] + (threshold[cell] < x), in integer
   operations that vectorize. */
static inline uint32_t nearest_code(uint32_t bits, const uint32_t *table) {
    const uint32_t entry = table[bits >> 16], low = (bits ^ (0u - (bits >> 31))) & 0xFFFFu;
    return (entry >> 16) + (low > (entry & 0xFFFFu));
}

/* N = n_raw clamped to ±bound into out (NaN stays NaN, as torch.clamp); returns how many |N| exceeded the bound
   and raises *peak_bits to the pattern of the largest |N|. */
static inline int64_t clamp_and_count(const float *n_raw, float *out, int64_t len, float bound, uint32_t *peak_bits) {
    uint32_t peak = *peak_bits;
    int64_t hits = 0;
    for (int64_t i = 0; i < len; ++i) {
        const float x = n_raw[i], mag = fabsf(x);
        const uint32_t bits = f32_bits(mag);
        peak = bits > peak ? bits : peak;
        hits += mag > bound;
        out[i] = x > bound ? bound : (x < -bound ? -bound : x);
    }
    *peak_bits = peak;
    return hits;
}

/* The largest |x[i]| (as a float; a NaN wins). */
static inline float abs_max(const float *x, int64_t len) {
    uint32_t peak = 0;
    for (int64_t i = 0; i < len; ++i) {
        const uint32_t bits = f32_bits(fabsf(x[i]));
        peak = bits > peak ? bits : peak;
    }
    float value;
    memcpy(&value, &peak, sizeof value);
    return value;
}

/* The step's counters added to numerics (fp64 [bound hits, floor hits, largest |N|]) in the twin's order. */
static void add_counters(double *numerics, int64_t bound_hits, int64_t floor_hits, uint32_t peak_bits) {
    float peak;
    memcpy(&peak, &peak_bits, sizeof peak);
    numerics[0] += (double)bound_hits;
    const double p = (double)peak; /* NaN when an N was NaN */
    numerics[2] = (p != p || numerics[2] != numerics[2]) ? NAN : (p > numerics[2] ? p : numerics[2]);
    numerics[1] += (double)floor_hits;
}

/* The loops below are split so that the arithmetic ones hold no table loads: gcc vectorizes them (divisions,
   square roots and FMAs 8 lanes at a time on AVX2), which a scalar loop of 4 divisions and 2 square roots per
   element would not be. Maxima of non-negative floats are taken on their bit patterns as unsigned integers:
   the same order, vectorizable, and a NaN (pattern above +inf) wins, as torch's amax propagates it. */

/* Returns 0, or -1 for a block size beyond MAX_BLOCK (nothing written). numerics (fp64 [bound hits, floor
   hits, largest |N|]) may be NULL; n_out may alias g when g is fp32. */
int coap8bit_moment_update_8bit(const void *g, int g_is_bf16, uint8_t *m_codes, float *m_absmax, uint8_t *v_codes,
                                float *v_absmax, float *n_out, double *numerics, const float *m_code,
                                const float *v_code, const uint32_t *m_table, const uint32_t *v_table,
                                float beta1, float one_minus_beta1,
                                float beta2, float one_minus_beta2, float eps, float bias_correction1,
                                float bias_correction2, float bound, int64_t n, int64_t block_size, int num_threads) {
    if (block_size < 1 || block_size > MAX_BLOCK) return -1;
    const float *g32 = (const float *)g;
    const uint16_t *g16 = (const uint16_t *)g;
    const int64_t n_blocks = (n + block_size - 1) / block_size;
    int64_t bound_hits = 0, floor_hits = 0;
    uint32_t peak_bits = 0; /* of the largest |N| */
    /* Blocks are independent, and the counters are sums of integers and a maximum: the result does not depend
       on the number of threads. Small tensors stay on one thread (a fork costs more than their work). */
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && n >= PARALLEL_MIN) \
    reduction(+ : bound_hits, floor_hits) reduction(max : peak_bits)
#endif
    for (int64_t block = 0; block < n_blocks; ++block) {
        float g_blk[MAX_BLOCK], m[MAX_BLOCK], v[MAX_BLOCK], sqrt_v[MAX_BLOCK], n_raw[MAX_BLOCK];
        const int64_t start = block * block_size;
        const int64_t len = n - start < block_size ? n - start : block_size;
        const float m_scale = m_absmax[block], v_scale = v_absmax[block];
        const uint8_t *mc = m_codes + start, *vc = v_codes + start;
        /* Dequantize (table loads). */
        if (g_is_bf16)
            for (int64_t i = 0; i < len; ++i) g_blk[i] = bf16_to_f32(g16[start + i]);
        else
            memcpy(g_blk, g32 + start, (size_t)len * sizeof(float));
        for (int64_t i = 0; i < len; ++i) {
            m[i] = m_code[mc[i]] * m_scale;
            sqrt_v[i] = v_code[vc[i]] * v_scale;
        }
        /* Adam's moments and N, in the twin's order of operations. */
        for (int64_t i = 0; i < len; ++i) {
            const float gi = g_blk[i], sv = sqrt_v[i];
            const float mi = fmaf(gi, one_minus_beta1, m[i] * beta1);
            const float vi = fmaf(one_minus_beta2 * gi, gi, (sv * sv) * beta2);
            m[i] = mi;
            v[i] = vi;
            n_raw[i] = (mi / bias_correction1) / (sqrtf(vi / bias_correction2) + eps);
            sqrt_v[i] = sqrtf(vi);
        }
        /* N clamped (written only now: it may be g's own memory), the counters, the blocks' absmax. */
        bound_hits += clamp_and_count(n_raw, n_out + start, len, bound, &peak_bits);
        const float m_peak = abs_max(m, len), v_peak = abs_max(sqrt_v, len);
        /* Requantize: an all-zero block keeps absmax 0 and divides by 1 (every code is then the zero's). */
        const float m_div = m_peak > 0.0f ? m_peak : 1.0f, v_div = v_peak > 0.0f ? v_peak : 1.0f;
        for (int64_t i = 0; i < len; ++i) {
            n_raw[i] = m[i] / m_div; /* (n_raw reused for the normalized values) */
            v[i] = sqrt_v[i] / v_div;
        }
        /* The codes, as 32-bit lanes first (into buffers free by now): table loads as vector gathers. */
        uint32_t *m_new = (uint32_t *)g_blk, *v_new = (uint32_t *)sqrt_v;
        for (int64_t i = 0; i < len; ++i) {
            m_new[i] = nearest_code(f32_bits(n_raw[i]), m_table);
            v_new[i] = nearest_code(f32_bits(v[i]), v_table);
        }
        int64_t floor = 0;
        for (int64_t i = 0; i < len; ++i) {
            m_codes[start + i] = (uint8_t)m_new[i];
            v_codes[start + i] = (uint8_t)v_new[i];
            floor += v_new[i] == 0 && m[i] != 0.0f;
        }
        floor_hits += floor;
        m_absmax[block] = m_peak;
        v_absmax[block] = v_peak;
    }
    if (numerics != NULL) add_counters(numerics, bound_hits, floor_hits, peak_bits);
    return 0;
}

/* Adam on fp32 moments, in place: the twin's functional.moment_update_32bit (no header), N into n_out (its own
   buffer). Chunks of MAX_BLOCK elements over threads. */
void coap8bit_moment_update_32bit(const void *g, int g_is_bf16, float *m, float *v, float *n_out, double *numerics,
                                  float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, float eps,
                                  float bias_correction1, float bias_correction2, float bound, int64_t n,
                                  int num_threads) {
    const float *g32 = (const float *)g;
    const uint16_t *g16 = (const uint16_t *)g;
    const int64_t n_chunks = (n + MAX_BLOCK - 1) / MAX_BLOCK;
    int64_t bound_hits = 0;
    uint32_t peak_bits = 0;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && n >= PARALLEL_MIN) \
    reduction(+ : bound_hits) reduction(max : peak_bits)
#endif
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
        float g_blk[MAX_BLOCK], n_raw[MAX_BLOCK];
        const int64_t start = chunk * MAX_BLOCK, len = n - start < MAX_BLOCK ? n - start : MAX_BLOCK;
        if (g_is_bf16)
            for (int64_t i = 0; i < len; ++i) g_blk[i] = bf16_to_f32(g16[start + i]);
        else
            memcpy(g_blk, g32 + start, (size_t)len * sizeof(float));
        float *mc = m + start, *vc = v + start;
        for (int64_t i = 0; i < len; ++i) {
            const float gi = g_blk[i];
            const float mi = fmaf(gi, one_minus_beta1, mc[i] * beta1);
            const float vi = fmaf(one_minus_beta2 * gi, gi, vc[i] * beta2);
            mc[i] = mi;
            vc[i] = vi;
            n_raw[i] = (mi / bias_correction1) / (sqrtf(vi / bias_correction2) + eps);
        }
        bound_hits += clamp_and_count(n_raw, n_out + start, len, bound, &peak_bits);
    }
    if (numerics != NULL) add_counters(numerics, bound_hits, 0, peak_bits);
}

/* out[i] = code[codes[i]] * absmax[i / block_size]: the twin's dequantization (bitsandbytes' CPU kernel), one
   fp32 product per element, over threads by blocks. */
void coap8bit_dequantize_blockwise(const uint8_t *codes, const float *absmax, const float *code, float *out,
                                   int64_t n, int64_t block_size, int num_threads) {
    const int64_t n_blocks = (n + block_size - 1) / block_size;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && n >= PARALLEL_MIN)
#endif
    for (int64_t block = 0; block < n_blocks; ++block) {
        const int64_t start = block * block_size, len = n - start < block_size ? n - start : block_size;
        const float scale = absmax[block];
        for (int64_t i = start; i < start + len; ++i) out[i] = code[codes[i]] * scale;
    }
}

/* out[i] = the format's code of x[i] (finite), through the packed table: nearest_code on its own, for the test
   that sweeps it against the twin's rounding. */
void coap8bit_nearest_codes(const float *x, int64_t n, const uint32_t *table, uint8_t *out) {
    for (int64_t i = 0; i < n; ++i) out[i] = (uint8_t)nearest_code(f32_bits(x[i]), table);
}
