// flora/flora.h: the public API in one include.
//   spec.h       options, validation, parameter counts, contraction plan, conv cost model
//   functional.h the math as pure functions
//   adapter.h    one adapter's parameters
//   layers.h     adaptable Linear / ConvNd / Embedding / ParameterAdapter
//   runtime.h    thread configuration
#pragma once

#include "flora/adapter.h"
#include "flora/functional.h"
#include "flora/layers.h"
#include "flora/runtime.h"
#include "flora/spec.h"
