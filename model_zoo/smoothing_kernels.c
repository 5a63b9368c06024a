/* Fused kernels of the SmoothBlock (model_zoo/smoothing.py): the M2 3x3 median.
 *
 * Built on first use by model_zoo/native.py with the system C compiler into a per-user cache and
 * called through ctypes on the raw float32 buffers of contiguous CPU tensors; no torch headers.
 * Every result is bit-identical to the pure-torch path in smoothing.py (tested):
 *   - median: the same pruned 19-exchange selection network (it selects, never computes, a value);
 *   - which: the neighbour (0..8, raster order) that a stable sort puts at rank 4, i.e. among the
 *     neighbours equal to the median the (4 - #smaller)-th;
 *   - backward: for each padded position, the sum over k = 0..8 (in that order, from 0.0f) of the
 *     output gradient of the pixel that routed its gradient through neighbour k, exactly the
 *     additions of the nine masked shifted passes of the torch path.
 * One pass reads the 9 neighbours once (the torch path makes ~110 element-wise passes).
 */
#include <stddef.h>
#include <stdint.h>

#define SORT2(a, b) { float lo_ = (a) < (b) ? (a) : (b); float hi_ = (a) < (b) ? (b) : (a); (a) = lo_; (b) = hi_; }
/* torch.minimum / torch.maximum propagate NaN, these do not: median3x3_forward reports a NaN in
 * its input and the caller then uses the torch path. */
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) < (b) ? (b) : (a))

static inline float median9(const float *v) {
    float p0 = v[0], p1 = v[1], p2 = v[2], p3 = v[3], p4 = v[4], p5 = v[5], p6 = v[6], p7 = v[7], p8 = v[8];
    SORT2(p1, p2); SORT2(p4, p5); SORT2(p7, p8);
    SORT2(p0, p1); SORT2(p3, p4); SORT2(p6, p7);
    SORT2(p1, p2); SORT2(p4, p5); SORT2(p7, p8);
    p3 = MAX(p0, p3);
    p5 = MIN(p5, p8);
    SORT2(p4, p7);
    p6 = MAX(p3, p6);
    p4 = MAX(p1, p4);
    p2 = MIN(p2, p5);
    p4 = MIN(p4, p7);
    SORT2(p4, p2);
    p4 = MAX(p6, p4);
    return MIN(p4, p2);
}

/* One padded plane src (h + 2, w + 2) -> dst (h, w), which (h, w) or NULL. The loops run flat over
 * the plane in the padded width (wp = w + 2): position q = y wp + x has its 3x3 window at
 * src[q + {0, 1, 2} + {0, wp, 2 wp}], and the two columns x = w, w + 1 of each row are computed
 * and dropped. Rows of a LeNet map are 12 pixels, too short for the vector loops (64 uint8 lanes
 * with AVX-512): flat, one loop covers the plane. mf: h wp floats, wf: h wp bytes of scratch.
 * Returns 1 if the plane holds a NaN. */
static int median_plane(const float *restrict src, float *restrict dst, uint8_t *restrict which, int64_t h,
                        int64_t w, float *restrict mf, uint8_t *restrict wf) {
    const int64_t wp = w + 2, nf = h * wp - 2; /* q < nf covers every kept position, reads stay in src */
    int nan = 0;
    for (int64_t i = 0; i < (h + 2) * wp; i++) nan |= src[i] != src[i];
    if (nan) return 1; /* the caller falls back to the torch path, which propagates NaN */
    for (int64_t q = 0; q < nf; q++) {
        const float *r = src + q;
        float v[9] = {r[0], r[1], r[2], r[wp], r[wp + 1], r[wp + 2], r[2 * wp], r[2 * wp + 1], r[2 * wp + 2]};
        mf[q] = median9(v);
    }
    if (which)
        for (int64_t q = 0; q < nf; q++) {
            const float *r = src + q;
            const float m = mf[q];
            const float v[9] = {r[0], r[1], r[2], r[wp], r[wp + 1], r[wp + 2], r[2 * wp], r[2 * wp + 1], r[2 * wp + 2]};
            int less = 0;
            for (int k = 0; k < 9; k++) less += v[k] < m;
            const int target = 4 - less;
            int seen = 0, k_sel = 0;
            for (int k = 0; k < 9; k++) {
                const int eq = v[k] == m;
                k_sel = (eq & (seen == target)) ? k : k_sel;
                seen += eq;
            }
            wf[q] = (uint8_t)k_sel;
        }
    for (int64_t y = 0; y < h; y++)
        for (int64_t x = 0; x < w; x++) {
            dst[y * w + x] = mf[y * wp + x];
            if (which) which[y * w + x] = wf[y * wp + x];
        }
    return 0;
}

