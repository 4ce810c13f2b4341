// Background samples: the median of every bin, ignoring no-data and saturated pixels.
//
// NumPy twin: nsg_gpu.samples.bin_statistics.
//
// Launch contract (nsg_gpu.kernels.launch_config, 1-D grid-stride, any grid and block):
//   bin_medians_f32    one item per (channel, bin row, bin column): channels*n_rows*n_cols.
//       data is (channels, height, width) float32, C order. The bins are size x size squares
//       from (x0, y0); the "crop" is the n_rows*size x n_cols*size region they tile.
//       medians[item] = median of the bin's pixels v with 0 < v < white_level on its stride
//       sub-grid (every stride-th pixel of every stride-th row from the bin's corner; the mean
//       of the two middle values, in float32, for an even count; NaN with none), as double.
//       nodata[item]  = pixels of the bin in a no-data region: zeros that survive a 3x3
//       binary opening of (crop == 0) within the crop (scattered zeros do not count), over
//       every pixel of the bin whatever the stride.
//       Every item is written. The median is found by radix selection on the float bits, a
//       byte per pass: 4 passes over the bin (5 for an even count), a 256-entry histogram per
//       thread and no scratch memory in global memory.
#include "common.cuh"

// A zero pixel of the crop at (cy, cx) belongs to a no-data region when some 3x3 square of
// zeros inside the crop contains it (the opening of SciPy with border_value 0).
__device__ __forceinline__ bool in_nodata_region(const float* plane, index_t width, index_t x0, index_t y0,
                                                 index_t crop_h, index_t crop_w, index_t cy, index_t cx) {
    for (index_t py = cy - 1; py <= cy + 1; ++py) {
        if (py < 1 || py > crop_h - 2) continue;
        for (index_t px = cx - 1; px <= cx + 1; ++px) {
            if (px < 1 || px > crop_w - 2) continue;
            bool all_zero = true;
            for (index_t qy = py - 1; qy <= py + 1 && all_zero; ++qy)
                for (index_t qx = px - 1; qx <= px + 1; ++qx)
                    if (plane[(y0 + qy) * width + x0 + qx] != 0.0f) { all_zero = false; break; }
            if (all_zero) return true;
        }
    }
    return false;
}

extern "C" __global__ void bin_medians_f32(const float* __restrict__ data, index_t channels, index_t height,
                                           index_t width, index_t size, index_t stride, index_t x0, index_t y0,
                                           index_t n_cols,
                                           index_t n_rows, float white_level, double* __restrict__ medians,
                                           int* __restrict__ nodata) {
    const index_t n = channels * n_rows * n_cols;
    const index_t crop_h = n_rows * size;
    const index_t crop_w = n_cols * size;
    for (index_t item = grid_start(); item < n; item += grid_stride()) {
        const index_t c = item / (n_rows * n_cols);
        const index_t row = (item / n_cols) % n_rows;
        const index_t col = item % n_cols;
        const float* plane = data + c * height * width;
        const index_t by = row * size, bx = col * size;
        // Pass 1: usable count, the no-data count, and the histogram of the top byte.
        unsigned int histogram[256];
        for (int d = 0; d < 256; ++d) histogram[d] = 0;
        index_t count = 0;
        int regions = 0;
        for (index_t dy = 0; dy < size; ++dy) {
            const float* line = plane + (y0 + by + dy) * width + x0 + bx;
            for (index_t dx = 0; dx < size; ++dx) {
                const float v = line[dx];
                if (v > 0.0f && v < white_level) {
                    if (dy % stride != 0 || dx % stride != 0) continue;
                    ++count;
                    ++histogram[float_bits(v) >> 24];
                } else if (v == 0.0f && in_nodata_region(plane, width, x0, y0, crop_h, crop_w, by + dy, bx + dx)) {
                    ++regions;
                }
            }
        }
        nodata[item] = regions;
        if (count == 0) {
            medians[item] = __int_as_float(0x7fc00000);  // NaN
            continue;
        }
        // Radix selection of the lower middle value, a byte of its bits per pass (the values
        // are positive, so their bits are ordered like them).
        const index_t rank = (count - 1) / 2;
        unsigned int prefix = 0;
        index_t below = 0;  // usable values under the prefix chosen so far
        index_t equal = 0;
        for (int shift = 24;; shift -= 8) {
            int digit = 0;
            while (below + (index_t)histogram[digit] <= rank) below += histogram[digit++];
            prefix |= (unsigned int)digit << shift;
            equal = histogram[digit];
            if (shift == 0) break;
            for (int d = 0; d < 256; ++d) histogram[d] = 0;
            for (index_t dy = 0; dy < size; dy += stride) {
                const float* line = plane + (y0 + by + dy) * width + x0 + bx;
                for (index_t dx = 0; dx < size; dx += stride) {
                    const float v = line[dx];
                    const unsigned int b = float_bits(v);
                    if (v > 0.0f && v < white_level && (b >> shift) == (prefix >> shift))
                        ++histogram[(b >> (shift - 8)) & 255u];
                }
            }
        }
        const index_t at_or_below = below + equal;
        const float lower = bits_float((int)prefix);
        float upper = lower;
        if (count % 2 == 0) {
            if (at_or_below < rank + 2) {  // the upper middle is the next larger value
                upper = white_level;
                for (index_t dy = 0; dy < size; dy += stride) {
                    const float* line = plane + (y0 + by + dy) * width + x0 + bx;
                    for (index_t dx = 0; dx < size; dx += stride) {
                        const float v = line[dx];
                        if (v > lower && v < upper) upper = v;
                    }
                }
            }
        }
        medians[item] = (double)__fmul_rn(__fadd_rn(lower, upper), 0.5f);
    }
}
