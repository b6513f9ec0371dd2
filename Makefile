# Two entry points for a fresh machine: `make demo` and `make test`. Each sets itself up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fdpipe-installed
FMNIST := /usr/share/datasets/fashion-mnist
DEMO_OUT ?= demo-out

.PHONY: demo test bench peers gpu-wheels setup data clean help

help:
	@echo "make demo   set up, then run extract -> distill -> finetune on Fashion-MNIST (see README)"
	@echo "make test   set up, then run the full test suite"
	@echo "make bench  set up, then run the benchmarks in bench/ (writes bench/results/*.json)"
	@echo "make peers  install mosaicml-streaming and litdata into .peers/ for bench/peers.py (optional)"
	@echo "make gpu-wheels  download into .whl/ the cp312 wheels bench/gpu.sh installs on a GPU machine"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[demo,s3,test]"
	touch $(STAMP)

setup: $(STAMP) data

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package. Without apt, point FDPIPE_DATA at a folder
# holding the four *-idx?-ubyte.gz files instead.
data:
	@if [ -z "$$FDPIPE_DATA" ] && [ ! -f $(FMNIST)/t10k-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; \
	  else \
	    echo "error: apt-get is unavailable; put the Fashion-MNIST *.gz files in a folder and set FDPIPE_DATA to it"; exit 1; \
	  fi; \
	fi

demo: setup
	$(BIN)/fdpipe demo --out $(DEMO_OUT)

# One pytest worker per core (pytest-xdist), each test file on one worker so that its module fixtures are built once.
# Many tests wait on subprocesses and servers: two workers on 2 cores run the suite in about 6 minutes on the 2-core
# Intel Xeon (6:41 in a fresh-clone CI run of 2026-12-03, 7:56 with the set-up and a warm pip cache; 13:46 of an
# older, smaller suite on the AMD EPYC machines); one worker took twice as long (24 minutes to 12.4, earlier).
test: setup
	$(BIN)/python -m pytest -q -n auto --dist loadfile tests

bench: setup
	$(BIN)/python -m bench.run_all

# The readers bench/peers.py compares fdpipe with, beside the venv (never a test dependency): mosaicml-streaming pins
# numpy<2.2 and litdata pulls in lightning, so both go into .peers/ without their declared dependencies, with the
# modules they import at these versions; the venv's numpy and torch serve them. `make peers` then
# `PYTHONPATH=.peers .venv/bin/python -m bench.peers`.
PEERS := mosaicml-streaming==0.13.0 litdata==0.2.76 xxhash==4.1.0 zstd==1.5.7.2 python-snappy==0.7.3 cramjam==2.14.0 \
  Brotli==1.2.1 lightning-utilities==0.15.3 obstore==0.12.1 tifffile==2026.3.3 catalogue==2.0.10 \
  transformers==4.57.6 huggingface-hub==0.36.2 tokenizers==0.22.2

.peers/.installed: Makefile | $(STAMP)
	rm -rf .peers
	$(BIN)/python -m pip install -q --no-deps --target .peers $(PEERS)
	touch $@

peers: .peers/.installed
	PYTHONPATH=.peers $(BIN)/python -c "import streaming, litdata; print('peers: mosaicml-streaming', streaming.__version__, '/ litdata', litdata.__version__)"

# The wheels bench/gpu.sh installs on a GPU machine that has Python 3.12 with torch, timm, pyarrow, click, fsspec,
# safetensors and tensorstore but no registry: fdpipe's other dependencies and their own (Requires-Dist) that such a
# machine lacks, at the versions of constraints.txt. numpy, typing_extensions and packaging are installed there only
# when the machine's own are older than zarr needs. About 26 MB; carry .whl/ to the machine with the checkout.
GPU_WHEELS := zarr numcodecs webdataset donfig braceexpand google-crc32c simplejpeg numpy typing_extensions packaging

gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  $$(for p in $(GPU_WHEELS); do grep -i "^$$p==" constraints.txt || { echo "no $$p in constraints.txt" >&2; exit 1; }; done)
	@du -sh .whl

clean:
	rm -rf $(VENV) $(DEMO_OUT) bench/results .pytest_cache .peers
