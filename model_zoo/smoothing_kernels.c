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

/* xp: (planes, h + 2, w + 2) padded input; med: (planes, h, w); which: (planes, h, w) or NULL.
 * Two straight-line loops per row (the value, then the routing) so that the compiler vectorises
 * them over x: the data-dependent branches of a sort would be mispredicted on real maps. */
int median3x3_forward(const float *xp, float *med, uint8_t *which, int64_t planes, int64_t h, int64_t w) {
    const int64_t wp = w + 2, plane_in = (h + 2) * wp, plane_out = h * w;
    for (int64_t n = 0; n < planes; n++) {
        const float *src = xp + n * plane_in;
        float *dst = med + n * plane_out;
        int nan = 0;
        for (int64_t i = 0; i < plane_in; i++) nan |= src[i] != src[i];
        if (nan) return 1;  /* the caller falls back to the torch path, which propagates NaN */
        for (int64_t y = 0; y < h; y++) {
            const float *r0 = src + y * wp, *r1 = r0 + wp, *r2 = r1 + wp;
            float *d = dst + y * w;
            for (int64_t x = 0; x < w; x++) {
                float v[9] = {r0[x], r0[x + 1], r0[x + 2], r1[x], r1[x + 1], r1[x + 2], r2[x], r2[x + 1], r2[x + 2]};
                d[x] = median9(v);
            }
            if (!which) continue;
            uint8_t *wd = which + n * plane_out + y * w;
            for (int64_t x = 0; x < w; x++) {
                const float m = d[x];
                const float v[9] = {r0[x], r0[x + 1], r0[x + 2], r1[x], r1[x + 1], r1[x + 2], r2[x], r2[x + 1], r2[x + 2]};
                int less = 0;
                for (int k = 0; k < 9; k++) less += v[k] < m;
                const int target = 4 - less;
                int seen = 0, k_sel = 0;
                for (int k = 0; k < 9; k++) {
                    const int eq = v[k] == m;
                    k_sel = (eq & (seen == target)) ? k : k_sel;
                    seen += eq;
                }
                wd[x] = (uint8_t)k_sel;
            }
        }
    }
    return 0;
}

/* grad, which: (planes, h, w); gp: (planes, h + 2, w + 2), fully written. Per plane: zero, then
 * nine masked shifted additions in k order, the torch path's additions in the torch path's order. */
void median3x3_backward(const float *grad, const uint8_t *which, float *gp, int64_t planes, int64_t h, int64_t w) {
    const int64_t wp = w + 2, plane_out = h * w, plane_in = (h + 2) * wp;
    for (int64_t n = 0; n < planes; n++) {
        const float *g = grad + n * plane_out;
        const uint8_t *wh = which + n * plane_out;
        float *dst = gp + n * plane_in;
        for (int64_t i = 0; i < plane_in; i++) dst[i] = 0.0f;
        for (int k = 0; k < 9; k++) {
            const int64_t di = k / 3, dj = k % 3;
            for (int64_t y = 0; y < h; y++) {
                float *restrict drow = dst + (y + di) * wp + dj;
                const float *restrict grow = g + y * w;
                const uint8_t *restrict wrow = wh + y * w;
                const uint8_t kk = (uint8_t)k;
                for (int64_t x = 0; x < w; x++) {
                    const float gv = grow[x];  /* loaded unconditionally, so the select vectorises */
                    drow[x] += wrow[x] == kk ? gv : 0.0f;
                }
            }
        }
    }
}

