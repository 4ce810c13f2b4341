// Integration of normalized frames: per-pixel rejection and the weighted average.
//
// NumPy twin: nsg_gpu.combine.reject_combine (the specification; the definitions of every
// rejection method are in its docstring and in docs/stacking.md).
//
// Launch contract (nsg_gpu.kernels.launch_config, 1-D grid-stride, any grid and block):
//   reject_combine_f32  one item per pixel: n_pixels items.
//       values is (n_frames, n_pixels) float32, C order: frame i's sample of pixel p at
//       values[i * n_pixels + p]; 0 and non-finite samples are no data.
//       For every pixel the samples with data are sorted by (value, frame) into the scratch
//       columns sorted[j * n_pixels + p], order[j * n_pixels + p] (j < n, n = the coverage),
//       the method (0 none, 1 percentile, 2 sigma, 3 winsorized sigma, 4 generalized ESD,
//       5 linear fit, 6 noise; 7 auto: by n: none up to 2, noise below 8, then NSG's rule:
//       sigma up to 10, winsorized below 20, ESD from 20) rejects some of them with its thresholds
//       thresholds[2 * method] (low) and thresholds[2 * method + 1] (high), and
//       master[p]     = sum(w_i * x_i) / sum(w_i) over the kept samples (float32 of the double
//                       quotient; 0 without data), summed in frame order;
//       coverage[p]   = n; low_count[p], high_count[p] = samples rejected low and high;
//       flags[i * n_pixels + p] = 1 (rejected low), 2 (rejected high), else 0, for every frame.
//       esd_lambda[n * esd_stride + i] is the ESD critical value for n samples and test i
//       (rows 0 .. n_frames); work is (n_frames, n_pixels) double scratch, used by the linear
//       fit only (null otherwise). peak[p] and noise[p] (float32) are the pixel's peak and
//       noise for noise clipping, noise_scale[i] (double) frame i's noise over noise[p] (null:
//       frames of equal noise), with signal_share (null when no pixel is noise-clipped): a
//       sample of frame i is measured
//       against sqrt(noise[p]^2 f_i + (signal_share * peak[p])^2), f_i = (r_i^2 + q h) / (1 + q),
//       r_i = noise_scale[i], q = pi / (2 n), h = (n / sum_j 1 / r_j)^2 over the pixel's samples.
//       Every output item is written.
//   All statistics are in double with explicitly rounded products and sums (no FMA
//   contraction), in the twin's order, so the kernel equals its twin bit for bit.
#include "common.cuh"

#define METHOD_NONE 0
#define METHOD_PERCENTILE 1
#define METHOD_SIGMA 2
#define METHOD_WINSORIZED 3
#define METHOD_ESD 4
#define METHOD_LINEAR 5
#define METHOD_NOISE 6
#define METHOD_AUTO 7

// Iteration caps; the twin has the same (nsg_gpu.combine.HUBER_ITERATIONS, LAD_STEPS).
#define HUBER_ITERATIONS 100
#define LAD_STEPS 48

// One pixel's column of the scratch arrays: element j at base[j * stride].
struct Column {
    float* value;
    int* frame;
    index_t stride;
    __device__ __forceinline__ double x(index_t j) const { return (double)value[j * stride]; }
    __device__ __forceinline__ bool less(index_t a, index_t b) const {
        const float va = value[a * stride], vb = value[b * stride];
        return va < vb || (va == vb && frame[a * stride] < frame[b * stride]);
    }
    __device__ __forceinline__ void swap(index_t a, index_t b) const {
        const float v = value[a * stride];
        value[a * stride] = value[b * stride];
        value[b * stride] = v;
        const int f = frame[a * stride];
        frame[a * stride] = frame[b * stride];
        frame[b * stride] = f;
    }
};

