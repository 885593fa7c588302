# Two commands on a fresh machine: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch / torchvision that resolve together on the project machine (pip is capped at these there).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test install clean train-shapes

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) eval.py test -c configs/eval/demo.yaml
	@echo "gallery: outputs/demo/gallery_<method>.png; TensorBoard: $(VENV)/bin/tensorboard --logdir outputs/demo/tensorboard"

test: $(STAMP)
	$(PY) -m pytest src tests --durations=15

train-shapes: $(STAMP)  ## retrain the shipped clipib-shapes model (four stages, ~1.5 h on a 2-core CPU)
	$(PY) train.py fit -c configs/train/shapes_clip.yaml
	$(PY) train.py fit -c configs/train/shapes_clip.yaml -c configs/train/shapes_clip_anneal.yaml
	$(PY) train.py fit -c configs/train/shapes_clip.yaml -c configs/train/shapes_clip_anneal2.yaml
	$(PY) train.py fit -c configs/train/shapes_clip.yaml -c configs/train/shapes_clip_anneal3.yaml

clean:
	rm -rf $(VENV) outputs
