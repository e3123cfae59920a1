# One command for the tests (`make test`), from a fresh clone:
#   creates .venv if missing, installs the dependencies (torch 2.14.1 with CUDA
#   13.0 so the CUDA kernels compile even without a GPU, plus the test extras:
#   pytest, bitsandbytes and transformers as oracles), builds the extension
#   incrementally (ninja), builds and runs the native C++ kernel tests (the CPU
#   kernels, and the CUDA kernels in a CPU emulation), then runs pytest. CUDA
#   tests run when a GPU is visible and skip otherwise.
#
# Environment: PYTHON (interpreter for the venv, default python3),
# TORCH_SPEC (default torch==2.14.1), PYTHIA_NATIVE_CUDA=0|1 (see setup.py),
# MAX_JOBS (compile jobs), PYTEST_ARGS (extra pytest arguments).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: test build native-test native-asan asan-pytest bench install generate clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Dependencies, reinstalled when pyproject.toml or this file changes, or for
# another TORCH_SPEC: the stamp is named by a checksum of it, and an install
# removes the other specs' stamps, so torch==2.13.0 and then the default again
# each reinstall torch.
DEPS := $(VENV)/.deps-$(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)
$(DEPS): pyproject.toml Makefile | $(PY)
	rm -f $(VENV)/.deps $(VENV)/.deps-*
	$(PY) -m pip install --upgrade "setuptools>=64" wheel ninja
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install numpy "tokenizers>=0.19" "safetensors>=0.4" "huggingface_hub>=0.23" \
	    "pytest>=8" expecttest "bitsandbytes>=0.45" "transformers>=4.45" "accelerate>=1.1"
	touch $@

# Incremental: ninja recompiles only what changed (build/ keeps the objects).
build: $(DEPS)
	$(PY) setup.py -q build_ext --inplace

native-test: $(DEPS)
	cmake -S . -B build-native -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) >/dev/null
	cmake --build build-native
	ctest --test-dir build-native --output-on-failure

# The native tests again under AddressSanitizer and UndefinedBehaviorSanitizer
# (any out-of-bounds access of a CPU kernel, or of a CUDA kernel in the
# emulation, an overflowing shift or integer, a float cast to an integer it
# does not fit, fails them); CI runs it.
native-asan: $(DEPS)
	cmake -S . -B build-native-asan -G Ninja -DPN_SANITIZE=address,undefined -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) >/dev/null
	cmake --build build-native-asan
	ctest --test-dir build-native-asan --output-on-failure

# The whole pytest suite against the extension built (CPU part) with
# AddressSanitizer and UndefinedBehaviorSanitizer (as native-asan), in a copy
# of the tree (build-asan/tree: its own in-place _C, its own objects,
# incremental) so the normal build stays as it is. ASan is preloaded into the
# uninstrumented python (libstdc++ too, so its __cxa_throw interceptor finds
# the real one); it checks every heap access of our kernels as torch's tests
# reach them, e.g. a read of a freed temporary. UBSan stops at its first
# finding, e.g. an overflowing size computation in an op's checks.
# allocator_may_return_null: a test asks for an impossible KV cache on purpose.
# It runs the tests with the small trained tokenizer (tests/neox.py), where
# `make test` uses the real one when ../shared has it: a test that holds with
# only one of them fails one of the two runs.
ASAN_TREE := build-asan/tree
ASAN_FLAGS := -fsanitize=address,undefined,float-cast-overflow \
    -fno-sanitize-recover=undefined,float-cast-overflow -fno-omit-frame-pointer
asan-pytest: $(DEPS)
	mkdir -p $(ASAN_TREE)
	rm -rf $(ASAN_TREE)/csrc $(ASAN_TREE)/pythia_native $(ASAN_TREE)/tests
	cp -a setup.py pyproject.toml _pythia_native_cli.py csrc pythia_native tests $(ASAN_TREE)/
	rm -f $(ASAN_TREE)/pythia_native/_C*.so
	cd $(ASAN_TREE) && PYTHIA_NATIVE_CUDA=0 CFLAGS="$(ASAN_FLAGS)" LDFLAGS="-fsanitize=address,undefined" \
	    $(abspath $(PY)) setup.py -q build_ext --inplace
	cd $(ASAN_TREE) && LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	    ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:allocator_may_return_null=1 \
	    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    PYTHIA_NATIVE_TOKENIZER=fallback \
	    $(abspath $(PY)) -m pytest -q -p no:cacheprovider tests $(PYTEST_ARGS)

test: build native-test
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# Registers the package and its `pythia-native` command in the venv (pip
# builds the extension again, in a folder of its own: a few minutes).
install: $(DEPS)
	$(PY) -m pip install --no-build-isolation --no-deps -e .

# The main job: generate with pythia-160m (downloaded once into the Hugging Face cache).
PROMPT ?= Once upon a time
MODEL ?= EleutherAI/pythia-160m
generate: build
	$(PY) -m pythia_native generate --model "$(MODEL)" "$(PROMPT)"

# The gemm_4bit benchmark against bitsandbytes and dense torch (CPU, 1 and 2
# threads), into build/ (benchmarks/results/ holds the committed runs).
bench: build
	$(PY) benchmarks/bench_gemm_4bit.py --device cpu --threads 1 2 --out build/bench/gemm_4bit_cpu.md

clean:
	rm -rf build build-native build-native-asan build-asan pythia_native/_C*.so