/* Gradient of one plane: g, which (h, w) -> gp (h + 2, w + 2), fully written: zero, then nine masked
 * shifted additions in k order, the torch path's additions in the torch path's order. Flat in the
 * padded width as the forward: g and which are first laid out at width wp (gf, wf: h wp floats /
 * bytes of scratch), the two extra columns with which = 255, so they add +0.0f (which leaves every
 * sum, never -0.0f as it starts from +0.0f, bit for bit unchanged). */
static void median_plane_backward(const float *restrict g, const uint8_t *restrict which, float *restrict gp,
                                  int64_t h, int64_t w, float *restrict gf, uint8_t *restrict wf) {
    const int64_t wp = w + 2, nf = h * wp - 2;
    for (int64_t y = 0; y < h; y++) {
        for (int64_t x = 0; x < w; x++) {
            gf[y * wp + x] = g[y * w + x];
            wf[y * wp + x] = which[y * w + x];
        }
        gf[y * wp + w] = gf[y * wp + w + 1] = 0.0f;
        wf[y * wp + w] = wf[y * wp + w + 1] = 255;
    }
    for (int64_t i = 0; i < (h + 2) * wp; i++) gp[i] = 0.0f;
    for (int k = 0; k < 9; k++) {
        float *restrict d = gp + (k / 3) * wp + k % 3;
        const uint8_t kk = (uint8_t)k;
        for (int64_t q = 0; q < nf; q++) {
            const float gv = gf[q]; /* loaded unconditionally, so the select vectorises */
            d[q] += wf[q] == kk ? gv : 0.0f;
        }
    }
}

/* xp: (planes, h + 2, w + 2) padded input; med: (planes, h, w); which: (planes, h, w) or NULL;
 * scratch: 2 h (w + 2) floats. Returns 1 (nothing that counts written) if a plane holds a NaN. */
int median3x3_forward(const float *xp, float *med, uint8_t *which, float *scratch, int64_t planes, int64_t h,
                      int64_t w) {
    const int64_t plane_in = (h + 2) * (w + 2), plane_out = h * w;
    uint8_t *wf = (uint8_t *)(scratch + h * (w + 2));
    for (int64_t n = 0; n < planes; n++)
        if (median_plane(xp + n * plane_in, med + n * plane_out, which ? which + n * plane_out : NULL, h, w,
                         scratch, wf))
            return 1;
    return 0;
}

/* grad, which: (planes, h, w); gp: (planes, h + 2, w + 2), fully written; scratch: 2 h (w + 2) floats. */
void median3x3_backward(const float *grad, const uint8_t *which, float *gp, float *scratch, int64_t planes,
                        int64_t h, int64_t w) {
    const int64_t plane_out = h * w, plane_in = (h + 2) * (w + 2);
    uint8_t *wf = (uint8_t *)(scratch + h * (w + 2));
    for (int64_t n = 0; n < planes; n++)
        median_plane_backward(grad + n * plane_out, which + n * plane_out, gp + n * plane_in, h, w, scratch, wf);
}


