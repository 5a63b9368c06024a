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

/* max |a[k]|, with LANES partial maxima (vectorises without -ffast-math) */
#define MAXABS(TYPE, NAME, ABS)                                                                       \
    static TYPE NAME(const TYPE *restrict a, int64_t n) {                                             \
        TYPE acc[LANES] = {0};                                                                        \
        for (int64_t k = 0; k < n; k += LANES)                                                        \
            for (int l = 0; l < LANES; l++) {                                                         \
                const TYPE u = ABS(a[k + l]);                                                         \
                acc[l] = u > acc[l] ? u : acc[l];                                                     \
            }                                                                                         \
        TYPE m = 0;                                                                                   \
        for (int l = 0; l < LANES; l++) m = acc[l] > m ? acc[l] : m;                                  \
        return m;                                                                                     \
    }
MAXABS(double, maxabs_d, fabs)
MAXABS(float, maxabs_f, fabsf)

/* CG for A x = r0 (float32) from x = 0, until max|r| <= itol or maxiter. r holds r0 on entry. */
static void cg(float *restrict x, float *restrict r, float *restrict p, float *restrict t, float *restrict ap,
               const float *restrict mask, const float *restrict diag, int64_t n, int64_t S, int64_t H,
               float itol, int64_t maxiter) {
    memset(x, 0, n * sizeof(float));
    memcpy(p, r, n * sizeof(float));
    double rr = dot_f(r, r, n);
    float mx = maxabs_f(r, n);
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

/* ------------------------------------------------------------------------------------ multigrid
 * CG preconditioned with one symmetric geometric-multigrid V-cycle, as _pcg_mg / _vcycle of the torch
 * solver: on every level the operator m * (d v - T(v)) with d = T(1) on that grid and m the unknown
 * cells (a coarse cell is unknown when its four children are); damped Jacobi (omega) before and after
 * the coarse correction (`fine_sweeps` each way), `coarse_sweeps` sweeps on the coarsest grid; cell-centred bilinear
 * interpolation with replicated borders and its transpose. Levels are padded like the plane. */
typedef struct {
    int64_t h, w, S, n;
    float *mask, *d, *inv, *e, *r, *tmp, *t;
} level_t;

static void apply_level(const level_t *L, const float *restrict v, float *restrict out) {
    stencil_f(v, L->t, out, L->S, L->h);
    const float *restrict m = L->mask, *restrict d = L->d;
    for (int64_t k = L->S; k < (L->h + 1) * L->S; k++) out[k] = m[k] * (d[k] * v[k] - out[k]);
}

/* One damped Jacobi sweep, e += omega * inv * (r - A e), fused with the horizontal stencil pass. */
static void jacobi(const level_t *L, float omega) {
    const int64_t S = L->S, lo = S - 1, hi = (L->h + 1) * S + 1;
    float *restrict e = L->e, *restrict t = L->t;
    const float *restrict m = L->mask, *restrict d = L->d, *restrict inv = L->inv, *restrict r = L->r;
    for (int64_t k = lo; k < hi; k++) t[k] = e[k - S] + e[k + S] + 2.0f * e[k];
    for (int64_t k = S; k < hi - 1; k++) {
        const float ae = m[k] * (d[k] * e[k] - (t[k - 1] + t[k + 1] + 2.0f * t[k]));
        e[k] += omega * inv[k] * (r[k] - ae);
    }
}

/* out = r - A e (the level's residual), fused like jacobi. */
static void residual(const level_t *L, float *restrict out) {
    const int64_t S = L->S, lo = S - 1, hi = (L->h + 1) * S + 1;
    const float *restrict e = L->e, *restrict m = L->mask, *restrict d = L->d, *restrict r = L->r;
    float *restrict t = L->t;
    for (int64_t k = lo; k < hi; k++) t[k] = e[k - S] + e[k + S] + 2.0f * e[k];
    for (int64_t k = S; k < hi - 1; k++) out[k] = r[k] - m[k] * (d[k] * e[k] - (t[k - 1] + t[k + 1] + 2.0f * t[k]));
}

static inline int64_t clampi(int64_t i, int64_t hi) { return i < 0 ? 0 : (i > hi ? hi : i); }

/* coarse (I, J) = sum over fine rows 2I-1..2I+2 (weights 1, 3, 3, 1, replicated at the border) and the
 * same columns, / 16; times the coarse mask. Rows first (vectorised), then the columns of that row. */
static void restrict_to(const level_t *F, const float *restrict v, level_t *C) {
    float *restrict rr = F->t; /* a row of W values; F->t is free here */
    const int64_t W = F->w;
    for (int64_t I = 0; I < C->h; I++) {
        const float *r0 = v + (clampi(2 * I - 1, F->h - 1) + 1) * F->S + 1, *r1 = v + (2 * I + 1) * F->S + 1,
                    *r2 = r1 + F->S, *r3 = v + (clampi(2 * I + 2, F->h - 1) + 1) * F->S + 1;
        for (int64_t j = 0; j < W; j++) rr[j] = r0[j] + r3[j] + 3.0f * (r1[j] + r2[j]);
        float *restrict out = C->r + (I + 1) * C->S + 1;
        const float *restrict m = C->mask + (I + 1) * C->S + 1;
        const int64_t last = C->w - 1;
        out[0] = (rr[0] + rr[2] + 3.0f * (rr[0] + rr[1])) * (1.0f / 16.0f) * m[0];
        for (int64_t J = 1; J < last; J++)
            out[J] = (rr[2 * J - 1] + rr[2 * J + 2] + 3.0f * (rr[2 * J] + rr[2 * J + 1])) * (1.0f / 16.0f) * m[J];
        if (last > 0)
            out[last] = (rr[2 * last - 1] + rr[W - 1] + 3.0f * (rr[2 * last] + rr[2 * last + 1])) * (1.0f / 16.0f) * m[last];
    }
}

/* e_fine += mask * bilinear(u_coarse): fine (i, j) = (9 u[I,J] + 3 u[I,J'] + 3 u[I',J] + u[I',J']) / 16,
 * J' / I' the coarse neighbour on the side of j / i (replicated at the border). */
static void prolong_add(const level_t *C, const float *restrict u, level_t *F) {
    float *restrict c = C->t; /* a row of w values; C->t is free here */
    const int64_t w = C->w;
    for (int64_t i = 0; i < F->h; i++) {
        const int64_t I = i / 2, I2 = clampi(i % 2 ? I + 1 : I - 1, C->h - 1);
        const float *a = u + (I + 1) * C->S + 1, *b = u + (I2 + 1) * C->S + 1;
        for (int64_t J = 0; J < w; J++) c[J] = 3.0f * a[J] + b[J];
        float *restrict e = F->e + (i + 1) * F->S + 1;
        const float *restrict m = F->mask + (i + 1) * F->S + 1;
        e[0] += m[0] * ((3.0f * c[0] + c[0]) * (1.0f / 16.0f));
        for (int64_t J = 1; J < w; J++) e[2 * J] += m[2 * J] * ((3.0f * c[J] + c[J - 1]) * (1.0f / 16.0f));
        for (int64_t J = 0; J < w - 1; J++) e[2 * J + 1] += m[2 * J + 1] * ((3.0f * c[J] + c[J + 1]) * (1.0f / 16.0f));
        e[2 * w - 1] += m[2 * w - 1] * ((3.0f * c[w - 1] + c[w - 1]) * (1.0f / 16.0f));
    }
}

static void vcycle(level_t *lv, int depth, int nlev, float omega, int fine_sweeps, int coarse_sweeps) {
    level_t *L = lv + depth;
    const int coarsest = depth == nlev - 1;
    for (int64_t k = 0; k < L->n; k++) L->e[k] = omega * L->inv[k] * L->r[k];
    const int sweeps = coarsest ? coarse_sweeps : fine_sweeps;
    for (int s = 1; s < sweeps; s++) jacobi(L, omega);
    if (coarsest) return;
    residual(L, L->tmp);
    restrict_to(L, L->tmp, lv + depth + 1);
    vcycle(lv, depth + 1, nlev, omega, fine_sweeps, coarse_sweeps);
    prolong_add(lv + depth + 1, lv[depth + 1].e, L);
    for (int s = 0; s < sweeps; s++) jacobi(L, omega);
}

/* MG-preconditioned CG for A x = r0 from x = 0 until max|r| <= itol or maxiter; r (level 0's r) holds
 * r0 on entry; x, p, q: level-0-sized work vectors. */
static void pcg_mg(level_t *lv, int nlev, float *restrict x, float *restrict p, float *restrict q, float itol,
                   int64_t maxiter, float omega, int fine_sweeps, int coarse_sweeps) {
    level_t *L = lv;
    const int64_t n = L->n;
    float *r = L->r;
    /* the V-cycle overwrites level 0's r with nothing (it reads r, writes e): z = e */
    float *z = L->e;
    memset(x, 0, n * sizeof(float));
    vcycle(lv, 0, nlev, omega, fine_sweeps, coarse_sweeps);
    memcpy(p, z, n * sizeof(float));
    double rz = dot_f(r, z, n);
    for (int64_t it = 0; it < maxiter; it++) {
        if (maxabs_f(r, n) <= itol) break;
        apply_level(L, p, q);
        const double pq = dot_f(p, q, n);
        if (!(pq > 0)) break;
        const float alpha = (float)(rz / pq);
        for (int64_t k = 0; k < n; k++) { x[k] += alpha * p[k]; r[k] -= alpha * q[k]; }
        vcycle(lv, 0, nlev, omega, fine_sweeps, coarse_sweeps);
        const double rz_new = dot_f(r, z, n);
        const float beta = (float)(rz > 0 ? rz_new / rz : 0.0);
        rz = rz_new;
        for (int64_t k = 0; k < n; k++) p[k] = beta * p[k] + z[k];
    }
}

/* The multigrid hierarchy for grids of H x W (levels while both sides are even and half the shorter
 * side is at least `coarsest`); arrays zeroed. Returns the number of levels, 0 if memory ran out. */
#define MAX_LEVELS 24
static int build_levels(level_t *lv, int64_t H, int64_t W, int64_t coarsest, float **block) {
    int nlev = 0;
    int64_t h = H, w = W, total = 0;
    int64_t sizes[MAX_LEVELS];
    for (;;) {
        const int64_t S = w + 2, n = ((h + 2) * S + LANES - 1) / LANES * LANES;
        lv[nlev] = (level_t){h, w, S, n, 0, 0, 0, 0, 0, 0, 0};
        sizes[nlev] = n + 2 * LANES;
        total += 7 * sizes[nlev];
        nlev++;
        if (h % 2 || w % 2 || (h < w ? h : w) / 2 < coarsest || nlev == MAX_LEVELS) break;
        h /= 2;
        w /= 2;
    }
    float *buf = calloc(total, sizeof(float));
    if (!buf) return 0;
    *block = buf;
    for (int l = 0; l < nlev; l++) {
        float **arrays[7] = {&lv[l].mask, &lv[l].d, &lv[l].inv, &lv[l].e, &lv[l].r, &lv[l].tmp, &lv[l].t};
        for (int a = 0; a < 7; a++) { *arrays[a] = buf + LANES; buf += sizes[l]; }
        /* d = T(1) on this grid (zero padding) */
        float *ones = lv[l].tmp;
        for (int64_t i = 0; i < lv[l].h; i++)
            for (int64_t j = 0; j < lv[l].w; j++) ones[(i + 1) * lv[l].S + j + 1] = 1.0f;
        stencil_f(ones, lv[l].t, lv[l].d, lv[l].S, lv[l].h);
        memset(ones - LANES, 0, sizes[l] * sizeof(float));
    }
    return nlev;
}

/* The unknown cells of every level from level 0's mask, and inv = mask / (d - 4) (the diagonal). */
static void set_masks(level_t *lv, int nlev) {
    for (int l = 0; l < nlev; l++) {
        level_t *L = lv + l;
        if (l > 0) {
            const level_t *F = lv + l - 1;
            for (int64_t I = 0; I < L->h; I++)
                for (int64_t J = 0; J < L->w; J++) {
                    const float *a = F->mask + (2 * I + 1) * F->S + 2 * J + 1, *b = a + F->S;
                    float m = a[0] < a[1] ? a[0] : a[1];
                    m = b[0] < m ? b[0] : m;
                    m = b[1] < m ? b[1] : m;
                    L->mask[(I + 1) * L->S + J + 1] = m;
                }
        }
        for (int64_t k = 0; k < L->n; k++) L->inv[k] = L->mask[k] != 0.0f ? L->mask[k] / (L->d[k] - 4.0f) : 0.0f;
    }
}

/* planes: (count, H, W) float64, solved in place at the removed pixels (removed: (count, H, W), 1 =
 * removed). multigrid != 0: the corrections by MG-preconditioned CG (mg_* settings as in the torch
 * solver), else by plain CG. Returns the number of planes that did not reach tol within max_rounds
 * rounds; *worst is then the largest max-abs residual (unscaled) among them. -1 if memory ran out. */
int64_t impute_planes(double *planes, const uint8_t *removed, int64_t count, int64_t H, int64_t W, double tol,
                      int64_t max_rounds, int64_t maxiter, double inner_reduction, int64_t multigrid,
                      double mg_omega, int64_t mg_sweeps, int64_t mg_coarse_sweeps, int64_t mg_coarsest, double *worst) {
    const int64_t S = W + 2, n = ((H + 2) * S + LANES - 1) / LANES * LANES, len = n + 2 * LANES;
    const double scale = 12.0, stol = tol * scale;
    /* float: p, t, ap, r, x, mask, diag; double: rhs, sol, res, td, vd (padded solution) */
    float *fbuf = calloc(7 * len, sizeof(float));
    double *dbuf = calloc(5 * len, sizeof(double));
    level_t lv[MAX_LEVELS];
    float *lvbuf = NULL;
    const int nlev = multigrid ? build_levels(lv, H, W, mg_coarsest, &lvbuf) : 0;
    if (!fbuf || !dbuf || (multigrid && !nlev)) { free(fbuf); free(dbuf); free(lvbuf); return -1; }
    float *p = fbuf + LANES, *t = p + len, *ap = t + len, *r = ap + len, *x = r + len, *mask = x + len, *diag = mask + len;
    double *rhs = dbuf + LANES, *sol = rhs + len, *res = sol + len, *td = res + len, *vd = td + len;
    if (multigrid) {
        mask = lv[0].mask; /* level 0 is the plane's grid: share its mask, and its r for the residual */
        r = lv[0].r;
    }
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
        if (multigrid) set_masks(lv, nlev);
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
            if (multigrid)
                pcg_mg(lv, nlev, x, p, ap, (float)itol, maxiter, (float)mg_omega, (int)mg_sweeps, (int)mg_coarse_sweeps);
            else
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
    free(lvbuf);
    return failed;
}
