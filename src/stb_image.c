/* stb_image's implementation for flora (PNG, JPEG, BMP only), from Debian's libstb-dev. */
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STBI_ONLY_BMP
#include <stb/stb_image.h>