/* ------------------------------------------------------------------------------ linear SmoothBlock
 * The G / M1 block y = x + W F(x) + b in one call each way, for float32 (B, C, H, W) maps. F is the
 * separable 3-tap filter with kornia's reflect border, given as tridiagonal band matrices: taps
 * (3, n) = the sub-diagonal, diagonal and super-diagonal of B_h (rows, n = H) and B_w (columns,
 * n = W), so F(x) = B_h x B_w^T, as the torch path's two matmuls compute it; the backward gets the
 * taps of B_h^T and B_w^T, and B_h's and B_w's again to recompute F(x) for the weight gradient. The torch path makes ~10 operator calls each way, whose dispatch
 * dominates at LeNet's (32, 6, 12, 12); here every image's C planes stay in cache. Sums in another
 * order than torch's matmuls: equal to the torch path to float rounding (tests/model_zoo/test_smoothing.py).
 * With NULL taps (the M2 block) z = F(x) is given, the forward adds x + W z + b only and the backward
 * returns W^T grad (the gradient for z) in grad_x. */

/* Per-pixel coefficients of the two band passes, so that each pass is one flat loop over the plane
 * (short rows would not vectorise): coef[0..2] the rows pass (lo, d, up of pixel p's row), coef[3..5]
 * the columns pass (of its column; lo is 0 in column 0 and up 0 in the last column, so the flat
 * loop's reads across a row end are multiplied by 0). */
static void expand_taps(const float *taps_h, const float *taps_w, int64_t h, int64_t w, float *coef) {
    const int64_t hw = h * w;
    for (int64_t r = 0; r < h; r++)
        for (int64_t c = 0; c < w; c++) {
            const int64_t p = r * w + c;
            coef[p] = r > 0 ? taps_h[r] : 0.0f;
            coef[hw + p] = taps_h[h + r];
            coef[2 * hw + p] = r < h - 1 ? taps_h[2 * h + r] : 0.0f;
            coef[3 * hw + p] = c > 0 ? taps_w[c] : 0.0f;
            coef[4 * hw + p] = taps_w[w + c];
            coef[5 * hw + p] = c < w - 1 ? taps_w[2 * w + c] : 0.0f;
        }
}

/* out = B_h v B_w^T of one plane. vp: hw + 2 w floats (v copied between w zeros each side), t:
 * hw + 2 floats (one zero each side). */
static void band2d(const float *restrict v, float *restrict out, const float *restrict coef, float *restrict vp,
                   float *restrict t, int64_t h, int64_t w) {
    const int64_t hw = h * w;
    const float *lr = coef, *dr = coef + hw, *ur = coef + 2 * hw, *lc = coef + 3 * hw, *dc = coef + 4 * hw,
                *uc = coef + 5 * hw;
    float *restrict x = vp + w;
    for (int64_t p = 0; p < hw; p++) x[p] = v[p];
    float *restrict tt = t + 1;
    for (int64_t p = 0; p < hw; p++) tt[p] = lr[p] * x[p - w] + dr[p] * x[p] + ur[p] * x[p + w];
    for (int64_t p = 0; p < hw; p++) out[p] = lc[p] * tt[p - 1] + dc[p] * tt[p] + uc[p] * tt[p + 1];
}

/* x, out: (B, C, H, W); weight (C, C); bias (C). With taps, F(x) of each image is computed into the
 * work buffer (in cache) and not kept: the backward recomputes it from x when it needs it for the
 * weight gradient (x stays alive anyway: it is the output the previous layer keeps), which saves
 * writing and allocating a map the size of x per forward. With NULL taps z = F(x) is given (the
 * median block). work: (8 + C) H W + 2 W + 2 floats, zeroed. */
static void smooth_image(const float *restrict xb, float *restrict zb, const float *coef, float *vp, float *t,
                         int64_t C, int64_t h, int64_t w) {
    for (int64_t i = 0; i < C; i++) band2d(xb + i * h * w, zb + i * h * w, coef, vp, t, h, w);
}

