/* Exact attention over the tiles of an attnopt CPU tile plan, fp32 (built and called by cpu_native.py).
 *
 * Layouts: q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], out [B, H, Sq, Dv], any strides
 * over (batch, head, token) given in elements, unit stride over the last dim. A plan of n tiles:
 * q_idx [n, TQ] and kv_idx [n, TK] token indices, mask [n, TK, TQp] (key-major bytes, 0xFF = attend,
 * 0 = not, and 0 for the padding queries TQ <= i < TQp), owner [n, TQ] (1 = this tile writes the
 * query's row: a query in two overlapping tiles is written once, so threads never race on a row and
 * the result does not depend on their timing). Optionally the caller's own mask, read in place: bool
 * bytes (nonzero = attend) or fp32 values added to the scaled scores, at
 * um[b * ums[0] + h * ums[1] + query * ums[2] + key * ums[3]] (stride 0 over broadcast dims).
 *
 * One work item = (tile, batch, kv head), for every q head of its group and every block of up to QB of
 * the tile's queries. Scores are kept key-major (St [TK][QB]), so the softmax runs down columns with
 * whole vectors of queries (no horizontal reductions) and k rows are read in place:
 *   St = scale K Q^T     6 keys x 16 queries register-blocked micro-kernel over Qt [D][QB] (in L1);
 *                        its epilogue masks the scores and keeps each query's running max
 *   P = exp(St - max)    in place, with the column sums
 *   out = (P^T V) / sum  6 queries x 16 value dims micro-kernel over the tile's values, packed once
 *                        per work item into contiguous 16-wide panels (Vp [Dv / 16][TK][16])
 * Work items are independent: [0, n * B * Hkv) is split into one range per thread.
 *
 * Exactness: the same sums as attention over the masked tile, in another order (fp32 accumulators,
 * exp to ~1 ulp); a NaN score among a row's allowed keys gives a NaN row, and a row with no
 * allowed key gives zeros (reference.py's and SDPA's safe softmax).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int8_t v8s __attribute__((vector_size(8)));

#define QB 64 /* queries per block (a multiple of 16) */
#define MR 6  /* micro-kernel rows */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE v8 ld(const float *p) { return *(const v8u *)p; }
ALWAYS_INLINE void st(float *p, v8 x) { *(v8u *)p = x; }
ALWAYS_INLINE v8 bc(float x) { return (v8){x, x, x, x, x, x, x, x}; }
ALWAYS_INLINE v8 sel(v8i m, v8 a, v8 b) { return (v8)(((v8i)a & m) | ((v8i)b & ~m)); }

/* 8 mask bytes (0xFF or 0) -> lanes of all ones or zeros (sign extension). */
ALWAYS_INLINE v8i mask8(const uint8_t *m) {
#ifdef __AVX2__
    return (v8i)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)m));
#else
    v8s b;
    memcpy(&b, m, 8);
    return __builtin_convertvector(b, v8i);
#endif
}

/* lanes of a where m is all ones, else of b */
ALWAYS_INLINE v8 blend(v8i m, v8 a, v8 b) {
#ifdef __AVX2__
    return (v8)_mm256_blendv_ps((__m256)b, (__m256)a, (__m256)m);
#else
    return sel(m, a, b);
#endif
}

ALWAYS_INLINE v8 vmax(v8 a, v8 b) {
#ifdef __AVX2__
    return (v8)_mm256_max_ps((__m256)a, (__m256)b);
#else
    return sel(a > b, a, b);
#endif
}

/* e^x for the x <= 0 of a softmax after the max is subtracted; 0 below -87.3 (where e^x is a
 * denormal that cannot change a sum that holds e^0 = 1) and for -inf; NaN stays NaN. Range reduction
 * x = n ln2 + r with ln2 split in two, |r| <= ln2 / 2, then a degree-6 polynomial (Cephes expf
 * coefficients): about 1 ulp. */
