// How the kernels report a libtorch error across the C boundary: a malloc'd copy of the
// message, which Rust reads and hands back to `atoll_free_message`.
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>

inline char* copy_message(const std::string& message) {
  char* out = static_cast<char*>(std::malloc(message.size() + 1));
  if (out != nullptr) std::memcpy(out, message.c_str(), message.size() + 1);
  return out;
}
