// Thin-plate spline evaluated exactly at every pixel (no coarse grid).
//
// NumPy twin: nsg_gpu.spline.SurfaceSpline.__call__ (and evaluate_image with step=1).
//
// Launch contract (nsg_gpu.kernels.launch_config, 1-D grid-stride, any grid and block):
//   tps_eval_f32       one item per group of TPS_PIXELS consecutive pixels of a row:
//                      height * ceil(width / TPS_PIXELS) items.
//       out[y, x] = a0 + a1 u + a2 v + sum_i c_i phi(|(u, v) - (u_i, v_i)|), as float32, with
//       u = (x - centre_x) / scale, v = (y - centre_y) / scale (the twin's normalization) and
//       phi(r) = r^2 ln r. nodes[i] = (u_i, v_i, c_i * ln(2) / 2, 0) as float4, so that
//       c_i phi = nodes[i].z * r^2 log2(r^2): one special-function op (lg2) per node and pixel.
//       Node terms are summed in float32 over blocks of TPS_BLOCK nodes and the blocks in double.
//       Every pixel is written.
#include "common.cuh"

#define TPS_PIXELS 4
#define TPS_BLOCK 64

extern "C" __global__ void tps_eval_f32(const float4* __restrict__ nodes, index_t n_nodes, double centre_x,
                                        double centre_y, double scale, double a0, double a1, double a2,
                                        index_t height, index_t width, float* __restrict__ out) {
    const index_t groups_per_row = (width + TPS_PIXELS - 1) / TPS_PIXELS;
    const index_t n = height * groups_per_row;
    for (index_t item = grid_start(); item < n; item += grid_stride()) {
        const index_t y = item / groups_per_row;
        const index_t x_first = (item - y * groups_per_row) * TPS_PIXELS;
        const double v = ((double)y - centre_y) / scale;
        const float vf = (float)v;
        double u[TPS_PIXELS];
        float uf[TPS_PIXELS];
        double total[TPS_PIXELS];
        for (int k = 0; k < TPS_PIXELS; ++k) {
            u[k] = ((double)(x_first + k) - centre_x) / scale;
            uf[k] = (float)u[k];
            total[k] = 0.0;
        }
        for (index_t start = 0; start < n_nodes; start += TPS_BLOCK) {
            const index_t stop = start + TPS_BLOCK < n_nodes ? start + TPS_BLOCK : n_nodes;
            float partial[TPS_PIXELS];
            for (int k = 0; k < TPS_PIXELS; ++k) partial[k] = 0.0f;
            for (index_t i = start; i < stop; ++i) {
                const float4 node = __ldg(&nodes[i]);
                const float dv = vf - node.y;
                // The tiny offset keeps log2 finite at a node, where the term is 0 anyway.
                const float dv2 = fmaf(dv, dv, 1e-30f);
                for (int k = 0; k < TPS_PIXELS; ++k) {
                    const float du = uf[k] - node.x;
                    const float r2 = fmaf(du, du, dv2);
                    partial[k] = fmaf(node.z, r2 * fast_log2(r2), partial[k]);
                }
            }
            for (int k = 0; k < TPS_PIXELS; ++k) total[k] += (double)partial[k];
        }
        for (int k = 0; k < TPS_PIXELS; ++k) {
            if (x_first + k < width) out[y * width + x_first + k] = (float)(a0 + a1 * u[k] + a2 * v + total[k]);
        }
    }
}