ALWAYS_INLINE v8 exp8(v8 x) {
    const v8 lo = bc(-87.3f);
    v8i keep = ~(x < lo);
    x = sel(keep, x, lo);
    v8 n = x * bc(1.44269504088896341f) + bc(12582912.0f); /* round to nearest: 1.5 * 2^23 */
    n = n - bc(12582912.0f);
    v8 r = x - n * bc(0.693359375f);
    r = r - n * bc(-2.12194440e-4f);
    v8 p = bc(1.9875691500e-4f);
    p = p * r + bc(1.3981999507e-3f);
    p = p * r + bc(8.3334519073e-3f);
    p = p * r + bc(4.1665795894e-2f);
    p = p * r + bc(1.6666665459e-1f);
    p = p * r + bc(5.0000001201e-1f);
    p = p * r * r + r + bc(1.0f);
    v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    return sel(keep, p * (v8)e, bc(0.0f));
}

/* St[r][0 .. 16) = scale * sum_d krow[r][d] * Qt[d][0 .. 16) for the R keys r < R (Qt and St rows QB
 * apart, mask rows TQp apart), -inf where the mask says no; mx[0 .. 2) = max(mx, those scores). The
 * scale multiplies the sum, as in SDPA: scaling q first rounds every term and, with a large scale,
 * made outputs several times less accurate than SDPA's (measured: 1.9e-5 vs 2.4e-7, scale 40). */
ALWAYS_INLINE void qk_block(const float *const *krow, int64_t D, const float *Qt, float *St, const uint8_t *m,
                            int64_t TQp, float scale, v8 *mx, const int R) {
    v8 a0[MR], a1[MR];
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) a0[r] = a1[r] = bc(0.0f);
    for (int64_t d = 0; d < D; d++) {
        v8 q0 = ld(Qt + d * QB), q1 = ld(Qt + d * QB + 8);
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            v8 x = bc(krow[r][d]);
            a0[r] += x * q0;
            a1[r] += x * q1;
        }
    }
    const v8 ninf = bc(-INFINITY), sc = bc(scale);
    v8 m0 = mx[0], m1 = mx[1];
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) {
        v8 s0 = blend(mask8(m + r * TQp), a0[r] * sc, ninf), s1 = blend(mask8(m + r * TQp + 8), a1[r] * sc, ninf);
        st(St + r * QB, s0);
        st(St + r * QB + 8, s1);
        m0 = vmax(s0, m0);
        m1 = vmax(s1, m1);
    }
    mx[0] = m0;
    mx[1] = m1;
}

/* rows[r][d0 .. d0 + 8 NV) = inv[r] * sum_j P[j][r] * Vp[j][0 .. 8 NV) for the R queries r < R (P rows
 * QB apart, Vp rows 8 NV apart; a NULL row is not written). */
ALWAYS_INLINE void pv_block(const float *P, const float *Vp, int64_t TK, float *const *rows,
                            const float *inv, int64_t d0, const int R, const int NV) {
    v8 a0[MR], a1[MR];
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) a0[r] = a1[r] = bc(0.0f);
    for (int64_t j = 0; j < TK; j++, P += QB, Vp += 8 * NV) {
        v8 v0 = ld(Vp), v1 = NV > 1 ? ld(Vp + 8) : bc(0.0f);
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            v8 x = bc(P[r]);
            a0[r] += x * v0;
            if (NV > 1) a1[r] += x * v1;
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) {
        if (!rows[r]) continue;
        st(rows[r] + d0, a0[r] * bc(inv[r]));
        if (NV > 1) st(rows[r] + d0 + 8, a1[r] * bc(inv[r]));
    }
}

static void qk_keys(const float *const *krow, int64_t D, const float *Qt, float *St, const uint8_t *m,
                    int64_t TQp, float scale, v8 *mx, int R) {
    switch (R) {
    case 6: qk_block(krow, D, Qt, St, m, TQp, scale, mx, 6); break;
    case 5: qk_block(krow, D, Qt, St, m, TQp, scale, mx, 5); break;
    case 4: qk_block(krow, D, Qt, St, m, TQp, scale, mx, 4); break;
    case 3: qk_block(krow, D, Qt, St, m, TQp, scale, mx, 3); break;
    case 2: qk_block(krow, D, Qt, St, m, TQp, scale, mx, 2); break;
    default: qk_block(krow, D, Qt, St, m, TQp, scale, mx, 1); break;
    }
}

#define PV_CASE(R)                                                         \
    case R:                                                                \
        if (NV > 1) pv_block(P, Vp, TK, rows, inv, d0, R, 2);            \
        else pv_block(P, Vp, TK, rows, inv, d0, R, 1);                   \
        break;

