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
$(STAMP): $(VPY) pyproject.toml
	$(VPY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attnopt inspect examples/tiny_transformer.onnx --explain || \
	  ($(VPY) examples/export_example.py && $(VENV)/bin/attnopt inspect examples/tiny_transformer.onnx --explain)
	$(VPY) examples/demo.py

test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) build *.egg-info
