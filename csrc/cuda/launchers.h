// Host launchers of the fcnfast CUDA kernels (csrc/cuda/<op>.cu).
//
// Torch-free: raw device pointers, int32 sizes, a stream; every launcher
// returns the cudaError_t of its launches (cudaSuccess for empty work). The
// caller (csrc/cuda/bindings_cuda.cpp) validates arguments, checks that every
// tensor fits 32-bit indexing, makes tensors contiguous (NCHW) and allocates
// the outputs; launchers never allocate. Reduced-precision inputs accumulate
// in float, double inputs in double. No launcher uses atomics: every backward
// is a gather and every reduction runs in a fixed order, so results are
// bitwise reproducible run to run.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace fcnfast {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// ---- skip_add_crop: out = coarse + skip[..., oy:oy+h, ox:ox+w] ------------
// planes = N*C; coarse/out (planes, h, w); skip (planes, skip_h, skip_w).
cudaError_t skip_add_crop(DType dtype, const void* coarse, const void* skip, void* out, int planes,
                          int h, int w, int skip_h, int skip_w, int oy, int ox,
                          cudaStream_t stream);
// grad_skip (planes, skip_h, skip_w) = grad inside the window, 0 elsewhere.
cudaError_t skip_add_crop_backward(DType dtype, const void* grad, void* grad_skip, int planes,
                                   int h, int w, int skip_h, int skip_w, int oy, int ox,
                                   cudaStream_t stream);

// ---- score_skip: out = coarse + conv1x1(feature * scale, weight, bias)[window]
struct ScoreSkipShape {
  int n, classes, channels;  // coarse (n, classes, h, w); feature (n, channels, fh, fw)
  int h, w, feature_h, feature_w, oy, ox;
};
// bias may be null.
cudaError_t score_skip(DType dtype, const void* coarse, const void* feature, const void* weight,
                       const void* bias, double scale, void* out, const ScoreSkipShape& s,
                       cudaStream_t stream);
// Any of grad_feature (feature's shape), grad_weight (classes, channels) and
// grad_bias (classes) may be null: that gradient is not computed.
cudaError_t score_skip_backward(DType dtype, const void* grad, const void* feature,
                                const void* weight, double scale, void* grad_feature,
                                void* grad_weight, void* grad_bias, const ScoreSkipShape& s,
                                cudaStream_t stream);

// ---- conv_transpose2d (+ output crop) --------------------------------------
struct ConvTranspose2dShape {
  int n, in_channels, in_h, in_w;
  int out_channels, groups;  // out_channels = weight.size(1) * groups
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int top, left, out_h, out_w;  // the kept window of the full output
};
// x (n, in_channels, in_h, in_w); weight (in_channels, out_channels/groups, kh, kw);
// bias (out_channels) or null; out (n, out_channels, out_h, out_w).
cudaError_t conv_transpose2d(DType dtype, const void* x, const void* weight, const void* bias,
                             void* out, const ConvTranspose2dShape& s, cudaStream_t stream);
// grad is the gradient of the cropped output; any output pointer may be null.
cudaError_t conv_transpose2d_backward(DType dtype, const void* grad, const void* x,
                                      const void* weight, void* grad_x, void* grad_weight,
                                      void* grad_bias, const ConvTranspose2dShape& s,
                                      cudaStream_t stream);

// ---- frozen bilinear upsampling and the ops fused with it ------------------
struct UpsampleShape {
  int n, channels, in_h, in_w, scale;
  int top, left, out_h, out_w;  // the kept window of the full ((in_h+1)*scale, ...) output
};
cudaError_t bilinear_upsample2d(DType dtype, const void* x, void* out, const UpsampleShape& s,
                                cudaStream_t stream);
cudaError_t bilinear_upsample2d_backward(DType dtype, const void* grad, void* grad_x,
                                         const UpsampleShape& s, cudaStream_t stream);
// labels (n, out_h, out_w) int64; ties and NaN as torch.argmax (first index).
cudaError_t upsample_argmax(DType dtype, const void* x, int64_t* labels, const UpsampleShape& s,
                            cudaStream_t stream);

// Scratch the cross-entropy launchers need (block partial sums, the backward
// coefficient and one log-sum-exp per kept pixel).
size_t upsample_cross_entropy_workspace_bytes(const UpsampleShape& s);
// loss: one element of dtype. mean: divide by the number of non-ignored pixels.
// A target outside [0, channels) that is not ignore_index makes the loss NaN
// (either reduction). bad_label (device, two int64, may be null) receives the
// first such label in memory order as {flat index, value}, or {-1, 0}: the
// binding reports it without a device sync (csrc/host/pending_checks.h).
cudaError_t upsample_cross_entropy(DType dtype, const void* x, const int64_t* target,
                                   int64_t ignore_index, bool mean, void* loss, int64_t* bad_label,
                                   void* workspace, const UpsampleShape& s, cudaStream_t stream);
// grad_loss: one element of dtype (on the device); grad_x has x's shape.
cudaError_t upsample_cross_entropy_backward(DType dtype, const void* grad_loss, const void* x,
                                            const int64_t* target, int64_t ignore_index, bool mean,
                                            void* grad_x, void* workspace, const UpsampleShape& s,
                                            cudaStream_t stream);

}  // namespace cuda
}  // namespace fcnfast