static void pv_queries(const float *P, const float *Vp, int64_t TK, float *const *rows,
                       const float *inv, int64_t d0, int R, int NV) {
    switch (R) {
    PV_CASE(6) PV_CASE(5) PV_CASE(4) PV_CASE(3) PV_CASE(2)
    default:
        if (NV > 1) pv_block(P, Vp, TK, rows, inv, d0, 1, 2);
        else pv_block(P, Vp, TK, rows, inv, d0, 1, 1);
    }
}

/* Softmax numerators of the nv * 8 query columns of St [TK][QB] in place, given each column's max
 * (masked scores are already -inf); inv[i] = 1 / column sum, or 0 for a column with no allowed key
 * (a fully masked row gives zeros, as the reference and SDPA's safe softmax do). */
static void exp_columns(float *St, int64_t TK, const v8 *mx_in, int64_t nv, float *inv) {
    v8 sum[QB / 8], mx[QB / 8];
    for (int64_t c = 0; c < nv; c++) {
        sum[c] = bc(0.0f);
        mx[c] = blend(mx_in[c] == bc(-INFINITY), bc(0.0f), mx_in[c]); /* exp(-inf - 0) = 0, not NaN */
    }
    for (int64_t j = 0; j < TK; j++) {
        float *s = St + j * QB;
        for (int64_t c = 0; c < nv; c++) {
            v8 p = exp8(ld(s + 8 * c) - mx[c]);
            st(s + 8 * c, p);
            sum[c] += p;
        }
    }
    /* a NaN score makes a NaN sum, and 1 / NaN a NaN row */
    for (int64_t c = 0; c < nv; c++)
        for (int l = 0; l < 8; l++) inv[8 * c + l] = sum[c][l] == 0.0f ? 0.0f : 1.0f / sum[c][l];
}

static void *alloc_bytes(int64_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, (size_t)(n > 0 ? n : 1))) return NULL;
    return p;
}

/* The caller's mask on the scores of one block (St [TK][QB], nv * 8 query columns, plan-masked entries
 * already -inf), as SDPA applies it after the scale: a bool mask puts -inf where it is 0, a float mask
 * is added. mx[c] = the columns' max afterwards. */
static void user_mask_columns(float *St, int64_t TK, int64_t nv, const void *um, int um_float,
                              const int64_t *ums, int64_t b, int64_t h, const int64_t *qi, int64_t nq,
                              const int64_t *kv, v8 *mx) {
    /* query by query: the mask's rows are query-major, so a query's keys (runs of the box) are near in
     * memory; key by key they are a row apart (3x slower on a [B, 1, S, S] float mask, S = 4096) */
    for (int64_t i = 0; i < nq; i++) {
        const int64_t row = b * ums[0] + h * ums[1] + qi[i] * ums[2];
        float *s = St + i;
        if (um_float) {
            const float *m = (const float *)um + row;
            for (int64_t j = 0; j < TK; j++) s[j * QB] += m[kv[j] * ums[3]];
        } else {
            const uint8_t *m = (const uint8_t *)um + row;
            for (int64_t j = 0; j < TK; j++)
                if (!m[kv[j] * ums[3]]) s[j * QB] = -INFINITY;
        }
    }
    for (int64_t c = 0; c < nv; c++) mx[c] = bc(-INFINITY);
    for (int64_t j = 0; j < TK; j++)
        for (int64_t c = 0; c < nv; c++) mx[c] = vmax(ld(St + j * QB + 8 * c), mx[c]);
}

/* Vp [Dv / 16 panels][TK][16] (the last panel 8 wide when Dv % 16 == 8): the tile's values in the
 * order pv_block reads them. */
static void pack_values(const float *const *vrow, int64_t TK, int64_t Dv, float *Vp) {
    for (int64_t j = 0; j < TK; j++) /* row by row: each value row is read from memory once, in order */
        for (int64_t d0 = 0; d0 < Dv; d0 += 16) {
            const int64_t w = Dv - d0 >= 16 ? 16 : 8;
            memcpy(Vp + d0 * TK + j * w, vrow[j] + d0, (size_t)w * sizeof(float));
        }
}