void smooth_mix_forward(const float *x, const float *weight, const float *bias, const float *taps_h,
                        const float *taps_w, const float *z, float *out, float *work, int64_t B, int64_t C,
                        int64_t h, int64_t w) {
    const int64_t hw = h * w;
    float *coef = work, *vp = coef + 6 * hw, *t = vp + hw + 2 * w, *zs = t + hw + 2;
    if (taps_h) expand_taps(taps_h, taps_w, h, w, coef);
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * C * hw, *zb = z ? z + b * C * hw : zs;
        float *ob = out + b * C * hw;
        if (taps_h) smooth_image(xb, zs, coef, vp, t, C, h, w);
        for (int64_t o = 0; o < C; o++) {
            float *restrict acc = ob + o * hw;
            const float *restrict xo = xb + o * hw;
            const float bo = bias[o];
            for (int64_t p = 0; p < hw; p++) acc[p] = xo[p] + bo;
            for (int64_t i = 0; i < C; i++) {
                const float wi = weight[o * C + i];
                const float *restrict zi = zb + i * hw;
                for (int64_t p = 0; p < hw; p++) acc[p] += wi * zi[p];
            }
        }
    }
}

static float dot_lanes(const float *restrict a, const float *restrict b, int64_t n) {
    float acc[16] = {0};
    int64_t k = 0;
    for (; k + 16 <= n; k += 16)
        for (int l = 0; l < 16; l++) acc[l] += a[k + l] * b[k + l];
    float s = 0.0f;
    for (; k < n; k++) s += a[k] * b[k];
    for (int l = 0; l < 16; l++) s += acc[l];
    return s;
}

/* grad (B, C, H, W) -> grad_x = grad + B_h^T (W^T grad) B_w; with grad_weight / grad_bias (C x C / C,
 * accumulated, may be NULL) the parameter gradients sum_b,p grad_o z_i and sum_b,p grad_o. src: the
 * forward's input x, whose F(x) = z is recomputed per image (taps_h / taps_w, B_h's and B_w's
 * diagonals) for the weight gradient; with NULL taps (the median block) src is z itself and grad_x
 * receives W^T grad. work: (15 + C) H W + 2 W + 2 floats. */
void smooth_mix_backward(const float *grad, const float *src, const float *weight, const float *taps_h,
                         const float *taps_w, const float *taps_ht, const float *taps_wt, float *grad_x,
                         float *grad_weight, float *grad_bias, float *work, int64_t B, int64_t C, int64_t h,
                         int64_t w) {
    const int64_t hw = h * w;
    float *coef = work, *coef_f = coef + 6 * hw, *vp = coef_f + 6 * hw, *t = vp + hw + 2 * w, *u = t + hw + 2,
          *zs = u + hw;
    if (taps_ht) expand_taps(taps_ht, taps_wt, h, w, coef);
    if (taps_ht && grad_weight) expand_taps(taps_h, taps_w, h, w, coef_f);
    for (int64_t b = 0; b < B; b++) {
        const float *gb = grad + b * C * hw;
        float *xb = grad_x + b * C * hw;
        for (int64_t i = 0; i < C; i++) {
            for (int64_t p = 0; p < hw; p++) u[p] = 0.0f;
            for (int64_t o = 0; o < C; o++) {
                const float wo = weight[o * C + i];
                const float *restrict go = gb + o * hw;
                for (int64_t p = 0; p < hw; p++) u[p] += wo * go[p];
            }
            float *restrict xi = xb + i * hw;
            if (!taps_ht) { /* the median block: grad_x receives W^T grad, the gradient for z = F(x) */
                for (int64_t p = 0; p < hw; p++) xi[p] = u[p];
                continue;
            }
            band2d(u, xi, coef, vp, t, h, w);
            const float *restrict gi = gb + i * hw;
            for (int64_t p = 0; p < hw; p++) xi[p] += gi[p];
        }
        if (grad_weight) {
            const float *zb = src + b * C * hw;
            if (taps_ht) { /* z of this image, as the forward computed it (same code: bit for bit) */
                smooth_image(zb, zs, coef_f, vp, t, C, h, w);
                zb = zs;
            }
            for (int64_t o = 0; o < C; o++)
                for (int64_t i = 0; i < C; i++) grad_weight[o * C + i] += dot_lanes(gb + o * hw, zb + i * hw, hw);
        }
        if (grad_bias) {
            for (int64_t o = 0; o < C; o++) {
                const float *go = gb + o * hw;
                float s = 0.0f;
                for (int64_t p = 0; p < hw; p++) s += go[p];
                grad_bias[o] += s;
            }
        }
    }
}

