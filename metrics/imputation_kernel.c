/* Noisy linear imputation (PROTOCOL §3 "ROAD-AOPC"): the exact solve of metrics/_imputation_solver.py,
 * one plane at a time in C. Built on first use by metrics/_native.py and called through ctypes.
 *
 * The system, times 12 as in the torch solver: A v = diag * v - mask * T(v) = mask * T(known), with
 * T the [1, 2, 1] x [1, 2, 1] filter with zero padding, mask the removed pixels and diag = mask * T(1).
 * Same algorithm as the torch path: iterative refinement with the solution and the residual in
 * float64 and float32 conjugate-gradient corrections, each reducing the round's residual by
 * `inner_reduction` (bounded below by half the tolerance), until the float64 max-abs residual of
 * the plane is at most `tol` (of the unscaled system). The difference is the order of work: the
 * torch path runs ~12 element-wise passes per CG iteration over hundreds of planes at once; here
 * one plane's vectors (a few KiB at 28x28) stay in L1 for its whole solve, with four fused passes
 * per iteration and a convergence check every iteration. Both stop at the same residual bound, so
 * the two agree to the solve's tolerance, not bit for bit (tests/metrics/test_faithfulness.py).
 *
 * Layout of a plane: (H + 2) x (W + 2) with a zero border, flat, rounded up to a multiple of LANES,
 * with LANES zeros before and after (the stencil reads one element past each end of the border rows).
 * Reductions use LANES independent partial sums, so they vectorise without -ffast-math and give the
 * same result on every build.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16

/* t = the vertical [1, 2, 1] pass of v on rows 0..H+1 (row 0 / H+1 border rows read the zero margin
 * beyond them only through rows 1..H, which is all T needs), out = T(v) on rows 1..H. */
#define STENCIL(TYPE, NAME)                                                                           \
    static void NAME(const TYPE *restrict v, TYPE *restrict t, TYPE *restrict out, int64_t S, int64_t H) { \
        const int64_t lo = S - 1, hi = (H + 1) * S + 1;                                               \
        for (int64_t k = lo; k < hi; k++) t[k] = v[k - S] + v[k + S] + (TYPE)2 * v[k];                 \
        for (int64_t k = S; k < (H + 1) * S; k++) out[k] = t[k - 1] + t[k + 1] + (TYPE)2 * t[k];      \
    }
STENCIL(float, stencil_f)
STENCIL(double, stencil_d)

