/* SSIM of saliency maps (metrics/stability.py, ssim), as skimage.metrics.structural_similarity computes
 * it with a uniform window: sample covariances, mean over the valid region (the border of
 * (win - 1) / 2 pixels dropped). Built on first use by metrics/_native.py and called through ctypes
 * on contiguous float32 CPU tensors. Window sums in float64: along rows (win taps, vectorised over
 * the columns), then down columns; the clean map's sums once for all S noisy copies. One pass per
 * plane over data that stays in cache, where the torch path makes ~30 float64 passes per pair.
 * Equal to the torch path to float64 rounding (tests/metrics/test_stability.py).
 */
#include <stdint.h>

/* Window sums along rows (window win, valid columns vw) of x and x*x. */
static void rows_x(const float *restrict x, double *restrict r1, double *restrict r2,
                   int64_t h, int64_t w, int64_t vw, int64_t win) {
    for (int64_t i = 0; i < h; i++) {
        double *restrict a = r1 + i * vw, *restrict b = r2 + i * vw;
        const float *xi = x + i * w;
        for (int64_t j = 0; j < vw; j++) { a[j] = 0.0; b[j] = 0.0; }
        for (int64_t k = 0; k < win; k++) {
            const float *xk = xi + k;
            for (int64_t j = 0; j < vw; j++) { const double u = xk[j]; a[j] += u; b[j] += u * u; }
        }
    }
}
/* Window sums along rows of y, y*y and x*y. */
static void rows_y(const float *restrict x, const float *restrict y, double *restrict r1, double *restrict r2,
                   double *restrict r3, int64_t h, int64_t w, int64_t vw, int64_t win) {
    for (int64_t i = 0; i < h; i++) {
        double *restrict a = r1 + i * vw, *restrict b = r2 + i * vw, *restrict c = r3 + i * vw;
        const float *xi = x + i * w, *yi = y + i * w;
        for (int64_t j = 0; j < vw; j++) { a[j] = 0.0; b[j] = 0.0; c[j] = 0.0; }
        for (int64_t k = 0; k < win; k++) {
            const float *xk = xi + k, *yk = yi + k;
            for (int64_t j = 0; j < vw; j++) {
                const double u = xk[j], v = yk[j];
                a[j] += v; b[j] += v * v; c[j] += u * v;
            }
        }
    }
}
/* Window sums down columns of a (h, vw) plane of row sums: s (vh, vw). */
static void cols(const double *restrict r, double *restrict s, int64_t vh, int64_t vw, int64_t win) {
    for (int64_t i = 0; i < vh; i++) {
        double *restrict si = s + i * vw;
        for (int64_t j = 0; j < vw; j++) si[j] = 0.0;
        for (int64_t k = 0; k < win; k++) {
            const double *rk = r + (i + k) * vw;
            for (int64_t j = 0; j < vw; j++) si[j] += rk[j];
        }
    }
}
/* a: (B, h, w); bs: (S, B, h, w); out: (S, B); c1, c2: the SSIM constants for window sums (times
 * n^2, n = win^2); work: 3 h (w - win + 1) + 5 (h - win + 1)(w - win + 1) doubles. */
void ssim_stack(const float *a, const float *bs, double *out, int64_t S, int64_t B, int64_t h, int64_t w,
                int64_t win, double c1, double c2, double *work) {
    const int64_t vh = h - win + 1, vw = w - win + 1, plane = h * w, hv = h * vw, vv = vh * vw;
    const double n = (double)(win * win), cov = n / (n - 1);
    double *r1 = work, *r2 = r1 + hv, *r3 = r2 + hv;
    double *sx = r3 + hv, *sxx = sx + vv, *sy = sxx + vv, *syy = sy + vv, *sxy = syy + vv;
    for (int64_t b = 0; b < B; b++) {
        const float *x = a + b * plane;
        rows_x(x, r1, r2, h, w, vw, win);
        cols(r1, sx, vh, vw, win); cols(r2, sxx, vh, vw, win);
        for (int64_t s = 0; s < S; s++) {
            const float *y = bs + (s * B + b) * plane;
            rows_y(x, y, r1, r2, r3, h, w, vw, win);
            cols(r1, sy, vh, vw, win); cols(r2, syy, vh, vw, win); cols(r3, sxy, vh, vw, win);
            double acc = 0;
            for (int64_t i = 0; i < vv; i++) {
                const double X = sx[i], Y = sy[i], sxsy = X * Y, q = X * X + Y * Y;
                const double num = (2 * sxsy + c1) * (2 * cov * (n * sxy[i] - sxsy) + c2);
                const double den = (q + c1) * (cov * (n * (sxx[i] + syy[i]) - q) + c2);
                acc += num / den;
            }
            out[s * B + b] = acc / (double)vv;
        }
    }
}
