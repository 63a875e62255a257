# flora: the two commands are `make demo` and `make test`.
BUILD ?= build
JOBS  ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all setup configure build test demo bench results results-quick clean

all: build

setup:
	@scripts/setup.sh

$(BUILD)/build.ninja: CMakeLists.txt | setup
	@cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS) >/dev/null

configure: setup $(BUILD)/build.ninja

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

test: build
	@cd $(BUILD) && ctest --output-on-failure -j 1

demo: build
	@$(BUILD)/bin/flora demo

# The study behind docs/RESULTS.md (under an hour on 2 cores), and its pipeline on small data in a few minutes.
results: build
	@$(BUILD)/bin/flora bench study --fresh --out results

results-quick: build
	@$(BUILD)/bin/flora bench study --quick --out results-quick

bench: build
	@$(BUILD)/bin/flora_bench --benchmark_min_time=0.2

clean:
	@rm -rf $(BUILD)