static double dot_f(const float *restrict a, const float *restrict b, int64_t n) {
    float acc[LANES] = {0};
    for (int64_t k = 0; k < n; k += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[k + l] * b[k + l];
    double s = 0.0;
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

static double maxabs_d(const double *restrict a, int64_t n) {
    double acc[LANES] = {0};
    for (int64_t k = 0; k < n; k += LANES)
        for (int l = 0; l < LANES; l++) {
            const double u = fabs(a[k + l]);
            acc[l] = u > acc[l] ? u : acc[l];
        }
    double m = 0.0;
    for (int l = 0; l < LANES; l++) m = acc[l] > m ? acc[l] : m;
    return m;
}

/* CG for A x = r0 (float32) from x = 0, until max|r| <= itol or maxiter. r holds r0 on entry. */
static void cg(float *restrict x, float *restrict r, float *restrict p, float *restrict t, float *restrict ap,
               const float *restrict mask, const float *restrict diag, int64_t n, int64_t S, int64_t H,
               float itol, int64_t maxiter) {
    memset(x, 0, n * sizeof(float));
    memcpy(p, r, n * sizeof(float));
    double rr = dot_f(r, r, n);
    float mx = 0.0f;
    for (int64_t k = 0; k < n; k++) mx = fabsf(r[k]) > mx ? fabsf(r[k]) : mx;
    for (int64_t it = 0; it < maxiter && mx > itol && rr > 0; it++) {
        stencil_f(p, t, ap, S, H);
        float acc[LANES] = {0};
        for (int64_t k = 0; k < n; k += LANES)
            for (int l = 0; l < LANES; l++) {
                const float q = diag[k + l] * p[k + l] - mask[k + l] * ap[k + l];
                ap[k + l] = q;
                acc[l] += p[k + l] * q;
            }
        double pap = 0.0;
        for (int l = 0; l < LANES; l++) pap += acc[l];
        if (!(pap > 0)) break;
        const float alpha = (float)(rr / pap);
        float sq[LANES] = {0}, m[LANES] = {0};
        for (int64_t k = 0; k < n; k += LANES)
            for (int l = 0; l < LANES; l++) {
                x[k + l] += alpha * p[k + l];
                const float u = r[k + l] - alpha * ap[k + l];
                r[k + l] = u;
                sq[l] += u * u;
                const float a = fabsf(u);
                m[l] = a > m[l] ? a : m[l];
            }
        double rr_new = 0.0;
        mx = 0.0f;
        for (int l = 0; l < LANES; l++) { rr_new += sq[l]; mx = m[l] > mx ? m[l] : mx; }
        const float beta = (float)(rr_new / rr);
        rr = rr_new;
        for (int64_t k = 0; k < n; k++) p[k] = r[k] + beta * p[k];
    }
}

/* planes: (count, H, W) float64, solved in place at the removed pixels (removed: (count, H, W), 1 =
 * removed). Returns the number of planes that did not reach tol within max_rounds rounds; *worst is
 * then the largest max-abs residual (unscaled) among them. -1 if memory ran out. */
int64_t impute_planes(double *planes, const uint8_t *removed, int64_t count, int64_t H, int64_t W, double tol,
                      int64_t max_rounds, int64_t maxiter, double inner_reduction, double *worst) {
    const int64_t S = W + 2, n = ((H + 2) * S + LANES - 1) / LANES * LANES, len = n + 2 * LANES;
    const double scale = 12.0, stol = tol * scale;
    /* float: p, t, ap, r, x, mask, diag; double: rhs, sol, res, td, vd (padded solution) */
    float *fbuf = calloc(7 * len, sizeof(float));
    double *dbuf = calloc(5 * len, sizeof(double));
    if (!fbuf || !dbuf) { free(fbuf); free(dbuf); return -1; }
    float *p = fbuf + LANES, *t = p + len, *ap = t + len, *r = ap + len, *x = r + len, *mask = x + len, *diag = mask + len;
    double *rhs = dbuf + LANES, *sol = rhs + len, *res = sol + len, *td = res + len, *vd = td + len;
    int64_t failed = 0;
    *worst = 0.0;
    for (int64_t c = 0; c < count; c++) {
        double *plane = planes + c * H * W;
        const uint8_t *rem = removed + c * H * W;
        int64_t unknown = 0;
        memset(vd - LANES, 0, len * sizeof(double));
        memset(mask, 0, n * sizeof(float));
        for (int64_t i = 0; i < H; i++)
            for (int64_t j = 0; j < W; j++) {
                const int64_t k = (i + 1) * S + j + 1;
                const int u = rem[i * W + j] != 0;
                unknown += u;
                mask[k] = (float)u;
                vd[k] = u ? 0.0 : plane[i * W + j]; /* the known pixels */
            }
        if (unknown == 0) continue;
        /* rhs = mask * T(known); diag = mask * T(1) */
        memset(rhs, 0, n * sizeof(double));
        stencil_d(vd, td, rhs, S, H);
        for (int64_t k = 0; k < n; k++) rhs[k] *= mask[k];
        memset(vd - LANES, 0, len * sizeof(double));
        for (int64_t i = 0; i < H; i++)
            for (int64_t j = 0; j < W; j++) vd[(i + 1) * S + j + 1] = 1.0;
        memset(res, 0, n * sizeof(double));
        stencil_d(vd, td, res, S, H);
        for (int64_t k = 0; k < n; k++) diag[k] = (float)(res[k] * mask[k]);
        /* refinement: sol = 0, res = rhs */
        memset(vd - LANES, 0, len * sizeof(double));
        memcpy(res, rhs, n * sizeof(double));
        memset(ap, 0, n * sizeof(float));
        double err = maxabs_d(res, n);
        int64_t round = 0;
        for (; err > stol && round < max_rounds; round++) {
            double itol = err * inner_reduction;
            if (itol < 0.5 * stol) itol = 0.5 * stol;
            for (int64_t k = 0; k < n; k++) r[k] = (float)res[k];
            cg(x, r, p, t, ap, mask, diag, n, S, H, (float)itol, maxiter);
            for (int64_t k = 0; k < n; k++) vd[k] += (double)x[k];
            /* res = rhs - (diag * sol - mask * T(sol)) */
            stencil_d(vd, td, sol, S, H);
            for (int64_t k = 0; k < n; k++) res[k] = rhs[k] - ((double)diag[k] * vd[k] - (double)mask[k] * sol[k]);
            err = maxabs_d(res, n);
        }
        if (err > stol) {
            failed++;
            if (err / scale > *worst) *worst = err / scale;
        }
        for (int64_t i = 0; i < H; i++)
            for (int64_t j = 0; j < W; j++)
                if (rem[i * W + j]) plane[i * W + j] = vd[(i + 1) * S + j + 1];
    }
    free(fbuf);
    free(dbuf);
    return failed;
}