static int tiles_range(const float *q, const float *k, const float *v, float *out,
                       int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t Dv,
                       const int64_t *qst, const int64_t *kst, const int64_t *vst, const int64_t *ost,
                       const int64_t *q_idx, int64_t TQ, const int64_t *kv_idx, int64_t TK,
                       const uint8_t *mask, int64_t TQp, const uint8_t *owner,
                       const void *um, int um_float, const int64_t *ums,
                       float scale, int64_t begin, int64_t end) {
    const int64_t group = H / Hkv;
    float *Qt = alloc_bytes(D * QB * sizeof(float)), *St = alloc_bytes(TK * QB * sizeof(float));
    float *Vp = alloc_bytes(TK * Dv * sizeof(float));
    const float **krow = alloc_bytes(TK * sizeof(float *)), **vrow = alloc_bytes(TK * sizeof(float *));
    int status = 0;
    if (!Qt || !St || !Vp || !krow || !vrow) {
        status = -1;
        goto done;
    }
    for (int64_t w = begin; w < end; w++) {
        const int64_t t = w / (B * Hkv), b = (w / Hkv) % B, hk = w % Hkv;
        for (int64_t j = 0; j < TK; j++) {
            krow[j] = k + b * kst[0] + hk * kst[1] + kv_idx[t * TK + j] * kst[2];
            vrow[j] = v + b * vst[0] + hk * vst[1] + kv_idx[t * TK + j] * vst[2];
        }
        pack_values(vrow, TK, Dv, Vp);
        for (int64_t g = 0; g < group; g++) {
            const int64_t h = hk * group + g;
            for (int64_t i0 = 0; i0 < TQ; i0 += QB) {
                const int64_t nq = TQ - i0 < QB ? TQ - i0 : QB, nqp = (nq + 15) / 16 * 16;
                const int64_t *qi = q_idx + t * TQ + i0;
                const uint8_t *m = mask + t * TK * TQp + i0;
                /* Qt = q rows of the block, transposed; padding queries are 0 (and masked) */
                for (int64_t i = 0; i < nqp; i++) {
                    const float *qr = q + b * qst[0] + h * qst[1] + qi[i < nq ? i : 0] * qst[2];
                    for (int64_t d = 0; d < D; d++) Qt[d * QB + i] = i < nq ? qr[d] : 0.0f;
                }
                v8 mx[QB / 8];
                for (int64_t c = 0; c < nqp / 8; c++) mx[c] = bc(-INFINITY);
                for (int64_t j = 0; j < TK; j += MR)
                    for (int64_t i = 0; i < nqp; i += 16)
                        qk_keys(krow + j, D, Qt + i, St + j * QB + i, m + j * TQp + i, TQp, scale, mx + i / 8,
                                (int)(TK - j < MR ? TK - j : MR));
                if (um)
                    user_mask_columns(St, TK, nqp / 8, um, um_float, ums, b, h, qi, nq, kv_idx + t * TK, mx);
                float inv[QB];
                float *rows[QB];
                exp_columns(St, TK, mx, nqp / 8, inv);
                for (int64_t i = 0; i < nq; i++)
                    rows[i] = owner[t * TQ + i0 + i] ? out + b * ost[0] + h * ost[1] + qi[i] * ost[2] : NULL;
                for (int64_t d0 = 0; d0 < Dv; d0 += 16)
                    for (int64_t i = 0; i < nq; i += MR)
                        pv_queries(St + i, Vp + d0 * TK, TK, rows + i, inv + i, d0,
                                   (int)(nq - i < MR ? nq - i : MR), Dv - d0 >= 16 ? 2 : 1);
            }
        }
    }
done:
    free(Qt); free(St); free(Vp); free(krow); free(vrow);
    return status;
}

/* 1 when built with OpenMP: attnopt_tiles_f32 then splits its work over `threads` threads of the
 * process's OpenMP pool (torch's own, when torch loaded libgomp first), else 0 and it runs serially. */
