// The few stb_image functions flora uses (implemented in src/stb_image.c from Debian's libstb-dev
// header), declared here so no C++ file includes the 7,000-line header.
#pragma once
#ifdef __cplusplus
extern "C" {
#endif
unsigned char* stbi_load(const char* filename, int* x, int* y, int* channels_in_file, int desired_channels);
void stbi_image_free(void* retval_from_stbi_load);
const char* stbi_failure_reason(void);
#ifdef __cplusplus
}
#endif
