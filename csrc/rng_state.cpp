// Access to libtorch's default generators, which the tch crate does not expose: their state is
// saved with --save_state and restored by --resume so a resumed run draws exactly what an
// uninterrupted one would (timesteps, noise, dropout masks).
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <cstdio>
#include <mutex>

namespace {
at::Generator default_generator(int device_type, int index) {
  if (device_type == 0) return at::globalContext().defaultGenerator(at::Device(at::kCPU));
  return at::globalContext().defaultGenerator(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index)));
}
}  // namespace

extern "C" {
// A new heap at::Tensor (uint8) holding the generator state; nullptr on error (message in err).
void* sdlora_rng_get_state(int device_type, int index, char* err, size_t errlen) {
  try {
    at::Generator gen = default_generator(device_type, index);
    std::lock_guard<std::mutex> lock(gen.mutex());
    return new at::Tensor(gen.get_state());
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "%s", e.what());
    return nullptr;
  }
}

// Restores a state from sdlora_rng_get_state; 0 on success.
int sdlora_rng_set_state(int device_type, int index, const void* state, char* err, size_t errlen) {
  try {
    at::Generator gen = default_generator(device_type, index);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(*static_cast<const at::Tensor*>(state));
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "%s", e.what());
    return 1;
  }
}
}