int attnopt_tiles_parallel(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Work items [begin, end); returns 0, -1 (out of memory) or -2 (bad shapes). */
int attnopt_tiles_f32(const float *q, const float *k, const float *v, float *out,
                      int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t Dv,
                      const int64_t *qst, const int64_t *kst, const int64_t *vst, const int64_t *ost,
                      const int64_t *q_idx, int64_t TQ, const int64_t *kv_idx, int64_t TK,
                      const uint8_t *mask, int64_t TQp, const uint8_t *owner,
                      const void *um, int um_float, const int64_t *ums,
                      float scale, int64_t begin, int64_t end, int threads) {
    if (TQp % 16 || TQp < TQ || Dv % 8 || H % Hkv || TK < 1) return -2;
    int status = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(min : status)
    {
        const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
        status = tiles_range(q, k, v, out, B, H, Hkv, D, Dv, qst, kst, vst, ost, q_idx, TQ, kv_idx, TK, mask,
                             TQp, owner, um, um_float, ums, scale, begin + (end - begin) * id / nt,
                             begin + (end - begin) * (id + 1) / nt);
    }
#else
    (void)threads;
    status = tiles_range(q, k, v, out, B, H, Hkv, D, Dv, qst, kst, vst, ost, q_idx, TQ, kv_idx, TK, mask, TQp,
                         owner, um, um_float, ums, scale, begin, end);
#endif
    return status;
}

/* ======================= backward (called by native_backward.py) =======================
 *
 * Gradients of the same tile attention: dq [B, H, Sq, D], dk [B, Hkv, Skv, D], dv [B, Hkv, Skv, Dv],
 * fp32 and contiguous, zero-filled by the caller; grad_out (go) [B, H, Sq, Dv] with any strides over
 * (batch, head, token) and unit stride over the last dim, as q, k, v. Plan and masks as the forward's.
 *
 * Each tile holds every key its queries may attend, so a query's softmax is recomputed whole within
 * its owner tile (no log-sum-exp from the forward is needed). Per block of up to QB queries, key-major
 * as the forward (St [TK][QB]; the forward's qk_keys, user_mask_columns and exp_columns):
 *   St = scale K Q^T (+ masks)   P = softmax down columns   dPt = V dO^T
 *   dS = scale P (dP - colsum(P dP))                          (the sum is dO . out of the query)
 *   dQ = dS^T K   -> dq rows      dK += dS Q   dV += P dO     -> dk / dv rows
 * Columns of queries this tile does not own (and padding columns) get P = dS = 0, so the result is the
 * exact gradient of the forward, where each row comes from its owner tile only. k, v, q and dO rows are
 * read in place through row pointers, dq / dk / dv rows written in place: no gathers.
 *
 * Work item = (batch, kv head, tile), slice-major: w = (b * Hkv + hk) * n + t, one contiguous range per
 * thread. dq rows have one writer (their owner tile). dk/dv rows are shared by overlapping tiles: a
 * thread adds straight into the (b, kv head) slices its range covers whole, and into private copies
 * of the (at most two) slices at its range's ends; those are summed into dk/dv after the parallel
 * region, in thread order (the result does not depend on the threads' timing). */

/* C[r][0 .. 8 NV) = sum_k arow[r][k] * B[k][0 .. 8 NV) for r < R (B and C rows QB apart). */
ALWAYS_INLINE void rows_panel(const float *const *arow, int64_t K, const float *B, float *C, const int R,
                              const int NV) {
    v8 a0[MR], a1[MR];
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) a0[r] = a1[r] = bc(0.0f);
    for (int64_t kk = 0; kk < K; kk++) {
        v8 b0 = ld(B + kk * QB), b1 = NV > 1 ? ld(B + kk * QB + 8) : bc(0.0f);
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            v8 x = bc(arow[r][kk]);
            a0[r] += x * b0;
            if (NV > 1) a1[r] += x * b1;
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) {
        st(C + r * QB, a0[r]);
        if (NV > 1) st(C + r * QB + 8, a1[r]);
    }
}

/* crow[r][c0 .. c0 + 8 NV) (+= with acc, else =) sum_k A[r * ars + k * acs] * brow[k][c0 .. + 8 NV), r < R. */
ALWAYS_INLINE void rows_acc(const float *A, int64_t ars, int64_t acs, const float *const *brow, int64_t K,
                            float *const *crow, int64_t c0, const int R, const int NV, int acc) {
    v8 a0[MR], a1[MR];
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) {
        a0[r] = acc ? ld(crow[r] + c0) : bc(0.0f);
        a1[r] = NV > 1 && acc ? ld(crow[r] + c0 + 8) : bc(0.0f);
    }
    for (int64_t kk = 0; kk < K; kk++) {
        const float *b = brow[kk] + c0;
        v8 b0 = ld(b), b1 = NV > 1 ? ld(b + 8) : bc(0.0f);
        const float *a = A + kk * acs;
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            v8 x = bc(a[r * ars]);
            a0[r] += x * b0;
            if (NV > 1) a1[r] += x * b1;
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) {
        st(crow[r] + c0, a0[r]);
        if (NV > 1) st(crow[r] + c0 + 8, a1[r]);
    }
}

