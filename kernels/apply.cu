// The apply step, m*T - G where T != 0, fused with what the noise estimate needs.
//
// NumPy twins: nsg_gpu.apply.apply_gradient (output and its maximum) and
// nsg_gpu.noise.wavelet_layer_rows (the first B3 a-trous layer on every row_stride-th row,
// with its validity), which nsg_gpu.noise.ksigma_clip turns into the noise.
//
// Launch contract (nsg_gpu.kernels.launch_config, 1-D grid-stride, any grid and block):
//   apply_gradient_f32  one item per pixel of every channel: channels*height*width items.
//       out = m_c * T - G where T != 0, else 0 (float32 product, then float32 difference);
//       with truncate != 0 the covered pixels are then clipped to [0, white_level].
//       high[t] = the largest value before clipping seen by thread t (grid*block entries;
//       -inf for a thread without items); the frame's maximum is their maximum.
//       When layer is not null, the same launch also writes, for every channel c and every
//       selected row y = j * row_stride, layer[c, j, x] = out - smooth(out) and
//       valid[c, j, x] = (the 5x5 window around (y, x) is inside the image and out > 0 there),
//       recomputing out from T and G for the neighbours so that no second pass is needed.
//   noise_layer_f32     one item per selected pixel: n_selected_rows*width items, for a single
//       image (height, width): layer and valid as above, of the image itself.
//   smooth is the separable B3 spline (1 4 6 4 1)/16 with SciPy's "reflect" boundary, rows
//   (axis 1) first, each pass summed in double and rounded to float32 like scipy.ndimage.
//   Every output item is written.
#include "common.cuh"

__device__ __forceinline__ float normalized_pixel(float t, float g, float m, float white_level, int truncate) {
    if (t == 0.0f) return 0.0f;
    float v = __fsub_rn(__fmul_rn(m, t), g);
    if (truncate) v = fminf(fmaxf(v, 0.0f), white_level);
    return v;
}

// One source image: the plain image, or the normalized frame recomputed from T and G.
struct PlainSource {
    const float* image;
    __device__ __forceinline__ float operator()(index_t y, index_t x, index_t width) const {
        return image[y * width + x];
    }
};

struct NormalizedSource {
    const float* data;
    const float* gradient;
    float m, white_level;
    int truncate;
    __device__ __forceinline__ float operator()(index_t y, index_t x, index_t width) const {
        const index_t i = y * width + x;
        return normalized_pixel(data[i], gradient[i], m, white_level, truncate);
    }
};

template <class Source>
__device__ __forceinline__ void layer_at(const Source& src, index_t height, index_t width, index_t y, index_t x,
                                         float* layer, unsigned char* valid) {
    const double w0 = 6.0 / 16.0, w1 = 4.0 / 16.0, w2 = 1.0 / 16.0;
    // Inside the image by 2 px the reflected reads are exactly the 5x5 window, so the same
    // 25 values decide the validity (every one > 0); nearer the edge the pixel is invalid.
    const bool inside = y >= 2 && y < height - 2 && x >= 2 && x < width - 2;
    bool positive = true;
    float rows[5];
    for (int j = -2; j <= 2; ++j) {
        const index_t r = reflect_index(y + j, height);
        const float c0 = src(r, x, width);
        const float a1 = src(r, reflect_index(x + 1, width), width), b1 = src(r, reflect_index(x - 1, width), width);
        const float a2 = src(r, reflect_index(x + 2, width), width), b2 = src(r, reflect_index(x - 2, width), width);
        positive = positive && c0 > 0.0f && a1 > 0.0f && b1 > 0.0f && a2 > 0.0f && b2 > 0.0f;
        const double l1 = __dadd_rn((double)a1, (double)b1);
        const double l2 = __dadd_rn((double)a2, (double)b2);
        rows[j + 2] = (float)__dadd_rn(__dadd_rn(__dmul_rn((double)c0, w0), __dmul_rn(l1, w1)), __dmul_rn(l2, w2));
    }
    const double smooth = __dadd_rn(__dadd_rn(__dmul_rn((double)rows[2], w0),
                                              __dmul_rn(__dadd_rn((double)rows[3], (double)rows[1]), w1)),
                                    __dmul_rn(__dadd_rn((double)rows[4], (double)rows[0]), w2));
    *layer = __fsub_rn(src(y, x, width), (float)smooth);
    *valid = inside && positive ? 1 : 0;
}

extern "C" __global__ void apply_gradient_f32(const float* __restrict__ data, const float* __restrict__ gradient,
                                              const float* __restrict__ scale, index_t channels, index_t height,
                                              index_t width, float white_level, int truncate,
                                              float* __restrict__ out, float* __restrict__ high,
                                              index_t row_stride, float* __restrict__ layer,
                                              unsigned char* __restrict__ valid) {
    const index_t plane = height * width;
    const index_t n = channels * plane;
    float largest = __int_as_float(0xff800000);  // -inf
    for (index_t i = grid_start(); i < n; i += grid_stride()) {
        const float t = data[i];
        const float v = t == 0.0f ? 0.0f : __fsub_rn(__fmul_rn(scale[i / plane], t), gradient[i]);
        largest = fmaxf(largest, v);
        out[i] = truncate && t != 0.0f ? fminf(fmaxf(v, 0.0f), white_level) : v;
    }
    high[grid_start()] = largest;
    if (layer == nullptr) return;
    const index_t rows = (height + row_stride - 1) / row_stride;
    const index_t n_layer = channels * rows * width;
    for (index_t i = grid_start(); i < n_layer; i += grid_stride()) {
        const index_t c = i / (rows * width);
        const index_t j = (i / width) % rows;
        const index_t x = i % width;
        NormalizedSource src{data + c * plane, gradient + c * plane, scale[c], white_level, truncate};
        layer_at(src, height, width, j * row_stride, x, layer + i, valid + i);
    }
}

extern "C" __global__ void noise_layer_f32(const float* __restrict__ image, index_t height, index_t width,
                                           index_t row_stride, float* __restrict__ layer,
                                           unsigned char* __restrict__ valid) {
    const index_t rows = (height + row_stride - 1) / row_stride;
    const index_t n = rows * width;
    PlainSource src{image};
    for (index_t i = grid_start(); i < n; i += grid_stride()) {
        const index_t j = i / width;
        const index_t x = i - j * width;
        layer_at(src, height, width, j * row_stride, x, layer + i, valid + i);
    }
}