/* ------------------------------------------------------------------------------- median SmoothBlock
 * The M2 block y = x + W median3x3(x) + b in one call each way: kornia's reflect border, the median
 * and its routing index (median3x3_forward), then the mixing and residual as above; the
 * backward routes W^T grad through the median (median3x3_backward), folds the padded gradient back
 * with the reflect border's transpose (raster order, as torch's reflection-pad backward adds) and
 * adds the residual's gradient. x, z, out, grad_x: (B, C, H, W); which: (B, C, H, W) uint8; pad:
 * (H + 2)(W + 2) floats, then the median's 2 H (W + 2) floats of scratch; work: as for smooth_mix_*. Returns 1 (nothing written that counts) if a map
 * holds a NaN: the caller takes the torch path. */
static void reflect_pad(const float *restrict v, float *restrict p, int64_t h, int64_t w) {
    const int64_t wp = w + 2;
    for (int64_t i = 0; i < h + 2; i++) {
        const int64_t si = i == 0 ? 1 : (i == h + 1 ? h - 2 : i - 1);
        const float *restrict row = v + si * w;
        float *restrict dst = p + i * wp;
        dst[0] = row[1];
        for (int64_t j = 0; j < w; j++) dst[j + 1] = row[j];
        dst[w + 1] = row[w - 2];
    }
}

int median_mix_forward(const float *x, const float *weight, const float *bias, float *z, uint8_t *which, float *out,
                       float *pad, float *work, int64_t B, int64_t C, int64_t h, int64_t w) {
    const int64_t hw = h * w;
    float *scratch = pad + (h + 2) * (w + 2);
    for (int64_t n = 0; n < B * C; n++) {
        reflect_pad(x + n * hw, pad, h, w);
        if (median3x3_forward(pad, z + n * hw, which ? which + n * hw : NULL, scratch, 1, h, w)) return 1;
    }
    smooth_mix_forward(x, weight, bias, NULL, NULL, z, out, work, B, C, h, w);
    return 0;
}

void median_mix_backward(const float *grad, const float *z, const uint8_t *which, const float *weight,
                         float *grad_x, float *grad_weight, float *grad_bias, float *pad, float *work, int64_t B,
                         int64_t C, int64_t h, int64_t w) {
    const int64_t hw = h * w, wp = w + 2;
    float *scratch = pad + (h + 2) * wp;
    smooth_mix_backward(grad, z, weight, NULL, NULL, NULL, NULL, grad_x, grad_weight, grad_bias, work, B, C, h, w);
    for (int64_t n = 0; n < B * C; n++) {
        float *gx = grad_x + n * hw;
        median3x3_backward(gx, which + n * hw, pad, scratch, 1, h, w); /* gx holds W^T grad, the gradient for z */
        for (int64_t p = 0; p < hw; p++) gx[p] = 0.0f;
        for (int64_t i = 0; i < h + 2; i++) {
            const int64_t si = i == 0 ? 1 : (i == h + 1 ? h - 2 : i - 1);
            const float *restrict src = pad + i * wp;
            float *restrict row = gx + si * w;
            row[1] += src[0];
            for (int64_t j = 0; j < w; j++) row[j] += src[j + 1];
            row[w - 2] += src[w + 1];
        }
        const float *restrict g = grad + n * hw;
        for (int64_t p = 0; p < hw; p++) gx[p] = g[p] + gx[p];
    }
}