#define RP_CASE(R)                                            \
    case R:                                                   \
        if (NV > 1) rows_panel(arow, K, B, C, R, 2);          \
        else rows_panel(arow, K, B, C, R, 1);                 \
        break;

/* C [M][QB] = arow (M rows of K) x B [K][QB], N (a multiple of 8) columns. */
static void gemm_rows_panel(const float *const *arow, int64_t M, int64_t K, const float *B0, int64_t N, float *C0) {
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
        const int NV = N - n0 >= 16 ? 2 : 1;
        for (int64_t i0 = 0; i0 < M; i0 += MR) {
            const float *const *a = arow + i0;
            const float *B = B0 + n0;
            float *C = C0 + i0 * QB + n0;
            const int R = (int)(M - i0 < MR ? M - i0 : MR);
            const float *const *arow_ = a;
            {
                const float *const *arow = arow_;
                switch (R) {
                RP_CASE(6) RP_CASE(5) RP_CASE(4) RP_CASE(3) RP_CASE(2)
                default:
                    if (NV > 1) rows_panel(arow, K, B, C, 1, 2);
                    else rows_panel(arow, K, B, C, 1, 1);
                }
            }
        }
    }
}

#define RA_CASE(R)                                                          \
    case R:                                                                 \
        if (NV > 1) rows_acc(A, ars, acs, brow, K, crow, c0, R, 2, acc);    \
        else rows_acc(A, ars, acs, brow, K, crow, c0, R, 1, acc);           \
        break;

/* crow[i][0 .. N) (+)= sum_k A[i * ars + k * acs] * brow[k][0 .. N) for i < M (N a multiple of 8). */
static void gemm_rows_acc(const float *A0, int64_t ars, int64_t acs, const float *const *brow, int64_t M, int64_t K,
                          int64_t N, float *const *crow0, int acc) {
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
        const float *A = A0 + i0 * ars;
        float *const *crow = crow0 + i0;
        const int R = (int)(M - i0 < MR ? M - i0 : MR);
        for (int64_t c0 = 0; c0 < N; c0 += 16) {
            const int NV = N - c0 >= 16 ? 2 : 1;
            switch (R) {
            RA_CASE(6) RA_CASE(5) RA_CASE(4) RA_CASE(3) RA_CASE(2)
            default:
                if (NV > 1) rows_acc(A, ars, acs, brow, K, crow, c0, 1, 2, acc);
                else rows_acc(A, ars, acs, brow, K, crow, c0, 1, 1, acc);
            }
        }
    }
}