__device__ __forceinline__ double sub(double a, double b) { return __dadd_rn(a, -b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }

// Sift-down of a max-heap on [0, n) rooted at i.
__device__ void sift_down(const Column& c, index_t i, index_t n) {
    for (;;) {
        index_t child = 2 * i + 1;
        if (child >= n) return;
        if (child + 1 < n && c.less(child, child + 1)) ++child;
        if (!c.less(i, child)) return;
        c.swap(i, child);
        i = child;
    }
}

// Sorts the column's first n entries by (value, frame): insertion sort for short columns,
// heapsort otherwise; the order is total, so both give the same result.
__device__ void sort_column(const Column& c, index_t n) {
    if (n <= 32) {
        for (index_t i = 1; i < n; ++i)
            for (index_t j = i; j > 0 && c.less(j, j - 1); --j) c.swap(j, j - 1);
        return;
    }
    for (index_t i = n / 2 - 1; i >= 0; --i) sift_down(c, i, n);
    for (index_t end = n - 1; end > 0; --end) {
        c.swap(0, end);
        sift_down(c, 0, end);
    }
}

__device__ __forceinline__ double median_of(const Column& c, index_t lo, index_t hi) {
    return mul(__dadd_rn(c.x((lo + hi - 1) / 2), c.x((lo + hi) / 2)), 0.5);
}

__device__ double mean_of(const Column& c, index_t lo, index_t hi) {
    double sum = 0.0;
    for (index_t j = lo; j < hi; ++j) sum = __dadd_rn(sum, c.x(j));
    return sum / (double)(hi - lo);
}

// Sample standard deviation (n - 1) about the mean, two passes.
__device__ double sigma_of(const Column& c, index_t lo, index_t hi) {
    const double mean = mean_of(c, lo, hi);
    double sum = 0.0;
    for (index_t j = lo; j < hi; ++j) {
        const double d = sub(c.x(j), mean);
        sum = __dadd_rn(sum, mul(d, d));
    }
    return sqrt(sum / (double)(hi - lo - 1));
}

// Median absolute deviation from mu on a sorted range: the distances grow outwards from mu on
// both sides, so the middle ones are found by a merge walk.
__device__ double mad_of(const Column& c, index_t lo, index_t hi, double mu) {
    const index_t n = hi - lo;
    index_t right = lo;
    while (right < hi && c.x(right) < mu) ++right;
    index_t left = right - 1;
    const index_t a = (n - 1) / 2, b = n / 2;
    double da = 0.0, db = 0.0;
    for (index_t k = 0; k <= b; ++k) {
        double d;
        if (left < lo) {
            d = sub(c.x(right++), mu);
        } else if (right >= hi) {
            d = sub(mu, c.x(left--));
        } else {
            const double dl = sub(mu, c.x(left)), dr = sub(c.x(right), mu);
            if (dr <= dl) {
                d = dr;
                ++right;
            } else {
                d = dl;
                --left;
            }
        }
        if (k == a) da = d;
        if (k == b) db = d;
    }
    return mul(__dadd_rn(da, db), 0.5);
}

// Huber winsorization of a sorted range: centre and sigma.
__device__ void winsorize(const Column& c, index_t lo, index_t hi, double cutoff, double* centre, double* sigma) {
    const index_t n = hi - lo;
    double mu = median_of(c, lo, hi);
    double s = mul(1.4826, mad_of(c, lo, hi, mu));
    for (int k = 0; k < HUBER_ITERATIONS; ++k) {
        if (1.0 + s == 1.0) break;
        const double t0 = sub(mu, mul(1.5, s)), t1 = __dadd_rn(mu, mul(1.5, s));
        const double c0 = sub(mu, mul(cutoff, s)), c1 = __dadd_rn(mu, mul(cutoff, s));
        double sum = 0.0;
        for (index_t j = lo; j < hi; ++j) {
            const double x = c.x(j);
            const double v = x < t0 ? (cutoff > 0.0 && x <= c0 ? mu : t0) : (x > t1 ? (cutoff > 0.0 && x >= c1 ? mu : t1) : x);
            sum = __dadd_rn(sum, v);
        }
        const double mean = sum / (double)n;
        double squares = 0.0;
        for (index_t j = lo; j < hi; ++j) {
            const double x = c.x(j);
            const double v = x < t0 ? (cutoff > 0.0 && x <= c0 ? mu : t0) : (x > t1 ? (cutoff > 0.0 && x >= c1 ? mu : t1) : x);
            const double d = sub(v, mean);
            squares = __dadd_rn(squares, mul(d, d));
        }
        const double previous = s;
        s = mul(1.134, sqrt(squares / (double)(n - 1)));
        mu = mean;
        if (k >= 1 && fabs(sub(previous, s)) / previous < 0.0005) break;
    }
    *centre = mu;
    *sigma = s;
}

// Moves lo up over the samples below centre by more than low * scale, and hi down over those
// above it by more than high * scale; a side that is not clipped stays.
__device__ __forceinline__ void clip_ends(const Column& c, index_t* lo, index_t* hi, double centre, double scale,
                                          double low, double high, int clip_low, int clip_high) {
    if (clip_low)
        while (*lo < *hi && sub(centre, c.x(*lo)) / scale > low) ++*lo;
    if (clip_high)
        while (*hi > *lo && sub(c.x(*hi - 1), centre) / scale > high) --*hi;
}

// Noise clipping: a sample's scale sqrt(sd^2 f + spread^2), f = (r^2 + q h) / (1 + q) from its
// frame's share r of the noise and the median's variance q h (the twin's _own_scales).
__device__ __forceinline__ double own_scale(double sd, double spread, double share, double qh, double norm) {
    const double s = mul(sd, sqrt(__dadd_rn(mul(share, share), qh) / norm));
    return sqrt(__dadd_rn(mul(s, s), mul(spread, spread)));
}

// Least-absolute-deviation line y = a + b*j through a column's first n values against their
// ranks j (the values are sorted, so b >= 0): bisection of b on the sign of
// sum_j j*sign(y_j - a(b) - b*j), a(b) = median(y_j - b*j), over [0, y_max - y_min].
__device__ double lad_intercept(const Column& c, double* work, index_t stride, index_t n, double b) {
    for (index_t j = 0; j < n; ++j) work[j * stride] = sub(c.x(j), mul(b, (double)j));
    // Heapsort of the residuals (any exact selection gives the same median).
    for (index_t i = n / 2 - 1; i >= 0; --i) {
        for (index_t r = i;;) {
            index_t child = 2 * r + 1;
            if (child >= n) break;
            if (child + 1 < n && work[child * stride] < work[(child + 1) * stride]) ++child;
            if (!(work[r * stride] < work[child * stride])) break;
            const double t = work[r * stride];
            work[r * stride] = work[child * stride];
            work[child * stride] = t;
            r = child;
        }
    }
    for (index_t end = n - 1; end > 0; --end) {
        double t = work[0];
        work[0] = work[end * stride];
        work[end * stride] = t;
        for (index_t r = 0;;) {
            index_t child = 2 * r + 1;
            if (child >= end) break;
            if (child + 1 < end && work[child * stride] < work[(child + 1) * stride]) ++child;
            if (!(work[r * stride] < work[child * stride])) break;
            t = work[r * stride];
            work[r * stride] = work[child * stride];
            work[child * stride] = t;
            r = child;
        }
    }
    return mul(__dadd_rn(work[((n - 1) / 2) * stride], work[(n / 2) * stride]), 0.5);
}

__device__ void lad_fit(const Column& c, double* work, index_t stride, index_t n, double* a, double* b,
                        double* adev) {
    const double range = sub(c.x(n - 1), c.x(0));
    double slope = 0.0;
    if (range > 0.0) {
        double bl = 0.0, bh = range;
        for (int step = 0; step < LAD_STEPS; ++step) {
            const double bm = mul(__dadd_rn(bl, bh), 0.5);
            const double am = lad_intercept(c, work, stride, n, bm);
            double g = 0.0;
            for (index_t j = 0; j < n; ++j) {
                const double r = sub(sub(c.x(j), mul(bm, (double)j)), am);
                g = __dadd_rn(g, r > 0.0 ? (double)j : (r < 0.0 ? -(double)j : 0.0));
            }
            if (g > 0.0)
                bl = bm;
            else
                bh = bm;
        }
        slope = mul(__dadd_rn(bl, bh), 0.5);
    }
    const double intercept = lad_intercept(c, work, stride, n, slope);
    double sum = 0.0;
    for (index_t j = 0; j < n; ++j) sum = __dadd_rn(sum, fabs(sub(sub(c.x(j), mul(slope, (double)j)), intercept)));
    *a = intercept;
    *b = slope;
    *adev = sum / (double)n;
}

extern "C" __global__ void reject_combine_f32(const float* __restrict__ values, const double* __restrict__ weights,
                                              index_t n_frames, index_t n_pixels, int method,
                                              const double* __restrict__ thresholds, int clip_low, int clip_high,
                                              double cutoff,
                                              const double* __restrict__ esd_lambda, index_t esd_stride,
                                              double esd_outliers, double esd_low_relaxation,
                                              const float* __restrict__ peak, const float* __restrict__ noise,
                                              const double* __restrict__ noise_scale, double signal_share, float* __restrict__ sorted, int* __restrict__ order,
                                              double* __restrict__ work, float* __restrict__ master,
                                              int* __restrict__ coverage, int* __restrict__ low_count,
                                              int* __restrict__ high_count, unsigned char* __restrict__ flags) {
    for (index_t p = grid_start(); p < n_pixels; p += grid_stride()) {
        const Column c{sorted + p, order + p, n_pixels};
        index_t n = 0;
        for (index_t i = 0; i < n_frames; ++i) {
            const float v = values[i * n_pixels + p];
            flags[i * n_pixels + p] = 0;
            if (v != 0.0f && v - v == 0.0f) {  // data: non-zero and finite
                c.value[n * n_pixels] = v;
                c.frame[n * n_pixels] = (int)i;
                ++n;
            }
        }
        sort_column(c, n);
        index_t lo = 0, hi = n;
        int rejected_low = 0, rejected_high = 0;
        int use = method;
        if (use == METHOD_AUTO)
            use = n <= 2 ? METHOD_NONE
                         : (n < 8 ? METHOD_NOISE
                                  : (n <= 10 ? METHOD_SIGMA : (n < 20 ? METHOD_WINSORIZED : METHOD_ESD)));
        const double low = thresholds[2 * use], high = thresholds[2 * use + 1];
        if (use == METHOD_PERCENTILE && n >= 3) {
            const double m = median_of(c, 0, n);
            if (1.0 + m != 1.0) clip_ends(c, &lo, &hi, m, m, low, high, clip_low, clip_high);
        } else if (use == METHOD_NOISE && n >= 3) {
            const double m = median_of(c, 0, n);
            const double spread = mul(signal_share, (double)peak[p]);
            const double sd = (double)noise[p];
            const double scale = sqrt(__dadd_rn(mul(sd, sd), mul(spread, spread)));
            if (1.0 + scale != 1.0 && noise_scale == nullptr) {  // frames of equal noise
                clip_ends(c, &lo, &hi, m, scale, low, high, clip_low, clip_high);
            } else if (1.0 + scale != 1.0) {
                double total = 0.0;  // sum of 1 / r over the samples, in frame order
                for (index_t i = 0; i < n_frames; ++i) {
                    const float v = values[i * n_pixels + p];
                    if (v != 0.0f && v - v == 0.0f) total = __dadd_rn(total, 1.0 / noise_scale[i]);
                }
                double h = (double)n / total;
                h = mul(h, h);
                const double q = 3.141592653589793 / mul(2.0, (double)n);
                const double qh = mul(q, h), norm = __dadd_rn(1.0, q);
                // From the outside in, each end against its own frame's noise.
                if (clip_low)
                    while (lo < hi &&
                           sub(m, c.x(lo)) / own_scale(sd, spread, noise_scale[c.frame[lo * c.stride]], qh, norm) > low)
                        ++lo;
                if (clip_high)
                    while (hi > lo && sub(c.x(hi - 1), m) /
                                              own_scale(sd, spread, noise_scale[c.frame[(hi - 1) * c.stride]], qh, norm) >
                                          high)
                        --hi;
            }
        } else if ((use == METHOD_SIGMA || use == METHOD_WINSORIZED) && n >= 3) {
            for (int it = 0;; ++it) {
                double centre, scale;
                if (use == METHOD_SIGMA) {
                    scale = sigma_of(c, lo, hi);
                    if (1.0 + scale == 1.0) break;
                    centre = median_of(c, lo, hi);
                } else {
                    winsorize(c, lo, hi, it == 0 ? cutoff : 0.0, &centre, &scale);
                    if (1.0 + scale == 1.0) break;
                }
                const index_t lo0 = lo, hi0 = hi;
                clip_ends(c, &lo, &hi, centre, scale, low, high, clip_low, clip_high);
                if (lo == lo0 && hi == hi0) break;
                if (hi - lo < 3) break;
            }
        } else if (use == METHOD_ESD && n >= 3) {
            index_t k = (index_t)(esd_outliers * (double)n);
            if (k > n - 2) k = n - 2;
            if (k < 1) k = 1;
            const double shift = median_of(c, 0, n);
            double s1 = 0.0, s2 = 0.0;
            for (index_t j = 0; j < n; ++j) {
                const double y = sub(c.x(j), shift);
                s1 = __dadd_rn(s1, y);
                s2 = __dadd_rn(s2, mul(y, y));
            }
            index_t best_lo = 0, best_hi = n;
            for (index_t i = 0; i < k; ++i) {
                const double count = (double)(hi - lo);
                const double mean = s1 / count;
                const double variance = sub(s2, mul(s1, mean)) / (count - 1.0);
                if (!(variance > 0.0)) break;
                const double sd = sqrt(variance);
                const double y_low = sub(c.x(lo), shift), y_high = sub(c.x(hi - 1), shift);
                const double d_low = sub(mean, y_low) / mul(sd, esd_low_relaxation);
                const double d_high = sub(y_high, mean) / sd;
                double statistic, y;
                if (d_high >= d_low) {
                    statistic = d_high;
                    y = y_high;
                    --hi;
                } else {
                    statistic = d_low;
                    y = y_low;
                    ++lo;
                }
                s1 = sub(s1, y);
                s2 = sub(s2, mul(y, y));
                if (statistic > esd_lambda[n * esd_stride + i]) {
                    best_lo = lo;
                    best_hi = hi;
                }
            }
            lo = clip_low ? best_lo : 0;
            hi = clip_high ? best_hi : n;
        } else if (use == METHOD_LINEAR && n >= 5) {
            index_t count = n;
            for (;;) {
                double a, b, adev;
                lad_fit(c, work + p, n_pixels, count, &a, &b, &adev);
                const double s = mul(mul(2.0, adev), sqrt(__dadd_rn(1.0, mul(b, b))));
                if (1.0 + s == 1.0) break;
                index_t kept = 0;
                for (index_t j = 0; j < count; ++j) {
                    const double x = c.x(j);
                    const double fit = __dadd_rn(a, mul(b, (double)j));
                    unsigned char flag = 0;
                    if (x < fit) {
                        if (clip_low && sub(fit, x) / s >= low) flag = 1;
                    } else if (clip_high && sub(x, fit) / s >= high) {
                        flag = 2;
                    }
                    if (flag) {
                        flags[(index_t)c.frame[j * n_pixels] * n_pixels + p] = flag;
                        if (flag == 1)
                            ++rejected_low;
                        else
                            ++rejected_high;
                    } else {
                        c.value[kept * n_pixels] = c.value[j * n_pixels];
                        c.frame[kept * n_pixels] = c.frame[j * n_pixels];
                        ++kept;
                    }
                }
                if (kept == count) break;
                count = kept;
                if (count < 3) break;
            }
            lo = 0;
            hi = count;
            n = count;  // the rejected samples are flagged already and no longer in the column
        }
        if (hi <= lo) {  // a method never rejects every sample of a pixel: it keeps them all
            lo = 0;
            hi = n;
        }
        for (index_t j = 0; j < lo; ++j) flags[(index_t)c.frame[j * n_pixels] * n_pixels + p] = 1;
        for (index_t j = hi; j < n; ++j) flags[(index_t)c.frame[j * n_pixels] * n_pixels + p] = 2;
        rejected_low += (int)lo;
        rejected_high += (int)(n - hi);
        // The average in frame order (the twin's, which then needs no gather by frame).
        double sum = 0.0, total = 0.0;
        for (index_t i = 0; i < n_frames; ++i) {
            const float v = values[i * n_pixels + p];
            if (v != 0.0f && v - v == 0.0f && flags[i * n_pixels + p] == 0) {
                sum = __dadd_rn(sum, mul(weights[i], (double)v));
                total = __dadd_rn(total, weights[i]);
            }
        }
        master[p] = total > 0.0 ? (float)(sum / total) : 0.0f;
        coverage[p] = rejected_low + rejected_high + (int)(hi - lo);
        low_count[p] = rejected_low;
        high_count[p] = rejected_high;
    }
}
