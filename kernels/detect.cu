// Star detection: the matched filter and the peaks above threshold.
//
// NumPy twins: nsg_gpu.stars.matched_filter (scipy.ndimage.gaussian_filter, mode="constant")
// and nsg_gpu.stars.find_peaks (local maxima above a threshold, inside the data).
//
// Launch contract (nsg_gpu.kernels.launch_config, 1-D grid-stride, any grid and block):
//   convolve_axis_f32  one item per pixel, height*width items.
//       out[y, x] = sum_j w[|j|] in[y + j, x]   (axis 0)  or  in[y, x + j]   (axis 1),
//       zero outside the image, w[0..radius] the half of a symmetric kernel (double). The
//       sum is taken in double in SciPy's order (centre, then the pairs inward-out) and
//       rounded to float32 once, so the result equals SciPy's correlate1d. `in` and `out`
//       must not overlap; the Gaussian is two launches, axis 0 first, as SciPy does.
//   find_peaks_f32     one item per pixel, height*width items.
//       peaks[y, x] = 1 where matched > threshold, matched is the maximum of its
//       (2*half+1)^2 window, the pixel is at least `margin` from every image edge and every
//       pixel of image within `margin` (Chebyshev) is > 0; else 0. Every item is written.
#include "common.cuh"

extern "C" __global__ void convolve_axis_f32(const float* __restrict__ in, float* __restrict__ out,
                                             index_t height, index_t width,
                                             const double* __restrict__ weights, int radius, int axis) {
    const index_t n = height * width;
    for (index_t i = grid_start(); i < n; i += grid_stride()) {
        const index_t y = i / width;
        const index_t x = i - y * width;
        const index_t pos = axis == 0 ? y : x;
        const index_t len = axis == 0 ? height : width;
        const index_t step = axis == 0 ? width : 1;
        double sum = __dmul_rn((double)in[i], weights[0]);
        for (int j = 1; j <= radius; ++j) {
            const double ahead = pos + j < len ? (double)in[i + j * step] : 0.0;
            const double behind = pos - j >= 0 ? (double)in[i - j * step] : 0.0;
            sum = __dadd_rn(sum, __dmul_rn(__dadd_rn(ahead, behind), weights[j]));
        }
        out[i] = (float)sum;
    }
}

extern "C" __global__ void find_peaks_f32(const float* __restrict__ matched, const float* __restrict__ image,
                                          unsigned char* __restrict__ peaks, index_t height, index_t width,
                                          float threshold, int half, int margin) {
    const index_t n = height * width;
    for (index_t i = grid_start(); i < n; i += grid_stride()) {
        const index_t y = i / width;
        const index_t x = i - y * width;
        unsigned char peak = 0;
        const float value = matched[i];
        if (y >= margin && y < height - margin && x >= margin && x < width - margin && value > threshold) {
            peak = 1;
            // margin >= half is required by the caller, so the window lies inside the image.
            for (index_t dy = -half; dy <= half && peak; ++dy)
                for (index_t dx = -half; dx <= half; ++dx)
                    if (matched[i + dy * width + dx] > value) { peak = 0; break; }
            for (index_t dy = -margin; dy <= margin && peak; ++dy)
                for (index_t dx = -margin; dx <= margin; ++dx)
                    if (!(image[i + dy * width + dx] > 0.0f)) { peak = 0; break; }
        }
        peaks[i] = peak;
    }
}