static int backward_range(const float *q, const float *k, const float *v, const float *go,
                          float *dq, float *dk, float *dv, int64_t H, int64_t Hkv, int64_t Sq, int64_t Skv,
                          int64_t D, int64_t Dv, const int64_t *qst, const int64_t *kst, const int64_t *vst,
                          const int64_t *gst, const int64_t *q_idx, int64_t n, int64_t TQ,
                          const int64_t *kv_idx, int64_t TK, const uint8_t *mask, int64_t TQp,
                          const uint8_t *owner, const void *um, int um_float, const int64_t *ums, float scale,
                          int64_t begin, int64_t end, float **priv_k, float **priv_v, int64_t *priv_s) {
    const int64_t group = H / Hkv;
    const int64_t Dm = D > Dv ? D : Dv;
    float *Qt = alloc_bytes(D * QB * sizeof(float)), *Gt = alloc_bytes(Dv * QB * sizeof(float));
    float *St = alloc_bytes(TK * QB * sizeof(float)), *dPt = alloc_bytes(TK * QB * sizeof(float));
    float *scratch = alloc_bytes(Dm * sizeof(float));
    const float **krow = alloc_bytes(TK * sizeof(float *)), **vrow = alloc_bytes(TK * sizeof(float *));
    float **dkrow = alloc_bytes(TK * sizeof(float *)), **dvrow = alloc_bytes(TK * sizeof(float *));
    const float *qrow[QB], *grow[QB];
    float *dqrow[QB];
    int status = 0;
    priv_k[0] = priv_k[1] = priv_v[0] = priv_v[1] = NULL;
    priv_s[0] = priv_s[1] = -1;
    if (!Qt || !Gt || !St || !dPt || !scratch || !krow || !vrow || !dkrow || !dvrow) {
        status = -1;
        goto done;
    }
    if (begin < end) { /* slices this range covers only in part get private copies */
        const int64_t s0 = begin / n, s1 = (end - 1) / n;
        if (!(begin <= s0 * n && end >= (s0 + 1) * n)) priv_s[0] = s0;
        if (s1 != s0 && !(begin <= s1 * n && end >= (s1 + 1) * n)) priv_s[1] = s1;
        for (int c = 0; c < 2; c++) {
            if (priv_s[c] < 0) continue;
            priv_k[c] = calloc((size_t)(Skv * D), sizeof(float));
            priv_v[c] = calloc((size_t)(Skv * Dv), sizeof(float));
            if (!priv_k[c] || !priv_v[c]) {
                status = -1;
                goto done;
            }
        }
    }
    for (int64_t w = begin; w < end; w++) {
        const int64_t s = w / n, t = w % n, b = s / Hkv, hk = s % Hkv;
        float *dks = dk + s * Skv * D, *dvs = dv + s * Skv * Dv;
        for (int c = 0; c < 2; c++)
            if (priv_s[c] == s) {
                dks = priv_k[c];
                dvs = priv_v[c];
            }
        const int64_t *kv = kv_idx + t * TK;
        for (int64_t j = 0; j < TK; j++) {
            krow[j] = k + b * kst[0] + hk * kst[1] + kv[j] * kst[2];
            vrow[j] = v + b * vst[0] + hk * vst[1] + kv[j] * vst[2];
            dkrow[j] = dks + kv[j] * D;
            dvrow[j] = dvs + kv[j] * Dv;
        }
        for (int64_t g = 0; g < group; g++) {
            const int64_t h = hk * group + g;
            for (int64_t i0 = 0; i0 < TQ; i0 += QB) {
                const int64_t nq = TQ - i0 < QB ? TQ - i0 : QB, nqp = (nq + 15) / 16 * 16;
                const int64_t *qi = q_idx + t * TQ + i0;
                const uint8_t *own = owner + t * TQ + i0;
                const uint8_t *m = mask + t * TK * TQp + i0;
                int any = 0;
                for (int64_t i = 0; i < nq; i++) any |= own[i];
                if (!any) continue;
                /* Qt, Gt = the block's q and dO rows, transposed; padding queries are 0 */
                for (int64_t i = 0; i < nqp; i++) {
                    const int64_t r = qi[i < nq ? i : 0];
                    qrow[i] = q + b * qst[0] + h * qst[1] + r * qst[2];
                    grow[i] = go + b * gst[0] + h * gst[1] + r * gst[2];
                    dqrow[i] = i < nq && own[i] ? dq + ((b * H + h) * Sq + r) * D : scratch;
                    for (int64_t d = 0; d < D; d++) Qt[d * QB + i] = i < nq ? qrow[i][d] : 0.0f;
                    for (int64_t d = 0; d < Dv; d++) Gt[d * QB + i] = i < nq ? grow[i][d] : 0.0f;
                }
                v8 mx[QB / 8];
                for (int64_t c = 0; c < nqp / 8; c++) mx[c] = bc(-INFINITY);
                for (int64_t j = 0; j < TK; j += MR)
                    for (int64_t i = 0; i < nqp; i += 16)
                        qk_keys(krow + j, D, Qt + i, St + j * QB + i, m + j * TQp + i, TQp, scale, mx + i / 8,
                                (int)(TK - j < MR ? TK - j : MR));
                if (um)
                    user_mask_columns(St, TK, nqp / 8, um, um_float, ums, b, h, qi, nq, kv, mx);
                float inv[QB];
                exp_columns(St, TK, mx, nqp / 8, inv);
                for (int64_t i = 0; i < nqp; i++)
                    if (i >= nq || !own[i]) inv[i] = 0.0f; /* not this tile's row: no contribution */
                gemm_rows_panel((const float *const *)vrow, TK, Dv, Gt, nqp, dPt);
                /* P = numerators * inv; delta = colsum(P dP); dS = scale P (dP - delta) */
                v8 dl[QB / 8];
                for (int64_t c = 0; c < nqp / 8; c++) dl[c] = bc(0.0f);
                for (int64_t j = 0; j < TK; j++)
                    for (int64_t c = 0; c < nqp / 8; c++) {
                        v8 p = ld(St + j * QB + 8 * c) * ld(inv + 8 * c);
                        st(St + j * QB + 8 * c, p);
                        dl[c] += p * ld(dPt + j * QB + 8 * c);
                    }
                const v8 sc = bc(scale);
                for (int64_t j = 0; j < TK; j++)
                    for (int64_t c = 0; c < nqp / 8; c++)
                        st(dPt + j * QB + 8 * c, sc * ld(St + j * QB + 8 * c) * (ld(dPt + j * QB + 8 * c) - dl[c]));
                /* dq rows = dS^T K (one writer per row); dk rows += dS Q; dv rows += P dO */
                gemm_rows_acc(dPt, 1, QB, (const float *const *)krow, nq, TK, D, dqrow, 0);
                gemm_rows_acc(dPt, QB, 1, qrow, TK, nq, D, dkrow, 1);
                gemm_rows_acc(St, QB, 1, grow, TK, nq, Dv, dvrow, 1);
            }
        }
    }
done:
    free(Qt); free(Gt); free(St); free(dPt); free(scratch); free(krow); free(vrow); free(dkrow); free(dvrow);
    return status;
}

