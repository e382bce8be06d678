// tch turns CUDA autocast on and off but cannot choose its dtype (fp16 by default); bf16 mixed
// precision (--mixed_precision=bf16) needs it set, as torch.autocast("cuda", dtype=bfloat16).
#include <ATen/autocast_mode.h>

extern "C" void sdlora_autocast_set_cuda_dtype(int bf16) {
  at::autocast::set_autocast_dtype(at::kCUDA, bf16 ? at::kBFloat16 : at::kHalf);
}