/* Gradients of attnopt_tiles_f32's attention over every tile (header of this section); work items
 * [0, n * B * Hkv). Returns 0, -1 (out of memory) or -2 (bad shapes). */
int attnopt_tiles_backward_f32(const float *q, const float *k, const float *v, const float *go,
                               float *dq, float *dk, float *dv, int64_t B, int64_t H, int64_t Hkv, int64_t Sq,
                               int64_t Skv, int64_t D, int64_t Dv, const int64_t *qst, const int64_t *kst,
                               const int64_t *vst, const int64_t *gst, const int64_t *q_idx, int64_t n,
                               int64_t TQ, const int64_t *kv_idx, int64_t TK, const uint8_t *mask, int64_t TQp,
                               const uint8_t *owner, const void *um, int um_float, const int64_t *ums,
                               float scale, int threads) {
    if (TQp % 16 || TQp < TQ || D % 8 || Dv % 8 || H % Hkv || TK < 1 || n < 1) return -2;
    const int64_t work = n * B * Hkv;
    int nt = threads > 0 ? threads : 1;
    if (nt > work) nt = (int)work;
    float **priv_k = calloc((size_t)(2 * nt), sizeof(float *)), **priv_v = calloc((size_t)(2 * nt), sizeof(float *));
    int64_t *priv_s = calloc((size_t)(2 * nt), sizeof(int64_t));
    int status = 0;
    if (!priv_k || !priv_v || !priv_s) {
        free(priv_k); free(priv_v); free(priv_s);
        return -1;
    }
    for (int i = 0; i < 2 * nt; i++) priv_s[i] = -1;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) reduction(min : status)
    {
        const int64_t got = omp_get_num_threads(), id = omp_get_thread_num();
        status = backward_range(q, k, v, go, dq, dk, dv, H, Hkv, Sq, Skv, D, Dv, qst, kst, vst, gst, q_idx, n, TQ,
                                kv_idx, TK, mask, TQp, owner, um, um_float, ums, scale, work * id / got,
                                work * (id + 1) / got, priv_k + 2 * id, priv_v + 2 * id, priv_s + 2 * id);
    }
#else
    nt = 1;
    status = backward_range(q, k, v, go, dq, dk, dv, H, Hkv, Sq, Skv, D, Dv, qst, kst, vst, gst, q_idx, n, TQ, kv_idx,
                            TK, mask, TQp, owner, um, um_float, ums, scale, 0, work, priv_k, priv_v, priv_s);
#endif
    for (int i = 0; i < 2 * nt; i++) { /* thread order: the sums do not depend on timing */
        if (status == 0 && priv_s[i] >= 0 && priv_k[i] && priv_v[i]) {
            float *rk = dk + priv_s[i] * Skv * D, *rv = dv + priv_s[i] * Skv * Dv;
            for (int64_t x = 0; x < Skv * D; x++) rk[x] += priv_k[i][x];
            for (int64_t x = 0; x < Skv * Dv; x++) rv[x] += priv_v[i][x];
        }
        free(priv_k[i]);
        free(priv_v[i]);
    }
    free(priv_k); free(priv_v); free(priv_s);
    return status;
}
